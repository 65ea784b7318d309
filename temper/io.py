"""Files a command writes appear whole or not at all, and one run owns an output directory.

- `atomic_write_text` / `atomic_write_bytes` / `atomic_writer`: write beside the target,
  fsync, rename over it. A crash, Ctrl-C or a full disk leaves the old file (or none), never
  a truncated one, and no temporary file behind.
- `claim_output_dir`: an exclusive `flock` on `OUTPUT_DIR/.temper.lock`, held until the
  process ends (or `release_output_dir`). The kernel drops it when the process dies, even
  by SIGKILL, so a lock is never stale; a second run into the same directory is refused
  with the holder's pid and command.
- `refuse_same_dir`: an output directory must not be an input's own directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from temper.errors import TemperError

try:
    import fcntl
except ImportError:  # not on POSIX (Windows): output directories are not locked
    fcntl = None

LOCK_NAME = ".temper.lock"
_held: dict[str, int] = {}  # resolved directory -> the open, locked file descriptor


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    binary = "b" in mode
    try:
        with open(tmp, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path, "wb") as f:
        f.write(data)


def claim_output_dir(path: str | Path) -> Path:
    """Create `path` and lock it for this process; refuse if another process holds it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise TemperError(f"output_dir {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    if key in _held:  # this process ran here before (a library user, a test): take it afresh
        release_output_dir(out)
    if fcntl is None:  # not on POSIX: no locking, as before
        return out
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise TemperError(f"output_dir {out} is in use by another temper run ({holder}); wait for it to end "
                          "or choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv[:1] + sys.argv[1:3])}".encode())
    _held[key] = fd
    remove_partial_writes(out)
    return out


def remove_partial_writes(out: Path) -> list[str]:
    """What a killed writer left in `out`: `.NAME.tmp-PID` files of `atomic_writer` and `NAME.tmp-PID`
    directories of shard building. Only called with the directory's lock held, so no live
    process is writing them."""
    removed = []
    for p in out.iterdir():
        if (p.is_file() and re.fullmatch(r"\..+\.tmp-\d+", p.name)) or (
                p.is_dir() and re.fullmatch(r".+\.tmp-\d+", p.name)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


@contextlib.contextmanager
def owned_output_dir(path: str | Path) -> Iterator[Path]:
    """`claim_output_dir` for the length of a command; released at the end, and a directory this
    command created is removed again if it fails (a failed run leaves no empty output_dir)."""
    out = Path(path)
    existed = out.exists()
    claim_output_dir(out)
    try:
        yield out
    except BaseException:
        if not existed:
            release_output_dir(out)
            (out / LOCK_NAME).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        release_output_dir(out)


def release_output_dir(path: str | Path) -> None:
    fd = _held.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def refuse_same_dir(output_dir: str | Path, input_dir: str | Path, input_key: str) -> None:
    """Writing into an input's own directory would overwrite what is being read."""
    out, src = Path(output_dir), Path(input_dir)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise TemperError(f"output_dir {out} is the {input_key}= directory itself; writing there would overwrite "
                          f"it: choose another output_dir")
