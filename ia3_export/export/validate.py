"""Validation of an export: sample inputs per task, the PyTorch reference, the ONNX Runtime run,
and the comparison list. Run after every export; reusable by the parity checks.

Cases cover several batch sizes and lengths, padding (left for decoders, right for encoders)
and, with a cache, past length 0 and > 0. Swappable and bank exports are also checked per
adapter against the IA3 model running that adapter itself (not through the graph inputs), and
with nothing fed against the base model.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from ..compare import Comparison, compare
from ..errors import CheckFailed
from .tasks import GraphSpec, Task

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
# |ort - torch| <= atol + rtol * |torch|; fp16 is compared with fp16 PyTorch on the CPU.
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (5e-2, 5e-2)}
_tolerance_override: list[tuple[float, float]] = []  # set by `tolerance_of` (quantized exports)


@contextlib.contextmanager
def tolerance_of(bound: tuple[float, float] | None):
    """Validate with (atol, rtol) instead of the dtype's (a quantized graph has its own); None: the dtype's."""
    if bound is None:
        yield
        return
    _tolerance_override.append(bound)
    try:
        yield
    finally:
        _tolerance_override.pop()


@dataclasses.dataclass
class ModelShape:
    """What sample inputs need to know about the model."""

    vocab_size: int
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    dtype: str = "fp32"


# -- sample inputs --------------------------------------------------------------------------
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


# -- running --------------------------------------------------------------------------------
def torch_outputs(wrapper, input_names: list[str], feeds: dict) -> list[np.ndarray]:
    """The wrapper's eager outputs for the feeds (inputs in graph order; absent vectors not passed)."""
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names if n in feeds]
    with torch.no_grad():
        out = wrapper(*args)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().float().numpy() if t.dtype.is_floating_point else t.numpy() for t in out]


def ort_outputs(session, feeds: dict, run_options=None) -> list[np.ndarray]:
    return session.run(None, feeds, run_options)


SESSION_THREADS = 0  # ORT's intra-op threads for validation (0: ORT's default, one per core)


def cpu_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = SESSION_THREADS
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def compare_outputs(label: str, names: list[str], reference, actual, dtype: str, feeds: dict | None = None) -> list[Comparison]:
    """Compare each output; with `feeds`, only at real (unpadded) token positions."""
    atol, rtol = _tolerance_override[-1] if _tolerance_override else TOLERANCES[dtype]
    return [compare(f"{label}: {n}", r, a, atol, rtol, where=real_positions(n, feeds, np.shape(r)))
            for n, r, a in zip(names, reference, actual)]


def real_positions(output: str, feeds: dict | None, shape: tuple) -> np.ndarray | None:
    """Where an output holds real tokens, from the attention mask; None where every position counts.

    Padded positions compute attention over nothing: their values are arbitrary (and differ
    between PyTorch and ONNX Runtime in fp16), so they are no evidence either way.
    """
    mask = None if feeds is None else feeds.get("attention_mask")
    if mask is None or len(shape) < 3:
        return None
    mask = mask.astype(bool)
    if output.startswith("present.") and shape[2] == mask.shape[1]:  # [batch, heads, past + new, head_dim]
        return mask[:, None, :, None]
    if not output.startswith("present.") and shape[1] <= mask.shape[1]:  # [batch, new tokens, ...]
        return mask[:, -shape[1]:].reshape(mask.shape[0], shape[1], *([1] * (len(shape) - 2)))
    return None


def raise_on_failure(comparisons: list[Comparison], what: str) -> None:
    """CheckFailed naming the worst output (largest excess over its tolerance)."""
    failed = [c for c in comparisons if not c.passed]
    if failed:
        worst = max(failed, key=lambda c: c.max_abs - (c.atol + c.rtol * abs(c.reference_at_worst)))
        raise CheckFailed(f"{what}: ONNX Runtime differs from PyTorch in {len(failed)} of {len(comparisons)} "
                          f"outputs; worst: {worst.line()}")


# -- scenarios ------------------------------------------------------------------------------
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
    from .wrappers import vector_name

    layers = ia3.ia3_layers()
    return {vector_name(p): layers[p].ia3_l[adapter].detach().float().numpy().astype(NP_DTYPES[dtype])
            for p in paths if adapter in layers[p].ia3_l}


def validate_graph(graph: GraphSpec, task: Task, shape: ModelShape, wrapper, session, mode: str,
                   ia3=None, vectors=None, adapters: list[str] = ()) -> list[Comparison]:
    """Every scenario of one exported graph; returns the comparisons (raise_on_failure judges them)."""
    dtype = shape.dtype
    names = graph.inputs  # the base inputs; vector inputs are appended where fed
    paths = vectors.paths if vectors is not None else []
    results = []
    for label, feeds in sample_feeds(graph, task, shape):
        if mode == "merged" or not paths:
            results += compare_outputs(label, graph.outputs, torch_outputs(wrapper, names, feeds), ort_outputs(session, feeds), dtype,
                                       feeds)
            continue
        with running(ia3, None):  # nothing fed: the base model
            results += compare_outputs(f"{label}, no adapter", graph.outputs, torch_outputs(wrapper, names, feeds),
                                       ort_outputs(session, feeds if mode == "swappable" else
                                                   feeds | {"adapter_ids": np.zeros(len(feeds["input_ids"]), np.int64)}), dtype,
                                       feeds)
        if mode == "swappable":
            results += _swappable_cases(label, graph, wrapper, session, ia3, paths, adapters, feeds, names, dtype)
        else:
            results += _bank_cases(label, graph, wrapper, session, ia3, paths, adapters, feeds, names, dtype)
    return results


def _random_vectors(paths, graph_names, dims, dtype, rows=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (lambda d: (d,)) if rows is None else (lambda d: (rows, d))
    return {n: (1 + 0.5 * rng.uniform(-1, 1, shape(dims[p]))).astype(NP_DTYPES[dtype]) for p, n in zip(paths, graph_names)}


def _swappable_cases(label, graph, wrapper, session, ia3, paths, adapters, feeds, names, dtype):
    from .wrappers import vector_name

    results = []
    for adapter in adapters:  # the adapter's own parameters in PyTorch vs its vectors fed to the graph
        with running(ia3, adapter):
            reference = torch_outputs(wrapper, names, feeds)
        fed = adapter_vectors(ia3, adapter, paths, dtype)
        results += compare_outputs(f"{label}, adapter {adapter}", graph.outputs, reference, ort_outputs(session, feeds | fed), dtype, feeds)
    vector_names = [vector_name(p) for p in paths]
    random = _random_vectors(paths, vector_names, wrapper.vectors.dims, dtype)
    results += compare_outputs(f"{label}, random vectors", graph.outputs,
                               torch_outputs(wrapper, names + vector_names, feeds | random),
                               ort_outputs(session, feeds | random), dtype, feeds)
    return results


def _bank_cases(label, graph, wrapper, session, ia3, paths, adapters, feeds, names, dtype):
    from .wrappers import vector_name

    batch = len(feeds["input_ids"])
    vector_names = [vector_name(p) for p in paths]
    if not adapters:  # random banks: the full batch in PyTorch through the same Gather
        ids = (np.arange(batch) % 3).astype(np.int64)
        banks = _random_vectors(paths, vector_names, wrapper.vectors.dims, dtype, rows=3)
        fed = feeds | {"adapter_ids": ids} | banks
        return compare_outputs(f"{label}, random bank", graph.outputs, torch_outputs(wrapper, names + ["adapter_ids"] + vector_names, fed),
                               ort_outputs(session, fed), dtype, feeds)
    # Row 0 of every bank is ones (no adapter); row k+1 is adapters[k]. Row b of the batch uses b % (n+1).
    per_adapter = [adapter_vectors(ia3, a, paths, dtype) for a in adapters]
    banks = {}
    for p, n in zip(paths, vector_names):
        dim = wrapper.vectors.dims[p]
        banks[n] = np.stack([np.ones(dim, NP_DTYPES[dtype])] + [v.get(n, np.ones(dim, NP_DTYPES[dtype])) for v in per_adapter])
    ids = (np.arange(batch) % (len(adapters) + 1)).astype(np.int64)
    got = ort_outputs(session, feeds | {"adapter_ids": ids} | banks)
    results = []
    for b in range(batch):  # each row alone, with its adapter, in PyTorch
        adapter = None if ids[b] == 0 else adapters[ids[b] - 1]
        with running(ia3, adapter):
            reference = torch_outputs(wrapper, names, rows(feeds, b))
        results += compare_outputs(f"{label}, bank row {b} ({adapter or 'no adapter'})", graph.outputs,
                                   reference, [g[b:b + 1] for g in got], dtype, rows(feeds, b))
    return results
