"""Parity for quantized exports: the reference holds the graph's own weights, de-quantized.

A quantized graph cannot equal the float model, so comparing with it would need bounds too wide
to catch anything. Instead the reference PyTorch model gets exactly the weights the graph
computes with (read back from the quantized initializers with numpy, export/quantize.py), and the
comparison keeps its tight bound (ia3_export/tolerances.py). How far quantization moved the model
from the float one is reported beside it, as agreement: greedy tokens for generators, top-1
labels for classifiers. It informs; it does not decide the verdict.
"""
from __future__ import annotations

import numpy as np

from ..compare import compare
from ..core.loading import load_base_model
from ..core.merge import fold_adapters
from .greedy import greedy_checks
from .report import OutputCheck


def load_dequantized_folder(model, folder) -> None:
    """Every graph's de-quantized weights into `model` (the plain model, before IA3 wraps it)."""
    from ..export.quantize import load_dequantized

    for key, entry in (folder.manifest["quantization"].get("graphs") or {}).items():
        load_dequantized(model, folder.graph_file(key), entry.get("weights") or {})


def float_agreement(float_reference, session, options) -> dict:
    """How often the quantized export picks what the FLOAT model picks: greedy tokens (generators,
    token by token up to the first divergence of each row) or the top-1 label (classifiers)."""
    if float_reference.generates and options.greedy_steps:
        checks = greedy_checks(float_reference, session, options, 0.0, 0.0)
        same = total = identical = 0
        for c in checks:
            prefix = next((i for i, (a, b) in enumerate(zip(c.reference, c.actual)) if a != b), min(len(c.reference), len(c.actual)))
            same, total = same + prefix, total + len(c.reference)
            identical += c.reference == c.actual
        return {"kind": "greedy tokens", "agreement": same / max(total, 1), "tokens": total,
                "identical_rows": identical, "rows": len(checks)}
    if float_reference.task.name != "text-classification":
        return {}
    agree = total = 0
    for graph in float_reference.graphs:
        for index, (_, feeds) in enumerate(float_reference.cases(graph, options.seed)):
            for _, rows in float_reference.scenarios(len(feeds["input_ids"]), index):
                got = session.run(feeds, graph=graph.key, adapters=float_reference.ort_rows(rows),
                                  outputs=["logits"])["logits"]
                expected = float_reference.per_row(graph, feeds, rows)["logits"]
                for row, (_, value) in enumerate(expected):
                    agree += int(np.argmax(value[0]) == np.argmax(np.asarray(got)[row]))
                    total += 1
    return {"kind": "top-1 label", "agreement": agree / max(total, 1), "rows": total}


def weight_checks(reference, model_dir: str, folder) -> list:
    """Each quantized weight against the float weight it was made from (folded, for a merged export):
    its block scales must be the ones ONNX Runtime's quantizer derives from those float values, and
    every element within its rounding step. The de-quantized reference reads the graph's own weights,
    so without this a corrupted scale or block would corrupt both sides alike."""
    import torch

    from ..export.quantize import quantized_weights  # torch: loaded when a quantized folder is checked

    quantization = folder.manifest["quantization"]
    model = load_base_model(model_dir, auto_class=reference.task.auto_class, dtype=torch.float64)
    if reference.mode.folds_adapters:
        model = fold_adapters(model, reference.adapters)
    checks = []
    for key, entry in (quantization.get("graphs") or {}).items():
        file = folder.graphs[key]["file"]
        for param, (weight, scale) in quantized_weights(folder.graph_file(key), entry.get("weights") or {}).items():
            module = model.get_submodule(param.rsplit(".", 1)[0])
            if module is model.get_input_embeddings():
                continue  # GatherBlockQuantized: checked through the outputs only
            original = module.weight.detach().double().numpy()
            original = original.T if type(module).__name__ == "Conv1D" else original
            expected, step = _expected_scales(original, quantization)
            checks.append(OutputCheck(file, "weights", param, compare(
                "quantization scales (vs the float weights)", expected, np.abs(scale), 0.0, 1e-4)))
            checks.append(OutputCheck(file, "weights", param, compare(
                "rounding error (in block scales)", np.zeros_like(weight), _in_steps(weight - original, scale),
                step + 1e-3, 0.0)))
    return checks


def _in_steps(error: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """|error| / |scale|; an all-zero block has scale 0 and must decode to exact zeros (else inf)."""
    error, scale = np.abs(error), np.abs(scale)
    return np.where(scale > 0, error / np.where(scale > 0, scale, 1.0), np.where(error == 0, 0.0, np.inf))


def _expected_scales(weight: np.ndarray, quantization: dict) -> tuple[np.ndarray, float]:
    """Per element of an [N, K] weight: the scale ORT's quantizer gives its block, and the largest
    rounding error allowed (in scales). int4 symmetric maps the largest magnitude to -8, so the
    other sign clips at +7: up to one step; otherwise half a step."""
    if quantization["method"] == "int8":  # symmetric, one scale per output column; 7 bits since 2026-12-07
        top = quantization.get("weight_max", 127)
        return np.broadcast_to(np.abs(weight).max(axis=1, keepdims=True) / top, weight.shape), 0.5
    n, k = weight.shape
    block = quantization["block_size"]
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block))
    padded[:, :k] = weight
    padded = padded.reshape(n, blocks, block)
    if quantization.get("symmetric", True):
        scales, step = np.abs(padded).max(-1) / 8, 1.0
    else:
        scales, step = (np.maximum(padded.max(-1), 0) - np.minimum(padded.min(-1), 0)) / 15, 0.5
    return np.repeat(scales, block, axis=1)[:, :k], step
