"""Opening a model folder: checks first, safetensors only, no remote code, the right head.

Used by merge, train, export and parity so every command refuses the same bad folders with
the same message.
"""
from __future__ import annotations

import os

from ..errors import IA3Error
from ..formats.jsonfile import read_json, write_json
from ..formats.labels import label_config, label_fields
from ..formats.model_config import check_model_config
from ..formats.reader import check_regular, present, read_bytes, registers
from ..formats.safetensors_io import read_header
from ..tasks import ALL_NAMES, TASKS, auto_model_class, task_named, task_of_architectures, task_of_type

# Task names (transformers pipelines', optimum's export tasks) -> the Auto class of their head.
TASK_HEADS = {name: task_named(name).auto_class for name in ALL_NAMES}
# JSON files in a model folder that transformers reads with Python's (recursive) json module, and their kinds.
TRANSFORMERS_JSON = {"generation_config.json": "json", "model.safetensors.index.json": "json",
                     "tokenizer_config.json": "tokenizer", "special_tokens_map.json": "tokenizer",
                     "preprocessor_config.json": "json"}
# Files copied beside a merged model or an ONNX export (never weights).
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@registers("model_dir", ("config.json", "json"))
def read_model_config(model_dir: str) -> dict:
    """A model folder's config.json, every field that sizes the model checked (formats/model_config.py)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise IA3Error(f"model folder {model_dir} does not exist")
    if not present(path):
        raise IA3Error(f"{model_dir} has no config.json; pass a transformers model folder (save_pretrained output)")
    return check_model_config(read_json(path), path)


@registers("model_dir", ("model.safetensors", "safetensors"), ("generation_config.json", "json"),
           ("tokenizer_config.json", "tokenizer"))
def check_model_files(model_dir: str) -> None:
    """What transformers will parse, checked first by our readers, so a hostile folder is one clear
    error, not a traceback (or a hang on a FIFO) inside transformers: every safetensors header against
    its file's size (a truncated download), the JSON files it reads with Python's recursive parser,
    and the side files we copy (regular files within their caps)."""
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.endswith(".safetensors"):
            read_header(path)
        elif name in TRANSFORMERS_JSON:
            read_json(path, TRANSFORMERS_JSON[name])
        elif name in SIDE_FILES:
            check_regular(path, "tokenizer")


def auto_class_name(config: dict) -> str:
    """The Auto class of the head config.json's `architectures` names; AutoModel for a bare model."""
    task = task_of_architectures(config.get("architectures"))
    return task.auto_class if task else "AutoModel"


def adapters_task_type(adapters: list) -> tuple[str | None, str | None]:
    """(task_type, the folder of an adapter that sets it) shared by the adapters; (None, None) when none
    sets one. Adapters trained for different tasks need different heads, so they cannot go together."""
    found = {}
    for a in adapters:
        if a.config.task_type:
            found.setdefault(a.config.task_type, a.path)
    if len(found) > 1:
        listed = ", ".join(f"{path} is {task_type}" for task_type, path in found.items())
        raise IA3Error(f"the adapters were trained for different tasks ({listed}); use them separately")
    return next(iter(found.items()), (None, None))


def check_task(task: str, task_type: str | None, adapter_path: str | None, source: str = "--task",
               hint: str = "drop --task to load the head the adapter was trained with") -> None:
    """A task must build the head its adapter was trained with (PEFT's task_type), or be refused."""
    if task_type and TASK_HEADS.get(task) != task_of_type(task_type).auto_class:
        raise IA3Error(f"{source} {task} contradicts task_type {task_type} of the adapter {adapter_path}; {hint}")


def head_class(task: str | None, adapters: list, config: dict) -> str:
    """The Auto class to load: the task asked for, else the adapters' task_type, else config.json's head."""
    task_type, path = adapters_task_type(adapters)
    if task is not None:
        auto = task_named(task).auto_class
        check_task(task, task_type, path)
        return auto
    return task_of_type(task_type).auto_class if task_type else auto_class_name(config)


def load_task_model(model_dir: str, auto_class: str, adapters: list = (), dtype=None, trust_remote_code: bool = False):
    """load_base_model with the head the adapters trained: a classifier gets their num_labels and names
    (labels.json, see ia3_export.formats.labels), so the head's shape and the saved config match the adapter."""
    labelled = any(t.labelled and t.auto_class == auto_class for t in TASKS.values())
    overrides = label_config(list(adapters), read_model_config(model_dir)) if labelled else {}
    return load_base_model(model_dir, auto_class, dtype=dtype, trust_remote_code=trust_remote_code, **overrides)


def load_base_model(model_dir: str, auto_class: str | None = None, dtype=None, trust_remote_code: bool = False,
                    **config_overrides):
    """The model in eval mode, loaded from safetensors only (pickled weights are refused).

    config_overrides (e.g. num_labels, id2label for a new classification head) go to from_pretrained.
    A folder whose architecture only its own code defines is refused unless trust_remote_code
    (check_remote_code); a known model_type loads transformers' own class, as transformers does.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = read_model_config(model_dir)
    files = os.listdir(model_dir)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = f" ({pickles[0]} is a pickle, which can run code when loaded)" if pickles else ""
        raise IA3Error(
            f"{model_dir} has no .safetensors weights{hint}; re-save the model with "
            "save_pretrained(..., safe_serialization=True) from a trusted environment"
        )
    check_remote_code(model_dir, config, trust_remote_code)
    check_model_files(model_dir)
    cls = auto_model_class(auto_class or auto_class_name(config))
    kwargs = {"use_safetensors": True, "trust_remote_code": trust_remote_code, **config_overrides}
    if dtype is not None:
        kwargs["dtype"] = dtype
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # a new task head is expected, not worth a load report
    try:
        model = cls.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise IA3Error(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    check_finite_weights(model, model_dir)
    return model.eval()


def check_remote_code(model_dir: str, config: dict, trust_remote_code: bool) -> None:
    """Refuse, before anything reads the folder with transformers, an architecture that only the folder's
    own code defines (`auto_map`, a model_type transformers does not know): loading it would run it."""
    from transformers import CONFIG_MAPPING

    if config.get("auto_map") and not trust_remote_code and config["model_type"] not in CONFIG_MAPPING:
        raise IA3Error(f"{model_dir} ships its own model code (auto_map in config.json), which loading would run; "
                       "pass --trust-remote-code (trust_remote_code=True) only if you trust that folder")


def check_finite_weights(model, model_dir: str) -> None:
    """NaN or inf in a weight would flow silently into every merged, exported or trained output."""
    import torch

    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise IA3Error(f"{model_dir}: weight {name} holds NaN or inf values; the checkpoint is corrupted, "
                           "re-save or re-download the model")


def copy_side_files(model_dir: str, out_dir: str) -> list[str]:
    """Copy tokenizer and generation files (not config.json, not weights) into out_dir."""
    copied = []
    for name in SIDE_FILES:
        src = os.path.join(model_dir, name)
        if present(src):
            data = read_bytes(src, "tokenizer")
            with open(os.path.join(out_dir, name), "wb") as f:  # inside the caller's atomic output folder
                f.write(data)
            copied.append(name)
    return copied


def write_config(out_dir: str, model, model_dir: str | None = None) -> str:
    """config.json naming the head that was saved or exported (`architectures`) and, for a classifier,
    num_labels and the label names, where pipelines and optimum read them. Starts from model_dir's
    config.json (an export) or from the one already in out_dir (save_pretrained's)."""
    path = os.path.join(out_dir, "config.json")
    config = read_json(os.path.join(model_dir or out_dir, "config.json"))
    config["architectures"] = [type(model).__name__]
    head = task_of_architectures([type(model).__name__])
    if head and head.labelled:
        config |= label_fields(model.config)
    return write_json(path, config, indent=2, ensure_ascii=False)


def has_tokenizer(model_dir: str) -> bool:
    return any(present(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
