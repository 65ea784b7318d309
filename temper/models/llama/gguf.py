"""The Llama family in GGUF's terms (what llama.cpp reads): tensor names, the rotary
permutation of q and k, and the hyper-parameters.

Hugging Face's Llama rotates the two halves of each head together (`rotate_half`: feature i
with feature i + d/2); llama.cpp's `llama` architecture rotates adjacent pairs (features 2i
and 2i + 1). So the rows of q_proj and k_proj are reordered within each head, [0, d/2, 1,
d/2 + 1, ...], which makes llama.cpp's pairs HF's pairs; q . k within a head is unchanged. K has
`num_kv_heads` heads: permuting it with `num_heads` under grouped-query attention splits its
rows into the wrong heads (llama.cpp's converter once did, the classic GQA bug).

Qwen2 goes out as llama.cpp's `qwen2` architecture, whose rotation is NEOX's (halves, as HF's):
no permutation there. Mistral is `llama` (llama.cpp's converter does the same).

This module imports nothing of the `gguf` package: the exporter (temper/export/gguf.py) hands in
its writer and the enums.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch

from temper.models.common import rope_inverse_frequencies
from temper.models.config import ModelConfig
from temper.models.family import GGUFExport, StateDictAdapter

# temper parameter name -> GGUF tensor name (llama.cpp's LLM_TENSOR_NAMES for llama and qwen2)
GGUF_NAMES = StateDictAdapter(rules=(
    ("embed_tokens.weight", "token_embd.weight"),
    ("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("layers.{i}.attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    ("layers.{i}.attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("layers.{i}.attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    ("layers.{i}.attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("layers.{i}.attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    ("layers.{i}.attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.attn.o_proj.bias", "blk.{i}.attn_output.bias"),
    ("layers.{i}.mlp_norm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
))


def gguf_architecture(c: ModelConfig) -> str:
    """llama.cpp's architecture name for `c`: `qwen2` for Qwen2 (NEOX rotation), else `llama`."""
    return "qwen2" if c.hf_architecture == "Qwen2ForCausalLM" else "llama"


def rotary_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's adjacent pairs, within each of `heads` heads
    (a q/k weight (heads x head_dim, hidden) or its bias (heads x head_dim,))."""
    rows = weight.shape[0]
    assert rows % (2 * heads) == 0, f"{rows} rows do not split into {heads} heads of two halves"
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def gguf_tensors(state: dict[str, torch.Tensor], c: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight of a Llama-family state dict, q and k permuted for
    llama.cpp's `llama` architecture; the tied output layer is left out (llama.cpp then reads
    token_embd for it); `rope_freqs.weight` for llama3 rope scaling."""
    permute = gguf_architecture(c) == "llama"
    for name, tensor in state.items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        if permute and ".attn.q_proj." in name:
            tensor = rotary_permute(tensor, c.num_heads)
        elif permute and ".attn.k_proj." in name:
            tensor = rotary_permute(tensor, c.num_kv_heads)
        yield GGUF_NAMES.to_hf(name), tensor
    scaling = c.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # llama.cpp divides each default frequency by its factor: default / scaled, as HF's
        # llama3 scaling (convert_hf_to_gguf.py writes the same tensor)
        default = rope_inverse_frequencies(c.head_dim, c.rope_theta)
        yield "rope_freqs.weight", (default / rope_inverse_frequencies(c.head_dim, c.rope_theta, scaling)).float()


def write_gguf_hparams(writer: Any, c: ModelConfig, rope_scaling_types: Any) -> None:
    """The hyper-parameters llama.cpp reads for `c`, through a `gguf.GGUFWriter` (each with the
    type llama.cpp expects); `rope_scaling_types` is `gguf.RopeScalingType`."""
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.num_heads != c.hidden_size:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    scaling = c.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(rope_scaling_types.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if c.sliding_window is not None and c.sliding_window < c.max_seq_len:
        warnings.warn(f"llama.cpp's {gguf_architecture(c)} architecture attends to the whole context: the model's "
                      f"sliding window of {c.sliding_window} tokens is not in the file (outputs agree up to "
                      f"{c.sliding_window} tokens)", stacklevel=2)


GGUF = GGUFExport(architecture=gguf_architecture, tensors=gguf_tensors, write_hparams=write_gguf_hparams)
