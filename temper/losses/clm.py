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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, ignore_index: int):
        # hidden (N, C) in the compute dtype, weight (V, C), targets (N,)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        has_ignored = bool((targets == ignore_index).any())  # one check per call, not per chunk
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            valid = t != ignore_index
            safe_t = t.clamp(min=0)[:, None]
            logits = (h @ w.t()).float()  # (n, V): one chunk of fp32 logits at a time
            # CE = log(sum exp(z - max)) + max - z_target, with a single exp pass done in place
            target_logit = logits.gather(1, safe_t).squeeze(1)
            row_max = logits.amax(-1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            row_sum = exp.sum(-1, keepdim=True)
            row_loss = row_sum.log().squeeze(1) + row_max.squeeze(1) - target_logit
            total += row_loss.masked_fill(~valid, 0.0).sum() if has_ignored else row_loss.sum()
            if not needs_grad:
                continue
            # d(sum CE)/d logits = softmax - onehot, zero on ignored rows
            grad_logits = exp.div_(row_sum)
            grad_logits.scatter_add_(1, safe_t, torch.full_like(target_logit, -1.0)[:, None])
            if has_ignored:
                grad_logits.masked_fill_(~valid[:, None], 0.0)
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start:start + chunk_size] = grad_logits @ w
            grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight^T, target_i) over non-ignored targets, without full logits.

    hidden (..., C), weight (V, C), targets (...). Returns a scalar fp32 sum.
    """
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                          targets.reshape(-1), chunk_size, ignore_index)


def causal_lm_loss(model, input_ids: torch.Tensor, targets: torch.Tensor, *,
                   positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy, number of target tokens) for a temper decoder.

    `targets[b, t]` is the token that should follow `input_ids[b, :t+1]`, or IGNORE_INDEX.
    """
    hidden = model(input_ids, positions=positions, mask=mask, return_hidden=True)  # (B, T, C)
    loss_sum = fused_linear_cross_entropy(hidden, model.lm_head.weight, targets, chunk_size=chunk_size)
    return loss_sum, (targets != IGNORE_INDEX).sum()
