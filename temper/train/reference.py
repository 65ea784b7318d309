"""The reference model of post-training: the frozen policy that DPO and KTO measure their
log-ratios against, and whose KL GRPO penalises and PPO subtracts from its reward.

    reference = Reference.load("copy", cfg.ref_model or cfg.model, device=device)
    ...
    ref_logps = reference.sequence_logps(batch, policy=model)     # None without a reference
    ref_tokens = reference.run(policy, lambda m: token_logprobs_of(m, batch))   # any no-grad forward

Modes:
- `copy`: a frozen copy loaded from a model directory.
- `adapter`: the policy itself with its LoRA/DoRA/QLoRA adapter disabled (no second copy in
  memory). As PEFT does, modules trained in full (`peft.modules_to_save`) are their original,
  untrained selves while the adapter is off.
- `precomputed`: sequence log-probs computed once before training with a frozen copy, cached
  beside the run (`reference_logps.safetensors`, keyed on the data and on the reference's
  weights, so a changed model at the same path is computed again), and read from each batch
  (`batch.ref_logps`); no reference model while training.
- None: a reference-free loss (SimPO, ORPO).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from temper.data.preference import collate_pairs
from temper.data.tokenizer import Tokenizer, tokenizer_difference
from temper.errors import TemperError
from temper.io import atomic_write_bytes
from temper.losses.logprobs import completion_logprobs
from temper.models import load_model
from temper.models.hf import weight_files
from temper.peft.lora import disable_adapters
from temper.train.distributed import unwrap

MODES = ("copy", "adapter", "precomputed")
CACHE_FILE = "reference_logps.safetensors"


def weights_fingerprint(model_dir: str | Path) -> str:
    """A hash of a model directory's weights (every safetensors file's bytes) and config."""
    digest = hashlib.sha256()
    model_dir = Path(model_dir)
    for path in [model_dir / "config.json", *weight_files(model_dir)]:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:32]


def check_same_tokenizer(model: str | Path, ref_model: str | Path) -> None:
    """A reference model scores the policy's token ids: its tokenizer (vocabulary, merges, special
    tokens) must be the policy's, or one line saying what differs. Skipped where either directory
    has no tokenizer.json (a bare weights directory) to compare."""
    if not ((Path(model) / "tokenizer.json").is_file() and (Path(ref_model) / "tokenizer.json").is_file()):
        return
    difference = tokenizer_difference(Tokenizer.from_dir(ref_model), Tokenizer.from_dir(model),
                                      ("ref_model's", "model's"))
    if difference:
        raise TemperError(f"ref_model={ref_model} has another tokenizer than model={model} ({difference}): the "
                          "reference must score the policy's token ids; give a ref_model trained with the same tokenizer")


class Reference:
    """One of the modes above; `model` is the frozen copy (copy, and precomputed until it is done)."""

    def __init__(self, mode: str | None, model: torch.nn.Module | None = None, path: str | None = None) -> None:
        assert mode is None or mode in MODES, mode
        self.mode, self.model, self.path = mode, model, path

    @classmethod
    def load(cls, mode: str | None, path: str | None, *, device: torch.device) -> Reference:
        """The reference of `mode`; `path` is the model directory a copy is read from."""
        model = None
        if mode in ("copy", "precomputed"):
            model = load_model(path, device=device, dtype=torch.float32).eval()
            model.requires_grad_(False)
        return cls(mode, model, path)

    @property
    def needs_model_forward(self) -> bool:
        """Whether training runs a reference forward (for FLOPs): copy and adapter do."""
        return self.mode in ("copy", "adapter")

    # ------------------------------------------------------------------------- forwards

    def run(self, policy: torch.nn.Module, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """`fn(reference model)` without gradients: the copy, or the policy with its adapter off."""
        assert self.mode in ("copy", "adapter"), f"reference mode {self.mode} has no model to run"
        with torch.no_grad():
            if self.mode == "adapter":
                with disable_adapters(unwrap(policy)):
                    return fn(policy)
            return fn(self.model)

    def sequence_logps(self, batch: Any, *, policy: torch.nn.Module) -> torch.Tensor | None:
        """The reference's log-prob of every sequence of a completion batch (None: no reference)."""
        if self.mode is None:
            return None
        if self.mode == "precomputed":
            assert batch.ref_logps is not None, "precomputed reference log-probs are missing from the batch"
            return batch.ref_logps
        return self.run(policy, lambda model: completion_logprobs(model, batch)[0])

    # ------------------------------------------------------------------------- precomputed

    def precompute(self, pairs: Sequence, out: Path, *, data_fingerprint: str, pad_id: int, autocast,
                   pack_len: int = 0, batch_size: int = 16, agree: Callable | None = None) -> None:
        """Fill each pair's `ref_logps` (chosen, rejected) from the cache in `out`, or compute them with
        the frozen copy and write the cache; then the copy is dropped. `agree` (Parallel.agree) lets
        rank 0 compute and write while the other ranks wait, then every rank reads the file."""
        assert self.mode == "precomputed"
        key = json.dumps({"data": data_fingerprint, "weights": weights_fingerprint(self.path), "pairs": len(pairs)})
        path = Path(out) / CACHE_FILE

        def fill() -> None:
            if not _read_cache(path, key, pairs):
                self._compute(pairs, pad_id=pad_id, autocast=autocast, pack_len=pack_len, batch_size=batch_size)
                table = torch.tensor([list(p.ref_logps) for p in pairs], dtype=torch.float64)
                atomic_write_bytes(path, save({"logps": table}, metadata={"key": key}))

        if agree is not None:
            agree(fill)
        fill()
        device = next(self.model.parameters()).device
        self.model = None  # no reference model while training
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _compute(self, pairs: Sequence, *, pad_id: int, autocast, pack_len: int, batch_size: int) -> None:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for i in range(0, len(pairs), batch_size):
                chunk = pairs[i:i + batch_size]
                batch = collate_pairs(chunk, pad_id, pack_len=pack_len).to(device)
                with autocast():
                    logps = completion_logprobs(self.model, batch)[0]
                B = len(chunk)
                for p, c, r in zip(chunk, logps[:B].tolist(), logps[B:].tolist()):
                    p.ref_logps = (c, r)


def _read_cache(path: Path, key: str, pairs: Sequence) -> bool:
    """Whether the cache at `path` was made for `key`; if so, the pairs get their values from it."""
    if not path.is_file():
        return False
    with contextlib.suppress(Exception):  # a damaged cache is computed again
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return False
            values = f.get_tensor("logps").tolist()
        for p, (c, r) in zip(pairs, values):
            p.ref_logps = (c, r)
        return True
    return False
