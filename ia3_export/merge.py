"""Folding adapters into a saved model: the `merge` command's API."""
from __future__ import annotations

from .atomic import atomic_output_dir, check_output
from .errors import IA3Error
from .loading import copy_side_files, head_class, load_task_model, read_model_config, write_config
from .progress import stage


def load_with_adapters(model_dir: str, adapter_dirs: list[str], task: str | None = None, dtype=None,
                       trust_remote_code: bool = False):
    """The base model with each adapter loaded (and all of them active).

    The head is the task's (see `loading.head_class`): --task, else the adapters' task_type, else
    config.json's; a classifier gets the adapters' num_labels and label names."""
    from . import adapter_format as fmt
    from .model import IA3Model

    adapters = [fmt.read_adapter(path) for path in adapter_dirs]
    names = [a.name for a in adapters]
    for name in names:
        if names.count(name) > 1:
            raise IA3Error(f"two adapters are named {name!r}; give the folders different names")
    auto_class = head_class(task, adapters, read_model_config(model_dir))
    model = IA3Model(load_task_model(model_dir, auto_class, adapters, dtype=dtype, trust_remote_code=trust_remote_code))
    for adapter in adapters:
        model.load_adapter(adapter, name=adapter.name, activate=False)
    model.set_adapter(names)
    return model


def merge_to_folder(model_dir: str, adapter_dirs: list[str], out_dir: str, force: bool = False,
                    task: str | None = None, trust_remote_code: bool = False) -> str:
    """Fold the adapters and write a plain transformers model (atomically); returns a report."""
    inputs = [model_dir, *adapter_dirs]
    check_output(out_dir, force, inputs)
    stage(f"loading {model_dir} with {len(adapter_dirs)} adapter(s)")
    model = load_with_adapters(model_dir, adapter_dirs, task, trust_remote_code=trust_remote_code)
    names = list(model.active_adapters)
    layers = sum(1 for layer in model.ia3_layers().values() if any(n in layer.ia3_l for n in names))
    merged = model.merge_and_unload()
    with atomic_output_dir(out_dir, force=force, inputs=inputs) as tmp:
        stage(f"saving the merged model to {out_dir}")
        merged.save_pretrained(tmp)
        write_config(tmp, merged)
        copy_side_files(model_dir, tmp)
    return f"merged {', '.join(names)} into {layers} layers of {model_dir} ({type(merged).__name__}) -> {out_dir}"
