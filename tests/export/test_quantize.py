"""Quantized exports (--quantize int4|int8): one quantized base serving every adapter, the
de-quantized reference, and parity that still catches a corrupted quantized weight.

References: ONNX Runtime's own kernels (a quantized node run alone on an identity matrix gives
the weight it computes with), transformers + PEFT holding those de-quantized weights, and the
float model for agreement."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from runtime_helpers import PROMPTS, peft_greedy, peft_model

pytest.importorskip("onnxruntime.quantization")

_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, model_dir, adapter_dir):
    """quantized(model_type, task, mode, method, **options) -> (model folder, adapters, export folder), once each."""
    from ia3_export.export import QuantizeOptions, export_model

    def make(model_type, task, mode, method, **options):
        key = (model_type, task, mode, method, tuple(sorted(options.items())))
        if key not in _EXPORTS:
            model = model_dir(model_type, task)
            adapters = [adapter_dir(model_type, task, seed=s) for s in (1, 2)]
            out = str(tmp_path_factory.mktemp(f"q-{method}-{mode}") / "onnx")
            export_model(model, out, mode=mode, adapters=adapters, task=None,
                         quantize=QuantizeOptions(method, **options))
            _EXPORTS[key] = (model, adapters, out)
        return _EXPORTS[key]

    return make


def _graph(folder):
    import onnx

    return onnx.load(os.path.join(folder, "model.onnx"))


def _manifest(folder):
    with open(os.path.join(folder, "ia3_export.json")) as f:
        return json.load(f)


def test_int4_swappable_keeps_the_vector_nodes_around_the_quantized_matmuls(quantized):
    """Every IA3 vector still multiplies the activations next to a MatMulNBits: a k/v vector its
    output, a feed-forward vector its input; no float MatMul with a weight is left."""
    _, _, out = quantized("llama", None, "swappable", "int4")
    model = _graph(out)
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    manifest = _manifest(out)
    assert manifest["quantization"]["method"] == "int4" and manifest["quantization"]["block_size"] == 32
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(manifest["quantization"]["graphs"]["model"]["weights"]) == 2 * 7 + 1  # 7 per layer + head
    assert {v["name"] for v in manifest["vectors"]} <= {i.name for i in model.graph.input} & inits  # still overridable
    for v in manifest["vectors"]:
        (mul,) = consumers[v["name"]]
        assert mul.op_type == "Mul"
        other = next(i for i in mul.input if i != v["name"])
        if v["feedforward"]:
            assert [c.op_type for c in consumers[mul.output[0]]] == ["MatMulNBits"]
        else:
            assert producer[other].op_type == "MatMulNBits"


def _run_alone(model, start: str, end: str, a: np.ndarray):
    """ONNX Runtime on just the nodes that compute tensor `end` from tensor `start` (and initializers)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    nodes, todo = [], [end]
    while todo:
        name = todo.pop()
        if name == start or name in inits or producer[name] in nodes:
            continue
        nodes.append(producer[name])
        todo += list(producer[name].input)
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    nodes.sort(key=lambda n: order[id(n)])
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "alone", [helper.make_tensor_value_info(start, TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(end, TensorProto.FLOAT, None)],
                              [inits[i] for i in used if i in inits])
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {start: a})[0]


@pytest.mark.parametrize("options", [{}, {"symmetric": False, "block_size": 16}])
def test_int4_dequantized_weights_are_what_the_kernel_computes_with(quantized, options):
    """numpy's decoding of B/scales/zero points == MatMulNBits run by ONNX Runtime on an identity matrix."""
    from ia3_export.export.quantize import dequantized_weights

    _, _, out = quantized("llama", None, "merged", "int4", **options)
    model = _graph(out)
    weights = _manifest(out)["quantization"]["graphs"]["model"]["weights"]
    decoded = dequantized_weights(os.path.join(out, "model.onnx"), weights)
    for node in [n for n in model.graph.node if n.op_type == "MatMulNBits"][:4]:
        k = next(a.i for a in node.attribute if a.name == "K")
        kernel = _run_alone(model, node.input[0], node.output[0], np.eye(k, dtype=np.float32)[None])[0]  # [K, N]
        np.testing.assert_allclose(decoded[weights[node.input[1]]].T, kernel, rtol=0, atol=1e-6)
    assert (_manifest(out)["quantization"]["symmetric"]) is not ("symmetric" in options)


def test_int8_dequantized_weights_are_what_the_kernel_computes_with(quantized):
    """An identity input quantizes exactly (scale 1/255), so the int8 chain returns its weight."""
    from ia3_export.export.quantize import dequantized_weights

    _, _, out = quantized("bert", "seq-cls", "merged", "int8")
    model = _graph(out)
    weights = _manifest(out)["quantization"]["graphs"]["model"]["weights"]
    decoded = dequantized_weights(os.path.join(out, "model.onnx"), weights)
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    checked = 0
    for node in [n for n in model.graph.node if n.op_type == "MatMulInteger"][:4]:
        start = next(n for n in model.graph.node if node.input[0] in n.output).input[0]  # DynamicQuantizeLinear's input
        end = node.output[0]
        while [c.op_type for c in consumers.get(end, [])] in (["Cast"], ["Mul"]):  # the rescale back to float
            end = consumers[end][0].output[0]
        k = decoded[weights[node.input[1]]].shape[1]
        kernel = _run_alone(model, start, end, np.eye(k, dtype=np.float32)[None])[0]
        np.testing.assert_allclose(decoded[weights[node.input[1]]].T, kernel, rtol=1e-6, atol=1e-7)
        checked += 1
    assert checked == 4


def test_int4_swappable_generates_the_dequantized_models_tokens_per_adapter(quantized):
    """One quantized base, adapters switched at run time: each adapter's greedy tokens equal
    transformers + PEFT holding the de-quantized weights, and the shipped .onnx_adapter files bind."""
    import onnxruntime as ort

    from ia3_export.export.quantize import load_dequantized
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    model_path, adapters, out = quantized("llama", None, "swappable", "int4")
    weights = _manifest(out)["quantization"]["graphs"]["model"]["weights"]
    session = IA3Session(out)
    session.load_shipped_adapters()
    got = {}
    for adapter in adapters:
        name = os.path.basename(adapter)
        got[name] = generate_ids(session, PROMPTS, [name] * len(PROMPTS), GenerationOptions(max_new_tokens=6))
        reference = peft_model(model_path, adapter)
        load_dequantized(reference.base_model.model, os.path.join(out, "model.onnx"), weights)
        assert got[name] == _greedy(reference, PROMPTS, 6), name
    assert got["adapter1"] != got["adapter2"]
    # ORT's own adapter API on a plain session: the shipped file binds to the quantized graph's inputs
    plain = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(os.path.join(out, "adapters", "adapter2.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    feeds = _prefill(session, [PROMPTS[0]])
    via_api = plain.run(["logits"], feeds, options)[0]
    via_session = session.run(feeds, adapters=["adapter2"], outputs=["logits"])["logits"]
    np.testing.assert_allclose(via_api, np.asarray(via_session), rtol=0, atol=1e-6)
    assert not np.allclose(via_api, plain.run(["logits"], feeds)[0], atol=1e-6)


def _greedy(model, prompts, steps):
    import torch

    outs = []
    for p in prompts:
        with torch.no_grad():
            o = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        outs.append(o[0, len(p):].tolist())
    return outs


def _prefill(session, prompts):
    from runtime_helpers import padded, prefill_feeds

    ids, mask = padded(prompts)
    return prefill_feeds(session, ids, mask)


def test_int8_classifier_logits_close_to_the_dequantized_reference(quantized):
    """A MiniLM-shaped BERT classifier, int8 merged: ONNX Runtime's logits vs transformers + PEFT
    (merged) holding the de-quantized weights; the float model's labels."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ia3_export.export.quantize import load_dequantized
    from ia3_export.runtime import IA3Session

    model_path, adapters, out = quantized("bert", "seq-cls", "merged", "int8")
    weights = _manifest(out)["quantization"]["graphs"]["model"]["weights"]
    float_model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    for a in adapters:  # merged export folds both adapters: their product
        float_model = PeftModel.from_pretrained(float_model, a).merge_and_unload()
    dequantized = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    dequantized.load_state_dict(float_model.state_dict())
    load_dequantized(dequantized, os.path.join(out, "model.onnx"), weights)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 100, (4, 9))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    got = np.asarray(IA3Session(out).run(feeds, outputs=["logits"])["logits"])
    with torch.no_grad():
        want = dequantized(**{k: torch.tensor(v) for k, v in feeds.items()}).logits.numpy()
        floats = float_model(**{k: torch.tensor(v) for k, v in feeds.items()}).logits.numpy()
    # int8 quantizes the activations too (per tensor, at run time): within 2% of the logits' scale, same labels
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max(), (got, want)
    assert (got.argmax(-1) == floats.argmax(-1)).all()


def test_parity_passes_on_quantized_exports_and_reports_float_agreement(quantized, tmp_path):
    from ia3_export.parity import check_parity

    model_path, adapters, out = quantized("llama", None, "bank", "int4")
    report = check_parity(model_path, out, adapters, greedy_steps=4)
    assert report.passed, report.failures()[0].line()
    assert report.quantization["method"] == "int4" and report.atol == 1e-4
    assert report.float_agreement["kind"] == "greedy tokens" and 0 <= report.float_agreement["agreement"] <= 1
    model_path, adapters, out = quantized("bert", "seq-cls", "merged", "int8")
    report = check_parity(model_path, out, adapters)
    assert report.passed, report.failures()[0].line()
    assert report.float_agreement["kind"] == "top-1 label" and report.float_agreement["rows"] > 0


@pytest.mark.parametrize("corrupt", ["scale", "nibble"])
def test_parity_cli_fails_on_one_corrupted_quantized_block(quantized, tmp_path, corrupt):
    """One block scale doubled, or one 4-bit weight moved by 8 steps, in v_proj of layer 0: the
    reference de-quantizes the graph's own weights, so the weight check against the float model is
    what must catch it: exit 1, naming that weight. The intact folder passes (exit 0)."""
    import onnx
    from onnx import numpy_helper

    model_path, adapters, out = quantized("llama", None, "swappable", "int4")
    ok = run_cli("parity", model_path, out, "--adapter", adapters[0], "--steps", "2")
    assert ok.exit_code == 0, ok.output
    assert "de-quantized weights" in ok.stdout and "agreement with the float model" in ok.stdout
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    model = onnx.load(str(bad / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "layers.0/self_attn/v_proj" in n.name)
    tensor = next(i for i in model.graph.initializer if i.name == node.input[2 if corrupt == "scale" else 1])
    value = numpy_helper.to_array(tensor).copy()
    value.flat[0] = value.flat[0] * 2 if corrupt == "scale" else value.flat[0] ^ 0x08
    tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    onnx.save(model, str(bad / "model.onnx"))
    failed = run_cli("parity", model_path, str(bad), "--adapter", adapters[0], "--steps", "2")
    assert failed.exit_code == 1, failed.output
    assert "model.layers.0.self_attn.v_proj.weight" in failed.stderr, failed.stderr


def test_convert_writes_adapters_a_quantized_folder_runs(quantized, tmp_path):
    """`convert` reads the quantized folder's vector inputs like a float one's: same tensors as shipped."""
    from ia3_export.runtime import IA3Session

    _, adapters, out = quantized("llama", None, "swappable", "int4")
    file = tmp_path / "a1.onnx_adapter"
    result = run_cli("convert", adapters[0], "--model", out, "--out", str(file))
    assert result.exit_code == 0, result.output
    session = IA3Session(out)
    converted = session.load_adapter(str(file), name="converted")
    shipped = session.load_adapter(os.path.join(out, "adapters", "adapter1.onnx_adapter"), name="shipped")
    feeds = _prefill(session, PROMPTS)
    a = np.asarray(session.run(feeds, adapters=[converted] * 2, outputs=["logits"])["logits"])
    b = np.asarray(session.run(feeds, adapters=[shipped] * 2, outputs=["logits"])["logits"])
    np.testing.assert_array_equal(a, b)


def test_cli_export_int4_then_refusals(model_dir, tmp_path):
    model = model_dir("llama")
    out = tmp_path / "q"
    done = run_cli("export", model, "--out", str(out), "--mode", "swappable", "--quantize", "int4", "--block-size", "16",
                   "--keep-lm-head")
    assert done.exit_code == 0, done.output
    entry = _manifest(str(out))["quantization"]
    assert entry["block_size"] == 16 and entry["lm_head"] is False
    assert "lm_head.weight" not in entry["graphs"]["model"]["weights"].values()
    assert_one_line_error(run_cli("export", model, "--out", str(tmp_path / "f"), "--mode", "foldswap", "--quantize", "int4"),
                          2, "--quantize does not combine with --mode foldswap")
    assert_one_line_error(run_cli("export", model, "--out", str(tmp_path / "h"), "--dtype", "fp16", "--quantize", "int4"),
                          2, "--quantize needs --dtype fp32")
    assert_one_line_error(run_cli("export", model, "--out", str(tmp_path / "b"), "--quantize", "int4", "--block-size", "24"),
                          2, "block size 24 is not supported")
    assert not (tmp_path / "f").exists() and not (tmp_path / "b").exists()


def test_parity_on_a_quantized_merged_classifier_with_its_own_head(model_dir, tmp_path):
    """A merged export folds the adapter's trained head (modules_to_save) too: the de-quantized
    reference must hold it, or every logit differs. The same folder with the head corrupted fails."""
    import onnx
    import torch
    from onnx import numpy_helper

    from ia3_export.core.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.parity import check_parity
    from ia3_export.examples.tiny import randomize_adapter

    base = model_dir("bert", "seq-cls")
    ia3 = IA3Model(load_base_model(base, auto_class="AutoModelForSequenceClassification"),
                   IA3Config(task_type="SEQ_CLS", modules_to_save=["classifier"]))
    randomize_adapter(ia3, "default", seed=3)
    with torch.no_grad():
        for p in ia3.model.classifier.copies["default"].parameters():
            p.add_(torch.randn_like(p))
    adapter = ia3.save_adapter(str(tmp_path / "head"))
    out = str(tmp_path / "onnx")
    export_model(base, out, mode="merged", adapters=[adapter], quantize="int4")
    report = check_parity(base, out, [adapter])
    assert report.passed, report.failures()[0].line()
    model = onnx.load(os.path.join(out, "model.onnx"))
    bias = next(i for i in model.graph.initializer if i.name == "classifier.bias" or i.name.endswith("classifier.bias"))
    value = numpy_helper.to_array(bias).copy()
    value[0] += 0.5
    bias.CopyFrom(numpy_helper.from_array(value, bias.name))
    onnx.save(model, os.path.join(out, "model.onnx"))
    assert not check_parity(base, out, [adapter]).passed


def test_int4_embeddings_decode_as_the_kernel_gathers(quantized):
    """--quantize-embeddings: the table numpy decodes == GatherBlockQuantized run by ONNX Runtime on every
    id, and the export (validated against those weights) passes parity."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ia3_export.export.quantize import dequantized_weights
    from ia3_export.parity import check_parity

    model_path, adapters, out = quantized("llama", None, "merged", "int4", embeddings=True)
    model = _graph(out)
    weights = _manifest(out)["quantization"]["graphs"]["model"]["weights"]
    node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    table = dequantized_weights(os.path.join(out, "model.onnx"), weights)[weights[node.input[0]]]
    alone = helper.make_node(node.op_type, node.input, ["rows"], domain=node.domain, name="alone")
    alone.attribute.extend(node.attribute)
    graph = helper.make_graph([alone], "g", [helper.make_tensor_value_info(node.input[1], TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
                              [i for i in model.graph.initializer if i.name in node.input])
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    rows = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {node.input[1]: np.arange(len(table))})[0]
    np.testing.assert_allclose(table, rows, rtol=0, atol=1e-6)
    assert check_parity(model_path, out, adapters, greedy_steps=2).passed


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_seq2seq_int4_swappable_passes_parity(model_dir, tmp_path, model_type):
    """Encoder and decoder graphs quantized apart. T5 keeps per-stack copies of its shared embedding
    (they must not be taken for the LM head's weight); BART's tied LM head has an all-zero padding
    row (scale 0), which must check as exact rather than 0/0."""
    from ia3_export.export import export_model
    from ia3_export.parity import check_parity

    model = model_dir(model_type)
    out = str(tmp_path / "onnx")
    manifest = export_model(model, out, mode="swappable", quantize="int4")
    assert set(manifest["quantization"]["graphs"]) == {"encoder", "decoder"}
    report = check_parity(model, out, [], greedy_steps=2)
    assert report.passed, report.failures()[0].line()


def test_cli_generate_on_a_quantized_folder_with_a_peft_adapter(quantized):
    """`ia3-export generate` on the int4 swappable folder with a PEFT adapter folder: the text of the
    tokens transformers + PEFT pick with the de-quantized weights (checked token by token above)."""
    from ia3_export.export.quantize import load_dequantized
    from ia3_export.runtime.tokenizer import TextTokenizer

    model_path, adapters, out = quantized("llama", None, "swappable", "int4")
    tok = TextTokenizer(out)
    reference = peft_model(model_path, adapters[1])
    load_dequantized(reference.base_model.model, os.path.join(out, "model.onnx"),
                     _manifest(out)["quantization"]["graphs"]["model"]["weights"])
    (tokens,) = _greedy(reference, [tok.encode("hello")], 5)
    tokens = tokens[:tokens.index(2) + 1] if 2 in tokens else tokens  # the runtime stops at EOS
    result = run_cli("generate", out, "--prompt", "hello", "--adapter", adapters[1], "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert tok.decode(tokens) and result.stdout.rstrip("\n") == tok.decode(tokens)


def _vector_nodes(model, names) -> list[bytes]:
    """Every node from the vector inputs up to and including the Mul that applies each vector, serialized."""
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found, todo = [], list(names)
    while todo:
        for node in consumers.get(todo.pop(), []):
            found.append(node.SerializeToString())
            if node.op_type != "Mul":
                todo += list(node.output)
    return sorted(found)


@pytest.mark.parametrize("model_type,task,mode,method", [("llama", None, "bank", "int4"),
                                                          ("bert", "seq-cls", "swappable", "int8")])
def test_vector_nodes_survive_quantization_untouched(quantized, tmp_path, model_type, task, mode, method):
    """The nodes that take the IA3 vectors (bank Gathers, Muls) are byte-identical in the float export
    and the quantized one, and the vector Muls sit on quantized MatMuls' inputs or outputs."""
    from ia3_export.export import export_model

    model_path, adapters, out = quantized(model_type, task, mode, method)
    float_out = str(tmp_path / "float")
    export_model(model_path, float_out, mode=mode, adapters=adapters)
    names = [v["name"] for v in _manifest(out)["vectors"]] + (["adapter_ids"] if mode == "bank" else [])
    quantized_graph, float_graph = _graph(out), _graph(float_out)
    assert _vector_nodes(quantized_graph, names) == _vector_nodes(float_graph, names)
    ops = {"int4": {"MatMulNBits"}, "int8": {"MatMulInteger", "DynamicQuantizeLinear", "Cast", "Mul"}}[method]
    producer = {o: n.op_type for n in quantized_graph.graph.node for o in n.output}
    consumers = {}
    for n in quantized_graph.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    muls = [n for n in quantized_graph.graph.node if n.op_type == "Mul" and n.SerializeToString() in
            set(_vector_nodes(quantized_graph, names))]
    assert muls and all(any(producer.get(i) in ops or producer.get(i) == "Add" for i in m.input)
                        or set(consumers.get(m.output[0], [])) & ops for m in muls)


def test_inspect_shows_the_quantization_and_what_genai_can_serve(quantized):
    """`inspect` on an exported folder says how it was quantized and whether onnxruntime-genai loads it
    (a bank export's per-row adapter_ids: genai cannot feed them), from the manifest."""
    _, _, swappable = quantized("llama", None, "swappable", "int4")
    _, _, bank = quantized("llama", None, "bank", "int4")
    table = run_cli("inspect", swappable)
    assert table.exit_code == 0, table.output
    assert "quantized: int4 (" in table.stdout and "block_size 32" in table.stdout
    assert "onnxruntime-genai: og.Model(folder) loads it (genai_config.json" in table.stdout
    summary = json.loads(run_cli("inspect", bank, "--json").stdout)
    assert summary["quantization"]["method"] == "int4" and summary["genai"]["supported"] is False
    assert "not served (" in run_cli("inspect", bank).stdout
