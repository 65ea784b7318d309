"""Contamination checks, pairwise judging (LLM and rule) and the lm-eval adapter."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import approx_reordered, decoder_lengths

from temper.eval import judge as judge_mod
from temper.eval.contamination import build_index, contamination_report, ngrams, words
from temper.eval.judge import pairwise, rule_judge, rule_pairwise, wilson_interval
from temper.eval.lm_eval_adapter import TemperLM

# ----------------------------------------------------------------------------- contamination

TRAIN = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from his old red barn today.",
    "Completely unrelated text about rivers, towns and the people who live along their banks in spring.",
]


def test_ngrams_words():
    assert words("Hello, World! it's 3pm") == ["hello", "world", "it", "s", "3pm"]
    assert ngrams("a b c d", n=3) == [("a", "b", "c"), ("b", "c", "d")]
    assert ngrams("a b", n=3) == []
    index = build_index(iter(TRAIN), n=13)
    assert len(index) == sum(len(ngrams(t, 13)) for t in TRAIN)


def test_contamination_planted_clean_case_and_short():
    planted = "Question: " + TRAIN[0] + " Answer: yes"
    clean = "An entirely fresh sentence that shares nothing at all with the training corpus in any long run."
    shouty = TRAIN[1].upper().replace(",", " ;").replace(" ", "  ")  # case, punctuation, spacing differ
    short_hit = "the lazy dog while the farmer watches from"  # 8 words, inside TRAIN[0]
    short_miss = "the lazy cat while the farmer watches from"
    tiny = "too short"
    report = contamination_report(iter(TRAIN), {"eval": [planted, clean, shouty, short_hit, short_miss, tiny]})
    r = report["eval"]
    assert r["rows"] == 6 and r["skipped_short"] == 1 and r["checked"] == 5
    assert r["contaminated"] == 3
    assert r["fraction"] == pytest.approx(3 / 5)
    hit_rows = [e["index"] for e in r["examples"]]
    assert hit_rows == [0, 2, 3]
    assert r["examples"][0]["ngram"].startswith("the quick brown fox")
    assert r["examples"][2]["ngram"] == short_hit
    # a plain list is one set named "eval"
    assert contamination_report(TRAIN, [clean])["eval"]["contaminated"] == 0


def test_contamination_on_world(tmp_path):
    from temper.data.readers import iter_records
    from temper.data.world import WorldConfig, build_world, write_world

    cfg = WorldConfig(num_people=12, num_towns=4, docs_per_person=8, num_arithmetic_docs=40,
                      num_dialogue_docs=40, num_sft_train=40, num_sft_test=40, num_pref_train=4,
                      num_pref_test=4, num_rl_train=4, num_rl_test=4)
    paths = write_world(build_world(cfg), tmp_path)
    rows = [r.data["messages"] for r in iter_records(paths["sft/test"])]
    questions = [next(m["content"] for m in msgs if m["role"] == "user") for msgs in rows]
    conversations = [" ".join(m["content"] for m in msgs) for msgs in rows]
    train_docs = [r.data["text"] for r in iter_records(paths["pretrain/train"])]
    val_docs = [r.data["text"] for r in iter_records(paths["pretrain/val"])]
    report = contamination_report(paths["pretrain/train"], {"sft/test": questions,
                                                            "sft/test (q+a)": conversations,
                                                            "pretrain/val": val_docs,
                                                            "planted": train_docs[:3]})
    for name, r in report.items():
        print(f"\nworld {name} vs pretrain/train (n=13): {r['contaminated']}/{r['checked']} = "
              f"{r['fraction']:.3f} ({r['skipped_short']} short rows skipped)")
        assert math.isfinite(r["fraction"]) and 0.0 <= r["fraction"] <= 1.0
    assert report["planted"]["contaminated"] == 3  # training documents are found
    r = report["sft/test"]
    assert r["rows"] == len(questions) > 0


# ----------------------------------------------------------------------------- judge


def test_position_biased_judge_gives_all_ties(monkeypatch):
    monkeypatch.setattr(judge_mod, "score_pair", lambda m, t, q, a, b, **k: (0.0, -1.0))  # always "A"
    model = torch.nn.Linear(1, 1)
    report = pairwise(model, None, ["q1", "q2", "q3"], ["x", "yy", "z"], ["longer", "y", "zzz"])
    assert report["ties"] == 3 and report["wins_1"] == report["wins_2"] == 0
    assert report["win_rate_1"] == 0.5
    assert all(v["winner"] == "tie" and v["order_12"] == "A" and v["order_21"] == "A" for v in report["verdicts"])


def test_length_judge_gives_consistent_wins(monkeypatch):
    monkeypatch.setattr(judge_mod, "score_pair", lambda m, t, q, a, b, **k: (float(len(a)), float(len(b))))
    model = torch.nn.Linear(1, 1)
    report = pairwise(model, None, ["q"] * 4, ["long answer", "a", "much longer one", "same"],
                      ["short", "bbbb", "x", "same"])
    assert [v["winner"] for v in report["verdicts"]] == ["1", "2", "1", "tie"]
    assert (report["wins_1"], report["wins_2"], report["ties"]) == (2, 1, 1)
    assert report["win_rate_1"] == pytest.approx(2.5 / 4)
    low, high = report["ci_95"]
    assert low <= report["win_rate_1"] <= high


def test_wilson_interval_contains_estimate_and_narrows():
    widths = []
    for n in (10, 100, 1000):
        for frac in (0.0, 0.3, 0.5, 0.95, 1.0):
            low, high = wilson_interval(frac * n, n)
            assert 0.0 <= low <= frac <= high <= 1.0
        low, high = wilson_interval(0.6 * n, n)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    low, high = wilson_interval(50, 100)  # the textbook value for 50/100
    assert low == pytest.approx(0.4038, abs=5e-5) and high == pytest.approx(0.5962, abs=5e-5)  # its 4 decimals


def test_rule_judge_and_pairwise():
    assert rule_judge("The answer is Paris.", "paris")
    assert rule_judge("paris", "Paris")
    assert not rule_judge("Lyon", "Paris")
    report = rule_pairwise(["7", "Rome", "blue"], ["It is 7.", "Paris", "blue"], ["8", "rome!", "Blue"])
    assert [v["winner"] for v in report["verdicts"]] == ["1", "2", "tie"]
    assert report["n"] == 3 and report["ci_method"] == "wilson"


def test_tiny_model_as_judge(tiny_model_dir):
    from temper.loading import load_for_inference

    model, tokenizer = load_for_inference(tiny_model_dir)
    lp_a, lp_b = judge_mod.score_pair(model, tokenizer, "Where does Alice live?", "Paris", "Rome")
    assert lp_a < 0 and lp_b < 0
    report = pairwise(model, tokenizer, ["Where does Alice live?", "What is 3 plus 4?"],
                      ["Alice lives in Paris.", "7"], ["Rome", "The sum is 12."])
    assert report["n"] == 2 and report["wins_1"] + report["wins_2"] + report["ties"] == 2
    assert 0.0 <= report["ci_95"][0] <= report["win_rate_1"] <= report["ci_95"][1] <= 1.0
    assert all(v["order_12"] in ("A", "B", None) for v in report["verdicts"])


# ----------------------------------------------------------------------------- lm-eval adapter


@pytest.fixture(scope="module")
def temper_lm(tiny_model_dir):
    return TemperLM(pretrained=str(tiny_model_dir), batch_size=2)


def _req(*args):
    return SimpleNamespace(args=args)


@torch.no_grad()
def test_loglikelihood_matches_direct(temper_lm):
    model, tok = temper_lm.model, temper_lm.tokenizer
    pairs = [("Alice lives in", " Paris."), ("The sum of 3 and 4 is", " 7"), ("", "Hello, world!")]
    results = temper_lm.loglikelihood([_req(c, x) for c, x in pairs])
    for (context, cont), (lp, greedy) in zip(pairs, results):
        ctx = tok.encode(context) or [temper_lm.prefix_id]
        whole = tok.encode(context + cont) if context else [temper_lm.prefix_id, *tok.encode(cont)]
        n = len(whole) - len(ctx)
        logprobs = model(torch.tensor([whole])).float().log_softmax(-1)[0]
        expected = sum(logprobs[i - 1, whole[i]].item() for i in range(len(whole) - n, len(whole)))
        # a padded batch of 2 vs the sequence alone: the same sums in another order, then n summed
        assert lp == approx_reordered(expected, decoder_lengths(model, len(whole)) + (n,))
        assert lp < 0 and isinstance(greedy, bool)


@torch.no_grad()
def test_loglikelihood_rolling_is_full_nll(temper_lm):
    model, tok = temper_lm.model, temper_lm.tokenizer
    text = "Bob lives in Rome; his dog is Rex."
    (total,) = temper_lm.loglikelihood_rolling([_req(text)])
    ids = torch.tensor([[temper_lm.prefix_id, *tok.encode(text)]])
    nll = torch.nn.functional.cross_entropy(model(ids[:, :-1]).float()[0], ids[0, 1:], reduction="sum").item()
    assert total == approx_reordered(-nll, decoder_lengths(model, ids.shape[1]) + (ids.shape[1],))


def _logp_of_windows(model, windows) -> float:
    """Sum of log p(targets), each window's targets predicted by its inputs' last positions."""
    total = 0.0
    for inputs, targets in windows:
        logp = model(torch.tensor([inputs])).float().log_softmax(-1)[0, -len(targets):]
        total += logp.gather(-1, torch.tensor(targets)[:, None]).sum().item()
    return total


@torch.no_grad()
def test_loglikelihood_rolling_uses_lm_evals_windows(temper_lm):
    utils = pytest.importorskip("lm_eval.utils")
    model, tok = temper_lm.model, temper_lm.tokenizer
    text = "Bob lives in Rome; his dog is Rex. Alice has a cat named Tom."
    tokens, size = tok.encode(text), 5
    assert len(tokens) > 3 * size and len(tokens) % size  # several windows and a partial last one
    short = TemperLM(model=model, tokenizer=tok, max_length=size, batch_size=3)
    (windowed,) = short.loglikelihood_rolling([_req(text)])
    windows = [((ctx + cont)[:-1], cont) for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
        tokens, temper_lm.prefix_id, max_seq_len=size, context_len=1))]
    assert windowed == approx_reordered(_logp_of_windows(model, windows), decoder_lengths(model, size) + (len(tokens),))
    # the last partial window sees a full window of context: cutting it to its own tokens changes the total
    full = [temper_lm.prefix_id, *tokens]
    starts = range(0, len(tokens), size)
    cut = [(full[s:s + size][:len(full[s + 1:s + 1 + size])], full[s + 1:s + 1 + size]) for s in starts]
    assert windows[:-1] == cut[:-1] and len(windows[-1][0]) == size > len(cut[-1][0])
    assert windowed != pytest.approx(_logp_of_windows(model, cut), abs=1e-3)


def test_loglikelihood_rolling_equals_hflm(tiny_model_dir):
    """The same weights through transformers and lm-eval's own HFLM give the same totals."""
    transformers = pytest.importorskip("transformers")
    hf_lm = pytest.importorskip("lm_eval.models.huggingface")
    size = 16
    hf = hf_lm.HFLM(pretrained=transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                    tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_model_dir), backend="causal",
                    max_length=size, device="cpu", batch_size=4)
    ours = TemperLM(pretrained=str(tiny_model_dir), max_length=size, batch_size=3)
    texts = ["Alice lives in Paris. Alice has a cat named Tom. Bob lives in Rome; his dog is Rex. "
             "Hello, world! Ünïcödé and émojis 😀 must survive.", "Hello, world!"]
    n_tokens = [len(ours.tokenizer.encode(t)) for t in texts]
    assert n_tokens[0] > 3 * size and n_tokens[0] % size and n_tokens[1] < size
    assert hf.prefix_token_id == ours.prefix_id
    expected = hf.loglikelihood_rolling([_req(t) for t in texts], disable_tqdm=True)
    got = ours.loglikelihood_rolling([_req(t) for t in texts])
    # transformers' kernels and batches of 4 vs temper's and batches of 3: another order
    assert got == approx_reordered(expected, decoder_lengths(ours.model, size) + (max(n_tokens),))


def test_generate_until_stops(temper_lm):
    from temper.models.generate import SamplingConfig, generate_text

    model, tok = temper_lm.model, temper_lm.tokenizer
    prompt = "Alice lives in"
    free = generate_text(model, tok, [prompt], SamplingConfig(max_new_tokens=12))[0]
    assert len(free) > 1
    stop = free[1:3] if free[1:3].strip() else free[1]
    out = temper_lm.generate_until([_req(prompt, {"until": [stop], "max_gen_toks": 12}),
                                    _req(prompt, {"until": "\u2603", "max_gen_toks": 12})])
    assert out[0] == free[:free.find(stop)] and stop not in out[0]
    assert out[1] == free


def test_lm_eval_simple_evaluate(tiny_model_dir, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    rows = [{"question": "Alice lives in", "choices": ["Paris", "Rome"], "label": 0},
            {"question": "Bob lives in", "choices": ["Paris", "Rome"], "label": 1},
            {"question": "The sum of 3 and 4 is", "choices": ["7", "15"], "label": 0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "temper_tiny.yaml").write_text(
        "task: temper_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "target_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n"
    )
    lm = TemperLM(pretrained=str(tiny_model_dir), batch_size=4)
    results = lm_eval.simple_evaluate(model=lm, tasks=["temper_tiny"],
                                      task_manager=TaskManager(include_path=str(task_dir)))
    from lm_eval.api.registry import get_model

    assert get_model("temper") is TemperLM
    acc = results["results"]["temper_tiny"]["acc,none"]
    print(f"\nlm-eval temper_tiny acc: {acc}")
    assert 0.0 <= acc <= 1.0
