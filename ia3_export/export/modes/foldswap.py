"""The `foldswap` export: the IA3-targeted weights are graph inputs, re-folded on the device on a switch.

The model graph is the base model with each targeted weight (and, for output scaling, its bias)
as a plain graph input named like its state-dict key (`model.layers.0.self_attn.k_proj.weight`).
A second, tiny graph `fold.onnx` holds the base values of exactly those tensors as initializers
and maps the IA3 vectors (inputs named as in the swappable export, `<module>.ia3_l`) to the
folded tensors with one Mul each: output scaling scales weight rows and the bias, input scaling
scales columns. The runtime binds the fold graph's outputs to the buffers the model reads, so a
switch is one fold run on the device and the model runs at the speed of a merged export.

The weights are pure inputs, not overridable initializers: an initializer would keep a third
copy of every targeted weight in the model session that is never read. The folder still runs as
the base model: the runtime folds vectors of ones when it opens it.

With `--graph fused` the targets are the builder's tensors instead (export/fused.py's
`lift_fold_targets`): a fused q/k/v weight is scaled along its output by [q | k | v], ones where a
module is not targeted, so one weight may carry several vectors (`FoldTarget.segments`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
from onnx import helper, numpy_helper
from torch import nn

from ...core.layers import scaled_axis
from ...dtypes import DTYPES, numpy_dtype
from ...errors import IA3Error
from ...formats.manifest import FOLD_FILE, FOLD_GRAPH, FOLDSWAP, vector_name
from .. import graph as onnx_graph
from ..reference import adapter_vectors
from ..validate import cpu_session
from .base import Export, ExportMode


class Foldswap(ExportMode):
    name = FOLDSWAP
    graph_defaults = False  # the model graphs take the weights as pure inputs: nothing to default
    quantize_refusal = ("--quantize does not combine with --mode foldswap (its weights are graph inputs, which "
                        "cannot be quantized; see docs/export.md); use --mode swappable or bank")
    genai_refusal = ("a foldswap export's targeted weights are graph inputs that only ia3-export's runtime fills "
                     "(from fold.onnx); onnxruntime-genai cannot; export --mode swappable")
    lifts_weights = True  # --graph fused: the builder's targeted tensors become the inputs fold.onnx fills

    def check_options(self, exporter: str, target_modules, feedforward_modules) -> None:
        if exporter != "torchscript":
            raise IA3Error(f"a {self.name} export is traced with the torchscript exporter; drop --exporter {exporter}")

    def begin(self, ex: Export, tmp: str) -> None:
        """The fold graph is written once its targets are known (`fold_from`), before any validation
        (it feeds each model graph the weights it folds): the model's modules when the first graph is
        traced, the builder's tensors once `--graph fused` has built its graph."""
        self.layers = ex.ia3.ia3_layers()
        self.fold_path = os.path.join(tmp, FOLD_FILE)
        self.targets = None

    def fold_from(self, ex: Export, targets: list[FoldTarget], base) -> None:
        """Write, check and open fold.onnx for `targets` (`base`: see build_fold_graph)."""
        self.targets = targets
        onnx_graph.save(build_fold_graph(targets, ex.dtype, ex.opset, base), self.fold_path)
        onnx_graph.check(self.fold_path)
        self.fold = cpu_session(self.fold_path)

    def weights_of(self, graph) -> list[str]:
        return [n for t in self.targets if t.graph == graph.key for n in t.tensors]

    def trace_inputs(self, ex: Export, graph, wrapper, part, feeds: dict):
        """The graph's targeted weights (and biases) as extra inputs, their base values as samples."""
        if self.targets is None:  # the first traced graph: the fold graph of every graph's modules
            self.fold_from(ex, fold_targets(ex.ia3, ex.parts), base_values(self.layers, ex.dtype))
        names = self.weights_of(graph)
        module = WeightsAsInputs(wrapper, self.layers, names, len(graph.inputs)).eval()
        return module, names, [base_tensor(self.layers, n).detach().clone() for n in names], {}

    def edit_graph(self, ex: Export, graph, model, part) -> None:
        """No edit: the weights stay pure inputs. The tracer drops an input nothing reads: refuse that."""
        present = {i.name for i in model.graph.input}
        lost = [n for n in self.weights_of(graph) if n not in present]
        if lost:
            raise IA3Error(f"internal error: the traced {graph.file} does not read {lost[0]} (is the module used?)")

    def folded(self, ex: Export, vectors: dict) -> dict[str, np.ndarray]:
        """Every tensor of the fold graph for these vectors (ones elsewhere), as the runtime folds them."""
        ones = {i.name: np.ones(i.shape, numpy_dtype(ex.dtype)) for i in self.fold.get_inputs()}
        return fold_numpy(self.fold, ones | vectors)

    def fed(self, ex: Export, graph, vectors: dict) -> dict:
        tensors = self.folded(ex, vectors)
        return {n: tensors[n] for n in self.weights_of(graph)}

    def row_feeds(self, ex: Export, part, rows: list[str | None]) -> dict:
        """`--graph fused`'s validation: the tensors folded for rows[0]'s adapter (None: the base model);
        its one model graph reads every tensor fold.onnx makes."""
        vectors = {} if part is None or rows[0] is None else adapter_vectors(ex.ia3, rows[0], part.paths, ex.dtype)
        return self.folded(ex, vectors)

    def vector_entries(self, ex: Export) -> list[dict]:
        return [{"name": vector_name(p), "graph": FOLD_GRAPH, "dim": ex.vectors.dims[p], "feedforward": t.feedforward}
                for t in self.targets for p in t.paths]

    def finish(self, ex: Export, tmp: str, graphs: dict) -> dict:
        """The fold graph's entry, and `weights`: each tensor, the graph that reads it, its shape and its
        vector (`vectors` too when several scale it, as on a fused q/k/v weight: `vector` is the first)."""
        graphs[FOLD_GRAPH] = {"file": FOLD_FILE, "inputs": [vector_name(p) for t in self.targets for p in t.paths],
                              "outputs": [n for t in self.targets for n in t.tensors],
                              "nodes": sum(onnx_graph.op_histogram(self.fold_path).values())}
        weights = []
        for t in self.targets:
            vectors = [vector_name(p) for p in t.paths]
            weights += [{"name": n, "graph": t.graph, "vector": vectors[0], "shape": t.shape(n)}
                        | ({"vectors": vectors} if len(vectors) > 1 else {}) for n in t.tensors]
        return {"weights": weights}


@dataclasses.dataclass(frozen=True)
class FoldTarget:
    """One weight (and bias, for output scaling) the fold graph produces: its base value times the IA3
    vectors laid end to end along the weight's scaled axis (`segments`: one module's vector, or a fused
    q/k/v weight's q, k and v parts, ones where a module is not targeted)."""

    weight: str  # the tensor's name: a state-dict key (traced) or the builder's initializer (fused)
    graph: str  # the model graph that reads the weight
    feedforward: bool  # scales the input (columns) rather than the output (rows + bias)
    conv1d: bool  # the weight is [in, out]: GPT-2 Conv1D, the builder's MatMul weights
    weight_shape: tuple[int, ...]
    bias: str | None
    segments: tuple[tuple[str | None, int], ...]  # (module path, or None for ones; width), in order

    def __post_init__(self):
        if sum(w for _, w in self.segments) != self.weight_shape[self.vector_axis]:
            raise IA3Error(f"internal error: the vectors of {self.weight} cover {[w for _, w in self.segments]} of its "
                           f"{self.weight_shape[self.vector_axis]} scaled entries")

    @classmethod
    def module(cls, path: str, graph: str, feedforward: bool, conv1d: bool, weight_shape: tuple[int, ...],
               has_bias: bool, dim: int) -> "FoldTarget":
        """A module's own weight (`<path>.weight`, `<path>.bias`) scaled by its own vector."""
        return cls(f"{path}.weight", graph, feedforward, conv1d, tuple(weight_shape),
                   f"{path}.bias" if has_bias else None, ((path, dim),))

    @property
    def paths(self) -> list[str]:
        """The modules whose vectors scale this weight, in order."""
        return [p for p, _ in self.segments if p is not None]

    @property
    def tensors(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias else [])

    def shape(self, name: str) -> list[int]:
        """Shape of the weight, or of the bias (the length of the scaled axis)."""
        return list(self.weight_shape if name == self.weight else [self.weight_shape[self.vector_axis]])

    @property
    def vector_axis(self) -> int:
        """The weight axis the vector runs along (core.layers.scaled_axis: the one rule)."""
        return scaled_axis(self.feedforward, self.conv1d)


def fold_targets(ia3, parts: dict) -> list[FoldTarget]:
    """The targets of every graph, from the same IA3 preparation the swappable export uses."""
    layers = ia3.ia3_layers()
    targets = []
    for graph, (_, part) in parts.items():
        for path in part.paths if part else []:
            layer = layers[path]
            feedforward = part.feedforward[path]
            targets.append(FoldTarget.module(path, graph, feedforward, layer.is_conv1d, layer.base_layer.weight.shape,
                                             layer.base_layer.bias is not None and not feedforward, part.dims[path]))
    return targets


# -- tracing: the targeted weights as forward inputs ------------------------------------------
@contextlib.contextmanager
def weights_from(layers: dict, tensors: dict):
    """Make each target's base layer read its weight/bias from `tensors` (graph inputs) for one
    traced forward pass. (torch.func.functional_call refuses the TorchScript tracer.)"""
    swapped = []
    try:
        for name, tensor in tensors.items():
            path, kind = name.rsplit(".", 1)
            base = layers[path].base_layer
            swapped.append((base, kind, base._parameters[kind]))
            base._parameters[kind] = tensor
        yield
    finally:
        for base, kind, original in reversed(swapped):
            base._parameters[kind] = original


class WeightsAsInputs(nn.Module):
    """A plain-tensor wrapper whose first `n_base` arguments are its own; the rest are the target tensors."""

    def __init__(self, wrapper: nn.Module, layers: dict, names: list[str], n_base: int):
        super().__init__()
        self.inner, self.layers, self.names, self.n_base = wrapper, layers, names, n_base

    def forward(self, *args):
        with weights_from(self.layers, dict(zip(self.names, args[self.n_base:]))):
            return self.inner(*args[:self.n_base])


def base_tensor(layers: dict, name: str):
    path, kind = name.rsplit(".", 1)
    return getattr(layers[path].base_layer, kind)


# -- the fold graph ---------------------------------------------------------------------------
def build_fold_graph(targets: list[FoldTarget], dtype: str, opset: int, base):
    """(W0, b0 as initializers; vectors [dim] as inputs) -> folded weight/bias outputs, one Mul each.

    `base(name, shape)` gives the TensorProto of a tensor's base value (named `<name>.base`).
    A target's scale is its vector, or its segments joined by a Concat (ones where a module is not
    targeted). Output scaling of an [out, in] weight and input scaling of an [in, out] one run along
    the last axis ([dim] broadcasts); every other case is an Unsqueeze to the weight's vector axis.
    The fold always starts from the base values, never from the previous adapter: dividing by an
    old vector drifts and fails at zeros."""
    elem, np_dtype = DTYPES[dtype].onnx, numpy_dtype(dtype)
    nodes, inputs, outputs, inits = [], [], [], []
    for i, t in enumerate(targets):
        parts = []
        for j, (path, width) in enumerate(t.segments):
            if path is None:
                parts.append(f"fold.ones.{i}.{j}")
                inits.append(numpy_helper.from_array(np.ones(width, np_dtype), parts[-1]))
            else:
                parts.append(vector_name(path))
                inputs.append(helper.make_tensor_value_info(parts[-1], elem, [width]))
        line = parts[0]
        if len(parts) > 1:  # [q | k | v] along a fused output
            line = f"fold.line.{i}"
            nodes.append(helper.make_node("Concat", parts, [line], axis=0))
        scale = line
        if t.vector_axis != len(t.weight_shape) - 1:  # [dim] -> [dim, 1]
            axes = f"fold.axes.{i}"
            inits.append(numpy_helper.from_array(np.array([1], np.int64), axes))
            scale = f"{line}.column"
            nodes.append(helper.make_node("Unsqueeze", [line, axes], [scale]))
        for name, source in ((t.weight, scale), (t.bias, line)):
            if name is None:
                continue
            shape = t.shape(name)
            inits.append(base(name, shape))
            nodes.append(helper.make_node("Mul", [f"{name}.base", source], [name]))
            outputs.append(helper.make_tensor_value_info(name, elem, shape))
    graph = helper.make_graph(nodes, "ia3_fold", inputs, outputs, inits)
    # IR version 8, as torch's exporter writes: onnx's newest default (14) is refused by ORT 1.31 (seen on the GPU)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ia3-export",
                             ir_version=8)


def base_values(layers: dict, dtype: str):
    """`base` for build_fold_graph: the model's own tensors, in the export's dtype."""
    np_dtype = numpy_dtype(dtype)
    return lambda name, shape: numpy_helper.from_array(
        base_tensor(layers, name).detach().cpu().numpy().astype(np_dtype), f"{name}.base")


def fold_numpy(fold_session, vectors: dict) -> dict[str, np.ndarray]:
    """Folded tensors for vectors (input name -> [dim]) by running the fold graph on the CPU."""
    names = [o.name for o in fold_session.get_outputs()]
    return dict(zip(names, fold_session.run(None, vectors)))
