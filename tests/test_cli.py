"""The `temper` command: help, the calling convention, and one-line errors for bad input."""

import json
import shutil
import subprocess
import sys

import pytest

from temper.cli import COMMANDS, main
from temper.config import config_help


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_main_help_lists_every_stage(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for stage in COMMANDS:
        assert f"  {stage}" in out


@pytest.mark.parametrize("stage", sorted(COMMANDS))
def test_stage_help_lists_every_option_with_type_and_default(capsys, stage):
    import importlib

    code, out, _ = run_cli(capsys, stage, "--help")
    assert code == 0
    for key, typ, _default, _help in config_help(importlib.import_module(COMMANDS[stage].module).Config):
        line = next((ln for ln in out.splitlines() if ln.startswith("  " + key + " ")), None)
        assert line is not None, f"{key} missing from help"
        assert typ in line
    flat = " ".join(out.split())  # help text wraps; compare with whitespace collapsed
    for key, _typ, default, _help in config_help(importlib.import_module(COMMANDS[stage].module).Config):
        assert f"[default: {' '.join(default.split())}]" in flat, key


@pytest.mark.parametrize("stage", sorted(name for name, c in COMMANDS.items() if c.kind == "train"))
def test_stage_help_shows_the_recipe_s_own_section_defaults(stage):
    """A recipe changes a section's defaults (GRPO's optim.lr is TRL's 1e-6, SFT's 3e-4): help
    shows the value the run uses, not the section class's."""
    import importlib

    from temper.config import config_help

    config = importlib.import_module(COMMANDS[stage].module).Config()
    for key, _typ, default, _help in config_help(type(config)):
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        shown = "null" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
        assert default == shown, key


def test_console_script_is_installed():
    exe = shutil.which("temper")
    if exe is None:
        pytest.skip("temper is not installed as a command (pip install -e .)")
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("temper ")


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "temper", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "max_new_tokens" in result.stdout


def test_tokenizer_then_generate_end_to_end(tmp_path, capsys, tiny_model_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n\nthe dog sat on the log.\n" * 50)
    code, out, err = run_cli(capsys, "tokenizer", f"data={corpus}", "vocab_size=300",
                             f"output_dir={tmp_path / 'tok'}")
    assert code == 0, err
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    code, out, err = run_cli(capsys, "generate", f"model={tiny_model_dir}", "prompt=Alice lives",
                             "max_new_tokens=8", "temperature=0", "stream=false")
    assert code == 0, err
    first = out
    code, out, _ = run_cli(capsys, "generate", f"model={tiny_model_dir}", "prompt=Alice lives",
                           "max_new_tokens=8", "temperature=0", "stream=false")
    assert out == first and out.strip()


def test_generate_prompts_file_in_batches(tmp_path, capsys, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Alice {i}"}) for i in range(5)) + "\n")
    out_file = tmp_path / "out.jsonl"
    code, _, err = run_cli(capsys, "generate", f"model={tiny_model_dir}", f"prompts_file={prompts}",
                           f"output_file={out_file}", "batch_size=2", "max_new_tokens=5", "temperature=0")
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"Alice {i}" for i in range(5)]
    assert all(isinstance(r["completion"], str) for r in rows)


def test_yaml_config_and_print_config(tmp_path, capsys):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("model: some/dir\nprompt: hi\ntemperature: 0.5\n")
    code, out, _ = run_cli(capsys, "generate", "--config", str(cfg), "top_k=5", "--print-config")
    assert code == 0
    assert "temperature: 0.5" in out and "top_k: 5" in out and "model: some/dir" in out


def _one_line_error(capsys, *args) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_errors_are_one_line(tmp_path, capsys, tiny_model_dir):
    assert "unknown stage 'generat' (did you mean 'generate'?)" in _one_line_error(capsys, "generat")
    assert "model directory not found" in _one_line_error(capsys, "generate", "model=/no/dir", "prompt=x")
    assert "did you mean 'max_new_tokens'" in _one_line_error(capsys, "generate", "max_new_token=3")
    assert "expects a number" in _one_line_error(capsys, "generate", "model=x", "prompt=y", "temperature=hot")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no prompts (the file is empty)" in _one_line_error(
        capsys, "generate", f"model={tiny_model_dir}", f"prompts_file={empty}")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert "broken.jsonl:2: not valid JSON" in _one_line_error(
        capsys, "generate", f"model={tiny_model_dir}", f"prompts_file={broken}")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    assert "architecture 'T5ForConditionalGeneration' is not supported" in _one_line_error(
        capsys, "generate", f"model={tmp_path / 't5'}", "prompt=x")
    assert "give exactly one of" in _one_line_error(capsys, "generate", f"model={tiny_model_dir}")
    assert "top_p must be in (0, 1]" in _one_line_error(
        capsys, "generate", f"model={tiny_model_dir}", "prompt=x", "top_p=0")
