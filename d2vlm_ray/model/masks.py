"""The additive 4D attention mask: causal everywhere except a bidirectional frame block.

transformers 5.x passes a 4D float mask straight to eager attention, so the model needs
no patched internals (the official code overrides ``_update_causal_mask``, which no longer
exists). A bool 4D mask changes logits even when purely causal; float it is.
"""

from __future__ import annotations

import torch


def build_attention_mask(
    key_valid: torch.Tensor,
    num_queries: int,
    frame_start: torch.Tensor,
    frame_count: torch.Tensor,
    bidirectional_frames: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask for the last ``num_queries`` positions of a sequence of ``K`` keys.

    A query at key column ``q`` may attend to column ``k`` when ``k`` holds a real token
    and ``k <= q``, or when both lie in the sample's frame block and frames are
    bidirectional. A padding query still attends to itself, so no row is fully masked
    (a fully masked row turns into NaN in the float32 softmax and spreads through the
    value products).

    Args:
        key_valid: ``[B, K]`` bool, True for real (non-padding) key columns.
        num_queries: Q, the number of newest columns that are queries.
        frame_start: ``[B]`` column of each sample's first frame token.
        frame_count: ``[B]`` frames per sample.
        bidirectional_frames: Let frames attend to later frames.
        dtype: Dtype of the returned mask (the model's compute dtype).

    Returns:
        ``[B, 1, Q, K]`` with 0 where attention is allowed and ``finfo(dtype).min`` elsewhere.
    """
    batch, num_keys = key_valid.shape
    device = key_valid.device
    key_col = torch.arange(num_keys, device=device)  # [K]
    query_col = torch.arange(num_keys - num_queries, num_keys, device=device)  # [Q]
    allowed = key_valid[:, None, :] & (key_col[None, None, :] <= query_col[None, :, None])  # [B, Q, K]
    if bidirectional_frames:
        start = frame_start[:, None]
        stop = (frame_start + frame_count)[:, None]
        key_in = (key_col[None, :] >= start) & (key_col[None, :] < stop)  # [B, K]
        query_in = (query_col[None, :] >= start) & (query_col[None, :] < stop)  # [B, Q]
        allowed = allowed | (query_in[:, :, None] & key_in[:, None, :])
    allowed = allowed | (key_col[None, None, :] == query_col[None, :, None])
    mask = torch.zeros(batch, 1, num_queries, num_keys, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
