"""Sliding-window perplexity against the transformers reference loop; text metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from temper.errors import TemperError
from temper.eval.metrics import (
    FINAL_NUMBER_PATTERN,
    GSM8K_PATTERN,
    bleu,
    chrf,
    exact_match,
    extract_answer,
    rouge,
    token_f1,
)
from temper.eval.sliding import sliding_window_nll, sliding_window_perplexity
from tests.conftest import SAMPLE_TEXT, shared_file


def hf_reference_nll(hf_model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's perplexity guide (labels=-100 masking, trg_len = end - prev_end)."""
    seq = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + window, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())
        nll += float(loss) * valid
        count += valid
        prev_end = end
        if end == seq.size(1):
            break
    return nll, count


@pytest.mark.parametrize("window,stride", [(16, 8), (16, 16), (16, 5)])
def test_sliding_nll_matches_transformers(hf_model_dir, window, stride):
    from temper.models import load_model

    path, hf_model = hf_model_dir("llama")
    model = load_model(path)
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    nll, n = sliding_window_nll(model, ids, window, stride, batch_size=3)
    ref_nll, ref_n = hf_reference_nll(hf_model, ids, window, stride)
    assert n == ref_n
    assert nll == pytest.approx(ref_nll, rel=1e-4)
    if stride < window:
        assert n == len(ids) - 1  # every token but the first is scored once
    else:
        assert n == len(ids) - math.ceil(len(ids) / window)


def test_sliding_full_window_equals_one_pass(hf_model_dir):
    from temper.models import load_model

    path, _ = hf_model_dir("llama")
    model = load_model(path)
    ids = list(range(3, 43))
    nll, n = sliding_window_nll(model, ids, 64, 64)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    ref = torch.nn.functional.cross_entropy(logits[0, :-1].float(), torch.tensor(ids[1:]), reduction="sum")
    assert n == len(ids) - 1 and nll == pytest.approx(float(ref), rel=1e-4)


def _check_result(r: dict, texts: list[str]) -> None:
    assert r["words"] == sum(len(t.split()) for t in texts)
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert all(math.isfinite(r[k]) for k in ("token_perplexity", "word_perplexity", "bits_per_byte", "nll"))
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / (r["bytes"] * math.log(2)))
    assert r["token_perplexity"] == pytest.approx(math.exp(r["nll"] / r["tokens"]))
    assert r["word_perplexity"] == pytest.approx(math.exp(r["nll"] / r["words"]))


def test_sliding_perplexity_end_to_end(tiny_model_dir, tiny_tokenizer):
    from temper.models import load_model

    model = load_model(tiny_model_dir)
    texts = [p for p in SAMPLE_TEXT.split("\n\n")[:3]]
    r = sliding_window_perplexity(model, tiny_tokenizer, texts, window=32, stride=16, batch_size=2)
    _check_result(r, texts)
    assert r["tokens"] == sum(len(tiny_tokenizer.encode(t)) - 1 for t in texts)
    # texts are scored separately and summed
    parts = [sliding_window_perplexity(model, tiny_tokenizer, [t], window=32, stride=16) for t in texts]
    assert r["nll"] == pytest.approx(sum(p["nll"] for p in parts), rel=1e-5)
    assert r["tokens"] == sum(p["tokens"] for p in parts)
    # a random model is near-uniform over the vocabulary
    assert r["token_perplexity"] < 5 * tiny_tokenizer.vocab_size


def test_sliding_perplexity_wikitext(tiny_model_dir, tiny_tokenizer):
    from temper.models import load_model

    text = shared_file("wikitext2", "valid.txt").read_text(encoding="utf-8")[:2000]
    model = load_model(tiny_model_dir)
    r = sliding_window_perplexity(model, tiny_tokenizer, [text], window=128, stride=64)
    _check_result(r, [text])
    assert r["tokens"] == len(tiny_tokenizer.encode(text)) - 1


def test_sliding_errors(tiny_model_dir, tiny_tokenizer):
    from temper.models import load_model

    model = load_model(tiny_model_dir)
    ctx = model.config.max_seq_len
    with pytest.raises(TemperError, match=rf"{ctx + 1}.*{ctx}"):
        sliding_window_perplexity(model, tiny_tokenizer, ["hello"], window=ctx + 1, stride=8)
    for stride in (0, 33):
        with pytest.raises(TemperError, match="stride"):
            sliding_window_perplexity(model, tiny_tokenizer, ["hello"], window=32, stride=stride)
    for texts in ([], [""]):
        with pytest.raises(TemperError, match="empty"):
            sliding_window_perplexity(model, tiny_tokenizer, texts, window=32, stride=16)
    with pytest.raises(TemperError):
        sliding_window_nll(model, [1, 2, 3], ctx + 1, 4)


# -- text metrics


def test_exact_match_and_f1_by_hand():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("a dog", "the cat") == 0.0
    # pred tokens: [cat, sat, on, mat]; ref: [cat, sat]; common 2 -> P=1/2, R=1 -> F1=2/3
    assert token_f1("The cat sat on the mat.", "cat sat") == pytest.approx(2 / 3)
    # pred [paris, france] vs ref [paris]: P=1/2, R=1 -> 2/3
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    # bag semantics: pred [x x y] vs ref [x y y]: common {x:1, y:1} = 2 -> P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("red", "blue") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to empty
    assert token_f1("the", "cat") == 0.0


def test_bleu_chrf_rouge():
    preds = ["the quick brown fox jumps over the lazy dog", "hello there general kenobi"]
    score, sig = bleu(preds, preds)
    assert score == pytest.approx(100.0) and "nrefs:1" in sig
    score, sig = chrf(preds, preds)
    assert score == pytest.approx(100.0) and "nrefs:1" in sig
    assert rouge(preds, preds) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge(["alpha beta gamma"], ["delta epsilon zeta"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert bleu(["alpha beta gamma delta"], ["epsilon zeta eta theta"])[0] == pytest.approx(0.0)
    # several references per prediction
    score, sig = bleu(preds, [[p, "something else"] for p in preds])
    assert score == pytest.approx(100.0) and "nrefs:2" in sig
    with pytest.raises(TemperError, match="2 predictions but 1"):
        bleu(preds, preds[:1])
    with pytest.raises(TemperError):
        rouge([], [])


def test_extract_answer():
    assert extract_answer("so 3+4=7.\n#### 1,234") == "1234"
    assert extract_answer("#### 5\nlater #### -12") == "-12"
    assert extract_answer("The answer is 42.") == "42"  # fallback: the final number
    assert extract_answer("The answer is 42.", fallback=False) is None
    assert extract_answer("no digits here") is None
    assert extract_answer("x = 1,000.5 then 3.", pattern=None) == "3"
    assert extract_answer("Answer: B", pattern=r"Answer:\s*([A-D])") == "B"
    assert extract_answer("costs 12.50", pattern=FINAL_NUMBER_PATTERN) == "12.50"
    with pytest.raises(TemperError, match="one group"):
        extract_answer("x", pattern=r"(a)(b)")


def test_extract_answer_gsm8k():
    rows = [json.loads(line) for line in shared_file("gsm8k", "test.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    assert len(rows) == 1319
    for row in rows:
        expected = row["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_answer(row["answer"], GSM8K_PATTERN) == expected, row["answer"]
        assert extract_answer(row["answer"].split("####")[0] + f" The answer is {expected}.", pattern=None) == expected
