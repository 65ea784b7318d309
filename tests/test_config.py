import importlib
import pathlib
import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Literal

import pytest

from temper.cli import COMMANDS, main
from temper.config import (
    CheckpointConfig,
    OptimConfig,
    config_help,
    from_dict,
    load_config,
    opt,
    to_dict,
)
from temper.data.tokenizer import MAX_VOCAB_SIZE, train_tokenizer
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



# ----------------------------------------------------------------------------- round 2: settings refused at load

CONFIGS = {name: importlib.import_module(command.module).Config for name, command in COMMANDS.items()}
# a command whose key chooses another module (pretrain objective=mlm: the encoder recipe): each such module once
VARIANTS = {f"{name} {c.variants.key}={value}": module for name, c in COMMANDS.items() if c.variants
            for module, value in {m: v for v, m in reversed(list(c.variants.modules.items()))}.items()}
CONFIGS.update({label: importlib.import_module(module).Config for label, module in VARIANTS.items()})
# the fewest keys each command needs to load (nothing is read: these are names only)
MINIMAL = {"pretrain": [], "sft": ["model=m"], "dpo": [], "reward": [], "reward score": ["model=m", "data=x.jsonl"],
           "grpo": [], "ppo": [], "online-dpo": [], "eval": ["model=m", "tasks=t"],
           "eval contamination": ["train=a.txt", "eval=b.jsonl"], "merge": ["adapter=a"],
           "generate": ["model=m", "prompt=x"], "chat": ["model=m"], "serve": ["model=m"], "estimate": ["model=7b"], "world": [],
           "tokenizer": ["data=x.txt"], "plot": ["runs=[r]"], "curate": ["data=x.jsonl"], "finetune-encoder": [],
           "embed": ["model=m", "data=x.jsonl", "output=o.npy"], "pretrain objective=mlm": ["objective=mlm"],
           "export": ["model=m"],
           "quantize": ["model=m"], "run": [], "report": ["run_dir=r"]}


def test_every_command_has_its_minimal_keys():
    assert set(MINIMAL) == set(COMMANDS) | set(VARIANTS)


FLOAT_KEYS = [(name, key) for name, cls in CONFIGS.items() for key, typ, _, _ in config_help(cls)
              if typ in ("float", "list[float]")]


@pytest.mark.parametrize("command, key", FLOAT_KEYS, ids=[f"{c}:{k}" for c, k in FLOAT_KEYS])
def test_every_float_setting_refuses_nan_and_infinity(command, key):
    assert len(FLOAT_KEYS) > 40  # every command's numbers, not a hand-picked few
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(TemperError, match=rf"key '{re.escape(key)}(\[0\])?' expects a finite number, got {bad}"):
            load_config(CONFIGS[command], None, [*MINIMAL[command], f"{key}={bad}"])


NAMED_KEYS = [(name, key, default) for name, cls in CONFIGS.items() for key, typ, default, _ in config_help(cls)
              if typ == "str" and default.strip()]


@pytest.mark.parametrize("command, key, default", NAMED_KEYS, ids=[f"{c}:{k}" for c, k, _ in NAMED_KEYS])
def test_a_setting_that_names_something_is_never_empty(command, key, default):
    if key == "output_dir":
        assert default  # every command that writes a directory is here
    with pytest.raises(TemperError, match=rf"key '{re.escape(key)}' is empty; give a value \(default: "):
        load_config(CONFIGS[command], None, [*MINIMAL[command], f"{key}="])


def test_every_writing_command_refuses_an_empty_output_dir():
    writers = {c for c, k, _ in NAMED_KEYS if k == "output_dir"}
    assert writers >= {"pretrain", "sft", "dpo", "online-dpo", "eval", "merge", "tokenizer", "world"}


@pytest.mark.parametrize("argv, message", [
    (["max_steps=1", "max_steps=2"], r"key 'max_steps' is given twice on the command line \('max_steps=1' and "
                                     r"'max_steps=2'\): give it once"),
    (["--max_steps=1", "max_steps=2"], "key 'max_steps' is given twice"),
    (["optim.lr=1e-3", "optim.lr=1e-3"], "key 'optim.lr' is given twice"),  # even the same value: one was a slip
    (["optim={lr: 1}", "optim.lr=2"], r"'optim=\{lr: 1\}' and 'optim.lr=2' both set 'optim': give one"),
    (["--config", "a.yaml", "--config=b.yaml"], r"--config is given twice \(a.yaml and b.yaml\)"),
])
def test_a_key_or_config_given_twice_on_one_command_line_is_refused(capsys, argv, message):
    assert main(["pretrain", *argv, "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_the_command_line_overrides_its_config_file(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 10\noptim: {lr: 1.0e-3}\n")
    assert main(["pretrain", "--config", str(path), "max_steps=7", "optim.lr=2e-3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "lr: 0.002" in out


# (command, settings with the mode off: refused naming the key, the same key with the mode on: loads)
ONLY_WITH = [
    ("sft", ["peft.r=4"], ["peft.method=lora", "peft.r=4"], "peft.r"),
    ("sft", ["peft.method=lora", "peft.adapter_dim=8"], ["peft.method=adapter", "peft.adapter_dim=8"],
     "peft.adapter_dim"),
    ("sft", ["peft.method=lora", "peft.double_quant=false"], ["peft.method=qlora", "peft.double_quant=false"],
     "peft.double_quant"),
    ("sft", ["peft.method=adapter", "peft.num_virtual_tokens=4"], ["peft.method=prefix", "peft.num_virtual_tokens=4"],
     "peft.num_virtual_tokens"),
    ("dpo", ["peft.method=prefix", "peft.prompt_init_text=hi"], ["peft.method=prompt", "peft.prompt_init_text=hi"],
     "peft.prompt_init_text"),
    ("sft", ["replay_batch_size=4"], ["replay_weight=0.1", "replay_batch_size=4"], "replay_batch_size"),
    ("sft", ["eval_fraction=0.3"], ["data=x.jsonl", "eval_fraction=0.3"], "eval_fraction"),
    ("dpo", ["data=x.jsonl", "eval_data=y.jsonl", "eval_fraction=0.3"], ["data=x.jsonl", "eval_fraction=0.3"],
     "eval_fraction"),
    ("sft", ["schedule.warmup_steps=5", "schedule.warmup_ratio=0.2"], ["schedule.warmup_ratio=0.2"],
     "schedule.warmup_ratio"),
    ("sft", ["schedule.name=constant", "schedule.min_lr_ratio=0"], ["schedule.min_lr_ratio=0"], "schedule.min_lr_ratio"),
    ("pretrain", ["parallel.pp_schedule=gpipe"], ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
     "parallel.pp_schedule"),
    ("pretrain", ["strategy=ddp", "parallel.cpu_offload=true"], ["strategy=fsdp", "parallel.cpu_offload=true"],
     "parallel.cpu_offload"),
    ("dpo", ["simpo_gamma=1"], ["loss_type=[simpo]", "simpo_gamma=1"], "simpo_gamma"),
    ("dpo", ["loss_type=[ipo]", "label_smoothing=0.1"], ["label_smoothing=0.1"], "label_smoothing"),
    ("dpo", ["desirable_weight=2"], ["loss_type=[kto]", "desirable_weight=2"], "desirable_weight"),
    ("dpo", ["loss_type=[simpo]", "ref_model=ref"], ["ref_model=ref"], "ref_model"),
    ("pretrain", ["eval_data=v.txt"], ["data=x.txt", "eval_data=v.txt"], "eval_data"),
    ("pretrain", ["text_mode=line"], ["data=x.txt", "text_mode=line"], "text_mode"),
    ("pretrain", ["data=x.txt", "world.num_people=8"], ["world.num_people=8"], "world.*"),
    ("pretrain", ["tokenizer=tok", "vocab_size=512"], ["vocab_size=512"], "vocab_size"),
    ("pretrain", ["model={dir}", "model_config.num_layers=3"], ["model_config.num_layers=3"], "model_config.*"),
    ("generate", ["temperature=0", "top_k=5"], ["temperature=0.5", "top_k=5"], "top_k"),
    ("chat", ["temperature=0", "top_p=0.9"], ["top_p=0.9"], "top_p"),
    ("generate", ["prompt=", "prompts_file=p.jsonl", "stream=false"], ["stream=false"], "stream"),
    ("generate", ["output_file=out.jsonl"], ["prompt=", "prompts_file=p.jsonl", "output_file=out.jsonl"],
     "output_file"),
    ("eval", ["window=128"], ["data=x.txt", "window=128"], "window"),
    ("eval", ["ngram=8"], ["contamination=c.txt", "ngram=8"], "ngram"),
    ("online-dpo", ["constitution=rules.md"], ["judge=constitution:m", "samples_per_prompt=1", "constitution=rules.md"],
     "constitution"),
    ("estimate", ["lora_r=8"], ["method=lora", "lora_r=8"], "lora_r"),
    ("estimate", ["context=512"], ["inference=true", "context=512"], "context"),
]


@pytest.mark.parametrize("command, off, on, key", ONLY_WITH, ids=[f"{c}:{k}" for c, _, _, k in ONLY_WITH])
def test_an_option_its_mode_ignores_is_refused(tmp_path, command, off, on, key):
    cls = CONFIGS[command]

    def args(extra):
        given = [a.replace("{dir}", str(tmp_path)) for a in extra]
        return [a for a in MINIMAL[command] if a.split("=")[0] not in {g.split("=")[0] for g in given}] + given

    with pytest.raises(TemperError, match=rf"^{re.escape(key)} is used only with "):
        load_config(cls, None, args(off))
    load_config(cls, None, args(on))


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_only_with_rule_names_real_keys(command):
    def walk(node, prefix=""):
        rules = [rule for klass in type(node).__mro__ for rule in vars(klass).get("only_with", ())]
        for rule in rules:
            for key in rule.keys:
                owner = node
                for part in key.split("."):
                    assert part in {f.name for f in fields(owner)}, f"{command}: {prefix}{key}"
                    owner = getattr(owner, part)
        for f in fields(node):
            if is_dataclass(getattr(node, f.name)):
                walk(getattr(node, f.name), prefix + f.name + ".")
        return len(rules)

    walk(load_config(CONFIGS[command], None, MINIMAL[command]))


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_a_printed_config_loads_back(command):
    """Every key spelled out at its default (what --print-config writes) is not an option set in the wrong mode."""
    cfg = load_config(CONFIGS[command], None, MINIMAL[command])
    again = from_dict(CONFIGS[command], to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("command, setting, message", [
    (command, setting, message) for command in ("generate", "chat") for setting, message in [
        ("temperature=-1", r"temperature must be at least 0, got -1.0"),
        ("top_p=0", r"top_p must be in \(0, 1\], got 0.0"),
        ("top_p=1.5", r"top_p must be in \(0, 1\], got 1.5"),
        ("top_k=-1", r"top_k must be at least 0, got -1"),
        ("repetition_penalty=0", r"repetition_penalty must be greater than 0, got 0.0"),
        ("max_new_tokens=0", r"max_new_tokens must be at least 1, got 0"),
    ]])
def test_sampling_settings_are_checked_at_load(command, setting, message):
    with pytest.raises(TemperError, match=message):
        load_config(CONFIGS[command], None, [*MINIMAL[command], setting])


@pytest.mark.parametrize("settings, message", [
    (["loss_type=[sigmoid,sigmoid]"], "loss_type names sigmoid more than once: give each loss once"),
    (["loss_type=[sigmoid,sft,sft]", "loss_weights=[1,1,1]"], "loss_type names sft more than once"),
    (["loss_type=[sigmoid,sft]", "loss_weights=[1,0]"], r"loss_weights\[1\] must be greater than 0, got 0.0"),
    (["loss_type=[sigmoid,sft]", "loss_weights=[-1,1]"], r"loss_weights\[0\] must be greater than 0, got -1.0"),
    (["loss_weights=[nan]"], r"key 'loss_weights\[0\]' expects a finite number, got '?nan"),
    (["loss_type=[simpo]", "simpo_gamma=-0.5"], "simpo_gamma must be at least 0, got -0.5"),
])
def test_preference_loss_settings_are_checked_at_load(settings, message):
    with pytest.raises(TemperError, match=message):
        load_config(CONFIGS["dpo"], None, settings)


@pytest.mark.parametrize("setting, message", [
    ("model_config.num_layers=0", "model_config.num_layers must be at least 1, got 0"),
    ("model_config.hidden_size=-64", "model_config.hidden_size must be at least 1, got -64"),
    ("model_config.num_heads=0", "model_config.num_heads must be at least 1, got 0"),
    ("model_config.intermediate_size=-1", "model_config.intermediate_size must be at least 1, got -1"),
    ("model_config.max_seq_len=0", "model_config.max_seq_len must be at least 1, got 0"),
    ("model_config.norm_eps=0", "model_config.norm_eps must be greater than 0, got 0"),
    ("model_config.num_layers=two", "key 'model_config.num_layers' expects an integer, got 'two'"),
    ("model_config.hidden_size=100", "model_config: hidden_size 100 is not divisible by num_heads 6"),
    ("model_config.num_layer=3", r"unknown key 'model_config.num_layer' \(did you mean 'model_config.num_layers'\?\)"),
])
def test_a_preset_shape_change_is_checked_at_load(setting, message):
    with pytest.raises(TemperError, match=message):
        load_config(CONFIGS["pretrain"], None, ["model=llama-3m", "model_config.head_dim=null", setting]
                    if "hidden_size=100" in setting else [setting])


@pytest.mark.parametrize("command", ["pretrain", "tokenizer"])
def test_a_vocabulary_the_tokenizer_trainer_cannot_take_is_refused_at_load(command):
    for size in (MAX_VOCAB_SIZE + 1, 10**9, 2**32, 100):
        with pytest.raises(TemperError, match=rf"vocab_size must be in \[264, 16,777,216\] .*got {size:,}"):
            load_config(CONFIGS[command], None, [*MINIMAL[command], f"vocab_size={size}"])
    assert load_config(CONFIGS[command], None, [*MINIMAL[command], f"vocab_size={MAX_VOCAB_SIZE}"])
    with pytest.raises(TemperError, match="vocab_size must be in"):  # the library call too: no Rust abort
        train_tokenizer(["the river runs past the mill"] * 4, vocab_size=10**9)


# the config sections of every command: a dotted key an error names under one of them is a key of --help
SECTIONS = {key.split(".")[0] for cls in CONFIGS.values() for key, *_ in config_help(cls) if "." in key}


def test_every_section_key_an_error_names_is_in_help():
    keys = {key for cls in CONFIGS.values() for key, *_ in config_help(cls)}
    pattern = re.compile(rf"(?<![\w./{{-])((?:{'|'.join(sorted(SECTIONS))})\.[a-z_]+)")
    named = set()
    for path in pathlib.Path(importlib.import_module("temper").__file__).parent.rglob("*.py"):
        for text in re.findall(r'"([^"\n]*)"', path.read_text(encoding="utf-8")):
            named.update(pattern.findall(text))
    assert "parallel.tp" in named and "peft.dropout" in named  # the scan finds them
    assert not named - keys, f"named in messages but absent from every --help: {sorted(named - keys)}"
