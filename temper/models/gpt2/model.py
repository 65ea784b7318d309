"""The GPT-2 family: learned positions, pre-LayerNorm, GELU (tanh approximation), fused
q/k/v projection, tied embeddings. Uses `nn.Linear` (HF's Conv1D weights are transposed by
the converter in `hf.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from temper.models.common import AttentionInputs, DecoderBase, attend
from temper.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.num_heads, self.head_dim = layer, c.num_heads, c.head_dim
        self.c_attn = nn.Linear(c.hidden_size, 3 * c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.c_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attn_out_bias)

    def forward(self, x: torch.Tensor, a: AttentionInputs, select: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.num_heads * self.head_dim, dim=2)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        if a.cache is not None:
            k, v = a.cache.update(self.layer, k, v)  # (B, nh, S, hs); a prefix is never cached
        y = attend(q, k, v, a.mask, a.causal, a.prefix(self.layer)).transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y if select is None else y[select])  # (B, T, C), or (N, C) at the selected positions


class MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.c_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.attn = Attention(c, layer)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, a: AttentionInputs, select: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn(self.ln_1(x), a, select)
        x = (x if select is None else x[select]) + h
        return x + self.mlp(self.ln_2(x))


class GPT2(DecoderBase):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_seq_len, c.hidden_size)
        self.h = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.wte

    @property
    def blocks(self) -> nn.ModuleList:
        return self.h

    @property
    def final_norm(self) -> nn.Module:
        return self.ln_f

    def _position_inputs(self, x: torch.Tensor, positions: torch.Tensor, first: int | None = None):
        last = first + positions.shape[-1] - 1 if first is not None else int(positions.max())
        if last >= self.config.max_seq_len:
            raise ValueError(f"position {last} is beyond the model's {self.config.max_seq_len} learned positions")
        return x + self.wpe(positions), None  # (B, T, C)
