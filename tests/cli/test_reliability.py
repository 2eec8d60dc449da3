"""The bad-input catalogue from the outside (docs/errors.md lists every case and the test that
holds it): each bad input is one `error:` line naming the problem and the fix, exit 2, and leaves
every file as it was (no output, no temporary, inputs unchanged). Cases already held by other
test modules are not repeated here. Also: inputs never run code (pickles, remote code, eval)."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import resource
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cli_helpers import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
KEY = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"


def tree(path) -> dict[str, str]:
    """relative path -> sha256 of every file under path: 'nothing written or changed' is equality."""
    out = {}
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(folder, name)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest() if name in files else "dir"
    return out


def refused(tmp_path, args, message, code=2):
    """Run the command; it must fail with one line holding `message` and change nothing in tmp_path."""
    before = tree(tmp_path)
    result = run_cli(*args)
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert tree(tmp_path) == before
    return lines[0]


def edit_adapter(src, dst, tensors=None, config=None, raw=None):
    """A copy of a PEFT adapter with its tensors, config or raw weight bytes changed."""
    shutil.copytree(src, dst)
    if tensors:
        values = load_file(os.path.join(dst, WEIGHTS))
        tensors(values)
        save_file(values, os.path.join(dst, WEIGHTS))
    if config:
        with open(os.path.join(dst, CONFIG)) as f:
            data = json.load(f)
        config(data)
        with open(os.path.join(dst, CONFIG), "w") as f:
            json.dump(data, f)
    if raw:
        path = os.path.join(dst, WEIGHTS)
        data = open(path, "rb").read()
        open(path, "wb").write(raw(data))
    return dst


def put(key, value):
    return dict(tensors=lambda t: t.__setitem__(key, value))


def poke(index, value):
    return dict(tensors=lambda t: t[KEY].__setitem__(index, value))


def set_config(**values):
    return dict(config=lambda c: c.update(values))


def raw_bytes(change):
    return dict(raw=change)


K_PROJ = "model.layers.0.self_attn.k_proj"
ADAPTER_CASES = {  # case -> (how the adapter is damaged, what the one line must say)
    "key-for-a-missing-module": (put(KEY.replace("layers.0", "layers.7"), np.ones((16, 1), np.float32)),
                                 "model.layers.7.self_attn.k_proj.ia3_l names no IA3 target or saved module"),
    "missing-key": (dict(tensors=lambda t: t.pop(KEY)), f"missing key {KEY}; the adapter is incomplete"),
    "wrong-shape": (put(KEY, np.ones((12, 1), np.float32)), "has shape (12, 1), this model needs (16, 1)"),
    "integer-vector": (put(KEY, np.ones((16, 1), np.int32)), f"{KEY} has dtype int32"),
    "nan-vector": (poke((3, 0), np.nan), f"has non-finite values in {K_PROJ}; it cannot be folded"),
    "inf-vector": (poke((0, 0), np.inf), f"has non-finite values in {K_PROJ}"),
    "targets-match-nothing": (set_config(target_modules=["nope"], feedforward_modules=[]),
                              "target_modules [nope] matched no module of this llama model"),
    "invalid-regex": (set_config(target_modules="(k_proj"), "target_modules '(k_proj' is not a valid regular expression"),
    "modules-to-save-not-names": (set_config(modules_to_save=[1]), "modules_to_save must list module names as strings"),
    "truncated-safetensors": (raw_bytes(lambda b: b[:-10]), "(truncated or corrupted file)"),
    "bad-safetensors-header": (raw_bytes(lambda b: (10**12).to_bytes(8, "little") + b[8:]),
                               "corrupted safetensors header (declares 1000000000000 bytes"),
}


@pytest.fixture(scope="module")
def llama(model_dir, adapter_dir):
    return model_dir("llama"), adapter_dir("llama", seed=1)


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter_is_one_line_and_writes_nothing(case, llama, tmp_path):
    base, adapter = llama
    change, message = ADAPTER_CASES[case]
    bad = edit_adapter(adapter, tmp_path / "bad", **change)
    refused(tmp_path, ["merge", base, bad, "--out", tmp_path / "out"], message)


def test_non_finite_model_weights(llama, tmp_path):
    base, adapter = llama
    model = shutil.copytree(base, tmp_path / "model")
    weights = load_file(os.path.join(model, "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name][2, 5] = np.nan
    save_file(weights, os.path.join(model, "model.safetensors"), metadata={"format": "pt"})
    refused(tmp_path, ["merge", model, adapter, "--out", tmp_path / "out"], f"weight {name} holds NaN or inf values")


def test_model_folder_without_config(llama, tmp_path):
    base, adapter = llama
    model = shutil.copytree(base, tmp_path / "model")
    os.remove(model / "config.json")
    refused(tmp_path, ["merge", model, adapter, "--out", tmp_path / "out"],
            "has no config.json; pass a transformers model folder")


def test_unwritable_output(llama, tmp_path):
    """Simulated: the output's parent is a regular file (root ignores chmod, so a read-only folder
    cannot be made here); the write fails at the first mkdir, before any work is lost."""
    base, adapter = llama
    (tmp_path / "file").write_text("not a folder")
    refused(tmp_path, ["merge", base, adapter, "--out", tmp_path / "file" / "out"], "cannot write to")


def test_full_disk(llama, tmp_path):
    """Simulated with RLIMIT_FSIZE (a write past 64 KiB fails with EFBIG, as a full disk fails
    with ENOSPC, from inside the safetensors writer); test_cli_core monkeypatches ENOSPC itself."""
    base, adapter = llama
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    before = tree(tmp_path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        result = run_cli("merge", base, adapter, "--out", str(tmp_path / "out"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert result.exit_code == 2, (result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "File too large" in lines[0], result.stderr
    assert tree(tmp_path) == before


# -- the runtime: .onnx_adapter files and providers -----------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama):
    from runtime_helpers import export_once

    return export_once(tmp_path_factory, llama[0], "swappable", [llama[1]])


def test_corrupted_onnx_adapter(exported, tmp_path):
    bad = tmp_path / "bad.onnx_adapter"
    bad.write_bytes(b"\x10\x00\x00\x00garbage" * 7)
    refused(tmp_path, ["generate", exported, "--prompt", "hi", "--adapter", bad, "--max-new-tokens", "1"],
            "not a readable .onnx_adapter file")


def test_onnx_adapter_names_that_are_not_model_inputs(exported, tmp_path):
    from ia3_export.formats.onnx_adapter import write_onnx_adapter

    foreign = str(tmp_path / "foreign.onnx_adapter")
    write_onnx_adapter(foreign, {"model.layers.0.self_attn.q_proj.ia3_l": np.ones(32, np.float32)})
    refused(tmp_path, ["generate", exported, "--prompt", "hi", "--adapter", foreign, "--max-new-tokens", "1"],
            "model.layers.0.self_attn.q_proj.ia3_l is not a vector input of")


def test_cuda_without_a_cuda_provider(exported, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    refused(tmp_path, ["generate", exported, "--prompt", "hi", "--provider", "cuda"],
            "this onnxruntime has no CUDAExecutionProvider")


# -- training ---------------------------------------------------------------------------------
ROWS = "".join(json.dumps({"text": f"row {i}", "label": ["a", "b"][i % 2]}) + "\n" for i in range(6))


@pytest.mark.parametrize("options,message", [
    (["--target-modules", "nope"], "matched no module"),
    (["--target-modules", "key,value", "--feedforward-modules", "output.dense"], "not in target_modules"),
    (["--device", "cuda"], "CUDA"),
], ids=["targets-match-nothing", "feedforward-outside-targets", "cuda-without-cuda"])
def test_bad_training_options(options, message, model_dir, tmp_path):
    import torch

    if "--device" in options and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = tmp_path / "d.jsonl"
    data.write_text(ROWS)
    refused(tmp_path, ["train", model_dir("bert", "feature-extraction"), "--data", data, "--task", "text-classification",
                       "--out", tmp_path / "out", *options], message)


def test_unknown_task_is_a_usage_error(model_dir, tmp_path):
    """click answers an unknown --task itself: exit 2, usage, and one `Error:` line listing the tasks."""
    result = run_cli("export", model_dir("llama"), "--out", str(tmp_path / "o"), "--task", "summarize")
    assert result.exit_code == 2 and "Error: Invalid value for '--task': 'summarize' is not one of" in result.stderr
    assert os.listdir(tmp_path) == []


# -- security -----------------------------------------------------------------------------------
def test_remote_code_in_a_model_folder_is_not_run(llama, tmp_path):
    """A config whose auto_map points at code in the folder: without an explicit trust flag the code
    never runs (the marker file stays absent) and the folder is refused in one line."""
    base, adapter = llama
    model = shutil.copytree(base, tmp_path / "model")
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                   "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
                                   "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    result = run_cli("merge", str(model), adapter, "--out", str(tmp_path / "out"))
    assert not marker.exists()
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


class _Payload:
    """A pickle that would create a file when loaded by an unrestricted unpickler."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_checkpoint_payload_is_not_run(model_dir, tmp_path):
    """--resume reads its own checkpoint with torch.load(weights_only=True): a planted pickle that
    would run code is refused in one line and runs nothing."""
    data = tmp_path / "d.jsonl"
    data.write_text(ROWS)
    out = tmp_path / "out"
    step = tmp_path / "out.checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    marker = str(tmp_path / "pwned")
    with open(step / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": _Payload(marker)}, f, protocol=2)
    line = refused(tmp_path, ["train", model_dir("bert", "feature-extraction"), "--data", data, "--task",
                              "text-classification", "--out", out, "--resume", "--save-steps", "1"], "cannot be read")
    assert "trainer_state.pt" in line and not os.path.exists(marker)


def test_no_code_runs_from_inputs_anywhere_in_the_package():
    """No eval/exec, no pickle loads, torch.load only with weights_only=True, and trust_remote_code
    never set to a literal True: checked on the syntax tree of every module."""
    problems = []
    for folder, _, files in os.walk(os.path.join(ROOT, "ia3_export")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Call):
                    func = ast.unparse(node.func)
                    keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    if func in ("eval", "exec", "pickle.load", "pickle.loads", "marshal.loads") or (
                            func == "torch.load" and keywords.get("weights_only") != "True"):
                        problems.append(f"{path}:{node.lineno}: {func}")
                    if keywords.get("trust_remote_code") == "True":
                        problems.append(f"{path}:{node.lineno}: trust_remote_code=True")
    assert not problems, problems


def test_every_test_the_catalogue_names_exists():
    """docs/errors.md names a test for each case (`module::test[case]`, a bare `test[case]` in the
    module named before it, or `module[case]` for a case of that module's table): each must exist."""
    import re

    text = open(os.path.join(ROOT, "docs", "errors.md")).read()
    table = [line for line in text.splitlines() if line.startswith("| ") and "::" in line]
    assert len(table) >= 20
    files = {f[:-3]: os.path.join(d, f) for d, _, names in os.walk(os.path.join(ROOT, "tests"))
             for f in names if f.startswith("test_") and f.endswith(".py")}  # test modules live in one folder per floor
    missing = []
    for line in table:
        current = None
        for module, name, case in re.findall(r"(?:(test_\w+)::)?(test_\w+)(?:\[([^\]]*)\])?", line.split("|")[3]):
            if name in files:  # `module[case]`
                current, name = name, None
            current = module or current or "test_reliability"
            source = open(files[current]).read()
            if (name and f"def {name}(" not in source) or (case and not all(c in source for c in case.split(","))):
                missing.append(f"{current}::{name}[{case}]")
    assert not missing, missing
