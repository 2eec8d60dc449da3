"""Export validation: each traced graph on ONNX Runtime (CPU) against the PyTorch wrapper it came
from, in the export's own dtype, before anything is written. The inputs and the PyTorch side are
the reference harness's (export/reference.py); the scenarios are the mode's
(`ExportMode.validate`, export/modes/); the numbers go through `ia3_export.compare`.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..compare import Comparison, compare, real_positions
from ..errors import CheckFailed
from ..formats.onnx_graph import check_graph
from ..ort import onnxruntime, session_options
from ..tolerances import VALIDATION as TOLERANCES  # dtype -> bound; tests and benchmarks may widen it

_tolerance_override: list[tuple[float, float]] = []  # set by `tolerance_of` (quantized exports)
SESSION_THREADS = 0  # ORT's intra-op threads for validation (0: ORT's default, one per core)


@contextlib.contextmanager
def tolerance_of(bound: tuple[float, float] | None):
    """Validate with (atol, rtol) instead of the dtype's (a quantized graph has its own); None: the dtype's."""
    if bound is None:
        yield
        return
    _tolerance_override.append(bound)
    try:
        yield
    finally:
        _tolerance_override.pop()


def cpu_session(path: str):
    """An ONNX Runtime CPU session of the graph at `path`, after `check_graph` (external data confined)."""
    check_graph(path)
    return onnxruntime().InferenceSession(path, session_options(SESSION_THREADS), providers=["CPUExecutionProvider"])


def ort_outputs(session, feeds: dict, run_options=None) -> list[np.ndarray]:
    return session.run(None, feeds, run_options)


def compare_outputs(label: str, names: list[str], reference, actual, dtype: str, feeds: dict | None = None) -> list[Comparison]:
    """Compare each output; with `feeds`, only at real (unpadded) token positions."""
    atol, rtol = (_tolerance_override[-1] if _tolerance_override else TOLERANCES[dtype])[:2]
    return [compare(f"{label}: {n}", r, a, atol, rtol, where=real_positions(n, feeds, np.shape(r)))
            for n, r, a in zip(names, reference, actual)]


def raise_on_failure(comparisons: list[Comparison], what: str) -> None:
    """CheckFailed naming the worst output (largest excess over its tolerance)."""
    failed = [c for c in comparisons if not c.passed]
    if failed:
        worst = max(failed, key=lambda c: c.max_abs - (c.atol + c.rtol * abs(c.reference_at_worst)))
        raise CheckFailed(f"{what}: ONNX Runtime differs from PyTorch in {len(failed)} of {len(comparisons)} "
                          f"outputs; worst: {worst.line()}")
