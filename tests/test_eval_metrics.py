"""Rolling-window perplexity against lm-eval's windows and transformers; validation bits per
byte on hand-made tables; text metrics."""

from __future__ import annotations

import json
import math
import re

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
from temper.eval.perplexity import evaluate_batches
from temper.eval.sliding import (
    count_words,
    rolling_windows,
    sliding_window_nll,
    sliding_window_perplexity,
)
from tests.conftest import SAMPLE_TEXT, approx_reordered, decoder_lengths, reorder_tol, shared_file

PREFIX = 1  # the BOS of tests' tokenizers; any id works for the window arithmetic


class TableModel(torch.nn.Module):
    """A bigram model with hand-set probabilities: the logits after token a are log probs[a],
    so every NLL is known by hand, whatever the context or the window."""

    def __init__(self, probs: torch.Tensor) -> None:  # probs (V, V), rows sum to 1
        super().__init__()
        self.table = torch.nn.Embedding.from_pretrained(probs.log())
        self.lm_head = torch.nn.Linear(probs.shape[0], probs.shape[0], bias=False)
        self.lm_head.weight.data = torch.eye(probs.shape[0])

    def forward(self, inputs: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        return self.table(inputs)  # (B, T, V): hidden == logits through the identity head


def random_table(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)), -1)


def test_rolling_windows_are_lm_evals():
    utils = pytest.importorskip("lm_eval.utils")
    for n in range(0, 40):
        tokens = list(range(100, 100 + n))
        for window in range(1, 12):
            for stride in range(1, window + 1):
                ours = rolling_windows(tokens, PREFIX, window, stride)
                ref = [((ctx + cont)[:-1], cont) for ctx, cont in map(utils.make_disjoint_window,
                       utils.get_rolling_token_windows(tokens, PREFIX, window, window - stride + 1))]
                assert ours == ref, (n, window, stride)
                assert [t for _, tgt in ours for t in tgt] == tokens  # every token scored once
                assert all(len(inp) == window for inp, _ in ours[1:])  # a partial last window keeps full context


@pytest.mark.parametrize("window,stride", [(1, 1), (4, 4), (5, 2), (7, 1), (40, 40)])
def test_rolling_nll_scores_every_token_from_the_prefix(window, stride):
    probs = random_table(12)
    model = TableModel(probs)
    ids = torch.randint(0, 12, (23,), generator=torch.Generator().manual_seed(3)).tolist()
    nll, n = sliding_window_nll(model, ids, window, stride, prefix_id=PREFIX, batch_size=2)
    seq = [PREFIX, *ids]
    by_hand = -sum(math.log(probs[a, b]) for a, b in zip(seq[:-1], seq[1:]))
    # log p @ I over 12, a logsumexp over 12, a sum over the tokens, in fp32 vs float64 by hand
    assert n == len(ids) and nll == approx_reordered(by_hand, (12, 12, len(ids)))


def lm_eval_rolling_reference(hf_model, ids: list[int], prefix: int, window: int, stride: int) -> tuple[float, int]:
    """NLL by lm-eval's own windows, scored through transformers the way HFLM does."""
    utils = pytest.importorskip("lm_eval.utils")
    nll, count = 0.0, 0
    windows = utils.get_rolling_token_windows(ids, prefix, window, window - stride + 1)
    for ctx, cont in map(utils.make_disjoint_window, windows):
        with torch.no_grad():
            logp = hf_model(torch.tensor([(ctx + cont)[:-1]])).logits[0].float().log_softmax(-1)
        nll -= logp[-len(cont):].gather(-1, torch.tensor(cont)[:, None]).sum().item()
        count += len(cont)
    return nll, count


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (12, 1)])
def test_sliding_nll_matches_lm_eval_windows_in_transformers(hf_model_dir, window, stride):
    from temper.models import load_model

    path, hf_model = hf_model_dir("llama")
    model = load_model(path)
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(1)).tolist()  # 100 % 16: partial end
    nll, n = sliding_window_nll(model, ids, window, stride, prefix_id=PREFIX, batch_size=3)
    ref_nll, ref_n = lm_eval_rolling_reference(hf_model, ids, PREFIX, window, stride)
    assert n == ref_n == len(ids)
    # transformers' kernels, one window at a time vs batches of 3: the same sums in another order
    assert nll == approx_reordered(ref_nll, decoder_lengths(model, window) + (len(ids),))


@pytest.mark.parametrize("window", [40, 64])
def test_sliding_one_window_equals_one_pass_with_prefix(hf_model_dir, window):
    from temper.models import load_model

    path, hf_model = hf_model_dir("llama")
    model = load_model(path)
    ids = list(range(3, 43))
    nll, n = sliding_window_nll(model, ids, window, 8, prefix_id=PREFIX)
    seq = torch.tensor([[PREFIX, *ids]])
    with torch.no_grad():
        logits = hf_model(seq[:, :-1]).logits[0]
    ref = torch.nn.functional.cross_entropy(logits.float(), seq[0, 1:], reduction="sum")
    assert n == len(ids) and nll == approx_reordered(float(ref), decoder_lengths(model, window) + (len(ids),))


def _check_result(r: dict, texts: list[str]) -> None:
    assert r["words"] == sum(len(re.split(r"\s+", t)) for t in texts)
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert all(math.isfinite(r[k]) for k in ("token_perplexity", "word_perplexity", "bits_per_byte", "nll"))
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / (r["bytes"] * math.log(2)))
    assert r["token_perplexity"] == pytest.approx(math.exp(r["nll"] / r["tokens"]))
    assert r["word_perplexity"] == pytest.approx(math.exp(r["nll"] / r["words"]))


def test_sliding_metrics_cover_every_token_byte_and_word(tiny_model_dir, tiny_tokenizer):
    """The numerator (NLL of all tokens, the first after BOS) matches the denominators (all bytes, words)."""
    from temper.models import load_model

    model = load_model(tiny_model_dir)
    text = "  Ünïcödé and émojis 😀 must survive.\tTabs\n"
    r = sliding_window_perplexity(model, tiny_tokenizer, [text], window=64, stride=64)
    seq = torch.tensor([[tiny_tokenizer.bos_id, *tiny_tokenizer.encode(text)]])
    with torch.no_grad():
        ref = float(torch.nn.functional.cross_entropy(model(seq[:, :-1])[0].float(), seq[0, 1:], reduction="sum"))
    words = len(re.split(r"\s+", text))
    assert words == 9 and count_words(text) == words  # 7 words + the empty pieces lm-eval counts at both ends
    # the same sums in another order; the derived metrics divide it (bits per byte) or exponentiate
    # its share per word (exp(x + d) / exp(x) - 1 = expm1(d))
    nll_tol = reorder_tol(ref, *decoder_lengths(model, seq.shape[1]), seq.shape[1])
    assert r["tokens"] == seq.shape[1] - 1 and r["nll"] == pytest.approx(ref, rel=0, abs=nll_tol)
    assert r["bits_per_byte"] == pytest.approx(ref / (len(text.encode()) * math.log(2)), rel=0,
                                               abs=nll_tol / (len(text.encode()) * math.log(2)))
    assert r["word_perplexity"] == pytest.approx(math.exp(ref / words), rel=math.expm1(nll_tol / words))
    _check_result(r, [text])


def test_count_words_is_lm_evals():
    task = pytest.importorskip("lm_eval.api.task")
    for text in ["a b", "  Ünïcödé and\n\némojis 😀\t", "one", "x\n"]:
        assert count_words(text) == task.ConfigurableTask.count_words(text)


def test_sliding_perplexity_end_to_end(tiny_model_dir, tiny_tokenizer):
    from temper.models import load_model

    model = load_model(tiny_model_dir)
    texts = [p for p in SAMPLE_TEXT.split("\n\n")[:3]]
    r = sliding_window_perplexity(model, tiny_tokenizer, texts, window=32, stride=16, batch_size=2)
    _check_result(r, texts)
    assert r["tokens"] == sum(len(tiny_tokenizer.encode(t)) for t in texts)
    # texts are scored separately (each from its own BOS) and summed
    parts = [sliding_window_perplexity(model, tiny_tokenizer, [t], window=32, stride=16) for t in texts]
    # batches of 2 windows vs 1: the same sums in another order
    assert r["nll"] == approx_reordered(sum(p["nll"] for p in parts), decoder_lengths(model, 32) + (r["tokens"],))
    assert r["tokens"] == sum(p["tokens"] for p in parts)
    # a random model is near-uniform over the vocabulary
    assert r["token_perplexity"] < 5 * tiny_tokenizer.vocab_size


def test_sliding_perplexity_wikitext(tiny_model_dir, tiny_tokenizer):
    from temper.models import load_model

    text = shared_file("wikitext2", "valid.txt").read_text(encoding="utf-8")[:2000]
    model = load_model(tiny_model_dir)
    r = sliding_window_perplexity(model, tiny_tokenizer, [text], window=128, stride=64)
    _check_result(r, [text])
    assert r["tokens"] == len(tiny_tokenizer.encode(text))


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
        sliding_window_nll(model, [1, 2, 3], ctx + 1, 4, prefix_id=PREFIX)


# -- validation loss and bits per byte (pretraining)


def test_evaluate_batches_bits_per_byte_leaves_eos_out():
    """Hand-made: token 0 is EOS (0 bytes), tokens 1-3 stand for 1, 2 and 3 bytes."""
    probs = torch.full((4, 4), 1 / 3)
    # the four scored transitions cost 1, 4 (EOS), 2 and 3 bits
    probs[1] = torch.tensor([1 / 6, 1 / 6, 1 / 2, 1 / 6])
    probs[2] = torch.tensor([1 / 16, 5 / 16, 5 / 16, 5 / 16])
    probs[0] = torch.tensor([1 / 4, 1 / 4, 1 / 4, 1 / 4])
    probs[3] = torch.tensor([7 / 24, 1 / 8, 7 / 24, 7 / 24])
    model = TableModel(probs)
    token_bytes = torch.tensor([0, 1, 2, 3])
    inputs = torch.tensor([[1, 2, 0, 3, 3]])
    targets = torch.tensor([[2, 0, 3, 1, -100]])  # the last position is not scored
    batches = [(inputs, targets), (inputs, torch.full_like(targets, 1))]  # the second is cut by max_batches
    out = evaluate_batches(model, batches, device=torch.device("cpu"), token_bytes=token_bytes, max_batches=1)
    ln2 = math.log(2)
    assert out["val_tokens"] == 4
    assert out["val_loss"] == pytest.approx((1 + 4 + 2 + 3) * ln2 / 4)  # EOS counts in the loss
    assert out["val_ppl"] == pytest.approx(2 ** 2.5)
    assert out["val_bpb"] == pytest.approx((1 + 2 + 3) / (2 + 3 + 1))  # ...not in bits per byte
    no_bytes = evaluate_batches(model, batches[:1], device=torch.device("cpu"))
    assert "val_bpb" not in no_bytes and no_bytes["val_loss"] == pytest.approx(out["val_loss"])



def test_evaluate_batches_counts_a_documents_first_token_without_the_dummy_prefix():
    """A SentencePiece-style tokenizer puts a space in front of every document: its first token
    (the target after EOS) stands for one byte less than mid-text. Its NLL still counts (a text
    token), and a dummy space alone (0 bytes at the start) is not taken for a special token."""
    probs = torch.full((4, 4), 1 / 4)
    model = TableModel(probs)  # every transition costs 2 bits
    token_bytes, start_token_bytes = torch.tensor([0, 1, 3, 4]), torch.tensor([0, 0, 3, 3])
    inputs = torch.tensor([[2, 0, 3, 2, 0]])
    targets = torch.tensor([[0, 3, 2, 0, 1]])  # EOS, a document's "▁word" (3 bytes there), 3, EOS, a lone "▁"
    out = evaluate_batches(model, [(inputs, targets)], device=torch.device("cpu"), token_bytes=token_bytes,
                           start_token_bytes=start_token_bytes, eos_id=0)
    assert out["val_bpb"] == pytest.approx(3 * 2 / (3 + 3 + 0))
    mid_only = evaluate_batches(model, [(inputs, targets)], device=torch.device("cpu"), token_bytes=token_bytes)
    assert mid_only["val_bpb"] == pytest.approx(3 * 2 / (4 + 3 + 1))


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
