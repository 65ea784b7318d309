"""Attention masks as plain tensors: a primitive under both the data (packed batches say which
example each slot holds) and the models (left padding, sliding windows), so neither imports the
other for it."""

from __future__ import annotations

import torch


def build_attention_mask(
    key_valid: torch.Tensor | None,
    query_len: int,
    key_len: int,
    *,
    segment_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """A boolean SDPA mask (B or 1, 1, T, S), True where a query may look, or None if plain causal.

    The queries are the last `query_len` of `key_len` slots. `key_valid` (B, S) marks real
    tokens (False for left padding). `segment_ids` (B, S) keeps packed examples apart.
    Every query may always see itself, so padded rows never produce NaN.
    """
    needs_window = sliding_window is not None and key_len > sliding_window
    if key_valid is None and segment_ids is None and not needs_window:
        return None
    if key_valid is not None:
        device = key_valid.device
    elif segment_ids is not None:
        device = segment_ids.device
    q_slot = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    k_slot = torch.arange(key_len, device=device)[None, :]
    allowed = k_slot <= q_slot  # (T, S)
    if needs_window:
        allowed = allowed & (q_slot - k_slot < sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :key_len]
    if segment_ids is not None:
        q_seg = segment_ids[:, key_len - query_len:key_len]
        allowed = allowed & (q_seg[:, None, :, None] == segment_ids[:, None, None, :key_len])
    return allowed | (k_slot == q_slot)[None, None]
