"""The decode fast path (issue 18): a request is validated and its adapter bound once, on an IOBinding
of its own, and the runtime also drives onnxruntime-genai's model-builder layout (GroupQueryAttention,
one KV buffer shared by past and present, no position_ids), checked against transformers."""
from __future__ import annotations


import numpy as np
import pytest

from runtime_helpers import PROMPTS, llama_exports, open_session, peft_greedy

NEW = 10


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    return llama_exports(tmp_path_factory, model_dir, adapter_dir)


@pytest.mark.parametrize("mode", ["swappable", "bank", "foldswap"])
def test_a_request_binds_its_adapter_once_not_per_step(llama, mode):
    """The adapter is resolved, checked and bound when generation starts; the steps only run."""
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    s = open_session(llama[mode], llama["a1"], llama["a2"])
    calls = []
    before_run = s.binding.before_run
    s.binding.before_run = lambda *a: calls.append(1) or before_run(*a)
    got = generate_ids(s, PROMPTS, ["adapter2"] * len(PROMPTS), GenerationOptions(max_new_tokens=NEW))
    assert len(calls) == 1
    assert got == peft_greedy(llama["base"], llama["a2"], PROMPTS, NEW)


def test_requests_interleaved_on_one_thread_keep_their_own_adapter(llama):
    """Two streams advanced in turn on one thread (each binds once, on its own IOBinding) give what
    transformers gives for each adapter alone."""
    from ia3_export.runtime.generation import GenerationOptions, iter_tokens

    s = open_session(llama["swappable"], llama["a1"], llama["a2"])
    options = GenerationOptions(max_new_tokens=NEW)
    streams = {name: iter_tokens(s, PROMPTS, [name] * len(PROMPTS), options) for name in ("adapter1", "adapter2")}
    got = {name: [[] for _ in PROMPTS] for name in streams}
    while streams:
        for name, stream in list(streams.items()):
            step = next(stream, None)
            if step is None:
                del streams[name]
            for row, token in (step or {}).items():
                got[name][row].append(token)
    assert got["adapter1"] == peft_greedy(llama["base"], llama["a1"], PROMPTS, NEW)
    assert got["adapter2"] == peft_greedy(llama["base"], llama["a2"], PROMPTS, NEW)


@pytest.fixture(scope="module")
def builder_export(tmp_path_factory):
    """A tiny llama (head size 16: the CPU GroupQueryAttention kernel needs a multiple of 16) with a random
    IA3 adapter, exported merged with `--graph fused` (onnxruntime-genai's model builder makes the graph)."""
    pytest.importorskip("onnxruntime_genai")
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.merge import merge_to_folder
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny
    from ia3_export.export import export_model

    root = tmp_path_factory.mktemp("builder")
    base = save_tiny(str(root / "base"), "llama", hidden_size=64, head_dim=16)
    model = IA3Model(load_base_model(base), IA3Config())
    randomize_adapter(model, "default", seed=3)
    adapter = model.save_adapter(str(root / "adapter"))
    export_model(base, str(root / "fused"), mode="merged", adapters=[adapter], graph="fused")
    merge_to_folder(base, [adapter], str(root / "hf_merged"))
    return {"base": base, "adapter": adapter, "hf_merged": str(root / "hf_merged"), "folder": str(root / "fused")}


def test_builder_layout_is_detected_from_the_graph(builder_export):
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import kv_layout

    s = IA3Session(builder_export["folder"])
    assert "position_ids" not in s.graphs["model"].inputs
    assert kv_layout(s.folder, s.graphs["model"]) == "shared"


def test_builder_graph_generates_what_transformers_generates(builder_export):
    """Greedy tokens on the builder's graph (prompts of different lengths in one batch) equal PEFT's
    greedy tokens on the base model with the adapter, prompt by prompt."""
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    s = IA3Session(builder_export["folder"])
    prompts = [*PROMPTS, [40, 41]]
    got = generate_ids(s, prompts, None, GenerationOptions(max_new_tokens=16))
    assert got == peft_greedy(builder_export["base"], builder_export["adapter"], prompts, 16)


def test_prefill_runs_the_lm_head_on_the_columns_that_hold_a_last_prompt_token(builder_export, monkeypatch):
    """`logits_to_keep` in the prefill: 1 when the rows end together; with right-padded rows of lengths 6,
    2, 3 the last 6 - 2 + 1 = 5 columns (row 1's last token is column 1 of 6). The tokens stay PEFT's."""
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    kept = []
    step_run = IA3Session.step_run
    monkeypatch.setattr(IA3Session, "step_run", lambda self, graph, adapters, feeds: (
        kept.append(feeds["logits_to_keep"].tolist()), step_run(self, graph, adapters, feeds))[1])
    s = IA3Session(builder_export["folder"])
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41], [7, 8, 9]]
    got = generate_ids(s, prompts, None, GenerationOptions(max_new_tokens=8))
    assert kept == [[5]]
    assert got == peft_greedy(builder_export["base"], builder_export["adapter"], prompts, 8)
    assert generate_ids(s, prompts[:1], None, GenerationOptions(max_new_tokens=8)) == got[:1] and kept[-1] == [1]


def test_builder_graph_logits_match_transformers_at_every_step(builder_export):
    """The logits each step yields, fed transformers' own tokens, match the merged model's logits in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import decoder_logits

    prompt, follow = [5, 6, 7, 8, 9, 10], [30, 31, 32, 33, 34, 35, 36]
    loop = decoder_logits(IA3Session(builder_export["folder"]), [prompt], None, len(follow) + 1)
    got = [next(loop).copy()] + [loop.send([t]).copy() for t in follow]  # a step's logits live until the next send
    model = AutoModelForCausalLM.from_pretrained(builder_export["hf_merged"]).eval()
    with torch.no_grad():
        want = model(torch.tensor([prompt + follow])).logits[0, len(prompt) - 1:].numpy()
    np.testing.assert_allclose(np.concatenate(got), want, atol=2e-5, rtol=1e-4)


def test_a_manifest_kv_layout_outside_the_known_ones_is_refused(llama, tmp_path):
    """cache.kv_layout decides the layout where given: a value the runtime does not know is named, not guessed."""
    import json
    import shutil

    from ia3_export.errors import IA3Error
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    folder = shutil.copytree(llama["swappable"], tmp_path / "export")
    manifest = json.loads((folder / "ia3_export.json").read_text())
    manifest["cache"]["kv_layout"] = "sideways"
    (folder / "ia3_export.json").write_text(json.dumps(manifest))
    with pytest.raises(IA3Error, match="cache.kv_layout is 'sideways', not one of concat, shared"):
        generate_ids(IA3Session(str(folder)), PROMPTS, None, GenerationOptions(max_new_tokens=2))
