"""`export_model(..., graph="fused")` / `ia3-export export --graph fused`: the one export pipeline
with onnxruntime-genai's builder as its graph factory (ia3_export/export/fused.py).

The reference is PEFT's own IA3 model in float64 (independent of our core), fed the same tokens;
the ONNX graph runs with the growing cache (past from the previous run's presents).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from ia3_export.compare import compare  # noqa: E402
from ia3_export.errors import IA3Error  # noqa: E402
from ia3_export.tolerances import tolerance  # noqa: E402

from cli_helpers import run_cli  # noqa: E402

TOL = tolerance("cpu", "fp32")
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def llama(fused_llama):
    """(model, adapter, root): conftest's tiny llama with head size 16 and its adapter."""
    return fused_llama


@pytest.fixture(scope="module")
def exports(fused_exports):
    """mode -> exported folder (conftest's, built once per session)."""
    return fused_exports


def peft_logits(model_dir: str, adapter: str | None, ids: np.ndarray, merge: bool = False) -> np.ndarray:
    """PEFT's float64 IA3 model (merged, or with the adapter active; None: the base model)."""
    import torch
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    model = PeftModel.from_pretrained(base, adapter) if adapter else base
    if merge:
        model = model.merge_and_unload()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def adapter_vectors(adapter: str) -> dict[str, np.ndarray]:
    """Graph input name -> vector, read from the PEFT file itself."""
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    return {k[len(PREFIX):]: v.reshape(-1).astype(np.float32) for k, v in tensors.items()}


def session(folder: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"])


def prefill_and_step(sess, ids: np.ndarray, extra: dict) -> np.ndarray:
    """Logits of a prefill of all but the last token, then one cached decode step, joined."""
    from ia3_export.export.fused import run_cached

    prefill = run_cached(sess, ids[:, :-1], None, extra, (2, 16))
    step = run_cached(sess, ids[:, -1:], prefill, extra, (2, 16))
    return np.concatenate([prefill["logits"], step["logits"]], axis=1)


IDS = np.random.default_rng(7).integers(4, 320, (2, 9))


def test_merged_is_the_builder_graph_and_matches_peft_merged(llama, exports):
    model, adapter, _ = llama
    folder = exports("merged")
    from ia3_export.export.graph import op_histogram

    ops = op_histogram(os.path.join(folder, "model.onnx"))
    assert ops.get("GroupQueryAttention") == 2, ops
    manifest = json.load(open(os.path.join(folder, "ia3_export.json")))
    assert manifest["mode"] == "merged" and manifest["vectors"] == [] and manifest["cache"]["kv_layout"] == "shared"
    assert "position_ids" not in manifest["graphs"]["model"]["inputs"]
    genai = json.load(open(os.path.join(folder, "genai_config.json")))
    assert genai["search"]["past_present_share_buffer"] is True
    result = compare("logits", peft_logits(model, adapter, IDS, merge=True), prefill_and_step(session(folder), IDS, {}),
                     TOL.atol, TOL.rtol)
    assert result.passed, result.line()
    base = compare("logits", peft_logits(model, None, IDS), prefill_and_step(session(folder), IDS, {}), TOL.atol, TOL.rtol)
    assert not base.passed  # the adapter really is folded in


def test_fp16_is_the_builders_cuda_graph_and_matches_peft_within_the_fp16_bound(llama, exports):
    """--dtype fp16: the builder's CUDA graph (GroupQueryAttention, shared buffer; its CPU fp16 graph has
    neither), fp16 vector inputs, and logits that match PEFT's float64 model within fp16's bound, not fp32's."""
    import onnx

    model, adapter, _ = llama
    folder = exports("swappable", "fp16")
    graph = onnx.load(os.path.join(folder, "model.onnx")).graph
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == 2
    types = {i.name: i.type.tensor_type.elem_type for i in [*graph.input, *graph.output]}
    vectors = adapter_vectors(adapter)
    assert {types[name] for name in vectors} == {types["logits"]} == {onnx.TensorProto.FLOAT16}
    genai = json.load(open(os.path.join(folder, "genai_config.json")))
    assert "cuda" in genai["model"]["decoder"]["session_options"]["provider_options"][0]
    assert genai["search"]["past_present_share_buffer"] is True
    got = prefill_and_step(session(folder), IDS, {k: v.astype(np.float16) for k, v in vectors.items()})
    want = peft_logits(model, adapter, IDS)
    fp16 = tolerance("cpu", "fp16")
    assert compare("logits", want, got, fp16.atol, fp16.rtol).passed
    assert not compare("logits", want, got, TOL.atol, TOL.rtol).passed  # the fp16 error is real


def test_swappable_fuses_k_and_v_into_one_mul_and_matches_peft(llama, exports):
    model, adapter, _ = llama
    folder = exports("swappable")
    import onnx

    graph = onnx.load(os.path.join(folder, "model.onnx")).graph
    gqa = next(n for n in graph.node if n.name == "/model/layers.0/attn/GroupQueryAttention")
    scaler = next(n for n in graph.node if gqa.input[0] in n.output)
    assert scaler.op_type == "Mul"  # one Mul over the fused q/k/v output
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:  # the inserted nodes come before the ones that read them
        assert set(node.input) <= known, (node.name, set(node.input) - known)
        known.update(node.output)
    sess = session(folder)
    vectors = adapter_vectors(adapter)
    assert set(vectors) <= {i.name for i in graph.input}
    with_adapter = compare("logits", peft_logits(model, adapter, IDS), prefill_and_step(sess, IDS, vectors),
                           TOL.atol, TOL.rtol)
    assert with_adapter.passed, with_adapter.line()
    base = compare("logits", peft_logits(model, None, IDS), prefill_and_step(sess, IDS, {}), TOL.atol, TOL.rtol)
    assert base.passed, base.line()  # nothing fed: the overridable ones, the base model


@pytest.mark.parametrize("corrupt", ["model.layers.1.self_attn.v_proj.ia3_l", "model.layers.0.mlp.down_proj.ia3_l"])
def test_swappable_corrupted_vector_fails_the_comparison(llama, exports, corrupt):
    model, adapter, _ = llama
    vectors = adapter_vectors(adapter)
    vectors[corrupt] = vectors[corrupt].copy()
    vectors[corrupt][3] *= 1.5
    result = compare("logits", peft_logits(model, adapter, IDS), prefill_and_step(session(exports("swappable")), IDS, vectors),
                     TOL.atol, TOL.rtol)
    assert not result.passed


def test_swappable_adapter_file_runs_through_ort_adapter_api(llama, exports):
    import onnxruntime as ort

    from ia3_export.export.fused import run_cached

    model, adapter, _ = llama
    folder = exports("swappable")
    manifest = json.load(open(os.path.join(folder, "ia3_export.json")))
    loaded = ort.LoraAdapter()
    loaded.Load(os.path.join(folder, manifest["adapters"][0]["file"]))
    options = ort.RunOptions()
    options.add_active_adapter(loaded)
    sess = session(folder)
    ids = IDS[:1, :5]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             **{f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for kv in ("key", "value")}}
    logits = sess.run(["logits"], feeds, options)[0]
    result = compare("logits", peft_logits(model, adapter, ids), logits, TOL.atol, TOL.rtol)
    assert result.passed, result.line()
    assert not compare("logits", logits, run_cached(sess, ids, None, {}, (2, 16))["logits"], TOL.atol, TOL.rtol).passed


def test_bank_mixes_adapter_and_base_rows(llama, exports):
    model, adapter, _ = llama
    folder = exports("bank")
    vectors = adapter_vectors(adapter)
    banks = {name: np.stack([np.ones_like(v), v]) for name, v in vectors.items()}
    logits = prefill_and_step(session(folder), IDS, {"adapter_ids": np.array([1, 0]), **banks})
    expected = np.concatenate([peft_logits(model, adapter, IDS[:1]), peft_logits(model, None, IDS[1:])])
    result = compare("logits", expected, logits, TOL.atol, TOL.rtol)
    assert result.passed, result.line()
    assert not os.path.exists(os.path.join(folder, "genai_config.json"))


@pytest.mark.parametrize("model_type, overrides, message", [
    ("gpt2", {}, "supports llama, mistral, qwen2, qwen3, gemma, gemma2, phi3 decoders"),
    ("llama", {}, "multiple of 16"),
])
def test_unsupported_models_are_refused_before_building(tmp_path, model_type, overrides, message):
    from ia3_export.export import export_model
    from ia3_export.examples.tiny import save_tiny

    model = save_tiny(str(tmp_path / "m"), model_type, **overrides)
    with pytest.raises(IA3Error, match=message):
        export_model(model, str(tmp_path / "out"), graph="fused")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("options, message", [
    ({"quantize": "int4", "dtype": "fp16"}, "--quantize needs --dtype fp32"),  # int4/int8 are made (test_fused_quantized.py)
    ({"exporter": "dynamo"}, "drop --exporter dynamo"),
    ({"task": "text-generation"}, "not text-generation;"),
    ({"graph": "carved"}, "unknown graph 'carved'"),
])
def test_options_the_builder_cannot_honour_are_refused(llama, tmp_path, options, message):
    from ia3_export.export import export_model

    model, _, _ = llama
    with pytest.raises(IA3Error, match=message):
        export_model(model, str(tmp_path / "out"), **({"graph": "fused"} | options))
    assert not os.path.exists(tmp_path / "out")


def test_cli_exports_fused(llama, tmp_path):
    model, adapter, _ = llama
    out = tmp_path / "cli"
    result = run_cli("export", model, "--out", out, "--mode", "swappable", "--adapter", adapter, "--graph", "fused")
    assert result.exit_code == 0, result.output
    assert "fused graph" in result.stdout
    manifest = json.load(open(out / "ia3_export.json"))
    assert manifest["cache"]["kv_layout"] == "shared" and manifest["cache"]["position_ids"] is False
    assert manifest["exporter"].startswith("onnxruntime-genai-builder")


def test_batched_prompts_must_be_right_padded(llama, exports):
    """GroupQueryAttention reads each row's length from the mask and its tokens from position 0:
    right padding matches the per-row reference, left padding (the traced export's) does not."""
    model, _, _ = llama
    folder = exports("merged")
    adapter = llama[1]
    long, short = IDS[:1, :6], IDS[1:, :3]
    expected = [peft_logits(model, adapter, long, merge=True)[0, -1], peft_logits(model, adapter, short, merge=True)[0, -1]]
    past = {f"past_key_values.{i}.{kv}": np.zeros((2, 2, 0, 16), np.float32) for i in range(2) for kv in ("key", "value")}
    results = {}
    for side in ("right", "left"):
        ids, mask = np.zeros((2, 6), np.int64), np.zeros((2, 6), np.int64)
        ids[0], mask[0] = long[0], 1
        where = slice(0, 3) if side == "right" else slice(3, 6)
        ids[1, where], mask[1, where] = short[0], 1
        logits = session(folder).run(["logits"], {"input_ids": ids, "attention_mask": mask, **past})[0]
        actual = [logits[0, -1], logits[1, 2 if side == "right" else -1]]
        results[side] = compare("last logits", np.stack(expected), np.stack(actual), TOL.atol, TOL.rtol)
    assert results["right"].passed, results["right"].line()
    assert not results["left"].passed


@pytest.mark.parametrize("model_type, overrides", [
    ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("gemma", {}), ("gemma2", {}),
    ("phi3", {"max_position_embeddings": 4096}),  # the original context, else the builder takes it for LongRoPE
])
def test_other_builder_decoders_swappable_match_peft(tmp_path, model_type, overrides):
    """qwen2's q/k/v carry a bias (the tiny one a non-zero one): the k/v vectors must scale after it;
    qwen3 normalises q and k per head after the projection: the k vector must scale before that norm (on
    the attention's input it is normalised away); gemma scales its embeddings and ties its LM head; phi3's
    q/k/v are ONE module in transformers too (PEFT scales its whole output: one vector)."""
    from ia3_export.core.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny

    model = save_tiny(str(tmp_path / "m"), model_type, hidden_size=64, head_dim=16, **overrides)
    ia3 = IA3Model(load_base_model(model), IA3Config())
    randomize_adapter(ia3, "default", seed=5)
    adapter = ia3.save_adapter(str(tmp_path / "ad"))
    export_model(model, str(tmp_path / "out"), mode="swappable", adapters=[adapter], graph="fused")
    result = compare("logits", peft_logits(model, adapter, IDS),
                     prefill_and_step(session(str(tmp_path / "out")), IDS, adapter_vectors(adapter)), TOL.atol, TOL.rtol)
    assert result.passed, result.line()


@pytest.mark.parametrize("model_type, overrides", [
    ("mistral", {"sliding_window": 64}),  # every layer slides; the builder had left them all unwindowed
    ("qwen2", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1}),  # layer 1 only
    ("gemma2", {"sliding_window": 64}),  # sliding and full layers alternate
    ("phi3", {"sliding_window": 64, "max_position_embeddings": 4096}),
])
def test_sliding_windows_match_transformers_past_the_window(tmp_path, model_type, overrides):
    """A 100-token prompt and two decode steps through IA3Session's shared buffer, against PEFT's merged
    float64 model: past the 64-token window each layer must attend over transformers' window (before:
    the logits of mistral, qwen2 and phi3 drifted by up to 8e-2 there, and gemma2 was refused)."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny
    from ia3_export.export import export_model
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import decoder_logits

    model = save_tiny(str(tmp_path / "m"), model_type, hidden_size=64, head_dim=16, **overrides)
    ia3 = IA3Model(load_base_model(model), IA3Config())
    randomize_adapter(ia3, "default", seed=5)
    adapter = ia3.save_adapter(str(tmp_path / "ad"))
    export_model(model, str(tmp_path / "out"), mode="merged", adapters=[adapter], graph="fused")
    prompt, fed = np.random.default_rng(3).integers(4, 320, 100).tolist(), [7, 9]
    loop = decoder_logits(IA3Session(str(tmp_path / "out")), [prompt], None, len(fed) + 1)
    got = np.concatenate([next(loop).copy()] + [loop.send([t]).copy() for t in fed])
    want = peft_logits(model, adapter, np.array([prompt + fed]), merge=True)[0, len(prompt) - 1:]
    result = compare("logits", want, got, TOL.atol, TOL.rtol)
    assert result.passed, result.line()


def test_genai_serves_the_swappable_folder_with_its_adapter(llama, exports):
    """onnxruntime-genai reads the folder as the builder wrote it and applies our .onnx_adapter by input name."""
    import onnxruntime_genai as og

    _, adapter, _ = llama
    folder = exports("swappable")
    manifest = json.load(open(os.path.join(folder, "ia3_export.json")))
    model = og.Model(folder)
    adapters = og.Adapters(model)
    adapters.load(os.path.join(folder, manifest["adapters"][0]["file"]), "a")
    prompt = IDS[:1, :5]

    def genai_logits(active: bool) -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=12)
        generator = og.Generator(model, params)
        if active:
            generator.set_active_adapter(adapters, "a")
        generator.append_tokens(prompt.tolist())
        return np.array(generator.get_output("logits"))[:, -1]

    from ia3_export.export.fused import run_cached

    fed = run_cached(session(folder), prompt, None, adapter_vectors(adapter), (2, 16))["logits"][:, -1]
    assert compare("logits", fed, genai_logits(True), TOL.atol, TOL.rtol).passed
    assert not compare("logits", fed, genai_logits(False), TOL.atol, TOL.rtol).passed


def test_logits_to_keep_runs_the_head_on_the_last_positions_only(exports):
    folder = exports("swappable")
    sess = session(folder)
    past = {f"past_key_values.{i}.{kv}": np.zeros((2, 2, 0, 16), np.float32) for i in range(2) for kv in ("key", "value")}
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), **past}
    full = sess.run(["logits"], feeds)[0]
    assert full.shape == (2, IDS.shape[1], 320)  # nothing fed: every position (parity, scoring, genai)
    last = sess.run(["logits"], {**feeds, "logits_to_keep": np.array([1])})[0]
    assert last.shape == (2, 1, 320)
    assert compare("last logits", full[:, -1:], last, TOL.atol, TOL.rtol).passed


def test_cli_graph_choices_are_the_pipeline_factories():
    """One list: `--graph`'s choices are the pipeline's graph factories (the CLI module stays torch-free)."""
    from ia3_export.cli.export import command
    from ia3_export.export.pipeline import GRAPH_FACTORIES

    choices = next(p for p in command.params if p.name == "graph").type.choices
    assert tuple(choices) == tuple(GRAPH_FACTORIES) == ("traced", "fused")


def test_a_vector_left_unplaced_fails_validation_and_writes_nothing(llama, tmp_path, monkeypatch):
    """The pipeline's own check of the fused graph is real: drop the down_proj Muls and it fails (exit 1)."""
    from ia3_export.errors import CheckFailed
    from ia3_export.export import export_model, fused

    model, adapter, _ = llama
    monkeypatch.setattr(fused, "_place_linear", lambda *args: None)
    with pytest.raises(CheckFailed, match=r"model.onnx \(fused swappable export"):
        export_model(model, str(tmp_path / "out"), mode="swappable", adapters=[adapter], graph="fused")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("mode", ["merged", "swappable", "bank"])
def test_ia3session_generates_peft_greedy_tokens_on_fused_exports(llama, exports, mode):
    """The runtime users deploy drives a fused folder through its shared KV buffer (right-padded batch of
    prompts of different lengths): the tokens are transformers' greedy ones for the model with the adapter."""
    from runtime_helpers import peft_greedy

    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    model, adapter, _ = llama
    prompts = [[5, 9, 13, 200, 7], [11, 12]]
    session = IA3Session(exports(mode))
    name = None if mode == "merged" else session.load_adapter(adapter)
    rows = {"merged": None, "swappable": [name, name], "bank": [name, None]}[mode]  # bank: one row without
    got = generate_ids(session, prompts, rows, GenerationOptions(max_new_tokens=8))
    assert got[0] == peft_greedy(model, adapter, prompts[:1], 8)[0]
    assert got[1] == peft_greedy(model, None if mode == "bank" else adapter, prompts[1:], 8)[0]
