"""Rolling-window perplexity of whole texts, with lm-evaluation-harness's windows and metrics.

Every token of a text is scored. The text's tokens follow a one-token prefix (BOS, or EOS
when the tokenizer has no BOS), which is what the first token is predicted from; the prefix
itself is never scored. The windows are those of lm-eval's `get_rolling_token_windows` +
`make_disjoint_window` with `max_seq_len=window`, `context_len=window - stride + 1`:

- the first window feeds `[prefix] + tokens[:window - 1]` and scores `tokens[:window]`;
- each later window feeds the `window` tokens that end just before its last target and
  scores the next `stride` tokens not yet scored (fewer in the last window, which still
  gets a full `window` of context).

`window` is the model's input length per forward pass (lm-eval's `max_length`). With
`stride == window` this is exactly lm-eval's `loglikelihood_rolling`; a smaller stride
gives every scored token at least `window - stride` tokens of context, at more compute.

Metrics, summed over the texts as lm-eval's `word_perplexity` / `byte_perplexity` /
`bits_per_byte` are: token perplexity exp(nll / tokens), word perplexity exp(nll / words)
with words = len(re.split(r"\\s+", text)) per text (lm-eval's count, which also counts the
empty pieces around leading/trailing whitespace), and bits per byte nll / (UTF-8 bytes *
ln 2). The numerator covers the same tokens as the denominators: all of them.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch

from temper.errors import TemperError
from temper.losses import fused_linear_cross_entropy
from temper.losses.clm import output_weight

IGNORE = -100


def _check(model, window: int, stride: int) -> None:
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if window < 1:
        raise TemperError(f"window must be at least 1 token, got {window}")
    if max_len is not None and window > max_len:
        raise TemperError(f"window {window} is larger than the model's context of {max_len} tokens (max_seq_len)")
    if stride < 1 or stride > window:
        raise TemperError(f"stride must be between 1 and the window ({window}), got {stride}")


def _window_spans(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(end, scored) of each window over seq = [prefix] + n tokens: the window feeds
    seq[max(0, end - window):end] and scores its last `scored` predictions, seq[end - scored + 1:end + 1]."""
    if n == 0:
        return []
    done = min(window, n)  # tokens scored so far; seq[i] predicts seq[i + 1] = tokens[i]
    spans = [(done, done)]
    while done < n:
        new = min(stride, n - done)
        done += new
        spans.append((done, new))
    return spans


def rolling_windows(tokens: list[int], prefix_id: int, window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) per window: `targets` are the tokens predicted by the last len(targets)
    positions of `inputs`. Together the targets are `tokens`, each once."""
    seq = [prefix_id, *tokens]
    return [(seq[max(0, end - window):end], seq[end - scored + 1:end + 1])
            for end, scored in _window_spans(len(tokens), window, stride)]


@torch.no_grad()
def sliding_window_nll(model, ids: list[int], window: int, stride: int, *, prefix_id: int,
                       device: torch.device | str | None = None, batch_size: int = 8) -> tuple[float, int]:
    """(sum of NLL in nats, number of scored tokens) of one text's tokens `ids` after `prefix_id`.

    Every token of `ids` is scored once, so the count is len(ids).
    """
    _check(model, window, stride)
    if batch_size < 1:
        raise TemperError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    seq = torch.as_tensor([prefix_id, *ids], dtype=torch.long)
    by_len: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for end, scored in _window_spans(len(ids), window, stride):
        begin = max(0, end - window)
        inputs = seq[begin:end]  # (T,)
        targets = torch.full_like(inputs, IGNORE)
        targets[-scored:] = seq[end - scored + 1:end + 1]  # input position t predicts seq[begin + t + 1]
        by_len[end - begin].append((inputs, targets))
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for group in by_len.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                inputs = torch.stack([c[0] for c in chunk]).to(device)  # (B, T)
                targets = torch.stack([c[1] for c in chunk]).to(device)  # (B, T)
                hidden = model(inputs, return_hidden=True)  # (B, T, C)
                nll += fused_linear_cross_entropy(hidden, output_weight(model), targets).item()
                count += int((targets != IGNORE).sum())
    finally:
        model.train(was_training)
    assert count == len(ids), (count, len(ids))
    return nll, count


def count_words(text: str) -> int:
    """lm-eval's word count for word perplexity (its `count_words`)."""
    return len(re.split(r"\s+", text))


def prefix_token(tokenizer) -> int:
    """The token the first token of a text is predicted from: BOS, else EOS (lm-eval's choice)."""
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
        raise TemperError("the tokenizer has neither a BOS nor an EOS token to predict a text's first token from")
    return prefix


def sliding_window_perplexity(model, tokenizer, texts: list[str], *, window: int, stride: int,
                              device: torch.device | str = "cpu", batch_size: int = 8) -> dict[str, float]:
    """Token/word perplexity and bits per byte of `texts`, each scored separately (its own
    context, its own prefix) and summed."""
    if isinstance(texts, str):
        texts = [texts]
    _check(model, window, stride)
    texts = [t for t in texts if t]
    if not texts:
        raise TemperError("no text to score: the input is empty")
    prefix = prefix_token(tokenizer)
    nll, tokens, words, nbytes = 0.0, 0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text)
        n, k = sliding_window_nll(model, ids, window, stride, prefix_id=prefix, device=device, batch_size=batch_size)
        nll, tokens = nll + n, tokens + k
        words += count_words(text)
        nbytes += len(text.encode("utf-8"))
    if tokens == 0:
        raise TemperError("no token to score: every text encodes to no tokens")

    def ppl(x: float) -> float:
        return math.exp(min(x, 700.0))

    return {
        "token_perplexity": ppl(nll / tokens),
        "word_perplexity": ppl(nll / words),
        "bits_per_byte": nll / (nbytes * math.log(2)),
        "nll": nll,
        "tokens": tokens,
        "words": words,
        "bytes": nbytes,
    }
