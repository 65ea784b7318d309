"""The example loader: one seeded, rank-split, resumable order over a list of examples.

Every recipe that trains on a list of encoded examples (SFT, the DPO family, KTO, reward and
process reward models, encoder objectives) reads them through `ExampleLoader`; what differs is
only the `collate(chunk) -> batch` it is given. The order is a function of (seed, epoch), the
position is two integers, and with data-parallel ranks a rank's k-th micro-batch is the epoch's
(k x world_size + rank)-th batch, an epoch ending on a whole optimiser step (see `TokenLoader`),
so a step covers the same examples on any world size and a saved position converts to another
world size or micro-batch size (`convert_position`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from temper.data.shards import convert_position
from temper.errors import TemperError


class ExampleLoader:
    """Shuffled (seed, epoch) micro-batches of `examples`, each turned into a batch by `collate`.

    `arrange(items) -> items`, when given, runs once per epoch on the shuffled examples before they
    are cut into batches of `batch_size` (SFT's packing: examples -> rows of examples); `collate`
    then receives a chunk of its output.

    `seeded_collate=True`: a collate that draws at random (MLM's masks) is called as
    `collate(chunk, seed)`, with a seed of (seed, epoch, the batch's place in the epoch): the same
    batch gets the same draws after a resume and on any number of ranks, and another one each epoch.
    """

    def __init__(self, examples: Sequence, collate: Callable[[list], Any], *, batch_size: int, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                 arrange: Callable[[list], list] | None = None, seeded_collate: bool = False) -> None:
        if batch_size < 1:
            raise TemperError(f"batch_size must be at least 1, got {batch_size}")
        assert 0 <= rank < world_size, (rank, world_size)
        self.examples, self.collate, self.arrange, self.seeded_collate = examples, collate, arrange, seeded_collate
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.epoch, self.position = 0, 0
        self._batches: list[list] | None = None

    def _epoch_batches(self) -> list[list]:
        """The whole epoch's batches (every rank's), in order."""
        if self._batches is None:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            items: list = [self.examples[i] for i in order]
            if self.arrange is not None:
                items = self.arrange(items)
            self._batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        return self._batches

    @property
    def batches_per_epoch(self) -> int:
        """This rank's micro-batches per epoch (whole steps only when several ranks share it)."""
        total = len(self._epoch_batches())
        if self.world_size == 1:
            return total
        per_step = self.world_size * self.grad_accum
        if total < per_step:
            raise TemperError(f"an epoch holds {total} batches of {self.batch_size}, fewer than one step of "
                              f"{self.world_size} ranks x {self.grad_accum} micro-batches: lower batch_size")
        return (total // per_step) * self.grad_accum

    def _next(self) -> tuple[list, int]:
        """The next micro-batch's items and the batch's index in the epoch's order."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        index = self.position * self.world_size + self.rank
        chunk = self._epoch_batches()[index]
        self.position += 1
        return chunk, index

    def next_chunk(self) -> list:
        """The next micro-batch's items, uncollated (moves the position like `next_batch`)."""
        return self._next()[0]

    def next_batch(self) -> Any:
        chunk, index = self._next()
        if self.seeded_collate:
            return self.collate(chunk, batch_seed(self.seed, self.epoch, index))
        return self.collate(chunk)

    def __iter__(self) -> Iterator[Any]:
        """The rest of this epoch (evaluation reads a whole unshuffled epoch this way)."""
        while self.position < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._batches = int(state["epoch"]), None
        self.position = convert_position(state, self.world_size, self.batch_size)


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the `index`-th batch of an epoch (well mixed: neighbouring batches share nothing)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


__all__ = ["ExampleLoader", "batch_seed", "convert_position"]
