"""The parity check: an exported folder on ONNX Runtime vs the PyTorch model it came from.

The reference is the base model with its adapters applied UNMERGED through our IA3 layer, in
float64 by default, and it runs each batch row ALONE, without its padding and with its own
adapter. So one comparison covers three claims at once: the graph computes the model, padding
(left for decoders, right for encoders, in the past too) changes nothing for real tokens, and a
bank export's row b uses adapter b. Padded positions are not compared: their values are
undefined (`compare(..., where=)`). Inputs are the export validation's cases
(`ia3_export.export.validate.sample_feeds`), the ONNX side is the runtime users deploy
(`ia3_export.runtime.IA3Session`), and every number goes through `ia3_export.compare`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import numpy as np

from ..compare import compare
from ..progress import stage
from ..errors import IA3Error
from ..runtime.session import PROVIDERS
from .report import GreedyCheck, OutputCheck, ParityReport
from .tolerances import quantized_tolerance, tolerance

REFERENCE_DTYPES = ("fp64", "fp32")
# The mask input's axis -> the axes it splits into (past first, then the new tokens).
SPLIT_AXES = {"total_sequence_length": ("past_sequence_length", "sequence_length")}
MASKS = ("attention_mask", "encoder_attention_mask")


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
        for name, flag in (("greedy_steps", "--steps"), ("seed", "seed")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise IA3Error(f"{flag} is {value!r}; give a whole number >= 0")


def check_parity(model_dir: str, onnx_dir: str, adapters: list[str] = (), options: ParityOptions | None = None,
                 **kwargs) -> ParityReport:
    """Run every case and scenario; returns the report (its `passed` is the verdict, nothing raises
    for a numeric difference). Bad input (wrong model, adapter, folder) raises IA3Error."""
    options = dataclasses.replace(options or ParityOptions(), **kwargs)
    from ..runtime.folder import open_folder

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
    session = _session(folder, options.provider, provider_options)  # first: a missing provider fails fast
    _check_same_model(model_dir, folder)
    stage(f"loading the PyTorch reference from {model_dir} ({options.reference_dtype})")
    reference = Reference(model_dir, folder, adapters, options.reference_dtype, options.trust_remote_code)
    _check_layout(reference.graphs, session)
    for name, source in reference.ort_sources().items():
        session.load_adapter(source, name=name)
    for graph in reference.graphs:
        stage(f"comparing {graph.file} on {options.provider}")
        for index, (case, feeds) in enumerate(reference.cases(graph, options.seed)):
            for label, rows in reference.scenarios(len(feeds["input_ids"]), index):
                got = session.run(feeds, graph=graph.key, adapters=_ort_rows(folder.mode, rows), outputs=graph.outputs)
                expected = reference.per_row(graph, feeds, rows)
                report.outputs += [OutputCheck(graph.file, case, label, _compare(name, expected[name], got[name], atol, rtol))
                                   for name in graph.outputs]
        if folder.mode not in ("merged", "foldswap"):  # foldswap graphs take the weights: nothing to default
            report.outputs += _graph_defaults(reference, graph, options, provider_options, atol, rtol)
    if reference.generates and options.greedy_steps:
        stage(f"comparing {options.greedy_steps} greedy tokens")
        report.greedy += _greedy(reference, session, options, atol, rtol)
    if quantization:  # the stored weights vs the float ones; beside the verdict, agreement with the float model
        from .quantized import float_agreement, weight_checks

        stage("checking the quantized weights against the float weights")
        report.outputs += weight_checks(reference, model_dir, folder)
        report.quantization = quantization
        report.float_agreement = float_agreement(Reference(model_dir, folder, adapters, options.reference_dtype,
                                                           options.trust_remote_code, dequantize=False), session, options)
    return report


# -- the reference ----------------------------------------------------------------------------
class Reference:
    """The PyTorch side: the model folder + PEFT adapters, unmerged, in float64 (or float32)."""

    def __init__(self, model_dir: str, folder, adapter_dirs: list[str], reference_dtype: str,
                 trust_remote_code: bool = False, dequantize: bool = True):
        import torch

        from .. import adapter_format as fmt
        from ..export.build import probe_shape, use_eager_attention, graph_wrappers
        from ..export.tasks import TASKS, graph_specs
        from ..loading import adapters_task_type, check_task, load_task_model, read_model_config
        from ..model import IA3Model

        manifest = folder.manifest
        config = read_model_config(model_dir)
        if config["model_type"] != manifest["model_type"]:
            raise IA3Error(f"{model_dir} is a {config['model_type']} model but {folder.path} was exported from a "
                           f"{manifest['model_type']} model; pass the model folder the export was made from")
        if manifest["task"] not in TASKS:
            raise IA3Error(f"{folder.path}: unknown task {manifest['task']!r} in the manifest; re-export the model")
        self.folder, self.mode, self.task = folder, folder.mode, TASKS[manifest["task"]]
        self.adapters = [fmt.read_adapter(p) for p in adapter_dirs]
        check_task(manifest["task"], *adapters_task_type(self.adapters), source="the export's task",
                   hint=f"check {folder.path} with adapters trained for its task")
        self.names = [a.name for a in self.adapters]
        if len(set(self.names)) != len(self.names):
            raise IA3Error("two --adapter folders have the same name; the folder name is the adapter's name, so rename one")
        self._check_folded()
        self.float_type = np.float64 if reference_dtype == "fp64" else np.float32
        model = load_task_model(model_dir, self.task.auto_class, self.adapters, trust_remote_code=trust_remote_code,
                                dtype=torch.float64 if reference_dtype == "fp64" else torch.float32)
        use_eager_attention(model)
        self.ia3 = None
        quantized = dequantize and manifest.get("quantization") is not None
        if quantized and self.mode == "merged":  # folded as the export folds (modules_to_save included)
            from ..export.build import ia3_merged

            model = ia3_merged(model, self.adapters)
        elif self.adapters:
            self.ia3 = IA3Model(model)
            for a in self.adapters:
                self.ia3.load_adapter(a, name=a.name, activate=False)
            self.ia3.set_adapter(self.names if self.mode == "merged" else ())
        if quantized:  # then the graph's own weights, de-quantized, in place of the float ones
            from .quantized import load_dequantized_folder

            load_dequantized_folder(model, folder)
        self.model = self.ia3.model if self.ia3 is not None else model
        self.shape = probe_shape(self.model, self.task, manifest["dtype"])
        base_inputs = manifest["graphs"][next(iter(manifest["graphs"]))]["inputs"]
        self.graphs = graph_specs(self.task, self.shape.num_layers, token_type_ids="token_type_ids" in base_inputs)
        self.wrappers = {key: wrapper for key, (wrapper, _) in graph_wrappers(self.model, self.task, self.shape, None,
                                                                          self.graphs).items()}

    @property
    def generates(self) -> bool:
        return self.task.kind == "seq2seq" or (self.task.kind == "decoder" and self.task.output == "logits")

    def _check_folded(self) -> None:
        """A merged export must be compared with the adapters it folded (the manifest keeps their sha256)."""
        if self.mode != "merged":
            return
        from ..adapter_format import WEIGHTS_NAME
        from ..export.build import sha256_file

        folded = {a["sha256"]: a["name"] for a in self.folder.manifest.get("adapters") or [] if a.get("sha256")}
        given = {sha256_file(os.path.join(a.path, WEIGHTS_NAME)): a.name for a in self.adapters}
        if set(folded) != set(given):
            want = ", ".join(sorted(folded.values())) or "none"
            got = ", ".join(sorted(given.values())) or "none"
            raise IA3Error(f"{self.folder.path} is a merged export with adapters folded in ({want}) but --adapter gave "
                           f"{got}; pass exactly the adapter folders it was exported with")

    def ort_sources(self) -> dict[str, str]:
        """Adapter name -> what the ONNX side loads: the file shipped in the export when it was made from
        this very adapter (what a server loads), else the PEFT folder."""
        if self.mode == "merged":
            return {}
        from ..adapter_format import WEIGHTS_NAME
        from ..export.build import sha256_file

        shipped = {a["name"]: a for a in self.folder.manifest.get("adapters") or [] if a.get("file")}
        sources = {}
        for a in self.adapters:
            entry = shipped.get(a.name)
            same = entry is not None and entry.get("sha256") == sha256_file(os.path.join(a.path, WEIGHTS_NAME))
            sources[a.name] = os.path.join(self.folder.path, entry["file"]) if same else os.path.abspath(a.path)
        return sources

    def scenarios(self, batch: int, index: int) -> list[tuple[str, list[str | None]]]:
        """[(label, adapter name per row)] for a case. Merged: the folded adapters. Swappable, foldswap: no
        adapter, then each adapter for the whole batch. Bank: rows mixed, rotating with the case index."""
        if self.mode == "merged":
            return [("folded " + (",".join(self.names) or "none"), [None] * batch)]
        choices = [None, *self.names]
        if self.mode in ("swappable", "foldswap"):
            assignments = [[name] * batch for name in choices]
        else:
            assignments = [[choices[(row + index) % len(choices)] for row in range(batch)]]
        return [("adapters " + ",".join(r or "-" for r in rows), rows) for rows in assignments]

    @contextlib.contextmanager
    def running(self, adapter: str | None):
        """The model as the base (None) or with one adapter (its own parameters); merged: as loaded."""
        if self.ia3 is None or self.mode == "merged":
            yield
            return
        from ..export.validate import running

        with running(self.ia3, adapter):
            yield

    def cases(self, graph, seed: int):
        """The validation's cases, with padded positions holding the pad token as a tokenizer writes them
        (a decoder classifier finds its last real token by the pad id)."""
        from ..export.validate import sample_feeds

        cases = sample_feeds(graph, self.task, self.shape, seed=seed)
        pad = self.folder.pad_id()
        for _, feeds in cases:
            if "input_ids" in feeds and "attention_mask" in feeds:
                ids = feeds["input_ids"]
                feeds["input_ids"] = np.where(feeds["attention_mask"][:, -ids.shape[1]:] == 0, pad, ids)
        return cases

    def per_row(self, graph, feeds: dict, rows: list[str | None]) -> dict[str, list]:
        """Output name -> [(index arrays into the batch output, row output)] for every row run alone."""
        from ..export.validate import torch_outputs

        wrapper = self.wrappers[graph.key]
        results = {name: [] for name in graph.outputs}
        for row, adapter in enumerate(rows):
            keep = _row_keep(graph, feeds, row)
            row_feeds = {name: self._cast(_take(value, graph.dynamic_axes.get(name, {}), keep, row))
                         for name, value in feeds.items()}
            with self.running(adapter):
                outputs = torch_outputs(wrapper, graph.inputs, row_feeds)
            for name, value in zip(graph.outputs, outputs):
                results[name].append((_index(graph.dynamic_axes.get(name, {}), keep, row, value.ndim), value))
        return results

    def _cast(self, value: np.ndarray) -> np.ndarray:
        return value.astype(self.float_type) if np.issubdtype(value.dtype, np.floating) else value

    def greedy(self, prompt: list[int], adapter: str | None, steps: int, eos: set[int], start: int | None):
        """Greedy tokens for one prompt alone, recomputing the whole sequence each step (no cache: an
        independent path from the graph's), with the reference logits of every step."""
        import torch

        tokens, logits_per_step = [], []
        ids = torch.tensor([prompt])
        with torch.no_grad(), self.running(adapter):
            for _ in range(steps):
                if self.task.kind == "seq2seq":
                    dec = torch.tensor([[start, *tokens]])
                    logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
                else:
                    seq = torch.tensor([[*prompt, *tokens]])
                    logits = self.model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
                last = logits[0, -1].double().numpy()
                logits_per_step.append(last)
                tokens.append(int(last.argmax()))
                if tokens[-1] in eos:
                    break
        return tokens, logits_per_step


def _row_keep(graph, feeds: dict, row: int) -> dict[str, np.ndarray]:
    """Axis name -> positions of real tokens in this row (from its attention mask)."""
    keep = {}
    for mask_name in MASKS:
        if mask_name not in feeds:
            continue
        mask = feeds[mask_name][row] != 0
        axis = graph.dynamic_axes[mask_name][1]
        keep[axis] = mask
        if axis in SPLIT_AXES:
            past_axis, new_axis = SPLIT_AXES[axis]
            new = feeds["input_ids"].shape[1]
            keep[past_axis], keep[new_axis] = mask[:len(mask) - new], mask[len(mask) - new:]
    return keep


def _index(axes: dict[int, str], keep: dict, row: int, ndim: int) -> tuple:
    """np.ix_-ready index arrays for one row's positions in a batch output (None: the whole axis)."""
    index = []
    for axis in range(ndim):
        name = axes.get(axis)
        if axis == 0:
            index.append(np.array([row]))
        elif name in keep:
            index.append(np.flatnonzero(keep[name]))
        else:
            index.append(None)
    return tuple(index)


def _take(value: np.ndarray, axes: dict[int, str], keep: dict, row: int) -> np.ndarray:
    out = value[row:row + 1]
    for axis, name in axes.items():
        if axis > 0 and name in keep:
            out = np.compress(keep[name], out, axis=axis)
    return out


def _compare(name: str, row_results: list, actual: np.ndarray, atol: float, rtol: float):
    """Scatter each row's reference into a batch-shaped array (so the worst index is in batch coordinates)
    and compare the positions of real tokens only."""
    actual = np.asarray(actual)
    reference = np.zeros(actual.shape)
    compared = np.zeros(actual.shape, dtype=bool)
    try:
        for index, value in row_results:
            full = np.ix_(*(ix if ix is not None else np.arange(actual.shape[axis]) for axis, ix in enumerate(index)))
            reference[full] = value
            compared[full] = True
    except (ValueError, IndexError):  # the output has the wrong shape: compare fails with a shape note
        return compare(name, np.concatenate([v for _, v in row_results]), actual, atol, rtol)
    return compare(name, reference, actual, atol, rtol, where=compared)


# -- the ONNX Runtime side ---------------------------------------------------------------------
def _session(folder, provider: str, provider_options: dict | None):
    from ..runtime import IA3Session

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
    from ..jsonfile import read_json
    from ..loading import read_model_config

    exported_path = os.path.join(folder.path, "config.json")
    if not os.path.isfile(exported_path):
        return
    exported, given = read_json(exported_path), read_model_config(model_dir)
    for field in SHAPE_FIELDS:
        if isinstance(exported, dict) and exported.get(field) != given.get(field):
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
                extra = [n for n in have if n not in wanted and not n.endswith(".ia3_l") and n != "adapter_ids"]
                raise IA3Error(f"{graph.file} has no {kind} {missing[0]!r}" + (f" (it has {extra[0]!r} instead)" if extra else "")
                               + "; the graph does not follow the task's layout, re-export the model")


def _preload_cuda() -> None:
    """onnxruntime-gpu >= 1.21 finds the CUDA/cuDNN libraries that torch ships only when asked first."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()


def _ort_rows(mode: str, rows: list[str | None]) -> list[str | None] | None:
    """Adapter names per row for the session (a merged export has none: they are in the weights)."""
    return None if mode == "merged" else rows


def _graph_defaults(reference: Reference, graph, options: ParityOptions, provider_options: dict | None,
                    atol: float, rtol: float):
    """The graph with NO vectors fed must be the base model: its initializers of ones (and bank row 0)
    are what ONNX Runtime's own adapter API and plain InferenceSession users get."""
    from ..runtime.session import Graph

    plain = Graph(reference.folder.graph_file(graph.key), options.provider, None, provider_options)
    checks = []
    for case, feeds in reference.cases(graph, options.seed)[-1:]:  # padding and past > 0
        fed = dict(feeds)
        if "adapter_ids" in plain.inputs:
            fed["adapter_ids"] = np.zeros(len(feeds["input_ids"]), dtype=np.int64)
        got = {k: v.numpy() for k, v in plain.run(fed, graph.outputs).items()}
        expected = reference.per_row(graph, feeds, [None] * len(feeds["input_ids"]))
        checks += [OutputCheck(graph.file, case, "nothing fed (graph defaults)",
                               _compare(name, expected[name], got[name], atol, rtol)) for name in graph.outputs]
    return checks


# -- greedy tokens -----------------------------------------------------------------------------
def _greedy(reference: Reference, session, options: ParityOptions, atol: float, rtol: float):
    """Greedy generation through the runtime (KV cache, left padding, batch) vs the reference one row at
    a time. A different token is a failure unless the reference itself has a near-tie there: two logits
    within the tolerance of each other, where either choice is correct."""
    from ..runtime.generation import GenerationOptions, generate_ids

    folder = reference.folder
    rng = np.random.default_rng(options.seed + 7)
    prompts = [rng.integers(4, reference.shape.vocab_size, n).tolist() for n in (5, 3, 7)]
    eos = set(folder.eos_ids())
    start = folder.tokens.get("decoder_start")
    checks = []
    for label, rows in reference.scenarios(len(prompts), 1):
        actual = generate_ids(session, prompts, _ort_rows(folder.mode, rows),
                              GenerationOptions(max_new_tokens=options.greedy_steps))
        for row, (prompt, adapter) in enumerate(zip(prompts, rows)):
            tokens, logits = reference.greedy(prompt, adapter, options.greedy_steps, eos, start)
            passed, note = _judge_tokens(tokens, actual[row], logits, atol, rtol)
            checks.append(GreedyCheck(label, row, adapter, tokens, actual[row], passed, note))
    return checks


def _judge_tokens(reference: list[int], actual: list[int], logits: list[np.ndarray], atol: float, rtol: float):
    for step, (want, got) in enumerate(zip(reference, actual)):
        if want != got:
            gap = abs(float(logits[step][want] - logits[step][got]))
            bound = 2 * (atol + rtol * abs(float(logits[step][want])))
            if gap <= bound:
                return True, (f"step {step}: token {got} instead of {want}, a near-tie in the reference "
                              f"(logit gap {gap:.3g} <= {bound:.3g}); later steps not compared")
            return False, f"step {step}: token {got} instead of {want} (reference logit gap {gap:.3g} > {bound:.3g})"
    if len(reference) != len(actual):
        return False, f"lengths differ: reference {len(reference)} tokens, ONNX Runtime {len(actual)}"
    return True, ""
