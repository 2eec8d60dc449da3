"""`--graph fused`: the export pipeline's graph made by onnxruntime-genai's model builder.

`BuilderGraphs` is the graph factory `export_model(..., graph="fused")` uses instead of tracing:
`model.onnx` is the graph of `python -m onnxruntime_genai.models.builder -p fp32 -e cpu` (`--dtype fp16`:
`-p fp16 -e cuda`, see `BUILDS`) (fused
q/k/v MatMul, ORT's `GroupQueryAttention` with rotary embeddings, a KV cache buffer shared between
past and present), with the IA3 vectors placed by graph edits on the builder's named nodes. The
mode decides, through its traits, what the builder is given and what is placed:
- a mode that folds its adapters (`folds_adapters`): the folded model is saved and built;
- a vector mode: the base model is built, then each vector becomes a graph input `<PEFT key>.ia3_l`
  (an overridable initializer of ones, as in the traced graph): the q/k/v vectors of one layer
  become ONE Mul over the fused q/k/v output (each vector padded with ones to the fused width),
  any other vector a Mul on its MatMul's input (feed-forward, e.g. `down_proj`) or output;
- a per-row mode (`per_row`): the same with `[num_adapters, dim]` banks and `adapter_ids[batch]`,
  one Gather per vector;
- a mode that lifts the weights (`lifts_weights`, foldswap): the base model is built, then each
  targeted tensor leaves the initializers and becomes a pure graph input of the same name
  (`lift_fold_targets`; no copy stays in model.onnx): a layer's fused q/k/v MatMul weight
  `model.layers.{i}.attn.qkv_proj.MatMul.weight` ([in, out]: its rows are torch's columns) and its
  bias `...qkv_proj.Add.bias` where the model has one (qwen2), both scaled along the output by
  [q | k | v] (ones for a module not targeted; phi3's qkv_proj is one module, one vector), and a
  feed-forward MatMul weight (`...mlp.down_proj.MatMul.weight`, scaled along its rows). fold.onnx
  holds their base values (modes/foldswap.py). The manifest's `weights` entries name each tensor,
  its graph and shape, and `vector`, the first vector that scales it; `vectors` lists them all where
  there are several (the fused q/k/v weight and bias).

Graph contract (what a runner needs to know):
- inputs `input_ids [batch, seq]`, `attention_mask [batch, total]` (int64; no `position_ids`:
  GroupQueryAttention derives positions from the mask's row sums), `past_key_values.{i}.key/value`
  `[batch, kv_heads, past, head_dim]`, then the vector inputs (bank: `adapter_ids` first), and
  `logits_to_keep` ([1] int64, default 0: every position; 1: the last only, for generation);
- outputs `logits [batch, seq or logits_to_keep, vocab]`, `present.{i}.key/value`;
- KV cache: either past grows like optimum's layout (feed `present.*` back as `past_key_values.*`,
  past length 0 at the start), or, as genai does (`past_present_share_buffer`), bind ONE
  pre-allocated `[batch, kv_heads, max_length, head_dim]` buffer per tensor as both past input and
  present output (IOBinding, same OrtValue); the mask's width then is the real total length.
  Batched prompts of different lengths must be RIGHT-padded: GroupQueryAttention takes each row's
  length from the mask's row sum and its tokens from position 0, so left padding (the traced
  graph's convention) gives wrong logits (tests/export/test_fused_export.py pins both).
The manifest adds `cache.kv_layout = "shared"`, `cache.max_length` and
`cache.position_ids = false` (readers ignore keys they do not know).

`--quantize` (fp32 only): export/quantize.py's transform on the finished graph (vectors placed,
`logits_to_keep` added), as on a traced graph; the packed q/k/v MatMul is recorded as the three
parameters it packs, each with its width, and `hf_model` gets the de-quantized weights before validation.

Why the builder: at a 1,024-token prompt its graph with the shared buffer decodes faster than the
traced one (issue 18; docs/bench_fused_graph.json). It is a pinned dependency (`BUILDER_VERSION`,
the `fused` extra): the graph edits rely on its node names. Its graph fails onnx.checker (ORT ops
in the default domain), so ONNX Runtime loading it is the structural check.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import torch

from ..dtypes import DTYPES, numpy_dtype, of_ort
from ..errors import IA3Error
from ..ort import child_environment, genai
from ..core.loading import copy_side_files
from ..formats.manifest import ADAPTER_IDS, KV_SHARED, LOGITS_TO_KEEP, vector_name
from ..progress import stage
from ..tolerances import quantized_tolerance
from . import graph as onnx_graph
from .genai import CONFIG_NAME, GENAI_TASK, TOKENIZER_FILES, unsupported
from .quantize import quantize_graph
from .reference import running
from .validate import compare_outputs, cpu_session, raise_on_failure, tolerance_of

BUILDER_VERSION = "0.18.0"
# export dtype -> the builder's (precision, execution provider). fp16 is the builder's CUDA graph: for
# -e cpu it makes fp16 graphs without GroupQueryAttention or the shared buffer (MultiHeadAttention,
# position_ids, Concat caches); its CUDA graph runs on ONNX Runtime's CPU kernels too (GQA has fp16 there),
# which is how export validation and parity check it on a machine without a GPU.
BUILDS = {"fp32": ("fp32", "cpu"), "fp16": ("fp16", "cuda")}
# what the builder builds and tests/export/test_fused_export.py checks (sliding windows included)
FUSED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
GRAPH = "model.onnx"
_ATTENTION = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj")
_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
_BUILDER_BLOCKS = {"self_attn": "attn", "mlp": "mlp"}


class BuilderGraphs:
    """The graph factory of `--graph fused` (see the module doc); export/pipeline.py drives it."""

    def __init__(self, exporter: str, quantize):
        self.exporter, self.quantize = exporter, quantize

    def check(self, strategy, config: dict, task, dtype: str) -> None:
        """Refuse, before any work, what the builder cannot make or this factory cannot validate."""
        self.config = config  # the model's config.json, read by `make` and `manifest_fields`
        if dtype not in BUILDS:
            raise IA3Error(f"--graph fused makes {' or '.join(BUILDS)} graphs, not {dtype}; use --graph traced")
        self.dtype = dtype
        if self.exporter != "torchscript":
            raise IA3Error(f"--exporter chooses the tracer of --graph traced; drop --exporter {self.exporter} "
                           "with --graph fused")
        if task.name != GENAI_TASK:
            raise IA3Error(f"--graph fused makes {GENAI_TASK} graphs (a decoder with its KV cache), not {task.name}; "
                           "use --graph traced")
        model_type = config.get("model_type")
        if model_type not in FUSED_TYPES:
            raise IA3Error(f"--graph fused supports {', '.join(FUSED_TYPES)} decoders, not {model_type!r}; "
                           "use --graph traced")
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if head_dim % 16:
            raise IA3Error(f"ONNX Runtime's CPU GroupQueryAttention needs a head size that is a multiple of 16, this "
                           f"model's is {head_dim}; use --graph traced")
        require_builder()

    def make(self, strategy, ex, specs, tmp: str, hf_model) -> tuple[dict, list, dict]:
        """Build, place the vectors, add `logits_to_keep`, validate: (graphs, comparisons, quantized)."""
        (spec,) = specs
        _, part = ex.parts[spec.key]
        work = os.path.join(tmp, ".work")
        source = ex.model_dir
        if strategy.folds_adapters and ex.adapters:  # the model as the mode prepared it: adapters folded in
            source = os.path.join(work, "folded")
            hf_model.save_pretrained(source)
            copy_side_files(ex.model_dir, source)
        run_builder(source, tmp, os.path.join(work, "cache"), *BUILDS[self.dtype])
        path = os.path.join(tmp, GRAPH)
        model = onnx_graph.load(path)
        if strategy.lifts_weights:  # foldswap: the targeted tensors become the inputs fold.onnx fills
            stage("lifting the IA3-targeted weights of the fused graph into fold.onnx")
            strategy.fold_from(ex, *lift_fold_targets(model, part, self.config, spec.key, ex.dtype))
        elif part is not None and part.paths:
            stage("placing the IA3 vectors on the fused graph")
            place_vectors(model, part, self.config, bank=strategy.per_row, dtype=self.dtype)
        match_sliding_window(model, self.config)
        add_logits_to_keep(model)
        for stale in (GRAPH, GRAPH + ".data"):
            os.remove(os.path.join(tmp, stale))
        files = onnx_graph.save(model, path)
        shutil.rmtree(work, ignore_errors=True)
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        # no onnx.checker: the builder's own graph fails it (SimplifiedLayerNormalization is an ORT op the
        # builder puts in the default domain); ONNX Runtime loading it below is the check
        quantized, files = self.quantized(path, hf_model, spec.key, files)
        stage(f"validating {GRAPH} (fused) against PyTorch on ONNX Runtime")
        with tolerance_of(self.quantize and quantized_tolerance(self.quantize.manifest_entry())[:2]):
            comparisons = validate(strategy, ex, hf_model, part, cpu_session(path))
        raise_on_failure(comparisons, f"{GRAPH} (fused {strategy.name} export of {ex.model_dir})")
        inputs, outputs = onnx_graph.io_names(model)
        graphs = {spec.key: {"file": GRAPH, "inputs": inputs, "outputs": outputs,
                             "external_data": files[1] if len(files) > 1 else None,
                             "nodes": sum(onnx_graph.op_histogram(path).values())}}
        return graphs, comparisons, quantized

    def quantized(self, path: str, hf_model, key: str, files: list) -> tuple[dict, list]:
        """`--quantize`: the traced path's transform on the finished graph (vectors placed), its
        q/k/v MatMul recorded as the three parameters it packs; `hf_model` then holds the de-quantized
        weights, so validation compares with what the graph computes. (quantized weights, graph files)."""
        if self.quantize is None:
            return {}, files
        stage(f"quantizing {GRAPH} ({self.quantize.method})")
        weights, files = quantize_graph(path, hf_model, self.quantize)
        return {key: {"weights": weights}}, files

    def manifest_fields(self, ex) -> dict:
        """The builder as exporter, its opset, and the cache layout a runner needs (module doc)."""
        max_length = self.config.get("max_position_embeddings")
        return {"exporter": f"onnxruntime-genai-builder {BUILDER_VERSION}", "opset": self.opset,
                "cache": {"kv_layout": KV_SHARED, "max_length": max_length, "position_ids": False},
                "versions": {"onnxruntime_genai": genai().__version__}}

    def genai_files(self, tmp: str, manifest: dict) -> dict:
        """The builder's own genai_config.json (shared KV buffer) stays, unless genai cannot serve the mode."""
        reason = unsupported(manifest)
        if reason is not None:
            os.remove(os.path.join(tmp, CONFIG_NAME))
            return {"supported": False, "reason": reason}
        return {"supported": True, "files": [f for f in (CONFIG_NAME, *TOKENIZER_FILES)
                                              if os.path.isfile(os.path.join(tmp, f))]}


def require_builder() -> None:
    try:
        onnxruntime_genai = genai()
    except ImportError:
        raise IA3Error(f"--graph fused needs onnxruntime-genai's model builder; "
                       f"pip install 'ia3-export[fused]' (onnxruntime-genai=={BUILDER_VERSION})") from None
    if onnxruntime_genai.__version__ != BUILDER_VERSION:
        raise IA3Error(f"--graph fused is tested with onnxruntime-genai {BUILDER_VERSION} (its node names are "
                       f"edited), found {onnxruntime_genai.__version__}; pip install onnxruntime-genai=={BUILDER_VERSION}")


def run_builder(model_dir: str, out_dir: str, cache_dir: str, precision: str = "fp32", provider: str = "cpu") -> None:
    """`python -m onnxruntime_genai.models.builder` in a subprocess of this interpreter (its Python API
    needs the CLI's own option parsing first); its chatter is kept and shown only on failure."""
    stage(f"building the fused graph with onnxruntime-genai {BUILDER_VERSION}'s model builder ({precision}, {provider})")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", model_dir, "-o", out_dir,
               "-p", precision, "-e", provider, "-c", cache_dir,
               # one KV buffer of the request's length on every layer, sliding ones too (the default, a
               # window-long ring on sliding layers, cannot share past and present the way our runtime does)
               "--extra_options", "windowed_kv_cache=false"]
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment())
    if done.returncode != 0 or not os.path.isfile(os.path.join(out_dir, GRAPH)):
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise IA3Error(f"onnxruntime-genai's model builder failed on {model_dir}: "
                       f"{lines[-1][:300] if lines else 'no output'}; use --graph traced")


# -- graph edits ------------------------------------------------------------------------------
class _Edits:
    """New nodes for one graph: `prelude` (reading only graph inputs) goes first, each Mul right
    before the node it feeds, so the node list stays topologically sorted."""

    def __init__(self, model, bank: bool, dtype: str = "fp32"):
        self.model, self.bank, self.dtype = model, bank, dtype
        self.prelude, self.before = [], {}  # before: id(node) -> new nodes placed before it
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"/ia3/{stem}_{self.count}"

    def node(self, op: str, inputs: list[str], stem: str, before=None, **attrs) -> str:
        from onnx import helper

        out = self.name(stem)
        made = helper.make_node(op, inputs, [out], name=out + "/" + op, **attrs)
        (self.before.setdefault(id(before), []) if before is not None else self.prelude).append(made)
        return out

    def constant(self, array: np.ndarray, stem: str) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.model.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def row(self, vector: str) -> str:
        """The tensor that scales activations: the [dim] input, or the bank rows of `adapter_ids` as [batch, 1, dim]."""
        if not self.bank:
            return vector
        gathered = self.node("Gather", [vector, ADAPTER_IDS], "gather", axis=0)
        return self.node("Unsqueeze", [gathered, self.constant(np.array([1], np.int64), "axes")], "row")

    def padded(self, tensor: str, before: int, after: int) -> str:
        """`tensor` widened along its last axis with ones: `before` in front, `after` behind."""
        if not before and not after:
            return tensor
        pads = self.constant(np.array([before, after], np.int64), "pads")
        one = self.constant(np.array(1.0, numpy_dtype(self.dtype)), "one")
        return self.node("Pad", [tensor, pads, one, self.constant(np.array([-1], np.int64), "axes")], "padded")

    def scale_edge(self, node, index: int, factor: str) -> None:
        """Multiply input `index` of `node` by `factor` (only this edge)."""
        node.input[index] = self.node("Mul", [node.input[index], factor], "scaled", before=node)

    def apply(self) -> None:
        nodes = list(self.prelude)
        for node in self.model.graph.node:
            nodes.extend(self.before.get(id(node), []))
            nodes.append(node)
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)


def place_vectors(model, part, config: dict, bank: bool, dtype: str = "fp32") -> None:
    """One graph input per IA3 vector of `part` (wrappers.VectorInputs) and the Muls that apply it;
    with `bank`, `[num_adapters, dim]` inputs gathered by `adapter_ids` (an input right after the base ones)."""
    from onnx import TensorProto, helper

    nodes = {n.name: n for n in model.graph.node}
    edits = _Edits(model, bank, dtype)
    base_inputs = list(model.graph.input)
    attention: dict[int, dict[str, str]] = {}
    for path in part.paths:
        name, dim = vector_name(path), part.dims[path]
        shape = ["num_adapters", dim] if bank else [dim]
        model.graph.input.append(helper.make_tensor_value_info(name, DTYPES[dtype].onnx, shape))
        onnx_graph.add_overridable_ones(model, name, (1, dim) if bank else (dim,), dtype)
        match = _ATTENTION.fullmatch(path)
        if match and not part.feedforward[path]:
            attention.setdefault(int(match.group(1)), {})[match.group(2)] = name
        else:
            _place_linear(edits, nodes, path, name, part.feedforward[path])
    widths = _qkv_widths(config)
    for layer, slots in attention.items():
        _place_attention(edits, nodes, layer, slots, widths)
    if bank:  # the base inputs first, adapter_ids right after them, as the traced graph orders them
        vectors = list(model.graph.input)[len(base_inputs):]
        del model.graph.input[:]
        model.graph.input.extend([*base_inputs, helper.make_tensor_value_info(ADAPTER_IDS, TensorProto.INT64, ["batch_size"]),
                                  *vectors])
    edits.apply()


def _qkv_widths(config: dict) -> dict[str, int]:
    """The widths of the q, k and v parts of a layer's fused q/k/v output, in that order."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}


def _place_attention(edits: _Edits, nodes: dict, layer: int, slots: dict[str, str], widths: dict[str, int]) -> None:
    """q/k/v vectors of one layer: one Mul on the fused q/k/v projection's output where it feeds its
    GroupQueryAttention (or the Split in front of the q/k norms, qwen3: a k vector after k_norm would be
    normalised away), or one Mul per separate q, k, v input where the builder did not fuse them."""
    gqa = nodes.get(f"/model/layers.{layer}/attn/GroupQueryAttention")
    if gqa is None:
        raise IA3Error(f"the builder's graph has no GroupQueryAttention for layer {layer}; use --graph traced")
    split = nodes.get(f"/model/layers.{layer}/attn/qkv_proj/Split")
    packed = gqa if split is None else split  # the node whose input 0 is the fused projection's output
    if split is None and len(gqa.input) > 1 and gqa.input[1]:  # separate query, key, value inputs
        for slot, vector in slots.items():
            edits.scale_edge(gqa, "qkv".index(slot), edits.row(vector))
        return
    factor = None
    for slot, vector in slots.items():
        before = sum(widths[s] for s in "qkv"[:"qkv".index(slot)])
        after = sum(widths[s] for s in "qkv"["qkv".index(slot) + 1:])
        padded = edits.padded(edits.row(vector), before, after)
        factor = padded if factor is None else edits.node("Mul", [factor, padded], "qkv_scale")
    edits.scale_edge(packed, 0, factor)


def _place_linear(edits: _Edits, nodes: dict, path: str, vector: str, feedforward: bool) -> None:
    """A vector on a plain projection: a Mul on its MatMul's input (feed-forward) or on its output
    (after the bias Add where there is one)."""
    node = _projection(nodes, path)
    if feedforward:
        edits.scale_edge(node, 0, edits.row(vector))
        return
    bias = _bias_add(nodes, node)
    output = bias.output[0] if bias is not None else node.output[0]
    consumers = [(n, i) for n in edits.model.graph.node for i, x in enumerate(n.input) if x == output]
    factor = edits.row(vector)
    for n, i in consumers:
        edits.scale_edge(n, i, factor)


def _projection(nodes: dict, path: str):
    """The builder's MatMul of module `path` (`model.layers.0.mlp.down_proj`: `/model/layers.0/mlp/down_proj/MatMul`)."""
    match, node = _MODULE.fullmatch(path), None
    if match:
        layer, block, name = match.groups()
        node = nodes.get(f"/model/layers.{layer}/{_BUILDER_BLOCKS[block]}/{name}/MatMul")
    if node is None:
        raise IA3Error(f"the builder's graph has no MatMul for {path}; --graph fused places vectors on "
                       "self_attn q/k/v and the mlp/self_attn projections; use --graph traced")
    return node


def _bias_add(nodes: dict, matmul):
    """The Add of the same projection that adds a bias to `matmul`'s output, or None."""
    block = matmul.name.rsplit("/", 1)[0]
    return next((n for n in nodes.values() if n.op_type == "Add" and matmul.output[0] in n.input
                 and n.name.startswith(block)), None)


def lift_fold_targets(model, part, config: dict, graph: str, dtype: str) -> tuple[list, object]:
    """Foldswap on the builder's graph (module doc): every tensor the vectors of `part` scale leaves the
    initializers and becomes a pure graph input. Returns their `FoldTarget`s and the `base` of
    build_fold_graph (the lifted values), for `Foldswap.fold_from`."""
    from onnx import helper, numpy_helper

    from .modes.foldswap import FoldTarget

    nodes = {n.name: n for n in model.graph.node}
    groups: dict[str, tuple] = {}  # MatMul name -> (node, feedforward, slot -> module path); "" for a module alone
    for path in part.paths if part else []:
        feedforward, match = part.feedforward[path], _ATTENTION.fullmatch(path)
        qkv = match and not feedforward and nodes.get(f"/model/layers.{match.group(1)}/attn/qkv_proj/MatMul")
        node = qkv or _projection(nodes, path)  # q/k/v the builder did not fuse: their own MatMuls
        groups.setdefault(node.name, (node, feedforward, {}))[2][match.group(2) if qkv else ""] = path
    initializers = {t.name: t for t in model.graph.initializer}
    widths, targets = _qkv_widths(config), []
    for node, feedforward, slots in groups.values():
        weight = initializers.get(node.input[1])
        if weight is None:
            raise IA3Error(f"the builder's {node.name} reads its weight from {node.input[1]}, not an initializer; "
                           "use --graph traced")
        add = None if feedforward else _bias_add(nodes, node)
        bias = next((x for x in add.input if x in initializers), None) if add is not None else None
        if "" in slots:  # a module alone: its own vector
            segments = ((slots[""], part.dims[slots[""]]),)
        else:  # the fused q/k/v output: [q | k | v], ones for a module not targeted
            segments = tuple((slots.get(s), widths[s]) for s in "qkv")
        targets.append(FoldTarget(weight.name, graph, feedforward, True, tuple(weight.dims), bias, segments))
    names = [n for t in targets for n in t.tensors]
    lifted = {n: (initializers[n].data_type, numpy_helper.to_array(initializers[n])) for n in names}
    kept = [t for t in model.graph.initializer if t.name not in lifted]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(helper.make_tensor_value_info(n, elem, list(value.shape))
                             for n, (elem, value) in lifted.items())
    np_dtype = numpy_dtype(dtype)
    return targets, lambda name, shape: numpy_helper.from_array(lifted[name][1].astype(np_dtype), f"{name}.base")


def match_sliding_window(model, config: dict) -> None:
    """Each GroupQueryAttention attends over the window transformers uses for its layer: `sliding_window`
    tokens (itself included) where the config slides (on every layer, or where `layer_types` says
    `sliding_attention`), else all (-1). The builder 0.18.0 left mistral's layers at -1, so past the window
    its logits drifted from transformers' (6e-2 max abs on a tiny mistral at 100 tokens; ORT's
    `local_window_size` = `sliding_window` matched to 3e-7)."""
    from onnx import helper

    window, types = config.get("sliding_window"), config.get("layer_types")
    for node in model.graph.node:
        layer = re.fullmatch(r"/model/layers\.(\d+)/attn/GroupQueryAttention", node.name)
        if node.op_type != "GroupQueryAttention" or layer is None:
            continue
        slides = bool(window) and (types is None or types[int(layer.group(1))] == "sliding_attention")
        for attribute in node.attribute:
            if attribute.name == "local_window_size":
                attribute.CopyFrom(helper.make_attribute("local_window_size", window if slides else -1))


def add_logits_to_keep(model) -> None:
    """Input `logits_to_keep` ([1] int64, transformers' name): the LM head runs on the last k positions
    only. An overridable initializer of 0, which keeps every position (Slice from -0), so parity,
    scoring and genai see full logits unless a runner feeds 1 for generation's prefill."""
    from onnx import TensorProto, helper, numpy_helper

    head = next((n for n in model.graph.node if n.name == "/lm_head/MatMul"), None)
    if head is None:
        raise IA3Error("the builder's graph has no /lm_head/MatMul; use --graph traced")
    model.graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), LOGITS_TO_KEEP))
    edits = _Edits(model, bank=False)
    start = edits.node("Neg", [LOGITS_TO_KEEP], "keep_from")
    ends, axes = (edits.constant(np.array([v], np.int64), stem) for v, stem in ((2**63 - 1, "end"), (1, "axis")))
    head.input[0] = edits.node("Slice", [head.input[0], start, ends, axes], "kept", before=head)
    edits.apply()


# -- validation -------------------------------------------------------------------------------
def validate(strategy, ex, hf_model, part, session) -> list:
    """Prefill (batch 1 and 2) and one cached decode step per scenario, against the prepared PyTorch
    model run by the reference harness: the base model (nothing fed) and each adapter fed as the
    mode feeds it (`row_feeds`; a per-row mode's batch mixes the adapter and the base model)."""
    scenarios = [None] + ([] if strategy.folds_adapters else list(ex.names))
    comparisons, rng = [], np.random.default_rng(0)
    kv_shape = (ex.shape.num_kv_heads, ex.shape.head_dim)
    for adapter in scenarios:
        for batch, length in ((1, 1), (2, 6)):
            ids = rng.integers(4, ex.shape.vocab_size, (batch, length + 1))
            rows = [adapter, None][:batch] if strategy.per_row else [adapter] * batch
            expected = np.concatenate([reference_logits(ex.ia3, hf_model, ids[r:r + 1], rows[r]) for r in range(batch)])
            extra = strategy.row_feeds(ex, part, rows)
            prefill = run_cached(session, ids[:, :length], None, extra, kv_shape)
            step = run_cached(session, ids[:, length:], prefill, extra, kv_shape)
            label = f"{adapter or 'base'}, batch {batch}, prompt {length}"
            comparisons += compare_outputs(label, ["logits"], [expected[:, :length]], [prefill["logits"]], ex.dtype)
            comparisons += compare_outputs(f"{label}, decode step", ["logits"], [expected[:, length:]], [step["logits"]],
                                           ex.dtype)
    return comparisons


def reference_logits(ia3, hf_model, ids: np.ndarray, adapter: str | None) -> np.ndarray:
    with running(ia3, adapter), torch.no_grad():
        return hf_model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def run_cached(session, ids: np.ndarray, previous: dict | None, extra: dict, kv_shape: tuple[int, int]) -> dict:
    """One run of a builder graph with the growing cache: past from `previous`'s presents, or empty
    ([batch, *kv_shape] with kv_shape = (kv heads, head dim), which the graph leaves symbolic)."""
    feeds = {"input_ids": ids.astype(np.int64), **extra}
    past = 0
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            if previous is None:
                feeds[i.name] = np.zeros((len(ids), kv_shape[0], 0, kv_shape[1]), of_ort(i.type).np)
            else:
                feeds[i.name] = previous[i.name.replace("past_key_values.", "present.")]
            past = feeds[i.name].shape[2]
    feeds["attention_mask"] = np.ones((len(ids), past + ids.shape[1]), np.int64)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))

