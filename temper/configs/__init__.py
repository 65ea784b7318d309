"""The YAMLs shipped inside the package: stage configs (`STAGE[-variant].yaml`), eval tasks (`tasks/`)
and `temper run` pipelines (`pipelines/`).

They are package data, so a wheel install has them too. `temper STAGE --config NAME` takes
the name of a shipped config (e.g. `pretrain-shakespeare`) as well as a file; `temper eval
tasks=NAME` takes the name of a shipped task.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["shipped_dir", "shipped_names", "shipped_path"]


def shipped_dir(kind: str = "") -> Path:
    """The folder of the installed package that holds the shipped YAMLs ("" configs, "tasks" tasks, "pipelines" pipelines)."""
    return Path(str(files(__name__))) / kind


def shipped_names(kind: str = "") -> list[str]:
    """The names (file stems) of the shipped YAMLs of one kind."""
    folder = shipped_dir(kind)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def shipped_path(name: str, kind: str = "") -> Path | None:
    """The shipped YAML called `name` (with or without .yaml), or None when there is none."""
    stem = name.removesuffix(".yaml")
    if not stem or "/" in stem or "\\" in stem:
        return None
    path = shipped_dir(kind) / f"{stem}.yaml"
    return path if path.is_file() else None
