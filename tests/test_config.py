from dataclasses import dataclass
from typing import Literal

import pytest

from temper.config import (
    CheckpointConfig,
    OptimConfig,
    config_help,
    from_dict,
    load_config,
    opt,
    to_dict,
)
from temper.errors import TemperError


@dataclass
class Inner:
    lr: float = opt(3e-4, "learning rate")
    betas: list[float] = opt([0.9, 0.95], "betas")


@dataclass
class Demo:
    model: str = opt("", "model")
    max_steps: int = opt(100, "steps")
    flag: bool = opt(False, "a flag")
    prompt: str | None = opt(None, "prompt")
    mode: Literal["a", "b"] = opt("a", "mode")
    names: list[str] = opt([], "names")
    optim: Inner = opt(Inner(), "optimiser")


def test_overrides_coerce_to_declared_types():
    c = load_config(Demo, None, ["max_steps=1e3", "flag=true", "optim.lr=1e-3", "names=q_proj,v_proj",
                                 "optim.betas=[0.8, 0.9]", "prompt=a: b", "mode=b"])
    assert c.max_steps == 1000 and c.flag is True
    assert c.optim.lr == pytest.approx(1e-3) and c.optim.betas == [0.8, 0.9]
    assert c.names == ["q_proj", "v_proj"]
    assert c.prompt == "a: b"  # a string field keeps the raw text, even if it looks like YAML
    assert c.mode == "b"


def test_yaml_then_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_steps: 5\noptim:\n  lr: 0.01\n")
    c = load_config(Demo, f, ["optim.lr=0.02"])
    assert c.max_steps == 5 and c.optim.lr == 0.02 and c.optim.betas == [0.9, 0.95]


def test_unknown_key_suggests_nearest():
    with pytest.raises(TemperError, match=r"unknown key 'max_step' \(did you mean 'max_steps'\?\)"):
        load_config(Demo, None, ["max_step=3"])
    with pytest.raises(TemperError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(Demo, None, ["optim.lrr=3"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  betass: [1, 2]\n")
    with pytest.raises(TemperError, match=r"bad.yaml: unknown key 'optim.betass' \(did you mean 'optim.betas'\?\)"):
        load_config(Demo, f)


@pytest.mark.parametrize("item,expected", [
    ("max_steps=ten", "key 'max_steps' expects an integer, got ten"),
    ("max_steps=1.5", "key 'max_steps' expects an integer"),
    ("flag=maybe", "key 'flag' expects true or false"),
    ("optim.lr=fast", "key 'optim.lr' expects a number"),
    ("mode=c", "key 'mode' must be one of a, b"),
    ("optim=3", "key 'optim' expects a section"),
])
def test_wrong_types_are_one_line_errors(item, expected):
    with pytest.raises(TemperError) as e:
        load_config(Demo, None, [item])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml_reports_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(TemperError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(Demo, f)


def test_null_for_optional():
    assert load_config(Demo, None, ["prompt=null"]).prompt is None


def test_help_rows_cover_every_field_with_type_and_default():
    rows = {r[0]: r for r in config_help(Demo)}
    assert set(rows) == {"model", "max_steps", "flag", "prompt", "mode", "names", "optim.lr", "optim.betas"}
    assert rows["max_steps"][1:3] == ("int", "100")
    assert rows["optim.lr"][1] == "float" and rows["mode"][1] == "{a,b}"
    assert rows["prompt"][1] == "str | null"


def test_round_trip_through_dict():
    c = load_config(Demo, None, ["optim.lr=0.5", "names=[x]"])
    assert from_dict(Demo, to_dict(c)) == c


def test_shared_sections_have_help():
    for section in (OptimConfig, CheckpointConfig):
        assert all(r[3] for r in config_help(section))


@dataclass
class Stage:
    optim: Inner = opt(Inner(lr=0.5), "a section whose default differs from the class default")


def test_section_keeps_stage_defaults_for_keys_not_given():
    c = load_config(Stage, None, ["optim.betas=[0.1, 0.2]"])
    assert c.optim.lr == 0.5 and c.optim.betas == [0.1, 0.2]
    assert load_config(Stage, None, []).optim.lr == 0.5


# ----------------------------------------------------------------------------- values checked up front


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-3", "optim.lr must be at least 0, got -0.001"),
    ("optim.lr=nan", "key 'optim.lr' expects a finite number, got nan"),
    ("optim.betas=[0.9, 1.0]", r"optim.betas\[1\] must be in \[0, 1\), got 1.0"),
    ("optim.eps=0", "optim.eps must be greater than 0, got 0.0"),
    ("loss_chunk=0", "loss_chunk must be at least 1, got 0"),
    ("schedule.warmup_ratio=1.5", r"schedule.warmup_ratio must be in \[0, 1\], got 1.5"),
    ("schedule.warmup_steps=-2", "schedule.warmup_steps must be -1"),
    ("eval_fraction=1", r"eval_fraction must be in \[0, 1\), got 1.0"),
    ("logging.every=0", "logging.every must be at least 1, got 0"),
    ("checkpoint.every=-5", "checkpoint.every must be at least 0, got -5"),
    ("eval_data=val.txt", "eval_data is used only with data=; the built-in world brings its own validation split"),
    ("world.num_people=3", None),  # fine with the world
])
def test_pretrain_values_are_checked_before_anything_runs(override, message):
    from temper.recipes import pretrain

    if message is None:
        load_config(pretrain.Config, None, [override])
        return
    with pytest.raises(TemperError, match=message):
        load_config(pretrain.Config, None, [override])


def test_options_a_mode_would_ignore_are_refused():
    from temper.recipes import pretrain, sft

    with pytest.raises(TemperError, match=r"world.\* is used only with the built-in world \(data= empty\)"):
        load_config(pretrain.Config, None, ["data=a.txt", "world.num_people=3"])
    with pytest.raises(TemperError, match="eval_fraction is used only with data= and no eval_data="):
        load_config(sft.Config, None, ["model=m", "data=x.jsonl", "eval_data=x.jsonl", "eval_fraction=0.3"])
    with pytest.raises(TemperError, match="replay_batch_size is used only with replay_weight > 0"):
        load_config(sft.Config, None, ["model=m", "replay_batch_size=4"])
    cfg = load_config(sft.Config, None, ["model=m", "data=x.jsonl", "eval_fraction=0"])
    assert cfg.eval_fraction == 0.0  # 0: hold none out


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path):
    from temper.recipes import pretrain

    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 10\noptim:\n  lr: 1.0e-3\n  lr: 3.0e-3\n")
    with pytest.raises(TemperError, match=r"run.yaml:4: key 'lr' appears twice"):
        load_config(pretrain.Config, path)
    path.write_text("max_steps: 10\nmax_steps: 20\n")
    with pytest.raises(TemperError, match=r"run.yaml:2: key 'max_steps' appears twice"):
        load_config(pretrain.Config, path)
    path.write_text("max_steps: 10\noptim: {lr: 1.0e-3}\nschedule: {name: linear}\n")  # distinct keys load
    assert load_config(pretrain.Config, path).optim.lr == pytest.approx(1e-3)
