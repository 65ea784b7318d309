"""Fold a LoRA / DoRA adapter into its base model's weights: a plain model directory with
zero inference overhead.

    temper merge model=runs/pretrain adapter=runs/sft-lora output_dir=runs/merged

An adapter trained on a 4-bit (QLoRA) base is merged into that same NF4 base, dequantised
first: the merged weights are dequant(NF4(W)) + BA, what the adapter was trained against,
and the command says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from temper.config import opt
from temper.errors import TemperError


@dataclass
class Config:
    model: str = opt("", "the base model directory (default: the adapter's base_model_name_or_path)")
    adapter: str = opt("", "the adapter directory (adapter_config.json + adapter_model.safetensors)")
    output_dir: str = opt("runs/merged", "where the merged model directory is written")
    quantize_base: bool | None = opt(None, "merge into an NF4-quantised base (default: when the adapter was trained on one)")

    def validate(self) -> None:
        if not self.adapter:
            raise TemperError("adapter= is required: the adapter directory to merge")


def run(cfg: Config) -> None:
    import warnings

    from temper.data.tokenizer import Tokenizer
    from temper.lineage import read_lineage, write_lineage
    from temper.models import load_model, save_model
    from temper.peft import LORA_FAMILY, load_peft, read_adapter_config, read_temper_peft
    from temper.peft.lora import merge_lora

    adapter_cfg = read_adapter_config(cfg.adapter)
    trained = read_temper_peft(cfg.adapter)
    method = trained.method if trained else ("dora" if adapter_cfg.get("use_dora") else "lora")
    if method not in LORA_FAMILY:
        raise TemperError(f"{cfg.adapter}: a {method} adapter adds layers or tokens and cannot be merged into weights")
    base = cfg.model or adapter_cfg.get("base_model_name_or_path") or ""
    if not base:
        raise TemperError(f"{cfg.adapter}: no base model recorded; pass model=DIR")
    model = load_model(base)
    load_peft(model, cfg.adapter, quantize=cfg.quantize_base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_lora(model)
        from temper.quant.nf4 import dequantize_model

        if dequantize_model(merged):  # the 4-bit layers LoRA did not touch
            warnings.warn("the NF4 base layers without LoRA are dequantised to full precision too", stacklevel=1)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    tok_dir = Path(cfg.adapter) if (Path(cfg.adapter) / "tokenizer.json").is_file() else Path(base)
    tokenizer = Tokenizer.from_dir(tok_dir) if (tok_dir / "tokenizer.json").is_file() else None
    save_model(merged, cfg.output_dir, tokenizer=tokenizer)
    lineage = read_lineage(cfg.adapter) or read_lineage(base)
    write_lineage(cfg.output_dir, {**lineage, "stage": "merge", "parent": str(cfg.adapter), "base": str(base),
                                   "peft": "none"})
    print(f"merged {cfg.adapter} into {base} -> {cfg.output_dir}")
