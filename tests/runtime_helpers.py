"""Helpers shared by the runtime, convert and lean tests: exports built once per session and
the PEFT/transformers references they are checked against."""
from __future__ import annotations

import numpy as np

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # different lengths: the runtime left-pads


_EXPORTS: dict = {}  # one export per (model, mode, adapters) for the whole test session


def export_once(tmp_path_factory, model_dir: str, mode: str, adapters: list[str], task=None) -> str:
    from ia3_export.export import export_model

    cache = _EXPORTS
    key = (model_dir, mode, tuple(adapters), task)
    if key not in cache:
        out = tmp_path_factory.mktemp(f"onnx-{mode}") / "onnx"
        export_model(model_dir, str(out), mode=mode, adapters=list(adapters), task=task)
        cache[key] = str(out)
    return cache[key]


def llama_exports(tmp_path_factory, model_dir, adapter_dir, modes=("swappable", "bank", "foldswap")) -> dict:
    """A tiny llama ("base"), two random adapters ("a1", "a2": adapter1, adapter2) and its exports per mode."""
    base = model_dir("llama")
    a1, a2 = adapter_dir("llama", seed=1), adapter_dir("llama", seed=2)
    return {"base": base, "a1": a1, "a2": a2, **{mode: export_once(tmp_path_factory, base, mode, [a1, a2]) for mode in modes}}


def padded(prompts=PROMPTS, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.array([[pad] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    return ids, mask


def peft_model(model_dir: str, adapter: str | None):
    """The independent reference: transformers' model with PEFT's own IA3 loaded (or none)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    import json
    import os

    with open(os.path.join(model_dir, "config.json")) as f:
        seq2seq = json.load(f).get("is_encoder_decoder", False)
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir).eval()
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def peft_logits(model_dir: str, adapter: str | None, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return peft_model(model_dir, adapter)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def peft_greedy(model_dir: str, adapter: str | None, prompts, max_new_tokens: int, eos: int = 2) -> list[list[int]]:
    """transformers' greedy generate per prompt (no padding involved), new tokens only, cut after EOS."""
    import torch

    model = peft_model(model_dir, adapter)
    outs = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        new = out[0, len(p):].tolist() if not model.config.is_encoder_decoder else out[0, 1:].tolist()
        outs.append(new[:new.index(eos) + 1] if eos in new else new)
    return outs


def open_session(folder, *adapters):
    """An IA3Session on the folder with the given adapters loaded (names from their folders)."""
    from ia3_export.runtime import IA3Session

    s = IA3Session(folder)
    for a in adapters:
        s.load_adapter(a)
    return s


def prefill_feeds(s, ids, mask):
    """First-step decoder feeds: position ids from the mask and an empty (past length 0) cache."""
    from ia3_export.runtime.generation import empty_cache, position_ids

    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
            **empty_cache(s.graphs["model"], len(ids), "float32", s.folder.cache)}
