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

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from temper.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    PeftConfig,
    ScheduleConfig,
    opt,
)
from temper.errors import TemperError


@dataclass
class Config:
    model: str = opt("", "the model directory to fine-tune (temper or Hugging Face format)")
    data: list[str] = opt([], "training rows (empty: the built-in world's instructions recorded with the model)")
    eval_data: list[str] = opt([], "held-out rows for generation eval (empty: the world's test split, or eval_fraction of data)")
    eval_fraction: float = opt(0.1, "share of data held out for evaluation when eval_data is empty")
    columns: dict = opt({}, "rename columns to temper's, e.g. columns.prompt=question columns.completion=answer")
    skip_bad_rows: bool = opt(False, "skip (and count) rows that fail validation instead of stopping")
    template: str | None = opt(None, "chat template: chatml, llama3, plain, a .jinja file (default: the model's)")
    loss_on: Literal["completion", "assistant", "all"] = opt(
        "completion", "train on the last reply, on every assistant turn, or on every token")
    packing: bool = opt(False, "pack several examples per row (positions reset, attention kept inside each)")
    max_seq_len: int = opt(512, "longest training sequence in tokens")
    general_data: list[str] = opt([], "general text for the forgetting perplexity and replay (default: the pretraining shards)")
    replay_weight: float = opt(0.0, "weight of a pretraining-data loss mixed into every step (0: no replay)")
    replay_batch_size: int = opt(8, "pretraining windows per step when replaying")
    output_dir: str = opt("runs/sft", "where the fine-tuned model directory, metrics and checkpoints go")
    batch_size: int = opt(16, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    max_steps: int = opt(400, "optimiser steps")
    seed: int = opt(0, "seed for data order and initialisation")
    resume: str = opt("", "'' starts fresh; 'auto' continues from the newest valid checkpoint; or a path")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "fp32 on CPU and bf16 on GPU by default")
    eval_samples: int = opt(100, "held-out instructions generated at each evaluation")
    eval_max_new_tokens: int = opt(40, "longest generated reply during evaluation")
    general_eval_batches: int = opt(8, "batches of general text for the forgetting perplexity (0: all)")
    peft: PeftConfig = opt(PeftConfig(), "parameter-efficient fine-tuning (peft.method=lora|dora|qlora|adapter|prefix|prompt)")
    optim: OptimConfig = opt(OptimConfig(lr=3e-4, weight_decay=0.0), "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig(warmup_ratio=0.05), "learning-rate schedule")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(every=0), "checkpointing")
    logging: LoggingConfig = opt(LoggingConfig(every=20, eval_every=100), "logging and evaluation")

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: the model directory to fine-tune")
        if not 0 <= self.replay_weight < 1:
            raise TemperError(f"replay_weight must be in [0, 1), got {self.replay_weight}")
        for key in ("batch_size", "grad_accum", "max_steps", "max_seq_len"):
            if getattr(self, key) < 1:
                raise TemperError(f"{key} must be at least 1, got {getattr(self, key)}")


def resolve_data(cfg: Config, lineage: dict):
    """(train conversations, eval conversations, skipped rows)."""
    from temper.data.sft import read_conversations

    world = lineage.get("world_dir")
    train_spec = cfg.data or ([str(Path(world) / "sft" / "train.jsonl")] if world else [])
    if not train_spec:
        raise TemperError("data= is required: the model records no built-in world to take instructions from")
    train, skipped = read_conversations(train_spec, columns=cfg.columns, skip_bad_rows=cfg.skip_bad_rows)
    eval_spec = cfg.eval_data or ([str(Path(world) / "sft" / "test.jsonl")] if world and not cfg.data else [])
    if eval_spec:
        held_out, more = read_conversations(eval_spec, columns=cfg.columns, skip_bad_rows=cfg.skip_bad_rows)
        skipped += more
    else:  # hold out a deterministic share of the training rows
        import random

        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, int(len(train) * cfg.eval_fraction)) if len(train) > 1 else 0
        held = set(order[:n_eval])
        held_out = [c for i, c in enumerate(train) if i in held]
        train = [c for i, c in enumerate(train) if i not in held]
    held_out = [c for c in held_out if c.messages is not None][:cfg.eval_samples]
    return train, held_out, skipped


def run(cfg: Config) -> dict:
    import torch
    from tqdm import tqdm

    from temper.config import to_dict
    from temper.data.chat import resolve_template
    from temper.data.sft import SFTLoader, encode_all
    from temper.data.shards import TokenLoader
    from temper.data.tokenizer import Tokenizer
    from temper.eval.generation import evaluate_instructions
    from temper.eval.perplexity import evaluate_batches
    from temper.lineage import read_lineage, write_lineage
    from temper.losses import IGNORE_INDEX, causal_lm_loss
    from temper.models import load_model, save_model
    from temper.train import checkpoint as ckpt
    from temper.train import engine
    from temper.train.optim import build_optimizer, lr_at, set_lr

    out, device, precision = engine.start_run(cfg, cfg.output_dir, cfg.device, cfg.precision, cfg.seed)

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
    examples, stats = encode_all(train_convs, tokenizer, template, loss_on=cfg.loss_on, max_len=cfg.max_seq_len)
    print(f"sft data: {stats.summary()}; {skipped} bad rows skipped; {len(eval_convs)} held-out instructions",
          file=sys.stderr)
    if stats.truncated or stats.dropped:
        print(f"warning: {stats.truncated} examples truncated and {stats.dropped} dropped at max_seq_len="
              f"{cfg.max_seq_len}", file=sys.stderr)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    loader = SFTLoader(examples, batch_size=cfg.batch_size, seq_len=cfg.max_seq_len, pad_id=pad_id,
                       seed=cfg.seed, packing=cfg.packing)
    general = resolve_general_text(cfg, lineage, tokenizer, out)
    replay = None
    if cfg.replay_weight > 0:
        if general is None:
            raise TemperError("replay_weight > 0 needs general text: general_data=... or a model from temper pretrain")
        replay = TokenLoader(general, "train", seq_len=min(cfg.max_seq_len, 256), batch_size=cfg.replay_batch_size,
                             seed=cfg.seed)

    from temper.peft import apply_peft, save_peft

    peft_info = apply_peft(model, cfg.peft, tokenizer)
    share = peft_info["trainable"] / peft_info["total"]
    print(f"trainable parameters: {peft_info['trainable']:,} of {peft_info['total']:,} ({share:.2%}); "
          f"peft.method={cfg.peft.method}", file=sys.stderr)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    autocast = engine.precision_context(precision, device)
    scaler = engine.grad_scaler(precision, device)
    checkpoints = out / "checkpoints"
    start_step = 0
    resume_from = ckpt.resolve_resume(cfg.resume, checkpoints)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, device=device)
        loader.load_state_dict(state["loader"])
        if replay is not None:
            replay.load_state_dict(state["replay"])
        start_step = state["step"]
    metrics = engine.MetricsLog(out / "metrics.jsonl", resume_step=start_step if resume_from else None)

    def evaluate(step: int) -> dict:
        result: dict = {"step": step}
        if eval_convs:
            scores, rows = evaluate_instructions(model, tokenizer, template, eval_convs,
                                                 max_new_tokens=cfg.eval_max_new_tokens)
            result.update(scores)
            result["samples"] = [{"prompt": r["prompt"][-120:], "reply": r["reply"], "reference": r["reference"]}
                                 for r in rows[:3]]
        if general is not None:
            val = TokenLoader(general, "val", seq_len=min(cfg.max_seq_len, 256), batch_size=8, shuffle=False, drop_last=False)
            ppl = evaluate_batches(model, val, device=device, autocast=autocast, max_batches=cfg.general_eval_batches)
            result["general_ppl"] = ppl["val_ppl"]
        metrics.log(result)
        shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
        print(f"eval step {step}: {shown}", file=sys.stderr)
        return result

    def sft_loss(batch):
        batch = batch.to(device)
        return causal_lm_loss(model, batch.inputs, batch.targets, positions=batch.positions,
                              mask=batch.attention_mask())[0], {}

    def replay_loss(batch):
        return causal_lm_loss(model, batch[0].to(device), batch[1].to(device))[0], {}

    before = evaluate(0) if start_step == 0 else {}
    interactive = cfg.logging.progress and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="sft", unit="step", file=sys.stderr,
               disable=not interactive, dynamic_ncols=True)
    window_tokens, window_time, train_seconds = 0, 0.0, 0.0
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim.lr, cfg.schedule, cfg.max_steps)
        set_lr(optimizer, lr)
        micro = [loader.next_batch() for _ in range(cfg.grad_accum)]
        result = engine.accumulate(micro, count_targets=lambda b: (b.targets != IGNORE_INDEX).sum(),
                                   loss_sum_fn=sft_loss, autocast=autocast, scaler=scaler,
                                   weight=1.0 - cfg.replay_weight)
        row = {"step": step + 1, "loss": result["loss"], "lr": lr}
        if replay is not None:
            replayed = engine.accumulate([replay.next_batch()], count_targets=lambda b: b[1].numel(),
                                         loss_sum_fn=replay_loss, autocast=autocast, scaler=scaler,
                                         weight=cfg.replay_weight)
            row["replay_loss"] = replayed["loss"]
        row["grad_norm"] = engine.optimizer_step(model, optimizer, grad_clip=cfg.optim.grad_clip, scaler=scaler)
        window_tokens += sum(b.inputs.numel() for b in micro)
        window_time += time.perf_counter() - t0
        train_seconds += time.perf_counter() - t0
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{result['loss']:.3f}")
        if done % cfg.logging.every == 0 or done == cfg.max_steps:
            row["tokens_per_second"] = window_tokens / window_time
            row["target_tokens"] = result["target_tokens"]
            row["memory_mb"] = engine.peak_memory_mb(device)
            metrics.log(row)
            if cfg.logging.progress and not interactive:
                print(f"step {done}/{cfg.max_steps} loss {row['loss']:.4f} lr {lr:.2e}", file=sys.stderr)
            window_tokens, window_time = 0, 0.0
        if cfg.logging.eval_every and done % cfg.logging.eval_every == 0 and done != cfg.max_steps:
            evaluate(done)
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != cfg.max_steps:
            ckpt.save_checkpoint(checkpoints, done, model=model, optimizer=optimizer, keep_last=cfg.checkpoint.keep_last,
                                 state={"loader": loader.state_dict(), "config": to_dict(cfg),
                                        "replay": replay.state_dict() if replay else None})
    bar.close()

    after = evaluate(cfg.max_steps)
    if cfg.peft.method == "none":
        save_model(model, out, tokenizer=tokenizer)
    else:  # only what was trained; `temper merge` folds a LoRA into the base
        save_peft(model, out, cfg.peft, base_model=str(Path(cfg.model).resolve()))
        tokenizer.save(out)
    write_lineage(out, {**lineage, "stage": "sft", "parent": cfg.model, "chat_template_trained": template,
                        "peft": cfg.peft.method})
    summary = {"steps": cfg.max_steps, "peft": cfg.peft.method, "trainable_parameters": peft_info["trainable"],
               "total_parameters": peft_info["total"], "train_seconds": train_seconds,
               "peak_memory_mb": engine.peak_memory_mb(device), "examples": stats.examples, "truncated": stats.truncated,
               "dropped": stats.dropped, "skipped_rows": skipped,
               "before": {k: v for k, v in before.items() if k not in ("samples", "step")},
               "after": {k: v for k, v in after.items() if k not in ("samples", "step")},
               "samples": after.get("samples", [])}
    metrics.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


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
