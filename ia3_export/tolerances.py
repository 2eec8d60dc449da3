"""The one tolerance table: how close ONNX Runtime must come to the PyTorch reference, per path.

Three paths, three sections: `TOLERANCES` (the `parity` check, against float64 PyTorch, per
provider and dtype), `VALIDATION` (the export's own check, against PyTorch in the export's dtype
on the CPU) and `QUANTIZED_TOLERANCES` (a quantized export, either check). A tolerance means |ort - reference| <= atol + rtol * |reference| at every compared position
(`ia3_export.compare`). Each entry says what was measured and why the bound sits where it does;
the margins are wide enough for real models, narrow enough that a wrong weight, a wrong vector
or a wrong mask fails by orders of magnitude (see tests/parity/test_parity_corruption.py).
"""
from __future__ import annotations

from typing import NamedTuple

from .errors import IA3Error


class Tolerance(NamedTuple):
    """(atol, rtol, why); `atol, rtol = bound[:2]` reads a Tolerance and a plain pair alike."""

    atol: float
    rtol: float
    why: str = ""


# (provider, export dtype, TF32 on) -> tolerance. TF32 only exists on CUDA for fp32.
TOLERANCES: dict[tuple[str, str, bool], Tolerance] = {
    ("cpu", "fp32", False): Tolerance(
        1e-4, 1e-4, "fp32 CPU: measured 2e-6 max abs on logits of magnitude 5 (0.3B Llama) and <1e-6 on the tiny "
                    "models; 1e-4 leaves room for deeper models while a 1% change in one weight row still fails"),
    ("cuda", "fp32", False): Tolerance(
        1e-4, 1e-4, "fp32 CUDA with use_tf32=0: true fp32 GEMMs, same bound as the CPU (accumulation order "
                    "differs, not precision)"),
    ("cuda", "fp32", True): Tolerance(
        2e-2, 1e-2, "fp32 CUDA with TF32 (the CUDA EP default): matmul inputs keep 10 mantissa bits; measured "
                    "9e-3 max abs on logits of magnitude 5 vs float64 (0.3B Llama), so 2e-2 + 1% of |ref|"),
    ("cuda", "fp16", False): Tolerance(
        5e-2, 2e-2, "fp16 CUDA: 11-bit mantissa activations and weights; measured ~1e-2 max abs on logits of "
                    "magnitude 4.5 for every export mode, so 5e-2 + 2% of |ref|"),
    ("cpu", "fp16", False): Tolerance(
        5e-2, 2e-2, "fp16 CPU: same storage precision as fp16 CUDA (ONNX Runtime computes some ops in fp32 "
                    "with casts, never less precise), so the fp16 CUDA bound"),
}


# Export validation (export/validate.py reads it as `TOLERANCES`): the graph against PyTorch in the
# export's OWN dtype on the CPU, so fp16 is fp16 against fp16 and both sides round.
VALIDATION: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-4, 1e-4, "fp32 against fp32 PyTorch on the CPU: the parity check's fp32 CPU bound"),
    "fp16": Tolerance(
        5e-2, 5e-2, "fp16 against fp16 PyTorch on the CPU: both round each op to 11 bits, in different orders and "
                    "with ONNX Runtime upcasting some ops, so the rounding of both sides adds up: a wider rtol than "
                    "parity's fp16 bound (2e-2), where only the graph rounds"),
}


def tolerance(provider: str, dtype: str, tf32: bool = False) -> Tolerance:
    """The documented tolerance; TF32 applies to fp32 on CUDA only (fp16 GEMMs ignore it)."""
    key = (provider, dtype, tf32 and provider == "cuda" and dtype == "fp32")
    if key not in TOLERANCES:
        raise IA3Error(f"no tolerance for provider {provider!r} and dtype {dtype!r}; pass --atol and --rtol")
    return TOLERANCES[key]


# A quantized export is compared with the PyTorch model holding the SAME weights, de-quantized
# (ia3_export/export/quantize.py), so what is left is the kernels' own arithmetic.
QUANTIZED_TOLERANCES: dict[str, Tolerance] = {
    "int4": Tolerance(
        1e-4, 1e-4, "int4 MatMulNBits (accuracy level 0/1: fp32 arithmetic on weights de-quantized in the kernel) vs "
                    "the de-quantized float64 reference: measured 1.2e-7 max abs on the tiny Llama, so the fp32 bound; "
                    "one corrupted block scale fails by orders of magnitude"),
    "int8": Tolerance(
        1.0, 0.2, "int8 dynamic (and int4 at accuracy level >= 2): activations are quantized to 8 bits at run time, "
                  "one scale per tensor over the whole batch (BERT's outlier activations make that coarse), which no "
                  "per-row reference reproduces; measured on MiniLM 0.25 max abs on logits of magnitude 0.9 and 0.32 "
                  "on last_hidden_state, so 1.0 + 20% of |ref|. Loose on purpose: the weight checks (scales and "
                  "rounding against the float weights) carry the exactness, the float agreement the quality"),
}


def quantized_tolerance(quantization: dict, provider: str = "cpu") -> Tolerance:
    """The bound for a quantized export (its manifest's `quantization`); CUDA gets the looser one."""
    exact = quantization["method"] == "int4" and quantization.get("accuracy_level", 0) <= 1 and provider == "cpu"
    return QUANTIZED_TOLERANCES["int4" if exact else "int8"]
