"""The parity check can fail (issue 6.5): corrupt one thing in a copy of a good export and the check
names what broke. Numeric corruption (a weight, a vector, a bank row) is exit 1 with the outputs it
reaches named; structural corruption (a renamed input, an opset the nodes do not match) is exit 2,
because no number can be compared when ONNX Runtime cannot load or feed the graph.

The model is the tiny 2-layer Llama; corrupting layer 1 can only reach `present.1.*` and `logits`,
so the failing set is exact, not just "something failed".
"""
from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnx import numpy_helper
from test_parity import export_for, run_parity

from ia3_export.formats.onnx_adapter import read_onnx_adapter, write_onnx_adapter

LAYER1_K = "model.layers.1.self_attn.k_proj.ia3_l"
LAYER1_V = "model.layers.1.self_attn.v_proj.ia3_l"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corrupted(tmp_path, tmp_path_factory, model_dir, adapter_dir):
    """corrupted(mode, edit) -> (exit code, output, JSON report or None) of `ia3-export parity` on a
    copy of the llama export after `edit(folder)`."""

    def run(mode: str, edit):
        source, adapters = export_for(tmp_path_factory, model_dir, adapter_dir, "llama", mode)
        folder = tmp_path / "onnx"
        shutil.copytree(source, folder)
        edit(folder)
        report = tmp_path / "report.json"
        code, out = run_parity(model_dir("llama"), str(folder), *[a for p in adapters for a in ("--adapter", p)],
                            "--json", str(report), "--steps", "3")
        return code, out, json.loads(report.read_text()) if report.exists() else None

    return run


def edit_model(folder, change) -> None:
    model = onnx.load(str(folder / "model.onnx"))
    change(model)
    onnx.save(model, str(folder / "model.onnx"))


def set_initializer(model, name: str, change) -> None:
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            array = numpy_helper.to_array(tensor).copy()
            change(array)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise AssertionError(f"no initializer {name}")


def failing(report, scenario_prefix: str = "") -> set[str]:
    return {o["name"] for o in report["outputs"] if not o["passed"] and o["scenario"].startswith(scenario_prefix)}


def test_weight(corrupted):
    """The output projection (lm_head, the [hidden, vocab] weight): logits fail, the cache does not."""
    def edit(folder):
        def change(model):
            head = next(t for t in model.graph.initializer if list(t.dims) == [32, 320])
            set_initializer(model, head.name, lambda w: w.__setitem__((slice(None), 7), w[:, 7] * 1.05))
        edit_model(folder, change)

    code, out, report = corrupted("merged", edit)
    assert code == 1, out
    assert failing(report) == {"logits"}
    worst = next(w for w in report["worst_per_output"] if w["name"] == "logits")
    assert worst["worst_index"][-1] == 7  # the corrupted vocabulary column is the worst position
    assert "error:" in out and "logits" in out.splitlines()[-1]


def test_overridable_initializer(corrupted):
    """Swappable: layer 1's value vector default (ones) off by 1% in one entry. The runtime always feeds
    vectors, so only the 'nothing fed' scenario (what ORT's own adapter API starts from) can see it."""
    code, out, report = corrupted("swappable", lambda folder: edit_model(
        folder, lambda m: set_initializer(m, LAYER1_V, lambda v: v.__setitem__(3, 1.01))))
    assert code == 1, out
    assert failing(report) == failing(report, "nothing fed") == {"present.1.value", "logits"}


def test_bank_row(corrupted):
    """Bank: one value of adapter1's layer-1 key vector in its shipped .onnx_adapter (its bank row at run
    time): rows using adapter1 fail in present.1.key; the worst position is always such a row."""
    def edit(folder):
        path = folder / "adapters" / "adapter1.onnx_adapter"
        tensors = read_onnx_adapter(str(path))
        tensors[LAYER1_K] = tensors[LAYER1_K].copy()
        tensors[LAYER1_K].reshape(-1)[5] *= 1.1
        write_onnx_adapter(str(path), tensors, force=True)

    code, out, report = corrupted("bank", edit)
    assert code == 1, out
    # The key cache names it; the logits move less (a tiny model's attention is nearly uniform), which is
    # why the cache outputs are compared too. Nothing in layer 0 may fail.
    assert "present.1.key" in failing(report) <= {"present.1.key", "logits"}
    for o in report["outputs"]:
        rows = o["scenario"].split(" ", 1)[1].split(",") if o["scenario"].startswith("adapters ") else []
        if not o["passed"]:
            assert rows[o["worst_index"][0]] == "adapter1"
        elif o["name"] == "present.1.key" and rows:
            assert "adapter1" not in rows


def test_renamed_input_is_structural(corrupted):
    """A renamed input leaves nothing to feed: exit 2, naming the input the layout needs."""
    def rename(model):
        for i in model.graph.input:
            if i.name == "position_ids":
                i.name = "pos_ids"
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                if name == "position_ids":
                    node.input[k] = "pos_ids"

    code, out, report = corrupted("merged", lambda folder: edit_model(folder, rename))
    assert code == 2, out
    assert "'position_ids'" in out and "'pos_ids'" in out and report is None


def test_opset_is_structural(corrupted):
    """Opset 18 relabelled 17: ReduceMean's axes input is invalid there, so ONNX Runtime refuses the
    graph; exit 2 naming the file (there is no output to compare)."""
    def relabel(model):
        model.opset_import[0].version = 17

    code, out, report = corrupted("merged", lambda folder: edit_model(folder, relabel))
    assert code == 2, out
    assert "model.onnx" in out and "ReduceMean" in out and report is None


def test_untouched_copy_passes(corrupted):
    """Control for the bank test: the untouched export passes, so the failures above come from the edits."""
    code, out, report = corrupted("bank", lambda folder: None)
    assert code == 0, out
    assert report["passed"] and not failing(report)
