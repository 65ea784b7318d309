"""Tensor parallelism (temper.train.tensor_parallel) in real multi-process runs on gloo.

Each test spawns its ranks, which write their results to safetensors files; this process
computes the same thing on one unsplit model and compares. A rank that raises fails the
test with its traceback; a rank that hangs is killed after a deadline.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import (
    ADAMW_EPS,
    adamw_drift,
    assert_reorder_close,
    assert_weights_close,
    decoder_lengths,
)
from safetensors.torch import load_file, save_file

from temper.config import OptimConfig, PeftConfig
from temper.errors import TemperError
from temper.losses.clm import IGNORE_INDEX, causal_lm_loss
from temper.models import build_model, preset
from temper.train.optim import build_optimizer
from temper.train.tensor_parallel import apply_tensor_parallel, check_tensor_parallel

DEADLINE_S = 120  # per spawned run; the runs below take 5-12 s on 2 CPU cores
VARIANTS = {  # llama-tiny: 4 heads, 2 key/value heads, 128 MLP units, tied embeddings
    "tied": {},
    "biased_untied": dict(qkv_bias=True, mlp_bias=True, attn_out_bias=True, tie_embeddings=False),
}
# build_optimizer: decay groups, fused AdamW; its eps keeps the weights a Lipschitz function of
# the gradients (conftest.ADAMW_EPS), so that split and unsplit training can agree
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.1, eps=ADAMW_EPS)
# Split matmuls sum their halves in another order than the whole: conftest.reorder_tol over
# llama-tiny's reductions, for packed rows of 24 tokens
SEQ_LEN = 24


# ----------------------------------------------------------------------------- the harness


@pytest.fixture(autouse=True)
def _one_thread():
    """The one-process references are tiny: a second OpenMP thread only spins against the ranks."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _worker(rank: int, world: int, root: str, scenario: str, kwargs: dict) -> None:
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)  # world ranks share 2 cores
        dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world,
                                timeout=timedelta(seconds=DEADLINE_S))
        try:
            results = SCENARIOS[scenario](rank, world, **kwargs)
            save_file({k: v.detach().clone().contiguous() for k, v in results.items()},
                      str(Path(root) / f"rank{rank}.safetensors"))
        finally:
            dist.destroy_process_group()
    except BaseException:
        Path(root, f"rank{rank}.error").write_text(traceback.format_exc())
        sys.exit(1)


def _spawn(tmp_path: Path, world: int, scenario: str, **kwargs) -> list[dict[str, torch.Tensor]]:
    """Run `scenario` on `world` gloo ranks; every rank's results, or fail with the tracebacks."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path), scenario, kwargs)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # one rank failed: the others may wait in a collective forever
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"rank {r}:\n{(tmp_path / f'rank{r}.error').read_text()}"
              for r in range(world) if (tmp_path / f"rank{r}.error").exists()]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    codes = [p.exitcode for p in procs]
    if any(code != 0 for code in codes):
        pytest.fail(f"{scenario}: ranks ended with exit codes {codes} (killed after {DEADLINE_S} s?)", pytrace=False)
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]


# ----------------------------------------------------------------------------- shared by both sides


def _model(**overrides):
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return build_model(preset("llama-tiny", **overrides), dtype=torch.float32)


def _sft_batch(rows: int, seed: int, seq_len: int = 24):
    """Packed SFT rows as the SFT recipe builds them: positions reset per example, attention
    kept inside each, prompts and padding ignored; rows hold different numbers of targets."""
    from temper.data.sft import Example, packed_batch

    g = torch.Generator().manual_seed(seed)
    packed = []
    for _ in range(rows):
        row, used = [], 0
        while True:
            n = int(torch.randint(3, 10, (1,), generator=g))
            if used + n > seq_len - 2:
                break
            ids = torch.randint(1, 2048, (n,), generator=g).tolist()
            prompt = int(torch.randint(1, n, (1,), generator=g))
            row.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
            used += n
        packed.append(row)
    batch = packed_batch(packed, seq_len, pad_id=0)
    return batch.inputs, batch.targets, batch.positions, batch.attention_mask()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # a Replicate's may be its storage


def _full_state(model, prefix: str) -> dict[str, torch.Tensor]:
    """Every parameter, gathered whole (a collective: every rank calls it); tied ones once."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out[prefix + name] = _full(p.detach())
    return out


def _full_grads(model) -> dict[str, torch.Tensor]:
    return {"grad." + n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- scenarios (in the ranks)


def _tensor_parallel_forward(rank: int, world: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    inputs, targets, positions, mask = _sft_batch(3, seed=1)
    out = {}
    for variant, overrides in VARIANTS.items():
        model = _model(**overrides)
        apply_tensor_parallel(model, mesh["tp"])
        q = model.blocks[0].attn.q_proj.weight
        assert q.to_local().shape[0] == q.shape[0] // world, "q_proj is not split by heads"
        with torch.no_grad():
            out[f"{variant}.logits"] = model(inputs)
            out[f"{variant}.sft_logits"] = model(inputs, positions=positions, mask=mask)
            out[f"{variant}.sft_loss_sum"], _ = causal_lm_loss(model, inputs, targets, positions=positions, mask=mask)

    from temper.peft.adapters import inject_bottleneck_adapters
    from temper.peft.lora import inject_lora

    model = _model()
    inject_lora(model, PeftConfig(method="lora"))
    with pytest.raises(TemperError, match="parallel.tp=2: layer 0's attn.q_proj is a LoRALinear"):
        apply_tensor_parallel(model, mesh["tp"])
    model = _model()
    inject_bottleneck_adapters(model, dim=4)
    with pytest.raises(TemperError, match=r"splits the base model only, not layers.0.attn.adapter.down.weight"):
        apply_tensor_parallel(model, mesh["tp"])
    return out


def _tensor_parallel_step(rank: int, world: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = _model()
    apply_tensor_parallel(model, mesh["tp"])
    optimizer = build_optimizer(model, OPTIM)
    inputs, targets, positions, mask = _sft_batch(3, seed=2)
    loss_sum, count = causal_lm_loss(model, inputs, targets, positions=positions, mask=mask)
    (loss_sum / count).backward()
    grads = _full_grads(model)
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0, foreach=True)
    optimizer.step()
    return {"step.loss": (loss_sum / count).detach(), "step.norm": _full(norm),
            "step.float_norm": torch.tensor(float(norm)), **grads, **_full_state(model, "weight.")}


def _fsdp_tensor_parallel_steps(rank: int, world: int, dp: int, steps: int) -> dict[str, torch.Tensor]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
    model = _model()
    model.activation_checkpointing = True
    apply_tensor_parallel(model, mesh["tp"])  # tensor parallelism first, then FSDP over dp
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    # the loss is divided by the whole batch's target count (below): sum the dp gradients, not
    # average them; the setting is per FSDP module (it does not recurse)
    for sharded in (*model.blocks, model):
        sharded.set_gradient_divide_factor(1.0)
        sharded.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    optimizer = build_optimizer(model, OPTIM)
    dp_rank, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].get_group()
    out = {}
    for step in range(steps):
        inputs, targets, positions, mask = _sft_batch(2 * dp, seed=10 + step)
        rows = slice(2 * dp_rank, 2 * dp_rank + 2)  # this dp rank's share; both tp ranks see the same
        loss_sum, count = causal_lm_loss(model, inputs[rows], targets[rows], positions=positions[rows],
                                         mask=mask[rows])
        totals = torch.stack([loss_sum.detach(), count.float()])
        dist.all_reduce(totals, group=dp_group)  # over dp only: tp ranks hold the same tokens
        (loss_sum / totals[1]).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out[f"loss{step}"], out[f"norm{step}"] = totals[0] / totals[1], _full(norm)
    return {**out, **_full_state(model, "weight.")}


def _tensor_parallel(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Both one-dimensional runs in one spawn: each rank's start (imports) costs ~2 s of CPU."""
    return {**_tensor_parallel_forward(rank, world), **_tensor_parallel_step(rank, world)}


SCENARIOS = {f.__name__: f for f in (_tensor_parallel, _fsdp_tensor_parallel_steps)}


# ----------------------------------------------------------------------------- the reference and the tests


def _reference_backward(model, batch) -> torch.Tensor:
    """The one-process loss (summed CE / target count) of `batch`, backpropagated."""
    inputs, targets, positions, mask = batch
    loss_sum, count = causal_lm_loss(model, inputs, targets, positions=positions, mask=mask)
    (loss_sum / count).backward()
    return (loss_sum / count).detach()


def _assert_weights_match(results: dict[str, torch.Tensor], model, norms: list[float], rows: int) -> None:
    """The weights after len(norms) AdamW steps (clip 1.0) within `adamw_drift` of the reference's."""
    expected = {"weight." + n: p.detach() for n, p in model.named_parameters()}  # tied: listed once
    assert set(results) >= set(expected)
    drift = adamw_drift([OPTIM.lr] * len(norms), norms, decoder_lengths(model, SEQ_LEN, tokens=rows * SEQ_LEN))
    assert_weights_close({k: results[k] for k in expected}, expected, drift, len(norms))


@pytest.fixture(scope="module")
def tp2_ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    return _spawn(tmp_path_factory.mktemp("tp2"), 2, "_tensor_parallel")


def test_tp2_logits_equal_one_process(tp2_ranks):
    ranks = tp2_ranks
    inputs, targets, positions, mask = _sft_batch(3, seed=1)
    assert mask is not None and (positions[:, 1:] < positions[:, :-1]).any()  # packed: positions reset
    for variant, overrides in VARIANTS.items():
        model = _model(**overrides)
        with torch.no_grad():
            expected = {
                "logits": model(inputs),
                "sft_logits": model(inputs, positions=positions, mask=mask),
                "sft_loss_sum": causal_lm_loss(model, inputs, targets, positions=positions, mask=mask)[0],
            }
        forward = decoder_lengths(model, SEQ_LEN)
        lengths = {"logits": forward, "sft_logits": forward, "sft_loss_sum": forward + (3 * SEQ_LEN,)}
        for r, result in enumerate(ranks):
            for key, value in expected.items():
                assert_reorder_close(result[f"{variant}.{key}"], value, lengths[key],
                                     msg=lambda m, r=r, v=variant, k=key: f"rank {r}, {v}, {k}: {m}")


def test_tp2_training_step_equals_one_process(tp2_ranks):
    ranks = tp2_ranks
    model = _model()
    optimizer = build_optimizer(model, OPTIM)
    loss = _reference_backward(model, _sft_batch(3, seed=2))
    grads = {"grad." + n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
    assert norm > 1.0  # so clipping changed the gradients the optimizer saw
    optimizer.step()
    step = decoder_lengths(model, SEQ_LEN, tokens=3 * SEQ_LEN)
    params = sum(p.numel() for p in model.parameters())
    for result in ranks:
        assert_reorder_close(result["step.loss"], loss, decoder_lengths(model, SEQ_LEN) + (3 * SEQ_LEN,))
        assert_reorder_close(result["step.norm"], norm, step + (params,))  # the full norm, not a shard's
        assert_reorder_close(result["step.float_norm"], norm, step + (params,))
        for name, grad in grads.items():
            assert_reorder_close(result[name], grad, step, msg=lambda m, n=name: f"{n}: {m}")
        _assert_weights_match(result, model, [float(norm)], rows=3)


def test_fsdp_times_tp_on_a_2x2_mesh_equals_one_process(tmp_path):
    dp, steps = 2, 2
    ranks = _spawn(tmp_path, 4, "_fsdp_tensor_parallel_steps", dp=dp, steps=steps)
    model = _model()
    optimizer = build_optimizer(model, OPTIM)
    lengths, params = decoder_lengths(model, SEQ_LEN, tokens=2 * dp * SEQ_LEN), sum(p.numel() for p in model.parameters())
    norms = []
    for step in range(steps):
        batch = _sft_batch(2 * dp, seed=10 + step)
        counts = [(batch[1][2 * d:2 * d + 2] != IGNORE_INDEX).sum() for d in range(dp)]
        assert counts[0] != counts[1]  # a per-rank mean would weigh tokens wrongly
        loss = _reference_backward(model, batch)
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
        norms.append(float(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for r, result in enumerate(ranks):  # after `step` steps that differed only in rounding
            assert_reorder_close(result[f"loss{step}"], loss, lengths * step + decoder_lengths(model, SEQ_LEN)
                                 + (2 * dp * SEQ_LEN,), msg=f"rank {r} step {step}")
            assert_reorder_close(result[f"norm{step}"], norm, lengths * (step + 1) + (params,),
                                 msg=f"rank {r} step {step}")
    for result in ranks:
        _assert_weights_match(result, model, norms, rows=2 * dp)


def test_check_tensor_parallel_names_the_setting_and_the_numbers():
    tiny = preset("llama-tiny")  # 4 heads, 2 key/value heads, 128 MLP units
    check_tensor_parallel(tiny, 1)
    check_tensor_parallel(tiny, 2)
    with pytest.raises(TemperError, match=r"parallel.tp=3 does not divide the model's 4 attention heads: "
                                          r"choose a tp that divides 4 \(this model allows tp = 1, 2\)"):
        check_tensor_parallel(tiny, 3)
    with pytest.raises(TemperError, match=r"parallel.tp=4 does not divide the model's 2 key/value heads"):
        check_tensor_parallel(tiny, 4)
    with pytest.raises(TemperError, match=r"parallel.tp=4 does not divide the model's 6 attention heads: "
                                          r"choose a tp that divides 6 \(this model allows tp = 1, 2\)"):
        check_tensor_parallel(preset("llama-3m"), 4)  # 6 heads, 2 key/value heads
    with pytest.raises(TemperError, match=r"parallel.tp=4 does not divide the model's 102 MLP hidden units"):
        check_tensor_parallel(preset("llama-tiny", num_kv_heads=4, intermediate_size=102), 4)
    with pytest.raises(TemperError, match=r"parallel.tp=2: tensor parallelism supports the llama family .* not gpt2"):
        check_tensor_parallel(preset("gpt2-tiny"), 2)
    with pytest.raises(TemperError, match=r"parallel.tp is 0"):
        check_tensor_parallel(tiny, 0)
