"""The one comparison engine: reference vs actual arrays -> errors, worst position, verdict.

Used by export validation, the `parity` command, the pytest plugin and the GPU script, so a
tolerance means the same thing everywhere: |actual - reference| <= atol + rtol * |reference|.
Only real token positions count: `real_positions` (a batch run against a batch reference) and
`compare_rows` (a batch run against each row run alone, without its padding) say which those are.
Tolerances: ia3_export/tolerances.py.
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


# -- which positions are real tokens ----------------------------------------------------------
# The mask input's axis -> the axes it splits into (past first, then the new tokens).
SPLIT_AXES = {"total_sequence_length": ("past_sequence_length", "sequence_length")}
MASKS = ("attention_mask", "encoder_attention_mask")


def real_positions(output: str, feeds: dict | None, shape: tuple) -> np.ndarray | None:
    """Where an output holds real tokens, from the attention mask; None where every position counts.

    Padded positions compute attention over nothing: their values are arbitrary (and differ
    between PyTorch and ONNX Runtime in fp16), so they are no evidence either way.
    """
    mask = None if feeds is None else feeds.get("attention_mask")
    if mask is None or len(shape) < 3:
        return None
    mask = mask.astype(bool)
    if output.startswith("present.") and shape[2] == mask.shape[1]:  # [batch, heads, past + new, head_dim]
        return mask[:, None, :, None]
    if not output.startswith("present.") and shape[1] <= mask.shape[1]:  # [batch, new tokens, ...]
        return mask[:, -shape[1]:].reshape(mask.shape[0], shape[1], *([1] * (len(shape) - 2)))
    return None


def row_keep(graph, feeds: dict, row: int, right_padded: bool = False) -> dict[str, np.ndarray]:
    """Axis name -> positions of real tokens in this row (from its attention mask).

    Left padding (transformers' way): the new tokens are the mask's last columns. `right_padded`
    (GroupQueryAttention over a shared KV buffer): a row's tokens start at column 0, so a prompt's
    real tokens are its mask's ones and a continuation's new tokens are all real, the row's last ones."""
    keep = {}
    for mask_name in MASKS:
        if mask_name not in feeds:
            continue
        mask = feeds[mask_name][row] != 0
        axis = graph.dynamic_axes[mask_name][1]
        keep[axis] = mask
        if axis in SPLIT_AXES:
            past_axis, new_axis = SPLIT_AXES[axis]
            new = feeds["input_ids"].shape[1]
            if right_padded and len(mask) > new:
                past = np.arange(len(mask) - new) < int(mask.sum()) - new
                keep[past_axis], keep[new_axis] = past, np.ones(new, dtype=bool)
            else:
                keep[past_axis], keep[new_axis] = mask[:len(mask) - new], mask[len(mask) - new:]
    return keep


def row_index(axes: dict[int, str], keep: dict, row: int, ndim: int) -> tuple:
    """np.ix_-ready index arrays for one row's positions in a batch output (None: the whole axis)."""
    index = []
    for axis in range(ndim):
        name = axes.get(axis)
        if axis == 0:
            index.append(np.array([row]))
        elif name in keep:
            index.append(np.flatnonzero(keep[name]))
        else:
            index.append(None)
    return tuple(index)


def take_row(value: np.ndarray, axes: dict[int, str], keep: dict, row: int) -> np.ndarray:
    """One batch row of an input, its padded positions dropped (`row_keep`)."""
    out = value[row:row + 1]
    for axis, name in axes.items():
        if axis > 0 and name in keep:
            out = np.compress(keep[name], out, axis=axis)
    return out


def compare_rows(name: str, row_results: list, actual: np.ndarray, atol: float, rtol: float):
    """Scatter each row's reference into a batch-shaped array (so the worst index is in batch coordinates)
    and compare the positions of real tokens only."""
    actual = np.asarray(actual)
    reference = np.zeros(actual.shape)
    compared = np.zeros(actual.shape, dtype=bool)
    try:
        for index, value in row_results:
            full = np.ix_(*(ix if ix is not None else np.arange(actual.shape[axis]) for axis, ix in enumerate(index)))
            reference[full] = value
            compared[full] = True
    except (ValueError, IndexError):  # the output has the wrong shape: compare fails with a shape note
        return compare(name, np.concatenate([v for _, v in row_results]), actual, atol, rtol)
    return compare(name, reference, actual, atol, rtol, where=compared)
