"""The built-in synthetic world: deterministic, consistent, held-out splits, labelled noise."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import string
import zlib
from collections import Counter
from dataclasses import fields

import pytest

from temper.data.world import (
    BOILERPLATE,
    JOBS,
    NOISE_KINDS,
    NOISE_STYLES,
    SPLIT_NAMES,
    STATEMENTS,
    WorldConfig,
    build_world,
    write_world,
)
from temper.errors import TemperError
from temper.eval.world_checker import check_reply

FILES = [f"{n}.jsonl" for n in SPLIT_NAMES] + ["facts.json", "README.md"]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world(build_world(WorldConfig()), out)
    return out


def load(root, name: str) -> list[dict]:
    with open(root / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def facts(root) -> tuple[dict, dict]:
    data = json.loads((root / "facts.json").read_text(encoding="utf-8"))
    return {p["name"]: p for p in data["people"]}, {t["name"]: t for t in data["towns"]}


def user_texts(row: dict) -> list[str]:
    msgs = row.get("messages") or row["prompt"]
    return [m["content"] for m in msgs if m["role"] == "user"]


def last_reply(row: dict) -> str:
    return row["messages"][-1]["content"]


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_other_seed_differs(world_dir, tmp_path):
    write_world(build_world(WorldConfig()), tmp_path / "again")
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (world_dir / name).read_bytes(), name
    write_world(build_world(WorldConfig(seed=1)), tmp_path / "other")
    for name in FILES:
        assert (tmp_path / "other" / name).read_bytes() != (world_dir / name).read_bytes(), name
    assert facts(tmp_path / "other")[0].keys() != facts(world_dir)[0].keys()


# --------------------------------------------------------------------------- consistency

FIELD_RE = {"name": r"[A-Z][a-z]+ [A-Z][a-z]+", "friend": r"[A-Z][a-z]+ [A-Z][a-z]+",
            "town": r"[A-Z][a-z]+", "country": r"[A-Z][a-z]+", "river": r"[A-Z][a-z]+",
            "pet_name": r"[A-Z][a-z]+", "job": r"[a-z]+", "pet": r"[a-z]+", "colour": r"[a-z]+",
            "age": r"\d+"}


def template_regex(template: str) -> re.Pattern:
    parts = []
    for literal, field_name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field_name:
            parts.append(f"(?P<{field_name}>{FIELD_RE[field_name]})")
    return re.compile(r"(?<![A-Za-z])" + "".join(parts))


def check_statements(texts: list[str], people: dict, towns: dict, every_template: bool = True) -> Counter:
    """Parse every templated fact statement back out of `texts` and compare it with facts.json."""
    stated: Counter = Counter()
    used: Counter = Counter()
    patterns = {(k, t): template_regex(t) for k, ts in STATEMENTS.items() for t in ts if k != "pet_name"}
    for text in texts:
        for (key, tmpl), pattern in patterns.items():
            for m in pattern.finditer(text):
                used[tmpl] += 1
                values = m.groupdict()
                if key in ("country", "river"):
                    assert values["town"] in towns, text
                    assert values[key] == towns[values["town"]][key], text
                    continue
                assert values["name"] in people, (values, text)
                person = people[values["name"]]
                for k, v in values.items():
                    if k != "name":
                        assert v == str(person[k]), (k, v, text)
                stated[values["name"], key] += 1
    if every_template:
        assert set(used) == {t for k, ts in STATEMENTS.items() for t in ts}, "a template never matched"
    return stated


def test_pretraining_facts_match_ground_truth_and_repeat(world_dir):
    people, towns = facts(world_dir)
    docs = [d for s in ("train", "val") for d in load(world_dir, f"pretrain/{s}") if d["meta"]["kind"] == "clean"]
    stated = check_statements([d["text"] for d in docs], people, towns)
    for name in people:  # every fact of every person is stated several times
        for key in ("job", "town", "pet", "colour", "age", "friend"):
            assert stated[name, key] >= 4, (name, key, stated[name, key])
    job_word = re.compile(r"\b(" + "|".join(JOBS) + r")\b")
    person_docs = [d for d in docs if d["meta"]["topic"] == "person"]
    assert len(person_docs) > 1000
    for d in person_docs:
        assert set(job_word.findall(d["text"])) <= {people[d["meta"]["about"]]["job"]}, d


def test_fact_answers_match_ground_truth(world_dir):
    people, towns = facts(world_dir)
    replies = []
    checked = 0
    for split in ("train", "test"):
        for kind in ("sft", "rl", "preference"):
            for row in load(world_dir, f"{kind}/{split}"):
                if row["task"] != "fact":
                    continue
                meta = row["meta"]
                truth = people[meta["person"]] if "person" in meta else towns[meta["town"]]
                assert row["answer"] == str(truth[meta["key"]]), row
                checked += 1
                if kind == "sft":
                    assert row["answer"] in last_reply(row)
                    replies += [m["content"] for m in row["messages"] if m["role"] == "assistant"]
                if kind == "preference":
                    assert row["answer"] in row["chosen"][0]["content"]
    assert checked > 1500
    # worded replies (multi-turn first answers too) use the statement templates: parse them back
    assert sum(check_statements(replies, people, towns, every_template=False).values()) > 500


# --------------------------------------------------------------------------- held-out splits


def identity(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row["meta"].items() if k != "op" or row["task"] != "string"))


def test_test_questions_never_appear_in_train(world_dir):
    train_q, train_ids = set(), set()
    for kind in ("sft", "preference", "rl"):
        for row in load(world_dir, f"{kind}/train"):
            train_q.update(user_texts(row))
            train_ids.add(identity(row))
    n_test = 0
    for kind in ("sft", "preference", "rl"):
        for row in load(world_dir, f"{kind}/test"):
            for q in user_texts(row):
                assert q not in train_q, q
            assert identity(row) not in train_ids, row["meta"]
            n_test += 1
    assert n_test == 400
    # the corpus dialogues only ask train questions
    dialogue_qs = [line.split(": ", 1)[1] for d in load(world_dir, "pretrain/train")
                   if d["meta"].get("topic") == "dialogue" for line in d["text"].splitlines()
                   if line.startswith(("Q: ", "User: "))]
    test_q = {q for kind in ("sft", "rl") for r in load(world_dir, f"{kind}/test") for q in user_texts(r)}
    assert dialogue_qs and not set(dialogue_qs) & test_q


def test_val_documents_are_new_documents_about_the_same_world(world_dir):
    train = load(world_dir, "pretrain/train")
    val = load(world_dir, "pretrain/val")
    train_texts = {d["text"] for d in train}
    assert len(val) >= 100
    assert not [d for d in val if d["text"] in train_texts]
    assert {d["meta"]["kind"] for d in val} == {"clean"}
    people, _ = facts(world_dir)
    assert {d["meta"]["about"] for d in val if d["meta"]["topic"] == "person"} == set(people)


# --------------------------------------------------------------------------- noise


def test_planted_noise(world_dir):
    train = load(world_dir, "pretrain/train")
    by_id = {d["meta"]["id"]: d for d in train}
    kinds = Counter(d["meta"]["kind"] for d in train)
    assert set(kinds) == {"clean", *NOISE_KINDS}
    noise = len(train) - kinds["clean"]
    assert abs(noise / len(train) - 0.1) < 0.01
    assert min(kinds[k] for k in NOISE_KINDS) >= noise // len(NOISE_KINDS) - 1
    clean_texts = [d["text"] for d in train if d["meta"]["kind"] == "clean"]
    assert len(set(clean_texts)) == len(clean_texts)  # the only duplicates are the labelled ones
    email = re.compile(r"\b[a-z0-9.]+@example\.(com|org)\b")
    phone = re.compile(r"\b555-01\d\d\b")
    for d in train:
        kind, text = d["meta"]["kind"], d["text"]
        if kind == "exact_duplicate":
            src = by_id[d["meta"]["source"]]
            assert src["meta"]["kind"] == "clean" and src["text"] == text
        elif kind == "near_duplicate":
            src = by_id[d["meta"]["source"]]
            assert src["meta"]["kind"] == "clean" and src["text"] != text
            assert text not in set(clean_texts)
            assert difflib.SequenceMatcher(None, src["text"], text).ratio() > 0.8
        elif kind == "pii":
            assert email.search(text) and phone.search(text), text
        elif kind == "spam":
            assert len(text) > 150 and len(zlib.compress(text.encode())) < len(text) / 4, text
        elif kind == "boilerplate":
            assert set(text.splitlines()) <= set(BOILERPLATE), text
            assert re.search(r"cookies|newsletter|All rights reserved", text), text
        else:
            assert not email.search(text)


def test_noise_fraction_zero_and_custom(tmp_path):
    w = build_world(WorldConfig(num_people=8, noise_fraction=0.0, num_sft_train=10, num_pref_train=10, num_rl_train=10))
    assert {d["meta"]["kind"] for d in w.splits["pretrain/train"]} == {"clean"}
    w = build_world(WorldConfig(num_people=8, noise_fraction=0.3, num_sft_train=10, num_pref_train=10, num_rl_train=10))
    docs = w.splits["pretrain/train"]
    assert abs(sum(d["meta"]["kind"] != "clean" for d in docs) / len(docs) - 0.3) < 0.01


# --------------------------------------------------------------------------- style noise in sft/train

TINY = dict(num_people=8, num_towns=4, docs_per_person=4, docs_per_town=2, num_arithmetic_docs=20,
            num_dialogue_docs=20, num_sft_train=120, num_sft_test=20, num_pref_train=40, num_pref_test=12,
            num_rl_train=20, num_rl_test=10)
# sha256 (first 16 hex) of each split of WorldConfig(**TINY), as written by the code before
# sft_style_noise existed: the setting's default, and the helper preference() now shares with
# it, must not move a byte. A deliberate change to the world updates these.
GOLDEN = {"pretrain/train": "763964ea0cce5edb", "pretrain/val": "17b65c14ac2249e6",
          "sft/train": "dd9024a84a3b5f74", "sft/test": "b7f5343511f80ec4",
          "preference/train": "c74a8ec46f0814f3", "preference/test": "069db0bf878fffaa",
          "rl/train": "06d1a22149f7b0ed", "rl/test": "aa110acff4d8eaf1",
          # added with the process reward model's splits (their own random streams: the others kept their bytes)
          "prm/train": "8c3acdef4e5c2f1a", "prm/test": "bb8bfc02ccfe48c6"}


def test_world_bytes_are_pinned():
    world = build_world(WorldConfig(**TINY))
    for name in SPLIT_NAMES:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in world.splits[name])
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == GOLDEN[name], name


def test_sft_style_noise_rewrites_only_the_noised_final_replies_in_a_failing_style():
    clean = build_world(WorldConfig(**TINY))
    noisy = build_world(WorldConfig(**TINY, sft_style_noise=0.3))
    for name in SPLIT_NAMES:
        if name != "sft/train":
            assert noisy.splits[name] == clean.splits[name], name
    criterion = {"rambling": "concise", "repetitive": "not_repetitive", "rude": "polite"}
    styles: Counter = Counter()
    for before, after in zip(clean.splits["sft/train"], noisy.splits["sft/train"], strict=True):
        if "style" not in after:
            assert after == before
            continue
        styles[after["style"]] += 1
        reply = after["messages"][-1]["content"]
        assert reply != before["messages"][-1]["content"]
        assert {**after, "messages": after["messages"][:-1]} == {**before, "style": after["style"],
                                                                "messages": before["messages"][:-1]}
        check = check_reply(reply, after["answer"])
        assert check["correct"] and not check[criterion[after["style"]]], (after, check)
    assert sum(styles.values()) == round(0.3 * TINY["num_sft_train"])
    assert set(styles) == set(NOISE_STYLES) == set(criterion)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_sft_style_noise_out_of_range_is_refused(value):
    with pytest.raises(TemperError, match=r"sft_style_noise .* must be in \[0, 1\)"):
        build_world(WorldConfig(**TINY, sft_style_noise=value))


# --------------------------------------------------------------------------- tasks


def test_preference_pairs(world_dir):
    for split in ("train", "test"):
        rows = load(world_dir, f"preference/{split}")
        assert {r["reason"] for r in rows} == {"wrong", "rambling", "repetitive", "rude"}
        for r in rows:
            assert [m["role"] for m in r["prompt"]] == ["user"]
            chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
            assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
            assert chosen != rejected
            has = re.compile(rf"(?<![\w']){re.escape(r['answer'])}(?![\w'])")
            assert has.search(chosen), r
            if r["reason"] == "wrong":
                assert not has.search(rejected), r
            elif r["reason"] == "rambling":
                assert len(rejected) > 3 * len(chosen)
            elif r["reason"] == "repetitive":
                sentences = [s for s in rejected.split(". ") if s]
                assert Counter(sentences).most_common(1)[0][1] >= 4


def expected_answer(row: dict) -> str:
    m = row["meta"]
    if row["task"] == "arithmetic":
        return str({"add": m["a"] + m["b"], "sub": m["a"] - m["b"], "mul": m["a"] * m["b"]}[m["op"]])
    return {"reverse": m["word"][::-1], "length": str(len(m["word"])), "upper": m["word"].upper()}[m["op"]]


def test_arithmetic_and_string_answers_are_correct(world_dir):
    counts: Counter = Counter()
    for kind in ("sft", "preference", "rl"):
        for split in ("train", "test"):
            for row in load(world_dir, f"{kind}/{split}"):
                if row["task"] == "fact":
                    continue
                assert row["answer"] == expected_answer(row), row
                question = user_texts(row)[-1]
                if row["task"] == "arithmetic":
                    assert re.findall(r"\d+", question) in ([str(row["meta"]["a"]), str(row["meta"]["b"])],
                                                            [str(row["meta"]["b"]), str(row["meta"]["a"])])
                else:
                    assert f"'{row['meta']['word']}'" in question
                if kind == "sft":
                    assert row["answer"] in last_reply(row)
                counts[row["task"], row["meta"]["op"]] += 1
    assert all(counts[t, op] > 20 for t, op in [("arithmetic", "add"), ("arithmetic", "sub"), ("arithmetic", "mul"),
                                                  ("string", "reverse"), ("string", "length"), ("string", "upper")])


def test_corpus_arithmetic_is_correct(world_dir):
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    pattern = re.compile(r"\b(\d+) (plus|minus|times) (\d+) (?:is|equals) (\d+)\.")
    n = 0
    for d in load(world_dir, "pretrain/train"):
        for a, op, b, c in pattern.findall(d["text"]):
            assert ops[op](int(a), int(b)) == int(c), d["text"]
            n += 1
    assert n > 500


def test_sft_rows_shape(world_dir):
    rows = load(world_dir, "sft/train")
    assert len(rows) == 2000
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in rows)
    for r in rows:
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert r["task"] in ("fact", "arithmetic", "string")


# --------------------------------------------------------------------------- size, stage, cli


def test_default_corpus_size(world_dir):
    size = sum(len(d["text"].encode()) for d in load(world_dir, "pretrain/train"))
    assert 500_000 < size < 1_500_000  # enough to learn the facts, small enough for 2 CPU cores


def test_stage_config_mirrors_world_config():
    from temper.stages.world import Config

    stage = {f.name: f.default for f in fields(Config)}
    for f in fields(WorldConfig):
        assert stage[f.name] == f.default, f.name


def test_cli_writes_every_file(tmp_path, capsys):
    from temper.cli import main

    out = tmp_path / "w"
    assert main(["world", f"output_dir={out}", "num_people=10"]) == 0
    printed = capsys.readouterr().out
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "sft 2,000 train / 200 test" in printed  # the rows of each split, in the summary
    assert len(json.loads((out / "facts.json").read_text())["people"]) == 10
    assert main(["world", f"output_dir={out}", "num_people=2"]) == 2
    assert "num_people" in capsys.readouterr().err


def test_fact_probes_are_prefixes_of_corpus_statements(tmp_path):
    from temper.data.world import fact_probes

    world = build_world(WorldConfig(num_people=8))
    paths = write_world(world, tmp_path)
    facts = json.loads(paths["facts"].read_text())
    corpus = paths["pretrain/train"].read_text()
    probes = fact_probes(facts)
    assert len(probes) == 8 * 4
    stated = 0
    for p in probes:
        person = next(x for x in facts["people"] if p["prompt"].startswith(x["name"]))
        assert p["answer"] == str(person[p["fact"]])
        # wherever the corpus uses the probe's form, it goes on with the probe's answer
        continuations = re.findall(re.escape(p["prompt"]) + r" ([\w]+)", corpus)
        assert all(c == p["answer"] for c in continuations), (p, continuations)
        stated += bool(continuations)
    assert stated >= len(probes) // 2


def test_prm_steps_are_labelled_by_the_first_wrong_one():
    """Every step is `x op y = z`; a step is labelled true exactly when it and every step before it
    compute right (Math-Shepherd's rule); about half the rows hold a planted error; the first
    operation of a test row is never a train identity."""
    import re

    world = build_world(WorldConfig(**TINY))
    rows = world.splits["prm/train"] + world.splits["prm/test"]
    planted = 0
    for row in rows:
        assert len(row["completions"]) == len(row["labels"]) == row["meta"]["ops"] >= 2
        all_right_so_far = True
        for step, label in zip(row["completions"], row["labels"]):
            x, op, y, z = re.fullmatch(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)", step).groups()
            all_right_so_far &= {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op] == int(z)
            assert label == all_right_so_far, row
        assert row["labels"][-1] == (row["completions"][-1].split(" = ")[1] == row["answer"])
        planted += row["meta"]["first_error"] is not None
    assert 0.4 < planted / len(rows) < 0.6

    def first_identity(row) -> tuple:
        a, op, b = re.fullmatch(r"Start from (\d+), (add|subtract|multiply by) (\d+),.*", row["prompt"][0]["content"]
                                ).groups()
        return op, int(a), int(b)

    train = {first_identity(r) for r in world.splits["prm/train"]}
    assert not train & {first_identity(r) for r in world.splits["prm/test"]}
