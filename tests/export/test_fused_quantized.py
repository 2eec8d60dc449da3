"""`--graph fused --quantize int4|int8`: the traced path's quantizer on onnxruntime-genai's builder graph,
whose q/k/v MatMul packs three PyTorch parameters side by side (recorded and split back by quantize.py).

References, independent of quantize.py's reader: ONNX Runtime's own MatMulNBits kernel run alone on an
identity matrix (the weight it computes with), split into q/k/v by the widths in config.json and mapped
to PyTorch modules by the builder's node names; transformers + PEFT (float64) holding those weights;
the float weights for the int4 rounding bound.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from ia3_export.compare import compare  # noqa: E402
from ia3_export.errors import IA3Error  # noqa: E402
from ia3_export.tolerances import quantized_tolerance  # noqa: E402

from cli_helpers import run_cli  # noqa: E402

LAYERS = 2
PER_LAYER = ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
IDS = np.random.default_rng(11).integers(4, 320, (2, 7))
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
INT4 = quantized_tolerance({"method": "int4"})


@pytest.fixture(scope="module")
def exports(fused_llama):
    """exports(mode, method="int4", model=None) -> the quantized fused export (once per module)."""
    from ia3_export.export import export_model

    model, adapter, root = fused_llama
    made = {}

    def make(mode: str, method: str = "int4", model_dir: str | None = None, adapter_dir: str | None = None) -> str:
        key = (mode, method, model_dir)
        if key not in made:
            made[key] = str(root / f"q-{mode}-{method}-{len(made)}")
            export_model(model_dir or model, made[key], mode=mode, adapters=[adapter_dir or adapter], graph="fused",
                         quantize=method)
        return made[key]

    return make


def graph(folder: str):
    import onnx

    return onnx.load(os.path.join(folder, "model.onnx"))


def manifest(folder: str) -> dict:
    return json.load(open(os.path.join(folder, "ia3_export.json")))


def widths(model_dir: str) -> list[int]:
    """q, k, v widths of the packed MatMul, from config.json."""
    config = json.load(open(os.path.join(model_dir, "config.json")))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    return [config["num_attention_heads"] * head_dim, kv, kv]


def kernel_weight(model, node) -> np.ndarray:
    """[K, N]: the node alone on ONNX Runtime, fed an identity matrix."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k = next(a.i for a in node.attribute if a.name == "K")
    inits = {i.name: i for i in model.graph.initializer}
    alone = helper.make_graph([node], "alone", [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, [1, k, k])],
                              [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                              [inits[i] for i in node.input[1:] if i in inits])
    sub = helper.make_model(alone, opset_imports=model.opset_import, ir_version=model.ir_version)
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {node.input[0]: np.eye(k, dtype=np.float32)[None]})[0][0].astype(np.float64)


def kernel_weights(folder: str, model_dir: str) -> dict[str, np.ndarray]:
    """PyTorch parameter -> [out, in] weight the kernels compute with, named from the builder's node names."""
    model, out = graph(folder), {}
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        weight = kernel_weight(model, node)
        if node.name.startswith("/lm_head/"):
            out["lm_head.weight"] = weight.T
            continue
        layer, block, proj = re.match(r"/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul", node.name).groups()
        stem = f"model.layers.{layer}.{'self_attn' if block == 'attn' else 'mlp'}"
        if proj != "qkv_proj":
            out[f"{stem}.{proj}.weight"] = weight.T
            continue
        for name, part in zip("qkv", np.split(weight, np.cumsum(widths(model_dir))[:-1], axis=1)):
            out[f"{stem}.{name}_proj.weight"] = part.T
    return out


def peft_dequantized(model_dir: str, adapter: str | None, weights: dict, merge: bool = False):
    """transformers (float64) with the kernels' weights, PEFT's adapter on top (merged when asked)."""
    import torch
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    model = PeftModel.from_pretrained(base, adapter).eval() if adapter else base
    model = model.merge_and_unload() if merge else model
    plain = model.base_model.model if adapter and not merge else model
    state = plain.state_dict()
    for param, value in weights.items():
        key = param if param in state else param.replace(".weight", ".base_layer.weight")
        state[key].copy_(torch.from_numpy(value))
    return model


def logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def prefill_and_step(folder: str, ids: np.ndarray, extra: dict, kv: tuple[int, int] = (2, 16)) -> np.ndarray:
    import onnxruntime as ort

    from ia3_export.export.fused import run_cached

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"])
    prefill = run_cached(session, ids[:, :-1], None, extra, kv)
    step = run_cached(session, ids[:, -1:], prefill, extra, kv)
    return np.concatenate([prefill["logits"], step["logits"]], axis=1)


def adapter_vectors(adapter: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    return {k[len("base_model.model."):]: v.reshape(-1).astype(np.float32) for k, v in tensors.items()}


@pytest.mark.parametrize("mode", ["merged", "swappable", "bank"])
def test_qkv_and_every_projection_become_matmulnbits_with_the_packed_source_recorded(fused_llama, exports, mode):
    model_dir, _, _ = fused_llama
    folder = exports(mode)
    model, recorded = graph(folder), manifest(folder)
    inits = {i.name for i in model.graph.initializer}
    nbits = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    expected = {f"/model/layers.{i}/{p}/MatMul_Q4" for i in range(LAYERS) for p in PER_LAYER} | {"/lm_head/MatMul_Q4"}
    assert set(nbits) == expected and len(nbits) == 11
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    weights = recorded["quantization"]["graphs"]["model"]["weights"]
    q, k, v = widths(model_dir)
    for i in range(LAYERS):
        packed = weights[nbits[f"/model/layers.{i}/attn/qkv_proj/MatMul_Q4"].input[1]]
        assert packed == [[f"model.layers.{i}.self_attn.{p}_proj.weight", w] for p, w in zip("qkv", (q, k, v))]
        assert weights[nbits[f"/model/layers.{i}/mlp/down_proj/MatMul_Q4"].input[1]] == f"model.layers.{i}.mlp.down_proj.weight"
    assert recorded["quantization"]["method"] == "int4" and recorded["cache"]["kv_layout"] == "shared"
    assert recorded["validation"]["tolerance"] == {"atol": INT4.atol, "rtol": INT4.rtol}
    if mode != "merged":  # the k/v vectors scale the quantized q/k/v output, the down_proj one its input
        producer = {o: n for n in model.graph.node for o in n.output}
        for i in range(LAYERS):
            gqa = next(n for n in model.graph.node if n.name == f"/model/layers.{i}/attn/GroupQueryAttention")
            scale = producer[gqa.input[0]]
            assert scale.op_type == "Mul" and producer[scale.input[0]].name == f"/model/layers.{i}/attn/qkv_proj/MatMul_Q4"
            down = nbits[f"/model/layers.{i}/mlp/down_proj/MatMul_Q4"]
            assert producer[down.input[0]].op_type == "Mul"


def test_the_packed_weight_reads_back_as_q_k_v_as_the_kernel_computes_it(fused_llama, exports):
    """quantize.py's reader splits the qkv weight into the parameters the kernel's columns hold, and each
    is the folded float weight (PEFT's merge) within int4's rounding step (block 32 along K, scale absmax/8)."""
    from ia3_export.export.quantize import dequantized_weights

    model_dir, adapter, _ = fused_llama
    folder = exports("merged")
    read = dequantized_weights(os.path.join(folder, "model.onnx"), manifest(folder)["quantization"]["graphs"]["model"]["weights"])
    kernel = kernel_weights(folder, model_dir)
    assert set(read) == set(kernel) and len(read) == LAYERS * 7 + 1
    folded = peft_dequantized(model_dir, adapter, {}, merge=True).state_dict()
    for param, value in kernel.items():
        np.testing.assert_allclose(read[param], value, rtol=0, atol=1e-6, err_msg=param)
        float_weight = folded[param].numpy()
        blocks = float_weight.reshape(float_weight.shape[0], -1, 32)
        step = np.repeat(np.abs(blocks).max(-1) / 8, 32, axis=1)
        assert (np.abs(value - float_weight) <= step * (1 + 1e-5)).all(), param
        assert not np.allclose(value, float_weight, atol=1e-7), param  # really quantized


def test_swappable_with_the_adapter_fed_matches_the_dequantized_peft_model(fused_llama, exports):
    """Logits (prefill + a cached step) with the adapter's vectors fed and with nothing fed, and IA3Session's
    greedy tokens, against transformers + PEFT holding the kernels' weights."""
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    model_dir, adapter, _ = fused_llama
    folder = exports("swappable")
    weights = kernel_weights(folder, model_dir)
    with_adapter = peft_dequantized(model_dir, adapter, weights)
    got = prefill_and_step(folder, IDS, adapter_vectors(adapter))
    result = compare("logits", logits(with_adapter, IDS), got, INT4.atol, INT4.rtol)
    assert result.passed, result.line()
    base = compare("logits", logits(peft_dequantized(model_dir, None, weights), IDS), prefill_and_step(folder, IDS, {}),
                   INT4.atol, INT4.rtol)
    assert base.passed, base.line()
    assert not np.allclose(got, prefill_and_step(folder, IDS, {}), atol=1e-3)  # the adapter matters

    session = IA3Session(folder)
    session.load_adapter(adapter)
    name = os.path.basename(adapter)
    tokens = generate_ids(session, PROMPTS, [name] * len(PROMPTS), GenerationOptions(max_new_tokens=8))
    import torch

    want = []
    for p in PROMPTS:
        with torch.no_grad():
            out = with_adapter.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                        max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        want.append(out[0, len(p):].tolist())
    assert tokens == want


@pytest.mark.parametrize("mode", ["merged", "swappable", "bank"])
def test_parity_passes_on_quantized_fused_folders(fused_llama, exports, mode):
    from ia3_export.parity.check import check_parity

    model_dir, adapter, _ = fused_llama
    report = check_parity(model_dir, exports(mode), [adapter], greedy_steps=3)
    assert report.passed, "\n".join(f.line() for f in report.failures()[:5])
    assert (report.atol, report.rtol) == (INT4.atol, INT4.rtol) and report.greedy and all(g.passed for g in report.greedy)
    checked = {o.scenario for o in report.outputs if o.output.startswith("quantization scales")}
    assert {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"} <= checked  # the split weights are checked too


def test_parity_fails_when_layer_1_qkv_scales_are_scaled(fused_llama, exports, tmp_path):
    """Layer 1's qkv MatMulNBits scales x 1.05: exit 1 naming q, k and v of layer 1 (the weight check against
    the float weights, split). The logits still agree: the reference de-quantizes the graph's own weights."""
    import onnx
    from onnx import numpy_helper

    from ia3_export.parity.check import check_parity

    model_dir, adapter, _ = fused_llama
    bad = tmp_path / "bad"
    shutil.copytree(exports("swappable"), bad)
    model = onnx.load(str(bad / "model.onnx"))
    node = next(n for n in model.graph.node if n.name == "/model/layers.1/attn/qkv_proj/MatMul_Q4")
    tensor = next(i for i in model.graph.initializer if i.name == node.input[2])
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(1.05), tensor.name))
    onnx.save(model, str(bad / "model.onnx"))
    result = run_cli("parity", model_dir, bad, "--adapter", adapter, "--steps", "0")
    assert result.exit_code == 1, result.output
    assert re.search(r"error: FAIL: .*model\.layers\.1\.self_attn\.[qkv]_proj\.weight", result.stderr), result.stderr
    report = check_parity(model_dir, str(bad), [adapter], greedy_steps=0)
    failed = {(o.output, o.scenario) for o in report.outputs if not o.comparison.passed}
    assert failed == {("quantization scales (vs the float weights)", f"model.layers.1.self_attn.{p}_proj.weight")
                      for p in "qkv"}


def test_qwen2_biases_stay_float_and_a_scaled_bias_fails_parity_naming_logits(exports, tmp_path):
    """qwen2's q/k/v biases: one float Add after the quantized qkv MatMul, equal to transformers' biases
    joined; parity passes, and the bias x 1.05 (a float part of the graph) fails on logits."""
    import onnx
    import torch
    import transformers
    from onnx import numpy_helper

    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny
    from ia3_export.parity.check import check_parity

    model_dir = save_tiny(str(tmp_path / "qwen2"), "qwen2", hidden_size=64)
    ia3 = IA3Model(load_base_model(model_dir), IA3Config())
    randomize_adapter(ia3, "default", seed=5)
    adapter = ia3.save_adapter(str(tmp_path / "qad"))
    folder = exports("swappable", "int4", model_dir, adapter)
    model = graph(folder)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for i in range(LAYERS):
        add = next(n for n in model.graph.node if n.name == f"/model/layers.{i}/attn/qkv_proj/Add")
        (bias,) = [inits[x] for x in add.input if x in inits]
        attn = hf.model.layers[i].self_attn
        assert bias.dtype == np.float32
        np.testing.assert_array_equal(bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach().numpy())
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 11
    assert check_parity(model_dir, folder, [adapter], greedy_steps=2).passed
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    model = onnx.load(str(bad / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if "layers.1" in t.name and "qkv_proj" in t.name and len(t.dims) == 1)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(1.05), tensor.name))
    onnx.save(model, str(bad / "model.onnx"))
    report = check_parity(model_dir, str(bad), [adapter], greedy_steps=0)
    assert not report.passed and {o.output for o in report.outputs if not o.comparison.passed} == {"logits"}


@pytest.mark.parametrize("model_type, targets, overrides", [
    ("mistral", None, {}), ("qwen3", ["q_proj", "v_proj", "down_proj"], {}), ("gemma", ["q_proj", "v_proj", "down_proj"], {}),
    ("phi3", ["qkv_proj", "down_proj"], {"max_position_embeddings": 4096}),  # else the builder takes it for LongRoPE
])
def test_the_other_builder_decoders_quantize_and_pass_parity(tmp_path, model_type, targets, overrides):
    """Every projection of the other --graph fused decoders is MatMulNBits and recorded: q/k/v packed (phi3:
    one qkv_proj module in transformers too), phi3's gate_up_proj, which the builder splits into gate and up
    MatMuls, as two slices of one parameter; parity (the reference joins them back) passes."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny
    from ia3_export.export import export_model
    from ia3_export.parity.check import check_parity

    model_dir = save_tiny(str(tmp_path / "m"), model_type, hidden_size=64, head_dim=16, **overrides)
    config = IA3Config(target_modules=targets, feedforward_modules=["down_proj"]) if targets else IA3Config()
    ia3 = IA3Model(load_base_model(model_dir), config)
    randomize_adapter(ia3, "default", seed=5)
    adapter = ia3.save_adapter(str(tmp_path / "ad"))
    folder = str(tmp_path / "out")
    export_model(model_dir, folder, mode="swappable", adapters=[adapter], graph="fused", quantize="int4")
    model = graph(folder)
    nbits = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert len(nbits) == 11 and not [n for n in model.graph.node if n.op_type == "MatMul"
                                      and n.input[1] in {i.name for i in model.graph.initializer}]
    weights = manifest(folder)["quantization"]["graphs"]["model"]["weights"]
    qkv, gate, up = (weights[nbits[f"/model/layers.1/{p}/MatMul_Q4"]] for p in ("attn/qkv_proj", "mlp/gate_proj", "mlp/up_proj"))
    intermediate = json.load(open(os.path.join(model_dir, "config.json")))["intermediate_size"]
    if model_type == "phi3":
        assert qkv == "model.layers.1.self_attn.qkv_proj.weight"
        assert [gate, up] == [[["model.layers.1.mlp.gate_up_proj.weight", intermediate, offset]]
                              for offset in (0, intermediate)]
    else:
        assert [p for p, _ in qkv] == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
        assert [gate, up] == [f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up")]
    report = check_parity(model_dir, folder, [adapter], greedy_steps=2)
    assert report.passed, "\n".join(f.line() for f in report.failures()[:5])


def test_int8_exports_the_same_way(fused_llama, exports):
    """--quantize int8 (dynamic: MatMulInteger) takes the same path: every projection, the packed qkv
    recorded, validated and parity-checked within int8's bound."""
    from ia3_export.parity.check import check_parity

    model_dir, adapter, _ = fused_llama
    folder = exports("merged", "int8")
    model, weights = graph(folder), manifest(folder)["quantization"]["graphs"]["model"]["weights"]
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 11
    assert [["model.layers.0.self_attn.q_proj.weight", 64], ["model.layers.0.self_attn.k_proj.weight", 32],
            ["model.layers.0.self_attn.v_proj.weight", 32]] in weights.values()
    report = check_parity(model_dir, folder, [adapter], greedy_steps=2)
    assert report.passed, "\n".join(f.line() for f in report.failures()[:5])


def test_a_matmul_weight_of_no_linear_layer_is_refused_not_left_float(fused_llama, tmp_path):
    """A graph whose MatMul weight is no linear layer of the model (alone or packed) is refused in one
    line, where it used to be skipped silently beside the LM head it did quantize."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ia3_export.core.loading import load_base_model
    from ia3_export.export.quantize import quantize_graph

    model_dir, _, _ = fused_llama
    hf = load_base_model(model_dir)
    head = hf.lm_head.weight.detach().numpy().T.copy()
    stranger = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "stranger"], ["h"], name="stranger"),
             helper.make_node("MatMul", ["h", "head"], ["y"], name="head")]
    made = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(stranger, "stranger"), numpy_helper.from_array(head, "head")])
    path = str(tmp_path / "g.onnx")
    onnx.save(helper.make_model(made, opset_imports=[helper.make_opsetid("", 18)]), path)
    from ia3_export.export.quantize import QuantizeOptions

    with pytest.raises(IA3Error, match=r"g.onnx: the weight of stranger \(64x64\) is none of the model's linear layers"):
        quantize_graph(path, hf, QuantizeOptions("int4"))


@pytest.mark.parametrize("source, ok", [
    ("model.layers.0.self_attn.q_proj.weight", True),  # what folders before packed sources hold
    ([["model.layers.0.self_attn.q_proj.weight", 64], ["model.layers.0.self_attn.k_proj.weight", 32]], True),
    ([["model.layers.0.mlp.gate_up_proj.weight", 64, 64]], True),  # a slice of one parameter
    ([["model.layers.0.self_attn.q_proj.weight", 0]], False),
    ([["model.layers.0.mlp.gate_up_proj.weight", 64, -64]], False),
    ([["model.layers.0.self_attn.q_proj.weight"]], False),
    ([], False),
    (7, False),
])
def test_the_manifest_reads_plain_and_packed_sources_and_refuses_forged_ones(exports, source, ok):
    from ia3_export.formats.manifest import check_manifest

    folder = exports("merged")
    forged = manifest(folder)
    weights = forged["quantization"]["graphs"]["model"]["weights"]
    weights[next(iter(weights))] = source
    if ok:
        check_manifest(forged, folder, "ia3_export.json")
    else:
        with pytest.raises(IA3Error, match=r"quantization.graphs.model.weights"):
            check_manifest(forged, folder, "ia3_export.json")
