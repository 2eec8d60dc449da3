"""Plain-tensor wrappers around transformers models: what torch.onnx traces.

ONE generic decoder wrapper serves every causal LM: it builds a `DynamicCache` inside `forward`
from per-layer key/value inputs and returns the updated cache as plain tensors, so the graph
has optimum's inputs and outputs whatever cache classes the installed transformers uses.
IA3 vectors, when they are graph inputs (swappable, bank), reach the one IA3 layer through
`IA3Model.external_vectors`: the layer that trains is the layer that is exported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
from torch import nn

from ..formats.manifest import ADAPTER_IDS, vector_name


def cache_argument(model: nn.Module) -> str:
    """`cache` from transformers 5.24 on, `past_key_values` before (5.17 on the GPU image, 4.57)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output):
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


def build_cache(past: tuple[torch.Tensor, ...]):
    """A DynamicCache holding past (key, value) pairs; full layers even for sliding-window models
    (the model's own mask applies the window), so every present has the same length."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(len(past) // 2):
        cache.update(past[2 * i], past[2 * i + 1], i)
    return cache


def flatten_cache(cache) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [t for layer in layers for t in (layer.keys, layer.values)]
    return [t for i in range(len(cache)) for t in (cache.key_cache[i], cache.value_cache[i])]  # older caches


@dataclasses.dataclass
class VectorInputs:
    """IA3 vectors as graph inputs: `swappable` ([dim] each) or `bank` (adapter_ids + [n, dim] each)."""

    ia3: nn.Module  # an IA3Model wrapping the exported model
    paths: list[str]
    feedforward: dict[str, bool]
    dims: dict[str, int]
    bank: bool = False

    def subset(self, paths: list[str]) -> "VectorInputs":
        return VectorInputs(self.ia3, paths, {p: self.feedforward[p] for p in paths}, {p: self.dims[p] for p in paths}, self.bank)

    def input_names(self) -> list[str]:
        return ([ADAPTER_IDS] if self.bank else []) + [vector_name(p) for p in self.paths]

    def bind(self, tensors: tuple[torch.Tensor, ...]):
        """Route the extra inputs of a forward pass to the IA3 layers (nothing when none are passed)."""
        if not tensors:
            return contextlib.nullcontext()
        if self.bank:
            ids, banks = tensors[0], tensors[1:]
            # Gather one row per batch item, shaped [batch, 1, dim] for the [batch, seq, dim] activations
            vectors = {p: bank[ids].unsqueeze(1) for p, bank in zip(self.paths, banks)}
        else:
            vectors = dict(zip(self.paths, tensors))
        return self.ia3.external_vectors(vectors, {p: self.feedforward[p] for p in vectors})


class DecoderWithCache(nn.Module):
    """(input_ids, attention_mask, position_ids, past k/v per layer, vectors...) -> (logits, present k/v...)."""

    def __init__(self, model: nn.Module, num_layers: int, vectors: VectorInputs | None = None, use_cache: bool = True):
        super().__init__()
        self.model, self.num_layers, self.vectors, self.use_cache = model, num_layers, vectors, use_cache
        self.cache_arg = cache_argument(model)

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        n_past = 2 * self.num_layers if self.use_cache else 0
        past, extra = rest[:n_past], rest[n_past:]
        kwargs = {self.cache_arg: build_cache(past)} if self.use_cache else {}
        with bind(self.vectors, extra):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=self.use_cache, **kwargs)
        if not self.use_cache:
            return out.logits
        return (out.logits, *flatten_cache(returned_cache(out)))


class Encoder(nn.Module):
    """(input_ids, attention_mask[, token_type_ids], vectors...) -> the one output (logits or last_hidden_state)."""

    def __init__(self, model: nn.Module, output: str, token_type_ids: bool, vectors: VectorInputs | None = None):
        super().__init__()
        self.model, self.output, self.token_type_ids, self.vectors = model, output, token_type_ids, vectors

    def forward(self, input_ids, attention_mask, *rest):
        kwargs = {}
        if self.token_type_ids:
            kwargs["token_type_ids"], rest = rest[0], rest[1:]
        with bind(self.vectors, rest):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out[self.output]


class Seq2SeqEncoder(nn.Module):
    """(input_ids, attention_mask, vectors...) -> last_hidden_state of the encoder."""

    def __init__(self, model: nn.Module, vectors: VectorInputs | None = None):
        super().__init__()
        self.model, self.vectors = model, vectors

    def forward(self, input_ids, attention_mask, *rest):
        with bind(self.vectors, rest):
            return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class Seq2SeqDecoder(nn.Module):
    """(input_ids, encoder_hidden_states, encoder_attention_mask, self-attention past k/v, vectors...)
    -> (logits, present self-attention k/v...).

    Cross-attention keys/values are recomputed from encoder_hidden_states at every step instead of
    being cached: one decoder graph, half the cache inputs, at the cost of two small matmuls a layer.
    """

    def __init__(self, model: nn.Module, num_layers: int, vectors: VectorInputs | None = None):
        super().__init__()
        self.model, self.num_layers, self.vectors = model, num_layers, vectors
        self.cache_arg = cache_argument(model)

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, *rest):
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        past, extra = rest[:2 * self.num_layers], rest[2 * self.num_layers:]
        cache = EncoderDecoderCache(build_cache(past), DynamicCache())
        with bind(self.vectors, extra):
            out = self.model(decoder_input_ids=input_ids, attention_mask=encoder_attention_mask,
                             encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                             use_cache=True, **{self.cache_arg: cache})
        present = returned_cache(out)
        return (out.logits, *flatten_cache(getattr(present, "self_attention_cache", present)))


def bind(vectors: VectorInputs | None, tensors):
    return vectors.bind(tuple(tensors)) if vectors is not None and tensors else contextlib.nullcontext()


def graph_wrappers(model, task, shape, vectors: VectorInputs | None, specs) -> dict:
    """graph key -> (wrapper module in eval mode, the VectorInputs it takes or None).

    Eval mode matters: torch.onnx.export restores the wrapper's own mode after tracing, which
    would switch dropout on in the model below a wrapper left in its default training mode."""
    return {k: (w.eval(), v) for k, (w, v) in _build_wrappers(model, task, shape, vectors, specs).items()}


def _build_wrappers(model, task, shape, vectors, specs) -> dict:
    if task.kind == "decoder":
        return {"model": (DecoderWithCache(model, shape.num_layers, vectors, use_cache=task.cache), vectors)}
    if task.kind == "encoder":
        return {"model": (Encoder(model, task.output, "token_type_ids" in specs[0].inputs, vectors), vectors)}
    encoder_prefix = next(n for n, m in model.named_modules() if m is model.get_encoder()) + "."
    enc = dec = None
    if vectors is not None:
        enc = vectors.subset([p for p in vectors.paths if p.startswith(encoder_prefix)])
        dec = vectors.subset([p for p in vectors.paths if not p.startswith(encoder_prefix)])
    return {"encoder": (Seq2SeqEncoder(model, enc), enc), "decoder": (Seq2SeqDecoder(model, shape.num_layers, dec), dec)}
