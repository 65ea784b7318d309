"""Fold a LoRA / DoRA adapter into its base model's weights: a plain model directory with
zero inference overhead.

    temper merge model=runs/pretrain adapter=runs/sft-lora output_dir=runs/merged

An adapter trained on a 4-bit (QLoRA) base is merged into that same NF4 base, dequantised
first: the merged weights are dequant(NF4(W)) + BA, what the adapter was trained against,
and the command says so.

Nothing the user gave is lost, and a mismatch is refused before any work:
- `output_dir` may not be the base's or the adapter's directory, nor hold a model that
  another command wrote (unless `overwrite=true`); one run at a time owns it.
- The adapter must belong to this base: when `base_model_name_or_path` names another
  directory that exists here, the two must hold the same weights (a copy is fine; a
  different model is refused); LoRA shapes must fit the base's modules; a tokenizer
  saved with the adapter must be the base's.
- The merged model is written to a temporary directory inside `output_dir` and moved into
  place file by file, `config.json` last, so a failure leaves the earlier contents (or
  nothing), never a half-written model.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from temper.config import opt
from temper.data.chat import stop_settings
from temper.data.tokenizer import Tokenizer, tokenizer_difference
from temper.errors import TemperError, TemperFileNotFoundError, TemperWriteError
from temper.io import owned_output_dir, publish_model_files
from temper.lineage import read_lineage, write_lineage
from temper.loading import check_lora_config
from temper.models import load_model, save_model
from temper.models.hf import check_weights_file
from temper.peft import LORA_FAMILY, adapter_method, load_peft, read_adapter_config
from temper.peft.lora import merge_lora
from temper.quant.nf4 import dequantize_model


@dataclass
class Config:
    model: str = opt("", "the base model directory (default: the adapter's base_model_name_or_path)")
    adapter: str = opt("", "the adapter directory (adapter_config.json + adapter_model.safetensors)")
    output_dir: str = opt("runs/merged", "where the merged model directory is written")
    quantize_base: bool | None = opt(None, "merge into an NF4-quantised base (default: when the adapter was trained on one)")
    overwrite: bool = opt(False, "replace a model that another command wrote in output_dir")

    def validate(self) -> None:
        if not self.adapter:
            raise TemperError("adapter= is required: the adapter directory to merge")


def run(cfg: Config) -> dict:
    adapter = Path(cfg.adapter).expanduser()
    if not adapter.is_dir():
        raise TemperFileNotFoundError(f"adapter= directory not found: {adapter}")
    adapter_cfg = read_adapter_config(adapter)
    check_lora_config(adapter, adapter_cfg)
    method = adapter_method(adapter, adapter_cfg)
    if method not in LORA_FAMILY:
        raise TemperError(f"{adapter}: a {method} adapter adds layers or tokens and cannot be merged into weights")
    recorded = adapter_cfg.get("base_model_name_or_path") or ""
    base = Path(cfg.model or recorded).expanduser()
    if not cfg.model:
        if not recorded:
            raise TemperError(f"{adapter}/adapter_config.json: no base_model_name_or_path recorded; pass model=DIR")
        if not base.is_dir():
            raise TemperFileNotFoundError(f"{adapter}/adapter_config.json: the base model {recorded!r} is not a "
                                          "directory here; pass model=DIR")
    elif not base.is_dir():
        raise TemperFileNotFoundError(f"model= directory not found: {base}")
    check_same_base(adapter, recorded, base)
    check_same_tokenizer(adapter, base)
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        check_weights_file(weights)
    out = Path(cfg.output_dir).expanduser()
    # never an input's directory; a model another command wrote only with overwrite=true; a failure
    # leaves no new, empty directory behind
    with owned_output_dir(out, command="merge", inputs={"model": base, "adapter": adapter}, overwrite=cfg.overwrite,
                          writes_model=True):
        model = load_model(base)
        load_peft(model, adapter, quantize=cfg.quantize_base)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = merge_lora(model)
            if dequantize_model(merged):  # the 4-bit layers LoRA did not touch
                warnings.warn("the NF4 base layers without LoRA are dequantised to full precision too", stacklevel=1)
        for w in caught:
            print(f"note: {w.message}", file=sys.stderr)
        tok_dir = adapter if (adapter / "tokenizer.json").is_file() else base
        tokenizer = Tokenizer.from_dir(tok_dir) if (tok_dir / "tokenizer.json").is_file() else None
        lineage = read_lineage(adapter) or read_lineage(base)
        write_model_atomically(merged, out, tokenizer, {**lineage, "stage": "merge", "parent": str(adapter),
                                                        "base": str(base), "peft": "none"})
    return {"adapter": str(adapter), "model": str(base), "method": method, "output_dir": str(out)}


def summary_lines(cfg: Config, result: dict) -> list[str]:
    out = result["output_dir"]
    return [f"merge: the {result['method']} adapter {result['adapter']} folded into {result['model']} -> {out}",
            f"  next: temper eval model={out} (or temper quantize model={out}, temper serve model={out})"]


def check_same_base(adapter: Path, recorded: str, base: Path) -> None:
    """Refuse a base other than the one the adapter was trained on, when that one is here to compare.

    A recorded base that does not exist here (trained on another machine, or a hub name) is
    not compared; the shape and tokenizer checks still apply. A copy of the recorded base
    (same config.json, byte-identical weights) is accepted."""
    if not recorded:
        return
    trained_on = Path(recorded).expanduser()
    if not trained_on.is_dir() or trained_on.resolve() == base.resolve():
        return
    if _same_model(trained_on, base):
        return
    raise TemperError(f"{adapter}/adapter_config.json: the adapter was trained on {recorded} "
                      f"(base_model_name_or_path), but model={base} is a different model (its config or weights "
                      f"differ): pass model={recorded}, or leave model= out")


def _same_model(a: Path, b: Path) -> bool:
    """Same config.json and byte-identical weight files (a copied model directory)."""
    def config(d: Path):
        try:
            return json.loads((d / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    if config(a) is None or config(a) != config(b):
        return False
    names = sorted(p.name for p in a.glob("model*.safetensors"))
    if not names or names != sorted(p.name for p in b.glob("model*.safetensors")):
        return False
    return all((a / n).stat().st_size == (b / n).stat().st_size for n in names) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def check_same_tokenizer(adapter: Path, base: Path) -> None:
    """An adapter directory's tokenizer.json must be the base's: the ids the adapter was trained on."""
    a, b = adapter / "tokenizer.json", base / "tokenizer.json"
    if not (a.is_file() and b.is_file()):
        return
    difference = tokenizer_difference(a, b, ("the adapter's", "the base's"))
    if difference:
        raise TemperError(f"{a} differs from the base's {b}: {difference} (was the adapter trained on another "
                          "base model?)")


def write_model_atomically(model, out: Path, tokenizer, lineage: dict) -> None:
    """Save into a temporary directory inside `out`, then move the files in, `config.json` last
    (it is what makes a directory a model), dropping weight shards of an earlier model there."""
    tmp = out / f".merge.tmp-{os.getpid()}"  # the name a later claim of `out` cleans up after a kill
    shutil.rmtree(tmp, ignore_errors=True)
    eos_ids = None
    if tokenizer is not None and lineage.get("chat_template_trained"):  # stop where the tuned model ends a turn
        eos_ids = stop_settings(tokenizer, lineage["chat_template_trained"])[1]
    try:
        try:
            save_model(model, tmp, tokenizer=tokenizer, eos_ids=eos_ids)
            write_lineage(tmp, lineage)
        except TemperWriteError as e:  # name the output, not the temporary folder
            raise TemperWriteError(f"{out}: could not write the merged model ({e.strerror}); what was there is "
                                   "unchanged", e.errno, e.strerror) from None
        publish_model_files(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
