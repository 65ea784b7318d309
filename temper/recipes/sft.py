"""Supervised fine-tuning and instruction tuning: the next-token loss on the response only,
L = -sum_i log P(y_i | x, y_<i), rendered through the model's chat template.

    temper sft model=runs/pretrain                      # the built-in world's instructions
    temper sft model=DIR data=chats.jsonl template=chatml loss_on=assistant packing=true
    temper sft model=DIR data=gsm8k/train.jsonl columns.prompt=question columns.completion=answer

Data: `messages`, `prompt`+`completion`, Alpaca `instruction`/`input`/`output`,
self-instruct `instruction`/`instances`, or `text` (JSONL, JSON, parquet, directories).
Before training and every `logging.eval_every` steps it measures exact match on held-out
instructions (greedy generation) and the perplexity of general text (by default the
pretraining validation split recorded with the model), so forgetting shows as it happens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from temper.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    PeftConfig,
    ScheduleConfig,
    check_range,
    opt,
)
from temper.errors import TemperError
from temper.train.distributed import ParallelConfig


@dataclass
class Config:
    model: str = opt("", "the model directory to fine-tune (temper or Hugging Face format)")
    data: list[str] = opt([], "training rows (empty: the built-in world's instructions recorded with the model)")
    eval_data: list[str] = opt([], "held-out rows for generation eval (empty: the world's test split, or eval_fraction of data)")
    eval_fraction: float = opt(0.1, "share of data held out for evaluation when eval_data is empty")
    columns: dict = opt({}, "rename columns to temper's, e.g. columns.prompt=question columns.completion=answer")
    skip_bad_rows: bool = opt(True, "skip rows that fail validation, count them and warn naming the first of each "
                                    "reason (false: stop at the first bad row)")
    max_bad_row_fraction: float = opt(0.1, "stop when more than this share of the rows read is bad (skipped rows "
                                           "are expected to be few; many mean a wrong format or columns=)")
    template: str | None = opt(None, "chat template: chatml, llama3, plain, a .jinja file (default: the model's)")
    loss_on: Literal["completion", "assistant", "all"] = opt(
        "completion", "train on the last reply, on every assistant turn, or on every token")
    packing: bool = opt(False, "pack several examples per row (positions reset, attention kept inside each)")
    seq_len: int = opt(512, "longest training sequence in tokens (shorter rows are padded, or packed); a longer "
                            "one is cut: its prompt keeps its end (down to seq_len/2), then the reply its start")
    general_data: list[str] = opt([], "general text for the forgetting perplexity and replay (default: the pretraining shards)")
    replay_weight: float = opt(0.0, "weight of a pretraining-data loss mixed into every step (0: no replay)")
    replay_batch_size: int = opt(8, "pretraining windows per step (per rank) when replaying")
    output_dir: str = opt("runs/sft", "where the fine-tuned model directory, metrics and checkpoints go")
    batch_size: int = opt(16, "rows per micro-batch (per rank)")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    global_batch_size: int = opt(0, "rows per optimiser step over all ranks (0: batch_size x grad_accum x "
                                    "data-parallel ranks); when set, grad_accum follows from it")
    max_steps: int = opt(400, "optimiser steps")
    seed: int = opt(0, "seed for data order and initialisation")
    resume: str = opt("", "'' starts fresh; 'auto' continues from the newest valid checkpoint; or a path")
    overwrite: bool = opt(False, "start over in an output_dir that holds an earlier run (its checkpoints and metrics go)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "fp32 on CPU and bf16 on GPU by default")
    compile: bool = opt(False, "torch.compile the model")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward to save memory")
    strategy: str = opt("auto", "none (one process), ddp, fsdp, or auto: ddp under torchrun (fsdp with parallel.tp alone), else none")
    parallel: ParallelConfig = opt(ParallelConfig(), "FSDP options (tensor and pipeline parallelism: pretraining)")
    peak_flops: float = opt(0.0, "the device's peak FLOP/s for MFU (0: measure a matmul now)")
    eval_samples: int = opt(100, "held-out instructions generated at each evaluation")
    eval_max_new_tokens: int = opt(40, "longest generated reply during evaluation")
    eval_batches: int = opt(8, "batches of general text for the forgetting perplexity (0: all)")
    peft: PeftConfig = opt(PeftConfig(), "parameter-efficient fine-tuning (peft.method=lora|dora|qlora|adapter|prefix|prompt)")
    optim: OptimConfig = opt(OptimConfig(lr=3e-4, weight_decay=0.0), "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig(warmup_ratio=0.05), "learning-rate schedule")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(every=0), "checkpointing")
    logging: LoggingConfig = opt(LoggingConfig(every=20, eval_every=100, eval_at_start=True), "logging and evaluation")

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: the model directory to fine-tune")
        check_range("replay_weight", self.replay_weight, low=0.0, high=1.0, high_open=True)
        check_range("eval_fraction", self.eval_fraction, low=0.0, high=1.0, high_open=True)
        for key in ("replay_batch_size", "eval_max_new_tokens"):
            check_range(key, getattr(self, key), low=1)
        for key in ("eval_samples", "eval_batches", "peak_flops"):
            check_range(key, getattr(self, key), low=0)
        if self.eval_data and self.eval_fraction != Config.eval_fraction:
            raise TemperError("eval_fraction splits data= only when eval_data is empty; give one of them")
        if self.replay_weight == 0 and self.replay_batch_size != Config.replay_batch_size:
            raise TemperError("replay_batch_size is used only with replay_weight > 0")
        check_range("global_batch_size", self.global_batch_size, low=0)
        check_range("max_bad_row_fraction", self.max_bad_row_fraction, low=0.0, high=1.0)
        if self.parallel.pp > 1 or self.parallel.tp > 1:
            raise TemperError("parallel.pp and parallel.tp are for pretraining for now (fine-tuning evaluates by "
                              "generating, which needs whole attention heads): fine-tune with strategy=fsdp or ddp")
        if self.peft.method != "none" and self.strategy == "fsdp":
            raise TemperError(f"peft.method={self.peft.method} with strategy=fsdp is not supported yet: an adapter's "
                              "few weights train well with strategy=ddp")
        for key in ("batch_size", "grad_accum", "max_steps", "seq_len"):
            if getattr(self, key) < 1:
                raise TemperError(f"{key} must be at least 1, got {getattr(self, key)}")


def resolve_data(cfg: Config, lineage: dict):
    """(train conversations, eval conversations, bad rows skipped by reason)."""
    from collections import Counter

    from temper.data.sft import read_conversations

    world = lineage.get("world_dir")
    train_spec = cfg.data or ([str(Path(world) / "sft" / "train.jsonl")] if world else [])
    if not train_spec:
        raise TemperError("data= is required: the model records no built-in world to take instructions from")
    rules = dict(columns=cfg.columns, skip_bad_rows=cfg.skip_bad_rows, max_bad_row_fraction=cfg.max_bad_row_fraction)
    train, bad = read_conversations(train_spec, **rules)
    skipped = Counter(bad.skipped)
    eval_spec = cfg.eval_data or ([str(Path(world) / "sft" / "test.jsonl")] if world and not cfg.data else [])
    if eval_spec:
        held_out, more = read_conversations(eval_spec, **rules)
        skipped += more.skipped
    else:  # hold out a deterministic share of the training rows
        from temper.data.sft import split_held_out

        train, held_out = split_held_out(train, cfg.eval_fraction, cfg.seed)
    held_out = [c for c in held_out if c.messages is not None][:cfg.eval_samples]
    return train, held_out, skipped


def run(cfg: Config) -> dict:
    import torch

    from temper.data.chat import resolve_template, stop_settings
    from temper.data.sft import SFTLoader, encode_all, examples_fingerprint
    from temper.data.shards import TokenLoader
    from temper.data.tokenizer import Tokenizer
    from temper.eval.generation import evaluate_instructions
    from temper.eval.perplexity import evaluate_batches
    from temper.io import refuse_same_dir
    from temper.lineage import read_lineage, write_lineage
    from temper.losses import causal_lm_loss
    from temper.models import load_model, save_model
    from temper.peft import apply_peft, save_peft
    from temper.train import engine
    from temper.train.distributed import global_batch as global_batch_size
    from temper.train.distributed import unwrap, wrap_model
    from temper.train.loop import TrainLoop
    from temper.train.optim import build_optimizer

    refuse_same_dir(cfg.output_dir, cfg.model, "model")  # a fine-tuned model must not overwrite its base
    out, device, precision, par = engine.start_run(cfg, cfg.output_dir, cfg.device, cfg.precision, cfg.seed)
    grad_accum, global_batch = global_batch_size(cfg, par.dp)

    # model, tokenizer, template
    model = load_model(cfg.model, device=device, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(cfg.model)
    lineage = read_lineage(cfg.model)
    template = resolve_template(cfg.template, tokenizer)
    if template is None:
        raise TemperError(f"{cfg.model}: the model has no chat template; pass template=chatml (or llama3, plain, a .jinja file)")
    if cfg.template and template != tokenizer.chat_template:
        print(f"note: fine-tuning with template={cfg.template}; it is saved with the model", file=sys.stderr)
    tokenizer.chat_template = template

    # data
    train_convs, eval_convs, skipped = resolve_data(cfg, lineage)
    examples, stats = encode_all(train_convs, tokenizer, template, loss_on=cfg.loss_on, max_len=cfg.seq_len)
    if par.is_main:
        print(f"sft data: {stats.summary()}; {sum(skipped.values())} bad rows skipped; {len(eval_convs)} held-out "
              "instructions", file=sys.stderr)
    if (stats.truncated or stats.dropped) and par.is_main:
        print(f"note: {stats.truncated} of {stats.examples + stats.dropped} examples truncated to fit seq_len="
              f"{cfg.seq_len}: replies keep their start; {stats.prompt_truncated} prompts kept only their end"
              + (f"; {stats.dropped} dropped with nothing left to train" if stats.dropped else ""), file=sys.stderr)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    loader = SFTLoader(examples, batch_size=cfg.batch_size, seq_len=cfg.seq_len, pad_id=pad_id,
                       seed=cfg.seed, packing=cfg.packing, rank=par.dp_rank, world_size=par.dp, grad_accum=grad_accum)
    if par.world_size > 1:  # rank 0 shards general text (cached); then every rank reads it
        par.agree(lambda: resolve_general_text(cfg, lineage, tokenizer, out) and None)
    general = resolve_general_text(cfg, lineage, tokenizer, out)
    replay = None
    if cfg.replay_weight > 0:
        if general is None:
            raise TemperError("replay_weight > 0 needs general text: general_data=... or a model from temper pretrain")
        replay = TokenLoader(general, "train", seq_len=min(cfg.seq_len, 256), batch_size=cfg.replay_batch_size,
                             seed=cfg.seed, rank=par.dp_rank, world_size=par.dp)

    # the trainable part
    peft_info = apply_peft(model, cfg.peft, tokenizer)
    share = peft_info["trainable"] / peft_info["total"]
    if par.is_main:
        print(f"trainable parameters: {peft_info['trainable']:,} of {peft_info['total']:,} ({share:.2%}); "
              f"peft.method={cfg.peft.method} | {par.describe()}", file=sys.stderr)
    model.train()
    flops = engine.flops_per_token(model, cfg.seq_len)
    model = wrap_model(model, par, precision=precision, activation_checkpointing=cfg.activation_checkpointing,
                       compile=cfg.compile)
    optimizer = build_optimizer(model, cfg.optim)

    def evaluate(step: int) -> dict:
        result: dict = {}
        if eval_convs:
            scores, rows = evaluate_instructions(unwrap(model), tokenizer, template, eval_convs,
                                                 max_new_tokens=cfg.eval_max_new_tokens)
            result.update(scores)
            result["samples"] = [{"prompt": r["prompt"][-120:], "reply": r["reply"], "reference": r["reference"]}
                                 for r in rows[:3]]
        if general is not None:
            val = TokenLoader(general, "val", seq_len=min(cfg.seq_len, 256), batch_size=8, shuffle=False,
                              drop_last=False)
            ppl = evaluate_batches(model, val, device=device, autocast=loop.autocast, max_batches=cfg.eval_batches)
            result["general_ppl"] = ppl["val_ppl"]
        return result

    def sft_loss(batch):  # (summed NLL of the trained tokens, their number)
        batch = batch.to(device)
        return causal_lm_loss(model, batch.inputs, batch.targets, positions=batch.positions,
                              mask=batch.attention_mask())

    def replay_loss(batch):
        return causal_lm_loss(model, batch[0].to(device), batch[1].to(device))

    loop = TrainLoop(cfg, "sft", out, model, optimizer, device, precision,
                     state={"loader": loader, "replay": replay}, evaluate=evaluate,
                     flops_per_token=flops, par=par, global_batch=global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "peft": cfg.peft.method,
                               "data": examples_fingerprint(examples),
                               "packing": cfg.packing, "replay_weight": cfg.replay_weight})
    for _ in loop:
        micro = [loader.next_batch() for _ in range(grad_accum)]
        result = loop.accumulate(micro, sft_loss, weight=1.0 - cfg.replay_weight)
        row = {"loss": result["loss"], "target_tokens": result["count"]}
        if replay is not None:
            row["replay_loss"] = loop.accumulate([replay.next_batch()], replay_loss, weight=cfg.replay_weight)["loss"]
        loop.optimizer_step(row, tokens=sum(b.inputs.numel() for b in micro))

    # only what was trained: a full model directory, or the adapter (`temper merge` folds a LoRA in); rank 0
    plain = loop.export_model()
    if plain is not None and cfg.peft.method == "none":  # generation stops at the template's end of turn, in transformers too
        save_model(plain, out, tokenizer=tokenizer, eos_ids=stop_settings(tokenizer, template)[1])
    elif plain is not None:
        save_peft(plain, out, cfg.peft, base_model=str(Path(cfg.model).resolve()))
        tokenizer.save(out)
    if plain is not None:
        write_lineage(out, {**lineage, "stage": "sft", "parent": cfg.model, "chat_template_trained": template,
                            "peft": cfg.peft.method})
    return loop.finish({
        "peft": cfg.peft.method, "trainable_parameters": peft_info["trainable"],
        "total_parameters": peft_info["total"], "examples": stats.examples, "truncated": stats.truncated,
        "prompt_truncated": stats.prompt_truncated, "dropped": stats.dropped, "skipped_rows": dict(skipped),
        "samples": loop.last_eval.get("samples", [])})


def resolve_general_text(cfg: Config, lineage: dict, tokenizer, out: Path) -> Path | None:
    """Token shards of general text: given files (sharded here) or the pretraining shards."""
    if cfg.general_data:
        from temper.data.readers import expand_paths, iter_texts
        from temper.data.shards import build_shards, files_fingerprint, fingerprint

        key = fingerprint([files_fingerprint(expand_paths(cfg.general_data)), tokenizer.backend.to_str()])
        return build_shards(iter_texts(cfg.general_data), tokenizer, out / "general", val_fraction=0.1,
                            seed=cfg.seed, fingerprint_id=key)
    shards = lineage.get("pretrain_shards")
    if shards and (Path(shards) / "index.json").is_file():
        return Path(shards)
    print("note: no general text for the forgetting perplexity (general_data=... to add one)", file=sys.stderr)
    return None
