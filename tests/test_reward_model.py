"""temper reward: the Bradley–Terry loss against its formula and TRL's RewardTrainer, a tiny run
whose held-out accuracy rises, the saved directory against transformers (Llama and GPT-2
bodies), `temper reward score`, resume, LoRA, the built-in world's default data, HH-RLHF with
default settings, and bad input."""

from __future__ import annotations

import json
import math
import shutil
import types
from collections import defaultdict

import pytest
import torch
from conftest import assert_reorder_close, decoder_lengths, shared_file

from temper.cli import main
from temper.config import load_config
from temper.errors import TemperError
from temper.lineage import read_lineage, write_lineage
from temper.losses.reward import bradley_terry_loss, pearson_correlation, reward_pair_metrics
from temper.models.reward import load_reward_model
from temper.recipes import reward as reward_recipe

NAMES = ["Alice", "Bob", "Carol", "Dan", "Eve", "Tom", "Rex", "Ann"]


def easy_pairs(n: int) -> list[dict]:
    """Chosen says Rome, rejected Paris: the same length, one word apart (a rule free of length).
    The seeded fresh head happens to prefer Paris (held-out accuracy 0 before training), so a
    rise above chance is learning, not the draw of the head."""
    return [{"prompt": [{"role": "user", "content": f"Where does {NAMES[i % 8]} {i} live?"}],
             "chosen": [{"role": "assistant", "content": f"{NAMES[(i + 3) % 8]} lives in Rome."}],
             "rejected": [{"role": "assistant", "content": f"{NAMES[(i + 3) % 8]} lives in Paris."}]}
            for i in range(n)]


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train(model_dir, out, *extra) -> dict:
    args = [f"model={model_dir}", f"output_dir={out}", "seq_len=64", "batch_size=8", "logging.progress=false",
            "logging.every=5", "peak_flops=1e12", *extra]
    return reward_recipe.run(load_config(reward_recipe.Config, None, args))


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", easy_pairs(96))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, easy_data):
    out = tmp_path_factory.mktemp("rm") / "rm"
    summary = train(tiny_model_dir, out, f"data={easy_data}", "eval_fraction=0.25", "max_steps=20",
                    "logging.eval_every=20", "optim.lr=1e-3")
    return out, summary


# ----------------------------------------------------------------------------- the loss


def test_bradley_terry_loss_is_its_formula():
    chosen, rejected = torch.tensor([1.5, -0.25, 0.0, 3.0]), torch.tensor([0.5, 0.75, 0.0, -1.0])
    margins = torch.tensor([0.0, 1.0, 0.5, 2.0])
    log_sigmoid = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
    plain = [-log_sigmoid(c - r) for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(plain, rel=1e-6)
    with_margin = [-log_sigmoid(c - r - m) for c, r, m in zip(chosen.tolist(), rejected.tolist(), margins.tolist())]
    assert bradley_terry_loss(chosen, rejected, margins=margins).tolist() == pytest.approx(with_margin, rel=1e-6)
    centred = bradley_terry_loss(chosen, rejected, margins=margins, center_rewards_coefficient=0.01)
    expected = [x + 0.01 * (c + r) ** 2 for x, c, r in zip(with_margin, chosen.tolist(), rejected.tolist())]
    assert centred.tolist() == pytest.approx(expected, rel=1e-6)
    sums = reward_pair_metrics(chosen, rejected)
    assert float(sums["accuracy"]) == 2.0  # a tie (0 vs 0) is a miss, as TRL counts it
    assert float(sums["margin"]) == pytest.approx(1.0 - 1.0 + 0.0 + 4.0)


def test_pearson_correlation_is_numpys():
    np = pytest.importorskip("numpy")
    x, y = torch.tensor([0.3, -1.2, 2.5, 0.0, 1.1]), torch.tensor([3.0, 1.0, 7.0, 2.0, 4.0])
    assert pearson_correlation(x, y) == pytest.approx(float(np.corrcoef(x.numpy(), y.numpy())[0, 1]), rel=1e-12)
    assert math.isnan(pearson_correlation(x, torch.ones(5)))


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (True, 0.01)])
def test_the_loss_is_trl_reward_trainers(margin, center):
    """TRL's RewardTrainer.compute_loss run on the same rewards (its model, accelerator and
    metrics stand-ins): the batch mean of temper's per-pair losses is its loss, and its
    accuracy, margin and mean reward are temper's."""
    trl = pytest.importorskip("trl")
    torch.manual_seed(0)
    B = 6
    rewards = torch.randn(2 * B, 1)
    rewards[1] = rewards[B + 1]  # a tie
    inputs = {"input_ids": torch.zeros(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3)}
    if margin:
        inputs["margin"] = torch.rand(B)
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=False), args=types.SimpleNamespace(center_rewards_coefficient=center),
        accelerator=types.SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    model = lambda **kw: types.SimpleNamespace(logits=rewards)  # noqa: E731 - the logits of one forward
    loss = trl.RewardTrainer.compute_loss(stand_in, model, dict(inputs))
    chosen, rejected = rewards[:B, 0], rewards[B:, 0]
    ours = bradley_terry_loss(chosen, rejected, margins=inputs.get("margin"),
                              center_rewards_coefficient=center or 0.0)
    assert float(ours.mean()) == pytest.approx(float(loss), rel=1e-6)
    metrics = stand_in._metrics["eval"]
    sums = reward_pair_metrics(chosen, rejected)
    assert metrics["accuracy"] == [pytest.approx(float(sums["accuracy"]) / B)]
    assert metrics["margin"] == [pytest.approx(float(sums["margin"]) / B, rel=1e-6)]
    assert metrics["mean_reward"] == [pytest.approx(float(rewards.mean()), rel=1e-6)]


# ----------------------------------------------------------------------------- training


def test_a_tiny_reward_model_learns_the_easy_rule(trained):
    out, summary = trained
    assert summary["held_out_pairs"] == 24 and summary["pairs"] == 72
    before = summary["before"]
    assert before["eval_accuracy"] <= 0.5  # the fresh head ranks the pairs no better than chance
    assert summary["eval_accuracy"] >= 0.95 and summary["eval_loss"] < before["eval_loss"] - 0.1
    assert summary["eval_margin"] > 0
    assert summary["eval_reward/min"] <= summary["eval_reward/mean"] <= summary["eval_reward/max"]
    assert -1.0 <= summary["eval_length_correlation"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all({"accuracy", "margin", "lr", "grad_norm"} <= set(r) for r in steps)
    assert steps[-1]["accuracy"] > steps[0]["accuracy"] or steps[-1]["accuracy"] == 1.0
    assert read_lineage(out)["stage"] == "reward"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1


def test_the_length_correlation_is_over_chosen_and_rejected_responses(tmp_path, tiny_model_dir):
    """Rejected answers that are longer: an RM that learns the rule is length-biased, and says so."""
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"],
             "rejected": [{"role": "assistant", "content": "Rome, I think, or maybe Paris, who knows, " * (1 + i % 3)}]}
            for i, r in enumerate(easy_pairs(48))]
    summary = train(tiny_model_dir, tmp_path / "rm", f"data={write_rows(tmp_path / 'p.jsonl', rows)}",
                    "eval_fraction=0.25", "max_steps=15", "logging.eval_every=15", "optim.lr=1e-3",
                    "logging.eval_at_start=false")
    assert summary["eval_accuracy"] >= 0.9
    assert summary["eval_length_correlation"] < -0.5  # the longer the answer, the lower its reward


def transformers_rewards(model_dir, ids, lengths):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


def right_padded(vocab_size: int, pad_id: int):
    torch.manual_seed(2)
    lengths = torch.tensor([9, 5, 12, 3])
    ids = torch.randint(3, vocab_size, (4, 12))
    ids = ids.masked_fill(torch.arange(12)[None, :] >= lengths[:, None], pad_id)
    return ids, lengths


def test_the_saved_llama_reward_model_scores_alike_in_transformers(trained):
    out, _ = trained
    rm = load_reward_model(out)
    ids, lengths = right_padded(rm.config.vocab_size, rm.config.pad_token_id)
    with torch.no_grad():
        ours = rm(ids, lengths)
    theirs = transformers_rewards(out, ids, lengths)
    assert ours.abs().max() > 1e-3
    assert_reorder_close(ours, theirs, decoder_lengths(rm, ids.shape[1]))


def test_a_gpt2_body_trains_and_round_trips_through_transformers(tmp_path, tiny_tokenizer, easy_data):
    from temper.models import build_model, preset, save_model

    torch.manual_seed(0)
    body = tmp_path / "gpt2"
    save_model(build_model(preset("gpt2-tiny", vocab_size=tiny_tokenizer.vocab_size)), body, tokenizer=tiny_tokenizer)
    out = tmp_path / "rm"
    train(body, out, f"data={easy_data}", "max_steps=2", "logging.eval_at_start=false", "eval_pairs=4")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2ForSequenceClassification"]
    rm = load_reward_model(out)
    ids, lengths = right_padded(rm.config.vocab_size, rm.config.pad_token_id)
    with torch.no_grad():
        ours = rm(ids, lengths)
    assert_reorder_close(ours, transformers_rewards(out, ids, lengths), decoder_lengths(rm, ids.shape[1]))


def test_resume_continues_the_same_run(tmp_path, tiny_model_dir, easy_data):
    # a constant rate: the run cut at step 2 then has the same schedule as the one to step 4
    common = [f"data={easy_data}", "logging.eval_at_start=false", "eval_pairs=4", "checkpoint.every=2",
              "schedule.name=constant", "schedule.warmup_steps=0"]
    train(tiny_model_dir, tmp_path / "straight", *common, "max_steps=4")
    train(tiny_model_dir, tmp_path / "resumed", *common, "max_steps=2")
    train(tiny_model_dir, tmp_path / "resumed", *common, "max_steps=4", "resume=auto")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][-1]
             for d in ("straight", "resumed")]
    assert final[0]["step"] == final[1]["step"] == 4
    assert {k: final[0][k] for k in ("loss", "accuracy", "margin")} == {k: final[1][k] for k in ("loss", "accuracy",
                                                                                                "margin")}


def test_lora_trains_the_head_in_full_and_saves_a_merged_reward_model(tmp_path, tiny_model_dir, easy_data):
    out = tmp_path / "rm"
    summary = train(tiny_model_dir, out, f"data={easy_data}", "max_steps=3", "peft.method=lora",
                    "logging.eval_at_start=false", "eval_pairs=4")
    rm = load_reward_model(out)  # a whole sequence-classification model, the LoRA merged in
    hidden, layers, r = rm.config.hidden_size, rm.config.num_layers, 8
    q_out, v_out = rm.config.num_heads * rm.config.head_dim, rm.config.num_kv_heads * rm.config.head_dim
    lora = layers * r * ((hidden + q_out) + (hidden + v_out))
    assert summary["trainable_parameters"] == lora + hidden  # the adapters and the score head
    assert not (out / "adapter_config.json").exists()


def test_the_world_pairs_are_the_default_data(tmp_path, tiny_model_dir):
    from temper.data.world import WorldConfig, build_world, write_world

    world = tmp_path / "world"
    write_world(build_world(WorldConfig(num_people=8, num_towns=4, docs_per_person=2, docs_per_town=1,
                                        num_arithmetic_docs=10, num_dialogue_docs=10, num_sft_train=8,
                                        num_sft_test=4, num_pref_train=24, num_pref_test=6, num_rl_train=4,
                                        num_rl_test=4)), world)
    model = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, model)
    write_lineage(model, {**read_lineage(model), "world_dir": str(world)})
    summary = train(model, tmp_path / "rm", "max_steps=1", "logging.eval_at_start=false", "seq_len=128")
    assert summary["rows_read"] == 24 and summary["held_out_pairs"] == 6


def test_hh_rlhf_trains_with_default_settings(tmp_path, tiny_model_dir):
    data = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    args = [f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'rm'}", "limit=24", "max_steps=1",
            "logging.progress=false", "peak_flops=1e12"]  # the defaults otherwise (seq_len 512, batch_size 8)
    summary = reward_recipe.run(load_config(reward_recipe.Config, None, args))
    assert summary["rows_read"] == 24 and summary["pairs"] + summary["held_out_pairs"] == 24
    assert summary["skipped_rows"] == {} and summary["truncated"] > 0  # long dialogues: cut, never dropped


def test_margins_are_read_and_refused_when_only_some_rows_have_one(tmp_path, tiny_model_dir):
    rows = [{**r, "margin": 0.5} for r in easy_pairs(16)]
    summary = train(tiny_model_dir, tmp_path / "rm", f"data={write_rows(tmp_path / 'm.jsonl', rows)}",
                    "max_steps=1", "logging.eval_at_start=false")
    assert summary["margins"] is True
    some = write_rows(tmp_path / "some.jsonl", [*rows[:8], *easy_pairs(16)[8:]])
    with pytest.raises(TemperError, match=r"some\.jsonl:\d+: no 'margin', though \d+ of the \d+ pairs of data= "):
        train(tiny_model_dir, tmp_path / "rm2", f"data={some}", "max_steps=1", "logging.eval_at_start=false")


# ----------------------------------------------------------------------------- reward score


def test_reward_score_writes_the_training_scores(trained, tmp_path, capsys, tiny_tokenizer):
    from temper.data.chat import model_chat_template
    from temper.data.preference import load_preferences

    out, _ = trained
    pairs = easy_pairs(4)
    rows = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs] + pairs
    data = write_rows(tmp_path / "rows.jsonl", rows)
    scored = tmp_path / "scored.jsonl"
    assert main(["reward", "score", f"model={out}", f"data={data}", f"output={scored}", "seq_len=64"]) == 0
    summary = capsys.readouterr().out  # with output=, the summary is the stdout
    written = [json.loads(line) for line in scored.read_text().splitlines()]
    assert [{k: v for k, v in w.items() if not k.endswith("score")} for w in written] == rows
    # the scores are the model's rewards of the sequences training built (the same encoder, the same cut)
    encoded, _ = load_preferences(write_rows(tmp_path / "p.jsonl", pairs), tiny_tokenizer,
                                  model_chat_template(out, tiny_tokenizer), max_len=63)
    rm = load_reward_model(out)
    with torch.no_grad():
        for e, w, single in zip(encoded, written[4:], written[:4]):
            chosen = rm(torch.tensor([e.prompt_ids + e.chosen_ids]))
            rejected = rm(torch.tensor([e.prompt_ids + e.rejected_ids]))
            lengths = decoder_lengths(rm, len(e.prompt_ids) + len(e.chosen_ids))
            assert_reorder_close(torch.tensor([w["chosen_score"], w["rejected_score"], single["score"]]),
                                 torch.cat([chosen, rejected, chosen]), lengths)
    right = sum(w["chosen_score"] > w["rejected_score"] for w in written[4:])
    assert f"pairs ranked right: {100 * right / 4:.1f}% of 4" in summary and "8 of 8 rows scored" in summary


# ----------------------------------------------------------------------------- bad input


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"temper {command}: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_bad_input_gets_one_line(trained, tmp_path, tiny_model_dir, easy_data, capsys):
    out, _ = trained
    rows = write_rows(tmp_path / "rows.jsonl", [{"prompt": "Where?", "response": "Paris."}])
    # a reward model as the body to train
    assert main(["reward", f"model={out}", f"data={easy_data}", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "is a reward model already (LlamaForSequenceClassification)" in one_error_line(capsys, "reward")
    # a causal LM to score with
    assert main(["reward", "score", f"model={tiny_model_dir}", f"data={rows}"]) == 2
    assert "(a causal language model)" in one_error_line(capsys, "reward score")
    # a reward-model directory without its head: reward score and the reward judge
    from safetensors.torch import load_file, save_file

    no_head = tmp_path / "no-head"
    shutil.copytree(out, no_head, ignore=shutil.ignore_patterns("checkpoints"))
    weights = load_file(no_head / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, no_head / "model.safetensors", metadata={"format": "pt"})
    assert main(["reward", "score", f"model={no_head}", f"data={rows}"]) == 2
    assert "tensor 'score.weight' (the reward head) missing" in one_error_line(capsys, "reward score")
    from temper.rewards.judges import make_judge

    with pytest.raises(TemperError, match=r"score\.weight"):
        make_judge(f"reward:{no_head}")
    # a margin that is not a number, stopped at
    bad = write_rows(tmp_path / "bad.jsonl", [*easy_pairs(3), {**easy_pairs(1)[0], "margin": "high"}])
    assert main(["reward", f"model={tiny_model_dir}", f"data={bad}", "skip_bad_rows=false",
                 f"output_dir={tmp_path / 'y'}"]) == 2
    assert "bad.jsonl:4: field 'margin' is of type str (expected a finite number)" in one_error_line(capsys, "reward")
    assert main(["reward", f"model={tiny_model_dir}", "peft.method=prefix", f"output_dir={tmp_path / 'z'}"]) == 2
    assert "a reward model trains its body with LoRA" in one_error_line(capsys, "reward")


def test_the_reward_judge_takes_the_trained_model(trained):
    from temper.rewards.judges import Prompt, make_judge

    out, _ = trained
    judge = make_judge(f"reward:{out}")
    scores, = judge.rank([Prompt.from_text("Where does Eve 7 live?")], [["Dan lives in Paris.", "Dan lives in Rome."]])
    assert scores[1] > scores[0]  # the rule it learned, through the judge's own encoding  # the rule it learned, through the judge's own encoding


def test_grpo_takes_the_trained_model_as_a_reward(trained):
    from temper.rewards.functions import RewardSet

    out, _ = trained
    rewards = RewardSet([f"judge:reward:{out}"])
    total, per_function = rewards.score(["Where does Eve 7 live?"] * 2, ["Dan lives in Paris.", "Dan lives in Rome."])
    assert total.shape == (2,) and bool(torch.isfinite(total).all()) and total[1] > total[0]


def test_a_lora_run_resumes(tmp_path, tiny_model_dir, easy_data):
    """The head added to modules_to_save is the run's doing, not a setting: a resumed LoRA run has the same settings."""
    common = [f"data={easy_data}", "peft.method=lora", "logging.eval_at_start=false", "eval_pairs=4",
              "checkpoint.every=1"]
    train(tiny_model_dir, tmp_path / "rm", *common, "max_steps=1")
    summary = train(tiny_model_dir, tmp_path / "rm", *common, "max_steps=2", "resume=auto")
    assert summary["steps"] == 2
