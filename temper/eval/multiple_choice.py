"""Multiple-choice evaluation by log-likelihood, lm-evaluation-harness style.

Each choice is scored by the sum of log P(choice tokens | context). Tokenisation: the context
and the choice are encoded *separately* (`encode(context)`, `encode(choice)`) and
concatenated, so every choice continues from the very same context tokens; put the space
between them in the choice (" Paris"), as lm-eval's tasks do.

The context runs through the model once with a KV cache; the cache is copied to one row per
choice and all choices are scored as one right-padded batch continuing from it (a causal
model never lets a real token see the padding after it, so each choice's own length is
applied when summing). `acc` takes the argmax of the sums, `acc_norm` the argmax of the sums
divided by the answer's length in characters, as lm-eval's `acc_norm` does (its
byte-normalised variant is a different metric, `acc_bytes`). lm-eval counts the answer
without the separator that joins it to the context (its `target_delimiter`), so a row may
give those bare answers as `answers` (the task runner does: the choice before
`answer_template`); without them the scored choice string is counted. Ties go to the first
choice, as numpy's argmax.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from temper.errors import TemperError
from temper.models.common import KVCache


def _encode(tokenizer, context: str, choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    if not choices:
        raise TemperError("multiple choice: no choices to score")
    ctx = tokenizer.encode(context)
    if not ctx:  # the first choice token needs something to be predicted from
        if tokenizer.bos_id is None:
            raise TemperError("multiple choice: the context is empty and the tokenizer has no BOS token")
        ctx = [tokenizer.bos_id]
    conts = [tokenizer.encode(c) for c in choices]
    for c, ids in zip(choices, conts):
        if not ids:
            raise TemperError(f"multiple choice: choice {c!r} encodes to no tokens")
    return ctx, conts


def _expand_cache(model, cache: KVCache, rows: int, extra: int) -> KVCache:
    """A new cache of `rows` rows, each holding the first cache's `cache.length` positions."""
    n = cache.length
    out = model.new_cache(rows, n + extra, dtype=cache.keys[0].dtype, device=cache.keys[0].device)
    for src, dst in zip(cache.keys + cache.values, out.keys + out.values):
        dst[:, :, :n] = src[:1, :, :n]  # broadcast over the rows
    out.length = n
    return out


@torch.no_grad()
def score_choices(model, tokenizer, context: str, choices: Sequence[str], *,
                  use_cache: bool = True) -> list[tuple[float, int]]:
    """(sum of log P(choice | context), characters of the choice) for every choice.

    use_cache=False scores each `context + choice` from scratch (the reference the cached
    batch must match).
    """
    ctx, conts = _encode(tokenizer, context, choices)
    nchars = [len(c) for c in choices]
    device = next(model.parameters()).device
    if not use_cache:
        out = []
        for ids, nc in zip(conts, nchars):
            x = torch.tensor([ctx + ids], dtype=torch.long, device=device)
            logp = F.log_softmax(model(x)[0, len(ctx) - 1:-1].float(), dim=-1)
            target = torch.tensor(ids, device=device)
            out.append((float(logp.gather(-1, target[:, None]).sum()), nc))
        return out

    n, longest = len(conts), max(len(c) for c in conts)
    cache = model.new_cache(1, len(ctx))
    first = model(torch.tensor([ctx], dtype=torch.long, device=device), cache=cache, last_only=True)
    first_logp = F.log_softmax(first[0, -1].float(), dim=-1)  # predicts every choice's first token
    pad = tokenizer.pad_id or 0
    batch = torch.full((n, longest), pad, dtype=torch.long, device=device)
    valid = torch.zeros((n, longest), dtype=torch.bool, device=device)
    for i, ids in enumerate(conts):
        batch[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        valid[i, :len(ids)] = True
    token_logp = torch.zeros((n, longest), dtype=torch.float32, device=device)
    token_logp[:, 0] = first_logp[batch[:, 0]]
    if longest > 1:
        # feed all but the last token: position j predicts token j + 1; the right padding
        # comes after every real token, so the causal mask already keeps it out of sight
        rows = _expand_cache(model, cache, n, longest - 1)
        logits = model(batch[:, :-1], cache=rows)
        logp = F.log_softmax(logits.float(), dim=-1)
        token_logp[:, 1:] = logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
    sums = (token_logp * valid).sum(-1).tolist()
    return list(zip(sums, nchars))


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def evaluate_multiple_choice(model, tokenizer, rows: Iterable[dict], *, few_shot_prefix: str = "",
                             use_cache: bool = True) -> dict:
    """acc / acc_norm over rows of {"context": str, "choices": [str], "gold": int}, and
    optionally "answers": [str], the choices without their separator, whose characters acc_norm
    divides by (default: the choices).

    `few_shot_prefix` is put before every context as is (include its separator).
    Returns acc, acc_norm, examples and examples_per_second.
    """
    was_training = model.training
    model.eval()
    hits = hits_norm = count = 0
    start = time.perf_counter()
    try:
        for row in rows:
            scores = score_choices(model, tokenizer, few_shot_prefix + row["context"], row["choices"],
                                   use_cache=use_cache)
            gold = int(row["gold"])
            answers = row.get("answers")
            if answers is not None and len(answers) != len(scores):
                raise TemperError(f"multiple choice: {len(answers)} answers for {len(scores)} choices")
            chars = [len(a) for a in answers] if answers is not None else [c for _, c in scores]
            hits += _argmax([s for s, _ in scores]) == gold
            hits_norm += _argmax([s / max(c, 1) for (s, _), c in zip(scores, chars)]) == gold
            count += 1
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if count == 0:
        raise TemperError("multiple choice: no rows to evaluate")
    return {"acc": hits / count, "acc_norm": hits_norm / count, "examples": count,
            "examples_per_second": count / seconds if seconds > 0 else float("inf")}


__all__ = ["score_choices", "evaluate_multiple_choice"]
