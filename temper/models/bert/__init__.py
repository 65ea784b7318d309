"""The BERT family (BERT and ELECTRA encoders, their pretraining and classification heads):
model, HF names and config.json, presets, and what the planner reads."""

from __future__ import annotations

from typing import Any

from temper.models.bert.hf import (
    ADAPTERS,
    ARCHITECTURES,
    BERT_ADAPTER,
    config_from_hf,
    config_to_hf,
)
from temper.models.bert.model import HEADS, POOLED_HEADS, Bert, EncoderOutput, head_of
from temper.models.config import ModelConfig
from temper.models.family import BlockLayout, Family


def _bert(**kw: Any) -> ModelConfig:
    base = dict(family="bert", vocab_size=30522, max_seq_len=512, norm_eps=1e-12, qkv_bias=True, mlp_bias=True,
                attn_out_bias=True, tie_embeddings=True, type_vocab_size=2, dropout=0.1, attention_dropout=0.1,
                pad_token_id=0, hf_architecture="BertForMaskedLM")
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    # tests and CPU runs: the recipe sets the vocabulary from its tokenizer
    "bert-tiny": _bert(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),
    "electra-tiny": _bert(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                          hf_architecture="ElectraForPreTraining"),
    # the real models' shapes
    "bert-base": _bert(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "electra-small": _bert(hidden_size=256, num_layers=12, num_heads=4, intermediate_size=1024, embedding_size=128,
                           hf_architecture="ElectraForPreTraining"),
}


def with_head(config: ModelConfig, architecture: str, num_labels: int | None = None) -> ModelConfig:
    """`config` with another head (an HF architecture of `HEADS`): the encoder's weights carry over."""
    return config.replace(hf_architecture=architecture, num_labels=num_labels)


def parameters_outside_blocks(c: ModelConfig) -> int:
    """What the planner's generic count (V x H embeddings, untied: twice; one final 2H norm; P x H
    learned positions) misses of a BERT: token types, narrower embeddings, the pooler and the heads."""
    H, V, P, T = c.hidden_size, c.vocab_size, c.max_seq_len, c.type_vocab_size
    E = c.embedding_size or H
    head = head_of(c)
    actual = V * E + P * E + T * E + 2 * E + (E * H + H if E != H else 0)
    actual += H * H + H if head in POOLED_HEADS else 0
    if head in ("mlm", "pretraining"):
        actual += H * H + H + 2 * H + V + (0 if c.tie_embeddings else V * H)
    if head == "pretraining":
        actual += 2 * H + 2
    if head == "generator":
        actual += H * E + E + 2 * E + V + (0 if c.tie_embeddings else V * E)
    if head == "discriminator":
        actual += H * H + H + H + 1
    if head in ("sequence", "tokens"):
        actual += H * c.num_labels + c.num_labels
    counted = V * H * (1 if c.tie_embeddings else 2) + 2 * H + P * H
    return actual - counted


FAMILY = Family(
    name="bert",
    description="BERT, ELECTRA",
    model=Bert,
    adapter=BERT_ADAPTER,
    adapters=ADAPTERS,
    architectures=ARCHITECTURES,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    presets=PRESETS,
    layout=BlockLayout(attention_in=("attention.self.query", "attention.self.key", "attention.self.value"),
                       attention_out="attention.output.dense", mlp_in=("intermediate.dense",), mlp_out="output.dense",
                       norm="layer", positions="learned", extra_parameters=parameters_outside_blocks),
    tensor_parallel="tensor parallelism splits decoders so far (it replicates a decoder's final norm and output "
                    "layer)",
    causal_lm=False,
    dropout=True,
)

__all__ = ["FAMILY", "HEADS", "PRESETS", "Bert", "EncoderOutput", "with_head"]
