"""`export_model`: a model folder (+ adapters) -> a validated ONNX folder with a manifest.

Steps: check the inputs, load the model, prepare where its IA3 vectors come from (folded,
graph inputs, or a per-row bank), trace each graph through the plain-tensor wrappers, edit the
graph (overridable initializers of ones), check it, compare it with PyTorch on ONNX Runtime,
and write everything atomically: a failure anywhere leaves no output folder.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import warnings

from .. import __version__
from ..atomic import atomic_output_dir, check_output
from ..errors import IA3Error
from ..loading import copy_side_files, has_tokenizer, load_task_model, read_model_config, write_config
from ..manifest import DTYPES, MODES, new_manifest, write_manifest
from ..progress import stage
from . import graph as onnx_graph
from .compat import traceable_masks
from .genai import validate_with_genai, write_genai_files
from .quantize import quantize_graph, quantize_options
from .tasks import Task, graph_specs, resolve_task
from .validate import ModelShape, cpu_session, raise_on_failure, sample_feeds, tolerance_of, validate_graph
from .wrappers import (DecoderWithCache, Encoder, Seq2SeqDecoder, Seq2SeqEncoder, VectorInputs,
                       flatten_cache, returned_cache, vector_name)

EXPORTERS = ("torchscript", "dynamo")
OPSETS = range(14, 21)
DEFAULT_OPSET = 18
TARGETS_ONLY = "__targets__"  # pseudo adapter holding --target-modules (vectors of ones)


def export_model(model_dir: str, out_dir: str, *, mode: str = "merged", adapters: list[str] = (),
                 task: str | None = None, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                 target_modules: list[str] | str | None = None, feedforward_modules: list[str] | str | None = None,
                 exporter: str = "torchscript", force: bool = False, trust_remote_code: bool = False,
                 quantize=None) -> dict:
    """Export and validate; returns the manifest written as `ia3_export.json`. `quantize`: None,
    "int4", "int8" or a `QuantizeOptions` (see export/quantize.py)."""
    from .. import adapter_format as fmt

    _check_options(mode, dtype, opset, exporter, adapters, target_modules, feedforward_modules)
    quantize = quantize_options(quantize)
    if quantize is not None:
        quantize.check(mode, dtype)
    check_output(out_dir, force, inputs=[model_dir, *adapters])
    config = read_model_config(model_dir)
    adapter_files = [fmt.read_adapter(p) for p in adapters]
    spec = resolve_task(task, config, model_dir, adapter_files)
    names = [a.name for a in adapter_files]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise IA3Error(f"two adapters get the name {twice!r} (an adapter's name is its folder name, with characters "
                       "other than letters, digits, '_', '-', '.' replaced by '_'); rename one folder")
    if mode != "merged":
        for a in adapter_files:
            if a.saved_tensors():
                raise IA3Error(
                    f"{a.path} also trains whole modules ({sorted(a.saved_tensors())[0]}, modules_to_save); "
                    f"a {mode} export carries IA3 vectors only. Export it with --mode merged"
                )
    if mode == "foldswap":  # targeted weights as graph inputs: its own tracing and fold graph
        from .foldswap import export_foldswap

        return export_foldswap(model_dir, out_dir, spec=spec, config=config, adapter_files=adapter_files, dtype=dtype,
                               opset=opset, target_modules=target_modules, feedforward_modules=feedforward_modules,
                               exporter=exporter, force=force, trust_remote_code=trust_remote_code)

    import torch

    logging.getLogger("transformers").setLevel(logging.ERROR)
    stage(f"loading {model_dir} ({spec.name}, {mode}, {dtype})")
    model = load_task_model(model_dir, spec.auto_class, adapter_files, trust_remote_code=trust_remote_code,
                            dtype=torch.float16 if dtype == "fp16" else torch.float32)
    use_eager_attention(model)
    ia3, vectors = prepare_ia3(model, mode, adapter_files, target_modules, feedforward_modules)
    hf_model = ia3.model if ia3 is not None else ia3_merged(model, adapter_files)
    shape = probe_shape(hf_model, spec, dtype)
    specs = graph_specs(spec, shape.num_layers, token_type_ids=config["model_type"] == "bert")
    parts = graph_wrappers(hf_model, spec, shape, vectors, specs)

    graphs, vector_entries, comparisons, quantized = {}, [], [], {}
    with atomic_output_dir(out_dir, force=force, inputs=[model_dir, *adapters]) as tmp:
        for graph in specs:
            wrapper, part = parts[graph.key]
            inputs = graph.inputs + (part.input_names() if part else [])
            path = os.path.join(tmp, graph.file)
            stage(f"tracing {graph.file}")
            files = _trace(wrapper, graph, part, shape, spec, inputs, path, opset, exporter, tmp)
            if quantize is not None:  # the model then holds the de-quantized weights: validation compares with them
                stage(f"quantizing {graph.file} ({quantize.method})")
                weights, files = quantize_graph(path, hf_model, quantize)
                quantized[graph.key] = {"weights": weights}
            session = cpu_session(path)
            stage(f"validating {graph.file} against PyTorch on ONNX Runtime")
            with tolerance_of(_quantized_tolerance(quantize)):
                comparisons += validate_graph(graph, spec, shape, wrapper, session, mode, ia3, part,
                                              names if mode != "merged" else [])
            raise_on_failure(comparisons, f"{graph.file} ({mode} export of {model_dir})")
            graphs[graph.key] = {"file": graph.file, "inputs": inputs, "outputs": graph.outputs,
                                 "external_data": files[1] if len(files) > 1 else None,
                                 "nodes": sum(onnx_graph.op_histogram(path).values())}
            for p in part.paths if part else []:
                vector_entries.append({"name": vector_name(p), "graph": graph.key, "dim": part.dims[p],
                                       "feedforward": part.feedforward[p]})
        adapter_entries = write_adapter_files(tmp, mode, ia3, vectors, adapter_files, dtype)
        write_side_files(model_dir, tmp, hf_model, spec)
        manifest = new_manifest(
            mode=mode, task=spec.name, model_type=config["model_type"], dtype=dtype, opset=opset, exporter=exporter,
            graphs=graphs, vectors=vector_entries, adapters=adapter_entries, tokens=special_tokens(hf_model),
            cache={"graph": specs[-1].key, "num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads,
                   "head_dim": shape.head_dim} if spec.cache else None,
            versions=package_versions(),
            quantization=quantize and {**quantize.manifest_entry(), "graphs": quantized},
            validation={"comparisons": len(comparisons), "max_abs": max((c.max_abs for c in comparisons), default=0.0),
                        "tolerance": {"atol": comparisons[0].atol, "rtol": comparisons[0].rtol} if comparisons else None},
        )
        manifest["genai"] = write_genai_files(tmp, manifest)  # onnxruntime-genai's config, see export/genai.py
        write_manifest(tmp, manifest)
        validate_with_genai(tmp, manifest)
    return manifest


def _quantized_tolerance(quantize) -> tuple[float, float] | None:
    """A quantized graph's validation bound (parity/tolerances.py); None for float exports."""
    from ..parity.tolerances import quantized_tolerance

    if quantize is None:
        return None
    tol = quantized_tolerance(quantize.manifest_entry(), "cpu")
    return tol.atol, tol.rtol


def _check_options(mode, dtype, opset, exporter, adapters, target_modules, feedforward_modules):
    if mode not in MODES:
        raise IA3Error(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise IA3Error(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if opset not in OPSETS:
        raise IA3Error(f"opset {opset} is not supported; use {OPSETS.start} to {OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    if exporter not in EXPORTERS:
        raise IA3Error(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    if mode == "merged" and (target_modules is not None or feedforward_modules is not None):
        raise IA3Error("--target-modules/--feedforward-modules choose the vector inputs of swappable and bank exports; "
                       "a merged export folds the adapters given with --adapter")


def use_eager_attention(model) -> None:
    """Trace the eager attention: the TorchScript exporter's SDPA turns fp16 graphs partly fp32."""
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            return
        except (ValueError, AttributeError):
            pass
    model.config._attn_implementation = "eager"


def ia3_merged(model, adapter_files):
    """The model with the adapters folded in (their product), or the base model without adapters."""
    from ..model import IA3Model

    if not adapter_files:
        return model
    ia3 = IA3Model(model)
    for a in adapter_files:
        ia3.load_adapter(a, name=a.name, activate=False)
    ia3.set_adapter([a.name for a in adapter_files])
    return ia3.merge_and_unload()


def prepare_ia3(model, mode, adapter_files, target_modules, feedforward_modules):
    """(IA3Model, VectorInputs) for swappable/bank exports; (None, None) for merged."""
    if mode == "merged":
        return None, None
    from ..config import DEFAULT_TARGETS, IA3Config
    from ..model import IA3Model

    ia3 = IA3Model(model)
    for a in adapter_files:
        ia3.load_adapter(a, name=a.name, activate=False)
    target_modules, feedforward_modules = (list(m) if isinstance(m, (tuple, set)) else m
                                           for m in (target_modules, feedforward_modules))
    if target_modules is not None or not adapter_files:
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
    return ia3, VectorInputs(ia3, paths, feedforward, dims, bank=mode == "bank")


def probe_shape(model, spec: Task, dtype: str) -> ModelShape:
    """Cache layout and sizes, read from one forward pass (no per-architecture config parsing)."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    shape = ModelShape(vocab_size=vocab, dtype=dtype)
    ids = torch.tensor([[5, 6]])
    with torch.no_grad():
        if spec.kind == "seq2seq":
            out = model(input_ids=ids, decoder_input_ids=ids, use_cache=True)
            shape.hidden_size = out.encoder_last_hidden_state.shape[-1]
            cache = returned_cache(out).self_attention_cache
        elif spec.cache:
            cache = returned_cache(model(input_ids=ids, use_cache=True))
        else:
            return shape
    flat = flatten_cache(cache)
    shape.num_layers, shape.num_kv_heads, shape.head_dim = len(flat) // 2, flat[0].shape[1], flat[0].shape[3]
    return shape


def graph_wrappers(model, spec: Task, shape: ModelShape, vectors: VectorInputs | None, specs) -> dict:
    """graph key -> (wrapper module in eval mode, the VectorInputs it takes or None).

    Eval mode matters: torch.onnx.export restores the wrapper's own mode after tracing, which
    would switch dropout on in the model below a wrapper left in its default training mode."""
    return {k: (w.eval(), v) for k, (w, v) in _build_wrappers(model, spec, shape, vectors, specs).items()}


def _build_wrappers(model, spec, shape, vectors, specs) -> dict:
    if spec.kind == "decoder":
        return {"model": (DecoderWithCache(model, shape.num_layers, vectors, use_cache=spec.cache), vectors)}
    if spec.kind == "encoder":
        return {"model": (Encoder(model, spec.output, "token_type_ids" in specs[0].inputs, vectors), vectors)}
    encoder_prefix = next(n for n, m in model.named_modules() if m is model.get_encoder()) + "."
    enc = dec = None
    if vectors is not None:
        enc = vectors.subset([p for p in vectors.paths if p.startswith(encoder_prefix)])
        dec = vectors.subset([p for p in vectors.paths if not p.startswith(encoder_prefix)])
    return {"encoder": (Seq2SeqEncoder(model, enc), enc), "decoder": (Seq2SeqDecoder(model, shape.num_layers, dec), dec)}


def _trace(wrapper, graph, part, shape, spec, inputs, path, opset, exporter, tmp) -> list[str]:
    """Trace one graph to `path` and turn its vector inputs into overridable initializers; returns its files."""
    import torch

    _, feeds = sample_feeds(graph, spec, shape, seed=1)[-1]  # padding, and past > 0 where there is a cache
    args = [torch.from_numpy(feeds[n]) for n in graph.inputs]
    axes = dict(graph.dynamic_axes)
    if part is not None:
        torch_dtype = torch.float16 if shape.dtype == "fp16" else torch.float32
        if part.bank:
            args.append(torch.arange(len(feeds["input_ids"])) % 2)
            axes["adapter_ids"] = {0: "batch_size"}
        for p in part.paths:
            args.append(torch.ones((2, part.dims[p]) if part.bank else (part.dims[p],), dtype=torch_dtype))
            if part.bank:
                axes[vector_name(p)] = {0: "num_adapters"}
    scratch = os.path.join(tmp, ".trace")
    os.makedirs(scratch, exist_ok=True)
    traced = os.path.join(scratch, graph.file)
    with torch.no_grad(), warnings.catch_warnings(), traceable_masks():
        warnings.simplefilter("ignore")
        try:
            if exporter == "torchscript":
                torch.onnx.export(wrapper, tuple(args), traced, input_names=inputs, output_names=graph.outputs,
                                  dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
            else:  # torch.export: every named axis dynamic, sizes left for it to relate
                shapes = [{ax: torch.export.Dim.DYNAMIC for ax in axes.get(n, {})} for n in inputs]
                fixed = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in inspect.signature(wrapper.forward).parameters.values())
                shapes = (*shapes[:fixed], tuple(shapes[fixed:]))  # forward(a, b, ..., *rest)
                torch.onnx.export(wrapper, tuple(args), traced, input_names=inputs, output_names=graph.outputs,
                                  dynamic_shapes=shapes, opset_version=opset, dynamo=True, optimize=True)
        except Exception as e:
            raise IA3Error(f"torch.onnx.export ({exporter}) failed for {graph.file}: {str(e).splitlines()[0][:300]}") from e
    model = onnx_graph.load(traced)
    if part is not None:
        onnx_graph.drop_noop_casts(model, [vector_name(p) for p in part.paths])
        for p in part.paths:
            onnx_graph.add_overridable_ones(model, vector_name(p), (1, part.dims[p]) if part.bank else (part.dims[p],), shape.dtype)
    files = onnx_graph.save(model, path)
    shutil.rmtree(scratch)
    onnx_graph.check(path)
    return files


def write_adapter_files(tmp, mode, ia3, vectors, adapter_files, dtype) -> list[dict]:
    """adapters/<name>.onnx_adapter per adapter (swappable, bank); the manifest's adapter list."""
    from ..adapter_format import WEIGHTS_NAME
    from ..onnx_adapter import SUFFIX, write_onnx_adapter
    from .validate import adapter_vectors

    entries = []
    for a in adapter_files:
        file = None
        if mode != "merged":
            file = f"adapters/{a.name}{SUFFIX}"
            os.makedirs(os.path.join(tmp, "adapters"), exist_ok=True)
            tensors = adapter_vectors(ia3, a.name, vectors.paths, dtype)
            if mode == "bank":  # a one-row bank, as `convert` writes: ORT's own adapter API then runs it (ids 0)
                tensors = {name: value[None, :] for name, value in tensors.items()}
            write_onnx_adapter(os.path.join(tmp, file), tensors)
        entries.append({"name": a.name, "file": file, "sha256": sha256_file(os.path.join(a.path, WEIGHTS_NAME))})
    return entries


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


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    import onnxruntime
    import torch
    import transformers

    return {"ia3_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


