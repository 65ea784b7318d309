"""Direct preference optimisation and its family: align a model with preference pairs, no
reward model, no RL (Rafailov et al. 2023):

    L_DPO = -E[ log sigma( beta * log pi(y_w|x)/pi_ref(y_w|x) - beta * log pi(y_l|x)/pi_ref(y_l|x) ) ]

    temper dpo model=runs/sft                                     # the built-in world's pairs
    temper dpo model=DIR data=pairs.jsonl loss_type=ipo beta=0.5
    temper dpo model=DIR data=hh-rlhf/harmless-base-test.jsonl.gz                # string rows: no template
    temper dpo model=DIR peft.method=lora                         # reference: the adapter disabled
    temper dpo model=DIR loss_type=[sigmoid,sft] loss_weights=[1,0.2]   # RPO: DPO + NLL on the chosen
    temper online-dpo model=runs/sft rounds=2 judge=rule:world           # iterative: temper.workflows.online_dpo

Data: `prompt` + `chosen` + `rejected` (strings or message lists), or the implicit-prompt form
(`chosen` + `rejected`, the prompt their shared start), from .jsonl/.jsonl.gz/.json/parquet
(`temper.data.preference`). Loss types (`temper.losses.preference`, TRL's definitions):
sigmoid (DPO, with label_smoothing: cDPO), robust, hinge (SLiC), ipo, sigmoid_norm
(length-normalised), sft (NLL on the chosen), several with weights; reference-free simpo
and orpo. The reference is a frozen copy (`reference=copy`), the base with the adapter
disabled (`reference=adapter`, no second copy in memory), or log-probs computed once and
cached beside the run (`reference=precomputed`, no reference model while training).

Logged with TRL's names: loss, rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, logits/chosen, logits/rejected; the same
on held-out pairs as eval_*; and the general-text perplexity (drift), as SFT logs it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from temper.config import OnlyWith, check_range, opt
from temper.data.chat import resolve_template, stop_settings
from temper.data.preference import (
    PreferenceLoader,
    check_columns,
    load_preferences,
    preference_fingerprint,
)
from temper.data.sft import split_held_out
from temper.errors import TemperError
from temper.eval.drift import DriftMonitor
from temper.losses.logprobs import completion_logprobs
from temper.losses.preference import (
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    kto_loss,
    kto_metrics,
    mean_preference_metrics,
    preference_loss,
    preference_metrics,
)
from temper.peft import LORA_FAMILY
from temper.train import recipe
from temper.train.loop import TrainLoop
from temper.train.reference import Reference, check_same_tokenizer


@dataclass
class Config(recipe.TrainingConfig, command="dpo", capabilities=recipe.Capabilities(peft=True),
             defaults=dict(model="runs/sft", output_dir="runs/dpo", max_steps=200, optim=dict(lr=5e-6, weight_decay=0.0),
                           schedule=dict(warmup_ratio=0.1), logging=dict(every=10, eval_every=50, eval_at_start=True),
                           peft={}, columns={}, skip_bad_rows=True, max_bad_row_fraction=0.1, template=None,
                           general_data=[])):
    # the keys iterative DPO had here, now settings of its own command: where each went
    moved_keys: ClassVar[dict[str, str]] = {
        old: f"belongs to iterative DPO, which is its own command now: temper online-dpo {new}=... (and dpo.KEY=... "
             "for each round's DPO settings)"
        for old, new in {"rounds": "rounds", "judge": "judge", "constitution": "constitution", "online_prompts": "prompts",
                         "prompts_per_round": "prompts_per_round", "samples_per_prompt": "samples_per_prompt",
                         "monitor_judge": "monitor_judge", "skip_bad_judgements": "skip_bad_judgements",
                         "temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_new_tokens"}.items()}
    resume_may_change: ClassVar = (*recipe.TrainingConfig.resume_may_change, "beta", "label_smoothing", "simpo_gamma",
                                   "desirable_weight", "undesirable_weight", "loss_weights", "eval_pairs",
                                   "reference")
    ref_model: str | None = opt(None, "the reference model directory (default: model)")
    reference: Literal["auto", "copy", "adapter", "precomputed"] = opt(
        "auto", "the frozen reference: a copy, the adapter disabled, or log-probs computed once "
                "(auto: adapter with LoRA, else copy)")
    eval_pairs: int = opt(200, "held-out pairs scored at each evaluation (0: all)")
    limit: int = opt(0, "read at most this many rows of data (0: all)")
    implicit_prompt: Literal["turn", "common_prefix"] = opt(
        "turn", "implicit prompts end at the last shared '\\n\\nAssistant:' (turn) or are TRL's common prefix")
    padding_free: bool = opt(True, "pack each batch's sequences into as few rows of seq_len as hold them (same "
                                   "log-probs, no work on padding; false: one right-padded row a sequence, as TRL)")
    max_prompt_len: int = opt(0, "keep only the end of longer prompts (0: cut only to fit seq_len)")
    loss_type: list[str] = opt(["sigmoid"], "sigmoid, robust, hinge, ipo, sigmoid_norm, sft, simpo, orpo; "
                                            "several are summed with loss_weights; or kto (unpaired data)")
    loss_weights: list[float] = opt([], "one weight per loss_type (default: 1 each)")
    beta: float = opt(0.1, "the KL strength beta (the inverse temperature of the implicit reward)")
    label_smoothing: float = opt(0.0, "cDPO / robust DPO: the share of pairs assumed mislabelled")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin")
    desirable_weight: float = opt(1.0, "KTO: the weight of desirable examples' losses (lambda_D)")
    undesirable_weight: float = opt(1.0, "KTO: the weight of undesirable examples' losses (lambda_U)")

    only_with: ClassVar = (
        OnlyWith(("ref_model", "reference"), "a loss that uses a reference (every loss_type but simpo and orpo)",
                 lambda c: c.needs_reference),
        OnlyWith(("simpo_gamma",), "loss_type=simpo", lambda c: "simpo" in c.loss_type),
        OnlyWith(("label_smoothing",), "loss_type=sigmoid, robust or simpo",
                 lambda c: bool({"sigmoid", "robust", "simpo"} & set(c.loss_type))),
        OnlyWith(("desirable_weight", "undesirable_weight"), "loss_type=kto", lambda c: c.kto),
    )

    def validate(self) -> None:
        super().validate()
        for key in ("eval_pairs", "max_prompt_len", "limit"):
            check_range(key, getattr(self, key), low=0)
        check_range("beta", self.beta, low=0.0, low_open=True)
        check_range("simpo_gamma", self.simpo_gamma, low=0.0)
        check_range("label_smoothing", self.label_smoothing, low=0.0, high=0.5)
        for key in ("desirable_weight", "undesirable_weight"):
            check_range(key, getattr(self, key), low=0.0)
        if not self.loss_type:
            raise TemperError(f"loss_type needs at least one of {', '.join(LOSS_TYPES)}")
        for kind in self.loss_type:
            if kind not in (*LOSS_TYPES, "kto"):
                close = difflib.get_close_matches(kind, (*LOSS_TYPES, "kto"), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise TemperError(f"loss_type '{kind}' is not one of {', '.join(LOSS_TYPES)}, kto{hint}")
        twice = sorted({kind for kind in self.loss_type if self.loss_type.count(kind) > 1})
        if twice:
            raise TemperError(f"loss_type names {', '.join(twice)} more than once: give each loss once (loss_weights "
                              "weighs them)")
        if "kto" in self.loss_type and self.loss_type != ["kto"]:
            raise TemperError("loss_type=kto trains on unpaired examples: it does not combine with pair losses")
        if self.kto and self.reference == "precomputed":
            raise TemperError("reference=precomputed is for pair losses; KTO's reference point needs the reference "
                              "on every batch's mismatched rows: use reference=copy or adapter")
        check_columns(self.columns)
        if self.loss_weights and len(self.loss_weights) != len(self.loss_type):
            raise TemperError(f"loss_weights has {len(self.loss_weights)} numbers for {len(self.loss_type)} loss "
                              "types: give one weight per loss_type")
        for i, weight in enumerate(self.loss_weights):  # a zero weight is a loss_type left out
            check_range(f"loss_weights[{i}]", weight, low=0.0, low_open=True)
        if self.reference == "adapter" and self.peft.method not in LORA_FAMILY:
            raise TemperError("reference=adapter disables a LoRA adapter to get the reference: it needs "
                              "peft.method=lora, dora or qlora")
        if self.reference == "adapter" and self.ref_model:
            raise TemperError("reference=adapter uses the adapter's own base; drop ref_model= (or use reference=copy)")

    @property
    def kto(self) -> bool:
        return self.loss_type == ["kto"]

    @property
    def needs_reference(self) -> bool:
        return not all(k in REFERENCE_FREE_LOSS_TYPES for k in self.loss_type)

    def reference_mode(self) -> str | None:
        if not self.needs_reference:
            return None
        if self.reference == "auto":
            return "adapter" if self.peft.method in LORA_FAMILY and not self.ref_model else "copy"
        return self.reference


# ----------------------------------------------------------------------------- data


def resolve_pairs(cfg: Config, lineage: dict, tokenizer, template: str | None):
    """(training pairs, held-out pairs, stats of each) as encoded pairs (KTO: unpaired examples;
    a pair becomes a desirable and an undesirable example, as TRL unpairs them)."""
    world = lineage.get("world_dir")
    train_spec = cfg.data or ([str(Path(world) / "preference" / "train.jsonl")] if world else [])
    if not train_spec:
        raise TemperError("data= is required: the model records no built-in world to take preference pairs from")
    options = dict(max_len=cfg.seq_len, max_prompt_len=cfg.max_prompt_len, columns=cfg.columns,
                   skip_bad_rows=cfg.skip_bad_rows, max_bad_row_fraction=cfg.max_bad_row_fraction,
                   implicit_prompt=cfg.implicit_prompt, unpaired=cfg.kto)
    train, stats = load_preferences(train_spec, tokenizer, template, limit=cfg.limit, **options)
    eval_spec = cfg.eval_data or ([str(Path(world) / "preference" / "test.jsonl")] if world and not cfg.data else [])
    held_stats = None
    if eval_spec:
        held, held_stats = load_preferences(eval_spec, tokenizer, template, **options)
    else:  # a deterministic share of the training pairs (KTO: a pair's two examples stay on one side)
        group = (lambda e: tuple(e.prompt_ids)) if cfg.kto else None
        train, held = split_held_out(train, cfg.eval_fraction, cfg.seed, group=group)
    if not train:
        raise TemperError("no preference data left to train on (see the skipped rows above)")
    return train, held[:cfg.eval_pairs] if cfg.eval_pairs else held, stats, held_stats


# ----------------------------------------------------------------------------- the run


def run(cfg: Config) -> dict:
    mode = cfg.reference_mode()
    if cfg.ref_model and mode in ("copy", "precomputed"):  # log-ratios compare token by token: one tokenizer
        check_same_tokenizer(cfg.model, cfg.ref_model)
    run = recipe.start(cfg, inputs=("model", "ref_model"))

    # model, tokenizer, template (message rows only; string rows are used as they are)
    policy = recipe.load_policy(cfg, run)
    tokenizer, lineage = policy.tokenizer, policy.lineage
    template = None if cfg.template == "none" else resolve_template(cfg.template, tokenizer)

    # data
    train, held, stats, held_stats = resolve_pairs(cfg, lineage, tokenizer, template)
    run.say(f"dpo data: {stats.summary()}; {len(held)} held-out pairs | loss {'+'.join(cfg.loss_type)} "
            f"beta={cfg.beta} | reference: {mode or 'none (reference-free loss)'}")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    pack_len = cfg.seq_len if cfg.padding_free else 0

    # the reference: a frozen copy, the adapter disabled, or log-probs computed once
    reference = Reference.load(mode, cfg.ref_model or cfg.model, device=run.device)
    if mode == "precomputed":
        reference.precompute(train + held, run.out, data_fingerprint=preference_fingerprint(train + held),
                             pad_id=pad_id, autocast=run.autocast, pack_len=pack_len, agree=run.agree_first)

    loader = PreferenceLoader(train, batch_size=cfg.batch_size, pad_id=pad_id, seed=cfg.seed, rank=run.par.dp_rank,
                              world_size=run.par.dp, grad_accum=run.grad_accum, kl=cfg.kto, max_len=cfg.seq_len,
                              pack_len=pack_len)
    drift = DriftMonitor.prepare(cfg.general_data, lineage, tokenizer, run.out, seed=cfg.seed, seq_len=cfg.seq_len,
                                 max_batches=cfg.eval_batches, agree=run.agree_first)

    # the trainable part; per position run (chosen and rejected rows both count as positions): the policy's
    # forward and backward, plus a reference model's forward (a third of that) when one runs in training
    trainable = recipe.make_trainable(policy.model, cfg, run, tokenizer=tokenizer,
                               flops_factor=4 / 3 if reference.needs_model_forward else 1)
    model = trainable.model

    def kto_batch_loss(batch):  # (Σ per-example losses, examples, TRL's KTO metrics as sums)
        batch = batch.to(run.device)
        B = batch.num_examples
        ref = reference.sequence_logps(batch, policy=model)  # first: its activations are freed before the policy's
        logps, _, _ = completion_logprobs(model, batch)  # rows [0, B): the examples; [B, 2B): mismatched (KL) rows
        # the reference point: mean log-ratio of the mismatched rows, averaged over the data-parallel ranks
        kl = run.par.all_reduce_sum((logps[B:] - ref[B:]).detach().mean().double()) / run.par.dp
        losses, rewards = kto_loss(logps[:B], ref[:B], batch.labels, kl.float(), beta=cfg.beta,
                                   desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        return losses.sum(), B, kto_metrics(rewards, logps[:B], batch.labels, kl)

    def pair_loss(batch):  # (Σ per-pair losses, pairs, TRL's metrics as sums)
        if cfg.kto:
            return kto_batch_loss(batch)
        batch = batch.to(run.device)
        B = batch.num_pairs
        ref = reference.sequence_logps(batch, policy=model)  # first: its activations are freed before the policy's
        logps, counts, logits_sum = completion_logprobs(model, batch, with_logits=True)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            cfg.loss_type, logps[:B], logps[B:], None if ref is None else ref[:B], None if ref is None else ref[B:],
            chosen_tokens=counts[:B], rejected_tokens=counts[B:], beta=cfg.beta,
            label_smoothing=cfg.label_smoothing, loss_weights=cfg.loss_weights or None, simpo_gamma=cfg.simpo_gamma)
        metrics = preference_metrics(chosen_rewards, rejected_rewards, logps[:B], logps[B:],
                                     chosen_logits_sum=logits_sum[:B], rejected_logits_sum=logits_sum[B:],
                                     chosen_tokens=counts[:B], rejected_tokens=counts[B:], loss_type=cfg.loss_type)
        return losses.sum(), B, metrics

    def evaluate(step: int) -> dict:
        result: dict = {}
        if held:
            scored = PreferenceLoader(held, batch_size=cfg.batch_size, pad_id=pad_id, seed=0, shuffle=False,
                                      kl=cfg.kto, max_len=cfg.seq_len, pack_len=pack_len)
            sums: dict = {}
            total, pairs = 0.0, 0
            was_training = model.training
            model.eval()
            with torch.no_grad():
                for batch in scored:
                    with loop.autocast():
                        loss_sum, n, metrics = pair_loss(batch)
                    total, pairs = total + float(loss_sum), pairs + n
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
            model.train(was_training)
            result["eval_loss"] = total / pairs
            result.update({f"eval_{k}": v for k, v in mean_preference_metrics(sums, pairs).items()})
        if drift is not None:
            result["general_ppl"] = drift.perplexity(model, device=run.device, autocast=loop.autocast)
        return result

    loop = TrainLoop(cfg, "dpo", run.out, model, trainable.optimizer, run.device, run.precision,
                     state={"loader": loader}, evaluate=evaluate, flops_per_token=trainable.flops_per_token,
                     par=run.par, global_batch=run.global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "peft": cfg.peft.method,
                               "data": preference_fingerprint(train), "loss_type": cfg.loss_type,
                               "beta": cfg.beta, "reference": mode})
    for _ in loop:
        micro = [loader.next_batch() for _ in range(run.grad_accum)]
        result = loop.accumulate(micro, pair_loss)
        sums = {k: v for k, v in result.items() if k not in ("loss", "count")}
        loop.optimizer_step({"loss": result["loss"], **mean_preference_metrics(sums, result["count"])},
                            tokens=sum(b.inputs.numel() for b in micro))

    recipe.save_outputs(loop, cfg, "dpo", tokenizer, lineage, template=template,
                 eos_ids=stop_settings(tokenizer, template)[1] if template else None)
    return loop.finish({"loss_type": cfg.loss_type, "beta": cfg.beta, "reference": mode, "pairs": len(train),
                        "held_out_pairs": len(held), **stats.counts(),
                        "peft": cfg.peft.method, "trainable_parameters": trainable.trainable_parameters})
