"""AdamW with decay / no-decay groups, and learning-rate schedules as pure functions of the step.

`build_optimizer(model, cfg)` takes the trained model as one module or as a dict of named
modules (`{"policy": policy, "value": value_head}`): one optimiser over all of them, with the
same two groups (matrices decay, vectors do not), each parameter once.
"""

from __future__ import annotations

import math

import torch

from temper.config import OptimConfig, ScheduleConfig
from temper.errors import TemperError
from temper.train.engine import trained_parameters


def parameter_groups(model: torch.nn.Module | dict[str, torch.nn.Module], weight_decay: float) -> list[dict]:
    """Matrices (dim >= 2) decay; biases, norms and other vectors do not (tied weights once, a
    parameter two modules share once)."""
    decay, no_decay = [], []
    for p in trained_parameters(model):
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module | dict[str, torch.nn.Module], cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if not groups:
        raise TemperError("the model has no trainable parameters")
    if len(cfg.betas) != 2:
        raise TemperError(f"optim.betas needs two numbers, got {cfg.betas}")
    device = next(p for g in groups for p in g["params"]).device
    kwargs: dict = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.fused:
        # fused kernels exist on CUDA (and CPU in recent torch); foreach is the next best
        kwargs["fused" if device.type in ("cuda", "cpu") else "foreach"] = True
    try:
        return torch.optim.AdamW(groups, **kwargs)
    except (RuntimeError, TypeError):  # an older torch without the fused CPU kernel
        kwargs.pop("fused", None)
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def warmup_steps(cfg: ScheduleConfig, max_steps: int) -> int:
    if cfg.warmup_steps >= 0:
        return cfg.warmup_steps
    return int(round(cfg.warmup_ratio * max_steps))


def lr_at(step: int, peak_lr: float, cfg: ScheduleConfig, max_steps: int) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warmup, then the decay shape.

    cosine: min + (peak - min) * (1 + cos(pi * progress)) / 2;  linear: straight to min;
    constant: peak. min = min_lr_ratio * peak.
    """
    warm = warmup_steps(cfg, max_steps)
    if step < warm:
        return peak_lr * (step + 1) / warm
    if cfg.name == "constant":
        return peak_lr
    floor = cfg.min_lr_ratio * peak_lr
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    if cfg.name == "linear":
        return peak_lr - (peak_lr - floor) * progress
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
