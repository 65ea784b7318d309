"""Parameter-efficient fine-tuning, applied to a model from outside.

`apply_peft(model, cfg, tokenizer)` freezes the base and adds the trainable parameters of
one method: LoRA / DoRA (`temper/peft/lora.py`), QLoRA (the base quantised to NF4 by
`temper/quant/nf4.py`, LoRA on top), bottleneck adapters, prefix tuning and prompt tuning
(`temper/peft/adapters.py`). `save_peft` writes only what was trained: LoRA-family adapters
in the PEFT format (`adapter_config.json` + `adapter_model.safetensors`, loadable by
`peft.PeftModel.from_pretrained` on the Hugging Face export of the base); the other
methods in the same two files with temper's parameter names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from temper.config import PeftConfig, from_dict, to_dict
from temper.errors import TemperError
from temper.io import atomic_write_text, write_safetensors
from temper.peft import adapters
from temper.peft.io import load_adapter, save_adapter
from temper.peft.lora import inject_lora, mark_trainable
from temper.quant.nf4 import quantize_model

LORA_FAMILY = ("lora", "dora", "qlora")
TEMPER_PEFT_FILE = "temper_peft.json"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) unique parameters; quantised buffers count by their element count."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def apply_peft(model: torch.nn.Module, cfg: PeftConfig, tokenizer=None) -> dict[str, Any]:
    """Freeze the base, add the method's parameters; returns counts and what was done."""
    info: dict[str, Any] = {"method": cfg.method}
    if cfg.method == "none":
        info["trainable"], info["total"] = count_parameters(model)
        return info
    _, base_total = count_parameters(model)
    base_ids = {id(p) for p in model.parameters()}
    if cfg.method in LORA_FAMILY:
        if cfg.method == "qlora":
            info["quantized_linears"] = quantize_model(model, block_size=cfg.quant_block_size,
                                                       double_quant=cfg.double_quant)
        info["modules"] = inject_lora(model, cfg)
        mark_trainable(model)
        head = getattr(model, "lm_head", None)
        if cfg.dropout > 0 and head is not None and any(model.get_submodule(n) is head for n in info["modules"]):
            # training computes the output layer fused, from its effective weight: no dropout there
            raise TemperError(f"peft.dropout={cfg.dropout:g} cannot apply to lm_head, whose loss is computed "
                              "fused from the adapted weight: set peft.dropout=0 or take lm_head out of "
                              "peft.target_modules")
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.method == "adapter":
            adapters.inject_bottleneck_adapters(model, cfg.adapter_dim)
        elif cfg.method == "prefix":
            adapters.inject_prefix_tuning(model, cfg.num_virtual_tokens, projection=cfg.prefix_projection,
                                          hidden=cfg.prefix_hidden)
        else:  # prompt
            init_ids = None
            if cfg.prompt_init_text:
                if tokenizer is None:
                    raise TemperError("peft.prompt_init_text needs the model's tokenizer")
                init_ids = tokenizer.encode(cfg.prompt_init_text)
                if not init_ids:
                    raise TemperError("peft.prompt_init_text encodes to no tokens")
            adapters.inject_prompt_tuning(model, cfg.num_virtual_tokens, init_ids=init_ids)
        for p in model.parameters():  # what the injection added is what trains
            if id(p) not in base_ids:
                p.requires_grad_(True)
    info["trainable"], _ = count_parameters(model)
    # the base as it was (a 4-bit base holds its weights in buffers) plus what was added
    added = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in base_ids)
    info["total"] = base_total + added
    info["base_parameters"] = base_total
    if info["trainable"] == 0:
        raise TemperError(f"peft.method={cfg.method} left nothing to train")
    return info


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_peft(model: torch.nn.Module, out_dir: str | Path, cfg: PeftConfig, *, base_model: str) -> Path:
    """Write the trained parameters only (the base stays where it is)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.method in LORA_FAMILY:
        save_adapter(model, out, cfg, base_model_name_or_path=str(base_model))
    else:
        tensors = {n: t.contiguous().cpu() for n, t in trainable_state_dict(model).items()}
        write_safetensors(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {"peft_type": {"adapter": "BOTTLENECK_ADAPTER", "prefix": "PREFIX_TUNING",
                                "prompt": "PROMPT_TUNING"}[cfg.method],
                  "base_model_name_or_path": str(base_model)}
        atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    # temper's own record of the method (beside PEFT's config, which must stay PEFT's)
    atomic_write_text(out / TEMPER_PEFT_FILE, json.dumps(to_dict(cfg), indent=2) + "\n")
    return out


def read_temper_peft(adapter_dir: str | Path) -> PeftConfig | None:
    """The PeftConfig temper trained with, if the adapter was written by temper."""
    path = Path(adapter_dir) / TEMPER_PEFT_FILE
    if not path.is_file():
        return None
    return from_dict(PeftConfig, json.loads(path.read_text()), source=str(path), check_modes=False)  # temper wrote it


def adapter_method(adapter_dir: str | Path, adapter_config: dict[str, Any]) -> str:
    """The PEFT method of an adapter directory: the one temper trained with, else lora or dora from
    its adapter_config.json (a PEFT-written adapter)."""
    trained = read_temper_peft(adapter_dir)
    return trained.method if trained else ("dora" if adapter_config.get("use_dora") else "lora")


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise TemperError(f"{adapter_dir}: no adapter_config.json; not an adapter directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TemperError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def load_peft(model: torch.nn.Module, adapter_dir: str | Path, *, tokenizer=None, quantize: bool | None = None,
              adapter_name: str = "default") -> PeftConfig:
    """Put a saved adapter onto `model` (a LoRA from peft or temper; or temper's other methods).

    `quantize=None` quantises the base to NF4 exactly when the adapter was trained on a 4-bit base."""
    config = read_adapter_config(adapter_dir)
    cfg = read_temper_peft(adapter_dir)
    method = cfg.method if cfg else ("dora" if config.get("use_dora") else "lora")
    if method in LORA_FAMILY:
        if quantize if quantize is not None else method == "qlora":
            quantize_model(model, block_size=cfg.quant_block_size if cfg else 64,
                           double_quant=cfg.double_quant if cfg else True)
        return load_adapter(model, adapter_dir, adapter_name=adapter_name)
    apply_peft(model, cfg, tokenizer)
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    missing = [n for n in trainable_state_dict(model) if n not in weights]
    if missing:
        raise TemperError(f"{adapter_dir}: adapter lacks {missing[0]} for this model")
    model.load_state_dict(weights, strict=False)
    return cfg
