"""What one model family is: the single object each family folder exports as `FAMILY`.

A family folder (`temper/models/llama/`, `gpt2/`, `bert/`) holds the model (`model.py`), its
Hugging Face state-dict names and config.json mapping (`hf.py`) and its presets; its
`__init__.py` puts them together with the facts the rest of temper needs into one `Family`.
`temper/models/registry.py` lists the families; every other module asks the registry (by
`ModelConfig.family` or by a config.json architecture), never a family's name.

This module sits below the family folders: it imports nothing of theirs, nor the registry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from temper.errors import TemperError
from temper.models.config import ModelConfig

# ----------------------------------------------------------------------------- state-dict names


@dataclass(frozen=True)
class StateDictAdapter:
    """Renames between temper's parameter names and a family's HF names, both ways."""

    rules: tuple[tuple[str, str], ...]  # (temper regex with {i}, hf template with {i})
    transposed: tuple[str, ...] = ()  # temper names (regex) whose HF weight is transposed (Conv1D)
    ignored_hf: tuple[str, ...] = ()  # HF buffers that carry no weights
    normalise_hf: Callable[[str], str] = staticmethod(lambda k: k)

    def _convert(self, name: str, to_hf: bool) -> str:
        for temper_pat, hf_pat in self.rules:
            src, dst = (temper_pat, hf_pat) if to_hf else (hf_pat, temper_pat)
            m = re.fullmatch(re.escape(src).replace(r"\{i\}", r"(\d+)").replace(r"\{p\}", r"(\w+)"), name)
            if m:
                out = dst
                for g in m.groups():
                    out = re.sub(r"\{[ip]\}", g, out, count=1)
                return out
        return ""

    def to_hf(self, name: str) -> str:
        hf = self._convert(name, True)
        assert hf, f"no HF name for temper parameter {name}"
        return hf

    def from_hf(self, name: str) -> str | None:
        """temper name for an HF tensor name, '' when it is an ignored buffer, None if unknown."""
        name = self.normalise_hf(name)
        if any(re.fullmatch(p, name) for p in self.ignored_hf):
            return ""
        return self._convert(name, False) or None

    def is_transposed(self, temper_name: str) -> bool:
        return any(re.fullmatch(p, temper_name) for p in self.transposed)


# ----------------------------------------------------------------------------- what the planner reads


@dataclass(frozen=True)
class BlockLayout:
    """One block's linears and kinds, by the family's module names: what the memory planner
    (`temper/train/memory.py`), LoRA target lists and FLOP counts read instead of a family's name.

    `attention_in`: the linears that read the attention's input (one fused q/k/v, or q, k, v);
    `mlp_in`: one (GELU) or two (SwiGLU: gate, up) linears; a gated MLP keeps three (B, T, I)
    tensors for its backward pass (gate, silu(gate), up) where a GELU MLP keeps one.
    """

    attention_in: tuple[str, ...]
    attention_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    norm: str  # "rms" (RMSNorm: weight only, fp32 inside) or "layer" (LayerNorm: weight and bias)
    positions: str  # "rotary" (cos/sin buffers, max_seq_len x head_dim each) or "learned" (an embedding)
    norms_per_block: int = 2
    extra_parameters: Callable[[ModelConfig], int] = staticmethod(lambda c: 0)  # replicated, outside the blocks

    def __post_init__(self) -> None:
        assert self.norm in ("rms", "layer") and self.positions in ("rotary", "learned")
        assert len(self.attention_in) in (1, 3) and len(self.mlp_in) in (1, 2)

    @property
    def gated_mlp(self) -> bool:
        return len(self.mlp_in) == 2

    @property
    def norm_bias(self) -> bool:
        return self.norm == "layer"

    def block_linears(self, c: ModelConfig) -> list[tuple[str, int, int, bool]]:
        """(name within a block, in_features, out_features, has bias) of every linear of one block."""
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        h, inter = c.hidden_size, c.intermediate_size
        if len(self.attention_in) == 1:
            attention = [(self.attention_in[0], h, q + 2 * kv, c.qkv_bias)]
        else:
            attention = [(name, h, width, c.qkv_bias) for name, width in zip(self.attention_in, (q, kv, kv))]
        return [*attention, (self.attention_out, q, h, c.attn_out_bias),
                *[(name, h, inter, c.mlp_bias) for name in self.mlp_in], (self.mlp_out, inter, h, c.mlp_bias)]


@dataclass(frozen=True)
class TensorParallelPlan:
    """Megatron's layout of one block, by module names within the block: column-wise linears
    (each rank holds a slice of the heads or hidden units), row-wise ones (partial sums,
    all-reduced) and replicated modules (norms)."""

    column_wise: tuple[str, ...]
    row_wise: tuple[str, ...]
    replicated: tuple[str, ...]


@dataclass(frozen=True)
class GGUFExport:
    """How a family goes out as GGUF, the file llama.cpp reads (`temper export format=gguf`; the
    family's `gguf.py`): llama.cpp's architecture name for a config, (GGUF name, tensor) for a
    state dict (renamed, permuted where llama.cpp's layout differs), and the hyper-parameters
    written through a `gguf.GGUFWriter` (with `gguf.RopeScalingType` handed in)."""

    architecture: Callable[[ModelConfig], str]
    tensors: Callable[[dict[str, Any], ModelConfig], Iterator[tuple[str, Any]]]
    write_hparams: Callable[[Any, ModelConfig, Any], None]


def attention_flops(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of attention's two (T x T) products, forward and backward:
    12 x layers x heads x head_dim x seq_len (PaLM, appendix B; not halved for a causal mask)."""
    return 12 * c.num_layers * c.num_heads * c.head_dim * seq_len


# ----------------------------------------------------------------------------- the family


@dataclass(frozen=True)
class Family:
    """Everything temper knows of one model family, in one place.

    name: `ModelConfig.family`; description: who it covers, for messages ("Llama, Mistral, Qwen2");
    model: the module class, built as model(config);
    adapter: temper parameter names <-> HF tensor names;
    architectures: the HF `architectures` names it reads -> their `model_type`; the first is the default;
    config_from_hf(hf dict, architecture, source) -> ModelConfig, and config_to_hf(config) -> dict:
      its config.json, read and written;
    reward_architectures: HF *ForSequenceClassification name -> the causal-LM architecture of its body
      (reward models; empty for a family without them);
    presets: name -> ModelConfig;
    layout: what the memory planner and LoRA targets read of a block (None: the planner refuses it);
    tensor_parallel: its plan, or the reason it has none;
    residual_outputs: name endings of the linears that write into the residual stream (their
      initial weights are scaled by 1/sqrt(2 x layers), GPT-2's rule; () for no scaling);
    causal_lm: a decoder that generates text (an encoder is refused by generate, chat and the pipeline);
    dropout: the model honours ModelConfig.dropout / attention_dropout (others refuse them);
    attention_flops(config, seq_len): the attention term of the training FLOPs per token;
    adapters: HF architecture -> its names where they differ from `adapter` (ELECTRA's prefix);
    gguf: how it goes out as GGUF for llama.cpp (None: `temper export format=gguf` refuses it).
    """

    name: str
    description: str
    model: type[nn.Module]
    adapter: StateDictAdapter
    architectures: dict[str, str]
    config_from_hf: Callable[[dict[str, Any], str, str], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    presets: dict[str, ModelConfig] = field(default_factory=dict)
    reward_architectures: dict[str, str] = field(default_factory=dict)
    layout: BlockLayout | None = None
    tensor_parallel: TensorParallelPlan | str = "no tensor-parallel plan"
    residual_outputs: tuple[str, ...] = ()
    causal_lm: bool = True
    dropout: bool = False
    attention_flops: Callable[[ModelConfig, int], float] = attention_flops
    adapters: dict[str, StateDictAdapter] = field(default_factory=dict)
    gguf: GGUFExport | None = None

    def __post_init__(self) -> None:
        assert self.architectures, f"family {self.name}: at least one HF architecture"
        for preset_name, config in self.presets.items():
            assert config.family == self.name, f"preset {preset_name} is not of family {self.name}"

    def adapter_for(self, config: ModelConfig) -> StateDictAdapter:
        """The names of `config`'s architecture."""
        return self.adapters.get(config.hf_architecture, self.adapter)

    def check(self, config: ModelConfig) -> None:
        """One line for a setting this family's model would ignore."""
        if not self.dropout and (config.dropout or config.attention_dropout):
            raise TemperError(f"the {self.name} family's model has no dropout: dropout and attention_dropout must "
                              f"be 0 (got {config.dropout:g} and {config.attention_dropout:g})")

    def require_architecture(self, config: ModelConfig, architecture: str, what: str) -> None:
        """One line when `what` (a recipe's model) is of a family without `architecture` (an encoder
        recipe given a decoder)."""
        if architecture not in self.architectures:
            raise TemperError(f"{what} is a {self.description} model ({config.hf_architecture}), a family without "
                              f"{architecture}: this command trains encoders (an encoder preset such as bert-tiny, "
                              "or an encoder directory)")

    def require_causal_lm(self, config: ModelConfig, what: str) -> None:
        """One line when `what` (a recipe's model) is an encoder where a causal LM is trained."""
        if not self.causal_lm:
            raise TemperError(f"{what} is a {self.description} encoder ({config.hf_architecture}: bidirectional "
                              "attention, no next-token head); this recipe trains causal language models")

    @property
    def model_types(self) -> dict[str, str]:
        """config.json `model_type` -> the first architecture of that type (a config.json without
        `architectures`)."""
        out: dict[str, str] = {}
        for arch, model_type in self.architectures.items():
            out.setdefault(model_type, arch)
        return out


def config_or_error(source: str, **fields: Any) -> ModelConfig:
    """A ModelConfig from config.json's values; a bad one is one line naming the file."""
    try:
        return ModelConfig(**fields)
    except TemperError as e:
        raise TemperError(f"{source}: {e}") from None
