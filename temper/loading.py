"""Loading for inference, above `models/` and `peft/`: a model directory, or an adapter
directory whose base is loaded and the adapter put on top. Every command that generates or
scores (generate, chat, eval, judges, online rounds) loads through `load_for_inference`.

    model, tokenizer = load_for_inference("model_or_adapter_dir", device="cpu")
"""

from __future__ import annotations

from pathlib import Path

import torch

from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.models import DecoderBase, load_model
from temper.models.generate import check_generates
from temper.models.hf import check_weights_file, read_hf_config
from temper.peft import load_peft, read_adapter_config
from temper.quant.checkpoint import is_quantized, load_quantized


def load_model_or_adapter(path: str | Path, *, device: torch.device | str = "cpu",
                          dtype: str | torch.dtype | None = None) -> DecoderBase:
    """A model directory, or an adapter directory (its base loaded from `base_model_name_or_path`,
    the adapter put on top), ready for generation."""
    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        adapter_config = read_adapter_config(path)
        check_lora_config(path, adapter_config)
        base = adapter_config.get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise TemperError(f"{path}: the adapter's base model {base!r} is not a directory here")
        weights = path / "adapter_model.safetensors"
        if weights.is_file():
            check_weights_file(weights)
        if _quantized_dir(Path(base)):
            raise TemperError(f"{path}: the adapter's base {base} is a quantised model directory; put the adapter "
                              "on the full-precision base (or merge it there first, then quantise)")
        model = load_model(base, device=device, dtype=dtype)
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_dir(path)
        load_peft(model, path, tokenizer=tokenizer)
        return model.to(device)
    if _quantized_dir(path):  # written by `temper quantize`: quantised linears built in at load
        return load_quantized(path, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=dtype)


def _quantized_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return is_quantized(read_hf_config(path))


def check_lora_config(adapter_dir: str | Path, conf: dict) -> None:
    """The keys of a LoRA adapter_config.json that loading reads without a default, checked first."""
    if conf.get("peft_type") != "LORA":
        return
    r = conf.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise TemperError(f"{Path(adapter_dir) / 'adapter_config.json'}: r is {r!r} (expected a positive integer, "
                          "the LoRA rank)")
    alpha = conf.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TemperError(f"{Path(adapter_dir) / 'adapter_config.json'}: lora_alpha is {alpha!r} (expected a number)")


def load_for_inference(path: str | Path, *, device: torch.device | str = "cpu",
                       dtype: str | torch.dtype | None = None):
    """(model in eval mode, its tokenizer) from a model or adapter directory, checked to fit."""
    model = load_model_or_adapter(path, device=device, dtype=dtype).eval()
    check_generates(model)  # what loads here generates or scores text as a causal LM
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TemperError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size} embeddings")
    return model, tokenizer
