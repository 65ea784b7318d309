"""Kill test: SIGKILL a real `temper pretrain` 3 times (before its first checkpoint, while it
writes a checkpoint, at a random moment), resume it with resume=auto each time, and get the
uninterrupted run's model byte for byte. benchmarks/kill_test.py does the same 20 times."""

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE_TEXT

from temper.config import load_config
from temper.errors import TemperError
from temper.recipes import pretrain
from temper.train.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def load_kill_test():
    spec = importlib.util.spec_from_file_location("kill_test", ROOT / "benchmarks" / "kill_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_test"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and flock are POSIX")
def test_three_sigkills_then_resume_give_the_uninterrupted_model(tmp_path):
    kill_test = load_kill_test()
    lines = []
    result = kill_test.kill_test(tmp_path, kills=3, max_steps=30, every=3, paragraphs=60, seed=0, echo=lines.append)
    report = "\n".join(lines)
    assert result["ok"], report
    assert result["kills"] == 3, report
    first = result["launches"][0]
    assert first.plan.mode == "first-row" and first.killed_at is not None, report
    assert result["doing"].get("writing a checkpoint"), f"no kill landed in a checkpoint write:\n{report}"
    sha_ref, sha_killed = result["sha256"]
    assert sha_ref == sha_killed, report


TINY = ["model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=4", "peak_flops=1e9", "samples=0",
        "logging.progress=false", "logging.every=1", "max_steps=6", "checkpoint.every=3"]


def test_resume_auto_restarts_a_run_that_died_before_its_first_checkpoint(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 3)

    def run(out, *extra):
        return pretrain.run(load_config(pretrain.Config, None, [*TINY, f"data={corpus}", f"output_dir={out}", *extra]))

    run(tmp_path / "straight")
    from temper.data.shards import TokenLoader

    real_next, calls = TokenLoader.next_batch, {"n": 0}

    def die_in_step_two(self):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real_next(self)

    out = tmp_path / "killed"
    monkeypatch.setattr(TokenLoader, "next_batch", die_in_step_two)
    with pytest.raises(KeyboardInterrupt):
        run(out, "resume=auto")
    monkeypatch.setattr(TokenLoader, "next_batch", real_next)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]  # metrics, no checkpoint
    assert not (out / "checkpoints").exists()
    with pytest.raises(TemperError, match="holds an earlier run"):  # not told to continue: refused
        run(out)
    run(out, "resume=auto")  # nothing to continue: starts again from step 0
    train = lambda d: [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(d / "metrics.jsonl")]  # noqa: E731
    assert train(out) == train(tmp_path / "straight")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()

    # what an earlier run leaves that resume=auto must not start over on: damaged checkpoints,
    # a finished run's summary without its checkpoints
    for step in ("step_00000003", "step_00000006"):
        (out / "checkpoints" / step / "model.safetensors").write_bytes(b"cut short")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"), \
            pytest.raises(TemperError, match="no valid checkpoint to resume"):
        run(out, "resume=auto")
    import shutil

    shutil.rmtree(out / "checkpoints")
    with pytest.raises(TemperError, match=r"holds an earlier run \(metrics.jsonl, summary.json\) but no valid"):
        run(out, "resume=auto")


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    import torch

    from temper.train import checkpoint as ckpt

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, state={}, keep_last=2)
    real_rmtree = ckpt.shutil.rmtree

    def die_halfway(path, ignore_errors=False):  # the process is killed after the first file went
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, state={}, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[1:] == ["step_00000002", "step_00000003"] and names[0].startswith(".old-step_00000001-"), names
    assert all(ckpt.checkpoint_problem(p) is None for p in ckpt.list_checkpoints(tmp_path))
    assert ckpt.clean_leftovers(tmp_path) == [names[0]]  # what the next run does first
