"""Folding adapters into a saved model: the `merge` command's API."""
from __future__ import annotations

import os

from .atomic import atomic_output_dir, check_output
from .errors import IA3Error
from .loading import copy_side_files, load_base_model
from .progress import stage


def load_with_adapters(model_dir: str, adapter_dirs: list[str], **load_kwargs):
    """The base model with each adapter loaded (and all of them active)."""
    from .model import IA3Model

    model = IA3Model(load_base_model(model_dir, **load_kwargs))
    names = []
    for path in adapter_dirs:
        name = os.path.basename(os.path.normpath(path))
        if name in names:
            raise IA3Error(f"two adapters are named {name!r}; give the folders different names")
        names.append(model.load_adapter(path, name=name, activate=False))
    model.set_adapter(names)
    return model


def merge_to_folder(model_dir: str, adapter_dirs: list[str], out_dir: str, force: bool = False) -> str:
    """Fold the adapters and write a plain transformers model (atomically); returns a report."""
    inputs = [model_dir, *adapter_dirs]
    check_output(out_dir, force, inputs)
    stage(f"loading {model_dir} with {len(adapter_dirs)} adapter(s)")
    model = load_with_adapters(model_dir, adapter_dirs)
    names = list(model.active_adapters)
    layers = sum(1 for layer in model.ia3_layers().values() if any(n in layer.ia3_l for n in names))
    merged = model.merge_and_unload()
    with atomic_output_dir(out_dir, force=force, inputs=inputs) as tmp:
        stage(f"saving the merged model to {out_dir}")
        merged.save_pretrained(tmp)
        copy_side_files(model_dir, tmp)
    return f"merged {', '.join(names)} into {layers} layers of {model_dir} -> {out_dir}"
