"""The shipped YAMLs are package data: a wheel carries them and an installed copy finds them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from temper.configs import shipped_dir

ROOT = Path(__file__).resolve().parents[1]

FIND_FROM_THE_INSTALL = """
import temper
from temper.cli import config_file
from temper.eval.tasks import load_task, resolve_task
print(temper.__file__)
print(load_task(resolve_task("world_qa")).name)
print(config_file("pretrain-shakespeare"))
"""


def test_wheel_carries_the_shipped_yamls_and_an_install_finds_them(tmp_path):
    pytest.importorskip("setuptools")
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in shipped_dir().rglob("*.yaml"))
    assert "temper/configs/tasks/world_qa.yaml" in shipped and "temper/configs/pretrain.yaml" in shipped
    src = tmp_path / "src"  # build from a copy: an in-tree build would leave build/ and *.egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "temper", src / "temper", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=120)
    wheel, = (tmp_path / "dist").glob("temper-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert set(shipped) <= names, sorted(set(shipped) - names)

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", FIND_FROM_THE_INSTALL], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert out[0].startswith(str(target))  # the installed copy, not this checkout
    assert out[1] == "world_qa"
    assert out[2] == str(target / "temper" / "configs" / "pretrain-shakespeare.yaml")
