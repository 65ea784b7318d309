"""The shared training numerics: schedules, parameter groups, accumulation, the fused loss."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FP32_EPS, approx_reordered, assert_reorder_close, decoder_lengths, reorder_tol

from temper.config import OptimConfig, ScheduleConfig
from temper.losses import IGNORE_INDEX, causal_lm_loss, fused_linear_cross_entropy
from temper.models import build_model, preset
from temper.train import engine
from temper.train.optim import build_optimizer, lr_at, parameter_groups


def test_cosine_schedule_shape():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 1.0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, 1.0, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: the mean of peak and floor
    assert lr_at(110, 1.0, cfg, 110) == pytest.approx(0.1)
    assert all(lr_at(s, 1.0, cfg, 110) >= lr_at(s + 1, 1.0, cfg, 110) for s in range(10, 109))


def test_linear_constant_and_warmup_ratio():
    lin = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(50, 2.0, lin, 100) == pytest.approx(1.0)
    const = ScheduleConfig(name="constant", warmup_steps=-1, warmup_ratio=0.1)
    assert lr_at(4, 1.0, const, 100) == pytest.approx(0.5)  # 10 warmup steps from the ratio
    assert lr_at(99, 1.0, const, 100) == 1.0


def test_decay_only_on_matrices_and_tied_weights_once():
    model = build_model(preset("llama-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_cross_entropy_matches_formula(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :4] = IGNORE_INDEX
    logits = hidden @ weight.t()
    expected = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)
    # by hand: -sum log softmax at the target, over non-ignored positions
    logp = logits.log_softmax(-1).reshape(-1, 50)
    flat = targets.reshape(-1)
    by_hand = -sum(logp[i, flat[i]] for i in range(flat.numel()) if flat[i] != IGNORE_INDEX)
    # hidden @ W^T over 16, a logsumexp over 50 classes, a sum over 17 targets: each in its own order
    forward = (16, 50, targets.numel())
    assert_reorder_close(expected, by_hand, forward)
    (expected * 0.5).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    (got * 0.5).backward()
    assert_reorder_close(got, expected, forward)
    assert_reorder_close(hidden.grad, gh, forward + (50,))  # backward: softmax @ W over the classes
    assert_reorder_close(weight.grad, gw, forward + (targets.numel(),))  # and over the tokens


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_accumulation_normalises_by_all_target_tokens():
    """Two micro-batches with different numbers of target tokens give the gradient of one batch."""
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64))
    inputs = torch.randint(0, 64, (4, 12))
    targets = torch.randint(0, 64, (4, 12))
    targets[:2, :9] = IGNORE_INDEX  # the first micro-batch has far fewer targets

    def loss_fn(batch):  # what the loss counts (target tokens) comes back with the sum
        return causal_lm_loss(model, batch[0], batch[1])

    nullcontext = engine.contextlib.nullcontext
    whole = engine.accumulate(model, [(inputs, targets)], loss_fn, autocast=nullcontext)
    full_grads = _grads(model)
    # by the definition: the mean token NLL of the whole batch, differentiated directly
    model.zero_grad()
    s, n = causal_lm_loss(model, inputs, targets)
    (s / n).backward()
    step = decoder_lengths(model, 12, tokens=inputs.numel())
    for p, g in zip(model.parameters(), full_grads):  # divided by n before backward or after it
        assert_reorder_close(p.grad, g, step)
    # the same sum divided in float64 vs float32: one fp32 rounding
    assert whole["loss"] == pytest.approx(float(s / n), rel=FP32_EPS) and whole["count"] == int(n)
    model.zero_grad()
    split = engine.accumulate(model, [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])], loss_fn,
                              autocast=nullcontext)
    assert split["loss"] == approx_reordered(whole["loss"], decoder_lengths(model, 12) + (inputs.numel(),))
    for p, g in zip(model.parameters(), full_grads):
        assert_reorder_close(p.grad, g, step)
    # the per-micro-batch mean (the common mistake) gives a different gradient
    model.zero_grad()
    for batch in [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]:
        s, n = causal_lm_loss(model, *batch)
        (s / n / 2).backward()
    assert not all(torch.allclose(p.grad, g, rtol=1e-3) for p, g in zip(model.parameters(), full_grads))


def test_accumulation_counts_the_unit_the_loss_counts():
    """A pair loss (DPO-like) is averaged over pairs, whatever the micro-batch sizes; extra metrics sum."""
    torch.manual_seed(0)
    w = torch.nn.Linear(3, 1, bias=False)
    x = torch.randn(5, 3)

    def pair_loss(rows):  # one unit per pair; -log sigmoid of a score
        score = w(rows).squeeze(-1)
        return -F.logsigmoid(score).sum(), rows.shape[0], {"pairs": rows.shape[0]}

    out = engine.accumulate(w, [x[:1], x[1:]], pair_loss, autocast=engine.contextlib.nullcontext)
    got = w.weight.grad.clone()
    w.zero_grad()
    (-F.logsigmoid(w(x).squeeze(-1)).mean()).backward()
    assert_reorder_close(got, w.weight.grad, (3, 5))  # scores over 3 inputs, then a sum over 5 rows
    assert out["count"] == 5 and out["pairs"] == 5
    assert out["loss"] == approx_reordered(float(-F.logsigmoid(w(x).squeeze(-1)).mean()), (3, 5))


def test_two_objectives_in_one_step_are_each_normalised_by_their_own_count():
    """Replay: (1 - w) * mean over objective A's units + w * mean over B's, whatever their counts."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1, bias=False)
    a, b = torch.randn(6, 4), torch.randn(2, 4)

    def square(rows):
        return (lin(rows) ** 2).sum(), rows.shape[0]

    nullcontext = engine.contextlib.nullcontext
    engine.accumulate(lin, [a[:4], a[4:]], square, autocast=nullcontext, weight=0.7)
    engine.accumulate(lin, [b], square, autocast=nullcontext, weight=0.3)
    got = lin.weight.grad.clone()
    lin.zero_grad()
    (0.7 * (lin(a) ** 2).mean() + 0.3 * (lin(b) ** 2).mean()).backward()
    assert_reorder_close(got, lin.weight.grad, (4, 6, 2))  # over 4 inputs, then 6 and 2 rows


def test_accumulation_refuses_a_batch_with_nothing_to_learn():
    lin = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="every target is masked"):
        engine.accumulate(lin, [torch.zeros(1, 2)], lambda r: (lin(r).sum() * 0, 0),
                          autocast=engine.contextlib.nullcontext)


@pytest.mark.parametrize("clip", [1.0, 0.0, 100.0])
def test_clipping_reports_norm_and_clips(clip):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is then exactly the (clipped) gradient
    before = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) * 3 for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    expected = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    norm = engine.optimizer_step(model, opt, grad_clip=clip)
    # squares summed over 16 and 4 entries, then over the 2 tensors, then a rounded square root
    norm_rel = reorder_tol(1.0, 16, 4, 2, 1)
    assert norm == pytest.approx(expected, rel=norm_rel)  # the norm before clipping
    applied = [b - p.detach() for b, p in zip(before, model.parameters())]
    scale = min(1.0, clip / expected) if clip > 0 else 1.0
    # w - g * scale and then before - w each round once (eps of the weights' size), scale is off by
    # the norm's error and one rounding
    w = max(float(b.abs().max()) for b in before)
    for step, g in zip(applied, grads):
        torch.testing.assert_close(step, g * scale, rtol=norm_rel + 2 * FP32_EPS, atol=2 * FP32_EPS * w)
    applied_norm = math.sqrt(sum(float((s ** 2).sum()) for s in applied))
    target = min(expected, clip) if clip > 0 else expected
    weights = math.sqrt(sum(float((b ** 2).sum()) for b in before))
    assert applied_norm == pytest.approx(target, rel=2 * norm_rel + 2 * FP32_EPS * (1 + weights / target))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_several_trained_modules_one_optimiser_one_global_norm():
    """A policy and a value head sharing a trunk: one optimiser (decay groups, the shared trunk
    once), accumulation normalised over both, and one clipping norm over every parameter."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 4)
    policy = torch.nn.Sequential(trunk, torch.nn.Linear(4, 3))
    value = torch.nn.Sequential(trunk, torch.nn.Linear(4, 1))
    modules = {"policy": policy, "value": value}
    opt = build_optimizer(modules, OptimConfig(lr=1.0, weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert len(decay["params"]) == 3 and len(no_decay["params"]) == 3  # the trunk once: 3 weights, 3 biases
    x = torch.randn(5, 4)

    def loss(rows):
        return policy(rows).square().sum() + value(rows).square().sum(), rows.shape[0]

    nullcontext = engine.contextlib.nullcontext
    engine.accumulate(modules, [x[:2], x[2:]], loss, autocast=nullcontext)
    got = {id(p): p.grad.clone() for g in opt.param_groups for p in g["params"]}
    opt.zero_grad()
    (loss(x)[0] / 5).backward()
    for g in opt.param_groups:
        for p in g["params"]:
            torch.testing.assert_close(got[id(p)], p.grad)
    expected = math.sqrt(sum(float(p.grad.square().sum()) for g in opt.param_groups for p in g["params"]))
    grads = [p.grad.clone() for g in opt.param_groups for p in g["params"]]
    opt = torch.optim.SGD([p for g in opt.param_groups for p in g["params"]], lr=1.0)
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    norm = engine.optimizer_step(modules, opt, grad_clip=0.5)
    assert norm == pytest.approx(expected, rel=1e-6)  # every module's gradients, the trunk's counted once
    after = [p.detach() for g in opt.param_groups for p in g["params"]]
    for b, a, g in zip(before, after, grads):  # every module clipped by the same global factor
        torch.testing.assert_close(b - a, g * 0.5 / expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["none", "adapter", "prefix", "prompt"])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_activation_checkpointing_gives_same_loss_and_gradients(name, method):
    from temper.config import PeftConfig
    from temper.peft import apply_peft

    torch.manual_seed(0)
    a = build_model(preset(name, vocab_size=64))
    cfg = PeftConfig(method=method, adapter_dim=4, num_virtual_tokens=3)
    apply_peft(a, cfg)
    b = build_model(preset(name, vocab_size=64))
    apply_peft(b, cfg)
    b.load_state_dict(a.state_dict())
    assert engine.apply_activation_checkpointing(b) == len(b.blocks)
    calls = []  # forward calls of the first block: a checkpointed block runs again in backward
    b.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x, y = torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 10))
    loss_a, loss_b = causal_lm_loss(a, x, y)[0], causal_lm_loss(b, x, y)[0]
    assert torch.equal(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    assert len(calls) == 2
    grads_a = {n: p.grad for n, p in a.named_parameters() if p.requires_grad}
    grads_b = {n: p.grad for n, p in b.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n, g in grads_a.items():
        assert torch.equal(g, grads_b[n]), n
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any("forward" in vars(m) for m in b.modules())  # a flag, not a patch
    with torch.no_grad():  # nothing to recompute without gradients
        b(x)
    assert len(calls) == 3


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_flops_per_token_equals_counted_flops(name):
    """The formula against PyTorch's FLOP counter on one real training step (SDPA's math path,
    whose two (T x T) products the counter sees as bmm): matmuls of the forward, the backward
    and the fused loss, with lookups (embeddings, GPT-2 positions) and norms not counted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(preset(name, vocab_size=64))
    B, T = 2, 16
    x, y = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        causal_lm_loss(model, x, y)[0].backward()
    assert engine.flops_per_token(model, T) * B * T == counter.get_total_flops()


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_flops_per_token_counts_each_matmul_weight_once_under_lora(method):
    """A LoRA wrapper is not a matmul of its own: the base (plain or NF4) counts once, and the
    adapter's A and B (r x in, out x r) count as the two small matmuls they are. QLoRA used to
    count the 4-bit base and its wrapper both (1.63x the plain model's FLOPs)."""
    from temper.config import PeftConfig
    from temper.peft import apply_peft
    from temper.peft.lora import lora_modules

    torch.manual_seed(0)
    plain = engine.flops_per_token(build_model(preset("llama-tiny", vocab_size=64)), 32)
    model = build_model(preset("llama-tiny", vocab_size=64))
    apply_peft(model, PeftConfig(method=method, r=4, target_modules=["all-linear"]))
    adapters = sum(m.lora_A[m.active].weight.numel() + m.lora_B[m.active].weight.numel()
                   for _, m in lora_modules(model))
    assert adapters == 4 * sum(m.in_features + m.out_features for _, m in lora_modules(model))
    assert engine.flops_per_token(model, 32) == plain + 6 * adapters


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux's")
def test_cpu_peak_memory_is_the_process_own_not_its_parents_at_fork():
    """A run started by fork + exec from a big process (a benchmark, a workflow) reports its own peak
    RSS: getrusage's ru_maxrss would start at the parent's size at the fork."""
    big = bytearray(1024 * 2**20)  # a 1 GiB parent, every page touched
    for i in range(0, len(big), 4096):
        big[i] = 1
    code = "import torch; from temper.train.engine import peak_memory_mb; print(peak_memory_mb(torch.device('cpu')))"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the trap needs fork then exec (subprocess may vfork, which inherits nothing)
        os.close(read)
        os.dup2(write, 1)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        os.execve(sys.executable, [sys.executable, "-c", code], env)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    child_mb = float(out.split()[-1])
    assert 0 < child_mb < 900, f"the child reported {child_mb:.0f} MB: its parent's 1 GiB counted in"
    del big
