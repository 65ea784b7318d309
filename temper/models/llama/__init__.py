"""The Llama family (Llama 2/3, Mistral, Qwen2 through config flags): model, HF names and
config.json, presets, and what the planner, tensor parallelism and initialisation read."""

from __future__ import annotations

from typing import Any

from temper.models.config import ModelConfig
from temper.models.family import BlockLayout, Family, TensorParallelPlan
from temper.models.llama.gguf import GGUF
from temper.models.llama.hf import (
    ARCHITECTURES,
    LLAMA_ADAPTER,
    REWARD_ARCHITECTURES,
    config_from_hf,
    config_to_hf,
)
from temper.models.llama.model import Llama


def _llama(**kw: Any) -> ModelConfig:
    return ModelConfig(family="llama", **kw)


PRESETS: dict[str, ModelConfig] = {
    # ~0.2M parameters with a 2k vocabulary: tests.
    "llama-tiny": _llama(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, max_seq_len=512, tie_embeddings=True),
    # ~3M / ~14M parameters: CPU training runs and benchmarks.
    "llama-3m": _llama(vocab_size=4096, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2,
                       intermediate_size=512, max_seq_len=512, tie_embeddings=True),
    "llama-14m": _llama(vocab_size=8192, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2,
                        intermediate_size=1024, max_seq_len=1024, tie_embeddings=True),
    # ~125M parameters (GPT-2-small class, untied 32k vocabulary): the GPU throughput benchmark.
    "llama-125m": _llama(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                         intermediate_size=2048, max_seq_len=2048),
    # The real models' shapes, so that a config can be built on the meta device and counted.
    "llama-3.2-1b": _llama(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                           num_kv_heads=8, intermediate_size=8192, max_seq_len=131072,
                           rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           bos_token_id=128000, eos_token_id=128001),
    "llama-3-8b": _llama(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                         num_kv_heads=8, intermediate_size=14336, max_seq_len=8192,
                         rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": _llama(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                         num_kv_heads=8, intermediate_size=14336, max_seq_len=32768,
                         rope_theta=1000000.0, hf_architecture="MistralForCausalLM",
                         bos_token_id=1, eos_token_id=2),
    "qwen2-0.5b": _llama(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                         num_kv_heads=2, intermediate_size=4864, max_seq_len=32768,
                         rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True,
                         hf_architecture="Qwen2ForCausalLM", eos_token_id=151643),
}

FAMILY = Family(
    name="llama",
    description="Llama, Mistral, Qwen2",
    model=Llama,
    adapter=LLAMA_ADAPTER,
    architectures=ARCHITECTURES,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    presets=PRESETS,
    reward_architectures=REWARD_ARCHITECTURES,
    layout=BlockLayout(attention_in=("attn.q_proj", "attn.k_proj", "attn.v_proj"), attention_out="attn.o_proj",
                       mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", norm="rms",
                       positions="rotary"),
    tensor_parallel=TensorParallelPlan(
        column_wise=("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
        row_wise=("attn.o_proj", "mlp.down_proj"), replicated=("attn_norm", "mlp_norm")),
    residual_outputs=("o_proj", "down_proj"),
    gguf=GGUF,
)

__all__ = ["FAMILY", "LLAMA_ADAPTER", "Llama", "PRESETS"]
