"""The core commands from the outside: `--help`, `--version`, `merge`, `inspect`; errors are one
line on stderr with exit 2 (bad input) or 1 (failed check), and a failed merge writes nothing."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli, strict_json
from core_helpers import max_diff, outputs
from safetensors.numpy import load_file as load_numpy

from ia3_export import __version__
from ia3_export.core.merge import load_with_adapters

run = run_cli


def test_entry_point_help_version_and_usage_error():
    help_ = run_cli("--help")
    assert help_.exit_code == 0
    for name in ("merge", "inspect"):
        assert name in help_.stdout
    version = run_cli("--version")
    assert version.exit_code == 0 and version.stdout.strip() == f"ia3-export, version {__version__}"
    bad = run_cli("merge")
    assert bad.exit_code == 2 and "Missing argument 'MODEL_DIR'" in bad.stderr


@pytest.mark.parametrize("model_type,task,auto", [("llama", None, "AutoModelForCausalLM"),
                                                   ("bert", "seq-cls", "AutoModelForSequenceClassification")])
def test_merge_writes_a_plain_model_with_the_adapter_folded(model_dir, adapter_dir, tmp_path, model_type, task, auto):
    import transformers

    cls = getattr(transformers, auto)
    model = model_dir(model_type, task)
    adapter = adapter_dir(model_type, task, task_type="SEQ_CLS") if task else adapter_dir(model_type)
    out = tmp_path / "merged"
    result = run("merge", model, adapter, "--out", out)
    assert result.exit_code == 0, result.output
    assert "merged adapter1 into 6 layers" in result.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    merged = cls.from_pretrained(out).eval()
    expected = outputs(load_with_adapters(model, [adapter]), model_type)
    assert max_diff(outputs(merged, model_type), expected) <= 1e-5
    assert max_diff(outputs(merged, model_type), outputs(cls.from_pretrained(model), model_type)) > 1e-3
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_merge_two_adapters_folds_their_product(model_dir, adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, a, b = model_dir("gpt2"), adapter_dir("gpt2", seed=1), adapter_dir("gpt2", seed=2)
    result = run("merge", model, a, b, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    both = load_with_adapters(model, [a, b])
    assert both.active_adapters == ("adapter1", "adapter2")
    assert max_diff(outputs(merged, "gpt2"), outputs(both, "gpt2")) <= 1e-5


def test_merge_replaces_only_its_own_output(model_dir, adapter_dir, tmp_path):
    """--force replaces merge's own earlier output, never a folder holding a user's file (issue 22:
    `merge --out . --force` deleted the user's other files)."""
    out = tmp_path / "out"
    args = ("merge", model_dir("llama"), adapter_dir("llama"), "--out", out)
    assert run(*args).exit_code == 0
    assert_one_line_error(run(*args), 2, "already exists; choose another path or pass --force")
    assert run(*args, "--force").exit_code == 0
    (out / "keep.txt").write_text("mine")
    for force in ((), ("--force",)):
        assert_one_line_error(run(*args, *force), 2, f"output {out} holds keep.txt, which ia3-export did not write")
    assert (out / "keep.txt").read_text() == "mine" and "model.safetensors" in os.listdir(out)


@pytest.mark.parametrize("case,message", [
    ("no-model", "model folder"),
    ("same-folder", "is the input"),
    ("other-architecture", "matched no module of this llama model"),
    ("pickle", "is a pickle, which can run code when loaded"),
    ("not-an-adapter", "has no adapter_config.json"),
    ("same-name-twice", "two adapters are named 'adapter1'; give the folders different names"),
])
def test_merge_errors_write_nothing(model_dir, adapter_dir, tmp_path, case, message):
    import shutil

    model, adapter = model_dir("llama"), adapter_dir("llama")
    out = tmp_path / "out"
    if case == "no-model":
        model = tmp_path / "missing"
    elif case == "same-folder":
        out = model
    elif case == "other-architecture":
        adapter = adapter_dir("gpt2")
    elif case == "pickle":
        adapter = shutil.copytree(adapter, tmp_path / "pickled")
        os.rename(adapter / "adapter_model.safetensors", adapter / "adapter_model.bin")
    elif case == "not-an-adapter":
        adapter = model
    adapters = [adapter, adapter] if case == "same-name-twice" else [adapter]
    before = sorted(os.listdir(tmp_path))
    assert_one_line_error(run("merge", model, *adapters, "--out", out), 2, message)
    assert sorted(os.listdir(tmp_path)) == before


FULL_DISK_ON_SAVE = """
import os
from transformers import PreTrainedModel

def write_half_then_fail(self, path, *args, **kwargs):
    open(os.path.join(path, "config.json"), "w").write("{}")
    raise OSError(28, "No space left on device", path)

PreTrainedModel.save_pretrained = write_half_then_fail
"""


def test_merge_failing_while_writing_leaves_nothing(model_dir, adapter_dir, tmp_path):
    result = run_cli("merge", model_dir("llama"), adapter_dir("llama"), "--out", tmp_path / "out", preload=FULL_DISK_ON_SAVE)
    assert_one_line_error(result, 2, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_inspect_reports_what_the_file_holds(adapter_dir):
    adapter = adapter_dir("llama")
    tensors = load_numpy(os.path.join(adapter, "adapter_model.safetensors"))
    result = run("inspect", adapter, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_vectors"] == len(tensors) == 6
    assert summary["num_parameters"] == sum(v.size for v in tensors.values())
    for row in summary["vectors"]:
        v = tensors[f"base_model.model.{row['module']}.ia3_l"]
        assert row["scales"] == ("input" if v.shape[0] == 1 else "output") and row["dim"] == v.size
        assert np.isclose(row["min"], v.min()) and np.isclose(row["mean"], v.mean()) and np.isclose(row["max"], v.max())
    assert {r["module"] for r in summary["vectors"] if r["scales"] == "input"} == \
        {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}

    table = run("inspect", adapter)
    assert table.exit_code == 0
    assert "vectors: 6" in table.stdout and "model.layers.1.mlp.down_proj" in table.stdout


def test_inspect_errors(tmp_path):
    assert_one_line_error(run("inspect", tmp_path / "nope"), 2, "does not exist")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00")
    assert_one_line_error(run("inspect", tmp_path), 2, "peft_type is 'LORA', not 'IA3'")


FAILING_COMMAND = """
import click
from ia3_export import cli
from ia3_export.errors import CheckFailed

@click.command("inspect")
def failing():
    raise CheckFailed("logits differ by 0.3 (atol 1e-4); the export does not match")

cli._load = lambda module: failing
"""


def test_failed_check_exits_1():
    """A CheckFailed from any command becomes exit 1 with its one line."""
    assert_one_line_error(run_cli("inspect", preload=FAILING_COMMAND), 1, "logits differ by 0.3")


def test_inspect_reads_onnx_adapter_files(tmp_path):
    """An .onnx_adapter file is described by its tensors, named as the graph inputs they bind to; one
    holding inf (made with ORT's own writer: ours refuses it) is described in strict JSON (null)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    tensors = {"model.layers.0.self_attn.k_proj.ia3_l": rng.normal(1, 0.1, 16).astype(np.float32),
               "model.layers.0.mlp.down_proj.ia3_l": np.array([0.0, 2.0, np.inf, 1.0], np.float32),
               "model.layers.1.mlp.down_proj.ia3_l": np.full(4, np.nan, np.float32)}  # no finite value to sum up
    path = str(tmp_path / "a.onnx_adapter")
    writer = ort.AdapterFormat()
    writer.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in tensors.items()})
    writer.export_adapter(path)
    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    summary = strict_json(result.stdout)
    assert summary["num_parameters"] == 24
    rows = {r["name"]: r for r in summary["tensors"]}
    assert set(rows) == set(tensors)
    k = tensors["model.layers.0.self_attn.k_proj.ia3_l"]
    assert rows["model.layers.0.self_attn.k_proj.ia3_l"]["shape"] == [16]
    assert np.isclose(rows["model.layers.0.self_attn.k_proj.ia3_l"]["mean"], k.mean())
    down = rows["model.layers.0.mlp.down_proj.ia3_l"]
    assert (down["zeros"], down["non_finite"], down["max"]) == (1, 1, 2.0)
    nan = rows["model.layers.1.mlp.down_proj.ia3_l"]
    assert (nan["min"], nan["mean"], nan["max"], nan["non_finite"]) == (None, None, None, 4)
    table = run("inspect", path)
    assert table.exit_code == 0 and "model.layers.0.mlp.down_proj.ia3_l" in table.stdout and "NON-FINITE" in table.stdout
    assert_one_line_error(run("inspect", tmp_path / "missing.onnx_adapter"), 2, "does not exist")
    (tmp_path / "bad.onnx_adapter").write_bytes(b"not flatbuffers")
    assert_one_line_error(run("inspect", tmp_path / "bad.onnx_adapter"), 2, "not a readable .onnx_adapter file")
