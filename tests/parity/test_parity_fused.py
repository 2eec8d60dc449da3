"""`ia3-export parity` on `--graph fused` folders (manifest cache.kv_layout "shared": no position_ids,
GroupQueryAttention over one KV buffer bound as past and present, right-padded batches).

The reference is the float64 PyTorch model, each row alone with its own adapter; the checks cover a
prefill (batch 1 and a right-padded batch of different lengths), decode steps through the shared
buffer, greedy tokens, and corruption (a weight, a default vector) that must FAIL naming the output.
"""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("onnxruntime_genai")

from ia3_export.compare import row_keep  # noqa: E402
from ia3_export.export.tasks import TASKS, graph_specs  # noqa: E402
from ia3_export.parity.check import check_parity  # noqa: E402
from ia3_export.tolerances import tolerance  # noqa: E402

from cli_helpers import run_cli  # noqa: E402

STEPS = 3


def assert_covers_a_whole_request(report, mode: str) -> None:
    """The verdict rests on every kind of run: right-padded prefill, decode steps, greedy tokens."""
    assert report.passed, "\n".join(f.line() for f in report.failures()[:5])
    scenarios = {o.scenario for o in report.outputs}
    cases = {o.case for o in report.outputs}
    assert any("6,3,4 (right-padded)" in c for c in cases) and any(c.startswith("batch 1,") for c in cases), cases
    for run in ("prefill", "prefill, last positions (shared KV buffer)", *(f"decode step {s} (shared KV buffer)"
                                                                          for s in range(1, STEPS + 1))):
        assert any(s.endswith(run) for s in scenarios), (run, scenarios)
    assert report.greedy and all(g.passed for g in report.greedy) and all(len(g.actual) == STEPS for g in report.greedy)
    rows = [s.split(" ", 1)[1].split(", ")[0].split(",") for s in scenarios if s.startswith("adapters ")]
    if mode == "bank":  # rows of one batch use different adapters
        assert any(set(r) == {"ad", "-"} for r in rows), scenarios
    if mode != "merged":  # the adapter and the base model, and the graph with nothing fed
        assert any("ad" in r for r in rows) and any("-" in r for r in rows), scenarios
        assert any(s.startswith("nothing fed") for s in scenarios), scenarios


def test_cli_passes_a_fused_swappable_folder(fused_llama, fused_exports):
    """The reported bug: exit 2 'model.onnx has no input position_ids' on a fused folder; now exit 0."""
    model, adapter, _ = fused_llama
    result = run_cli("parity", model, fused_exports("swappable"), "--adapter", adapter, "--steps", str(STEPS))
    assert result.exit_code == 0, result.output
    assert "PASS: 21/21 output comparisons and 6/6 greedy-token checks passed" in result.output, result.output


@pytest.mark.parametrize("mode", ["merged", "swappable", "bank"])
def test_fused_folders_pass_prefill_decode_and_greedy(fused_llama, fused_exports, mode):
    model, adapter, _ = fused_llama
    report = check_parity(model, fused_exports(mode), [adapter], greedy_steps=STEPS)
    assert_covers_a_whole_request(report, mode)


def corrupted_copy(source: str, target, pick, factor: float = 1.01) -> str:
    """A copy of a fused folder with one initializer of model.onnx (the first `pick` accepts) scaled."""
    shutil.copytree(source, target)
    path = str(target / "model.onnx")
    model = onnx.load(path)
    for i, tensor in enumerate(model.graph.initializer):
        if pick(tensor):
            array = numpy_helper.to_array(tensor)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array((array * factor).astype(array.dtype), tensor.name))
            break
    else:
        raise AssertionError("no initializer to corrupt")
    onnx.save(model, path)
    return str(target)


def failing(report) -> set[tuple[str, str]]:
    return {(o.output, o.scenario) for o in report.outputs if not o.comparison.passed}


def test_a_weight_scaled_by_one_percent_fails_naming_logits(fused_llama, fused_exports, tmp_path):
    """Layer 1's fused q/k/v weight x 1.01 in a merged folder: every logits check of the prefill and the
    decode steps fails (exit 1 in the CLI), not a structural error."""
    model, adapter, _ = fused_llama
    folder = corrupted_copy(fused_exports("merged"), tmp_path / "bad", lambda t: "layers.1" in t.name and "qkv" in t.name
                            and len(t.dims) == 2)
    report = check_parity(model, folder, [adapter], greedy_steps=0)
    assert not report.passed
    bad = failing(report)
    assert {name for name, _ in bad} == {"logits"}
    assert any("decode step" in s for _, s in bad) and any(s.endswith("prefill") for _, s in bad), bad


def test_a_default_vector_scaled_fails_only_with_nothing_fed(fused_llama, fused_exports, tmp_path):
    """A swappable folder's overridable ones (layer 1 down_proj) x 1.01: what plain ONNX Runtime users
    get without an adapter is no longer the base model; the runs with vectors fed still pass."""
    model, adapter, _ = fused_llama
    folder = corrupted_copy(fused_exports("swappable"), tmp_path / "bad",
                            lambda t: t.name == "model.layers.1.mlp.down_proj.ia3_l")
    report = check_parity(model, folder, [adapter], greedy_steps=0)
    assert not report.passed
    assert failing(report) == {("logits", "nothing fed (graph defaults), prefill")}


def test_real_positions_of_a_right_padded_decode_step():
    """GroupQueryAttention's right padding: row 1 (2 tokens) writes its new token at column 2 of a
    4-wide mask, so its new token is real and its past is its first 2 columns. Left padding's rule (the
    mask's last column) would call it padding and drop it from the comparison."""
    (graph,) = graph_specs(TASKS["text-generation-with-past"], 1, token_type_ids=False)
    feeds = {"input_ids": np.zeros((2, 1), np.int64), "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]])}
    keep = row_keep(graph, feeds, 1, right_padded=True)
    assert keep["sequence_length"].tolist() == [True]
    assert keep["past_sequence_length"].tolist() == [True, True, False]
    prompt = {"input_ids": np.zeros((2, 3), np.int64), "attention_mask": np.array([[1, 1, 1], [1, 0, 0]])}
    assert row_keep(graph, prompt, 1, right_padded=True)["sequence_length"].tolist() == [True, False, False]
    assert row_keep(graph, feeds, 1)["sequence_length"].tolist() == [False]  # the left-padding rule, unchanged


def test_fp16_folders_pass_their_tolerance_and_a_scaled_head_fails(fused_llama, fused_exports, tmp_path):
    """fp16 (the builder's CUDA graph, run by ONNX Runtime's CPU kernels): swappable passes the fp16 bound
    against float64 with greedy tokens identical; the fp32 bound rejects it (the fp16 error is real); the LM
    head x 1.2 fails naming logits (fp16's bound, atol 0.05, is too wide for a 1% change on this tiny model)."""
    model, adapter, _ = fused_llama
    folder = fused_exports("swappable", "fp16")
    report = check_parity(model, folder, [adapter], greedy_steps=STEPS)
    assert_covers_a_whole_request(report, "swappable")
    assert (report.atol, report.rtol) == (tolerance("cpu", "fp16").atol, tolerance("cpu", "fp16").rtol)
    tight = tolerance("cpu", "fp32")
    assert not check_parity(model, folder, [adapter], greedy_steps=0, atol=tight.atol, rtol=tight.rtol).passed
    bad = corrupted_copy(folder, tmp_path / "bad", lambda t: t.name.startswith("lm_head") and len(t.dims) == 2, 1.2)
    result = run_cli("parity", model, bad, "--adapter", adapter, "--steps", "0")
    assert result.exit_code == 1 and "FAIL" in result.output and "logits" in result.output, result.output
