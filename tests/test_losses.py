"""The chunked output-layer losses: values and gradients against the naive formulas, and the work they skip."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_reorder_close, decoder_lengths
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from temper.losses import (
    IGNORE_INDEX,
    causal_lm_loss,
    causal_lm_sequence_logprobs,
    causal_lm_token_logprobs,
    fused_linear_cross_entropy,
    sequence_logprobs,
    token_logprobs,
)
from temper.models import build_model, preset

B, T, C, V = 3, 7, 16, 50  # N = 21 tokens: chunk sizes 5 and 8 do not divide it
ALL_GRADS = [(True, True), (True, False), (False, True), (False, False)]
# Chunked vs whole, fused vs F.cross_entropy: the same sums in another order (conftest.reorder_tol).
# A token's log-prob: hidden @ W^T over C, a logsumexp over V; its gradients sum over the V classes
# (hidden) or the N tokens (weight); a loss sums over the tokens.
TOKEN = (C, V)
LOSS = TOKEN + (B * T,)
GRAD = {"hidden": (V,), "weight": (B * T,)}


def _inputs(hidden_grad: bool = True, weight_grad: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g).requires_grad_(hidden_grad)
    weight = torch.randn(V, C, generator=g).requires_grad_(weight_grad)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :4] = IGNORE_INDEX
    targets[2, -1] = IGNORE_INDEX
    return hidden, weight, targets


def _grads(*tensors):
    out = [t.grad.clone() if t.grad is not None else None for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def _mm_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class _MatmulDtypes(TorchDispatchMode):
    """Records the input dtype of every aten.mm."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- fused cross-entropy


@pytest.mark.parametrize("hidden_grad,weight_grad", ALL_GRADS)
@pytest.mark.parametrize("chunk", [5, 1024])
def test_fused_cross_entropy_each_requires_grad_combination(hidden_grad, weight_grad, chunk):
    """Loss and the gradients that are asked for equal F.cross_entropy's; the others stay None."""
    hidden, weight, targets = _inputs(hidden_grad, weight_grad)
    expected = F.cross_entropy((hidden @ weight.t()).reshape(-1, V), targets.reshape(-1), reduction="sum",
                               ignore_index=IGNORE_INDEX)
    got = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    assert_reorder_close(got, expected, LOSS)
    assert got.requires_grad == (hidden_grad or weight_grad)
    if not got.requires_grad:
        return
    (expected * 0.7).backward()
    want_h, want_w = _grads(hidden, weight)
    (got * 0.7).backward()
    got_h, got_w = _grads(hidden, weight)
    for g, want, name in ((got_h, want_h, "hidden"), (got_w, want_w, "weight")):
        if want is None:
            assert g is None
        else:
            assert_reorder_close(g, want, LOSS + GRAD[name])
    if hidden_grad:
        assert (got_h[0, :4] == 0).all()  # ignored targets pass no gradient


def test_fused_cross_entropy_under_no_grad_is_the_loss_alone():
    hidden, weight, targets = _inputs()
    expected = F.cross_entropy((hidden @ weight.t()).reshape(-1, V), targets.reshape(-1), reduction="sum",
                               ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        got = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert got.grad_fn is None and not got.requires_grad
    assert_reorder_close(got, expected.detach(), LOSS)


class _CastCounter(TorchDispatchMode):
    """Counts dtype casts (aten._to_copy) and the dtypes every matmul ran in."""

    def __init__(self):
        super().__init__()
        self.casts, self.matmul_dtypes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.casts += 1
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.matmul_dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


def test_fused_cross_entropy_under_autocast_casts_once_not_per_chunk_and_matmul():
    """bf16 autocast, fp32 hidden states (the final norm's output): the matmuls run in bf16 as autocast
    would run them, with the same numbers, but hidden and weight are cast once, not at every matmul of
    every chunk (three matmuls a chunk: 2 casts each, before)."""
    hidden, weight, targets = _inputs()
    chunks = -(-B * T // 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy((hidden @ weight.t()).float().reshape(-1, V), targets.reshape(-1),
                                   reduction="sum", ignore_index=IGNORE_INDEX)
        counter = _CastCounter()
        with counter:
            got = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    assert counter.matmul_dtypes == {torch.bfloat16}
    # hidden and weight once; per chunk: fp32 logits, bf16 grad of the logits, the fp32 weight-gradient add
    assert counter.casts <= 2 + 3 * chunks
    # the same bf16 matmul inputs as autocast's: the loss within fp32 reordering of the sums
    assert_reorder_close(got, expected.detach(), LOSS)


@pytest.mark.parametrize("hidden_grad,weight_grad,grad_mode,matmuls", [
    (True, True, True, 3),    # logits, grad_hidden, grad_weight
    (True, False, True, 2),   # frozen output layer (PEFT): no weight gradient
    (False, True, True, 2),   # frozen hidden states: no hidden gradient
    (False, False, True, 1),  # nothing requires grad
    (True, True, False, 1),   # evaluation under torch.no_grad()
])
def test_fused_cross_entropy_does_only_the_matmuls_needed(hidden_grad, weight_grad, grad_mode, matmuls):
    """Counts every matmul FLOP of forward + backward: each skipped gradient is one (N, C, V) matmul less,
    and only the N rows with a target meet the output layer (5 of the 21 are ignored)."""
    hidden, weight, targets = _inputs(hidden_grad, weight_grad)

    def run():
        with torch.set_grad_enabled(grad_mode):
            loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=5)
        if loss.requires_grad:
            loss.backward()

    n_targets = int((targets != IGNORE_INDEX).sum())
    assert n_targets == B * T - 5
    assert _mm_flops(run) == matmuls * 2 * n_targets * C * V


# ----------------------------------------------------------------------------- log-probabilities


def _naive_token_logprobs(hidden, weight, targets, temperature=1.0):
    logp = (hidden @ weight.t() / temperature).log_softmax(-1)  # (B, T, V)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return picked.masked_fill(targets == IGNORE_INDEX, 0.0)


@pytest.mark.parametrize("chunk", [1, 5, 8, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_log_softmax_gather_with_gradients(chunk, temperature):
    """Values, and gradients under an upstream gradient that differs per token (as PPO's ratios give)."""
    hidden, weight, targets = _inputs()
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(1))
    expected = _naive_token_logprobs(hidden, weight, targets, temperature)
    (expected * upstream).sum().backward()
    want_h, want_w = _grads(hidden, weight)
    got = token_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=chunk)
    assert got.shape == (B, T) and got.dtype == torch.float32
    assert (got[targets == IGNORE_INDEX] == 0).all()
    assert_reorder_close(got, expected, TOKEN)
    (got * upstream).sum().backward()
    got_h, got_w = _grads(hidden, weight)
    assert_reorder_close(got_h, want_h, TOKEN + GRAD["hidden"])
    assert_reorder_close(got_w, want_w, TOKEN + GRAD["weight"])
    assert (got_h[0, :4] == 0).all()  # ignored targets pass no gradient


@pytest.mark.parametrize("hidden_grad,weight_grad", ALL_GRADS)
def test_sequence_logprobs_per_sequence_sums_and_gradients(hidden_grad, weight_grad):
    """Sums/counts per sequence; a DPO-like signed weight per sequence reaches the right rows."""
    hidden, weight, targets = _inputs(hidden_grad, weight_grad)
    per_sequence = torch.tensor([1.0, -2.0, 0.5])
    naive = _naive_token_logprobs(hidden, weight, targets)
    if naive.requires_grad:
        (naive.sum(-1) * per_sequence).sum().backward()
    want_h, want_w = _grads(hidden, weight)
    sums, counts = sequence_logprobs(hidden, weight, targets, chunk_size=5)
    assert counts.tolist() == [3, 7, 6]
    assert_reorder_close(sums, naive.sum(-1), TOKEN + (T,))
    assert sums.requires_grad == (hidden_grad or weight_grad)
    if sums.requires_grad:
        (sums * per_sequence).sum().backward()
    got_h, got_w = _grads(hidden, weight)
    for g, want, name in ((got_h, want_h, "hidden"), (got_w, want_w, "weight")):
        if want is None:
            assert g is None
        else:
            assert_reorder_close(g, want, TOKEN + (T,) + GRAD[name])


@pytest.mark.parametrize("hidden_grad,weight_grad,grad_mode,matmuls", [
    (True, True, True, 4),    # forward logits; backward: recomputed logits, grad_hidden, grad_weight
    (True, False, True, 3),   # frozen output layer
    (False, True, True, 3),
    (False, False, True, 1),
    (True, True, False, 1),   # a reference model under no_grad: forward only
])
def test_token_logprobs_do_only_the_matmuls_needed(hidden_grad, weight_grad, grad_mode, matmuls):
    hidden, weight, targets = _inputs(hidden_grad, weight_grad)

    def run():
        with torch.set_grad_enabled(grad_mode):
            logp = token_logprobs(hidden, weight, targets, chunk_size=5)
        if logp.requires_grad:
            logp.sum().backward()

    assert _mm_flops(run) == matmuls * 2 * B * T * C * V


@pytest.mark.parametrize("grad_mode", [True, False])
def test_token_logprobs_with_entropy_reuse_the_logits(grad_mode):
    """with_entropy=True: the entropy of softmax(z / tau) at every position (against the naive
    formula), the same log-probs and gradients, and no extra pass through the output layer."""
    hidden, weight, targets = _inputs()
    temperature = 0.7
    naive = torch.log_softmax((hidden.detach() @ weight.detach().t()).float() / temperature, -1)
    expected_entropy = -(naive.exp() * naive).sum(-1)
    plain = token_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=5)
    with torch.set_grad_enabled(grad_mode):
        got, entropy = token_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=5,
                                      with_entropy=True)
    assert entropy.shape == (B, T) and not entropy.requires_grad
    assert_reorder_close(entropy, expected_entropy, TOKEN + (V,))
    assert torch.equal(got.detach(), plain.detach())
    if grad_mode:
        plain.sum().backward()
        want_h, want_w = _grads(hidden, weight)
        got.sum().backward()
        got_h, got_w = _grads(hidden, weight)
        assert torch.equal(got_h, want_h) and torch.equal(got_w, want_w)

    def run():
        with torch.set_grad_enabled(grad_mode):
            logp, _ = token_logprobs(hidden, weight, targets, chunk_size=5, with_entropy=True)
        if logp.requires_grad:
            logp.sum().backward()

    assert _mm_flops(run) == (4 if grad_mode else 1) * 2 * B * T * C * V


def test_token_logprobs_save_no_tokens_by_vocab_tensor():
    """Only O(N x C + V x C + N) is kept for backward; the naive graph keeps (N, V) log-softmax."""
    hidden, weight, targets = _inputs()

    def saved_shapes(fn) -> list[tuple[int, ...]]:
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return shapes

    flat = hidden.reshape(-1, C)
    naive = saved_shapes(lambda: _naive_token_logprobs(flat, weight, targets.reshape(-1)))
    assert (B * T, V) in naive  # the check below can see an (N, V) tensor
    fused = saved_shapes(lambda: token_logprobs(flat, weight, targets.reshape(-1), chunk_size=5))
    assert fused and all(V not in s or s == (V, C) for s in fused), fused
    assert max(torch.Size(s).numel() for s in fused) <= max(B * T, V) * C


def test_token_logprobs_bf16_autocast_close_to_fp32():
    """Matmuls in bf16 under autocast (also the recomputation in backward), softmax in fp32."""
    hidden, weight, targets = _inputs()
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    expected = _naive_token_logprobs(hidden, weight, targets)
    (expected * upstream).sum().backward()
    want_h, want_w = _grads(hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(hidden, weight, targets, chunk_size=5)
    assert got.dtype == torch.float32
    with _MatmulDtypes() as backward_matmuls:  # backward runs outside autocast, yet must match the forward
        (got * upstream).sum().backward()
    assert backward_matmuls.dtypes == [torch.bfloat16] * 15  # 5 chunks x (logits, grad_hidden, grad_weight)
    got_h, got_w = _grads(hidden, weight)
    assert got_h.dtype == got_w.dtype == torch.float32
    # bf16 logits of magnitude ~10 carry a few hundredths of absolute error (measured: 0.03, grads 0.02)
    torch.testing.assert_close(got, expected, rtol=0.01, atol=0.06)
    torch.testing.assert_close(got_h, want_h, rtol=0.02, atol=0.05)
    torch.testing.assert_close(got_w, want_w, rtol=0.02, atol=0.05)
    assert not torch.equal(got, expected)  # the matmuls really ran in bf16


def test_token_logprobs_rejects_bad_arguments():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(hidden, weight, targets[:, :-1])


def test_causal_lm_logprobs_agree_with_model_logits_and_the_loss():
    """Model-level helpers: the model's own logits give the same log-probs; their negated sum is the CE sum."""
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64))
    ids = torch.randint(0, 64, (2, 10))
    targets = torch.randint(0, 64, (2, 10))
    targets[1, :6] = IGNORE_INDEX
    got = causal_lm_token_logprobs(model, ids, targets, chunk_size=7)
    expected = model(ids).float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = expected.masked_fill(targets == IGNORE_INDEX, 0.0)
    forward = decoder_lengths(model, 10)  # the model's logits, then log-softmax: another order
    assert_reorder_close(got, expected, forward)
    sums, counts = causal_lm_sequence_logprobs(model, ids, targets, chunk_size=7)
    assert counts.tolist() == [10, 4]
    loss_sum, n = causal_lm_loss(model, ids, targets)
    assert_reorder_close(-sums.sum(), loss_sum, forward + (ids.numel(),))
    assert int(n) == int(counts.sum())
    sums.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
