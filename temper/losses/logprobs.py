"""Per-token and per-sequence log-probabilities of given targets, from final hidden states.

    log p_i = log softmax(h_i W^T / tau)[t_i] = z_i[t_i] - logsumexp(z_i),  z_i = h_i W^T / tau

and per sequence b: sum_{i in b, t_i != ignore} log p_i with the number of such targets.
DPO and reward-model losses compare these sums between two completions; PPO and GRPO take
ratios of the per-token values (tau is the sampling temperature, as their rollouts use).

Where it departs from the naive `log_softmax(h @ W.T / tau).gather(-1, t)`: the
(tokens x vocab) logits are never held. The forward pass computes them one chunk of
tokens at a time and keeps only the per-token logsumexp; the backward pass recomputes each
chunk's logits (one more matmul per chunk than autograd's naive graph) and applies

    d log p_i / d z_i = onehot(t_i) - softmax(z_i),   scaled by the upstream gradient g_i / tau,

building the hidden-state and weight gradients only for the inputs that require them. Unlike
`fused_linear_cross_entropy`, the gradient cannot be built in the forward pass: g_i differs
per token and is only known in backward. Ignored targets give log p = 0 and no gradient.
"""

from __future__ import annotations

import torch

from temper.losses.clm import IGNORE_INDEX, output_weight, replicated_local


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's if it is on, so backward (run outside autocast) matches forward."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _logprob_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                    ignore_index: int, temperature: float, dtype: torch.dtype,
                    entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p (N,), logsumexp (N,)), both fp32, one (chunk, V) block of logits at a time; with an
    (N,) `entropy` buffer, each position's entropy from the same logits (no second matmul)."""
    # hidden (N, C), weight (V, C), targets (N,)
    w = weight.to(dtype)
    logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start:start + chunk_size].to(dtype)
        t = targets[start:start + chunk_size]
        logits = (h @ w.t()).float()  # (n, V)
        if temperature != 1.0:
            logits.div_(temperature)
        target_logit = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)  # (n,)
        row_max = logits.amax(-1)  # (n,)
        if entropy is None:
            chunk_lse = logits.sub_(row_max[:, None]).exp_().sum(-1).log_().add_(row_max)  # one exp pass, in place
        else:  # H = lse - sum_v p_v z_v, with p = e / sum(e), e = exp(z - max)
            e = (logits - row_max[:, None]).exp_()
            total = e.sum(-1)
            chunk_lse = total.log().add_(row_max)
            entropy[start:start + chunk_size] = chunk_lse - (e.mul_(logits)).sum(-1) / total
        lse[start:start + chunk_size] = chunk_lse
        logp[start:start + chunk_size] = (target_logit - chunk_lse).masked_fill_(t == ignore_index, 0.0)
    return logp, lse


class _TokenLogprobs(torch.autograd.Function):
    """Saves hidden, weight, targets and the (N,) logsumexp; never an (N, V) tensor. Its second
    output is the entropy (a metric: no gradient), or an empty tensor."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                ignore_index: int, temperature: float, with_entropy: bool):
        dtype = _compute_dtype(hidden)
        entropy = torch.empty(hidden.shape[0] if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        logp, lse = _logprob_chunks(hidden, weight, targets, chunk_size, ignore_index, temperature, dtype,
                                    entropy if with_entropy else None)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.ignore_index, ctx.temperature, ctx.dtype = chunk_size, ignore_index, temperature, dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_hidden or want_weight):
            return None, None, None, None, None, None, None
        dtype, size = ctx.dtype, ctx.chunk_size
        w = weight.to(dtype)
        # g_i / tau, zero where the target is ignored, so those rows contribute nothing
        scale = (grad_logp.float() / ctx.temperature).masked_fill(targets == ctx.ignore_index, 0.0)  # (N,)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], size):
            h = hidden[start:start + size].to(dtype)
            s = scale[start:start + size, None]  # (n, 1)
            logits = (h @ w.t()).float()  # (n, V), recomputed
            if ctx.temperature != 1.0:
                logits.div_(ctx.temperature)
            # grad_z = s * (onehot(t) - softmax(z)), built in the logits' buffer
            grad_z = logits.sub_(lse[start:start + size, None]).exp_().mul_(-s)
            grad_z.scatter_add_(1, targets[start:start + size].clamp(min=0)[:, None], s)
            grad_z = grad_z.to(dtype)
            if want_hidden:
                grad_hidden[start:start + size] = grad_z @ w
            if want_weight:
                grad_weight += (grad_z.t() @ h).float()
        gh = grad_hidden.to(hidden.dtype) if want_hidden else None
        gw = grad_weight.to(weight.dtype) if want_weight else None
        return gh, gw, None, None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   ignore_index: int = IGNORE_INDEX, temperature: float = 1.0,
                   chunk_size: int = 1024, with_entropy: bool = False):
    """log softmax(hidden @ weight^T / temperature)[targets], fp32, 0 where targets == ignore_index.

    hidden (..., C), weight (V, C), targets (...) -> (...). Differentiable in hidden and
    weight; memory O(chunk_size x V) instead of O(tokens x V). `with_entropy=True` returns
    (log-probs, entropies): each position's H = logsumexp(z) - sum_v softmax(z)_v z_v (no
    gradient: a metric, TRL's `entropy`) from the same logits, with no second pass through
    the output layer.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: "
                         "expected hidden (..., C) and targets (...)")
    shape = targets.shape
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, C), (N,)
    weight = replicated_local(weight)  # a tensor-parallel model's output layer: this rank's copy
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        logp, entropy = _TokenLogprobs.apply(flat_hidden, weight, flat_targets, chunk_size, ignore_index,
                                             temperature, with_entropy)
    else:  # evaluation / a frozen reference model: nothing saved
        entropy = torch.empty(flat_hidden.shape[0], dtype=torch.float32, device=flat_hidden.device) \
            if with_entropy else None
        with torch.no_grad():
            logp, _ = _logprob_chunks(flat_hidden, weight, flat_targets, chunk_size, ignore_index, temperature,
                                      _compute_dtype(flat_hidden), entropy)
    return (logp.reshape(shape), entropy.reshape(shape)) if with_entropy else logp.reshape(shape)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                      sequence_index: torch.Tensor | None = None, num_sequences: int | None = None,
                      ignore_index: int = IGNORE_INDEX, temperature: float = 1.0,
                      chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs (S,) fp32, number of targets (S,)) per sequence.

    hidden (B, T, C), weight (V, C), targets (B, T); see `token_logprobs`. Each row is one
    sequence (S = B), or, for packed rows, `sequence_index` (B, T) names the sequence of every
    position (anything where the target is ignored) and `num_sequences` is S. Only positions
    with a target go through the output layer: prompts and padding cost no (tokens x vocab)
    work, forward or backward.
    """
    if targets.dim() != 2:
        raise ValueError(f"targets must be (batch, time), got shape {tuple(targets.shape)}")
    if sequence_index is None:
        num_sequences = targets.shape[0]
        sequence_index = torch.arange(num_sequences, device=targets.device)[:, None].expand_as(targets)
    elif num_sequences is None:
        raise ValueError("sequence_index needs num_sequences")
    scored = targets != ignore_index
    sequence = sequence_index[scored]  # (N,)
    logp = token_logprobs(hidden[scored], weight, targets[scored], ignore_index=ignore_index,
                          temperature=temperature, chunk_size=chunk_size)  # (N,)
    return logp.new_zeros(num_sequences).index_add(0, sequence, logp), torch.bincount(sequence, minlength=num_sequences)


def causal_lm_token_logprobs(model, input_ids: torch.Tensor, targets: torch.Tensor, *,
                             positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                             temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """(B, T) log-probs of `targets` under a temper decoder (0 at IGNORE_INDEX), as `causal_lm_loss` takes them.

    `targets[b, t]` is the token that follows `input_ids[b, :t+1]`, or IGNORE_INDEX.
    """
    hidden = model(input_ids, positions=positions, mask=mask, return_hidden=True)  # (B, T, C)
    return token_logprobs(hidden, output_weight(model), targets, temperature=temperature, chunk_size=chunk_size)


def causal_lm_sequence_logprobs(model, input_ids: torch.Tensor, targets: torch.Tensor, *,
                                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                                temperature: float = 1.0,
                                chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs (B,), number of targets (B,)) per sequence under a temper decoder."""
    logp = causal_lm_token_logprobs(model, input_ids, targets, positions=positions, mask=mask,
                                    temperature=temperature, chunk_size=chunk_size)  # (B, T)
    return logp.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def completion_logprobs(model, batch, *, with_logits: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probs (S,), completion tokens (S,), sum over completion tokens of the vocabulary-mean
    logit (S,) or None) of the S sequences of a batch of prompt + completion sequences, in one
    forward: padded one a row, or packed (padding-free) several a row.

    `batch` has `inputs`, `targets` (IGNORE_INDEX on prompts and padding), `positions`,
    `attention_mask()`, `sequence_index()` (the sequence of every position) and
    `completion_tokens` (S,): a preference batch (`temper.data.preference.PairBatch`: chosen
    rows, then rejected ones) or any batch of completions (rollouts). The output layer scores the
    completion tokens only, and the last block's work after its attention (output
    projection, MLP) and the final norm run on them alone (`hidden_at`): prompts and padding
    go through the blocks but cost no (tokens x vocab) work, forward or backward. The mean
    logit (TRL's `logits/chosen`) is h @ mean(W) per token: no (tokens x vocab) tensor either."""
    scored = batch.targets != IGNORE_INDEX  # (rows, T)
    hidden = model(batch.inputs, return_hidden=True, positions=batch.positions, mask=batch.attention_mask(),
                   hidden_at=scored)  # (N, C): the completion tokens' positions
    weight = output_weight(model)
    index, S = batch.sequence_index()[scored], batch.completion_tokens.shape[0]  # (N,)
    logp = token_logprobs(hidden, weight, batch.targets[scored])  # (N,)
    logps, counts = logp.new_zeros(S).index_add(0, index, logp), torch.bincount(index, minlength=S)
    logits_sum = None
    if with_logits:
        mean_row = replicated_local(weight).detach().float().mean(0)  # (C,)
        per_token = hidden.detach().float() @ mean_row  # (N,)
        logits_sum = per_token.new_zeros(S).index_add(0, index, per_token)
    return logps, counts, logits_sum


def rollout_inputs(prompt_ids, completion_ids: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, L), at (B, T)): each row's prompt then its completion, right-padded with `pad_id`, and
    the position whose output predicts completion token j of row b (start_b − 1 + j): where a policy
    reads that token's log-prob and a value model its state's value."""
    B, T = completion_ids.shape
    device = completion_ids.device
    starts = [len(p) for p in prompt_ids]
    inputs = torch.full((B, max(starts) + T), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompt_ids):
        inputs[b, :len(p)] = torch.tensor(list(p), dtype=torch.long, device=device)
        inputs[b, len(p):len(p) + T] = completion_ids[b]
    at = torch.tensor(starts, device=device)[:, None] - 1 + torch.arange(T, device=device)[None]  # (B, T)
    return inputs, at


def rollout_token_logprobs(model, prompt_ids, completion_ids: torch.Tensor, mask: torch.Tensor, *,
                           temperature: float = 1.0, pad_id: int = 0, with_entropy: bool = False,
                           chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs (B, T) fp32, entropies (B, T) or None) of each completion token of a rollout batch,
    given its prompt and the completion tokens before it; 0 where `mask` is 0.

    prompt_ids: B token lists; completion_ids, mask: (B, T), right-padded. One forward over the rows
    prompt + completion, right-padded (no attention mask needed: padding comes after every real token).
    Only the masked-in positions go through the output layer. Entropies (the `entropy` metric of
    RL recipes) come from the same logits as the log-probs, without gradient."""
    B, T = completion_ids.shape
    device = completion_ids.device
    inputs, at = rollout_inputs(prompt_ids, completion_ids, pad_id)
    hidden = model(inputs, return_hidden=True)  # (B, L, C)
    hidden = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, T, C)
    scored = mask.bool()
    weight = output_weight(model)
    picked = hidden[scored]  # (N, C)
    out = token_logprobs(picked, weight, completion_ids[scored], temperature=temperature, chunk_size=chunk_size,
                         with_entropy=with_entropy)  # the entropies from the same logits
    logp, flat = out if with_entropy else (out, None)
    logps = torch.zeros((B, T), dtype=logp.dtype, device=device).masked_scatter(scored, logp)
    entropies = None
    if with_entropy:
        entropies = torch.zeros((B, T), dtype=flat.dtype, device=device).masked_scatter(scored, flat)
    return logps, entropies
