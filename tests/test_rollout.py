"""The rollout source (temper/train/rollout.py): a generation batch every
steps_per_generation x num_iterations steps, served in slices, resumable mid-buffer."""

import pytest
import torch

from temper.errors import TemperError
from temper.train.rollout import RolloutSource


def make(shuffle, calls, steps=3, iterations=2, rows=6, made_before=0):
    def generate():  # rows 100.., then 200.., ...: which generation batch a row came from
        calls.append(None)
        base = 100 * (made_before + len(calls))
        return {"row": torch.arange(base, base + rows), "text": [f"t{base + i}" for i in range(rows)]}

    return RolloutSource(generate, steps_per_generation=steps, num_iterations=iterations, shuffle=shuffle, seed=0)


def served(source, n):
    return [source.next()["row"].tolist() for _ in range(n)]


@pytest.mark.parametrize("shuffle", ["none", "generation", "pass"])
def test_each_pass_serves_every_row_once_and_generation_waits_for_the_buffer(shuffle):
    calls = []
    source = make(shuffle, calls)
    slices = served(source, 12)
    assert len(calls) == 2 and source.generations == 2  # steps 0 and 6
    for start in (0, 3, 6, 9):  # a pass: 3 slices of 2 rows covering the buffer
        rows = [r for s in slices[start:start + 3] for r in s]
        assert sorted(rows) == list(range(100 * (start // 6 + 1), 100 * (start // 6 + 1) + 6))
    first, second = slices[0:3], slices[3:6]
    if shuffle == "none":
        assert slices[0] == [100, 101] and first == second
    elif shuffle == "generation":  # TRL's GRPO: one order per generation batch, the same slices each pass
        assert first == second and first != [[100, 101], [102, 103], [104, 105]]
    else:  # a new order each pass
        assert first != second


def test_a_slice_keeps_lists_aligned_with_tensors():
    source = make("pass", [])
    batch = source.next()
    assert batch["text"] == [f"t{r}" for r in batch["row"].tolist()]


def test_resume_mid_buffer_serves_the_same_slices_without_generating():
    straight_calls, resumed_calls = [], []
    straight = make("pass", straight_calls)
    expected = served(straight, 10)
    first = make("pass", [])
    served(first, 5)  # mid-buffer, in the second pass
    state = first.state_dict()
    resumed = make("pass", resumed_calls, made_before=state["generations"])  # the generator's own state
    resumed.load_state_dict(state)
    assert served(resumed, 5) == expected[5:]
    assert len(resumed_calls) == 1  # only the next generation (step 6), not the restored buffer's


def test_mistakes_are_named():
    with pytest.raises(TemperError, match="does not split into steps_per_generation=4"):
        make("none", [], steps=4).next()
    with pytest.raises(TemperError, match="shuffle must be one of"):
        make("sometimes", [])
    source = RolloutSource(lambda: {"a": torch.zeros(4), "b": torch.zeros(3)}, steps_per_generation=1)
    with pytest.raises(TemperError, match="different numbers of rows"):
        source.next()
    other = make("none", [], steps=2)
    with pytest.raises(TemperError, match="this run asks for"):
        other.load_state_dict(make("none", []).state_dict())
