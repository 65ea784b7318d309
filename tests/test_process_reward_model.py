"""temper reward objective=prm: the step loss against its formula, step tokens and labels,
truncation and bad rows, a tiny run whose held-out step accuracy rises, and the saved
directory scoring each step as transformers scores the prefix that ends there."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_reorder_close, decoder_lengths

from temper.cli import main
from temper.config import load_config
from temper.data.stepwise import StepEncoder, collate_steps, load_stepwise
from temper.errors import TemperError
from temper.losses.reward import step_loss, step_metrics
from temper.models.reward import load_reward_model
from temper.recipes import reward as reward_recipe


def test_step_loss_is_binary_cross_entropy():
    logits, labels = torch.tensor([2.0, -1.0, 0.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = [-(y * math.log(sigmoid(s)) + (1 - y) * math.log(1 - sigmoid(s)))
                for s, y in zip(logits.tolist(), labels.tolist())]
    assert step_loss(logits, labels).tolist() == pytest.approx(expected, rel=1e-6)
    assert float(step_metrics(logits, labels)["step_accuracy"]) == 2.0  # 2 > 0 right; -1 wrong; 0 is "wrong"; 0.5 wrong


def easy_solutions(n: int) -> list[dict]:
    """Steps that say `ok` or `no`; a solution is right until its first `no` (each a 50% draw from a
    seeded stream, so position alone predicts little)."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        steps = ["Alice lives in Paris. ok" if rng.random() < 0.75 else "Alice lives in Paris. no"
                 for _ in range(rng.randint(2, 4))]
        first_no = next((k for k, s in enumerate(steps) if s.endswith("no")), len(steps))
        rows.append({"prompt": f"Check {i}.", "completions": steps, "labels": [k < first_no for k in range(len(steps))]})
    return rows


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_each_step_is_tokenised_alone_and_labelled_on_its_separator(tiny_tokenizer):
    encoder = StepEncoder(tiny_tokenizer, None, max_len=64)
    solution = encoder.encode("Check.", ["Alice lives in Paris.", "Bob lives in Rome."], [True, False], "f:1")
    separator = encoder.separator_ids
    prompt = encoder.prompt_ids("Check.", "f:1")
    first = encoder._encode("Alice lives in Paris.") + separator
    second = encoder._encode("Bob lives in Rome.") + separator
    assert solution.ids == prompt + first + second
    assert solution.step_ends == [len(prompt) + len(first) - 1, len(solution.ids) - 1]
    assert solution.labels == [True, False]
    # a context that holds the prompt and one step: the second step is cut off, its label unused
    short = StepEncoder(tiny_tokenizer, None, max_len=len(prompt) + len(first) + 1)
    cut = short.encode("Check.", ["Alice lives in Paris.", "Bob lives in Rome."], [True, False], "f:1")
    assert cut.labels == [True] and cut.step_ends == [len(prompt) + len(first) - 1]
    batch = collate_steps([solution, cut], pad_id=0)
    assert batch.rows.tolist() == [0, 0, 1] and batch.labels.tolist() == [1.0, 0.0, 1.0]


def test_bad_step_rows_are_counted_and_named(tmp_path, tiny_tokenizer):
    good = easy_solutions(8)
    bad = [{"prompt": "x", "completions": ["a", "b"], "labels": [True]},
           {"prompt": "x", "completions": ["a", " "], "labels": [True, True]},
           {"prompt": "x", "completions": "a", "labels": [True]}]
    data = write_rows(tmp_path / "steps.jsonl", [*good, *bad])
    with pytest.warns(UserWarning, match=r"3 bad step-labelled rows skipped \(1 bad_labels, 1 bad_type, 1 empty_step"):
        solutions, stats = load_stepwise(data, tiny_tokenizer, None, max_len=64, max_bad_row_fraction=0.5)
    assert len(solutions) == 8 and stats.rows == 11
    with pytest.raises(TemperError, match=r"steps\.jsonl:9: 1 labels for 2 steps: give one label a step"):
        load_stepwise(data, tiny_tokenizer, None, max_len=64, skip_bad_rows=False)


@pytest.fixture(scope="module")
def trained_prm(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("prm")
    data = write_rows(tmp / "steps.jsonl", easy_solutions(96))
    out = tmp / "prm"
    args = [f"model={tiny_model_dir}", "objective=prm", f"data={data}", f"output_dir={out}", "seq_len=64",
            "batch_size=8", "max_steps=25", "optim.lr=1e-3", "eval_fraction=0.25", "logging.eval_every=25",
            "logging.progress=false", "peak_flops=1e12"]
    return out, reward_recipe.run(load_config(reward_recipe.Config, None, args))


def test_a_tiny_process_reward_model_learns_the_step_rule(trained_prm):
    out, summary = trained_prm
    assert summary["objective"] == "prm" and summary["held_out_solutions"] == 24
    before = summary["before"]
    assert summary["eval_step_accuracy"] >= 0.85 and summary["eval_step_accuracy"] > before["eval_step_accuracy"] + 0.25
    assert summary["eval_solution_accuracy"] >= 0.9
    assert summary["eval_first_error_accuracy"] > before["eval_first_error_accuracy"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step_accuracy" in r for r in rows if "loss" in r)


def test_a_step_score_is_the_reward_of_the_prefix_in_transformers(trained_prm, tiny_tokenizer):
    transformers = pytest.importorskip("transformers")
    out, _ = trained_prm
    rm = load_reward_model(out)
    solution = StepEncoder(tiny_tokenizer, None, max_len=64).encode(
        "Check 7.", ["Alice lives in Paris. ok", "Alice lives in Paris. no", "Alice lives in Paris. ok"],
        [True, False, False], "f:1")
    ids = torch.tensor([solution.ids])
    with torch.no_grad():
        steps = rm(ids, at=(torch.zeros(3, dtype=torch.long), torch.tensor(solution.step_ends)))
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
        prefixes = torch.stack([hf(input_ids=ids[:, :end + 1]).logits[0, 0] for end in solution.step_ends])
    assert steps[0] > 0 > steps[1]  # the rule, learned
    assert_reorder_close(steps, prefixes, decoder_lengths(rm, len(solution.ids)))


def test_prm_refuses_pair_settings(capsys, tiny_model_dir, tmp_path):
    assert main(["reward", f"model={tiny_model_dir}", "objective=prm", "center_rewards_coefficient=0.1",
                 f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "center_rewards_coefficient" in err and "objective=orm" in err and "Traceback" not in err


def test_grpo_takes_the_prm_as_a_reward(trained_prm, tmp_path):
    import shutil

    from temper.lineage import read_lineage, write_lineage
    from temper.rewards.functions import RewardSet

    out, _ = trained_prm
    rewards = RewardSet([f"prm:{out}"])
    assert rewards.names == [f"prm:{out.name}"]
    completions = ["Alice lives in Paris. ok\nAlice lives in Paris. ok", "Alice lives in Paris. ok\nAlice lives in Paris. no",
                   "\n\n"]
    total, _ = rewards.score(["Check 3."] * 3, completions)
    assert 0.5 < float(total[0]) <= 1.0 and float(total[1]) < 0.5 and float(total[2]) == 0.0
    # the reward is the lowest step's sigmoid, read from the model as training reads it
    rm = load_reward_model(out)
    from temper.data.tokenizer import Tokenizer

    solution = StepEncoder(Tokenizer.from_dir(out), None, max_len=64).encode(
        "Check 3.", ["Alice lives in Paris. ok", "Alice lives in Paris. no"], [True, True], "x")
    with torch.no_grad():
        steps = rm(torch.tensor([solution.ids]), at=(torch.zeros(2, dtype=torch.long), torch.tensor(solution.step_ends)))
    assert float(total[1]) == pytest.approx(float(steps.sigmoid().min()), abs=1e-5)
    orm = tmp_path / "orm"
    shutil.copytree(out, orm, ignore=shutil.ignore_patterns("checkpoints"))
    write_lineage(orm, {**read_lineage(orm), "reward_objective": "orm"})
    with pytest.raises(TemperError, match=r"an outcome reward model .* judge:reward:"):
        RewardSet([f"prm:{orm}"])
