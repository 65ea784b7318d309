"""Causal language modelling: L = -sum_i log P(x_i | x_<i).

`fused_linear_cross_entropy` computes the output projection and the cross-entropy chunk by
chunk and works out the gradients in the same pass, so the full (tokens x vocab) fp32
logits never exist at once: memory is O(chunk x vocab) instead of O(B x T x vocab), and
no matmul is recomputed (the idea of Liger-Kernel's fused linear cross-entropy, written
here in plain PyTorch).

Losses return the *sum* over target tokens and the number of target tokens, so that the
training loop can normalise by the number of target tokens of the whole accumulated
batch (across micro-batches and ranks), not by a per-micro-batch mean.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _ce_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
               ignore_index: int, want_grad_hidden: bool, want_grad_weight: bool):
    """(sum CE, d sum/d hidden or None, d sum/d weight (fp32) or None), one chunk of logits at a time.

    Only the gradients asked for are built: evaluation asks for none (one matmul per chunk,
    no (V, C) buffer), a frozen output layer for grad_hidden only.
    """
    # hidden (N, C), weight (V, C), targets (N,). The matmuls run in the compute dtype: autocast's
    # where it is on (hidden arrives in fp32 from the final norm), cast here once rather than by
    # autocast at every matmul of every chunk (the same roundings, so the same numbers)
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):
        return _ce_chunk_loop(hidden, hidden.to(dtype), weight.to(dtype), targets, chunk_size,
                              want_grad_hidden, want_grad_weight)


def _ce_chunk_loop(hidden_in: torch.Tensor, hidden: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int, want_grad_hidden: bool, want_grad_weight: bool):
    """`_ce_chunks`' loop, hidden and w already in the compute dtype (hidden_in: as given, the
    dtype of its gradient). Every target is a real one: `fused_linear_cross_entropy` left the
    ignored rows out before calling."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden_in) if want_grad_hidden else None
    grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_grad_weight else None
    need_grad_logits = want_grad_hidden or want_grad_weight
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start:start + chunk_size]
        t = targets[start:start + chunk_size]
        t = t[:, None]
        logits = (h @ w.t()).float()  # (n, V): one chunk of fp32 logits at a time
        # CE = log(sum exp(z - max)) + max - z_target, with a single exp pass done in place
        target_logit = logits.gather(1, t).squeeze(1)
        row_max = logits.amax(-1, keepdim=True)
        exp = logits.sub_(row_max).exp_()
        row_sum = exp.sum(-1, keepdim=True)
        row_loss = row_sum.log().squeeze(1) + row_max.squeeze(1) - target_logit
        total += row_loss.sum()
        if not need_grad_logits:
            continue
        # d(sum CE)/d logits = softmax - onehot
        grad_logits = exp.div_(row_sum)
        grad_logits.scatter_add_(1, t, torch.full_like(target_logit, -1.0)[:, None])
        grad_logits = grad_logits.to(hidden.dtype)  # (n, V)
        if want_grad_hidden:
            grad_hidden[start:start + chunk_size] = grad_logits @ w
        if want_grad_weight:
            grad_weight += (grad_logits.t() @ h).float()
    return total, grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed in the forward pass; only call it with grad mode on.

    `ctx.needs_input_grad` says which inputs require grad even under `torch.no_grad()`,
    so the no-grad case is routed around this Function by `fused_linear_cross_entropy`.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, ignore_index: int):
        total, grad_hidden, grad_weight = _ce_chunks(hidden, weight, targets, chunk_size, ignore_index,
                                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def replicated_local(weight: torch.Tensor) -> torch.Tensor:
    """The output layer's weight as a plain tensor: a tensor-parallel model's is a Replicate()
    DTensor (every rank holds all of it), whose local copy is taken; its gradient flows back."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import (  # lazy: ~2 s to import, only tensor parallelism
            DTensor,
            Replicate,
        )

        if isinstance(weight, DTensor):
            assert all(isinstance(p, Replicate) for p in weight.placements), \
                f"the output layer's weight must be replicated, not {weight.placements}"
            return weight.to_local()
    return weight


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight^T, target_i) over non-ignored targets, without full logits.

    hidden (..., C), weight (V, C), targets (...). Returns a scalar fp32 sum. Rows whose
    target is ignored (a prompt under completion-only loss, padding) are left out before
    any matmul; their gradient is zero. Under
    `torch.no_grad()` or when neither input requires grad, only the loss is computed
    (one matmul per chunk); otherwise the gradients of the inputs that require grad. A
    replicated DTensor weight (tensor parallelism) is used through its local copy.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, C), (N,)
    weight = replicated_local(weight)
    kept = targets != ignore_index
    if not bool(kept.all()):  # only rows with a target meet the output layer: no matmul for a prompt or padding
        rows = kept.nonzero().squeeze(1)
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _ce_chunks(hidden, weight, targets, chunk_size, ignore_index, False, False)[0]
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)


def output_weight(model) -> torch.Tensor:
    """The output layer's weight (V, C) of a temper decoder, also through a
    DistributedDataParallel wrapper (whose `module` is the model). A LoRA-adapted output layer
    gives its effective weight (W + s B A, or DoRA's), through which the adapter's gradients flow."""
    inner = getattr(model, "module", None)
    head = (inner if isinstance(inner, torch.nn.Module) and hasattr(inner, "lm_head") else model).lm_head
    effective = getattr(head, "effective_weight", None)
    return effective() if effective is not None else head.weight


def causal_lm_loss(model, input_ids: torch.Tensor, targets: torch.Tensor, *,
                   positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy, number of target tokens) for a temper decoder.

    `targets[b, t]` is the token that should follow `input_ids[b, :t+1]`, or IGNORE_INDEX.
    """
    hidden = model(input_ids, positions=positions, mask=mask, return_hidden=True)  # (B, T, C)
    loss_sum = fused_linear_cross_entropy(hidden, output_weight(model), targets, chunk_size=chunk_size)
    return loss_sum, (targets != IGNORE_INDEX).sum()
