"""Validation loss, perplexity and bits per byte over token batches.

val_loss = mean NLL over every target token, EOS included (the training objective);
val_ppl = exp(val_loss).

val_bpb = sum NLL / (sum UTF-8 bytes * ln 2) over the target tokens that stand for text,
i.e. whose `token_bytes` is > 0. EOS (and any other zero-byte special token) is left out
of the numerator as well as the denominator: lm-evaluation-harness's bits per byte scores
the tokens of a text and never an end-of-text token, so this val_bpb measures the same
thing as `temper eval data=` and lm-eval on the same text (up to the windowing), and
does not charge a document boundary's cost to the text's bytes. A tokenizer that puts a
dummy space in front of each text (SentencePiece style) gives its documents' first tokens
(targets after EOS) their first-token byte lengths (`start_token_bytes`), so the bytes
are the documents' own.
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
                     start_token_bytes: torch.Tensor | None = None, eos_id: int | None = None,
                     max_batches: int = 0) -> dict[str, float]:
    """val_loss / val_ppl / val_tokens over `batches` (up to `max_batches`, 0: all), plus
    val_bpb when `token_bytes` (V,) gives each token's UTF-8 byte length (0 for EOS);
    `start_token_bytes` (V,) the lengths of a document's first token (a target whose input
    is `eos_id`), when they differ (`Tokenizer.token_byte_lengths(at_start=True)`)."""
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
                scored = flat != IGNORE_INDEX
                sizes = token_bytes.to(flat.device)[flat.clamp(min=0)] * scored  # (N,)
                zero = (sizes == 0) & scored  # EOS and other special targets: few rows
                if start_token_bytes is not None and eos_id is not None:  # a document's first tokens
                    starts = inputs.reshape(-1) == eos_id
                    sizes = torch.where(starts, start_token_bytes.to(flat.device)[flat.clamp(min=0)] * scored, sizes)
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
