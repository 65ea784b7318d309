"""precision=auto: bf16 on a CPU only where its bf16 matmuls are measured clearly faster."""

from __future__ import annotations

import pytest
import torch

from temper.errors import TemperError
from temper.train import engine

CPU = torch.device("cpu")


@pytest.fixture
def unpinned(monkeypatch):
    """auto as a user meets it: no TEMPER_AUTO_PRECISION, the measurement replaced by `speedup`."""
    monkeypatch.delenv(engine.AUTO_PRECISION_ENV, raising=False)

    def with_speedup(value: float) -> None:
        monkeypatch.setattr(engine, "cpu_bf16_speedup", lambda: value)
    return with_speedup


def test_auto_picks_bf16_only_where_the_cpu_measures_it_clearly_faster(unpinned):
    unpinned(3.4)  # AVX512_BF16 / AMX
    precision, why = engine.choose_precision("auto", CPU)
    assert precision == "bf16" and "3.4x" in why
    unpinned(0.25)  # AVX2: bf16 emulated
    precision, why = engine.choose_precision("auto", CPU)
    assert precision == "fp32" and "0.25x" in why
    unpinned(engine.CPU_BF16_MIN_SPEEDUP * 0.99)  # a little faster is not enough to change the numerics
    assert engine.choose_precision("auto", CPU)[0] == "fp32"


def test_the_environment_pins_auto_and_an_asked_precision_is_kept(unpinned, monkeypatch):
    unpinned(10.0)
    monkeypatch.setenv(engine.AUTO_PRECISION_ENV, "fp32")
    assert engine.choose_precision("auto", CPU) == ("fp32", "TEMPER_AUTO_PRECISION=fp32")
    monkeypatch.setenv(engine.AUTO_PRECISION_ENV, "bf16")
    assert engine.choose_precision("auto", CPU)[0] == "bf16"
    monkeypatch.setenv(engine.AUTO_PRECISION_ENV, "fp8")
    with pytest.raises(TemperError, match="TEMPER_AUTO_PRECISION='fp8': expected fp32 or bf16"):
        engine.choose_precision("auto", CPU)
    monkeypatch.delenv(engine.AUTO_PRECISION_ENV)
    assert engine.choose_precision("fp32", CPU) == ("fp32", "asked for")  # never measured, whatever the CPU
    with pytest.raises(TemperError, match="fp16 needs a GPU"):
        engine.choose_precision("fp16", CPU)


def test_the_measurement_is_a_positive_ratio_taken_once():
    engine.cpu_bf16_speedup.cache_clear()
    first = engine.cpu_bf16_speedup()
    assert first > 0
    assert engine.cpu_bf16_speedup() is first  # cached: a run measures once


def test_a_training_run_trains_in_what_auto_chose(unpinned, tmp_path):
    """(What it prints, "precision auto -> bf16: ...", once training starts, is checked in every training
    stage's log by test_run's end-to-end lifecycle.)"""
    from temper.train.recipe import TrainingConfig, start

    unpinned(3.0)
    run = start(TrainingConfig(output_dir=str(tmp_path / "out")), inputs=())
    assert run.precision == "bf16"
    with run.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    run.par.close()
    unpinned(0.3)
    run = start(TrainingConfig(output_dir=str(tmp_path / "out2")), inputs=())
    assert run.precision == "fp32"
    run.par.close()
