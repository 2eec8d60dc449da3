"""The one IA3 layer: a Linear or Conv1D whose input or output is rescaled by learned vectors.

Where the vectors come from is the only thing that changes between uses: its own parameters
(training, PEFT adapters), tensors handed in for one traced forward pass (swappable export:
graph inputs of shape [dim]; bank export: rows gathered per batch item, shape [batch, dim]),
or nowhere at all once folded into the weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import IA3Error

try:  # transformers' GPT-2 style layer: weight stored as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

WRAPPABLE = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    in_f, out_f = layer.weight.shape  # Conv1D keeps [in, out]
    return in_f, out_f


def scaled_axis(feedforward: bool, conv1d: bool) -> int:
    """The weight axis an IA3 vector runs along: a Linear keeps [out, in], a Conv1D [in, out];
    output scaling runs along `out`, feed-forward (input) scaling along `in`."""
    out_axis, in_axis = (1, 0) if conv1d else (0, 1)
    return in_axis if feedforward else out_axis


def broadcast_to(vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [dim] vector broadcasts as is; a per-row [batch, dim] one gets the middle axes of x.

    One already shaped for x ([batch, 1, dim]) is left as is: a traced reshape would add shape ops."""
    if vector.dim() == 1 or vector.dim() == x.dim():
        return vector.to(x.dtype)
    if x.dim() == 2 and vector.dim() > 1:  # tokens flattened to [batch*seq, dim] (OPT's feed-forward)
        rows, dim = vector.shape[0], vector.shape[-1]
        per_row = x.shape[0] // rows
        return vector.to(x.dtype).reshape(rows, 1, dim).expand(rows, per_row, dim).reshape(x.shape[0], dim)
    return vector.to(x.dtype).reshape(vector.shape[0], *([1] * (x.dim() - 2)), vector.shape[-1])


class IA3Layer(nn.Module):
    """Wraps one Linear/Conv1D. Each adapter has its own vector AND its own feed-forward flag."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self.active: tuple[str, ...] = ()
        self.folded: list[str] = []
        self.external: tuple[torch.Tensor, bool] | None = None  # set while tracing an export

    def _apply(self, fn, recurse=True):
        """`model.to(torch.bfloat16)` / `.half()` cast the base weights but keep the vectors float32:
        a vector near 1 loses its small updates in 16-bit."""
        before = {name: p.data for name, p in self.ia3_l.items()}
        super()._apply(fn, recurse)
        for name, p in self.ia3_l.items():
            if p.dtype != before[name].dtype:  # undo the cast from the original values, keep the move
                p.data = before[name].to(p.device)
                if p.grad is not None:
                    p.grad = p.grad.float()
        return self

    @property
    def weight(self) -> torch.Tensor:  # models such as T5 read `.weight` of their projections
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def is_conv1d(self) -> bool:
        return not isinstance(self.base_layer, nn.Linear)

    def add_adapter(self, name: str, feedforward: bool, init_ones: bool = True) -> None:
        dim = self.in_features if feedforward else self.out_features
        device = self.base_layer.weight.device
        init = torch.ones(dim, device=device) if init_ones else torch.randn(dim, device=device)
        self.ia3_l[name] = nn.Parameter(init.float())
        self.feedforward[name] = feedforward

    def delete_adapter(self, name: str) -> None:
        del self.ia3_l[name]
        del self.feedforward[name]
        self.active = tuple(a for a in self.active if a != name)

    def vector_shape(self, name: str) -> tuple[int, int]:
        """PEFT's stored shape: (1, in) for feed-forward input scaling, (out, 1) otherwise."""
        return (1, self.in_features) if self.feedforward[name] else (self.out_features, 1)

    def scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(input scale, output scale): the product of every active, unfolded adapter's vector."""
        if self.external is not None:
            vector, feedforward = self.external
            return (vector, None) if feedforward else (None, vector)
        scale_in = scale_out = None
        for name in self.active:
            if name in self.folded or name not in self.ia3_l:
                continue
            vector = self.ia3_l[name]
            if self.feedforward[name]:
                scale_in = vector if scale_in is None else scale_in * vector
            else:
                scale_out = vector if scale_out is None else scale_out * vector
        return scale_in, scale_out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale_in, scale_out = self.scales()
        if scale_in is not None:
            x = x * broadcast_to(scale_in, x)
        y = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            y = y * broadcast_to(scale_out, y)
        return y

    # -- folding -------------------------------------------------------------------------
    def _weight_view(self, name: str) -> list[int]:
        """Shape that broadcasts a vector over the weight's scaled axis (rows or columns)."""
        shape = [1, 1]
        shape[scaled_axis(self.feedforward[name], self.is_conv1d)] = -1
        return shape

    def rescale_weights(self, name: str, inverse: bool = False) -> None:
        """Multiply (fold) or divide (unfold) the weights by one adapter's vector, in float32."""
        vector = self.ia3_l[name].detach().float()
        if inverse:
            vector = 1.0 / vector
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_((weight.float() * vector.view(self._weight_view(name))).to(weight.dtype))
            bias = self.base_layer.bias
            if bias is not None and not self.feedforward[name]:
                bias.copy_((bias.float() * vector).to(bias.dtype))


class SavedModule(nn.Module):
    """A module trained in full per adapter (task heads): PEFT's `modules_to_save`."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: tuple[str, ...] = ()

    def add_adapter(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.copies[name] = clone

    def chosen(self) -> nn.Module:
        owners = [a for a in self.active if a in self.copies]
        if len(owners) > 1:
            raise IA3Error(
                f"adapters {', '.join(owners)} each carry their own copy of a saved module; "
                "activate only one of them"
            )
        return self.copies[owners[0]] if owners else self.original_module

    def forward(self, *args, **kwargs):
        return self.chosen()(*args, **kwargs)
