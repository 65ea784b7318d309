"""AI feedback from a written constitution: a judge model critiques a response against one
principle, then revises it; the pair (revised > original) needs no human label.

This is the critique-revision loop of Constitutional AI (Bai et al. 2022, "SL-CAI"), with one
departure: the paper fine-tunes on the revisions (and asks the model which of two samples is
better for its RL stage), while here each revision and the response it revises become one
preference pair for a DPO round, as in the issue that asked for it. The conversation follows
the paper's: the prompt, the response, a critique request naming the principle, the judge's
critique, a revision request, the judge's revision.

A constitution is a Markdown file whose list items ("- ", "* " or "1. ") are the principles
(`temper/configs/constitutions/default.md` ships one for the built-in world). Each response is
judged against one principle, taken in turn.

Judges: `constitution:MODEL_DIR` (an LLM, through temper's batched generation with the model's
chat template; greedy) or `constitution:callable:MODULE:FUNC` with
`FUNC(prompt, response, principle) -> revised text or None`, for a deterministic stand-in or
a judge of your own. A revision that fails (an exception, None, not text, an empty critique),
that is empty, the same as the original, or the critique again word for word (a small model
answers both requests with the same short reply) makes no pair; each reason is counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temper.configs import shipped_dir
from temper.data.chat import chat_template_for, render, render_kwargs, stop_settings
from temper.data.prompts import Prompt
from temper.errors import TemperError, require_file
from temper.loading import load_for_inference
from temper.models.generate import SamplingConfig, generate_text
from temper.rewards.judges import (
    DEFAULT_TIMEOUT,
    call_with_timeout,
    check_model_dir,
    check_timeout,
    failure,
    import_callable,
)

CRITIQUE_REQUEST = ("Critique your last answer against this principle: {principle} "
                    "Say briefly what in the answer breaks the principle, if anything.")
REVISION_REQUEST = ("Rewrite your answer to my question so that it follows the principle: {principle} "
                    "Reply with the rewritten answer only.")

_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(.*\S)\s*$")


def default_constitution() -> Path:
    return shipped_dir("constitutions") / "default.md"


def read_constitution(path: str | Path | None = None) -> list[str]:
    """The principles of a constitution file (its list items), in order."""
    p = require_file(Path(path).expanduser() if path else default_constitution(), "constitution")
    principles = [m.group(1) for line in p.read_text(encoding="utf-8").splitlines() if (m := _ITEM.match(line))]
    if not principles:
        raise TemperError(f"{p}: no principles found; write each one as a list item ('- Be concise.')")
    return principles


@dataclass
class Revision:
    revision: str | None  # the revised response, or None when the judge failed
    critique: str | None = None
    failure: str | None = None  # why there is no revision (a stats key)
    message: str = ""


class Reviser:
    """Critiques and revises responses; subclasses implement `critique_and_revise` or `revise_all`."""

    name = "reviser"
    timeout = 0.0  # seconds per call of `critique_and_revise` (a user's function); 0: no limit

    def critique_and_revise(self, prompt: Prompt, response: str, principle: str) -> str | None:
        raise NotImplementedError

    def revise_all(self, prompts: Sequence[Prompt], responses: Sequence[str], principles: Sequence[str]
                   ) -> list[Revision]:
        out = []
        for k, (prompt, response, principle) in enumerate(zip(prompts, responses, principles, strict=True)):
            try:
                value = call_with_timeout(lambda: self.critique_and_revise(prompt, response, principle),  # noqa: B023
                                          self.timeout, self.name, f"{prompt.source} response {k}")
            except (TemperError, KeyboardInterrupt):
                raise
            except (Exception, SystemExit) as e:  # a user's reviser may raise anything: that response makes no pair
                out.append(Revision(None, failure="exception", message=failure(e)))
                continue
            if value is None:
                out.append(Revision(None, failure="no_revision", message="returned None"))
            elif not isinstance(value, str):
                out.append(Revision(None, failure="not_text", message=f"returned {type(value).__name__}, not text"))
            else:
                out.append(Revision(value))
        return out

    def close(self) -> None:
        """Free what the reviser holds (a model)."""


class CallableReviser(Reviser):
    def __init__(self, spec: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.fn = import_callable(spec, "judge=constitution:callable:")
        self.name = f"constitution:callable:{spec}"
        self.timeout = check_timeout(timeout)

    def critique_and_revise(self, prompt: Prompt, response: str, principle: str) -> str | None:
        return self.fn(prompt.question, response, principle)


class LLMReviser(Reviser):
    """A model critiques, then revises, in one conversation rendered with its chat template;
    both steps are batched greedy generations."""

    def __init__(self, model_dir: str, *, device: Any = "cpu", max_new_tokens: int = 48,
                 template: str | None = None, batch_size: int = 32) -> None:
        self.model, self.tokenizer = load_for_inference(model_dir, device=device)
        self.template = chat_template_for(model_dir, self.tokenizer, template)
        self.stops, self.eos_ids = stop_settings(self.tokenizer, self.template)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.name = f"constitution:{model_dir}"

    def _reply(self, conversations: list[list[dict]]) -> list[str]:
        texts = [render(self.template, c, add_generation_prompt=True, **render_kwargs(self.tokenizer))
                 for c in conversations]
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, stop=self.stops, eos_token_ids=self.eos_ids)
        return [r.strip() for r in generate_text(self.model, self.tokenizer, texts, sampling,
                                                 batch_size=self.batch_size)]

    def revise_all(self, prompts: Sequence[Prompt], responses: Sequence[str], principles: Sequence[str]
                   ) -> list[Revision]:
        talks = [[*p.messages, {"role": "assistant", "content": r},
                  {"role": "user", "content": CRITIQUE_REQUEST.format(principle=principle)}]
                 for p, r, principle in zip(prompts, responses, principles, strict=True)]
        critiques = self._reply(talks) if talks else []
        out: list[Revision | None] = [None] * len(talks)
        todo = []
        for i, critique in enumerate(critiques):
            if not critique:
                out[i] = Revision(None, failure="empty_critique", message="the critique is empty")
            else:
                talks[i] += [{"role": "assistant", "content": critique},
                             {"role": "user", "content": REVISION_REQUEST.format(principle=principles[i])}]
                todo.append(i)
        for i, revision in zip(todo, self._reply([talks[i] for i in todo])):
            out[i] = Revision(revision, critique=critiques[i])
        return out  # type: ignore[return-value]

    def close(self) -> None:
        del self.model


def make_reviser(spec: str, *, device: Any = "cpu", max_new_tokens: int = 48, template: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> Reviser:
    """`constitution:MODEL_DIR` or `constitution:callable:MODULE:FUNC` (each call limited to `timeout` seconds)."""
    kind, _, arg = spec.partition(":")
    assert kind == "constitution", spec
    if arg.startswith("callable:"):
        return CallableReviser(arg.removeprefix("callable:"), timeout=timeout)
    check_model_dir(arg, "judge=constitution:")
    return LLMReviser(arg, device=device, max_new_tokens=max_new_tokens, template=template)


def same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


__all__ = ["CRITIQUE_REQUEST", "REVISION_REQUEST", "CallableReviser", "LLMReviser", "Reviser", "Revision",
           "default_constitution", "make_reviser", "read_constitution", "same_text"]
