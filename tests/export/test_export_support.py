"""Helpers and session fixtures for the export tests: each tiny model is exported once per session.

References are independent of the exporter: PEFT's unmerged model (logits and `generate`) and
transformers. The ORT side is a minimal greedy loop over the exported graph (the runtime's own
generator is tested in its own files).
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

from ia3_export.examples.tiny import DECODERS, ENCODERS, SEQ2SEQ

ALL_TYPES = DECODERS + ENCODERS + SEQ2SEQ


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread each for torch and ORT is 3-5x faster
    than thread pools spinning against other processes."""
    import torch

    from ia3_export.export import validate

    before = torch.get_num_threads(), validate.SESSION_THREADS
    torch.set_num_threads(1)
    validate.SESSION_THREADS = 1
    yield
    torch.set_num_threads(before[0])
    validate.SESSION_THREADS = before[1]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, model_dir, adapter_dir):
    """exported(model_type, mode="merged", seeds=(1,), dtype="fp32", **options) -> ONNX folder (built once)."""
    from ia3_export.export import export_model

    cache = {}

    def make(model_type: str, mode: str = "merged", seeds: tuple[int, ...] = (1,), dtype: str = "fp32", **options) -> str:
        key = (model_type, mode, seeds, dtype, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"onnx-{model_type}-{mode}") / "onnx"
            adapters = [adapter_dir(model_type, seed=s) for s in seeds]
            export_model(model_dir(model_type), str(out), mode=mode, adapters=adapters, dtype=dtype, **options)
            cache[key] = str(out)
        return cache[key]

    return make


def manifest(folder: str) -> dict:
    with open(os.path.join(folder, "ia3_export.json")) as f:
        return json.load(f)


def session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=8)
def peft_model(model_dir: str, adapter: str | None):
    """The reference: transformers' model with PEFT's own (unmerged) IA3 layers, or the plain base."""
    import transformers
    from peft import PeftModel

    from ia3_export.core.loading import auto_class_name, read_model_config

    base = getattr(transformers, auto_class_name(read_model_config(model_dir))).from_pretrained(model_dir).eval()
    return PeftModel.from_pretrained(base, adapter).eval() if adapter else base


def prompts(vocab: int = 300, batch: int = 2, length: int = 6, left: bool = True, seed: int = 0):
    """input_ids and attention_mask with one padded row (left padding for decoders)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, (batch, length), dtype=np.int64)
    mask = np.ones_like(ids)
    pad = slice(0, 2) if left else slice(length - 2, length)
    mask[0, pad] = 0
    ids[0, pad] = 0
    return ids, mask


def decoder_feeds(m: dict, ids, mask, past=None, extra=None) -> dict:
    """Feeds for a decoder graph; past defaults to length 0 (the first step)."""
    cache = m["cache"]
    batch = ids.shape[0]
    dtype = np.float16 if m["dtype"] == "fp16" else np.float32
    if past is None:
        past = {f"past_key_values.{i}.{kv}": np.zeros((batch, cache["num_kv_heads"], 0, cache["head_dim"]), dtype)
                for i in range(cache["num_layers"]) for kv in ("key", "value")}
    position_ids = np.clip(mask.cumsum(-1) - 1, 0, None)[:, -ids.shape[1]:]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, **past, **(extra or {})}


def presents(m: dict, outputs: list) -> dict:
    names = m["graphs"][m["cache"]["graph"]]["outputs"]
    return {n.replace("present.", "past_key_values."): v for n, v in zip(names, outputs) if n.startswith("present.")}


def ort_greedy(folder: str, ids, mask, steps: int, extra=None, run_options=None) -> np.ndarray:
    """Greedy decoding on the exported decoder graph with its KV cache: [batch, steps] tokens."""
    m = manifest(folder)
    sess = session(os.path.join(folder, m["graphs"]["model"]["file"]))
    feeds = decoder_feeds(m, ids, mask, extra=extra)
    tokens = []
    for _ in range(steps):
        outputs = sess.run(None, feeds, run_options)
        nxt = outputs[0][:, -1].argmax(-1)
        tokens.append(nxt)
        mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
        feeds = decoder_feeds(m, nxt[:, None].astype(np.int64), mask, presents(m, outputs), extra)
    return np.stack(tokens, axis=1)


def ort_greedy_seq2seq(folder: str, ids, mask, steps: int, extra=None) -> np.ndarray:
    m = manifest(folder)
    enc = session(os.path.join(folder, m["graphs"]["encoder"]["file"]))
    dec = session(os.path.join(folder, m["graphs"]["decoder"]["file"]))
    names = {i.name for i in enc.get_inputs()} | {i.name for i in enc.get_overridable_initializers()}
    hidden = enc.run(None, {"input_ids": ids, "attention_mask": mask} | {k: v for k, v in (extra or {}).items() if k in names})[0]
    cache = m["cache"]
    past = {f"past_key_values.{i}.{kv}": np.zeros((len(ids), cache["num_kv_heads"], 0, cache["head_dim"]), np.float32)
            for i in range(cache["num_layers"]) for kv in ("key", "value")}
    dec_names = {i.name for i in dec.get_inputs()} | {i.name for i in dec.get_overridable_initializers()}
    cur = np.full((len(ids), 1), m["tokens"]["decoder_start"], np.int64)
    tokens = []
    for _ in range(steps):
        outputs = dec.run(None, {"input_ids": cur, "encoder_hidden_states": hidden, "encoder_attention_mask": mask, **past}
                          | {k: v for k, v in (extra or {}).items() if k in dec_names})
        cur = outputs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(cur[:, 0])
        past = presents(m, outputs)
    return np.stack(tokens, axis=1)


def until_eos(tokens, eos: int) -> list[list[int]]:
    """Each row up to (and including) its first EOS: generate() stops there, the ORT loop does not."""
    rows = []
    for row in np.asarray(tokens).tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def torch_greedy(model, ids, mask, steps: int, seq2seq: bool = False) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=steps, num_beams=1, pad_token_id=0)
    out = out.numpy()
    return out[:, 1:] if seq2seq else out[:, ids.shape[1]:]  # seq2seq output starts with decoder_start
