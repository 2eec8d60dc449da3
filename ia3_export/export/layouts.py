"""`--layout`: where an export puts its graph. `optimum` (the default): `model.onnx` at the folder's
root, as ORTModelForCausalLM and onnxruntime-genai read it. `transformers.js`: the folder
transformers.js (`pipeline(task, folder)`) reads, i.e. the graph in `onnx/` named by its dtype
(`model.onnx` fp32, `model_fp16.onnx`, `model_int8.onnx`, `model_q4.onnx`) and config.json's
`transformers.js_config.dtype` naming that one file, so a plain `pipeline(...)` loads it without a
`dtype` option. The graph's names are already the ones transformers.js feeds (optimum's), and the
manifest records the new path, so our runtime and `parity` read the same folder.

What transformers.js cannot drive is refused before any work: adapters as graph inputs (it feeds
only the inputs it knows, so a swappable graph would silently run as the base model), the fused
graph (no `position_ids`, its own `logits_to_keep`, a shared KV buffer transformers.js does not
keep), and our seq2seq decoder (transformers.js expects optimum's `decoder_model_merged`).
"""
from __future__ import annotations

import os

from ..errors import IA3Error
from ..formats.jsonfile import read_json, write_json
from ..formats.manifest import LAYOUTS, OPTIMUM, TRACED, TRANSFORMERS_JS

TJS_FOLDER = "onnx"  # transformers.js' `subfolder` default
TJS_CONFIG_KEY = "transformers.js_config"
# (export dtype, --quantize) -> transformers.js' dtype; its file suffix is DEFAULT_DTYPE_SUFFIX_MAPPING's.
# int8 is ONNX Runtime's quantize_dynamic with signed weights (transformers.js' `int8`, not `q8`, which
# it makes with unsigned ones); int4 is MatMulNBits blocks (its `q4`).
TJS_DTYPES = {("fp32", None): ("fp32", ""), ("fp16", None): ("fp16", "_fp16"),
              ("fp32", "int8"): ("int8", "_int8"), ("fp32", "int4"): ("q4", "_q4")}
TJS_TASKS = ("text-generation-with-past", "text-classification", "feature-extraction")


def check_layout(layout: str, strategy, graph: str, task) -> None:
    """Refuse what the layout cannot hold, before the model is loaded."""
    if layout not in LAYOUTS:
        raise IA3Error(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout != TRANSFORMERS_JS:
        return
    if not strategy.folds_adapters:
        raise IA3Error(f"--layout transformers.js needs --mode merged: transformers.js feeds only the model's own "
                       f"inputs, so a {strategy.name} export's adapters could not be selected")
    if graph != TRACED:
        raise IA3Error(f"--layout transformers.js needs --graph {TRACED}: transformers.js cannot drive the {graph} "
                       "graph (no position_ids, logits_to_keep, a shared KV buffer)")
    if task.name not in TJS_TASKS:
        raise IA3Error(f"--layout transformers.js supports {', '.join(TJS_TASKS)}, not {task.name}; export without "
                       "--layout")


def place(layout: str, specs: list, dtype: str, quantize) -> None:
    """Point each graph spec at the file the layout names (the trace, the quantizer, validation and the
    manifest all follow `spec.file`)."""
    if layout != TRANSFORMERS_JS:
        return
    _, suffix = TJS_DTYPES[dtype, quantize and quantize.method]
    for spec in specs:  # one graph for these tasks
        stem, ext = os.path.splitext(spec.file)
        spec.file = f"{TJS_FOLDER}/{stem}{suffix}{ext}"


def finish(layout: str, folder: str, graphs: dict, dtype: str, quantize) -> dict:
    """Name the graph's dtype in config.json (and its external data file, if any) for transformers.js;
    returns the manifest's extra fields."""
    if layout != TRANSFORMERS_JS:
        return {}
    path = os.path.join(folder, "config.json")
    config = read_json(path)
    entry = {"dtype": TJS_DTYPES[dtype, quantize and quantize.method][0]}
    data = {os.path.basename(g["file"]): 1 for g in graphs.values() if g.get("external_data")}
    if data:  # Node finds `<file>_data` beside the graph itself; a browser is told to fetch it
        entry["use_external_data_format"] = data
    kept = config.get(TJS_CONFIG_KEY)  # the base model's own (e.g. a converted model's), updated
    config[TJS_CONFIG_KEY] = {**(kept if isinstance(kept, dict) else {}), **entry}
    write_json(path, config, indent=2, ensure_ascii=False)
    return {"layout": layout}
