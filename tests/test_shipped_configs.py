"""Every YAML in configs/ loads into its stage's typed config (configs/STAGE[-variant].yaml)."""

import importlib
from pathlib import Path

import pytest

from temper.cli import STAGES
from temper.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    stage = path.stem.split("-")[0]
    assert stage in STAGES, f"{path.name}: no stage named {stage}"
    cfg = load_config(importlib.import_module(STAGES[stage][0]).Config, path)
    assert cfg is not None
