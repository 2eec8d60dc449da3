"""`ia3_export.json`: what an exported folder holds, read by the runtime and the parity checks.

Plain JSON and dicts, no torch: the lean serving install reads it. The keys below are the
contract; readers must ignore keys they do not know (writers may add more).
"""
from __future__ import annotations

import hashlib
import math
import os

from ..dtypes import EXPORT_DTYPES
from ..errors import IA3Error
from .jsonfile import read_json, shown, write_json
from .limits import CEILINGS, within
from .reader import open_regular, present, registers

MANIFEST_NAME = "ia3_export.json"
FORMAT = "ia3-export"
FORMAT_VERSION = 1
# The one list of export modes: the CLI's choices, the manifest check, the export strategies
# (export/modes/) and the runtime bindings (runtime/bindings.py) are all keyed by these names.
MODES = (MERGED, SWAPPABLE, BANK, FOLDSWAP) = ("merged", "swappable", "bank", "foldswap")
GRAPHS = (TRACED, FUSED) = ("traced", "fused")  # who makes the graphs: torch.onnx, or onnxruntime-genai's builder
LAYOUTS = (OPTIMUM, TRANSFORMERS_JS) = ("optimum", "transformers.js")  # where the graphs go (export/layouts.py)
DTYPES = EXPORT_DTYPES  # what an export's dtype field may say (the dtype table's list)
REQUIRED_KEYS = ("format", "format_version", "mode", "task", "model_type", "dtype", "graphs")

# Graph contract names shared by the export (which writes them) and the runtime (which feeds them).
VECTOR_SUFFIX = ".ia3_l"  # a vector input is its module path + PEFT's parameter name
ADAPTER_IDS = "adapter_ids"  # a bank export's per-row adapter index, [batch] int64
LOGITS_TO_KEEP = "logits_to_keep"  # a fused graph's [1] int64: the LM head on the last k positions (0: all)
FOLD_GRAPH = "fold"  # a foldswap export's fold graph: vectors in, folded weights out
FOLD_FILE = "fold.onnx"
# How a decoder graph keeps its KV cache (cache.kv_layout): present = past + this step in a new buffer
# (our traced exports), or one buffer of the run's length bound as past AND present (GroupQueryAttention).
KV_LAYOUTS = (KV_CONCAT, KV_SHARED) = ("concat", "shared")


def vector_name(path: str) -> str:
    """The graph input of a module's vector: its PEFT key without `base_model.model.`."""
    return f"{path}{VECTOR_SUFFIX}"


def file_sha256(path: str) -> str:
    """The digest the manifest keeps of each adapter's weights file (parity matches adapters by it)."""
    digest = hashlib.sha256()
    with open_regular(path, "safetensors") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    return write_json(os.path.join(folder, MANIFEST_NAME), manifest, indent=2)


@registers("export_dir", (MANIFEST_NAME, "json"))
def read_manifest(folder: str) -> dict:
    """The manifest of an exported folder, every field the readers use checked for its type, range
    and confinement (`check_manifest`), so nothing downstream meets an unchecked value."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not present(path):
        raise IA3Error(f"{folder} has no {MANIFEST_NAME}; is it a folder written by `ia3-export export`?")
    manifest = read_json(path)
    check_manifest(manifest, folder, path)
    return manifest


MAX_COUNT = 2**31 - 1  # dims, token ids, layer counts: anything larger is forged


def check_manifest(manifest, folder: str, path: str) -> None:
    """Types, ranges and paths of the contract keys; an IA3Error naming the file and field otherwise.

    Sizes (vector dims, weight shapes, block sizes, cache heads) are checked against their ceilings
    here (formats/limits.py); `open_folder` checks them against the graphs' declared inputs and the
    bytes that back them before anything is allocated."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IA3Error(f"{path}: not an ia3-export manifest (format is not {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise IA3Error(f"{path}: missing key {missing[0]!r}; re-export the model")
    field = Fields(path)
    version = field.count(manifest["format_version"], "format_version", minimum=1)
    if version > FORMAT_VERSION:
        raise IA3Error(f"{path}: format_version {version} is newer than this ia3-export reads "
                       f"({FORMAT_VERSION}); upgrade ia3-export")
    field.choice(manifest["mode"], "mode", MODES)
    field.choice(manifest["dtype"], "dtype", DTYPES)
    for key in ("task", "model_type"):
        field.of(manifest[key], key, str)
    graphs = field.of(manifest["graphs"], "graphs", dict)
    if not graphs:
        raise IA3Error(f"{path}: graphs is empty; re-export the model")
    for name, graph in graphs.items():
        where = f"graphs.{name}"
        field.of(graph, where, dict)
        confined(folder, field.of(graph.get("file"), f"{where}.file", str), path, f"{where}.file")
        for key in ("inputs", "outputs"):
            field.names(graph.get(key, []), f"{where}.{key}")
    cache = field.of(manifest.get("cache"), "cache", dict, optional=True)
    if cache is not None:
        field.choice(cache.get("graph"), "cache.graph", graphs)
        for key, ceiling in (("num_layers", "num_hidden_layers"), ("num_kv_heads", "num_attention_heads"),
                             ("head_dim", "head_dim")):
            field.within(cache.get(key), f"cache.{key}", ceiling, optional=True)
    seen = set()
    for i, vector in enumerate(field.of(manifest.get("vectors"), "vectors", list, optional=True) or []):
        where = f"vectors[{i}]"
        field.of(vector, where, dict)
        name = field.of(vector.get("name"), f"{where}.name", str)
        if name in seen:
            raise IA3Error(f"{path}: {where}.name {shown(name)} is listed twice; re-export the model")
        seen.add(name)
        field.choice(vector.get("graph", "model"), f"{where}.graph", graphs)
        field.within(vector.get("dim"), f"{where}.dim", "vector_dim")
        field.of(vector.get("feedforward", False), f"{where}.feedforward", bool)
    for i, adapter in enumerate(field.of(manifest.get("adapters"), "adapters", list, optional=True) or []):
        where = f"adapters[{i}]"
        field.of(adapter, where, dict)
        field.of(adapter.get("name"), f"{where}.name", str)
        field.of(adapter.get("sha256"), f"{where}.sha256", str, optional=True)
        file = field.of(adapter.get("file"), f"{where}.file", str, optional=True)
        if file:
            confined(folder, file, path, f"{where}.file")
    tokens = field.of(manifest.get("tokens"), "tokens", dict, optional=True) or {}
    for key in ("pad", "bos", "eos", "decoder_start"):
        field.token_ids(tokens.get(key), f"tokens.{key}", many=key == "eos")
    for i, weight in enumerate(field.of(manifest.get("weights"), "weights", list, optional=True) or []):
        where = f"weights[{i}]"
        field.of(weight, where, dict)
        for key in ("name", "vector"):
            field.of(weight.get(key), f"{where}.{key}", str)
        field.names(weight.get("vectors", []), f"{where}.vectors")  # several vectors (a fused q/k/v weight)
        field.choice(weight.get("graph"), f"{where}.graph", graphs)
        shape = field.of(weight.get("shape"), f"{where}.shape", list)
        if not 1 <= len(shape) <= 8:
            raise IA3Error(f"{path}: {where}.shape has {len(shape)} dims; re-export the model")
        for d in shape:
            field.count(d, f"{where}.shape", minimum=1)
        if math.prod(shape) > CEILINGS["weight_values"].value:
            field.within(math.prod(shape), f"{where}.shape (its values)", "weight_values")
    _check_quantization(field, manifest.get("quantization"), graphs)
    genai = field.of(manifest.get("genai"), "genai", dict, optional=True)
    if genai is not None:
        field.of(genai.get("supported", False), "genai.supported", bool)
        field.names(genai.get("files", []), "genai.files")
        field.of(genai.get("reason"), "genai.reason", str, optional=True)


def _check_quantization(field: "Fields", quantization, graphs: dict) -> None:
    """The `quantization` entry (export/quantize.py writes it; parity and inspect read it)."""
    quantization = field.of(quantization, "quantization", dict, optional=True)
    if quantization is None:
        return
    if field.choice(quantization.get("method"), "quantization.method", ("int4", "int8")) == "int4":
        block = field.within(quantization.get("block_size"), "quantization.block_size", "block_size", minimum=16)
        if block & (block - 1):
            field.fail("quantization.block_size", block, "a power of two (MatMulNBits' block sizes)")
        field.count(quantization.get("accuracy_level", 0), "quantization.accuracy_level")
    for key in ("lm_head", "embeddings", "symmetric"):
        field.of(quantization.get(key, False), f"quantization.{key}", bool)
    for name, entry in (field.of(quantization.get("graphs"), "quantization.graphs", dict, optional=True) or {}).items():
        where = f"quantization.graphs.{name}"
        field.choice(name, "quantization.graphs", graphs)
        weights = field.of(field.of(entry, where, dict).get("weights"), f"{where}.weights", dict, optional=True) or {}
        for source in weights.values():  # a parameter name, or [[name, width(, offset)], ...] packed along N
            if not isinstance(source, str) and not (isinstance(source, list) and source and all(
                    isinstance(p, list) and len(p) in (2, 3) and isinstance(p[0], str) for p in source)):
                field.fail(f"{where}.weights", source, "a parameter name or a list of [name, width(, offset)]")
            for part in [] if isinstance(source, str) else source:
                field.count(part[1], f"{where}.weights", minimum=1)
                field.count(part[2] if len(part) > 2 else 0, f"{where}.weights")


class Fields:
    """Checks of one untrusted JSON document; every error names the file and the field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, field: str, value, expected: str):
        raise IA3Error(f"{self.path}: {field} is {shown(value)}, expected {expected}; re-export the model "
                       "or restore the file")

    def of(self, value, field: str, kind: type, optional: bool = False):
        if value is None and optional:
            return None
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            self.fail(field, value, {dict: "an object", list: "a list", str: "a string", bool: "true or false"}[kind])
        return value

    def count(self, value, field: str, minimum: int = 0, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= MAX_COUNT:
            self.fail(field, value, f"an integer from {minimum} to {MAX_COUNT}")
        return value

    def within(self, value, field: str, ceiling: str, minimum: int = 1, optional: bool = False) -> int | None:
        """An integer from `minimum` to its ceiling in formats/limits.py."""
        if value is None and optional:
            return None
        return within(ceiling, value, f"{self.path}: {field}", minimum)

    def choice(self, value, field: str, choices):
        if not isinstance(value, str) or value not in choices:
            self.fail(field, value, f"one of {', '.join(choices)}")
        return value

    def names(self, value, field: str) -> list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(field, value, "a list of names")
        return value

    def token_ids(self, value, field: str, many: bool = False) -> None:
        """A token id or null; with `many`, also a list of ids (eos may be several)."""
        for v in value if many and isinstance(value, list) else [value]:
            if v is not None:
                self.count(v, field)


def confined(folder: str, relative: str, where: str, field: str) -> str:
    """The real path of `relative` inside `folder`; one that resolves outside it (absolute, `..`,
    a symlink) is refused, so a manifest can only point at files the export holds."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, relative)) if "\0" not in relative else ""
    if not path.startswith(root + os.sep):
        raise IA3Error(f"{where}: {field} {shown(relative)} points outside the folder {folder}; refusing it")
    return path


def graph_path(folder: str, manifest: dict, graph: str) -> str:
    if graph not in manifest["graphs"]:
        raise IA3Error(f"the export in {folder} has no {graph!r} graph; it has {', '.join(manifest['graphs'])}")
    return confined(folder, manifest["graphs"][graph]["file"], os.path.join(folder, MANIFEST_NAME), f"graphs.{graph}.file")
