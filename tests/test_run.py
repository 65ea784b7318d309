"""`temper run`: the shipped tiny lifecycle end to end, reruns that skip what did not change,
--from / --only / --force, a stage resumed after an interruption, and pipelines refused before
anything runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from temper.cli import main
from temper.configs import shipped_path
from temper.train import engine

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["world", "curate", "tokenizer", "pretrain", "sft", "sft_merged", "reward", "dpo", "grpo", "int8", "int4",
          "eval"]
CHECKPOINTS = ["pretrain", "sft_merged", "dpo", "grpo", "int8", "int4"]  # what the eval stage compares


def statuses(root: Path) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in json.loads((root / "run.json").read_text())["stages"]}


def record(root: Path, stage: str) -> dict:
    return json.loads((root / ".run" / f"{stage}.json").read_text())


def after(stage: str, status: str = "ran") -> dict[str, str]:
    """Every stage before `stage` skipped, `stage` and the ones after it `status`."""
    i = STAGES.index(stage)
    return {**dict.fromkeys(STAGES[:i], "skipped"), **dict.fromkeys(STAGES[i:], status)}


def check_checkpoint_table(root: Path) -> None:
    """The eval stage's results hold every checkpoint with the metrics the report's table shows."""
    results = json.loads((root / "eval" / "results.json").read_text())
    models = [f"runs/lifecycle-tiny/{c}" for c in CHECKPOINTS]
    assert results["models"] == models and results["reward_model"] == "runs/lifecycle-tiny/reward"
    per = results["per_model"]
    for m in models:
        assert per[m]["perplexity"]["bits_per_byte"] > 0 and per[m]["world_preference"]["acc"] >= 0
        for task in ("world_instruct", "world_chat_qa"):
            rep = per[m][task]
            assert rep["tokens_per_second"] > 0 and isinstance(rep["reward_model_score"], float)
            assert all(isinstance(o["correct"], bool) for o in rep["outputs"])
            assert "kl_to_reference" in rep
    base, sft, grpo, int8, int4 = (per[f"runs/lifecycle-tiny/{c}"] for c in ("pretrain", "sft_merged", "grpo", "int8",
                                                                               "int4"))
    assert base["world_instruct"]["chat"] is False and sft["world_instruct"]["chat"] is True  # chat: auto
    assert sft["world_chat_qa"]["kl_to_reference"] in (0.0, None)  # the reference itself (None: every reply empty)
    assert [base["model"]["stage"], sft["model"]["stage"], int8["model"]["quantized"], int4["model"]["quantized"]] == \
        ["pretrain", "merge", "int8", "int4"]
    assert int8["model"]["parameters"] == int4["model"]["parameters"] == grpo["model"]["parameters"]
    assert int4["model"]["size_bytes"] < int8["model"]["size_bytes"] < grpo["model"]["size_bytes"]


def test_lifecycle_tiny_runs_then_skips_then_reruns_from_a_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the lifecycle as this CPU runs it: precision=auto -> bf16 autocast in every training stage where its
    # bf16 matmuls are fast (AVX512_BF16, AMX), fp32 where they are emulated (AVX2: 10-100x slower, which
    # would make this test minutes long); each command's fp32 and bf16 paths have tests of their own
    chosen = "bf16" if engine.cpu_bf16_speedup() >= engine.CPU_BF16_MIN_SPEEDUP else "fp32"
    monkeypatch.setenv("TEMPER_AUTO_PRECISION", chosen)
    root = tmp_path / "runs" / "lifecycle-tiny"
    assert main(["run", "lifecycle-tiny"]) == 0  # the shipped pipelines/lifecycle-tiny.yaml
    assert statuses(root) == dict.fromkeys(STAGES, "ran")
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo"):
        assert f"precision auto -> {chosen}" in (root / ".run" / f"{stage}.log").read_text(), stage
    # stdout: the summary only (each stage's own prints went to its log); the report beside it
    out = capsys.readouterr().out
    assert "Stages:" in out and "Checkpoints (eval):" in out and "Held-out questions, world_chat_qa" in out
    assert out.rstrip().endswith("report: runs/lifecycle-tiny/report.html") and (root / "report.html").is_file()
    assert "val ppl" not in out and "val ppl" in (root / ".run" / "pretrain.log").read_text()  # pretrain's summary
    for name in ("pretrain", "sft_merged", "dpo", "grpo", "int8", "int4"):  # a column per checkpoint
        assert name in out.split("Checkpoints (eval):")[1].splitlines()[1]
    funnel = json.loads((root / "curate" / "report.json").read_text())
    assert funnel["kept"]["documents"] + funnel["removed"]["documents"] == funnel["input"]["documents"]
    assert funnel["removed"]["documents"] > 0  # the planted noise (duplicates, spam) removed
    assert (root / "sft" / "adapter_config.json").is_file() and not (root / "sft" / "model.safetensors").exists()
    for stage in ("pretrain", "sft_merged", "reward", "dpo", "grpo"):
        assert (root / stage / "model.safetensors").is_file(), stage
    check_checkpoint_table(root)
    dpo_record = record(root, "dpo")
    assert dpo_record["state"] == "done" and dpo_record["config"]["model"] == "runs/lifecycle-tiny/sft_merged"
    assert dpo_record["inputs"]["stages"] == {"world": record(root, "world")["run_id"],
                                              "sft_merged": record(root, "sft_merged")["run_id"]}
    weights = root / "grpo" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    assert main(["run", "lifecycle-tiny"]) == 0  # nothing changed: every stage skipped, nothing rewritten
    assert statuses(root) == dict.fromkeys(STAGES, "skipped")
    assert weights.stat().st_mtime_ns == stamp

    int8_record = record(root, "int8")
    assert main(["run", "lifecycle-tiny", "--from", "int8"]) == 0
    assert statuses(root) == after("int8")
    assert record(root, "int8")["run_id"] != int8_record["run_id"]
    assert weights.stat().st_mtime_ns == stamp

    assert main(["run", "lifecycle-tiny", "--only", "eval"]) == 0
    assert statuses(root)["eval"] == "ran" and statuses(root)["grpo"] == "not run (--only)"

    # a stage's key changed on the command line: that stage and the one reading it run again
    assert main(["run", "lifecycle-tiny", "int4.group_size=16"]) == 0
    assert statuses(root) == {**after("int8", "skipped"), "int4": "ran", "eval": "ran"}
    assert json.loads((root / "int4" / "config.json").read_text())["quantization_config"]["group_size"] == 16

    # an interrupted stage (its record still says running) resumes from its checkpoint
    rec = record(root, "grpo")
    rec["state"] = "running"
    (root / ".run" / "grpo.json").write_text(json.dumps(rec))
    capsys.readouterr()
    assert main(["run", "lifecycle-tiny", "int4.group_size=16"]) == 0
    err = capsys.readouterr().err
    assert "grpo (grpo): resuming from its checkpoint" in err and "resumed from" in err
    assert statuses(root) == after("grpo")
    check_checkpoint_table(root)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


WORLD = "  world:\n    command: world\n    num_people: 4\n"
SMALL_WORLD = WORLD + "    num_towns: 2\n    docs_per_person: 8\n    num_arithmetic_docs: 40\n    num_dialogue_docs: 40\n"


@pytest.mark.parametrize("body, expected", [
    (WORLD + "  tok:\n    command: tokenizer\n    data: ['${wrld}/pretrain/train.jsonl']\n",
     ":7: stage 'tok' refers to '${wrld}', which is no stage of this pipeline (did you mean '${world}'?)"),
    (WORLD + "  a:\n    command: tokenizer\n    data: ['${b}/x']\n  b:\n    command: tokenizer\n    data: ['${a}/x']\n",
     ":7: stage 'a' refers to 'b', a later stage"),
    (WORLD + "  a:\n    command: tokenizer\n    data: ['${a}/x']\n", ":7: stage 'a' refers to itself (a cycle)"),
    (WORLD + "  tok:\n    command: tokenizer\n    vocab_size: 512\n    min_frequncy: 2\n",
     ":8: stage 'tok': unknown key 'min_frequncy' (did you mean 'min_frequency'?)"),
    (WORLD + "  pre:\n    command: pretrain\n    max_steps: many\n",
     ":7: stage 'pre': key 'max_steps' expects an integer, got 'many'"),
    (WORLD + "  pre:\n    command: pretrain\n    max_steps: 3\n    seq_len: -1\n",
     ":8: stage 'pre': seq_len must be at least 1, got -1"),  # a config's own check: no source of its own
    (WORLD + "  tok:\n    command: tokeniser\n", ":6: stage 'tok': unknown command 'tokeniser' (did you mean "
                                                 "'tokenizer'?)"),
    (WORLD + "  w2:\n    command: world\n    output_dir: runs/p/world\n",
     ":7: stage 'w2': output_dir runs/p/world is stage 'world's output too"),
    (WORLD + "  tok:\n    data: [x]\n", ":5: stage 'tok': no 'command:'"),
    (WORLD + "  tok:\n    command: tokenizer\n    overwrite: true\n", ":7: stage 'tok': 'overwrite' is set by "
                                                                       "temper run"),
    (WORLD + WORLD, ":5: key 'world' appears twice in one mapping (the first would be lost)"),
])
def test_bad_pipelines_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, body, expected):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "stages:\n" + body)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("temper run: error: ") and len(err.splitlines()) == 1, err
    assert f"{path}{expected}" in err, err
    assert not (tmp_path / "runs").exists()  # nothing ran, not even the world stage before the bad one


def test_a_failing_stage_is_named_and_a_rerun_keeps_the_stages_that_finished(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "p"
    path = write(tmp_path, "stages:\n" + WORLD + "  tok:\n    command: tokenizer\n    data: [missing.txt]\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("temper run: error: stage 'tok' (tokenizer): ") and "missing.txt" in err, err
    assert record(root, "world")["state"] == "done" and record(root, "tok")["state"] == "running"
    world_id = record(root, "world")["run_id"]
    (tmp_path / "missing.txt").write_text("the river runs past the mill\n" * 50)
    assert main(["run", str(path), "tok.vocab_size=300", "tok.min_frequency=1"]) == 0
    assert statuses(root) == {"world": "skipped", "tok": "ran"}
    assert record(root, "world")["run_id"] == world_id
    stamp = record(root, "tok")["inputs"]["files"]
    assert list(stamp) == ["missing.txt"] and stamp["missing.txt"].startswith("sha256:")
    assert main(["run", str(path), "tok.vocab_size=300", "tok.min_frequency=1"]) == 0
    assert statuses(root) == {"world": "skipped", "tok": "skipped"}
    (tmp_path / "missing.txt").write_text("another river runs past another mill\n" * 50)  # an input changed
    assert main(["run", str(path), "tok.vocab_size=300", "tok.min_frequency=1"]) == 0
    assert statuses(root) == {"world": "skipped", "tok": "ran"}


def test_bad_flags_and_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "stages:\n" + WORLD)
    assert main(["run", str(path), "--from", "wrold"]) == 2
    assert "--from wrold: no such stage" in capsys.readouterr().err
    assert main(["run", str(path), "wrold.num_people=3"]) == 2
    assert "no stage 'wrold'" in capsys.readouterr().err
    assert main(["run", str(path), "world.num_peple=3"]) == 2
    assert "unknown key 'num_peple'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "pipeline file not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_shipped_pipelines_are_valid(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for path in sorted(shipped_path("lifecycle-tiny", "pipelines").parent.glob("*.yaml")):
        assert main(["run", str(path), "--check"]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert len(out.splitlines()) == len(yaml.safe_load(path.read_text())["stages"])  # one line per stage
    assert main(["run", "lifecycle-tiny", "--check"]) == 0
    assert ("eval: temper eval -> runs/lifecycle-tiny/eval <- pretrain, sft_merged, dpo, grpo, int8, int4, reward, "
            "world") in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # --check runs nothing
    assert main(["run", "--check", "sft.max_step=3"]) == 2  # ...but checks every stage with its overrides
    assert "stage 'sft': unknown key 'max_step' (did you mean 'max_steps'?)" in capsys.readouterr().err


def pretraining_pipeline(tmp_path: Path, max_steps: int, every: int) -> Path:
    """world -> tok -> pre: a tiny pretraining run with a checkpoint every `every` steps."""
    return write(tmp_path, "stages:\n" + SMALL_WORLD + f"""  tok:
    command: tokenizer
    data: ["${{world}}/pretrain/train.jsonl"]
    vocab_size: 300
  pre:
    command: pretrain
    data: ["${{world}}/pretrain/train.jsonl"]
    tokenizer: ${{tok}}
    model: llama-tiny
    model_config: {{hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}}
    seq_len: 32
    batch_size: 4
    max_steps: {max_steps}
    samples: 0
    checkpoint: {{every: {every}}}
    logging: {{every: 5, eval_every: 0, progress: false}}
""")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_stage_killed_mid_run_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """SIGKILL a real `temper run` once pretrain has written a checkpoint; the rerun skips the
    finished stages and continues pretrain from that checkpoint to its last step."""
    monkeypatch.chdir(tmp_path)
    path = pretraining_pipeline(tmp_path, max_steps=100, every=20)
    root = tmp_path / "runs" / "p"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "temper", "run", str(path)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = root / "pre" / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while not (checkpoints.is_dir() and any(checkpoints.glob("step_*"))):
            assert proc.poll() is None, "temper run ended before pretrain wrote a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert record(root, "pre")["state"] == "running" and record(root, "tok")["state"] == "done"
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    err = capsys.readouterr().err
    assert "pre (pretrain): resuming from its checkpoint" in err and "resumed from" in err, err
    assert statuses(root) == {"world": "skipped", "tok": "skipped", "pre": "ran"}
    assert json.loads((root / "pre" / "summary.json").read_text())["steps"] == 100


def test_seed_sets_every_stage_seed_but_the_worlds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("stages:\n  world:\n    command: world\n    num_people: 4\n    num_towns: 2\n"
                        "  pre:\n    command: pretrain\n    data: ['${world}/pretrain/train.jsonl']\n"
                        "    seed: 7\n    max_steps: 1\n", encoding="utf-8")
    assert main(["run", str(pipeline), "seed=3", "--check"]) == 0
    assert main(["run", str(pipeline), "seed=3", "pre.model=llama-tiny", "pre.seq_len=32", "pre.batch_size=2",
                 "pre.samples=0"]) == 0
    root = tmp_path / "runs" / "p"
    assert record(root, "world")["config"]["seed"] == 0  # the same world
    assert record(root, "pre")["config"]["seed"] == 3  # the run's seed over the file's 7


def test_a_full_disk_mid_stage_is_one_line_and_the_rerun_resumes_there(tmp_path, monkeypatch, capsys):
    """The disk fills while pretrain writes its second checkpoint: one error line naming the stage
    and the checkpoint that stays valid; the rerun skips the finished stages and resumes pretrain."""
    import errno

    from temper.train import checkpoint

    monkeypatch.chdir(tmp_path)
    path = pretraining_pipeline(tmp_path, max_steps=15, every=5)
    root = tmp_path / "runs" / "p"
    real, calls = checkpoint.save_tensors, []

    def full_disk(tensors, target):
        calls.append(target)
        if "step_00000010" in str(target):  # the second checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, target)

    monkeypatch.setattr(checkpoint, "save_tensors", full_disk)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("temper run: error: stage 'pre' (pretrain): ") and os.strerror(errno.ENOSPC) in err, err
    assert "step_00000005 stays valid" in err and "pre.log" in err, err
    assert record(root, "pre")["state"] == "running" and statuses(root)["pre"] == "failed"
    monkeypatch.setattr(checkpoint, "save_tensors", real)  # space freed
    assert main(["run", str(path)]) == 0
    err = capsys.readouterr().err
    assert "pre (pretrain): resuming from its checkpoint" in err and "resumed from" in err and "at step 5" in err
    assert statuses(root) == {"world": "skipped", "tok": "skipped", "pre": "ran"}
    assert json.loads((root / "pre" / "summary.json").read_text())["steps"] == 15
