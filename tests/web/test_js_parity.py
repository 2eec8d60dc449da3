"""`ia3-export parity --runtime node` (issue 24, deliverable 4): the parity cases, scenarios and greedy
prompts run through the shipped ia3.mjs on onnxruntime-node against the float64 PyTorch reference, and
the check fails, naming the vector, when an adapter file the module reads is corrupted."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from runtime_helpers import llama_exports

from ia3_export.formats.onnx_adapter import read_onnx_adapter, write_onnx_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODE_MODULES = os.path.join(ROOT, "node_modules")
LAYER1_V = "model.layers.1.self_attn.v_proj.ia3_l"


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    return llama_exports(tmp_path_factory, model_dir, adapter_dir, modes=("swappable", "bank", "merged"))


def parity(llama, folder, tmp_path, *extra):
    report = tmp_path / "report.json"
    result = run_cli("parity", llama["base"], folder, "--adapter", llama["a1"], "--adapter", llama["a2"],
                     "--runtime", "node", "--steps", "4", "--json", report, *extra)
    return result, json.loads(report.read_text()) if report.exists() else None


@pytest.mark.parametrize("mode", ["swappable", "bank", "merged"])
def test_node_runtime_passes(llama, tmp_path, mode):
    result, report = parity(llama, llama[mode], tmp_path, "--node-modules", NODE_MODULES)
    assert result.exit_code == 0, result.output
    assert report["runtime"] == "node" and report["passed"]
    assert "through ia3.mjs on onnxruntime-node" in result.stdout
    vectors = [o for o in report["outputs"] if o["graph"] == "ia3.mjs"]
    if mode == "merged":  # both adapters folded into the weights: no vectors, nothing fed
        assert not vectors and all(o["scenario"] == "folded adapter1,adapter2" for o in report["outputs"])
    else:
        assert {o["case"] for o in vectors} == {"adapter adapter1", "adapter adapter2"} and len(vectors) == 12
    cases = {o["case"] for o in report["outputs"] if o["graph"] == "model.onnx"}
    assert any("past 0" in c for c in cases) and any("past 3" in c for c in cases)  # the cache's two shapes
    if mode == "bank":  # rows mixed in one run: the module stacked the banks
        assert any(len(set(o["scenario"].split(" ", 1)[1].split(","))) == 3 for o in report["outputs"])
    assert report["greedy"] and all(g["passed"] and g["reference"] == g["actual"] for g in report["greedy"])


def test_corrupted_vector_fails_naming_it(llama, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(llama["swappable"], folder)
    path = folder / "adapters" / "adapter1.onnx_adapter"
    vectors = read_onnx_adapter(str(path))
    vectors[LAYER1_V] = vectors[LAYER1_V] * np.float32(1.01)
    write_onnx_adapter(str(path), vectors, force=True)
    # the env var names the node_modules this time (the option's alternative)
    report = tmp_path / "report.json"
    result = run_cli("parity", llama["base"], folder, "--adapter", llama["a1"], "--adapter", llama["a2"], "--runtime",
                     "node", "--steps", "4", "--json", report, env={"IA3_NODE_MODULES": NODE_MODULES})
    assert result.exit_code == 1, result.output
    report = json.loads(report.read_text())
    failed = {(o["graph"], o["case"], o["name"]) for o in report["outputs"] if not o["passed"]}
    assert ("ia3.mjs", "adapter adapter1", LAYER1_V) in failed  # the vector, by name
    assert {name for graph, _, name in failed if graph == "ia3.mjs"} == {LAYER1_V}  # and no other
    reached = {o["name"] for o in report["outputs"] if not o["passed"] and o["graph"] == "model.onnx"}
    assert reached and reached <= {"logits", "present.1.value"}  # layer 1's value vector reaches only these
    assert all("adapter1" in o["scenario"] for o in report["outputs"] if not o["passed"] and o["graph"] == "model.onnx")
    assert "FAIL" in result.stderr or "FAIL" in result.stdout


def test_missing_onnxruntime_node_is_one_line(llama, tmp_path):
    result = run_cli("parity", llama["base"], llama["swappable"], "--adapter", llama["a1"], "--runtime", "node",
                     "--node-modules", tmp_path)
    assert_one_line_error(result, 2, f"onnxruntime-node is not installed in {tmp_path}; run `npm install onnxruntime-node`")


def test_node_runtime_takes_the_cpu_only(llama):
    result = run_cli("parity", llama["base"], llama["swappable"], "--runtime", "node", "--provider", "cuda")
    assert_one_line_error(result, 2, "--runtime node runs onnxruntime-node on the CPU")


def test_node_missing_from_path_is_one_line(llama):
    import sys

    result = run_cli("parity", llama["base"], llama["swappable"], "--runtime", "node",
                     env={"PATH": os.path.dirname(sys.executable)})  # the venv's scripts, no node
    assert_one_line_error(result, 2, "--runtime node needs Node.js (18 or later) on PATH")


def test_a_broken_onnxruntime_node_is_one_line(llama, tmp_path):
    package = tmp_path / "node_modules" / "onnxruntime-node"
    package.mkdir(parents=True)
    (package / "package.json").write_text('{"name": "onnxruntime-node", "main": "index.js"}')
    (package / "index.js").write_text('throw new Error("this install is broken");')
    result = run_cli("parity", llama["base"], llama["swappable"], "--runtime", "node", "--node-modules",
                     tmp_path / "node_modules")
    assert_one_line_error(result, 2, "the Node parity runner stopped: Error: this install is broken")
