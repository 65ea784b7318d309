"""Nothing lost: durable checkpoints, one run per output directory, files whole or absent,
OS errors as one line."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import trained_pair

from temper.errors import TemperError
from temper.io import atomic_write_text, claim_output_dir, release_output_dir
from temper.train import checkpoint as ckpt

# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("damage", ["truncate model", "empty optimizer", "garbage rng", "no step"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous(tmp_path, damage):
    model, opt = trained_pair()
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt, state={})
    newest = tmp_path / "step_00000002"
    if damage == "truncate model":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "empty optimizer":
        (newest / "optimizer.safetensors").write_bytes(b"")
    elif damage == "garbage rng":
        (newest / "rng.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    else:
        (newest / "state.json").write_text(json.dumps({"loader": {}}))
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step_00000002: "):
        assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
    with pytest.raises(TemperError, match=r"step_00000002: not a usable checkpoint: "):
        ckpt.load_checkpoint(newest, model=model, optimizer=opt)


def test_every_file_and_the_directories_are_fsynced(tmp_path, monkeypatch):
    model, opt = trained_pair()
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(os, "fsync", spy)
    final = ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt, state={})
    # a file is fsynced under its temporary name (.NAME.tmp-PID), before the rename that publishes it
    names = {re.sub(r"^\.(.+)\.tmp-\d+$", r"\1", os.path.basename(p)) for p in synced}
    assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"} <= names
    tmp_name = f".tmp-step_00000003-{os.getpid()}"
    assert tmp_name in names  # the checkpoint directory's entries, before the rename
    assert str(tmp_path) in synced  # the rename itself
    assert final.is_dir()


def test_replacing_a_checkpoint_never_leaves_none(tmp_path, monkeypatch):
    """Same step written again: the old one is swapped out, not deleted first; a failure halfway
    puts it back."""
    model, opt = trained_pair()
    first = ckpt.save_checkpoint(tmp_path, 5, model=model, optimizer=opt, state={"tag": "old"})
    real_rename = os.rename
    calls = []

    def failing(src, dst):
        calls.append((os.path.basename(src), os.path.basename(dst)))
        if len(calls) == 2:  # old moved aside; the new one fails to move in
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(TemperError, match="Input/output error.*previous checkpoint step_00000005 stays valid"):
        ckpt.save_checkpoint(tmp_path, 5, model=model, optimizer=opt, state={"tag": "new"})
    monkeypatch.setattr(os, "rename", real_rename)
    assert json.loads((first / "state.json").read_text())["tag"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]  # no .tmp-/.old- leftovers
    ckpt.save_checkpoint(tmp_path, 5, model=model, optimizer=opt, state={"tag": "new"})
    assert json.loads((first / "state.json").read_text())["tag"] == "new"


def test_leftovers_of_an_interrupted_save_are_cleaned(tmp_path):
    model, opt = trained_pair()
    (tmp_path / ".tmp-step_00000009-12345").mkdir()
    (tmp_path / ".tmp-step_00000009-12345" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".old-step_00000004-12345").mkdir()
    ckpt.save_checkpoint(tmp_path, 10, model=model, optimizer=opt, state={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]


# ----------------------------------------------------------------------------- one run per output directory

HOLD = """
import sys, time
from temper.io import claim_output_dir
claim_output_dir(sys.argv[1])
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_second_run_into_a_claimed_directory_is_refused_until_the_first_dies(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(TemperError, match=rf"output_dir {out} is in use by another temper run \(pid {holder.pid}"):
            claim_output_dir(out)
        holder.send_signal(signal.SIGKILL)  # no clean exit: the kernel still drops the lock
        holder.wait(timeout=10)
        deadline = time.time() + 5
        while True:
            try:
                claim_output_dir(out)
                break
            except TemperError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        holder.kill()
        release_output_dir(out)


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(TemperError, match="output_dir .*a_file is a file, not a directory"):
        claim_output_dir(path)


def test_sft_into_the_models_own_directory_is_refused(tiny_model_dir, capsys):
    from temper.cli import main

    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    code = main(["sft", f"model={tiny_model_dir}", f"output_dir={tiny_model_dir}", "max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is the model= directory itself" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before


# ----------------------------------------------------------------------------- files whole or not at all


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    from temper import io

    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", no_space)
    with pytest.raises(OSError, match=f"^{re.escape(str(path))}: no space left on device"):  # the file, not its .tmp
        atomic_write_text(path, "new and longer")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_os_errors_are_one_line_without_leftovers(tmp_path, capsys, monkeypatch):
    """A full disk while a run writes its files: one line naming the problem, exit 2, no traceback,
    no temporary files."""
    from conftest import SAMPLE_TEXT

    from temper import io
    from temper.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text(SAMPLE_TEXT)
    out = tmp_path / "run"
    real = io.atomic_write_text

    def full_disk(path, text):
        if str(path).endswith("config.yaml"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, text)

    from temper.train import rundir

    monkeypatch.setattr(rundir, "atomic_write_text", full_disk)  # where config.yaml is written
    args = ["pretrain", "model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=4", f"data={corpus}",
            "max_steps=1", "samples=0", "peak_flops=1e9", "logging.progress=false", f"output_dir={out}"]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"temper pretrain: error: {out / 'config.yaml'}: No space left on device"
    assert "Traceback" not in "\n".join(err)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # a path under a file: the OS says so, in one line
    code = main([*args[:-1], f"output_dir={corpus}/sub"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("temper pretrain: error: ") and "Not a directory" in err[-1]


def test_claiming_a_directory_removes_what_killed_writers_left(tmp_path):
    (tmp_path / ".config.yaml.tmp-4242").write_text("half")
    (tmp_path / "data.tmp-4242").mkdir()
    (tmp_path / ".hidden").write_text("the user's")
    (tmp_path / "notes.tmp").write_text("the user's")
    claim_output_dir(tmp_path)
    release_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", ".temper.lock", "notes.tmp"]
