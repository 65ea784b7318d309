"""User-facing errors.

A `TemperError` is a mistake in what the user gave us (a file, a key, a value). The
command line prints its message as one line and exits with status 2; it never shows a
traceback for it. Internal invariants use `assert` and are bugs when they fire.
"""

from __future__ import annotations


class TemperError(ValueError):
    """Bad input from the user: the message names the file, line, field or key."""


class TemperFileNotFoundError(TemperError, FileNotFoundError):
    """A path the user named does not exist."""


def require_path(path, what: str):
    """Return `path` as a Path, or raise a one-line error naming `what` it should be."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.exists():
        raise TemperFileNotFoundError(f"{what} not found: {p}")
    return p
