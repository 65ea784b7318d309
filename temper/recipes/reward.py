"""Reward modelling: a decoder with a scalar head, trained on preference pairs with the
Bradley–Terry loss (Ouyang et al. 2022; TRL's RewardTrainer):

    L = -E[ log sigma( r(x, y_w) - r(x, y_l) - margin ) ]  (+ c * E[(r(x, y_w) + r(x, y_l))^2])

    temper reward model=runs/sft                                   # the built-in world's pairs
    temper reward model=DIR data=hh-rlhf/harmless-base-test.jsonl.gz   # string rows: no template
    temper reward model=DIR peft.method=lora                       # LoRA on the body; the head trains in full
    temper reward score model=runs/reward data=rows.jsonl output=scored.jsonl
    temper reward model=runs/sft objective=prm                     # a process reward model: the world's prm/* steps
    temper reward model=runs/sft objective=prm step_labels=last    # an outcome model on the same rows (the ORM)

The body is the SFT model's decoder (its output layer dropped); the head is new, drawn as
transformers draws a new `score` layer. The reward of a sequence is the head on the last
non-pad token (`temper.models.reward`). Saved as a Hugging Face `*ForSequenceClassification`
directory with one label (a LoRA merged in first), which `AutoModelForSequenceClassification`,
`temper eval judge=reward:DIR` and GRPO's `judge:reward:DIR` read.

Data: the DPO family's (`temper.data.preference`: prompt/chosen/rejected strings or messages,
the implicit-prompt form, bad rows skipped and counted, truncation), with TRL's optional
`margin` column; the loss is `temper.losses.reward`. Sequences are cut to seq_len tokens
(the reward model reads every token of a sequence).

A process reward model (`objective=prm`, Lightman et al. 2023) scores every step of a solution:
the same body and head, read at each step's last token (`temper.data.stepwise`: TRL's
stepwise-supervision rows, prompt + completions + labels), trained with a binary cross-entropy
per step (`temper.losses.reward.step_loss`); default data the world's `prm/train|test`
(multi-step arithmetic with planted wrong steps). Its directory is the same one-label
sequence-classification model: a prefix ending at a step's separator scores that step.
Logged: loss and step_accuracy; held out eval_loss, eval_step_accuracy, eval_solution_accuracy
(a solution called right when every step scores > 0, against its last label) and
eval_first_error_accuracy (of the wrong solutions, those whose first step scored < 0 is the
first one labelled wrong).

`step_labels=last` trains Lightman et al.'s outcome-supervised reward model (ORM) on the same
rows: only the solution's last step carries a label, its outcome (the last label: every step
right), the score read there; a row whose last step is cut off by seq_len is skipped and counted
(`last_step_cut`), never labelled on an earlier step. Its held-out metric is
eval_solution_accuracy (eval_step_accuracy is the same number; no first-error accuracy), and the
directory's lineage records `reward_step_labels`, which `rewards=prm:DIR` reads to score the
completion's last step instead of its weakest one.

Outcome models log: loss, accuracy (pairs whose chosen reward is strictly higher, TRL's), margin (mean
r_w - r_l) per step; on held-out pairs eval_loss, eval_accuracy, eval_margin, the rewards'
eval_reward/min, /mean and /max over every held-out response (TRL logs min_reward etc. as the
mean of per-batch values: other numbers, so other names), and eval_length_correlation:
Pearson's r between the reward and the response's length in tokens over the chosen and
rejected responses (a reward that grows with length is the first step to length gaming).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from temper.config import OnlyWith, check_range, opt
from temper.data.chat import resolve_template
from temper.data.preference import (
    EncodedPair,
    PreferenceLoader,
    check_columns,
    load_preferences,
    preference_fingerprint,
)
from temper.data.sft import split_held_out
from temper.data.stepwise import StepwiseLoader, load_stepwise, stepwise_fingerprint
from temper.errors import TemperError
from temper.lineage import write_lineage
from temper.losses.reward import (
    bradley_terry_loss,
    mean_reward_metrics,
    pearson_correlation,
    reward_pair_metrics,
    step_loss,
    step_metrics,
)
from temper.models.hf import read_hf_config
from temper.models.reward import REWARD_ARCHITECTURES, reward_model_from_causal, save_reward_model
from temper.peft import LORA_FAMILY
from temper.peft.lora import merge_lora
from temper.train import recipe
from temper.train.loop import TrainLoop


@dataclass
class Config(recipe.TrainingConfig, command="reward", capabilities=recipe.Capabilities(peft=True),
             defaults=dict(model="runs/sft", output_dir="runs/reward", max_steps=200,
                           optim=dict(lr=1e-4, weight_decay=0.0), schedule=dict(warmup_ratio=0.1),
                           logging=dict(every=10, eval_every=50, eval_at_start=True), peft={}, columns={},
                           skip_bad_rows=True, max_bad_row_fraction=0.1, template=None)):
    resume_may_change: ClassVar = (*recipe.TrainingConfig.resume_may_change, "eval_pairs")
    objective: Literal["orm", "prm"] = opt(
        "orm", "orm: an outcome reward model on preference pairs (Bradley-Terry); prm: a process reward model on "
               "step-labelled solutions (a score per step)")
    step_labels: Literal["each", "last"] = opt(
        "each", "prm only: each: a label on every step (process supervision); last: only the last step carries the "
                "solution's outcome (an outcome reward model on the same rows, Lightman et al. 2023)")
    eval_pairs: int = opt(200, "held-out pairs (prm: solutions) scored at each evaluation (0: all)")
    limit: int = opt(0, "read at most this many rows of data (0: all)")
    implicit_prompt: Literal["turn", "common_prefix"] = opt(
        "turn", "implicit prompts end at the last shared '\\n\\nAssistant:' (turn) or are TRL's common prefix")
    max_prompt_len: int = opt(0, "keep only the end of longer prompts (0: cut only to fit seq_len)")
    center_rewards_coefficient: float = opt(
        0.0, "TRL's reward centring: add c * mean((r_w + r_l)^2) to the loss, pulling rewards to zero mean (0: off)")

    only_with: ClassVar = (
        OnlyWith(("center_rewards_coefficient", "implicit_prompt", "max_prompt_len"), "objective=orm",
                 lambda c: c.objective == "orm", "a process reward model trains on step labels, not pairs"),
        OnlyWith(("step_labels",), "objective=prm", lambda c: c.objective == "prm",
                 "pairs have no steps; step_labels=last trains an outcome model on step-labelled rows"),
    )

    def validate(self) -> None:
        super().validate()
        for key in ("eval_pairs", "max_prompt_len", "limit"):
            check_range(key, getattr(self, key), low=0)
        check_range("center_rewards_coefficient", self.center_rewards_coefficient, low=0.0)
        check_columns(self.columns)
        if self.peft.method not in ("none", *LORA_FAMILY):
            raise TemperError(f"peft.method={self.peft.method}: a reward model trains its body with LoRA, DoRA or "
                              "QLoRA (merged into the saved model), or in full (peft.method=none)")
        if self.seq_len < 2:
            raise TemperError("seq_len must be at least 2: a prompt token and an answer token")


# ----------------------------------------------------------------------------- data


def resolve_pairs(cfg: Config, lineage: dict, tokenizer, template: str | None):
    """(training pairs, held-out pairs, stats of each): data= (a share held out unless eval_data=),
    or the built-in world's preference splits when the model was trained on it. Sequences are cut
    to seq_len tokens (max_len = seq_len - 1 input positions of the shared loader)."""
    world = lineage.get("world_dir")
    train_spec = cfg.data or ([str(Path(world) / "preference" / "train.jsonl")] if world else [])
    if not train_spec:
        raise TemperError("data= is required: the model records no built-in world to take preference pairs from")
    options = dict(max_len=cfg.seq_len - 1, max_prompt_len=cfg.max_prompt_len, columns=cfg.columns,
                   skip_bad_rows=cfg.skip_bad_rows, max_bad_row_fraction=cfg.max_bad_row_fraction,
                   implicit_prompt=cfg.implicit_prompt)
    train, stats = load_preferences(train_spec, tokenizer, template, limit=cfg.limit, **options)
    stats.max_len = cfg.seq_len  # the summary's "seq_len=": a reward model's sequences hold seq_len tokens
    eval_spec = cfg.eval_data or ([str(Path(world) / "preference" / "test.jsonl")] if world and not cfg.data else [])
    held_stats = None
    if eval_spec:
        held, held_stats = load_preferences(eval_spec, tokenizer, template, **options)
    else:
        train, held = split_held_out(train, cfg.eval_fraction, cfg.seed)
    if not train:
        raise TemperError("no preference data left to train on (see the skipped rows above)")
    check_margins(train, "data")
    check_margins(held, "eval_data")
    if held and train and (held[0].margin is None) != (train[0].margin is None):
        raise TemperError("the training pairs and the held-out pairs must both have a margin column or both lack "
                          "it: the loss would change between them")
    return train, held[:cfg.eval_pairs] if cfg.eval_pairs else held, stats, held_stats


def resolve_solutions(cfg: Config, lineage: dict, tokenizer, template: str | None):
    """(training solutions, held-out solutions, stats): data= (a share held out unless eval_data=), or
    the built-in world's prm splits."""
    world = lineage.get("world_dir")
    train_spec = cfg.data or ([str(Path(world) / "prm" / "train.jsonl")] if world else [])
    if not train_spec:
        raise TemperError("data= is required: the model records no built-in world to take step-labelled "
                          "solutions from")
    if not cfg.data and not Path(train_spec[0]).is_file():
        raise TemperError(f"{train_spec[0]}: the model's world has no prm split (written before it existed): "
                          "write one with temper world output_dir=DIR and give data=DIR/prm/train.jsonl "
                          "eval_data=DIR/prm/test.jsonl")
    options = dict(max_len=cfg.seq_len, columns=cfg.columns, skip_bad_rows=cfg.skip_bad_rows,
                   max_bad_row_fraction=cfg.max_bad_row_fraction, step_labels=cfg.step_labels)
    train, stats = load_stepwise(train_spec, tokenizer, template, limit=cfg.limit, **options)
    eval_spec = cfg.eval_data or ([str(Path(world) / "prm" / "test.jsonl")] if world and not cfg.data else [])
    if eval_spec:
        held, _ = load_stepwise(eval_spec, tokenizer, template, **options)
    else:
        train, held = split_held_out(train, cfg.eval_fraction, cfg.seed)
    if not train:
        raise TemperError("no step-labelled data left to train on (see the skipped rows above)")
    return train, held[:cfg.eval_pairs] if cfg.eval_pairs else held, stats


def check_margins(pairs: list[EncodedPair], key: str) -> None:
    """Every pair has a margin or none has (TRL reads the margin column of all rows or of none)."""
    with_margin = [p for p in pairs if p.margin is not None]
    if with_margin and len(with_margin) < len(pairs):
        lacking = next(p for p in pairs if p.margin is None)
        raise TemperError(f"{lacking.source}: no 'margin', though {len(with_margin)} of the {len(pairs)} pairs of "
                          f"{key}= have one: give every row a margin (0 for none) or drop the column")


def check_reward_body(model_dir: str) -> None:
    """model= is a causal LM directory (or a preset): a reward model's own directory is refused in one line."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        return  # a preset name, or load_model's own error for a missing directory
    archs = read_hf_config(path).get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else archs
    if arch in REWARD_ARCHITECTURES:
        raise TemperError(f"model={model_dir} is a reward model already ({arch}): temper reward trains a new head on "
                          "a causal LM (an SFT model); score with it by temper reward score model=... data=...")


# ----------------------------------------------------------------------------- the run


def run(cfg: Config) -> dict:
    check_reward_body(cfg.model)
    run = recipe.start(cfg)

    # body, tokenizer, template (message rows only; string rows are used as they are)
    policy = recipe.load_policy(cfg, run)
    tokenizer, lineage = policy.tokenizer, policy.lineage
    template = None if cfg.template == "none" else resolve_template(cfg.template, tokenizer)
    head_std = read_hf_config(cfg.model).get("initializer_range", 0.02) if (Path(cfg.model) / "config.json").is_file() \
        else 0.02
    reward_model = reward_model_from_causal(policy.model, tokenizer=tokenizer, head_std=head_std)

    # data: preference pairs (orm) or step-labelled solutions (prm)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    split = dict(batch_size=cfg.batch_size, pad_id=pad_id, seed=cfg.seed, rank=run.par.dp_rank, world_size=run.par.dp,
                 grad_accum=run.grad_accum, max_len=cfg.seq_len)
    margins = False
    if cfg.objective == "prm":
        train, held, stats = resolve_solutions(cfg, lineage, tokenizer, template)
        supervision = "a score per step" if cfg.step_labels == "each" else "the outcome on the last step"
        run.say(f"reward data ({'process' if cfg.step_labels == 'each' else 'outcome'}): {stats.summary()}; "
                f"{len(held)} held-out solutions | {supervision}, binary cross-entropy")
        loader = StepwiseLoader(train, **split)
        fingerprint = stepwise_fingerprint(train)
    else:
        train, held, stats, held_stats = resolve_pairs(cfg, lineage, tokenizer, template)
        margins = train[0].margin is not None
        run.say(f"reward data: {stats.summary()}; {len(held)} held-out pairs | Bradley-Terry loss"
                f"{' with margins' if margins else ''}"
                f"{f', reward centring {cfg.center_rewards_coefficient:g}' if cfg.center_rewards_coefficient else ''}")
        loader = PreferenceLoader(train, **split, sequences=True)
        fingerprint = preference_fingerprint(train)

    setup = cfg  # with LoRA the new head trains in full, as PEFT's task_type=SEQ_CLS keeps `score` (cfg is unchanged)
    if cfg.peft.method != "none":
        setup = dataclasses.replace(cfg, peft=dataclasses.replace(
            cfg.peft, modules_to_save=list(dict.fromkeys([*cfg.peft.modules_to_save, "score"]))))
    trainable = recipe.make_trainable(reward_model, setup, run, tokenizer=tokenizer)
    model = trainable.model

    def rewards_of(batch):  # (B,) chosen and (B,) rejected rewards
        rewards = model(batch.input_ids, batch.lengths)
        return rewards[:batch.num_pairs], rewards[batch.num_pairs:]

    def pair_loss(batch):  # (Σ per-pair losses, pairs, metrics as sums)
        batch = batch.to(run.device)
        chosen, rejected = rewards_of(batch)
        losses = bradley_terry_loss(chosen, rejected, margins=batch.margins,
                                    center_rewards_coefficient=cfg.center_rewards_coefficient)
        return losses.sum(), batch.num_pairs, reward_pair_metrics(chosen, rejected)

    def step_batch_loss(batch):  # (Σ per-step losses, labelled steps, metrics as sums)
        batch = batch.to(run.device)
        logits = model(batch.input_ids, at=(batch.rows, batch.positions))
        return step_loss(logits, batch.labels).sum(), len(batch.labels), step_metrics(logits, batch.labels)

    def evaluate_steps() -> dict:
        scored = StepwiseLoader(held, batch_size=cfg.batch_size, pad_id=pad_id, seed=0, shuffle=False,
                                max_len=cfg.seq_len)
        total, steps, right, solutions_right, wrong, first_found = 0.0, 0, 0.0, 0, 0, 0
        with torch.no_grad():
            for batch in scored:
                batch = batch.to(run.device)
                with loop.autocast():
                    logits = model(batch.input_ids, at=(batch.rows, batch.positions)).float()
                total += float(step_loss(logits, batch.labels).sum())
                steps, right = steps + len(logits), right + float(step_metrics(logits, batch.labels)["step_accuracy"])
                for r in range(batch.num_solutions):
                    mine = batch.rows == r
                    said, labels = logits[mine] > 0, batch.labels[mine].bool()
                    solutions_right += bool(said.all()) == bool(labels[-1])
                    if not labels.all():
                        wrong += 1
                        first_found += (not said.all()) and int((~said).nonzero()[0]) == int((~labels).nonzero()[0])
        return {"eval_loss": total / steps, "eval_step_accuracy": right / steps,
                "eval_solution_accuracy": solutions_right / len(held),
                **({"eval_first_error_accuracy": first_found / wrong} if wrong and cfg.step_labels == "each" else {})}

    def evaluate(step: int) -> dict:
        if not held:
            return {}
        if cfg.objective == "prm":
            was_training = model.training
            model.eval()
            result = evaluate_steps()
            model.train(was_training)
            return result
        scored = PreferenceLoader(held, batch_size=cfg.batch_size, pad_id=pad_id, seed=0, shuffle=False,
                                  max_len=cfg.seq_len, sequences=True)
        chosen_all, rejected_all, lengths, total = [], [], [], 0.0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in scored:
                batch = batch.to(run.device)
                with loop.autocast():
                    chosen, rejected = rewards_of(batch)
                total += float(bradley_terry_loss(chosen, rejected, margins=batch.margins,
                                                  center_rewards_coefficient=cfg.center_rewards_coefficient).sum())
                chosen_all.append(chosen.float().cpu())
                rejected_all.append(rejected.float().cpu())
                lengths.append(batch.response_tokens.cpu().view(2, -1))
        model.train(was_training)
        chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
        tokens = torch.cat(lengths, dim=1)  # (2, pairs): chosen, rejected
        every = torch.cat([chosen, rejected])
        sums = reward_pair_metrics(chosen, rejected)
        return {"eval_loss": total / len(chosen),
                **{f"eval_{k}": v for k, v in mean_reward_metrics(sums, len(chosen)).items()},
                "eval_reward/min": float(every.min()), "eval_reward/mean": float(every.mean()),
                "eval_reward/max": float(every.max()),
                "eval_length_correlation": pearson_correlation(every, torch.cat([tokens[0], tokens[1]]))}

    loop = TrainLoop(cfg, "reward", run.out, model, trainable.optimizer, run.device, run.precision,
                     state={"loader": loader}, evaluate=evaluate, flops_per_token=trainable.flops_per_token,
                     par=run.par, global_batch=run.global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "peft": cfg.peft.method,
                               "data": fingerprint, "objective": cfg.objective,
                               **({"step_labels": "last"} if cfg.step_labels == "last" else {}),
                               "center_rewards_coefficient": cfg.center_rewards_coefficient})
    loss_fn = step_batch_loss if cfg.objective == "prm" else pair_loss
    for _ in loop:
        micro = [loader.next_batch() for _ in range(run.grad_accum)]
        result = loop.accumulate(micro, loss_fn)
        sums = {k: v for k, v in result.items() if k not in ("loss", "count")}
        loop.optimizer_step({"loss": result["loss"], **mean_reward_metrics(sums, result["count"])},
                            tokens=sum(b.input_ids.numel() for b in micro))

    plain = loop.export_model()
    if plain is not None:  # rank 0: one sequence-classification directory, a LoRA merged in
        if cfg.peft.method != "none":
            plain = merge_lora(plain)
        if template and template != tokenizer.chat_template:
            tokenizer.chat_template = template  # what the judge and `reward score` then render with
        save_reward_model(plain, loop.out, tokenizer=tokenizer)
        write_lineage(loop.out, {**lineage, "stage": "reward", "parent": cfg.model, "chat_template_trained": template,
                                 "peft": cfg.peft.method, "reward_objective": cfg.objective,
                                 **({"reward_step_labels": cfg.step_labels} if cfg.objective == "prm" else {})})
    if cfg.objective == "prm":
        return loop.finish({"objective": "prm", "step_labels": cfg.step_labels, "solutions": len(train), "held_out_solutions": len(held),
                            **stats.counts(), "peft": cfg.peft.method,
                            "trainable_parameters": trainable.trainable_parameters})
    return loop.finish({"pairs": len(train), "held_out_pairs": len(held), "margins": margins,
                        **stats.counts(), "peft": cfg.peft.method,
                        "trainable_parameters": trainable.trainable_parameters})
