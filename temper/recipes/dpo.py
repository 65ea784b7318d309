"""Direct preference optimisation and its family: align a model with preference pairs, no
reward model, no RL (Rafailov et al. 2023):

    L_DPO = -E[ log sigma( beta * log pi(y_w|x)/pi_ref(y_w|x) - beta * log pi(y_l|x)/pi_ref(y_l|x) ) ]

    temper dpo model=runs/sft                                     # the built-in world's pairs
    temper dpo model=DIR data=pairs.jsonl loss_type=ipo beta=0.5
    temper dpo model=DIR data=hh-rlhf/harmless-base-test.jsonl.gz template=none
    temper dpo model=DIR peft.method=lora                         # reference: the adapter disabled
    temper dpo model=DIR loss_type=[sigmoid,sft] loss_weights=[1,0.2]   # RPO: DPO + NLL on the chosen
    temper dpo model=runs/sft rounds=2 judge=rule:world                  # iterative: temper.align.online

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
    model: str = opt("runs/sft", "the policy's starting point: a model directory (usually SFT's)")
    ref_model: str | None = opt(None, "the reference model directory (default: model)")
    reference: Literal["auto", "copy", "adapter", "precomputed"] = opt(
        "auto", "the frozen reference: a copy, the adapter disabled, or log-probs computed once "
                "(auto: adapter with LoRA, else copy)")
    data: list[str] = opt([], "preference rows (empty: the built-in world's preference/train.jsonl)")
    eval_data: list[str] = opt([], "held-out pairs (empty: the world's preference/test.jsonl, or eval_fraction of data)")
    eval_fraction: float = opt(0.05, "share of pairs held out when eval_data is empty")
    eval_pairs: int = opt(200, "held-out pairs scored at each evaluation (0: all)")
    columns: dict = opt({}, "rename columns to temper's, e.g. columns.chosen=good columns.rejected=bad")
    skip_bad_rows: bool = opt(True, "skip bad rows (an empty answer, identical answers, ...), count them and warn "
                                    "naming the first of each reason (false: stop at the first bad row)")
    max_bad_row_fraction: float = opt(0.1, "stop when more than this share of the rows read is bad (skipped rows "
                                           "are expected to be few; many mean a wrong format or columns=)")
    limit: int = opt(0, "read at most this many rows of data (0: all)")
    implicit_prompt: Literal["turn", "common_prefix"] = opt(
        "turn", "implicit prompts end at the last shared '\\n\\nAssistant:' (turn) or are TRL's common prefix")
    template: str | None = opt(None, "chat template for message rows (default: the model's; string rows use none)")
    seq_len: int = opt(512, "longest prompt + answer in tokens: a longer pair is cut, never dropped: its prompt "
                            "keeps its end (down to seq_len/2), then its answers keep their start")
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
    general_data: list[str] = opt([], "general text for the drift perplexity (default: the pretraining shards)")
    output_dir: str = opt("runs/dpo", "where the aligned model directory, metrics and checkpoints go")
    batch_size: int = opt(8, "pairs per micro-batch (per rank)")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    global_batch_size: int = opt(0, "pairs per optimiser step over all ranks (0: batch_size x grad_accum x "
                                    "data-parallel ranks); when set, grad_accum follows from it")
    max_steps: int = opt(200, "optimiser steps")
    seed: int = opt(0, "seed for data order and initialisation")
    resume: str = opt("", "'' starts fresh; 'auto' continues from the newest valid checkpoint; or a path")
    overwrite: bool = opt(False, "start over in an output_dir that holds an earlier run")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "fp32 on CPU and bf16 on GPU by default")
    compile: bool = opt(False, "torch.compile the model")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward to save memory")
    strategy: str = opt("auto", "none (one process), ddp, fsdp, or auto: ddp under torchrun, else none")
    parallel: ParallelConfig = opt(ParallelConfig(), "FSDP options")
    eval_batches: int = opt(8, "batches of general text for the drift perplexity (0: all)")
    peak_flops: float = opt(0.0, "the device's peak FLOP/s for MFU (0: measure a matmul now)")
    peft: PeftConfig = opt(PeftConfig(), "parameter-efficient training (peft.method=lora|dora|...)")
    optim: OptimConfig = opt(OptimConfig(lr=5e-6, weight_decay=0.0), "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig(warmup_ratio=0.1), "learning-rate schedule")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(every=0), "checkpointing")
    logging: LoggingConfig = opt(LoggingConfig(every=10, eval_every=50, eval_at_start=True), "logging and evaluation")
    # iterative (online) DPO and AI feedback: temper.align.online
    rounds: int = opt(0, "online rounds: sample from the policy, judge, pair, train a DPO round, repeat (0: offline)")
    judge: str = opt("rule:world", "what makes a round's pairs: rule:world, regex:PATTERN, callable:MODULE:FUNC, "
                                   "llm:MODEL_DIR, reward:MODEL_DIR (a reward model), or constitution:MODEL_DIR "
                                   "(AI feedback)")
    constitution: str = opt("", "principles for judge=constitution:... (default: the shipped constitutions/default.md)")
    online_prompts: list[str] = opt([], "prompt rows for the rounds (default: the built-in world's rl/train.jsonl)")
    prompts_per_round: int = opt(64, "prompts answered each round: the next ones of a seeded shuffle (0: all)")
    samples_per_prompt: int = opt(4, "responses sampled per prompt each round")
    temperature: float = opt(1.0, "sampling temperature of the policy's responses")
    top_p: float = opt(1.0, "nucleus sampling of the policy's responses (1: off)")
    max_new_tokens: int = opt(48, "longest sampled response (and critique, and revision)")
    skip_bad_judgements: bool = opt(True, "skip and count responses the judge fails on (false: stop at the first)")
    monitor_judge: str = opt("", "a scoring judge reported before and after each round (default: judge, if it scores)")

    def validate(self) -> None:
        import difflib

        from temper.align.online import check_config
        from temper.data.preference import COLUMNS
        from temper.losses.preference import LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES

        check_config(self)

        for key in ("batch_size", "grad_accum", "max_steps", "seq_len"):
            if getattr(self, key) < 1:
                raise TemperError(f"{key} must be at least 1, got {getattr(self, key)}")
        check_range("global_batch_size", self.global_batch_size, low=0)
        check_range("eval_fraction", self.eval_fraction, low=0.0, high=1.0, high_open=True)
        for key in ("eval_pairs", "eval_batches", "peak_flops", "max_prompt_len", "limit"):
            check_range(key, getattr(self, key), low=0)
        check_range("max_bad_row_fraction", self.max_bad_row_fraction, low=0.0, high=1.0)
        check_range("beta", self.beta, low=0.0, low_open=True)
        check_range("label_smoothing", self.label_smoothing, low=0.0, high=0.5)
        if not self.loss_type:
            raise TemperError(f"loss_type needs at least one of {', '.join(LOSS_TYPES)}")
        if "kto" in self.loss_type and self.loss_type != ["kto"]:
            raise TemperError("loss_type=kto trains on unpaired examples: it does not combine with pair losses")
        if self.kto and self.reference == "precomputed":
            raise TemperError("reference=precomputed is for pair losses; KTO's reference point needs the reference "
                              "on every batch's mismatched rows: use reference=copy or adapter")
        for key in ("desirable_weight", "undesirable_weight"):
            check_range(key, getattr(self, key), low=0.0)
        for kind in self.loss_type:
            if kind not in (*LOSS_TYPES, "kto"):
                close = difflib.get_close_matches(kind, (*LOSS_TYPES, "kto"), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise TemperError(f"loss_type '{kind}' is not one of {', '.join(LOSS_TYPES)}, kto{hint}")
        for ours in self.columns:
            if ours not in COLUMNS:
                close = difflib.get_close_matches(str(ours), COLUMNS, n=1)
                hint = f" (did you mean 'columns.{close[0]}'?)" if close else ""
                raise TemperError(f"columns.{ours}: not a preference column{hint}; columns renames "
                                  f"{', '.join(COLUMNS)}")
        if self.loss_weights and len(self.loss_weights) != len(self.loss_type):
            raise TemperError(f"loss_weights has {len(self.loss_weights)} numbers for {len(self.loss_type)} loss "
                              "types: give one weight per loss_type")
        if self.eval_data and self.eval_fraction != Config.eval_fraction:
            raise TemperError("eval_fraction splits data= only when eval_data is empty; give one of them")
        if self.parallel.pp > 1 or self.parallel.tp > 1:
            raise TemperError("parallel.pp and parallel.tp are for pretraining for now: align with strategy=fsdp or ddp")
        if self.peft.method != "none" and self.strategy == "fsdp":
            raise TemperError(f"peft.method={self.peft.method} with strategy=fsdp is not supported yet: use strategy=ddp")
        reference_free = all(k in REFERENCE_FREE_LOSS_TYPES for k in self.loss_type)
        if reference_free and (self.reference != "auto" or self.ref_model):
            raise TemperError(f"loss_type={self.loss_type} needs no reference model: drop reference= and ref_model=")
        if self.reference == "adapter" and self.peft.method not in ("lora", "dora", "qlora"):
            raise TemperError("reference=adapter disables a LoRA adapter to get the reference: it needs "
                              "peft.method=lora, dora or qlora")
        if self.reference == "adapter" and self.ref_model:
            raise TemperError("reference=adapter uses the adapter's own base; drop ref_model= (or use reference=copy)")

    @property
    def kto(self) -> bool:
        return self.loss_type == ["kto"]

    @property
    def needs_reference(self) -> bool:
        from temper.losses.preference import REFERENCE_FREE_LOSS_TYPES

        return not all(k in REFERENCE_FREE_LOSS_TYPES for k in self.loss_type)

    def reference_mode(self) -> str | None:
        if not self.needs_reference:
            return None
        if self.reference == "auto":
            return "adapter" if self.peft.method in ("lora", "dora", "qlora") and not self.ref_model else "copy"
        return self.reference


# ----------------------------------------------------------------------------- data


def resolve_pairs(cfg: Config, lineage: dict, tokenizer, template: str | None):
    """(training pairs, held-out pairs, stats of each) as encoded pairs (KTO: unpaired examples;
    a pair becomes a desirable and an undesirable example, as TRL unpairs them)."""
    from temper.data.preference import load_preferences

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
    else:  # a deterministic share of the training pairs
        from temper.data.sft import split_held_out

        train, held = split_held_out(train, cfg.eval_fraction, cfg.seed)
    if not train:
        raise TemperError("no preference data left to train on (see the skipped rows above)")
    return train, held[:cfg.eval_pairs] if cfg.eval_pairs else held, stats, held_stats


# ----------------------------------------------------------------------------- log-probs


def pair_logps(model, batch, *, with_logits: bool = False):
    """(log-probs (R,), completion tokens (R,), Σ over completion tokens of the vocabulary-mean
    logit (R,) or None) of the R sequences of a batch: for pairs, chosen and rejected in one
    forward, padded one a row or packed (padding-free) several a row.

    The output layer scores the completion tokens only: prompts and padding go through the
    blocks but cost no (tokens x vocab) work, forward or backward."""
    from temper.losses import IGNORE_INDEX
    from temper.losses.clm import output_weight, replicated_local
    from temper.losses.logprobs import sequence_logprobs

    hidden = model(batch.inputs, return_hidden=True, positions=batch.positions,
                   mask=batch.attention_mask())  # (rows, T, C)
    weight = output_weight(model)
    index, R = batch.sequence_index(), batch.completion_tokens.shape[0]  # the sequence of every position
    logps, counts = sequence_logprobs(hidden, weight, batch.targets, sequence_index=index, num_sequences=R)
    logits_sum = None
    if with_logits:  # mean over the vocabulary of h @ W^T is h @ mean(W): no (tokens x vocab) tensor
        scored = batch.targets != IGNORE_INDEX
        mean_row = replicated_local(weight).detach().float().mean(0)  # (C,)
        per_token = hidden.detach()[scored].float() @ mean_row  # (N,)
        logits_sum = per_token.new_zeros(R).index_add(0, index[scored], per_token)
    return logps, counts, logits_sum


def precompute_reference(pairs, ref_model, *, pad_id: int, device, autocast, batch_size: int = 16,
                         pack_len: int = 0) -> None:
    """Fill each pair's `ref_logps` with the reference model's (chosen, rejected) log-probs."""
    import torch

    from temper.data.preference import collate_pairs

    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            batch = collate_pairs(chunk, pad_id, pack_len=pack_len).to(device)
            with autocast():
                logps, _, _ = pair_logps(ref_model, batch)
            B = len(chunk)
            for p, c, r in zip(chunk, logps[:B].tolist(), logps[B:].tolist()):
                p.ref_logps = (c, r)


def reference_cache(out: Path, pairs, ref_dir: str, fingerprint: str, compute) -> None:
    """Reference log-probs of `pairs`, computed once and kept in `out/reference_logps.safetensors`
    (keyed by the data's and the reference model's fingerprints); read back on a resume."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    from temper.io import atomic_write_bytes

    path = out / "reference_logps.safetensors"
    key = json.dumps({"data": fingerprint, "reference": str(Path(ref_dir).resolve()), "pairs": len(pairs)})
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    values = f.get_tensor("logps").tolist()
                    for p, (c, r) in zip(pairs, values):
                        p.ref_logps = (c, r)
                    return
        except Exception:  # a damaged cache is computed again
            pass
    compute()
    table = torch.tensor([list(p.ref_logps) for p in pairs], dtype=torch.float64)
    atomic_write_bytes(path, save({"logps": table}, metadata={"key": key}))


# ----------------------------------------------------------------------------- the run


def run(cfg: Config) -> dict:
    if cfg.rounds:  # iterative DPO: each round samples, judges, and comes back here with rounds=0
        from temper.align.online import run_online

        return run_online(cfg)
    import torch

    from temper.data.chat import resolve_template, stop_settings
    from temper.data.preference import PreferenceLoader, preference_fingerprint
    from temper.data.shards import TokenLoader
    from temper.data.tokenizer import Tokenizer
    from temper.eval.perplexity import evaluate_batches
    from temper.io import refuse_same_dir
    from temper.lineage import read_lineage, write_lineage
    from temper.losses.preference import (
        kto_loss,
        kto_metrics,
        mean_preference_metrics,
        preference_loss,
        preference_metrics,
    )
    from temper.models import load_model, save_model
    from temper.peft import apply_peft, save_peft
    from temper.peft.lora import disable_adapters
    from temper.recipes.sft import resolve_general_text
    from temper.train import engine
    from temper.train.distributed import global_batch as global_batch_size
    from temper.train.distributed import unwrap, wrap_model
    from temper.train.loop import TrainLoop
    from temper.train.optim import build_optimizer

    refuse_same_dir(cfg.output_dir, cfg.model, "model")
    out, device, precision, par = engine.start_run(cfg, cfg.output_dir, cfg.device, cfg.precision, cfg.seed)
    grad_accum, global_batch = global_batch_size(cfg, par.dp)
    mode = cfg.reference_mode()

    # model, tokenizer, template (message rows only; string rows are used as they are)
    model = load_model(cfg.model, device=device, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(cfg.model)
    lineage = read_lineage(cfg.model)
    template = None if cfg.template == "none" else resolve_template(cfg.template, tokenizer)

    # data
    train, held, stats, held_stats = resolve_pairs(cfg, lineage, tokenizer, template)
    if par.is_main:
        print(f"dpo data: {stats.summary()}; {len(held)} held-out pairs | loss {'+'.join(cfg.loss_type)} "
              f"beta={cfg.beta} | reference: {mode or 'none (reference-free loss)'}", file=sys.stderr)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    pack_len = cfg.seq_len if cfg.padding_free else 0
    autocast = engine.precision_context(precision, device)

    # the reference: a frozen copy, the adapter disabled, or log-probs computed once
    ref_model = None
    if mode in ("copy", "precomputed"):
        ref_model = load_model(cfg.ref_model or cfg.model, device=device, dtype=torch.float32).eval()
        ref_model.requires_grad_(False)
    if mode == "precomputed":
        def compute():
            precompute_reference(train + held, ref_model, pad_id=pad_id, device=device, autocast=autocast,
                                 pack_len=pack_len)

        fingerprint = preference_fingerprint(train + held)
        cache = lambda: reference_cache(out, train + held, cfg.ref_model or cfg.model, fingerprint, compute)  # noqa: E731
        if par.world_size > 1:
            par.agree(cache)  # rank 0 computes and writes; every rank then reads the file
        cache()
        ref_model = None  # no reference model while training
        if device.type == "cuda":
            torch.cuda.empty_cache()

    loader = PreferenceLoader(train, batch_size=cfg.batch_size, pad_id=pad_id, seed=cfg.seed, rank=par.dp_rank,
                              world_size=par.dp, grad_accum=grad_accum, kl=cfg.kto, max_len=cfg.seq_len,
                              pack_len=pack_len)
    if par.world_size > 1:
        par.agree(lambda: resolve_general_text(cfg, lineage, tokenizer, out) and None)
    general = resolve_general_text(cfg, lineage, tokenizer, out)

    # the trainable part
    peft_info = apply_peft(model, cfg.peft, tokenizer)
    if par.is_main:
        share = peft_info["trainable"] / peft_info["total"]
        print(f"trainable parameters: {peft_info['trainable']:,} of {peft_info['total']:,} ({share:.2%}); "
              f"peft.method={cfg.peft.method} | {par.describe()}", file=sys.stderr)
    model.train()
    # per position run (chosen and rejected rows both count as positions): the policy's forward and backward,
    # plus a reference model's forward (a third of that) unless the reference is precomputed or not needed
    flops = engine.flops_per_token(model, cfg.seq_len) * (4 / 3 if mode in ("copy", "adapter") else 1)
    model = wrap_model(model, par, precision=precision, activation_checkpointing=cfg.activation_checkpointing,
                       compile=cfg.compile)
    optimizer = build_optimizer(model, cfg.optim)

    def reference_logps(batch):
        if mode is None:
            return None
        if mode == "precomputed":
            return batch.ref_logps
        with torch.no_grad():
            if mode == "adapter":
                with disable_adapters(unwrap(model)):
                    return pair_logps(model, batch)[0]
            return pair_logps(ref_model, batch)[0]

    def kto_batch_loss(batch):  # (Σ per-example losses, examples, TRL's KTO metrics as sums)
        batch = batch.to(device)
        B = batch.num_examples
        ref = reference_logps(batch)  # first: its activations are freed before the policy's are kept
        logps, _, _ = pair_logps(model, batch)  # rows [0, B): the examples; [B, 2B): mismatched (KL) rows
        # the reference point: mean log-ratio of the mismatched rows, averaged over the data-parallel ranks
        kl = par.all_reduce_sum((logps[B:] - ref[B:]).detach().mean().double()) / par.dp
        losses, rewards = kto_loss(logps[:B], ref[:B], batch.labels, kl.float(), beta=cfg.beta,
                                   desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        return losses.sum(), B, kto_metrics(rewards, logps[:B], batch.labels, kl)

    def pair_loss(batch):  # (Σ per-pair losses, pairs, TRL's metrics as sums)
        if cfg.kto:
            return kto_batch_loss(batch)
        batch = batch.to(device)
        B = batch.num_pairs
        ref = reference_logps(batch)  # first: its activations are freed before the policy's are kept
        logps, counts, logits_sum = pair_logps(model, batch, with_logits=True)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            cfg.loss_type, logps[:B], logps[B:], None if ref is None else ref[:B], None if ref is None else ref[B:],
            chosen_tokens=counts[:B], rejected_tokens=counts[B:], beta=cfg.beta,
            label_smoothing=cfg.label_smoothing, loss_weights=cfg.loss_weights or None, simpo_gamma=cfg.simpo_gamma)
        metrics = preference_metrics(chosen_rewards, rejected_rewards, logps[:B], logps[B:],
                                     chosen_logits_sum=logits_sum[:B], rejected_logits_sum=logits_sum[B:],
                                     chosen_tokens=counts[:B], rejected_tokens=counts[B:])
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
        if general is not None:
            val = TokenLoader(general, "val", seq_len=min(cfg.seq_len, 256), batch_size=8, shuffle=False,
                              drop_last=False)
            result["general_ppl"] = evaluate_batches(model, val, device=device, autocast=loop.autocast,
                                                     max_batches=cfg.eval_batches)["val_ppl"]
        return result

    loop = TrainLoop(cfg, "dpo", out, model, optimizer, device, precision, state={"loader": loader},
                     evaluate=evaluate, flops_per_token=flops, par=par, global_batch=global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "peft": cfg.peft.method,
                               "data": preference_fingerprint(train), "loss_type": cfg.loss_type,
                               "beta": cfg.beta, "reference": mode})
    for _ in loop:
        micro = [loader.next_batch() for _ in range(grad_accum)]
        result = loop.accumulate(micro, pair_loss)
        sums = {k: v for k, v in result.items() if k not in ("loss", "count")}
        loop.optimizer_step({"loss": result["loss"], **mean_preference_metrics(sums, result["count"])},
                            tokens=sum(b.inputs.numel() for b in micro))

    plain = loop.export_model()
    if plain is not None and cfg.peft.method == "none":
        eos = stop_settings(tokenizer, template)[1] if template else None
        save_model(plain, out, tokenizer=tokenizer, eos_ids=eos)
    elif plain is not None:
        save_peft(plain, out, cfg.peft, base_model=str(Path(cfg.model).resolve()))
        tokenizer.save(out)
    if plain is not None:
        write_lineage(out, {**lineage, "stage": "dpo", "parent": cfg.model, "chat_template_trained": template,
                            "peft": cfg.peft.method})
    return loop.finish({"loss_type": cfg.loss_type, "beta": cfg.beta, "reference": mode, "pairs": len(train),
                        "held_out_pairs": len(held), **stats.counts(),
                        "peft": cfg.peft.method, "trainable_parameters": peft_info["trainable"]})
