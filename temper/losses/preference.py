"""Preference losses: the DPO family, SimPO, ORPO and KTO, as pure functions of per-sequence log-probs.

Inputs are (B,) tensors, one entry per pair (KTO: per example): the summed log-probs of each
completion's tokens under the policy and under the frozen reference (`sequence_logprobs` gives
them, with the token counts), and the completion token counts where a loss averages per token.
Every loss returns *per-pair* values (B,), unreduced, so that a recipe sums them and divides by
the number of pairs of the whole accumulated batch (`train.engine.accumulate`): the result is
exact across micro-batches and ranks.

Definitions follow TRL 1.x (`DPOTrainer._compute_loss`, `CPOTrainer.cpo_loss`,
`ORPOTrainer.odds_ratio_loss`, `KTOTrainer._compute_loss`, read at TRL 1.16), loss-type names
included. With the DPO log-ratio margin

    Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]

and Δ̄ the same with each log-ratio divided by its completion's token count (clamped at 1):

    sigmoid       −(1−ε) log σ(βΔ) − ε log σ(−βΔ)           DPO; cDPO when ε > 0
    robust        [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε)  rDPO
    hinge         max(0, 1 − βΔ)                              SLiC
    ipo           (Δ̄ − 1/(2β))²                              IPO, per-token log-ratios as in TRL
    sigmoid_norm  −log σ(βΔ̄)                                  length-normalised DPO (TRL's name)
    sft           −log π(y_w|x) / |y_w|                       the chosen's mean token NLL (RPO's term)
    simpo         −(1−ε) log σ(βū − γ) − ε log σ(−(βū − γ)),  ū = avg log π(y_w) − avg log π(y_l)
    orpo          −avg log π(y_w) − β log σ(log odds(y_w) − log odds(y_l))

Where this departs from TRL 1.16 (each also said in the function's docstring):
- `sigmoid` honours `label_smoothing` (cDPO, as earlier TRL releases); TRL 1.16 applies ε only to
  `robust` and `exo_pair`. With the default ε = 0 both agree.
- SimPO and ORPO do not log logits/*: TRL's CPO and ORPO trainers average the logits over every
  position of padded rows, prompt and padding included (see `preference_metrics`).
- `sft` (and ORPO's NLL) is the mean token NLL *of each chosen completion*, one value per pair;
  TRL averages over all chosen tokens of the device's micro-batch, which cannot be summed per
  pair and weighs long answers more. RPO's and ORPO's papers normalise per example, as here.
  RPO (Pang et al. 2024, TRL 0.x `rpo_alpha`) is `loss_type=("sigmoid", "sft")`,
  `loss_weights=(1, α)`, as in TRL 1.x.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

REFERENCE_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm")
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")
LOSS_TYPES = REFERENCE_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES + ("sft",)
_NEEDS_TOKENS = {"ipo", "sigmoid_norm", "simpo", "orpo", "sft"}


# ----------------------------------------------------------------------------- the losses, from margins

def sigmoid_loss(margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(βΔ); with label smoothing ε, cDPO (Mitchell 2023):
    −(1−ε) log σ(βΔ) − ε log σ(−βΔ), the expected DPO loss when a label is flipped with probability ε.

    d/dΔ = −β[(1−ε) σ(−βΔ) − ε σ(βΔ)]. TRL 1.16's `sigmoid` has no ε (it is 0 there by default).
    """
    logits = beta * margin
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def robust_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε),
    an unbiased estimate of the clean DPO loss under labels flipped with probability ε < 1/2."""
    logits = beta * margin
    return (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) \
        / (1 - 2 * label_smoothing)


def hinge_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF's calibration hinge (Zhao et al. 2023) as TRL writes it: max(0, 1 − βΔ) = β max(0, 1/β − Δ).

    The margin is δ = 1/β, and Δ uses log-ratios to the reference where SLiC compares the
    policy's log-probs alone.
    """
    return torch.relu(1 - beta * margin)


def ipo_loss(mean_margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, τ = β): (Δ̄ − 1/(2β))², Δ̄ from *per-token averaged* log-ratios.

    The paper writes sequence log-ratios; TRL divides each by its completion's token count
    (confirmed with the authors, it says), which keeps β comparable across lengths. We follow TRL.
    """
    return (mean_margin - 1 / (2 * beta)) ** 2


def simpo_loss(policy_chosen_mean_logps: torch.Tensor, policy_rejected_mean_logps: torch.Tensor, *,
               beta: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024): −log σ(β(avg log π(y_w) − avg log π(y_l)) − γ), reference-free.

    γ is the absolute target margin (TRL `simpo_gamma`; TRL writes β(ū − γ/β), the same); with
    ε > 0 the cDPO smoothing TRL's CPOTrainer applies: −(1−ε) log σ(z) − ε log σ(−z).
    """
    z = beta * (policy_chosen_mean_logps - policy_rejected_mean_logps) - gamma
    return sigmoid_loss(z, 1.0, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stably (Mächler 2012): log(−expm1(x)) near 0, log1p(−exp(x)) below −log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_mean_logps: torch.Tensor, policy_rejected_mean_logps: torch.Tensor, *,
              beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024), λ = β as TRL's ORPOConfig: −avg log π(y_w) − β log σ(log odds(y_w) − log odds(y_l)),

    odds(y) = P(y) / (1 − P(y)) with P(y) = exp(avg log π(y)), so log odds = avg logp − log(1 − exp(avg logp)).
    The NLL term is each chosen completion's mean token NLL (the paper's per-example L_SFT); TRL
    averages over the micro-batch's chosen tokens instead.
    """
    log_odds = (policy_chosen_mean_logps - log1mexp(policy_chosen_mean_logps)) \
        - (policy_rejected_mean_logps - log1mexp(policy_rejected_mean_logps))
    return -policy_chosen_mean_logps - beta * F.logsigmoid(log_odds)


# ----------------------------------------------------------------------------- entry point

def _check_loss_types(loss_type: str | Sequence[str],
                      loss_weights: Sequence[float] | None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    kinds = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not kinds:
        raise ValueError(f"loss_type is empty: expected one or more of {LOSS_TYPES}")
    for kind in kinds:
        if kind not in LOSS_TYPES:
            close = difflib.get_close_matches(kind, LOSS_TYPES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown preference loss_type '{kind}'{hint}: expected one of {LOSS_TYPES}")
    weights = (1.0,) * len(kinds) if loss_weights is None else tuple(float(w) for w in loss_weights)
    if len(weights) != len(kinds):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(kinds)} loss types {kinds}: "
                         "give one weight per loss type")
    if set(kinds) & set(REFERENCE_FREE_LOSS_TYPES) and set(kinds) & set(REFERENCE_LOSS_TYPES):
        raise ValueError(f"loss_type {kinds} mixes reference-free ({REFERENCE_FREE_LOSS_TYPES}) and reference "
                         f"({REFERENCE_LOSS_TYPES}) losses, whose implicit rewards differ: pick one family")
    if len(set(kinds) & set(REFERENCE_FREE_LOSS_TYPES)) > 1:
        raise ValueError(f"loss_type {kinds}: combine a reference-free loss with 'sft' only")
    return kinds, weights


def _per_token(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logps / tokens.to(logps.dtype).clamp(min=1)


def preference_loss(
    loss_type: str | Sequence[str],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses (B,), chosen rewards (B,), rejected rewards (B,)) for one loss type or a weighted sum.

    policy_* / ref_*: log-probs summed over each completion's tokens (B,); the ref_* are required by
    the reference losses and unused by `simpo`, `orpo` and `sft`. chosen_tokens / rejected_tokens:
    completion token counts (B,), required by `ipo`, `sigmoid_norm`, `simpo`, `orpo` (both) and `sft`
    (chosen). Several loss types give Σ_k w_k loss_k per pair (TRL `loss_type=[...]`,
    `loss_weights=[...]`, weights 1 by default), e.g. RPO = ("sigmoid", "sft") with weights (1, α).

    Rewards, detached: β(log π(y) − log π_ref(y)) for the reference losses (TRL's DPO logs these
    for every loss type); β · avg log π(y) for `simpo` and `orpo` (TRL's CPO and ORPO trainers).
    """
    kinds, weights = _check_loss_types(loss_type, loss_weights)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    if "robust" in kinds and label_smoothing >= 0.5:
        raise ValueError(f"the robust loss divides by 1 - 2 * label_smoothing: label_smoothing must be < 0.5, "
                         f"got {label_smoothing}")
    # "sft" alone takes its rewards from the reference when one is given
    reference_free = not set(kinds) & set(REFERENCE_LOSS_TYPES) and (
        bool(set(kinds) & set(REFERENCE_FREE_LOSS_TYPES)) or ref_chosen_logps is None or ref_rejected_logps is None)
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {kinds} needs ref_chosen_logps and ref_rejected_logps")
    needs_tokens = set(kinds) & _NEEDS_TOKENS
    if needs_tokens and chosen_tokens is None:
        raise ValueError(f"loss_type {sorted(needs_tokens)} needs chosen_tokens (completion token counts)")
    if needs_tokens - {"sft"} and rejected_tokens is None:
        raise ValueError(f"loss_type {sorted(needs_tokens - {'sft'})} needs rejected_tokens "
                         "(completion token counts)")
    assert policy_chosen_logps.shape == policy_rejected_logps.shape, "chosen and rejected must pair up"

    if reference_free:
        chosen_mean = _per_token(policy_chosen_logps, chosen_tokens) if chosen_tokens is not None else None
        rejected_mean = _per_token(policy_rejected_logps, rejected_tokens) if rejected_tokens is not None else None
        chosen_rewards = beta * (chosen_mean if chosen_mean is not None else policy_chosen_logps).detach()
        rejected_rewards = beta * (rejected_mean if rejected_mean is not None else policy_rejected_logps).detach()
    else:
        chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
        rejected_logratios = policy_rejected_logps - ref_rejected_logps
        margin = chosen_logratios - rejected_logratios
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()

    losses = torch.zeros_like(policy_chosen_logps)
    for kind, weight in zip(kinds, weights):
        if kind == "sigmoid":
            loss = sigmoid_loss(margin, beta, label_smoothing)
        elif kind == "robust":
            loss = robust_loss(margin, beta, label_smoothing)
        elif kind == "hinge":
            loss = hinge_loss(margin, beta)
        elif kind in ("ipo", "sigmoid_norm"):
            mean_margin = _per_token(chosen_logratios, chosen_tokens) - _per_token(rejected_logratios, rejected_tokens)
            loss = ipo_loss(mean_margin, beta) if kind == "ipo" else sigmoid_loss(mean_margin, beta)
        elif kind == "sft":
            loss = -_per_token(policy_chosen_logps, chosen_tokens)
        elif kind == "simpo":
            loss = simpo_loss(chosen_mean, rejected_mean, beta=beta, gamma=simpo_gamma,
                              label_smoothing=label_smoothing)
        else:
            assert kind == "orpo", kind
            loss = orpo_loss(chosen_mean, rejected_mean, beta=beta)
        losses = losses + weight * loss
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------- KTO

def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired examples: (per-example losses (B,), rewards (B,)).

    With r = log π(y|x) − log π_ref(y|x) (summed log-probs) and the reference point
    z0 = max(0, kl), detached (no gradient flows through it):

        desirable    λ_D (1 − σ(β(r − z0)))
        undesirable  λ_U (1 − σ(β(z0 − r)))

    `kl` is the estimate of KL(π ‖ π_ref): TRL takes mean(log π(y'|x) − log π_ref(y'|x)) over
    mismatched completions y' (each prompt with another example's completion) of the batch,
    averaged over the processes, then clamps it at 0. The recipe computes it; here it is clamped
    and detached. `desirable` is a bool (B,). Rewards: βr, detached. The loss unit is the example.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    desirable = desirable.to(torch.bool)
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratios = policy_logps - ref_logps  # (B,)
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))
    return losses, beta * logratios.detach()


# ----------------------------------------------------------------------------- metrics

def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *,
                       chosen_logits_sum: torch.Tensor | None = None,
                       rejected_logits_sum: torch.Tensor | None = None,
                       chosen_tokens: torch.Tensor | None = None,
                       rejected_tokens: torch.Tensor | None = None,
                       loss_type: str | Sequence[str] = "sigmoid") -> dict[str, torch.Tensor]:
    """TRL's metrics for `loss_type` as sums over the batch (detached scalars), to be summed over
    micro-batches and ranks and then turned into means by `mean_preference_metrics`.

    policy_*_logps are summed over each completion's tokens, as `preference_loss` takes them.
    rewards/chosen, rewards/rejected: Σ rewards; rewards/accuracies: Σ [chosen > rejected], a tie
    counts 0 (TRL's strict >); rewards/margins: Σ (chosen − rejected).

    The DPO family (`DPOTrainer`): logps/chosen, logps/rejected: Σ summed log-probs.
    logits/chosen, logits/rejected (optional): TRL's is a *token* mean, Σ over completion tokens of
    the logit averaged over the vocabulary, divided by the number of completion tokens. Pass each
    pair's Σ over its completion tokens of mean_v z_v (B,) and the token counts; the counts come
    back as count/chosen_tokens and count/rejected_tokens, the denominators.

    `simpo` (`CPOTrainer`) and `orpo` (`ORPOTrainer`): logps/* are Σ of each completion's *per-token
    mean* log-prob (TRL's `average_log_prob=True`), which needs the token counts; for `orpo` also
    log_odds_ratio = Σ log σ(log odds(y_w) − log odds(y_l)) and log_odds_chosen = Σ (log odds(y_w) −
    log odds(y_l)), per pair as TRL averages them. logits/* are left out: those trainers average the
    logits over every position of the padded rows (prompt and padding included), which packed
    batches do not have and the completion-only scoring never computes. Their nll_loss (the
    chosen's cross-entropy, ORPO's over prompt and completion) is not logged either.
    """
    kinds = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    reference_free = bool(set(kinds) & set(REFERENCE_FREE_LOSS_TYPES))
    if reference_free:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"loss_type {kinds} logs per-token mean log-probs: pass chosen_tokens and "
                             "rejected_tokens")
        policy_chosen_logps = _per_token(policy_chosen_logps, chosen_tokens)
        policy_rejected_logps = _per_token(policy_rejected_logps, rejected_tokens)
    metrics = {
        "rewards/chosen": chosen_rewards.detach().sum(),
        "rewards/rejected": rejected_rewards.detach().sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach().sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(),
        "logps/rejected": policy_rejected_logps.detach().sum(),
    }
    if "orpo" in kinds:  # in float32, as TRL's odds_ratio_loss
        chosen, rejected = policy_chosen_logps.detach().float(), policy_rejected_logps.detach().float()
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        metrics["log_odds_ratio"] = F.logsigmoid(log_odds).sum()
        metrics["log_odds_chosen"] = log_odds.sum()
    if reference_free:
        return metrics
    for side, logits_sum, tokens in (("chosen", chosen_logits_sum, chosen_tokens),
                                     ("rejected", rejected_logits_sum, rejected_tokens)):
        if logits_sum is None:
            continue
        if tokens is None:
            raise ValueError(f"logits/{side} is a mean over completion tokens: pass {side}_tokens with "
                             f"{side}_logits_sum")
        metrics[f"logits/{side}"] = logits_sum.detach().sum()
        metrics[f"count/{side}_tokens"] = tokens.sum()
    return metrics


def kto_metrics(rewards: torch.Tensor, policy_logps: torch.Tensor, desirable: torch.Tensor,
                kl: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's KTO metrics as sums: rewards/chosen and logps/chosen summed over the desirable examples
    (count/chosen of them), rewards/rejected and logps/rejected over the undesirable (count/rejected);
    kl: the reference point max(0, kl) as TRL logs it, summed like every value (count/kl summands)."""
    desirable = desirable.to(torch.bool)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    return {
        "rewards/chosen": torch.where(desirable, rewards.detach(), zero).sum(),
        "rewards/rejected": torch.where(desirable, zero, rewards.detach()).sum(),
        "logps/chosen": torch.where(desirable, policy_logps.detach(), zero).sum(),
        "logps/rejected": torch.where(desirable, zero, policy_logps.detach()).sum(),
        "count/chosen": desirable.sum(),
        "count/rejected": (~desirable).sum(),
        "kl": torch.as_tensor(kl).detach().float().clamp(min=0).reshape(()),
        "count/kl": torch.ones((), dtype=torch.long),
    }


_DENOMINATORS = {"logits/chosen": "count/chosen_tokens", "logits/rejected": "count/rejected_tokens"}
_KTO_DENOMINATORS = {"rewards/chosen": "count/chosen", "logps/chosen": "count/chosen",
                     "rewards/rejected": "count/rejected", "logps/rejected": "count/rejected", "kl": "count/kl"}


def mean_preference_metrics(sums: dict[str, float], count: float) -> dict[str, float]:
    """Means from the summed metrics of `preference_metrics` or `kto_metrics` (already summed over
    micro-batches and ranks), with TRL's denominators: `count` (pairs) for the per-pair metrics, the
    token counts for logits/*, and for KTO the desirable / undesirable counts, with rewards/margins
    = mean chosen − mean rejected when both exist. A metric whose denominator is 0 is left out, as TRL
    does; the count/* entries are dropped."""
    kto = "count/chosen" in sums
    denominators = {**_DENOMINATORS, **(_KTO_DENOMINATORS if kto else {})}
    means = {}
    for name, value in sums.items():
        if name.startswith("count/"):
            continue
        denominator = sums[denominators[name]] if name in denominators else count
        if denominator > 0:
            means[name] = float(value) / float(denominator)
    if kto and "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means
