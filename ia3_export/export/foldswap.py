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
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings

import numpy as np
import torch
from torch import nn

from ..errors import IA3Error
from ..progress import stage
from ..runtime.foldswap import FOLD_FILE, FOLD_GRAPH, MODE


@dataclasses.dataclass(frozen=True)
class FoldTarget:
    """One IA3-targeted module whose weight (and bias, for output scaling) the fold graph produces."""

    path: str  # module path, PEFT's key without `base_model.model.`
    graph: str  # the model graph that reads the weight
    feedforward: bool  # scales the input (columns) rather than the output (rows + bias)
    conv1d: bool  # GPT-2 Conv1D keeps its weight as [in, out]
    weight_shape: tuple[int, ...]
    has_bias: bool

    @property
    def weight(self) -> str:
        return f"{self.path}.weight"

    @property
    def bias(self) -> str | None:
        return f"{self.path}.bias" if self.has_bias else None

    @property
    def tensors(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.has_bias else [])

    def shape(self, name: str) -> list[int]:
        """Shape of the weight, or of the bias (the length of the scaled axis)."""
        return list(self.weight_shape if name == self.weight else [self.weight_shape[self.vector_axis]])

    @property
    def vector_axis(self) -> int:
        """The weight axis the vector runs along: rows [out] of a Linear for output scaling, etc."""
        return (0 if self.feedforward else 1) if self.conv1d else (1 if self.feedforward else 0)


def fold_targets(ia3, parts: dict) -> list[FoldTarget]:
    """The targets of every graph, from the same IA3 preparation the swappable export uses."""
    layers = ia3.ia3_layers()
    targets = []
    for graph, (_, part) in parts.items():
        for path in part.paths if part else []:
            layer = layers[path]
            feedforward = part.feedforward[path]
            targets.append(FoldTarget(path, graph, feedforward, layer.is_conv1d, tuple(layer.base_layer.weight.shape),
                                      layer.base_layer.bias is not None and not feedforward))
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


def trace_graph(wrapper, graph, targets: list[FoldTarget], layers: dict, shape, spec, path: str,
                opset: int, scratch: str) -> list[str]:
    """Trace one model graph with its targets' tensors as inputs; returns its input names."""
    from . import graph as onnx_graph
    from .validate import sample_feeds

    names = [n for t in targets for n in t.tensors]
    _, feeds = sample_feeds(graph, spec, shape, seed=1)[-1]
    args = [torch.from_numpy(feeds[n]) for n in graph.inputs]
    args += [base_tensor(layers, n).detach().clone() for n in names]
    inputs = graph.inputs + names
    traced = os.path.join(scratch, graph.file)
    module = WeightsAsInputs(wrapper, layers, names, len(graph.inputs)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, tuple(args), traced, input_names=inputs, output_names=graph.outputs,
                              dynamic_axes=dict(graph.dynamic_axes), opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        except Exception as e:
            raise IA3Error(f"torch.onnx.export failed for {graph.file} ({MODE}): {str(e).splitlines()[0][:300]}") from e
    model = onnx_graph.load(traced)
    present = {i.name for i in model.graph.input}
    lost = [n for n in names if n not in present]
    if lost:
        raise IA3Error(f"internal error: the traced {graph.file} does not read {lost[0]} (is the module used?)")
    onnx_graph.save(model, path)
    onnx_graph.check(path)
    return inputs


def base_tensor(layers: dict, name: str):
    path, kind = name.rsplit(".", 1)
    return getattr(layers[path].base_layer, kind)


# -- the fold graph ---------------------------------------------------------------------------
def build_fold_graph(targets: list[FoldTarget], dims: dict, dtype: str, opset: int, base):
    """(W0, b0 as initializers; vectors [dim] as inputs) -> folded weight/bias outputs, one Mul each.

    `base(name, shape)` gives the TensorProto of a tensor's base value (named `<name>.base`).
    Input scaling of a Linear needs no reshape ([in] broadcasts over [out, in]); every other case
    is an Unsqueeze to the weight's vector axis. The fold always starts from the base values,
    never from the previous adapter: dividing by an old vector drifts and fails at zeros."""
    from onnx import helper, numpy_helper

    from .graph import ONNX_DTYPES
    from .wrappers import vector_name

    elem = ONNX_DTYPES[dtype]
    nodes, inputs, outputs, inits = [], [], [], []
    for i, t in enumerate(targets):
        vector = vector_name(t.path)
        inputs.append(helper.make_tensor_value_info(vector, elem, [dims[t.path]]))
        scale = vector
        if t.vector_axis != len(t.weight_shape) - 1:  # [dim] -> [dim, 1]
            axes = f"fold.axes.{i}"
            inits.append(numpy_helper.from_array(np.array([1], np.int64), axes))
            scale = f"{vector}.column"
            nodes.append(helper.make_node("Unsqueeze", [vector, axes], [scale]))
        for name, source in ((t.weight, scale), (t.bias, vector)):
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
    from onnx import numpy_helper

    np_dtype = np.float16 if dtype == "fp16" else np.float32
    return lambda name, shape: numpy_helper.from_array(
        base_tensor(layers, name).detach().cpu().numpy().astype(np_dtype), f"{name}.base")


def fold_numpy(fold_session, vectors: dict) -> dict[str, np.ndarray]:
    """Folded tensors for vectors (input name -> [dim]) by running the fold graph on the CPU."""
    names = [o.name for o in fold_session.get_outputs()]
    return dict(zip(names, fold_session.run(None, vectors)))


# -- the export -------------------------------------------------------------------------------
def export_foldswap(model_dir: str, out_dir: str, *, spec, config: dict, adapter_files: list, dtype: str,
                    opset: int, target_modules, feedforward_modules, exporter: str, force: bool,
                    trust_remote_code: bool = False) -> dict:
    """Called by `export_model` for mode `foldswap` once the common checks have passed."""
    import logging

    from ..atomic import atomic_output_dir
    from ..loading import load_task_model
    from ..manifest import new_manifest, write_manifest
    from . import build
    from . import graph as onnx_graph
    from .tasks import graph_specs
    from .validate import cpu_session, raise_on_failure
    from .wrappers import vector_name

    if exporter != "torchscript":
        raise IA3Error(f"a {MODE} export is traced with the torchscript exporter; drop --exporter {exporter}")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = load_task_model(model_dir, spec.auto_class, adapter_files, trust_remote_code=trust_remote_code,
                            dtype=torch.float16 if dtype == "fp16" else torch.float32)
    build.use_eager_attention(model)
    ia3, vectors = build.prepare_ia3(model, "swappable", adapter_files, target_modules, feedforward_modules)
    hf_model = ia3.model
    shape = build.probe_shape(hf_model, spec, dtype)
    specs = graph_specs(spec, shape.num_layers, token_type_ids=config["model_type"] == "bert")
    parts = build.graph_wrappers(hf_model, spec, shape, vectors, specs)
    targets = fold_targets(ia3, parts)
    layers = ia3.ia3_layers()
    names = [a.name for a in adapter_files]

    graphs, comparisons = {}, []
    with atomic_output_dir(out_dir, force=force, inputs=[model_dir, *(a.path for a in adapter_files)]) as tmp:
        fold_path = os.path.join(tmp, FOLD_FILE)
        onnx_graph.save(build_fold_graph(targets, vectors.dims, dtype, opset, base_values(layers, dtype)), fold_path)
        onnx_graph.check(fold_path)
        fold = cpu_session(fold_path)
        scratch = os.path.join(tmp, ".trace")
        os.makedirs(scratch, exist_ok=True)
        for graph in specs:
            wrapper, part = parts[graph.key]
            mine = [t for t in targets if t.graph == graph.key]
            path = os.path.join(tmp, graph.file)
            stage(f"tracing {graph.file}")
            inputs = trace_graph(wrapper, graph, mine, layers, shape, spec, path, opset, scratch)
            stage(f"validating {graph.file} against PyTorch on ONNX Runtime")
            comparisons += validate_foldswap(graph, spec, shape, wrapper, cpu_session(path), fold, ia3, part, mine, names)
            raise_on_failure(comparisons, f"{graph.file} ({MODE} export of {model_dir})")
            graphs[graph.key] = {"file": graph.file, "inputs": inputs, "outputs": graph.outputs,
                                 "nodes": sum(onnx_graph.op_histogram(path).values())}
        shutil.rmtree(scratch)
        graphs[FOLD_GRAPH] = {"file": FOLD_FILE, "inputs": [vector_name(t.path) for t in targets],
                              "outputs": [n for t in targets for n in t.tensors],
                              "nodes": sum(onnx_graph.op_histogram(fold_path).values())}
        vector_entries = [{"name": vector_name(t.path), "graph": FOLD_GRAPH, "dim": vectors.dims[t.path],
                           "feedforward": t.feedforward} for t in targets]
        weight_entries = [{"name": n, "graph": t.graph, "vector": vector_name(t.path), "shape": t.shape(n)}
                          for t in targets for n in t.tensors]
        adapter_entries = build.write_adapter_files(tmp, "swappable", ia3, vectors, adapter_files, dtype)
        build.write_side_files(model_dir, tmp, hf_model, spec)
        manifest = new_manifest(
            mode=MODE, task=spec.name, model_type=config["model_type"], dtype=dtype, opset=opset, exporter=exporter,
            graphs=graphs, vectors=vector_entries, adapters=adapter_entries, tokens=build.special_tokens(hf_model),
            cache={"graph": specs[-1].key, "num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads,
                   "head_dim": shape.head_dim} if spec.cache else None,
            versions=build.package_versions(), weights=weight_entries,
            validation={"comparisons": len(comparisons), "max_abs": max((c.max_abs for c in comparisons), default=0.0),
                        "tolerance": {"atol": comparisons[0].atol, "rtol": comparisons[0].rtol} if comparisons else None},
        )
        manifest["genai"] = build.write_genai_files(tmp, manifest)  # says why genai cannot serve it
        write_manifest(tmp, manifest)
    return manifest


def validate_foldswap(graph, spec, shape, wrapper, session, fold, ia3, part, targets, adapters) -> list:
    """Base model, each adapter, and random vectors: the fold graph's tensors fed to the model graph
    against the IA3 model in PyTorch (the adapter's own parameters, not folded weights)."""
    from .validate import (_random_vectors, adapter_vectors, compare_outputs, ort_outputs, running, sample_feeds,
                           torch_outputs)
    from .wrappers import vector_name

    dtype = shape.dtype
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    all_vectors = {i.name: np.ones(i.shape, np_dtype) for i in fold.get_inputs()}
    names = [n for t in targets for n in t.tensors]
    paths = part.paths if part else []
    vector_names = [vector_name(p) for p in paths]
    results = []
    for label, feeds in sample_feeds(graph, spec, shape):
        def folded(vectors):
            tensors = fold_numpy(fold, all_vectors | vectors)
            return ort_outputs(session, feeds | {n: tensors[n] for n in names})

        with running(ia3, None):
            results += compare_outputs(f"{label}, no adapter", graph.outputs,
                                       torch_outputs(wrapper, graph.inputs, feeds), folded({}), dtype)
        for adapter in adapters:
            with running(ia3, adapter):
                reference = torch_outputs(wrapper, graph.inputs, feeds)
            results += compare_outputs(f"{label}, adapter {adapter}", graph.outputs, reference,
                                       folded(adapter_vectors(ia3, adapter, paths, dtype)), dtype)
        if paths:
            random = _random_vectors(paths, vector_names, part.dims, dtype)
            results += compare_outputs(f"{label}, random vectors", graph.outputs,
                                       torch_outputs(wrapper, graph.inputs + vector_names, feeds | random),
                                       folded(random), dtype)
    return results
