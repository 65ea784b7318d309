"""Devices, dtypes and seeds: the few facts about the machine every stage needs."""

from __future__ import annotations

import random

import numpy as np
import torch

from temper.errors import TemperError


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else Apple's MPS, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TemperError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TemperError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
