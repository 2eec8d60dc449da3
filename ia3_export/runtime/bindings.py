"""How loaded adapters reach the graphs: one binding per export mode, picked once from the manifest.

The session keeps the graphs, the adapter registry (name -> `Adapter`) and the active name; a
binding decides what loading, unloading and activating mean for its mode and what is bound before
each run, including the thread safety that takes:
- merged: nothing (the adapter is folded into the weights; none can be loaded);
- swappable: each adapter's vectors live on the device, and a run re-binds them on the calling
  thread's IOBinding only when it holds another adapter;
- bank: every loaded adapter is a row of one immutable bank snapshot, rebuilt on each load or
  unload; a run binds the snapshot and feeds `adapter_ids` from it, so it sees one whole bank;
- foldswap: the vectors feed the fold graph, which re-folds the session's working copy of the
  weights; a readers-writer gate (`foldswap.WeightFold.holding`) keeps a run's weights folded.
Load, unload and activate are called under the session's lock; runs never take it.
A fifth mode is one new class here and one entry in `BINDINGS`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import numpy as np

from ..errors import IA3Error
from ..formats.manifest import ADAPTER_IDS, BANK, FOLDSWAP, MERGED, SWAPPABLE
from .foldswap import WeightFold

_NO_HOLD = contextlib.nullcontext()  # a run that holds nothing (reusable)


@dataclasses.dataclass
class Adapter:
    """A loaded adapter: its checked vectors on the host and, where the binding wants them, on the device."""

    name: str
    source: str
    vectors: dict[str, np.ndarray]
    values: dict[str, dict[str, tuple]] = dataclasses.field(default_factory=dict)  # graph -> input -> (OrtValue, array)


@dataclasses.dataclass(frozen=True)
class _Bank:
    """An immutable bank snapshot: adapter name -> row, and graph -> input -> (OrtValue, array)."""

    rows: dict
    values: dict


class Binding:
    """Merged: nothing to bind (the export's adapter is folded into its weights). Also the base of
    the other bindings: a run may name adapters, but only one per batch."""

    takes_adapters = False  # load_adapter refuses, load_shipped_adapters loads nothing
    mixes_adapters = False  # one batch may mix adapters per row
    stacked = False  # vector inputs are [num_adapters, dim] banks rather than [dim]

    def __init__(self, session):
        self.session = weakref.proxy(session)  # no cycle: a dropped session frees its graphs at once

    def start(self) -> None:
        """Bind the base model (the session's identity adapter) once the session is built."""

    def refuse_load(self) -> None:
        """Called by load_adapter where `takes_adapters` is false."""
        folder = self.session.folder
        raise IA3Error(f"{folder.path} is a merged export (its adapter is folded into the weights); "
                       "export with --mode swappable or --mode bank to load adapters")

    def place(self, adapter: Adapter) -> Adapter:
        """Prepare a new adapter's device state before it is registered (outside the lock)."""
        return adapter

    def loaded(self, adapter: Adapter) -> None:
        """`adapter` was just registered (or replaced one of the same name)."""
        if self.session.active == adapter.name:
            self.activate(adapter)

    def unloaded(self) -> None:
        """An adapter left the registry."""

    def activate(self, adapter: Adapter) -> None:
        """`adapter` (the identity for none) is now the session's active one."""

    def before_run(self, graph: str, g, feeds: dict, adapters) -> contextlib.AbstractContextManager:
        """Bind this run's adapter state on the calling thread's binding; returns what the run must hold."""
        if adapters is not None:
            self.one_adapter(adapters)
        return _NO_HOLD

    def one_adapter(self, adapters) -> Adapter:
        """The adapter a batch runs with (this run's names, else the active one): one for all rows."""
        session = self.session
        names = set(adapters) if adapters is not None else {session.active}
        if len(names) > 1:
            raise IA3Error(f"a {session.mode} export runs one adapter per batch, got {len(names)}; export with "
                           "--mode bank to mix adapters in one batch, or group requests by adapter")
        name = names.pop() if names else None
        adapter = session.adapters.get(name) if name is not None else session.identity
        if adapter is None:
            session.require_loaded(name)
        return adapter


class VectorBinding(Binding):
    """Swappable: each adapter's vectors are OrtValues on the device, bound by name per thread."""

    takes_adapters = True

    def start(self) -> None:
        self.activate(self.session.identity)

    def place(self, adapter: Adapter) -> Adapter:
        graphs = self.session.graphs
        for vector, spec in self.session.folder.vectors.items():
            array = adapter.vectors[vector]
            adapter.values.setdefault(spec.graph, {})[vector] = (graphs[spec.graph].to_device(array), array)
        return adapter

    def activate(self, adapter: Adapter) -> None:
        """Bind the adapter's device vectors on the calling thread's bindings (a no-op if already bound)."""
        for graph, g in self.session.graphs.items():
            g.bind_set(adapter, adapter.values.get(graph, {}))

    def before_run(self, graph: str, g, feeds: dict, adapters) -> contextlib.AbstractContextManager:
        adapter = self.one_adapter(adapters)
        g.bind_set(adapter, adapter.values.get(graph, {}))
        return _NO_HOLD


class FoldBinding(VectorBinding):
    """Foldswap: the vectors feed the fold graph, which re-folds this session's working copy of the
    weights; every run holds the fold of its adapter (a readers-writer gate, see runtime/foldswap.py)."""

    def __init__(self, session):
        super().__init__(session)
        self.fold = WeightFold(session.folder, session.graphs)

    def start(self) -> None:
        self.fold.switch(self.session.identity)

    def activate(self, adapter: Adapter) -> None:
        self.fold.switch(adapter)  # fold now, so the next run does not pay for it

    def loaded(self, adapter: Adapter) -> None:
        if self.session.active == adapter.name:  # pre-bind the new vectors; the next run re-folds
            VectorBinding.activate(self, adapter)

    def before_run(self, graph: str, g, feeds: dict, adapters) -> contextlib.AbstractContextManager:
        adapter = self.one_adapter(adapters)
        self.fold.bind_weights(graph, g)
        return self.fold.holding(adapter)


class BankBinding(Binding):
    """Bank: row 0 is the base model (ones), then each loaded adapter in load order; a batch mixes them."""

    takes_adapters = True
    mixes_adapters = True
    stacked = True

    def start(self) -> None:
        self.rebuild()

    def loaded(self, adapter: Adapter) -> None:
        self.rebuild()

    def unloaded(self) -> None:
        self.rebuild()

    def rebuild(self) -> None:
        """Publish the banks as one new snapshot, so a concurrent run uses either the old banks or the
        new ones, never a mix."""
        session = self.session
        rows = [session.identity, *session.adapters.values()]
        values: dict[str, dict] = {}
        for vector, spec in session.folder.vectors.items():
            array = np.stack([a.vectors[vector] for a in rows])
            values.setdefault(spec.graph, {})[vector] = (session.graphs[spec.graph].to_device(array), array)
        self.bank = _Bank({**{a.name: i for i, a in enumerate(rows)}, None: 0}, values)

    def adapter_rows(self, names: list[str | None], bank: _Bank | None = None) -> np.ndarray:
        """Bank rows for per-row adapter names (None: the base model)."""
        bank = bank or self.bank
        for name in names:
            if name not in bank.rows or name == self.session.identity.name:
                self.session.require_loaded(name)
                raise IA3Error(f"adapter {name!r} was loaded while this batch started; run it again")
        return np.array([bank.rows[n] for n in names], dtype=np.int64)

    def before_run(self, graph: str, g, feeds: dict, adapters) -> contextlib.AbstractContextManager:
        bank = self.bank  # one snapshot for the ids and the banks
        g.bind_set(bank, bank.values.get(graph, {}))
        if ADAPTER_IDS in g.inputs and ADAPTER_IDS not in feeds:
            batch = _batch_size(feeds)
            names = adapters if adapters is not None else [self.session.active] * batch
            if len(names) != batch:
                raise IA3Error(f"{len(names)} adapter names for a batch of {batch}; give one per row")
            feeds[ADAPTER_IDS] = self.adapter_rows(list(names), bank)
        return _NO_HOLD


BINDINGS = {MERGED: Binding, SWAPPABLE: VectorBinding, BANK: BankBinding, FOLDSWAP: FoldBinding}


def binding_class(mode: str) -> type[Binding]:
    """The binding of an export mode (the manifest has checked the name)."""
    return BINDINGS[mode]


def _batch_size(feeds: dict) -> int:
    for name in ("input_ids", "inputs_embeds"):
        if name in feeds:
            return int(feeds[name].shape()[0] if callable(getattr(feeds[name], "shape", None)) else feeds[name].shape[0])
    raise IA3Error("cannot tell the batch size: feed input_ids, or pass adapter_ids yourself")
