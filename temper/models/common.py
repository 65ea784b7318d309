"""What the decoder families truly share: RMSNorm, rotary embeddings, the attention call
(with an optional learned prefix), the KV cache, the attention masks for padding, packing
and sliding windows, and DecoderBase: the forward pass and the hooks features use."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from temper.errors import TemperError
from temper.masks import build_attention_mask


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 like the reference."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:  # (a cast call where there is nothing to cast costs a dispatch per norm)
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x if dtype == torch.float32 else x.to(dtype))


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
    raise TemperError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..max_len-1, in the rotate-half layout of HF Llama.

    The sin table holds the rotate-half signs folded in (its first half negated), so that
    `apply_rotary` rotates with one `roll` instead of two slices, a negation and a `cat`: the
    products are the same floats, since negating is exact.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._build(max_len)

    def _build(self, max_len: int, device: torch.device | None = None) -> None:
        inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling).to(device)
        t = torch.arange(max_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
        half = self.head_dim // 2
        sin = emb.sin()
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, signed sin of shape (B, 1, T, head_dim).

        `first`: the positions are first..first+T-1 in every row (the forward's default ones),
        so the tables are sliced, not gathered, and their bound is known without reading the
        positions back from the device; the slices are (1, 1, T, head_dim)."""
        if first is not None:
            end = first + positions.shape[-1]
            if end > self.cos.shape[0]:  # rebuild beyond the table, as HF does
                self._build(end, self.cos.device)
            return self.cos[None, None, first:end], self.sin[None, None, first:end]
        if positions.max() >= self.cos.shape[0]:
            self._build(int(positions.max()) + 1, self.cos.device)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by the position angles (`RotaryEmbedding`'s cos and signed sin), in
    x's dtype: x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x) * signed sin."""
    y = x * cos + x.roll(x.shape[-1] // 2, -1) * sin
    return y if y.dtype == x.dtype else y.to(x.dtype)  # no cast call where there is nothing to cast


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
        """Keep batch rows `rows`, in that order: finished sequences leave the batch, and a row
        named G times is copied G times (the G completions of a prompt share its prefill)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    @classmethod
    def stack(cls, caches: Sequence[KVCache], max_len: int, skip: Sequence[int] | None = None) -> KVCache:
        """The rows of `caches`, in order, in one new cache of `max_len` slots, right-aligned: each
        cache's filled slots end at the new `length` (the longest of them), and a shorter one gets
        empty slots in front, which the caller masks as left padding. `skip[i]` leading slots of
        cache i are dropped first (slots that are padding in every one of its rows).

        Continuous batching joins a prefilled request to a running batch this way: the rows keep
        their keys, and positions and the padding mask (the caller's) say which slots are real."""
        skip = list(skip) if skip is not None else [0] * len(caches)
        assert caches and len(skip) == len(caches), "one skip per cache"
        filled = [c.length - s for c, s in zip(caches, skip)]
        length = max(filled)
        if length > max_len:
            raise ValueError(f"KV cache of {max_len} positions cannot hold {length}")
        first = caches[0].keys[0]
        B = sum(c.keys[0].shape[0] for c in caches)
        out = cls(len(caches[0].keys), B, first.shape[1], max_len, first.shape[3], dtype=first.dtype,
                  device=first.device)
        for layer in range(len(out.keys)):
            row = 0
            for c, s, n in zip(caches, skip, filled):
                rows = c.keys[layer].shape[0]
                out.keys[layer][row:row + rows, :, length - n:length] = c.keys[layer][:, :, s:c.length]
                out.values[layer][row:row + rows, :, length - n:length] = c.values[layer][:, :, s:c.length]
                row += rows
        out.length = length
        return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           causal: bool, prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
           dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads. q (B,nh,T,hs), k/v (B,nkv,S,hs).

    `prefix` = (keys, values), each (B|1, nkv, P, hs), goes in front of k and v with its P
    columns visible to every query; the real columns keep `mask` / `causal` (prefix tuning).
    """
    if prefix is not None:
        k, v, mask = _with_prefix(q, k, v, mask, causal, prefix)
        causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def _with_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                 prefix: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[prefix keys ; k], [prefix values ; v] and the mask [True (P columns) ; the mask meant]."""
    pk, pv = prefix
    B, T, S, P = q.shape[0], q.shape[2], k.shape[2], pk.shape[2]
    assert pk.shape[1] == k.shape[1] and pk.shape[3] == k.shape[3], "prefix keys must be (B|1, nkv, P, hs)"
    pk = pk.to(k.dtype).expand(B, -1, -1, -1)  # (B, nkv, P, hs)
    pv = pv.to(v.dtype).expand(B, -1, -1, -1)
    if mask is None:  # what SDPA would have done: causal (no past, so S == T) or all visible
        q_slot = torch.arange(S - T, S, device=q.device)[:, None]
        k_slot = torch.arange(S, device=q.device)[None, :]
        full = torch.ones(T, S, dtype=torch.bool, device=q.device)
        mask = (k_slot <= q_slot if causal else full)[None, None]
    seen = torch.ones(mask.shape[0], 1, T, P, dtype=torch.bool, device=mask.device)
    mask = torch.cat([seen, mask.expand(-1, -1, T, S)], dim=-1)  # (B|1, 1, T, P + S)
    return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), mask


def positions_from_valid(key_valid: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: left padding does not shift positions."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class AttentionInputs:
    """What every attention call of one forward pass shares; each block gets it whole."""

    mask: torch.Tensor | None  # (B|1, 1, T, S) bool, True where a query may look; None: SDPA's causal
    causal: bool  # no past in the cache, so SDPA's own causal mask applies when mask is None
    cache: KVCache | None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, 1, T, hs); rotary families
    prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (B|1, nkv, P, hs)

    def prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.prefix_kv is None else self.prefix_kv[layer]


class DecoderBase(nn.Module):
    """The forward pass every family shares, and the hooks features use instead of patches.

    forward(input_ids (B,T) | inputs_embeds (B,T,C), prefix_kv, positions (B,T) | None,
            mask (B|1,1,T,S) bool | None, cache KVCache | None, return_hidden, last_only, hidden_at)
        -> logits (B,T,V), or the final hidden states (B,T,C) with return_hidden=True;
    with last_only=True, only the last position (T=1); with hidden_at, a bool (B,T), the final
    hidden states of those positions alone, (N,C) in x[hidden_at]'s order: the last block's
    position-wise work after its attention (output projection, MLP) and the final norm run on
    them only (log-probs of completion tokens need no other). With a cache, the T new tokens
    follow the `cache.length` tokens already in it.

    A family defines its modules under its own (HF-like) names, which the converters and
    checkpoints depend on, and exposes them as `input_embeddings`, `blocks` and `final_norm`;
    `_position_inputs` says what positions do (rotary tables, or learned embeddings added to
    x); each block is called as block(x (B,T,C), AttentionInputs) -> (B,T,C), the last one for
    `hidden_at` as block(x, AttentionInputs, select (B,T) bool) -> (N,C), the selected positions only.

    Hooks for features applied from outside (PEFT, alignment), so no forward is replaced:
    - `inputs_embeds`: input vectors instead of ids (a soft prompt in front, say);
    - `prefix_kv`: one (keys, values) pair per layer, each (B|1, nkv, P, hs), put in front of
      that layer's keys at every call: visible to every query, never stored in the cache, no
      rotary applied (they live in the post-rotary key space); real tokens keep positions;
    - `extra_cache_slots`: KV-cache slots `new_cache` adds for tokens a hook puts in front;
    - `activation_checkpointing`: recompute each block in the backward pass;
    - `lm_head = None`: a body without an output layer (a reward model's, temper.models.reward),
      called with return_hidden=True only.
    """

    config: object
    activation_checkpointing: bool = False
    extra_cache_slots: int = 0

    @property
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding (ids -> (B, T, C))."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        """The norm between the last block and the output layer."""
        raise NotImplementedError

    def _position_inputs(self, x: torch.Tensor, positions: torch.Tensor, first: int | None = None
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(x with learned positions added, or x; rotary (cos, sin) for the attention, or None).
        `first`, when given, says the positions are first..first+T-1 in every row (known on the
        host: no read-back of the positions is needed to check their range)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False,
                last_only: bool = False, hidden_at: torch.Tensor | None = None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise TemperError("the model takes input_ids or inputs_embeds: exactly one of them")
        assert hidden_at is None or (return_hidden and not last_only), "hidden_at needs return_hidden=True and last_only=False"
        if prefix_kv is not None and len(prefix_kv) != len(self.blocks):
            raise TemperError(f"prefix_kv has {len(prefix_kv)} layers, the model {len(self.blocks)}")
        x = self.input_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T = x.shape[1]
        default_positions = positions is None  # past..past+T-1 in every row
        positions, mask, causal = self._attention_inputs(T, x.device, positions, mask, cache)
        first = (cache.length if cache is not None else 0) if default_positions else None
        x, rope = self._position_inputs(x, positions, first)
        x = self.run_blocks(x, AttentionInputs(mask, causal, cache, rope, prefix_kv), select=hidden_at)
        if cache is not None:
            cache.length += T
        if last_only and T > 1:  # generation needs the next-token logits of the last position alone
            x = x[:, -1:]
        x = self.final_norm(x)
        if return_hidden:
            return x
        if self.lm_head is None:
            raise TemperError("this model has no output layer (a reward model's body): call it with return_hidden=True")
        return self.lm_head(x)  # (B, T, V)

    def run_blocks(self, x: torch.Tensor, inputs: AttentionInputs, start: int = 0,
                   stop: int | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks [start, stop) on x (B, T, C) -> (B, T, C): the forward's block loop, which a
        pipeline stage runs on its own slice of the blocks (honours `activation_checkpointing`).
        With `select` (B, T) bool, the last block returns the selected positions only, (N, C)."""
        checkpointed = self.activation_checkpointing and torch.is_grad_enabled()
        stop = len(self.blocks) if stop is None else stop
        for i, block in enumerate(itertools.islice(self.blocks, start, stop), start):  # no ModuleList built per call
            args = (x, inputs) if select is None or i < stop - 1 else (x, inputs, select)
            if checkpointed:  # keep only the block's input; recompute the rest in the backward pass
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return x

    def tie_weights(self) -> None:
        """The output layer shares the token embedding where the config ties them (after a load
        from the meta device, which leaves two separate parameters)."""
        if self.config.tie_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.input_embeddings.weight

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A cache for `max_len` tokens (plus `extra_cache_slots` for tokens hooks put in front)."""
        c = self.config
        param = next(self.parameters())
        return KVCache(c.num_layers, batch_size, c.num_kv_heads, max_len + self.extra_cache_slots, c.head_dim,
                       dtype=dtype or param.dtype, device=device or param.device)

    def _attention_inputs(self, T: int, device: torch.device, positions: torch.Tensor | None,
                          mask: torch.Tensor | None, cache: KVCache | None):
        """Fill in default positions and masks; say whether SDPA's built-in causal mask applies."""
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=device)[None, :]
        causal = past == 0
        if mask is None and past > 0 and T > 1:  # a chunk after cached tokens: explicit causal mask
            q_slot = torch.arange(past, past + T, device=device)[:, None]
            mask = (torch.arange(past + T, device=device)[None, :] <= q_slot)[None, None]
        window = self.config.sliding_window
        if window is not None and past + T > window:
            window_mask = build_attention_mask(None, T, past + T, sliding_window=window, device=device)
            mask = window_mask if mask is None else mask & window_mask
        return positions, mask, causal

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (tied embeddings count once)."""
        return count_parameters(self, trainable_only)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """A module's unique parameters (a tensor shared by two modules, e.g. tied embeddings, counts once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
