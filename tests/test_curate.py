"""temper curate: normalisation, PII, the published filters, MinHash/LSH, decontamination, bad input,
and precision/recall against the built-in world's planted noise."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from temper.cli import main
from temper.config import load_config
from temper.configs import shipped_path
from temper.curate import filters
from temper.curate.minhash import MinHasher, jaccard, s_curve, shingle_hashes, threshold
from temper.curate.text import NormalizeConfig, PiiConfig, mask_pii, normalize
from temper.data.world import WorldConfig, build_world
from temper.errors import TemperError
from temper.eval.contamination import contamination_report, words
from temper.stages import curate as stage

# the world's documents are one to six short sentences: the published length and stop-word rules are
# calibrated on web pages (>= 50 words), so a world run switches them off (see README, "Data curation")
WORLD = ["gopher_quality.enabled=false", "c4.enabled=false", "fineweb.enabled=false",
         "gopher_repetition.top_ngram_fracs=[0,0,0]"]


def run(data, out, *overrides: str, config: str | None = None) -> dict:
    path = shipped_path(config) if config else None
    return stage.run(load_config(stage.Config, path, [f"data={data}", f"output_dir={out}", *overrides]))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PROSE = ("The history of the town is long and full of change. Many of the people who live there have "
         "worked with the river for generations, and they say that the water shapes the way of life. "
         "Farmers bring their produce to the market every week, and the square fills with voices. "
         "Visitors come to see the old bridge and to walk along the banks of the quiet river in spring. "
         "In the evening the lamps are lit and the streets grow calm again.")


def test_normalize_nfc_controls_whitespace():
    raw = "Cafe\u0301\x00 and\t\t tea \r\n\n\n\nnext\x07 line  "
    assert normalize(raw, NormalizeConfig()) == "Caf\u00e9 and tea\n\nnext line"
    assert normalize(raw, NormalizeConfig(enabled=False)) == raw


def test_pii_masked_and_sums_left_alone():
    text, counts = mask_pii("Mail ann.lee58@example.com, call (034) 555-0190 or +44 20 7946 0958; host 10.0.0.12.",
                            PiiConfig())
    assert text == "Mail <EMAIL>, call <PHONE> or <PHONE>; host <IP>."
    assert counts == {"email": 1, "phone": 2, "ip": 1}
    clean = "The sum of 12 and 28 is 40. Taking 11 from 44 leaves 33. It ran from 1999-2004."
    assert mask_pii(clean, PiiConfig()) == (clean, {})
    assert mask_pii("a@b.org", PiiConfig(email=False))[0] == "a@b.org"


def test_published_filters_fire_on_what_they_target():
    assert filters.gopher_quality(PROSE, filters.GopherQualityConfig()) is None
    assert filters.gopher_quality("Too short to keep.", filters.GopherQualityConfig()) == "gopher_short_doc"
    no_stop = " ".join(["alpha beta gamma delta"] * 15)
    assert filters.gopher_quality(no_stop, filters.GopherQualityConfig()) == "gopher_not_enough_stop_words"
    assert filters.gopher_repetition(PROSE, filters.GopherRepetitionConfig()) is None
    spam = "\n".join(["BUY NOW!!! Limited offer, click here!!!"] * 10)
    assert filters.gopher_repetition(spam, filters.GopherRepetitionConfig()) == "gopher_dup_line_frac"
    one_line = " ".join(["Cheap deals cheap deals best price guaranteed"] * 10)
    assert filters.gopher_repetition(one_line, filters.GopherRepetitionConfig()) == "gopher_top_2_gram"
    no_top = filters.GopherRepetitionConfig(top_ngram_fracs=[0, 0, 0])
    assert filters.gopher_repetition(one_line, no_top) == "gopher_duplicated_5_grams"
    assert filters.c4(PROSE, filters.C4Config()) == (None, PROSE)
    assert filters.c4(PROSE + " Lorem ipsum dolor.", filters.C4Config())[0] == "c4_lorem_ipsum"
    assert filters.c4(PROSE + " {x}.", filters.C4Config())[0] == "c4_curly_bracket"
    # C4 removes a cookie-policy line and a line without terminal punctuation, keeping the prose
    reason, edited = filters.c4(PROSE + "\nThis site uses cookies to track you.\nHome | Shop | Contact",
                                filters.C4Config())
    assert reason is None and edited == PROSE
    assert filters.fineweb(PROSE, filters.FineWebConfig()) is None
    menu = "\n".join(["Home", "About", "Shop", "Contact", "Blog"])
    assert filters.fineweb(menu, filters.FineWebConfig()) == "fineweb_line_punct_ratio"


def test_minhash_estimates_jaccard_and_the_s_curve():
    assert threshold(14, 8) == pytest.approx((1 / 14) ** (1 / 8)) and 0.71 < threshold(14, 8) < 0.72
    assert s_curve(0.9, 14, 8) > 0.99 and s_curve(0.5, 14, 8) < 0.06
    base = words(" ".join(f"w{i}" for i in range(300)))
    other = base[:250] + words(" ".join(f"x{i}" for i in range(50)))
    a, b = shingle_hashes(base, 5), shingle_hashes(other, 5)
    exact = jaccard(a, b)
    hasher = MinHasher(1024, seed=3)  # many hashes: the estimate's spread is ~0.015
    estimate = float(np.mean(hasher.signature(a) == hasher.signature(b)))
    assert abs(estimate - exact) < 0.05
    assert np.array_equal(MinHasher(112, 1).signature(a), MinHasher(112, 1).signature(a))


def test_bands_times_rows_must_equal_num_hashes(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": PROSE}])
    with pytest.raises(TemperError, match=r"bands x rows = 14 x 7 = 98, but num_hashes=112"):
        run(data, tmp_path / "out", "near_dedup.rows=7")
    assert main(["curate", f"data={data}", f"output_dir={tmp_path / 'out'}", "near_dedup.bands=10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10 x 8 = 80, but num_hashes=112" in err[0]
    assert not (tmp_path / "out").exists()


def test_nothing_disappears_bad_rows_are_counted(tmp_path):
    rows = [{"text": PROSE}, {"text": PROSE}, {"text": "   \n\t "}, {"title": "no text"}, {"text": 7},
            {"text": "binary\x00\x01data"}, {"text": PROSE + " Thanks for reading."},
            {"text": "Write to ann@example.com today about the new library, which opens on the first day of "
                     "the month with a reading room and a garden."}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    report = run(data, out, "gopher_quality.min_doc_words=5", "c4.enabled=false")
    kept = [r for p in sorted((out / "data").glob("*.jsonl")) for r in jsonl(p)]
    rejected = {p.stem: jsonl(p) for p in (out / "rejected").glob("*.jsonl")}
    assert len(kept) + sum(map(len, rejected.values())) == len(rows) == report["input"]["documents"]
    assert sorted(r["reason"] for r in rejected["input"]) == ["binary", "empty", "field 'text' is a number (7)",
                                                              "field 'text' missing"]
    assert {"title": "no text"} in [r["record"] for r in rejected["input"]]  # the row as read
    assert {"text": 7} in [r["record"] for r in rejected["input"]]
    assert [r["source"] for r in rejected["exact_dedup"]] == [f"{data}:2"]
    assert rejected["exact_dedup"][0]["duplicate_of"] == f"{data}:1"
    assert report["rules"]["exact_dedup"]["documents"] == 1 and report["exact_dedup"]["cluster_sizes"] == {"2": 1}
    assert any("<EMAIL>" in r["text"] for r in kept) and not any("ann@example.com" in r["text"] for r in kept)
    assert report["modified"]["pii"]["email"] == 1
    # the near-duplicate (a sentence added) is found by MinHash, its cluster reported
    assert [r["source"] for r in rejected["near_dedup"]] == [f"{data}:7"]
    assert report["near_dedup"]["cluster_sizes"] == {"2": 1}
    assert json.loads((out / "report.json").read_text())["kept"]["documents"] == len(kept)
    assert "read 8 documents" in (out / "summary.txt").read_text()
    assert not [p.name for p in out.rglob("*") if ".tmp-" in p.name]  # no staging or temporary file left
    with pytest.raises(TemperError, match="holds an earlier output"):
        run(data, out)


def test_invalid_utf8_and_oversized_lines_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n\xff\xfe broken\n")
    assert main(["curate", f"data={bad}", f"output_dir={tmp_path / 'o1'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not UTF-8 at byte offset 10" in err[0]
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "x" * (1 << 20)}) + "\n")
    assert main(["curate", f"data={big}", f"output_dir={tmp_path / 'o2'}", "max_document_mb=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "longer than 1 MiB" in err[0]
    # encoding_errors=replace reads it, with replacement characters
    report = run(bad, tmp_path / "o3", "encoding_errors=replace", *WORLD)
    assert report["input"]["documents"] == 1


def test_decontamination_drops_documents_sharing_13grams(tmp_path):
    question = ("Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May "
                "how many clips did she sell")
    eval_file = write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": question, "answer": "72"}])
    leaked = "Some forum post. " + question + " in total? The answer is 72."
    data = write_jsonl(tmp_path / "in.jsonl", [{"body": PROSE, "id": 1}, {"body": leaked, "id": 2}])
    out = tmp_path / "out"
    report = run(data, out, "text_field=body", f"decontaminate.eval=[{eval_file}]", *WORLD)
    assert report["rules"]["decontamination"]["documents"] == 1
    dropped = jsonl(out / "rejected" / "decontamination.jsonl")[0]
    assert dropped["source"] == f"{data}:2" and dropped["record"]["id"] == 2 and "text" not in dropped["record"]
    kept = [r["body"] for r in jsonl(out / "data" / "part-00000.jsonl")]
    assert contamination_report(kept, {"gsm8k": [question]})["gsm8k"]["contaminated"] == 0


def test_near_dedup_with_exact_jaccard_check(tmp_path):
    base = " ".join(f"word{i}" for i in range(60))
    rows = [{"text": base}, {"text": base + " extra"}, {"text": " ".join(f"other{i}" for i in range(60))}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    report = run(data, tmp_path / "a", "near_dedup.verify=true", *WORLD)
    near = report["near_dedup"]
    assert report["rules"]["near_dedup"]["documents"] == 1 and near["cluster_sizes"] == {"2": 1}
    assert near["candidate_pairs_refused"] == 0 and near["threshold"] == pytest.approx(0.719, abs=1e-3)
    strict = run(data, tmp_path / "b", "near_dedup.verify=true", "near_dedup.verify_threshold=0.99", *WORLD)
    assert strict["rules"]["near_dedup"]["documents"] == 0 and strict["near_dedup"]["candidate_pairs_refused"] >= 1


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    cfg = WorldConfig(num_people=8, docs_per_person=10, docs_per_town=2, num_arithmetic_docs=40, num_dialogue_docs=40,
                      noise_fraction=0.2, num_sft_train=0, num_sft_test=0, num_pref_train=0, num_pref_test=0,
                      num_rl_train=0, num_rl_test=0, num_prm_train=0, num_prm_test=0)
    rows = build_world(cfg).splits["pretrain/train"]
    return write_jsonl(tmp_path_factory.mktemp("world") / "train.jsonl", rows)


def test_world_noise_precision_and_recall(small_world, tmp_path):
    # the shipped config for the world; this world is tiny (9 boilerplate documents), so a line held by 3
    # documents counts as boilerplate here (10 by default)
    report = run(small_world, tmp_path / "out", "line_dedup.min_docs=3", config="curate-world")
    truth = report["ground_truth"]
    rules, kinds = truth["rules"], truth["kinds"]
    assert rules["exact_dedup"]["precision"] == 1.0 and rules["exact_dedup"]["recall"] == 1.0
    assert rules["pii"]["precision"] == 1.0 and rules["pii"]["recall"] == 1.0
    assert rules["line_dedup"]["precision"] == 1.0 and rules["gopher_repetition"]["precision"] == 1.0
    assert kinds["boilerplate"]["by_rule"] == {"line_dedup": kinds["boilerplate"]["documents"]}
    assert kinds["spam"]["removed_fraction"] == 1.0
    assert rules["near_dedup"]["precision"] >= 0.75 and rules["near_dedup"]["recall"] >= 0.6
    assert kinds["clean"]["removed_fraction"] < 0.1
    assert report["kept"]["documents"] + report["removed"]["documents"] == report["input"]["documents"]
    # the kept corpus holds no planted e-mail address
    kept = (tmp_path / "out" / "data" / "part-00000.jsonl").read_text()
    assert "@example." not in kept and "<EMAIL>" in kept


def test_world_with_the_published_defaults(small_world, tmp_path):
    """The published thresholds remove every planted kind, and most clean documents with them: they are
    calibrated on web pages, the world's documents are a few sentences (the report says so by rule)."""
    report = run(small_world, tmp_path / "out")
    kinds = report["ground_truth"]["kinds"]
    for kind in ("boilerplate", "spam", "exact_duplicate", "near_duplicate"):
        assert kinds[kind]["removed_fraction"] == 1.0
    assert kinds["clean"]["removed_fraction"] > 0.5
    assert report["ground_truth"]["rules"]["gopher_quality"]["flagged_by_kind"]["clean"] > 0


def test_verify_threshold_without_verify_is_refused():
    with pytest.raises(TemperError, match=r"near_dedup.verify_threshold is used only with near_dedup.verify=true"):
        load_config(stage.Config, None, ["data=x.jsonl", "near_dedup.verify_threshold=0.9"])


def test_workers_write_the_same_corpus(small_world, tmp_path, monkeypatch):
    from temper.curate import pipeline

    monkeypatch.setattr(pipeline, "WORKER_BATCH", 16)  # several batches
    one = run(small_world, tmp_path / "one", config="curate-world")
    two = run(small_world, tmp_path / "two", "workers=2", config="curate-world")
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.jsonl"))
    assert files and files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.jsonl"))
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    one.pop("config"), two.pop("config")
    assert one == two


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_normalize_and_masking_are_idempotent(text):
    once = normalize(text, NormalizeConfig())
    assert normalize(once, NormalizeConfig()) == once
    assert once == once.strip() and "\n\n\n" not in once and "\x00" not in once
    masked, _ = mask_pii(once, PiiConfig())
    assert mask_pii(masked, PiiConfig()) == (masked, {})


def test_parquet_shards_hold_the_same_rows(small_world, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    run(small_world, tmp_path / "j", "shard_docs=50", config="curate-world")
    run(small_world, tmp_path / "p", "shard_docs=50", "output_format=parquet", config="curate-world")
    rows = [r for p in sorted((tmp_path / "j" / "data").glob("*.jsonl")) for r in jsonl(p)]
    shards = sorted((tmp_path / "p" / "data").glob("*.parquet"))
    assert len(shards) == len(list((tmp_path / "j" / "data").glob("*.jsonl"))) > 1
    assert [r["text"] for p in shards for r in pq.read_table(p).to_pylist()] == [r["text"] for r in rows]


def test_a_failed_run_leaves_nothing_half_written_and_resumes(tmp_path, capsys, monkeypatch):
    from temper.curate import pipeline

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": PROSE}, {"text": "Mail bob@example.org please."}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": PROSE}, {"text": "Another short document here."}])
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    out = tmp_path / "out"
    assert main(["curate", f"data=[{a},{b},{c}]", f"output_dir={out}", *WORLD]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{c}:2: not valid JSON" in err[0]
    # no shard, reject or report of the failed run; the two finished files' per-document results stay
    assert sorted(p.name for p in out.iterdir()) == [".work"]
    assert len(list((out / ".work").glob("*.jsonl"))) == 2 and not list((out / ".work").glob("*.tmp-*"))
    write_jsonl(c, [{"text": "fine"}, {"text": "Call 555-0123 today for a quote."}])
    calls = []
    real = pipeline.DocWork.__call__
    monkeypatch.setattr(pipeline.DocWork, "__call__", lambda self, raw: calls.append(raw) or real(self, raw))
    report = run(f"[{a},{b},{c}]", out, *WORLD)
    assert calls == ["fine", "Call 555-0123 today for a quote."]  # only the unfinished file is computed again
    assert report["input"]["files_resumed"] == [str(a), str(b)] and not (out / ".work").exists()
    fresh = run(f"[{a},{b},{c}]", tmp_path / "fresh", "resume=false", *WORLD)
    for name in ("data/part-00000.jsonl", "rejected/exact_dedup.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    for r in (report, fresh):
        r.pop("config"), r["input"].pop("files_resumed")
    assert report == fresh
    # overwrite=true and a failure: the earlier report does not stay beside no shards
    assert main(["curate", f"data=[{a},{c},{tmp_path / 'none.jsonl'}]", f"output_dir={out}", "overwrite=true"]) == 2
    assert not [p.name for p in out.iterdir() if p.name in ("report.json", "summary.txt", "data", "rejected")]


def test_bench_minhash_runs_and_compares_like_with_like(monkeypatch, capsys):
    pytest.importorskip("datasketch")
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_minhash.py"
    spec = importlib.util.spec_from_file_location("bench_minhash", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_minhash.py", "--docs", "40", "--words", "60", "--repeats", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "speed ratio temper / datasketch" in out and "pairs: 20" in out


def test_decontamination_against_an_eval_task(tmp_path):
    question = "Which river runs past the old mill that the baker of Pellamar bought from his neighbour last year"
    write_jsonl(tmp_path / "rows.jsonl", [{"question": question, "answer": "the Brisk"}])
    task = tmp_path / "mill.yaml"
    task.write_text('name: mill\ntype: generation\ndata: rows.jsonl\nprompt: "Question: {question}\\nAnswer:"\n'
                    "target: answer\n")
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": PROSE}, {"text": f"Quiz night! {question}? Easy."}])
    report = run(data, tmp_path / "out", f"decontaminate.tasks=[{task}]", *WORLD)
    assert report["rules"]["decontamination"]["documents"] == 1
    assert report["decontamination"]["sets"] == {"task:mill": 1}
    with pytest.raises(TemperError, match="decontaminate.world is used only with decontaminate.tasks="):
        load_config(stage.Config, None, ["data=x.jsonl", "decontaminate.world=runs/world"])


# mixing, token shards and the report's images: every per-document rule off, so that what is
# written depends on the mix alone
PLAIN = [*WORLD, "gopher_repetition.enabled=false", "near_dedup.enabled=false", "line_dedup.enabled=false"]


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"Alpha document {i} tells of river {i * 7} and hill {i}."}
                                           for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"Beta note {i} speaks of mill {i * 3} by the bridge."}
                                           for i in range(10)])
    return a, b


def _written(out: Path) -> list[str]:
    return [r["text"] for p in sorted((out / "data").glob("*.jsonl")) for r in jsonl(p)]


def test_mix_weights_up_and_down_sample_and_shuffle(tmp_path):
    a, b = _sources(tmp_path)
    report = run(f"[{a},{b}]", tmp_path / "mix", *PLAIN, "mix.weights=[0.5,2.5]", "mix.shuffle=true", "shard_docs=16")
    texts = _written(tmp_path / "mix")
    alpha, beta = Counter(t for t in texts if t.startswith("Alpha")), Counter(t for t in texts if t.startswith("Beta"))
    assert set(alpha.values()) == {1} and 8 <= len(alpha) <= 32  # about half of the 40, each once
    assert set(beta.values()) == {2, 3} and len(beta) == 10  # every one twice, about half three times
    mix = report["mix"]
    assert [s["written_documents"] for s in mix["sources"]] == [len(alpha), sum(beta.values())]
    assert mix["written_documents"] == len(texts) and report["kept"]["documents"] == 50
    assert len(report["kept"]["shards"]) == -(-len(texts) // 16)
    assert texts != sorted(texts, key=lambda t: not t.startswith("Alpha"))  # interleaved, not source by source
    again = run(f"[{a},{b}]", tmp_path / "again", *PLAIN, "mix.weights=[0.5,2.5]", "mix.shuffle=true")
    assert _written(tmp_path / "again") == texts and again["mix"] == mix  # the seed fixes both draws
    run(f"[{a},{b}]", tmp_path / "other", *PLAIN, "mix.weights=[0.5,2.5]", "mix.shuffle=true", "mix.seed=1")
    assert _written(tmp_path / "other") != texts
    plain = run(f"[{a},{b}]", tmp_path / "plain", *PLAIN)  # no mix: input order, once each
    assert _written(tmp_path / "plain") == [r["text"] for p in (a, b) for r in jsonl(p)]
    assert plain["mix"] == {"enabled": False} and [s["kept_documents"] for s in plain["sources"]] == [40, 10]
    assert not [p.name for p in (tmp_path / "mix").rglob("*") if ".tmp-" in p.name]


def test_mix_weights_must_match_the_sources(tmp_path, capsys):
    a, b = _sources(tmp_path)
    with pytest.raises(TemperError, match=r"mix.weights has 1 value\(s\) but data= names 2 source\(s\)"):
        run(f"[{a},{b}]", tmp_path / "out", "mix.weights=[2]")
    assert main(["curate", f"data=[{a},{b}]", f"output_dir={tmp_path / 'out'}", "mix.weights=[1,-1]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mix.weights[1]" in err[0]
    assert main(["curate", f"data={a}", f"output_dir={tmp_path / 'out'}", f"tokenize.tokenizer={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenize.tokenizer" in err[0] and "tokenizer.json" in err[0]
    assert main(["curate", f"data={a}", f"output_dir={tmp_path / 'out'}", "tokenize.val_fraction=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenize.val_fraction is used only with tokenize.tokenizer" in err[0]
    assert not (tmp_path / "out").exists()


def test_tokenize_straight_into_pretraining_shards(tmp_path, tiny_tokenizer):
    from temper.data.shards import TokenLoader, read_index

    a, b = _sources(tmp_path)
    tiny_tokenizer.save(tmp_path / "tok")
    out = tmp_path / "out"
    report = run(f"[{a},{b}]", out, *PLAIN, "mix.weights=[1,2]", "mix.shuffle=true",
                 f"tokenize.tokenizer={tmp_path / 'tok'}", "tokenize.val_fraction=0.2")
    texts = _written(out)
    index = read_index(out / "tokens")
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["num_docs"] + val["num_docs"] == len(texts) == 60 and val["num_docs"] > 0
    assert report["tokens"]["train_tokens"] == train["num_tokens"]
    shard = train["shards"][0]  # the first train document is the first written one not drawn for val
    ids = np.fromfile(out / "tokens" / shard["file"], dtype=np.dtype(index["dtype"]))
    ends = np.load(out / "tokens" / shard["docs"])
    first = ids[:ends[0]]
    assert first[-1] == tiny_tokenizer.eos_id
    assert tiny_tokenizer.decode(first[:-1].tolist()) in texts
    decoded = [tiny_tokenizer.decode(ids[s:e - 1].tolist()) for s, e in zip(np.r_[0, ends[:-1]], ends, strict=True)]
    assert Counter(decoded) <= Counter(texts)  # every train document is a written one, copies included
    loader = TokenLoader(out / "tokens", "train", seq_len=8, batch_size=2)  # what `temper pretrain` reads
    x, y = loader.next_batch()
    assert x.shape == (2, 8) and y.shape == (2, 8)


def test_pretrain_trains_on_curated_token_shards_as_they_are(tmp_path, tiny_tokenizer, capsys):
    """`temper pretrain data=OUT/tokens`: the shards curate wrote, with the tokenizer saved beside
    them; no text is read and no shard rebuilt. Another tokenizer is refused in one line."""
    import shutil

    from temper.data.tokenizer import train_tokenizer
    from temper.lineage import read_lineage

    a, b = _sources(tmp_path)
    tiny_tokenizer.save(tmp_path / "tok")
    out = tmp_path / "out"
    run(f"[{a},{b}]", out, *PLAIN, f"tokenize.tokenizer={tmp_path / 'tok'}", "tokenize.val_fraction=0.2")
    tokens = out / "tokens"
    assert (tokens / "tokenizer" / "tokenizer.json").read_text() == (tmp_path / "tok" / "tokenizer.json").read_text()
    before = {f.name: f.stat().st_mtime_ns for f in tokens.iterdir() if f.is_file()}
    tiny = ["model=llama-tiny", "seq_len=16", "batch_size=2", "max_steps=3", "peak_flops=1e9", "samples=0",
            "logging.progress=false", "logging.eval_every=3"]
    assert main(["pretrain", f"data={tokens}", f"output_dir={tmp_path / 'pre'}", *tiny]) == 0
    summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val_tokens"] > 0  # curate's val split is the run's
    assert read_lineage(tmp_path / "pre")["pretrain_shards"] == str(tokens.resolve())
    assert not (tmp_path / "pre" / "data").exists() and not (tmp_path / "pre" / "tokenizer").exists()
    assert {f.name: f.stat().st_mtime_ns for f in tokens.iterdir() if f.is_file()} == before
    assert (tmp_path / "pre" / "tokenizer.json").read_text() == (tmp_path / "tok" / "tokenizer.json").read_text()
    capsys.readouterr()

    train_tokenizer(["other words entirely, " * 20], vocab_size=280, min_frequency=1).save(tmp_path / "other")
    assert main(["pretrain", f"data={tokens}", f"output_dir={tmp_path / 'pre2'}", f"tokenizer={tmp_path / 'other'}",
                 *tiny]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is not the one given" in err[0], err
    shutil.rmtree(tokens / "tokenizer")
    assert main(["pretrain", f"data={tokens}", f"output_dir={tmp_path / 'pre3'}", *tiny]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "without their tokenizer" in err[0] and "tokenizer=DIR" in err[0], err


def test_report_histograms_are_svg_images(tmp_path):
    import xml.etree.ElementTree as ET

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": PROSE}, {"text": PROSE}, {"text": "short one"},
                                               {"text": PROSE + " And more."}])
    out = tmp_path / "out"
    report = run(data, out, "gopher_quality.min_doc_words=5", "c4.enabled=false")
    assert report["plots"] == ["plots/words.svg", "plots/rules.svg", "plots/clusters.svg"]

    def bars(name: str) -> dict[tuple[str, str], float]:
        root = ET.parse(out / "plots" / name).getroot()
        return {(r.get("data-series"), r.get("data-label")): float(r.get("data-value"))
                for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("class") == "bar"}

    words = bars("words.svg")
    assert sum(v for (s, _), v in words.items() if s == "read") == report["input"]["documents"] == 4
    assert sum(v for (s, _), v in words.items() if s == "kept") == report["kept"]["documents"] == 1
    assert words[("read", "2-3")] == 1  # "short one": 2 words
    rules = bars("rules.svg")
    assert rules[("removed", "exact_dedup")] == 1 and rules[("removed", "near_dedup")] == 1
    assert rules[("removed", "input")] == 0 and ("removed", "c4") not in rules  # c4 off: no bar
    assert bars("clusters.svg")[("near (MinHash)", "2")] == 1
    assert "plots/words.svg" in (out / "summary.txt").read_text()


def test_gopher_repetition_blank_lines_are_not_duplicate_lines():
    # five distinct paragraphs: as datatrove splits lines on "\n+", the four blank lines between them
    # are not three duplicated (empty) lines out of nine (0.33 > dup_line_frac 0.3)
    text = "\n\n".join(PROSE.split(". "))
    assert filters.gopher_repetition(text, filters.GopherRepetitionConfig()) is None
    assert filters.gopher_repetition(text + "\n\n" + text, filters.GopherRepetitionConfig()) == "gopher_dup_para_frac"


def test_gopher_quality_counts_words_as_datatrove_does():
    cfg = filters.GopherQualityConfig()
    # punctuation tokens are words of the letter ratio (datatrove counts every token it splits off)
    listy = " , ".join(PROSE.replace(",", "").replace(".", "").split()) + " and the end."
    assert filters.gopher_quality(listy, cfg) == "gopher_below_alpha_threshold"
    assert filters.gopher_quality(PROSE, cfg) is None
    # stop words: at least two distinct ones, not two occurrences of one
    one_stop_word = " ".join(["the river runs past green fields"] * 12)
    assert filters.gopher_quality(one_stop_word, cfg) == "gopher_not_enough_stop_words"


def test_bench_curate_generates_planted_copies_that_temper_removes(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_curate.py"
    spec = importlib.util.spec_from_file_location("bench_curate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    source = tmp_path / "wiki.txt"
    rng, vocab = np.random.default_rng(0), PROSE.replace(".", "").replace(",", "").split()
    source.write_text("\n".join(f" {' '.join(rng.choice(vocab, 40))} . Paragraph {i} , number {i * 13} ."
                                 for i in range(60)), encoding="utf-8")
    docs = bench.generate(tmp_path / "corpus.jsonl", 0.1, source)
    rows = jsonl(tmp_path / "corpus.jsonl")
    assert len(rows) == docs and len({r["text"] for r in rows}) < docs  # exact copies planted
    assert "Paragraph 3, number 39." in (tmp_path / "corpus.jsonl").read_text()  # punctuation joined back
    result = bench.run_temper(tmp_path / "corpus.jsonl", tmp_path / "out")
    assert result["removed"].get("near_dedup", 0) > 0 and result["cpu_s"] > 0  # copies whose source passed the filters


def test_signature_rows_read_from_disk_equal_the_array(tmp_path, monkeypatch):
    """The staged signatures live in a file; the banding reads columns and row ranges of it (with the
    boilerplate documents left out) in chunks: the same values as slicing the array in memory."""
    from temper.curate.pipeline import SignatureRows, lsh_buckets

    monkeypatch.setattr(SignatureRows, "CHUNK", 7)  # several chunks, and chunks holding no kept row
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 1 << 63, size=(50, 12), dtype=np.uint64)
    sig[30] = sig[3]
    path = tmp_path / "sig.bin"
    path.write_bytes(sig.tobytes())
    keep = np.array([0, 1, 3, 4, 5, 20, 21, 30, 31, 49])
    for rows, expected in ((SignatureRows(path, 50, 12), sig), (SignatureRows(path, 50, 12, keep), sig[keep])):
        assert len(rows) == len(expected)
        for key in (np.s_[:, 4:8], np.s_[:, 0:12], np.s_[2:9], np.s_[0:0], np.s_[len(expected) - 1:]):
            np.testing.assert_array_equal(rows[key], expected[key])
        assert [m.tolist() for m in lsh_buckets(rows, 3, 4)] == [m.tolist() for m in lsh_buckets(expected, 3, 4)]
    assert [m.tolist() for m in lsh_buckets(SignatureRows(path, 50, 12, keep), 3, 4)] == [[2, 7]] * 3
