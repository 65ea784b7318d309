"""The numerics every training recipe shares.

- `choose_precision` / `precision_context`: fp32, bf16 autocast, fp16 autocast with a gradient
  scaler; `auto` is bf16 on a GPU, and on a CPU whichever its matmuls are measured faster in.
- `accumulate`: micro-batches whose summed loss is normalised by the number of target
  tokens in the *whole* accumulated batch (all micro-batches, all ranks), so gradient
  accumulation gives the same gradient as one big batch even when micro-batches hold
  different numbers of target tokens.
- `optimizer_step`: unscale, clip, step, zero; in two halves (`clip_gradients`, then
  `apply_update` or `skip_update`) for a caller that looks at the norm before the update.
- `nonfinite_parameters`: which trained weights hold a NaN or an Inf (one read-back).
Both take the trained model as one module or as several named ones (`{"policy": policy,
"value": value}`, one optimiser over all): the gradient normalisation, the set-aside of
earlier gradients, DDP's no_sync and the clipping (one global norm over every module's
parameters) cover them all, a parameter shared by two modules counted once.
- `apply_activation_checkpointing`, `compile_model`: applied from outside the model.
- throughput: FLOPs per token (PaLM's 6N + 12·L·H·Q·T), a measured matmul peak for MFU,
  peak memory.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from temper.errors import TemperError
from temper.models import registry

# ----------------------------------------------------------------------------- precision


# auto picks bf16 on a CPU only where its bf16 matmuls beat fp32 by this much: AVX2 CPUs emulate
# bf16 (about 4x SLOWER than fp32), CPUs with AVX512_BF16 or AMX-BF16 run it 3-5x faster
CPU_BF16_MIN_SPEEDUP = 1.5
AUTO_PRECISION_ENV = "TEMPER_AUTO_PRECISION"  # fp32 or bf16: what `auto` means on a CPU, unmeasured


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses (`auto` resolved: see `choose_precision`)."""
    return choose_precision(precision, device)[0]


def choose_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(precision, why). `auto`: bf16 on a GPU that has it; on a CPU, bf16 autocast (fp32 master
    weights) where a measured bf16 matmul is at least CPU_BF16_MIN_SPEEDUP x faster than fp32,
    else fp32; the environment variable TEMPER_AUTO_PRECISION=fp32|bf16 skips the measurement
    (the test suite pins fp32 with it, so its results do not depend on the CPU)."""
    if precision == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return "bf16", "the GPU supports bf16"
            return "fp32", "the GPU has no bf16"
        if device.type != "cpu":
            return "fp32", f"auto is fp32 on {device.type}"
        forced = os.environ.get(AUTO_PRECISION_ENV, "")
        if forced:
            if forced not in ("fp32", "bf16"):
                raise TemperError(f"{AUTO_PRECISION_ENV}={forced!r}: expected fp32 or bf16 (or unset, to measure)")
            return forced, f"{AUTO_PRECISION_ENV}={forced}"
        speedup = cpu_bf16_speedup()
        if speedup >= CPU_BF16_MIN_SPEEDUP:
            return "bf16", (f"bf16 autocast: this CPU's bf16 matmuls measured {speedup:.1f}x as fast as fp32 "
                            f"(precision=fp32 to keep fp32)")
        return "fp32", (f"fp32: this CPU's bf16 matmuls measured {speedup:.2f}x fp32's speed "
                        f"(bf16 needs >= {CPU_BF16_MIN_SPEEDUP}x)")
    if precision not in ("fp32", "bf16", "fp16"):
        raise TemperError(f"precision must be auto, fp32, bf16 or fp16; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise TemperError("precision=fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return precision, "asked for"


@functools.cache
def cpu_bf16_speedup() -> float:
    """bf16 matmul FLOP/s over fp32's on this CPU, measured once per process (about 0.3 s) on a
    512x512 matmul, the size class of the small models' projections."""
    cpu = torch.device("cpu")
    fp32 = measure_matmul_peak(cpu, torch.float32, seconds=0.12, size=512, trials=3)
    bf16 = measure_matmul_peak(cpu, torch.bfloat16, seconds=0.12, size=512, trials=3)
    return bf16 / fp32


def precision_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 has a narrow exponent range: scale the loss so small gradients do not flush to zero."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


# ----------------------------------------------------------------------------- the trained modules

Modules = torch.nn.Module | dict[str, torch.nn.Module]


def module_list(model: Modules) -> list[torch.nn.Module]:
    """The trained modules of a run: one module, or the values of a dict of named ones."""
    if isinstance(model, torch.nn.Module):
        return [model]
    assert isinstance(model, dict) and model, "the trained model is a module or a non-empty dict of named modules"
    return list(model.values())


def trained_parameters(model: Modules) -> list[torch.nn.Parameter]:
    """Every parameter that trains, over all modules, each once (a shared one, e.g. a trunk two
    heads use, is the first module's)."""
    seen: set[int] = set()
    params = []
    for module in module_list(model):
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


# ----------------------------------------------------------------------------- accumulation


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


@contextlib.contextmanager
def _gradient_sync(par, modules, *, last: bool):
    """Every module's `par.no_sync` for one micro-batch: gradients reduced on the last only."""
    with contextlib.ExitStack() as sync:
        for module in modules if par is not None else ():
            sync.enter_context(par.no_sync(module, last=last))
        yield


def accumulate(
    model: Modules,
    micro_batches: list[Any],
    loss_fn: Callable[[Any], tuple],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler | None = None,
    weight: float = 1.0,
    par: Any = None,
) -> dict[str, float]:
    """Forward and backward every micro-batch; the gradient is that of
    weight * sum(unit losses) / (number of units in the whole accumulated batch, on every rank).

    `loss_fn(batch)` returns `(loss_sum, count)` or `(loss_sum, count, metrics)`: the summed loss
    over the batch's units and how many units it summed, in whatever unit the loss counts
    (target tokens for language modelling, pairs for DPO, sequences for a reward model).
    Each micro-batch is backpropagated unnormalised, and the gradients are divided by the
    global count once it is known, so micro-batches of different sizes weigh exactly as in
    one big batch. Gradients already present (another objective of the same step, e.g.
    replay) are set aside and added back, so each objective is normalised by its own count.
    Metrics are summed over micro-batches.

    With `par` (a `temper.train.distributed.Parallel`), the count is summed over the
    data-parallel ranks, every micro-batch but the last runs without gradient reduction (in
    every module, each wrapped on its own), and
    since DDP and FSDP average the reduced gradients over those ranks, the division is by
    count / dp: the gradient is exactly that of one process on the whole global batch.
    """
    params = trained_parameters(model)
    modules = module_list(model)
    earlier = {p: p.grad for p in params if p.grad is not None}
    for p in earlier:
        p.grad = None
    assert micro_batches, "accumulate needs at least one micro-batch"
    totals = None  # (summed loss, count), kept on the loss's device: read back once, not per micro-batch
    extras: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        with _gradient_sync(par, modules, last=i == len(micro_batches) - 1):
            with autocast():
                loss_sum, count, *rest = loss_fn(batch)
            (scaler.scale(loss_sum) if scaler is not None else loss_sum).backward()
        pair = torch.stack([loss_sum.detach().double(),
                            torch.as_tensor(count, dtype=torch.float64, device=loss_sum.device)])
        totals = pair if totals is None else totals + pair
        for k, v in (rest[0] if rest else {}).items():
            extras[k] = extras.get(k, 0.0) + float(v)
    names = sorted(extras)  # the recipe's own metrics are summed over the data-parallel ranks too
    totals = torch.cat([totals, torch.tensor([extras[k] for k in names], dtype=torch.float64, device=totals.device)])
    total = (par.all_reduce_sum(totals) if par is not None else all_reduce_sum(totals)).tolist()
    extras = dict(zip(names, total[2:]))
    if total[1] == 0:
        raise TemperError("a batch has nothing to learn from: every target is masked")
    averaged_over = par.dp if par is not None and par.distributed else 1  # DDP and FSDP average
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, weight * averaged_over / total[1])
    for p, g in earlier.items():
        p.grad = g if p.grad is None else p.grad.add_(g)
    return {"loss": total[0] / total[1], "count": total[1], **extras}


def accumulate_shared(
    model: Modules,
    micro_batches: list[Any],
    loss_fn: Callable[[Any], tuple[dict[str, torch.Tensor], dict]],
    *,
    units: Callable[[Any], dict[str, int]],
    weights: dict[str, float],
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler | None = None,
    par: Any = None,
) -> dict[str, float]:
    """Several objectives read off ONE forward per micro-batch (BERT's MLM and NSP logits come
    out of the same pass): the gradient is that of

        sum_k weights[k] * sum(unit losses of k) / (k's units in the whole accumulated batch, on every rank),

    the same as one `accumulate` call per objective (each over its own unit), at the cost of one
    forward and one backward per micro-batch instead of one per objective.

    `units(batch)` gives each objective's unit count ({name: int}) from the batch alone, before any
    forward: the counts of the whole step are summed over micro-batches and all-reduced over the
    data-parallel ranks first, so each micro-batch's loss is divided by them before its backward.
    `loss_fn(batch)` returns ({name: summed loss}, metrics). Returns each objective's mean loss
    under its name and its count under `name + "_count"`, `loss` = the weighted sum of the means,
    and the metrics summed over micro-batches and ranks."""
    params = trained_parameters(model)
    modules = module_list(model)
    assert micro_batches, "accumulate_shared needs at least one micro-batch"
    names = sorted(weights)
    device = par.device if par is not None else params[0].device
    local = [units(batch) for batch in micro_batches]
    assert all(set(u) == set(names) for u in local), (names, local)
    counts = torch.tensor([sum(u[k] for u in local) for k in names], dtype=torch.float64, device=device)
    counts = (par.all_reduce_sum(counts) if par is not None else all_reduce_sum(counts)).tolist()
    if any(c == 0 for c in counts):
        empty = [k for k, c in zip(names, counts) if c == 0]
        raise TemperError(f"a batch has nothing to learn from: no unit of {', '.join(empty)} in the whole step")
    averaged_over = par.dp if par is not None and par.distributed else 1  # DDP and FSDP average
    scale = {k: weights[k] * averaged_over / c for k, c in zip(names, counts)}
    sums = None
    extras: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        with _gradient_sync(par, modules, last=i == len(micro_batches) - 1):
            with autocast():
                losses, metrics = loss_fn(batch)
            assert set(losses) == set(names), (sorted(losses), names)
            loss = sum(losses[k] * scale[k] for k in names)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        stacked = torch.stack([losses[k].detach().double() for k in names])
        sums = stacked if sums is None else sums + stacked
        for k, v in metrics.items():
            extras[k] = extras.get(k, 0.0) + float(v)
    extra_names = sorted(extras)
    sums = torch.cat([sums, torch.tensor([extras[k] for k in extra_names], dtype=torch.float64, device=sums.device)])
    total = (par.all_reduce_sum(sums) if par is not None else all_reduce_sum(sums)).tolist()
    result: dict[str, float] = dict(zip(extra_names, total[len(names):]))
    for k, loss_sum, count in zip(names, total, counts):
        result[k] = loss_sum / count
        result[k + "_count"] = count
    result["loss"] = sum(weights[k] * result[k] for k in names)
    return result


def optimizer_step(model: Modules, optimizer: torch.optim.Optimizer, *, grad_clip: float,
                   scaler: torch.amp.GradScaler | None = None) -> float:
    """Clip the global gradient norm (over every trained module's parameters together), step and
    zero the gradients; returns the norm before clipping."""
    norm = clip_gradients(model, optimizer, grad_clip=grad_clip, scaler=scaler)
    apply_update(optimizer, scaler=scaler)
    return float(norm)


def clip_gradients(model: Modules, optimizer: torch.optim.Optimizer, *, grad_clip: float,
                   scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Unscale (fp16) and clip the global gradient norm, over every trained module's parameters
    together; returns the norm before clipping, a tensor (NaN or Inf when a gradient is).
    `apply_update` (or `skip_update`) follows."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    # per module (one may hold sharded DTensor gradients, another plain ones), then the norm of the norms
    seen: set[int] = set()
    groups = []
    for module in module_list(model):
        params = [p for p in module.parameters() if p.grad is not None and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append(params)
    norms = []
    for params in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # sharded (FSDP) or split (TP) gradients: the norm of the whole
            norm = norm.full_tensor()
        norms.append(norm)
    if not norms:
        norm = torch.tensor(0.0)
    elif len(norms) == 1:
        norm = norms[0]
    else:
        norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    if grad_clip > 0:
        for params in groups:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm.to(params[0].grad.device), foreach=True)
    return norm


def apply_update(optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None = None) -> None:
    """Step (through the fp16 scaler, which itself skips a step whose gradients overflowed) and zero."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def skip_update(optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None = None) -> None:
    """Drop this step's gradients without touching the weights or the optimiser's moments; the
    fp16 scaler, whose `unscale_` ran, backs its scale off as for an overflow."""
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def nonfinite_parameters(model: Modules) -> list[str]:
    """The names of this process's trained parameters that hold a NaN or an Inf (a sharded
    parameter: its local shard). One read-back for all of them, no temporary the size of a
    weight: the largest magnitude of each (NaN propagates through it, a finite value never
    overflows it)."""
    named: dict[int, tuple[str, torch.Tensor]] = {}
    for module in module_list(model):
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in named:
                local = p.to_local() if hasattr(p, "to_local") else p
                if local.numel():
                    named[id(p)] = (name.removeprefix("module."), local.detach())
    if not named:
        return []
    by_device: dict[torch.device, list[int]] = {}
    tensors = [t for _, t in named.values()]
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    largest = [0.0] * len(tensors)
    for indices in by_device.values():  # _foreach_norm takes one device's tensors
        norms = torch._foreach_norm([tensors[i] for i in indices], ord=float("inf"))
        for i, value in zip(indices, torch.stack([n.float() for n in norms]).tolist()):
            largest[i] = value
    names = [name for name, _ in named.values()]
    return [names[i] for i, value in enumerate(largest) if not math.isfinite(value)]


# ----------------------------------------------------------------------------- applied from outside


def apply_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass (memory for compute).

    Sets the model's `activation_checkpointing` flag, which its blocks loop honours (every
    family's model has the flag and its `blocks`, decoder or encoder); nothing is wrapped or
    patched, so parameter names and checkpoints stay unchanged. Returns the number of blocks.
    """
    assert hasattr(model, "activation_checkpointing"), f"{type(model).__name__} is not a temper model"
    model.activation_checkpointing = True
    return len(model.blocks)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` in place (parameter names stay as they are)."""
    model.compile()
    return model


# ----------------------------------------------------------------------------- throughput


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's count (Chowdhery et al. 2022, appendix B):
    6 x (weights of the matrix multiplies) + the attention term of the model's family
    (`Family.attention_flops`: 12 x layers x heads x head_dim x seq_len for every family so far).

    The matmul weights are every linear layer's, each once (a tied output layer once; a 4-bit
    linear by its shape); embedding and learned-position lookups, norms and biases are not
    matmuls. A wrapper of linear layers (a LoRA layer around its base) is not a matmul of its
    own: its base counts once, and its LoRA A and B matrices count as the two small matmuls
    they are. Frozen weights count 6 like trained ones (PaLM's convention: MFU compares runs
    by model size, though a frozen weight's backward skips its weight gradient). The second
    term is attention's two (T x T) products, forward and backward, not halved for a causal
    mask (as PaLM and nanoGPT count), so a bidirectional encoder's count is the same.
    """
    seen: set[int] = set()
    matmul_weights = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                matmul_weights += module.weight.numel()
        elif hasattr(module, "in_features") and hasattr(module, "out_features") and not any(
                hasattr(inner, "in_features") for inner in module.modules() if inner is not module):
            matmul_weights += module.in_features * module.out_features  # quantised: weights are buffers
    c = model.config
    return 6 * matmul_weights + registry.family(c.family).attention_flops(c, seq_len)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5,
                        size: int = 1024, trials: int = 5) -> float:
    """Achievable dense matmul FLOP/s on this device and dtype: the best of `trials` short windows
    (a shared machine's neighbours only ever make a window slower). The matrices come from a
    generator of its own: measuring never moves the global random state (a run may re-measure
    mid-training, see `TrainLoop`)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        _sync(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / trials:
            a @ b
            count += 1
        _sync(device)
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set size: on Linux its
    own high-water mark (VmHWM), not getrusage's ru_maxrss, which a process started by fork and
    exec inherits from its parent's size at the fork (a small run launched by a big process would
    report the parent's memory)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
