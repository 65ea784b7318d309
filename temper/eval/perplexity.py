"""Validation loss, perplexity and bits per byte over token batches.

val_loss = mean NLL over every target token, EOS included (the training objective);
val_ppl = exp(val_loss).

val_bpb = sum NLL / (sum UTF-8 bytes * ln 2) over the target tokens that stand for text,
i.e. whose `token_bytes` is > 0. EOS (and any other zero-byte special token) is left out
of the numerator as well as the denominator: lm-evaluation-harness's bits per byte scores
the tokens of a text and never an end-of-text token, so this val_bpb measures the same
thing as `temper eval data=` and lm-eval on the same text (up to the windowing), and
does not charge a document boundary's cost to the text's bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from temper.losses import IGNORE_INDEX, fused_linear_cross_entropy
from temper.losses.clm import output_weight


@torch.no_grad()
def evaluate_batches(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device,
                     autocast: Callable = None, token_bytes: torch.Tensor | None = None,
                     max_batches: int = 0) -> dict[str, float]:
    """val_loss / val_ppl / val_tokens over `batches` (up to `max_batches`, 0: all), plus
    val_bpb when `token_bytes` (V,) gives each token's UTF-8 byte length (0 for EOS)."""
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    text_nll, nbytes = 0.0, 0  # over the targets with bytes > 0 only
    for i, (inputs, targets) in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        inputs, targets = inputs.to(device), targets.to(device)  # (B, T)
        ctx = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            hidden = model(inputs, return_hidden=True)  # (B, T, C)
            batch_nll = fused_linear_cross_entropy(hidden, output_weight(model), targets).item()
            nll += batch_nll
            if token_bytes is not None:
                hidden, flat = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, C), (N,)
                sizes = token_bytes.to(flat.device)[flat.clamp(min=0)] * (flat != IGNORE_INDEX)  # (N,)
                zero = (sizes == 0) & (flat != IGNORE_INDEX)  # EOS and other special targets: few rows
                zero_nll = fused_linear_cross_entropy(hidden[zero], output_weight(model), flat[zero]).item() \
                    if bool(zero.any()) else 0.0
                text_nll += batch_nll - zero_nll
                nbytes += int(sizes.sum())
        tokens += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    loss = nll / max(tokens, 1)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}
    if token_bytes is not None and nbytes:
        out["val_bpb"] = text_nll / (nbytes * math.log(2))
    return out
