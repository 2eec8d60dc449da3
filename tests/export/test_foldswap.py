"""The foldswap mode (targeted weights as graph inputs, re-folded by fold.onnx on a switch) against
independent references: the merged export of the same adapter, PEFT's own IA3, transformers'
greedy generation; switching back and forth (never folded incrementally, zeros included);
threads sharing one session; GPT-2's Conv1D layout with biases (fp32, CPU)."""
from __future__ import annotations

import os
import threading

import pytest

from ia3_export.compare import compare
from ia3_export.errors import IA3Error
from runtime_helpers import PROMPTS, export_once, open_session, padded, peft_greedy, peft_logits, prefill_feeds

MERGED_ATOL = 1e-5  # issue 9: fp32 CPU, equal to the merged export of the same adapter
PEFT_ATOL = 1e-4


def zero_adapter(model_dir: str, out: str) -> str:
    """An adapter whose vectors are 0 at some entries: dividing by the old vector would fail there."""
    import torch

    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter

    model = IA3Model(load_base_model(model_dir), IA3Config())
    randomize_adapter(model, "default", seed=7)
    with torch.no_grad():
        for layer in model.ia3_layers().values():
            layer.ia3_l["default"][::3] = 0.0
    return model.save_adapter(out)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    base = model_dir("llama")
    a1, a2 = adapter_dir("llama", seed=1), adapter_dir("llama", seed=2)
    zero = zero_adapter(base, str(tmp_path_factory.mktemp("zero") / "zeros"))
    return {"base": base, "a1": a1, "a2": a2, "zeros": zero,
            "foldswap": export_once(tmp_path_factory, base, "foldswap", [a1, a2]),
            "merged": export_once(tmp_path_factory, base, "merged", []),
            "merged_a1": export_once(tmp_path_factory, base, "merged", [a1]),
            "merged_a2": export_once(tmp_path_factory, base, "merged", [a2])}


def assert_close(name, reference, actual, mask, atol):
    keep = mask.astype(bool)
    result = compare(name, reference[keep], actual[keep], atol=atol, rtol=atol)
    assert result.passed, result.line()


def test_equals_merged_and_peft_per_adapter_switching_back_and_forth(llama):
    s = open_session(llama["foldswap"], llama["a1"], llama["a2"], llama["zeros"])
    ids, mask = padded()
    feeds = prefill_feeds(s, ids, mask)
    merged = {name: open_session(llama[folder]).run(feeds)["logits"]
              for name, folder in ((None, "merged"), ("adapter1", "merged_a1"), ("adapter2", "merged_a2"))}
    peft = {None: peft_logits(llama["base"], None, ids, mask), "adapter1": peft_logits(llama["base"], llama["a1"], ids, mask),
            "zeros": peft_logits(llama["base"], llama["zeros"], ids, mask)}
    # zeros in between: a fold from the previous adapter (W * l_new / l_old) would be NaN/inf after it
    for name in (None, "adapter1", "adapter2", "zeros", "adapter1", None, "zeros", "adapter2"):
        s.set_adapter(name)
        got = s.run(feeds)["logits"]
        if name in merged:
            assert_close(f"foldswap {name} vs merged", merged[name], got, mask, MERGED_ATOL)
        if name in peft:
            assert_close(f"foldswap {name} vs PEFT", peft[name], got, mask, PEFT_ATOL)


def test_runs_as_the_base_model_when_opened_and_generates_like_transformers(llama):
    s = open_session(llama["foldswap"])
    ids, mask = padded()
    feeds = prefill_feeds(s, ids, mask)
    assert_close("opened", open_session(llama["merged"]).run(feeds)["logits"], s.run(feeds)["logits"], mask, MERGED_ATOL)
    from ia3_export.runtime import GenerationOptions, generate_ids

    s.load_shipped_adapters()
    got = generate_ids(s, PROMPTS, ["adapter1"] * len(PROMPTS), GenerationOptions(max_new_tokens=8))
    assert got == peft_greedy(llama["base"], llama["a1"], PROMPTS, 8)


def test_an_onnx_adapter_file_selects_the_same_weights_as_its_peft_folder(llama, tmp_path):
    from ia3_export.runtime.adapters import convert_adapter

    path = str(tmp_path / "a2.onnx_adapter")
    convert_adapter(llama["a2"], llama["foldswap"], path)
    s = open_session(llama["foldswap"], path)
    ids, mask = padded()
    feeds = prefill_feeds(s, ids, mask)
    s.set_adapter("a2")
    assert_close("onnx_adapter", open_session(llama["merged_a2"]).run(feeds)["logits"], s.run(feeds)["logits"], mask,
                 MERGED_ATOL)


def test_threads_with_different_adapters_never_read_a_working_copy_folded_for_another(llama):
    """Two threads hammer ONE session, each with its own adapter: every run must equal that adapter's
    merged export, although each run may need a re-fold of the shared working copy."""
    s = open_session(llama["foldswap"], llama["a1"], llama["a2"])
    ids, mask = padded()
    feeds = prefill_feeds(s, ids, mask)
    expected = {"adapter1": open_session(llama["merged_a1"]).run(feeds)["logits"],
                "adapter2": open_session(llama["merged_a2"]).run(feeds)["logits"]}
    errors = []

    def worker(name):
        for _ in range(25):
            got = s.run(feeds, adapters=[name] * len(ids))["logits"]
            result = compare(name, expected[name][mask.astype(bool)], got[mask.astype(bool)], MERGED_ATOL, MERGED_ATOL)
            if not result.passed:
                errors.append(result.line())

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("adapter1", "adapter2", "adapter1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_a_switch_waits_for_runs_reading_the_working_copy(llama):
    s = open_session(llama["foldswap"], llama["a1"], llama["a2"])
    s.set_adapter("adapter1")
    first = s.adapters["adapter1"]
    switch = threading.Thread(target=s.set_adapter, args=("adapter2",))
    with s._fold.holding(first):  # a run of adapter1 in progress
        switch.start()
        switch.join(0.5)
        assert switch.is_alive()  # still waiting: it cannot re-fold under a reader
        assert s._fold._folded is first
    switch.join()
    assert s._fold._folded is s.adapters["adapter2"]


def test_sessions_have_their_own_working_copy(llama):
    one, two = open_session(llama["foldswap"], llama["a1"]), open_session(llama["foldswap"], llama["a2"])
    ids, mask = padded()
    feeds = prefill_feeds(one, ids, mask)
    one.set_adapter("adapter1")
    two.set_adapter("adapter2")  # must not change what `one` reads
    assert_close("session one", open_session(llama["merged_a1"]).run(feeds)["logits"], one.run(feeds)["logits"], mask,
                 MERGED_ATOL)


def test_graphs_take_the_targeted_weights_as_inputs_and_nothing_else_changes(llama):
    import onnx

    from ia3_export.export.graph import op_histogram
    from ia3_export.formats.manifest import read_manifest

    manifest = read_manifest(llama["foldswap"])
    model = onnx.load(os.path.join(llama["foldswap"], "model.onnx"))
    inputs = {i.name for i in model.graph.input}
    initializers = {i.name for i in model.graph.initializer}
    weights = {w["name"] for w in manifest["weights"]}
    # tiny llama: 2 layers x k, v (output scaling) and down (input scaling), no biases
    assert weights == {f"model.layers.{i}.{m}.weight" for i in range(2)
                       for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert weights <= inputs and not weights & initializers  # pure inputs: no unused third copy
    assert op_histogram(os.path.join(llama["foldswap"], "fold.onnx")) == {"Mul": 6, "Unsqueeze": 4}
    merged_ops = op_histogram(os.path.join(llama["merged_a1"], "model.onnx"))
    ops = op_histogram(os.path.join(llama["foldswap"], "model.onnx"))
    assert ops.get("Mul") == merged_ops.get("Mul")  # no IA3 multiplications in the model graph


def test_gpt2_conv1d_with_bias_equals_merged(tmp_path_factory, model_dir, adapter_dir):
    """GPT-2: Conv1D weights are [in, out]; c_attn scales its output (columns, and the bias)."""
    base = model_dir("gpt2")
    a1 = adapter_dir("gpt2", seed=1)
    folder = export_once(tmp_path_factory, base, "foldswap", [a1])
    merged = export_once(tmp_path_factory, base, "merged", [a1])
    from ia3_export.formats.manifest import read_manifest

    assert any(w["name"].endswith("c_attn.bias") for w in read_manifest(folder)["weights"])
    s = open_session(folder)
    s.load_shipped_adapters()
    s.set_adapter("adapter1")
    ids, mask = padded()
    feeds = prefill_feeds(s, ids, mask)
    assert_close("gpt2", open_session(merged).run(feeds)["logits"], s.run(feeds)["logits"], mask, MERGED_ATOL)


def test_refuses_what_it_cannot_export_or_load(llama, tmp_path, adapter_dir):
    from ia3_export.export import export_model

    with pytest.raises(IA3Error, match="torchscript"):
        export_model(llama["base"], str(tmp_path / "x"), mode="foldswap", exporter="dynamo")
    assert not os.path.exists(tmp_path / "x")
    s = open_session(llama["foldswap"])
    other = adapter_dir("llama", seed=3, target_modules=r".*\.q_proj")
    with pytest.raises(IA3Error, match="not a vector input"):
        s.load_adapter(other)
