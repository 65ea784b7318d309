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

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from temper.config import OnlyWith, check_range, opt
from temper.data.chat import resolve_template, stop_settings
from temper.data.sft import (
    SFTLoader,
    encode_all,
    examples_fingerprint,
    read_conversations,
    split_held_out,
)
from temper.errors import TemperError
from temper.eval.drift import DriftMonitor
from temper.eval.generation import evaluate_instructions
from temper.losses import causal_lm_loss
from temper.train import recipe
from temper.train.distributed import unwrap
from temper.train.loop import TrainLoop


@dataclass
class Config(recipe.TrainingConfig, command="sft", capabilities=recipe.Capabilities(peft=True),
             defaults=dict(model="", eval_fraction=0.1, output_dir="runs/sft", batch_size=16, max_steps=400,
                           optim=dict(lr=3e-4, weight_decay=0.0), schedule=dict(warmup_ratio=0.05),
                           logging=dict(every=20, eval_every=100, eval_at_start=True), peft={}, columns={},
                           skip_bad_rows=True, max_bad_row_fraction=0.1, template=None, general_data=[])):
    resume_may_change: ClassVar = (*recipe.TrainingConfig.resume_may_change, "eval_samples", "eval_max_new_tokens")
    packing: bool = opt(False, "pack several examples per row (positions reset, attention kept inside each)")
    replay_weight: float = opt(0.0, "weight of a pretraining-data loss mixed into every step (0: no replay)")
    replay_batch_size: int = opt(8, "pretraining windows per step (per rank) when replaying")
    eval_samples: int = opt(100, "held-out instructions generated at each evaluation")
    eval_max_new_tokens: int = opt(40, "longest generated reply during evaluation")
    loss_on: Literal["completion", "assistant", "all"] = opt(
        "completion", "train on the last reply, on every assistant turn, or on every token")

    only_with: ClassVar = (
        OnlyWith(("replay_batch_size",), "replay_weight > 0", lambda c: c.replay_weight > 0),
    )

    def validate(self) -> None:
        super().validate()
        check_range("replay_weight", self.replay_weight, low=0.0, high=1.0, high_open=True)
        for key in ("replay_batch_size", "eval_max_new_tokens"):
            check_range(key, getattr(self, key), low=1)
        check_range("eval_samples", self.eval_samples, low=0)


def resolve_data(cfg: Config, lineage: dict):
    """(train conversations, eval conversations, bad rows skipped by reason)."""
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
        train, held_out = split_held_out(train, cfg.eval_fraction, cfg.seed)
    held_out = [c for c in held_out if c.messages is not None][:cfg.eval_samples]
    return train, held_out, skipped


def run(cfg: Config) -> dict:
    run = recipe.start(cfg)

    # model, tokenizer, template
    policy = recipe.load_policy(cfg, run)
    tokenizer, lineage = policy.tokenizer, policy.lineage
    template = resolve_template(cfg.template, tokenizer)
    if template is None:
        raise TemperError(f"{cfg.model}: the model has no chat template; pass template=chatml (or llama3, plain, a .jinja file)")
    if cfg.template and template != tokenizer.chat_template:
        run.say(f"note: fine-tuning with template={cfg.template}; it is saved with the model")
    tokenizer.chat_template = template

    # data
    train_convs, eval_convs, skipped = resolve_data(cfg, lineage)
    examples, stats = encode_all(train_convs, tokenizer, template, loss_on=cfg.loss_on, max_len=cfg.seq_len)
    run.say(f"sft data: {stats.summary()}; {sum(skipped.values())} bad rows skipped; {len(eval_convs)} held-out "
            "instructions")
    if stats.truncated or stats.dropped:
        run.say(f"note: {stats.truncated} of {stats.examples + stats.dropped} examples truncated to fit seq_len="
                f"{cfg.seq_len}: replies keep their start; {stats.prompt_truncated} prompts kept only their end"
                + (f"; {stats.dropped} dropped with nothing left to train" if stats.dropped else ""))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    loader = SFTLoader(examples, batch_size=cfg.batch_size, seq_len=cfg.seq_len, pad_id=pad_id, seed=cfg.seed,
                       packing=cfg.packing, rank=run.par.dp_rank, world_size=run.par.dp, grad_accum=run.grad_accum)
    drift = DriftMonitor.prepare(cfg.general_data, lineage, tokenizer, run.out, seed=cfg.seed, seq_len=cfg.seq_len,
                                 max_batches=cfg.eval_batches, agree=run.agree_first)
    replay = None
    if cfg.replay_weight > 0:
        if drift is None:
            raise TemperError("replay_weight > 0 needs general text: general_data=... or a model from temper pretrain")
        replay = drift.replay_loader(batch_size=cfg.replay_batch_size, seed=cfg.seed, rank=run.par.dp_rank,
                                     world_size=run.par.dp)

    # the trainable part
    trainable = recipe.make_trainable(policy.model, cfg, run, tokenizer=tokenizer)
    model = trainable.model

    def evaluate(step: int) -> dict:
        result: dict = {}
        if eval_convs:
            scores, rows = evaluate_instructions(unwrap(model), tokenizer, template, eval_convs,
                                                 max_new_tokens=cfg.eval_max_new_tokens)
            result.update(scores)
            result["samples"] = [{"prompt": r["prompt"][-120:], "reply": r["reply"], "reference": r["reference"]}
                                 for r in rows[:3]]
        if drift is not None:
            result["general_ppl"] = drift.perplexity(model, device=run.device, autocast=loop.autocast)
        return result

    def sft_loss(batch):  # (summed NLL of the trained tokens, their number)
        batch = batch.to(run.device)
        return causal_lm_loss(model, batch.inputs, batch.targets, positions=batch.positions,
                              mask=batch.attention_mask())

    def replay_loss(batch):
        return causal_lm_loss(model, batch[0].to(run.device), batch[1].to(run.device))

    loop = TrainLoop(cfg, "sft", run.out, model, trainable.optimizer, run.device, run.precision,
                     state={"loader": loader, "replay": replay}, evaluate=evaluate,
                     flops_per_token=trainable.flops_per_token, par=run.par, global_batch=run.global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "peft": cfg.peft.method,
                               "data": examples_fingerprint(examples),
                               "packing": cfg.packing, "replay_weight": cfg.replay_weight})
    for _ in loop:
        micro = [loader.next_batch() for _ in range(run.grad_accum)]
        result = loop.accumulate(micro, sft_loss, weight=1.0 - cfg.replay_weight)
        row = {"loss": result["loss"], "target_tokens": result["count"]}
        if replay is not None:
            row["replay_loss"] = loop.accumulate([replay.next_batch()], replay_loss, weight=cfg.replay_weight)["loss"]
        loop.optimizer_step(row, tokens=sum(b.inputs.numel() for b in micro))

    # generation stops at the template's end of turn, in transformers too
    recipe.save_outputs(loop, cfg, "sft", tokenizer, lineage, eos_ids=stop_settings(tokenizer, template)[1],
                 template=template)
    return loop.finish({
        "peft": cfg.peft.method, "trainable_parameters": trainable.trainable_parameters,
        "total_parameters": trainable.total_parameters, "examples": stats.examples, "truncated": stats.truncated,
        "prompt_truncated": stats.prompt_truncated, "dropped": stats.dropped, "skipped_rows": dict(skipped),
        "samples": loop.last_eval.get("samples", [])})
