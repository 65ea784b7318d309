"""Pairwise comparison of two systems' answers: an LLM judge, or a rule for checkable tasks.

The LLM judge reads `JUDGE_TEMPLATE` (in its chat template when it has one, with the
generation prompt, else the raw text) and its verdict is whichever of the letters "A" and
"B" gets the higher next-token log-probability (each letter scored as the log-sum-exp of
its spellings "A" and " A"). Reading the two log-probabilities instead of sampling a reply
is deterministic, never fails to parse, and still gives a verdict when a small judge would
ramble rather than answer with a single letter.

Judges favour a position, so `pairwise` asks both orders (system 1 as A, then as B): a win
counts only when the two verdicts agree, anything else is a tie. `win_rate_1` = (wins_1 +
0.5 ties) / n with a 95% Wilson score interval computed on that fractional success count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from temper.data.chat import render, resolve_template
from temper.errors import TemperError
from temper.eval.generation import contains_answer, normalize

__all__ = ["JUDGE_TEMPLATE", "choice_token_ids", "score_pair", "judge_pair", "pairwise",
           "rule_judge", "rule_pairwise", "wilson_interval", "summarize"]

JUDGE_TEMPLATE = (
    "You are an impartial judge. Read the question and the two answers below, and decide "
    "which answer is better: more correct, more helpful and more to the point. Ignore the "
    "order in which the answers are shown and their length.\n\n"
    "Question: {question}\n\n"
    "Answer A: {answer_a}\n\n"
    "Answer B: {answer_b}\n\n"
    "Which answer is better? Reply with a single letter, A or B."
)


def choice_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """First-token ids of the spellings of "A" and of "B" (those the two letters share dropped)."""
    ids = {}
    for letter in ("A", "B"):
        ids[letter] = {enc[0] for s in (letter, " " + letter) if (enc := tokenizer.encode(s))}
    shared = ids["A"] & ids["B"]
    a, b = sorted(ids["A"] - shared), sorted(ids["B"] - shared)
    if not a or not b:
        raise TemperError("the judge's tokenizer has no distinct first tokens for 'A' and 'B'")
    return a, b


def _prompt(tokenizer, question: str, answer_a: str, answer_b: str, template: str | None) -> str:
    text = JUDGE_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)
    chat = resolve_template(template, tokenizer)
    if not chat:
        return text + "\nAnswer:"
    return render(chat, [{"role": "user", "content": text}], add_generation_prompt=True,
                  bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")


@torch.no_grad()
def score_pair(judge_model, judge_tokenizer, question: str, answer_a: str, answer_b: str, *,
               template: str | None = None) -> tuple[float, float]:
    """(log p("A"), log p("B")) of the judge's next token after the judging prompt.

    A prompt longer than the model's positions keeps its last `max_seq_len` tokens."""
    prompt = _prompt(judge_tokenizer, question, answer_a, answer_b, template)
    ids = judge_tokenizer.encode(prompt)
    if not ids:
        raise TemperError("the judging prompt encodes to no tokens")
    ids = ids[-judge_model.config.max_seq_len:]
    device = next(judge_model.parameters()).device
    logits = judge_model(torch.tensor([ids], device=device), last_only=True)[0, -1].float()
    logprobs = logits.log_softmax(-1)
    a_ids, b_ids = choice_token_ids(judge_tokenizer)
    return (torch.logsumexp(logprobs[a_ids], 0).item(), torch.logsumexp(logprobs[b_ids], 0).item())


def judge_pair(judge_model, judge_tokenizer, question: str, answer_a: str, answer_b: str, *,
               template: str | None = None) -> str | None:
    """"A" or "B", whichever letter the judge rates more likely; None on an exact tie."""
    lp_a, lp_b = score_pair(judge_model, judge_tokenizer, question, answer_a, answer_b, template=template)
    if lp_a > lp_b:
        return "A"
    if lp_b > lp_a:
        return "B"
    return None


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion (successes may be fractional: ties count 0.5)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # clamp, and keep p inside against rounding at p = 0 or 1
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def summarize(outcomes: Sequence[str], details: Sequence[dict] | None = None) -> dict:
    """The report for per-question outcomes "1", "2" or "tie"."""
    n = len(outcomes)
    wins_1, wins_2 = outcomes.count("1"), outcomes.count("2")
    ties = n - wins_1 - wins_2
    score = wins_1 + 0.5 * ties
    low, high = wilson_interval(score, n)
    verdicts = [{"index": i, "winner": o, **(details[i] if details else {})} for i, o in enumerate(outcomes)]
    return {"n": n, "wins_1": wins_1, "wins_2": wins_2, "ties": ties,
            "win_rate_1": score / n if n else 0.5, "ci_95": (low, high), "ci_method": "wilson",
            "verdicts": verdicts}


def _check_lengths(*columns: Sequence) -> None:
    if len({len(c) for c in columns}) != 1:
        raise TemperError(f"questions and answers must have the same length, got {[len(c) for c in columns]}")


@torch.no_grad()
def pairwise(judge_model, judge_tokenizer, questions: Sequence[str], answers_1: Sequence[str],
             answers_2: Sequence[str], *, template: str | None = None) -> dict:
    """Judge system 1 against system 2 on every question, in both orders.

    Returns {n, wins_1, wins_2, ties, win_rate_1, ci_95: (low, high), ci_method: "wilson",
    verdicts: [{index, winner: "1"|"2"|"tie", order_12, order_21}]}; `order_12` is the
    judge's letter with system 1 shown as A, `order_21` with system 2 shown as A.
    """
    _check_lengths(questions, answers_1, answers_2)
    was_training = judge_model.training
    judge_model.eval()
    outcomes, details = [], []
    try:
        for q, a1, a2 in zip(questions, answers_1, answers_2):
            first = judge_pair(judge_model, judge_tokenizer, q, a1, a2, template=template)
            second = judge_pair(judge_model, judge_tokenizer, q, a2, a1, template=template)
            if first == "A" and second == "B":
                outcomes.append("1")
            elif first == "B" and second == "A":
                outcomes.append("2")
            else:  # the judge followed the position (or could not decide)
                outcomes.append("tie")
            details.append({"order_12": first, "order_21": second})
    finally:
        judge_model.train(was_training)
    return summarize(outcomes, details)


def rule_judge(answer: str, reference: str) -> bool:
    """Correct when the normalised answer equals the normalised reference or contains it as whole words."""
    return normalize(answer) == normalize(reference) or contains_answer(answer, reference)


def rule_pairwise(references: Sequence[str], answers_1: Sequence[str], answers_2: Sequence[str]) -> dict:
    """`pairwise`'s report from `rule_judge`: a system wins a question when only it is correct."""
    _check_lengths(references, answers_1, answers_2)
    outcomes, details = [], []
    for ref, a1, a2 in zip(references, answers_1, answers_2):
        c1, c2 = rule_judge(a1, ref), rule_judge(a2, ref)
        outcomes.append("1" if c1 and not c2 else "2" if c2 and not c1 else "tie")
        details.append({"correct_1": c1, "correct_2": c2})
    return summarize(outcomes, details)
