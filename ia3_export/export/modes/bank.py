"""bank: every vector input is a bank [num_adapters, dim] gathered per batch row by `adapter_ids`,
so one batch mixes adapters; row 0 of the initializers is ones (the base model)."""
from __future__ import annotations

import numpy as np
import torch

from ... import dtypes
from ...formats.manifest import ADAPTER_IDS, BANK, vector_name
from ..reference import adapter_vectors, random_vectors, rows, running, torch_outputs
from ..validate import compare_outputs, ort_outputs
from .base import Export, ExportMode


class Bank(ExportMode):
    name = BANK
    per_row = True
    genai_refusal = "onnxruntime-genai cannot feed the per-row adapter_ids input of a bank export; export --mode swappable"

    def trace_inputs(self, ex: Export, graph, wrapper, part, feeds: dict):
        if part is None:
            return wrapper, [], [], {}
        torch_dtype = dtypes.torch_dtype(ex.dtype)
        args = [torch.arange(len(feeds["input_ids"])) % 2]
        args += [torch.ones((2, part.dims[p]), dtype=torch_dtype) for p in part.paths]
        axes = {ADAPTER_IDS: {0: "batch_size"}, **{vector_name(p): {0: "num_adapters"} for p in part.paths}}
        return wrapper, part.input_names(), args, axes

    def vector_shape(self, dim: int) -> tuple[int, ...]:
        """A one-row bank, as `convert` writes: ORT's own adapter API then runs it (ids 0)."""
        return (1, dim)

    def row_feeds(self, ex: Export, part, rows: list[str | None]) -> dict:
        """`adapter_ids` for the rows and every bank: row 0 ones (no adapter), row k+1 adapters[k]."""
        paths, dims, dtype = part.paths, part.dims, ex.dtype
        per_adapter = [adapter_vectors(ex.ia3, a, paths, dtype) for a in ex.names]
        ones = {vector_name(p): np.ones(dims[p], dtypes.numpy_dtype(dtype)) for p in paths}
        banks = {n: np.stack([one] + [v.get(n, one) for v in per_adapter]) for n, one in ones.items()}
        ids = np.array([0 if r is None else 1 + list(ex.names).index(r) for r in rows], np.int64)
        return {ADAPTER_IDS: ids, **banks}

    def scenarios(self, ex: Export, label: str, graph, wrapper, session, part, feeds: dict) -> list:
        """Nothing fed (ids 0) against the base model; then either random banks through both sides, or
        a batch mixing the adapters row by row against each row run alone with its adapter."""
        names, dtype, paths = graph.inputs, ex.dtype, part.paths
        batch = len(feeds["input_ids"])
        with running(ex.ia3, None):
            results = compare_outputs(f"{label}, no adapter", graph.outputs, torch_outputs(wrapper, names, feeds),
                                      ort_outputs(session, feeds | {ADAPTER_IDS: np.zeros(batch, np.int64)}), dtype, feeds)
        vector_names = [vector_name(p) for p in paths]
        if not ex.names:  # random banks: the full batch in PyTorch through the same Gather
            fed = feeds | {ADAPTER_IDS: (np.arange(batch) % 3).astype(np.int64)} | random_vectors(paths, part.dims, dtype, rows=3)
            return results + compare_outputs(f"{label}, random bank", graph.outputs,
                                             torch_outputs(wrapper, names + [ADAPTER_IDS] + vector_names, fed),
                                             ort_outputs(session, fed), dtype, feeds)
        # Row b of the batch uses no adapter, adapters[0], ... in turn
        adapters = [([None] + list(ex.names))[b % (len(ex.names) + 1)] for b in range(batch)]
        got = ort_outputs(session, feeds | self.row_feeds(ex, part, adapters))
        for b, adapter in enumerate(adapters):  # each row alone, with its adapter, in PyTorch
            with running(ex.ia3, adapter):
                reference = torch_outputs(wrapper, names, rows(feeds, b))
            results += compare_outputs(f"{label}, bank row {b} ({adapter or 'no adapter'})", graph.outputs,
                                       reference, [g[b:b + 1] for g in got], dtype, rows(feeds, b))
        return results
