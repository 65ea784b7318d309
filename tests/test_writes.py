"""Nothing lost: every file and directory a command writes is claimed before any work, and a
refusal leaves the target's bytes and inode type as they were; a full disk is one line naming
the file, the earlier file (or checkpoint) intact; files follow the umask."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import ROOT, SAMPLE_TEXT, trained_pair

from temper import io
from temper.cli import main
from temper.config import to_dict
from temper.errors import TemperError
from temper.io import atomic_write_text, claim_output_file, write_safetensors
from temper.models import build_model, preset, save_model
from temper.recipes.pretrain import Config
from temper.train import checkpoint as ckpt
from temper.train.rundir import check_resume_settings

PRETRAIN = ["model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=4", "samples=0", "peak_flops=1e9",
            "logging.progress=false", "model_config.num_layers=2"]


def snapshot(path: Path) -> tuple:
    """What a refusal must leave as it was: the inode type (without following a link, and
    followed), and the bytes of a regular file (every file's under a directory)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        return tuple((str(p.relative_to(path)), snapshot(p)) for p in sorted(path.rglob("*"))
                     if p.name != ".temper.lock")
    kind = stat.S_IFMT(os.lstat(path).st_mode)
    target = stat.S_IFMT(os.stat(path).st_mode)
    data = path.read_bytes() if stat.S_ISREG(os.stat(path).st_mode) else None
    return kind, target, data


def error_line(capsys, stage: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"temper {stage}: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.fixture
def model(tmp_path, tiny_model_dir):
    """A copy of the tiny model (a test that failed would change the copy, not the shared one)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "The river"}\n{"prompt": "A mill"}\n')
    return path


def generate(model, prompts, output, *extra) -> int:
    return main(["generate", f"model={model}", f"prompts_file={prompts}", f"output_file={output}",
                 "max_new_tokens=2", "device=cpu", *extra])


# ----------------------------------------------------------------------------- output files


@pytest.mark.parametrize("kind", ["fifo", "link-to-fifo", "char-device", "weights", "prompts", "existing",
                                  "run-dir"])
def test_an_output_file_that_would_destroy_data_is_refused_untouched(tmp_path, capsys, model, prompts, kind):
    if kind == "char-device":  # a device node of our own, in tmp_path (/dev/null's numbers): root only
        try:
            os.mknod(tmp_path / "device", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "results.jsonl").write_text('{"kept": true}\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".temper.lock").write_text("")
    (tmp_path / "run" / "samples.jsonl").write_text("a run's samples\n")
    os.symlink(tmp_path / "pipe", tmp_path / "link")
    target, said = {"fifo": (tmp_path / "pipe", "is a FIFO, not a regular file"),
                    "link-to-fifo": (tmp_path / "link", "is a FIFO, not a regular file"),
                    "char-device": (tmp_path / "device", "is a character device, not a regular file"),
                    "weights": (model / "model.safetensors", "lies inside a model directory"),
                    "prompts": (prompts, "is the prompts_file= file itself"),
                    "existing": (tmp_path / "results.jsonl", "exists: overwrite=true replaces it"),
                    "run-dir": (tmp_path / "run" / "samples.jsonl", "lies inside a temper output directory")}[kind]
    before = snapshot(target), snapshot(model), snapshot(prompts)
    assert generate(model, prompts, target, *(["overwrite=true"] if kind != "existing" else [])) == 2
    line = error_line(capsys, "generate")
    assert f"output_file={target}" in line and said in line
    assert (snapshot(target), snapshot(model), snapshot(prompts)) == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_a_link_to_a_device_is_refused_before_anything_is_written(tmp_path):
    """The claim itself (the command would be the same claim): /dev/null stays the device."""
    os.symlink("/dev/null", tmp_path / "null")
    before = snapshot(Path("/dev/null"))
    for path in (tmp_path / "null", Path("/dev/null"), Path("/proc/self/comm")):
        with pytest.raises(TemperError, match=r"is a system path \(under /dev, /proc or /sys\)"), \
                claim_output_file(path, key="output_file", overwrite=True):
            pytest.fail("claimed")
    assert snapshot(Path("/dev/null")) == before and stat.S_ISCHR(before[1])
    assert os.path.islink(tmp_path / "null")


def test_a_second_writer_of_one_file_is_refused_and_overwrite_replaces(tmp_path, capsys, model, prompts):
    out = tmp_path / "out.jsonl"
    with claim_output_file(out, key="output_file"):  # another command is writing it
        assert generate(model, prompts, out, "overwrite=true") == 2
        assert "is being written by another temper command" in error_line(capsys, "generate")
    assert out.read_text() == ""  # the holder's (empty) claim; the refused writer wrote nothing
    out.unlink()
    assert generate(model, prompts, out) == 0
    first = out.read_text()
    assert [json.loads(line)["prompt"] for line in first.splitlines()] == ["The river", "A mill"]
    assert generate(model, prompts, out) == 2
    assert "exists: overwrite=true replaces it" in error_line(capsys, "generate")
    assert generate(model, prompts, out, "overwrite=true", "seed=1") == 0
    assert len(out.read_text().splitlines()) == 2


def test_a_missing_folder_is_named_not_a_temporary_file(tmp_path, capsys, model, prompts):
    out = tmp_path / "no" / "such" / "out.jsonl"
    assert generate(model, prompts, out) == 2
    line = error_line(capsys, "generate")
    assert line.endswith(f"the folder {out.parent} does not exist") and ".tmp" not in line
    # the same for any atomic write the claim did not see coming
    with pytest.raises(TemperError, match=rf"^{out}: the folder {out.parent} does not exist$"):
        atomic_write_text(out, "x")


def test_contamination_output_is_claimed(tmp_path, capsys):
    train, evals = tmp_path / "train.txt", tmp_path / "eval.jsonl"
    train.write_text(SAMPLE_TEXT)
    evals.write_text('{"text": "the quick brown fox"}\n')
    os.mkfifo(tmp_path / "pipe")
    for target, said in ((evals, "is the eval= file itself"), (tmp_path / "pipe", "is a FIFO")):
        before = snapshot(target)
        assert main(["eval", "contamination", f"train={train}", f"eval={evals}", f"output={target}",
                     "overwrite=true"]) == 2
        assert said in error_line(capsys, "eval contamination")
        assert snapshot(target) == before
    assert main(["eval", "contamination", f"train={train}", f"eval={evals}", f"output={tmp_path / 'r.json'}"]) == 0
    assert str(evals) in json.loads((tmp_path / "r.json").read_text())


# ----------------------------------------------------------------------------- output directories


def test_tokenizer_never_writes_into_a_model_and_replaces_its_own_only_with_overwrite(tmp_path, capsys, model):
    corpus = tmp_path / "c.txt"
    corpus.write_text(SAMPLE_TEXT)
    args = ["tokenizer", f"data={corpus}"]
    before = snapshot(model)
    for extra in ([], ["overwrite=true"]):
        assert main([*args, "vocab_size=300", f"output_dir={model}", *extra]) == 2
        assert "holds a model (not written by temper); temper tokenizer does not write models" in \
            error_line(capsys, "tokenizer")
    assert snapshot(model) == before
    out = tmp_path / "tok"
    assert main([*args, "vocab_size=300", f"output_dir={out}"]) == 0
    mine = snapshot(out)
    assert main([*args, f"output_dir={out}", "vocab_size=290"]) == 2
    assert "holds an earlier output (tokenizer.json" in error_line(capsys, "tokenizer")
    assert snapshot(out) == mine
    assert main([*args, f"output_dir={out}", "vocab_size=290", "overwrite=true"]) == 0
    assert snapshot(out) != mine


def test_a_model_directory_refuses_every_command_that_did_not_write_it(tmp_path, capsys, model):
    """tokenizer / world / eval never write into a model; a training run replaces another's (or a
    downloaded) model only with overwrite=true."""
    (model / "temper.json").unlink(missing_ok=True)  # a model from elsewhere
    corpus = tmp_path / "c.txt"
    corpus.write_text(SAMPLE_TEXT)
    before = snapshot(model)
    assert main(["tokenizer", f"data={model / 'tokenizer.json'}", f"output_dir={model}", "overwrite=true"]) == 2
    assert "holds a model (not written by temper); temper tokenizer does not write models" in \
        error_line(capsys, "tokenizer")
    assert main(["world", f"output_dir={model}", "num_people=4", "overwrite=true"]) == 2
    assert "temper world does not write models" in error_line(capsys, "world")
    assert main(["eval", f"model={model}", f"data={corpus}", f"output_dir={model}"]) == 2
    assert f"output_dir {model} is the model= directory itself" in error_line(capsys, "eval")
    assert main(["pretrain", *PRETRAIN, f"data={corpus}", "max_steps=1", f"output_dir={model}"]) == 2
    assert "already holds a model (not written by temper): choose another output_dir, or overwrite=true" in \
        error_line(capsys, "pretrain")
    assert snapshot(model) == before


def test_world_rerun_into_a_world_is_refused_and_locked(tmp_path, capsys):
    out = tmp_path / "w"
    small = ["num_people=4", "num_towns=2", "docs_per_person=2", "docs_per_town=1", "num_arithmetic_docs=4",
             "num_dialogue_docs=4", "num_sft_train=4", "num_sft_test=2", "num_pref_train=4", "num_pref_test=2",
             "num_rl_train=4", "num_rl_test=2"]
    assert main(["world", f"output_dir={out}", *small]) == 0
    before = snapshot(out)
    assert main(["world", f"output_dir={out}", *small, "seed=1"]) == 2
    assert "holds an earlier output (facts.json, README.md" in error_line(capsys, "world")
    assert snapshot(out) == before
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from temper.io import claim_output_dir; "
                               f"claim_output_dir({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["world", f"output_dir={out}", *small, "seed=1", "overwrite=true"]) == 2
        assert "is in use by another temper run" in error_line(capsys, "world")
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(out) == before
    assert main(["world", f"output_dir={out}", *small, "seed=1", "overwrite=true"]) == 0
    assert snapshot(out) != before


def test_dpo_into_its_reference_model_is_refused(tmp_path, capsys, model, tiny_model_dir):
    ref = Path(shutil.copytree(tiny_model_dir, tmp_path / "ref"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "The river", "chosen": " runs.", "rejected": " stops."}) + "\n")
    before = snapshot(ref)
    for extra in ([], ["overwrite=true"]):
        assert main(["dpo", f"model={model}", f"ref_model={ref}", f"data={pairs}", f"output_dir={ref}",
                     "max_steps=1", "logging.progress=false", *extra]) == 2
        assert f"output_dir {ref} is the ref_model= directory itself" in error_line(capsys, "dpo")
    assert snapshot(ref) == before


# ----------------------------------------------------------------------------- a refused resume


def test_a_refused_resume_touches_no_cache(tmp_path, capsys):
    corpus, other = tmp_path / "c.txt", tmp_path / "other.txt"
    corpus.write_text(SAMPLE_TEXT)
    other.write_text(SAMPLE_TEXT.upper())
    out = tmp_path / "run"
    args = ["pretrain", *PRETRAIN, f"data={corpus}", "checkpoint.every=1", f"output_dir={out}"]
    assert main([*args, "max_steps=1"]) == 0
    before = {name: snapshot(out / name) for name in ("data", "tokenizer", "checkpoints", "model.safetensors")}
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".temper.lock"}
    time.sleep(0.01)
    for change, said in ((["vocab_size=290"], "vocab_size 300 -> 290"),
                         ([f"data={other}"], "data ["),
                         (["model_config.num_layers=3"], "model_config {'num_layers': 2} -> {'num_layers': 3}")):
        args_now = [a for a in args if not a.startswith(tuple(c.split("=")[0] + "=" for c in change))]
        assert main([*args_now, *change, "max_steps=2", "resume=auto"]) == 2
        line = error_line(capsys, "pretrain")
        assert "step_00000001 belongs to another run (" in line and said in line, line
    assert {name: snapshot(out / name) for name in before} == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".temper.lock"} == mtimes
    assert main([*args, "max_steps=2", "resume=auto", "logging.every=5", "optim.lr=1e-3"]) == 0  # how, not what
    assert "resumed from" in capsys.readouterr().err


def test_resume_settings_compare_what_both_versions_know(tmp_path):
    """A key one temper version did not have is no difference; a free-form section (world.*) is
    compared whole; a section's own keys one by one; `may_change` keys are free."""

    step = tmp_path / "step_00000001"
    step.mkdir()
    cfg = Config(data=["c.txt"], world={})
    saved = {k: v for k, v in to_dict(cfg).items() if k != "loss_chunk"}  # written before loss_chunk existed
    saved["optim"] = {k: v for k, v in saved["optim"].items() if k != "lr"} | {"betas": [0.9, 0.95]}
    (step / "state.json").write_text(json.dumps({"config": saved}))
    check_resume_settings(tmp_path, str(step), cfg, Config.resume_may_change)
    cfg.world, cfg.optim.lr = {"num_people": 10}, 1.0
    cfg.max_steps = 10**6
    with pytest.raises(TemperError, match=r"belongs to another run \(world \{\} -> \{'num_people': 10\}\)"):
        check_resume_settings(tmp_path, str(step), cfg, Config.resume_may_change)


# ----------------------------------------------------------------------------- a full disk


def no_space(*args, **kwargs):
    raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) "
                                      'at path "/somewhere/.tmpAb12Cd"')


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model, opt = trained_pair()
    first = ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={})
    before = snapshot(first)
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)  # safetensors' own error, as it raises it
    with pytest.raises(TemperError) as caught:
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={})
    line = str(caught.value)
    assert line.startswith(f"could not write the checkpoint of step 2 in {tmp_path} (no space left on device)")
    assert "the previous checkpoint step_00000001 stays valid" in line and ".tmp" not in line
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"] and snapshot(first) == before
    assert ckpt.latest_checkpoint(tmp_path) == first


def test_a_full_disk_at_a_model_or_tokenizer_save_keeps_the_earlier_files(tmp_path, monkeypatch, tiny_tokenizer):
    out = tmp_path / "m"
    model = build_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size))
    save_model(model, out, tokenizer=tiny_tokenizer)
    before = snapshot(out)
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", no_space)
        with pytest.raises(TemperError, match=rf"^{out / 'model.safetensors'}: no space left on device"):
            save_model(model, out, tokenizer=tiny_tokenizer)
    assert snapshot(out) == before
    real = os.fsync

    def full(fd):  # the tokenizer's file, written by the tokenizers library, meets a full disk
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".tokenizer.json.tmp-{os.getpid()}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(TemperError, match=rf"^{out / 'tokenizer.json'}: no space left on device"):
        tiny_tokenizer.save(out)
    assert snapshot(out) == before


def test_a_full_disk_is_one_line_from_the_command(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text(SAMPLE_TEXT)
    out = tmp_path / "run"
    real = safetensors.torch.save_file
    calls = []

    def full_after_first_checkpoint(tensors, path, metadata=None):
        calls.append(path)
        if "step_00000002" in path:
            no_space()
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_after_first_checkpoint)
    assert main(["pretrain", *PRETRAIN, f"data={corpus}", "checkpoint.every=1", "max_steps=2",
                 f"output_dir={out}"]) == 2
    line = error_line(capsys, "pretrain")
    assert f"in {out / 'checkpoints'} (no space left on device); the previous checkpoint step_00000001" in line
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_00000001"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, tiny_tokenizer, umask, mode):
    old = os.umask(umask)
    try:
        model = build_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size))
        save_model(model, tmp_path / "m", tokenizer=tiny_tokenizer)
        write_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
        net, opt = trained_pair()
        ckpt.save_checkpoint(tmp_path / "ckpt", 1, model=net, optimizer=opt, state={})
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".safetensors", ".json"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(mode) for p in files}
