"""A run's output directory, from claim to release: what every training recipe and every
workflow does with the directory it writes.

    run_dir = RunDir(out)
    run_dir.claim(resume=cfg.resume, overwrite=cfg.overwrite)   # lock; refuse an earlier run
    ...                                                          # load the model and data
    run_dir.begin(cfg, start_over=True)                          # clear the earlier run; config.yaml
    metrics = run_dir.metrics(resume_step=None)                  # metrics.jsonl
    run_dir.finish(summary)                                      # summary.json; release the lock

- One run owns its directory: a `flock` (`temper.io.claim_output_dir`, dropped by the kernel
  when the process dies) keeps a second run out.
- A directory holding an earlier run is refused unless `resume=` continues it or
  `overwrite=true` starts over. Nothing is cleared at the claim: the earlier run's files go
  only at `begin`, once the model and data are ready, so a run refused or failing before that
  leaves the directory as it was.
- What an earlier run left is a function the caller may replace (`earlier=`): a training
  run's metrics, summary and checkpoints; a workflow's rounds.
- The claim also refuses the directories `temper.io.claim_output_dir` refuses (an input, a
  model another command wrote), and a resume of a checkpoint whose recorded settings differ
  from this run's (`check_resume_settings`): all of it before any cache (tokenised data, a
  tokenizer, reference log-probs) is built, so a refused run leaves the directory as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from temper.config import to_dict
from temper.errors import TemperError
from temper.io import atomic_write_text, claim_output_dir, owned_output_dir, release_output_dir
from temper.train.checkpoint import latest_checkpoint, list_checkpoints, resolve_resume

RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints", "tensorboard")


def earlier_run_files(out: Path) -> list[str]:
    """What an earlier training run left in `out` (its metrics, summary or checkpoints)."""
    found = [name for name in ("metrics.jsonl", "summary.json") if (out / name).is_file()]
    found += [f"checkpoints/{p.name}" for p in list_checkpoints(out / "checkpoints")[-1:]]
    return found


def check_earlier_run(out: Path, resume: str, overwrite: bool,
                      earlier: Callable[[Path], list[str]] = earlier_run_files) -> None:
    """Refuse a directory that holds an earlier run, unless told to continue it or start over."""
    if overwrite and resume:
        raise TemperError("resume= and overwrite=true contradict each other: continue the run, or start over")
    found = earlier(out)
    if not found or overwrite:
        return
    if not resume:
        raise TemperError(f"output_dir {out} holds an earlier run ({', '.join(found)}): resume=auto continues it, "
                          "overwrite=true starts over, or choose another output_dir")
    if earlier is earlier_run_files and resume == "auto" and latest_checkpoint(out / "checkpoints") is None:
        if found == ["metrics.jsonl"]:
            # stopped before its first checkpoint: nothing to continue and nothing to lose but its partial
            # metrics, so `resume=auto` (what a requeued job always passes) starts it again from step 0
            print(f"resume=auto: {out} holds no checkpoint yet (the earlier run stopped before its first one): "
                  "starting from step 0", file=sys.stderr)
            return
        raise TemperError(f"output_dir {out} holds an earlier run ({', '.join(found)}) but no valid checkpoint to "
                          "resume: overwrite=true starts over, or choose another output_dir")


def check_resume_settings(out: Path, resume: str, cfg: Any, may_change: Iterable[str]) -> None:
    """A checkpoint resumes only the run that wrote it: every setting it recorded must be this
    run's (`cfg`'s), except those in `may_change` (a key, or a section with all its keys: how
    long, how fast, on what hardware and how it is logged). A key that one side's temper version
    did not have is no difference. Checked at the claim, before the run builds or rebuilds any
    cache from its settings; the loop checks the rest (the tokenizer and data fingerprints, the
    global batch) once they exist."""
    found = resolve_resume(resume, out / "checkpoints") if resume else None
    if found is None:
        return
    try:
        saved = json.loads((found / "state.json").read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):  # damaged: the loop's own checks say so
        return
    if not isinstance(saved, dict):
        return
    free = set(may_change)
    differ = []
    for f in dataclasses.fields(cfg):
        if f.name in free or f.name not in saved:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):  # a section: its keys one by one
            pairs = [(f"{f.name}.{k}", (saved[f.name] or {}).get(k), v) for k, v in _plain(to_dict(value)).items()
                     if isinstance(saved[f.name], dict) and k in saved[f.name] and f"{f.name}.{k}" not in free]
        else:
            pairs = [(f.name, saved[f.name], _plain(to_dict(value)))]
        differ += [f"{key} {a!r} -> {b!r}" for key, a, b in pairs if not _same_setting(a, b)]
    if differ:
        raise TemperError(f"{found} belongs to another run ({'; '.join(differ)}): resume it with the same settings, "
                          "or overwrite=true to start over")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # as state.json holds it (tuples -> lists)


def _same_setting(a: Any, b: Any) -> bool:
    """Equal, or the same files named two ways (a relative and an absolute path)."""
    if a == b:
        return True
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str) and a and b:
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return False


def clear_earlier_run(out: Path, names: Iterable[str] = RUN_FILES) -> None:
    """overwrite=true: the earlier run's files go (caches such as tokenised data stay)."""
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class RunDir:
    """One run's output directory. Only the main process (rank 0) writes files."""

    def __init__(self, path: str | Path, *, main: bool = True) -> None:
        self.path, self.main = Path(path), main

    def claim(self, *, resume: str, overwrite: bool, earlier: Callable[[Path], list[str]] = earlier_run_files,
              command: str | None = None, inputs: Mapping[str, Any] | None = None,
              settings: Any = None, may_change: Iterable[str] = ()) -> Path:
        """Lock the directory for this process and check what an earlier run left (see module):
        `command` and `inputs` as `temper.io.claim_output_dir` takes them (a training run writes a
        model), `settings` (the run's config) against a resumed checkpoint's."""
        claim_output_dir(self.path, command=command, inputs=inputs, overwrite=overwrite, writes_model=True)
        try:
            check_earlier_run(self.path, resume, overwrite, earlier)
            if settings is not None:
                check_resume_settings(self.path, resume, settings, may_change)
        except TemperError:
            release_output_dir(self.path)
            raise
        return self.path

    @classmethod
    @contextlib.contextmanager
    def owned(cls, path: str | Path, *, resume: str, overwrite: bool,
              earlier: Callable[[Path], list[str]] = earlier_run_files, command: str | None = None,
              inputs: Mapping[str, Any] | None = None) -> Iterator[RunDir]:
        """A workflow's directory for the length of a block: claimed and checked as `claim` does
        (a workflow writes no model of its own there), released at the end; a directory the block
        created is removed again if it fails."""
        with owned_output_dir(path, command=command, inputs=inputs, overwrite=overwrite) as out:
            check_earlier_run(out, resume, overwrite, earlier)
            yield cls(out)

    def begin(self, cfg: Any, *, start_over: bool, names: Iterable[str] = RUN_FILES) -> None:
        """Training starts: clear the earlier run's files when starting over; write `config.yaml`."""
        if not self.main:
            return
        if start_over:
            clear_earlier_run(self.path, names)
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def metrics(self, *, resume_step: int | None, tensorboard: bool = False) -> MetricsLog | None:
        if not self.main:
            return None
        return MetricsLog(self.path / "metrics.jsonl", resume_step=resume_step,
                          tensorboard_dir=self.path / "tensorboard" if tensorboard else None)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.main:
            atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        """`summary.json`, then the lock is released."""
        self.write_summary(summary)
        self.release()

    def release(self) -> None:
        if self.main:
            release_output_dir(self.path)


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step. On resume, rows after the checkpoint go."""

    def __init__(self, path: str | Path, *, resume_step: int | None = None, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency
            except ImportError:
                raise TemperError("logging.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, row.get("step", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
