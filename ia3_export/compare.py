"""The one comparison engine: reference vs actual arrays -> errors, worst position, verdict.

Used by export validation, the `parity` command, the pytest plugin and the GPU script, so a
tolerance means the same thing everywhere: |actual - reference| <= atol + rtol * |reference|.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Comparison:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    worst_index: tuple[int, ...]
    reference_at_worst: float
    actual_at_worst: float
    atol: float
    rtol: float
    passed: bool
    note: str = ""

    def line(self) -> str:
        verdict = "ok  " if self.passed else "FAIL"
        return (
            f"{verdict} {self.name}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} at {list(self.worst_index)} "
            f"(ref {self.reference_at_worst:.6g}, got {self.actual_at_worst:.6g}; atol {self.atol:g}, rtol {self.rtol:g})"
            + (f" {self.note}" if self.note else "")
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compare(name: str, reference, actual, atol: float, rtol: float, where=None) -> Comparison:
    """Compare two arrays; shape mismatches and non-finite values fail with a note, never raise.

    `where` (boolean, broadcastable to the shape) limits the comparison to those positions, e.g. real
    tokens: values at padded positions are undefined and neither fail nor count as the worst."""
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(actual, dtype=np.float64)
    if ref.shape != got.shape:
        return Comparison(name, tuple(got.shape), float("inf"), float("inf"), (), float("nan"), float("nan"),
                          atol, rtol, False, f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if ref.size == 0:
        return Comparison(name, tuple(ref.shape), 0.0, 0.0, (), 0.0, 0.0, atol, rtol, True)
    diff = np.abs(got - ref)
    diff = np.where(np.isnan(diff) & ~(np.isnan(got) & np.isnan(ref)), np.inf, np.nan_to_num(diff, nan=0.0))
    excess = diff - (atol + rtol * np.abs(ref))
    ranked = np.where(np.isfinite(excess), excess, np.inf)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    compared = np.ones(ref.shape, dtype=bool) if where is None else np.broadcast_to(np.asarray(where, dtype=bool), ref.shape)
    if where is not None:  # positions outside `where`: no difference, never the worst
        diff, rel = np.where(compared, diff, 0.0), np.where(compared, rel, 0.0)
        excess, ranked = np.where(compared, excess, -np.inf), np.where(compared, ranked, -np.inf)
    worst = np.unravel_index(int(np.argmax(ranked)), ref.shape)
    note = "" if np.isfinite(got[compared]).all() or not np.isfinite(ref[compared]).all() else "non-finite values in the output"
    return Comparison(
        name=name, shape=tuple(ref.shape), max_abs=float(diff.max()), max_rel=float(rel.max()),
        worst_index=tuple(int(i) for i in worst), reference_at_worst=float(ref[worst]), actual_at_worst=float(got[worst]),
        atol=atol, rtol=rtol, passed=bool((excess <= 0).all()), note=note,
    )
