"""Quantized exports: a post-export transform of each traced graph with ONNX Runtime's own quantizers.

int4: weight-only block quantization of the constant MatMul weights into `MatMulNBits`
(`onnxruntime.quantization.matmul_nbits_quantizer`, what onnxruntime-genai's int4 models use).
int8: ONNX Runtime's dynamic quantization (`quantize_dynamic`: int8 weights with a scale per output
column, activations quantized per tensor at run time), aimed at encoders and classifiers.

The IA3 vectors are never weights of a MatMul: they multiply the activations (k/v outputs, the
down-projection input) in their own Mul/Gather nodes, which the quantizers leave alone. So a
swappable or bank export keeps its float vector inputs around the quantized MatMuls, and one
quantized base serves every adapter. A merged export folds first, then quantizes.

Each quantized weight is recorded in the manifest with the PyTorch parameter it came from
(found by value), so `dequantized_weights` can read the exact weights the graph computes with
back into a PyTorch model: the reference for export validation and `ia3-export parity`. A weight
that packs several parameters side by side along N (onnxruntime-genai's builder packs q, k and v
into one MatMul, `--graph fused`) is recorded as `[[parameter, width], ...]` in that order, one that
holds a slice of a parameter (the builder splits phi3's gate_up_proj into two MatMuls) as
`[[parameter, width, offset]]` (a plain name: one parameter, the whole width; what older folders
hold), and put back together when read. A MatMul weight that is none of the model's linear layers,
alone, packed or sliced, is refused, never left float.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os

import numpy as np

from ..errors import IA3Error
from ..ort import onnxruntime
from . import graph as onnx_graph

METHODS = ("int4", "int8")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# ORT's naming of the quantized copy of weight initializer B (checked after every run).
QUANTIZED_SUFFIX = {"int4": "_Q4", "int8": "_quantized"}
# int8 weights use 7 bits (ORT's reduce_range): on an x86 CPU without VNNI (AVX2 only, e.g. AMD EPYC here)
# ONNX Runtime multiplies uint8 activations by int8 weights in pairs summed into int16, which saturates
# at 8 bits (a tiny BERT's logits off by 10% of their scale); ORT's reduced range is +-64, and 64 x 255 x 2 fits
INT8_WEIGHT_MAX = 64


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize. Defaults and why:

    block_size 32: one scale per 32 weights along K (onnxruntime-genai's CPU default; ORT's
      quantizer defaults to 128, which loses more accuracy on small hidden sizes).
    symmetric True: no zero points (smaller files, the kernels' fastest path).
    accuracy_level 0: MatMulNBits computes in fp32 with the weights de-quantized on the fly, so
      the graph equals the de-quantized PyTorch model to fp32 precision (4: int8 activations,
      faster on CPU, no longer exact).
    lm_head True: for a 32k vocabulary the LM head is the largest MatMul of a small model.
    embeddings False: a Gather only reads rows (no speed to win) and its int4 form
      (GatherBlockQuantized) is an ORT contrib op that fewer runtimes have.
    """

    method: str
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    lm_head: bool = True
    embeddings: bool = False

    def check(self, mode, dtype: str) -> None:
        """`mode`: the export's `ExportMode` (export/modes/)."""
        if self.method not in METHODS:
            raise IA3Error(f"unknown quantization {self.method!r}; use one of {', '.join(METHODS)}")
        if mode.quantize_refusal:
            raise IA3Error(mode.quantize_refusal)
        if dtype != "fp32":
            raise IA3Error(f"--quantize needs --dtype fp32 (the quantizers read fp32 weights), got {dtype}")
        if self.block_size not in BLOCK_SIZES:
            raise IA3Error(f"block size {self.block_size} is not supported; use one of "
                           f"{', '.join(map(str, BLOCK_SIZES))} (default 32)")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise IA3Error(f"accuracy level {self.accuracy_level} is not one of 0-4 (MatMulNBits' accuracy_level)")
        if self.method == "int8" and self.embeddings:
            raise IA3Error("--quantize-embeddings is an int4 option (GatherBlockQuantized); int8 keeps embeddings float")

    def manifest_entry(self) -> dict:
        entry = {"method": self.method, "lm_head": self.lm_head, "embeddings": self.embeddings}
        if self.method == "int4":
            entry |= {"bits": 4, "block_size": self.block_size, "symmetric": self.symmetric,
                      "accuracy_level": self.accuracy_level}
        else:
            entry |= {"bits": 8, "weight_max": INT8_WEIGHT_MAX,
                      "weights": "int8 symmetric within +-64 (reduced range), one scale per output column",
                      "activations": "uint8, one scale per tensor, computed at run time"}
        return entry


# -- export side ------------------------------------------------------------------------------
def quantize_options(quantize) -> QuantizeOptions | None:
    """None, a method name ("int4", "int8") or QuantizeOptions -> QuantizeOptions or None."""
    if quantize is None or isinstance(quantize, QuantizeOptions):
        return quantize
    return QuantizeOptions(str(quantize))


def quantize_graph(path: str, model, options: QuantizeOptions) -> tuple[dict, list[str]]:
    """Quantize the graph at `path` in place; returns {quantized initializer: its source (a parameter
    name, or `[[parameter, width], ...]` packed along N)} and the graph's files. `model` is the PyTorch
    model the graph was made from: it gets the de-quantized weights, so the validation that follows
    compares the graph with what it computes."""
    graph_model = onnx_graph.load(path)
    sources = _weight_sources(model)
    inits = {i.name: i for i in graph_model.graph.initializer}
    targets, skipped = {}, []  # float weight name -> its source
    for node in graph_model.graph.node:
        op_index = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if op_index is None or node.input[op_index] not in inits:
            continue
        weight = node.input[op_index]
        array = _array(inits[weight])
        found = sources.find(array) if node.op_type == "MatMul" else sources.by_digest.get(_digest(array))
        if node.op_type == "Gather" and not (options.embeddings and found and found[1] == "embedding"):
            skipped += [node.name] if options.embeddings else []  # position/type tables stay float
            continue
        if found is None and array.ndim == 2 and array.dtype == np.float32:
            raise IA3Error(f"{os.path.basename(path)}: the weight of {node.name} ({array.shape[0]}x{array.shape[1]}) is "
                           "none of the model's linear layers, alone, packed or sliced, so it would stay float unchecked; "
                           "export without --quantize")
        if found is None or (found[1] == "lm_head" and not options.lm_head):
            skipped.append(node.name)
            continue
        targets[weight] = found[0]
    if not targets:
        raise IA3Error(f"{os.path.basename(path)} has no MatMul weights from the model's linear layers to quantize")
    quantized = _run_quantizer(graph_model, options, skipped)
    names = {i.name for i in quantized.graph.initializer}
    weights = {}
    for weight, param in targets.items():
        qname = weight + QUANTIZED_SUFFIX[options.method]
        if qname not in names:
            raise IA3Error(f"internal error: ONNX Runtime's quantizer left no {qname!r} for {param}; "
                           f"this onnxruntime names quantized weights differently")
        weights[qname] = param
    files = onnx_graph.save(quantized, path)
    load_dequantized(model, path, weights)
    return weights, files


@contextlib.contextmanager
def _quiet_quantizers():
    """ORT's quantizers log every node at INFO and advice at WARNING, on their own and the root logger,
    and divide by the scale of all-zero blocks."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization"),
               logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks (a padding row) get scale 0
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _run_quantizer(graph_model, options: QuantizeOptions, skipped: list[str]):
    with _quiet_quantizers():
        return _quantize(graph_model, options, skipped)


def _quantize(graph_model, options: QuantizeOptions, skipped: list[str]):
    if options.method == "int4":
        nbits = onnxruntime("quantization.matmul_nbits_quantizer")
        quantizer = nbits.MatMulNBitsQuantizer(graph_model, bits=4, block_size=options.block_size,
                                               is_symmetric=options.symmetric, accuracy_level=options.accuracy_level or None,
                                               nodes_to_exclude=skipped,
                                               op_types_to_quantize=("MatMul", "Gather") if options.embeddings else ("MatMul",))
        quantizer.process()
        return quantizer.model.model
    import tempfile

    import onnx

    quantization = onnxruntime("quantization")

    with tempfile.TemporaryDirectory() as scratch:  # quantize_dynamic works on files
        src, dst = os.path.join(scratch, "float.onnx"), os.path.join(scratch, "int8.onnx")
        onnx.save_model(graph_model, src)
        quantization.quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=quantization.QuantType.QInt8,
                                      nodes_to_exclude=skipped, per_channel=True, reduce_range=True)  # INT8_WEIGHT_MAX
        return onnx_graph.load(dst)


class _Sources:
    """The model's linear and embedding weights by value, as a graph holds them (a MatMul weight as [K, N])."""

    def __init__(self):
        self.by_digest: dict[str, tuple[str, str]] = {}  # digest -> (parameter name, kind)
        self.linears: dict[int, list[tuple[str, np.ndarray]]] = {}  # K -> the linear layers with that K, [K, N]

    def add(self, array: np.ndarray, param: str, kind: str) -> None:
        self.by_digest.setdefault(_digest(array), (param, kind))
        if kind == "linear":
            self.linears.setdefault(array.shape[0], []).append((param, array))

    def find(self, weight: np.ndarray):
        """(source, kind) of a MatMul weight [K, N], or None: one parameter's name, the linear layers it
        packs side by side along N as [[parameter, width], ...] (the builder's q/k/v MatMul), found
        left to right by the value of each slice, or the one linear layer it is a slice of, as
        [[parameter, width, offset]] (offset: a multiple of the width)."""
        found = self.by_digest.get(_digest(weight))
        if found is not None or weight.ndim != 2:
            return found
        return self._packed(weight) or self._sliced(weight)

    def _sliced(self, weight: np.ndarray):
        digest, n = _digest(weight), weight.shape[1]
        for param, array in self.linears.get(weight.shape[0], ()):
            for offset in range(0, array.shape[1] - n + 1, n) if array.shape[1] > n else ():
                if _digest(array[:, offset:offset + n]) == digest:
                    return [[param, n, offset]], "linear"
        return None

    def _packed(self, weight: np.ndarray):
        parts, start, n = [], 0, weight.shape[1]
        widths = sorted({a.shape[1] for _, a in self.linears.get(weight.shape[0], ())}, reverse=True)
        while start < n:
            part = next(((self.by_digest[d], w) for w in widths if start + w <= n
                         and (d := _digest(weight[:, start:start + w])) in self.by_digest), None)
            if part is None or part[0][1] != "linear":
                return None
            parts.append([part[0][0], part[1]])
            start += part[1]
        return (parts, "linear") if len(parts) > 1 else None


def source_parts(source, width: int | None = None) -> list[tuple[str, int | None, int]]:
    """A manifest source (a parameter name, or `[[parameter, width(, offset)], ...]`) -> [(parameter,
    width, offset along the parameter's output)]; a plain name spans the whole `width` from 0."""
    return [(source, width, 0)] if isinstance(source, str) else [(p[0], p[1], p[2] if len(p) > 2 else 0) for p in source]


def _weight_sources(model) -> _Sources:
    """Each linear/embedding weight of `model`, by value as the graph holds it."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    sources = _Sources()
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if hasattr(module, "base_layer") or weight is None or weight.dim() != 2:
            continue
        param = parameter_name(name)
        array = weight.detach().float().numpy()
        if module is inputs:
            sources.by_digest[_digest(array)] = (param, "embedding")
        if isinstance(module, torch.nn.Embedding):  # other tables (T5's per-stack copies of `shared`) are no MatMul
            continue
        kind = "lm_head" if module is output else "linear"
        # nn.Linear holds [out, in] (the graph's MatMul weight is its transpose); GPT-2's Conv1D holds [in, out].
        as_matmul = array if type(module).__name__ == "Conv1D" else array.T
        sources.add(as_matmul, param, kind)
    return sources


def parameter_name(module_path: str) -> str:
    """The weight's name in the plain model (IA3 layers wrap the linear layer as `base_layer`)."""
    return ".".join(p for p in module_path.split(".") if p != "base_layer") + ".weight"


def _digest(array: np.ndarray) -> str:
    """Value fingerprint of a weight as the graph holds it (a MatMul weight as [K, N])."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()


def _array(tensor) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


# -- reading the quantized weights back ---------------------------------------------------------
def dequantized_weights(onnx_path: str, weights: dict) -> dict[str, np.ndarray]:
    """Parameter name -> the float64 weight (PyTorch's orientation) that the graph computes with,
    decoded from its quantized initializers with numpy (not with ONNX Runtime)."""
    return {param: w for param, (w, _) in quantized_weights(onnx_path, weights).items()}


def quantized_weights(onnx_path: str, weights: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parameter name -> (de-quantized weight, the scale of each element's block), both float64 in
    PyTorch's [out, in] orientation (embeddings: [vocab, hidden]); a weight packing several parameters
    along N is split into theirs, slices of one parameter are joined."""
    model = onnx_graph.load(onnx_path)
    inits = {i.name: i for i in model.graph.initializer}
    decoders = {"MatMulNBits": _nbits_weight, "MatMulInteger": _int8_weight}
    out, pieces, read = {}, {}, set()  # pieces: parameter -> [(offset, weight, scale)]
    for node in model.graph.node:
        for qname in node.input[:2]:
            source = weights.get(qname)
            if source is None or qname in read:
                continue
            read.add(qname)
            if node.op_type in decoders:
                weight, scale = decoders[node.op_type](node, inits)  # [K, N]
                for param, piece in _split(node, source, weight, scale).items():
                    pieces.setdefault(param, []).append(piece)
            elif node.op_type == "GatherBlockQuantized":
                out[source] = _gather_weight(node, inits)
    for param, parts in pieces.items():
        parts.sort(key=lambda piece: piece[0])
        if [offset for offset, _, _ in parts] != list(np.cumsum([0] + [w.shape[0] for _, w, _ in parts[:-1]])):
            raise IA3Error(f"{onnx_path}: the slices of {param} that the manifest lists do not follow each other; "
                           "re-export the model")
        out[param] = tuple(np.concatenate([piece[i] for piece in parts]) for i in (1, 2))
    missing = sorted({p for source in weights.values() for p, _, _ in source_parts(source)} - set(out))
    if missing:
        raise IA3Error(f"{onnx_path}: no quantized node reads the weight of {missing[0]} that the manifest lists; "
                       f"re-export the model")
    return out


def _split(node, source, weight: np.ndarray, scale: np.ndarray) -> dict:
    """A [K, N] weight and its scales -> each source parameter's (offset, [width, K] weight, scales),
    left to right along N."""
    parts, n = source_parts(source, weight.shape[1]), weight.shape[1]
    if sum(width for _, width, _ in parts) != n:
        raise IA3Error(f"{node.name}: the manifest splits its {n} columns into {[w for _, w, _ in parts]}; "
                       "re-export the model")
    out, start = {}, 0
    for param, width, offset in parts:
        out[param] = (offset, weight[:, start:start + width].T, scale[:, start:start + width].T)
        start += width
    return out


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes -> their 4-bit values, low nibble first (ORT's packing)."""
    packed = packed.astype(np.uint8)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _nbits_weight(node, inits) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits B [N, blocks, blob], scales [N * blocks], zero points (4-bit packed, default 8) -> [K, N] x2."""
    a = _attrs(node)
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    if bits != 4:
        raise IA3Error(f"{node.name}: MatMulNBits with {bits} bits; only 4 is read back")
    blocks = (k + block - 1) // block
    q = _unpack_nibbles(_array(inits[node.input[1]]).reshape(n, blocks, -1)).astype(np.float64)[:, :, :block]
    scales = _array(inits[node.input[2]]).astype(np.float64).reshape(n, blocks)
    zero = np.full((n, blocks), 8.0)
    if len(node.input) > 3 and node.input[3]:
        zero = _unpack_nibbles(_array(inits[node.input[3]]).reshape(n, -1))[:, :blocks].astype(np.float64)
    w = (q - zero[:, :, None]) * scales[:, :, None]  # [N, blocks, block]
    per_element = np.repeat(scales, block, axis=1)[:, :k].T
    return w.reshape(n, blocks * block)[:, :k].T, per_element


def _int8_weight(node, inits) -> tuple[np.ndarray, np.ndarray]:
    """MatMulInteger's int8 B with its zero point, times the scale ORT stores beside it -> [K, N]."""
    qname = node.input[1]
    scale_name = qname[: -len(QUANTIZED_SUFFIX["int8"])] + "_scale"
    if scale_name not in inits:
        raise IA3Error(f"{node.name}: no {scale_name!r} beside the int8 weight {qname!r}; re-export the model")
    q = _array(inits[qname]).astype(np.float64)
    zero = _array(inits[node.input[3]]).astype(np.float64) if len(node.input) > 3 and node.input[3] else 0.0
    scale = _array(inits[scale_name]).astype(np.float64)
    return (q - zero) * scale, np.broadcast_to(scale, q.shape)


def _gather_weight(node, inits) -> np.ndarray:
    """GatherBlockQuantized data (int4, blocks along `quantize_axis`) -> the float table."""
    a = _attrs(node)
    data = inits[node.input[0]]
    shape = tuple(data.dims)
    raw = np.frombuffer(data.raw_data, dtype=np.uint8)
    q = _unpack_nibbles(raw[None, :])[0][: int(np.prod(shape))].astype(np.float64).reshape(shape)
    signed = data.data_type == 22  # onnx.TensorProto.INT4
    if signed:
        q = np.where(q >= 8, q - 16, q)
    scales = _array(inits[node.input[2]]).astype(np.float64)
    axis, block = a.get("quantize_axis", 1), a["block_size"]
    expand = lambda t: np.repeat(t, block, axis=axis).take(range(shape[axis]), axis=axis)  # noqa: E731
    zero = 0.0 if signed else 8.0
    if len(node.input) > 3 and node.input[3]:
        zp = inits[node.input[3]]
        zero = expand(_unpack_nibbles(np.frombuffer(zp.raw_data, np.uint8)[None, :])[0][: int(np.prod(zp.dims))]
                      .astype(np.float64).reshape(tuple(zp.dims)))
    return (q - zero) * expand(scales), expand(scales)


def load_dequantized(model, onnx_path: str, weights: dict) -> None:
    """Put the de-quantized weights of one graph into `model` (tied weights are untied: the graph
    quantizes the LM head but gathers the float embedding)."""
    import torch

    for param, value in dequantized_weights(onnx_path, weights).items():
        module = model.get_submodule(param.rsplit(".", 1)[0])
        while hasattr(module, "base_layer"):
            module = module.base_layer
        old = module.weight
        value = value.T if type(module).__name__ == "Conv1D" else value
        if tuple(value.shape) != tuple(old.shape):
            raise IA3Error(f"the quantized weight of {param} has shape {value.shape}, the model's {tuple(old.shape)}; "
                           f"pass the model folder the export was made from")
        module.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(value)).to(old.dtype),
                                           requires_grad=False)
