"""Opening a model folder: checks first, safetensors only, no remote code, the right head.

Used by merge, train, export and parity so every command refuses the same bad folders with
the same message.
"""
from __future__ import annotations

import os
import shutil

from .errors import IA3Error
from .jsonfile import read_json, shown
from .safetensors_io import read_header

# What a model's `architectures` entry says -> the Auto class that rebuilds that head.
HEAD_SUFFIXES = {
    "ForCausalLM": "AutoModelForCausalLM",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForConditionalGeneration": "AutoModelForSeq2SeqLM",
    "ForTokenClassification": "AutoModelForTokenClassification",
}
# JSON files in a model folder that transformers reads with Python's (recursive) json module.
TRANSFORMERS_JSON = ("generation_config.json", "model.safetensors.index.json", "tokenizer_config.json",
                     "special_tokens_map.json", "preprocessor_config.json")
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
    if not isinstance(config["model_type"], str):
        raise IA3Error(f"{path}: model_type is {shown(config['model_type'])}, expected a string; fix the config")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise IA3Error(f"{path}: architectures is {shown(architectures)}, expected a list of class names; fix the config")
    return config


def check_model_files(model_dir: str) -> None:
    """What transformers will parse, checked first by our readers, so a hostile folder is one clear
    error, not a traceback from inside transformers: every safetensors header against its file's
    size (a truncated download), and the JSON files it reads with Python's recursive parser."""
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.endswith(".safetensors"):
            read_header(path)
        elif name in TRANSFORMERS_JSON and os.path.isfile(path):
            read_json(path)


def auto_class_name(config: dict) -> str:
    for arch in config.get("architectures") or []:
        for suffix, auto in HEAD_SUFFIXES.items():
            if arch.endswith(suffix):
                return auto
    return "AutoModel"


def load_base_model(model_dir: str, auto_class: str | None = None, dtype=None, trust_remote_code: bool = False,
                    **config_overrides):
    """The model in eval mode, loaded from safetensors only (pickled weights are refused).

    config_overrides (e.g. num_labels, id2label for a new classification head) go to from_pretrained.
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
    check_model_files(model_dir)
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


def has_tokenizer(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
