"""Multiple-choice scoring with a shared-context KV cache, YAML tasks and the world tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import approx_reordered, assert_reorder_close, decoder_lengths

from temper.configs import shipped_dir
from temper.errors import TemperError
from temper.eval.multiple_choice import evaluate_multiple_choice, score_choices
from temper.eval.tasks import build_world_mc, iter_task_rows, load_task, run_task, task_from_dict

CONFIGS = shipped_dir("tasks")


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    from temper.models import build_model, preset

    torch.manual_seed(0)
    return build_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size)).eval()


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    from temper.data.world import WorldConfig, build_world, write_world

    out = tmp_path_factory.mktemp("world")
    cfg = WorldConfig(num_people=8, num_towns=4, docs_per_person=2, docs_per_town=1, num_arithmetic_docs=5,
                      num_dialogue_docs=5, num_sft_train=10, num_sft_test=12, num_pref_train=2, num_pref_test=2,
                      num_rl_train=5, num_rl_test=10)
    write_world(build_world(cfg), out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bigram(tiny_tokenizer):
    """llama-tiny whose blocks add nothing (o_proj and down_proj are zero), so the next token
    depends on the current token only: table[a] = log P(. | a), read off once, is every answer."""
    from temper.models import build_model, preset

    torch.manual_seed(0)
    m = build_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size)).eval()
    with torch.no_grad():
        m.embed_tokens.weight.normal_(0, 0.2)  # tied head: peaked enough that positions matter
        for layer in m.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        table = torch.log_softmax(m(torch.arange(tiny_tokenizer.vocab_size)[:, None])[:, 0].float(), -1)  # (V, V)
        seq = torch.randint(0, tiny_tokenizer.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
        # a row of 20 vs 300 rows of 1: the final norm, the head and the log-softmax in another order
        assert_reorder_close(torch.log_softmax(m(seq)[0].float(), -1), table[seq[0]], bigram_lengths(m))
    return m, table


def bigram_lengths(m) -> tuple[int, ...]:
    """The bigram model's reductions: the final norm, the output layer, the log-softmax."""
    return (m.config.hidden_size, m.config.hidden_size, m.config.vocab_size)


def bigram_score(tokenizer, table: torch.Tensor, context: str, choice: str) -> float:
    """log P(choice | context) by hand: context and choice encoded separately, each token after the one before."""
    ctx, ids = tokenizer.encode(context), tokenizer.encode(choice)
    return sum(float(table[prev, tok]) for prev, tok in zip([ctx[-1], *ids[:-1]], ids))


def first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny"])
def test_cached_batch_equals_scoring_from_scratch(tiny_tokenizer, family):
    from temper.models import build_model, preset

    torch.manual_seed(1)
    m = build_model(preset(family, vocab_size=tiny_tokenizer.vocab_size)).eval()
    context = "Alice lives in Paris. Question: where does Bob live?\nAnswer:"
    choices = [" Rome", " Paris, the town of Alice", " a", " Ünïcödé 😀 far away"]
    cached = score_choices(m, tiny_tokenizer, context, choices)
    naive = score_choices(m, tiny_tokenizer, context, choices, use_cache=False)
    assert [n for _, n in cached] == [n for _, n in naive] == [len(c) for c in choices]  # characters
    # cached and uncached, batched and alone: the same sums in another order, over the choice's tokens
    ctx, longest = tiny_tokenizer.encode(context), max(len(tiny_tokenizer.encode(c)) for c in choices)
    lengths = decoder_lengths(m, len(ctx) + longest) + (longest,)
    for (a, _), (b, _) in zip(cached, naive):
        assert math.isfinite(a) and a < 0
        assert a == approx_reordered(b, lengths)
    # by hand: the sum of the choice's token log-probabilities after the context tokens
    ctx, cont = tiny_tokenizer.encode(context), tiny_tokenizer.encode(choices[1])
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ctx + cont]))[0].float(), -1)
    manual = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert cached[1][0] == approx_reordered(manual, lengths)


def test_acc_and_acc_norm(model, tiny_tokenizer, monkeypatch):
    import temper.eval.multiple_choice as mc

    # in "x" the sum favours the short gold choice, per character the long wrong one wins
    fake = {"x": [(-4.0, 40), (-3.0, 1)], "y": [(-1.0, 5), (-9.0, 5)]}
    monkeypatch.setattr(mc, "score_choices", lambda m, t, ctx, ch, use_cache=True: fake[ctx[-1]])
    rows = [{"context": "x", "choices": ["a", "b"], "gold": 1}, {"context": "y", "choices": ["a", "b"], "gold": 0}]
    out = mc.evaluate_multiple_choice(model, tiny_tokenizer, rows)
    assert out["acc"] == 1.0 and out["acc_norm"] == 0.5 and out["examples"] == 2
    assert out["examples_per_second"] > 0


def test_acc_norm_divides_by_characters_not_bytes(bigram, tiny_tokenizer):
    m, table = bigram
    context, choices = "Alice lives in", [" Ünïcödé", " 😀"]  # 8 and 2 characters, 12 and 5 bytes
    sums = [bigram_score(tiny_tokenizer, table, context, c) for c in choices]
    assert first_argmax(sums) == 1
    assert first_argmax([s / len(c) for s, c in zip(sums, choices)]) == 0  # per character: the long one
    assert first_argmax([s / len(c.encode()) for s, c in zip(sums, choices)]) == 1  # per byte: the emoji
    for use_cache in (True, False):
        scores = score_choices(m, tiny_tokenizer, context, choices, use_cache=use_cache)
        assert [n for _, n in scores] == [8, 2]
        assert [s for s, _ in scores] == approx_reordered(sums, bigram_lengths(m) + (8,))  # 8 tokens at most
        out = evaluate_multiple_choice(m, tiny_tokenizer, [{"context": context, "choices": choices, "gold": 0}],
                                       use_cache=use_cache)
        assert out["acc"] == 0.0 and out["acc_norm"] == 1.0


def test_task_acc_norm_counts_the_answer_without_its_separator(bigram, tiny_tokenizer, tmp_path):
    """lm-eval divides by len(choice), the delimiter (" ") not included; a task's answer_template adds it."""
    m, table = bigram
    task = task_from_dict(mc_task(tmp_path, [{"question": "what is 3 plus 4?", "choices": ["7", "cat"], "gold": 1}]),
                          base_dir=tmp_path)
    assert task.answer_template == " {answer}"
    context = "Q: what is 3 plus 4?\nA:"
    sums = [bigram_score(tiny_tokenizer, table, context, c) for c in (" 7", " cat")]
    assert first_argmax(sums) == 0
    assert first_argmax([sums[0] / 1, sums[1] / 3]) == 1  # bare answers: "cat" wins
    assert first_argmax([sums[0] / 2, sums[1] / 4]) == 0  # with the space: "7" would
    out = run_task(m, tiny_tokenizer, task)
    assert (out["acc"], out["acc_norm"]) == (0.0, 1.0)
    row = {"context": context, "choices": [" 7", " cat"], "gold": 1}
    assert evaluate_multiple_choice(m, tiny_tokenizer, [row])["acc_norm"] == 0.0  # counting the space
    assert evaluate_multiple_choice(m, tiny_tokenizer, [{**row, "answers": ["7", "cat"]}])["acc_norm"] == 1.0
    with pytest.raises(TemperError, match="1 answers for 2 choices"):
        evaluate_multiple_choice(m, tiny_tokenizer, [{**row, "answers": ["7"]}])


def test_evaluate_multiple_choice_real_model(bigram, tiny_tokenizer):
    """acc and acc_norm exactly as computed independently from the model's known bigram table."""
    m, table = bigram
    prefix = "Hello, world!\n\n"
    questions = [("The sum of 3 and 4 is", [" 7", " 15", " ten", " twelve"]),
                 ("Alice lives in", [" Paris", " Rome", " a town called Ünïcödé", " 😀"]),
                 ("Bob has a dog named", [" Rex", " Tom", " Alice", " the cat"]),
                 ("Hello,", [" world!", " émojis 😀", " Tabs\tand  spaces", " Bob"])]
    picks, picks_norm = [], []
    for q, choices in questions:
        sums = [bigram_score(tiny_tokenizer, table, prefix + q, c) for c in choices]
        picks.append(first_argmax(sums))
        picks_norm.append(first_argmax([s / len(c) for s, c in zip(sums, choices)]))
    agree = sum(p == q for p, q in zip(picks, picks_norm))
    assert 0 < agree < len(questions) and len(set(picks)) > 1  # the two metrics differ; no constant guess wins
    for golds, acc, acc_norm in ((picks, 1.0, agree / len(questions)), (picks_norm, agree / len(questions), 1.0)):
        rows = [{"context": q, "choices": ch, "gold": g} for (q, ch), g in zip(questions, golds)]
        for use_cache in (True, False):
            out = evaluate_multiple_choice(m, tiny_tokenizer, rows, few_shot_prefix=prefix, use_cache=use_cache)
            assert (out["acc"], out["acc_norm"], out["examples"]) == (acc, acc_norm, len(questions))


def mc_task(tmp_path: Path, rows: list[dict], **extra) -> dict:
    write_jsonl(tmp_path / "rows.jsonl", rows)
    return {"name": "toy", "type": "multiple_choice", "data": "rows.jsonl", "prompt": "Q: {question}\nA:", **extra}


def test_load_task_and_errors(tmp_path):
    import yaml

    rows = [{"question": f"q{i}", "choices": ["a", "b", "c"], "gold": i % 3} for i in range(5)]
    spec = mc_task(tmp_path, rows)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))
    task = load_task(tmp_path / "toy.yaml")
    assert task.metrics == ["acc", "acc_norm"]
    got = list(iter_task_rows(task))
    assert [r.gold for r in got] == [0, 1, 2, 0, 1] and got[0].context == "Q: q0\nA:" and got[0].index == 1

    bad = {k: v for k, v in spec.items() if k != "prompt"}
    with pytest.raises(TemperError, match=r"task toy: missing key 'prompt'"):
        task_from_dict(bad, base_dir=tmp_path)
    with pytest.raises(TemperError, match=r"unknown key 'promt' \(did you mean 'prompt'\?\)"):
        task_from_dict({**spec, "promt": "x"}, base_dir=tmp_path)
    with pytest.raises(TemperError, match=r"metric 'bleu' is not available for multiple_choice"):
        task_from_dict({**spec, "metrics": ["bleu"]}, base_dir=tmp_path)

    def rows_error(bad_rows: list[dict], **extra) -> str:
        task = task_from_dict(mc_task(tmp_path, bad_rows, **extra), base_dir=tmp_path)
        with pytest.raises(TemperError) as e:
            list(iter_task_rows(task))
        return str(e.value)

    assert "task toy row 2: gold index 4 is out of range for 3 choices" in rows_error(
        [rows[0], {**rows[0], "gold": 4}])
    assert "task toy row 1: missing field 'choices'" in rows_error([{"question": "q", "gold": 0}])
    assert "task toy row 1:" in rows_error([{"choices": ["a"], "gold": 0}]) and "'question'" in rows_error(
        [{"choices": ["a"], "gold": 0}])
    assert "task toy: the data file" in rows_error([]) and "holds no rows" in rows_error([])
    with pytest.raises(TemperError, match="task toy: data not found"):
        list(iter_task_rows(task_from_dict({**spec, "data": "nope.jsonl"}, base_dir=tmp_path)))


def test_few_shot_from_data_and_separate_file(tmp_path, model, tiny_tokenizer):
    from temper.eval.tasks import task_few_shot

    rows = [{"question": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(5)]
    task = task_from_dict(mc_task(tmp_path, rows, few_shot=2), base_dir=tmp_path)
    assert task_few_shot(task) == "Q: q0\nA: a\n\nQ: q1\nA: b\n\n"
    assert [r.context for r in iter_task_rows(task)] == ["Q: q2\nA:", "Q: q3\nA:", "Q: q4\nA:"]
    write_jsonl(tmp_path / "shots.jsonl", [{"question": "s", "choices": ["x", "y"], "gold": 1}])
    task = task_from_dict(mc_task(tmp_path, rows, few_shot=1, few_shot_data="shots.jsonl"), base_dir=tmp_path)
    assert task_few_shot(task) == "Q: s\nA: y\n\n"
    assert len(list(iter_task_rows(task))) == 5
    out = run_task(model, tiny_tokenizer, task)
    assert out["examples"] == 5 and 0 <= out["acc"] <= 1


def test_generation_task_and_metrics(tmp_path, model, tiny_tokenizer, monkeypatch):
    import temper.eval.tasks as tasks_module

    rows = [{"q": "capital?", "answer": "Paris"}, {"q": "sum?", "answer": "7"}]
    write_jsonl(tmp_path / "g.jsonl", rows)
    spec = {"name": "gen", "type": "generation", "data": "g.jsonl", "prompt": "{q}",
            "answer_pattern": r"answer is (\w+)", "metrics": ["exact_match", "answer_accuracy"]}
    task = task_from_dict(spec, base_dir=tmp_path)
    replies = {"capital?": "I think the answer is Paris.", "sum?": "the answer is 8 or 7"}
    monkeypatch.setattr(tasks_module, "generate_text",
                        lambda m, t, prompts, cfg, batch_size=16, new_token_counts=None: [replies[p] for p in prompts])
    out = run_task(model, tiny_tokenizer, task)
    assert out["exact_match"] == 0.5 and out["answer_accuracy"] == 0.5 and out["examples"] == 2

    task = task_from_dict({**spec, "metrics": ["f1"]}, base_dir=tmp_path)
    assert run_task(model, tiny_tokenizer, task)["f1"] == pytest.approx(0.5)  # "Paris" vs "Paris"; "8" vs "7"


def test_build_world_mc(world_dir):
    path = build_world_mc(world_dir)
    assert path == world_dir / "eval" / "facts_mc.jsonl"
    facts = json.loads((world_dir / "facts.json").read_text())
    truth = {p["name"]: p for p in facts["people"]}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 * len(truth)
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["choices"][r["gold"]] == str(truth[r["meta"]["person"]][r["meta"]["key"]]) == r["answer"]
    assert len({r["gold"] for r in rows}) > 1
    first = path.read_bytes()
    build_world_mc(world_dir)
    assert path.read_bytes() == first  # seeded


@pytest.mark.parametrize("name", ["world_facts_mc", "world_qa"])
def test_shipped_world_tasks_end_to_end(name, world_dir, model, tiny_tokenizer):
    task = load_task(CONFIGS / f"{name}.yaml")
    with pytest.raises(TemperError, match="needs the built-in world: give world=DIR"):
        run_task(model, tiny_tokenizer, task)
    if name == "world_qa":
        task.generation.max_new_tokens = 4
    out = run_task(model, tiny_tokenizer, task, world_dir=world_dir)
    assert out["examples"] > 0
    for m in task.metrics:
        assert math.isfinite(out[m]) and 0.0 <= out[m] <= 1.0, (m, out)


def test_a_conversation_task_asks_its_last_turn_with_every_turn_before_it(tmp_path, model, tiny_tokenizer, monkeypatch):
    """conversation=messages: through the chat template the model reads the system prompt and the
    earlier turns, then answers the last assistant turn; the plain form asks the last user turn."""
    import temper.eval.tasks as tasks_module
    from temper.data.chat import render

    if not tiny_tokenizer.chat_template:
        pytest.skip("the tiny tokenizer has no chat template")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 2."},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 and 4?"}]
    rows = [{"messages": [*turns, {"role": "assistant", "content": "3 plus 4 is 7."}], "answer": "7"},
            {"messages": [{"role": "user", "content": "Spell 'cat' backwards."},
                          {"role": "assistant", "content": "tac"}], "answer": "tac"}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    spec = {"name": "conv", "type": "generation", "data": "c.jsonl", "conversation": "messages",
            "prompt": "Question: {question}\nAnswer:", "chat_prompt": "{question}", "target": "answer",
            "metrics": ["answer_accuracy"]}
    seen: list[str] = []

    def fake(m, t, prompts, cfg, batch_size=16, new_token_counts=None):
        seen.extend(prompts)
        return ["It is 7.", "cat"]

    monkeypatch.setattr(tasks_module, "generate_text", fake)
    out = run_task(model, tiny_tokenizer, task_from_dict({**spec, "chat": True}, base_dir=tmp_path))
    template = dict(bos_token=tiny_tokenizer.bos_token or "", eos_token=tiny_tokenizer.eos_token or "")
    assert seen == [render(tiny_tokenizer.chat_template, turns, add_generation_prompt=True, **template),
                    render(tiny_tokenizer.chat_template, rows[1]["messages"][:1], add_generation_prompt=True,
                           **template)]
    assert [o["correct"] for o in out["outputs"]] == [True, False] and out["answer_accuracy"] == 0.5
    assert rows[0]["messages"][3]["content"] == "And 3 and 4?"  # the row's own turns are left as they were
    seen.clear()
    run_task(model, tiny_tokenizer, task_from_dict(spec, base_dir=tmp_path))
    assert seen == ["Question: And 3 and 4?\nAnswer:", "Question: Spell 'cat' backwards.\nAnswer:"]

    write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "answer": "x"}])
    with pytest.raises(TemperError, match=r"row 1: field 'messages' needs a user turn followed by an assistant turn"):
        run_task(model, tiny_tokenizer, task_from_dict(spec, base_dir=tmp_path))
    with pytest.raises(TemperError, match="conversation= is for generation tasks without few_shot"):
        task_from_dict({**spec, "few_shot": 1}, base_dir=tmp_path)
