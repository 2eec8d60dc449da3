"""An exported folder on ONNX Runtime, with adapters that switch without touching the weights.

Every graph runs through a persistent IOBinding (one per thread), on the CPU and on CUDA alike:
adapter vectors are OrtValues placed on the device once, at load, and a switch only re-binds them
(`bind_ortvalue_input`), so nothing is copied from the host. (`run_with_iobinding` ignores
RunOptions adapters, which is why adapters are bound, not passed as `LoraAdapter`s.) The KV cache
stays on the device between generation steps for the same reason.

A session is thread-safe: one session serves requests from several threads, each with its own
adapter. Every thread gets its own IOBinding per graph (ORT's `run_with_iobinding` is safe to call
concurrently with distinct bindings) and re-binds an adapter's device vectors only when its binding
holds another adapter; loading, unloading and bank rebuilds are serialized by a lock and publish
immutable snapshots, so a run never sees half of a change. Measured against one lock around
bind+run in scripts/bench_concurrency.py (docs/errors.md, "Concurrency").
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np

from ..errors import IA3Error, quoted
from ..formats.onnx_graph import check_graph
from ..ort import onnxruntime, session_options as default_session_options
from . import adapters as adapter_io
from .bindings import Adapter, binding_class
from .folder import ExportedFolder, open_folder
from .requests import NUMERIC_FIELDS, SAMPLING_FIELDS, Limits, register

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


ACTIVE = type("ActiveAdapter", (), {"__repr__": lambda self: "ACTIVE"})()  # "whichever set_adapter chose"


class Graph:
    """One InferenceSession; each thread has its own IOBinding, whose inputs keep their last value."""

    def __init__(self, path: str, provider: str, options=None, provider_options: dict | None = None):
        ort = onnxruntime()
        self._ort = ort
        check_graph(path)  # external data confined to the folder, whatever ONNX Runtime's version checks
        if options is None:  # quiet: vectors are initializers AND inputs on purpose, ORT warns about each
            options = default_session_options()
        try:
            providers = [(PROVIDERS[provider], provider_options)] if provider_options else [PROVIDERS[provider]]
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as e:  # ORT raises bare RuntimeErrors (Fail, InvalidGraph, NoSuchFile)
            raise IA3Error(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]}); re-export the model") from None
        if PROVIDERS[provider] not in self.session.get_providers():  # ORT falls back to the CPU, saying so only in its log
            raise IA3Error(f"{path}: ONNX Runtime could not start {PROVIDERS[provider]} and fell back to "
                           f"{', '.join(self.session.get_providers())}; rerun with --debug (or IA3_EXPORT_DEBUG=1) "
                           "for its log (CUDA or cuDNN libraries missing?), or use --provider cpu")
        self.device = ("cuda", 0) if provider == "cuda" else ("cpu", 0)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.initializer_inputs = {i.name: i for i in self.session.get_overridable_initializers()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._local = threading.local()

    def _state(self) -> "_ThreadBinding":
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadBinding(self.session.io_binding())
        return state

    @property
    def binding(self):
        """The calling thread's IOBinding."""
        return self._state().binding

    def to_device(self, array: np.ndarray):
        """An OrtValue on this graph's device (on the CPU it borrows `array`: keep that alive)."""
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), *self.device)

    def bind(self, name: str, value, keep_alive=None) -> None:
        """Bind an input (numpy array or OrtValue) on this thread's binding; `keep_alive` is whatever
        its memory depends on."""
        self._bind(self._state(), name, value, keep_alive)

    def _bind(self, state: "_ThreadBinding", name: str, value, keep_alive=None) -> None:
        if isinstance(value, np.ndarray):
            keep_alive = np.ascontiguousarray(value)
            value = self.to_device(keep_alive)
        state.held[name] = (value, keep_alive)
        state.binding.bind_ortvalue_input(name, value)
        if name in state.set_names:  # a fed value replaces part of the bound set
            state.set_key = None

    def bind_set(self, key, values: dict[str, tuple]) -> None:
        """Bind a set of device values (an adapter's vectors, a bank snapshot) on this thread's binding,
        unless it already holds exactly this set: a switch costs nothing when nothing changed."""
        state = self._state()
        if state.set_key is key:
            return
        for name, (value, keep_alive) in values.items():
            state.held[name] = (value, keep_alive)
            state.binding.bind_ortvalue_input(name, value)
        state.set_key, state.set_names = key, frozenset(values)

    def own_binding(self) -> "_ThreadBinding":
        """A new IOBinding holding what this thread's binding holds (adapter vectors, bank, weights)."""
        state = _ThreadBinding(self.session.io_binding())
        for name, (value, keep_alive) in self._state().held.items():
            self._bind(state, name, value, keep_alive)
        return state

    def missing(self, feeds: dict) -> list[str]:
        """Inputs neither in `feeds` nor bound on this thread's binding."""
        held = self._state().held
        return [n for n in self.inputs if n not in feeds and n not in held]

    def run(self, feeds: dict, outputs: list[str] | None = None) -> dict:
        """Bind `feeds` (numpy arrays or OrtValues), run, return output name -> OrtValue on the device.
        Called once per generated token: the calling thread's state is looked up once."""
        state = self._state()
        for name, value in feeds.items():
            self._bind(state, name, value)
        binding = state.binding
        outputs = outputs or self.outputs
        binding.clear_binding_outputs()
        for name in outputs:
            binding.bind_output(name, *self.device)
        self.run_binding(binding)
        return dict(zip(outputs, binding.get_outputs()))

    def run_binding(self, binding) -> None:
        """Run on a bound IOBinding; ONNX Runtime's failure becomes one line."""
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise IA3Error(f"ONNX Runtime failed to run the model: {str(e).splitlines()[0][:300]}") from None


@dataclasses.dataclass
class _ThreadBinding:
    """One thread's binding of one graph, the values it borrows, and which bound set it holds."""

    binding: object
    held: dict = dataclasses.field(default_factory=dict)
    set_key: object = None
    set_names: frozenset = frozenset()


class StepRun:
    """One request's repeated runs of one graph (a generation's steps). The adapter is bound and the
    inputs checked once, on an IOBinding of the request's own (so two requests interleaved on one thread
    keep apart); a step binds only the inputs it changes, and outputs bound to OrtValues stay bound
    across steps (ORT re-allocates an output bound by device only after a clear, so those are re-bound
    at each step). Foldswap still holds its fold per step: a switch may run between two steps."""

    def __init__(self, session: "IA3Session", graph: str, adapters, feeds: dict):
        g = self.graph = session.graphs[graph]
        feeds = dict(feeds)
        session.binding.before_run(graph, g, feeds, adapters)  # binds the adapter; a bank adds adapter_ids
        missing = g.missing(feeds)
        if missing:
            raise IA3Error(f"input {missing[0]} of graph {graph!r} was not given; the model takes {', '.join(g.inputs)}")
        self.state = g.own_binding()
        fold = session._fold
        if fold:
            adapter = session.binding.one_adapter(adapters)
            self._hold = lambda: fold.holding(adapter)
        else:
            self._hold = contextlib.nullcontext
        self.outputs: dict = {}
        self._rebind = True
        self.bind(feeds)

    def bind(self, feeds: dict) -> None:
        """Bind inputs (numpy arrays or OrtValues) that stay bound until bound again."""
        for name, value in feeds.items():
            self.graph._bind(self.state, name, value)

    def bind_outputs(self, outputs: dict) -> None:
        """Output name -> an OrtValue to write into (bound once), or None (allocated by ORT at each step)."""
        self.outputs = dict(outputs)
        self._rebind = True

    def step(self, feeds: dict | None = None) -> dict:
        """Bind `feeds`, run, return output name -> OrtValue."""
        if feeds:
            self.bind(feeds)
        binding, device = self.state.binding, self.graph.device
        if self._rebind:
            binding.clear_binding_outputs()
            for name, value in self.outputs.items():
                if value is None:
                    binding.bind_output(name, *device)
                else:
                    binding.bind_ortvalue_output(name, value)
            self._rebind = any(v is None for v in self.outputs.values())
        with self._hold():
            self.graph.run_binding(binding)
        if not self._rebind:
            return self.outputs  # every output was bound to a value ORT wrote into: no wrappers to build
        return dict(zip(self.outputs, binding.get_outputs()))


class IA3Session:
    """Open an exported folder (merged, swappable, bank or foldswap) on `cpu` or `cuda` and run it with adapters.

    The session keeps the graphs, the adapter registry and the active adapter; the binding its mode
    picks (runtime/bindings.py) decides how adapters reach the graphs."""

    def __init__(self, folder: str | ExportedFolder, provider: str = "cpu", session_options=None,
                 provider_options: dict | None = None, limits: Limits | None = None):
        self.folder = folder if isinstance(folder, ExportedFolder) else open_folder(folder)
        self.limits = limits or Limits()  # every request's bounds (runtime/requests.py)
        self.provider = _check_provider(provider)
        self.graphs = {name: Graph(self.folder.graph_file(name), self.provider, session_options, provider_options)
                       for name in self.folder.graphs}
        self.adapters: dict[str, Adapter] = {}
        self.active: str | None = None
        self._lock = threading.RLock()  # serializes load/unload/set_adapter; runs never take it
        self.binding = binding_class(self.mode)(self)
        self.identity = self._place("(none)", "", adapter_io.complete({}, self.folder))
        self.binding.start()

    @property
    def mode(self) -> str:
        return self.folder.mode

    @property
    def _fold(self):
        """A foldswap session's working copy of the weights (`foldswap.WeightFold`), else None."""
        return getattr(self.binding, "fold", None)

    # -- adapters ------------------------------------------------------------------------------
    def load_adapter(self, source: str, name: str | None = None) -> str:
        """Load a PEFT folder, an .onnx_adapter file or a name shipped in the folder; returns its name."""
        return self.add_adapter(self.read_adapter(source, name))

    def read_adapter(self, source: str, name: str | None = None) -> Adapter:
        """Read, check and place an adapter without registering it: no lock is held while its file is
        read, so a slow read stalls no request (add it with `add_adapter`)."""
        if not self.binding.takes_adapters:
            self.binding.refuse_load()
        default, path, vectors = adapter_io.load_vectors(self.folder, source)
        name = adapter_io.check_name(name or default)
        return self._place(name, path, adapter_io.complete(vectors, self.folder))

    def add_adapter(self, adapter: Adapter) -> str:
        """Register an adapter from `read_adapter` (replacing one of the same name); returns its name."""
        with self._lock:
            self.adapters[adapter.name] = adapter  # runs already going keep the adapter object they picked
            self.binding.loaded(adapter)
        return adapter.name

    def load_shipped_adapters(self) -> list[str]:
        """Load every adapter listed in the folder's manifest."""
        return [self.load_adapter(name) for name in self.folder.adapters] if self.binding.takes_adapters else []

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            self.require_loaded(name)
            del self.adapters[name]
            if self.active == name:
                self.set_adapter(None)
            self.binding.unloaded()

    def set_adapter(self, name: str | None) -> None:
        """Make `name` (or no adapter: the base model) the one used by runs that name none. Swappable:
        re-binds device vectors on this thread's bindings, no host copy. Bank: picks the default row."""
        with self._lock:
            if name is not None:
                self.require_loaded(name)
            self.active = name
            self.binding.activate(self.adapters[name] if name else self.identity)

    def require_loaded(self, name: str) -> None:
        """Refuse a name that is not loaded, saying what is."""
        if name not in self.adapters:
            if not self.binding.takes_adapters:
                raise IA3Error(f"{self.folder.path} is a {self.mode} export; it has no adapters to activate")
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise IA3Error(f"adapter {quoted(name)} is not loaded (loaded: {loaded}); load it with load_adapter first")

    def _place(self, name: str, source: str, vectors: dict[str, np.ndarray]) -> Adapter:
        return self.binding.place(Adapter(name, source, vectors))

    def adapter_rows(self, names: list[str | None], bank=None) -> np.ndarray:
        """Bank rows for per-row adapter names (None: the base model); bank exports only."""
        return self.binding.adapter_rows(names, bank)

    # -- running -------------------------------------------------------------------------------
    def run(self, feeds: dict, graph: str | None = None, adapters: list[str | None] | None = None,
            outputs: list[str] | None = None, as_numpy: bool = True) -> dict:
        """Run one graph. `adapters` names an adapter per batch row (bank exports mix them; swappable
        ones need them all equal); without it the active adapter applies. Safe to call from several
        threads at once; `adapters` applies to this run only."""
        graph = graph or next(iter(self.graphs))
        g = self.graphs[graph]
        feeds = dict(feeds)
        hold = self.binding.before_run(graph, g, feeds, adapters)
        missing = g.missing(feeds)
        if missing:
            raise IA3Error(f"input {missing[0]} of graph {graph!r} was not given; the model takes {', '.join(g.inputs)}")
        with hold:  # foldswap: no re-fold while this run reads the weights
            results = g.run(feeds, outputs)
        return {k: v.numpy() for k, v in results.items()} if as_numpy else results

    def step_run(self, graph: str, adapters: list[str | None] | None, feeds: dict) -> StepRun:
        """Repeated runs of `graph` for one request (see `StepRun`); `feeds` are its first step's inputs."""
        return StepRun(self, graph, adapters, feeds)

    # -- generation ----------------------------------------------------------------------------
    def tokenizer(self):
        """The folder's tokenizer, isolated in child processes within `limits` (runtime/tokenizer.py)."""
        from .tokenizer import IsolatedTokenizer

        with self._lock:
            if not hasattr(self, "_tokenizer"):
                self._tokenizer = IsolatedTokenizer(self.folder.path, self.limits)
        return self._tokenizer

    def close(self) -> None:
        """Stop the tokenizer's waiting processes (they also end with this process)."""
        tokenizer = getattr(self, "_tokenizer", None)
        if tokenizer is not None:
            tokenizer.close()

    def generate(self, prompt: str, adapter: str | None = ACTIVE, stream: bool = False, **options):
        """Generate a continuation of one prompt with `adapter` (None: the base model; left out: the
        one set_adapter chose). Options: see `generation.GenerationOptions`. With stream=True, an
        iterator of text pieces as the tokens come (see `stream`)."""
        if stream:
            return self.stream(prompt, adapter, **options)
        return self.generate_batch([(prompt, adapter)], **options)[0]

    def stream(self, prompt: str, adapter: str | None = ACTIVE, **options):
        """Yield the continuation of one prompt in text pieces, each as soon as its tokens are chosen;
        a piece never splits a UTF-8 character, and the pieces join to `generate`'s text."""
        from .generation import GenerationOptions, TextStream, iter_tokens

        opts, tok = GenerationOptions(**options), self.tokenizer()  # the numbers before the text
        name = self.active if adapter is ACTIVE else adapter
        steps = iter_tokens(self, [tok.encode(prompt)], [name], opts, tok.decode)

        def pieces():
            text = TextStream(tok.decode)
            for step in steps:
                piece = text.push(step[0])
                if piece:
                    yield piece
            rest = text.finish()
            if rest:
                yield rest
        return pieces()

    def generate_batch(self, requests: list[tuple[str, str | None]], **options) -> list[str]:
        """Generate for (prompt, adapter name) requests: one batch in bank mode; grouped by adapter
        otherwise (a swappable export runs one adapter at a time)."""
        from .generation import GenerationOptions, generate_ids

        tok = self.tokenizer()
        opts = GenerationOptions(**options)
        prompts = [tok.encode(p) for p, _ in requests]
        names = [self.active if a is ACTIVE else a for _, a in requests]
        if self.binding.mixes_adapters:
            outs = generate_ids(self, prompts, names, opts, tok.decode)
        else:
            outs = [None] * len(requests)
            for name in dict.fromkeys(names):
                rows = [i for i, n in enumerate(names) if n == name]
                for i, ids in zip(rows, generate_ids(self, [prompts[i] for i in rows], [name] * len(rows), opts,
                                                     tok.decode)):
                    outs[i] = ids
        return [tok.decode(ids) for ids in outs]


def _check_provider(provider: str) -> str:
    ort = onnxruntime()

    if provider not in PROVIDERS:
        raise IA3Error(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise IA3Error(f"this onnxruntime has no {PROVIDERS[provider]} (it offers {', '.join(ort.get_available_providers())}); "
                       "install onnxruntime-gpu (pip install 'ia3-export[gpu]') or use --provider cpu")
    return provider


@register("IA3Session.generate", ("causal-lm", "seq2seq-lm"), NUMERIC_FIELDS)
def _open_request_path(folder: str, limits: Limits):
    """The Python API as a request path (runtime/requests.py): one session, greedy unless a sampling field is given."""
    session = IA3Session(folder, limits=limits)

    def send(text, **fields) -> str:
        sample = bool(set(SAMPLING_FIELDS) & set(fields))
        return session.generate(text, adapter=None, do_sample=sample, **fields)

    send.close = session.close
    return send
