"""The architecture description shared by every decoder family, and the size presets.

`ModelConfig` is what temper's model files read. It is converted to and from each
family's Hugging Face `config.json` in `temper/models/hf.py`, so a model directory is
always a Hugging Face model directory.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from temper.config import check_keys, check_range
from temper.errors import TemperError

# sizes that are positive integers (None: derived from the others, or off)
POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_seq_len", "sliding_window")


def check_shape(values: dict[str, Any], prefix: str = "") -> None:
    """Every size in `values` a positive integer, norm_eps and rope_theta positive: one line naming the key."""
    for key in POSITIVE_SIZES:
        if values.get(key) is not None:
            check_range(prefix + key, values[key], low=1)
    for key in ("norm_eps", "rope_theta"):
        if values.get(key) is not None:
            check_range(prefix + key, values[key], low=0.0, low_open=True)


@dataclass
class ModelConfig:
    family: str = "llama"  # "llama" (also Mistral, Qwen2) or "gpt2"
    vocab_size: int = 32000
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: 4x hidden (gpt2) or ~8/3x rounded (llama)
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
            if self.family == "gpt2":
                self.intermediate_size = 4 * self.hidden_size
            else:  # SwiGLU: 2/3 of 4x, rounded up to a multiple of 32
                self.intermediate_size = 32 * -(-int(8 * self.hidden_size / 3) // 32)
        if self.family not in ("llama", "gpt2"):
            raise TemperError(f"unknown model family {self.family!r}; expected llama or gpt2")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, given: dict[str, Any], prefix: str = "model_config") -> ModelConfig:
        """This shape with the user's `model_config.*` overrides: keys, types and sizes checked, each
        mistake one line naming `prefix.KEY`."""
        values = check_keys(given, ModelConfig, prefix)
        check_shape(values, prefix + ".")
        try:
            return self.replace(**values)
        except TemperError as e:
            raise TemperError(f"{prefix}: {e}") from None


def _llama(**kw: Any) -> ModelConfig:
    return ModelConfig(family="llama", **kw)


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


# Presets: tiny ones for tests and CPU runs; the real families' shapes so that a config
# can be built on the meta device and counted (see tests/test_models.py).
PRESETS: dict[str, ModelConfig] = {
    # ~0.3M parameters with a 2k vocabulary: tests.
    "llama-tiny": _llama(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, max_seq_len=512, tie_embeddings=True),
    # ~3M / ~14M parameters: CPU training runs and benchmarks.
    "llama-3m": _llama(vocab_size=4096, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2,
                       intermediate_size=512, max_seq_len=512, tie_embeddings=True),
    "llama-14m": _llama(vocab_size=8192, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2,
                        intermediate_size=1024, max_seq_len=1024, tie_embeddings=True),
    "gpt2-tiny": _gpt2(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=512,
                       bos_token_id=None, eos_token_id=None),
    # The real families' shapes.
    "gpt2": _gpt2(hidden_size=768, num_layers=12, num_heads=12),
    "gpt2-medium": _gpt2(hidden_size=1024, num_layers=24, num_heads=16),
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


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A copy of a named preset, with fields changed."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TemperError(
            f"unknown model preset {name!r}{hint}; presets: {', '.join(PRESETS)}; "
            "or give a model directory"
        )
    return PRESETS[name].replace(**overrides)
