"""Group relative policy optimisation (Shao et al. 2024, DeepSeekMath), as TRL 1.16's GRPOTrainer
defines it: G completions per prompt, scored by reward functions; each one's advantage is its
reward against its group's, Â_i = (r_i − mean(r)) / (std(r) + ε); a clipped importance-ratio
objective, plus β·KL(π_θ ‖ π_ref) by the k3 estimator. No value network.

    temper grpo model=runs/sft                                          # the built-in world's rl prompts, rewards=world
    temper grpo model=DIR prompts=../shared/data/gsm8k/test.jsonl rewards=gsm8k
    temper grpo model=DIR prompts=p.jsonl rewards=[gsm8k,format] reward_weights=[1,0.2]
    temper grpo model=DIR rewards=my_rewards:exact beta=0.04 peft.method=lora   # reference: the adapter disabled

Settings keep TRL's names and defaults (num_generations 8, temperature 1, max_completion_length
512, num_iterations 1, epsilon 0.2, beta 0, loss_type dapo, scale_rewards group). Batches follow
TRL: `batch_size` completions per micro-batch, `grad_accum` micro-batches per optimiser step;
a generation batch is `steps_per_generation` (default grad_accum) micro-batches, i.e.
batch_size × steps_per_generation / G prompts, used `num_iterations` times
(`temper.train.rollout.RolloutSource`, shuffled once per generation batch as TRL does).

Per generation batch (phase `rollout`): sample G completions per prompt (no autograd), old
log-probs once when the batch outlives one optimiser step (else π_old = π_θ, the ratio exactly 1),
reference log-probs once when beta > 0, rewards (phase `score`, `temper.rewards.functions`), group
advantages. Per step: the policy's log-probs with gradient and `temper.losses.grpo.grpo_loss`.
Logged with TRL's names: reward, reward_std, rewards/NAME/mean|std, frac_reward_zero_std, kl,
entropy, clip_ratio/*, completions/mean_length, completions/clipped_ratio; at evaluations a greedy
rollout on held-out prompts gives eval_reward and eval_pass_rate (the share scoring ≥ 1). The
reward-hacking watch (`temper.eval.hacking`, the `watch.*` keys) adds hacking/* to each row and warns
once when the reward climbs while eval_pass_rate does not, or completion lengths drift from the
first generation batch's.

Under torchrun (`strategy=ddp`, or auto), each rank samples its own block of the global generation
batch (world x batch_size x steps_per_generation / G prompts), its rows drawing from the sampling
streams one process would give them (`generate(first_row=)`): 2 ranks sample, score and train as
one process with the same global batch (tested). Groups never straddle ranks; the rewards are
gathered for `scale_rewards=batch` and for the logged metrics, dapo/cispo's token count is summed
over the ranks (`engine.accumulate`), the held-out prompts are split over the ranks and their scores
summed. FSDP is refused (ranks would decode different numbers of steps through sharded weights).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from temper.config import OnlyWith, check_range, opt
from temper.data.readers import RECORD_SUFFIXES
from temper.errors import TemperError
from temper.eval.hacking import RewardHackingWatch
from temper.losses.grpo import (
    LOSS_TYPES,
    group_advantages,
    grpo_loss,
    mask_truncated_completions,
    mean_grpo_metrics,
)
from temper.losses.logprobs import rollout_token_logprobs
from temper.models.generate import SamplingConfig
from temper.peft import LORA_FAMILY
from temper.rewards.functions import RewardSet, reward_metrics
from temper.rewards.judges import DEFAULT_TIMEOUT, check_timeout
from temper.train import recipe
from temper.train.distributed import unwrap
from temper.train.loop import TrainLoop
from temper.train.reference import Reference
from temper.train.rollout import (
    EmptyRollouts,
    RolloutSource,
    TextSettings,
    encode_prompts,
    generation_prompts,
    heldout_scores,
    online_prompts,
    pad_rows,
    prompt_limit,
    sample_groups,
)


@dataclass
class Config(recipe.TrainingConfig, command="grpo", capabilities=recipe.Capabilities(peft=True),
             defaults=dict(model="runs/sft", output_dir="runs/grpo", max_steps=200,
                           optim=dict(lr=1e-6, weight_decay=0.0), logging=dict(every=10, eval_every=50, eval_at_start=True),
                           peft={}, template=None, watch={})):
    resume_may_change: ClassVar = (*recipe.TrainingConfig.resume_may_change, "eval_prompts", "eval_limit",
                                   "eval_reward", "judge_timeout", "max_empty_rollouts", "watch")
    prompts: list[str] = opt([], f"prompt rows ({'/'.join(RECORD_SUFFIXES)}; default: the built-in world's rl/train.jsonl)")
    prompt_field: str = opt("auto", "the prompt column (auto: prompt, else question, else messages)")
    rewards: list[str] = opt([], "reward functions: world, gsm8k, format, length[:C], MODULE:FUNCTION, judge:JUDGE "
                                 "(default: world for the built-in world's prompts)")
    reward_weights: list[float] = opt([], "one weight per reward function (default: 1 each)")
    judge_timeout: float = opt(DEFAULT_TIMEOUT, "seconds one call of a reward function or judge may take (0: no limit)")
    num_generations: int = opt(8, "G: completions sampled per prompt (the group)")
    temperature: float = opt(1.0, "sampling temperature (also divides the logits of the log-probs, as TRL)")
    top_p: float = opt(1.0, "nucleus sampling (1: off)")
    max_completion_length: int = opt(512, "longest completion in tokens")
    max_prompt_length: int = opt(0, "keep only the last this many tokens of a longer prompt, counted (0: the "
                                    "model's positions minus max_completion_length)")
    steps_per_generation: int | None = opt(None, "micro-batches served by one generation batch (default: grad_accum)")
    num_iterations: int = opt(1, "μ: passes over each generation batch")
    epsilon: float = opt(0.2, "the clip range's lower ε (1 − ε)")
    epsilon_high: float | None = opt(None, "the clip range's upper ε (default: epsilon; DAPO: 0.28)")
    beta: float = opt(0.0, "KL coefficient (0: no reference model is loaded)")
    loss_type: str = opt("dapo", "grpo, bnpo, dr_grpo, dapo or cispo (TRL's definitions)")
    importance_sampling_level: Literal["token", "sequence"] = opt("token", "the ratio per token, or per "
                                                                           "sequence (GSPO)")
    scale_rewards: Literal["group", "batch", "none"] = opt("group", "divide advantages by the group's std, the "
                                                                    "batch's, or not at all (Dr. GRPO)")
    mask_truncated_completions: bool = opt(False, "completions cut by max_completion_length add nothing to the loss")
    eval_prompts: list[str] = opt([], "held-out prompts for the pass rate (default: the built-in world's "
                                      "rl/test.jsonl when prompts= is not given)")
    eval_limit: int = opt(64, "held-out prompts answered at each evaluation (0: all)")
    eval_reward: str = opt("", "the reward the pass rate is scored with (default: the first of rewards)")
    max_empty_rollouts: int = opt(3, "stop after this many generation batches in a row whose completions are all "
                                     "empty")

    only_with: ClassVar = (
        OnlyWith(("top_p",), "temperature > 0", lambda c: c.temperature > 0),
    )

    def validate(self) -> None:
        super().validate()
        check_range("num_generations", self.num_generations, low=2)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_range("max_completion_length", self.max_completion_length, low=1)
        for key in ("max_prompt_length", "eval_limit"):
            check_range(key, getattr(self, key), low=0)
        check_range("num_iterations", self.num_iterations, low=1)
        check_range("max_empty_rollouts", self.max_empty_rollouts, low=1)
        if self.steps_per_generation is not None:
            check_range("steps_per_generation", self.steps_per_generation, low=1)
        check_range("epsilon", self.epsilon, low=0.0)
        if self.epsilon_high is not None:
            check_range("epsilon_high", self.epsilon_high, low=0.0)
        check_range("beta", self.beta, low=0.0)
        check_timeout(self.judge_timeout)
        if self.loss_type not in LOSS_TYPES:
            raise TemperError(f"loss_type '{self.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
        if not self.global_batch_size:  # else grad_accum follows from the ranks: checked when they are known
            check_groups(self, self.grad_accum)
        if self.strategy == "fsdp":  # (parallel.tp and .pp: refused above, GRPO has neither)
            raise TemperError("strategy=fsdp: temper grpo trains data-parallel only (each rank samples its own "
                              "prompts with the whole model): use strategy=ddp (or auto)")


def check_groups(cfg: Config, grad_accum: int) -> int:
    """Micro-batches per generation batch, once a generation batch divides into groups of G."""
    steps = cfg.steps_per_generation or grad_accum
    generation = cfg.batch_size * steps
    if generation % cfg.num_generations:
        raise TemperError(f"a generation batch of {generation} completions (batch_size={cfg.batch_size} x "
                          f"steps_per_generation={steps}) does not divide into groups of "
                          f"num_generations={cfg.num_generations}: make it a multiple of {cfg.num_generations}")
    return steps


# ----------------------------------------------------------------------------- prompts


# ----------------------------------------------------------------------------- the run


def run(cfg: Config) -> dict:
    run = recipe.start(cfg)
    policy = recipe.load_policy(cfg, run)
    tokenizer, lineage = policy.tokenizer, policy.lineage
    text = TextSettings.of(tokenizer, cfg.template)
    template, stops, eos_ids, pad_id = text.template, text.stops, text.eos_ids, text.pad_id  # template None: raw text

    # prompts, rewards, lengths: every refusal before any sampling
    prompts, held, from_world = online_prompts(cfg.prompts, cfg.eval_prompts, lineage=lineage,
                                               field_name=cfg.prompt_field, eval_limit=cfg.eval_limit)
    reward_specs = cfg.rewards or (["world"] if from_world else [])
    if not reward_specs:
        raise TemperError("rewards= is required: name the reward functions, e.g. rewards=gsm8k (shipped: world, "
                          "gsm8k, format, length; or MODULE:FUNCTION, judge:JUDGE)")
    reward_options = dict(max_completion_length=cfg.max_completion_length, timeout=cfg.judge_timeout,
                          device=run.device)
    rewards = RewardSet(reward_specs, cfg.reward_weights or None, **reward_options)
    rewards.check_prompts(prompts)
    scorer = RewardSet([cfg.eval_reward or reward_specs[0]], option="eval_reward=", **reward_options) if held else None
    if scorer is not None:
        scorer.check_prompts(held)
    limit = prompt_limit(cfg.max_prompt_length, cfg.max_completion_length, policy.model.config.max_seq_len)
    train_ids, cut = encode_prompts(prompts, tokenizer, template, limit)
    held_ids, held_cut = encode_prompts(held, tokenizer, template, limit)
    G = cfg.num_generations
    generation_steps = check_groups(cfg, run.grad_accum)
    prompts_per_generation = cfg.batch_size * generation_steps // G  # this rank's
    par = run.par
    world, rank = (par.dp, par.dp_rank) if par.distributed else (1, 0)
    ranks = f" on each of {world} ranks" if world > 1 else ""
    run.say(f"grpo: {len(prompts)} prompts ({cut} cut to their last {limit} tokens), {len(held)} held-out "
            f"({held_cut} cut) | {prompts_per_generation} prompts x G={G} per generation batch{ranks}, "
            f"{generation_steps} micro-batches of {cfg.batch_size} each, x{cfg.num_iterations} | rewards "
            f"{', '.join(rewards.names)} | loss {cfg.loss_type} beta={cfg.beta} | template: "
            f"{'the model' if template else 'none (raw text)'}")

    mode = ("adapter" if cfg.peft.method in LORA_FAMILY else "copy") if cfg.beta > 0 else None
    reference = Reference.load(mode, cfg.model, device=run.device)
    trainable = recipe.make_trainable(policy.model, cfg, run, tokenizer=tokenizer,
                                      flops_factor=4 / 3 if reference.needs_model_forward else 1)
    model = trainable.model
    # π_old differs from π_θ once the generation batch outlives one optimiser step (TRL's condition)
    needs_old = run.grad_accum % (generation_steps * cfg.num_iterations) != 0
    sampling = SamplingConfig(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                              eos_token_ids=eos_ids, stop=stops)
    empty_rollouts = EmptyRollouts(cfg.max_empty_rollouts, main=run.main)
    watch = RewardHackingWatch(cfg.watch, main=run.main)

    def logprobs(m, batch, **kw):
        return rollout_token_logprobs(m, [train_ids[i] for i in batch["prompt_index"].tolist()],
                                      batch["completion_ids"].to(run.device), batch["mask"].to(run.device),
                                      temperature=cfg.temperature, pad_id=pad_id, **kw)

    def texts(rows: list[list[int]]) -> list[str]:
        return text.texts(tokenizer, rows)

    def generate() -> dict:
        # the global generation batch: world x prompts_per_generation prompts, this rank's block of them,
        # and its rows' sampling streams where one process would have them (2 ranks sample as 1)
        n, first = source.generations, rank * prompts_per_generation
        index = generation_prompts(len(prompts), n, prompts_per_generation, world=world, rank=rank, seed=cfg.seed)
        seed = cfg.seed * 1_000_003 + n
        rows = sample_groups(unwrap(model), [train_ids[i] for i in index], G,  # one shared prefill per prompt
                             SamplingConfig(**{**sampling.__dict__, "seed": seed}), pad_id=pad_id,
                             tokenizer=tokenizer, first_row=first * G).completions()
        ids, mask = pad_rows(rows, pad_id)
        truncated = torch.tensor([len(r) >= cfg.max_completion_length and r[-1] not in eos_ids for r in rows])
        lengths = mask.sum(1)
        # the first generation batch's (every rank's): the initial policy's
        watch.set_reference(float(par.all_gather_rows(lengths).float().mean()))
        if cfg.mask_truncated_completions:
            mask, _ = mask_truncated_completions(ids, mask, eos_ids, None)
        completions = texts(rows)
        # decided by all ranks alike: each sees every rank's flags
        empty_rollouts.check(par.all_gather_rows(torch.tensor([not c.strip() for c in completions])), n + 1)
        batch = {"prompt_index": torch.tensor(index).repeat_interleave(G), "completion_ids": ids, "mask": mask,
                 "lengths": lengths, "truncated": truncated}
        if needs_old:
            with torch.no_grad():
                batch["old_logps"] = logprobs(model, batch)[0].cpu()
        if mode is not None:
            batch["ref_logps"] = reference.run(model, lambda m: logprobs(m, batch)[0]).cpu()
        with loop.phase("score"):
            repeated = [prompts[i] for i in batch["prompt_index"].tolist()]
            total, per_function = rewards.score(repeated, completions, completion_ids=rows)
        batch["rewards"] = total
        for name, values in per_function.items():
            batch[f"reward/{name}"] = values
        # groups never straddle ranks; scale_rewards=batch divides by the std of every rank's rewards
        everyone, _ = group_advantages(par.all_gather_rows(total), G, scale=cfg.scale_rewards)
        batch["advantages"] = everyone[len(total) * rank:len(total) * (rank + 1)]
        return batch

    source = RolloutSource(generate, steps_per_generation=generation_steps, num_iterations=cfg.num_iterations,
                           shuffle="generation", seed=cfg.seed)
    epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    per_token_count = cfg.loss_type in ("dapo", "cispo")
    step_tokens = [0]

    def loss_fn(batch):
        logps, entropies = logprobs(model, batch, with_entropy=True)
        mask = batch["mask"].to(run.device)
        loss, metrics = grpo_loss(
            logps, batch["old_logps"].to(run.device) if "old_logps" in batch else None,
            batch["ref_logps"].to(run.device) if "ref_logps" in batch else None,
            batch["advantages"].to(run.device), mask, loss_type=cfg.loss_type,
            importance_sampling_level=cfg.importance_sampling_level, epsilon_low=cfg.epsilon,
            epsilon_high=epsilon_high, beta=cfg.beta, max_completion_length=cfg.max_completion_length,
            num_items_in_batch=1 if per_token_count else None, entropies=entropies)
        # dapo/cispo: summed over tokens, divided by the step's tokens; the others: averaged over micro-batches
        count = mask.sum() if per_token_count and step_tokens[0] else 1
        return loss, count, metrics

    def generation_metrics() -> dict:
        """Of the whole generation batch, every rank's rows (TRL gathers them too)."""
        buffer = {k: par.all_gather_rows(v) for k, v in source.buffer.items()
                  if k in ("rewards", "lengths", "truncated") or k.startswith("reward/")}
        per_function = {k[len("reward/"):]: v for k, v in buffer.items() if k.startswith("reward/")}
        out = reward_metrics(buffer["rewards"], per_function)
        out["frac_reward_zero_std"] = float(group_advantages(buffer["rewards"], G, scale=cfg.scale_rewards)[1])
        out["completions/mean_length"] = float(buffer["lengths"].float().mean())
        out["completions/clipped_ratio"] = float(buffer["truncated"].float().mean())
        return out

    def evaluate(step: int) -> dict:
        return heldout_scores(unwrap(model), held, held_ids, scorer, text, tokenizer,
                              max_new_tokens=cfg.max_completion_length, par=par)

    def fingerprint() -> str:
        digest = hashlib.sha256(json.dumps(train_ids).encode())
        return digest.hexdigest()[:16]

    loop = TrainLoop(cfg, "grpo", run.out, model, trainable.optimizer, run.device, run.precision,
                     state={"rollout": source, "watch": watch}, evaluate=evaluate if held else None,
                     on_log=watch.observe,
                     flops_per_token=trainable.flops_per_token, par=run.par, global_batch=run.global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "peft": cfg.peft.method, "data": fingerprint(),
                               "rewards": reward_specs, "num_generations": G, "loss_type": cfg.loss_type,
                               "beta": cfg.beta, "data_parallel_ranks": world})  # each rank's buffer is its own
    last: dict = {}
    for _ in loop:
        micro = [source.next() for _ in range(run.grad_accum)]
        step_tokens[0] = int(par.all_reduce_sum(sum(b["mask"].sum() for b in micro).to(par.device)))
        result = loop.accumulate(micro, loss_fn)
        sums = {k: v for k, v in result.items() if k not in ("loss", "count")}
        last = {"loss": result["loss"], **mean_grpo_metrics(sums), **generation_metrics()}
        tokens = sum(len(train_ids[i]) + b["completion_ids"].shape[1] for b in micro
                     for i in b["prompt_index"].tolist())
        loop.optimizer_step(last, tokens=tokens)

    recipe.save_outputs(loop, cfg, "grpo", tokenizer, lineage, template=template, eos_ids=eos_ids if template else None)
    rewards.close()
    if scorer is not None:
        scorer.close()
    empty_rollouts.finish()
    return loop.finish({"reward": last.get("reward"), "rewards": reward_specs, "num_generations": G,
                        "loss_type": cfg.loss_type, "beta": cfg.beta, "prompts": len(prompts),
                        "truncated_prompts": cut, "held_out_prompts": len(held), "generations": source.generations,
                        "peft": cfg.peft.method, "trainable_parameters": trainable.trainable_parameters})
