"""Preference losses against their formulas worked out by hand, with math, on three pairs.

TRL parity (its own trainers' loss code on the same tensors) is in test_preference_losses_trl.py,
apart because importing TRL alone takes several seconds.
"""

import math

import pytest
import torch

from temper.losses.preference import (
    LOSS_TYPES,
    kto_loss,
    kto_metrics,
    mean_preference_metrics,
    preference_loss,
    preference_metrics,
)

BETA = 0.5
# three pairs: summed completion log-probs under the policy and the reference, and token counts
POLICY_CHOSEN = [-10.0, -7.5, -3.0]
POLICY_REJECTED = [-12.0, -6.0, -3.0]
REF_CHOSEN = [-11.0, -7.0, -4.0]
REF_REJECTED = [-11.5, -6.5, -0.5]
CHOSEN_TOKENS = [4, 3, 2]
REJECTED_TOKENS = [5, 2, 1]


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def _inputs(**overrides):
    kwargs = dict(policy_chosen_logps=_t(POLICY_CHOSEN), policy_rejected_logps=_t(POLICY_REJECTED),
                  ref_chosen_logps=_t(REF_CHOSEN), ref_rejected_logps=_t(REF_REJECTED),
                  chosen_tokens=_t(CHOSEN_TOKENS, torch.long), rejected_tokens=_t(REJECTED_TOKENS, torch.long),
                  beta=BETA)
    kwargs.update(overrides)
    return kwargs


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _margins() -> list[float]:
    """Δ = [π(y_w) − π_ref(y_w)] − [π(y_l) − π_ref(y_l)], per pair: 1.5, −1.0, 3.5."""
    return [(pc - rc) - (pr - rr) for pc, rc, pr, rr in zip(POLICY_CHOSEN, REF_CHOSEN, POLICY_REJECTED, REF_REJECTED)]


def _mean_margins() -> list[float]:
    return [(pc - rc) / nc - (pr - rr) / nr for pc, rc, pr, rr, nc, nr in
            zip(POLICY_CHOSEN, REF_CHOSEN, POLICY_REJECTED, REF_REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS)]


def _close(actual: torch.Tensor, expected: list[float]):
    torch.testing.assert_close(actual, _t(expected), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- each loss by hand

def test_margins_are_the_ones_worked_out():
    assert _margins() == [1.5, -1.0, 3.5]


def test_sigmoid_is_dpo_and_its_rewards():
    losses, chosen_rewards, rejected_rewards = preference_loss("sigmoid", **_inputs())
    _close(losses, [-math.log(1 / (1 + math.exp(-BETA * d))) for d in _margins()])
    _close(chosen_rewards, [BETA * 1.0, BETA * -0.5, BETA * 1.0])
    _close(rejected_rewards, [BETA * -0.5, BETA * 0.5, BETA * -2.5])


def test_sigmoid_with_label_smoothing_is_cdpo():
    eps = 0.2
    losses, _, _ = preference_loss("sigmoid", **_inputs(label_smoothing=eps))
    _close(losses, [-(1 - eps) * _log_sigmoid(BETA * d) - eps * _log_sigmoid(-BETA * d) for d in _margins()])
    plain, _, _ = preference_loss("sigmoid", **_inputs())
    unsmoothed, _, _ = preference_loss("sigmoid", **_inputs(label_smoothing=0.0))
    assert torch.equal(unsmoothed, plain)
    assert not torch.allclose(losses, plain)


def test_robust():
    eps = 0.2
    losses, _, _ = preference_loss("robust", **_inputs(label_smoothing=eps))
    _close(losses, [(-(1 - eps) * _log_sigmoid(BETA * d) + eps * _log_sigmoid(-BETA * d)) / (1 - 2 * eps)
                    for d in _margins()])
    clean, _, _ = preference_loss("robust", **_inputs(label_smoothing=0.0))
    dpo, _, _ = preference_loss("sigmoid", **_inputs())
    _close(clean, dpo.tolist())


def test_hinge():
    losses, _, _ = preference_loss("hinge", **_inputs())
    _close(losses, [1 - 0.75, 1 + 0.5, 0.0])  # pair 2: βΔ = 1.75 > 1, past the hinge
    losses, _, _ = preference_loss("hinge", **_inputs(beta=2.0))
    _close(losses, [0.0, 1 + 2.0, 0.0])


def test_ipo_averages_the_log_ratios_per_token():
    losses, _, _ = preference_loss("ipo", **_inputs())
    # pair 0: chosen ratio 1/4, rejected ratio −0.5/5, Δ̄ = 0.35; target 1/(2β) = 1
    assert _mean_margins()[0] == pytest.approx(0.25 + 0.1)
    _close(losses, [(m - 1 / (2 * BETA)) ** 2 for m in _mean_margins()])
    summed = [(d - 1 / (2 * BETA)) ** 2 for d in _margins()]
    assert not torch.allclose(losses, _t(summed))


def test_sigmoid_norm_is_dpo_on_per_token_log_ratios():
    losses, _, _ = preference_loss("sigmoid_norm", **_inputs())
    _close(losses, [-_log_sigmoid(BETA * m) for m in _mean_margins()])


def test_zero_token_completion_counts_as_one_token():
    losses, _, _ = preference_loss("ipo", **_inputs(chosen_tokens=_t([0, 3, 2], torch.long)))
    assert losses[0].item() == pytest.approx(((1.0 / 1 - (-0.5) / 5) - 1.0) ** 2)


def test_at_initialisation():
    same = _t(POLICY_CHOSEN)
    init = _inputs(ref_chosen_logps=same.clone(), ref_rejected_logps=_t(POLICY_REJECTED))
    for kind, expected in [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * BETA)) ** 2),
                           ("sigmoid_norm", math.log(2)), ("robust", math.log(2))]:
        losses, chosen_rewards, rejected_rewards = preference_loss(kind, **init)
        _close(losses, [expected] * 3)
        _close(chosen_rewards, [0.0] * 3)
        _close(rejected_rewards, [0.0] * 3)


# ----------------------------------------------------------------------------- gradients

def test_dpo_gradient_is_minus_beta_sigmoid_of_minus_beta_delta():
    policy_chosen = _t(POLICY_CHOSEN).requires_grad_()
    policy_rejected = _t(POLICY_REJECTED).requires_grad_()
    losses, chosen_rewards, _ = preference_loss("sigmoid", **_inputs(policy_chosen_logps=policy_chosen,
                                                                     policy_rejected_logps=policy_rejected))
    losses.sum().backward()
    expected = [-BETA * _sigmoid(-BETA * d) for d in _margins()]  # d(−log σ(βΔ))/dΔ, and dΔ/dπ(y_w) = 1
    _close(policy_chosen.grad, expected)
    _close(policy_rejected.grad, [-g for g in expected])
    assert not chosen_rewards.requires_grad


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_cdpo_gradient(eps):
    """d/dΔ [−(1−ε) log σ(βΔ) − ε log σ(−βΔ)] = −β[(1−ε) σ(−βΔ) − ε σ(βΔ)]: 0 at Δ = 0 only when ε = 1/2."""
    for delta in (0.0, 2.0):
        margin = torch.tensor([delta], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        losses, _, _ = preference_loss("sigmoid", margin, zero, zero, zero, beta=BETA, label_smoothing=eps)
        losses.sum().backward()
        expected = -BETA * ((1 - eps) * _sigmoid(-BETA * delta) - eps * _sigmoid(BETA * delta))
        assert margin.grad.item() == pytest.approx(expected, abs=1e-15)
        if eps == 0.5 and delta == 0.0:
            assert margin.grad.item() == 0.0
        else:
            assert margin.grad.item() != 0.0


# ----------------------------------------------------------------------------- reference-free

def test_simpo():
    gamma = 0.3
    losses, chosen_rewards, rejected_rewards = preference_loss(
        "simpo", _t(POLICY_CHOSEN), _t(POLICY_REJECTED), chosen_tokens=_t(CHOSEN_TOKENS, torch.long),
        rejected_tokens=_t(REJECTED_TOKENS, torch.long), beta=2.0, simpo_gamma=gamma)
    # pair 0: avg logps −2.5 and −2.4: −log σ(2 · (−0.1) − 0.3)
    assert losses[0].item() == pytest.approx(-_log_sigmoid(2.0 * (-2.5 + 2.4) - gamma))
    averaged = [(pc / nc, pr / nr) for pc, pr, nc, nr in
                zip(POLICY_CHOSEN, POLICY_REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS)]
    _close(losses, [-_log_sigmoid(2.0 * (w - r) - gamma) for w, r in averaged])
    _close(chosen_rewards, [2.0 * w for w, _ in averaged])
    _close(rejected_rewards, [2.0 * r for _, r in averaged])
    smoothed, _, _ = preference_loss("simpo", _t(POLICY_CHOSEN), _t(POLICY_REJECTED),
                                     chosen_tokens=_t(CHOSEN_TOKENS, torch.long),
                                     rejected_tokens=_t(REJECTED_TOKENS, torch.long), beta=2.0, simpo_gamma=gamma,
                                     label_smoothing=0.1)
    _close(smoothed, [-0.9 * _log_sigmoid(2.0 * (w - r) - gamma) - 0.1 * _log_sigmoid(-(2.0 * (w - r) - gamma))
                      for w, r in averaged])


def _log_odds(avg_logp: float) -> float:
    return avg_logp - math.log1p(-math.exp(avg_logp))


def test_orpo():
    lam = 0.25
    chosen, rejected = [-10.0, -0.3, -1e-6], [-12.0, -6.0, -80.0]
    chosen_tokens, rejected_tokens = [4, 3, 1], [5, 2, 1]
    losses, chosen_rewards, _ = preference_loss(
        "orpo", _t(chosen), _t(rejected), chosen_tokens=_t(chosen_tokens, torch.long),
        rejected_tokens=_t(rejected_tokens, torch.long), beta=lam)
    expected = []
    for w, r, nw, nr in zip(chosen, rejected, chosen_tokens, rejected_tokens):
        avg_w, avg_l = w / nw, r / nr
        expected.append(-avg_w - lam * _log_sigmoid(_log_odds(avg_w) - _log_odds(avg_l)))
    torch.testing.assert_close(losses, _t(expected), rtol=1e-9, atol=0)
    assert torch.isfinite(losses).all()
    _close(chosen_rewards, [lam * w / n for w, n in zip(chosen, chosen_tokens)])


def test_orpo_log_odds_are_stable_near_probability_one():
    """avg log p = −1e-12: log(1 − exp(x)) = log(−expm1(x)) ≈ log(1e-12); naive log1p(−exp) loses it."""
    x = torch.tensor([-1e-12], dtype=torch.float32)
    losses, _, _ = preference_loss("orpo", x, torch.tensor([-3.0]), chosen_tokens=torch.tensor([1]),
                                   rejected_tokens=torch.tensor([1]), beta=1.0)
    expected = 1e-12 - _log_sigmoid((-1e-12 - math.log(1e-12)) - _log_odds(-3.0))
    assert losses.item() == pytest.approx(expected, rel=1e-5, abs=0)


def test_rpo_adds_alpha_times_the_chosen_mean_token_nll():
    alpha = 0.7
    losses, _, _ = preference_loss(("sigmoid", "sft"), **_inputs(loss_weights=(1.0, alpha)))
    _close(losses, [-_log_sigmoid(BETA * d) + alpha * (-pc / nc)
                    for d, pc, nc in zip(_margins(), POLICY_CHOSEN, CHOSEN_TOKENS)])


def test_combined_loss_types_are_the_weighted_sum():
    weights = (0.8, 0.2, 1.5)
    losses, chosen_rewards, _ = preference_loss(("sigmoid", "hinge", "ipo"), **_inputs(loss_weights=weights))
    _close(losses, [0.8 * -_log_sigmoid(BETA * d) + 0.2 * max(0.0, 1 - BETA * d) + 1.5 * (m - 1 / (2 * BETA)) ** 2
                    for d, m in zip(_margins(), _mean_margins())])
    _close(chosen_rewards, preference_loss("sigmoid", **_inputs())[1].tolist())
    unweighted, _, _ = preference_loss(["sigmoid", "hinge"], **_inputs())
    _close(unweighted, [-_log_sigmoid(BETA * d) + max(0.0, 1 - BETA * d) for d in _margins()])


# ----------------------------------------------------------------------------- KTO

def test_kto():
    policy, ref = [-5.0, -8.0, -4.0, -9.0], [-6.0, -7.0, -4.5, -8.0]
    desirable = torch.tensor([True, True, False, False])
    kl = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    policy_logps = _t(policy).requires_grad_()
    losses, rewards = kto_loss(policy_logps, _t(ref), desirable, kl, beta=BETA,
                               desirable_weight=1.5, undesirable_weight=0.7)
    r = [p - q for p, q in zip(policy, ref)]  # 1, −1, 0.5, −1
    expected = [1.5 * (1 - _sigmoid(BETA * (r[0] - 0.4))), 1.5 * (1 - _sigmoid(BETA * (r[1] - 0.4))),
                0.7 * (1 - _sigmoid(BETA * (0.4 - r[2]))), 0.7 * (1 - _sigmoid(BETA * (0.4 - r[3])))]
    _close(losses, expected)
    _close(rewards, [BETA * x for x in r])
    losses.sum().backward()
    assert kl.grad is None  # the reference point is detached
    d = [-1.5 * BETA * _sigmoid(BETA * (r[0] - 0.4)) * (1 - _sigmoid(BETA * (r[0] - 0.4)))]  # d/dr of λ(1 − σ(β(r − z0)))
    assert policy_logps.grad[0].item() == pytest.approx(d[0], abs=1e-14)


def test_kto_reference_point_is_clamped_at_zero():
    policy, ref = _t([-5.0, -9.0]), _t([-6.0, -8.0])
    desirable = torch.tensor([True, False])
    negative, _ = kto_loss(policy, ref, desirable, torch.tensor(-2.0), beta=BETA)
    zero, _ = kto_loss(policy, ref, desirable, torch.tensor(0.0), beta=BETA)
    assert torch.equal(negative, zero)
    _close(zero, [1 - _sigmoid(BETA * 1.0), 1 - _sigmoid(BETA * 1.0)])


# ----------------------------------------------------------------------------- metrics

def test_metrics_are_sums_and_accuracy_is_strict():
    chosen_rewards = _t([0.5, -0.25, 0.3, 0.1])
    rejected_rewards = _t([-0.25, 0.25, 0.3, 0.0])  # pair 2 is a tie: not accurate
    metrics = preference_metrics(chosen_rewards, rejected_rewards, _t([-1.0, -2.0, -3.0, -4.0]),
                                 _t([-5.0, -6.0, -7.0, -8.0]),
                                 chosen_logits_sum=_t([1.0, 2.0, 3.0, 4.0]), rejected_logits_sum=_t([0.5] * 4),
                                 chosen_tokens=_t([2, 2, 3, 3], torch.long), rejected_tokens=_t([1, 1, 1, 1], torch.long))
    values = {k: float(v) for k, v in metrics.items()}
    assert values["rewards/accuracies"] == 2
    assert values["rewards/chosen"] == pytest.approx(0.65)
    assert values["rewards/rejected"] == pytest.approx(0.3)
    assert values["rewards/margins"] == pytest.approx(0.35)
    assert values["logps/chosen"] == -10.0 and values["logps/rejected"] == -26.0
    assert values["logits/chosen"] == 10.0 and values["count/chosen_tokens"] == 10
    means = mean_preference_metrics(values, count=4)
    assert means["rewards/accuracies"] == 0.5
    assert means["rewards/margins"] == pytest.approx(0.35 / 4)
    assert means["logps/rejected"] == -6.5
    assert means["logits/chosen"] == 1.0  # a token mean, as TRL's: 10 / 10 tokens, not / 4 pairs
    assert means["logits/rejected"] == 0.5
    assert not any(k.startswith("count/") for k in means)


@pytest.mark.parametrize("kind", ["simpo", "orpo", ("simpo", "sft")])
def test_simpo_and_orpo_log_per_token_mean_logps_as_trl(kind):
    """TRL's CPO (simpo) and ORPO trainers log the per-token *mean* log-probs as logps/*: Σ_i
    logp_i / n_i over pairs, divided by the pairs; ORPO adds log_odds_ratio = mean log σ(L) and
    log_odds_chosen = mean L, L = log odds(y_w) − log odds(y_l). No logits/*: TRL's average over
    every position of padded rows (prompt and padding included)."""
    chosen, rejected = _t([-2.0, -9.0]), _t([-6.0, -4.0])
    chosen_tokens, rejected_tokens = _t([2, 3], torch.long), _t([4, 1], torch.long)  # means -1, -3; -1.5, -4
    losses, chosen_rewards, rejected_rewards = preference_loss(
        kind, chosen, rejected, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens, beta=BETA)
    sums = preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected, chosen_logits_sum=_t([1.0, 2.0]),
                              rejected_logits_sum=_t([1.0, 2.0]), chosen_tokens=chosen_tokens,
                              rejected_tokens=rejected_tokens, loss_type=kind)
    means = mean_preference_metrics({k: float(v) for k, v in sums.items()}, count=2)
    assert means["logps/chosen"] == pytest.approx((-1.0 - 3.0) / 2)
    assert means["logps/rejected"] == pytest.approx((-1.5 - 4.0) / 2)
    assert means["rewards/chosen"] == pytest.approx(BETA * (-1.0 - 3.0) / 2)
    assert not any(k.startswith(("logits/", "count/")) for k in sums)
    if kind == "orpo":
        log_odds = [(c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r))) for c, r in ((-1, -1.5), (-3, -4))]
        assert means["log_odds_chosen"] == pytest.approx(sum(log_odds) / 2, rel=1e-6)
        assert means["log_odds_ratio"] == pytest.approx(sum(math.log(_sigmoid(x)) for x in log_odds) / 2, rel=1e-6)
    else:
        assert "log_odds_ratio" not in means
    dpo = preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected)  # the DPO family: sums
    assert float(dpo["logps/chosen"]) == -11.0
    with pytest.raises(ValueError, match="per-token mean log-probs"):
        preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected, loss_type=kind)


def test_metrics_sum_over_micro_batches_to_the_whole_batch():
    rewards = _t([0.5, -0.25, 0.3, 0.1]), _t([-0.25, 0.25, 0.2, 0.0])
    logps = _t([-1.0, -2.0, -3.0, -4.0]), _t([-5.0, -6.0, -7.0, -8.0])
    whole = preference_metrics(*rewards, *logps)
    parts = [preference_metrics(*(t[s] for t in rewards), *(t[s] for t in logps)) for s in (slice(0, 1), slice(1, 4))]
    for name, value in whole.items():
        assert float(value) == pytest.approx(sum(float(p[name]) for p in parts))


def test_kto_metrics():
    rewards, logps = _t([0.5, -0.5, 0.25]), _t([-5.0, -9.0, -4.0])
    desirable = torch.tensor([True, False, True])
    sums = {k: float(v) for k, v in kto_metrics(rewards, logps, desirable, torch.tensor(-0.1)).items()}
    means = mean_preference_metrics(sums, count=3)
    assert means["rewards/chosen"] == pytest.approx(0.375) and means["rewards/rejected"] == -0.5
    assert means["logps/chosen"] == -4.5 and means["logps/rejected"] == -9.0
    assert means["rewards/margins"] == pytest.approx(0.875)
    assert means["kl"] == 0.0  # logged clamped, as TRL


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, message", [
    (lambda: preference_loss("sigmod", **_inputs()), "did you mean 'sigmoid'"),
    (lambda: preference_loss(("sigmoid", "hinge"), **_inputs(loss_weights=[1.0])), "one weight per loss type"),
    (lambda: preference_loss("ipo", **_inputs(chosen_tokens=None)), "needs chosen_tokens"),
    (lambda: preference_loss("sigmoid_norm", **_inputs(rejected_tokens=None)), "needs rejected_tokens"),
    (lambda: preference_loss("sigmoid", **_inputs(ref_chosen_logps=None)), "needs ref_chosen_logps"),
    (lambda: preference_loss("robust", **_inputs(label_smoothing=0.5)), "must be < 0.5"),
    (lambda: preference_loss("sigmoid", **_inputs(label_smoothing=0.7)), "label_smoothing"),
    (lambda: preference_loss("sigmoid", **_inputs(beta=0.0)), "beta must be > 0"),
    (lambda: preference_loss(("simpo", "sigmoid"), **_inputs()), "mixes reference-free"),
    (lambda: preference_loss(("simpo", "orpo", "sft"), **_inputs()), "with 'sft' only"),
    (lambda: preference_metrics(_t([0.0]), _t([0.0]), _t([0.0]), _t([0.0]), chosen_logits_sum=_t([1.0])),
     "pass chosen_tokens"),
])
def test_bad_input_says_what_to_do(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_every_loss_type_runs_in_float32_and_backpropagates():
    for kind in LOSS_TYPES:
        kwargs = _inputs(policy_chosen_logps=_t(POLICY_CHOSEN, torch.float32).requires_grad_(),
                         policy_rejected_logps=_t(POLICY_REJECTED, torch.float32).requires_grad_(),
                         ref_chosen_logps=_t(REF_CHOSEN, torch.float32), ref_rejected_logps=_t(REF_REJECTED, torch.float32))
        losses, chosen_rewards, rejected_rewards = preference_loss(kind, **kwargs)
        assert losses.shape == (3,) and losses.dtype == torch.float32, kind
        losses.sum().backward()
        assert torch.isfinite(kwargs["policy_chosen_logps"].grad).all(), kind
