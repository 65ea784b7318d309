"""What the decoder families truly share: RMSNorm, rotary embeddings, the attention call,
the KV cache and the attention masks for padding, packing and sliding windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 like the reference."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """1 / theta^(2i/d), optionally rescaled (linear, or Llama 3's frequency-dependent rule)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", scaling.get("type") if scaling else None) or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed by `factor`, short ones kept, the band between blended
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(mid, blended, scaled)
    from temper.errors import TemperError

    raise TemperError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..max_len-1, in the rotate-half layout of HF Llama."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._build(max_len)

    def _build(self, max_len: int, device: torch.device | None = None) -> None:
        inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling).to(device)
        t = torch.arange(max_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin of shape (B, 1, T, head_dim)."""
        if positions.max() >= self.cos.shape[0]:  # rebuild beyond the table, as HF does
            self._build(int(positions.max()) + 1, self.cos.device)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by the position angles, in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_heads, max_len, head_dim).

    `length` tokens are filled. A forward pass with the cache writes its new keys at
    [length, length + T) and attends over [0, length + T); the model advances `length`.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full (need {end})")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished sequences leave the batch)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           causal: bool, dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads. q (B,nh,T,hs), k/v (B,nkv,S,hs)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None,
        enable_gqa=k.shape[1] != q.shape[1],
    )


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


def positions_from_valid(key_valid: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: left padding does not shift positions."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)


class DecoderBase(nn.Module):
    """What both families expose to generation, training and the HF converters.

    forward(input_ids (B,T), positions (B,T) | None, mask (B|1,1,T,S) bool | None,
            cache KVCache | None, return_hidden, last_only) -> logits (B,T,V) or final hidden
    states (B,T,C); with last_only=True, only the last position (T=1).
    With a cache, the T new tokens follow the `cache.length` tokens already in it.
    """

    config: object

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        c = self.config
        param = next(self.parameters())
        return KVCache(c.num_layers, batch_size, c.num_kv_heads, max_len, c.head_dim,
                       dtype=dtype or param.dtype, device=device or param.device)

    @staticmethod
    def _attention_inputs(input_ids: torch.Tensor, positions: torch.Tensor | None,
                          mask: torch.Tensor | None, cache: KVCache | None,
                          sliding_window: int | None = None):
        """Fill in default positions and masks; say whether SDPA's built-in causal mask applies."""
        T = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        device = input_ids.device
        if positions is None:
            positions = torch.arange(past, past + T, device=device)[None, :]
        causal = past == 0
        if mask is None and past > 0 and T > 1:  # a chunk after cached tokens: explicit causal mask
            q_slot = torch.arange(past, past + T, device=device)[:, None]
            mask = (torch.arange(past + T, device=device)[None, :] <= q_slot)[None, None]
        if sliding_window is not None and past + T > sliding_window:
            window = build_attention_mask(None, T, past + T, sliding_window=sliding_window, device=device)
            mask = window if mask is None else mask & window
        return positions, mask, causal

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (tied embeddings count once)."""
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total
