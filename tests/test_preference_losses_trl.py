"""Parity of temper's preference losses with TRL's own loss code on the same tensors (TRL is test-only).

DPO: `DPOTrainer._compute_loss` run on a stand-in for the trainer and the model, which hands back
fixed per-token log-probs (what TRL's fused LM head would compute), with precomputed reference
log-probs: the loss types, their combination and the logged metrics come from TRL's own code.
SimPO and ORPO: `CPOTrainer.cpo_loss` and `ORPOTrainer.odds_ratio_loss`, which take log-probs.
"""

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import FP32_EPS

from temper.losses.preference import mean_preference_metrics, preference_loss, preference_metrics

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

B, T, PROMPT = 4, 9, 3
BETA = 0.3


def _pairs(equal_chosen_lengths: bool = False):
    g = torch.Generator().manual_seed(0)
    chosen_tokens = torch.tensor([5, 5, 5, 5] if equal_chosen_lengths else [5, 2, 6, 3])
    rejected_tokens = torch.tensor([4, 6, 1, 5])
    tokens = torch.cat([chosen_tokens, rejected_tokens])  # TRL's batch: chosen rows, then rejected rows
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row, n in enumerate(tokens.tolist()):
        completion_mask[row, PROMPT:PROMPT + n] = 1
    shift_mask = completion_mask[:, 1:]
    per_token_logps = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3 * shift_mask
    mean_logits = torch.randn(2 * B, T - 1, generator=g, dtype=torch.float64)
    ref_logps = per_token_logps.sum(1) + torch.randn(2 * B, generator=g, dtype=torch.float64)
    return dict(completion_mask=completion_mask, per_token_logps=per_token_logps, mean_logits=mean_logits,
                ref_logps=ref_logps, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)


def _trl_dpo(pairs, loss_type, loss_weights=None, label_smoothing=0.0):
    """(TRL's loss, TRL's logged metrics) for these pairs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    outputs = SimpleNamespace(log_probs=pairs["per_token_logps"], mean_logits=pairs["mean_logits"],
                              entropy=torch.zeros_like(pairs["per_token_logps"]),
                              is_top1=torch.zeros_like(pairs["per_token_logps"], dtype=torch.bool))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=list(loss_type),
        loss_weights=list(loss_weights or [1.0] * len(loss_type)), beta=BETA, label_smoothing=label_smoothing,
        use_weighting=False, args=SimpleNamespace(), _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    mask = pairs["completion_mask"]
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": pairs["ref_logps"][:B], "ref_rejected_logps": pairs["ref_logps"][B:]}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type, loss_weights, label_smoothing", [
    (["sigmoid"], None, 0.0),
    (["hinge"], None, 0.0),
    (["ipo"], None, 0.0),
    (["robust"], None, 0.2),
    (["sigmoid_norm"], None, 0.0),
    (["sigmoid", "hinge", "ipo"], [0.8, 0.2, 1.5], 0.0),
])
def test_dpo_family_matches_trl(loss_type, loss_weights, label_smoothing):
    pairs = _pairs()
    trl_loss, trl_metrics = _trl_dpo(pairs, loss_type, loss_weights, label_smoothing)
    logps = pairs["per_token_logps"].sum(1)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        loss_type, logps[:B], logps[B:], pairs["ref_logps"][:B], pairs["ref_logps"][B:],
        chosen_tokens=pairs["chosen_tokens"], rejected_tokens=pairs["rejected_tokens"], beta=BETA,
        label_smoothing=label_smoothing, loss_weights=loss_weights)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-12, atol=1e-12)

    shift_mask = pairs["completion_mask"][:, 1:]
    logits_sum = (pairs["mean_logits"] * shift_mask).sum(1)
    sums = preference_metrics(chosen_rewards, rejected_rewards, logps[:B], logps[B:],
                              chosen_logits_sum=logits_sum[:B], rejected_logits_sum=logits_sum[B:],
                              chosen_tokens=pairs["chosen_tokens"], rejected_tokens=pairs["rejected_tokens"])
    ours = mean_preference_metrics({k: float(v) for k, v in sums.items()}, count=B)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
        assert ours[name] == pytest.approx(trl_metrics[name], rel=1e-12, abs=1e-12), name


def test_rpo_is_trl_sigmoid_plus_sft_when_chosen_lengths_are_equal():
    """TRL's `sft` term averages over all chosen tokens of the batch, ours per pair: equal when every chosen
    completion has the same length, and not otherwise (documented departure)."""
    for equal in (True, False):
        pairs = _pairs(equal_chosen_lengths=equal)
        trl_loss, _ = _trl_dpo(pairs, ["sigmoid", "sft"], [1.0, 0.5])
        logps = pairs["per_token_logps"].sum(1)
        losses, _, _ = preference_loss(("sigmoid", "sft"), logps[:B], logps[B:], pairs["ref_logps"][:B],
                                       pairs["ref_logps"][B:], chosen_tokens=pairs["chosen_tokens"], beta=BETA,
                                       loss_weights=(1.0, 0.5))
        assert torch.isclose(losses.mean(), trl_loss, rtol=1e-12, atol=1e-12) == equal


def _avg_logps():
    g = torch.Generator().manual_seed(1)
    tokens = torch.tensor([3, 7, 1, 4]), torch.tensor([5, 2, 2, 6])
    summed = [-torch.rand(B, generator=g, dtype=torch.float64) * 2 * n for n in tokens]
    return summed, tokens


def test_simpo_matches_trl_cpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    (chosen, rejected), (chosen_tokens, rejected_tokens) = _avg_logps()
    for label_smoothing in (0.0, 0.1):
        trainer = SimpleNamespace(alpha=0.0, beta=2.0, loss_type="simpo", simpo_gamma=0.5,
                                  label_smoothing=label_smoothing,
                                  accelerator=SimpleNamespace(device=torch.device("cpu")))
        trl = CPOTrainer.cpo_loss(trainer, chosen / chosen_tokens, rejected / rejected_tokens)
        ours = preference_loss("simpo", chosen, rejected, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                               beta=2.0, simpo_gamma=0.5, label_smoothing=label_smoothing)
        for a, b in zip(ours, trl):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_orpo_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    (chosen, rejected), (chosen_tokens, rejected_tokens) = _avg_logps()
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    chosen_avg, rejected_avg = chosen / chosen_tokens, rejected / rejected_tokens
    trl_ratio_terms, trl_chosen_rewards, trl_rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(
        trainer, chosen_avg, rejected_avg)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        "orpo", chosen, rejected, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens, beta=0.1)
    # TRL: loss = NLL − mean(β log σ(log odds ratio)); ours per pair: −avg log π(y_w) − β log σ(...).
    # TRL computes in float32 (it casts the log-probs): its log odds are about a dozen fp32 roundings
    # (2 casts, 2 log(1 - exp), 3 differences, log σ, β x) of values no larger than the log(1 - exp)
    # terms, each within eps of them; a reward is three roundings of eps/2 (the cast, beta in fp32, the product)
    terms = torch.cat([chosen_avg, rejected_avg, torch.log1p(-chosen_avg.exp()), torch.log1p(-rejected_avg.exp())])
    log_odds_tol = 12 * FP32_EPS * float(terms.abs().max())
    torch.testing.assert_close(losses, -chosen_avg - trl_ratio_terms.double(), rtol=0, atol=log_odds_tol)
    torch.testing.assert_close(chosen_rewards, trl_chosen_rewards.double(), rtol=1.5 * FP32_EPS, atol=0)
    torch.testing.assert_close(rejected_rewards, trl_rejected_rewards.double(), rtol=1.5 * FP32_EPS, atol=0)


# ----------------------------------------------------------------------------- SimPO / ORPO metrics, TRL's whole path

V = 11


def _padded_pairs():
    """TRL's padded batch (prompt + completion, right padding, labels -100 on prompt and padding)
    and a bigram table whose row for the input token is the next position's logits."""
    g = torch.Generator().manual_seed(2)
    prompt, completion = [3, 2, 4, 3], ([4, 1, 5, 2], [2, 5, 1, 3])
    batch = {}
    for side, lengths in zip(("chosen", "rejected"), completion):
        ids = torch.zeros(B, T, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for row, (p, n) in enumerate(zip(prompt, lengths)):
            ids[row, :p + n] = torch.randint(1, V, (p + n,), generator=g)
            mask[row, :p + n] = 1
            labels[row, p:p + n] = ids[row, p:p + n]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    table = torch.randn(V, V, generator=g, dtype=torch.float64)
    return batch, table


def _trl_metrics(trainer_class, batch, table, **settings):
    from types import MethodType

    trainer = SimpleNamespace(
        is_encoder_decoder=False, pad_token_id=0, padding_value=0, aux_loss_enabled=False, alpha=0.0,
        label_smoothing=0.0, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        concatenated_inputs=trainer_class.concatenated_inputs, get_batch_logps=trainer_class.get_batch_logps,
        **settings)
    for name in ("concatenated_forward", "get_batch_loss_metrics", "cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer_class, name):
            setattr(trainer, name, MethodType(getattr(trainer_class, name), trainer))
    model = lambda input_ids, **kwargs: SimpleNamespace(logits=table[input_ids])  # noqa: E731
    return trainer.get_batch_loss_metrics(model, batch)


def _our_metrics(kind, batch, table, **settings):
    from temper.losses.logprobs import sequence_logprobs

    inputs = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    # the table's rows are the logits: hidden = table[input], output layer = identity
    logps, counts = sequence_logprobs(table[inputs][:, :-1], torch.eye(V, dtype=torch.float64), labels[:, 1:])
    losses, chosen_rewards, rejected_rewards = preference_loss(
        kind, logps[:B], logps[B:], chosen_tokens=counts[:B], rejected_tokens=counts[B:], **settings)
    sums = preference_metrics(chosen_rewards, rejected_rewards, logps[:B], logps[B:], chosen_logits_sum=logps[:B],
                              rejected_logits_sum=logps[B:], chosen_tokens=counts[:B], rejected_tokens=counts[B:],
                              loss_type=[kind])
    return losses, mean_preference_metrics({k: float(v) for k, v in sums.items()}, count=B)


def test_simpo_and_orpo_metrics_are_trls():
    """logps/chosen and logps/rejected are the per-token mean log-probs TRL's CPO (simpo) and ORPO
    trainers log, rewards β times them; ORPO's log_odds_* too. logits/* are not logged: TRL's
    average every position of its padded rows, prompt and padding included."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    batch, table = _padded_pairs()
    trl_loss, trl = _trl_metrics(CPOTrainer, batch, table, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                                 cpo_alpha=0.0)
    losses, ours = _our_metrics("simpo", batch, table, beta=2.0, simpo_gamma=0.5)
    # temper's log-prob primitive sums in float32, hence the tolerances
    torch.testing.assert_close(losses.mean().double(), trl_loss, rtol=1e-6, atol=1e-6)
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"]
    for name in names:
        assert ours[name] == pytest.approx(trl[name], rel=1e-6, abs=1e-6), name
    assert not any(k.startswith("logits/") for k in ours)

    _, trl = _trl_metrics(ORPOTrainer, batch, table, beta=0.1)
    _, ours = _our_metrics("orpo", batch, table, beta=0.1)
    for name in [*names, "log_odds_ratio", "log_odds_chosen"]:
        assert ours[name] == pytest.approx(trl[name], rel=1e-6, abs=1e-6), name
    assert not any(k.startswith("logits/") for k in ours)
