"""Opening a model folder: checks first, safetensors only, no remote code, the right head.

Used by merge, train, export and parity so every command refuses the same bad folders with
the same message.
"""
from __future__ import annotations

import json
import os
import shutil

from .errors import IA3Error
from .jsonfile import read_json

# What a model's `architectures` entry says -> the Auto class that rebuilds that head.
HEAD_SUFFIXES = {
    "ForCausalLM": "AutoModelForCausalLM",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForConditionalGeneration": "AutoModelForSeq2SeqLM",
    "ForTokenClassification": "AutoModelForTokenClassification",
}
# PEFT's task_type (adapter_config.json) -> the Auto class that builds the head it was trained with.
TASK_TYPE_HEADS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
# Task names (transformers pipelines', optimum's export tasks) -> the Auto class of their head.
TASK_HEADS = {
    "text-generation": "AutoModelForCausalLM",
    "text-generation-with-past": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "text2text-generation-with-past": "AutoModelForSeq2SeqLM",
    "feature-extraction": "AutoModel",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}
LABELLED_HEADS = ("AutoModelForSequenceClassification", "AutoModelForTokenClassification")
# Files copied beside a merged model or an ONNX export (never weights).
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def read_model_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise IA3Error(f"model folder {model_dir} does not exist")
    if not os.path.isfile(path):
        raise IA3Error(f"{model_dir} has no config.json; pass a transformers model folder (save_pretrained output)")
    config = read_json(path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise IA3Error(f"{path}: no model_type; is it a transformers config?")
    return config


def auto_class_name(config: dict) -> str:
    for arch in config.get("architectures") or []:
        for suffix, auto in HEAD_SUFFIXES.items():
            if arch.endswith(suffix):
                return auto
    return "AutoModel"


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
    if task_type and TASK_HEADS.get(task) != TASK_TYPE_HEADS[task_type]:
        raise IA3Error(f"{source} {task} contradicts task_type {task_type} of the adapter {adapter_path}; {hint}")


def head_class(task: str | None, adapters: list, config: dict) -> str:
    """The Auto class to load: the task asked for, else the adapters' task_type, else config.json's head."""
    task_type, path = adapters_task_type(adapters)
    if task is not None:
        if task not in TASK_HEADS:
            raise IA3Error(f"unknown task {task!r}; use one of {', '.join(TASK_HEADS)}")
        check_task(task, task_type, path)
        return TASK_HEADS[task]
    return TASK_TYPE_HEADS[task_type] if task_type else auto_class_name(config)


def load_task_model(model_dir: str, auto_class: str, adapters: list = (), dtype=None, trust_remote_code: bool = False):
    """load_base_model with the head the adapters trained: a classifier gets their num_labels and names
    (labels.json, see ia3_export.labels), so the head's shape and the saved config match the adapter."""
    from .labels import label_config

    overrides = label_config(list(adapters), read_model_config(model_dir)) if auto_class in LABELLED_HEADS else {}
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
    cls = getattr(transformers, auto_class or auto_class_name(config))
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
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def write_config(out_dir: str, model, model_dir: str | None = None) -> str:
    """config.json naming the head that was saved or exported (`architectures`) and, for a classifier,
    num_labels and the label names, where pipelines and optimum read them. Starts from model_dir's
    config.json (an export) or from the one already in out_dir (save_pretrained's)."""
    from .labels import label_fields

    path = os.path.join(out_dir, "config.json")
    config = read_json(os.path.join(model_dir or out_dir, "config.json"))
    config["architectures"] = [type(model).__name__]
    if type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        config |= label_fields(model.config)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def has_tokenizer(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
