"""User-facing errors.

A `TemperError` is a mistake in what the user gave us (a file, a key, a value). The
command line prints its message as one line and exits with status 2; it never shows a
traceback for it. Internal invariants use `assert` and are bugs when they fire.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class TemperError(ValueError):
    """Bad input from the user: the message names the file, line, field or key."""


class TemperFileNotFoundError(TemperError, FileNotFoundError):
    """A path the user named does not exist."""


class TemperWriteError(TemperError, OSError):
    """A file could not be written (a full disk, a missing folder): the message names the file the
    user knows, never a temporary name; `errno` is the system's."""

    def __init__(self, message: str, errno: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.strerror = reason or message  # the short reason ("no space left on device")

    def __str__(self) -> str:
        return self.args[0]


def require_path(path, what: str):
    """Return `path` as a Path, or raise a one-line error naming `what` it should be."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TemperFileNotFoundError(f"{what} not found: {p}")
    return p


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def not_regular(path: str | Path) -> str | None:
    """What `path` is when it is not a regular file (a FIFO, a device, a socket, a directory), else None.

    `os.stat` follows symlinks and never blocks, so a link named `x.txt` to /dev/zero is a character
    device here, and a FIFO is found before an `open` that would wait for a writer."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def require_file(path, what: str) -> Path:
    """`path` as a Path when it is a regular file to read; else a one-line error naming `what` and the path.

    Every file temper reads whole or line by line from a user goes through here (data, prompts,
    configs, task files, constitutions, chat templates): a device or a FIFO behind an ordinary name
    would be an endless read or a wait for a writer."""
    p = require_path(path, what)
    kind = not_regular(p)
    if kind is not None:
        link = f" (a link to {os.path.realpath(p)})" if p.is_symlink() else ""
        raise TemperError(f"{p}: {kind}{link}, not a regular file; temper reads {what} only from regular files "
                          "(save the stream to a file first)")
    return p


def error_line(e: BaseException) -> str:
    """One line for the user: the message, or for an OS error the path and what the errno means."""
    if isinstance(e, OSError) and not isinstance(e, ValueError) and e.errno is not None:
        where = f"{e.filename}: " if e.filename else ""
        also = f" -> {e.filename2}" if e.filename2 else ""
        return f"{where[:-2]}{also}: {e.strerror or os.strerror(e.errno)}" if where else (e.strerror or str(e))
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
