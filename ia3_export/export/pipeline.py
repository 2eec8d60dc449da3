"""`export_model`: a model folder (+ adapters) -> a validated ONNX folder with a manifest.

One loop for every mode: check the inputs, load the model, let the mode prepare where its IA3
vectors come from (folded, graph inputs, a per-row bank, weights re-folded), make the graphs with
the `--graph` factory (`TracedGraphs`: trace each graph through the plain-tensor wrappers, let the
mode edit it, quantize it if asked, compare it with PyTorch on ONNX Runtime in the mode's scenarios;
`fused.BuilderGraphs`: onnxruntime-genai's model builder, vectors placed by graph edits), and write
everything atomically (graphs, the mode's artefacts, side files, the manifest): a failure anywhere
leaves no output folder. What differs between modes is declared by their classes in export/modes/.
"""
from __future__ import annotations

import inspect
import logging
import os
import shutil
import warnings

import torch

from .. import __version__
from ..formats import adapter_format as fmt
from ..formats.atomic import atomic_output_dir, check_finite, check_output
from ..dtypes import DTYPES as ALL_DTYPES, torch_dtype
from ..errors import IA3Error
from ..ort import onnxruntime
from ..core.loading import copy_side_files, has_tokenizer, read_model_config, write_config
from ..formats.manifest import DTYPES, FUSED, MERGED, TRACED, new_manifest, write_manifest
from ..core.merge import adapter_names
from ..progress import stage
from ..tolerances import quantized_tolerance
from . import graph as onnx_graph
from .compat import traceable_masks
from .fused import BuilderGraphs
from .genai import validate_with_genai, write_genai_files
from . import layouts
from .modes import Export, export_mode
from .quantize import quantize_graph, quantize_options
from .reference import load_model, probe_shape, sample_feeds
from .tasks import Task, graph_specs, resolve_task
from .validate import cpu_session, raise_on_failure, tolerance_of
from .wrappers import graph_wrappers

EXPORTERS = ("torchscript", "dynamo")
OPSETS = range(14, 21)
DEFAULT_OPSET = 18


def export_model(model_dir: str, out_dir: str, *, mode: str = MERGED, adapters: list[str] = (),
                 task: str | None = None, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                 target_modules: list[str] | str | None = None, feedforward_modules: list[str] | str | None = None,
                 exporter: str = "torchscript", force: bool = False, trust_remote_code: bool = False,
                 quantize=None, graph: str = TRACED, layout: str = layouts.OPTIMUM) -> dict:
    """Export and validate; returns the manifest written as `ia3_export.json`. `quantize`: None,
    "int4", "int8" or a `QuantizeOptions` (see export/quantize.py). `graph`: who makes the graphs
    (`GRAPH_FACTORIES`: "traced" by torch.onnx, "fused" by onnxruntime-genai's model builder).
    `layout`: where the graph goes (export/layouts.py: "optimum", or "transformers.js")."""
    strategy = _check_options(mode, dtype, opset, exporter)
    strategy.check_options(exporter, target_modules, feedforward_modules)
    quantize = quantize_options(quantize)
    if quantize is not None:
        quantize.check(strategy, dtype)
    factory = graph_factory(graph, exporter, quantize)
    check_output(out_dir, force, inputs=[model_dir, *adapters])
    config = read_model_config(model_dir)
    adapter_files = [fmt.read_adapter(p) for p in adapters]
    for a in adapter_files:  # as the export stores them: a vector entry of 1e5 is inf in float16
        check_finite(a.tensors, a.path, ALL_DTYPES[dtype].numpy)
    spec = resolve_task(task, config, model_dir, adapter_files)
    layouts.check_layout(layout, strategy, graph, spec)
    factory.check(strategy, config, spec, dtype)
    names = adapter_names(adapter_files, "two adapters get the name {name!r} (an adapter's name is its folder name, "
                                         "with characters other than letters, digits, '_', '-', '.' replaced by '_'); "
                                         "rename one folder")
    strategy.check_adapters(adapter_files)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    stage(f"loading {model_dir} ({spec.name}, {mode}, {dtype})")
    model = load_model(model_dir, spec.auto_class, adapter_files, trust_remote_code=trust_remote_code,
                       dtype=torch_dtype(dtype))
    ia3, vectors, hf_model = strategy.prepare(model, adapter_files, target_modules, feedforward_modules)
    shape = probe_shape(hf_model, spec, dtype)
    specs = graph_specs(spec, shape.num_layers, token_type_ids=config["model_type"] == "bert")
    layouts.place(layout, specs, dtype, quantize)
    ex = Export(model_dir, spec, adapter_files, [] if strategy.folds_adapters else names, dtype, opset, shape, ia3,
                vectors, graph_wrappers(hf_model, spec, shape, vectors, specs))

    with atomic_output_dir(out_dir, force=force, inputs=[model_dir, *adapters]) as tmp:
        strategy.begin(ex, tmp)
        graphs, comparisons, quantized = factory.make(strategy, ex, specs, tmp, hf_model)
        adapter_entries = strategy.write_adapters(ex, tmp)
        extra = strategy.finish(ex, tmp, graphs)
        write_side_files(model_dir, tmp, hf_model, spec)
        extra = {**extra, **layouts.finish(layout, tmp, graphs, dtype, quantize)}
        made = factory.manifest_fields(ex)
        manifest = new_manifest(
            mode=mode, task=spec.name, model_type=config["model_type"], dtype=dtype, opset=made["opset"],
            exporter=made["exporter"], graphs=graphs, vectors=strategy.vector_entries(ex), adapters=adapter_entries,
            tokens=special_tokens(hf_model),
            cache={"graph": specs[-1].key, "num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads,
                   "head_dim": shape.head_dim, **made["cache"]} if spec.cache else None,
            versions=package_versions() | made["versions"],
            quantization=quantize and {**quantize.manifest_entry(), "graphs": quantized},
            validation={"comparisons": len(comparisons), "max_abs": max((c.max_abs for c in comparisons), default=0.0),
                        "tolerance": {"atol": comparisons[0].atol, "rtol": comparisons[0].rtol} if comparisons else None},
            **extra,
        )
        manifest["genai"] = factory.genai_files(tmp, manifest)  # onnxruntime-genai's config, or why it cannot serve it
        write_manifest(tmp, manifest)
        validate_with_genai(tmp, manifest)
    return manifest


def _check_options(mode, dtype, opset, exporter):
    """The mode's strategy, once the options every mode shares are known good."""
    strategy = export_mode(mode)()
    if dtype not in DTYPES:
        raise IA3Error(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if opset not in OPSETS:
        raise IA3Error(f"opset {opset} is not supported; use {OPSETS.start} to {OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    if exporter not in EXPORTERS:
        raise IA3Error(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    return strategy


class TracedGraphs:
    """The default graph factory: each graph traced by torch.onnx through the plain-tensor wrappers,
    edited by the mode, quantized if asked and validated in the mode's scenarios."""

    def __init__(self, exporter: str, quantize):
        self.exporter, self.quantize = exporter, quantize

    def check(self, strategy, config: dict, task: Task, dtype: str) -> None:
        """Every model the pipeline loads can be traced: nothing more to refuse."""

    def make(self, strategy, ex: Export, specs, tmp: str, hf_model) -> tuple[dict, list, dict]:
        """(graphs entry of the manifest, comparisons, quantized weights per graph)."""
        quantize, graphs, comparisons, quantized = self.quantize, {}, [], {}
        for graph in specs:
            wrapper, part = ex.parts[graph.key]
            path = os.path.join(tmp, graph.file)
            stage(f"tracing {graph.file}")
            inputs, files = _trace(strategy, ex, graph, wrapper, part, path, self.exporter, tmp)
            if quantize is not None:  # the model then holds the de-quantized weights: validation compares with them
                stage(f"quantizing {graph.file} ({quantize.method})")
                weights, files = quantize_graph(path, hf_model, quantize)
                quantized[graph.key] = {"weights": weights}
            stage(f"validating {graph.file} against PyTorch on ONNX Runtime")
            with tolerance_of(quantize and quantized_tolerance(quantize.manifest_entry())[:2]):
                comparisons += strategy.validate(ex, graph, wrapper, cpu_session(path), part)
            raise_on_failure(comparisons, f"{graph.file} ({strategy.name} export of {ex.model_dir})")
            graphs[graph.key] = {"file": graph.file, "inputs": inputs, "outputs": graph.outputs,
                                 "external_data": files[1] if len(files) > 1 else None,
                                 "nodes": sum(onnx_graph.op_histogram(path).values())}
        return graphs, comparisons, quantized

    def manifest_fields(self, ex: Export) -> dict:
        """What the factory says in the manifest: exporter, opset, extra cache and version keys."""
        return {"exporter": self.exporter, "opset": ex.opset, "cache": {}, "versions": {}}

    def genai_files(self, tmp: str, manifest: dict) -> dict:
        return write_genai_files(tmp, manifest)


GRAPH_FACTORIES = {TRACED: TracedGraphs, FUSED: BuilderGraphs}  # --graph: who makes the graphs


def graph_factory(name: str, exporter: str, quantize):
    """The factory of `--graph name`, given the options it must honour or refuse."""
    if name not in GRAPH_FACTORIES:
        raise IA3Error(f"unknown graph {name!r}; use one of {', '.join(GRAPH_FACTORIES)}")
    return GRAPH_FACTORIES[name](exporter, quantize)


def _trace(strategy, ex: Export, graph, wrapper, part, path, exporter, tmp) -> tuple[list[str], list[str]]:
    """Trace one graph to `path` with the mode's extra inputs and graph edit; returns its inputs and files."""
    _, feeds = sample_feeds(graph, ex.task, ex.shape, seed=1)[-1]  # padding, and past > 0 where there is a cache
    module, extra, extra_args, extra_axes = strategy.trace_inputs(ex, graph, wrapper, part, feeds)
    inputs = graph.inputs + extra
    args = [torch.from_numpy(feeds[n]) for n in graph.inputs] + extra_args
    axes = dict(graph.dynamic_axes) | extra_axes
    scratch = os.path.join(tmp, ".trace")
    traced = os.path.join(scratch, graph.file)
    for folder in (os.path.dirname(traced), os.path.dirname(path)):  # a layout may put graphs in a subfolder
        os.makedirs(folder, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), traceable_masks():
        warnings.simplefilter("ignore")
        try:
            if exporter == "torchscript":
                torch.onnx.export(module, tuple(args), traced, input_names=inputs, output_names=graph.outputs,
                                  dynamic_axes=axes, opset_version=ex.opset, dynamo=False, do_constant_folding=True)
            else:  # torch.export: every named axis dynamic, sizes left for it to relate
                shapes = [{ax: torch.export.Dim.DYNAMIC for ax in axes.get(n, {})} for n in inputs]
                fixed = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in inspect.signature(module.forward).parameters.values())
                shapes = (*shapes[:fixed], tuple(shapes[fixed:]))  # forward(a, b, ..., *rest)
                torch.onnx.export(module, tuple(args), traced, input_names=inputs, output_names=graph.outputs,
                                  dynamic_shapes=shapes, opset_version=ex.opset, dynamo=True, optimize=True)
        except Exception as e:
            raise IA3Error(f"torch.onnx.export ({exporter}) failed for {graph.file}: {str(e).splitlines()[0][:300]}") from e
    model = onnx_graph.load(traced)
    strategy.edit_graph(ex, graph, model, part)
    files = onnx_graph.save(model, path)
    shutil.rmtree(scratch)
    onnx_graph.check(path)
    return inputs, files


def write_side_files(model_dir: str, out: str, hf_model, spec: Task) -> None:
    """What serving reads beside the graphs: config.json naming the exported head, the tokenizer and
    generation files, and tokenizer.json as transformers builds it for model_dir."""
    write_config(out, hf_model, model_dir)
    if "generation_config.json" not in copy_side_files(model_dir, out) and generates(spec):
        hf_model.generation_config.to_json_file(os.path.join(out, "generation_config.json"))
    write_runtime_tokenizer(model_dir, out)


def write_runtime_tokenizer(model_dir: str, out: str) -> None:
    """tokenizer.json holding the pipeline transformers' AutoTokenizer uses for model_dir, without
    stored padding or truncation. A model-specific class in tokenizer_config.json (LlamaTokenizer,
    T5Tokenizer) makes transformers 5 rebuild the pipeline from the vocabulary rather than read
    tokenizer.json as it is, so the copied file can split text differently; the torch-free runtime
    reads this one and so tokenizes as transformers does."""
    if not has_tokenizer(model_dir):
        return
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(model_dir).backend_tokenizer
    except (OSError, ValueError, AttributeError):  # no fast tokenizer: the copied files are all there is
        return
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())  # a copy: the loaded tokenizer keeps its settings
    backend.no_padding()
    backend.no_truncation()
    backend.save(os.path.join(out, "tokenizer.json"))


def generates(spec: Task) -> bool:
    return spec.kind in ("decoder", "seq2seq")


def special_tokens(model) -> dict:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    gen = getattr(model, "generation_config", None)

    def pick(name):
        value = getattr(text, name, None)
        return value if value is not None else getattr(gen, name, None)

    return {"pad": pick("pad_token_id"), "bos": pick("bos_token_id"), "eos": pick("eos_token_id"),
            "decoder_start": pick("decoder_start_token_id")}


def package_versions() -> dict:
    import onnx
    import transformers

    return {"ia3_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime().__version__}


