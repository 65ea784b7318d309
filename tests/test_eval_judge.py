"""Contamination checks, pairwise judging (LLM and rule) and the lm-eval adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, approx_reordered, decoder_lengths, reorder_tol

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


def _fresh_python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` (argv: `args`) in a new interpreter: what lm-eval's registry holds depends on
    what the process imported first. One thread: the tiny models gain nothing from more."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **env})


# One script, the adapter imported before lm-eval has looked up any model, then lm-eval's own
# `simple_evaluate` by registry name with `hf` and with `temper`, offline (a fresh interpreter: the
# registry's state, and HF_*_OFFLINE, are read once per process). It writes what it found as JSON.
SIMPLE_EVALUATE_BOTH = """
import json, sys
import temper.eval.lm_eval_adapter  # noqa: F401
import lm_eval
from lm_eval.tasks import TaskManager

model_dir, task_dir, out = sys.argv[1:4]
found = {}
for name, extra in (("hf", "dtype=float32,batch_size=4"), ("temper", "batch_size=3")):
    res = lm_eval.simple_evaluate(
        model=name, model_args=f"pretrained={model_dir},max_length=16,{extra}", device="cpu",
        tasks=["tiny_rolling", "tiny_mc"], bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=task_dir, include_defaults=False))
    samples = {task: [s["resps"] for s in sorted(rows, key=lambda s: s["doc_id"])]
               for task, rows in res["samples"].items()}
    found[name] = {"results": res["results"], "samples": samples}
with open(out, "w") as f:
    json.dump(found, f)
"""

ROLLING_TEXTS = ["Alice lives in Paris. Alice has a cat named Tom. Bob lives in Rome; his dog is Rex.",
                 "The sum of 3 and 4 is 7. The sum of 10 and 5 is 15. Twelve minus two is ten.",
                 "Hello, world! Ünïcödé and émojis 😀 must survive. Tabs\tand  spaces too.",
                 "Hello, world!"]
MC_ROWS = [{"question": "Alice lives in", "choices": ["Paris", "Rome", "Tom"], "label": 0},
           {"question": "Bob lives in ", "choices": ["Paris", "Rome"], "label": 1},  # its space moves
           {"question": "The sum of 3 and 4 is", "choices": ["7", "15", "ten"], "label": 0},
           {"question": "", "choices": ["Hello, world!", "Tabs and spaces"], "label": 0},  # BOS/EOS alone
           {"question": "Alice has a cat named", "choices": ["Tom", "Rex"], "label": 0}]


def _local_task(task_dir, data_dir, name: str, rows: list[dict], body: str) -> None:
    data = data_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}")


def test_simple_evaluate_hf_and_temper_give_the_same_numbers(tiny_model_dir, tiny_tokenizer, tmp_path):
    """lm-eval's `hf` (transformers) and `temper` on one model directory, both by registry name in
    one script: the same per-request log-likelihoods, word/byte perplexity, bits per byte, acc and
    acc_norm. Windows of 16 tokens, so the rolling task needs several and a partial last one."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask

    from temper.models import load_model

    task_dir, size = tmp_path / "tasks", 16
    task_dir.mkdir()
    _local_task(task_dir, tmp_path, "tiny_rolling", [{"text": t} for t in ROLLING_TEXTS],
                "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                "  - metric: bits_per_byte\n")
    _local_task(task_dir, tmp_path, "tiny_mc", MC_ROWS,
                "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                "doc_to_target: label\ntarget_delimiter: ' '\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    out = tmp_path / "found.json"
    run = _fresh_python(SIMPLE_EVALUATE_BOTH, str(tiny_model_dir), str(task_dir), str(out),
                        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(out.read_text())
    hf, ours = found["hf"], found["temper"]

    # Tolerance: both sides compute the same fp32 log-probs (transformers' kernels, batches of 4,
    # vs temper's, batches of 3: another summation order). A request's total goes through the
    # decoder's chain of reductions with at most `size` keys, then a sum over its target tokens:
    # `reorder_tol` (conftest) of that chain, ~2e-5 relative (5e-4 on a total of -27); a token
    # scored differently moves a total by a whole log-prob, nats here (5.5 when the context's
    # trailing space was not moved onto the continuation).
    chain = decoder_lengths(load_model(tiny_model_dir), size)

    def tol(value: float, n_targets: int) -> float:
        return reorder_tol(abs(value), *chain, n_targets)

    # rolling log-likelihood: every document's total, then the three aggregates
    n_tokens = [len(tiny_tokenizer.encode(t)) for t in ROLLING_TEXTS]
    assert max(n_tokens) > 3 * size and min(n_tokens) < size  # several windows, and one window
    lls_hf = [r[0][0] for r in hf["samples"]["tiny_rolling"]]
    lls_ours = [r[0][0] for r in ours["samples"]["tiny_rolling"]]
    tols = [tol(ll, n) for ll, n in zip(lls_hf, n_tokens)]
    assert len(lls_ours) == len(lls_hf) == len(ROLLING_TEXTS)
    for got, expected, t in zip(lls_ours, lls_hf, tols):
        assert got == pytest.approx(expected, rel=0, abs=t)
    # word_perplexity = exp(-LL / words), byte_perplexity = exp(-LL / bytes), bits_per_byte =
    # -LL / (bytes ln 2) over the task's totals: an error of at most T in LL moves them by at
    # most a factor expm1(T / words), expm1(T / bytes), and T / (bytes ln 2) in absolute terms.
    total, T = sum(lls_hf), sum(tols)
    words = sum(ConfigurableTask.count_words(t) for t in ROLLING_TEXTS)
    n_bytes = sum(ConfigurableTask.count_bytes(t) for t in ROLLING_TEXTS)
    r_hf, r_ours = hf["results"]["tiny_rolling"], ours["results"]["tiny_rolling"]
    # (the derivation's words and bytes are the ones lm-eval divided by)
    assert r_hf["bits_per_byte,none"] == pytest.approx(-total / (n_bytes * math.log(2)), rel=1e-12)
    assert r_hf["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-12)
    metric_tol = {"word_perplexity,none": dict(rel=math.expm1(T / words)),
                  "byte_perplexity,none": dict(rel=math.expm1(T / n_bytes)),
                  "bits_per_byte,none": dict(abs=T / (n_bytes * math.log(2)))}
    for key, bound in metric_tol.items():
        assert r_ours[key] == pytest.approx(r_hf[key], **bound), key

    # multiple choice: every choice's log-likelihood, then acc and acc_norm exactly; the best
    # choice of each question beats the others (raw and per character) by more than both sides'
    # tolerances, so no argmax can flip within them and equal accuracies are what correct code gives
    mc_hf, mc_ours = hf["samples"]["tiny_mc"], ours["samples"]["tiny_mc"]
    assert len(mc_ours) == len(mc_hf) == len(MC_ROWS)
    for row, choices_hf, choices_ours in zip(MC_ROWS, mc_hf, mc_ours):
        lls = [c[0][0] for c in choices_hf]
        t = [tol(ll, size) for ll in lls]  # a continuation has at most `size` targets
        assert [c[0][0] for c in choices_ours] == pytest.approx(lls, rel=0, abs=max(t))
        for scores, margin in ((lls, t), ([ll / len(c) for ll, c in zip(lls, row["choices"])],
                                          [x / len(c) for x, c in zip(t, row["choices"])])):
            best = max(range(len(scores)), key=scores.__getitem__)
            assert all(scores[best] - s > margin[best] + margin[i]
                       for i, s in enumerate(scores) if i != best), (row, scores)
    r_hf, r_ours = hf["results"]["tiny_mc"], ours["results"]["tiny_mc"]
    assert (r_ours["acc,none"], r_ours["acc_norm,none"]) == (r_hf["acc,none"], r_hf["acc_norm,none"])
    rolled_hf, rolled_ours = hf["results"]["tiny_rolling"], ours["results"]["tiny_rolling"]
    print(f"\nlm-eval hf | temper: bits/byte {rolled_hf['bits_per_byte,none']:.9f} | "
          f"{rolled_ours['bits_per_byte,none']:.9f}, acc {r_hf['acc,none']} | {r_ours['acc,none']}, "
          f"acc_norm {r_hf['acc_norm,none']} | {r_ours['acc_norm,none']}")


ADAPTER = "import temper.eval.lm_eval_adapter as adapter\n"
LOOKUP = "from lm_eval.api.registry import get_model\nhf, temper = get_model('hf'), get_model('temper')\n"
BUILTIN_FIRST = "from lm_eval.api.registry import get_model\nget_model('dummy')\n"


@pytest.mark.parametrize("order", ["adapter first", "lm-eval first"])
def test_lm_eval_builtin_models_and_temper_resolve_whatever_the_import_order(order):
    """lm-eval fills its model registry with its own models on the first lookup of an EMPTY
    registry; registering "temper" into it before that must not keep `hf` and the rest out."""
    pytest.importorskip("lm_eval")
    code = ADAPTER + LOOKUP if order == "adapter first" else BUILTIN_FIRST + ADAPTER + LOOKUP
    run = _fresh_python(code + (  # HFLM imported only now, after the lookups
        "from lm_eval.models.huggingface import HFLM\n"
        "assert hf is HFLM and temper is adapter.TemperLM, (hf, temper)\n"
        "print('ok')\n"))
    assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stderr[-3000:]
