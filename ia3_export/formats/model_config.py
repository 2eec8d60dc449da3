"""A transformers `config.json`, checked field by field wherever one is read (the model folder's
in core/loading.py, an export's in runtime/folder.py and parity).

The sizes in a config decide loops and allocations (layers to export, heads to split, the
position cap of generation), so each field is a row of `RULES`: its type and range, with the
ceilings of formats/limits.py. A field that is absent or null is left to transformers' default;
one that is present must be right. Sub-configs (`text_config`, `vision_config`, ...: every key
ending in `_config`) must be objects and are checked with the same rules.
"""
from __future__ import annotations

from ..errors import IA3Error
from .jsonfile import shown
from .limits import within

# field -> the ceiling it is checked against (formats/limits.py); the names differ between architectures.
RULES = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers",
                     "decoder_layers"), "num_hidden_layers"),
    **dict.fromkeys(("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads"), "num_attention_heads"),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model"), "hidden_size"),
    **dict.fromkeys(("intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim"),
                    "intermediate_size"),
    **dict.fromkeys(("head_dim", "d_kv"), "head_dim"),
    "vocab_size": "vocab_size",
    **dict.fromkeys(("max_position_embeddings", "n_positions"), "max_position_embeddings"),
    "num_labels": "num_labels",
}


def check_model_config(config, path: str, field: str = "") -> dict:
    """`config` (parsed config.json at `path`) if every field it sets passes its rule; else an
    IA3Error naming the file and the field. `field` is the prefix of a sub-config."""
    if not isinstance(config, dict):
        raise IA3Error(f"{path}: {field.rstrip('.') or 'the config'} is {shown(config)}, expected a JSON object; "
                       "is it a transformers config.json?")
    if not field:
        if "model_type" not in config:
            raise IA3Error(f"{path}: no model_type; is it a transformers config?")
        if not isinstance(config["model_type"], str):
            raise IA3Error(f"{path}: model_type is {shown(config['model_type'])}, expected a string; fix the config")
        architectures = config.get("architectures")
        if architectures is not None and not (isinstance(architectures, list)
                                              and all(isinstance(a, str) for a in architectures)):
            raise IA3Error(f"{path}: architectures is {shown(architectures)}, expected a list of class names; "
                           "fix the config")
    for key, value in config.items():
        if value is None:
            continue
        if key in RULES:
            within(RULES[key], value, f"{path}: {field}{key}")
        elif key.endswith("_config"):
            check_model_config(value, path, f"{field}{key}.")
    return config
