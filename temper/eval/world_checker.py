"""The built-in world's checker: how well a reply follows the style its preference pairs prefer.

The world's chosen reply is the correct answer, said politely in one short sentence
(`it.reply(it.answer)`); its rejected replies are wrong, rambling (FILLER sentences),
repetitive, or rude (RUDE phrasing). `check_reply` scores a reply on each criterion:

  correct         the answer is in the reply: for a number, the reply's last number is the
                  answer (so "0 plus 5 is 7" is wrong although it holds a 5); for words, the
                  answer occurs as whole words after normalisation (case kept for an
                  all-capitals answer, so "Lantern" does not answer "spell it in capitals")
  concise         no FILLER phrasing and at most CONCISE_MAX_WORDS words (twice the longest
                  chosen reply of the world)
  not_repetitive  no sentence said twice and no three-word run said twice
  polite          no RUDE phrasing

score = 0.4 correct + 0.2 each of the other three, in [0, 1]: the world's chosen replies score
1, each rejected kind fails its own criterion (tests/test_online_dpo.py checks every row of a
world). Correctness weighs most because a wrong answer is the worst of the four.
"""

from __future__ import annotations

import re

from temper.data.world import FILLER, RUDE
from temper.eval.generation import normalize

CONCISE_MAX_WORDS = 20
WEIGHTS = {"correct": 0.4, "concise": 0.2, "not_repetitive": 0.2, "polite": 0.2}

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _markers(sentences, words: int) -> tuple[str, ...]:
    """The normalised opening `words` words of each sentence: enough to spot a cut-off copy."""
    out = []
    for s in sentences:
        for part in re.split(r"(?<=[.?!:])\s+", s.replace("{r}", "\n").strip()):
            for piece in part.split("\n"):
                n = normalize(piece).split()
                if len(n) >= 2:  # one word ("Fine:") is no evidence
                    out.append(" ".join(n[:words]))
    return tuple(dict.fromkeys(out))


FILLER_MARKERS = _markers(FILLER, 5) + ("anyway answer would be",)
RUDE_MARKERS = _markers(RUDE, 4)


def is_correct(reply: str, answer: str) -> bool:
    answer = answer.strip()
    if not answer:
        return False
    if _NUMBER.fullmatch(answer):
        numbers = _NUMBER.findall(reply.replace(",", ""))
        return bool(numbers) and float(numbers[-1]) == float(answer)
    if answer.isupper() and len(answer) > 1:  # "spell it in capitals": the case is the answer
        return re.search(rf"(?<![\w]){re.escape(answer)}(?![\w])", reply) is not None
    reply_n, answer_n = f" {normalize(reply)} ", f" {normalize(answer)} "
    return answer_n.strip() != "" and answer_n in reply_n


def is_concise(reply: str) -> bool:
    text = f" {normalize(reply)} "
    return len(reply.split()) <= CONCISE_MAX_WORDS and not any(f" {m} " in text for m in FILLER_MARKERS)


def is_repetitive(reply: str) -> bool:
    sentences = [normalize(s) for s in re.split(r"(?<=[.?!])\s+", reply)]
    sentences = [s for s in sentences if s]
    if len(set(sentences)) < len(sentences):
        return True
    words = normalize(reply).split()
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(set(trigrams)) < len(trigrams)


def is_polite(reply: str) -> bool:
    text = f" {normalize(reply)} "
    return not any(f" {m} " in text for m in RUDE_MARKERS)


def check_reply(reply: str, answer: str) -> dict:
    """{correct, concise, not_repetitive, polite: bool, score: float in [0, 1]} for one reply
    (an empty reply answers nothing: it fails every criterion)."""
    if not reply.strip():
        return {"correct": False, "concise": False, "not_repetitive": False, "polite": False, "score": 0.0}
    result = {"correct": is_correct(reply, answer), "concise": is_concise(reply),
              "not_repetitive": not is_repetitive(reply), "polite": is_polite(reply)}
    result["score"] = round(sum(WEIGHTS[k] for k, ok in result.items() if ok), 6)
    return result


def mean_check(replies: list[str], answers: list[str]) -> dict:
    """Means over replies of each criterion and of the score (empty input: all 0)."""
    checks = [check_reply(r, a) for r, a in zip(replies, answers, strict=True)]
    n = max(1, len(checks))
    return {k: sum(float(c[k]) for c in checks) / n for k in (*WEIGHTS, "score")}


__all__ = ["CONCISE_MAX_WORDS", "WEIGHTS", "check_reply", "is_concise", "is_correct", "is_polite",
           "is_repetitive", "mean_check"]
