"""Fold on swap at run time: the session's own working copy of the targeted weights, re-folded on
the device by the folder's fold graph whenever the adapter changes.

The model graph reads each targeted weight from a buffer allocated here on the session's device
and bound as its input. The fold graph (`fold.onnx`: the base values as initializers, one Mul per
tensor) runs on the same provider with its outputs bound to those very buffers, so a switch is one
ONNX Runtime run on the device: no host round trip, no torch. Every fold starts from the base
values, never from the previous adapter.

Threads: one session may serve several threads (each with its own IOBinding), but it has ONE
working copy, so it must never be re-folded while another thread's run reads it. `holding(adapter)`
is a readers-writer gate around every model run: runs of the adapter currently folded proceed
together; a run (or `set_adapter`) for another adapter waits until they have finished, folds, and
then runs; runs arriving for the old adapter wait behind a pending switch, so switches are not
starved. Separate sessions never share a working copy: each allocates its own when it opens.
A fold is a synchronous ONNX Runtime run whose outputs are synchronized before any model run
starts, so no run reads a half-folded weight on CUDA either.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from ..errors import IA3Error
from ..ort import onnxruntime
from ..formats.manifest import FOLD_FILE, FOLD_GRAPH


class WeightFold:
    """Working copies of the targeted weights for one session, and the fold that fills them."""

    def __init__(self, folder, graphs: dict):
        ort = onnxruntime()
        if FOLD_GRAPH not in graphs or not folder.manifest.get("weights"):
            raise IA3Error(f"{folder.path}: a {folder.mode} export needs the {FOLD_FILE} graph and the manifest's 'weights'; "
                           "re-export the model")
        self.fold = graphs[FOLD_GRAPH]
        self.inputs: dict[str, dict[str, tuple]] = {}  # model graph -> weight name -> (buffer, None)
        dtype = np.dtype(folder.dtype)
        for entry in folder.manifest["weights"]:
            name, graph = entry["name"], graphs.get(entry["graph"])
            if name not in self.fold.outputs or graph is None or name not in graph.inputs:
                raise IA3Error(f"{folder.path}: weight {name} is not both an output of {FOLD_FILE} and an input of "
                               f"graph {entry['graph']!r}; re-export the model")
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(list(entry["shape"]), dtype, *self.fold.device)
            self.inputs.setdefault(entry["graph"], {})[name] = (buffer, None)
        self.nbytes = sum(int(np.prod(e["shape"])) for e in folder.manifest["weights"]) * dtype.itemsize
        self._gate = threading.Condition()
        self._folded = None  # the Adapter object whose vectors the working copy holds
        self._readers = 0
        self._switching = 0
        self._outputs_bound = threading.local()

    def bind_weights(self, graph: str, g) -> None:
        """Bind the working copy as a model graph's inputs on the calling thread's binding."""
        g.bind_set(self, self.inputs.get(graph, {}))

    @contextlib.contextmanager
    def holding(self, adapter):
        """Keep the working copy folded for `adapter` while the body runs (see the module docstring)."""
        with self._gate:
            while self._folded is adapter and self._switching:
                self._gate.wait()  # a switch to another adapter is pending: let it go first
            if self._folded is not adapter:
                self._switching += 1
                try:
                    while self._readers:
                        self._gate.wait()
                    if self._folded is not adapter:
                        self._refold(adapter)
                finally:
                    self._switching -= 1
                    self._gate.notify_all()
            self._readers += 1
        try:
            yield
        finally:
            with self._gate:
                self._readers -= 1
                self._gate.notify_all()

    def switch(self, adapter) -> None:
        """Fold `adapter` now (set_adapter), so the next run does not pay for it."""
        with self.holding(adapter):
            pass

    def _refold(self, adapter) -> None:
        """W = W0 (.) l for every target, from the base values (never from the previous adapter)."""
        fold = self.fold
        fold.bind_set(adapter, adapter.values.get(FOLD_GRAPH, {}))
        binding = fold.binding
        if not getattr(self._outputs_bound, "done", False):
            for buffers in self.inputs.values():
                for name, (buffer, _) in buffers.items():
                    binding.bind_ortvalue_output(name, buffer)
            self._outputs_bound.done = True
        self._folded = None  # a fold that fails half-way leaves no adapter trusted
        try:
            fold.session.run_with_iobinding(binding)
        except Exception as e:
            raise IA3Error(f"ONNX Runtime failed to fold adapter {adapter.name!r}: {str(e).splitlines()[0][:300]}") from None
        binding.synchronize_outputs()
        self._folded = adapter
