"""Sliding-window (strided) perplexity of whole texts, as in Hugging Face's perplexity guide.

Each text is tokenised once. Windows of `window` tokens start every `stride` tokens; a
window scores only the tokens that the previous window did not (its last `end - prev_end`
tokens), with the earlier tokens of the window as context. The first token of a text has
no context and is never scored. With `stride == window` the windows are disjoint and the
first token of every window goes unscored too (the guide's loop does the same); any
`stride < window` scores every token but the first, each with at least `window - stride`
tokens of context.

Reported as lm-evaluation-harness's `loglikelihood_rolling` metrics: token perplexity
exp(nll / tokens), word perplexity exp(nll / words) with words = len(text.split()), and
bits per byte nll / (UTF-8 bytes * ln 2), summed over the texts.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from temper.errors import TemperError
from temper.losses import fused_linear_cross_entropy

IGNORE = -100


def _check(model, window: int, stride: int) -> None:
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if window < 2:
        raise TemperError(f"window must be at least 2 tokens, got {window}")
    if max_len is not None and window > max_len:
        raise TemperError(f"window {window} is larger than the model's context of {max_len} tokens (max_seq_len)")
    if stride < 1 or stride > window:
        raise TemperError(f"stride must be between 1 and the window ({window}), got {stride}")


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over a sequence of n tokens."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def sliding_window_nll(model, ids: list[int], window: int, stride: int, *, device: torch.device | str | None = None,
                       batch_size: int = 8) -> tuple[float, int]:
    """(sum of NLL in nats, number of scored tokens) of one token sequence, by strided windows."""
    _check(model, window, stride)
    if batch_size < 1:
        raise TemperError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    seq = torch.as_tensor(list(ids), dtype=torch.long)
    by_len: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for begin, end, first in _windows(len(seq), window, stride):
        inputs = seq[begin:end]
        targets = torch.full_like(inputs, IGNORE)
        # input position t predicts token begin + t + 1; score tokens [first, end)
        targets[first - begin - 1:end - begin - 1] = seq[first:end]
        by_len[end - begin].append((inputs, targets))
    was_training = model.training
    model.eval()
    nll, scored = 0.0, 0
    try:
        for group in by_len.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                inputs = torch.stack([c[0] for c in chunk]).to(device)
                targets = torch.stack([c[1] for c in chunk]).to(device)
                hidden = model(inputs, return_hidden=True)
                nll += fused_linear_cross_entropy(hidden, model.lm_head.weight, targets).item()
                scored += int((targets != IGNORE).sum())
    finally:
        model.train(was_training)
    return nll, scored


def sliding_window_perplexity(model, tokenizer, texts: list[str], *, window: int, stride: int,
                              device: torch.device | str = "cpu", batch_size: int = 8,
                              add_bos: bool = False) -> dict[str, float]:
    """Token/word perplexity and bits per byte of `texts`, each scored separately and summed.

    `add_bos` prepends the tokenizer's BOS token so that the first token of a text is scored too.
    """
    if isinstance(texts, str):
        texts = [texts]
    _check(model, window, stride)
    texts = [t for t in texts if t]
    if not texts:
        raise TemperError("no text to score: the input is empty")
    nll, tokens, words, nbytes = 0.0, 0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text, add_bos=add_bos)
        n, k = sliding_window_nll(model, ids, window, stride, device=device, batch_size=batch_size)
        nll, tokens = nll + n, tokens + k
        words += len(text.split())
        nbytes += len(text.encode("utf-8"))
    if tokens == 0:
        raise TemperError("no token to score: every text is a single token (the first token has no context)")

    def ppl(x: float) -> float:
        return math.exp(min(x, 700.0))

    return {
        "token_perplexity": ppl(nll / tokens),
        "word_perplexity": ppl(nll / words) if words else float("nan"),
        "bits_per_byte": nll / (nbytes * math.log(2)),
        "nll": nll,
        "tokens": tokens,
        "words": words,
        "bytes": nbytes,
    }
