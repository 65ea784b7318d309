"""ExampleLoader: one order, rank split and resumable position whatever the collate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from temper.data.loader import ExampleLoader
from temper.data.preference import EncodedPair, PreferenceLoader
from temper.data.sft import Example, SFTLoader
from temper.data.stepwise import EncodedSolution, StepwiseLoader
from temper.errors import TemperError


def ids(chunk) -> list[int]:
    return [int(x) for x in chunk]


def as_tensor(chunk) -> torch.Tensor:
    return torch.tensor(chunk).view(-1, 1) * 10  # another batch type, and values changed


def read(loader, n) -> list[list[int]]:
    out = []
    for _ in range(n):
        batch = loader.next_batch()
        out.append(ids(batch) if isinstance(batch, list) else [int(v) // 10 for v in batch.view(-1)])
    return out


def test_collate_does_not_change_order_rank_split_or_resume():
    items = list(range(26))
    plain = ExampleLoader(items, ids, batch_size=4, seed=7)
    tensors = ExampleLoader(items, as_tensor, batch_size=4, seed=7)
    whole = read(plain, 9)  # 7 batches (the last of 2), then into epoch 1
    assert whole == read(tensors, 9)
    assert sorted(sum(whole[:7], [])) == items and plain.epoch == 1  # every example once per epoch
    assert whole[:7] != [items[i:i + 4] for i in range(0, 26, 4)]  # shuffled
    assert read(ExampleLoader(items, ids, batch_size=4, seed=8), 7) != whole[:7]  # the seed matters

    # two ranks x 1 micro-batch per step: rank r's k-th batch is the epoch's (2k + r)-th, and
    # the epoch ends on a whole step (7 batches -> 3 steps of 2)
    ranks = [ExampleLoader(items, f, batch_size=4, seed=7, rank=r, world_size=2) for r, f in ((0, ids), (1, as_tensor))]
    assert ranks[0].batches_per_epoch == 3
    got = [b for k in range(3) for b in (read(ranks[0], 1)[0], read(ranks[1], 1)[0])]
    assert got == whole[:6]
    assert read(ranks[0], 1)[0] == whole[7]  # epoch 1 starts; batch 6 is left out on 2 ranks

    # resume mid-epoch with another collate, and across world sizes (rows consumed kept)
    first = ExampleLoader(items, ids, batch_size=4, seed=7)
    read(first, 3)
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 3, "world_size": 1, "batch_size": 4}  # the checkpointed format
    resumed = ExampleLoader(items, as_tensor, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert read(resumed, 6) == whole[3:9]
    two = ExampleLoader(items, ids, batch_size=4, seed=7, rank=1, world_size=2)
    two.load_state_dict({"epoch": 0, "position": 4})  # an old single-rank state without world/batch
    assert read(two, 1) == [whole[5]]
    with pytest.raises(TemperError, match="keep the global batch"):
        ExampleLoader(items, ids, batch_size=4, seed=7, world_size=2).load_state_dict(state)  # 12 rows / 8


def test_the_named_loaders_are_the_example_loader_with_their_collate():
    n = 16
    sft = SFTLoader([Example([i, i], [i, i]) for i in range(n)], batch_size=3, seq_len=8, pad_id=0, seed=5,
                    packing=False)
    pairs = [EncodedPair([1], [i], [i], f"x:{i}") for i in range(n)]
    pref = PreferenceLoader(pairs, batch_size=3, pad_id=0, seed=5, sequences=True)
    steps = StepwiseLoader([EncodedSolution([i, 1], [1], [True], f"s:{i}") for i in range(n)], batch_size=3, pad_id=0, seed=5)
    reference = read(ExampleLoader(list(range(n)), ids, batch_size=3, seed=5), 8)
    assert [sft.next_batch().inputs[:, 0].tolist() for _ in range(8)] == reference
    assert [(b := pref.next_batch()).input_ids[:b.num_pairs, 1].tolist() for _ in range(8)] == reference
    assert [steps.next_batch().input_ids[:, 0].tolist() for _ in range(8)] == reference
    for loader in (sft, pref, steps):
        assert isinstance(loader, ExampleLoader) and "next_batch" not in type(loader).__dict__


def test_packing_arranges_each_epoch_before_batching():
    examples = [Example([i] * (1 + i % 3), [i] * (1 + i % 3)) for i in range(12)]
    packed = SFTLoader(examples, batch_size=2, seq_len=4, pad_id=0, seed=3, packing=True)
    order = ExampleLoader(list(range(12)), ids, batch_size=12, seed=3).next_batch()
    batch = packed.next_batch()
    assert batch.inputs.shape == (2, 4) and batch.segments is not None
    first_rows = [[v for v, s in zip(row.tolist(), seg.tolist()) if s >= 0] for row, seg in
                  zip(batch.inputs, batch.segments)]
    flat = [v for row in first_rows for v in row]
    expected = [v for i in order for v in examples[i].inputs][:len(flat)]
    assert flat == expected  # the shuffled examples, packed greedily in that order


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 40), batch_size=st.integers(1, 5), world=st.sampled_from([1, 2, 4]),
       accum=st.integers(1, 2), seed=st.integers(0, 5), stop=st.integers(0, 12))
def test_ranks_together_read_the_single_process_order(n, batch_size, world, accum, seed, stop):
    items = list(range(n))
    total = -(-n // batch_size)
    if total < world * accum:
        return
    single = read(ExampleLoader(items, ids, batch_size=batch_size, seed=seed), total)
    ranks = [ExampleLoader(items, ids, batch_size=batch_size, seed=seed, rank=r, world_size=world, grad_accum=accum)
             for r in range(world)]
    per_rank = ranks[0].batches_per_epoch
    if world == 1:  # one process reads every batch (its last step may be short)
        assert per_rank == total
    else:  # whole steps of world x accum batches, the rest left out
        assert per_rank % accum == 0 and per_rank * world <= total < (per_rank + accum) * world
    got = [read(ranks[r], 1)[0] for k in range(per_rank) for r in range(world)]
    assert got == single[:per_rank * world]
    # stop anywhere, save, resume every rank from its state: the rest of the epoch is the same
    k = stop % (per_rank + 1)
    again = [ExampleLoader(items, ids, batch_size=batch_size, seed=seed, rank=r, world_size=world, grad_accum=accum)
             for r in range(world)]
    for loader in again:
        read(loader, k)
    resumed = [ExampleLoader(items, ids, batch_size=batch_size, seed=seed, rank=r, world_size=world, grad_accum=accum)
               for r in range(world)]
    for loader, old in zip(resumed, again):
        loader.load_state_dict(old.state_dict())
    assert [read(resumed[r], 1)[0] for _ in range(k, per_rank) for r in range(world)] == got[k * world:]


def test_a_seeded_collate_draws_by_the_batchs_place_not_by_the_process():
    def seeds(chunk, seed):
        return seed

    items = list(range(16))
    one = ExampleLoader(items, seeds, batch_size=2, seed=1, seeded_collate=True)
    drawn = [one.next_batch() for _ in range(12)]  # 8 batches an epoch, into epoch 1
    assert len(set(drawn)) == 12  # every batch of every epoch its own seed
    assert ExampleLoader(items, seeds, batch_size=2, seed=1, seeded_collate=True).next_batch() == drawn[0]
    assert ExampleLoader(items, seeds, batch_size=2, seed=2, seeded_collate=True).next_batch() != drawn[0]
    ranks = [ExampleLoader(items, seeds, batch_size=2, seed=1, seeded_collate=True, rank=r, world_size=2)
             for r in (0, 1)]
    assert [ranks[r].next_batch() for _ in range(4) for r in (0, 1)] == drawn[:8]
    resumed = ExampleLoader(items, seeds, batch_size=2, seed=1, seeded_collate=True)
    resumed.load_state_dict(ranks[0].state_dict())  # 2 ranks x 4 batches of 2: the whole epoch 0 read
    assert [resumed.next_batch() for _ in range(4)] == drawn[8:12]
