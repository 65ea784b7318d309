"""Benchmarks refuse to report a speed for different work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--batch", "2", "--prompt-len", "4", "--new-tokens", "3", "--hidden", "32", "--layers", "1",
        "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--repeats", "1"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generate_stops_when_the_tokens_differ(monkeypatch, capsys):
    pytest.importorskip("transformers")
    import temper.models.generate as gen

    bench = _load("bench_generate")
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", *TINY])
    bench.main()  # the same tokens: it times and reports
    assert "ratio temper/transformers" in capsys.readouterr().out

    real = gen.generate

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs)
        out[1][2] = (out[1][2] + 1) % 64
        return out

    monkeypatch.setattr(gen, "generate", off_by_one)
    with pytest.raises(SystemExit, match=r"greedy tokens differ \(row 1, step 2: .*not timing different work"):
        bench.main()
    assert "tokens/s" not in capsys.readouterr().out


def test_bench_lora_trl_peers_train_the_same_tokens(tmp_path, tiny_model_dir):
    """TRL's labels and temper's targets must be the same tokens, and TRL must not recompute activations."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    bench = _load("bench_lora_trl")
    data_rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                               {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]} for i in range(3)]
    data_rows.append({"messages": [{"role": "system", "content": "Be brief."}, *data_rows[0]["messages"],
                                   {"role": "user", "content": "And 2 plus 2?"},
                                   {"role": "assistant", "content": "4"}]})
    trainer = bench.trl_trainer(tiny_model_dir, data_rows, str(tmp_path), steps=1, batch=2)
    assert trainer.args.gradient_checkpointing is False and not trainer.args.bf16
    assert getattr(trainer.args, "activation_checkpointing", False) is False
    assert not trainer.args.packing and not trainer.args.padding_free
    ours = bench.temper_examples(tiny_model_dir, data_rows)
    theirs = trainer.train_dataset
    assert len(ours) == len(theirs) == len(data_rows)
    for example, ids, labels in zip(ours, theirs["input_ids"], theirs["labels"]):
        assert ids == [*example.inputs, example.targets[-1]]  # the same rendered tokens
        assert labels[1:] == example.targets  # trained at the same positions (TRL shifts inside the model)
