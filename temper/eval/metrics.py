"""Reference-based text metrics: exact match, token F1, BLEU, chrF, ROUGE, answer extraction.

EM and F1 follow SQuAD (normalised text; F1 over the bag of normalised tokens). BLEU and
chrF are sacrebleu's corpus scores, returned with the metric's signature string so that
numbers can be compared across papers. ROUGE is Google's `rouge_score` with the Porter
stemmer, F-measures averaged over the examples. sacrebleu and rouge-score are optional
and imported only when used.
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Sequence

from temper.errors import TemperError
from temper.eval.generation import normalize

__all__ = ["normalize", "exact_match", "token_f1", "bleu", "chrf", "rouge", "extract_answer",
           "GSM8K_PATTERN", "FINAL_NUMBER_PATTERN"]

GSM8K_PATTERN = r"####\s*(-?[\d,\.]+)"
FINAL_NUMBER_PATTERN = r"(-?\d[\d,]*(?:\.\d+)?)"

_INSTALL = "pip install sacrebleu rouge-score"


def _require(module: str):
    """An optional package (sacrebleu, rouge_score), imported when a metric that needs it is asked for."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TemperError(f"this metric needs the {module.split('.')[0]} package: {_INSTALL}") from None


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference, else 0.0."""
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD F1 between the bags of normalised tokens (1.0 when both are empty)."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def _pairs(preds: Sequence[str], refs: Sequence) -> tuple[list[str], list[list[str]]]:
    """Check the lengths; refs may hold one string or a list of strings per prediction."""
    if isinstance(preds, str) or isinstance(refs, str):
        raise TemperError("predictions and references must be lists of strings, not one string")
    preds, refs = list(preds), list(refs)
    if not preds:
        raise TemperError("no predictions to score")
    if len(preds) != len(refs):
        raise TemperError(f"{len(preds)} predictions but {len(refs)} references")
    refs = [[r] if isinstance(r, str) else list(r) for r in refs]
    return preds, refs


def _ref_streams(refs: list[list[str]]) -> list[list[str]]:
    n = {len(r) for r in refs}
    if len(n) != 1 or 0 in n:
        raise TemperError("every prediction needs the same number (>= 1) of references for BLEU/chrF")
    return [list(s) for s in zip(*refs)]


def _sacrebleu(metric_name: str, preds: Sequence[str], refs: Sequence) -> tuple[float, str]:
    preds, refs = _pairs(preds, refs)
    metric = getattr(_require("sacrebleu.metrics"), metric_name)()
    score = metric.corpus_score(preds, _ref_streams(refs))
    return float(score.score), str(metric.get_signature())


def bleu(preds: Sequence[str], refs: Sequence) -> tuple[float, str]:
    """sacrebleu corpus BLEU (0-100) and its signature, e.g. 'nrefs:1|case:mixed|eff:no|tok:13a|...'."""
    return _sacrebleu("BLEU", preds, refs)


def chrf(preds: Sequence[str], refs: Sequence) -> tuple[float, str]:
    """sacrebleu corpus chrF (0-100) and its signature."""
    return _sacrebleu("CHRF", preds, refs)


def rouge(preds: Sequence[str], refs: Sequence) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (0-1), Porter-stemmed; with several references, the best one."""
    preds, refs = _pairs(preds, refs)
    scoring = _require("rouge_score.rouge_scorer")
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = scoring.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for p, rs in zip(preds, refs):
        if not rs:
            raise TemperError("a prediction has no reference")
        scores = [scorer.score(r, p) for r in rs]  # score(target, prediction)
        for k in keys:
            totals[k] += max(s[k].fmeasure for s in scores)
    return {k: v / len(preds) for k, v in totals.items()}


def _clean_number(s: str) -> str:
    """'1,234.' -> '1234' for numbers; other answers are returned stripped."""
    s = s.strip()
    if re.fullmatch(r"-?[\d,\.]+", s):
        s = s.replace(",", "").rstrip(".")
    return s


def extract_answer(text: str, pattern: str | None = GSM8K_PATTERN, *, fallback: bool = True) -> str | None:
    """The last match of `pattern`'s one group in `text` (commas and a trailing '.' removed).

    When `pattern` is None or does not match and `fallback` is true, the last number in the
    text. None when nothing matches.
    """
    for pat in ([pattern] if pattern else []) + ([FINAL_NUMBER_PATTERN] if fallback else []):
        try:
            regex = re.compile(pat)
        except re.error as e:
            raise TemperError(f"answer pattern {pat!r} is not a valid regular expression ({e})") from None
        if regex.groups != 1:
            raise TemperError(f"answer pattern {pat!r} must have exactly one group, has {regex.groups}")
        matches = regex.findall(text)
        if matches:
            value = _clean_number(matches[-1])
            if value:
                return value
    return None
