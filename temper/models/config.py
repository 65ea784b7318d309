"""The architecture description shared by every model family.

`ModelConfig` is what temper's model files read. Each family converts it to and from its
Hugging Face `config.json` (`temper/models/<family>/hf.py`), so a model directory is always a
Hugging Face model directory. The families and their presets are listed in
`temper/models/registry.py`; this module knows none of them by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from temper.config import check_keys, check_range
from temper.errors import TemperError

# sizes that are positive integers (None: derived from the others, or off)
POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_seq_len", "sliding_window", "embedding_size", "num_labels")


def check_shape(values: dict[str, Any], prefix: str = "") -> None:
    """Every size in `values` a positive integer, norm_eps and rope_theta positive: one line naming the key."""
    for key in POSITIVE_SIZES:
        if values.get(key) is not None:
            check_range(prefix + key, values[key], low=1)
    if values.get("type_vocab_size") is not None:
        check_range(prefix + "type_vocab_size", values["type_vocab_size"], low=0)
    for key in ("norm_eps", "rope_theta"):
        if values.get(key) is not None:
            check_range(prefix + key, values[key], low=0.0, low_open=True)


@dataclass
class ModelConfig:
    family: str = "llama"  # a name in temper.models.registry: llama (also Mistral, Qwen2), gpt2, bert
    vocab_size: int = 32000
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: 4x hidden (a family's presets and config.json give their own)
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF `rope_parameters` beyond the default type
    qkv_bias: bool = False  # Qwen2 puts a bias on q/k/v only
    mlp_bias: bool = False
    attn_out_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1: each token sees the last N tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_architecture: str = "LlamaForCausalLM"  # which transformers class the export names
    # encoders (BERT, ELECTRA): segment embeddings, a narrower embedding projected up, dropout, labels
    type_vocab_size: int = 0  # token-type (segment) embeddings; 0: none
    embedding_size: int | None = None  # None: hidden_size (ELECTRA's smaller embeddings have a projection)
    dropout: float = 0.0  # on the embeddings and each residual branch, in training (families that have it)
    attention_dropout: float = 0.0  # on the attention probabilities, in training (families that have it)
    num_labels: int | None = None  # classification heads: classes per sequence or per token
    extra: dict[str, Any] = field(default_factory=dict)  # HF config keys carried through untouched

    def __post_init__(self) -> None:
        check_shape(vars(self))
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise TemperError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise TemperError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        for key in ("dropout", "attention_dropout"):
            check_range(key, getattr(self, key), low=0.0, high=1.0, high_open=True)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, given: dict[str, Any], prefix: str = "model_config") -> ModelConfig:
        """This shape with the user's `model_config.*` overrides: keys, types and sizes checked, each
        mistake one line naming `prefix.KEY`."""
        values = check_keys(given, ModelConfig, prefix)
        check_shape(values, prefix + ".")
        # head_dim and num_kv_heads that follow from hidden_size / num_heads here follow them when
        # those are overridden (model_config.hidden_size=128 on a preset keeps hidden / heads)
        if ("hidden_size" in values or "num_heads" in values) and "head_dim" not in values \
                and self.num_heads * self.head_dim == self.hidden_size:
            values = {"head_dim": None, **values}
        if "num_heads" in values and "num_kv_heads" not in values and self.num_kv_heads == self.num_heads:
            values = {"num_kv_heads": None, **values}
        try:
            return self.replace(**values)
        except TemperError as e:
            raise TemperError(f"{prefix}: {e}") from None
