"""What a server needs, in the lean install (no torch, no transformers): run by scripts/lean_check.sh
in .venv-lean against folders that tests/lean/prepare.py exported with the full environment.
Skipped unless IA3_LEAN_DIR names those folders."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

LEAN_DIR = os.environ.get("IA3_LEAN_DIR")
if not LEAN_DIR:
    pytest.skip("set IA3_LEAN_DIR (scripts/lean_check.sh does) to run the lean-install checks", allow_module_level=True)


def path(*parts):
    return os.path.join(LEAN_DIR, *parts)


def cli(*args):
    """The installed console script, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "ia3-export")
    return subprocess.run([exe, *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def expected():
    with open(path("expected.json")) as f:
        return json.load(f)


def test_install_is_lean():
    assert [m for m in ("torch", "transformers", "onnx", "peft") if importlib.util.find_spec(m)] == []


def test_onnxruntime_is_the_version_under_test():
    """scripts/lean_check.sh's second pass pins the oldest ONNX Runtime the `cpu` extra allows."""
    from importlib import metadata

    floor = os.environ.get("IA3_LEAN_ORT")
    if not floor:
        pytest.skip("the newest-ONNX Runtime pass (IA3_LEAN_ORT names the floor in the second pass)")
    assert metadata.version("onnxruntime").startswith(floor + "."), metadata.version("onnxruntime")


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_generation_with_peft_folders_matches_peft(mode, expected):
    from ia3_export.runtime import GenerationOptions, IA3Session, generate_ids

    s = IA3Session(path(mode))
    names = [s.load_adapter(path(a)) for a in ("adapter1", "adapter2")]
    options = GenerationOptions(max_new_tokens=expected["max_new_tokens"])
    for name in names:
        assert generate_ids(s, expected["prompts"], [name] * 2, options) == expected["greedy"][name]
    if mode == "bank":  # both adapters in one batch
        got = generate_ids(s, expected["prompts"], names, options)
        assert got == [expected["greedy"]["adapter1"][0], expected["greedy"]["adapter2"][1]]


def test_shipped_and_converted_adapters_through_onnxruntime_api(tmp_path):
    import onnxruntime as ort

    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import empty_cache, position_ids

    out = str(tmp_path / "a2.onnx_adapter")
    result = cli("convert", path("adapter2"), "--model", path("swappable"), "--out", out)
    assert result.returncode == 0, result.stderr
    s = IA3Session(path("swappable"))
    s.load_shipped_adapters()
    s.set_adapter("adapter2")
    ids = np.array([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = (ids != 0).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
             **empty_cache(s.graphs["model"], 2, "float32", s.folder.cache)}
    ours = s.run(feeds)["logits"]
    adapter = ort.LoraAdapter()
    adapter.Load(out)
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    plain = ort.InferenceSession(path("swappable", "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(plain.run(["logits"], feeds, options)[0], ours, atol=1e-6, rtol=1e-6)


def test_generate_and_inspect_commands():
    result = cli("generate", path("bank"), "--adapter", "adapter1", "--prompt", "hello", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    for target in (path("merged"), path("adapter1")):
        result = cli("inspect", target)
        assert result.returncode == 0 and result.stdout, result.stderr


def test_commands_needing_torch_name_the_extra(tmp_path):
    result = cli("export", path("base"), "--out", str(tmp_path / "x"), "--mode", "merged")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: this command needs torch; install torch's CPU build first (pip install "
                                     "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; PyPI's default torch "
                                     "is the multi-GB CUDA build), then: pip install 'ia3-export[export,cpu]' (README: Install)")


def test_the_engine_batches_both_adapters_without_torch(expected):
    """The continuous-batching engine is torch-free too: adapter2's request joins while adapter1's generates,
    one bank batch, and both get PEFT's tokens."""
    from ia3_export.runtime import Engine, GenerationOptions, IA3Session, Request

    s = IA3Session(path("bank"))
    names = [s.load_adapter(path(a)) for a in ("adapter1", "adapter2")]
    engine, options = Engine(s), GenerationOptions(max_new_tokens=expected["max_new_tokens"])
    handles = [engine.submit(Request(expected["prompts"][0], names[0], options))]
    engine.step()
    handles.append(engine.submit(Request(expected["prompts"][1], names[1], options)))
    while engine.step():
        pass
    assert [h.result(0).tokens for h in handles] == [expected["greedy"]["adapter1"][0], expected["greedy"]["adapter2"][1]]
