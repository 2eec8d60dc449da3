"""Opening a model folder: checks first, safetensors only, no remote code, the right head.

Used by merge, train, export and parity so every command refuses the same bad folders with
the same message.
"""
from __future__ import annotations

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
