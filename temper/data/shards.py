"""Token shards on disk and the deterministic, resumable loader that reads them.

`build_shards` tokenises documents in parallel (the Rust `tokenizers` batch encoder),
appends EOS after each document and packs the ids into flat binary shards (uint16 when
the vocabulary fits, else uint32), with the document ends of each shard beside it, split
into train and validation. `index.json` records a fingerprint of the inputs, so a second
run over the same data and tokenizer reuses the shards.

`TokenLoader` cuts each shard into windows of seq_len + 1 tokens, shuffles the windows with
a generator seeded by (seed, epoch), gives rank r every world_size-th window, and can
report and restore its exact position.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from temper.errors import TemperError

INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.doc_ends: list[int] = []
        self.shards: list[dict[str, Any]] = []
        self.total_tokens = 0
        self.total_docs = 0

    def add(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.buffer.append(arr)
        self.buffered += len(arr)
        self.doc_ends.append(self.buffered)
        self.total_docs += 1
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        name = f"{self.split}_{len(self.shards):05d}"
        np.concatenate(self.buffer).tofile(self.out / f"{name}.bin")
        np.save(self.out / f"{name}.docs.npy", np.asarray(self.doc_ends, dtype=np.int64))
        self.shards.append({"file": f"{name}.bin", "docs": f"{name}.docs.npy", "num_tokens": self.buffered,
                            "num_docs": len(self.doc_ends)})
        self.total_tokens += self.buffered
        self.buffer, self.buffered, self.doc_ends = [], 0, []


def fingerprint(parts: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def files_fingerprint(paths: Iterable[Path]) -> list:
    return [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in paths]


def build_shards(
    documents: Iterable[str],
    tokenizer,
    out_dir: str | Path,
    *,
    val_documents: Iterable[str] | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    shard_tokens: int = 1 << 24,
    batch_docs: int = 512,
    fingerprint_id: str = "",
) -> Path:
    """Tokenise and pack `documents` into `out_dir` (train, and val from `val_documents` or a
    `val_fraction` of the documents). Reuses existing shards with the same `fingerprint_id`."""
    out = Path(out_dir)
    existing = out / INDEX
    if fingerprint_id and existing.is_file():
        try:
            if json.loads(existing.read_text()).get("fingerprint") == fingerprint_id:
                return out
        except json.JSONDecodeError:
            pass
    eos = tokenizer.eos_id
    if eos is None:
        raise TemperError("the tokenizer has no EOS token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writers = {"train": _ShardWriter(tmp, "train", dtype, shard_tokens),
               "val": _ShardWriter(tmp, "val", dtype, shard_tokens)}
    rng = random.Random(seed)

    def pack(docs: Iterable[str], choose_split) -> None:
        batch: list[str] = []
        for doc in docs:
            if not doc:
                continue
            batch.append(doc)
            if len(batch) >= batch_docs:
                _encode_into(batch, tokenizer, eos, writers, choose_split)
                batch = []
        if batch:
            _encode_into(batch, tokenizer, eos, writers, choose_split)

    pack(documents, (lambda: "val" if rng.random() < val_fraction else "train") if val_fraction > 0 else (lambda: "train"))
    if val_documents is not None:
        pack(val_documents, lambda: "val")
    for w in writers.values():
        w.flush()
    if writers["train"].total_tokens == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TemperError("the training data is empty: no document has any text")
    index = {
        "fingerprint": fingerprint_id, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": eos,
        "splits": {name: {"num_tokens": w.total_tokens, "num_docs": w.total_docs, "shards": w.shards}
                   for name, w in writers.items()},
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def _encode_into(batch: list[str], tokenizer, eos: int, writers: dict[str, _ShardWriter], choose_split) -> None:
    for ids in tokenizer.encode_batch(batch):
        writers[choose_split()].add([*ids, eos])


def read_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX
    if not path.is_file():
        raise TemperError(f"{shard_dir}: no {INDEX}; not a token shard directory")
    return json.loads(path.read_text())


@dataclass
class _Shard:
    tokens: np.ndarray  # memory-mapped
    num_windows: int


class TokenLoader:
    """Batches (inputs, targets) of shape (batch_size, seq_len) from one split of a shard directory."""

    def __init__(self, shard_dir: str | Path, split: str, *, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = True) -> None:
        index = read_index(shard_dir)
        info = index["splits"].get(split)
        if info is None or info["num_tokens"] == 0:
            raise TemperError(f"{shard_dir}: the {split} split is empty")
        dtype = np.dtype(index["dtype"])
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.shards = []
        for s in info["shards"]:
            tokens = np.memmap(Path(shard_dir) / s["file"], dtype=dtype, mode="r")
            self.shards.append(_Shard(tokens, max(0, (len(tokens) - 1) // seq_len)))
        self.num_tokens = info["num_tokens"]
        self._offsets = np.cumsum([0] + [s.num_windows for s in self.shards])
        self.num_windows = int(self._offsets[-1])
        per_rank = self.num_windows // world_size
        # training drops a last partial batch; evaluation (drop_last=False) keeps it
        self.batches_per_epoch = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        if self.batches_per_epoch == 0:
            raise TemperError(
                f"{shard_dir}: the {split} split has {self.num_tokens} tokens, {self.num_windows} windows of "
                f"seq_len {seq_len}; one batch needs {batch_size * world_size}: lower seq_len or batch_size"
            )
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                order = torch.randperm(self.num_windows, generator=g)
            else:
                order = torch.arange(self.num_windows)
            per_rank = self.num_windows // self.world_size
            self._order = order[self.rank::self.world_size][:per_rank]
        return self._order

    def _window(self, w: int) -> np.ndarray:
        shard = int(np.searchsorted(self._offsets, w, side="right") - 1)
        start = (w - int(self._offsets[shard])) * self.seq_len
        return self.shards[shard].tokens[start:start + self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        ids = order[self.position * self.batch_size:(self.position + 1) * self.batch_size].tolist()
        self.position += 1
        windows = torch.from_numpy(np.stack([self._window(w) for w in ids]).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the epoch's remaining batches (for evaluation)."""
        while self.position < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
