"""Encoder objectives' losses: masked language modelling, NSP/SOP, ELECTRA's replaced-token
detection, InfoNCE; and sentence-embedding pooling. Pure functions of tensors, in fp32.

Each loss takes `reduction`: "mean" (the formula as its paper writes it), "sum" (for
`engine.accumulate`, which divides by the unit's count over the whole step: the masked tokens,
the sequences, the real tokens, the pairs), or "none". Metrics are sums over the batch's units.

- **MLM** (Devlin et al. 2019): L = -(1/|M|) sum_{t in M} log p(x_t | x_masked), M the selected
  positions (label != -100), whatever they were replaced with. A batch with nothing selected
  gives 0 (not 0/0).
- **NSP / SOP** (Devlin et al. 2019; Lan et al. 2020): two-way cross-entropy of the pooled
  [CLS] logits (B, 2) against 0 = IsNext / in order, 1 = NotNext / swapped.
- **ELECTRA** (Clark et al. 2020): the generator's MLM loss plus the discriminator's
  L_disc = -(1/|R|) sum_{t in R} [y_t log sigma(d_t) + (1 - y_t) log(1 - sigma(d_t))] over the real
  (non-pad) tokens R, y_t = 1 where the input token differs from the original: a sampled token
  equal to the original counts as original, as the paper says. Total L_gen + lambda L_disc,
  lambda = 50. The replacements are sampled from the generator's softmax at temperature 1 with
  the gradient stopped (the paper does not back-propagate the discriminator's loss through
  the sampling).
- **InfoNCE** (van den Oord et al. 2018; SimCSE, Gao et al. 2021):
  l_i = -log exp(cos(z_i, z_i+)/tau) / sum_j exp(cos(z_i, z_j+)/tau), tau = 0.05, the other pairs'
  positives as in-batch negatives; j with `duplicate_mask[i, j]` (pair j shares a text with
  pair i) is left out of the denominator; the positive j = i never is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from temper.losses.clm import IGNORE_INDEX

REDUCTIONS = ("mean", "sum", "none")


def _reduce(losses: torch.Tensor, reduction: str, count: torch.Tensor | int | None = None) -> torch.Tensor:
    """Reduce per-unit losses; "mean" divides by `count` (default: their number), 0 when there is none."""
    assert reduction in REDUCTIONS, reduction
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    n = losses.numel() if count is None else count
    return total / max(int(n), 1)


# ----------------------------------------------------------------------------- MLM


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy at the selected positions only: `logits` (..., V), `labels` (...) with -100
    where nothing is predicted. "none" gives (...) with 0 at the unselected positions."""
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    losses = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
    if reduction == "none":
        return losses.view(labels.shape)
    return _reduce(losses, reduction, (flat_labels != IGNORE_INDEX).sum())


def masked_lm_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums: `masked_tokens` (the selected positions) and `mlm_accuracy` (those whose argmax is the original)."""
    selected = labels != IGNORE_INDEX
    correct = (logits.detach().argmax(-1) == labels) & selected
    return {"masked_tokens": selected.sum().float(), "mlm_accuracy": correct.sum().float()}


# ----------------------------------------------------------------------------- NSP / SOP


def sentence_pair_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """NSP or SOP: cross-entropy of (B, 2) [CLS] logits against (B,) labels (0 IsNext/in order, 1 not)."""
    assert logits.shape[-1] == 2 and logits.shape[:-1] == labels.shape, (logits.shape, labels.shape)
    return _reduce(F.cross_entropy(logits.float(), labels, reduction="none"), reduction)


def sentence_pair_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the batch's sequences: `sentence_accuracy`, the pairs whose argmax is the label."""
    return {"sentence_accuracy": (logits.detach().argmax(-1) == labels).sum().float()}


# ----------------------------------------------------------------------------- ELECTRA


@torch.no_grad()
def sample_replacements(generator_logits: torch.Tensor, *, generator: torch.Generator | None = None,
                        temperature: float = 1.0) -> torch.Tensor:
    """(N,) token ids drawn from softmax(logits / temperature) of (N, V) generator logits; no gradient."""
    assert temperature > 0, temperature
    probs = torch.softmax(generator_logits.detach().float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def replaced_token_inputs(masked_input_ids: torch.Tensor, mlm_labels: torch.Tensor, generator_logits: torch.Tensor,
                          *, generator: torch.Generator | None = None, temperature: float = 1.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(discriminator input_ids, labels) (B, T): the original tokens, with each selected position
    (mlm_labels != -100) replaced by a sample of the generator; label 1.0 where the input now
    differs from the original (a sample equal to it is 0.0, original), 0.0 elsewhere.

    `generator_logits`: (B, T, V) at every position, or (N, V) at the N selected positions in
    row-major order (`mlm_labels != -100` as a mask picks them). The ids carry no gradient."""
    selected = mlm_labels != IGNORE_INDEX
    originals = torch.where(selected, mlm_labels, masked_input_ids)
    at_selected = generator_logits[selected] if generator_logits.dim() == 3 else generator_logits
    assert at_selected.shape[0] == int(selected.sum()), (at_selected.shape, int(selected.sum()))
    inputs = originals.clone()
    inputs[selected] = sample_replacements(at_selected, generator=generator, temperature=temperature).to(inputs.dtype)
    return inputs, (inputs != originals).float()


def discriminator_loss(disc_logits: torch.Tensor, disc_labels: torch.Tensor, attention_mask: torch.Tensor, *,
                       reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of (B, T) per-token logits (replaced vs original) over the real tokens
    (attention_mask 1); "mean" divides by their number. "none" gives (B, T), 0 on padding."""
    real = attention_mask.bool()
    losses = F.binary_cross_entropy_with_logits(disc_logits.float(), disc_labels.float(), reduction="none")
    losses = losses * real
    if reduction == "none":
        return losses
    return _reduce(losses[real], reduction)


def discriminator_metrics(disc_logits: torch.Tensor, disc_labels: torch.Tensor, attention_mask: torch.Tensor
                          ) -> dict[str, torch.Tensor]:
    """Sums over the real tokens: `real_tokens`, `replaced_tokens`, `disc_accuracy` (sign of the
    logit matches the label)."""
    real = attention_mask.bool()
    correct = ((disc_logits.detach() > 0).float() == disc_labels) & real
    return {"real_tokens": real.sum().float(), "replaced_tokens": (disc_labels * real).sum().float(),
            "disc_accuracy": correct.sum().float()}


def electra_loss(generator_loss: torch.Tensor, disc_loss: torch.Tensor, *, disc_weight: float = 50.0) -> torch.Tensor:
    """L_gen + disc_weight * L_disc (Clark et al. 2020: lambda = 50)."""
    return generator_loss + disc_weight * disc_loss


# ----------------------------------------------------------------------------- contrastive


def info_nce_loss(anchors: torch.Tensor, positives: torch.Tensor, *, temperature: float = 0.05,
                  duplicate_mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """InfoNCE over in-batch negatives with cosine similarity (module docstring): (B, D) anchor and
    positive embeddings, `duplicate_mask` (B, B) bool, True where pair j is no negative of anchor i
    (its diagonal is ignored: the positive always counts)."""
    assert anchors.shape == positives.shape and anchors.dim() == 2, (anchors.shape, positives.shape)
    assert temperature > 0, temperature
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    scores = a @ p.T / temperature  # (B, B): anchor i against every pair's positive
    B = scores.shape[0]
    if duplicate_mask is not None:
        excluded = duplicate_mask.bool() & ~torch.eye(B, dtype=torch.bool, device=scores.device)
        scores = scores.masked_fill(excluded, float("-inf"))
    target = torch.arange(B, device=scores.device)
    return _reduce(F.cross_entropy(scores, target, reduction="none"), reduction)


def info_nce_metrics(anchors: torch.Tensor, positives: torch.Tensor, *, duplicate_mask: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
    """Sums over the pairs: `retrieval_accuracy`, the anchors whose most similar positive (the
    duplicates left out) is their own (in-batch recall@1)."""
    scores = F.normalize(anchors.detach().float(), dim=-1) @ F.normalize(positives.detach().float(), dim=-1).T
    B = scores.shape[0]
    if duplicate_mask is not None:
        eye = torch.eye(B, dtype=torch.bool, device=scores.device)
        scores = scores.masked_fill(duplicate_mask.bool() & ~eye, float("-inf"))
    return {"retrieval_accuracy": (scores.argmax(-1) == torch.arange(B, device=scores.device)).sum().float()}


# ----------------------------------------------------------------------------- pooling


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, D) mean of (B, T, D) hidden states over the real tokens (sentence-transformers' mean pooling)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor) -> torch.Tensor:
    """(B, D) the [CLS] (first) position's hidden state."""
    return hidden[:, 0]


__all__ = [
    "cls_pool", "discriminator_loss", "discriminator_metrics", "electra_loss", "info_nce_loss", "info_nce_metrics",
    "masked_lm_loss", "masked_lm_metrics", "mean_pool", "replaced_token_inputs", "sample_replacements",
    "sentence_pair_loss", "sentence_pair_metrics",
]
