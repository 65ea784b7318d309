"""Validation loss, perplexity and bits per byte over token batches.

perplexity = exp(mean token NLL); bits per byte = sum NLL / (sum UTF-8 bytes * ln 2), the
definition of lm-evaluation-harness, which compares models with different tokenisers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from temper.losses import fused_linear_cross_entropy


@torch.no_grad()
def evaluate_batches(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device,
                     autocast: Callable = None, token_bytes: torch.Tensor | None = None,
                     max_batches: int = 0) -> dict[str, float]:
    """Mean NLL per target token over `batches` (up to `max_batches`, 0: all), as loss/ppl/bpb."""
    was_training = model.training
    model.eval()
    nll, tokens, nbytes = 0.0, 0, 0
    for i, (inputs, targets) in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        ctx = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            hidden = model(inputs, return_hidden=True)
            nll += fused_linear_cross_entropy(hidden, model.lm_head.weight, targets).item()
        tokens += targets.numel()
        if token_bytes is not None:
            nbytes += int(token_bytes[targets.cpu()].sum())
    model.train(was_training)
    loss = nll / max(tokens, 1)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}
    if token_bytes is not None and nbytes:
        out["val_bpb"] = nll / (nbytes * math.log(2))
    return out
