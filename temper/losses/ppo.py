"""PPO with a KL penalty (Schulman et al. 2017; RLHF as Ziegler et al. 2019 and Ouyang et al. 2022 run it),
as pure functions of per-token tensors. Definitions follow TRL's PPOTrainer (trl/trainer/ppo_trainer.py up
to 0.2x, experimental/ppo after), names included; TRL 1.16 as installed here ships no PPO to test against,
so each function is tested against its formula.

Every tensor is (B, T) over the completion tokens of B rollouts, right-padded, with `mask` (B, T) True on
each completion's tokens, the EOS that ended it included. The mask comes from the rollout
(`Rollout.completion_mask`), never from token ids: when pad == EOS a mask of "not the pad id" would drop
the real EOS and put the score on the wrong token.

Reward per token (`token_rewards`), with the KL of the sampled token to the reference by k1 or k3
(`per_token_kl`, Schulman's estimators, x = log π_ref − log π_θ):

    k1 = −x = log π_θ − log π_ref          k3 = (e^x − 1) − x ≥ 0
    r_t = −β·KL_t  +  [t = last token]·score

GAE (Schulman et al. 2016) over each completion, V after its last token 0 (`gae`):

    δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1},    R_t = A_t + V_t

Advantages are whitened over the masked tokens of the rollout batch (`masked_whiten`: (A − mean) / √(var +
1e-8), var with Bessel's correction, TRL's `masked_whiten`). The losses of one micro-batch, ρ = π_θ/π_old:

    L_policy = mean_t max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))                         (cliprange ε)
    L_value  = ½ mean_t max((V − R)², (clip(V, V_old − c, V_old + c) − R)²)        (cliprange_value c)
    L        = L_policy + vf_coef · L_value

means over the micro-batch's masked tokens, as TRL's `masked_mean`. The adaptive KL controller
(`KLController`, Ziegler et al. 2019, section 2.2) moves β after each rollout batch:

    β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)

(KL: the batch's mean summed KL per completion, n: its completions). TRL's 0.x PPOTrainer had it
(`adap_kl_ctrl`); its PPOv2 has a fixed `kl_coef`, which `target=0` gives here.

Where this departs from TRL: `val/ratio` and `policy/approxkl` are means over the completion tokens (TRL
averages over every position, padding counting ratio 1 and difference 0); whitening and explained
variance take an optional `reduce` (a sum over data-parallel ranks) so several ranks whiten as one
process; a whitening over a single token returns 0 where TRL raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from temper.errors import TemperError

KL_ESTIMATORS = ("k1", "k3")
WHITEN_EPS = 1e-8
Reduce = Callable[[torch.Tensor], torch.Tensor] | None


def _sum(values: list[torch.Tensor], reduce: Reduce) -> torch.Tensor:
    total = torch.stack([v.double() for v in values])
    return reduce(total) if reduce is not None else total


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True positions of mask (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, reduce: Reduce = None
                  ) -> torch.Tensor:
    """(x − mean) / √(var + 1e-8) over the masked positions (var unbiased), the mean added back when
    `shift_mean=False` (TRL's whitened rewards); `reduce` sums the statistics over ranks."""
    m = mask.to(torch.float64)
    xs = x.double()
    total, count = _sum([(xs * m).sum(), m.sum()], reduce).unbind()
    if count < 1:
        return torch.zeros_like(x)
    mean = total / count
    squares = _sum([((xs - mean) ** 2 * m).sum()], reduce)[0]
    var = squares / count * (count / (count - 1) if count > 1 else 0.0)
    whitened = (xs - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.to(x.dtype)


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
                 ) -> torch.Tensor:
    """KL_t of each sampled token (0 off the mask): k1 = log π_θ − log π_ref, or k3 = (e^x − 1) − x with
    x = log π_ref − log π_θ (Schulman, "Approximating KL divergence", 2020)."""
    if estimator not in KL_ESTIMATORS:
        raise TemperError(f"kl_estimator '{estimator}' is not one of {', '.join(KL_ESTIMATORS)}")
    x = ref_logps - logps
    kl = -x if estimator == "k1" else torch.expm1(x) - x
    return kl.masked_fill(~mask.bool(), 0.0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the position of each row's last masked-in token (its EOS when it has one); -1 for an empty row."""
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device)[None, :].expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (B, T), non-score rewards (B, T)): −β·KL_t on every completion token, plus each row's
    score (B,) on its last token. A row with no token gets nothing (there is no action to credit)."""
    non_score = (-beta * kl).masked_fill(~mask.bool(), 0.0)
    rewards = non_score.clone()
    last = last_token_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += scores[rows].to(rewards.dtype)
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), (B, T), by generalised advantage estimation; 0 off the mask. The value
    after a completion's last token is 0 (the episode ends there)."""
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t < T - 1 else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * m
    return advantages, (advantages + values) * m


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L_policy, metrics) of one micro-batch: the clipped surrogate, a mean over its masked tokens;
    metrics `clipfrac` (share of tokens where the clipped term is the larger), `approxkl`
    (½ mean (log ρ)²) and `ratio` (mean ρ), detached."""
    diff = logps - old_logps
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                   "approxkl": 0.5 * masked_mean(diff.float() ** 2, mask),
                   "ratio": masked_mean(ratio.float(), mask)}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L_value, metrics) of one micro-batch: ½ the mean over masked tokens of the larger of the
    unclipped and clipped squared errors; `clipfrac`: share of tokens where the clipped one is larger."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, reduce: Reduce = None
                       ) -> float:
    """1 − Var[R − V] / Var[R] over the masked tokens (1: the values predict the returns, 0: no better
    than their mean, < 0: worse); NaN when the returns do not vary."""
    m = mask.to(torch.float64)
    r, err = returns.double(), (returns - values).double()
    n, r_sum, r_sq, e_sum, e_sq = _sum([m.sum(), (r * m).sum(), (r * r * m).sum(), (err * m).sum(),
                                        (err * err * m).sum()], reduce).tolist()
    if n < 1:
        return float("nan")
    var_r = r_sq / n - (r_sum / n) ** 2
    var_e = e_sq / n - (e_sum / n) ** 2
    return 1.0 - var_e / var_r if var_r > 1e-12 else float("nan")


class KLController:
    """β, fixed (`target=0`) or adaptive (Ziegler et al. 2019): see the module docstring. Its state
    (β now) goes into the checkpoint, so a resumed run penalises as the uninterrupted one."""

    def __init__(self, init: float, *, target: float = 0.0, horizon: float = 10_000) -> None:
        if init < 0 or target < 0 or horizon <= 0:
            raise TemperError(f"the KL controller needs kl_coef >= 0, target_kl >= 0 and kl_horizon > 0, got "
                              f"{init}, {target}, {horizon}")
        self.value, self.target, self.horizon = float(init), float(target), float(horizon)

    @property
    def adaptive(self) -> bool:
        return self.target > 0

    def update(self, kl: float, n: int) -> float:
        """Move β after a rollout batch of n completions whose mean summed KL was `kl`; returns β."""
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


__all__ = ["KL_ESTIMATORS", "KLController", "explained_variance", "gae", "last_token_index", "masked_mean",
           "masked_whiten", "per_token_kl", "policy_loss", "token_rewards", "value_loss"]
