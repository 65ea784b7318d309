"""Pretrain a decoder from scratch with the causal language-modelling objective,
L = -sum_i log P(x_i | x_<i), on your text or (by default) temper's built-in world.

    temper pretrain                                   # the built-in world, a ~2M-parameter Llama
    temper pretrain data=corpus.txt model=llama-14m max_steps=2000 seq_len=512
    temper pretrain resume=auto                       # continue after an interruption
    torchrun --nproc-per-node 8 -m temper pretrain strategy=fsdp global_batch_size=256

Writes `output_dir` as a Hugging Face model directory (config.json, model.safetensors,
tokenizer with chat template) plus metrics.jsonl, config.yaml, samples.jsonl and
checkpoints/.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from temper.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    ScheduleConfig,
    check_keys,
    check_range,
    opt,
)
from temper.errors import TemperError
from temper.train.distributed import ParallelConfig


@dataclass
class Config:
    model: str = opt("llama-3m", "a preset name (random init) or a model directory (continued pretraining)")
    model_config: dict = opt({}, "override preset fields, e.g. model_config.num_layers=6")
    data: list[str] = opt([], "training text: .txt/.jsonl/.parquet files, directories or globs (empty: the built-in world)")
    eval_data: list[str] = opt([], "validation text (empty: eval_fraction of data, or the world's val split)")
    eval_fraction: float = opt(0.05, "share of documents held out for validation when eval_data is empty")
    text_field: str = opt("text", "the JSONL/parquet field that holds the text")
    text_mode: Literal["paragraph", "line", "file"] = opt("paragraph", "how .txt files split into documents")
    encoding_errors: Literal["strict", "replace"] = opt("strict", "non-UTF-8 bytes: stop with the byte offset, or replace")
    world: dict = opt({}, "settings of the built-in world when data is empty, e.g. world.num_people=40")
    tokenizer: str | None = opt(None, "tokenizer directory (default: the model's, else train one on the data)")
    vocab_size: int = opt(2048, "vocabulary size when a tokenizer is trained")
    output_dir: str = opt("runs/pretrain", "where the model directory, metrics and checkpoints go")
    seq_len: int = opt(256, "tokens per training sequence")
    batch_size: int = opt(16, "sequences per micro-batch (per rank)")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    global_batch_size: int = opt(0, "sequences per optimiser step over all ranks (0: batch_size x grad_accum x "
                                    "data-parallel ranks); when set, grad_accum follows from it")
    max_steps: int = opt(500, "optimiser steps")
    seed: int = opt(0, "seed for initialisation, data order and sampling")
    resume: str = opt("", "'' starts fresh; 'auto' continues from the newest valid checkpoint; or a checkpoint path")
    overwrite: bool = opt(False, "start over in an output_dir that holds an earlier run (its checkpoints and metrics go)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "fp32 on CPU and bf16 on GPU by default")
    compile: bool = opt(False, "torch.compile the model")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward to save memory")
    strategy: str = opt("auto", "none (one process), ddp, fsdp, or auto: ddp under torchrun (fsdp with parallel.tp alone), else none")
    parallel: ParallelConfig = opt(ParallelConfig(), "tensor / pipeline parallelism and FSDP options")
    loss_chunk: int = opt(1024, "tokens per chunk of the fused output-layer cross-entropy")
    eval_batches: int = opt(0, "validation batches per evaluation (0: the whole split)")
    samples: int = opt(4, "greedy samples written at the end")
    sample_prompts: list[str] = opt([], "prompts for the samples (default: the opening tokens of validation documents)")
    sample_tokens: int = opt(40, "tokens per sample")
    peak_flops: float = opt(0.0, "the device's peak FLOP/s for MFU (0: measure a matmul now)")
    optim: OptimConfig = opt(OptimConfig(lr=3e-3, weight_decay=0.1), "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig(), "learning-rate schedule")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(every=200), "checkpointing")
    logging: LoggingConfig = opt(LoggingConfig(every=20, eval_every=200), "logging and evaluation")

    def validate(self) -> None:
        check_range("global_batch_size", self.global_batch_size, low=0)
        for key in ("seq_len", "batch_size", "grad_accum", "max_steps"):
            if getattr(self, key) < 1:
                raise TemperError(f"{key} must be at least 1, got {getattr(self, key)}")
        check_range("eval_fraction", self.eval_fraction, low=0.0, high=1.0, high_open=True)
        for key in ("loss_chunk", "vocab_size", "sample_tokens"):
            check_range(key, getattr(self, key), low=1)
        for key in ("eval_batches", "samples", "peak_flops"):
            check_range(key, getattr(self, key), low=0)
        if self.eval_data and not self.data:
            raise TemperError("eval_data is used only with data=; the built-in world brings its own validation "
                              "split (set data= to train on your own text)")
        if self.eval_data and self.eval_fraction != Config.eval_fraction:
            raise TemperError("eval_fraction splits data= only when eval_data is empty; give one of them")
        if self.world and self.data:
            raise TemperError("world.* settings apply to the built-in world, which is not used with data=")


# ----------------------------------------------------------------------------- data and tokenizer


def prepare_data(cfg: Config, out: Path) -> tuple[list[str], list[str] | None, str, dict | None]:
    """(train files, val files or None, text field, world facts or None)."""
    if cfg.data:
        return cfg.data, cfg.eval_data or None, cfg.text_field, None
    from temper.data.world import WorldConfig, build_world, write_world
    from temper.io import atomic_write_text

    check_keys(cfg.world, WorldConfig, "world")
    world_cfg = WorldConfig(**{"seed": cfg.seed, **cfg.world})
    world_cfg.validate()
    world_dir = out / "world"
    stamp = world_dir / "world_config.json"
    wanted = json.dumps(asdict(world_cfg), sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == wanted):  # unchanged files keep the shard cache valid
        write_world(build_world(world_cfg), world_dir)
        atomic_write_text(stamp, wanted)
    facts = json.loads((world_dir / "facts.json").read_text(encoding="utf-8"))
    pretrain_dir = world_dir / "pretrain"
    return [str(pretrain_dir / "train.jsonl")], [str(pretrain_dir / "val.jsonl")], "text", facts


def prepare_tokenizer(cfg: Config, out: Path, train_files: list[str]):
    from temper.data.readers import expand_paths, iter_texts
    from temper.data.shards import files_fingerprint, fingerprint
    from temper.data.tokenizer import Tokenizer, train_tokenizer
    from temper.io import atomic_write_text

    if cfg.tokenizer:
        return Tokenizer.from_dir(cfg.tokenizer)
    if Path(cfg.model).is_dir() and (Path(cfg.model) / "tokenizer.json").is_file():
        return Tokenizer.from_dir(cfg.model)
    tok_dir = out / "tokenizer"
    key = fingerprint([files_fingerprint(expand_paths(train_files)), cfg.vocab_size, cfg.text_field, cfg.text_mode])
    stamp = tok_dir / "fingerprint.txt"
    if stamp.is_file() and stamp.read_text() == key:  # resume: the very same tokenizer
        return Tokenizer.from_dir(tok_dir)
    texts = iter_texts(train_files, field=cfg.text_field, encoding_errors=cfg.encoding_errors, text_mode=cfg.text_mode)
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size, model_max_length=cfg.seq_len)
    tokenizer.save(tok_dir)
    atomic_write_text(stamp, key)
    return tokenizer


def prepare_shards(cfg: Config, out: Path, tokenizer, train_files: list[str], val_files: list[str] | None) -> Path:
    from temper.data.readers import expand_paths, iter_texts
    from temper.data.shards import build_shards, files_fingerprint, fingerprint

    def texts(files):
        return iter_texts(files, field=cfg.text_field, encoding_errors=cfg.encoding_errors, text_mode=cfg.text_mode)

    files = expand_paths(train_files) + (expand_paths(val_files) if val_files else [])
    key = fingerprint([files_fingerprint(files), tokenizer.backend.to_str(), cfg.eval_fraction, cfg.seed,
                       cfg.text_field, cfg.text_mode, val_files is not None])
    return build_shards(texts(train_files), tokenizer, out / "data",
                        val_documents=texts(val_files) if val_files else None,
                        val_fraction=0.0 if val_files else cfg.eval_fraction, seed=cfg.seed, fingerprint_id=key)


def prepare_model(cfg: Config, tokenizer, device, dtype):
    from temper.models import build_model, load_model, preset
    from temper.models.config import ModelConfig

    if Path(cfg.model).is_dir():
        if cfg.model_config:
            raise TemperError(f"model_config.* sets a preset's shape; model={cfg.model} is a directory whose "
                              "config.json fixes it (drop model_config, or name a preset)")
        model = load_model(cfg.model, device=device, dtype=dtype)
    else:
        check_keys(cfg.model_config, ModelConfig, "model_config")
        vocab = 64 * math.ceil(tokenizer.vocab_size / 64)  # a multiple of 64 keeps the matmuls fast
        config = preset(cfg.model, vocab_size=vocab, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id, **cfg.model_config)
        model = build_model(config, device=device, dtype=dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TemperError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size} embeddings")
    if cfg.seq_len > model.config.max_seq_len:
        raise TemperError(
            f"seq_len {cfg.seq_len} is larger than the model's context of {model.config.max_seq_len} positions "
            "(lower seq_len, or for a preset raise model_config.max_seq_len)"
        )
    return model


# ----------------------------------------------------------------------------- the run


def run(cfg: Config) -> dict:
    import torch

    from temper.data.shards import TokenLoader, read_index
    from temper.eval.perplexity import evaluate_batches
    from temper.io import refuse_same_dir
    from temper.lineage import write_lineage
    from temper.losses import causal_lm_loss
    from temper.models import save_model
    from temper.runtime import seed_everything
    from temper.train import engine
    from temper.train.distributed import global_batch as global_batch_size
    from temper.train.distributed import wrap_model
    from temper.train.loop import TrainLoop
    from temper.train.optim import build_optimizer

    if Path(cfg.model).is_dir():  # continued pretraining must not overwrite its starting point
        refuse_same_dir(cfg.output_dir, cfg.model, "model")
    out, device, precision, par = engine.start_run(cfg, cfg.output_dir, cfg.device, cfg.precision, cfg.seed)
    grad_accum, global_batch = global_batch_size(cfg, par.dp)

    # data -> tokenizer -> shards -> model (rank 0 prepares and caches; the other ranks then read)
    def prepare():
        train_files, val_files, text_field, world_facts = prepare_data(cfg, out)
        cfg.text_field = text_field
        tokenizer = prepare_tokenizer(cfg, out, train_files)
        return train_files, val_files, text_field, world_facts, tokenizer, prepare_shards(cfg, out, tokenizer,
                                                                                          train_files, val_files)

    if par.world_size > 1:
        par.agree(lambda: prepare() and None)
    train_files, val_files, cfg.text_field, world_facts, tokenizer, shard_dir = prepare()
    seed_everything(cfg.seed)  # the model's init does not depend on how data preparation went
    model = prepare_model(cfg, tokenizer, device, torch.float32)  # fp32 master weights
    model.train()
    flops = engine.flops_per_token(model, cfg.seq_len)
    core = model
    model = wrap_model(model, par, precision=precision, activation_checkpointing=cfg.activation_checkpointing,
                       compile=cfg.compile, pipeline_microbatches=grad_accum, loss_chunk=cfg.loss_chunk)
    optimizer = build_optimizer(model, cfg.optim)
    loader = TokenLoader(shard_dir, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                         rank=par.dp_rank, world_size=par.dp, grad_accum=grad_accum)
    has_val = _has_split(shard_dir, "val")
    unused = [0] * (core.config.vocab_size - tokenizer.vocab_size)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths() + unused)
    start_token_bytes = torch.tensor(tokenizer.token_byte_lengths(at_start=True) + unused)  # after EOS

    def evaluate(step: int) -> dict:
        if not has_val:
            return {}
        # pipeline stages hold a part each: rank 0 evaluates the gathered model (the others go on)
        scored = loop.export_model() if par.pipeline is not None else model
        if scored is None:
            return {}
        val = TokenLoader(shard_dir, "val", seq_len=cfg.seq_len, batch_size=cfg.batch_size, shuffle=False,
                          drop_last=False)
        return evaluate_batches(scored, val, device=device, autocast=loop.autocast, token_bytes=token_bytes,
                                start_token_bytes=start_token_bytes, eos_id=tokenizer.eos_id,
                                max_batches=cfg.eval_batches)

    def lm_loss(batch):  # (summed next-token NLL, number of target tokens)
        inputs, targets = batch
        return causal_lm_loss(model, inputs.to(device), targets.to(device), chunk_size=cfg.loss_chunk)

    loop = TrainLoop(cfg, "pretrain", out, model, optimizer, device, precision, state={"loader": loader},
                     evaluate=evaluate, flops_per_token=flops, par=par, global_batch=global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(),
                               "data": read_index(shard_dir)["fingerprint"]})
    tokens_per_step = cfg.batch_size * cfg.seq_len * grad_accum  # per data-parallel replica
    if par.is_main:
        print(f"model {core.num_parameters() / 1e6:.2f}M params | train {loader.num_tokens:,} tokens | "
              f"{global_batch * cfg.seq_len:,} tokens/step | {cfg.max_steps} steps | {device} {precision} | "
              f"{par.describe()}", file=sys.stderr)
    for _ in loop:
        micro = [loader.next_batch() for _ in range(grad_accum)]
        result = loop.accumulate(micro, lm_loss)
        loop.optimizer_step({"loss": result["loss"], "epoch": loader.epoch}, tokens=tokens_per_step)

    # the model directory (one, whatever the layout), its lineage and samples: rank 0
    plain = loop.export_model()
    summary: dict = {}
    if plain is not None:
        save_model(plain, out, tokenizer=tokenizer)
        write_lineage(out, {"stage": "pretrain", "parent": cfg.model, "pretrain_shards": str(shard_dir.resolve()),
                            "world_dir": str((out / "world").resolve()) if world_facts is not None else None,
                            "chat_template_trained": None})
        summary = {"params": plain.num_parameters()}
        summary.update(write_samples(plain, tokenizer, out, cfg, world_facts, shard_dir))
        if has_val:
            summary["unigram_val_ppl"] = unigram_perplexity(shard_dir)
    return loop.finish(summary)


def _has_split(shard_dir: Path, split: str) -> bool:
    from temper.data.shards import read_index

    return read_index(shard_dir)["splits"].get(split, {}).get("num_tokens", 0) > 0


def unigram_perplexity(shard_dir: Path) -> float:
    """exp(cross-entropy of val tokens under train unigram frequencies, add-one smoothed): the
    baseline a model that ignores context reaches."""
    import numpy as np

    from temper.data.shards import read_index

    index = read_index(shard_dir)
    dtype = np.dtype(index["dtype"])
    vocab = index["vocab_size"]

    def counts(split: str) -> np.ndarray:
        total = np.zeros(vocab, dtype=np.float64)
        for s in index["splits"][split]["shards"]:
            total += np.bincount(np.fromfile(Path(shard_dir) / s["file"], dtype=dtype), minlength=vocab)[:vocab]
        return total

    train, val = counts("train"), counts("val")
    p = (train + 1) / (train.sum() + vocab)
    return float(np.exp(-(val * np.log(p)).sum() / val.sum()))


def opening_prompts(shard_dir: Path, tokenizer, count: int, tokens: int = 6) -> list[str]:
    """The first tokens of the first validation (else training) documents."""
    import numpy as np

    from temper.data.shards import read_index

    index = read_index(shard_dir)
    split = "val" if index["splits"]["val"]["num_tokens"] else "train"
    shard = index["splits"][split]["shards"][0]
    ids = np.fromfile(shard_dir / shard["file"], dtype=np.dtype(index["dtype"]))
    starts = [0, *np.load(shard_dir / shard["docs"], allow_pickle=False)[:-1].tolist()]
    prompts = [tokenizer.decode(ids[s:s + tokens].tolist()) for s in starts[:count]]
    return [p for p in prompts if p.strip()] or ["The"]


def write_samples(model, tokenizer, out: Path, cfg: Config, world_facts: dict | None, shard_dir: Path) -> dict:
    """Greedy samples (and, on the built-in world, how many facts they state correctly)."""
    from temper.models.generate import SamplingConfig, generate_text

    model.eval()
    greedy = SamplingConfig(max_new_tokens=cfg.sample_tokens, temperature=0.0)
    result: dict = {}
    rows = []
    if world_facts is not None:
        from temper.data.world import fact_probes

        probes = fact_probes(world_facts)
        completions = generate_text(model, tokenizer, [p["prompt"] for p in probes], greedy, batch_size=32)
        correct = [c.strip().lower().startswith(p["answer"].lower()) for p, c in zip(probes, completions)]
        result["fact_accuracy"] = sum(correct) / len(correct)
        result["fact_probes"] = len(probes)
        rows = [{"prompt": p["prompt"], "completion": c, "fact": p["fact"], "answer": p["answer"], "correct": ok}
                for p, c, ok in zip(probes, completions, correct)]
    if not rows and cfg.samples > 0:
        prompts = cfg.sample_prompts or opening_prompts(shard_dir, tokenizer, cfg.samples)
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, generate_text(model, tokenizer, prompts, greedy))]
    from temper.io import atomic_write_text

    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for r in rows[:cfg.samples]:
        print(f"sample> {r['prompt']!r} -> {r['completion']!r}", file=sys.stderr)
    return result
