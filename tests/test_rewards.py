"""Reward functions (temper.rewards.functions): the shipped rewards on right, wrong and malformed
completions (the world's RL rows, GSM8K's own rows), TRL's calling convention (a function written
for TRL works unchanged), weights with None as not applicable (TRL's nansum), judges as rewards,
and every bad input stopping the run in one line that names the function and the row."""

from __future__ import annotations

import importlib
import json
import math
import os
import time
import warnings

import pytest
import torch
from conftest import shared_file

from temper.data.prompts import Prompt, read_prompts, row_prompt
from temper.data.world import WorldConfig, build_world
from temper.errors import TemperError
from temper.eval.world_checker import check_reply
from temper.rewards.functions import (
    RewardSet,
    SoftOverlongPunishment,
    answer_format_reward,
    gsm8k_reference,
    gsm8k_reward,
    nanstd,
    reward_metrics,
    world_answer_reward,
)
from temper.rewards.judges import make_judge


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def score_of(spec: str, prompts, completions, **kwargs) -> list[float]:
    total, per_function = RewardSet([spec], **kwargs).score(prompts, completions)
    return per_function[next(iter(per_function))].tolist()


# ----------------------------------------------------------------------------- shipped rewards


@pytest.fixture(scope="module")
def world_rl_rows():
    world = build_world(WorldConfig(num_people=8, num_sft_train=4, num_sft_test=4, num_pref_train=4, num_pref_test=4,
                                    num_rl_train=4, num_rl_test=60))
    rows = world.splits["rl/test"]
    return [row_prompt(r, f"rl/test.jsonl:{i + 1}") for i, r in enumerate(rows)]


def test_world_reward_on_the_worlds_rl_rows(world_rl_rows):
    prompts = world_rl_rows
    assert {p.row["task"] for p in prompts} == {"fact", "arithmetic", "string"}
    rewards = RewardSet("world")
    rewards.check_prompts(prompts)
    right = [p.answer for p in prompts]
    worded = [f"The answer is {p.answer}." for p in prompts]
    tagged = [f"Let me think: 1 and 2. <answer>{p.answer}</answer>" for p in prompts]
    for completions in (right, worded, tagged):
        total, per = rewards.score(prompts, completions)
        assert total.tolist() == [1.0] * len(prompts) and per["world"].tolist() == [1.0] * len(prompts)
    arithmetic = [p for p in prompts if p.row["task"] == "arithmetic"]
    assert len(arithmetic) >= 5
    wrong = [str(int(p.answer) + 1) for p in arithmetic]
    assert rewards.score(arithmetic, wrong)[0].tolist() == [0.0] * len(arithmetic)
    # the last number is the answer: "0 plus 5 is 7" is wrong although it holds a 5
    p = Prompt.from_text("What is 3 plus 4?", answer="7", source="w.jsonl:1")
    assert score_of("world", [p] * 5, ["3 plus 4 is 7.", "7", "It is 8, not 7? No: 8.", "", "<answer></answer>"]) \
        == [1.0, 1.0, 0.0, 0.0, 0.0]
    # inside an <answer> block only the block counts
    assert score_of("world", [p] * 2, ["7 <answer>8</answer>", "8 <answer>7</answer>"]) == [0.0, 1.0]
    # the function itself, called as TRL calls it (conversational completions)
    assert world_answer_reward([[{"role": "assistant", "content": "7"}]], answer=[7]) == [1.0]


def test_gsm8k_reward_on_gsm8ks_own_rows():
    path = shared_file("gsm8k", "test.jsonl")
    prompts = read_prompts(str(path), field_name="question")  # the files as they are: question, answer
    assert len(prompts) > 1000 and set(prompts[0].row) == {"question", "answer"}
    rewards = RewardSet("gsm8k")
    rewards.check_prompts(prompts)  # every row's answer ends with "#### N"
    some = prompts[:40]
    references = [p.row["answer"].rsplit("####", 1)[1].strip() for p in some]
    # the reference solution itself, the number alone, in an <answer> block, with $ , and a final "."
    for completions in ([p.row["answer"] for p in some], references,
                        [f"So the total is <answer>{r}</answer>" for r in references],
                        [f"The answer is ${int(r):,}." for r in references],
                        [f"#### {r}\n\nQuestion: Tom has 5 apples." for r in references]):
        assert rewards.score(some, completions)[0].tolist() == [1.0] * len(some)
    wrong = [f"#### {int(r) + 1}" for r in references]
    assert rewards.score(some, wrong)[0].tolist() == [0.0] * len(some)
    janet, house = prompts[0], prompts[2]  # "#### 18", "#### 70000"
    assert gsm8k_reference(janet.row["answer"]) == 18 and gsm8k_reference(house.row["answer"]) == 70000
    completions = ["She makes 9 * 2 = $18 a day.",  # the last number
                   "18.00",  # compared as numbers
                   "#### 18 but 16 - 3 = 13",  # the last '#### N' wins over later numbers
                   "I cannot tell.",  # no number: wrong, not an error
                   "#### 1.2.3"]  # no number after ####, and no other: wrong
    assert score_of("gsm8k", [janet] * 5, completions) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert score_of("gsm8k", [house] * 2, ["He made $70,000.", "70.000"]) == [1.0, 0.0]
    # a bare number as the answer works too; the function as TRL calls it
    assert gsm8k_reward(["#### 5", "4"], answer=["5", 5]) == [1.0, 0.0]


def test_format_reward_exact_rule():
    cases = {
        "<answer>7</answer>": 1.0,
        "I add 3 and 4.\n<answer> 7 </answer>\n": 1.0,  # reasoning before, whitespace after
        "<answer>7</answer> and more": 0.0,  # text after the block
        "<answer>   </answer>": 0.0,  # blank inside
        "<answer>7</answer><answer>8</answer>": 0.0,  # two blocks
        "</answer>7<answer>": 0.0,  # out of order
        "<answer>7": 0.0,  # not closed
        "7": 0.0,
        "": 0.0,
    }
    p = Prompt("Add 3 and 4.", "f.jsonl:1")
    assert score_of("format", [p] * len(cases), list(cases)) == list(cases.values())
    assert answer_format_reward([[{"role": "assistant", "content": "<answer>x</answer>"}]]) == [1.0]


def test_length_is_dapos_soft_overlong_punishment():
    p = Prompt("q", "l.jsonl:1")
    lengths = [0, 40, 48, 50, 56, 63, 64]
    ids = [[1] * n for n in lengths]
    total, per = RewardSet("length", max_completion_length=64).score([p] * len(ids), ["x"] * len(ids), ids)
    # L_max 64, L_cache 64 // 5 = 12: 0 up to 52, then (52 - |y|) / 12, -1 at 64
    assert per["length"].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, -4 / 12, -11 / 12, -1.0])
    total, per = RewardSet("length:16", max_completion_length=64).score([p] * len(ids), ["x"] * len(ids), ids)
    assert per["length"].tolist() == pytest.approx([0.0, 0.0, 0.0, -2 / 16, -8 / 16, -15 / 16, -1.0])
    assert SoftOverlongPunishment(64, 16)(completion_ids=[[1] * 65]) == [-1.0]


def test_length_matches_trls_own_function():
    rewards = pytest.importorskip("trl.rewards")
    ids = [[1] * n for n in range(0, 110, 3)]
    ours = SoftOverlongPunishment(100, 20)(completion_ids=ids)
    assert ours == rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)(ids)


# ----------------------------------------------------------------------------- TRL's calling convention

USER_FUNCTIONS = """
import time

seen = {}

def records(prompts, completions, **kwargs):
    seen.update(prompts=prompts, completions=completions, **kwargs)
    kwargs["log_metric"]("my_metric", 2.0)
    kwargs["log_extra"]("note", ["n"] * len(completions))
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]

def reward_len(completions, **kwargs):  # TRL's documentation example, as written there
    return [-abs(20 - len(completion)) for completion in completions]

def boom_on_b(completions, **kwargs):
    if "b" in completions:
        raise ZeroDivisionError("division by zero")
    return [1.0] * len(completions)

def always_raises(completions, **kwargs):
    raise RuntimeError("no service")

def batch_only(completions, **kwargs):
    if len(completions) > 1:
        raise RuntimeError("cannot batch")
    return [1.0]

def exits(completions, **kwargs):
    raise SystemExit(3)

def too_few(completions, **kwargs):
    return [1.0] * (len(completions) - 1)

def nan_second(completions, **kwargs):
    return [1.0, float("nan")] + [0.0] * (len(completions) - 2)

def text_third(completions, **kwargs):
    return [1.0, 2.0, "3"]

def not_a_list(completions, **kwargs):
    return None

def as_tensor(completions, **kwargs):
    import torch
    return torch.arange(len(completions), dtype=torch.float32)

def only_first(completions, **kwargs):
    return [1.0] + [None] * (len(completions) - 1)

def only_second(completions, **kwargs):
    return [None, 2.0] + [None] * (len(completions) - 2)

def sleepy(completions, **kwargs):
    time.sleep(5)
    return [0.0] * len(completions)

async def async_reward(completions, **kwargs):
    return [0.5] * len(completions)

def judge_len(prompt, response):
    return len(response)

def judge_boom(prompt, response):
    if response == "b":
        raise ZeroDivisionError("division by zero")
    return 1.0
"""


@pytest.fixture
def user(tmp_path, monkeypatch):
    name = f"user_rewards_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(USER_FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_function_gets_trls_arguments_and_every_other_column(user, world_rl_rows):
    module = importlib.import_module(user)
    chat = world_rl_rows[0]  # a conversation: {prompt: [user message], answer, task, meta}
    text = Prompt("Say hi.", "t.jsonl:1", None, {"prompt": "Say hi.", "level": 3})
    prompts, completions, ids = [chat, chat, text], ["ab", "abc", "hello"], [[5, 6], [5, 6, 7], [8]]
    rewards = RewardSet(f"{user}:records")
    state = object()
    total, per = rewards.score(prompts, completions, ids, trainer_state=state)
    seen = module.seen
    assert seen["prompts"] == [chat.prompt, chat.prompt, "Say hi."]
    # a conversational prompt gets TRL's conversational completion; a text prompt the text
    assert seen["completions"] == [[{"role": "assistant", "content": "ab"}], [{"role": "assistant", "content": "abc"}],
                                   "hello"]
    assert seen["completion_ids"] == ids and seen["trainer_state"] is state
    # every column but the prompt, one value per completion; None where a row lacks it
    assert seen["answer"] == [chat.row["answer"], chat.row["answer"], None]
    assert seen["task"] == [chat.row["task"]] * 2 + [None] and seen["meta"][0] == chat.row["meta"]
    assert seen["level"] == [None, None, 3] and "prompt" not in seen
    assert per["records"].tolist() == [2.0, 3.0, 5.0] == total.tolist()
    metrics, columns = rewards.pop_logged()
    assert metrics == {"my_metric": 2.0} and columns == {"note": ["n", "n", "n"]}
    assert rewards.pop_logged() == ({}, {})
    # TRL's documentation example and an async function, unchanged
    p = Prompt("q", "t.jsonl:2")
    assert score_of(f"{user}:reward_len", [p, p], ["x" * 20, "x" * 25]) == [0.0, -5.0]
    assert score_of(f"{user}:async_reward", [p, p], ["a", "b"]) == [0.5, 0.5]
    assert score_of(f"{user}:as_tensor", [p, p, p], ["a", "b", "c"]) == [0.0, 1.0, 2.0]
    # a Prompt built with an answer but no row still gives the answer column
    assert score_of("world", [Prompt.from_text("2+2?", answer="4", source="x:1")], ["4"]) == [1.0]


def test_a_reward_function_written_for_trl_works_unchanged(world_rl_rows):
    trl_rewards = pytest.importorskip("trl.rewards")
    prompts = world_rl_rows[:3]
    completions = ["<think>\nI recall it.\n</think>\nLantern", "no think tags", "<think>a</think><think>b</think>"]
    rewards = RewardSet(["trl.rewards:think_format_reward", "format"], [1.0, 2.0])
    total, per = rewards.score(prompts, completions)
    direct = trl_rewards.think_format_reward([[{"role": "assistant", "content": c}] for c in completions])
    assert direct == [1.0, 0.0, 0.0] and per["think_format_reward"].tolist() == direct
    assert set(reward_metrics(total, per)) == {"reward", "reward_std", "rewards/think_format_reward/mean",
                                               "rewards/think_format_reward/std", "rewards/format/mean",
                                               "rewards/format/std"}


# ----------------------------------------------------------------------------- combining and metrics


def test_weights_combine_with_none_as_not_applicable_as_trl_does(user):
    p = Prompt("q", "c.jsonl:1")
    rewards = RewardSet([f"{user}:only_first", f"{user}:only_second", "format"], [2.0, -0.5, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every row is scored by some function: no warning
        total, per = rewards.score([p, p, p], ["a", "b", "c"])
    # format applies to every row but weighs 0: it still makes the rows scorable, as in TRL's nansum
    assert per["only_first"].isnan().tolist() == [False, True, True]
    assert total.tolist() == [2.0, -1.0, 0.0]
    rewards = RewardSet([f"{user}:only_first", f"{user}:only_second"], [2.0, -0.5])
    with pytest.warns(UserWarning, match=r"1 of 3 completions got no reward .* first c.jsonl:1 completion 2"):
        total, per = rewards.score([p, p, p], ["a", "b", "c"])
    assert total[:2].tolist() == [2.0, -1.0] and math.isnan(total[2])
    # TRL's formula: (rewards_per_func * weights).nansum(dim=1), the all-NaN row set to NaN
    stacked = torch.tensor([[1.0, math.nan], [math.nan, 2.0], [math.nan, math.nan]])
    expected = (stacked * torch.tensor([2.0, -0.5])).nansum(dim=1)
    expected[2] = math.nan
    assert torch.equal(total.isnan(), expected.isnan()) and total[:2].tolist() == expected[:2].tolist()
    metrics = reward_metrics(total, per)
    assert metrics["reward"] == pytest.approx(0.5) and metrics["reward_std"] == pytest.approx(math.sqrt(4.5))
    assert metrics["rewards/only_first/mean"] == 1.0 and math.isnan(metrics["rewards/only_first/std"])  # one value


def test_nanstd_is_trls():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    for values in ([1.0, 2.0, 4.0, math.nan], [3.0, math.nan], [math.nan, math.nan], [0.5, 0.5, 0.5]):
        t = torch.tensor(values)
        ours, theirs = nanstd(t), trl_utils.nanstd(t)
        assert (ours.isnan() and theirs.isnan()) or ours.item() == pytest.approx(theirs.item())


# ----------------------------------------------------------------------------- judges as rewards


def test_a_judge_as_a_reward_gives_the_judges_scores(user):
    a = Prompt.from_text("What is 2 plus 3?", answer="5", source="j.jsonl:1")
    b = Prompt.from_text("What is 4 plus 4?", answer="8", source="j.jsonl:2")
    # a prompt's completions need not sit together: they are grouped by row for the judge
    prompts = [a, b, a, b, a]
    completions = ["2 plus 3 is 5.", "8", "It is 6.", "9. 9. 9. 9.", "5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5."]
    total, per = RewardSet("judge:rule:world").score(prompts, completions)
    expected = [check_reply(c, p.answer)["score"] for p, c in zip(prompts, completions)]
    assert per["rule:world"].tolist() == pytest.approx(expected) and len(set(expected)) >= 3
    judge = make_judge(f"callable:{user}:judge_len")
    ranked = judge.rank([a, b], [[completions[0], completions[2], completions[4]], [completions[1], completions[3]]])
    total, per = RewardSet(f"judge:callable:{user}:judge_len").score(prompts, completions)
    assert per[f"callable:{user}:judge_len"].tolist() == [ranked[0][0], ranked[1][0], ranked[0][1], ranked[1][1],
                                                         ranked[0][2]]
    total, per = RewardSet("judge:regex:^\\d+$").score(prompts, completions)
    assert per["regex:^\\d+$"].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    # rule:world needs each row's answer, checked before any sampling
    with pytest.raises(TemperError, match="q.jsonl:1: judge rule:world needs an 'answer'") as e:
        RewardSet("judge:rule:world").check_prompts([Prompt("q", "q.jsonl:1")])
    one_line(e)


def test_a_reward_model_judge_as_a_reward(tmp_path, tiny_tokenizer):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, num_labels=1, pad_token_id=tiny_tokenizer.pad_id)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    rm = tmp_path / "my-rm"
    model.save_pretrained(rm, safe_serialization=True)
    tiny_tokenizer.save(rm)
    a, b = Prompt.from_text("Where is Paris?", source="r.jsonl:1"), Prompt.from_text("Hi", source="r.jsonl:2")
    completions = ["In France.", "Hello there.", "Paris is a city in France.", "Hi"]
    rewards = RewardSet(f"judge:reward:{rm}/")
    total, per = rewards.score([a, b, a, b], completions)
    ranked = make_judge(f"reward:{rm}").rank([a, b], [[completions[0], completions[2]], [completions[1], completions[3]]])
    assert list(per) == ["reward:my-rm"]
    assert per["reward:my-rm"].tolist() == pytest.approx([ranked[0][0], ranked[1][0], ranked[0][1], ranked[1][1]],
                                                         abs=1e-5)
    assert len({round(v, 4) for v in per["reward:my-rm"].tolist()}) == 4
    rewards.close()


# ----------------------------------------------------------------------------- bad input


def rows(*sources: str) -> list[Prompt]:
    return [Prompt("q", s) for s in sources]


def test_a_function_that_raises_stops_the_run_naming_function_and_row(user):
    prompts = rows("p.jsonl:1", "p.jsonl:1", "p.jsonl:2")
    with pytest.raises(TemperError) as e:
        RewardSet(f"{user}:boom_on_b").score(prompts, ["a", "c", "b"])
    assert one_line(e) == ("p.jsonl:2 completion 2: reward function boom_on_b raised ZeroDivisionError: "
                           "division by zero")
    with pytest.raises(TemperError, match=r"p.jsonl:1 completion 0: reward function always_raises raised "
                                          r"RuntimeError: no service") as e:
        RewardSet(f"{user}:always_raises").score(prompts, ["a", "c", "b"])
    one_line(e)
    with pytest.raises(TemperError, match=r"p.jsonl:1 \.\.\. p.jsonl:2 \(3 completions\) \(no single completion "
                                          r"fails alone\): reward function batch_only raised RuntimeError") as e:
        RewardSet(f"{user}:batch_only").score(prompts, ["a", "c", "b"])
    one_line(e)
    with pytest.raises(TemperError, match=r"p.jsonl:1 completion 0: reward function exits raised SystemExit: 3") as e:
        RewardSet(f"{user}:exits").score(prompts, ["a", "c", "b"])
    one_line(e)
    # a shipped function's failure too: a GSM8K answer without a final number
    bad = [Prompt("q", "g.jsonl:1", None, {"answer": "#### 4"}), Prompt("q", "g.jsonl:2", None, {"answer": "four"})]
    with pytest.raises(TemperError, match=r"g.jsonl:2 completion 1: reward function gsm8k raised ValueError: the "
                                          r"answer 'four' ends with no '#### N'") as e:
        RewardSet("gsm8k").score(bad, ["4", "4"])
    one_line(e)
    with pytest.raises(TemperError, match=r"g.jsonl:2: reward gsm8k: the answer 'four' ends with no") as e:
        RewardSet("gsm8k").check_prompts(bad)
    one_line(e)
    with pytest.raises(TemperError, match=r"q.jsonl:1: reward world needs an 'answer' in every prompt row") as e:
        RewardSet("world").check_prompts([Prompt("q", "q.jsonl:1")])
    one_line(e)


@pytest.mark.parametrize("function, message", [
    ("too_few", r"p.jsonl:1 \.\.\. p.jsonl:3 \(3 completions\): reward function too_few returned 2 values for 3 "
                r"completions; expected a list of 3 numbers"),
    ("nan_second", r"p.jsonl:2 completion 1: reward function nan_second returned nan; a reward is a finite number "
                   r"\(None, not NaN, says it does not apply\)"),
    ("text_third", r"p.jsonl:3 completion 2: reward function text_third returned str '3', not a number"),
    ("not_a_list", r"\(3 completions\): reward function not_a_list returned NoneType None; expected a list of 3"),
])
def test_a_bad_return_value_stops_the_run_naming_function_and_row(user, function, message):
    with pytest.raises(TemperError, match=message) as e:
        RewardSet(f"{user}:{function}").score(rows("p.jsonl:1", "p.jsonl:2", "p.jsonl:3"), ["a", "b", "c"])
    one_line(e)


def test_a_function_that_never_returns_stops_at_the_timeout(user):
    start = time.perf_counter()
    with pytest.raises(TemperError, match=r"p.jsonl:1 \(1 completion\): reward function sleepy did not return within "
                                          r"judge_timeout=0.2 s") as e:
        RewardSet(f"{user}:sleepy", timeout=0.2).score(rows("p.jsonl:1"), ["a"])
    one_line(e)
    assert time.perf_counter() - start < 3


@pytest.mark.parametrize("specs, weights, kwargs, message", [
    (["gsm9k"], None, {}, r"rewards=gsm9k: not a shipped reward \(world, gsm8k, format, length, prm\) \(did you mean "
                          r"'gsm8k'\?\)"),
    (["no_such_module_xyz:score"], None, {}, r"rewards=no_such_module_xyz:score: cannot import module "
                                             r"'no_such_module_xyz'"),
    (["temper.rewards.functions:gsm8k_rewrd"], None, {}, r"module 'temper.rewards.functions' has no 'gsm8k_rewrd' "
                                                         r"\(did you mean 'gsm8k_reward'\?\)"),
    (["rule:world"], None, {}, r"cannot import module 'rule'.*; a judge as a reward is written judge:rule:world"),
    (["judge:rule:moon"], None, {}, r"rewards=judge:rule:moon: the rule judge is rule:world"),
    (["judge:constitution:runs/x"], None, {}, r"revises responses instead of scoring them"),
    (["judge:reward:/no/such/dir"], None, {}, r"rewards=judge:reward:/no/such/dir: no such model directory"),
    ([], None, {}, r"rewards=\[\]: no reward function"),
    (["gsm8k", "format"], [1.0], {}, r"reward_weights=\[1.0\]: 1 weights for 2 reward functions \(gsm8k, format\)"),
    (["gsm8k", "format"], [1.0, math.nan], {}, r"the weight of format is nan; expected a finite number"),
    (["gsm8k", "format"], [1.0, "x"], {}, r"the weight of format is 'x'"),
    (["gsm8k", "gsm8k"], None, {}, r"gsm8k and gsm8k would both be logged as rewards/gsm8k"),
    (["length"], None, {}, r"rewards=length: the length penalty needs the recipe's max_completion_length"),
    (["length:99"], None, {"max_completion_length": 64}, r"length:C takes the soft punishment window C in tokens, "
                                                          r"0 to max_completion_length=64"),
    (["format:strict"], None, {}, r"rewards=format:strict: the format reward takes no argument"),
    (["gsm8k"], None, {"timeout": -1}, r"judge_timeout must be a number of seconds >= 0"),
])
def test_bad_specs_are_refused_when_the_set_is_built(specs, weights, kwargs, message):
    with pytest.raises(TemperError, match=message) as e:
        RewardSet(specs, weights, **kwargs)
    one_line(e)


def test_a_column_named_like_an_argument_and_mismatched_lengths_are_refused(user):
    clash = Prompt("q", "x.jsonl:5", None, {"prompt": "q", "completions": "oops"})
    with pytest.raises(TemperError, match=r"x.jsonl:5: the prompt rows' column 'completions' has the name of an "
                                          r"argument") as e:
        RewardSet("format").check_prompts([clash])
    one_line(e)
    with pytest.raises(TemperError, match=r"score: 2 prompts, 1 completions; expected the same number"):
        RewardSet("format").score(rows("a:1", "a:2"), ["x"])
    with pytest.raises(TemperError, match=r"completion 0: reward function length raised ValueError: the length reward "
                                          r"needs completion_ids"):
        RewardSet("length", max_completion_length=8).score(rows("a:1"), ["x"])


def test_a_judges_bad_judgement_stops_the_run_unless_skipped(user):
    p = Prompt("q", "j.jsonl:3")
    with pytest.raises(TemperError, match=r"j.jsonl:3 sample 1: judge callable:.*:judge_boom ZeroDivisionError") as e:
        RewardSet(f"judge:callable:{user}:judge_boom").score([p, p], ["a", "b"])
    one_line(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewards = RewardSet(f"judge:callable:{user}:judge_boom", skip_bad_judgements=True)
        total, per = rewards.score([p, p], ["a", "b"])
    assert total[0] == 1.0 and math.isnan(total[1]) and math.isnan(per[f"callable:{user}:judge_boom"][1])


def test_gsm8k_references_of_every_shipped_row_parse():
    for split in ("train", "test"):
        path = shared_file("gsm8k", f"{split}.jsonl")
        with open(path, encoding="utf-8") as f:
            for line in f:
                assert math.isfinite(gsm8k_reference(json.loads(line)["answer"]))


def test_prm_needs_a_model_directory(tmp_path):
    with pytest.raises(TemperError, match=r"rewards=prm: the prm reward takes the process reward model's directory"):
        RewardSet(["prm"])
    with pytest.raises(TemperError, match=r"rewards=prm:.*nowhere: no such model directory"):
        RewardSet([f"prm:{tmp_path / 'nowhere'}"])
