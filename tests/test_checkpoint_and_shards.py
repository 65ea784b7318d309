import errno
import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, trained_pair

from temper.config import OptimConfig
from temper.data.shards import TokenLoader, build_shards, read_index, token_dtype
from temper.errors import TemperError
from temper.models import build_model, preset
from temper.train import checkpoint as ckpt
from temper.train.optim import build_optimizer

DOCS = [p for p in SAMPLE_TEXT.split("\n\n") if p.strip()]




def test_checkpoint_round_trip_restores_everything(tmp_path):
    model, opt = trained_pair()
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(tmp_path, 7, model=model, optimizer=opt, state={"loader": {"epoch": 1, "position": 3}})
    expected_draw = torch.rand(3)
    fresh = build_model(preset("llama-tiny", vocab_size=64))
    fresh_opt = build_optimizer(fresh, OptimConfig(lr=1e-2))
    torch.manual_seed(999)
    state = ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert state["step"] == 7 and state["loader"] == {"epoch": 1, "position": 3}
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)  # RNG restored
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name])


def test_tensors_in_state_round_trip_exactly_without_pickle(tmp_path):
    """A stateful part's state may hold tensors at any depth: they go to state.safetensors under
    their path, the rest stays in state.json, and they come back with dtype, shape and values."""
    model, opt = trained_pair()
    g = torch.Generator().manual_seed(5)
    tensors = {
        "f32": torch.randn(3, 4, generator=g), "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "i64": torch.arange(7), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3), "transposed": torch.randn(3, 2, generator=g).t(), "generator": g.get_state(),
    }
    state = {"rollout": {**tensors, "nested": [torch.ones(2, dtype=torch.int8), (torch.full((1,), 3.0), "text", 4)],
                         "position": 11, "a/b": torch.tensor([1.0]), "a": {"b": torch.tensor([2.0])}}}
    path = ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt, state=state)
    saved = json.loads((path / "state.json").read_text())
    assert saved["rollout"]["position"] == 11 and saved["rollout"]["nested"][1][1:] == ["text", 4]
    assert saved["rollout"]["a/b"] == {"__tensor__": "rollout/a~1b", "device": "cpu"}  # no clash with a -> b
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json"}  # nothing pickled
    back = ckpt.load_checkpoint(path, model=model, optimizer=None)["rollout"]
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    assert torch.equal(back["nested"][0], torch.ones(2, dtype=torch.int8)) and back["nested"][0].dtype == torch.int8
    assert torch.equal(back["nested"][1][0], torch.full((1,), 3.0)) and back["nested"][1][1:] == ["text", 4]
    assert float(back["a/b"]) == 1.0 and float(back["a"]["b"]) == 2.0
    g2 = torch.Generator()
    g2.set_state(back["generator"])
    assert torch.equal(torch.rand(4, generator=g2), torch.rand(4, generator=g))


def test_state_tensors_come_back_on_the_cpu_or_on_this_runs_device():
    state, tensors = ckpt.split_tensors({"on_cpu": torch.ones(2), "on_gpu": torch.zeros(3)})
    state["on_gpu"]["device"] = "cuda"  # as a GPU run writes it; resumed here on the "meta" device
    back = ckpt.join_tensors(state, tensors, "meta")
    assert back["on_cpu"].device.type == "cpu" and back["on_gpu"].device.type == "meta"


def test_several_named_modules_one_file_each(tmp_path):
    policy, value = torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)
    opt = build_optimizer({"policy": policy, "value": value}, OptimConfig(lr=1e-2))
    path = ckpt.save_checkpoint(tmp_path, 1, model={"policy": policy, "value": value}, optimizer=opt, state={})
    assert {"policy.safetensors", "value.safetensors"} <= {p.name for p in path.iterdir()}
    assert not (path / "model.safetensors").exists() and ckpt.checkpoint_problem(path) is None
    fresh = {"policy": torch.nn.Linear(3, 2), "value": torch.nn.Linear(3, 1)}
    ckpt.load_checkpoint(path, model=fresh, optimizer=None)
    assert torch.equal(fresh["value"].weight, value.weight) and torch.equal(fresh["policy"].bias, policy.bias)
    (path / "value.safetensors").unlink()
    assert ckpt.checkpoint_problem(path) == "value.safetensors is missing"
    with pytest.raises(TemperError, match="trained module name 'rng'"):
        ckpt.save_checkpoint(tmp_path, 2, model={"rng": policy}, optimizer=opt, state={})


def test_keep_last_and_latest(tmp_path):
    model, opt = trained_pair()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt, state={}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / "step_00000003" / "state.json").write_text("{broken")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained_pair()
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={})
    real = ckpt.save_tensors
    calls = {"n": 0}

    def failing(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer file of the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ckpt, "save_tensors", failing)
    with pytest.raises(TemperError, match=r"No space left on device.*previous checkpoint step_00000001 stays valid"):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # no half-written directory
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"


def test_shards_hold_every_document_with_eos(tmp_path, tiny_tokenizer):
    out = build_shards(DOCS, tiny_tokenizer, tmp_path / "s", val_fraction=0.2, seed=1, shard_tokens=500)
    index = read_index(out)
    assert index["dtype"] == "uint16"
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["num_docs"] + val["num_docs"] == len(DOCS) and val["num_docs"] > 0
    assert len(train["shards"]) > 1
    tokens = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in train["shards"]])
    assert (tokens == tiny_tokenizer.eos_id).sum() == train["num_docs"]
    ends = np.load(out / train["shards"][0]["docs"], allow_pickle=False)
    first = np.fromfile(out / train["shards"][0]["file"], dtype=np.uint16)
    assert all(first[e - 1] == tiny_tokenizer.eos_id for e in ends)
    assert token_dtype(70000) == np.uint32


def test_loader_is_deterministic_resumable_and_sharded(tmp_path, tiny_tokenizer):
    out = build_shards(DOCS * 3, tiny_tokenizer, tmp_path / "s")
    a = TokenLoader(out, "train", seq_len=16, batch_size=2, seed=3)
    b = TokenLoader(out, "train", seq_len=16, batch_size=2, seed=3)
    first = [a.next_batch() for _ in range(a.batches_per_epoch + 2)]  # crosses an epoch
    again = [b.next_batch() for _ in range(b.batches_per_epoch + 2)]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(first, again))
    x, y = first[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    # resume in the middle
    c = TokenLoader(out, "train", seq_len=16, batch_size=2, seed=3)
    for _ in range(3):
        c.next_batch()
    d = TokenLoader(out, "train", seq_len=16, batch_size=2, seed=3)
    d.load_state_dict(c.state_dict())
    assert torch.equal(c.next_batch()[0], d.next_batch()[0])
    assert TokenLoader(out, "train", seq_len=16, batch_size=2, seed=4).next_batch()[0].tolist() != x.tolist()


def test_ranks_split_each_step_of_the_same_global_order(tmp_path, tiny_tokenizer):
    """2 ranks x 1 micro-batch read, step by step, the rows 1 rank x 2 micro-batches reads, across
    an epoch boundary; a position saved on 2 ranks resumes on 1 (and 1 -> 2) at the same rows."""
    out = build_shards(DOCS * 3, tiny_tokenizer, tmp_path / "s")

    def rows(batch):
        return sorted(map(tuple, batch[0].tolist()))

    one = TokenLoader(out, "train", seq_len=16, batch_size=2, seed=3, grad_accum=2)
    ranks = [TokenLoader(out, "train", seq_len=16, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert one.batches_per_epoch == 2 * ranks[0].batches_per_epoch
    steps = ranks[0].batches_per_epoch + 2  # crosses an epoch
    for _ in range(steps):
        single = sorted(rows(one.next_batch()) + rows(one.next_batch()))
        split = [rows(r.next_batch()) for r in ranks]
        assert sorted(split[0] + split[1]) == single
    # resume 2 -> 1 and 1 -> 2 (the micro-batch size may change too: the rows consumed are kept)
    resumed = TokenLoader(out, "train", seq_len=16, batch_size=4, seed=3)
    resumed.load_state_dict(ranks[0].state_dict())
    expected = sorted(rows(one.next_batch()) + rows(one.next_batch()))
    assert rows(resumed.next_batch()) == expected
    back = [TokenLoader(out, "train", seq_len=16, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for r in back:
        r.load_state_dict(one.state_dict())
    assert sorted(rows(back[0].next_batch()) + rows(back[1].next_batch())) == \
        sorted(rows(one.next_batch()) + rows(one.next_batch()))
    odd = TokenLoader(out, "train", seq_len=16, batch_size=3, seed=3, rank=0, world_size=2)
    with pytest.raises(TemperError, match="does not split into batches of 3 on 2 ranks"):
        odd.load_state_dict({"epoch": 0, "position": 1, "world_size": 1, "batch_size": 2})


def test_shard_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(TemperError, match="the training data is empty"):
        build_shards(["", ""], tiny_tokenizer, tmp_path / "empty")
    out = build_shards(["tiny"], tiny_tokenizer, tmp_path / "small")
    with pytest.raises(TemperError, match="lower seq_len or batch_size"):
        TokenLoader(out, "train", seq_len=64, batch_size=8)
    assert json.loads((out / "index.json").read_text())["splits"]["val"]["num_tokens"] == 0
