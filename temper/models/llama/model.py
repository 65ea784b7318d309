"""The Llama family: Llama 2/3, Mistral and Qwen2 through config flags.

RoPE (configurable theta and scaling), RMSNorm, SwiGLU MLP, grouped-query attention,
optional q/k/v bias (Qwen2), optional tied embeddings, optional sliding window (Mistral).
Leaf module names match Hugging Face's (q_proj, gate_proj, ...) so the `target_modules`
users know from PEFT work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from temper.models.common import (
    AttentionInputs,
    DecoderBase,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    attend,
)
from temper.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attn_out_bias)

    def forward(self, x: torch.Tensor, a: AttentionInputs, select: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # -1, not self.num_heads: under tensor parallelism each rank holds a slice of the heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, nh, hs)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hs)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        cos, sin = a.rope
        # q and k rotate together: one set of elementwise calls instead of two (the same floats)
        nh = q.shape[2]
        q, k = apply_rotary(torch.cat((q, k), 2).transpose(1, 2), cos, sin).split((nh, k.shape[2]), 1)
        if a.cache is not None:
            k, v = a.cache.update(self.layer, k, v)  # (B, nkv, S, hs); a prefix is never cached
        y = attend(q, k, v, a.mask, a.causal, a.prefix(self.layer)).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y if select is None else y[select])  # (B, T, C), or (N, C) at the selected positions


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.attn = Attention(c, layer)
        self.mlp_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, a: AttentionInputs, select: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), a, select)
        x = (x if select is None else x[select]) + h
        return x + self.mlp(self.mlp_norm(x))


class Llama(DecoderBase):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.norm

    def _position_inputs(self, x: torch.Tensor, positions: torch.Tensor, first: int | None = None):
        cos, sin = self.rope(positions, first)  # positions enter through the attention only
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x, (cos, sin)
