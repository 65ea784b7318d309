"""The loop every recipe shares (temper/train/loop.py): cadence, rows, resume, and that every
training recipe honours every shared setting under one name."""

import dataclasses
import json
import sys
import types
import typing
import warnings

import pytest
import torch

from temper.cli import COMMANDS, training_commands
from temper.config import CheckpointConfig, LoggingConfig, OptimConfig, ScheduleConfig, load_config
from temper.train.loop import TrainLoop
from temper.train.recipe import SHARED_HELP, SHARED_KEYS, TrainingConfig
from temper.train.rundir import read_metrics

TRAINING_COMMANDS = training_commands()  # every recipe on the shared loop, from the CLI's registry


def test_the_registry_lists_the_training_recipes():
    assert {"pretrain", "sft", "dpo"} <= set(TRAINING_COMMANDS)
    assert "online-dpo" not in TRAINING_COMMANDS and COMMANDS["online-dpo"].kind == "workflow"


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_every_training_recipe_declares_the_shared_keys(command):
    """One skeleton: every recipe's Config is a TrainingConfig, so each shared key exists with one
    help text (SHARED_HELP) and each section has one schema; a recipe may change a default only."""
    import importlib

    config = importlib.import_module(COMMANDS[command].module).Config
    assert issubclass(config, TrainingConfig) and config.command == command
    hints = typing.get_type_hints(config)
    by_name = {f.name: f for f in dataclasses.fields(config)}
    base = typing.get_type_hints(TrainingConfig)
    for key in SHARED_KEYS:
        assert key in by_name, f"{command} lacks {key}"
        assert hints[key] == base[key], f"{command}.{key} has another type"
    for key, f in by_name.items():  # a key several recipes share has one help text wherever it is declared
        if key in SHARED_HELP:
            assert f.metadata["help"] == SHARED_HELP[key], f"{command}.{key} has its own help text"
    sections = {"optim": OptimConfig, "schedule": ScheduleConfig, "checkpoint": CheckpointConfig,
                "logging": LoggingConfig}
    for key, cls in sections.items():
        assert hints[key] is cls  # one schema for every recipe


def test_one_refusal_for_what_a_recipe_cannot_do():
    """Capabilities, not copied refusals: the same words in every recipe that lacks a feature."""
    import importlib

    from temper.errors import TemperError

    for command in TRAINING_COMMANDS:
        config = importlib.import_module(COMMANDS[command].module).Config
        caps = config.capabilities
        args = ["model=x"]
        if not caps.tensor_parallel:
            with pytest.raises(TemperError, match=f"parallel.tp: temper {command} has no tensor parallelism yet"):
                load_config(config, None, [*args, "parallel.tp=2"])
        if caps.peft and not caps.peft_with_fsdp:
            with pytest.raises(TemperError, match="peft.method=lora with strategy=fsdp is not supported yet"):
                load_config(config, None, [*args, "peft.method=lora", "strategy=fsdp"])
        with pytest.raises(TemperError, match="batch_size must be at least 1, got 0"):
            load_config(config, None, [*args, "batch_size=0"])


def test_renamed_keys_say_their_new_name():
    from temper.errors import TemperError
    from temper.recipes import pretrain, sft

    with pytest.raises(TemperError, match="key 'val_data' is now called 'eval_data'"):
        load_config(pretrain.Config, None, ["val_data=x.txt"])
    with pytest.raises(TemperError, match="key 'max_seq_len' is now called 'seq_len'"):
        load_config(sft.Config, None, ["model=m", "max_seq_len=64"])


# ----------------------------------------------------------------------------- the loop on a toy problem


@dataclasses.dataclass
class ToyConfig:
    max_steps: int = 7
    resume: str = ""
    peak_flops: float = 1e9
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=0.1, weight_decay=0.0))
    schedule: ScheduleConfig = dataclasses.field(default_factory=lambda: ScheduleConfig(name="constant", warmup_steps=0))
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=lambda: CheckpointConfig(every=4, keep_last=5))
    logging: LoggingConfig = dataclasses.field(
        default_factory=lambda: LoggingConfig(every=2, eval_every=3, eval_at_start=True, progress=False))


class Counter:
    """A stateful data source: its position must travel through checkpoints."""

    def __init__(self):
        self.position = 0

    def next_batch(self):
        self.position += 1
        g = torch.Generator().manual_seed(self.position)
        return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def toy_run(out, cfg, crash_at=None, precision="fp32", noisy=False):
    from temper.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    model.config = types.SimpleNamespace(num_layers=1, num_heads=1, head_dim=1)
    optimizer = build_optimizer(model, cfg.optim)
    data = Counter()
    evaluated = []

    def evaluate(step):
        evaluated.append(step)
        with torch.no_grad():
            return {"val_loss": float(model.weight.square().sum())}

    def loss_fn(batch):
        x, y = batch
        if noisy:  # draws from the global RNG, as dropout would: resume must restore it and draw nothing before
            y = y + 0.1 * torch.randn(y.shape)
        return ((model(x) - y) ** 2).sum(), y.numel()

    loop = TrainLoop(cfg, "toy", out, model, optimizer, torch.device("cpu"), precision, state={"data": data},
                     evaluate=evaluate, flops_per_token=10.0)
    for step in loop:
        if step == crash_at:
            raise KeyboardInterrupt
        result = loop.accumulate([data.next_batch(), data.next_batch()], loss_fn)
        loop.optimizer_step({"loss": result["loss"]}, tokens=8)
    return loop.finish({"extra": 1}), evaluated, model


def test_cadence_rows_checkpoints_and_summary(tmp_path, capsys):
    cfg = ToyConfig()
    cfg.logging.progress = True  # stderr is not a terminal here: plain lines instead of a bar
    summary, evaluated, _ = toy_run(tmp_path, cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == [0, 2, 3, 4, 6, 7]  # eval at start, every 2 (log), every 3 (eval), the last
    assert len(steps) == len(set(steps))  # one row per step: the last is not written twice
    assert evaluated == [0, 3, 6, 7]
    assert "loss" not in rows[0] and "val_loss" in rows[0]
    by_step = {r["step"]: r for r in rows}
    assert "val_loss" in by_step[3] and "val_loss" not in by_step[4]
    for r in rows[1:]:
        assert {"loss", "lr", "grad_norm", "tokens_per_second", "mfu", "memory_mb"} <= set(r)
        assert r["mfu"] == pytest.approx(r["tokens_per_second"] * 10.0 / 1e9)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000007"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary and summary["steps"] == 7 and summary["extra"] == 1
    assert summary["val_loss"] == by_step[7]["val_loss"] and summary["before"]["val_loss"] == rows[0]["val_loss"]
    err = capsys.readouterr().err
    assert "step 2/7 loss" in err and "eval step 3: val_loss=" in err


def test_resume_continues_bitwise_and_restores_state(tmp_path):
    straight, _, model_a = toy_run(tmp_path / "a", ToyConfig())
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path / "b", ToyConfig(), crash_at=5)  # after the checkpoint of step 4
    resumed, evaluated, model_b = toy_run(tmp_path / "b", dataclasses.replace(ToyConfig(), resume="auto"))
    assert evaluated == [6, 7]  # no evaluation "at the start" of a resumed run
    rows_a, rows_b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    key = lambda rows: [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in rows]  # noqa: E731
    assert key(rows_a) == key(rows_b)  # exact floats: the data position and optimiser came back
    assert torch.equal(model_a.weight, model_b.weight)


def test_nothing_draws_from_the_restored_rng_before_training_continues(tmp_path):
    """The MFU peak is measured with random matrices; measured after the checkpoint's RNG state
    was restored, it would shift every later random draw (dropout, sampling) of a resumed run."""
    cfg = dataclasses.replace(ToyConfig(), peak_flops=0.0)  # 0: measure the peak now
    toy_run(tmp_path / "a", cfg, noisy=True)
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path / "b", cfg, crash_at=5, noisy=True)
    toy_run(tmp_path / "b", dataclasses.replace(cfg, resume="auto"), noisy=True)
    rows_a, rows_b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [r.get("loss") for r in rows_a] == [r.get("loss") for r in rows_b]


@pytest.mark.parametrize("remeasured", [1e15, 1.0])
def test_mfu_above_one_is_never_logged(tmp_path, monkeypatch, remeasured):
    """An under-estimated peak (a busy machine while it was measured at start) gives MFU > 100%:
    the peak is measured once more and the larger kept; if the MFU still exceeds 1, the rows say
    `mfu: null` and a warning says why, instead of a figure above 100%."""
    from temper.train import engine

    peaks = iter([1.0, remeasured])  # FLOP/s: the first is far below what the toy run reaches
    calls = []
    monkeypatch.setattr(engine, "measure_matmul_peak", lambda *a, **k: calls.append(a) or next(peaks))
    cfg = dataclasses.replace(ToyConfig(), peak_flops=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toy_run(tmp_path, cfg)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(calls) == 2  # at start, and once more at the first MFU above 1
    mfu_warnings = [w for w in caught if "MFU came out at" in str(w.message)]
    if remeasured > 1.0:
        assert all(0 < r["mfu"] <= 1 for r in rows) and not mfu_warnings
        assert rows[-1]["mfu"] == pytest.approx(rows[-1]["tokens_per_second"] * 10.0 / remeasured)
    else:
        assert all(r["mfu"] is None for r in rows)
        assert len(mfu_warnings) == 1 and "peak_flops=" in str(mfu_warnings[0].message)


def test_mfu_above_one_with_a_given_peak_is_null_and_warned(tmp_path, monkeypatch):
    from temper.train import engine

    monkeypatch.setattr(engine, "measure_matmul_peak", lambda *a, **k: pytest.fail("a given peak is not measured"))
    with pytest.warns(UserWarning, match=r"MFU came out at .*peak_flops=1\)"):
        toy_run(tmp_path, dataclasses.replace(ToyConfig(), peak_flops=1.0))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert rows and all(r["mfu"] is None for r in rows)


def test_fp16_gradient_scaler_state_travels_with_the_checkpoint(tmp_path):
    """fp16 runs scale the loss; the scaler's scale and growth tracker are saved and restored
    (autocast fp16 and the scaler both run on CPU here, so no GPU is needed)."""
    straight, _, model_a = toy_run(tmp_path / "a", ToyConfig(), precision="fp16")
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path / "b", ToyConfig(), crash_at=5, precision="fp16")
    toy_run(tmp_path / "b", dataclasses.replace(ToyConfig(), resume="auto"), precision="fp16")
    states = [json.loads((tmp_path / d / "checkpoints" / "step_00000007" / "state.json").read_text()) for d in "ab"]
    # the first steps overflow in fp16 and back the scale off: state a fresh scaler would not have
    assert states[0]["grad_scaler"]["scale"] < 65536.0
    assert states[0]["grad_scaler"] == states[1]["grad_scaler"]
    rows_a, rows_b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [r.get("loss") for r in rows_a] == [r.get("loss") for r in rows_b]


def test_tensorboard_is_written_when_asked(tmp_path, monkeypatch):
    """logging.tensorboard=true reaches the writer (a stand-in module, so the test needs no tensorboard)."""
    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, name, value, step):
            scalars.append((name, step))

        def close(self):
            scalars.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    cfg = ToyConfig()
    cfg.logging.tensorboard = True
    toy_run(tmp_path, cfg)
    assert ("loss", 2) in scalars and ("val_loss", 3) in scalars and scalars[-1] == ("closed", None)


# ----------------------------------------------------------------------------- both recipes honour the sections


@pytest.fixture()
def recipe_runs(tmp_path, tiny_model_dir):
    from conftest import SAMPLE_TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 3)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(24)]
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
              "chosen": [{"role": "assistant", "content": f"{i + 1}"}],
              "rejected": [{"role": "assistant", "content": f"{i + 7} or so"}]} for i in range(24)]
    pref_data = tmp_path / "pairs.jsonl"
    pref_data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return {
        "pretrain": ["model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=4", f"data={corpus}",
                     "samples=0", "eval_fraction=0.2"],
        "sft": [f"model={tiny_model_dir}", f"data={sft_data}", "batch_size=4", "seq_len=64", "eval_samples=2",
                "eval_max_new_tokens=2"],
        "dpo": [f"model={tiny_model_dir}", f"data={pref_data}", "batch_size=4", "seq_len=64", "eval_fraction=0.2"],
    }


@pytest.mark.parametrize("recipe", TRAINING_COMMANDS)
def test_each_recipe_honours_the_shared_sections(recipe, recipe_runs, tmp_path, monkeypatch, capsys):
    import importlib

    assert recipe in recipe_runs, f"add a tiny run of temper {recipe} to recipe_runs"

    written = []

    class SummaryWriter:
        def __init__(self, log_dir):
            written.append(log_dir)

        def add_scalar(self, *a):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    module = importlib.import_module(COMMANDS[recipe].module)
    out = tmp_path / recipe
    args = [*recipe_runs[recipe], f"output_dir={out}", "max_steps=4", "peak_flops=1e9", "logging.every=2",
            "logging.eval_every=3", "logging.eval_at_start=true", "logging.tensorboard=true",
            "logging.progress=false", "checkpoint.every=2", "checkpoint.keep_last=1", "grad_accum=2",
            "activation_checkpointing=true"]
    module.run(load_config(module.Config, None, args))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 3, 4]
    assert all("mfu" in r and "tokens_per_second" in r for r in rows[1:])
    assert written == [str(out / "tensorboard")]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]  # keep_last=1

    # an earlier run is never mixed with a new one: refused, continued, or replaced on request
    from temper.errors import TemperError

    def snapshot():  # every file but the lock, which each run takes
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".temper.lock"}

    before = snapshot()
    with pytest.raises(TemperError, match=r"holds an earlier run .*resume=auto continues it, overwrite=true starts over"):
        module.run(load_config(module.Config, None, [*args, "max_steps=5"]))
    with pytest.raises(TemperError, match=r"step_00000004 belongs to another run \(global_batch 8 -> 4\)"):
        module.run(load_config(module.Config, None, [*args, "max_steps=5", "batch_size=2", "resume=auto"]))
    assert snapshot() == before  # refused runs wrote nothing
    module.run(load_config(module.Config, None, [*args, "max_steps=5", "resume=auto"]))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 2, 3, 4, 5]
    module.run(load_config(module.Config, None, [*args, "max_steps=2", "overwrite=true"]))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 2]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]


def test_resume_names_every_key_that_makes_it_another_run(tmp_path):
    from temper.errors import TemperError
    from temper.models import build_model, preset
    from temper.train import checkpoint as ckpt
    from temper.train.loop import check_same_run, run_identity

    cfg = types.SimpleNamespace(seq_len=32, batch_size=4, grad_accum=1, seed=0)
    model = build_model(preset("llama-tiny", vocab_size=64))
    saved = run_identity(cfg, model, {"tokenizer": "a" * 16, "data": "0123456789abcdef"})
    path = ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                state={"run": saved})
    check_same_run(path, saved)  # the same run resumes
    wider = build_model(preset("llama-tiny", vocab_size=64, num_layers=3))
    other = run_identity(types.SimpleNamespace(seq_len=64, batch_size=4, grad_accum=1, seed=0), wider,
                         {"tokenizer": "b" * 16, "data": "fedcba9876543210"})
    with pytest.raises(TemperError) as err:
        check_same_run(path, other)
    message = str(err.value)
    for part in ("belongs to another run", "data '0123456789abcdef' -> 'fedcba9876543210'", "model.num_layers 2 -> 3",
                 "seq_len 32 -> 64", "tokenizer 'aaaaaaaaaaaaaaaa' -> 'bbbbbbbbbbbbbbbb'", "overwrite=true"):
        assert part in message, (part, message)
