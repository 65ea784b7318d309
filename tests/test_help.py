"""`temper STAGE --help` tells the truth: every row's default is the value a run uses (what
`--print-config` resolves), for every command and every variant module; eval's help names every
shipped task and the training commands' help every data format the readers take."""

from __future__ import annotations

import pytest
import yaml

import temper.cli as cli
from temper.cli import COMMANDS, main
from temper.configs import shipped_names
from temper.data.readers import RECORD_SUFFIXES, SUPPORTED_SUFFIXES

# Keys without a usable default: the command refuses to run without them (its validate names them),
# so --print-config needs a value. They are the only rows not compared (their help default is the
# empty value that means "not given").
REQUIRED: dict[str, dict[str, str]] = {
    "curate": {"data": "x"},
    "tokenizer": {"data": "x"},
    "sft": {"model": "x"},
    "eval": {"model": "x", "data": "x"},
    "eval contamination": {"train": "x", "eval": "x"},
    "reward score": {"model": "x", "data": "x"},
    "merge": {"adapter": "x"},
    "export": {"model": "x"},
    "quantize": {"model": "x"},
    "generate": {"model": "x", "prompt": "x"},
    "serve": {"model": "x"},
    "chat": {"model": "x"},
    "embed": {"model": "x", "data": "x", "output": "x.npy"},
    "estimate": {"model": "x"},
    "plot": {"runs": "x"},
    "report": {"run_dir": "x"},
}

CASES = [(name, None) for name in COMMANDS] + [
    (name, value) for name, c in COMMANDS.items() if c.variants is not None
    for value in [c.variants.default, *sorted(set(c.variants.modules))]
]


def help_defaults(text: str) -> dict[str, str]:
    """{key: the value in its row's `[default: ...]` (or `[given: ...]`)} of a stage's --help."""
    rows: dict[str, list[str]] = {}
    key = None
    for line in text.split("options (key=value; nested keys with dots):\n", 1)[1].splitlines():
        if line.startswith("  ") and not line.startswith("   "):  # a row: two spaces, then its key
            key = line.split()[0]
            rows[key] = [line]
        elif key is not None:
            rows[key].append(line)
    out = {}
    for key, lines in rows.items():
        body = " ".join(" ".join(lines).split())
        at = max(body.rfind("[default: "), body.rfind("[given: "))
        assert at >= 0 and body.endswith("]"), f"{key}: no [default: ...] in {body!r}"
        out[key] = body[body.index(": ", at) + 2:-1]
    return out


def shown(value) -> str:
    """A --print-config value as help writes a default (config_help's rule)."""
    return " ".join(("null" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
                    .split())


def mismatches(capsys, name: str, variant: str | None) -> list[str]:
    """The help rows of `temper NAME [KEY=VARIANT] --help` whose default is not what --print-config resolves."""
    typed = [f"{COMMANDS[name].variants.key}={variant}"] if variant is not None else []
    assert main([*name.split(), *typed, "--help"]) == 0
    helped = help_defaults(capsys.readouterr().out)
    required = REQUIRED.get(name, {})
    code = main([*name.split(), *typed, *(f"{k}={v}" for k, v in required.items()), "--print-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    resolved = yaml.safe_load(out)
    wrong = []
    for key, default in helped.items():
        if key in required:
            continue
        value = resolved
        for part in key.split("."):
            assert isinstance(value, dict) and part in value, f"help shows {key}, --print-config has no such key"
            value = value[part]
        if default != shown(value):
            wrong.append(f"{key}: help says {default}, a run uses {shown(value)}")
    return wrong


@pytest.mark.parametrize(("name", "variant"), CASES, ids=[f"{n}-{v}" if v else n for n, v in CASES])
def test_help_shows_the_values_a_run_uses(capsys, name, variant):
    assert mismatches(capsys, name, variant) == []


def test_the_comparison_fails_where_help_and_run_disagree(capsys, monkeypatch):
    """What the test above catches: a recipe default that help does not show (help rows built from the
    section classes, the old help), and a variant's key shown as its module's default, not the value given."""
    real = cli.help_rows

    def stale(name, variant=None):  # pretrain's recipe sets optim.lr=3e-3; the section class says 3e-4
        return [(k, t, "0.0003" if k == "optim.lr" else d, h) for k, t, d, h in real(name, variant)]

    monkeypatch.setattr(cli, "help_rows", stale)
    assert mismatches(capsys, "pretrain", None) == ["optim.lr: help says 0.0003, a run uses 0.003"]
    monkeypatch.setattr(cli, "help_rows", lambda name, variant=None: cli.config_help(cli._stage_module(name, variant).Config))
    assert mismatches(capsys, "pretrain", "electra") == ["objective: help says mlm, a run uses electra"]


def test_eval_help_names_every_shipped_task(capsys):
    tasks = shipped_names("tasks")
    assert len(tasks) >= 5  # the registry is read, not empty
    assert main(["eval", "--help"]) == 0
    row = " ".join(capsys.readouterr().out.split("\n  tasks ", 1)[1].split("\n  data ", 1)[0].split())
    for task in tasks:
        assert task in row, f"temper eval --help does not name the shipped task {task}"


@pytest.mark.parametrize("name", ["pretrain", "sft", "dpo", "tokenizer", "curate"])
def test_data_help_names_every_format_the_readers_take(capsys, name):
    assert main([name, "--help"]) == 0
    row = " ".join(capsys.readouterr().out.split("\n  data ", 1)[1].split("\n  eval_data ", 1)[0].split())
    assert ".json " in " ".join(row.replace("/", " ").replace(",", " ").split()) + " "  # `.json` alone, not only .jsonl
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in row, f"temper {name} --help's data row does not name {suffix}"


def test_prompt_help_names_the_row_formats(capsys):
    assert main(["grpo", "--help"]) == 0
    row = capsys.readouterr().out.split("\n  prompts ", 1)[1].split("\n  ", 1)[0]
    for suffix in RECORD_SUFFIXES:
        assert suffix in row
