"""`temper eval` and `temper eval contamination` end to end on a tiny model and a small world."""

import json

import pytest
from conftest import approx_reordered, decoder_lengths

from temper.cli import main
from temper.configs import shipped_dir

TASKS = sorted(shipped_dir("tasks").glob("*.yaml"))


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.name)
def test_shipped_task_yaml_is_valid(path):
    from temper.eval.tasks import load_task

    assert load_task(path).name == path.stem


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from temper.data.world import WorldConfig, build_world, write_world

    out = tmp_path_factory.mktemp("world")
    write_world(build_world(WorldConfig(num_people=12, num_rl_test=12, num_sft_test=12)), out)
    return out


def test_eval_two_models_with_tasks_perplexity_judge_and_contamination(tmp_path, tiny_model_dir, small_world, capsys):
    text = tmp_path / "text.txt"
    text.write_text("Alice lives in Paris. The sum of 3 and 4 is 7.\n\nHello, world!\n" * 5)
    out = tmp_path / "eval"
    code = main(["eval", f"models=[{tiny_model_dir},{tiny_model_dir}]", "tasks=world_facts_mc,world_chat_qa",
                 f"world={small_world}", f"data={text}", "window=32", "stride=16", "judge=rule",
                 f"contamination={small_world / 'pretrain' / 'train.jsonl'}", f"output_dir={out}"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    scores = results["per_model"][str(tiny_model_dir)]
    assert 0 <= scores["world_facts_mc"]["acc"] <= 1 and 0 <= scores["world_chat_qa"]["answer_accuracy"] <= 1
    assert scores["perplexity"]["token_perplexity"] > 1
    judged = results["judge"]["world_chat_qa"]
    assert judged["wins_1"] == judged["wins_2"] == 0  # a model against itself: only ties
    assert set(results["contamination"]) == {"world_facts_mc", "world_chat_qa"}
    table = (out / "results.md").read_text()
    assert "world_facts_mc: acc" in table and "perplexity: bits_per_byte" in table


def test_eval_contamination_subcommand_finds_a_planted_row(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    leaked = "the quick brown fox jumps over the lazy dog near the old mill by the river today"
    train.write_text(json.dumps({"text": "some unrelated text " * 5 + leaked}) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": leaked.upper() + "!"}) + "\n"
                    + json.dumps({"question": "a clean question about something else entirely, long enough to check"}) + "\n")
    code = main(["eval", "contamination", f"train={train}", f"eval={test}", f"output={tmp_path / 'r.json'}"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())[str(test)]
    assert report["contaminated"] == 1 and report["checked"] == 2


def test_eval_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    assert main(["eval", f"model={tiny_model_dir}"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", f"model={tiny_model_dir}", "tasks=no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "not a shipped task" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntype: generation\ndata: d.jsonl\n")
    assert main(["eval", f"model={tiny_model_dir}", f"tasks={bad}"]) == 2
    assert "missing" in capsys.readouterr().err


def test_eval_data_text_mode_decides_what_one_text_is(tmp_path, tiny_model_dir):
    """file: the whole file is one text (one BOS, context carried across paragraphs); paragraph/line: one text each."""
    from temper.data.tokenizer import Tokenizer
    from temper.eval.sliding import sliding_window_perplexity
    from temper.models import load_model
    from temper.stages.eval import Config, run

    paragraphs = ["Alice lives in Paris.\nBob lives in Rome.", "The sum of 3 and 4 is 7.\nHello, world!"]
    text = "\n\n".join(paragraphs) + "\n"
    path = tmp_path / "valid.txt"
    path.write_text(text, encoding="utf-8")
    tok, model = Tokenizer.from_dir(tiny_model_dir), load_model(tiny_model_dir)
    expected = {"file": [text], "paragraph": paragraphs, "line": [ln for p in paragraphs for ln in p.split("\n")]}
    for mode, texts in expected.items():
        results = run(Config(model=str(tiny_model_dir), data=[str(path)], text_mode=mode, window=8, stride=4,
                             device="cpu", output_dir=str(tmp_path / mode)))
        got = results["per_model"][str(tiny_model_dir)]["perplexity"]
        assert got["tokens"] == sum(len(tok.encode(t)) for t in texts), mode
        assert got["bytes"] == sum(len(t.encode()) for t in texts), mode
        ref = sliding_window_perplexity(model, tok, texts, window=8, stride=4)
        # the stage's batches vs the function's: the same sums in another order
        assert got["nll"] == approx_reordered(ref["nll"], decoder_lengths(model, 8) + (got["tokens"],)), mode
    assert main(["eval", f"model={tiny_model_dir}", f"data={path}", "text_mode=files"]) == 2
