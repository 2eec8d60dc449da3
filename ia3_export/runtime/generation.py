"""Token generation on an IA3Session: greedy or sampled (temperature, top-p), with the KV cache.

Decoders: prompts are left-padded into one batch, position ids come from the attention mask
(as transformers computes them), each step feeds one token per row and the previous step's
`present.*` outputs as `past_key_values.*` without leaving the device. Seq2seq: the encoder
runs once, then the decoder loop. A row stops at EOS (then receives padding) and the batch
stops when every row has.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import IA3Error

PAST, PRESENT = "past_key_values", "present"


@dataclasses.dataclass
class GenerationOptions:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_ids: list[int] | None = None  # default: generation_config.json's, else the manifest's

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise IA3Error(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise IA3Error(f"temperature must be > 0 when sampling, got {self.temperature}; use greedy decoding instead")
        if not 0 < self.top_p <= 1:
            raise IA3Error(f"top_p must be in (0, 1], got {self.top_p}")


class TokenChooser:
    """Greedy argmax, or sampling from the temperature-scaled top-p nucleus (seeded)."""

    def __init__(self, options: GenerationOptions):
        self.options = options
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if not self.options.do_sample:
            return logits.argmax(-1)
        scaled = logits.astype(np.float64) / self.options.temperature
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen = np.empty(len(probs), dtype=np.int64)
        for row, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")
            sorted_p = p[order]
            keep = np.cumsum(sorted_p) - sorted_p < self.options.top_p  # always keeps the top token
            kept = sorted_p[keep] / sorted_p[keep].sum()
            chosen[row] = order[self.rng.choice(len(kept), p=kept)]
        return chosen


def generate_ids(session, prompts: list[list[int]], adapters: list[str | None] | None = None,
                 options: GenerationOptions | None = None) -> list[list[int]]:
    """New token ids for each prompt (prompt not included; stops after EOS, which is kept)."""
    options = options or GenerationOptions()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise IA3Error("every prompt needs at least one token")
    if "encoder" in session.graphs:
        return _generate_seq2seq(session, prompts, adapters, options)
    if "model" not in session.graphs or "logits" not in session.graphs["model"].outputs:
        raise IA3Error(f"{session.folder.path} is a {session.folder.task or 'non-generative'} export; generation "
                       "needs a causal-lm or seq2seq-lm export")
    return _generate_decoder(session, prompts, adapters, options)


def max_positions(config: dict) -> int | None:
    """The most positions a model takes (config.json's max_position_embeddings, GPT-2's n_positions);
    None where the config sets no limit (T5's relative positions)."""
    text = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(text.get(key), int) and not isinstance(text.get(key), bool):
            return text[key]
    return None


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


def position_ids(mask: np.ndarray) -> np.ndarray:
    """transformers' rule: cumulative count of real tokens - 1, padding at 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def empty_cache(graph, batch: int, dtype: str, cache: dict | None) -> dict:
    """Zero-length past for every `past_key_values.*` input: [batch, heads, 0, head_dim]."""
    feeds = {}
    for name, info in graph.inputs.items():
        if not name.startswith(PAST):
            continue
        shape = list(info.shape)
        heads = shape[1] if isinstance(shape[1], int) else (cache or {}).get("num_kv_heads")
        dim = shape[3] if isinstance(shape[3], int) else (cache or {}).get("head_dim")
        if heads is None or dim is None:
            raise IA3Error(f"cannot tell the shape of {name}: the graph leaves it symbolic and the manifest has no cache entry")
        feeds[name] = np.zeros((batch, heads, 0, dim), dtype=dtype)
    return feeds


def _next_past(outputs: dict) -> dict:
    return {PAST + name[len(PRESENT):]: value for name, value in outputs.items() if name.startswith(PRESENT)}


def _generate_decoder(session, prompts, adapters, options) -> list[list[int]]:
    folder, graph = session.folder, session.graphs["model"]
    eos, pad = _eos(folder, options), folder.pad_id()
    choose = TokenChooser(options)
    ids, mask = _left_pad(prompts, pad)
    batch = len(prompts)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in graph.inputs:
        feeds["position_ids"] = position_ids(mask)
    feeds.update(empty_cache(graph, batch, folder.dtype, folder.cache))
    outputs = ["logits", *[n for n in graph.outputs if n.startswith(PRESENT)]]
    use_cache = any(n.startswith(PAST) for n in graph.inputs)
    new = np.zeros((batch, 0), dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    for _ in range(options.max_new_tokens):
        results = session.run(feeds, graph="model", adapters=adapters, outputs=outputs, as_numpy=False)
        logits = results.pop("logits").numpy()[:, -1, :]
        token = np.where(done, pad, choose(logits))
        new = np.concatenate([new, token[:, None]], axis=1)
        done |= np.isin(token, list(eos))
        if done.all():
            break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        if use_cache:
            feeds = {"input_ids": token[:, None].astype(np.int64), "attention_mask": mask, **_next_past(results)}
            if "position_ids" in graph.inputs:
                feeds["position_ids"] = position_ids(mask)[:, -1:]
        else:  # a graph without cache inputs: re-run the whole sequence
            ids = np.concatenate([ids, token[:, None]], axis=1)
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "position_ids" in graph.inputs:
                feeds["position_ids"] = position_ids(mask)
    return [_trim(row, eos) for row in new.tolist()]


def _eos(folder, options: GenerationOptions) -> set[int]:
    return set(options.eos_token_ids if options.eos_token_ids is not None else folder.eos_ids())


def _trim(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


def _generate_seq2seq(session, prompts, adapters, options) -> list[list[int]]:
    folder = session.folder
    encoder, decoder = session.graphs["encoder"], session.graphs["decoder"]
    eos, pad = _eos(folder, options), folder.pad_id()
    start = folder.tokens.get("decoder_start")
    if start is None:
        raise IA3Error(f"{folder.path}: the manifest has no tokens.decoder_start; re-export the model")
    choose = TokenChooser(options)
    batch = len(prompts)
    ids, mask = _pad_right(prompts, pad)
    hidden = session.run({"input_ids": ids, "attention_mask": mask}, graph="encoder", adapters=adapters,
                         outputs=[encoder.outputs[0]], as_numpy=False)[encoder.outputs[0]]
    use_cache = any(n.startswith(PAST) for n in decoder.inputs)
    tokens = np.full((batch, 1), int(start), dtype=np.int64)
    ids_name = "decoder_input_ids" if "decoder_input_ids" in decoder.inputs else "input_ids"
    mask_name = "encoder_attention_mask" if "encoder_attention_mask" in decoder.inputs else "attention_mask"
    feeds = {ids_name: tokens, mask_name: mask, "encoder_hidden_states": hidden}
    if use_cache:
        feeds.update(empty_cache(decoder, batch, folder.dtype, folder.cache))
    outputs = [decoder.outputs[0], *[n for n in decoder.outputs if n.startswith(PRESENT)]]
    done = np.zeros(batch, dtype=bool)
    for _ in range(options.max_new_tokens):
        results = session.run(feeds, graph="decoder", adapters=adapters, outputs=outputs, as_numpy=False)
        logits = results.pop(outputs[0]).numpy()[:, -1, :]
        token = np.where(done, pad, choose(logits))
        tokens = np.concatenate([tokens, token[:, None]], axis=1)
        done |= np.isin(token, list(eos))
        if done.all():
            break
        feeds = {ids_name: token[:, None] if use_cache else tokens, mask_name: mask, "encoder_hidden_states": hidden}
        if use_cache:
            feeds.update(_next_past(results))
    return [_trim(row, eos) for row in tokens[:, 1:].tolist()]


def _pad_right(prompts, pad):
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = p
        mask[row, :len(p)] = 1
    return ids, mask
