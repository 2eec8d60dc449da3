"""What an export mode is: the hooks the one export loop (export/pipeline.py) calls, with the
defaults most modes share. A mode overrides only what differs, as a PEFT tuner overrides a few
`BaseTuner` hooks and an optimum `OnnxConfig` declares its inputs: where the vectors come from
(`prepare`), the extra graph inputs (`trace_inputs`), the graph edit (`edit_graph`), the
validation scenarios (`scenarios`), the artefacts and manifest fields (`write_adapters`, `finish`).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from ...core.config import DEFAULT_TARGETS, IA3Config
from ...dtypes import torch_dtype
from ...errors import IA3Error
from ...formats.manifest import vector_name
from ...formats.onnx_adapter import SUFFIX, write_onnx_adapter
from ...core.merge import with_adapters
from ..reference import (adapter_sha256, adapter_vectors, random_vectors, running, sample_feeds,
                                 torch_outputs)
from .. import graph as onnx_graph
from ..validate import compare_outputs, ort_outputs
from ..wrappers import VectorInputs

TARGETS_ONLY = "__targets__"  # pseudo adapter holding --target-modules (vectors of ones)


@dataclasses.dataclass
class Export:
    """One export in progress: what the loop loaded and probed, read by the mode's hooks."""

    model_dir: str
    task: object  # export.tasks.Task
    adapters: list  # AdapterFiles
    names: list[str]
    dtype: str
    opset: int
    shape: object = None  # export.reference.ModelShape
    ia3: object = None  # the IA3Model whose adapters the vector modes validate and ship; None when folded
    vectors: object = None  # wrappers.VectorInputs: the vector inputs of every graph
    parts: dict = dataclasses.field(default_factory=dict)  # graph key -> (wrapper, its VectorInputs or None)


class ExportMode:
    """The defaults: vectors as graph inputs of shape [dim], fed per batch (swappable's behaviour)."""

    name: str  # the manifest's mode (manifest.MODES)
    folds_adapters = False  # the adapters are folded into the weights: no vector inputs, no adapter files
    per_row = False  # one batch mixes adapters, one per row (adapter_ids)
    graph_defaults = True  # the model graphs hold the vectors as overridable initializers of ones
    quantize_refusal: str | None = None  # why --quantize cannot apply, or None
    genai_refusal: str | None = None  # why onnxruntime-genai cannot serve the export, or None
    lifts_weights = False  # `--graph fused`: the targeted weights become graph inputs a fold graph fills (`fold_from`)

    # -- before loading ---------------------------------------------------------------------------
    def check_options(self, exporter: str, target_modules, feedforward_modules) -> None:
        """Refuse options the mode cannot honour (bad usage, before any work)."""

    def check_adapters(self, adapters) -> None:
        for a in adapters:
            if a.saved_tensors():
                raise IA3Error(
                    f"{a.path} also trains whole modules ({sorted(a.saved_tensors())[0]}, modules_to_save); "
                    f"a {self.name} export carries IA3 vectors only. Export it with --mode merged"
                )

    # -- preparing the model ------------------------------------------------------------------------
    def prepare(self, model, adapters, target_modules, feedforward_modules):
        """(IA3Model, VectorInputs, the model to trace): every adapter loaded and none active, one vector
        input per targeted module (the adapters' targets, plus --target-modules as vectors of ones)."""
        ia3 = with_adapters(model, adapters)
        target_modules, feedforward_modules = (list(m) if isinstance(m, (tuple, set)) else m
                                               for m in (target_modules, feedforward_modules))
        if target_modules is not None or not adapters:
            if target_modules is not None and feedforward_modules is None:
                default_ff = DEFAULT_TARGETS.get(ia3.model_type, (None, []))[1]
                feedforward_modules = [m for m in default_ff if m in target_modules] \
                    if isinstance(default_ff, list) and isinstance(target_modules, list) else []
            ia3.add_adapter(TARGETS_ONLY, IA3Config(target_modules=target_modules, feedforward_modules=feedforward_modules))
        paths, feedforward, dims = [], {}, {}
        for path, layer in ia3.ia3_layers().items():
            flags = {f for f in layer.feedforward.values()}
            if len(flags) > 1:
                owners = ", ".join(f"{n}={'input' if f else 'output'}" for n, f in layer.feedforward.items())
                raise IA3Error(f"adapters disagree on whether {path} scales its input (feed-forward) or its output "
                               f"({owners}); one graph input cannot serve both: export them separately")
            paths.append(path)
            feedforward[path] = flags.pop()
            dims[path] = layer.in_features if feedforward[path] else layer.out_features
        ia3.set_adapter(())
        return ia3, VectorInputs(ia3, paths, feedforward, dims, bank=self.per_row), ia3.model

    def begin(self, ex: Export, tmp: str) -> None:
        """Called once the output folder exists, before the first graph is traced."""

    # -- tracing ------------------------------------------------------------------------------------
    def trace_inputs(self, ex: Export, graph, wrapper, part, feeds: dict):
        """(module to trace, extra input names, their sample tensors for `feeds`, their dynamic axes)."""
        if part is None:
            return wrapper, [], [], {}
        dtype = torch_dtype(ex.dtype)
        return wrapper, part.input_names(), [torch.ones(part.dims[p], dtype=dtype) for p in part.paths], {}

    def edit_graph(self, ex: Export, graph, model, part) -> None:
        """The traced graph, before it is saved: each vector input becomes an overridable initializer
        of ones (the graph runs as the base model when nothing is fed)."""
        if part is None:
            return
        onnx_graph.drop_noop_casts(model, [vector_name(p) for p in part.paths])
        for p in part.paths:
            onnx_graph.add_overridable_ones(model, vector_name(p), self.vector_shape(part.dims[p]), ex.dtype)

    def vector_shape(self, dim: int) -> tuple[int, ...]:
        return (dim,)

    # -- validation ---------------------------------------------------------------------------------
    def validate(self, ex: Export, graph, wrapper, session, part) -> list:
        """Every case of one graph: with vector inputs, the mode's scenarios; without, the plain model."""
        results = []
        for label, feeds in sample_feeds(graph, ex.task, ex.shape):
            if part is None or not part.paths:
                results += compare_outputs(label, graph.outputs, torch_outputs(wrapper, graph.inputs, feeds),
                                           ort_outputs(session, feeds), ex.dtype, feeds)
            else:
                results += self.scenarios(ex, label, graph, wrapper, session, part, feeds)
        return results

    def scenarios(self, ex: Export, label: str, graph, wrapper, session, part, feeds: dict) -> list:
        """Nothing fed against the base model, each adapter's vectors against the adapter's own
        parameters, and random vectors through both sides."""
        names, dtype = graph.inputs, ex.dtype
        with running(ex.ia3, None):
            results = compare_outputs(f"{label}, no adapter", graph.outputs, torch_outputs(wrapper, names, feeds),
                                      ort_outputs(session, feeds | self.fed(ex, graph, {})), dtype, feeds)
        for adapter in ex.names:
            with running(ex.ia3, adapter):
                reference = torch_outputs(wrapper, names, feeds)
            fed = self.fed(ex, graph, adapter_vectors(ex.ia3, adapter, part.paths, dtype))
            results += compare_outputs(f"{label}, adapter {adapter}", graph.outputs, reference,
                                       ort_outputs(session, feeds | fed), dtype, feeds)
        random = random_vectors(part.paths, part.dims, dtype)
        results += compare_outputs(f"{label}, random vectors", graph.outputs,
                                   torch_outputs(wrapper, names + list(random), feeds | random),
                                   ort_outputs(session, feeds | self.fed(ex, graph, random)), dtype, feeds)
        return results

    def row_feeds(self, ex: Export, part, rows: list[str | None]) -> dict:
        """The vector inputs that run batch row b with adapter rows[b] (None: the base model); here one
        adapter serves the whole batch, so rows[0] decides. Nothing for a graph without vectors."""
        if part is None or rows[0] is None:
            return {}
        return adapter_vectors(ex.ia3, rows[0], part.paths, ex.dtype)

    def fed(self, ex: Export, graph, vectors: dict) -> dict:
        """What the graph is fed for these vectors (input name -> [dim]): the vectors themselves."""
        return vectors

    # -- artefacts ----------------------------------------------------------------------------------
    def vector_entries(self, ex: Export) -> list[dict]:
        """The manifest's `vectors`: each vector input, the graph that takes it, its size and side."""
        return [{"name": vector_name(p), "graph": key, "dim": part.dims[p], "feedforward": part.feedforward[p]}
                for key, (_, part) in ex.parts.items() for p in (part.paths if part else [])]

    def write_adapters(self, ex: Export, tmp: str) -> list[dict]:
        """adapters/<name>.onnx_adapter per adapter (ONNX Runtime's own adapter format); the manifest's list."""
        entries = []
        for a in ex.adapters:
            file = None
            if not self.folds_adapters:
                file = f"adapters/{a.name}{SUFFIX}"
                os.makedirs(os.path.join(tmp, "adapters"), exist_ok=True)
                tensors = adapter_vectors(ex.ia3, a.name, ex.vectors.paths, ex.dtype)
                write_onnx_adapter(os.path.join(tmp, file), {n: v.reshape(self.vector_shape(len(v)))
                                                             for n, v in tensors.items()})
            entries.append({"name": a.name, "file": file, "sha256": adapter_sha256(a)})
        return entries

    def finish(self, ex: Export, tmp: str, graphs: dict) -> dict:
        """Last graphs (added to `graphs`) and extra manifest fields, once every model graph is validated."""
        return {}
