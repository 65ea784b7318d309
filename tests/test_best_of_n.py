"""Best-of-N against an outcome model (issue 20): `temper reward objective=prm step_labels=last`
puts each solution's outcome on its last step only (a cut last step is skipped, never moved
to an earlier one) and records the mode in its lineage; `rewards=prm:DIR` scores such a model's
last step and a process model's weakest one; `temper generate best_of=N rank_by=SPEC` writes the
N candidates, their scores and the argmax, and refuses settings that cannot work in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import decoder_lengths, reorder_tol
from test_process_reward_model import easy_solutions, write_rows

from temper.cli import main
from temper.config import load_config
from temper.data.stepwise import StepEncoder, load_stepwise
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.lineage import read_lineage, write_lineage
from temper.models.reward import load_reward_model
from temper.recipes import reward as reward_recipe
from temper.rewards.process import ProcessReward

STEPS = ["Alice lives in Paris.", "Bob lives in Rome."]


# ----------------------------------------------------------------------------- outcome labels


def test_outcome_labels_sit_on_the_last_step_only(tiny_tokenizer):
    each = StepEncoder(tiny_tokenizer, None, max_len=64).encode("Check.", STEPS, [True, False], "f:1")
    last = StepEncoder(tiny_tokenizer, None, max_len=64, step_labels="last").encode("Check.", STEPS, [True, False],
                                                                                    "f:1")
    assert last.ids == each.ids  # the whole solution is read
    assert last.step_ends == each.step_ends[-1:] and last.labels == [False]  # the outcome, on the last step
    right = StepEncoder(tiny_tokenizer, None, max_len=64, step_labels="last").encode("Check.", STEPS, [True, True], "")
    assert right.labels == [True]
    # a context that holds the first step only: the outcome has no step to sit on (not the first one)
    first_end = each.step_ends[0]
    short = StepEncoder(tiny_tokenizer, None, max_len=first_end + 2, step_labels="last")
    from temper.data.rows import BadRow

    with pytest.raises(BadRow) as cut:
        short.encode("Check.", STEPS, [True, True], "f:1")
    assert cut.value.reason == "last_step_cut"
    with pytest.raises(TemperError, match="step_labels=final: expected one of each, last"):
        StepEncoder(tiny_tokenizer, None, max_len=64, step_labels="final")


def test_cut_solutions_are_counted_not_relabelled(tmp_path, tiny_tokenizer):
    rows = easy_solutions(8) + [{"prompt": "Check 99.", "completions": ["Alice lives in Paris. ok"] * 30,
                                 "labels": [True] * 30}]
    data = write_rows(tmp_path / "steps.jsonl", rows)
    with pytest.warns(UserWarning, match=r"1 bad step-labelled rows skipped \(1 last_step_cut"):
        solutions, stats = load_stepwise(data, tiny_tokenizer, None, max_len=64, step_labels="last",
                                         max_bad_row_fraction=0.5)
    assert len(solutions) == 8 and all(len(s.labels) == 1 == len(s.step_ends) for s in solutions)
    assert [s.labels[0] for s in solutions] == [r["labels"][-1] for r in rows[:8]]
    assert stats.steps == 8 and stats.steps_dropped == 0
    each, _ = load_stepwise(data, tiny_tokenizer, None, max_len=64)  # each step: the long row keeps what fits
    assert len(each) == 9 and 1 <= len(each[-1].labels) < 30


@pytest.fixture(scope="module")
def trained_orm(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("orm")
    data = write_rows(tmp / "steps.jsonl", easy_solutions(96))
    out = tmp / "orm"
    args = [f"model={tiny_model_dir}", "objective=prm", "step_labels=last", f"data={data}", f"output_dir={out}",
            "seq_len=64", "batch_size=8", "max_steps=25", "optim.lr=1e-3", "eval_fraction=0.25",
            "logging.eval_every=25", "logging.progress=false", "peak_flops=1e12"]
    return out, reward_recipe.run(load_config(reward_recipe.Config, None, args))


def test_an_outcome_model_trains_on_outcomes_and_says_so(trained_orm):
    out, summary = trained_orm
    assert summary["objective"] == "prm" and summary["step_labels"] == "last"
    assert summary["rows_read"] == 96 and summary["solutions"] == 72 and summary["held_out_solutions"] == 24
    assert summary["labelled_steps"] == 96  # one a solution read (train and held out); `steps` is the optimiser's
    assert summary["steps"] == 25  # max_steps=25 above
    assert "eval_first_error_accuracy" not in summary and "eval_first_error_accuracy" not in summary["before"]
    assert summary["eval_step_accuracy"] == summary["eval_solution_accuracy"]  # one scored step a solution
    assert summary["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["eval_solution_accuracy"] >= 0.9 > summary["before"]["eval_solution_accuracy"]
    lineage = read_lineage(out)
    assert lineage["reward_objective"] == "prm" and lineage["reward_step_labels"] == "last"


def test_step_labels_is_refused_for_pair_models(capsys, tiny_model_dir, tmp_path):
    assert main(["reward", f"model={tiny_model_dir}", "step_labels=last", f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "step_labels is used only with objective=prm" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the reward of each kind


def reward_dir(path, model_dir, step_labels: str | None):
    """A one-label reward model on `model_dir`'s body with a wide random head (scores that go up and
    down along a solution), its lineage saying how it was labelled."""
    from temper.models import load_model
    from temper.models.reward import reward_model_from_causal, save_reward_model

    tokenizer = Tokenizer.from_dir(model_dir)
    torch.manual_seed(1)
    save_reward_model(reward_model_from_causal(load_model(model_dir), tokenizer=tokenizer, head_std=1.0), path,
                      tokenizer=tokenizer)
    write_lineage(path, {"stage": "reward", "reward_objective": "prm",
                         **({"reward_step_labels": step_labels} if step_labels else {})})
    return path


def test_prm_reward_is_the_weakest_step_or_the_outcome_model_last_step(tmp_path, tiny_model_dir):
    completions = ["Alice lives in Paris.\nBob lives in Rome.\nAlice lives in Paris.", "Bob lives in Rome.\nAlice",
                   "Alice lives in Paris.", "Bob\nAlice lives in Paris.\nBob lives in Rome.\nAlice"]
    outcome = reward_dir(tmp_path / "outcome", tiny_model_dir, "last")
    process = reward_dir(tmp_path / "process", tiny_model_dir, None)  # written before the setting: each step
    rm, encoder = load_reward_model(outcome).eval(), StepEncoder(Tokenizer.from_dir(outcome), None, max_len=64)
    expected_last, expected_min, largest, longest = [], [], 0.0, 0
    for text in completions:
        steps = text.split("\n")
        solution = encoder.encode("Check 5.", steps, [True] * len(steps), "x")
        with torch.no_grad():
            logits = rm(torch.tensor([solution.ids]),
                        at=(torch.zeros(len(steps), dtype=torch.long), torch.tensor(solution.step_ends)))
        scores = logits.sigmoid()
        expected_last.append(float(scores[-1]))
        expected_min.append(float(scores.min()))
        largest, longest = max(largest, float(logits.abs().max())), max(longest, len(solution.ids))
    # one row alone vs padded in a batch: the logits' reordering bound, times sigmoid's slope (<= 1/4)
    tol = reorder_tol(largest, *decoder_lengths(rm, longest)) / 4
    assert expected_last != expected_min  # the two aggregations differ on these completions
    prompts = ["Check 5."] * len(completions)
    assert ProcessReward(str(outcome))(prompts, completions) == pytest.approx(expected_last, rel=0, abs=tol)
    assert ProcessReward(str(process))(prompts, completions) == pytest.approx(expected_min, rel=0, abs=tol)
    write_lineage(process, {**read_lineage(process), "reward_step_labels": "mean"})
    with pytest.raises(TemperError, match=r"reward_step_labels='mean'; expected one of each, last"):
        ProcessReward(str(process))


# ----------------------------------------------------------------------------- temper generate best_of


def by_answer(completions, answer, **kwargs):
    """A test ranking that reads a prompt column: rows whose answer is 'long' prefer long
    completions, the others short ones."""
    return [float(len(c)) if a == "long" else -float(len(c)) for c, a in zip(completions, answer)]


def write_prompts(tmp_path) -> str:
    rows = [{"prompt": "Alice lives in", "answer": "long"}, {"prompt": "Bob lives in", "answer": "short"},
            {"prompt": "The river of", "answer": "long"}]
    return write_rows(tmp_path / "prompts.jsonl", rows)


def generate(model_dir, prompts, output, *extra) -> list[dict]:
    code = main(["generate", f"model={model_dir}", f"prompts_file={prompts}", f"output_file={output}",
                 "max_new_tokens=8", "temperature=1.0", "seed=3", *extra])
    assert code == 0
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_best_of_n_keeps_the_argmax_of_the_ranking_and_every_candidate(tmp_path, tiny_model_dir):
    prompts = write_prompts(tmp_path)
    rows = generate(tiny_model_dir, prompts, tmp_path / "out.jsonl", "best_of=6", "rank_by=test_best_of_n:by_answer",
                    "batch_size=2")
    assert [r["prompt"] for r in rows] == ["Alice lives in", "Bob lives in", "The river of"]
    for row, answer in zip(rows, ["long", "short", "long"]):
        assert set(row) == {"prompt", "completion", "candidates", "scores"}
        assert len(row["candidates"]) == len(row["scores"]) == 6
        assert len(set(row["candidates"])) > 1  # sampled: no two candidates share a random stream
        assert row["scores"] == by_answer(row["candidates"], [answer] * 6)  # the prompt's column reached it
        best = max(row["scores"])
        assert row["completion"] == row["candidates"][row["scores"].index(best)]  # ties: the first sampled
    # seeded candidates do not depend on how the file is batched
    again = generate(tiny_model_dir, prompts, tmp_path / "again.jsonl", "best_of=6",
                     "rank_by=test_best_of_n:by_answer", "batch_size=3")
    assert again == rows


def test_best_of_n_ranks_by_a_process_reward_model(tmp_path, tiny_model_dir, trained_orm):
    out, _ = trained_orm
    rows = generate(tiny_model_dir, write_prompts(tmp_path), tmp_path / "out.jsonl", "best_of=3", f"rank_by=prm:{out}")
    reward = ProcessReward(str(out))
    for row in rows:
        expected = reward([row["prompt"]] * 3, row["candidates"])
        largest = max(abs(math.log(v / (1 - v))) for v in expected)  # the logits behind the sigmoids
        tol = reorder_tol(largest, *decoder_lengths(reward.model, reward.model.config.max_seq_len)) / 4
        assert row["scores"] == pytest.approx(expected, rel=0, abs=tol)  # batched with other rows, or not
        assert row["completion"] == row["candidates"][row["scores"].index(max(row["scores"]))]


@pytest.mark.parametrize("extra, message", [
    (["best_of=4"], "best_of=4 needs rank_by=: the reward that picks the best completion"),
    (["rank_by=world"], "rank_by=world ranks the samples of best_of=N (N > 1); give best_of="),
    (["best_of=4", "rank_by=world", "temperature=0"], "best_of=4 with temperature=0: greedy decoding gives 4 copies"),
    (["best_of=0", "rank_by=world"], "best_of"),
    (["best_of=4", "rank_by=wrold"], "rank_by=wrold: not a shipped reward"),
])
def test_best_of_n_refuses_what_cannot_work_in_one_line(capsys, tmp_path, tiny_model_dir, extra, message):
    code = main(["generate", f"model={tiny_model_dir}", f"prompts_file={write_prompts(tmp_path)}",
                 f"output_file={tmp_path / 'o.jsonl'}", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_best_of_n_needs_a_prompts_file(capsys, tiny_model_dir):
    assert main(["generate", f"model={tiny_model_dir}", "prompt=hi", "best_of=4", "rank_by=world"]) == 2
    err = capsys.readouterr().err
    assert "best_of is used only with prompts_file=" in err and "Traceback" not in err


def test_world_ranking_needs_answers(capsys, tmp_path, tiny_model_dir):
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": "Alice lives in"}])
    assert main(["generate", f"model={tiny_model_dir}", f"prompts_file={prompts}", f"output_file={tmp_path / 'o'}",
                 "best_of=2", "rank_by=world"]) == 2
    err = capsys.readouterr().err
    assert "reward world needs an 'answer' in every prompt row" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the benchmark's measures


def test_bench_best_of_n_reads_answers_and_scores_picks_as_described():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_best_of_n.py"
    spec = importlib.util.spec_from_file_location("bench_best_of_n", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.final_value("12 + 5 = 17\n17 * 3 = 51\n") == 51
    assert bench.final_value("3 - 5 = -2") == -2
    assert bench.final_value("12 + 5 = 17\nso 51") is None and bench.final_value("") is None
    assert bench.pick([0.2, 0.9, 0.9, 0.1]) == 1  # ties: the first sampled
    right = [False, True, False, False]
    prm, orm = [0.1, 0.8, 0.3, 0.2], [0.9, 0.1, 0.2, 0.3]
    assert bench.per_question(right, prm, orm, 4) == {"prm": 1.0, "orm": 0.0, "random": 0.25, "oracle": 1.0}
    # n=2: two groups, [F, T] and [F, F]; the PRM gets the first right, the ORM neither
    assert bench.per_question(right, prm, orm, 2) == {"prm": 0.5, "orm": 0.0, "random": 0.25, "oracle": 0.5}
    assert bench.auroc([0.9, 0.1, 0.5], [True, False, True]) == 1.0
    assert bench.auroc([0.1, 0.9], [True, False]) == 0.0
