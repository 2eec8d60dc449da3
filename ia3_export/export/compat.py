"""Differences between transformers versions that matter to tracing.

transformers 4.5x builds attention masks with `torch.vmap`, which the TorchScript exporter
cannot trace; 5.x builds them without vmap by default. On the older versions the mask builder
is swapped, during the trace only, for one that applies the same mask function to broadcast
index tensors (the same booleans, plain tensor ops).
"""
from __future__ import annotations

import contextlib
import inspect


@contextlib.contextmanager
def traceable_masks():
    try:
        from transformers import masking_utils
    except ImportError:  # transformers without masking_utils builds masks from plain tensor ops
        yield
        return
    original = getattr(masking_utils, "sdpa_mask", None)
    if original is None or "use_vmap" in inspect.signature(original).parameters:
        yield  # 5.x: vmap only on request
        return
    masking_utils.sdpa_mask = _broadcast_sdpa_mask
    try:
        yield
    finally:
        masking_utils.sdpa_mask = original


def _broadcast_sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None,
                         attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
    """A boolean [batch, 1, query, kv] mask: the mask function evaluated on broadcast indices."""
    import torch
    from transformers import masking_utils as mu

    mask_function = mask_function or mu.causal_mask_function
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding, cache_position.shape[0], kv_length, kv_offset, local_size):
        return None
    if padding is not None:
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding))
    device = cache_position.device
    batch = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    head = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    query = cache_position.view(1, 1, -1, 1)
    key = (torch.arange(kv_length, device=device) + kv_offset).view(1, 1, 1, -1)
    return mask_function(batch, head, query, key).expand(batch_size, 1, cache_position.shape[0], kv_length)
