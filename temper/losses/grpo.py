"""GRPO's objective (Shao et al. 2024, DeepSeekMath) and its variants, as pure functions of per-token log-probs.

Definitions follow TRL 1.16 (`GRPOTrainer._generate_and_score_completions` for the advantages,
`GRPOTrainer._compute_loss` for the loss and its metrics), names included, so a run can be
compared with TRL's number for number.

Advantages, one group of G completions per prompt (`group_advantages`):

    Â_i = (r_i − mean_g(r)) / (s + ε),  ε = 1e-4
    s = std_g(r) (scale="group"), std over the whole batch (scale="batch"), or no division (scale="none"),

std with Bessel's correction (TRL's `nanstd`, as `torch.std`), NaN rewards (unscorable) left out
of the statistics and given Â = 0.

Loss, per completion token t of completion i, with ρ = π_θ/π_old and KL to the reference by
Schulman's k3 estimator:

    ρ_i,t = exp(log π_θ − log π_old)                                          importance_sampling_level="token"
    ρ_i   = exp(Σ_t m_i,t (log π_θ − log π_old) / max(1, Σ_t m_i,t))           "sequence" (GSPO, Zheng et al. 2025)
    ℓ_i,t = −min(ρ Â_i, clip(ρ, 1 − ε_low, 1 + ε_high) Â_i) + β KL_k3,i,t      grpo / bnpo / dr_grpo / dapo
    ℓ_i,t = −sg(min(ρ, ε_high)) Â_i log π_θ,i,t + β KL_k3,i,t                  cispo (MiniMax-M1): ε_high is ε_max
    KL_k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1               ≥ 0, unbiased for KL(π_θ ‖ π_ref)

(sg: stop-gradient; m: the completion mask), aggregated over the micro-batch given as

    grpo     (1/B) Σ_i Σ_t m ℓ / max(1, Σ_t m)        the mean over sequences of each one's token mean
    bnpo     Σ_i,t m ℓ / max(1, Σ_i,t m)               per active token of this (local) batch
    dr_grpo  Σ_i,t m ℓ / (B · max_completion_length)   a constant (Dr. GRPO, Liu et al. 2025)
    dapo     Σ_i,t m ℓ / max(1, N)                     N: active tokens of the whole optimiser step, every
    cispo    Σ_i,t m ℓ / max(1, N)                        micro-batch and rank (DAPO, Yu et al. 2025)

Accumulation: for dapo and cispo the losses of the micro-batches of a step (and of the ranks) *add
up* to the step's loss; for grpo, bnpo and dr_grpo they are *averaged*, as TRL divides each by the
accumulation steps (and DDP averages ranks). With temper's engine (`train.engine.accumulate`, which
divides the summed loss by a global count), dapo/cispo are `num_items_in_batch=1` with the active
tokens as the count; grpo, bnpo, dr_grpo are the loss with a count of 1 per micro-batch.

With μ = 1 (one optimisation step per generation batch) π_old = π_θ: pass `old_logps=None` and
the ratio is exactly 1 (TRL uses `per_token_logps.detach()` the same way). Every token's term is
then −Â_i (plus β·KL): grpo's loss is −mean_i Â_i = 0 since advantages have zero mean per group;
the token-weighted types give −Σ_i |y_i| Â_i / N, a small length-advantage covariance. The gradient
−Σ_i Â_i Σ_t ∇log π_θ(i,t) (normalised as above) is not zero: the value is not a progress signal.

Where this departs from TRL 1.16 (each also said in the function's docstring):
- A group whose rewards are all exactly equal gets Â = 0 exactly and counts as zero-std; TRL divides
  its rounding noise (r − mean(r), which a float mean need not make 0) by ε = 1e-4.
- `dapo`/`cispo` take N as the exact active-token count of the step; TRL rescales the count of the
  generation batch by gradient_accumulation_steps / steps_per_generation, the same when those are
  equal (TRL's default).
- Metrics are sums with their counts (`mean_grpo_metrics` makes TRL's means), so they can be summed
  over micro-batches and ranks; TRL averages per-micro-batch means. `clip_ratio/low_min` and
  `high_max` are not computed.
- TRL's `sapo`, `vespo` and `luspo`, vLLM's importance-sampling correction, the off-policy mask and
  the entropy mask are not implemented.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch

from temper.errors import TemperError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALES = ("group", "batch", "none")
_TRL_ONLY = ("sapo", "vespo", "luspo")


def _choice(kind: str, value: str, allowed: tuple[str, ...], extra: str = "") -> None:
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise TemperError(f"unknown {kind} '{value}'{hint}: expected one of {', '.join(allowed)}{extra}")


# ----------------------------------------------------------------------------- advantages

def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation with Bessel's correction over the non-NaN values (TRL's `nanstd`): NaN for fewer than 2."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim).to(variance.dtype)  # TRL divides the integer counts in float32
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    return torch.sqrt(variance * correction)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N,), frac_reward_zero_std) of rewards (N,) laid out as N/G groups of G consecutive completions.

        Â_i = (r_i − mean_g(r)) / (s + eps),  s = std_g(r) (group), std(r over the batch) (batch); none: r_i − mean_g(r)

    as TRL 1.16's `scale_rewards` ("group", its default; "batch", PPO-Lite; "none", Dr. GRPO), std
    with Bessel's correction, eps = 1e-4. With G = 1 the group std is 0 (TRL's rule); with one
    reward in the batch the batch std is 0. NaN rewards (a completion no reward function applied to)
    are left out of every mean and std and get Â = 0, as TRL does. Under "batch" the rewards must be
    the whole batch of every rank (TRL gathers them before taking the std).

    frac_reward_zero_std (0-dim): TRL's, the share of completions whose s is 0 (torch.isclose): under
    "group" and "none" the share of groups with all rewards equal, under "batch" (TRL's definition,
    kept to the letter) 1.0 when the whole batch's std is 0, else 0.0.

    Departs from TRL: a group whose rewards are all exactly equal has mean and std exactly its reward,
    so Â = 0 exactly and it counts in frac_reward_zero_std; TRL's float mean need not give the reward
    back (0.9 thrice in float32: 0.9 + 6e-8), so it divides that rounding by eps (Â = ±6e-4) and its
    std of 7e-8 misses torch.isclose's 1e-8. Such a group contributes nothing but the KL term.
    """
    _choice("scale_rewards", scale, SCALES)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise TemperError(f"group size (num_generations) must be a positive integer, got {group_size!r}")
    if rewards.dim() != 1:
        raise TemperError(f"rewards must be one value per completion (N,), got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if n == 0 or n % group_size:
        raise TemperError(f"a batch of {n} completions does not divide into groups of {group_size} "
                          f"(num_generations): give {group_size} completions per prompt")
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    centered = grouped - mean
    # all equal (NaN aside): exactly zero, whatever the mean's rounding
    finite = ~torch.isnan(grouped)
    high = torch.where(finite, grouped, torch.full_like(grouped, -float("inf"))).amax(1, keepdim=True)
    low = torch.where(finite, grouped, torch.full_like(grouped, float("inf"))).amin(1, keepdim=True)
    equal = high == low  # (prompts, 1)
    centered = torch.where(equal, torch.zeros_like(centered), centered).reshape(-1)
    if scale == "batch":
        std = _nanstd(rewards) if n > 1 else rewards.new_zeros(())
        std = std.expand(n)
    elif group_size > 1:
        std = torch.where(equal[:, 0], torch.zeros_like(equal[:, 0], dtype=rewards.dtype), _nanstd(grouped, dim=1))
        std = std.repeat_interleave(group_size)
    else:
        std = torch.zeros_like(rewards)
    advantages = centered / (std + eps) if scale != "none" else centered
    frac_zero_std = torch.isclose(std, torch.zeros_like(std)).to(rewards.dtype).mean()
    return torch.nan_to_num(advantages, nan=0.0), frac_zero_std


# ----------------------------------------------------------------------------- masking

def mask_truncated_completions(completion_ids: torch.Tensor, mask: torch.Tensor,
                               eos_token_ids: int | Sequence[int],
                               pad_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask with the rows of truncated completions zeroed, truncated (B,) bool), TRL's
    `mask_truncated_completions` (DAPO's overlong filtering): a completion is truncated when its last
    token (the last one `mask` keeps) is neither an EOS token nor the pad token, i.e. it ran into
    the length limit. Such a row then adds nothing to the loss, its tokens nothing to a token count.

    completion_ids, mask: (B, T), right-padded. A row with no tokens at all counts as not truncated
    (its mask is zero already)."""
    assert completion_ids.shape == mask.shape, "completion_ids and mask must have the same shape"
    ends = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    if pad_token_id is not None:
        ends.append(pad_token_id)
    if not ends:
        raise TemperError("mask_truncated_completions needs at least one EOS token id")
    kept = mask.bool()
    length = kept.sum(1)  # (B,)
    last = (length - 1).clamp(min=0)
    last_token = completion_ids.gather(1, last[:, None]).squeeze(1)
    ended = torch.isin(last_token, torch.tensor(ends, device=completion_ids.device, dtype=completion_ids.dtype))
    truncated = (length > 0) & ~ended
    return mask * (~truncated)[:, None].to(mask.dtype), truncated


# ----------------------------------------------------------------------------- the loss

def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ ‖ π_ref) per token, on tokens sampled from π_θ:
    exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1, always ≥ 0 (e^x ≥ 1 + x), 0 where they agree."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) of one micro-batch of B completions: the formulas of the module docstring.

    logps (B, T): log π_θ of each completion token, with gradient; old_logps (B, T): log π_old,
    from the policy that sampled (None: μ = 1, π_old = sg(π_θ), the ratio exactly 1); ref_logps
    (B, T): log π_ref, needed when beta != 0; advantages (B,); mask (B, T): 1 on completion tokens.
    Values at masked positions are never read (padding may hold anything, even inf).

    loss_type: "grpo", "bnpo", "dr_grpo", "dapo" (TRL's default) or "cispo". epsilon_low/high: the
    clip range [1 − ε_low, 1 + ε_high] (DAPO: 0.2/0.28); for cispo epsilon_high is TRL's name for
    ε_max, the cap of the importance weight itself (ScaleRL recommends 5.0; TRL's default cap is
    then ε = 0.2, which scales every token's gradient by 0.2 at μ = 1). delta: INTELLECT-2's upper
    cap of the unclipped ratio (TRL `delta`), None for none. max_completion_length: dr_grpo's
    constant. num_items_in_batch: dapo/cispo's N, the active tokens of the whole optimiser step
    (micro-batches and ranks); None for this batch's own (then dapo equals bnpo). entropies (B, T):
    the policy's per-token entropies, for the `entropy` metric only.

    metrics (detached), as sums to add over micro-batches and ranks; `mean_grpo_metrics` divides
    them into TRL's means: kl (when ref_logps is given) and entropy (when given), over active
    tokens; clip_ratio/low_mean (ρ < 1 − ε_low with Â < 0), clip_ratio/high_mean (ρ > 1 + ε_high
    with Â > 0), clip_ratio/region_mean (either), for cispo cispo_clip_ratio (ρ > ε_high with
    Â > 0), over active tokens, or over sequences (every row) when the ratio is per sequence;
    count/tokens and count/clip, their denominators.
    """
    _choice("loss_type", loss_type, LOSS_TYPES,
            f" (TRL's {', '.join(_TRL_ONLY)} are not implemented)" if loss_type in _TRL_ONLY else "")
    _choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if epsilon_low < 0 or epsilon_high < 0:
        raise TemperError(f"epsilon_low and epsilon_high must be >= 0, got {epsilon_low} and {epsilon_high}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise TemperError(f"loss_type 'dr_grpo' divides by batch x max_completion_length: "
                          f"give max_completion_length >= 1, got {max_completion_length}")
    if beta != 0.0 and ref_logps is None:
        raise TemperError(f"beta={beta} needs the reference's log-probs (ref_logps); beta=0 needs no reference")
    assert logps.dim() == 2 and mask.shape == logps.shape, "logps and mask are (B, T)"
    assert advantages.shape == logps.shape[:1], "advantages are one value per completion (B,)"
    for other in (old_logps, ref_logps, entropies):
        assert other is None or other.shape == logps.shape, "every per-token tensor is (B, T)"

    active = mask.bool()
    weight = active.to(logps.dtype)  # (B, T)

    def masked(x: torch.Tensor) -> torch.Tensor:  # padding's values (inf, NaN) never reach a sum or a gradient
        return torch.where(active, x, torch.zeros_like(x))

    logps = masked(logps)
    old_logps = logps.detach() if old_logps is None else masked(old_logps)
    A = advantages.to(logps.dtype)[:, None]  # (B, 1)
    tokens = weight.sum(-1)  # (B,)

    log_ratio = logps - old_logps  # (B, T)
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * weight).sum(-1) / tokens.clamp(min=1.0))[:, None]  # (B, 1)
    ratio = torch.exp(log_weights)  # (B, T) or (B, 1)

    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * A * logps
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        per_token = -torch.min(ratio * A, clipped * A)
    per_token = per_token.expand_as(logps)
    kl = None
    if ref_logps is not None:
        kl = kl_k3(logps, masked(ref_logps))
        if beta != 0.0:
            per_token = per_token + beta * kl

    total = (per_token * weight).sum()
    if loss_type == "grpo":
        loss = ((per_token * weight).sum(-1) / tokens.clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = total / tokens.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = total / (logps.shape[0] * max_completion_length)
    else:
        count = tokens.sum() if num_items_in_batch is None else torch.as_tensor(
            num_items_in_batch, dtype=logps.dtype, device=logps.device)
        loss = total / count.clamp(min=1.0)

    with torch.no_grad():
        per_sequence = ratio.shape[1] == 1

        def rate(flags: torch.Tensor) -> torch.Tensor:
            flags = flags.to(logps.dtype)
            return flags.sum() if per_sequence else (flags * weight).sum()

        metrics = {"count/tokens": tokens.sum(),
                   "count/clip": logps.new_tensor(float(logps.shape[0])) if per_sequence else tokens.sum()}
        if kl is not None:
            metrics["kl"] = (kl * weight).sum()
        if entropies is not None:
            metrics["entropy"] = (masked(entropies) * weight).sum()
        if loss_type == "cispo":
            metrics["cispo_clip_ratio"] = rate((ratio > epsilon_high) & (A > 0))
        else:
            low = (ratio < 1 - epsilon_low) & (A < 0)
            high = (ratio > 1 + epsilon_high) & (A > 0)
            metrics["clip_ratio/low_mean"] = rate(low)
            metrics["clip_ratio/high_mean"] = rate(high)
            metrics["clip_ratio/region_mean"] = rate(low | high)
    return loss, metrics


def mean_grpo_metrics(sums: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """TRL's means from the summed metrics of `grpo_loss` (already summed over micro-batches and ranks):
    kl and entropy per active token, the clip ratios per count/clip (tokens, or sequences with a
    sequence-level ratio). A metric whose denominator is 0 is left out; the count/* entries are dropped."""
    means = {}
    for name, value in sums.items():
        if name.startswith("count/"):
            continue
        denominator = float(sums["count/clip" if "clip" in name else "count/tokens"])
        if denominator > 0:
            means[name] = float(value) / denominator
    return means
