"""Iterative (online) DPO and AI feedback: the world's checker, the judges (rule, regex,
callable, LLM) with bad judgements counted or refused, an online round with rule:world, an
AI-feedback round with a stand-in reviser, the LLM reviser's plumbing, and bad input."""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import assert_reorder_close, decoder_lengths

from temper.cli import Commands, main
from temper.config import load_config
from temper.data.prompts import Prompt, read_prompts
from temper.errors import TemperError
from temper.eval.world_checker import check_reply
from temper.rewards.judges import LLMJudge, make_judge
from temper.train.rollout import sample_responses
from temper.workflows.online_dpo import best_vs_worst, revision_pairs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from temper.data.world import WorldConfig, build_world, write_world

    out = tmp_path_factory.mktemp("world")
    built = build_world(WorldConfig(num_people=12, num_sft_train=40, num_sft_test=8, num_pref_train=200,
                                    num_pref_test=12, num_rl_train=24, num_rl_test=8))
    write_world(built, out)
    return out, built


def reviser_module(tmp_path, monkeypatch, body: str, name: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(("temper dpo: error: ", "temper online-dpo: error: "))]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def online(tmp_path, model_dir, *extra, out="online"):
    """`temper online-dpo` in this process, through the command runner the CLI gives workflows."""
    commands = Commands()
    cfg = commands.config("online-dpo", [f"model={model_dir}", f"output_dir={tmp_path / out}", "rounds=1",
                                         "dpo.batch_size=2", "dpo.seq_len=96", "dpo.max_steps=2", "max_new_tokens=12",
                                         "dpo.logging.progress=false", "dpo.logging.every=1", "dpo.optim.lr=1e-3",
                                         *extra])
    return commands.run("online-dpo", cfg)


# ----------------------------------------------------------------------------- the world's checker


def test_checker_scores_the_worlds_chosen_1_and_each_rejected_kind_below_on_its_criterion(world):
    _, built = world
    criterion = {"wrong": "correct", "rambling": "concise", "repetitive": "not_repetitive", "rude": "polite"}
    seen = set()
    for split in ("preference/train", "preference/test"):
        for row in built.splits[split]:
            chosen = check_reply(row["chosen"][0]["content"], row["answer"])
            assert chosen["score"] == 1.0, (row["chosen"], row["answer"], chosen)
            rejected = check_reply(row["rejected"][0]["content"], row["answer"])
            assert rejected["score"] < 1.0 and not rejected[criterion[row["reason"]]], (row, rejected)
            if row["reason"] != "repetitive":  # a long repetition is also too long to be concise
                failed = {k for k in criterion.values() if not rejected[k]}
                assert failed == {criterion[row["reason"]]}, (row, rejected)
            seen.add(row["reason"])
    assert seen == set(criterion)


@pytest.mark.parametrize("reply, answer, failed", [
    ("0 plus 5 is 7.", "5", {"correct"}),  # the 5 of the question is not the answer
    ("0 plus 5 is 5.", "5", set()),
    ("In capital letters: Lantern.", "LANTERN", {"correct"}),  # the case is the answer
    ("LANTERN", "LANTERN", set()),
    ("Mira lives in Brimholt.", "Brimholt", set()),
    ("Mira lives in Brimholtshire.", "Brimholt", {"correct"}),  # whole words only
    ("That is a really interesting question. Mira lives in Brimholt.", "Brimholt", {"concise"}),
    ("Brimholt. Brimholt.", "Brimholt", {"not_repetitive"}),
    ("Ugh, obviously. Brimholt.", "Brimholt", {"polite"}),
    ("", "Brimholt", {"correct", "concise", "not_repetitive", "polite"}),
])
def test_checker_criteria(reply, answer, failed):
    result = check_reply(reply, answer)
    assert {k for k in ("correct", "concise", "not_repetitive", "polite") if not result[k]} == failed
    assert 0.0 <= result["score"] <= 1.0 and (result["score"] == 1.0) == (not failed)


# ----------------------------------------------------------------------------- judges


PROMPTS = [Prompt.from_text("What is 2 plus 3?", answer="5", source="p.jsonl:1"),
           Prompt.from_text("Where does Mira live?", answer="Brimholt", source="p.jsonl:2")]
RESPONSES = [["2 plus 3 is 5.", "2 plus 3 is 6.", "Ugh, obviously. 2 plus 3 is 5."],
             ["Mira lives in Brimholt.", "Mira lives in Brimholt.", "Mira lives in Brimholt."]]


def test_rule_and_regex_judges_and_best_vs_worst_pairs():
    scores = make_judge("rule:world").rank(PROMPTS, RESPONSES)
    assert scores == [[1.0, 0.6, 0.8], [1.0, 1.0, 1.0]]
    pairs, skipped = best_vs_worst(PROMPTS, RESPONSES, scores)
    assert skipped == {"tie": 1} and len(pairs) == 1
    assert pairs[0]["chosen"][0]["content"] == "2 plus 3 is 5." and pairs[0]["rejected"][0]["content"] == "2 plus 3 is 6."
    assert pairs[0]["prompt"] == PROMPTS[0].messages and pairs[0]["source"] == "p.jsonl:1"
    assert make_judge(r"regex:\b5\b").rank(PROMPTS, RESPONSES)[0] == [1.0, 0.0, 1.0]
    # the rule needs each row's answer, named before anything is sampled
    with pytest.raises(TemperError, match=r"q.jsonl:7: judge rule:world needs an 'answer'"):
        make_judge("rule:world").check_prompts([Prompt.from_text("Hi?", source="q.jsonl:7")])
    # an empty response never takes part in a pair, and a prompt with one scored response makes none
    pairs, skipped = best_vs_worst(PROMPTS[:1], [["", "2 plus 3 is 5."]], [[0.0, 1.0]])
    assert pairs == [] and skipped == {"unscored": 1}


def test_callable_judge_counts_garbage_and_exceptions_or_refuses_naming_the_row(tmp_path, monkeypatch):
    name = reviser_module(tmp_path, monkeypatch, """
        def score(prompt, response):
            if "boom" in response:
                raise RuntimeError("judge exploded")
            if "text" in response:
                return "0.7"
            if "nan" in response:
                return float("nan")
            return len(response) / 10

        def with_row(prompt, response, row):
            return float(row["bonus"]) + (response == prompt)
    """, "stand_in_judges")
    prompts = [Prompt.from_text("Q?", source="p.jsonl:3")]
    judge = make_judge(f"callable:{name}:score")
    with pytest.warns(UserWarning, match=r"3 samples skipped \(1 exception, 1 not_a_number, 1 not_finite\).*"
                                         r"p.jsonl:3 sample 1: RuntimeError: judge exploded"):
        scores = judge.rank(prompts, [["ok", "boom", "text", "nan", "longer"]])
    assert scores == [[0.2, None, None, None, 0.6]]
    assert judge.stats.judged == 2 and judge.stats.bad == {"exception": 1, "not_a_number": 1, "not_finite": 1}
    strict = make_judge(f"callable:{name}:score", skip_bad=False)
    with pytest.raises(TemperError, match=r"p.jsonl:3 sample 0: judge callable:stand_in_judges:score returned "
                                          r"str '0.7', not a number; set skip_bad_judgements=true"):
        strict.rank(prompts, [["text"]])
    row_prompt = Prompt([{"role": "user", "content": "Q?"}], "p.jsonl:4", row={"bonus": 2})
    assert make_judge(f"callable:{name}:with_row").rank([row_prompt], [["Q?", "A"]]) == [[3.0, 2.0]]


def test_llm_judge_scores_are_shares_of_pairwise_wins(tiny_model_dir):
    judge = make_judge(f"llm:{tiny_model_dir}")
    assert isinstance(judge, LLMJudge)
    scores = judge.rank(PROMPTS, [["five", "six", "seven"], ["Brimholt", "Brimholt"]])
    assert all(0.0 <= s <= 1.0 for ss in scores for s in ss)
    assert sum(scores[0]) == pytest.approx(1.5)  # each of the 3 comparisons hands out one win in total
    assert scores[1] == [0.5, 0.5]  # identical responses: a tie, without asking the judge


# ----------------------------------------------------------------------------- rounds


def test_sampling_gives_k_responses_per_prompt_reproducibly(tiny_model_dir, world):
    from temper.data.chat import chat_template_for
    from temper.loading import load_for_inference

    prompts = read_prompts(world[0] / "rl" / "train.jsonl")[:3]
    model, tokenizer = load_for_inference(tiny_model_dir)
    template = chat_template_for(tiny_model_dir, tokenizer, None)
    options = dict(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3, batch_size=4)
    first = sample_responses(model, tokenizer, template, prompts, 3, **options)
    assert [len(rs) for rs in first] == [3, 3, 3] and len({r for rs in first for r in rs}) > 3
    assert sample_responses(model, tokenizer, template, prompts, 3, **options) == first


def test_online_round_with_the_world_rule(tmp_path, tiny_model_dir, world, monkeypatch):
    """A stand-in policy answers in the world's styles (the tiny model only writes noise): the rule
    judge pairs correct-and-polite over wrong, a prompt answered alike is a counted tie, one DPO round
    trains from the policy into round_1 and the report carries before/after numbers."""
    import temper.workflows.online_dpo as online_module

    world_dir, _ = world
    calls = []

    def stand_in(model, tokenizer, template, prompts, k, **options):
        calls.append(options["seed"])
        styles = [lambda a: f"The answer is {a}.", lambda a: "I do not know.",
                  lambda a: f"Ugh, obviously. The answer is {a}.", lambda a: f"The answer is {a}. " * 3]
        return [[styles[j % 4](p.answer) if i % 3 else "Same." for j in range(k)] for i, p in enumerate(prompts)]

    monkeypatch.setattr(online_module, "sample_responses", stand_in)
    result = online(tmp_path, tiny_model_dir, f"prompts={world_dir / 'rl' / 'train.jsonl'}",
                    "prompts_per_round=9", "samples_per_prompt=4", f"eval_data={world_dir / 'preference' / 'test.jsonl'}")
    out = tmp_path / "online"
    report, = result["rounds"]
    assert report["pairs"] == 6 and report["skipped_prompts"] == {"tie": 3}
    assert report["judge_score_before"] == pytest.approx((6 * (1.0 + 0.6 + 0.8 + 0.8) + 3 * 4 * 0.6) / 36)
    assert report["judge_score_after"] is not None and calls == [1, 1]  # after: the same prompts and seed
    pairs = [json.loads(line) for line in (out / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"][0]["content"] == f"The answer is {p['answer']}." for p in pairs)
    assert all(p["rejected"][0]["content"] == "I do not know." for p in pairs)
    assert (out / "round_1" / "model.safetensors").is_file() and result["final_model"] == str(out / "round_1")
    dpo_summary = json.loads((out / "round_1" / "summary.json").read_text())
    assert dpo_summary["pairs"] == 6 and dpo_summary["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert report["dpo"]["eval_rewards/accuracies_after"] is not None
    assert json.loads((out / "rounds.jsonl").read_text())["round"] == 1
    with pytest.raises(TemperError, match=r"holds an earlier run \(round_1, summary.json\)"):  # never mixed with a new run silently
        online(tmp_path, tiny_model_dir, f"prompts={world_dir / 'rl' / 'train.jsonl'}")
    again = online(tmp_path, tiny_model_dir, f"prompts={world_dir / 'rl' / 'train.jsonl'}", "resume=auto")
    assert again["rounds"] == result["rounds"]  # the finished round is kept, not trained again


def test_lora_rounds_merge_each_adapter_into_the_next_policy(tmp_path, tiny_model_dir, world):
    """peft.method=lora: round k trains an adapter on round k-1's policy (its reference: that policy with
    the adapter off), merges it into round_k/merged, and round k+1 samples and trains from the merge."""
    from safetensors.torch import load_file

    from temper.loading import load_for_inference

    world_dir, _ = world
    lora = ["dpo.peft.method=lora", "dpo.peft.r=4", "dpo.peft.target_modules=[q_proj,v_proj]"]
    result = online(tmp_path, tiny_model_dir, f"prompts={world_dir / 'rl' / 'train.jsonl'}", "rounds=2",
                    "prompts_per_round=6", "samples_per_prompt=4", "judge=regex:[aeiou]", "dpo.optim.lr=5e-2", *lora)
    out = tmp_path / "online"
    first, second = result["rounds"]
    assert first["model"] == str(out / "round_1" / "merged") and second["policy"] == first["model"]
    assert result["final_model"] == str(out / "round_2" / "merged")
    for k, base in ((1, tiny_model_dir), (2, out / "round_1" / "merged")):
        adapter = json.loads((out / f"round_{k}" / "adapter_config.json").read_text())
        assert Path(adapter["base_model_name_or_path"]) == Path(base).resolve()
        summary = json.loads((out / f"round_{k}" / "summary.json").read_text())
        assert summary["reference"] == "adapter" and summary["peft"] == "lora"
    # the merge is the adapter folded in: the same logits as base + adapter, and not the base's
    ids = torch.tensor([[5, 17, 42, 9, 3, 77]])
    with torch.no_grad():
        merged_model = load_for_inference(out / "round_2" / "merged")[0]
        merged = merged_model(ids)
        adapted = load_for_inference(out / "round_2")[0](ids)
        base = load_for_inference(out / "round_1" / "merged")[0](ids)
    # (W + B A) x vs W x + B (A x): the same sums in another order, the adapter's over its rank 4
    assert_reorder_close(merged, adapted, decoder_lengths(merged_model, ids.shape[1]) + (4,))
    assert (merged - base).abs().max() > 1e-3
    w1 = load_file(out / "round_1" / "merged" / "model.safetensors")
    w0 = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(w1[k], w0[k]) for k in w0 if "q_proj" in k)
    # a crash after round 2's training, before its merge: resume=auto merges and finishes it
    import shutil

    merged_before = load_file(out / "round_2" / "merged" / "model.safetensors")
    (out / "round_2" / "round.json").unlink()
    shutil.rmtree(out / "round_2" / "merged")
    again = online(tmp_path, tiny_model_dir, f"prompts={world_dir / 'rl' / 'train.jsonl'}", "rounds=2",
                   "prompts_per_round=6", "samples_per_prompt=4", "judge=regex:[aeiou]", "dpo.optim.lr=5e-2", *lora,
                   "resume=auto")
    assert again["final_model"] == result["final_model"]
    # the same adapter merged into the same weights by the same code: bitwise
    torch.testing.assert_close(load_file(out / "round_2" / "merged" / "model.safetensors"), merged_before, rtol=0, atol=0)


def test_online_round_with_real_sampling_and_a_regex_judge(tmp_path, tiny_model_dir, world):
    world_dir, _ = world
    result = online(tmp_path, tiny_model_dir, f"prompts={world_dir / 'rl' / 'train.jsonl'}",
                    "prompts_per_round=6", "samples_per_prompt=4", "judge=regex:[aeiou]")
    report, = result["rounds"]
    samples = [json.loads(line) for line in (tmp_path / "online" / "round_1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(len(s["responses"]) == 4 for s in samples)
    assert report["pairs"] + sum(report["skipped_prompts"].values()) == 6 and report["pairs"] >= 1
    assert (tmp_path / "online" / "round_1" / "model.safetensors").is_file()


def test_a_judge_that_fails_on_every_sample_is_one_line_naming_the_bad_judgements(tmp_path, tiny_model_dir, world,
                                                                                  monkeypatch, capsys):
    name = reviser_module(tmp_path, monkeypatch, """
        def score(prompt, response):
            raise RuntimeError("judge service timed out")
    """, "always_failing_judge")
    with pytest.warns(UserWarning, match=r"6 samples skipped \(6 exception\)"):
        code = main(["online-dpo", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'o'}", "rounds=1",
                     "max_new_tokens=4", f"prompts={world[0] / 'rl' / 'train.jsonl'}", "prompts_per_round=3",
                     "samples_per_prompt=2", f"judge=callable:{name}:score", "dpo.logging.progress=false"])
    assert code == 2
    assert (f"round 1: the judge made no pairs (skipped: 3 unscored; judge callable:{name}:score: 6 bad judgements "
            "(6 exception))") in one_line_error(capsys)


def test_ai_feedback_round_with_a_stand_in_reviser(tmp_path, tiny_model_dir, monkeypatch):
    name = reviser_module(tmp_path, monkeypatch, """
        def revise(prompt, response, principle):
            i = int(prompt.split()[1])
            if i % 5 == 0:
                raise RuntimeError("reviser exploded")
            if i % 5 == 1:
                return None
            if i % 5 == 2:
                return "  " + response + " "
            if i % 5 == 3:
                return "   "
            return f"Answer {i}. ({principle[:12]})"
    """, "stand_in_reviser")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i} please?"}) + "\n" for i in range(10)))
    result = online(tmp_path, tiny_model_dir, f"prompts={prompts}", f"judge=constitution:callable:{name}:revise",
                    "samples_per_prompt=1", "prompts_per_round=0", "dpo.eval_fraction=0.0")
    report, = result["rounds"]
    round_dir = tmp_path / "online" / "round_1"
    pairs = [json.loads(line) for line in (round_dir / "pairs.jsonl").read_text().splitlines()]
    sampled = [json.loads(line) for line in (round_dir / "samples.jsonl").read_text().splitlines()]
    answered = [int(s["question"].split()[1]) for s in sampled if s["responses"][0]]
    reasons = {0: "exception", 1: "no_revision", 2: "identical", 3: "empty_revision"}
    assert report["empty_responses"] == 10 - len(answered)
    assert report["skipped_responses"] == dict(Counter(reasons[i % 5] for i in answered if i % 5 != 4))
    assert report["pairs"] == len(pairs) == sum(1 for i in answered if i % 5 == 4) >= 1
    assert "RuntimeError: reviser exploded" in report["first_skipped"]["exception"]
    for p in pairs:  # revised > original, with the principle that asked for it
        i = int(p["prompt"][0]["content"].split()[1])
        assert p["chosen"][0]["content"].startswith(f"Answer {i}.") and p["rejected"][0]["content"]
        assert p["principle"].startswith(p["chosen"][0]["content"].split("(")[1][:12])
    assert report["judge_score_before"] is None  # nothing scores revisions unless monitor_judge= is given
    assert (tmp_path / "online" / "round_1" / "model.safetensors").is_file()


def test_llm_reviser_plumbing_gives_pairs_or_counted_skips(tiny_model_dir):
    from temper.rewards.feedback import make_reviser, read_constitution

    principles = read_constitution()
    assert len(principles) == 4 and principles[1].startswith("Be concise")
    reviser = make_reviser(f"constitution:{tiny_model_dir}", max_new_tokens=6)
    responses = [["2 plus 3 is 5.", "six"], ["Brimholt.", ""]]
    pairs, skipped, first = revision_pairs(PROMPTS, responses, reviser, principles, 1)
    assert len(pairs) + sum(skipped.values()) == 3  # the empty response is not revised
    for p in pairs:
        assert p["chosen"][0]["content"].strip() and p["chosen"][0]["content"] != p["rejected"][0]["content"]
        assert p["principle"] in principles and isinstance(p["critique"], str)
    assert set(first) == set(skipped)


def test_a_revision_that_repeats_its_critique_is_skipped():
    from temper.rewards.feedback import Reviser, Revision

    class Parrot(Reviser):  # what a 3M-parameter judge does: one short reply to both requests
        def revise_all(self, prompts, responses, principles):
            return [Revision("6", critique="6"), Revision("2 plus 3 is 5.", critique="It is wrong.")]

    pairs, skipped, first = revision_pairs(PROMPTS[:1], [["2 plus 3 is 6.", "five"]], Parrot(), ["Be right."], 1)
    assert skipped == {"revision_is_critique": 1} and "repeats the critique '6'" in first["revision_is_critique"]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("2 plus 3 is 5.", "five")]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, message", [
    (["judge=rules:world"], r"judge=rules:world: expected KIND:ARGUMENT .*\(did you mean 'rule:'\?\)"),
    (["judge=callable:no_such_module_xyz:score"], r"cannot import module 'no_such_module_xyz'"),
    (["judge=callable:json:lodas"], r"module 'json' has no 'lodas' \(did you mean 'loads'\?\)"),
    (["judge=reward:/no/such/dir"], r"judge=reward:/no/such/dir: no such model directory"),
    (["judge=rule:gsm8k"], r"the rule judge is rule:world"),
    (["judge=regex:("], r"judge regex:\(: not a regular expression"),
    (["judge=llm:/no/such/dir"], r"judge=llm:/no/such/dir: no such model directory"),
    (["samples_per_prompt=1"], r"samples_per_prompt must be at least 2"),
    (["temperature=0"], r"temperature=0 \(greedy\) samples the same response 4 times"),
    (["judge=constitution:/no/such/dir"], r"judge=constitution:/no/such/dir: no such model directory"),
    (["judge=constitution:callable:json:loads", "constitution=/no/such.md"], r"constitution not found: /no/such.md"),
    (["dpo.data=pairs.jsonl"], r"dpo.data: the rounds set it .*drop it"),
    (["dpo.peft.method=prefix"], r"dpo.peft.method=prefix: .*only lora, dora and qlora merge into weights"),
    (["dpo.columns.chosen=good"], r"dpo.columns: the rounds set it"),
    (["dpo.betta=0.2"], r"dpo.\* \(temper dpo\): unknown key 'betta' \(did you mean 'beta'\?\)"),
])
def test_bad_online_settings_are_one_line(tmp_path, tiny_model_dir, world, capsys, extra, message):
    code = main(["online-dpo", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'o'}", "rounds=1",
                 f"prompts={world[0] / 'rl' / 'train.jsonl'}", *extra])
    assert code == 2
    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / "o").exists()  # a refused run leaves no output_dir behind


def test_prompts_without_answers_are_refused_and_old_online_keys_of_dpo_say_where_they_went(tmp_path, tiny_model_dir,
                                                                                        capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi?", "answer": "Hello"}) + "\n" + json.dumps({"prompt": "Bye?"}) + "\n")
    assert main(["online-dpo", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'o'}", "rounds=1",
                 f"prompts={prompts}"]) == 2
    assert "p.jsonl:2: judge rule:world needs an 'answer' in every prompt row" in one_line_error(capsys)
    from temper.recipes import dpo  # the offline command says where its old online keys went

    with pytest.raises(TemperError, match=r"key 'rounds' belongs to iterative DPO, .*temper online-dpo rounds="):
        load_config(dpo.Config, None, ["rounds=2"])
    with pytest.raises(TemperError, match=r"key 'online_prompts' belongs to iterative DPO, .*online-dpo prompts="):
        load_config(dpo.Config, None, ["online_prompts=p.jsonl"])


# ----------------------------------------------------------------------------- shared with temper eval


def test_temper_eval_takes_the_same_judges(tmp_path, tiny_model_dir, world, capsys):
    out = tmp_path / "eval"
    code = main(["eval", f"models=[{tiny_model_dir},{tiny_model_dir}]", "tasks=world_chat_qa", f"world={world[0]}",
                 "judge=rule:world", f"output_dir={out}"])
    assert code == 0 and "Traceback" not in capsys.readouterr().err
    judged = json.loads((out / "results.json").read_text())["judge"]["world_chat_qa"]
    assert judged["n"] > 0 and judged["ties"] == judged["n"]  # a model against itself
    assert judged["bad_judgements"] == {}
    assert main(["eval", f"models=[{tiny_model_dir},{tiny_model_dir}]", "tasks=world_chat_qa", f"world={world[0]}",
                 "judge=callable:json:lodas", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "module 'json' has no 'lodas' (did you mean 'loads'?)" in err[0]
