"""The drift monitor: how much a fine-tuned model forgets general text while it learns a task.

Every post-training recipe logs `general_ppl`, the perplexity of held-out general text (by
default the validation split of the pretraining shards recorded in the model's lineage), at
each evaluation, so forgetting shows as it happens and `summary.json` holds it before and
after. SFT's replay objective reads the training split of the same shards.

    drift = DriftMonitor.prepare(cfg.general_data, lineage, tokenizer, out, seed=cfg.seed, seq_len=cfg.seq_len,
                                 max_batches=cfg.eval_batches, agree=par.agree)
    if drift is not None:
        result["general_ppl"] = drift.perplexity(model, device=device, autocast=autocast)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from temper.data.readers import expand_paths, iter_texts
from temper.data.shards import TokenLoader, build_shards, files_fingerprint, fingerprint, read_index
from temper.errors import TemperError
from temper.eval.perplexity import evaluate_batches

WINDOW = 256  # tokens per scored window (at most the recipe's seq_len)
BATCH_SIZE = 8  # windows per batch


def general_text(general_data: list[str], lineage: dict, tokenizer, out: Path, *, seed: int = 0) -> Path | None:
    """Token shards of general text: the given files (sharded into `out/general`, cached) or the
    pretraining shards the model's lineage records; None (with a note) when there are neither."""
    if general_data:
        key = fingerprint([files_fingerprint(expand_paths(general_data)), tokenizer.backend.to_str()])
        return build_shards(iter_texts(general_data), tokenizer, Path(out) / "general", val_fraction=0.1,
                            seed=seed, fingerprint_id=key)
    shards = lineage.get("pretrain_shards")
    if shards and (Path(shards) / "index.json").is_file():
        return Path(shards)
    print("note: no general text for the forgetting perplexity (general_data=... to add one)", file=sys.stderr)
    return None


def split_tokens(shards: Path, split: str) -> int:
    return int((read_index(shards)["splits"].get(split) or {}).get("num_tokens", 0))


class DriftMonitor:
    """The perplexity of general text's validation split, in windows of min(seq_len, 256) tokens, or of
    the whole split where it is shorter: the monitor sizes itself to the text there is (a small
    pretraining run's validation split holds a few hundred tokens), so it never asks for more."""

    def __init__(self, shards: Path, *, seq_len: int, max_batches: int) -> None:
        self.shards, self.seq_len, self.max_batches = Path(shards), seq_len, max_batches
        self.window = max(1, min(seq_len, WINDOW, split_tokens(self.shards, "val") - 1))

    @classmethod
    def prepare(cls, general_data: list[str], lineage: dict, tokenizer, out: Path, *, seed: int, seq_len: int,
                max_batches: int, agree: Callable | None = None) -> DriftMonitor | None:
        """The monitor of a run, or None without general text (or with a validation split of fewer than
        two tokens: a note says so). With `agree` (Parallel.agree) rank 0 shards given files first
        (cached), then every rank reads them."""
        if agree is not None:
            agree(lambda: general_text(general_data, lineage, tokenizer, out, seed=seed) and None)
        shards = general_text(general_data, lineage, tokenizer, out, seed=seed)
        if shards is None:
            return None
        tokens = split_tokens(Path(shards), "val")
        if tokens < 2:
            where = f"general_data={','.join(map(str, general_data))}" if general_data else f"the pretraining shards {shards}"
            print(f"note: {where}: the validation split holds {tokens} tokens, no forgetting perplexity "
                  "(general_data=... to give more text)", file=sys.stderr)
            return None
        return cls(shards, seq_len=seq_len, max_batches=max_batches)

    def perplexity(self, model, *, device, autocast=None) -> float:
        val = TokenLoader(self.shards, "val", seq_len=self.window, batch_size=BATCH_SIZE, shuffle=False,
                          drop_last=False)
        return evaluate_batches(model, val, device=device, autocast=autocast, max_batches=self.max_batches)["val_ppl"]

    def replay_loader(self, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> TokenLoader:
        """Training windows of the same text, for a replay objective (SFT's replay_weight): min(seq_len, 256)
        tokens each, shorter where the split holds fewer than one batch of such windows."""
        tokens, per_step = split_tokens(self.shards, "train"), batch_size * world_size
        window = min(self.seq_len, WINDOW, (tokens - 1) // per_step)
        if window < 1:
            raise TemperError(f"{self.shards}: the general text's training split holds {tokens} tokens, fewer than "
                              f"the {per_step + 1} one replay batch of replay_batch_size={batch_size} needs: give more "
                              "general_data, or lower replay_batch_size")
        return TokenLoader(self.shards, "train", seq_len=window, batch_size=batch_size, seed=seed, rank=rank,
                           world_size=world_size)
