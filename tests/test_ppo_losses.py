"""PPO's pure functions (temper.losses.ppo) against their formulas on hand-made tensors. TRL 1.16 as
installed ships no PPOTrainer, so the references are TRL's loops and formulas written out here
elementwise (its GAE loop over reversed time, its masked_whiten/masked_var)."""

from __future__ import annotations

import math

import pytest
import torch

from temper.errors import TemperError
from temper.losses import ppo


def reference_gae(rewards, values, lengths, gamma, lam):
    """Per row, per token, by the definition: A_t = sum_l (γλ)^l δ_{t+l}, V after the end 0."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = lengths[b]
        v = [float(values[b, t]) for t in range(n)] + [0.0]
        deltas = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return adv


def mask_of(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def test_gae_is_the_discounted_sum_of_td_errors_and_stops_at_each_completions_end():
    torch.manual_seed(0)
    lengths, T = [5, 2, 3], 5
    mask = mask_of(lengths, T)
    rewards = torch.randn(3, T).double().masked_fill(~mask, 7.0)  # junk off the mask must not leak in
    values = torch.randn(3, T).double().masked_fill(~mask, -3.0)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
        adv, ret = ppo.gae(rewards, values, mask, gamma=gamma, lam=lam)
        expected = reference_gae(rewards, values, lengths, gamma, lam)
        assert torch.allclose(adv, expected, atol=1e-12)
        assert torch.allclose(ret, (expected + values * mask) * mask, atol=1e-12)
        assert torch.all(adv[~mask] == 0)
    # γ = λ = 1: the advantage of the first token is the total reward minus its value (Monte Carlo)
    adv, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b, n in enumerate(lengths):
        assert adv[b, 0].item() == pytest.approx(rewards[b, :n].sum().item() - values[b, 0].item())


def trl_masked_whiten(values, mask, shift_mean=True):
    """TRL's masked_mean / masked_var(unbiased) / masked_whiten, written out."""
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum()
    var = var * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def test_masked_whiten_is_trls_over_the_masked_tokens_only():
    torch.manual_seed(1)
    mask = mask_of([4, 1, 3], 4)
    x = torch.randn(3, 4).double()
    for shift in (True, False):
        got = ppo.masked_whiten(x.masked_fill(~mask, 100.0), mask, shift_mean=shift)
        want = trl_masked_whiten(x.masked_fill(~mask, 0.0), mask.double(), shift)
        assert torch.allclose(got[mask], want[mask], atol=1e-12)
    whitened = ppo.masked_whiten(x, mask)[mask]
    assert whitened.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert whitened.std().item() == pytest.approx(1.0, abs=1e-6)
    # two "ranks" holding rows [0] and [1, 2]: a reduce adding the other rank's statistic (around the
    # same global mean, as its own call would compute it) whitens each as the whole batch
    full = ppo.masked_whiten(x, mask)
    global_mean = (x.double() * mask).sum() / mask.sum()
    for mine, other in ((slice(0, 1), slice(1, 3)), (slice(1, 3), slice(0, 1))):
        xs, m = x[other].double(), mask[other].double()
        calls = []

        def reduce(t, xs=xs, m=m, calls=calls):
            calls.append(1)
            if len(calls) == 1:
                return t + torch.stack([(xs * m).sum(), m.sum()])
            return t + torch.stack([((xs - global_mean) ** 2 * m).sum()])

        got = ppo.masked_whiten(x[mine], mask[mine], reduce=reduce)
        assert torch.allclose(got[mask[mine]], full[mine][mask[mine]], atol=1e-12)


def test_kl_estimators_and_the_per_token_reward():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    k1 = ppo.per_token_kl(logps, ref, mask, "k1")
    assert torch.allclose(k1, torch.tensor([[0.5, -1.0, 0.0], [0.1, 0.0, 0.0]]))
    k3 = ppo.per_token_kl(logps, ref, mask, "k3")
    x = ref - logps
    assert torch.allclose(k3, ((x.exp() - 1) - x) * mask)
    assert torch.all(k3 >= 0)
    with pytest.raises(TemperError, match="kl_estimator 'k2'"):
        ppo.per_token_kl(logps, ref, mask, "k2")
    rewards, non_score = ppo.token_rewards(torch.tensor([2.0, -1.0]), k1, mask, beta=0.1)
    assert torch.allclose(non_score, -0.1 * k1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.01 - 1.0, 0.0, 0.0]]))


def test_the_score_lands_on_the_eos_when_pad_equals_eos():
    """Two completions, pad id = EOS id = 2: [5, 6, 2] ended by EOS, [7, 2(pad), 2(pad)] ended by its own
    EOS at position 1. The rollout's mask puts the score on each EOS; a mask of "not the pad id" (the
    trap) would drop the EOS and score position 1 of the first row and position 0 of the second."""
    pad = eos = 2
    ids = torch.tensor([[5, 6, eos], [7, eos, pad]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # Rollout.completion_mask
    kl = torch.zeros(2, 3)
    rewards, _ = ppo.token_rewards(torch.tensor([1.0, 3.0]), kl, mask, beta=0.1)
    assert rewards.tolist() == [[0.0, 0.0, 1.0], [0.0, 3.0, 0.0]]
    trap, _ = ppo.token_rewards(torch.tensor([1.0, 3.0]), kl, ids != pad, beta=0.1)
    assert trap.tolist() != rewards.tolist()
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])
    adv, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[1, 1].item() == pytest.approx(3.0 - 0.4)  # the EOS is an action with its own advantage
    assert adv[1, 2].item() == 0.0


def test_clipped_policy_and_value_losses_match_their_formulas():
    torch.manual_seed(2)
    mask = mask_of([4, 2], 4)
    old = torch.randn(2, 4)
    logps = (old + 0.4 * torch.randn(2, 4)).requires_grad_()
    adv = torch.randn(2, 4)
    loss, metrics = ppo.policy_loss(logps, old, adv, mask, cliprange=0.2)
    ratio = (logps - old).exp()
    per = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    assert loss.item() == pytest.approx(per[mask].mean().item(), rel=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(
        ((-adv * ratio.clamp(0.8, 1.2)) > (-adv * ratio))[mask].float().mean().item())
    assert metrics["approxkl"].item() == pytest.approx((0.5 * (logps - old) ** 2)[mask].mean().item(), rel=1e-6)
    assert metrics["ratio"].item() == pytest.approx(ratio[mask].mean().item(), rel=1e-6)
    loss.backward()
    assert torch.all(logps.grad[~mask] == 0) and logps.grad[mask].abs().sum() > 0
    # ratio exactly 1: the loss is −mean(A) and nothing is clipped
    same, m = ppo.policy_loss(old, old, adv, mask, cliprange=0.2)
    assert same.item() == pytest.approx(-adv[mask].mean().item(), rel=1e-6) and m["clipfrac"].item() == 0.0

    values, old_values, returns = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    vloss, vm = ppo.value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    clipped = torch.maximum(torch.minimum(values, old_values + 0.2), old_values - 0.2)
    per = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    assert vloss.item() == pytest.approx(0.5 * per[mask].mean().item(), rel=1e-6)
    assert vm["clipfrac"].item() == pytest.approx(
        ((clipped - returns) ** 2 > (values - returns) ** 2)[mask].float().mean().item())


def test_explained_variance_and_the_adaptive_kl_controller():
    mask = mask_of([3, 3], 3)
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 3.5), returns, mask) == pytest.approx(0.0, abs=1e-12)
    noisy = returns + torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.5, -0.5]])
    err = (returns - noisy)[mask]
    assert ppo.explained_variance(noisy, returns, mask) == pytest.approx(
        1 - err.var(unbiased=False).item() / returns[mask].var(unbiased=False).item())
    assert math.isnan(ppo.explained_variance(returns, torch.ones_like(returns), mask))

    fixed = ppo.KLController(0.05)
    assert fixed.update(100.0, 64) == 0.05 and not fixed.adaptive
    ctl = ppo.KLController(0.2, target=6.0, horizon=10_000)
    assert ctl.update(12.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))  # error clipped at +0.2
    before = ctl.value
    assert ctl.update(5.4, 256) == pytest.approx(before * (1 - 0.1 * 256 / 10_000))  # KL/target − 1 = −0.1
    state = ctl.state_dict()
    again = ppo.KLController(0.2, target=6.0)
    again.load_state_dict(state)
    assert again.value == ctl.value
    with pytest.raises(TemperError):
        ppo.KLController(0.1, target=-1.0)
