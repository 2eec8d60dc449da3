"""A model folder that ships its own code runs it only with --trust-remote-code, on every command
that loads a model; with the flag the folder works like any other."""
from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import assert_one_line_error, run_cli
from safetensors.numpy import load_file

CODE = """
open({marker!r}, "a").write("ran\\n")
from transformers import LlamaConfig, LlamaForCausalLM

class CustomConfig(LlamaConfig):
    model_type = "custom_llama"

class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture
def custom(model_dir, tmp_path):
    """The tiny Llama, re-declared as a custom architecture whose code writes a marker when it runs."""
    folder = shutil.copytree(model_dir("llama"), tmp_path / "custom")
    marker = tmp_path / "code-ran"
    (folder / "custom_llama.py").write_text(CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_without_the_flag_no_command_runs_the_code(custom, adapter_dir, tmp_path):
    folder, marker = custom
    adapter = adapter_dir("llama")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat meows"}\n' * 4)
    for args in (["merge", folder, adapter, "--out", tmp_path / "m"],
                 ["train", folder, "--data", data, "--task", "text-generation", "--out", tmp_path / "t"]):
        assert_one_line_error(run_cli(*args), 2, "pass --trust-remote-code")
    # export supports known architectures only, and says so before loading anything
    assert_one_line_error(run_cli("export", folder, "--out", tmp_path / "e"), 2, "not supported for model type 'custom_llama'")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom", "d.jsonl"]


def test_with_the_flag_merge_runs_it_and_folds_as_for_the_plain_model(custom, model_dir, adapter_dir, tmp_path):
    folder, marker = custom
    adapter = adapter_dir("llama")
    result = run_cli("merge", folder, adapter, "--out", tmp_path / "custom-merged", "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert marker.exists()
    plain = run_cli("merge", model_dir("llama"), adapter, "--out", tmp_path / "plain-merged")
    assert plain.exit_code == 0, plain.output
    ours, reference = (load_file(str(tmp_path / f"{k}-merged" / "model.safetensors")) for k in ("custom", "plain"))
    assert ours.keys() == reference.keys() and all((ours[k] == reference[k]).all() for k in ours)
    assert json.loads((tmp_path / "custom-merged" / "config.json").read_text())["architectures"] == ["CustomForCausalLM"]


def test_a_known_architecture_with_shipped_code_loads_natively_without_running_it(model_dir, adapter_dir, tmp_path):
    """Hub folders of models transformers now knows (Phi-3's first uploads) still carry auto_map:
    without the flag they load transformers' own class, as transformers does, and no shipped code runs."""
    folder = shutil.copytree(model_dir("llama"), tmp_path / "llama-with-code")
    marker = tmp_path / "code-ran"
    (folder / "custom_llama.py").write_text(CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_llama.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("merge", folder, adapter_dir("llama"), "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert not marker.exists()
