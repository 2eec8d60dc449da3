"""Loading a model with adapters, and folding them into a saved model (the `merge` command's API).

`with_adapters` and `fold_adapters` are the one way every part (merge, export, parity) puts
adapters on a loaded model."""
from __future__ import annotations

from ..formats import adapter_format as fmt
from ..formats.atomic import atomic_output_dir, check_output
from ..errors import IA3Error
from .loading import copy_side_files, head_class, load_task_model, read_model_config, write_config
from ..progress import stage


def adapter_names(adapters, message: str) -> list[str]:
    """The adapters' names; IA3Error(`message` with {name}) when two share one (each caller words it
    for what its user typed)."""
    names = [a.name for a in adapters]
    for name in names:
        if names.count(name) > 1:
            raise IA3Error(message.format(name=name))
    return names


def with_adapters(model, adapters, active=()):
    """An IA3Model around `model` holding every adapter (each under its own name), `active` on."""
    from .model import IA3Model

    ia3 = IA3Model(model)
    for a in adapters:
        ia3.load_adapter(a, name=a.name, activate=False)
    ia3.set_adapter(list(active))
    return ia3


def fold_adapters(model, adapters):
    """The model with the adapters folded in (their product), or the model itself without adapters."""
    if not adapters:
        return model
    return with_adapters(model, adapters, active=[a.name for a in adapters]).merge_and_unload()


def load_with_adapters(model_dir: str, adapter_dirs: list[str], task: str | None = None, dtype=None,
                       trust_remote_code: bool = False):
    """The base model with each adapter loaded (and all of them active).

    The head is the task's (see `loading.head_class`): --task, else the adapters' task_type, else
    config.json's; a classifier gets the adapters' num_labels and label names."""
    adapters = [fmt.read_adapter(path) for path in adapter_dirs]
    names = adapter_names(adapters, "two adapters are named {name!r}; give the folders different names")
    auto_class = head_class(task, adapters, read_model_config(model_dir))
    model = load_task_model(model_dir, auto_class, adapters, dtype=dtype, trust_remote_code=trust_remote_code)
    return with_adapters(model, adapters, active=names)


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
