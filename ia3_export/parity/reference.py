"""The reference harness: the PyTorch side of every comparison, shared by export validation
(export/validate.py, export/modes/) and the parity check (parity/check.py).

One way to load a model with adapters (`load_model`, then merge.py's `with_adapters` or
`fold_adapters`), one
set of sample inputs per task (`sample_feeds`: batch sizes, lengths, padding, past 0 and > 0),
one way to run the plain-tensor wrappers (`torch_outputs`) as the base model or with one adapter
(`running`), and the parity check's `Reference` (float64, each row alone). Numbers are compared
by `ia3_export.compare` with the bounds of `parity/tolerances.py`. torch loads on first use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np

from ..compare import row_index, row_keep, take_row
from ..errors import IA3Error
from ..manifest import file_sha256, vector_name
from ..merge import adapter_names, fold_adapters, with_adapters

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


# -- loading a model with adapters ------------------------------------------------------------
def adapter_sha256(adapter) -> str:
    """The digest of an adapter's weights file, as the manifest keeps it."""
    from ..adapter_format import WEIGHTS_NAME

    return file_sha256(os.path.join(adapter.path, WEIGHTS_NAME))


def load_model(model_dir: str, auto_class: str, adapters, dtype, trust_remote_code: bool = False):
    """The task's model (the adapters' head) in `dtype`, with the eager attention the exporter traces."""
    from ..loading import load_task_model

    model = load_task_model(model_dir, auto_class, adapters, dtype=dtype, trust_remote_code=trust_remote_code)
    use_eager_attention(model)
    return model


def use_eager_attention(model) -> None:
    """Trace the eager attention: the TorchScript exporter's SDPA turns fp16 graphs partly fp32."""
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            return
        except (ValueError, AttributeError):
            pass
    model.config._attn_implementation = "eager"


# -- sample inputs ----------------------------------------------------------------------------
@dataclasses.dataclass
class ModelShape:
    """What sample inputs need to know about the model."""

    vocab_size: int
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    dtype: str = "fp32"


def probe_shape(model, task, dtype: str) -> ModelShape:
    """Cache layout and sizes, read from one forward pass (no per-architecture config parsing)."""
    import torch

    from ..export.wrappers import flatten_cache, returned_cache

    vocab = model.get_input_embeddings().num_embeddings
    shape = ModelShape(vocab_size=vocab, dtype=dtype)
    ids = torch.tensor([[5, 6]])
    with torch.no_grad():
        if task.kind == "seq2seq":
            out = model(input_ids=ids, decoder_input_ids=ids, use_cache=True)
            shape.hidden_size = out.encoder_last_hidden_state.shape[-1]
            cache = returned_cache(out).self_attention_cache
        elif task.cache:
            cache = returned_cache(model(input_ids=ids, use_cache=True))
        else:
            return shape
    flat = flatten_cache(cache)
    shape.num_layers, shape.num_kv_heads, shape.head_dim = len(flat) // 2, flat[0].shape[1], flat[0].shape[3]
    return shape


def sample_feeds(graph: GraphSpec, task: Task, shape: ModelShape, seed: int = 0) -> list[tuple[str, dict]]:
    """(label, {input name: array}) cases for a graph's base inputs."""
    rng = np.random.default_rng(seed)
    fdt = NP_DTYPES[shape.dtype]

    def ids(b, s):
        return rng.integers(4, shape.vocab_size, (b, s), dtype=np.int64)

    def past(b, p):
        return {n: rng.standard_normal((b, shape.num_kv_heads, p, shape.head_dim)).astype(fdt)
                for n in graph.inputs if n.startswith("past_key_values.")}

    cases = []
    if graph.key == "model" and task.kind == "decoder":
        for b, s, p in ([(1, 1, 0), (3, 5, 0), (2, 1, 6), (3, 4, 3)] if task.cache else [(1, 4, 0), (3, 5, 0)]):
            mask = np.ones((b, p + s), dtype=np.int64)
            if b > 1:
                mask[0, :min(2, p + s - 1)] = 0  # left padding
            position_ids = np.clip(mask.cumsum(-1) - 1, 0, None)[:, -s:]
            feeds = {"input_ids": ids(b, s), "attention_mask": mask, "position_ids": position_ids, **past(b, p)}
            cases.append((f"batch {b}, new {s}, past {p}", feeds))
    elif graph.key in ("model", "encoder"):
        for b, s in [(1, 5), (3, 7)]:
            mask = np.ones((b, s), dtype=np.int64)
            if b > 1:
                mask[0, -3:] = 0  # right padding
            feeds = {"input_ids": ids(b, s), "attention_mask": mask}
            if "token_type_ids" in graph.inputs:
                feeds["token_type_ids"] = (np.arange(s)[None, :] >= s // 2).astype(np.int64).repeat(b, 0)
            cases.append((f"batch {b}, length {s}", feeds))
    else:  # seq2seq decoder
        for b, s, p in [(1, 1, 0), (3, 4, 0), (2, 1, 5), (3, 3, 2)]:
            enc_mask = np.ones((b, 6), dtype=np.int64)
            if b > 1:
                enc_mask[0, -2:] = 0
            feeds = {"input_ids": ids(b, s), "encoder_hidden_states": rng.standard_normal((b, 6, shape.hidden_size)).astype(fdt),
                     "encoder_attention_mask": enc_mask, **past(b, p)}
            cases.append((f"batch {b}, new {s}, past {p}", feeds))
    return cases


def rows(feeds: dict, index: int) -> dict:
    """The feeds of one batch row (every base input has the batch on axis 0)."""
    return {n: v[index:index + 1] for n, v in feeds.items()}


def rows(feeds: dict, index: int) -> dict:
    """The feeds of one batch row (every base input has the batch on axis 0)."""
    return {n: v[index:index + 1] for n, v in feeds.items()}


# -- the PyTorch side -------------------------------------------------------------------------
def torch_outputs(wrapper, input_names: list[str], feeds: dict) -> list[np.ndarray]:
    """The wrapper's eager outputs for the feeds (inputs in graph order; absent vectors not passed)."""
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names if n in feeds]
    with torch.no_grad():
        out = wrapper(*args)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().float().numpy() if t.dtype.is_floating_point else t.numpy() for t in out]


@contextlib.contextmanager
def running(ia3, adapter: str | None):
    """Run the IA3 model as the base model (None) or with one adapter, its own parameters."""
    if ia3 is None:
        yield
        return
    before = ia3.active_adapters
    if adapter is None:
        with ia3.disable_adapters():
            yield
        return
    ia3.set_adapter(adapter)
    try:
        yield
    finally:
        ia3.set_adapter(before)


def adapter_vectors(ia3, adapter: str, paths: list[str], dtype: str) -> dict[str, np.ndarray]:
    """Input name -> 1-D vector of one adapter (only the vectors it has among `paths`)."""
    layers = ia3.ia3_layers()
    return {vector_name(p): layers[p].ia3_l[adapter].detach().float().numpy().astype(NP_DTYPES[dtype])
            for p in paths if adapter in layers[p].ia3_l}


def random_vectors(paths, dims, dtype, rows=None, seed=0) -> dict[str, np.ndarray]:
    """Input name -> vectors near 1 (within 0.5), [dim] or [rows, dim]: a scenario no adapter covers."""
    rng = np.random.default_rng(seed)
    shape = (lambda d: (d,)) if rows is None else (lambda d: (rows, d))
    return {vector_name(p): (1 + 0.5 * rng.uniform(-1, 1, shape(dims[p]))).astype(NP_DTYPES[dtype]) for p in paths}


# -- the parity check's reference -------------------------------------------------------------
class Reference:
    """The PyTorch side of `parity`: the model folder + PEFT adapters, unmerged, in float64 (or float32)."""

    def __init__(self, model_dir: str, folder, adapter_dirs: list[str], reference_dtype: str,
                 trust_remote_code: bool = False, dequantize: bool = True):
        import torch

        from .. import adapter_format as fmt
        from ..export.modes import export_mode
        from ..export.tasks import TASKS, graph_specs
        from ..export.wrappers import graph_wrappers
        from ..loading import adapters_task_type, check_task, read_model_config

        manifest = folder.manifest
        config = read_model_config(model_dir)
        if config["model_type"] != manifest["model_type"]:
            raise IA3Error(f"{model_dir} is a {config['model_type']} model but {folder.path} was exported from a "
                           f"{manifest['model_type']} model; pass the model folder the export was made from")
        if manifest["task"] not in TASKS:
            raise IA3Error(f"{folder.path}: unknown task {manifest['task']!r} in the manifest; re-export the model")
        self.folder, self.mode, self.task = folder, export_mode(folder.mode), TASKS[manifest["task"]]
        self.adapters = [fmt.read_adapter(p) for p in adapter_dirs]
        check_task(manifest["task"], *adapters_task_type(self.adapters), source="the export's task",
                   hint=f"check {folder.path} with adapters trained for its task")
        self.names = adapter_names(self.adapters, "two --adapter folders have the same name; the folder name is the "
                                                  "adapter's name, so rename one")
        self._check_folded()
        self.float_type = np.float64 if reference_dtype == "fp64" else np.float32
        model = load_model(model_dir, self.task.auto_class, self.adapters, trust_remote_code=trust_remote_code,
                           dtype=torch.float64 if reference_dtype == "fp64" else torch.float32)
        self.ia3 = None
        quantized = dequantize and manifest.get("quantization") is not None
        if quantized and self.mode.folds_adapters:  # folded as the export folds (modules_to_save included)
            model = fold_adapters(model, self.adapters)
        elif self.adapters:
            self.ia3 = with_adapters(model, self.adapters, active=self.names if self.mode.folds_adapters else ())
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
        if not self.mode.folds_adapters:
            return
        folded = {a["sha256"]: a["name"] for a in self.folder.manifest.get("adapters") or [] if a.get("sha256")}
        given = {adapter_sha256(a): a.name for a in self.adapters}
        if set(folded) != set(given):
            want = ", ".join(sorted(folded.values())) or "none"
            got = ", ".join(sorted(given.values())) or "none"
            raise IA3Error(f"{self.folder.path} is a merged export with adapters folded in ({want}) but --adapter gave "
                           f"{got}; pass exactly the adapter folders it was exported with")

    def ort_sources(self) -> dict[str, str]:
        """Adapter name -> what the ONNX side loads: the file shipped in the export when it was made from
        this very adapter (what a server loads), else the PEFT folder."""
        if self.mode.folds_adapters:
            return {}
        shipped = {a["name"]: a for a in self.folder.manifest.get("adapters") or [] if a.get("file")}
        sources = {}
        for a in self.adapters:
            entry = shipped.get(a.name)
            same = entry is not None and entry.get("sha256") == adapter_sha256(a)
            sources[a.name] = os.path.join(self.folder.path, entry["file"]) if same else os.path.abspath(a.path)
        return sources

    def ort_rows(self, rows: list[str | None]) -> list[str | None] | None:
        """Adapter names per row for the session (a merged export has none: they are in the weights)."""
        return None if self.mode.folds_adapters else rows

    def scenarios(self, batch: int, index: int) -> list[tuple[str, list[str | None]]]:
        """[(label, adapter name per row)] for a case. Merged: the folded adapters. Swappable, foldswap: no
        adapter, then each adapter for the whole batch. Bank: rows mixed, rotating with the case index."""
        if self.mode.folds_adapters:
            return [("folded " + (",".join(self.names) or "none"), [None] * batch)]
        choices = [None, *self.names]
        if self.mode.per_row:
            assignments = [[choices[(row + index) % len(choices)] for row in range(batch)]]
        else:
            assignments = [[name] * batch for name in choices]
        return [("adapters " + ",".join(r or "-" for r in rows), rows) for rows in assignments]

    @contextlib.contextmanager
    def running(self, adapter: str | None):
        """The model as the base (None) or with one adapter (its own parameters); merged: as loaded."""
        if self.mode.folds_adapters:
            yield
            return
        with running(self.ia3, adapter):
            yield

    def cases(self, graph, seed: int):
        """The validation's cases, with padded positions holding the pad token as a tokenizer writes them
        (a decoder classifier finds its last real token by the pad id)."""
        cases = sample_feeds(graph, self.task, self.shape, seed=seed)
        pad = self.folder.pad_id()
        for _, feeds in cases:
            if "input_ids" in feeds and "attention_mask" in feeds:
                ids = feeds["input_ids"]
                feeds["input_ids"] = np.where(feeds["attention_mask"][:, -ids.shape[1]:] == 0, pad, ids)
        return cases

    def per_row(self, graph, feeds: dict, rows: list[str | None]) -> dict[str, list]:
        """Output name -> [(index arrays into the batch output, row output)] for every row run alone."""
        wrapper = self.wrappers[graph.key]
        results = {name: [] for name in graph.outputs}
        for row, adapter in enumerate(rows):
            keep = row_keep(graph, feeds, row)
            row_feeds = {name: self._cast(take_row(value, graph.dynamic_axes.get(name, {}), keep, row))
                         for name, value in feeds.items()}
            with self.running(adapter):
                outputs = torch_outputs(wrapper, graph.inputs, row_feeds)
            for name, value in zip(graph.outputs, outputs):
                results[name].append((row_index(graph.dynamic_axes.get(name, {}), keep, row, value.ndim), value))
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


