"""`--mode foldswap` on `--graph fused`: the builder's graph of the base model with its targeted
tensors (the fused q/k/v MatMul weight, its bias where there is one, down_proj's weight) as pure
graph inputs, filled by fold.onnx (export/fused.py's `lift_fold_targets`, export/modes/foldswap.py).

The references are independent of our core: PEFT's own IA3 model in float64 (logits, greedy tokens)
and the model's safetensors file (the base values fold.onnx holds).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from ia3_export.compare import compare  # noqa: E402
from ia3_export.tolerances import tolerance  # noqa: E402

from cli_helpers import run_cli  # noqa: E402
from test_fused_export import IDS, TOL, adapter_vectors, peft_logits, prefill_and_step, session  # noqa: E402

PROMPTS = [[5, 9, 13, 200, 7], [11, 12]]


def fold(folder: str, vectors: dict) -> dict[str, np.ndarray]:
    """fold.onnx run on ONNX Runtime for these vectors (ones for every other input): tensor name -> value."""
    import onnxruntime as ort

    fold_session = ort.InferenceSession(os.path.join(folder, "fold.onnx"), providers=["CPUExecutionProvider"])
    dtype = np.float16 if fold_session.get_inputs()[0].type == "tensor(float16)" else np.float32
    feeds = {i.name: np.ones(i.shape, dtype) for i in fold_session.get_inputs()}
    feeds.update((name, vector.astype(dtype)) for name, vector in vectors.items())
    names = [o.name for o in fold_session.get_outputs()]
    return dict(zip(names, fold_session.run(names, feeds)))


def manifest_of(folder: str) -> dict:
    with open(os.path.join(folder, "ia3_export.json")) as f:
        return json.load(f)


def test_folded_tensors_give_peft_logits_for_the_adapter_and_the_base_model(fused_llama, fused_exports):
    model, adapter, _ = fused_llama
    folder = fused_exports("foldswap")
    sess = session(folder)
    with_adapter = prefill_and_step(sess, IDS, fold(folder, adapter_vectors(adapter)))
    result = compare("logits", peft_logits(model, adapter, IDS), with_adapter, TOL.atol, TOL.rtol)
    assert result.passed, result.line()
    base = prefill_and_step(sess, IDS, fold(folder, {}))  # vectors of ones
    result = compare("logits", peft_logits(model, None, IDS), base, TOL.atol, TOL.rtol)
    assert result.passed, result.line()
    assert not compare("logits", with_adapter, base, TOL.atol, TOL.rtol).passed  # the adapter really acts


def test_fp16_folds_the_builders_cuda_graph_within_the_fp16_bound(fused_llama, fused_exports):
    """--dtype fp16 (the builder's CUDA graph): the lifted inputs and fold.onnx are fp16, and the logits
    match PEFT's float64 model within fp16's bound."""
    import onnx

    model, adapter, _ = fused_llama
    folder = fused_exports("foldswap", "fp16")
    inputs = {i.name: i.type.tensor_type.elem_type for i in onnx.load(os.path.join(folder, "model.onnx")).graph.input}
    assert {inputs[w["name"]] for w in manifest_of(folder)["weights"]} == {onnx.TensorProto.FLOAT16}
    got = prefill_and_step(session(folder), IDS, fold(folder, adapter_vectors(adapter)))
    fp16 = tolerance("cpu", "fp16")
    result = compare("logits", peft_logits(model, adapter, IDS), got, fp16.atol, fp16.rtol)
    assert result.passed, result.line()


def test_model_onnx_holds_no_targeted_weight_and_fold_onnx_holds_the_base_values(fused_llama, fused_exports):
    """The targeted tensors are pure inputs of model.onnx (no initializer of that name or those values);
    fold.onnx's base values are the model's own weights in the builder's [in, out] layout, q/k/v side by side."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    model, _, _ = fused_llama
    folder = fused_exports("foldswap")
    manifest = manifest_of(folder)
    graph = onnx.load(os.path.join(folder, "model.onnx")).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    bases = {t.name: numpy_helper.to_array(t) for t in onnx.load(os.path.join(folder, "fold.onnx")).graph.initializer}
    hf = load_file(os.path.join(model, "model.safetensors"))
    weights = {w["name"]: w for w in manifest["weights"]}
    for layer in range(2):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        expected = {f"model.layers.{layer}.attn.qkv_proj.MatMul.weight":
                    np.concatenate([hf[f"{attn}.{m}_proj.weight"] for m in "qkv"]).T,
                    f"model.layers.{layer}.mlp.down_proj.MatMul.weight": hf[f"{mlp}.down_proj.weight"].T}
        for name, value in expected.items():
            np.testing.assert_array_equal(bases[f"{name}.base"], value)
            assert name in {i.name for i in graph.input} and name not in initializers
            assert not any(v.shape == value.shape and np.array_equal(v, value) for v in initializers.values()), name
            assert weights[name]["graph"] == "model" and weights[name]["shape"] == list(value.shape)
        qkv = weights[f"model.layers.{layer}.attn.qkv_proj.MatMul.weight"]
        assert qkv["vectors"] == [f"{attn}.k_proj.ia3_l", f"{attn}.v_proj.ia3_l"] and qkv["vector"] == qkv["vectors"][0]
    assert manifest["genai"]["supported"] is False and not os.path.exists(os.path.join(folder, "genai_config.json"))


def test_a_forged_vectors_entry_is_refused_in_one_line(fused_exports, tmp_path):
    """`weights[*].vectors` is checked like every manifest field: a string where a list of names belongs is refused."""
    from ia3_export.errors import IA3Error
    from ia3_export.formats.manifest import read_manifest

    folder = str(tmp_path / "forged")
    shutil.copytree(fused_exports("foldswap"), folder)
    manifest = manifest_of(folder)
    manifest["weights"][0]["vectors"] = "model.layers.0.self_attn.k_proj.ia3_l"
    with open(os.path.join(folder, "ia3_export.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(IA3Error, match=r"weights\[0\]\.vectors is .*expected a list of names"):
        read_manifest(folder)


@pytest.fixture(scope="module")
def two_adapters(fused_llama, tmp_path_factory):
    """(model, adapter a, adapter b, folder): a fused foldswap export shipping two adapters."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter
    from ia3_export.export import export_model

    model, first, _ = fused_llama
    root = tmp_path_factory.mktemp("fused-foldswap")
    ia3 = IA3Model(load_base_model(model), IA3Config())
    randomize_adapter(ia3, "default", seed=11)
    second = ia3.save_adapter(str(root / "b"))
    export_model(model, str(root / "out"), mode="foldswap", adapters=[first, second], graph="fused")
    return model, first, second, str(root / "out")


def test_ia3session_generates_peft_tokens_and_switches_adapters_and_back(two_adapters):
    """The runtime folds its working copy on each switch (shared KV buffer, the fast decode path) and
    runs the base model when no adapter is set: each adapter's tokens are PEFT's greedy ones."""
    from runtime_helpers import peft_greedy

    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    model, first, second, folder = two_adapters
    expected = {name: peft_greedy(model, path, PROMPTS, 8) for name, path in (("a", first), ("b", second), (None, None))}
    assert expected["a"] != expected["b"] != expected[None] != expected["a"]  # the check can tell them apart
    session = IA3Session(folder)
    assert session.folder.cache["kv_layout"] == "shared"
    options = GenerationOptions(max_new_tokens=8)
    assert generate_ids(session, PROMPTS, None, options) == expected[None]  # nothing set: the base model
    session.load_adapter(first, "a")
    session.load_adapter(second, "b")
    for name in ("a", "b", "a", None, "b"):
        session.set_adapter(name)
        assert generate_ids(session, PROMPTS, None, options) == expected[name], name
    assert generate_ids(session, PROMPTS, ["a", "a"], options) == expected["a"]  # per request, folded back


@pytest.fixture(scope="module")
def cli_folder(fused_llama, tmp_path_factory):
    model, adapter, _ = fused_llama
    out = tmp_path_factory.mktemp("fused-foldswap-cli") / "out"
    result = run_cli("export", model, "--out", out, "--mode", "foldswap", "--adapter", adapter, "--graph", "fused")
    assert result.exit_code == 0, result.output
    return str(out)


def test_cli_exports_and_parity_passes(fused_llama, cli_folder):
    model, adapter, _ = fused_llama
    assert manifest_of(cli_folder)["cache"]["kv_layout"] == "shared"
    assert not os.path.exists(os.path.join(cli_folder, "genai_config.json"))
    result = run_cli("parity", model, cli_folder, "--adapter", adapter, "--steps", "3")
    assert result.exit_code == 0, result.output
    assert "PASS: 20/20 output comparisons and 6/6 greedy-token checks passed" in result.output, result.output


def test_parity_fails_naming_logits_when_a_base_weight_in_fold_onnx_is_scaled(fused_llama, cli_folder, tmp_path):
    """Layer 1's fused q/k/v base value x 1.01 inside fold.onnx: every folded weight (base model and
    adapter alike) is off, and parity fails on logits (exit 1), not with a structural error."""
    import onnx
    from onnx import numpy_helper

    from ia3_export.parity.check import check_parity

    model, adapter, _ = fused_llama
    bad = str(tmp_path / "bad")
    shutil.copytree(cli_folder, bad)
    path = os.path.join(bad, "fold.onnx")
    fold_model = onnx.load(path)
    name = "model.layers.1.attn.qkv_proj.MatMul.weight.base"
    tensor = next(t for t in fold_model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(1.01), name))
    onnx.save(fold_model, path)
    result = run_cli("parity", model, bad, "--adapter", adapter, "--steps", "0")
    assert result.exit_code == 1, result.output
    report = check_parity(model, bad, [adapter], greedy_steps=0)
    failed = {(o.output, o.scenario) for o in report.outputs if not o.comparison.passed}
    assert {output for output, _ in failed} == {"logits"}
    assert any("decode step" in s for _, s in failed) and any(s.endswith("prefill") for _, s in failed), failed
    rows = {row for _, s in failed if s.startswith("adapters ") for row in s.split(" ", 1)[1].split(", ")[0].split(",")}
    assert rows == {"-", "ad"}, failed  # the base model and the adapter alike


Q_AND_V = ["q_proj", "v_proj", "down_proj"]  # PEFT's qwen2 default (with down_proj): ones over k, in the middle


@pytest.mark.parametrize("model_type, targets, overrides", [
    ("mistral", Q_AND_V, {}), ("qwen2", Q_AND_V, {}), ("qwen3", Q_AND_V, {}), ("gemma", Q_AND_V, {}),
    ("phi3", ["qkv_proj", "down_proj"], {"max_position_embeddings": 4096}),  # else the builder takes it for LongRoPE
])
def test_other_builder_decoders_export_validate_and_match_peft(tmp_path, model_type, targets, overrides):
    """q and v leave ones over k in the middle of the fused output; qwen2's q/k/v carry a bias, scaled like
    the weight's output; qwen3 normalises q and k per head after the projection (a folded weight scales
    before that norm, as PEFT does); gemma scales its embeddings and ties its head; phi3's q/k/v are one
    module in transformers too (one vector over the whole fused weight)."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny
    from ia3_export.export import export_model

    model = save_tiny(str(tmp_path / "m"), model_type, hidden_size=64, head_dim=16, **overrides)
    ia3 = IA3Model(load_base_model(model), IA3Config(target_modules=targets, feedforward_modules=["down_proj"]))
    randomize_adapter(ia3, "default", seed=5)
    adapter = ia3.save_adapter(str(tmp_path / "ad"))
    folder = str(tmp_path / "out")
    manifest = export_model(model, folder, mode="foldswap", adapters=[adapter], graph="fused")
    assert manifest["validation"]["comparisons"] == 8  # base and adapter: batch 1 and 2, prefill and a decode step
    qkv = {w["name"]: w for w in manifest["weights"] if "qkv_proj" in w["name"] and ".layers.0." in w["name"]}
    assert set(qkv) == {"model.layers.0.attn.qkv_proj.MatMul.weight"} | (
        {"model.layers.0.attn.qkv_proj.Add.bias"} if model_type == "qwen2" else set())
    vectors = [f"model.layers.0.self_attn.{t}.ia3_l" for t in targets[:-1]]
    for entry in qkv.values():
        assert entry.get("vectors", [entry["vector"]]) == vectors and entry["vector"] == vectors[0]
    result = compare("logits", peft_logits(model, adapter, IDS),
                     prefill_and_step(session(folder), IDS, fold(folder, adapter_vectors(adapter))), TOL.atol, TOL.rtol)
    assert result.passed, result.line()
