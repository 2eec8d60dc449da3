"""Iteration-level ("continuous") batching on an IA3Session: one loop runs every active request as
one ONNX Runtime batch per decode step, admits new requests at step boundaries and retires finished
rows at once, so a short request never waits for a long one to end.

A request's prompt runs alone (its prefill: the same run, with the same numbers, as the request
alone), then its cache joins its group's batch: every row on a bank or merged export (a bank row
per request's adapter), one group per adapter on swappable and foldswap exports. Rows sit at
different lengths: in the concat layout (our traced graphs) each row's cache is right-aligned
behind left padding that the attention mask hides, with its own position ids; in the shared layout
(`--graph fused`, GroupQueryAttention) each row starts at column 0 of one buffer and the mask gives
each row's length. While a group keeps its rows the batch cache stays on the device; when rows join
or leave, it is split into each row's own cache and gathered again (the common left padding goes).
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
import math
import queue
import threading
import time
from typing import Callable

import numpy as np

from ..errors import IA3Error
from ..formats.manifest import KV_CONCAT, KV_SHARED
from .generation import (GenerationOptions, RowStop, Sequence, TokenChooser, cache_names, eos_ids, is_int, is_real,
                         kv_layout, new_token_budget, prefill)


@dataclasses.dataclass
class Request:
    """Prompt token ids (or text, encoded with the folder's tokenizer), the adapter (None: the base
    model), the options, and a timeout in seconds from submit (past it: finish reason "deadline")."""

    prompt: list[int] | str
    adapter: str | None = None
    options: GenerationOptions = dataclasses.field(default_factory=GenerationOptions)
    timeout: float | None = None


@dataclasses.dataclass
class Result:
    """New tokens (the EOS or the token that completed a stop string included), their text where the
    folder has a tokenizer, why generation ended (stop, length, deadline, cancelled or error), what
    went wrong for "error", and the prompt's length in tokens."""

    tokens: list[int]
    text: str | None
    finish_reason: str
    error: str | None = None
    prompt_tokens: int = 0


class Handle:
    """A submitted request. Iterate it (one consumer) for its tokens as they are chosen; `result()`
    waits for the end. `on_event`, given to submit, is called on the engine's thread with each token
    (an int) and then the Result: keep it short (e.g. `loop.call_soon_threadsafe`)."""

    def __init__(self, on_event: Callable | None):
        self.tokens: list[int] = []
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

    def __init__(self, handle, prompt, adapter, options, max_new, stop, deadline):
        self.handle, self.prompt, self.adapter, self.max_new = handle, prompt, adapter, max_new
        self.choose, self.stop, self.deadline = TokenChooser(options), stop, deadline
        self.need = len(prompt) + max_new  # KV tokens it may hold; the shared layout's buffer length
        self.kv = None  # its own cache (past name -> [1, heads, seen, dim]) while outside a batch
        self.seen = 0  # tokens whose keys and values are cached
        self.pending = None  # the chosen token the next step feeds
        self.admitted = False  # holds its share of the KV budget


class _Group:
    """Rows that run as one batch, and the batch's cache (past name -> device value), mask and StepRun."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.kv = self.mask = self.run = None


class Engine:
    """Continuous batching over `session` (see the module docstring). Drive it with `step()` until it
    returns False (tests, benchmarks), or `start()` its loop thread (or use it as a context manager);
    `submit` is thread-safe."""

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
        self.groups: dict = {}  # adapter name (None: every row) -> _Group
        self.kv_tokens = 0  # sum of the active rows' needs
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
        max_new = new_token_budget(session.folder, len(prompt), options.max_new_tokens, False, session.limits.max_new_tokens)
        decode = session.tokenizer().decode if options.stop_strings else None
        stop = RowStop(eos_ids(session.folder, options), options.stop_strings, decode)
        row = _Row(Handle(on_event), prompt, request.adapter, options, max_new, stop,
                   None if timeout is None else self.clock() + timeout)
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
        return sum(len(g.rows) for g in self.groups.values())

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: retire cancelled and timed-out requests, admit what fits from the queue (each
        prefill gives its first token), then one decode step per group. Returns whether requests remain."""
        with self._step_lock:
            now = self.clock()
            with self._lock:
                waiting = list(self._queue)
            for row in waiting + [r for g in self.groups.values() for r in g.rows]:
                if row.handle.cancelled or (row.deadline is not None and now >= row.deadline):
                    reason = "error" if row.handle.error else "cancelled" if row.handle.cancelled else "deadline"
                    self._finish(row, reason, row.handle.error)
            for row in self._admit():
                self._guarded([row], self._prefill, row)
            for group in list(self.groups.values()):
                if group.rows:
                    self._guarded(group.rows, self._decode, group)
            with self._lock:
                return bool(self._queue) or self.active > 0

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
            while (self._queue and self.active + len(admitted) < self.max_batch
                   and self.kv_tokens + self._queue[0].need <= self.kv_token_budget):
                row = self._queue.popleft()
                row.admitted = True
                self.kv_tokens += row.need
                admitted.append(row)
        return admitted

    def _prefill(self, row: _Row) -> None:
        """The prompt alone (as the request alone would run it); its cache then joins its group."""
        seq = Sequence([row.prompt], row.max_new, self.session.folder.pad_id(), right_pad=self.layout == KV_SHARED)
        _, results, _ = prefill(self.session, seq, [row.adapter], self.layout)
        row.seen = len(row.prompt)
        # a copy: numpy() is a view, and the shared layout's buffer goes with the prefill's run
        row.kv = {past: results[name].numpy()[:, :, :row.seen].copy() for name, past in self.cache.items()}
        if self._advance(row, row.choose(seq.last(results["logits"].numpy()))[0]):
            group = self.groups.setdefault(None if self.session.binding.mixes_adapters else row.adapter, _Group())
            self._split(group)
            group.rows.append(row)

    def _decode(self, group: _Group) -> None:
        """One step of every row in the group as one batch; rows that end leave it."""
        if group.kv is None:
            for row in [r for r in group.rows if r.adapter is not None and r.adapter not in self.session.adapters]:
                self._finish(row, "error", f"adapter {row.adapter!r} was unloaded while the request ran; submit it again")
            if not group.rows:
                return
            self._gather(group)
        rows, layout = group.rows, self.layout
        feeds = {"input_ids": np.array([[r.pending] for r in rows], np.int64)}
        if self.with_positions:
            feeds["position_ids"] = np.array([[r.seen] for r in rows], np.int64)
        if layout == KV_CONCAT:
            group.mask = np.concatenate([group.mask, np.ones((len(rows), 1), np.int64)], axis=1)
            feeds["attention_mask"] = group.mask
        else:
            group.mask[np.arange(len(rows)), [r.seen for r in rows]] = 1
            feeds["attention_mask"] = group.mask[:, :max(r.seen for r in rows) + 1]
        if group.run is None:
            group.run = self.session.step_run("model", [r.adapter for r in rows], {**feeds, **group.kv})
            group.run.bind_outputs({"logits": None, **{n: group.kv[p] if layout == KV_SHARED else None
                                                       for n, p in self.cache.items()}})
            results = group.run.step()
        else:
            results = group.run.step({**feeds, **(group.kv if layout == KV_CONCAT else {})})
        if layout == KV_CONCAT:
            group.kv = {past: results[name] for name, past in self.cache.items()}
        for row in rows:
            row.seen += 1
        logits = results["logits"].numpy()[:, -1, :]
        for i, row in enumerate(list(rows)):  # a row that ends leaves group.rows (the cache split first)
            self._advance(row, row.choose(logits[i:i + 1])[0])

    def _advance(self, row: _Row, token) -> bool:
        """Hand the token to the request; False (and the request finished) where it ends there."""
        token = int(token)
        row.handle._emit(token)
        stopped = row.stop(token)
        if stopped or len(row.handle.tokens) >= row.max_new:
            self._finish(row, "stop" if stopped else "length")
            return False
        row.pending = token
        return True

    def _split(self, group: _Group) -> None:
        """Copy the batch cache out into each row's own cache, before the group's rows change."""
        if group.kv is None:
            return
        arrays = {past: value.numpy() for past, value in group.kv.items()}  # a view on the CPU, a copy from CUDA
        width = next(iter(arrays.values())).shape[2]
        for i, row in enumerate(group.rows):
            cols = slice(width - row.seen, width) if self.layout == KV_CONCAT else slice(0, row.seen)
            row.kv = {past: a[i:i + 1, :, cols].copy() for past, a in arrays.items()}
        group.kv = group.mask = group.run = None

    def _gather(self, group: _Group) -> None:
        """One batch cache from the rows' own: the concat layout right-aligns rows to the longest (left
        padding, masked); the shared layout starts every row at column 0 of a buffer as long as the
        longest need."""
        rows, concat = group.rows, self.layout == KV_CONCAT
        width = max(r.seen if concat else r.need for r in rows)
        group.mask = np.zeros((len(rows), width), np.int64)
        group.kv = {}
        for past, first in rows[0].kv.items():
            batch = np.zeros((len(rows), first.shape[1], width, first.shape[3]), first.dtype)
            for i, row in enumerate(rows):
                cols = slice(width - row.seen, width) if concat else slice(0, row.seen)
                batch[i, :, cols] = row.kv[past][0]
                group.mask[i, cols] = 1
            group.kv[past] = self.graph.to_device(batch)
        for row in rows:
            row.kv = None

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        """End a request (queued or active): its result, its budget and its row go at once."""
        with self._lock:
            if row in self._queue:
                self._queue.remove(row)
            elif row.admitted:
                self.kv_tokens -= row.need
                row.admitted = False
        for group in self.groups.values():
            if row in group.rows:
                self._split(group)
                group.rows.remove(row)
        tokens = list(row.handle.tokens)
        text = self._tokenizer.decode(tokens) if self._tokenizer else None
        row.handle._emit(Result(tokens, text, reason, error, len(row.prompt)))

    def _guarded(self, rows: list[_Row], work, *args) -> None:
        """Run a prefill or a group's step; a failure ends the requests it concerns, never the loop."""
        try:
            work(*args)
        except Exception as e:
            message = str(e) if isinstance(e, IA3Error) else f"{type(e).__name__}: {e}"
            for row in list(rows):
                if not row.handle.done:
                    self._finish(row, "error", message)
