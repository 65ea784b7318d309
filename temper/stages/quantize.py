"""Quantise a model's weights for inference: a directory that generate, chat, eval and serve load.

    temper quantize model=runs/pretrain method=int8 output_dir=runs/int8
    temper quantize model=runs/pretrain method=int4 group_size=128 output_dir=runs/int4
    temper quantize model=runs/pretrain method=gptq calibration=data/text.txt act_order=true output_dir=runs/gptq
    temper quantize model=runs/pretrain method=nf4 output_dir=runs/nf4

Methods (weight-only; the embeddings, norms and output layer stay in full precision):
- int8: per-output-channel absmax, 8 bits (+ one fp32 scale per row);
- int4: group-wise round-to-nearest, asymmetric with zero-points (4 bits + 40 bits per group);
- gptq: the int4 format, the codes chosen by GPTQ from calibration text (temper.quant.gptq);
- nf4: QLoRA's 4-bit NormalFloat (temper.quant.nf4), blocks of 64 with double quantisation.

Calibration (gptq only): `calibration=` text files (.txt / .jsonl / .parquet, `calibration_field`
of JSON rows); without it, the built-in world's pretraining corpus (seed 0), which is what a
model trained with `temper pretrain` on the world saw. The texts are tokenised and joined with
EOS, and `nsamples` windows of `seq_len` tokens are drawn at random (`seed`), GPTQ's protocol.

The output directory holds config.json (with a `quantization_config` section), model.safetensors,
the tokenizer files and temper.json; it is written to a temporary directory inside
`output_dir` and moved in, config.json last.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from temper.config import check_range, opt
from temper.data.readers import SUPPORTED_SUFFIXES, expand_paths, iter_texts
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError, TemperFileNotFoundError
from temper.io import owned_output_dir, publish_model_files, weights_bytes
from temper.lineage import read_lineage, write_lineage
from temper.models import load_model
from temper.quant.checkpoint import save_quantized
from temper.quant.model import METHODS, QuantSpec, quantize_decoder
from temper.runtime import resolve_device


@dataclass
class Config:
    model: str = opt("", "the full-precision model directory to quantise")
    method: str = opt("int4", "int8 | int4 (round-to-nearest) | gptq | nf4")
    output_dir: str = opt("runs/quantized", "where the quantised model directory is written")
    group_size: int = opt(128, "int4 / gptq: input columns per scale and zero-point (must divide every in_features)")
    act_order: bool = opt(False, "gptq: quantise columns in order of decreasing Hessian diagonal (desc_act)")
    percdamp: float = opt(0.01, "gptq: dampening added to the Hessian diagonal, as a fraction of its mean "
                                "(raised tenfold and retried where the Cholesky fails)")
    block_size: int = opt(128, "gptq: columns per lazy-update block")
    calibration: list[str] = opt([], f"gptq: calibration text files ({', '.join(SUPPORTED_SUFFIXES)}); default: the "
                                     "built-in world's pretraining corpus")
    calibration_field: str = opt("text", "the field of calibration JSON rows that holds the text")
    nsamples: int = opt(128, "gptq: calibration windows")
    seq_len: int = opt(512, "gptq: tokens per calibration window (cut to the model's context)")
    nf4_block_size: int = opt(64, "nf4: values per absmax block")
    double_quant: bool = opt(True, "nf4: quantise the block scales to 8 bits too")
    seed: int = opt(0, "seed of the calibration windows")
    device: str = opt("auto", "where GPTQ runs: auto, cpu, cuda, cuda:N or mps")
    overwrite: bool = opt(False, "replace a model that another command wrote in output_dir")

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: the model directory to quantise")
        if self.method not in METHODS:
            import difflib
            close = difflib.get_close_matches(self.method, METHODS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TemperError(f"method={self.method!r} is not a quantisation method{hint}; expected one of "
                              f"{', '.join(METHODS)}")
        check_range("group_size", self.group_size, low=2)
        if self.group_size % 2:
            raise TemperError(f"group_size must be even (two 4-bit codes per byte), got {self.group_size}")
        check_range("percdamp", self.percdamp, low=0)
        check_range("block_size", self.block_size, low=1)
        check_range("nsamples", self.nsamples, low=1)
        check_range("seq_len", self.seq_len, low=2)
        check_range("nf4_block_size", self.nf4_block_size, low=2)
        if self.nf4_block_size % 2:
            raise TemperError(f"nf4_block_size must be even, got {self.nf4_block_size}")
        if self.calibration and self.method != "gptq":
            print(f"note: calibration= is read by method=gptq only; {self.method} ignores it", file=sys.stderr)


def calibration_texts(cfg: Config) -> tuple[list[str], str]:
    """(texts, where they came from)."""
    if cfg.calibration:
        files = expand_paths(cfg.calibration, what="calibration")  # a missing file is named as calibration's
        return list(iter_texts(files, field=cfg.calibration_field)), ", ".join(cfg.calibration)
    from temper.data.world import WorldConfig, build_world
    return [row["text"] for row in build_world(WorldConfig()).splits["pretrain/train"]], "the built-in world corpus"


def calibration_windows(texts: list[str], tokenizer: Tokenizer, nsamples: int, seq_len: int,
                        seed: int, source: str = "the calibration text") -> list[torch.Tensor]:
    """`nsamples` random windows (1, seq_len) of the texts' tokens joined with EOS (fewer tokens: one window)."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_eos=tokenizer.eos_id is not None)
        if len(stream) > 64 * nsamples * seq_len:  # plenty to draw from
            break
    if len(stream) < 2:
        raise TemperError(f"calibration={source}: the text holds {len(stream)} tokens; GPTQ needs at least 2 "
                          "(give a file with text in it)")
    if len(stream) <= seq_len:
        return [torch.tensor([stream])]
    rng = random.Random(seed)
    starts = [rng.randrange(len(stream) - seq_len + 1) for _ in range(nsamples)]
    return [torch.tensor([stream[s:s + seq_len]]) for s in starts]


def run(cfg: Config) -> dict:
    src = Path(cfg.model).expanduser()
    if not src.is_dir():
        raise TemperFileNotFoundError(f"model= directory not found: {src}")
    out = Path(cfg.output_dir).expanduser()
    device = resolve_device(cfg.device)
    # fp32 on every device: GPTQ's calibration forward and Hessians want it; the layers that stay in full
    # precision (embeddings, norms, output layer) are stored in fp32 too
    model = load_model(src, device=device if cfg.method == "gptq" else "cpu", dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_dir(src) if (src / "tokenizer.json").is_file() else None
    spec = QuantSpec(method=cfg.method, group_size=cfg.group_size, act_order=cfg.act_order, percdamp=cfg.percdamp,
                     block_size=cfg.block_size, nf4_block_size=cfg.nf4_block_size, double_quant=cfg.double_quant)
    calibration, source = [], ""
    if cfg.method == "gptq":
        if tokenizer is None:
            raise TemperError(f"{src}: no tokenizer.json; GPTQ tokenises its calibration text with the model's")
        texts, source = calibration_texts(cfg)
        seq_len = min(cfg.seq_len, model.config.max_seq_len)
        calibration = [w.to(device) for w in calibration_windows(texts, tokenizer, cfg.nsamples, seq_len, cfg.seed,
                                                                      source)]
        print(f"calibration: {len(calibration)} windows of {calibration[0].shape[1]} tokens from {source}",
              file=sys.stderr)
    with owned_output_dir(out, command="quantize", inputs={"model": src}, overwrite=cfg.overwrite, writes_model=True):
        spec = quantize_decoder(model, spec, calibration, log=lambda m: print(m, file=sys.stderr))
        lineage = {**read_lineage(src), "stage": "quantize", "parent": str(src), "quantization": spec.method}
        if source:
            lineage["calibration"] = source
        _write(model.cpu(), spec, src, out, tokenizer, lineage)
    return {"model": str(src), "method": spec.method, "layers": len(spec.modules), "output_dir": str(out),
            "bytes_before": weights_bytes(src), "bytes_after": weights_bytes(out)}


def summary_lines(cfg: Config, result: dict) -> list[str]:
    out = result["output_dir"]
    size = (f": weights {result['bytes_before'] / 1e6:.3g} MB -> {result['bytes_after'] / 1e6:.3g} MB"
            if result["bytes_before"] and result["bytes_after"] else "")
    return [f"quantize: {result['model']} ({result['method']}, {result['layers']} linear layers){size} -> {out}",
            f"  next: temper eval model={out} (or temper generate model={out} prompt=...)"]


def _write(model, spec: QuantSpec, src: Path, out: Path, tokenizer: Tokenizer | None, lineage: dict) -> None:
    """Into a temporary directory inside `out`, then moved in, config.json last."""
    tmp = out / f".quantize.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_quantized(model, spec, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        write_lineage(tmp, lineage)
        if (src / "generation_config.json").is_file():  # the source's stop ids (a chat model's end of turn)
            shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
        publish_model_files(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
