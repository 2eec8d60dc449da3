"""The reference harness: the PyTorch side of every comparison, shared by export validation
(export/validate.py, export/modes/) and the parity check (parity/reference.py builds its float64,
row-by-row `Reference` on it).

One way to load a model with adapters (`load_model`, then merge.py's `with_adapters` or
`fold_adapters`), one set of sample inputs per task (`sample_feeds`: batch sizes, lengths,
padding, past 0 and > 0), one way to run the plain-tensor wrappers (`torch_outputs`) as the base
model or with one adapter (`running`). Numbers are compared by `ia3_export.compare` with the
bounds of `ia3_export.tolerances`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import torch

from ..formats.adapter_format import WEIGHTS_NAME
from ..dtypes import numpy_dtype
from ..core.loading import load_task_model
from ..formats.manifest import file_sha256, vector_name
from .tasks import GraphSpec, Task
from .wrappers import flatten_cache, returned_cache



# -- loading a model with adapters ------------------------------------------------------------
def adapter_sha256(adapter) -> str:
    """The digest of an adapter's weights file, as the manifest keeps it."""
    return file_sha256(os.path.join(adapter.path, WEIGHTS_NAME))


def load_model(model_dir: str, auto_class: str, adapters, dtype, trust_remote_code: bool = False):
    """The task's model (the adapters' head) in `dtype`, with the eager attention the exporter traces."""
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
    fdt = numpy_dtype(shape.dtype)

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


# -- the PyTorch side -------------------------------------------------------------------------
def torch_outputs(wrapper, input_names: list[str], feeds: dict) -> list[np.ndarray]:
    """The wrapper's eager outputs for the feeds (inputs in graph order; absent vectors not passed)."""
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
    return {vector_name(p): layers[p].ia3_l[adapter].detach().float().numpy().astype(numpy_dtype(dtype))
            for p in paths if adapter in layers[p].ia3_l}


def random_vectors(paths, dims, dtype, rows=None, seed=0) -> dict[str, np.ndarray]:
    """Input name -> vectors near 1 (within 0.5), [dim] or [rows, dim]: a scenario no adapter covers."""
    rng = np.random.default_rng(seed)
    shape = (lambda d: (d,)) if rows is None else (lambda d: (rows, d))
    return {vector_name(p): (1 + 0.5 * rng.uniform(-1, 1, shape(dims[p]))).astype(numpy_dtype(dtype)) for p in paths}
