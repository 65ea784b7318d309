"""PPO with a KL penalty to the SFT model (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022), as TRL's
PPOTrainer runs it: four roles, the policy and a value model trained together, a frozen reference and a
frozen reward model.

    temper ppo model=runs/sft reward_model=runs/rm                          # the built-in world's rl prompts
    temper ppo model=DIR reward_model=RM prompts=p.jsonl kl_coef=0.1 kl_estimator=k3
    temper ppo model=DIR reward_model=RM target_kl=6                        # adaptive β (Ziegler et al.)
    temper ppo model=DIR reward_model=RM peft.method=lora                   # reference: the adapter disabled
    temper ppo model=DIR reward_model=RM value_model=DIR                    # the value model from the SFT model

Roles: the policy (`model=`, LoRA with `peft.*`); the reference (a frozen copy of `model=`, or with LoRA
the policy with its adapter disabled); the reward model (`reward_model=`, a `*ForSequenceClassification`
directory scored through `temper.rewards` as `judge:reward:DIR`, which renders prompt + completion as it
was trained; `rewards=` adds reward functions to its score); the value model (`temper.models.value`: its
own body and a head read at every position (a value head on the policy's body is not offered),
initialised from `value_model=`, by default the reward
model, as TRL does, when its tokenizer is the policy's (the value model reads the policy's token ids;
else `model=`, said at the start); a causal LM directory gets a fresh head; trained in full, or with
`value_peft=true` through the policy's adapter settings (its head in full); saved, merged, in `value/`).

Settings keep TRL's PPOConfig names and defaults (num_ppo_epochs 4, num_mini_batches 1, kl_coef 0.05,
kl_estimator k1, cliprange 0.2, cliprange_value 0.2, vf_coef 0.1, gamma 1, lam 0.95, whiten_rewards
false, temperature 0.7, missing_eos_penalty none, lr 3e-6), but for the completion length, named as in
`temper grpo` (max_completion_length; TRL's response_length, default 53). A rollout batch is
batch_size x grad_accum x num_mini_batches completions per rank (TRL's local_batch_size), one per
prompt; it is used for num_ppo_epochs passes, each a new shuffle split into num_mini_batches
optimiser steps of grad_accum micro-batches (`RolloutSource(shuffle="pass")`).

Per rollout batch (phase `rollout`): sample (`sample_groups`, group size 1, KV cache, no autograd), the
policy's, the reference's log-probs and the values of every completion token, the scores (phase
`score`) less `missing_eos_penalty` for completions that never ended, the per-token rewards −β·KL_t
plus the score on the last token (the rollout's completion mask, which holds the EOS, so pad == EOS
is safe), GAE and whitened advantages (`temper.losses.ppo`). β is `kl_coef`, or with `target_kl` > 0
the adaptive controller's, updated after each rollout batch (checkpointed). Per step: the clipped
surrogate plus vf_coef x the clipped value loss, each a mean over a micro-batch's tokens, averaged over
the micro-batches as TRL's accumulation does.

Logged with TRL's names (objective/scores, objective/kl, objective/non_score_reward,
objective/rlhf_reward, objective/entropy, policy/entropy_avg, policy/approxkl_avg,
policy/clipfrac_avg, loss/policy_avg, loss/value_avg, val/clipfrac_avg, val/ratio), plus
val/explained_variance, beta, episode, completions/mean_length, completions/clipped_ratio and
completions/repetition_rate (the share of repeated token 3-grams, `temper.eval.hacking`).
objective/entropy is TRL's: the mean over completions of Σ_t −log π_old(y_t) over the completion's
tokens (TRL's padding positions, filled with its INVALID_LOGPROB, enter its sum too; here they do
not); policy/entropy_avg is the policy's entropy per token at the training forward. The *_avg
metrics average over the micro-batches of the rollout batch's steps so far: at its last step, TRL's
whole-update means. The reward-hacking watch (`watch.*`) reads objective/scores and objective/kl
(`watch.max_kl`, 10 by default here), length and repetition against the first rollout's, and
eval_pass_rate when held-out prompts are scored (`eval_reward=`, the world's checker on the built-in
world). Under torchrun each rank samples its block of the global rollout batch and the whitening,
KL controller and metrics use every rank's rows (DDP; FSDP refused, as GRPO).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from temper.config import OnlyWith, check_range, opt
from temper.data.readers import RECORD_SUFFIXES
from temper.data.tokenizer import Tokenizer, tokenizer_difference
from temper.errors import TemperError
from temper.eval.hacking import RewardHackingWatch, repetition_rate
from temper.losses.logprobs import rollout_token_logprobs
from temper.losses.ppo import (
    KL_ESTIMATORS,
    KLController,
    explained_variance,
    gae,
    masked_mean,
    masked_whiten,
    per_token_kl,
    policy_loss,
    token_rewards,
    value_loss,
)
from temper.models.generate import SamplingConfig
from temper.models.hf import read_hf_config
from temper.models.reward import check_reward_model_dir, save_reward_model
from temper.models.value import load_value_model, rollout_token_values
from temper.peft import LORA_FAMILY
from temper.peft.lora import merge_lora
from temper.rewards.functions import RewardSet
from temper.rewards.judges import DEFAULT_TIMEOUT, check_timeout
from temper.train import recipe
from temper.train.distributed import unwrap
from temper.train.loop import TrainLoop
from temper.train.reference import Reference
from temper.train.rollout import (
    EmptyRollouts,
    GenerationMeans,
    RolloutSource,
    TextSettings,
    encode_prompts,
    generation_prompts,
    heldout_scores,
    online_prompts,
    prompt_limit,
    sample_groups,
)

STAT_KEYS = ("scores", "kl", "non_score", "neg_logp", "lengths", "truncated", "repetition")
AVERAGED = {"loss/policy_avg": "pg_loss", "loss/value_avg": "vf_loss", "policy/clipfrac_avg": "clipfrac",
            "policy/approxkl_avg": "approxkl", "val/ratio": "ratio", "val/clipfrac_avg": "vf_clipfrac",
            "policy/entropy_avg": "entropy"}


@dataclass
class Config(recipe.TrainingConfig, command="ppo", capabilities=recipe.Capabilities(peft=True),
             defaults=dict(model="runs/sft", output_dir="runs/ppo", max_steps=200,
                           optim=dict(lr=3e-6, weight_decay=0.0), logging=dict(every=10, eval_every=50, eval_at_start=True),
                           peft={}, template=None, watch=dict(max_kl=10.0))):
    resume_may_change: ClassVar = (*recipe.TrainingConfig.resume_may_change, "eval_prompts", "eval_limit",
                                   "eval_reward", "judge_timeout", "max_empty_rollouts", "watch")
    reward_model: str = opt("", "the reward model: a *ForSequenceClassification directory (temper reward, TRL's "
                                "RewardTrainer)")
    value_model: str = opt("", "where the value model starts: a reward-model directory (body and head) or a causal "
                               "LM's (its body, a new head) (default: reward_model, as TRL)")
    value_peft: bool = opt(False, "give the value model the policy's adapter settings too (its head trained in "
                                  "full), instead of training every weight")
    rewards: list[str] = opt([], "reward functions added to the reward model's score (world, gsm8k, format, "
                                 "length[:C], MODULE:FUNCTION, judge:JUDGE)")
    reward_weights: list[float] = opt([], "one weight per reward, the reward model's first (default: 1 each)")
    prompts: list[str] = opt([], f"prompt rows ({'/'.join(RECORD_SUFFIXES)}; default: the built-in world's rl/train.jsonl)")
    prompt_field: str = opt("auto", "the prompt column (auto: prompt, else question, else messages)")
    judge_timeout: float = opt(DEFAULT_TIMEOUT, "seconds one call of a reward function or judge may take (0: no limit)")
    temperature: float = opt(0.7, "sampling temperature (also divides the logits of the log-probs, as TRL)")
    top_p: float = opt(1.0, "nucleus sampling (1: off)")
    max_completion_length: int = opt(53, "longest completion in tokens (TRL's response_length)")
    max_prompt_length: int = opt(0, "keep only the last this many tokens of a longer prompt, counted (0: the "
                                    "model's positions minus max_completion_length)")
    num_ppo_epochs: int = opt(4, "passes over each rollout batch")
    num_mini_batches: int = opt(1, "optimiser steps per pass (each grad_accum micro-batches of batch_size)")
    kl_coef: float = opt(0.05, "β: the KL penalty's coefficient (its start with target_kl)")
    kl_estimator: str = opt("k1", "per-token KL: k1 (log π/π_ref) or k3 ((r − 1) − log r, never negative)")
    target_kl: float = opt(0.0, "steer β toward this KL (summed over a completion) with Ziegler et al.'s "
                                "adaptive controller (0: β fixed)")
    kl_horizon: float = opt(10_000.0, "the adaptive controller's horizon (completions)")
    cliprange: float = opt(0.2, "ε of the clipped surrogate")
    cliprange_value: float = opt(0.2, "the value predictions' clip range around the rollout's")
    vf_coef: float = opt(0.1, "the value loss's weight")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE's λ")
    whiten_rewards: bool = opt(False, "whiten the per-token rewards (mean kept) before GAE")
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of a completion that never ends")
    eval_prompts: list[str] = opt([], "held-out prompts for eval_reward and eval_pass_rate (default: the built-in "
                                      "world's rl/test.jsonl when prompts= is not given)")
    eval_limit: int = opt(64, "held-out prompts answered at each evaluation (0: all)")
    eval_reward: str = opt("", "the rule the held-out answers are scored with (default: world on the built-in "
                               "world's prompts, else the reward model)")
    max_empty_rollouts: int = opt(3, "stop after this many rollout batches in a row whose completions are all "
                                     "empty")

    only_with: ClassVar = (
        OnlyWith(("top_p",), "temperature > 0", lambda c: c.temperature > 0),
        OnlyWith(("kl_horizon",), "target_kl > 0", lambda c: c.target_kl > 0),
        OnlyWith(("value_peft",), "peft.method=lora, dora or qlora", lambda c: c.peft.method in LORA_FAMILY),
    )

    def validate(self) -> None:
        super().validate()
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        for key in ("max_completion_length", "num_ppo_epochs", "num_mini_batches", "max_empty_rollouts"):
            check_range(key, getattr(self, key), low=1)
        for key in ("max_prompt_length", "eval_limit"):
            check_range(key, getattr(self, key), low=0)
        for key in ("kl_coef", "target_kl", "cliprange", "cliprange_value", "vf_coef"):
            check_range(key, getattr(self, key), low=0.0)
        check_range("kl_horizon", self.kl_horizon, low=0.0, low_open=True)
        check_range("gamma", self.gamma, low=0.0, high=1.0)
        check_range("lam", self.lam, low=0.0, high=1.0)
        check_timeout(self.judge_timeout)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise TemperError(f"kl_estimator '{self.kl_estimator}' is not one of {', '.join(KL_ESTIMATORS)}")
        if self.strategy == "fsdp":
            raise TemperError("strategy=fsdp: temper ppo trains data-parallel only (each rank samples its own "
                              "prompts with the whole model): use strategy=ddp (or auto)")


def load_reward_specs(cfg: Config, from_world: bool) -> tuple[list[str], str | None]:
    """(the reward specs, the held-out rule's spec or None); the reward model's directory checked first."""
    specs = []
    if cfg.reward_model:
        try:
            check_reward_model_dir(cfg.reward_model)
        except (TemperError, FileNotFoundError, OSError) as e:
            raise TemperError(f"reward_model={cfg.reward_model}: {e}") from None
        specs.append(f"judge:reward:{cfg.reward_model}")
    specs += cfg.rewards
    if not specs:
        raise TemperError("reward_model= is required: the reward model's directory (or name reward functions "
                          "with rewards=)")
    return specs, cfg.eval_reward or ("world" if from_world else specs[0])


def value_start(cfg: Config, tokenizer: Tokenizer) -> tuple[str, str]:
    """(the directory the value model starts from, why). It reads the policy's token ids, so it needs the
    policy's tokenizer: `value_model=` with another is refused; by default the reward model (TRL's
    choice) when its tokenizer is the policy's, else the SFT model (`model=`) with a new head."""
    def difference(path: str) -> str | None:
        if not (Path(path) / "config.json").is_file():
            raise TemperError(f"value_model={path}: no model directory (config.json) there")
        if (Path(path) / "tokenizer.json").is_file():
            return tokenizer_difference(Tokenizer.from_dir(path), tokenizer, (f"{path}'s", "model's"))
        vocab = read_hf_config(Path(path)).get("vocab_size", 0)
        return None if vocab >= tokenizer.vocab_size else f"{vocab} embeddings for {tokenizer.vocab_size} tokens"

    if cfg.value_model:
        why = difference(cfg.value_model)
        if why:
            raise TemperError(f"value_model={cfg.value_model} has another tokenizer than model={cfg.model} ({why}): "
                              "the value model reads the policy's token ids; start it from model= (value_model="
                              f"{cfg.model}) or from a reward model trained with the policy's tokenizer")
        return cfg.value_model, "value_model="
    if cfg.reward_model and difference(cfg.reward_model) is None:
        return cfg.reward_model, "the reward model"
    why = "no reward_model=" if not cfg.reward_model else "the reward model's tokenizer is not the policy's"
    return cfg.model, f"model= with a new head ({why})"


def run(cfg: Config) -> dict:
    run = recipe.start(cfg, inputs=("model", "reward_model", "value_model"))
    policy = recipe.load_policy(cfg, run)
    tokenizer, lineage = policy.tokenizer, policy.lineage
    text = TextSettings.of(tokenizer, cfg.template)
    pad_id = text.pad_id

    # prompts, rewards, lengths, the value model's start: every refusal before any sampling
    prompts, held, from_world = online_prompts(cfg.prompts, cfg.eval_prompts, lineage=lineage,
                                               field_name=cfg.prompt_field, eval_limit=cfg.eval_limit)
    specs, eval_spec = load_reward_specs(cfg, from_world)
    value_dir, value_why = value_start(cfg, tokenizer)
    reward_options = dict(max_completion_length=cfg.max_completion_length, timeout=cfg.judge_timeout,
                          device=run.device)
    rewards = RewardSet(specs, cfg.reward_weights or None, **reward_options)
    rewards.check_prompts(prompts)
    scorer = RewardSet([eval_spec], option="eval_reward=", **reward_options) if held else None
    if scorer is not None:
        scorer.check_prompts(held)
    limit = prompt_limit(cfg.max_prompt_length, cfg.max_completion_length, policy.model.config.max_seq_len)
    train_ids, cut = encode_prompts(prompts, tokenizer, text.template, limit)
    held_ids, held_cut = encode_prompts(held, tokenizer, text.template, limit)
    steps_per_rollout = run.grad_accum * cfg.num_mini_batches  # micro-batches per pass over a rollout batch
    per_rank = cfg.batch_size * steps_per_rollout
    par = run.par
    world, rank = (par.dp, par.dp_rank) if par.distributed else (1, 0)
    run.say(f"ppo: {len(prompts)} prompts ({cut} cut to their last {limit} tokens), {len(held)} held-out "
            f"({held_cut} cut) | rollout batch {per_rank * world} completions ({per_rank} on each of {world} ranks), "
            f"{cfg.num_ppo_epochs} epochs x {cfg.num_mini_batches} minibatches | rewards "
            f"{', '.join(rewards.names)} | kl_coef={cfg.kl_coef} ({cfg.kl_estimator}"
            f"{f', target {cfg.target_kl}' if cfg.target_kl else ''}) | value model from {value_dir}: {value_why}")

    value = load_value_model(value_dir, device=run.device)
    reference = Reference.load("adapter" if cfg.peft.method in LORA_FAMILY else "copy", cfg.model,
                               device=run.device)
    # FLOPs of the train phase: the policy's and the value model's forward and backward (the rollout's
    # forwards are the rollout phase's)
    peft_modules = {"policy": cfg.peft}
    if cfg.value_peft:  # the same adapter on the value model's body; its head is new to it: trained in full
        peft_modules["value"] = dataclasses.replace(cfg.peft, modules_to_save=["score"])
    trainable = recipe.make_trainable({"policy": policy.model, "value": value}, cfg, run, tokenizer=tokenizer,
                                      peft_modules=peft_modules)
    model, value = trainable.model["policy"], trainable.model["value"]
    sampling = SamplingConfig(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                              top_p=cfg.top_p, eos_token_ids=text.eos_ids, stop=text.stops)
    controller = KLController(cfg.kl_coef, target=cfg.target_kl, horizon=cfg.kl_horizon)
    empty_rollouts = EmptyRollouts(cfg.max_empty_rollouts, main=run.main)
    watch = RewardHackingWatch(cfg.watch, reward_key="objective/scores", kl_key="objective/kl", main=run.main)
    means = GenerationMeans()
    step_now = [0]
    reduce = (lambda t: par.all_reduce_sum(t.to(par.device)).cpu()) if world > 1 else None

    def prompt_rows(batch) -> list[list[int]]:
        return [train_ids[i] for i in batch["prompt_index"].tolist()]

    def logprobs(m, batch, **kw):
        return rollout_token_logprobs(m, prompt_rows(batch), batch["completion_ids"].to(run.device),
                                      batch["mask"].to(run.device), temperature=cfg.temperature, pad_id=pad_id, **kw)

    def values_of(m, batch):
        return rollout_token_values(m, prompt_rows(batch), batch["completion_ids"].to(run.device),
                                    batch["mask"].to(run.device), pad_id=pad_id)

    def generate() -> dict:
        n = source.generations
        index = generation_prompts(len(prompts), n, per_rank, world=world, rank=rank, seed=cfg.seed)
        rollout = sample_groups(unwrap(model), [train_ids[i] for i in index], 1,
                                SamplingConfig(**{**sampling.__dict__, "seed": cfg.seed * 1_000_003 + n}),
                                pad_id=pad_id, tokenizer=tokenizer, first_row=rank * per_rank)
        rows = rollout.completions()
        completions = text.texts(tokenizer, rows)
        empty_rollouts.check(par.all_gather_rows(torch.tensor([not c.strip() for c in completions])), n + 1)
        # the mask is the rollout's (the EOS included), never "token != pad": pad may be the EOS
        mask = rollout.completion_mask.cpu()
        batch = {"prompt_index": torch.tensor(index), "completion_ids": rollout.completion_ids.cpu(), "mask": mask}
        with torch.no_grad():
            old_logps = logprobs(model, batch)[0].cpu()
            values = values_of(value, batch).cpu()
        ref_logps = reference.run(model, lambda m: logprobs(m, batch)[0]).cpu()
        where = f"step {step_now[0]}, rollout batch {n + 1}"
        if not bool(torch.isfinite(values[mask]).all()):
            raise TemperError(f"{where}: the value model predicts NaN or infinite values: its weights diverged "
                              "(lower optim.lr or vf_coef) or value_model= holds broken weights")
        with loop.phase("score"):
            scores, _ = rewards.score([prompts[i] for i in index], completions, completion_ids=rows)
        bad = (~torch.isfinite(scores)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise TemperError(f"{where}: completion {i} ({prompts[index[i]].source}) has a {float(scores[i])} "
                              f"reward: PPO needs a finite score for every completion (check the reward model and "
                              "reward functions)")
        finished = rollout.finished.cpu()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~finished).float()
        kl = per_token_kl(old_logps, ref_logps, mask, cfg.kl_estimator)
        beta = controller.value
        token_reward, non_score = token_rewards(scores, kl, mask, beta)
        if cfg.whiten_rewards:
            token_reward = masked_whiten(token_reward, mask, shift_mean=False, reduce=reduce).masked_fill(~mask, 0.0)
        advantages, returns = gae(token_reward, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = masked_whiten(advantages, mask, reduce=reduce).masked_fill(~mask, 0.0)
        # every rank's completions: the controller moves β alike everywhere
        kl_sums = par.all_gather_rows(kl.sum(1))
        controller.update(float(kl_sums.mean()), len(kl_sums))
        lengths = mask.sum(1)
        repetition = torch.tensor([repetition_rate(r) for r in rows], dtype=torch.float32)
        watch.set_reference(float(par.all_gather_rows(lengths).float().mean()),
                            float(par.all_gather_rows(repetition).mean()))
        N = len(index)
        return {**batch, "old_logps": old_logps, "values": values, "returns": returns, "advantages": advantages,
                "scores": scores, "kl": kl.sum(1), "non_score": non_score.sum(1),
                "neg_logp": -(old_logps * mask).sum(1), "lengths": lengths, "truncated": ~finished,
                "repetition": repetition, "beta": torch.full((N,), beta, dtype=torch.float64),
                "explained_variance": torch.full((N,), explained_variance(values, returns, mask, reduce=reduce),
                                                 dtype=torch.float64)}

    source = RolloutSource(generate, steps_per_generation=steps_per_rollout, num_iterations=cfg.num_ppo_epochs,
                           shuffle="pass", seed=cfg.seed)

    def loss_fn(batch):
        mask = batch["mask"].to(run.device)
        logps, entropies = logprobs(model, batch, with_entropy=True)
        pg, pg_metrics = policy_loss(logps, batch["old_logps"].to(run.device), batch["advantages"].to(run.device),
                                     mask, cliprange=cfg.cliprange)
        vf, vf_metrics = value_loss(values_of(value, batch), batch["values"].to(run.device),
                                    batch["returns"].to(run.device), mask, cliprange_value=cfg.cliprange_value)
        metrics = {"pg_loss": pg.detach(), "vf_loss": vf.detach(), "clipfrac": pg_metrics["clipfrac"],
                   "approxkl": pg_metrics["approxkl"], "ratio": pg_metrics["ratio"],
                   "vf_clipfrac": vf_metrics["clipfrac"], "entropy": masked_mean(entropies, mask)}
        return pg + cfg.vf_coef * vf, 1, metrics  # a mean per micro-batch, averaged over them (TRL)

    def rollout_metrics() -> dict:
        """Of the whole rollout batch, every rank's rows."""
        b = {k: par.all_gather_rows(source.buffer[k]).double() for k in STAT_KEYS}
        scores, non_score = b["scores"].mean(), b["non_score"].mean()
        return {"objective/scores": float(scores), "objective/kl": float(b["kl"].mean()),
                "objective/non_score_reward": float(non_score), "objective/rlhf_reward": float(scores + non_score),
                "objective/entropy": float(b["neg_logp"].mean()), "beta": float(source.buffer["beta"][0]),
                "val/explained_variance": float(source.buffer["explained_variance"][0]),
                "completions/mean_length": float(b["lengths"].mean()),
                "completions/clipped_ratio": float(b["truncated"].mean()),
                "completions/repetition_rate": float(b["repetition"].mean()),
                "episode": source.generations * per_rank * world}

    def evaluate(step: int) -> dict:
        return heldout_scores(unwrap(model), held, held_ids, scorer, text, tokenizer,
                              max_new_tokens=cfg.max_completion_length, par=par)

    loop = TrainLoop(cfg, "ppo", run.out, trainable.model, trainable.optimizer, run.device, run.precision,
                     state={"rollout": source, "watch": watch, "kl_controller": controller, "rollout_means": means},
                     evaluate=evaluate if held else None, on_log=watch.observe,
                     flops_per_token=trainable.flops_per_token, par=par, global_batch=run.global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "peft": cfg.peft.method,
                               "data": hashlib.sha256(json.dumps(train_ids).encode()).hexdigest()[:16],
                               "rewards": specs, "value_model": str(value_dir), "kl_coef": cfg.kl_coef,
                               "kl_estimator": cfg.kl_estimator, "target_kl": cfg.target_kl,
                               "num_ppo_epochs": cfg.num_ppo_epochs, "num_mini_batches": cfg.num_mini_batches,
                               "data_parallel_ranks": world})  # each rank's buffer is its own
    last: dict = {}
    for step in loop:
        step_now[0] = step + 1
        micro = [source.next() for _ in range(run.grad_accum)]
        result = loop.accumulate(micro, loss_fn)
        sums = {k: v for k, v in result.items() if k not in ("loss", "count")}
        averaged = means.add(source.generations, sums, result["count"])
        last = {"loss": result["loss"], **{name: averaged[key] for name, key in AVERAGED.items()},
                **rollout_metrics()}
        tokens = sum(len(train_ids[i]) + b["completion_ids"].shape[1] for b in micro
                     for i in b["prompt_index"].tolist())
        loop.optimizer_step(last, tokens=tokens)

    exported = recipe.save_outputs(loop, cfg, "ppo", tokenizer, lineage, template=text.template,
                                   eos_ids=text.eos_ids if text.template else None, module="policy")
    if exported is not None:  # rank 0: the value model beside the policy, as a sequence-classification directory
        value_out = merge_lora(exported["value"]) if cfg.value_peft else exported["value"]
        save_reward_model(value_out, loop.out / "value", tokenizer=tokenizer)
    rewards.close()
    if scorer is not None:
        scorer.close()
    empty_rollouts.finish()
    return loop.finish({"objective/scores": last.get("objective/scores"), "objective/kl": last.get("objective/kl"),
                        "beta": controller.value, "rewards": specs, "value_model": str(value_dir),
                        "prompts": len(prompts), "truncated_prompts": cut, "held_out_prompts": len(held),
                        "generations": source.generations, "peft": cfg.peft.method,
                        "trainable_parameters": trainable.trainable_parameters})
