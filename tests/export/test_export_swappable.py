"""Swappable and bank exports (issue 5, graph side): vectors as overridable graph inputs named
after PEFT's keys, per-adapter .onnx_adapter files, and a per-row adapter bank."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch

from ia3_export.compare import compare
from ia3_export.core.config import IA3Config
from ia3_export.errors import IA3Error
from ia3_export.export import export_model
from ia3_export.formats.onnx_adapter import read_onnx_adapter
from ia3_export.examples.tiny import DECODERS
from test_export import ATOL, greedy_pair, ort_and_peft_outputs
from test_export_support import decoder_feeds, exported, manifest, one_thread, peft_model, presents, prompts, session  # noqa: F401

SWAP_TYPES = ["llama", "qwen2", "gpt2", "bert", "t5"]  # k/v bias, Conv1D + fused qkv, encoder, seq2seq


def adapter_vectors(folder: str, name: str) -> dict[str, np.ndarray]:
    return read_onnx_adapter(os.path.join(folder, "adapters", f"{name}.onnx_adapter"))


@pytest.mark.parametrize("model_type", SWAP_TYPES)
def test_swappable_adapters_equal_peft_and_merged_exports(model_type, exported, model_dir, adapter_dir):
    folder = exported(model_type, "swappable", seeds=(1, 2))
    m = manifest(folder)
    names = {v["name"] for v in m["vectors"]}
    for key, g in m["graphs"].items():  # every vector: a graph input AND a same-name initializer of ones
        graph = onnx.load(os.path.join(folder, g["file"])).graph
        mine = {v["name"]: v["dim"] for v in m["vectors"] if v["graph"] == key}
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name in mine}
        assert set(mine) <= {i.name for i in graph.input} and set(inits) == set(mine)
        assert all(np.array_equal(inits[n], np.ones(mine[n], np.float32)) for n in mine)
    for seed in (1, 2):
        vectors = adapter_vectors(folder, f"adapter{seed}")
        assert set(vectors) == names and all(v.dtype == np.float32 and v.ndim == 1 for v in vectors.values())
        swapped = ort_and_peft_outputs(folder, model_dir(model_type), adapter_dir(model_type, seed=seed), extra=vectors)
        merged = ort_and_peft_outputs(exported(model_type, seeds=(seed,)), model_dir(model_type), adapter_dir(model_type, seed=seed))
        for (name, ref, got), (_, _, got_merged) in zip(swapped, merged):
            for result in (compare(name, ref, got, ATOL, 0), compare(f"{name} vs merged export", got_merged, got, ATOL, 0)):
                assert result.passed, result.line()
    base = ort_and_peft_outputs(exported(model_type, seeds=()), model_dir(model_type), None)
    for (name, ref, got), (_, _, got_base) in zip(ort_and_peft_outputs(folder, model_dir(model_type), None), base):
        assert compare(f"{name}, nothing fed", ref, got, ATOL, 0).passed
        assert compare(f"{name}, nothing fed vs base export", got_base, got, ATOL, 0).passed


def test_ort_adapter_api_equals_feeding_the_vectors(exported, model_dir, adapter_dir):
    import onnxruntime as ort

    folder = exported("llama", "swappable", seeds=(1, 2))
    m = manifest(folder)
    sess = session(os.path.join(folder, "model.onnx"))
    ids, mask = prompts()
    feeds = decoder_feeds(m, ids, mask)
    adapter = ort.LoraAdapter()
    adapter.Load(os.path.join(folder, "adapters", "adapter2.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    through_api = sess.run(None, feeds, options)
    fed = sess.run(None, feeds | adapter_vectors(folder, "adapter2"))
    nothing = sess.run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(through_api, fed))
    assert not np.allclose(through_api[0], nothing[0], atol=1e-3)  # the adapter did something
    got, want = greedy_pair(folder, model_dir("llama"), adapter_dir("llama", seed=2), run_options=options)
    assert got == want


def test_swappable_targets_without_adapters(exported):
    folder = exported("llama", "swappable", seeds=())
    assert manifest(folder)["vectors"] == [
        {"name": f"model.layers.{i}.{path}.ia3_l", "graph": "model", "dim": dim, "feedforward": ff}
        for i in range(2) for path, dim, ff in (("self_attn.k_proj", 16, False), ("self_attn.v_proj", 16, False),
                                                 ("mlp.down_proj", 64, True))]
    assert manifest(folder)["adapters"] == [] and not os.path.exists(os.path.join(folder, "adapters"))
    picked = manifest(exported("llama", "swappable", seeds=(), target_modules=("q_proj", "down_proj")))["vectors"]
    assert [(v["name"], v["dim"], v["feedforward"]) for v in picked[:2]] == [
        ("model.layers.0.self_attn.q_proj.ia3_l", 32, False), ("model.layers.0.mlp.down_proj.ia3_l", 64, True)]


def bank_feeds(folder: str, adapters: list[str]) -> dict[str, np.ndarray]:
    """Row 0 of every bank: ones (no adapter); row k+1: adapters[k] (ones where it has no vector)."""
    m = manifest(folder)
    per = [adapter_vectors(folder, a) for a in adapters]
    ones = {v["name"]: np.ones(v["dim"], np.float32) for v in m["vectors"]}
    for p in per:  # a bank export ships one-row banks [1, dim]
        assert all(value.shape == (1, ones[name].size) for name, value in p.items())
    return {name: np.stack([one] + [p.get(name, one[None]).reshape(-1) for p in per]) for name, one in ones.items()}


@pytest.mark.parametrize("model_type", ["llama", "opt", "bert"])  # opt: tokens flattened before fc2
def test_bank_mixed_rows_equal_rows_alone(model_type, exported, model_dir, adapter_dir):
    folder = exported(model_type, "bank", seeds=(1, 2))
    m = manifest(folder)
    sess = session(os.path.join(folder, "model.onnx"))
    banks = bank_feeds(folder, ["adapter1", "adapter2"])
    row_ids = np.array([2, 0, 1], np.int64)  # adapter2, none, adapter1
    decoder = model_type in DECODERS
    ids, mask = prompts(batch=3, left=decoder)

    def feeds(rows, past=None, step_ids=None, step_mask=None):
        extra = {"adapter_ids": row_ids[rows]} | banks
        if not decoder:
            return {"input_ids": ids[rows], "attention_mask": mask[rows], "token_type_ids": np.zeros_like(ids[rows])} | extra
        if past is None:
            return decoder_feeds(m, ids[rows], mask[rows], extra=extra)
        return decoder_feeds(m, step_ids, step_mask, past, extra)

    mixed = sess.run(None, feeds(slice(None)))
    steps = [(mixed, slice(None))]
    for b in range(3):
        alone = sess.run(None, feeds(slice(b, b + 1)))
        for name, x, y in zip(m["graphs"]["model"]["outputs"], mixed, alone):
            assert compare(f"row {b} {name}", y, x[b:b + 1], 1e-5, 0).passed
        adapter = None if row_ids[b] == 0 else adapter_dir(model_type, seed=int(row_ids[b]))
        reference = peft_model(model_dir(model_type), adapter)
        with torch.no_grad():
            kwargs = {"position_ids": torch.from_numpy(feeds(slice(b, b + 1))["position_ids"])} if decoder else {}
            ref = reference(input_ids=torch.from_numpy(ids[b:b + 1]), attention_mask=torch.from_numpy(mask[b:b + 1]),
                            **kwargs).logits.numpy()
        real = mask[b].astype(bool) if decoder else slice(None)
        result = compare(f"row {b} vs PEFT", ref[0][real], alone[0][0][real], ATOL, 0)
        assert result.passed, result.line()
    if decoder:  # one cached decode step: mixed batch vs each row alone with its own cache
        nxt = mixed[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        step_mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        past = presents(m, mixed)
        step = sess.run(None, decoder_feeds(m, nxt, step_mask, past, {"adapter_ids": row_ids} | banks))
        for b in range(3):
            row_past = {k: v[b:b + 1] for k, v in past.items()}
            alone = sess.run(None, decoder_feeds(m, nxt[b:b + 1], step_mask[b:b + 1], row_past,
                                                 {"adapter_ids": row_ids[b:b + 1]} | banks))
            for x, y in zip(step, alone):
                assert compare(f"decode row {b}", y, x[b:b + 1], 1e-5, 0).passed
    default = sess.run(None, {k: v for k, v in feeds(slice(None)).items() if k not in banks} | {"adapter_ids": np.zeros(3, np.int64)})
    base = session(os.path.join(exported(model_type, seeds=()), "model.onnx"))
    base_feeds = {k: v for k, v in feeds(slice(None)).items() if k not in banks and k != "adapter_ids"}
    assert compare("bank defaults vs base", base.run(None, base_feeds)[0], default[0], ATOL, 0).passed


def test_swappable_errors(model_dir, adapter_dir, tmp_path):
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model

    ff_as_output = IA3Model(load_base_model(model_dir("llama")),
                            IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=[]))
    ff_as_output.save_adapter(str(tmp_path / "outputs"))
    with pytest.raises(IA3Error, match=r"adapters disagree on whether model\.layers\.0\.mlp\.down_proj scales its input"):
        export_model(model_dir("llama"), str(tmp_path / "out"), mode="swappable",
                     adapters=[adapter_dir("llama", seed=1), str(tmp_path / "outputs")])
    with pytest.raises(IA3Error, match=r"also trains whole modules \(classifier\.bias, modules_to_save\).*--mode merged"):
        export_model(model_dir("bert"), str(tmp_path / "out"), mode="bank",
                     adapters=[adapter_dir("bert", seed=3, task_type="SEQ_CLS")])
    with pytest.raises(IA3Error, match="a merged export folds the adapters"):
        export_model(model_dir("llama"), str(tmp_path / "out"), target_modules=["k_proj"])
    assert sorted(os.listdir(tmp_path)) == ["outputs"]
