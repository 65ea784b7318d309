"""GRPO's objective: each loss type against its formula written out token by token (value and
gradient), against TRL 1.16's own `GRPOTrainer._compute_loss` run on a stand-in trainer, and the
properties users rely on (identical rewards teach nothing, μ = 1 gives a ratio of exactly 1).

Everything is float64; tolerances are `reorder_tol` with float64's eps over the sums involved."""

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import FP32_EPS, reorder_tol

from temper.errors import TemperError
from temper.losses.grpo import (
    LOSS_TYPES,
    group_advantages,
    grpo_loss,
    kl_k3,
    mask_truncated_completions,
    mean_grpo_metrics,
)

F64_EPS = torch.finfo(torch.float64).eps
G, B, T = 3, 6, 8
LENGTHS = [8, 5, 0, 8, 1, 6]  # a row with no tokens (a masked truncated completion) counts in grpo's B
MAX_LEN = 10
BETA = 0.04


def _close(actual: torch.Tensor, expected: torch.Tensor, scale: float, *lengths: int) -> None:
    """Equal up to the reordering of float64 sums over `lengths` terms of size `scale`."""
    tol = reorder_tol(scale, *lengths, eps=F64_EPS)
    a, b = (x.detach().double() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
            for x in (actual, expected))
    gap = float((a - b).abs().max())
    assert gap <= tol, f"|a - b| = {gap:.3g} > {tol:.3g}"


def _close_fp32(actual: float, expected: float) -> None:
    """A share computed in float32 (exact counts, one rounded division) against the float64 one."""
    assert abs(actual - expected) <= FP32_EPS * abs(actual), f"{actual} vs {expected}"


def _batch(seed: int = 0, sequence_spread: float = 0.0):
    """Random per-token log-probs of B = 6 completions (2 prompts x G = 3) with ratios π/π_old spread
    on both sides of the clip range; finite junk in the padding (TRL multiplies it by 0)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    row_offset = sequence_spread * torch.tensor([1.0, -1.0, 0.5, -0.6, 0.8, -0.9], dtype=torch.float64)[:, None]
    old = logps + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64) + row_offset
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    entropies = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 1.0, 0.0], dtype=torch.float64)
    advantages, _ = group_advantages(rewards, G)
    return dict(logps=logps, old=old, ref=ref, advantages=advantages, mask=mask, entropies=entropies)


# ----------------------------------------------------------------------------- the formula, written out

def _written_out(data, *, loss_type, level="token", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0,
                 max_len=MAX_LEN, num_items=None, old=True):
    """(loss, d loss / d logps) from the module docstring's formulas, one token at a time in Python floats.

    The gradient is worked out by hand: per token, d ℓ / d log π = −A ρ where the unclipped term is
    the min (0 where the clipped one is), −min(ρ, ε_max) A for cispo, β (1 − exp(ref − logp)) for
    k3; a sequence-level ratio ρ_i = exp(mean_t log ρ_t) gives each token ρ_i / |y_i| of its sequence's
    derivative, and each token's loss weighs c_i in the aggregate."""
    logps, ref, adv, mask = data["logps"].tolist(), data["ref"].tolist(), data["advantages"].tolist(), data["mask"]
    olds = data["old"].tolist() if old else logps
    lengths = mask.sum(1).tolist()
    n_local = sum(lengths)
    weight = {"grpo": lambda i: 1 / (B * max(1, lengths[i])), "bnpo": lambda i: 1 / max(1, n_local),
              "dr_grpo": lambda i: 1 / (B * max_len),
              "dapo": lambda i: 1 / max(1, num_items if num_items is not None else n_local)}
    weight["cispo"] = weight["dapo"]
    loss, grad = 0.0, [[0.0] * T for _ in range(B)]
    for i in range(B):
        a, tokens = adv[i], range(lengths[i])
        seq_ratio = math.exp(sum(logps[i][t] - olds[i][t] for t in tokens) / max(1, lengths[i]))
        seq_dterm = 0.0  # a sequence ratio's d ℓ_i / d log ρ_i, shared by its tokens
        for t in tokens:
            rho = math.exp(logps[i][t] - olds[i][t]) if level == "token" else seq_ratio
            if loss_type == "cispo":
                term, dterm_logp = -min(rho, eps_high) * a * logps[i][t], -min(rho, eps_high) * a
                dterm_ratio = 0.0
            else:
                capped = min(rho, delta) if delta is not None else rho
                unclipped, clipped = capped * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a
                term = -min(unclipped, clipped)
                dterm_logp = 0.0
                uses_ratio = unclipped <= clipped and (delta is None or rho < delta)
                dterm_ratio = -a * rho if uses_ratio else 0.0  # d/d log ρ
            k = ref[i][t] - logps[i][t]
            term += beta * (math.exp(k) - k - 1)
            dterm_logp += beta * (1 - math.exp(k))
            c = weight[loss_type](i)
            loss += c * term
            if level == "token":
                grad[i][t] += c * (dterm_logp + dterm_ratio)
            else:
                grad[i][t] += c * dterm_logp
                seq_dterm += c * dterm_ratio
        for t in tokens:  # d log ρ_i / d log π_t = 1 / |y_i|
            grad[i][t] += seq_dterm / lengths[i]
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(grad, dtype=torch.float64)


def _ours(data, *, old=True, **kwargs):
    logps = data["logps"].clone().requires_grad_(True)
    loss, metrics = grpo_loss(logps, data["old"] if old else None, data["ref"], data["advantages"], data["mask"],
                              entropies=data["entropies"], **kwargs)
    loss.backward()
    return loss.detach(), logps.grad, metrics


CASES = [dict(level=level, beta=beta) for level in ("token", "sequence") for beta in (0.0, BETA)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['level']}-beta{c['beta']}")
def test_each_loss_type_is_its_definition(loss_type, case):
    data = _batch(sequence_spread=0.3 if case["level"] == "sequence" else 0.0)
    kwargs = dict(loss_type=loss_type, importance_sampling_level=case["level"], beta=case["beta"],
                  epsilon_high=0.28 if loss_type != "cispo" else 1.1, max_completion_length=MAX_LEN,
                  num_items_in_batch=50 if loss_type in ("dapo", "cispo") else None)
    loss, grad, _ = _ours(data, **kwargs)
    want_loss, want_grad = _written_out(data, loss_type=loss_type, level=case["level"], beta=case["beta"],
                                        eps_high=kwargs["epsilon_high"], num_items=kwargs["num_items_in_batch"])
    assert loss != 0 and grad.abs().sum() > 0
    _close(loss, want_loss, 4.0, B * T, T)
    _close(grad, want_grad, 4.0, T, T)


def test_delta_caps_the_unclipped_ratio():
    data = _batch(seed=1)
    loss, grad, _ = _ours(data, loss_type="bnpo", delta=1.3)
    want_loss, want_grad = _written_out(data, loss_type="bnpo", delta=1.3)
    uncapped, _, _ = _ours(data, loss_type="bnpo")
    assert abs(float(loss - uncapped)) > 1e-3  # some ratio above 1.3 with A < 0 was capped
    _close(loss, want_loss, 4.0, B * T, T)
    _close(grad, want_grad, 4.0, T, T)


def test_kl_k3():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.0, -1.0, -3.0], dtype=torch.float64)
    want = torch.tensor([0.0, math.e - 1 - 1, math.exp(-2.5) + 2.5 - 1], dtype=torch.float64)
    torch.testing.assert_close(kl_k3(logp, ref), want, rtol=0, atol=4 * F64_EPS * 3)
    assert (kl_k3(torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)) >= 0).all()


# ----------------------------------------------------------------------------- TRL's own code

def _trl(data, *, loss_type, level="token", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0, old=True,
         num_items=None, accumulation_steps=1, steps_per_generation=1, rows=slice(None)):
    """(loss, d loss / d logps, logged metrics) from TRL's `GRPOTrainer._compute_loss` on a stand-in
    trainer whose forward hands back the given per-token log-probs and entropies (what TRL's model
    call would compute); every other input is TRL's own batch layout."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.trainer.grpo_trainer import GRPOTrainer

    logps = data["logps"][rows].clone().requires_grad_(True)
    mask = data["mask"][rows]
    entropies = data["entropies"][rows]
    n = logps.shape[0]
    accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, entropies, None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=steps_per_generation),
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation_steps,
        max_completion_length=MAX_LEN, accelerator=accelerator, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.ones(n, T, dtype=torch.long), "completion_mask": mask,
              "advantages": data["advantages"][rows], "ref_per_token_logps": data["ref"][rows],
              "num_items_in_batch": torch.tensor(num_items if num_items is not None else int(mask.sum()))}
    if old:
        inputs["old_per_token_logps"] = data["old"][rows]
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.detach(), logps.grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("case", CASES + [dict(level="token", beta=BETA, old=False),
                                          dict(level="token", beta=0.0, delta=1.3)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_each_loss_type_matches_trl(loss_type, case):
    if loss_type == "cispo" and "delta" in case:
        pytest.skip("delta applies to the clipped objective only")
    data = _batch(seed=2, sequence_spread=0.3 if case["level"] == "sequence" else 0.0)
    eps_high = 0.28 if loss_type != "cispo" else 1.1
    old = case.get("old", True)
    num_items = 50 if loss_type in ("dapo", "cispo") else None
    trl_loss, trl_grad, trl_metrics = _trl(data, loss_type=loss_type, level=case["level"], eps_high=eps_high,
                                           beta=case["beta"], old=old, delta=case.get("delta"), num_items=num_items)
    logps = data["logps"].clone().requires_grad_(True)
    loss, metrics = grpo_loss(logps, data["old"] if old else None, data["ref"] if case["beta"] else None,
                              data["advantages"], data["mask"], loss_type=loss_type,
                              importance_sampling_level=case["level"], epsilon_high=eps_high, beta=case["beta"],
                              delta=case.get("delta"), max_completion_length=MAX_LEN, num_items_in_batch=num_items,
                              entropies=data["entropies"])
    loss.backward()
    _close(loss.detach(), trl_loss, 4.0, B * T, T)
    _close(logps.grad, trl_grad, 4.0, T, T)
    means = mean_grpo_metrics(metrics)
    names = {"kl", "entropy"} if case["beta"] else {"entropy"}
    names |= {"cispo_clip_ratio"} if loss_type == "cispo" else {
        "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    assert names <= set(trl_metrics) and set(means) == names
    for name in names:  # TRL counts the clipped tokens in float32 (`.float()`): its division rounds there
        _close(means[name], trl_metrics[name], 4.0, B * T) if name in ("kl", "entropy") else \
            _close_fp32(means[name], trl_metrics[name])
    if old and loss_type != "cispo" and case["level"] == "token":  # the data reach both sides of the clip range
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0


def test_dapo_over_micro_batches_matches_trl_accumulation():
    """TRL's dapo with 2 accumulation steps over one generation batch: each micro-batch's loss is its
    sum over the generation batch's active tokens; the two add up to bnpo on the whole batch."""
    data = _batch(seed=3)
    total = int(data["mask"].sum())
    parts, ours = [], []
    for rows in (slice(0, 3), slice(3, 6)):
        trl_loss, _, _ = _trl(data, loss_type="dapo", num_items=total, accumulation_steps=2, steps_per_generation=2,
                              rows=rows)
        parts.append(trl_loss)
        loss, _ = grpo_loss(data["logps"][rows], data["old"][rows], None, data["advantages"][rows],
                            data["mask"][rows], loss_type="dapo", num_items_in_batch=total)
        ours.append(loss)
    whole, _ = grpo_loss(data["logps"], data["old"], None, data["advantages"], data["mask"], loss_type="bnpo")
    for a, b in zip(ours, parts):
        _close(a, b, 4.0, B * T)
    _close(sum(ours), whole, 4.0, B * T)


def test_advantages_match_trl_formula():
    """TRL computes advantages inside `_generate_and_score_completions` (generation, rewards, logging
    around them); its lines are reproduced here through its own `nanstd`."""
    pytest.importorskip("trl")
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([0.3, 1.0, 0.0, 2.0, 2.0, 2.0, 0.7, float("nan"), 0.1, 5.0, -1.0, 0.5],
                           dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
        if scale == "batch":
            std = nanstd(rewards).expand_as(rewards)
        else:
            std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
        trl_adv = rewards - mean
        if scale != "none":
            trl_adv = trl_adv / (std + 1e-4)
        trl_adv = torch.nan_to_num(trl_adv, nan=0.0)
        trl_frac = torch.isclose(std, torch.zeros_like(std)).float().mean()
        adv, frac = group_advantages(rewards, G, scale=scale)
        # TRL's nanstd takes Bessel's n / (n - 1) from integer counts in float32 (1.5 to 1 part in 1e8);
        # temper's in the rewards' dtype: the same in float32, closer in float64
        torch.testing.assert_close(adv, trl_adv, rtol=FP32_EPS, atol=0)
        assert float(frac) == float(trl_frac)
        assert adv[7] == 0  # the unscorable completion


# ----------------------------------------------------------------------------- advantages

def test_group_batch_none_scaling_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0, 4.0, 4.0, 1.0], dtype=torch.float64)
    adv, frac = group_advantages(rewards, 3, scale="none")
    torch.testing.assert_close(adv, torch.tensor([0.0, -1.0, 1.0, 1.0, 1.0, -2.0], dtype=torch.float64))
    assert float(frac) == 0.0
    adv, _ = group_advantages(rewards, 3, scale="group")  # unbiased stds: 1 and sqrt(3)
    want = torch.tensor([0.0, -1 / (1 + 1e-4), 1 / (1 + 1e-4)] + [x / (math.sqrt(3) + 1e-4) for x in (1, 1, -2)],
                        dtype=torch.float64)
    torch.testing.assert_close(adv, want, rtol=0, atol=8 * F64_EPS)
    adv, _ = group_advantages(rewards, 3, scale="batch")
    batch_std = math.sqrt(sum((r - 2.0) ** 2 for r in rewards.tolist()) / 5)  # mean 2, Bessel
    want = torch.tensor([x / (batch_std + 1e-4) for x in (0, -1, 1, 1, 1, -2)], dtype=torch.float64)
    torch.testing.assert_close(adv, want, rtol=0, atol=8 * F64_EPS)
    assert all(float(group_advantages(rewards, 3, scale=s, eps=0.5)[0][2]) != 1.0 for s in ("group", "batch"))


def test_identical_rewards_teach_nothing_but_kl():
    """A group of G equal rewards (0.9 thrice in float32, whose mean is 0.9 + 6e-8: TRL's formula
    gives them advantages of ±6e-4) has advantage 0 exactly, and its completions get no policy gradient: none at all with beta = 0, only the KL
    term's with beta > 0; frac_reward_zero_std counts the group."""
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 0.0], dtype=torch.float32)
    assert (rewards[:3] - rewards[:3].mean()).abs().max() > 0  # the rounding the exact zero removes
    for scale in ("group", "batch", "none"):
        adv, frac = group_advantages(rewards, 3, scale=scale)
        assert adv[:3].tolist() == [0.0, 0.0, 0.0] and (adv[3:] != 0).all()
        assert float(frac) == (0.5 if scale != "batch" else 0.0)
    data = _batch(seed=4)
    data["advantages"] = torch.zeros(B, dtype=torch.float64)
    for loss_type in LOSS_TYPES:
        for level in ("token", "sequence"):
            kwargs = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=MAX_LEN)
            _, grad, _ = _ours(data, **kwargs)
            assert grad.abs().max() == 0, (loss_type, level)
            _, grad_kl, _ = _ours(data, beta=BETA, **kwargs)
            _, want = _written_out(data, loss_type=loss_type, level=level, beta=BETA)
            assert grad_kl.abs().max() > 0
            _close(grad_kl, want, 4.0, T, T)


def test_all_equal_batch_gives_frac_one():
    adv, frac = group_advantages(torch.full((6,), 0.5), 3, scale="batch")
    assert adv.abs().max() == 0 and float(frac) == 1.0
    adv, frac = group_advantages(torch.tensor([1.0, 2.0]), 1)  # G = 1: TRL's std is 0
    assert adv.tolist() == [0.0, 0.0] and float(frac) == 1.0


# ----------------------------------------------------------------------------- ratios and clipping

@pytest.mark.parametrize("level", ["token", "sequence"])
def test_mu_one_ratio_is_exactly_one(level):
    """old_logps=None: ρ = 1 exactly, nothing clipped; the loss is −mean A (per the aggregation),
    ~0 since A sums to zero per group, while the gradient is −A_i c_i per token, not zero."""
    data = _batch(seed=5)
    loss, grad, metrics = _ours(data, old=False, loss_type="grpo", importance_sampling_level=level)
    means = mean_grpo_metrics(metrics)
    assert means["clip_ratio/low_mean"] == means["clip_ratio/high_mean"] == means["clip_ratio/region_mean"] == 0.0
    lengths = data["mask"].sum(1)
    adv = data["advantages"]
    active = lengths > 0
    assert float(loss) == pytest.approx(-float(adv[active].sum()) / B, abs=reorder_tol(2.0, B * T, eps=F64_EPS))
    want = -(adv / (B * lengths.clamp(min=1)))[:, None] * data["mask"]
    _close(grad, want, 2.0, T)
    assert grad.abs().max() > 0.01


def test_gspo_sequence_ratio():
    """GSPO: one ratio per sequence, exp of the mean token log-ratio; old log-probs offset by a constant
    per row give that constant's exp, whatever the per-token values."""
    data = _batch(seed=6)
    offsets = torch.tensor([0.1, -0.5, 0.0, 0.05, 0.3, -0.1], dtype=torch.float64)
    data["old"] = data["logps"] - offsets[:, None]  # log ρ_i = offset_i on every token
    data["advantages"] = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    loss, grad, metrics = _ours(data, loss_type="grpo", importance_sampling_level="sequence")
    ratio = offsets.exp()
    a = data["advantages"]
    per_seq = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)  # rows: 1.105, 0.607 (low-clipped), 1, ...
    per_seq[2] = 0.0  # no tokens
    _close(loss, per_seq.mean(), 2.0, B)
    means = mean_grpo_metrics(metrics)  # over sequences: row 1 low (0.607 < 0.8, A < 0), row 4 high (1.35 > 1.2)
    assert means["clip_ratio/low_mean"] == 1 / B and means["clip_ratio/high_mean"] == 1 / B
    assert means["clip_ratio/region_mean"] == 2 / B
    clipped = torch.tensor([False, True, False, False, True, False])
    assert (grad[clipped] == 0).all() and (grad[~clipped & (data["mask"].sum(1) > 0)].abs().sum(1) > 0).all()


def test_clip_boundaries_low_and_high_hit_and_counted():
    """Four tokens, one per case: ρ = 0.5 with A < 0 is clipped low, ρ = 1.5 with A > 0 high (no
    gradient, value at the bound); ρ = 1.5 with A < 0 and ρ = 0.5 with A > 0 are not (the min keeps
    the unclipped, more pessimistic term); ρ = 0.7 with A < 0 is inside ε_low = 0.35's range."""
    ratios = torch.tensor([[0.5], [1.5], [1.5], [0.5], [0.7]], dtype=torch.float64)
    adv = torch.tensor([-1.0, 2.0, -1.0, 2.0, -1.0], dtype=torch.float64)
    logps = torch.full((5, 1), -1.0, dtype=torch.float64, requires_grad=True)
    old = logps.detach() - ratios.log()
    mask = torch.ones(5, 1)
    loss, metrics = grpo_loss(logps, old, None, adv, mask, loss_type="bnpo", epsilon_low=0.35, epsilon_high=0.28)
    loss.backward()
    per_token = torch.tensor([0.65 * 1.0, -1.28 * 2.0, 1.5 * 1.0, -0.5 * 2.0, 0.7 * 1.0], dtype=torch.float64)
    _close(loss, per_token.mean(), 4.0, 5)
    want_grad = torch.tensor([0.0, 0.0, 1.5, -1.0, 0.7], dtype=torch.float64)[:, None] / 5  # −A ρ / N
    _close(logps.grad, want_grad, 2.0, 5)
    means = mean_grpo_metrics(metrics)
    assert means == {"clip_ratio/low_mean": 1 / 5, "clip_ratio/high_mean": 1 / 5, "clip_ratio/region_mean": 2 / 5}


def test_cispo_caps_the_weight_and_keeps_the_gradient():
    ratios = torch.tensor([[0.5], [3.0], [3.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    logps = torch.full((3, 1), -2.0, dtype=torch.float64, requires_grad=True)
    loss, metrics = grpo_loss(logps, logps.detach() - ratios.log(), None, adv, torch.ones(3, 1),
                              loss_type="cispo", epsilon_high=2.0)
    loss.backward()
    weights = torch.tensor([0.5, 2.0, 2.0], dtype=torch.float64)
    _close(loss, (-weights * adv * -2.0).sum() / 3, 8.0, 3)
    _close(logps.grad[:, 0], -weights * adv / 3, 2.0, 3)  # a capped token still has a gradient (unlike PPO's clip)
    assert mean_grpo_metrics(metrics) == {"cispo_clip_ratio": 1 / 3}  # only ρ > ε_max with A > 0


def test_dapo_with_local_count_is_bnpo():
    data = _batch(seed=7)
    args = (data["logps"], data["old"], data["ref"], data["advantages"], data["mask"])
    bnpo, _ = grpo_loss(*args, loss_type="bnpo", beta=BETA)
    local, _ = grpo_loss(*args, loss_type="dapo", beta=BETA)
    counted, _ = grpo_loss(*args, loss_type="dapo", beta=BETA, num_items_in_batch=int(data["mask"].sum()))
    assert float(bnpo) == float(local) == float(counted)
    doubled, _ = grpo_loss(*args, loss_type="dapo", beta=BETA, num_items_in_batch=2 * int(data["mask"].sum()))
    _close(doubled, bnpo / 2, 4.0, B * T)


def test_padding_values_never_leak():
    data = _batch(seed=8)
    dirty = {k: v.clone() for k, v in data.items()}
    pad = data["mask"] == 0
    for key, junk in (("logps", float("-inf")), ("old", float("nan")), ("ref", float("inf")),
                      ("entropies", float("nan"))):
        dirty[key][pad] = junk
    for loss_type in LOSS_TYPES:
        kwargs = dict(loss_type=loss_type, beta=BETA, max_completion_length=MAX_LEN)
        clean_loss, clean_grad, clean_metrics = _ours(data, **kwargs)
        loss, grad, metrics = _ours(dirty, **kwargs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        _close(loss, clean_loss, 4.0, B * T)
        _close(grad, clean_grad, 4.0, T)
        assert mean_grpo_metrics(metrics).keys() == mean_grpo_metrics(clean_metrics).keys()


# ----------------------------------------------------------------------------- truncation and bad input

def test_mask_truncated_completions():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 0], [5, 6, 7, 8], [5, 7, 0, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    masked, truncated = mask_truncated_completions(ids, mask, [eos])
    assert truncated.tolist() == [False, True, True, False]
    assert masked.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    masked, truncated = mask_truncated_completions(ids, mask.bool(), eos, pad_token_id=7)
    assert truncated.tolist() == [False, True, False, False] and masked.dtype == torch.bool


@pytest.mark.parametrize("call, message", [
    (lambda: group_advantages(torch.zeros(7), 3), "does not divide into groups of 3"),
    (lambda: group_advantages(torch.zeros(6), 0), "positive integer"),
    (lambda: group_advantages(torch.zeros(6), 3, scale="std"), "unknown scale_rewards 'std'"),
    (lambda: group_advantages(torch.zeros(2, 3), 3), "one value per completion"),
    (lambda: grpo_loss(torch.zeros(2, 3), None, None, torch.zeros(2), torch.ones(2, 3), loss_type="gpro"),
     "unknown loss_type 'gpro' (did you mean 'grpo'?)"),
    (lambda: grpo_loss(torch.zeros(2, 3), None, None, torch.zeros(2), torch.ones(2, 3), loss_type="sapo"),
     "not implemented"),
    (lambda: grpo_loss(torch.zeros(2, 3), None, None, torch.zeros(2), torch.ones(2, 3),
                       importance_sampling_level="seq"), "unknown importance_sampling_level"),
    (lambda: grpo_loss(torch.zeros(2, 3), None, None, torch.zeros(2), torch.ones(2, 3), loss_type="dr_grpo"),
     "max_completion_length"),
    (lambda: grpo_loss(torch.zeros(2, 3), None, None, torch.zeros(2), torch.ones(2, 3), beta=0.1),
     "needs the reference's log-probs"),
    (lambda: grpo_loss(torch.zeros(2, 3), None, None, torch.zeros(2), torch.ones(2, 3), epsilon_low=-0.1),
     "must be >= 0"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(TemperError) as caught:
        call()
    assert message in str(caught.value) and "\n" not in str(caught.value)
