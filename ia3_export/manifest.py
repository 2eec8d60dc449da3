"""`ia3_export.json`: what an exported folder holds, read by the runtime and the parity checks.

Plain JSON and dicts, no torch: the lean serving install reads it. The keys below are the
contract; readers must ignore keys they do not know (writers may add more).
"""
from __future__ import annotations

import json
import os

from .errors import IA3Error
from .jsonfile import read_json

MANIFEST_NAME = "ia3_export.json"
FORMAT = "ia3-export"
FORMAT_VERSION = 1
MODES = ("merged", "swappable", "bank", "foldswap")
DTYPES = ("fp32", "fp16")
NUMPY_DTYPES = {"fp32": "float32", "fp16": "float16"}
REQUIRED_KEYS = ("format", "format_version", "mode", "task", "model_type", "dtype", "graphs")


def new_manifest(*, mode: str, task: str, model_type: str, dtype: str, opset: int, exporter: str,
                 graphs: dict, cache: dict | None, vectors: list[dict], adapters: list[dict],
                 tokens: dict, versions: dict, quantization: dict | None = None, **extra) -> dict:
    """A manifest dict with every contract key (in a stable order). `quantization` (None: float weights)
    describes a quantized base: method, its options, and per graph which initializer holds which
    parameter's quantized weight (export/quantize.py); a property of the folder, not a mode."""
    if mode not in MODES:
        raise IA3Error(f"unknown export mode {mode!r}; use one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise IA3Error(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mode": mode, "task": task,
        "model_type": model_type, "dtype": dtype, "opset": opset, "exporter": exporter,
        "graphs": graphs, "cache": cache, "vectors": vectors, "adapters": adapters,
        "tokens": tokens, "versions": versions, "quantization": quantization, **extra,
    }


def write_manifest(folder: str, manifest: dict) -> str:
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return path


def read_manifest(folder: str) -> dict:
    """The manifest of an exported folder, checked for the contract keys and a known version."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise IA3Error(f"{folder} has no {MANIFEST_NAME}; is it a folder written by `ia3-export export`?")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IA3Error(f"{path}: not an ia3-export manifest (format is not {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise IA3Error(f"{path}: missing key {missing[0]!r}; re-export the model")
    if manifest["format_version"] > FORMAT_VERSION:
        raise IA3Error(
            f"{path}: format_version {manifest['format_version']} is newer than this ia3-export reads "
            f"({FORMAT_VERSION}); upgrade ia3-export"
        )
    return manifest


def vector_dims(manifest: dict, graph: str | None = None) -> dict[str, int]:
    """Vector input name -> dim (optionally for one graph)."""
    return {v["name"]: v["dim"] for v in manifest.get("vectors") or [] if graph is None or v["graph"] == graph}


def graph_path(folder: str, manifest: dict, graph: str) -> str:
    try:
        return os.path.join(folder, manifest["graphs"][graph]["file"])
    except KeyError:
        raise IA3Error(f"the export in {folder} has no {graph!r} graph; it has {', '.join(manifest['graphs'])}") from None
