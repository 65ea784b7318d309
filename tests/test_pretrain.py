"""`temper pretrain`: end to end on tiny data, exact resume, and bad input."""

import json

import pytest
from conftest import (
    ADAMW_EPS,
    SAMPLE_TEXT,
    adamw_drift,
    approx_reordered,
    assert_reorder_close,
    assert_weights_close,
    decoder_lengths,
)

from temper.cli import main
from temper.config import load_config
from temper.errors import TemperError
from temper.recipes import pretrain
from temper.train.rundir import read_metrics

TINY = ["model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=4", "peak_flops=1e9",
        "logging.progress=false", "samples=1", "sample_tokens=4", "optim.lr=3e-3"]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT * 3)
    return path


def run(tmp_path, corpus, *extra, out="run"):
    cfg = load_config(pretrain.Config, None, [*TINY, f"data={corpus}", f"output_dir={tmp_path / out}", *extra])
    return pretrain.run(cfg)


def test_pretrain_learns_and_writes_a_model_directory(tmp_path, corpus):
    pytest.importorskip("transformers")
    import torch
    import transformers

    summary = run(tmp_path, corpus, "max_steps=40", "logging.every=10", "logging.eval_every=20", "eval_fraction=0.2")
    out = tmp_path / "run"
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    for key in ("lr", "grad_norm", "tokens_per_second", "mfu", "memory_mb"):
        assert key in rows[0]
    assert summary["val_ppl"] < summary["unigram_val_ppl"]
    assert 0 < summary["val_bpb"] < 8
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.yaml",
                 "samples.jsonl", "generation_config.json"):
        assert (out / name).is_file(), name
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    from temper.models import load_model

    ours = load_model(out).eval()
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert_reorder_close(hf(x).logits, ours(x), decoder_lengths(ours, x.shape[1]))  # transformers' kernels


def test_interrupted_and_resumed_run_logs_identical_losses(tmp_path, corpus, monkeypatch):
    common = ["max_steps=8", "logging.every=1", "logging.eval_every=0", "checkpoint.every=3", "eval_fraction=0.2"]
    run(tmp_path, corpus, *common, out="straight")
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")

    from temper.data.shards import TokenLoader

    real_next = TokenLoader.next_batch
    calls = {"n": 0}

    def crash_after_five(self):
        calls["n"] += 1
        if calls["n"] > 5:  # dies during step 6, after the checkpoint of step 3
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(TokenLoader, "next_batch", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, corpus, *common, out="resumed")
    monkeypatch.setattr(TokenLoader, "next_batch", real_next)
    assert len(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == 5
    run(tmp_path, corpus, *common, "resume=auto", out="resumed")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    train_rows = lambda rows: [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows if "loss" in r]  # noqa: E731
    assert train_rows(resumed) == train_rows(straight)  # bitwise: floats compared exactly
    assert resumed[-1]["val_loss"] == straight[-1]["val_loss"]


def test_grad_accum_equals_bigger_batch(tmp_path, corpus):
    """4 x 2 accumulated micro-batches train like batches of 8 (same windows, same order): the same
    maths summed in another order, so the losses, gradient norms and weights agree step after step
    within the reordering bounds of conftest (AdamW with ADAMW_EPS, so the weights can agree)."""
    from safetensors.torch import load_file

    from temper.models import preset

    common = ["max_steps=3", "logging.every=1", "eval_fraction=0.2", "samples=0", f"optim.eps={ADAMW_EPS}"]
    run(tmp_path, corpus, *common, "batch_size=4", "grad_accum=2", out="accum")
    run(tmp_path, corpus, *common, "batch_size=8", "grad_accum=1", out="big")
    accum, big = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("accum", "big"))
    assert [r["step"] for r in accum] == [r["step"] for r in big] == [1, 2, 3]
    config, tokens = preset("llama-tiny", vocab_size=300), 8 * 32
    forward, step = decoder_lengths(config, 32), decoder_lengths(config, 32, tokens=tokens)
    params = sum(t.numel() for t in load_file(tmp_path / "big" / "model.safetensors").values())
    for t, (a, b) in enumerate(zip(accum, big)):  # after t steps that differed only in rounding
        assert a["lr"] == b["lr"]
        assert a["loss"] == approx_reordered(b["loss"], step * t + forward + (tokens,))
        assert a["grad_norm"] == approx_reordered(b["grad_norm"], step * (t + 1) + (params,))
    assert accum[-1]["val_loss"] == approx_reordered(big[-1]["val_loss"], step * 3 + forward + (tokens,))
    drift = adamw_drift([r["lr"] for r in big], [r["grad_norm"] for r in big], step)
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("accum", "big"))
    assert_weights_close(wa, wb, drift, steps=3)
    # and the weights did move: a step that did nothing would also "match"
    assert any(r["grad_norm"] > 0 for r in accum) and accum[0]["loss"] - accum[-1]["loss"] > 0.1


def test_bad_input(tmp_path, corpus, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    with pytest.raises(TemperError, match="no text to train the tokenizer on|the training data is empty"):
        run(tmp_path, empty, "max_steps=1")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(TemperError, match=r"latin.txt: not UTF-8 at byte offset 3"):
        run(tmp_path, latin, "max_steps=1")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(TemperError, match=r"rows.jsonl:2: field 'text' is missing"):
        run(tmp_path, rows, "max_steps=1")
    with pytest.raises(TemperError, match=r"seq_len 1024 is larger than the context of model=llama-tiny \(512 positions\)"):
        run(tmp_path, corpus, "max_steps=1", "seq_len=1024")
    with pytest.raises(TemperError, match=r"unknown key 'model_config.num_layer' \(did you mean 'model_config.num_layers'\?\)"):
        run(tmp_path, corpus, "max_steps=1", "model_config.num_layer=3")
    code = main(["pretrain", f"data={tmp_path / 'missing.txt'}", f"output_dir={tmp_path / 'x'}"])
    assert code == 2 and "data not found" in capsys.readouterr().err


def test_bf16_autocast_on_cpu_trains(tmp_path, corpus):
    """bf16 autocast really runs in bf16 (its losses differ from fp32's in the low bits), follows the
    fp32 run closely, learns, and keeps fp32 master weights."""
    from safetensors.torch import load_file

    common = ["max_steps=12", "logging.every=1", "eval_fraction=0.2", "samples=0"]
    run(tmp_path, corpus, *common, "precision=fp32", out="fp32")
    summary = run(tmp_path, corpus, *common, "precision=bf16", out="bf16")
    bf16, fp32 = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("bf16", "fp32"))
    bf16_losses = [r["loss"] for r in bf16]
    fp32_losses = [r["loss"] for r in fp32]
    assert bf16_losses != fp32_losses  # autocast was on
    for a, b in zip(bf16_losses, fp32_losses):
        assert a == pytest.approx(b, abs=0.05)
    assert bf16_losses[-1] < bf16_losses[0] - 0.5  # it learns
    assert summary["val_loss"] == pytest.approx(fp32[-1]["val_loss"], abs=0.05)
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}


def test_fp16_is_refused_on_cpu(tmp_path, corpus):
    with pytest.raises(TemperError, match="precision=fp16 needs a GPU"):
        run(tmp_path, corpus, "max_steps=1", "precision=fp16", "device=cpu")
