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
def recipe_runs(tmp_path, tiny_model_dir, tiny_tokenizer):
    from conftest import SAMPLE_TEXT

    from temper.models import preset
    from temper.models.reward import build_reward_model, save_reward_model

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
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}) + "\n"
                               for i in range(8)))
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": f"the number {i} is {'even' if i % 2 == 0 else 'odd'}",
                                            "label": i % 2}) + "\n" for i in range(24)))
    torch.manual_seed(0)
    reward_model = save_reward_model(build_reward_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size)),
                                     tmp_path / "rm", tokenizer=tiny_tokenizer)
    return {
        "pretrain": ["model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=4", f"data={corpus}",
                     "samples=0", "eval_fraction=0.2"],
        "sft": [f"model={tiny_model_dir}", f"data={sft_data}", "batch_size=4", "seq_len=64", "eval_samples=2",
                "eval_max_new_tokens=2"],
        "dpo": [f"model={tiny_model_dir}", f"data={pref_data}", "batch_size=4", "seq_len=64", "eval_fraction=0.2"],
        "reward": [f"model={tiny_model_dir}", f"data={pref_data}", "batch_size=4", "seq_len=64", "eval_fraction=0.2"],
        "grpo": [f"model={tiny_model_dir}", f"prompts={prompts}", f"eval_prompts={prompts}", "eval_limit=2",
                 "rewards=world", "num_generations=4", "batch_size=4", "max_completion_length=4"],
        "ppo": [f"model={tiny_model_dir}", f"reward_model={reward_model}", f"prompts={prompts}",
                f"eval_prompts={prompts}", "eval_limit=2", "eval_reward=world", "batch_size=4",
                "max_completion_length=4", "num_ppo_epochs=1"],
        "finetune-encoder": ["model=bert-tiny", f"data={labelled}", "batch_size=4", "seq_len=32", "vocab_size=300",
                             "eval_fraction=0.2"],
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
    args = [*recipe_runs[recipe], f"output_dir={out}", "max_steps=4", "peak_flops=1e12", "logging.every=2",
            "logging.eval_every=3", "logging.eval_at_start=true", "logging.tensorboard=true",
            "logging.progress=false", "checkpoint.every=2", "checkpoint.keep_last=1", "grad_accum=2",
            "activation_checkpointing=true"]
    module.run(load_config(module.Config, None, args))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 3, 4]
    assert all("mfu" in r and "tokens_per_second" in r for r in rows[1:])
    if recipe == "pretrain":  # one phase: throughput over the whole steps, as before phases existed
        for r in rows[1:]:
            assert "step_tokens_per_second" not in r and "time/rollout" not in r
            assert r["tokens_per_second"] == pytest.approx(4 * 32 * 2 / r["time/train"], rel=1e-9)
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


# ----------------------------------------------------------------------------- online: two modules, a rollout buffer


def online_config(**changes):
    cfg = ToyConfig(max_steps=9, checkpoint=CheckpointConfig(every=1, keep_last=2),
                    logging=LoggingConfig(every=1, eval_every=0, eval_at_start=False, progress=False))
    return dataclasses.replace(cfg, **changes)


def online_run(out, cfg, *, kill_at=None, crash_at=None, clock=None, par=None):
    """A toy actor-critic: a policy (3 -> 2 actions) and a value head (3 -> 1) trained together by
    one optimiser, on slices of a buffered generation batch: 6 rows, 3 slices per pass, 2 passes,
    a new order each pass. generate() samples from the global RNG (what the checkpoint's RNG
    state restores) and counts its calls. `kill_at`: in that step, after its slice and its
    gradients, say so on stdout and wait to be killed; `crash_at`: raise KeyboardInterrupt as that
    step begins. `clock`: a fake clock the phases advance."""
    from temper.train.optim import build_optimizer
    from temper.train.rollout import RolloutSource

    torch.manual_seed(0)
    policy, value = torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)
    modules = {"policy": policy, "value": value}
    if par is not None and par.distributed:
        from torch.nn.parallel import DistributedDataParallel

        modules = {k: DistributedDataParallel(m) for k, m in modules.items()}
    optimizer = build_optimizer(modules, cfg.optim)
    generated = []

    def generate():
        generated.append(len(generated))
        if clock is not None:
            clock.now += 5.0
        with torch.no_grad():
            x = torch.randn(6, 3)
            logp = torch.log_softmax(policy(x), -1)
            actions = torch.multinomial(logp.exp(), 1).squeeze(-1)
            return {"x": x, "actions": actions, "old_logp": logp.gather(1, actions[:, None]).squeeze(1),
                    "returns": torch.randn(6), "mask": actions == 0, "ids": [f"row{len(generated)}.{i}" for i in range(6)]}

    source = RolloutSource(generate, steps_per_generation=3, num_iterations=2, shuffle="pass", seed=1)

    def loss_fn(batch):
        if clock is not None:
            clock.now += 1.0
        x = batch["x"]
        logp = torch.log_softmax(modules["policy"](x), -1).gather(1, batch["actions"][:, None]).squeeze(1)
        values = modules["value"](x).squeeze(-1)
        advantages = batch["returns"] - values.detach()
        policy_loss = -(torch.exp(logp - batch["old_logp"]) * advantages).sum()
        value_loss = ((values - batch["returns"]) ** 2).sum()
        return policy_loss + 0.5 * value_loss, x.shape[0], {"value_loss": value_loss.detach()}

    loop = TrainLoop(cfg, "online", out, modules, optimizer, torch.device("cpu"), "fp32", state={"rollout": source},
                     flops_per_token=10.0, par=par)
    for step in loop:
        if step == crash_at:
            raise KeyboardInterrupt
        batch = source.next()
        with loop.phase("score"):
            if clock is not None:
                clock.now += 2.0
            score = float(batch["mask"].sum())
        result = loop.accumulate([{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}], loss_fn)
        if step == kill_at:
            print(f"in step {step}, slice {source.served} of the buffer", flush=True)
            import time

            time.sleep(120)
        loop.optimizer_step({"loss": result["loss"], "value_loss": result["value_loss"] / result["count"],
                             "score": score, "generations": source.generations}, tokens=2)
    summary = loop.finish({})
    return summary, loop.export_model(), generated


TRAIN_KEYS = ("step", "loss", "value_loss", "grad_norm", "lr", "score", "generations")


def train_rows(out):
    return [tuple(r.get(k) for k in TRAIN_KEYS) for r in read_metrics(out / "metrics.jsonl")]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_two_modules_and_a_rollout_buffer_resume_bitwise_after_sigkill_mid_buffer(tmp_path):
    import os
    import signal
    import subprocess
    from pathlib import Path

    _, straight, generated = online_run(tmp_path / "a", online_config())
    assert len(generated) == 2  # steps 0 and 6: 3 slices x 2 passes per generation batch

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]), "OMP_NUM_THREADS": "1"}
    code = ("import sys; from test_loop import online_run, online_config; "
            "online_run(sys.argv[1], online_config(), kill_at=5)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "b")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        import select

        ready, _, _ = select.select([child.stdout], [], [], 120)  # never hang the suite on a stuck child
        said = child.stdout.readline() if ready else ""
        if not said:
            child.kill()
        assert said.startswith("in step 5, slice 6 of the buffer"), (said, child.stderr.read() if not said else "")
        os.kill(child.pid, signal.SIGKILL)  # mid-step, mid-buffer (the generation boundaries are steps 0 and 6)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000005"]
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_00000005" / "state.json").read_text())
    assert state["rollout"]["served"] == 5 and state["rollout"]["generations"] == 1

    _, resumed, generated = online_run(tmp_path / "b", online_config(resume="auto"))
    assert len(generated) == 1  # step 6's: the buffer of step 5 came from the checkpoint, not a new generation
    assert train_rows(tmp_path / "b") == train_rows(tmp_path / "a")  # exact floats, every row
    assert [r[0] for r in train_rows(tmp_path / "b")] == list(range(1, 10))
    for name in ("policy", "value"):
        for (key, a), (_, b) in zip(straight[name].state_dict().items(), resumed[name].state_dict().items()):
            assert torch.equal(a, b), (name, key)


def test_one_safetensors_file_per_trained_module_and_the_buffer_in_state_safetensors(tmp_path):
    from safetensors.torch import load_file

    from temper.train import checkpoint as ckpt

    _, modules, _ = online_run(tmp_path, online_config(max_steps=5))
    last = tmp_path / "checkpoints" / "step_00000005"
    assert sorted(p.name for p in last.iterdir()) == ["optimizer.safetensors", "policy.safetensors", "rng.safetensors",
                                                      "state.json", "state.safetensors", "value.safetensors"]
    for name in ("policy", "value"):
        saved = load_file(last / f"{name}.safetensors")
        assert saved.keys() == {"weight", "bias"}
        assert all(torch.equal(saved[k], v) for k, v in modules[name].state_dict().items())
    state = json.loads((last / "state.json").read_text())
    assert state["modules"] == ["policy", "value"]
    assert state["rollout"]["buffer"]["x"] == {"__tensor__": "rollout/buffer/x", "device": "cpu"}
    assert state["rollout"]["buffer"]["ids"] == [f"row1.{i}" for i in range(6)]  # lists stay JSON
    tensors = load_file(last / "state.safetensors")
    assert {"rollout/buffer/x", "rollout/buffer/actions", "rollout/buffer/mask", "rollout/order",
            "rollout/generator"} <= tensors.keys()
    assert tensors["rollout/buffer/actions"].dtype == torch.int64 and tensors["rollout/buffer/mask"].dtype == torch.bool
    # a run training other modules is refused by name
    with pytest.raises(ValueError, match=r"holds the trained modules \['policy', 'value'\], this run trains \['model'\]"):
        ckpt.load_checkpoint(last, model=torch.nn.Linear(3, 2), optimizer=None)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_phase_times_in_rows_and_mfu_over_the_train_phase_only(tmp_path, monkeypatch):
    """A fake clock: every step's loss takes 2 x 1 s (two micro-batches), scoring 2 s, a generation
    5 s (steps 0 and 6). Rows give each phase's seconds per step; tokens/s and MFU count the
    train phase only, so they do not move on the steps that generate."""
    from temper.train import loop as loop_module

    clock = FakeClock()
    monkeypatch.setattr(loop_module, "time", clock)
    cfg = online_config(max_steps=7)
    cfg.logging.every = 3
    summary, _, _ = online_run(tmp_path, cfg, clock=clock)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6, 7]
    for r, rollout in zip(rows, [5.0 / 3, 0.0, 5.0]):  # generation in step 0 (window 1-3) and step 6 (window 7)
        assert r["time/train"] == 2.0 and r["time/score"] == 2.0 and r["time/rollout"] == pytest.approx(rollout)
        assert r["tokens_per_second"] == 1.0  # 2 tokens per 2 s of training, whatever the rollout took
        assert r["mfu"] == 1.0 * 10.0 / 1e9
        assert r["step_tokens_per_second"] == pytest.approx(2.0 / (4.0 + rollout))
    assert summary["time"] == {"train": 14.0, "rollout": 10.0, "score": 14.0}
    assert summary["train_seconds"] == 38.0 and summary["tokens_per_second"] == 1.0


def test_without_phases_throughput_is_the_whole_step_as_before(tmp_path, monkeypatch):
    """A recipe with no named phases: train is the whole step, so tokens/s and MFU are computed
    exactly as before phases existed (tokens of the window / seconds of the window's steps)."""
    from temper.train import loop as loop_module

    clock = FakeClock()
    monkeypatch.setattr(loop_module, "time", clock)
    real_next = Counter.next_batch

    def slow_batch(self):  # the recipe's batch preparation is part of the step, as it always was
        clock.now += 0.25
        return real_next(self)

    monkeypatch.setattr(Counter, "next_batch", slow_batch)
    cfg = ToyConfig()
    cfg.logging.eval_at_start = False
    summary, _, _ = toy_run(tmp_path, cfg)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    for r in rows:
        assert r["time/train"] == 0.5 and "step_tokens_per_second" not in r
        assert r["tokens_per_second"] == 8 / 0.5 and r["mfu"] == 16.0 * 10.0 / 1e9
    assert "time" not in summary and summary["tokens_per_second"] == 16.0


def test_phase_names_and_nesting(tmp_path, monkeypatch):
    from temper.train import loop as loop_module
    from temper.train.optim import build_optimizer

    clock = FakeClock()
    monkeypatch.setattr(loop_module, "time", clock)
    model = torch.nn.Linear(3, 1)
    cfg = online_config(max_steps=1)
    loop = TrainLoop(cfg, "toy", tmp_path, model, build_optimizer(model, cfg.optim), torch.device("cpu"), "fp32")
    with pytest.raises(ValueError, match="'train' is the time of a step outside its named phases"):
        with loop.phase("train"):
            pass
    with loop.phase("outside"):  # not in a step: nothing counted
        clock.now += 50.0
    for _ in loop:
        with loop.phase("rollout"):
            clock.now += 1.0
            with loop.phase("score"):  # the inner phase's time is the inner phase's
                clock.now += 2.0
            clock.now += 4.0
        loop.accumulate([torch.ones(1, 3)], lambda x: (model(x).sum(), 1))
        clock.now += 8.0
        loop.optimizer_step({"loss": 0.0}, tokens=1)
    loop.finish({})
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert (row["time/rollout"], row["time/score"], row["time/train"]) == (5.0, 2.0, 8.0)
    assert "time/outside" not in row


def test_state_names_of_the_checkpoint_itself_are_refused(tmp_path):
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match=r"state names \['rng'\] are the checkpoint's own"):
        TrainLoop(online_config(), "toy", tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1),
                  torch.device("cpu"), "fp32", state={"rng": Counter()})
    with pytest.raises(ValueError, match="trained module name 'optimizer'"):
        TrainLoop(online_config(), "toy", tmp_path, {"optimizer": model}, torch.optim.SGD(model.parameters(), lr=0.1),
                  torch.device("cpu"), "fp32")


def test_two_modules_resume_through_a_distributed_checkpoint(tmp_path):
    """strategy=ddp in one process (a one-process group): each module wrapped in DDP, the
    checkpoint written by torch.distributed.checkpoint with keys `model.policy.*`, the buffer's
    tensors in state.rank00000.safetensors; the resumed run matches bitwise."""
    import torch.distributed as dist

    from temper.train.distributed import Parallel, ParallelConfig

    def par():
        return Parallel("ddp", ParallelConfig(), torch.device("cpu"))

    _, straight, _ = online_run(tmp_path / "a", online_config(max_steps=7), par=par())
    first = par()
    try:
        with pytest.raises(KeyboardInterrupt):
            online_run(tmp_path / "b", online_config(max_steps=7), par=first, crash_at=5)
    finally:
        first.close()
    assert not dist.is_initialized()
    last = tmp_path / "b" / "checkpoints" / "step_00000005"
    assert (last / "dcp").is_dir() and (last / "state.rank00000.safetensors").is_file()
    from safetensors import safe_open

    keys = set()
    for shard in (last / "dcp").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys |= set(f.keys())
    assert {"model.policy.weight", "model.value.bias", "optim.policy.weight.exp_avg"} <= keys
    _, resumed, generated = online_run(tmp_path / "b", online_config(max_steps=7, resume="auto"), par=par())
    assert len(generated) == 1
    assert train_rows(tmp_path / "b") == train_rows(tmp_path / "a")
    for name in ("policy", "value"):
        assert all(torch.equal(a, b) for a, b in zip(straight[name].parameters(), resumed[name].parameters()))


def test_make_trainable_takes_a_dict_of_modules_peft_on_the_named_ones_one_optimiser(tmp_path):
    """PPO's policy (LoRA) and value model (trained in full): each wrapped on its own, one optimiser over
    every trainable parameter of both, FLOPs and parameter counts summed."""
    from temper.models import build_model, preset
    from temper.recipes import sft
    from temper.train import engine
    from temper.train.distributed import Parallel, ParallelConfig
    from temper.train.recipe import Run, make_trainable

    cfg = load_config(sft.Config, None, ["model=m", "peft.method=lora", "seq_len=32"])
    run = Run(tmp_path, torch.device("cpu"), "fp32", Parallel("none", ParallelConfig(), torch.device("cpu")), 1, 1)
    torch.manual_seed(0)
    policy, value = build_model(preset("llama-tiny", vocab_size=64)), build_model(preset("llama-tiny", vocab_size=64))
    value_flops = engine.flops_per_token(value, 32)
    trainable = make_trainable({"policy": policy, "value": value}, cfg, run, peft_modules=("policy",),
                               flops_factor=2.0)
    assert set(trainable.model) == {"policy", "value"}
    policy_trained = [n for n, p in trainable.model["policy"].named_parameters() if p.requires_grad]
    assert policy_trained and all("lora" in n for n in policy_trained)
    assert all(p.requires_grad for p in trainable.model["value"].parameters())
    optimised = {id(p) for g in trainable.optimizer.param_groups for p in g["params"]}
    expected = {id(p) for m in trainable.model.values() for p in m.parameters() if p.requires_grad}
    assert optimised == expected
    value_count = sum(p.numel() for p in value.parameters())
    assert trainable.trainable_parameters == value_count + sum(
        p.numel() for p in trainable.model["policy"].parameters() if p.requires_grad)
    assert trainable.flops_per_token == pytest.approx(
        2.0 * (engine.flops_per_token(trainable.model["policy"], 32) + value_flops))
