"""The numerics every training recipe shares.

- `precision_context`: fp32 (the right default on CPU), bf16 autocast, fp16 autocast with a
  gradient scaler.
- `accumulate`: micro-batches whose summed loss is normalised by the number of target
  tokens in the *whole* accumulated batch (all micro-batches, all ranks), so gradient
  accumulation gives the same gradient as one big batch even when micro-batches hold
  different numbers of target tokens.
- `optimizer_step`: unscale, clip, step, zero.
- `apply_activation_checkpointing`, `compile_model`: applied from outside the model.
- throughput: FLOPs per token (PaLM's 6N + 12·L·H·Q·T), a measured matmul peak for MFU,
  peak memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from temper.errors import TemperError

# ----------------------------------------------------------------------------- a run's directory


def start_run(cfg: Any, output_dir: str | Path, device_spec: str, precision_spec: str, seed: int):
    """Create the output directory, record the resolved config, seed everything; returns
    (output dir, device, precision)."""
    import yaml

    from temper.config import to_dict
    from temper.runtime import resolve_device, seed_everything

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device_spec)
    precision = resolve_precision(precision_spec, device)
    seed_everything(seed)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out, device, precision


# ----------------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise TemperError(f"precision must be auto, fp32, bf16 or fp16; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise TemperError("precision=fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return precision


def precision_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 has a narrow exponent range: scale the loss so small gradients do not flush to zero."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


# ----------------------------------------------------------------------------- accumulation


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def accumulate(
    micro_batches: list[Any],
    count_targets: Callable[[Any], torch.Tensor],
    loss_sum_fn: Callable[[Any], tuple[torch.Tensor, dict]],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler | None = None,
    weight: float = 1.0,
) -> dict[str, float]:
    """Forward and backward every micro-batch; the loss is sum(token losses) / (all target tokens).

    `loss_sum_fn(batch)` returns (summed loss over the batch's target tokens, extra metrics).
    `weight` scales this objective's gradient when several are mixed in one step (replay).
    """
    device_total = sum(count_targets(b) for b in micro_batches)
    total = all_reduce_sum(torch.as_tensor(device_total, dtype=torch.float64)).item()
    if total == 0:
        raise TemperError("a batch has no target tokens: every label is masked")
    loss_total = 0.0
    extras: dict[str, float] = {}
    for batch in micro_batches:
        with autocast():
            loss_sum, metrics = loss_sum_fn(batch)
        loss = loss_sum * (weight / total)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total += loss_sum.detach().item()
        for k, v in metrics.items():
            extras[k] = extras.get(k, 0.0) + float(v)
    # the mean over every rank's tokens (sum over ranks / global count)
    loss_mean = all_reduce_sum(torch.tensor(loss_total, dtype=torch.float64)).item() / total
    return {"loss": loss_mean, "target_tokens": total, **extras}


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float,
                   scaler: torch.amp.GradScaler | None = None) -> float:
    """Clip the global gradient norm, step and zero the gradients; returns the norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ----------------------------------------------------------------------------- applied from outside


def apply_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass (memory for compute).

    Sets the model's `activation_checkpointing` flag, which its blocks loop honours; nothing
    is wrapped or patched, so parameter names and checkpoints stay unchanged. Returns the
    number of blocks.
    """
    assert hasattr(model, "activation_checkpointing"), f"{type(model).__name__} is not a temper decoder"
    model.activation_checkpointing = True
    return len(model.blocks)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` in place (parameter names stay as they are)."""
    model.compile()
    return model


# ----------------------------------------------------------------------------- throughput


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters in matmuls) + 12 x layers x heads x head_dim x seq_len."""
    c = model.config
    n = model.num_parameters()
    if not c.tie_embeddings:  # an untied input embedding is a lookup, not a matmul
        n -= c.vocab_size * c.hidden_size
    if c.family == "gpt2":  # learned positions: a lookup
        n -= c.max_seq_len * c.hidden_size
    return 6 * n + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5,
                        size: int = 1024, trials: int = 5) -> float:
    """Achievable dense matmul FLOP/s on this device and dtype: the best of `trials` short windows
    (a shared machine's neighbours only ever make a window slower)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
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
    """Peak allocated GPU memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step. On resume, rows after the checkpoint go."""

    def __init__(self, path: str | Path, *, resume_step: int | None = None, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TemperError("logging.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, row.get("step", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
