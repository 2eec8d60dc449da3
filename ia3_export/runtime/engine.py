"""Iteration-level ("continuous") batching on an IA3Session: one loop runs every active request as
one ONNX Runtime batch per decode step, admits new requests at step boundaries and retires finished
rows at once, so a short request never waits for a long one to end.

Prompts admitted at one step boundary prefill together, one run per group (left-padded in the
concat layout, with mask and position ids as transformers builds them; right-padded in the shared
one, each row's length from the mask); each row's cache then joins its group's batch: every row on
a bank or merged export (a bank row per request's adapter), one group per adapter on swappable and
foldswap exports. A group's batch cache is a set of host arrays (on the CPU, the very memory ONNX
Runtime reads and writes), one slot per row. Rows sit at different lengths: in the concat layout
(our traced graphs) each row's cache is right-aligned behind left padding that the mask hides, with
its own position ids; in the shared layout (`--graph fused`, GroupQueryAttention) each row starts at
column 0 of one buffer of capacity rows x capacity length (grown geometrically, bound as past and
present) and the mask gives each row's length. A row that ends frees its slot; at the next step
boundary a joining row's prompt cache is written into a free slot, the free slots left are filled by
moving the last rows down, and the arrays are copied only when they lack room (more rows, a longer
prompt or need) or when the common left padding passes a quarter of the width (trimmed: every later
step of the concat graph reads and copies each column, so a trim pays for itself within a few steps).
Each request keeps its own TokenChooser (its seeded RNG), EOS and stop strings, so its tokens are
those of the same request run alone (up to float rounding of a batched run: near-ties can flip).
Bounded: `max_queue` waiting requests (past it `submit` says busy), `max_batch` active rows, a KV
budget in tokens (prompt + max_new_tokens summed over active rows: a request that does not fit
waits, one that never can is refused), a per-request timeout, and `cancel()` freeing its row at the
next step boundary.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import queue
import threading
import time
from typing import Callable

import numpy as np

from ..errors import IA3Error
from ..formats.manifest import KV_CONCAT, KV_SHARED
from .generation import (MAX_LOGPROBS, GenerationOptions, RowStop, Sequence, TokenChooser, cache_names,
                         check_logit_bias, empty_cache, eos_ids, is_int, is_real, kv_layout, new_token_budget, prefill,
                         token_logprobs)

TRIM_FRACTION = 4  # concat: the cache is trimmed once its common left padding passes 1/4 of its width


@dataclasses.dataclass
class Request:
    """Prompt token ids (or text, encoded with the folder's tokenizer), the adapter (None: the base
    model), the options, a timeout in seconds from submit (past it: finish reason "deadline") and, where
    asked, how many alternatives' log-probabilities each new token reports (`Handle.logprobs`) and each
    prompt token (`Handle.prompt_logprobs`: what scoring a text needs, as lm-eval's loglikelihood)."""

    prompt: list[int] | str
    adapter: str | None = None
    options: GenerationOptions = dataclasses.field(default_factory=GenerationOptions)
    timeout: float | None = None
    logprobs: int | None = None  # 0..MAX_LOGPROBS: each token's log-probability and this many alternatives'
    prompt_logprobs: int | None = None  # 0..MAX_LOGPROBS: the same for each prompt token after the first


@dataclasses.dataclass
class Result:
    """New tokens (the EOS or the token that completed a stop string included), why generation ended
    (stop, length, deadline, cancelled or error), what went wrong for "error", the prompt's length in
    tokens, and `text` where the folder has a tokenizer: decoded when first read, on the reader's
    thread (a decode is a call to the tokenizer's child process: not on the engine's loop)."""

    tokens: list[int]
    finish_reason: str
    error: str | None = None
    prompt_tokens: int = 0
    decode: Callable[[list[int]], str] | None = dataclasses.field(default=None, repr=False, compare=False)

    @functools.cached_property
    def text(self) -> str | None:
        return self.decode(self.tokens) if self.decode is not None else None


class Handle:
    """A submitted request. Iterate it (one consumer) for its tokens as they are chosen; `result()`
    waits for the end. `on_event`, given to submit, is called on the engine's thread with each token
    (an int) and then the Result: keep it short (e.g. `loop.call_soon_threadsafe`)."""

    def __init__(self, on_event: Callable | None):
        self.tokens: list[int] = []
        self.logprobs: list = []  # with Request.logprobs: per token, (its log-probability, [(id, log-prob), ...])
        # with Request.prompt_logprobs, set before the first token: per prompt token, the same (None for the first)
        self.prompt_logprobs: list | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._on_event, self._done, self._result = on_event, threading.Event(), None
        self.cancelled, self.error = False, None

    def cancel(self) -> None:
        """Stop generating: the row is freed at the next step boundary (finish reason "cancelled")."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise IA3Error(f"the request has not finished within {timeout} s; wait longer or cancel() it")
        return self._result

    def __iter__(self):
        while not isinstance(event := self._events.get(), Result):
            yield event

    def _emit(self, event) -> None:
        if isinstance(event, Result):
            self._result = event
            self._done.set()
        else:
            self.tokens.append(event)
        self._events.put(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception as e:  # a broken consumer ends its own request, not the loop
                self.error, self.cancelled = f"the on_event callback raised {type(e).__name__}: {e}", True


class _Row:
    """An admitted (or queued) request: its handle, chooser, stop rule, KV need and cache position."""

    def __init__(self, handle, prompt, adapter, options, max_new, stop, deadline, logprobs=None, prompt_logprobs=None):
        self.handle, self.prompt, self.adapter, self.max_new = handle, prompt, adapter, max_new
        self.logprobs = logprobs  # alternatives per token whose log-probabilities the request asked for
        self.prompt_logprobs = prompt_logprobs  # the same, for its prompt's tokens
        self.choose, self.stop, self.deadline = TokenChooser(options, [prompt], stop.eos), stop, deadline
        self.need = len(prompt) + max_new  # KV tokens it may hold; the shared layout's buffer length
        self.kv = None  # between its prefill and its join: (the prefill's outputs, past name -> [heads, seen, dim] view)
        self.seen = 0  # tokens whose keys and values are cached
        self.pending = None  # the chosen token the next step feeds
        self.admitted = False  # holds its share of the KV budget


class _Group:
    """Rows that run as one batch: `slots` (a row, or None where a row ended: free until the next step
    boundary), the batch cache `kv` (past name -> the OrtValue the graph reads) and `host` (the same as
    host arrays [rows, heads, width, dim]: on the CPU its very memory), `width` (concat: the cache's
    columns; shared: the buffer's), `owner` (the outputs whose memory `host` views) and the StepRun,
    rebuilt when the slots change."""

    def __init__(self):
        self.slots: list[_Row | None] = []
        self.joining: list[_Row] = []  # prefilled this step, placed before the decode
        self.kv = self.host = self.owner = self.run = None
        self.width = 0

    @property
    def rows(self) -> list[_Row]:
        return [r for r in self.slots if r is not None]


class Engine:
    """Continuous batching over `session` (see the module docstring). Drive it with `step()` until it
    returns False (tests, benchmarks), or `start()` its loop thread (or use it as a context manager);
    `submit` is thread-safe. `stats` counts prefill and decode runs and new batch arrays (cache_copies);
    `after_step` callables run on the engine's thread after each step, and after its prefills when it
    has any, so that first tokens do not wait for the batch's decode run (a server's relay flushes the
    events to its event loop there: serve/streaming.py)."""

    def __init__(self, session, max_batch: int = 8, max_queue: int = 64, kv_token_budget: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        graph = session.graphs.get("model")
        self.layout = kv_layout(session.folder, graph) if graph is not None and "logits" in graph.outputs else None
        if self.layout not in (KV_CONCAT, KV_SHARED):
            raise IA3Error(f"{session.folder.path} is a {session.folder.task or 'non-generative'} export without a "
                           "decoder KV cache; the engine runs causal-lm exports (IA3Session.generate runs the others)")
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("kv_token_budget", kv_token_budget)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise IA3Error(f"{name} must be an integer of at least 1, got {value!r}")
        self.session, self.graph, self.cache = session, graph, cache_names(graph)
        self.max_batch, self.max_queue, self.clock = max_batch, max_queue, clock
        self.kv_token_budget = kv_token_budget or max_batch * (session.folder.max_positions or 4096)
        self.with_positions = "position_ids" in graph.inputs
        self._empty = empty_cache(graph, 1, session.folder.dtype, session.folder.cache)  # each past's shape and type
        self.stats = {"prefill_runs": 0, "decode_runs": 0, "cache_copies": 0}  # ONNX Runtime runs; new batch arrays
        self.after_step: list[Callable[[], None]] = []
        self.groups: dict = {}  # adapter name (None: every row) -> _Group
        self.kv_tokens = 0  # sum of the active rows' needs
        self._active = 0  # admitted rows not yet finished (read per token by the server: a counter)
        self._queue: collections.deque[_Row] = collections.deque()
        self._lock, self._step_lock = threading.Lock(), threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed, self._thread = False, None
        try:
            self._tokenizer = session.tokenizer()
        except IA3Error:  # a folder without tokenizer.json: token ids in and out, no text
            self._tokenizer = None

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: Request, on_event: Callable | None = None) -> Handle:
        """Queue a request (checked here: a bad one raises IA3Error); returns its handle at once."""
        session, options = self.session, request.options
        if not isinstance(options, GenerationOptions):
            raise IA3Error(f"options must be a GenerationOptions, got {type(options).__name__}")
        prompt = session.tokenizer().encode(request.prompt) if isinstance(request.prompt, str) else list(request.prompt)
        if not prompt:
            raise IA3Error("every prompt needs at least one token")
        if not all(is_int(t) for t in prompt):
            raise IA3Error(f"a prompt is text or a list of integer token ids, got {prompt[:8]!r}")
        if request.adapter is not None:
            if not session.binding.takes_adapters:
                raise IA3Error(f"{session.folder.path} is a merged export (its adapter is folded into the weights); "
                               f"send requests without an adapter, or export with --mode bank to serve {request.adapter!r}")
            session.require_loaded(request.adapter)
        timeout = request.timeout
        if timeout is not None and (not is_real(timeout) or not math.isfinite(timeout) or timeout < 0):
            raise IA3Error(f"timeout must be a number of seconds >= 0 (or None), got {timeout!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(request, name)
            if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise IA3Error(f"{name} must be an integer from 0 to {MAX_LOGPROBS} (or None), got {value!r}")
        max_new = new_token_budget(session.folder, len(prompt), options.max_new_tokens, False, session.limits)
        check_logit_bias(options, session.folder.config.get("vocab_size"))
        decode = session.tokenizer().decode if options.stop_strings else None
        stop = RowStop(eos_ids(session.folder, options), options, decode)
        row = _Row(Handle(on_event), prompt, request.adapter, options, max_new, stop,
                   None if timeout is None else self.clock() + timeout, request.logprobs, request.prompt_logprobs)
        if row.need > self.kv_token_budget:
            raise IA3Error(f"the request needs {row.need} KV tokens (prompt {len(prompt)} + max_new_tokens {max_new}), "
                           f"more than the engine's kv_token_budget of {self.kv_token_budget}; shorten it or raise the budget")
        with self._lock:
            if self._closed:
                raise IA3Error("the engine is closed; start a new Engine to submit requests")
            if len(self._queue) >= self.max_queue:
                raise IA3Error(f"busy: {len(self._queue)} requests queued, the limit is {self.max_queue}; retry later")
            self._queue.append(row)
            self._wake.notify()
        return row.handle

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: retire cancelled and timed-out requests, admit what fits from the queue and
        prefill it (one run per group; each row's first token), place the new rows in their groups'
        batches, then one decode step per group. Returns whether requests remain."""
        with self._step_lock:
            now = self.clock()
            with self._lock:
                waiting = list(self._queue)
            for row in waiting + [r for g in self.groups.values() for r in g.rows]:
                if row.handle.cancelled or (row.deadline is not None and now >= row.deadline):
                    reason = "error" if row.handle.error else "cancelled" if row.handle.cancelled else "deadline"
                    self._finish(row, reason, row.handle.error)
            batches: dict = {}
            for row in self._admit():
                batches.setdefault(self._key(row), []).append(row)
            for rows in batches.values():
                self._prefill_batch(rows)
            if batches:
                self._after_step()
            for group in list(self.groups.values()):
                if group.joining or None in group.slots:
                    self._guarded(group.rows + group.joining, self._place, group)
                if group.slots:
                    self._guarded(group.rows, self._decode, group)
                if not group.rows:
                    self._release(group)
            self._after_step()
            with self._lock:
                return bool(self._queue) or self.active > 0

    def _after_step(self) -> None:
        for hook in self.after_step:
            hook()

    def start(self) -> "Engine":
        """Run `step()` on a daemon thread until `close()`; it sleeps while nothing is queued or active."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ia3-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, cancel: bool = False) -> None:
        """Refuse new requests, finish (or with cancel=True, cancel) those already in, stop the thread."""
        with self._lock:
            self._closed = True
            rows = list(self._queue) + [r for g in self.groups.values() for r in g.rows]
            self._wake.notify()
        if cancel:
            for row in rows:
                row.handle.cancel()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self.active and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue and not self.active:
                    return
            self.step()

    # -- rows and groups -------------------------------------------------------------------------
    def _admit(self) -> list[_Row]:
        """Queued rows, in order, while the batch and the KV budget have room."""
        admitted = []
        with self._lock:
            while (self._queue and self._active < self.max_batch
                   and self.kv_tokens + self._queue[0].need <= self.kv_token_budget):
                row = self._queue.popleft()
                row.admitted = True
                self.kv_tokens += row.need
                self._active += 1
                admitted.append(row)
        return admitted

    def _key(self, row: _Row):
        """The row's group: every row on an export whose batch mixes adapters, else its adapter's."""
        return None if self.session.binding.mixes_adapters else row.adapter

    def _prefill_batch(self, rows: list[_Row]) -> None:
        """One prefill for the rows of one group; where it fails, each row alone, so a bad prompt (a
        token id past the vocabulary) ends its own request, not those that arrived with it. A row that
        scores its prompt runs alone: its logits at every position stay one prompt's, never a batch's."""
        alone = [r for r in rows if r.prompt_logprobs is not None]
        batch = [r for r in rows if r.prompt_logprobs is None]
        if len(batch) > 1:
            try:
                self._prefill(batch)
                batch = []
            except Exception:  # noqa: BLE001 - retried row by row just below, where the error is reported
                pass
        for row in batch + alone:
            self._guarded([row], self._prefill, [row])

    def _prefill(self, rows: list[_Row]) -> None:
        """The prompts in one run, padded as the layout needs (left: concat, right: shared): each row's
        first token, and its prompt's cache (views of the run's outputs, which `_place` copies into
        the batch within the step)."""
        concat = self.layout == KV_CONCAT
        seq = Sequence([r.prompt for r in rows], 0, self.session.folder.pad_id(), right_pad=not concat)
        scored = rows[0].prompt_logprobs  # such a row runs alone
        _, results, bound = prefill(self.session, seq, [r.adapter for r in rows], self.layout,
                                    every_logit=scored is not None)
        self.stats["prefill_runs"] += 1
        if scored is not None:  # position p's logits give token p + 1's log-probability
            every, prompt = results["logits"].numpy()[0], rows[0].prompt
            rows[0].handle.prompt_logprobs = [None] + [token_logprobs(every[p], t, scored)
                                                       for p, t in enumerate(prompt[1:])]
        logits = seq.last(results["logits"].numpy())
        self._logits = logits.shape[1:], logits.dtype  # a decode step's logits: [rows, 1, vocab] of this type
        arrays = {past: results[name].numpy() for name, past in self.cache.items()}
        group = self.groups.setdefault(self._key(rows[0]), _Group())
        for i, (row, token) in enumerate(zip(rows, self._choose(rows, logits))):
            row.seen = len(row.prompt)
            cols = slice(seq.length - row.seen, seq.length) if concat else slice(0, row.seen)
            # with the outputs and the values bound to them (the shared layout's buffers): kept alive
            row.kv = ((results, bound), {past: a[i, :, cols] for past, a in arrays.items()})
            if self._advance(row, token, logits[i]):
                group.joining.append(row)

    def _place(self, group: _Group) -> None:
        """Membership changes at a step boundary: rows whose adapter was unloaded end; the joining
        rows take the free slots (then go after the last); the last rows move down into the free
        slots left. Their caches are copied row by row into the batch's arrays where these have room
        (rows, columns; concat: left padding at most a quarter of the width), else into new ones (counted in
        stats["cache_copies"]): concat as wide as the longest row, shared with geometric headroom."""
        for row in group.rows + group.joining:
            if row.adapter is not None and row.adapter not in self.session.adapters:
                self._finish(row, "error", f"adapter {row.adapter!r} was unloaded while the request ran; submit it again")
        joining, group.joining = group.joining, []
        before = {id(r): i for i, r in enumerate(group.slots) if r is not None}
        slots, holes = group.slots, [i for i, r in enumerate(group.slots) if r is None]
        for row in joining:
            if holes:
                slots[holes.pop(0)] = row
            else:
                slots.append(row)
        for hole in holes:  # above every joined row: the rows moved down are older ones
            while slots and slots[-1] is None:
                slots.pop()
            if hole < len(slots):
                slots[hole] = slots.pop()
        while slots and slots[-1] is None:
            slots.pop()
        group.run = None
        if not slots:
            return self._release(group)
        concat, host = self.layout == KV_CONCAT, self._host(group)
        longest = max(r.seen for r in slots) if concat else max(r.need for r in slots)
        fits = host is not None and len(slots) <= next(iter(host.values())).shape[0] and longest <= group.width
        if concat:
            fits = fits and (group.width - longest) * TRIM_FRACTION <= group.width
        if fits:
            target, width = host, group.width
            moved = [(i, r) for i, r in enumerate(slots) if id(r) in before and before[id(r)] != i]
        else:
            rows, width = len(slots), longest
            if not concat:
                rows = max(rows, min(self.max_batch, 2 * len(slots)))
                width = max(width, min(group.width * 3 // 2, self.session.folder.max_positions or width))
            target = {past: np.zeros((rows, a.shape[1], width, a.shape[3]), a.dtype) for past, a in self._empty.items()}
            moved = [(i, r) for i, r in enumerate(slots) if id(r) in before]
            self.stats["cache_copies"] += 1
        for i, row in moved:
            cols, old = self._cols(row, width), self._cols(row, group.width)
            for past, a in target.items():
                a[i, :, cols] = host[past][before[id(row)], :, old]
        for row in joining:
            if row in slots:
                i, (_, kv) = slots.index(row), row.kv
                for past, a in target.items():
                    a[i, :, self._cols(row, width)] = kv[past]
            row.kv = None
        if target is not host:
            group.owner = None  # the old arrays go once copied
        group.host, group.width = target, width
        group.kv = {past: self.graph.to_device(a[:len(slots)]) for past, a in target.items()}

    @staticmethod
    def _release(group: _Group) -> None:
        """A group without rows lets its arrays go."""
        group.slots, group.kv, group.host, group.owner, group.run, group.width = [], None, None, None, None, 0

    def _cols(self, row: _Row, width: int) -> slice:
        """The columns a row's cache fills: right-aligned (concat) or from 0 (shared)."""
        return slice(width - row.seen, width) if self.layout == KV_CONCAT else slice(0, row.seen)

    def _host(self, group: _Group) -> dict | None:
        """The batch cache as host arrays to edit in place: on the CPU the memory ONNX Runtime reads
        (no copy), on another device a copy downloaded (then uploaded again by `_place`)."""
        if group.kv is None:
            return None
        return group.host if self.graph.device[0] == "cpu" else {p: v.numpy() for p, v in group.kv.items()}

    def _decode(self, group: _Group) -> None:
        """One step of every row in the group as one batch (every slot holds a row: `_place` filled the
        free ones); rows that end leave their slot free."""
        rows, concat = list(group.slots), self.layout == KV_CONCAT
        seen = np.array([r.seen for r in rows], np.int64)[:, None]
        feeds = {"input_ids": np.array([[r.pending] for r in rows], np.int64)}
        if self.with_positions:
            feeds["position_ids"] = seen
        if concat:  # right-aligned rows: the last `seen` columns and the new one
            feeds["attention_mask"] = (np.arange(group.width + 1) >= group.width - seen).astype(np.int64)
        else:  # from column 0: `seen` columns and the new one
            feeds["attention_mask"] = (np.arange(int(seen.max()) + 1) <= seen).astype(np.int64)
        if group.run is None:
            group.run = self.session.step_run("model", [r.adapter for r in rows], {**feeds, **group.kv})
            # shared: every output bound once (the logits too), so a step neither re-binds nor wraps outputs
            logits = None if concat else self.graph.to_device(np.empty((len(rows), 1, *self._logits[0]), self._logits[1]))
            group.run.bind_outputs({"logits": logits, **{n: None if concat else group.kv[p] for n, p in self.cache.items()}})
            results = group.run.step()
        else:
            results = group.run.step({**feeds, **(group.kv if concat else {})})
        self.stats["decode_runs"] += 1
        if concat:  # this step's outputs are the next step's cache (their memory: the host arrays on the CPU)
            group.owner, group.width = results, group.width + 1
            group.kv = {past: results[name] for name, past in self.cache.items()}
            group.host = {past: v.numpy() for past, v in group.kv.items()} if self.graph.device[0] == "cpu" else None
        for row in rows:
            row.seen += 1
        logits = results["logits"].numpy()[:, -1, :]
        for i, (row, token) in enumerate(zip(rows, self._choose(rows, logits))):
            self._advance(row, token, logits[i])  # a row that ends frees its slot

    @staticmethod
    def _choose(rows: list[_Row], logits: np.ndarray) -> list[int]:
        """Each row's token from its logits: one argmax for the plain greedy rows; a sampled row (its own RNG)
        or one with logits processors (its own history) through its chooser."""
        greedy = logits.argmax(-1).tolist()
        return [greedy[i] if row.choose.plain else row.choose(logits[i:i + 1])[0] for i, row in enumerate(rows)]

    def _advance(self, row: _Row, token, logits: np.ndarray) -> bool:
        """Hand the token (with its log-probabilities, where asked, from its row's `logits`) to the request;
        False (and the request finished) where it ends there."""
        token = int(token)
        if row.logprobs is not None:  # before the token: a reader that has the token has its entry
            row.handle.logprobs.append(token_logprobs(logits, token, row.logprobs))
        row.handle._emit(token)
        stopped = row.stop(token)
        if stopped or len(row.handle.tokens) >= row.max_new:
            self._finish(row, "stop" if stopped else "length")
            return False
        row.pending = token
        return True

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        """End a request (queued or active): its result, its budget and its row go at once."""
        with self._lock:
            if row in self._queue:
                self._queue.remove(row)
            elif row.admitted:
                self.kv_tokens -= row.need
                self._active -= 1
                row.admitted = False
        for group in self.groups.values():
            if row in group.slots:
                group.slots[group.slots.index(row)] = None
            if row in group.joining:
                group.joining.remove(row)
        decode = self._tokenizer.decode if self._tokenizer else None
        row.handle._emit(Result(list(row.handle.tokens), reason, error, len(row.prompt), decode))

    def _guarded(self, rows: list[_Row], work, *args) -> None:
        """Run a prefill or a group's step; a failure ends the requests it concerns, never the loop."""
        try:
            work(*args)
        except Exception as e:
            message = str(e) if isinstance(e, IA3Error) else f"{type(e).__name__}: {e}"
            for row in list(rows):
                if not row.handle.done:
                    self._finish(row, "error", message)
