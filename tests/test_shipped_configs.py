"""Every shipped YAML (temper/configs/STAGE[-variant].yaml) loads into its stage's typed config."""

import importlib

import pytest

from temper.cli import COMMANDS
from temper.config import load_config
from temper.configs import shipped_dir

CONFIGS = sorted(shipped_dir().glob("*.yaml"))


def test_there_are_shipped_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    stage = path.stem.split("-")[0]
    assert stage in COMMANDS, f"{path.name}: no stage named {stage}"
    cfg = load_config(importlib.import_module(COMMANDS[stage].module).Config, path)
    assert cfg is not None


def test_config_flag_takes_a_shipped_name(capsys, tmp_path, monkeypatch):
    from temper.cli import main

    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the name alone must find the packaged file
    assert main(["pretrain", "--config", "pretrain-shakespeare", "--print-config"]) == 0
    assert "output_dir: runs/shakespeare" in capsys.readouterr().out
    (tmp_path / "pretrain-shakespeare").write_text("output_dir: runs/mine\n")  # a file wins over a name
    assert main(["pretrain", "--config", "pretrain-shakespeare", "--print-config"]) == 0
    assert "output_dir: runs/mine" in capsys.readouterr().out
    assert main(["pretrain", "--config", "pretrain-tiny", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "config file not found: pretrain-tiny (shipped configs: curate-world, pretrain, pretrain-shakespeare)" in err
