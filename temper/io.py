"""Every file a command writes appears whole or not at all, and every target is claimed before
any work, so that nothing the user has is lost.

Writing (`atomic_path`, `atomic_writer`, `atomic_write_text`, `atomic_write_bytes`,
`write_safetensors`): the file is written beside its target under a hidden temporary name,
fsynced, given the mode the umask asks for, and renamed over the target. A crash, Ctrl-C or
a full disk leaves the old file (or none), never a truncated one, and no temporary file
behind; a failure is one line naming the target, never the temporary name ("no space left on
device", "the folder ... does not exist"). Files follow the umask like every other tool's
(0644 under umask 022): safetensors' own `save_file` writes a 0600 temporary file and renames
it, which is why every `*.safetensors` temper wrote was 0600 whatever the umask.

Claiming (before any work, so that a refusal changes nothing):

- `claim_output_dir`: a directory a command writes. It is never a file, never one of the
  command's input directories (`inputs`), and never a model directory the command did not
  create: a directory holding `config.json` or `adapter_config.json` belongs to the command
  named by its `temper.json` (`stage`), or to no temper command when it has none (a
  downloaded model). A command that writes a model there (`writes_model`: pretrain, sft, dpo,
  merge) replaces another's model only with `overwrite=true`; any other command (tokenizer,
  world, eval, online-dpo) never writes into a model directory, as its files would mix into
  the model's. What the command itself wrote there earlier (`earlier`) is replaced only with
  `overwrite=true`. Then an exclusive `flock` on `OUTPUT_DIR/.temper.lock`, held until the
  process ends (or `release_output_dir`); the kernel drops it when the process dies, even by
  SIGKILL, so a lock is never stale, and a second command into the same directory is refused
  with the holder's pid and command.
- `claim_output_file`: a file a command writes outside an output directory (`generate
  output_file=`, `eval contamination output=`). Refused: a path that is not a regular file (a
  device node, a FIFO, a socket, anything under /dev, /proc or /sys, through a symlink too),
  one of the command's input files, a file inside a model directory or a temper output
  directory (one holding `.temper.lock`), a missing folder (named), and an existing file
  without `overwrite=true`; a second writer of the same file is refused by a `flock` on it.
- `refuse_same_dir`: an output directory must not be an input's own directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from temper.errors import TemperError, TemperWriteError

try:
    import fcntl
except ImportError:  # not on POSIX (Windows): output directories are not locked
    fcntl = None

LOCK_NAME = ".temper.lock"
LINEAGE_FILE = "temper.json"  # temper.lineage.FILE: which command wrote a model directory
SYSTEM_DIRS = ("/dev", "/proc", "/sys")
_held: dict[str, int] = {}  # resolved directory -> the open, locked file descriptor
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors and tokenizers report an OSError


# ----------------------------------------------------------------------------- writing


def file_mode() -> int:
    """The mode a new file gets under the current umask (0644 under umask 022), as `open` gives."""
    try:  # Linux: read it, rather than set it for a moment (another thread could create a file then)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def write_error(path: str | Path, error: BaseException) -> BaseException:
    """The one-line error for a failed write of `path` (not its temporary name); `error` itself
    when it is no OS error (a bug, Ctrl-C)."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code is None and not isinstance(error, OSError):  # safetensors / tokenizers: "... (os error 28)"
        found = _RUST_OS_ERROR.search(str(error))
        code = int(found.group(1)) if found else None
    if code is None:
        return error
    path = Path(path)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        reason = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        return TemperWriteError(f"{path}: {reason} (nothing was written; an earlier file there is unchanged)",
                                code, reason)
    if code == errno.ENOENT and not path.parent.is_dir():
        return TemperWriteError(f"{path}: the folder {path.parent} does not exist", code, "no such folder")
    reason = os.strerror(code).lower()
    return TemperWriteError(f"{path}: could not write it ({reason})", code, reason)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that takes a file name (safetensors,
    tokenizers); when the block ends it is fsynced, given the umask's mode and renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        mapped = write_error(path, e)
        if mapped is e:
            raise
        raise mapped from None


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", encoding: str | None = "utf-8",
                  newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`."""
    binary = "b" in mode
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if binary else encoding, newline=newline) as f:
        yield f
        f.flush()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path, "wb") as f:
        f.write(data)


def write_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, atomically, following the umask, failing in one line."""
    from safetensors.torch import (
        save_file,  # lazy: imports torch, which text-only commands (world, tokenizer) skip
    )

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ----------------------------------------------------------------------------- what a directory holds


def model_writer(path: str | Path) -> str | None:
    """Which command wrote the model in `path`: its `temper.json` stage, '' for a model no temper
    command wrote (a downloaded one), None when `path` holds no model."""
    path = Path(path)
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        return None
    try:
        stage = json.loads((path / LINEAGE_FILE).read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        return ""
    return stage if isinstance(stage, str) else ""


def _input_paths(inputs: Mapping[str, Any] | None) -> Iterator[tuple[str, Path]]:
    for key, value in (inputs or {}).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item:
                yield key, Path(str(item)).expanduser()


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


# ----------------------------------------------------------------------------- output directories


def claim_output_dir(path: str | Path, *, command: str | None = None, inputs: Mapping[str, Any] | None = None,
                     overwrite: bool = False, writes_model: bool = False,
                     earlier: Callable[[Path], list[str]] | None = None) -> Path:
    """Check `path` as the module says (for `command`; None: only the lock), create it and lock it
    for this process; refuse if another process holds it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise TemperError(f"output_dir {out} is a file, not a directory")
    for key, src in _input_paths(inputs):
        if src.is_dir():
            refuse_same_dir(out, src, key)
    if command is not None:
        refuse_foreign_model(out, command, overwrite=overwrite, writes_model=writes_model)
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    if key in _held:  # this process ran here before (a library user, a test): take it afresh
        release_output_dir(out)
    if fcntl is not None:
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
    if earlier is not None and not overwrite:
        found = earlier(out)
        if found:
            release_output_dir(out)
            raise TemperError(f"output_dir {out} holds an earlier output ({', '.join(found)}): overwrite=true "
                              "replaces it, or choose another output_dir")
    remove_partial_writes(out)
    return out


def refuse_foreign_model(out: Path, command: str, *, overwrite: bool, writes_model: bool) -> None:
    """A model directory `command` did not create is not its output (see the module)."""
    writer = model_writer(out)
    if writer is None or (writes_model and writer == command):
        return
    whose = f"written by temper {writer}" if writer else "not written by temper"
    if not writes_model:
        raise TemperError(f"output_dir {out} holds a model ({whose}); temper {command} does not write models and "
                          "would mix its files into it: choose another output_dir")
    if not overwrite:
        raise TemperError(f"output_dir {out} already holds a model ({whose}): choose another output_dir, or "
                          "overwrite=true to replace it")


def weights_bytes(directory: str | Path) -> int:
    """Bytes of a model directory's weights on disk: every *.safetensors file in it (an adapter
    directory: its adapter; a quantised one: its packed weights)."""
    return sum(p.stat().st_size for p in Path(directory).expanduser().glob("*.safetensors") if p.is_file())


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to the disk (a rename is durable only then)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open a directory; nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if Path(path).is_dir():  # e.g. EINVAL for directories on some file systems
            return
        raise e
    finally:
        os.close(fd)


def publish_model_files(tmp: Path, out: Path) -> None:
    """Move a model written into `tmp` (inside `out`) into `out`: every file synced first, `config.json`
    removed (from here until the end `out` is visibly no model), weight shards of an earlier model
    that the new one does not have dropped, then the files moved in with `config.json` last (it is
    what makes a directory a model)."""
    new = sorted(p.name for p in tmp.iterdir())
    for name in new:
        fsync_path(tmp / name)
    (out / "config.json").unlink(missing_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        if stale.name not in new:
            stale.unlink(missing_ok=True)
    for name in [n for n in new if n != "config.json"] + ["config.json"]:
        os.replace(tmp / name, out / name)
    fsync_path(out)


def remove_partial_writes(out: Path) -> list[str]:
    """What a killed writer left in `out`: `.NAME.tmp-PID` files of `atomic_path`, `NAME.tmp-PID`
    directories of shard building and `.tmpXXXXXX` files of safetensors' own writer. Only called
    with the directory's lock held, so no live process is writing them."""
    removed = []
    for p in out.iterdir():
        if (p.is_file() and (re.fullmatch(r"\..+\.tmp-\d+", p.name) or re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", p.name))
                or (p.is_dir() and re.fullmatch(r".+\.tmp-\d+", p.name))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


@contextlib.contextmanager
def owned_output_dir(path: str | Path, **claim: Any) -> Iterator[Path]:
    """`claim_output_dir` (with its checks, `claim`) for the length of a command; released at the
    end, and a directory this command created is removed again if it fails (a failed run leaves
    no empty output_dir)."""
    out = Path(path)
    existed = out.exists()
    claim_output_dir(out, **claim)
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


# ----------------------------------------------------------------------------- output files


@contextlib.contextmanager
def claim_output_file(path: str | Path, *, key: str, inputs: Mapping[str, Any] | None = None,
                      overwrite: bool = False) -> Iterator[Path]:
    """Claim the file `key=path` for the length of the block (see the module); yields the path to
    write (a symlink resolved, so that the link's target is what gets replaced). A file this
    claim created as its lock is removed again if the block fails."""
    given = Path(path).expanduser()
    target = given.resolve() if given.is_symlink() or given.exists() else given.absolute()
    where = f"{key}={given}" + (f" (-> {target})" if given.is_symlink() else "")
    if any(target == Path(d) or Path(d) in target.parents for d in SYSTEM_DIRS):
        raise TemperError(f"{where} is a system path (under /dev, /proc or /sys), not a file to write: choose "
                          "a regular file")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise TemperError(f"{where} is {_describe(st.st_mode)}, not a regular file: choose a file to write")
    for input_key, src in _input_paths(inputs):
        if _same(target, src):
            raise TemperError(f"{where} is the {input_key}= file itself; writing there would overwrite what is "
                              "being read: choose another file")
    for folder in target.parents:
        owner = model_writer(folder)
        if owner is not None or (folder / LOCK_NAME).exists():
            what = "a model directory" if owner is not None else "a temper output directory"
            raise TemperError(f"{where} lies inside {what} ({folder}); writing there could replace its files: "
                              "choose a file outside it")
    if not target.parent.is_dir():
        raise TemperError(f"{where}: the folder {target.parent} does not exist" if not target.parent.exists()
                          else f"{where}: {target.parent} is not a folder")
    created = st is None
    try:  # the lock: a flock on the file itself (O_NONBLOCK: a FIFO swapped in meanwhile cannot hang us)
        fd = os.open(target, os.O_RDWR | os.O_NONBLOCK | (os.O_CREAT | os.O_EXCL if created else 0), file_mode())
    except FileExistsError:  # created by another writer since the check above
        raise TemperError(f"{where} is being written by another temper command: wait for it to end, or choose "
                          "another file") from None
    except OSError as e:
        raise write_error(target, e) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TemperError(f"{where} is {_describe(os.fstat(fd).st_mode)}, not a regular file")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TemperError(f"{where} is being written by another temper command: wait for it to end, or "
                                  "choose another file") from None
        if not created and not overwrite:
            raise TemperError(f"{where} exists: overwrite=true replaces it, or choose another file")
        yield target
    except BaseException:
        if created and target.exists() and os.path.samestat(os.stat(target), os.fstat(fd)):
            target.unlink()  # the empty file that held the lock; nothing was written
        raise
    finally:
        os.close(fd)

