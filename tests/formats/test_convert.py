"""`ia3-export convert`: PEFT adapter -> .onnx_adapter, checked against the model, usable through
ONNX Runtime's own adapter API (LoraAdapter + RunOptions) without ia3-export."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cli_helpers import run_cli
from runtime_helpers import export_once, padded, prefill_feeds


@pytest.fixture(scope="module")
def exports(tmp_path_factory, model_dir, adapter_dir):
    base, a1, a2 = model_dir("llama"), adapter_dir("llama", seed=1), adapter_dir("llama", seed=2)
    return {"a1": a1, **{mode: export_once(tmp_path_factory, base, mode, [a1, a2]) for mode in ("swappable", "bank")}}


def convert(*args):
    return run_cli("convert", *args)


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_converted_file_works_with_onnxruntime_own_adapter_api(exports, mode, tmp_path):
    import onnxruntime as ort

    from ia3_export.formats.adapter_format import read_adapter
    from ia3_export.formats.onnx_adapter import read_onnx_adapter
    from ia3_export.runtime import IA3Session

    out = str(tmp_path / "a1.onnx_adapter")
    result = convert(exports["a1"], "--model", exports[mode], "--out", out)
    assert result.exit_code == 0, result.output
    stored = read_onnx_adapter(out)
    for path, vector in read_adapter(exports["a1"]).vectors().items():  # PEFT's values, under the input names
        np.testing.assert_array_equal(stored[path + ".ia3_l"].reshape(-1), vector)

    ours = IA3Session(exports[mode])
    ours.set_adapter(ours.load_adapter(exports["a1"]))
    ids, mask = padded()
    feeds = prefill_feeds(ours, ids, mask)
    expected = ours.run(feeds)["logits"]

    adapter = ort.LoraAdapter()
    adapter.Load(out)
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    plain = ort.InferenceSession(os.path.join(exports[mode], "model.onnx"), providers=["CPUExecutionProvider"])
    if mode == "bank":
        feeds["adapter_ids"] = np.zeros(2, np.int64)  # the file's [1, dim] tensors are a one-row bank
    got = plain.run(["logits"], feeds, run_options)[0]
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)
    base = plain.run(["logits"], feeds)[0]
    assert np.abs(base - got).max() > 1e-3  # the adapter really changed the output


def test_mismatched_adapter_fails_with_one_line(exports, adapter_dir, tmp_path):
    other = adapter_dir("llama", seed=4, target_modules=("q_proj", "v_proj"), feedforward_modules=())
    out = tmp_path / "x.onnx_adapter"
    result = convert(other, "--model", exports["swappable"], "--out", str(out))
    assert result.exit_code == 2
    assert "q_proj.ia3_l is not a vector input" in result.output and "other target_modules" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_needs_force(exports, tmp_path):
    out = tmp_path / "a.onnx_adapter"
    out.write_bytes(b"old")
    result = convert(exports["a1"], "--model", exports["swappable"], "--out", str(out))
    assert result.exit_code == 2 and "--force" in result.output and out.read_bytes() == b"old"
    result = convert(exports["a1"], "--model", exports["swappable"], "--out", str(out), "--force")
    assert result.exit_code == 0 and out.read_bytes() != b"old"
