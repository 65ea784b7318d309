"""KL divergence of a model from a reference model on the model's own replies.

    KL(model || reference) = mean over reply tokens t of  sum_v p(v | x, y_<t) (log p(v | x, y_<t) - log q(v | x, y_<t))

with p the model's and q the reference's next-token distribution, the exact sum over the whole
vocabulary at every position (not the one-sample estimate log p(y_t) - log q(y_t) that RLHF
trainers log), averaged over every reply token of every prompt (pooled: a long reply weighs
more than a short one). The replies are the model's greedy ones as text, encoded again after
the prompt's tokens (prompt and reply encoded separately, as the multiple-choice scorer does),
so the figure is deterministic. A reply that encodes to no tokens adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from temper.errors import TemperError


@torch.no_grad()
def reply_kl(model, reference, tokenizer, prompts: Sequence[str], replies: Sequence[str]) -> float | None:
    """Mean per-token KL(model || reference) over `replies` to `prompts` (None when no reply has a token)."""
    vocab, ref_vocab = model.config.vocab_size, reference.config.vocab_size
    if vocab != ref_vocab:
        raise TemperError(f"reference= has {ref_vocab} tokens in its vocabulary, the model {vocab}: the KL "
                          "needs the same tokenizer (a reference from the same lineage)")
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device
    was = model.training, reference.training
    model.eval()
    reference.eval()
    total, count = 0.0, 0
    try:
        for prompt, reply in zip(prompts, replies):
            context, answer = tokenizer.encode(prompt), tokenizer.encode(reply)
            if not answer:
                continue
            ids = context + answer
            # position i predicts token i + 1: the reply's tokens are predicted from len(context) - 1 on
            span = slice(len(context) - 1, len(ids) - 1)
            logp = F.log_softmax(model(torch.tensor([ids], device=device))[0, span].float(), dim=-1)  # (R, V)
            logq = F.log_softmax(reference(torch.tensor([ids], device=ref_device))[0, span].float(), dim=-1)
            total += float((logp.exp() * (logp - logq.to(logp.device))).sum())
            count += len(answer)
    finally:
        model.train(was[0])
        reference.train(was[1])
    return total / count if count else None


__all__ = ["reply_kl"]
