"""Generation-based evaluation of instruction following: exact match after normalisation.

normalise: lower-case, drop punctuation and the articles a/an/the, collapse whitespace
(the SQuAD convention). `exact_match`: the normalised reply equals the normalised reference
reply. `answer_accuracy`: the normalised canonical answer occurs in the normalised reply as
whole words (for rows that carry an `answer`, like the built-in world's).
"""

from __future__ import annotations

import re
import string

from temper.data.chat import end_of_turn_strings, render
from temper.models.generate import SamplingConfig, generate_text

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains_answer(reply: str, answer: str) -> bool:
    reply_n, answer_n = f" {normalize(reply)} ", f" {normalize(answer)} "
    return answer_n.strip() != "" and answer_n in reply_n


def evaluate_instructions(model, tokenizer, template: str, conversations, *, max_new_tokens: int = 48,
                          batch_size: int = 32) -> tuple[dict[str, float], list[dict]]:
    """Greedy replies to the last user turn of each conversation, scored against its last
    assistant turn. Returns (metrics, rows with prompt/reply/reference)."""
    prompts, references, answers = [], [], []
    for conv in conversations:
        *context, last = conv.messages
        assert last["role"] == "assistant"
        prompts.append(render(template, context, add_generation_prompt=True, bos_token=tokenizer.bos_token or "",
                              eos_token=tokenizer.eos_token or ""))
        references.append(last["content"])
        answers.append(conv.answer)
    stops = tuple(end_of_turn_strings(template))
    was_training = model.training
    model.eval()
    replies = generate_text(model, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new_tokens, stop=stops),
                            batch_size=batch_size)
    model.train(was_training)
    replies = [r.strip() for r in replies]
    exact = [normalize(r) == normalize(ref) for r, ref in zip(replies, references)]
    metrics = {"exact_match": sum(exact) / len(exact), "eval_examples": len(exact)}
    scored = [(r, a, c.task) for r, a, c in zip(replies, answers, conversations) if a is not None]
    if scored:
        metrics["answer_accuracy"] = sum(contains_answer(r, a) for r, a, _ in scored) / len(scored)
        for task in sorted({t for _, _, t in scored if t}):
            hits = [contains_answer(r, a) for r, a, t in scored if t == task]
            metrics[f"answer_accuracy/{task}"] = sum(hits) / len(hits)
    rows = [{"prompt": p, "reply": r, "reference": ref, "answer": a, "exact": e}
            for p, r, ref, a, e in zip(prompts, replies, references, answers, exact)]
    return metrics, rows
