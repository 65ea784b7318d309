"""Token shards on disk and the deterministic, resumable loader that reads them.

`build_shards` tokenises documents in parallel (the Rust `tokenizers` batch encoder),
appends EOS after each document and packs the ids into flat binary shards (uint16 when
the vocabulary fits, else uint32), with the document ends of each shard beside it, split
into train and validation. `index.json` records a fingerprint of the inputs, so a second
run over the same data and tokenizer reuses the shards.

Memory stays bounded whatever the documents' sizes. The encoder needs ~200 bytes of working
memory per character of its input (a 50 MB one-line document took 7.9 GB), so a document
longer than `MAX_PIECE_CHARS` is encoded in pieces whose ids are concatenated, with EOS
only after the whole document, and one call to the encoder gets at most `BATCH_CHARS`.
A cut is placed after a letter or digit and before whitespace, where byte-level BPE
pre-tokenisers (GPT-2, Llama 3, Qwen2) always split, and is kept only if the text around
it (`CUT_CONTEXT` characters each side) encodes to the same ids whole and cut, so the
result equals encoding the document whole. Where no such cut exists near the target (no
whitespace for 8 KB, or a tokenizer whose normaliser adds a prefix to every input), the
piece is cut anyway and the ids next to that cut may differ from a whole encoding; the
build warns once with the count.

`TokenLoader` cuts each shard into windows of seq_len + 1 tokens, shuffles the windows with
a generator seeded by (seed, epoch), gives rank r every world_size-th window, and can
report and restore its exact position.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from temper.errors import TemperError

INDEX = "index.json"
MAX_PIECE_CHARS = 1 << 17  # a longer document is encoded in pieces of about this many characters
BATCH_CHARS = 1 << 19  # characters per call to the encoder (its memory is ~200 bytes per character)
CUT_SEARCH = 8192  # how far back from a piece's end a cut may be looked for
CUT_CONTEXT = 256  # characters either side of a cut that must encode the same whole and cut
_CUT_TRIES = 8
_ALNUM_THEN_SPACE = re.compile(r"[^\W_](?=\s)")


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

    def add(self, pieces: list[np.ndarray], eos: int) -> None:
        """One document: the ids of its pieces, then EOS."""
        arr = np.concatenate([*pieces, np.asarray([eos], dtype=self.dtype)]).astype(self.dtype, copy=False)
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
    split = LongTextSplitter(tokenizer)

    def pack(docs: Iterable[str], choose_split) -> None:
        batch: list[tuple[str, bool]] = []  # (piece, whether it ends its document)
        chars = 0
        done: list[np.ndarray] = []  # ids of the pieces of the document being encoded

        def encode() -> None:
            nonlocal done
            for (_, last), ids in zip(batch, tokenizer.encode_batch([p for p, _ in batch])):
                done.append(np.asarray(ids, dtype=dtype))
                if last:  # the split is drawn per document, in document order, as before
                    writers[choose_split()].add(done, eos)
                    done = []
            batch.clear()

        for doc in docs:
            if not doc:
                continue
            for piece, last in split(doc):
                batch.append((piece, last))
                chars += len(piece)
                if len(batch) >= batch_docs or chars >= BATCH_CHARS:
                    encode()
                    chars = 0
        if batch:
            encode()

    try:  # a bad row met half-way (or Ctrl-C) leaves no temporary directory behind
        pack(documents, (lambda: "val" if rng.random() < val_fraction else "train") if val_fraction > 0
             else (lambda: "train"))
        if val_documents is not None:
            pack(val_documents, lambda: "val")
        for w in writers.values():
            w.flush()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if split.inexact:
        warnings.warn(f"{split.inexact} cut(s) in very long documents could not be placed where the tokenizer "
                      "splits (no whitespace near, or a normaliser that changes the start of every input): the "
                      "tokens next to those cuts may differ from encoding the documents whole", stacklevel=2)
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


class LongTextSplitter:
    """Cuts a long text into pieces whose encodings, concatenated, are the encoding of the whole.

    `splitter(text)` yields (piece, is_last): the text itself when it has at most `max_chars`
    characters, else pieces of about `max_chars`. `inexact` counts the cuts that could not be
    verified (see the module docstring)."""

    def __init__(self, tokenizer, max_chars: int = 0) -> None:
        self.tokenizer = tokenizer
        self.max_chars = max_chars or MAX_PIECE_CHARS
        self.inexact = 0

    def __call__(self, text: str) -> Iterator[tuple[str, bool]]:
        start = 0
        while len(text) - start > self.max_chars:
            cut = self._cut(text, start, start + self.max_chars)
            yield text[start:cut], False
            start = cut
        yield (text[start:] if start else text), True

    def _cut(self, text: str, start: int, target: int) -> int:
        """The verified cut nearest before `target` (after `start`), else `target` itself."""
        lo = max(start + 1, target - CUT_SEARCH)
        candidates = [m.end() for m in _ALNUM_THEN_SPACE.finditer(text, lo, target)]
        for cut in reversed(candidates[-_CUT_TRIES:]):
            if self._same_ids_when_cut(text, cut):
                return cut
        self.inexact += 1
        return target

    def _same_ids_when_cut(self, text: str, cut: int) -> bool:
        left, right = text[max(0, cut - CUT_CONTEXT):cut], text[cut:cut + CUT_CONTEXT]
        whole, first, second = self.tokenizer.encode_batch([left + right, left, right])
        return list(whole) == [*first, *second]


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
    """Batches (inputs, targets) of shape (batch_size, seq_len) from one split of a shard directory.

    With data-parallel ranks, each rank reads its own part of the same global order: its k-th
    micro-batch is the (k x world_size + rank)-th batch of the epoch's shuffled windows, and an
    epoch ends on a whole optimiser step (`grad_accum` micro-batches on every rank). So one
    step covers the same windows whether it runs as 2 ranks x 1 micro-batch or 1 rank x 2, and
    the position (kept as global batches consumed) carries over to another world size.
    """

    def __init__(self, shard_dir: str | Path, split: str, *, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, shuffle: bool = True,
                 drop_last: bool = True) -> None:
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
        # training drops a last partial step; evaluation (one rank, drop_last=False) keeps a partial batch
        per_step = batch_size * world_size * grad_accum
        self.batches_per_epoch = (self.num_windows // per_step) * grad_accum if drop_last else \
            -(-self.num_windows // (batch_size * world_size))
        if self.batches_per_epoch == 0:
            raise TemperError(
                f"{shard_dir}: the {split} split has {self.num_tokens} tokens, {self.num_windows} windows of "
                f"seq_len {seq_len}; one step needs {batch_size * world_size * grad_accum}: lower seq_len or batch_size"
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
            self._order = order
        return self._order

    def _window(self, w: int) -> np.ndarray:
        shard = int(np.searchsorted(self._offsets, w, side="right") - 1)
        start = (w - int(self._offsets[shard])) * self.seq_len
        return self.shards[shard].tokens[start:start + self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        first = (self.position * self.world_size + self.rank) * self.batch_size
        ids = order[first:first + self.batch_size].tolist()
        self.position += 1
        windows = torch.from_numpy(np.stack([self._window(w) for w in ids]).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the epoch's remaining batches (for evaluation)."""
        while self.position < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
        self.position = convert_position(state, self.world_size, self.batch_size)


def convert_position(state: dict, world_size: int, batch_size: int) -> int:
    """A rank's position (micro-batches read) from a loader state saved with another number of
    ranks or another micro-batch size, in this layout: the rows consumed stay the same."""
    saved_world, saved_batch = int(state.get("world_size", 1)), int(state.get("batch_size", batch_size))
    consumed = int(state["position"]) * saved_world * saved_batch
    if consumed % (world_size * batch_size):
        raise TemperError(f"the checkpoint's data position ({consumed} rows over {saved_world} ranks) does not "
                          f"split into batches of {batch_size} on {world_size} ranks: keep the global batch the same")
    return consumed // (world_size * batch_size)
