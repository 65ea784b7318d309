"""The GPT-2 family: model, HF names and config.json, presets, and what the planner and
initialisation read (no tensor-parallel plan: its fused c_attn is not split)."""

from __future__ import annotations

from typing import Any

from temper.models.config import ModelConfig
from temper.models.family import BlockLayout, Family
from temper.models.gpt2.hf import (
    ARCHITECTURES,
    GPT2_ADAPTER,
    REWARD_ARCHITECTURES,
    config_from_hf,
    config_to_hf,
)
from temper.models.gpt2.model import GPT2


def _gpt2(**kw: Any) -> ModelConfig:
    base = dict(
        family="gpt2",
        vocab_size=50257,
        max_seq_len=1024,
        tie_embeddings=True,
        qkv_bias=True,
        mlp_bias=True,
        attn_out_bias=True,
        hf_architecture="GPT2LMHeadModel",
        bos_token_id=50256,
        eos_token_id=50256,
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    "gpt2-tiny": _gpt2(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=512,
                       bos_token_id=None, eos_token_id=None),
    # The real models' shapes.
    "gpt2": _gpt2(hidden_size=768, num_layers=12, num_heads=12),
    "gpt2-medium": _gpt2(hidden_size=1024, num_layers=24, num_heads=16),
}

FAMILY = Family(
    name="gpt2",
    description="GPT-2",
    model=GPT2,
    adapter=GPT2_ADAPTER,
    architectures=ARCHITECTURES,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    presets=PRESETS,
    reward_architectures=REWARD_ARCHITECTURES,
    layout=BlockLayout(attention_in=("attn.c_attn",), attention_out="attn.c_proj", mlp_in=("mlp.c_fc",),
                       mlp_out="mlp.c_proj", norm="layer", positions="learned"),
    tensor_parallel="its fused c_attn projection is not split",
    residual_outputs=("attn.c_proj", "mlp.c_proj"),
)

__all__ = ["FAMILY", "GPT2", "GPT2_ADAPTER", "PRESETS"]
