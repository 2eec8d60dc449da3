"""The parity check: an exported folder on ONNX Runtime vs the PyTorch model it came from.

The reference is the base model with its adapters applied UNMERGED through our IA3 layer, in
float64 by default, and it runs each batch row ALONE, without its padding and with its own
adapter. So one comparison covers three claims at once: the graph computes the model, padding
(left for decoders, right for encoders, in the past too) changes nothing for real tokens, and a
bank export's row b uses adapter b. Padded positions are not compared: their values are
undefined (`compare_rows`). The PyTorch side and the inputs (the export validation's cases) are the
reference harness's (export/reference.py, parity/reference.py), the ONNX side is the runtime users deploy
(`ia3_export.runtime.IA3Session`), and every number goes through `ia3_export.compare`. A folder
whose manifest declares one KV buffer shared by past and present (`cache.kv_layout`, `--graph
fused`: right padding, no position_ids) runs whole requests instead (parity/shared_kv.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from ..compare import compare_rows
from ..dtypes import REFERENCE_DTYPES
from ..errors import IA3Error
from ..ort import onnxruntime
from ..formats.manifest import ADAPTER_IDS, KV_SHARED, VECTOR_SUFFIX
from ..progress import stage
from ..core.loading import read_model_config
from ..runtime.folder import open_folder
from ..runtime.session import PROVIDERS, Graph, IA3Session
from ..tolerances import quantized_tolerance, tolerance
from .greedy import greedy_checks
from .quantized import float_agreement, weight_checks
from .report import OutputCheck, ParityReport
from .node import NodeSession
from .shared_kv import onnx_spec, shared_kv_checks

RUNTIMES = ("python", "node")  # what runs the export: IA3Session, or ia3.mjs on onnxruntime-node

if TYPE_CHECKING:
    from .reference import Reference



@dataclasses.dataclass
class ParityOptions:
    provider: str = "cpu"
    reference_dtype: str = "fp64"
    atol: float | None = None  # None: the documented tolerance for provider and dtype
    rtol: float | None = None
    tf32: bool = True  # the CUDA provider's default; ignored on the CPU
    greedy_steps: int = 8
    seed: int = 0
    trust_remote_code: bool = False  # run the model folder's own code (auto_map) for the reference
    runtime: str = "python"  # "node": ia3_export/web/ia3.mjs on onnxruntime-node (parity/node.py)
    node_modules: str | None = None  # where onnxruntime-node is (runtime "node"; default ./node_modules)

    def __post_init__(self):
        """Bad options are bad usage (exit 2) before any work, never a check that "fails" on a NaN bound."""
        if self.provider not in PROVIDERS:
            raise IA3Error(f"provider {self.provider!r} is not known; use one of {', '.join(PROVIDERS)}")
        if self.reference_dtype not in REFERENCE_DTYPES:
            raise IA3Error(f"reference dtype {self.reference_dtype!r} is not known; use one of {', '.join(REFERENCE_DTYPES)}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise IA3Error(f"--{name} is {value!r}; give a finite number >= 0, or leave it out for the documented tolerance")
        if self.runtime not in RUNTIMES:
            raise IA3Error(f"runtime {self.runtime!r} is not known; use one of {', '.join(RUNTIMES)}")
        if self.runtime == "node" and self.provider != "cpu":
            raise IA3Error("--runtime node runs onnxruntime-node on the CPU; leave out --provider (or use --runtime python)")
        for name, flag in (("greedy_steps", "--steps"), ("seed", "seed")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise IA3Error(f"{flag} is {value!r}; give a whole number >= 0")


def check_parity(model_dir: str, onnx_dir: str, adapters: list[str] = (), options: ParityOptions | None = None,
                 **kwargs) -> ParityReport:
    """Run every case and scenario; returns the report (its `passed` is the verdict, nothing raises
    for a numeric difference). Bad input (wrong model, adapter, folder) raises IA3Error."""
    options = dataclasses.replace(options or ParityOptions(), **kwargs)
    folder = open_folder(onnx_dir)
    dtype = folder.manifest["dtype"]
    tf32 = options.tf32 if options.provider == "cuda" and dtype == "fp32" else None
    quantization = folder.manifest.get("quantization")
    tol = (None if options.atol is not None and options.rtol is not None else
           quantized_tolerance(quantization, options.provider) if quantization else tolerance(options.provider, dtype, bool(tf32)))
    atol = options.atol if options.atol is not None else tol.atol
    rtol = options.rtol if options.rtol is not None else tol.rtol
    report = ParityReport(folder.path, folder.mode, folder.task, folder.manifest["model_type"], options.provider, dtype,
                          options.reference_dtype, tf32, atol, rtol, tol.why if tol else "given by the caller")

    provider_options = {"use_tf32": "1" if tf32 else "0"} if tf32 is not None else None
    if options.runtime == "node":
        report.runtime = "node"
        session = NodeSession(folder, options.node_modules)
        try:
            return _check(model_dir, folder, adapters, options, report, session, provider_options, atol, rtol)
        finally:
            session.close()
    session = _session(folder, options.provider, provider_options)  # first: a missing provider fails fast
    return _check(model_dir, folder, adapters, options, report, session, provider_options, atol, rtol)


def _check(model_dir, folder, adapters, options, report, session, provider_options, atol, rtol) -> ParityReport:
    from .reference import Reference

    quantization = folder.manifest.get("quantization")
    _check_same_model(model_dir, folder)
    stage(f"loading the PyTorch reference from {model_dir} ({options.reference_dtype})")
    reference = Reference(model_dir, folder, adapters, options.reference_dtype, options.trust_remote_code)
    # as the manifest declares it (never guessed from the inputs: a renamed position_ids is a broken graph)
    shared = (folder.cache or {}).get("kv_layout") == KV_SHARED  # one KV buffer for past and present (--graph fused)
    _check_layout([onnx_spec(g) for g in reference.graphs] if shared else reference.graphs, session)
    for name, source in reference.ort_sources().items():
        session.load_adapter(source, name=name)
    if isinstance(session, NodeSession):  # what the module parsed from the adapter files, vector by vector
        report.outputs += session.vector_checks(reference, atol, rtol)
    for graph in reference.graphs:
        stage(f"comparing {graph.file} on {options.provider}")
        if shared:  # a case is a whole request: the past is what the graph wrote, not a fed one
            report.outputs += shared_kv_checks(reference, session, graph, options.seed, atol, rtol,
                                               options.provider if reference.mode.graph_defaults else None,
                                               provider_options)
            continue
        for index, (case, feeds) in enumerate(reference.cases(graph, options.seed)):
            for label, rows in reference.scenarios(len(feeds["input_ids"]), index):
                got = session.run(feeds, graph=graph.key, adapters=reference.ort_rows(rows), outputs=graph.outputs)
                expected = reference.per_row(graph, feeds, rows)
                report.outputs += [OutputCheck(graph.file, case, label, compare_rows(name, expected[name], got[name], atol, rtol))
                                   for name in graph.outputs]
        if reference.mode.graph_defaults:
            report.outputs += _graph_defaults(reference, graph, options, provider_options, atol, rtol)
    if reference.generates and options.greedy_steps:
        stage(f"comparing {options.greedy_steps} greedy tokens")
        report.greedy += greedy_checks(reference, session, options, atol, rtol)
    if quantization:  # the stored weights vs the float ones; beside the verdict, agreement with the float model
        stage("checking the quantized weights against the float weights")
        report.outputs += weight_checks(reference, model_dir, folder)
        report.quantization = quantization
        report.float_agreement = float_agreement(Reference(model_dir, folder, adapters, options.reference_dtype,
                                                           options.trust_remote_code, dequantize=False), session, options)
    return report


# -- the ONNX Runtime side ---------------------------------------------------------------------
def _session(folder, provider: str, provider_options: dict | None):
    if provider == "cuda":
        _preload_cuda()
    return IA3Session(folder, provider, provider_options=provider_options)


# config.json fields that fix a graph's shapes (the names differ between architectures).
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "n_embd", "n_inner", "n_layer", "n_head", "d_model", "d_ff", "d_kv",
                "num_layers", "num_decoder_layers", "num_heads", "encoder_layers", "decoder_layers", "ffn_dim")


def _check_same_model(model_dir: str, folder) -> None:
    """The export carries the config.json it was made from: a model folder of other sizes is named as
    the wrong folder, not left to fail as a missing input or ONNX Runtime's dimension error."""
    exported = folder.config  # read and checked field by field when the folder was opened ({} without one)
    if not exported:
        return
    given = read_model_config(model_dir)
    for field in SHAPE_FIELDS:
        if exported.get(field) != given.get(field):
            raise IA3Error(f"{model_dir} is not the model {folder.path} was exported from: its {field} is "
                           f"{given.get(field)!r}, the export's config.json says {exported.get(field)!r}; pass the "
                           "model folder the export was made from")


def _check_layout(graphs, session) -> None:
    """Every input and output the task's layout names must be in the graph: without them no number can be
    compared, so a renamed or missing one is a structural error (exit 2), not a numeric failure."""
    for graph in graphs:
        g = session.graphs.get(graph.key)
        if g is None:
            raise IA3Error(f"the export has no {graph.key!r} graph ({graph.file}); re-export the model")
        for kind, wanted, have in (("input", graph.inputs, [*g.inputs, *g.initializer_inputs]),
                                   ("output", graph.outputs, g.outputs)):
            missing = [n for n in wanted if n not in have]
            if missing:
                extra = [n for n in have if n not in wanted and not n.endswith(VECTOR_SUFFIX) and n != ADAPTER_IDS]
                raise IA3Error(f"{graph.file} has no {kind} {missing[0]!r}" + (f" (it has {extra[0]!r} instead)" if extra else "")
                               + "; the graph does not follow the task's layout, re-export the model")


def _preload_cuda() -> None:
    """onnxruntime-gpu >= 1.21 finds the CUDA/cuDNN libraries that torch ships only when asked first."""
    ort = onnxruntime()
    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()


def _graph_defaults(reference: Reference, graph, options: ParityOptions, provider_options: dict | None,
                    atol: float, rtol: float):
    """The graph with NO vectors fed must be the base model: its initializers of ones (and bank row 0)
    are what ONNX Runtime's own adapter API and plain InferenceSession users get."""
    plain = Graph(reference.folder.graph_file(graph.key), options.provider, None, provider_options)
    checks = []
    for case, feeds in reference.cases(graph, options.seed)[-1:]:  # padding and past > 0
        fed = dict(feeds)
        if ADAPTER_IDS in plain.inputs:
            fed[ADAPTER_IDS] = np.zeros(len(feeds["input_ids"]), dtype=np.int64)
        got = {k: v.numpy() for k, v in plain.run(fed, graph.outputs).items()}
        expected = reference.per_row(graph, feeds, [None] * len(feeds["input_ids"]))
        checks += [OutputCheck(graph.file, case, "nothing fed (graph defaults)",
                               compare_rows(name, expected[name], got[name], atol, rtol)) for name in graph.outputs]
    return checks
