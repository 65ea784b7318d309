"""The GPT-2 family: learned positions, pre-LayerNorm, GELU (tanh approximation), fused
q/k/v projection, tied embeddings. Uses `nn.Linear` (HF's Conv1D weights are transposed by
the converter in `hf.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from temper.models.common import DecoderBase, KVCache, attend
from temper.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.num_heads, self.head_dim = layer, c.num_heads, c.head_dim
        self.c_attn = nn.Linear(c.hidden_size, 3 * c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.c_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attn_out_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.num_heads * self.head_dim, dim=2)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = attend(q, k, v, mask, causal)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


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

    def forward(self, x, mask, causal, cache):
        x = x + self.attn(self.ln_1(x), mask, causal, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(DecoderBase):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.family == "gpt2"
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_seq_len, c.hidden_size)
        self.h = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False, last_only: bool = False) -> torch.Tensor:
        positions, mask, causal = self._attention_inputs(input_ids, positions, mask, cache)
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is beyond the model's {self.config.max_seq_len} learned positions"
            )
        x = self.wte(input_ids) + self.wpe(positions)  # (B, T, C)
        for block in self.h:
            x = block(x, mask, causal, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if last_only:  # generation needs the next-token logits of the last position alone
            x = x[:, -1:]
        x = self.ln_f(x)
        return x if return_hidden else self.lm_head(x)
