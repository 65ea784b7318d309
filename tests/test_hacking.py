"""The reward-hacking watch: reward up while the pass rate falls is flagged once, with one warning;
both climbing, or noise around flat, is not; a 3x length drift is; its state resumes the same
decisions; a tiny `temper grpo` run logs hacking/* in metrics.jsonl."""

from __future__ import annotations

import json
import random
import warnings

import pytest
from test_grpo import rows, settings, train

from temper.eval.hacking import RewardHackingWatch, WatchConfig, theil_sen

CFG = WatchConfig(window=40, min_points=4)


def series(reward, heldout, length=lambda s: 20.0, steps=100, every=5, eval_every=10):
    """Rows as the loop logs them: a reward and a length every `every` steps, the held-out signal every
    `eval_every` (and at step 0, the evaluation at the start)."""
    out = [{"step": 0, "eval_pass_rate": heldout(0)}]
    for step in range(every, steps + 1, every):
        row = {"step": step, "reward": reward(step), "completions/mean_length": length(step)}
        if step % eval_every == 0:
            row["eval_pass_rate"] = heldout(step)
        out.append(row)
    return out


def watched(rows_, watch=None, reference=20.0):
    watch = watch or RewardHackingWatch(CFG)
    watch.set_reference(reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        added = [watch.observe(r) for r in rows_]
    return added, [str(w.message) for w in caught]


def test_reward_climbing_while_the_pass_rate_falls_is_flagged_once():
    added, caught = watched(series(lambda s: 0.2 + 0.006 * s, lambda s: 0.5 - 0.002 * s))
    flagged = [a for a in added if a.get("hacking/reward_vs_heldout")]
    assert len(flagged) >= 10 and all(a["hacking"] == "reward_vs_heldout" for a in flagged)
    assert len(caught) == 1 and "reward hacking?" in caught[0] and "eval_pass_rate" in caught[0]
    first = next(a for a in added if a.get("hacking/reward_vs_heldout"))
    assert first["hacking/reward_rise"] > 0.2 and first["hacking/heldout_rise"] < 0
    assert added[0] == {}  # the evaluation at the start: held-out only, nothing to add


def test_reward_and_pass_rate_climbing_together_is_not_flagged():
    added, caught = watched(series(lambda s: 0.2 + 0.006 * s, lambda s: 0.3 + 0.005 * s))
    assert caught == [] and not any(a.get("hacking") for a in added)
    assert any(a.get("hacking/reward_rise", 0) > 0.2 and a["hacking/heldout_rise"] > 0 for a in added)


def test_noise_around_flat_is_not_flagged():
    rng = random.Random(0)
    added, caught = watched(series(lambda s: 0.5 + rng.gauss(0, 0.05), lambda s: 0.5 + rng.gauss(0, 0.03),
                                   lambda s: 20 + rng.gauss(0, 3), steps=400))
    assert caught == [] and not any(a.get("hacking") for a in added)
    assert all(0.7 < a["hacking/length_ratio"] < 1.4 for a in added[1:])


def test_one_outlying_reward_row_moves_no_trend():
    spike = {50: 5.0}
    added, caught = watched(series(lambda s: spike.get(s, 0.5), lambda s: 0.5))
    assert caught == [] and not any(a.get("hacking") for a in added)
    assert theil_sen([[0, 0], [1, 1], [2, 2], [3, 3], [4, 40]])[0] == 1.0  # least squares: 8.2


def test_length_drifting_3x_is_flagged_both_ways():
    added, caught = watched(series(lambda s: 0.5, lambda s: 0.5, lambda s: 20 + 0.4 * s))  # 20 -> 60 tokens
    assert added[-1]["hacking/length_ratio"] >= 2.8 and added[-1]["hacking"] == "length"
    assert len(caught) == 1 and "2x the reference's mean length" in caught[0]
    added, caught = watched(series(lambda s: 0.5, lambda s: 0.5, lambda s: max(20, 60 - 0.5 * s)), reference=60.0)
    assert added[-1]["hacking/length_ratio"] <= 1 / 2.8 and added[-1]["hacking"] == "length"
    assert len(caught) == 1 and "brevity" in caught[0]


def test_the_state_resumes_the_same_decisions():
    logged = series(lambda s: 0.2 + 0.006 * s, lambda s: 0.5 - 0.002 * s, lambda s: 20 + 0.4 * s)
    straight, caught = watched(logged)
    first = RewardHackingWatch(CFG)
    before, caught_before = watched(logged[:5], first)  # stopped mid-streak: the reward climbs, not yet flagged
    assert caught_before == [] and first.streak > 0
    state = json.loads(json.dumps(first.state_dict()))  # as state.json holds it
    resumed = RewardHackingWatch(CFG)
    resumed.load_state_dict(state)
    after, caught_after = watched(logged[5:], resumed, reference=99.0)  # the saved reference is kept
    assert before + after == straight
    assert caught_after == caught and len(caught) == 2
    # and once warned, a resumed watch does not warn again
    again = RewardHackingWatch(CFG)
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    assert watched(logged[-3:], again)[1] == []


def test_off_adds_nothing():
    added, caught = watched(series(lambda s: 0.006 * s, lambda s: 0.5, lambda s: 5.0 * s),
                            RewardHackingWatch(WatchConfig(enabled=False)))
    assert caught == [] and all(a == {} for a in added)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(8)))
    return path


def test_a_grpo_run_logs_the_watch(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "run"
    prompts_file = prompts
    train(*settings(tiny_model_dir, prompts_file, out, f"eval_prompts={prompts_file}", "eval_limit=2",
                    "logging.eval_every=1", "logging.eval_at_start=true", "watch.min_points=2", "watch.window=5"))
    logged = rows(out)
    assert [r["step"] for r in logged] == [0, 1, 2]
    assert "hacking" not in logged[0]
    for r in logged[1:]:
        assert isinstance(r["hacking"], str) and r["hacking/length_ratio"] > 0
    assert logged[1]["hacking/length_ratio"] == 1.0  # step 1's batch is the reference's
    assert isinstance(logged[2]["hacking/reward_vs_heldout"], bool)  # two rewards, three evaluations
    state = json.loads(next((out / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["watch"]["reference_length"] == logged[1]["completions/mean_length"]


def test_the_score_climbing_with_the_kl_past_its_bound_is_flagged_once():
    watch = RewardHackingWatch(WatchConfig(window=40, min_points=4, max_kl=5.0), reward_key="objective/scores",
                               kl_key="objective/kl")
    watch.set_reference(20.0)
    rows_ = [{"step": s, "objective/scores": 0.2 + 0.006 * s, "objective/kl": 0.1 * s,
              "completions/mean_length": 20.0} for s in range(5, 101, 5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        added = [watch.observe(r) for r in rows_]
    flagged = [r["step"] for r, a in zip(rows_, added) if "kl" in a["hacking"].split(",")]
    assert flagged and min(flagged) > 50  # only once the KL is past 5 (step 50) and the climb has lasted
    assert len(caught) == 1 and "watch.max_kl=5" in str(caught[0].message)
    # the same climb with the KL inside the bound, and the bound off, are not flagged
    for cfg, kl in ((WatchConfig(window=40, min_points=4, max_kl=50.0), 0.1), (WatchConfig(window=40), 0.1)):
        quiet = RewardHackingWatch(cfg, reward_key="objective/scores", kl_key="objective/kl")
        marks = [quiet.observe({**r, "objective/kl": kl * r["step"]}) for r in rows_]
        assert not any("kl" in m.get("hacking", "").split(",") for m in marks)


def test_repetition_drifting_from_the_reference_is_flagged_and_resumes_alike():
    from temper.eval.hacking import repetition_rate

    assert repetition_rate([1, 2, 3, 4, 5]) == 0.0 and repetition_rate([1, 2]) == 0.0
    assert repetition_rate([1, 2, 3, 1, 2, 3, 1, 2, 3]) == pytest.approx(4 / 7)  # 7 3-grams, 3 distinct
    watch = RewardHackingWatch(WatchConfig(repetition_drift=0.25))
    watch.set_reference(20.0, repetition=0.05)
    watch.set_reference(99.0, repetition=0.9)  # the first reference is kept
    rows_ = [{"step": s, "reward": 0.5, "completions/mean_length": 20.0, "completions/repetition_rate": r}
             for s, r in ((1, 0.05), (2, 0.1), (3, 0.4), (4, 0.5), (5, 0.6))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        added = [watch.observe(r) for r in rows_[:3]]
        resumed = RewardHackingWatch(WatchConfig(repetition_drift=0.25))
        resumed.load_state_dict(json.loads(json.dumps(watch.state_dict())))
        added += [resumed.observe(r) for r in rows_[3:]]
    assert [a["hacking"] for a in added] == ["", "", "", "repetition", "repetition"]
    assert added[-1]["hacking/repetition_drift"] == pytest.approx(0.45)
    assert len(caught) == 1 and "3-grams repeat" in str(caught[0].message)
