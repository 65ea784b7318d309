"""The end of every command: a few readable lines (`temper.report.summary`), or with `--json` the
command's whole result as JSON, the same dict `summary.json` holds for a training command."""

import importlib
import json
from pathlib import Path

import pytest
from conftest import SAMPLE_TEXT

from temper.cli import COMMANDS, Commands, main
from temper.report.summary import HEADLINES, count, number, share, show, training_lines

TINY_PRETRAIN = ["model=llama-tiny", "seq_len=16", "batch_size=2", "max_steps=2", "samples=0", "peak_flops=1e9",
                 "logging.progress=false", "logging.eval_every=2", "eval_batches=1"]
STDOUT_PRODUCT = {"chat", "serve"}  # interactive: the conversation, the server's log, no end to summarise


def test_numbers_keep_the_precision_that_means_something():
    assert share(0.8083333333333333) == "80.8%" and share(1.0) == "100.0%" and share(None) == "-"
    assert number(2.873154) == "2.87" and number(228.7885681667089) == "228.8" and number(0.35812) == "0.358"
    assert number(10020.4) == "10,020" and number(3) == "3" and number(12345) == "12,345" and number(None) == "-"
    assert number(float("nan")) == "nan"
    assert count(2048) == "2,048" and count(122880) == "122.9K" and count(1967808) == "1.97M"


def test_a_training_summary_says_what_moved_where_it_went_and_what_next():
    class Peft:
        method, r = "lora", 16

    class Cfg:
        model, output_dir, peft = "runs/pretrain", "runs/sft", Peft()

    result = {"steps": 600, "train_seconds": 68.2, "train_tokens": 1_234_567, "tokens_per_second": 18101.3,
              "answer_accuracy": 0.22, "exact_match": 0.05, "general_ppl": 11.29,
              "before": {"answer_accuracy": 0.08, "exact_match": 0.0, "general_ppl": 2.91},
              "trainable_parameters": 98304, "total_parameters": 2066112}
    lines = training_lines("sft", Cfg(), result)
    assert lines[0] == ("sft: runs/pretrain with LoRA r 16 (98,304 trainable of 2.07M) · 600 steps, 1.23M tokens in "
                        "1 min 08 s · 18,101 tok/s")
    assert lines[1] == "  answers right 8.0% -> 22.0% · exact match 0.0% -> 5.0% · general-text ppl 2.91 -> 11.3"
    assert lines[2] == "  -> runs/sft (the adapter; summary.json, metrics.jsonl)"
    assert lines[3] == "  next: temper eval model=runs/sft (or temper dpo model=runs/sft)"


def test_every_command_ends_with_a_summary():
    """A command defines `summary_lines`, or is a training recipe (the shared training summary, with
    the numbers it moves named in HEADLINES), or is interactive. A new command without one fails here."""
    for name, command in COMMANDS.items():
        if name in STDOUT_PRODUCT:
            continue
        module = importlib.import_module(command.module)
        if command.kind == "train":
            assert name in HEADLINES, f"{name}: no headline metrics in temper.report.summary.HEADLINES"
        else:
            assert callable(getattr(module, "summary_lines", None)), f"{name}: no summary_lines"
    assert "encoder" in HEADLINES  # temper pretrain objective=mlm|...: the encoder recipe's numbers


def test_json_prints_the_result_and_none_prints_nothing(capsys):
    show("plot", None, {"a": 0.8083333333333333, "b": [1, 2]}, as_json=True)
    assert json.loads(capsys.readouterr().out) == {"a": 0.8083333333333333, "b": [1, 2]}
    show("generate", None, None, as_json=False)
    assert capsys.readouterr().out == ""


def _cli(capsys, argv: list[str]) -> str:
    assert main(argv) == 0, argv
    return capsys.readouterr().out


def test_pretrain_ends_with_its_summary_and_json_gives_summary_json(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 20, encoding="utf-8")
    argv = [f"data={text}", "vocab_size=300", *TINY_PRETRAIN]
    out = _cli(capsys, ["pretrain", *argv, f"output_dir={tmp_path / 'a'}"])
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    config = Commands().config("pretrain", [*argv, f"output_dir={tmp_path / 'a'}"])
    assert out.splitlines() == training_lines("pretrain", config, saved)  # the whole stdout: the summary, last
    assert out.startswith(f"pretrain: llama-tiny ({count(saved['params'])} parameters) · 2 steps")
    assert f"val ppl {number(saved['val_ppl'])}" in out and "{" not in out
    assert f"  -> {tmp_path / 'a'} (the model; summary.json" in out and f"next: temper sft model={tmp_path / 'a'}" in out

    out = _cli(capsys, ["pretrain", *argv, f"output_dir={tmp_path / 'b'}", "--json"])
    assert json.loads(out) == json.loads((tmp_path / "b" / "summary.json").read_text())  # the old JSON, whole


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter of the tiny model, two steps of SFT (its summary checked on the way)."""
    root = tmp_path_factory.mktemp("summary_sft")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}."}]} for i in range(24)]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = [f"model={tiny_model_dir}", f"data={data}", "peft.method=lora", "peft.r=4", "seq_len=32",
            "batch_size=2", "max_steps=2", "logging.progress=false", "logging.eval_every=2", "eval_batches=1",
            f"output_dir={root / 'sft'}"]
    return root, argv


def test_sft_summary_shows_before_and_after(adapter, capsys):
    root, argv = adapter
    out = _cli(capsys, ["sft", *argv])
    saved = json.loads((root / "sft" / "summary.json").read_text())
    assert "before" in saved  # eval_at_start: SFT's default
    lines = out.splitlines()
    assert lines == training_lines("sft", Commands().config("sft", argv), saved)
    assert " with LoRA r 4 (" in lines[0] and "(the adapter;" in out and " -> " in lines[1]


def _tool(capsys, name: str, argv: list[str]) -> tuple[str, dict]:
    """`temper NAME argv --json`, then the same readable: (the readable stdout, the JSON result). The
    readable run's stdout must be exactly the command's summary lines of the JSON run's result."""
    result = json.loads(_cli(capsys, [*name.split(), *argv, "--json"]))
    again = ["overwrite=true"] if Commands().has_key(name, "overwrite") else []  # the same output, rewritten
    out = _cli(capsys, [*name.split(), *argv, *again])
    module = importlib.import_module(COMMANDS[name].module)
    config = Commands().config(name, [*argv])
    assert out.splitlines() == "\n".join(module.summary_lines(config, result)).splitlines()
    return out, result


def test_tool_commands_end_with_their_summary(adapter, tiny_model_dir, tmp_path, capsys):
    root, argv = adapter
    if not (root / "sft" / "adapter_config.json").is_file():
        _cli(capsys, ["sft", *argv])
    out, result = _tool(capsys, "world", [f"output_dir={tmp_path / 'world'}", "num_people=6"])
    assert out.startswith("world: 6 people") and result["people"] == 6
    assert result["files"]["pretrain/train"]["rows"] > 0

    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 5, encoding="utf-8")
    out, result = _tool(capsys, "tokenizer", [f"data={text}", "vocab_size=300", f"output_dir={tmp_path / 'tok'}"])
    assert result["vocab_size"] == 300 and out.startswith("tokenizer: 300 tokens")

    out, result = _tool(capsys, "merge", [f"model={tiny_model_dir}", f"adapter={root / 'sft'}",
                                          f"output_dir={tmp_path / 'merged'}"])
    assert result["method"] == "lora" and f"-> {tmp_path / 'merged'}" in out

    out, result = _tool(capsys, "quantize", [f"model={tiny_model_dir}", "method=int8",
                                             f"output_dir={tmp_path / 'int8'}"])
    assert 0 < result["bytes_after"] < result["bytes_before"]
    assert f"{result['bytes_before'] / 1e6:.3g} MB -> {result['bytes_after'] / 1e6:.3g} MB" in out

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Alice lives"}\n{"prompt": "Bob"}\n', encoding="utf-8")
    out, result = _tool(capsys, "generate", [f"model={tiny_model_dir}", f"prompts_file={prompts}", "max_new_tokens=3",
                                             f"output_file={tmp_path / 'gen.jsonl'}"])
    assert result["prompts"] == 2 and out.startswith("generate: 2 completions")

    out, result = _tool(capsys, "eval", [f"model={tiny_model_dir}", f"data={text}", "tasks=",
                                         f"output_dir={tmp_path / 'eval'}"])
    ppl = result["per_model"][str(tiny_model_dir)]["perplexity"]["token_perplexity"]
    assert f"{tmp_path / 'eval' / 'results.md'}" in out and ppl > 1

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "one two three four five six seven eight nine ten"}) + "\n", encoding="utf-8")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"q": "one two three four five six seven eight nine ten"}) + "\n"
                    + json.dumps({"q": "nothing of the kind at all here in this row"}) + "\n", encoding="utf-8")
    out, result = _tool(capsys, "eval contamination", [f"train={train}", f"eval={test}", "n=5",
                                                       f"output={tmp_path / 'overlap.json'}"])
    assert result[str(test)]["contaminated"] == 1 and "1/2 rows share a 5-gram" in out
    assert json.loads((tmp_path / "overlap.json").read_text()) == result

    # a command whose product is its stdout adds nothing to it (a prompt's completion; JSONL rows)
    out = _cli(capsys, ["generate", f"model={tiny_model_dir}", "prompt=Alice", "max_new_tokens=2", "--json"])
    assert len(out.splitlines()) == 1 and not out.startswith("{")


def test_a_pipeline_check_prints_its_plan(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _cli(capsys, ["run", "lifecycle-tiny", "--check"])
    assert out.splitlines()[0].startswith("world: temper world -> runs/lifecycle-tiny/world")
    plan = json.loads(_cli(capsys, ["run", "lifecycle-tiny", "--check", "--json"]))
    assert plan["plan"] == out.splitlines() and plan["stages"][0] == "world"
    assert not Path("runs").exists()  # --check writes nothing
