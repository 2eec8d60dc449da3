"""Merged ONNX export (issue 4): parity with PEFT's unmerged model for every tiny architecture,
greedy tokens equal transformers' generate(), no added ops, fp16, manifest and clear errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ia3_export.compare import compare
from ia3_export.errors import CheckFailed, IA3Error
from ia3_export.export import export_model
from ia3_export.export.graph import op_histogram
from ia3_export.examples.tiny import DECODERS, ENCODERS, EOS_ID, SEQ2SEQ
from test_export_support import (ALL_TYPES, decoder_feeds, exported, manifest, one_thread, ort_greedy, ort_greedy_seq2seq,  # noqa: F401
                                 peft_model, prompts, session, torch_greedy, until_eos)

ATOL = 1e-4


def ort_and_peft_outputs(folder: str, model_dir: str, adapter: str | None, extra=None):
    """(onnx, reference) pairs of comparable arrays for a tiny model's main outputs (padding excluded)."""
    m = manifest(folder)
    ref_model = peft_model(model_dir, adapter)
    extra = extra or {}
    pairs = []
    with torch.no_grad():
        if m["model_type"] in DECODERS:
            ids, mask = prompts()
            feeds = decoder_feeds(m, ids, mask, extra=extra)
            got = session(os.path.join(folder, "model.onnx")).run(["logits"], feeds)[0]
            ref = ref_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(feeds["position_ids"])).logits.numpy()
            real = mask.astype(bool)
            pairs.append(("logits", ref[real], got[real]))
        elif m["model_type"] in ENCODERS:
            ids, mask = prompts(left=False)
            feeds = {"input_ids": ids, "attention_mask": mask} | extra
            if "token_type_ids" in m["graphs"]["model"]["inputs"]:
                feeds["token_type_ids"] = np.zeros_like(ids)
            got = session(os.path.join(folder, "model.onnx")).run(["logits"], feeds)[0]
            ref = ref_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
            pairs.append(("logits", ref, got))
        else:
            ids, mask = prompts(left=False)
            enc = session(os.path.join(folder, "encoder_model.onnx"))
            dec = session(os.path.join(folder, "decoder_model.onnx"))
            pick = lambda s: {k: v for k, v in extra.items() if k in {i.name for i in s.get_overridable_initializers()}}  # noqa: E731
            hidden = enc.run(None, {"input_ids": ids, "attention_mask": mask} | pick(enc))[0]
            dec_ids = np.array([[m["tokens"]["decoder_start"], 7, 9]] * len(ids), np.int64)
            past = {n: np.zeros((len(ids), m["cache"]["num_kv_heads"], 0, m["cache"]["head_dim"]), hidden.dtype)
                    for n in m["graphs"]["decoder"]["inputs"] if n.startswith("past_key_values.")}
            logits = dec.run(["logits"], {"input_ids": dec_ids, "encoder_hidden_states": hidden,
                                          "encoder_attention_mask": mask, **past} | pick(dec))[0]
            out = ref_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            decoder_input_ids=torch.from_numpy(dec_ids))
            real = mask.astype(bool)
            pairs += [("encoder last_hidden_state", out.encoder_last_hidden_state.numpy()[real], hidden[real]),
                      ("decoder logits", out.logits.numpy(), logits)]
    return pairs


def greedy_pair(folder: str, model_dir: str, adapter: str | None, steps: int = 6, extra=None, run_options=None):
    m = manifest(folder)
    ref_model = peft_model(model_dir, adapter)
    if m["model_type"] in SEQ2SEQ:
        ids, mask = prompts(left=False)
        got = ort_greedy_seq2seq(folder, ids, mask, steps, extra)
        want = torch_greedy(ref_model, ids, mask, steps, seq2seq=True)
    else:
        ids, mask = prompts()
        got = ort_greedy(folder, ids, mask, steps, extra, run_options)
        want = torch_greedy(ref_model, ids, mask, steps)
    return until_eos(got, EOS_ID), until_eos(want, EOS_ID)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_merged_export_matches_peft_unmerged(model_type, exported, model_dir, adapter_dir):
    folder = exported(model_type)
    for name, ref, got in ort_and_peft_outputs(folder, model_dir(model_type), adapter_dir(model_type, seed=1)):
        result = compare(name, ref, got, atol=ATOL, rtol=0)
        assert result.passed, result.line()
    if model_type not in ENCODERS:
        got, want = greedy_pair(folder, model_dir(model_type), adapter_dir(model_type, seed=1))
        assert got == want


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_merged_graph_has_the_base_graphs_ops(model_type, exported):
    """Zero added latency: folding changes weights only, never the graph."""
    merged, base = manifest(exported(model_type)), manifest(exported(model_type, seeds=()))
    assert merged["graphs"].keys() == base["graphs"].keys()
    for key, g in merged["graphs"].items():
        hist = op_histogram(os.path.join(exported(model_type), g["file"]))
        assert hist == op_histogram(os.path.join(exported(model_type, seeds=()), base["graphs"][key]["file"]))
        assert "Mul" in hist  # a histogram that saw the graph


def test_base_export_matches_transformers(exported, model_dir):
    for name, ref, got in ort_and_peft_outputs(exported("qwen2", seeds=()), model_dir("qwen2"), None):
        assert compare(name, ref, got, atol=ATOL, rtol=0).passed


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert", "t5"])
def test_fp16_export_runs_on_cpu_near_fp32(model_type, exported, model_dir, adapter_dir):
    import onnx

    folder = exported(model_type, dtype="fp16")
    m = manifest(folder)
    assert m["dtype"] == "fp16"
    model = onnx.load(os.path.join(folder, m["graphs"][next(iter(m["graphs"]))]["file"]))
    types = [i.data_type for i in model.graph.initializer if len(i.dims) == 2]
    # float16 weights, except T5's `wo`, which transformers keeps in float32 (_keep_in_fp32_modules)
    assert types.count(1) == (2 if model_type == "t5" else 0) and types.count(10) > 4
    fp16 = dict((n, (r, g)) for n, r, g in ort_and_peft_outputs(folder, model_dir(model_type), adapter_dir(model_type, seed=1))
                if m["model_type"] not in SEQ2SEQ or n == "encoder last_hidden_state")
    for name, (ref, got) in fp16.items():
        assert got.dtype == np.float16 and np.isfinite(got).all()
        result = compare(name, ref, got, atol=2e-2, rtol=2e-2)
        assert result.passed, result.line()


def test_manifest_and_side_files(exported, adapter_dir, model_dir):
    folder = exported("llama")
    m = manifest(folder)
    assert {k: m[k] for k in ("format", "format_version", "mode", "task", "model_type", "dtype", "opset", "exporter")} == {
        "format": "ia3-export", "format_version": 1, "mode": "merged", "task": "text-generation-with-past",
        "model_type": "llama", "dtype": "fp32", "opset": 18, "exporter": "torchscript"}
    assert m["graphs"]["model"]["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert m["graphs"]["model"]["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]
    assert m["cache"] == {"graph": "model", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    assert m["vectors"] == []
    import hashlib

    adapter = adapter_dir("llama", seed=1)
    sha = hashlib.sha256(open(os.path.join(adapter, "adapter_model.safetensors"), "rb").read()).hexdigest()
    assert m["adapters"] == [{"name": "adapter1", "file": None, "sha256": sha}]
    assert m["tokens"] == {"pad": 0, "bos": 1, "eos": 2, "decoder_start": None}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    sess = session(os.path.join(folder, "model.onnx"))
    assert [i.name for i in sess.get_inputs()] == m["graphs"]["model"]["inputs"]
    assert [o.name for o in sess.get_outputs()] == m["graphs"]["model"]["outputs"]
    t5 = manifest(exported("t5"))
    assert set(t5["graphs"]) == {"encoder", "decoder"} and t5["cache"]["graph"] == "decoder"
    assert t5["tokens"]["decoder_start"] == 0
    from ia3_export.formats.manifest import read_manifest

    assert read_manifest(folder) == m


# -- errors: one clear message, nothing left behind -----------------------------------------
def leftovers(parent) -> list[str]:
    return sorted(os.listdir(parent))


def test_unknown_task_is_refused(model_dir, tmp_path):
    with pytest.raises(IA3Error, match="unknown task 'summarize'; use one of text-generation-with-past"):
        export_model(model_dir("llama"), str(tmp_path / "out"), task="summarize")
    with pytest.raises(IA3Error, match="task text2text-generation-with-past is not supported for model type 'llama'"):
        export_model(model_dir("llama"), str(tmp_path / "out"), task="text2text-generation-with-past")
    assert leftovers(tmp_path) == []


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(IA3Error, match="has no config.json"):
        export_model(str(tmp_path / "model"), str(tmp_path / "out"))
    assert leftovers(tmp_path) == ["model"]


def test_adapter_for_another_architecture_is_refused(model_dir, adapter_dir, tmp_path):
    with pytest.raises(IA3Error, match=r"key base_model\.model\.transformer\.h\.0\.attn\.c_attn\.ia3_l|matched no module"):
        export_model(model_dir("llama"), str(tmp_path / "out"), adapters=[adapter_dir("gpt2", seed=1)])
    assert leftovers(tmp_path) == []


def test_existing_output_needs_force(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IA3Error, match="already exists; choose another path or pass --force"):
        export_model(model_dir("bert"), str(out))
    (out / "keep.txt").write_text("mine")
    with pytest.raises(IA3Error, match="holds keep.txt, which ia3-export did not write; --force replaces only"):
        export_model(model_dir("bert"), str(out), force=True)
    assert leftovers(out) == ["keep.txt"] and leftovers(tmp_path) == ["out"]


def test_failed_validation_deletes_the_output(model_dir, tmp_path, monkeypatch):
    from ia3_export.export import validate

    monkeypatch.setitem(validate.TOLERANCES, "fp32", (-1.0, 0.0))  # nothing can pass
    with pytest.raises(CheckFailed, match=r"model\.onnx .*differs from PyTorch in 2 of 2 outputs; worst: FAIL"):
        export_model(model_dir("bert"), str(tmp_path / "out"))
    assert leftovers(tmp_path) == []

    from cli_helpers import run_cli

    nothing_passes = "from ia3_export.export import validate\nvalidate.TOLERANCES['fp32'] = (-1.0, 0.0)\n"
    result = run_cli("export", model_dir("bert"), "--out", str(tmp_path / "out"), preload=nothing_passes)
    assert result.exit_code == 1 and "worst: FAIL batch" in result.output
    assert leftovers(tmp_path) == []


def test_cli_export_and_errors(model_dir, tmp_path):

    from cli_helpers import run_cli
    out = tmp_path / "bert"
    result = run_cli("export", model_dir("bert"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "exported bert text-classification (merged, fp32, opset 18)" in result.output
    assert json.loads((out / "ia3_export.json").read_text())["task"] == "text-classification"
    result = run_cli("export", model_dir("bert"), "--out", str(out))
    assert result.exit_code == 2 and "already exists" in result.output
    result = run_cli("export", model_dir("bert"), "--out", str(tmp_path / "x"), "--task", "nope")
    assert result.exit_code == 2 and "'nope' is not one of" in result.output
    result = run_cli("export", model_dir("bert"), "--out", str(tmp_path / "x"), "--opset", "9")
    assert result.exit_code == 2 and "opset 9 is not supported" in result.output
    assert leftovers(tmp_path) == ["bert"]


def test_large_weights_go_to_external_data(model_dir, tmp_path, monkeypatch):
    """Past the protobuf limit the weights move to `<file>_data` (threshold lowered to exercise it)."""
    from ia3_export.export import graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_ABOVE", 0)
    m = export_model(model_dir("t5"), str(tmp_path / "out"))  # validated on ORT from the split files
    assert {k: g["external_data"] for k, g in m["graphs"].items()} == {
        "encoder": "encoder_model.onnx_data", "decoder": "decoder_model.onnx_data"}
    assert sorted(f for f in os.listdir(tmp_path / "out") if "onnx" in f) == [
        "decoder_model.onnx", "decoder_model.onnx_data", "encoder_model.onnx", "encoder_model.onnx_data"]
    assert os.path.getsize(tmp_path / "out" / "encoder_model.onnx") < os.path.getsize(tmp_path / "out" / "encoder_model.onnx_data")
