"""Model families, presets and Hugging Face model directories.

    model = build_model(preset("llama-tiny"))          # random weights
    model = load_model("path/to/hf_dir")               # any supported HF directory
    save_model(model, "out_dir", tokenizer=tok)        # an HF directory transformers loads

Reward models (a body + a scalar head, HF's *ForSequenceClassification): temper.models.reward.
A model *or adapter* directory for inference: temper.loading.load_for_inference (above models
and peft).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from temper.errors import TemperError
from temper.models import registry
from temper.models.common import DecoderBase, KVCache
from temper.models.config import ModelConfig
from temper.models.gpt2 import GPT2
from temper.models.hf import (
    config_from_hf,
    load_state_dict_from_hf,
    read_hf_config,
    save_hf_weights,
    tied_names,
    write_generation_config,
    write_hf_config,
)
from temper.models.llama import Llama
from temper.models.registry import PRESETS, FamilyTable, preset

__all__ = [
    "DecoderBase", "KVCache", "ModelConfig", "PRESETS", "preset", "build_model", "load_model",
    "save_model", "resolve_dtype", "init_weights", "Llama", "GPT2",
]

# family name -> model class, a view of temper.models.registry (which lists the families)
FAMILIES: FamilyTable = FamilyTable(lambda f: {f.name: f.model})


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' is fp32 on CPU (fp32 matmuls are the fast path there) and bf16 on a GPU that has it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise TemperError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16")
    return table[dtype]


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, 0.02), the linears that write into the residual stream (the
    family's `residual_outputs`) scaled by 1/sqrt(2 * layers)."""
    residual_std = std / (2 * model.config.num_layers) ** 0.5
    residual_outputs = registry.family(model.config.family).residual_outputs
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            is_residual_out = bool(residual_outputs) and name.endswith(residual_outputs)
            torch.nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_out else std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
    with torch.no_grad():  # an embedding's padding row starts at zero, as transformers inits it (after a tied
        for module in model.modules():  # output layer's draw, which shares the matrix)
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def build_model(config: ModelConfig, *, device: torch.device | str = "cpu",
                dtype: str | torch.dtype | None = None, init: bool = True) -> DecoderBase:
    """A model of `config` with fresh weights (on `device='meta'` nothing is allocated)."""
    family = registry.family(config.family)
    family.check(config)
    with torch.device(device):
        model = family.model(config)
    if init and str(device) != "meta":
        init_weights(model)
    return model.to(resolve_dtype(dtype, device))


def load_model(spec: str | Path, *, device: torch.device | str = "cpu",
               dtype: str | torch.dtype | None = None) -> DecoderBase:
    """Load a Hugging Face / temper model directory; `spec` may also be a preset name (random init)."""
    spec_path = Path(spec)
    if not spec_path.exists() and str(spec) in PRESETS:
        return build_model(preset(str(spec)), device=device, dtype=dtype)
    if not spec_path.exists() and not any(sep in str(spec) for sep in "/\\."):
        close = difflib.get_close_matches(str(spec), list(PRESETS), n=1)
        also = f"did you mean the preset '{close[0]}'?" if close else f"presets: {', '.join(PRESETS)}"
        raise TemperError(f"model directory not found: {spec} (nor is it a preset name; {also})")
    hf = read_hf_config(spec_path)
    if hf.get("quantization_config") is not None:  # temper.loading reads these (temper.quant.checkpoint)
        raise TemperError(f"{spec_path}: config.json has a quantization_config: a quantised model, which only "
                          "generate, chat, eval and serve load (one written by temper quantize); training, "
                          "merging and export need the full-precision model")
    config = config_from_hf(hf, str(spec_path / "config.json"))
    with torch.device("meta"):
        model = registry.family(config.family).model(config)
    state = load_state_dict_from_hf(spec_path, model, config, device="cpu")
    target = resolve_dtype(dtype, device)
    state = {k: v.to(device=device, dtype=target) for k, v in state.items()}
    model.load_state_dict(state, strict=not tied_names(model), assign=True)
    _finish_meta_load(model, device)
    return model


def _finish_meta_load(model: torch.nn.Module, device: torch.device | str) -> None:
    """After `assign=True` loading from meta: re-tie embeddings and rebuild computed buffers."""
    model.tie_weights()
    rope = getattr(model, "rope", None)
    if rope is not None:
        rope._build(model.config.max_seq_len, torch.device(device))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"tensors left on the meta device: {leftover}"


def with_tokenizer_ids(config: ModelConfig, tokenizer) -> ModelConfig:
    """`config` with the tokenizer's BOS / EOS / PAD ids (unchanged without a tokenizer)."""
    if tokenizer is None:
        return config
    return config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def save_model(model: DecoderBase, out_dir: str | Path, *, tokenizer=None,
               max_shard_bytes: int | None = None, eos_ids: list[int] | None = None) -> Path:
    """Write `model` (and its tokenizer) as a Hugging Face model directory; `eos_ids`: every
    id that ends a reply, for `generation_config.json` (a chat model's end-of-turn token too)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = with_tokenizer_ids(model.config, tokenizer)
    save_hf_weights(model, config, out, max_shard_bytes)
    write_hf_config(config, out)
    if registry.family(config.family).causal_lm:
        write_generation_config(config, out, eos_ids)
    if tokenizer is not None:
        tokenizer.save(out)
    return out
