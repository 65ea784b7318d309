"""Divergence (temper/train/loop.py): a NaN or infinite loss or gradient norm is never applied;
`on_nonfinite=stop` ends the run in one line and keeps its checkpoints, `skip` drops the step and
counts it; no checkpoint and no saved model ever holds a NaN or an Inf."""

import dataclasses
import json
import types

import pytest
import torch
from conftest import SAMPLE_TEXT
from safetensors.torch import load_file

from temper.cli import main
from temper.config import CheckpointConfig, LoggingConfig, OptimConfig, ScheduleConfig, load_config
from temper.errors import TemperError
from temper.recipes import dpo, pretrain, sft
from temper.train import engine
from temper.train.loop import MAX_SKIPPED_IN_A_ROW, TrainLoop
from temper.train.optim import build_optimizer
from temper.train.rundir import read_metrics

NAN = float("nan")


def all_finite(path):
    """Every tensor of a safetensors file is finite (a file that is absent is not)."""
    return all(bool(torch.isfinite(t).all()) for t in load_file(path).values())


def tiny_pretrain(tmp_path, out, *extra):

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 3)
    return ["pretrain", "model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=4", f"data={corpus}",
            "samples=0", "eval_fraction=0.2", "eval_batches=1", "peak_flops=1e12", "logging.progress=false",
            f"output_dir={out}", *extra]


# ----------------------------------------------------------------------------- the real command


def test_a_huge_learning_rate_stops_in_one_line_and_saves_no_model(tmp_path, capsys):
    """optim.lr=1e9: step 1 is finite and blows the weights up, step 2's loss is NaN. Before, the
    run ended with exit 0 and an all-NaN model.safetensors."""
    out = tmp_path / "run"
    code = main(tiny_pretrain(tmp_path, out, "max_steps=4", "optim.lr=1e9", "checkpoint.every=1"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("temper pretrain: error: step 2: the loss is NaN: training diverged (likely causes: "
                           "a learning rate too high (optim.lr=1e+09), a bad data row)"), last
    assert "the checkpoint of step 1 is kept: resume=auto continues from it" in last
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000001"]
    assert all_finite(out / "checkpoints" / "step_00000001" / "model.safetensors")
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["step"] == 2 and rows[-1]["nonfinite"] == "loss"  # the failed step's row, for the plot
    code = main(["generate", f"model={out}", "prompt=The river", "max_new_tokens=2"])  # nothing to load: one line
    assert code == 2 and "Traceback" not in capsys.readouterr().err


def test_a_stopped_run_resumes_from_its_last_good_checkpoint_with_a_lower_lr(tmp_path, monkeypatch, capsys):
    """A NaN at step 3 (a loss that goes NaN on its third call, as a bad data row would): the run
    stops with steps 1-2 checkpointed and no model; resume=auto with another optim.lr goes on
    from step 2 to the end and saves a finite model."""
    real = pretrain.causal_lm_loss
    calls = []

    def nan_on_third_call(*args, **kwargs):
        loss_sum, count = real(*args, **kwargs)
        calls.append(1)
        return (loss_sum * NAN if len(calls) == 3 else loss_sum), count

    monkeypatch.setattr(pretrain, "causal_lm_loss", nan_on_third_call)
    out = tmp_path / "run"
    args = tiny_pretrain(tmp_path, out, "max_steps=4", "checkpoint.every=1", "logging.every=1")
    assert main(args) == 2
    assert "error: step 3: the loss is NaN" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.setattr(pretrain, "causal_lm_loss", real)
    assert main([*args, "resume=auto", "optim.lr=1e-4"]) == 0
    assert "resumed from" in capsys.readouterr().err
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "nonfinite" not in rows[2]  # the failed row went
    assert rows[-1]["lr"] <= 1e-4
    assert all_finite(out / "model.safetensors")


@pytest.mark.parametrize("module", [sft, dpo], ids=["sft", "dpo"])
def test_sft_and_dpo_meet_the_same_stop(module, tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(8)]
    pairs = [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
              "chosen": [{"role": "assistant", "content": f"{i + 1}"}],
              "rejected": [{"role": "assistant", "content": f"{i + 7} or so"}]} for i in range(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows if module is sft else pairs)))
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"data={data}", "batch_size=4", "seq_len=64", "max_steps=3",
            "optim.lr=1e9", "peak_flops=1e12", "logging.progress=false", f"output_dir={out}",
            "eval_samples=0" if module is sft else "eval_fraction=0.25"]
    with pytest.raises(TemperError, match=r"^step 2: the (loss|gradient norm) is NaN.*training diverged .*"
                                          r"optim\.lr=1e\+09") as stopped:
        module.run(load_config(module.Config, None, args))
    assert ("a loss setting (beta=0.1)" in str(stopped.value)) == (module is dpo)  # the loss's own knobs, if any
    assert not (out / "model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------- the loop on a toy problem


@dataclasses.dataclass
class ToyConfig:
    max_steps: int = 8
    resume: str = ""
    peak_flops: float = 1e9
    on_nonfinite: str = "stop"
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=0.1, weight_decay=0.0))
    schedule: ScheduleConfig = dataclasses.field(default_factory=lambda: ScheduleConfig(name="constant", warmup_steps=0))
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=lambda: CheckpointConfig(every=2, keep_last=5))
    logging: LoggingConfig = dataclasses.field(
        default_factory=lambda: LoggingConfig(every=1, eval_every=0, eval_at_start=False, progress=False))


def toy_loop(out, cfg, *, bad=(), bad_gradient=(), evaluate=None):
    """A linear regression on the shared loop; the loss is NaN at the 0-based steps in `bad`, the
    gradient NaN (the loss finite) at those in `bad_gradient`. Returns (loop, model, weights
    before each step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    model.config = types.SimpleNamespace(num_layers=1, num_heads=1, head_dim=1)
    optimizer = build_optimizer(model, cfg.optim)
    loop = TrainLoop(cfg, "toy", out, model, optimizer, torch.device("cpu"), "fp32", evaluate=evaluate,
                     flops_per_token=10.0)
    before = []
    for step in loop:
        before.append(model.weight.detach().clone())
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)

        def loss_fn(batch, step=step, x=x, y=y):
            loss = ((model(x) - y) ** 2).sum()
            if step in bad:
                loss = loss * NAN
            if step in bad_gradient:  # sqrt'(0) is infinite: a finite loss, a NaN gradient
                loss = loss + (model.weight - model.weight.detach()).abs().sum().sqrt()
            return loss, y.numel()

        result = loop.accumulate([None], loss_fn)
        loop.optimizer_step({"loss": result["loss"]}, tokens=4)
    return loop, model, before


def test_the_non_finite_update_is_never_applied(tmp_path):
    with pytest.raises(TemperError, match=r"^step 5: the loss is NaN: .*the update was not applied .*"
                                          r"the checkpoint of step 4 is kept"):
        toy_loop(tmp_path / "a", ToyConfig(), bad={4})
    # the weights of step 4's checkpoint are the ones the failed step started from and left alone
    saved = load_file(tmp_path / "a" / "checkpoints" / "step_00000004" / "model.safetensors")
    _, model, _ = toy_loop(tmp_path / "b", ToyConfig(max_steps=4))
    assert torch.equal(saved["weight"], model.weight.detach())


def test_a_nan_gradient_under_a_finite_loss_stops_too(tmp_path):
    with pytest.raises(TemperError, match=r"^step 3: the gradient norm is NaN \(the loss [0-9.]+\): training diverged"):
        toy_loop(tmp_path, ToyConfig(), bad_gradient={2})
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["nonfinite"] == "grad_norm"


def test_skip_drops_the_step_counts_it_and_goes_on(tmp_path):
    cfg = ToyConfig(on_nonfinite="skip")
    loop, model, before = toy_loop(tmp_path, cfg, bad={2, 5}, bad_gradient={6})
    summary = loop.finish({})
    assert summary["skipped_steps"] == 3 and summary["steps"] == 8
    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert [rows[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 3, 3]
    after = [*before[1:], model.weight.detach()]
    for step in range(8):  # a skipped step leaves the weights exactly as they were; the others move them
        assert torch.equal(before[step], after[step]) == (step in (2, 5, 6)), step
    assert int(loop.optimizer.state[model.weight]["step"]) == 5  # AdamW saw the five applied steps only
    state = json.loads((tmp_path / "checkpoints" / "step_00000008" / "state.json").read_text())
    assert state["skipped_steps"] == 3  # the count travels with the checkpoint
    assert torch.isfinite(loop.export_model().weight).all()


def test_a_skipping_run_still_stops_when_every_step_fails(tmp_path):
    cfg = ToyConfig(max_steps=20, on_nonfinite="skip")
    last = 2 + MAX_SKIPPED_IN_A_ROW
    with pytest.raises(TemperError, match=rf"^step {last}: the loss is NaN, the {MAX_SKIPPED_IN_A_ROW}th such step "
                                          r"in a row \(on_nonfinite=skip\): training diverged .*no model is saved"):
        toy_loop(tmp_path, cfg, bad=set(range(2, 20)))
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == last


def test_no_checkpoint_and_no_model_with_nan_weights(tmp_path):
    """The finite-loss ways into broken weights (an update to Inf, a bug): the checkpoint of that
    step is not written (the earlier ones stay) and the model is not exported."""
    loop, model, _ = toy_loop(tmp_path, ToyConfig(max_steps=2))
    with torch.no_grad():
        model.bias.fill_(float("inf"))
    with pytest.raises(TemperError, match=r"^step 3: the trained weights hold NaN or Inf \('bias'\): training "
                                          r"diverged .*the checkpoint of step 2 is kept"):
        loop.save_checkpoint(3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    with pytest.raises(TemperError, match=r"^after step 2: the trained weights hold NaN or Inf \('bias'\)"):
        loop.export_model()


def test_nonfinite_parameters_names_only_nan_and_inf():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2), "c": torch.nn.Linear(2, 2)})
    with torch.no_grad():
        model.a.weight.fill_(3e38)  # huge but finite: its norm would overflow, its largest magnitude does not
        model.b.weight[0, 0] = NAN
        model.c.bias[1] = -float("inf")
    assert engine.nonfinite_parameters(model) == ["b.weight", "c.bias"]
    model.b.weight.requires_grad_(False)  # frozen weights are not the run's to check
    assert engine.nonfinite_parameters({"m": model}) == ["c.bias"]


def test_a_nan_held_out_loss_stops_before_that_steps_checkpoint(tmp_path):
    """Finite training losses, weights that give NaN on held-out data (the last update blew them up)."""
    cfg = ToyConfig()
    cfg.logging.eval_every = 2
    with pytest.raises(TemperError, match=r"^step 6: the held-out val_loss is NaN: the weights diverged .*"
                                          r"the checkpoint of step 4 is kept"):
        toy_loop(tmp_path, cfg, evaluate=lambda step: {"val_loss": NAN if step >= 6 else 1.0})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]  # the step's row, its training numbers and the mark
    assert row["step"] == 6 and row["nonfinite"] == "val_loss" and "loss" in row and "grad_norm" in row
