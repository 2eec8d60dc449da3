"""Token generation on an IA3Session: greedy or sampled (temperature, top-k, top-p, min-p), with
logit bias, repetition/presence/frequency penalties, min_new_tokens and ignore_eos, stop strings,
streaming, with the KV cache.

Decoders: prompts are left-padded into one batch, position ids come from the attention mask
(as transformers computes them), each step feeds one token per row and the previous step's
`present.*` outputs as `past_key_values.*` without leaving the device. A request is checked and
its adapter bound once (`IA3Session.step_run`), its ids and mask live in buffers sized for the
whole run, and a step binds only what changed. Graphs in onnxruntime-genai's model-builder layout
(one KV buffer shared by past and present, see `kv_layout`) run too. Seq2seq: the encoder runs
once, then the decoder loop. A row stops at EOS or a stop string (then receives padding)
and the batch stops when every row has. A run never goes past the model's positions
(config.json's max_position_embeddings): a prompt that fills them is refused, and
max_new_tokens is cut to what is left (with a `GenerationCapped` warning). Seq2seq runs are cut
the same way: to the decoder's positions, or, where the model names none (T5's relative
positions), to the session's `limits.max_new_tokens` ceiling.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
import warnings
from typing import Callable, Iterator

import numpy as np

from ..errors import IA3Error
from ..tasks import EXPORT_TASKS, task_named
from ..dtypes import of_ort
from ..formats.manifest import KV_CONCAT, KV_LAYOUTS, KV_SHARED, LOGITS_TO_KEEP
from .requests import INT_MAX, SEED_MAX

PAST, PRESENT = "past_key_values", "present"
GENERATIVE = ("causal-lm", "seq2seq-lm")  # the task families whose exports generate text
MAX_STOP_STRINGS = 64  # each is looked for in the row's text at every token: one request's list must not slow every row
MAX_LOGPROBS = 20  # the most alternatives a request may ask the log-probabilities of (OpenAI's and vLLM's limit)
MAX_LOGIT_BIAS = 300  # the most token ids one request's logit_bias may name (OpenAI's limit)


class GenerationCapped(UserWarning):
    """max_new_tokens was cut to the positions the model has left after the prompt."""


@dataclasses.dataclass
class GenerationOptions:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter (transformers' meaning)
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] | None = None  # a row stops once its generated text contains one (kept, as transformers)
    eos_token_ids: list[int] | None = None  # default: generation_config.json's, else the manifest's
    min_p: float = 0.0  # 0: off; else drop tokens less likely than min_p x the top token (transformers, vLLM)
    repetition_penalty: float = 1.0  # 1: off; transformers'/vLLM's, over the prompt and the new tokens
    presence_penalty: float = 0.0  # OpenAI's, over the new tokens only: logit - presence x (count > 0)
    frequency_penalty: float = 0.0  # OpenAI's, over the new tokens only: logit - frequency x count
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> bias added to its logit
    min_new_tokens: int = 0  # EOS (the eos_token_ids) suppressed and stop strings unchecked until this many tokens
    ignore_eos: bool = False  # vLLM's: EOS does not end a row (it runs to max_new_tokens or a stop string)

    def __post_init__(self):
        if not is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= INT_MAX:
            raise IA3Error(f"max_new_tokens must be an integer of at least 1 (at most {INT_MAX}), "
                           f"got {self.max_new_tokens!r}")
        if not is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise IA3Error(f"temperature must be a finite number > 0, got {self.temperature!r}; "
                           "use greedy decoding (no --sample) for the most likely tokens")
        if not is_int(self.top_k) or not 0 <= self.top_k <= INT_MAX:
            raise IA3Error(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise IA3Error(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= SEED_MAX):
            raise IA3Error(f"seed must be an integer from 0 to {SEED_MAX}, got {self.seed!r}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.stop_strings is not None:
            stops = self.stop_strings
            if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) and x for x in stops):
                raise IA3Error(f"stop_strings must be a list of non-empty strings, got {reprlib.repr(stops)}")
            if len(stops) > MAX_STOP_STRINGS:
                raise IA3Error(f"{len(stops)} stop strings, more than the {MAX_STOP_STRINGS} a request may hold (each "
                               "is looked for at every token); send fewer")
        self._check_processors()

    def _check_processors(self) -> None:
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise IA3Error(f"min_p must be a number from 0 to 1 (0 turns it off), got {self.min_p!r}")
        penalty = self.repetition_penalty
        if not is_real(penalty) or not math.isfinite(penalty) or penalty <= 0:
            raise IA3Error(f"repetition_penalty must be a finite number > 0 (1 turns it off, above 1 discourages "
                           f"repeats), got {penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_real(value) or not -2 <= value <= 2:
                raise IA3Error(f"{name} must be a number from -2 to 2 (0 turns it off), got {value!r}")
        if not is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise IA3Error(f"min_new_tokens must be an integer from 0 to max_new_tokens ({self.max_new_tokens}), "
                           f"got {self.min_new_tokens!r}; lower it or raise max_new_tokens")
        if not isinstance(self.ignore_eos, bool):
            raise IA3Error(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)

    @property
    def processors(self) -> bool:
        """Whether anything changes the logits before a token is chosen (then greedy is the argmax of
        the processed logits, and a row cannot share another's argmax)."""
        return bool(self.logit_bias or self.min_new_tokens or self.repetition_penalty != 1
                    or self.presence_penalty or self.frequency_penalty)


def _logit_bias(bias) -> dict[int, float]:
    """OpenAI's logit_bias with integer keys: JSON's keys are strings ("50256"), so decimal strings count."""
    shown = reprlib.repr(bias)
    if not isinstance(bias, dict):
        raise IA3Error(f"logit_bias must map token ids to biases from -100 to 100, got {shown}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise IA3Error(f"logit_bias names {len(bias)} tokens, more than the {MAX_LOGIT_BIAS} a request may; send fewer")
    out = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if not is_int(token) or not 0 <= token <= INT_MAX or not is_real(value) or not -100 <= value <= 100:
            raise IA3Error(f"logit_bias must map token ids (integers >= 0) to biases from -100 to 100, got "
                           f"{reprlib.repr(key)}: {reprlib.repr(value)}")
        out[int(token)] = float(value)
    return out


def check_logit_bias(options: GenerationOptions, vocab_size: int | None) -> None:
    """A logit_bias token past the vocabulary is refused before any work (each request path calls this)."""
    outside = [t for t in options.logit_bias or () if vocab_size and t >= vocab_size]
    if outside:
        raise IA3Error(f"logit_bias names token {outside[0]}, outside the vocabulary of {vocab_size} tokens; "
                       f"use ids from 0 to {vocab_size - 1}")


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model's own distribution (its logits as they are,
    before temperature and top_p: what vLLM reports by default) and the `top` most likely tokens as
    (id, log-probability), most likely first; in float64."""
    x = logits.astype(np.float64)
    x -= x.max()
    logprobs = x - np.log(np.exp(x).sum())
    best = np.argpartition(-logprobs, top)[:top] if 0 < top < len(logprobs) else np.arange(len(logprobs))[:top]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return float(logprobs[token]), [(int(i), float(logprobs[i])) for i in best]


class TokenChooser:
    """One request's choice of the next token for each row of its batch, seeded. The logits are processed
    first, in float64, in this order (transformers' processors, then vLLM's penalties): logit_bias added,
    EOS masked while fewer than min_new_tokens tokens are out, the repetition penalty over each row's
    prompt and new tokens (a logit < 0 multiplied by it, else divided: transformers' and vLLM's), then
    frequency and presence over its new tokens only (logit - frequency x count - presence x (count > 0),
    OpenAI's and vLLM's). Greedy is the argmax of the processed logits (as transformers); sampling then
    applies temperature, top-k, top-p and min-p (transformers' warpers, in their order). The chooser
    records every token it chooses: the history the penalties read."""

    def __init__(self, options: GenerationOptions, prompts: list[list[int]] | None = None, eos=()):
        self.options = options
        self.rng = np.random.default_rng(options.seed)
        self.prompts = prompts or []  # each row's history before its first new token (a seq2seq's decoder start)
        self.eos = sorted(eos)
        self.plain = not options.do_sample and not options.processors  # the raw logits' argmax: batched by callers
        self.new = 0  # tokens chosen so far (a batch's rows start together)
        self.seen = self.counts = None  # [rows, vocab]: tokens in each row's history; each new token's count
        bias = options.logit_bias or {}
        self.bias_ids, self.bias = np.fromiter(bias, np.int64), np.fromiter(bias.values(), np.float64)  # once

    def process(self, logits: np.ndarray) -> np.ndarray:
        """[batch, vocab] float64 logits after logit_bias, min_new_tokens and the penalties."""
        o, x = self.options, logits.astype(np.float64)
        vocab = x.shape[-1]
        if self.bias_ids.size:
            if self.bias_ids.max() >= vocab:  # a folder whose config names no vocab_size is checked here
                raise IA3Error(f"logit_bias names token {self.bias_ids.max()}, outside the vocabulary of "
                               f"{vocab} tokens")
            x[:, self.bias_ids] += self.bias
        if self.new < o.min_new_tokens:
            x[:, [t for t in self.eos if t < vocab]] = -np.inf
        if o.repetition_penalty != 1 or o.presence_penalty or o.frequency_penalty:
            self._history(x.shape)
        if o.repetition_penalty != 1:
            x = np.where(self.seen, np.where(x < 0, x * o.repetition_penalty, x / o.repetition_penalty), x)
        if o.presence_penalty or o.frequency_penalty:
            x -= o.frequency_penalty * self.counts + o.presence_penalty * (self.counts > 0)
        return x

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """[batch, vocab] float64 sampling distribution after the processors, temperature, top-k, top-p, min-p."""
        o = self.options
        logits = self.process(logits)
        # the top logit first, then the temperature: any temperature > 0 (1e-320 too) stays finite
        with np.errstate(over="ignore"):  # a tiny temperature sends all but the top logit to -inf: wanted
            scaled = (logits - logits.max(-1, keepdims=True)) / o.temperature
        if 0 < o.top_k < scaled.shape[-1]:  # ties with the k-th logit stay, as in transformers
            kth = np.partition(scaled, -o.top_k, axis=-1)[:, -o.top_k, None]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if o.top_p < 1:
            order = np.argsort(-probs, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(probs, order, -1)
            drop = np.cumsum(sorted_p, -1) - sorted_p >= o.top_p  # never the top token
            probs = probs.copy()
            np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_p), -1)
            probs /= probs.sum(-1, keepdims=True)
        if o.min_p > 0:  # the top token always stays
            probs = np.where(probs < o.min_p * probs.max(-1, keepdims=True), 0.0, probs)
            probs /= probs.sum(-1, keepdims=True)
        return probs

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.plain:
            tokens = logits.argmax(-1)
        elif not self.options.do_sample:
            tokens = self.process(logits).argmax(-1)
        else:
            probs = self.probabilities(logits)
            tokens = np.array([self.rng.choice(len(p), p=p) for p in probs], dtype=np.int64)
        self._record(tokens)
        return tokens

    def _history(self, shape) -> None:
        """The penalties' history arrays, made at the first step (the vocabulary is the logits')."""
        if self.seen is None:
            self.seen, self.counts = np.zeros(shape, bool), np.zeros(shape, np.int64)
            for row, prompt in enumerate(self.prompts):
                ids = np.asarray(prompt, np.int64)
                self.seen[row, ids[(ids >= 0) & (ids < shape[1])]] = True

    def _record(self, tokens: np.ndarray) -> None:
        self.new += 1
        if self.seen is not None:
            rows = np.arange(len(tokens))
            self.seen[rows, tokens] = True
            self.counts[rows, tokens] += 1


class TextStream:
    """Text pieces of a growing token sequence, built on the tokenizer's own decode: each piece is what
    the new token adds to the text, held back while the text ends in an incomplete UTF-8 character
    (decoded as U+FFFD), so no piece splits a character and the pieces join to decode(all tokens)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.sent = decode, [], 0

    def push(self, *tokens: int) -> str:
        """What the new token(s) add: several at once cost one decode (a server sends them together)."""
        self.ids.extend(int(t) for t in tokens)
        text = self.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._rest(text)

    def finish(self, *tokens: int) -> str:
        """The held-back end, after the last token(s) (a character they leave incomplete stays U+FFFD,
        as in decode)."""
        self.ids.extend(int(t) for t in tokens)
        return self._rest(self.decode(self.ids))

    def _rest(self, text: str) -> str:
        piece, self.sent = text[self.sent:], len(text)
        return piece


def generate_ids(session, prompts: list[list[int]], adapters: list[str | None] | None = None,
                 options: GenerationOptions | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> list[list[int]]:
    """New token ids for each prompt (prompt not included; ends with the EOS or the token that completed
    a stop string). `decode` (token ids -> text) is needed for stop strings."""
    outs = [[] for _ in prompts]
    for step in iter_tokens(session, prompts, adapters, options, decode):
        for row, token in step.items():
            outs[row].append(token)
    return outs


def iter_tokens(session, prompts: list[list[int]], adapters: list[str | None] | None = None,
                options: GenerationOptions | None = None,
                decode: Callable[[list[int]], str] | None = None) -> Iterator[dict[int, int]]:
    """Yields, at each step, {row: new token} for the rows still generating, as soon as they are chosen."""
    options = options or GenerationOptions()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise IA3Error("every prompt needs at least one token")
    if options.stop_strings and decode is None:
        raise IA3Error("stop strings need the tokenizer's decode; pass decode= (IA3Session.generate does)")
    seq2seq = "encoder" in session.graphs
    task = session.folder.task
    family = task_named(task).family if task in EXPORT_TASKS else None  # a classifier has `logits` too
    if (family is not None and family not in GENERATIVE) or (
            not seq2seq and ("model" not in session.graphs or "logits" not in session.graphs["model"].outputs)):
        classify = "; `ia3-export serve` classifies text with it (no other command runs a classifier)" if (
            family == "seq-cls") else ""
        raise IA3Error(f"{session.folder.path} is a {task or 'non-generative'} export; generation needs a decoder "
                       f"export (text-generation or text2text-generation){classify}")
    steps = new_token_budget(session.folder, max(len(p) for p in prompts), options.max_new_tokens, seq2seq,
                             session.limits)
    check_logit_bias(options, session.folder.config.get("vocab_size"))
    eos = eos_ids(session.folder, options)
    rows = _Rows(len(prompts), eos, options, decode, session.folder.pad_id())
    # the penalties' history: the prompt (transformers' and vLLM's), or a seq2seq's decoder input (its start token)
    history = [[folder_start(session.folder)]] * len(prompts) if seq2seq else prompts
    loop = _seq2seq_logits if seq2seq else decoder_logits
    return _steps(loop(session, prompts, adapters, steps), rows, TokenChooser(options, history, eos))


def _steps(logits_loop, rows, choose) -> Iterator[dict[int, int]]:
    """Drive a loop that yields last-position logits and receives the next tokens (pad for finished rows)."""
    try:
        logits = next(logits_loop)
        while True:
            emitted, tokens = rows.advance(choose(logits))
            yield emitted
            if not rows.live:
                return
            logits = logits_loop.send(tokens)
    except StopIteration:
        return


class RowStop:
    """When one row ends: at EOS (unless ignore_eos), or once a stop string appears in its generated
    text; neither before min_new_tokens tokens (vLLM's min_tokens), and a stop string only where it
    ends in the new token's text (vLLM's), so one written before then does not end the row later.
    Plain Python on purpose: it runs once per token."""

    def __init__(self, eos: set[int], options: GenerationOptions, decode):
        self.eos, self.stops, self.decode, self.tokens = eos, options.stop_strings or [], decode, []
        self.ignore_eos, self.min_new, self.count, self.text = options.ignore_eos, options.min_new_tokens, 0, ""

    def __call__(self, token: int) -> bool:
        self.count += 1
        early = self.count < self.min_new
        if token in self.eos and not self.ignore_eos and not early:
            return True
        if not self.stops:
            return False
        self.tokens.append(token)
        text, before = self.decode(self.tokens), self.text
        # where the text changed: its end, unless this token completed a character the last one left as U+FFFD
        same = len(before) if text.startswith(before) else next(
            i for i, (a, b) in enumerate(zip(before, text)) if a != b)
        self.text = text
        return not early and any(stop in text[max(0, same - len(stop) + 1):] for stop in self.stops)


class _Rows:
    """Which rows of a batch still generate (each row's `RowStop`)."""

    def __init__(self, batch: int, eos: set[int], options: GenerationOptions, decode, pad: int):
        self.live, self.pad = list(range(batch)), pad
        self.stopped = [RowStop(eos, options, decode) for _ in range(batch)]

    def advance(self, chosen: np.ndarray) -> tuple[dict[int, int], list[int]]:
        """({row: token} for the rows that were live, the tokens to feed next: pad for finished rows)."""
        chosen = chosen.tolist()
        emitted, feed, live = {}, [self.pad] * len(chosen), []
        for r in self.live:
            token = emitted[r] = feed[r] = chosen[r]
            if not self.stopped[r](token):
                live.append(r)
        self.live = live
        return emitted, feed


def check_prompt_length(prompt_len: int, limits) -> None:
    """Where a model names no position limit: a prompt of at most `limits.max_prompt_tokens` tokens."""
    if prompt_len > limits.max_prompt_tokens:
        raise IA3Error(f"the prompt has {prompt_len} tokens; this model names no position limit, so a request takes "
                       f"at most {limits.max_prompt_tokens} (Limits.max_prompt_tokens); shorten the prompt")


def new_token_budget(folder, prompt_len: int, max_new_tokens: int, seq2seq: bool, limits) -> int:
    """max_new_tokens, cut to the positions left; a prompt that leaves none is an error naming both.
    A seq2seq model without positions in its config (T5) takes at most `limits.max_prompt_tokens` in a
    prompt and is cut to `limits.max_new_tokens` (a decoder without them has no cache limit we know of,
    and is bounded the same way)."""
    limit = folder.max_positions
    if limit is None:
        check_prompt_length(prompt_len, limits)
        ceiling = limits.max_new_tokens
        if max_new_tokens > ceiling:
            warnings.warn(f"max_new_tokens {max_new_tokens} cut to {ceiling}: the model names no position limit "
                          "and this session generates at most that many tokens (Limits.max_new_tokens)",
                          GenerationCapped, stacklevel=3)
            return ceiling
        return max_new_tokens
    if prompt_len > limit or (prompt_len >= limit and not seq2seq):
        together = "" if seq2seq else " for prompt and new tokens together"
        raise IA3Error(f"the prompt has {prompt_len} tokens; the model takes at most {limit} positions{together} "
                       "(max_position_embeddings in config.json); shorten the prompt")
    left = limit if seq2seq else limit - prompt_len
    if max_new_tokens > left:
        warnings.warn(f"max_new_tokens {max_new_tokens} cut to {left}: the model takes at most {limit} positions "
                      f"and the prompt has {prompt_len} tokens", GenerationCapped, stacklevel=3)
        return left
    return max_new_tokens


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


def cache_names(graph) -> dict[str, str]:
    """present.* output -> the past_key_values.* input it feeds at the next step."""
    return {name: PAST + name[len(PRESENT):] for name in graph.outputs if name.startswith(PRESENT)}


def kv_layout(folder, graph) -> str:
    """How a decoder graph keeps its KV cache: "concat" (our exports: present = past + this step, a new
    buffer per step), "shared" (onnxruntime-genai's model builder: GroupQueryAttention over one buffer
    of the run's full length, bound as past AND present; no position_ids, the graph derives them from
    the mask) or "none" (no cache inputs: each step re-runs the whole sequence). The manifest's
    cache.kv_layout decides where it is given; otherwise the graph's inputs do (our decoder exports
    always take position_ids)."""
    declared = (folder.cache or {}).get("kv_layout")
    if declared is not None:
        if declared not in KV_LAYOUTS:
            raise IA3Error(f"{folder.path}: the manifest's cache.kv_layout is {declared!r}, not one of "
                           f"{', '.join(KV_LAYOUTS)}; re-export the model")
        return declared
    if not any(n.startswith(PAST) for n in graph.inputs) or not cache_names(graph):
        return "none"
    return KV_CONCAT if "position_ids" in graph.inputs else KV_SHARED


class Sequence:
    """A request's ids and attention mask in buffers sized for prompt + every new token, filled as the
    tokens come: a step feeds views of them, and the decode inputs (one token and one position per row)
    are OrtValues written in place. Prompts are left-padded (transformers' way; the mask's new columns
    are ones from the start), or right-padded for GroupQueryAttention, which reads each row's length
    from its mask and takes row r's tokens to start at position 0 (each row's next token then goes
    to its own column `ends[r]`)."""

    def __init__(self, prompts: list[list[int]], steps: int, pad: int, right_pad: bool = False):
        self.batch, self.length = len(prompts), max(len(p) for p in prompts)
        total = self.length + steps
        self.ids = np.full((self.batch, total), pad, dtype=np.int64)
        self.mask = np.zeros((self.batch, total), dtype=np.int64)
        lengths = np.array([len(p) for p in prompts])
        for row, p in enumerate(prompts):
            start = 0 if right_pad else self.length - len(p)
            self.ids[row, start:start + len(p)] = p
            self.mask[row, start:start + len(p) if right_pad else total] = 1
        self.rows = np.arange(self.batch)
        self.ends = lengths if right_pad else np.full(self.batch, self.length)  # where each row's next token goes
        self.token = np.zeros((self.batch, 1), dtype=np.int64)
        self.position = lengths[:, None].astype(np.int64)  # transformers' rule for the next token

    @property
    def total(self) -> int:
        return self.ids.shape[1]

    def prompt(self, with_positions: bool, keep_logits: bool = False) -> dict:
        """The prefill's feeds. `keep_logits` (a graph with `logits_to_keep`): the LM head runs on the last
        columns only, as few as still hold every row's last prompt token (1 unless right-padded rows differ)."""
        feeds = {"input_ids": self.ids[:, :self.length], "attention_mask": self.mask[:, :self.length]}
        if with_positions:
            feeds["position_ids"] = position_ids(feeds["attention_mask"])
        if keep_logits:
            feeds[LOGITS_TO_KEEP] = np.array([self.length - int(self.ends.min()) + 1], np.int64)
        return feeds

    def last(self, logits: np.ndarray) -> np.ndarray:
        """Each row's logits at its last prompt token, from the prompt's [batch, kept columns, vocab]
        (the last `kept` of the prompt's columns)."""
        return logits[self.rows, self.ends - 1 - (self.length - logits.shape[1])]

    def push(self, tokens) -> None:
        """Append one token per row; `token` now holds it."""
        self.token[:, 0] = tokens
        self.ids[self.rows, self.ends] = self.token[:, 0]
        self.mask[self.rows, self.ends] = 1
        self.ends += 1
        self.length += 1

    def attention_mask(self) -> np.ndarray:
        return self.mask[:, :self.length]


def decoder_logits(session, prompts, adapters, steps):
    """Yields last-position logits; receives each step's tokens. Validation, adapter binding and the
    buffers happen once per request (`IA3Session.step_run`); a decode step writes the new token and
    position in place, binds the grown mask view and, in the concat layout, the previous step's
    present.* OrtValues as past_key_values.* (the cache never leaves the device). In the shared layout
    the KV buffers are bound once, as past and present, for the whole request. A decode step's logits
    are a view of the bound output: valid until the next send."""
    folder, graph = session.folder, session.graphs["model"]
    layout = kv_layout(folder, graph)
    seq = Sequence(prompts, steps, folder.pad_id(), right_pad=layout == KV_SHARED)
    with_positions = "position_ids" in graph.inputs
    if layout == "none":
        yield from _uncached_logits(session, seq, adapters, steps, with_positions)
        return
    cache = cache_names(graph)
    run, results, outputs = prefill(session, seq, adapters, layout)
    token = graph.to_device(seq.token)
    position = graph.to_device(seq.position) if with_positions else None
    run.bind({"input_ids": token, **({"position_ids": position} if with_positions else {})})
    logits = np.empty((seq.batch, 1, results["logits"].shape()[-1]), dtype=_numpy_type(graph, "logits"))
    outputs["logits"] = graph.to_device(logits)
    run.bind_outputs(outputs)  # from now on every step's logits are [batch, 1, vocab]
    chosen = yield seq.last(results["logits"].numpy())
    for step in range(1, steps):
        seq.push(chosen)
        token.update_inplace(seq.token)
        feeds = {"attention_mask": seq.attention_mask()}
        if with_positions:
            if step > 1:
                seq.position += 1
            position.update_inplace(seq.position)
        if layout == KV_CONCAT:
            feeds.update({cache[n]: results[n] for n in cache})
        results = run.step(feeds)
        chosen = yield results["logits"].numpy()[:, -1, :]


def prefill(session, seq: Sequence, adapters, layout: str, every_logit: bool = False):
    """The prompt's run on a cached layout: (its StepRun with the adapter bound, its results, the bound
    outputs). The concat layout's present.* come back as new OrtValues; the shared layout's KV
    buffers, of the run's full length, are bound as past and present. `every_logit`: logits for every
    prompt position (to score the prompt), not only the last ones a fused graph keeps by default."""
    folder, graph = session.folder, session.graphs["model"]
    cache = cache_names(graph)
    # a fused graph's `logits_to_keep`; a step's 1 column is kept by any k
    keep_logits = LOGITS_TO_KEEP in graph.initializer_inputs and not every_logit
    feeds = seq.prompt("position_ids" in graph.inputs, keep_logits)
    if layout == KV_SHARED:
        kv = {name: graph.to_device(a) for name, a in
              _full_cache(graph, seq.batch, seq.total, folder.dtype, folder.cache).items()}
        feeds.update(kv)
        outputs = {"logits": None, **{n: kv[past] for n, past in cache.items()}}
    else:
        feeds.update(empty_cache(graph, seq.batch, folder.dtype, folder.cache))
        outputs = {"logits": None, **dict.fromkeys(cache)}
    run = session.step_run("model", adapters, feeds)
    run.bind_outputs(outputs)
    return run, run.step(), outputs


def _uncached_logits(session, seq: Sequence, adapters, steps, with_positions: bool):
    """A graph without cache inputs: each step re-runs the whole sequence (views of the buffers)."""
    positions = position_ids(seq.mask)  # left-padded: the mask is known to its end, every new token counts
    feeds = seq.prompt(with_positions)
    run = session.step_run("model", adapters, feeds)
    run.bind_outputs({"logits": None})
    for step in range(steps):
        if step:
            feeds = {"input_ids": seq.ids[:, :seq.length], "attention_mask": seq.attention_mask()}
            if with_positions:
                feeds["position_ids"] = positions[:, :seq.length]
        chosen = yield run.step(feeds)["logits"].numpy()[:, -1, :]
        if step == steps - 1:
            return
        seq.push(chosen)


def _full_cache(graph, batch: int, length: int, dtype: str, cache: dict | None) -> dict:
    """Zeroed KV buffers of the run's full length for the shared layout: [batch, heads, length, head_dim]."""
    return {name: np.zeros((batch, value.shape[1], length, value.shape[3]), dtype=value.dtype)
            for name, value in empty_cache(graph, batch, dtype, cache).items()}


def _numpy_type(graph, output: str):
    """numpy type of a graph output, from ORT's type string ("tensor(float)")."""
    return of_ort(next(o.type for o in graph.session.get_outputs() if o.name == output)).np


def eos_ids(folder, options: GenerationOptions) -> set[int]:
    return set(options.eos_token_ids if options.eos_token_ids is not None else folder.eos_ids())


def folder_start(folder) -> int:
    """A seq2seq export's decoder start token (the manifest's tokens.decoder_start)."""
    start = folder.tokens.get("decoder_start")
    if start is None:
        raise IA3Error(f"{folder.path}: the manifest has no tokens.decoder_start; re-export the model")
    return int(start)


def _seq2seq_logits(session, prompts, adapters, steps):
    """Yields the decoder's last-position logits; receives each step's tokens."""
    folder = session.folder
    encoder, decoder = session.graphs["encoder"], session.graphs["decoder"]
    start = folder_start(folder)
    batch = len(prompts)
    ids, mask = _pad_right(prompts, folder.pad_id())
    hidden = session.run({"input_ids": ids, "attention_mask": mask}, graph="encoder", adapters=adapters,
                         outputs=[encoder.outputs[0]], as_numpy=False)[encoder.outputs[0]]
    use_cache = any(n.startswith(PAST) for n in decoder.inputs)
    tokens = np.full((batch, 1), int(start), dtype=np.int64)
    ids_name = "decoder_input_ids" if "decoder_input_ids" in decoder.inputs else "input_ids"
    mask_name = "encoder_attention_mask" if "encoder_attention_mask" in decoder.inputs else "attention_mask"
    feeds = {ids_name: tokens, mask_name: mask, "encoder_hidden_states": hidden}
    if use_cache:
        feeds.update(empty_cache(decoder, batch, folder.dtype, folder.cache))
    cache = cache_names(decoder)
    outputs = [decoder.outputs[0], *cache]
    run = session.step_run("decoder", adapters, feeds)  # the mask and the encoder's states stay bound
    run.bind_outputs(dict.fromkeys(outputs))
    feeds = {}
    for step in range(steps):
        results = run.step(feeds)
        token = np.array((yield results[outputs[0]].numpy()[:, -1, :]), dtype=np.int64)[:, None]
        if step == steps - 1:
            return
        tokens = np.concatenate([tokens, token], axis=1)
        feeds = {ids_name: token if use_cache else tokens}
        if use_cache:
            feeds.update({cache[n]: results[n] for n in cache})


def _pad_right(prompts, pad):
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = p
        mask[row, :len(p)] = 1
    return ids, mask
