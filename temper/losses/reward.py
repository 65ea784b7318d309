"""Reward models' losses and metrics: pairwise Bradley–Terry on scalar rewards (outcome reward
models), and per-step binary cross-entropy (process reward models, `step_loss`).

    loss_i = -log sigma(r(x, y_w) - r(x, y_l) - m_i)  +  c * (r(x, y_w) + r(x, y_l))^2

The first term is the Bradley–Terry negative log-likelihood of the preference (Ouyang et al.
2022, eq. 1), with Llama 2's optional per-pair margin m_i (Touvron et al. 2023, eq. 2: the
chosen reward must beat the rejected one by m_i); the second is the reward centring of
Eisenstein et al. 2023 that TRL's RewardTrainer adds as `center_rewards_coefficient` c (it
pulls the rewards towards zero mean). TRL averages the first term over the batch and adds
c * mean((r_w + r_l)^2); here each pair's loss carries its own share, so the mean over a
batch is TRL's loss exactly and a sum over micro-batches divided by their pairs is too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                       margins: torch.Tensor | None = None, center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """(B,) per-pair losses (module docstring) from (B,) chosen and rejected rewards; computed in fp32."""
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    diff = chosen - rejected
    if margins is not None:
        diff = diff - margins.to(diff)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def step_loss(step_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) per-step losses of a process reward model: binary cross-entropy of sigmoid(s) against
    the step's label (1: the solution is still right after it), Lightman et al. 2023's step-level
    supervision. TRL's PRMTrainer (0.13-0.19) puts a two-label token classifier on the step's
    last token with cross-entropy; one logit s against a fixed 0 is the same softmax, and keeps
    the head the one-label `score` a sequence-classification reward model has. In fp32."""
    return F.binary_cross_entropy_with_logits(step_logits.float(), labels.float(), reduction="none")


def step_metrics(step_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the steps: `step_accuracy`, the steps whose sign (s > 0: right) matches the label."""
    predicted = step_logits.detach().float() > 0
    return {"step_accuracy": (predicted == labels.bool()).float().sum()}


def reward_pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the batch's pairs (divide by the pairs, `mean_reward_metrics`): `accuracy`, the pairs
    whose chosen reward is strictly higher (TRL's `rewards_chosen > rewards_rejected`: a tie is a
    miss), and `margin`, r_w - r_l."""
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum()}


def mean_reward_metrics(sums: dict[str, float], pairs: float) -> dict[str, float]:
    return {k: float(v) / pairs for k, v in sums.items()}


def pearson_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's r of two (N,) series, in float64; NaN when either is constant (or N < 2)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx.square().sum() * dy.square().sum()).sqrt()
    return float((dx * dy).sum() / denominator) if denominator > 0 else float("nan")


__all__ = ["bradley_terry_loss", "mean_reward_metrics", "pearson_correlation", "reward_pair_metrics", "step_loss",
           "step_metrics"]
