"""Judges: one interface that scores several responses to each prompt, shared by online DPO
(`temper dpo rounds=N judge=...`) and `temper eval judge=...`.

    judge.rank(prompts, responses_per_prompt) -> [[score or None for each response] for each prompt]

Specs (`make_judge`):

  rule:world              the built-in world's checker (`temper.eval.world_checker`): correct,
                          concise, not repetitive, polite; needs each prompt's `answer`
  regex:PATTERN           1 when the response matches PATTERN (`re.search`), else 0
  callable:MODULE:FUNC    `FUNC(prompt, response)` -> a number (also given `row=` when it takes
                          a `row` argument: the prompt's whole data row); MODULE is imported
  llm:MODEL_DIR           the pairwise LLM judge of `temper.eval.judge`: every two responses
                          to a prompt are compared in both orders; a response's score is its
                          share of wins (a tie, or orders that disagree, count half)
  reward:MODEL_DIR        a reward model (`temper.models.reward`: a `*ForSequenceClassification`
                          directory with one label, e.g. from TRL's RewardTrainer): the score is
                          its scalar for prompt + response, formatted as `RewardJudge` says

(`constitution:MODEL_DIR` is the fifth kind: it revises responses instead of scoring them, see
`temper.rewards.feedback`.)

Bad judgements (an exception, a value that is not a finite number) are never used silently:
with `skip_bad=True` the response gets no score (None: it takes part in no pair) and the
reason is counted in `judge.stats`, and one warning per batch names the first row of each
reason; with `skip_bad=False` the first one stops the run with `file:line sample k: why`.
A judge that calls `sys.exit` (raises SystemExit) has failed on that sample like any
exception; Ctrl-C (KeyboardInterrupt) still stops the run.

A user's function (`callable:`, and `constitution:callable:`) runs with a time limit per call,
`timeout` seconds (`judge_timeout=`, 60 by default; 0: none), in a worker thread the run waits
for. A call still running at the limit stops the command with one line naming the judge and
the sample: a Python thread cannot be stopped from outside, so the call is left behind (a
daemon thread, it does not keep the process alive) rather than judged again or skipped. The
limit cannot interrupt C code that holds the interpreter lock (a regex stuck backtracking).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import re
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from temper.data.chat import model_chat_template, render, render_kwargs
from temper.data.preference import _leading_special_ids
from temper.data.prompts import Prompt
from temper.data.sft import _ends_with_end_marker
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.eval.judge import judge_pair
from temper.eval.world_checker import check_reply
from temper.loading import load_for_inference
from temper.models.reward import load_reward_model

KINDS = ("rule", "regex", "callable", "llm", "constitution", "reward")
SKIP_HINT = "set skip_bad_judgements=true to skip and count such samples"
DEFAULT_TIMEOUT = 60.0  # seconds one call of a user's judge may take (judge_timeout=)


def call_with_timeout(call: Callable[[], Any], timeout: float, judge: str, where: str, *, kind: str = "judge",
                      setting: str = "judge_timeout") -> Any:
    """`call()`, run in a worker thread and waited for at most `timeout` seconds (0: called here, no
    limit). What the call raises is raised here, SystemExit included; a call still running at the
    limit is a one-line error naming `kind` `judge`, `where` (the sample) and the `setting` that
    sets the limit, and is left running."""
    if not timeout:
        return call()
    outcome: dict[str, Any] = {}

    def worker() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # SystemExit too: the waiting thread decides what it means
            outcome["error"] = e

    thread = threading.Thread(target=worker, name=f"judge {where}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TemperError(f"{where}: {kind} {judge} did not return within {setting}={timeout:g} s; the run stops "
                          f"(a hung call cannot be stopped from outside): raise {setting} for a slow {kind}, "
                          "or 0 for no limit")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def failure(e: BaseException) -> str:
    """How a judge's exception (SystemExit too) is named in counts and messages."""
    if isinstance(e, SystemExit):
        return f"SystemExit: {e.code} (the judge called sys.exit)"
    return f"{type(e).__name__}: {e}"


@dataclass
class JudgeStats:
    judged: int = 0  # responses given a score
    bad: Counter = field(default_factory=Counter)  # reason -> responses left unscored
    first_bad: dict[str, str] = field(default_factory=dict)  # reason -> "file:line sample k: message"

    def as_dict(self) -> dict:
        return {"judged": self.judged, "bad": dict(self.bad), "first_bad": dict(self.first_bad)}


class Judge:
    """Scores responses; subclasses implement `score(prompt, response)` or override `rank`."""

    name = "judge"
    needs_answer = False
    timeout = 0.0  # seconds per call of `score` (a user's function); 0: no limit

    def __init__(self, *, skip_bad: bool = True) -> None:
        self.skip_bad = skip_bad
        self.stats = JudgeStats()

    def check_prompts(self, prompts: Sequence[Prompt]) -> None:
        """Refuse before any sampling when a prompt lacks what this judge needs."""
        if self.needs_answer:
            for p in prompts:
                if p.answer is None:
                    raise TemperError(f"{p.source}: judge {self.name} needs an 'answer' in every prompt row; "
                                      "this one has none")

    def score(self, prompt: Prompt, response: str) -> Any:
        raise NotImplementedError

    def rank(self, prompts: Sequence[Prompt], responses: Sequence[Sequence[str]]) -> list[list[float | None]]:
        if len(prompts) != len(responses):
            raise TemperError(f"{len(prompts)} prompts but {len(responses)} lists of responses")
        before = Counter(self.stats.bad)
        scores = [[self._checked(p, j, lambda p=p, r=r: self.score(p, r)) for j, r in enumerate(rs)]
                  for p, rs in zip(prompts, responses)]
        self.warn(before)
        return scores

    def _checked(self, prompt: Prompt, index: int, call: Callable[[], Any]) -> float | None:
        """The judgement as a float, or None (counted) / a one-line error for a bad one."""
        try:
            value = call_with_timeout(call, self.timeout, self.name, f"{prompt.source} sample {index}")
        except (TemperError, KeyboardInterrupt):
            raise
        except (Exception, SystemExit) as e:  # a user's judge may raise anything: that sample is judged bad
            return self.bad(prompt, index, "exception", failure(e))
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, numbers.Real):
            return self.bad(prompt, index, "not_a_number", f"returned {type(value).__name__} {value!r:.60}, "
                                                           "not a number")
        value = float(value)
        if not math.isfinite(value):
            return self.bad(prompt, index, "not_finite", f"returned {value}")
        self.stats.judged += 1
        return value

    def bad(self, prompt: Prompt, index: int, reason: str, message: str) -> None:
        where = f"{prompt.source} sample {index}"
        if not self.skip_bad:
            raise TemperError(f"{where}: judge {self.name} {message}; {SKIP_HINT}")
        self.stats.bad[reason] += 1
        self.stats.first_bad.setdefault(reason, f"{where}: {message}")
        return None

    def warn(self, since: Counter | None = None) -> None:
        new = self.stats.bad - (since or Counter())
        if new:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(new.items()))
            firsts = "; ".join(self.stats.first_bad[r] for r in sorted(new))
            warnings.warn(f"judge {self.name}: {sum(new.values())} samples skipped ({counts}); first of each: "
                          f"{firsts}", UserWarning, stacklevel=3)

    def close(self) -> None:
        """Free what the judge holds (a model)."""


class WorldRuleJudge(Judge):
    """The built-in world's checker: `check_reply(response, answer)["score"]`."""

    name = "rule:world"
    needs_answer = True

    def score(self, prompt: Prompt, response: str) -> float:
        if prompt.answer is None:
            raise TemperError(f"{prompt.source}: judge rule:world needs the row's 'answer'")
        return check_reply(response, prompt.answer)["score"]


class RegexJudge(Judge):
    def __init__(self, pattern: str, **kwargs) -> None:
        super().__init__(**kwargs)
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise TemperError(f"judge regex:{pattern}: not a regular expression ({e})") from None
        self.name = f"regex:{pattern}"

    def score(self, prompt: Prompt, response: str) -> float:
        return 1.0 if self.pattern.search(response) else 0.0


def import_callable(spec: str, option: str) -> Callable:
    """`module:function` (dots allowed in both), imported; a one-line error naming `option` if it is not there."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise TemperError(f"{option}{spec}: expected MODULE:FUNCTION, e.g. my_judges:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TemperError(f"{option}{spec}: cannot import module '{module_name}' ({e}); is it on PYTHONPATH?") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TemperError(f"{option}{spec}: module '{module_name}' has no '{attr}'{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TemperError(f"{option}{spec}: '{attr}' is a {type(obj).__name__}, not a function")
    return obj


def _takes_row(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "row" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class CallableJudge(Judge):
    """`FUNC(prompt_text, response)` (plus `row=` when it takes one) -> a number."""

    def __init__(self, spec: str, *, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fn = import_callable(spec, "judge=callable:")
        self.with_row = _takes_row(self.fn)
        self.name = f"callable:{spec}"
        self.timeout = check_timeout(timeout)

    def score(self, prompt: Prompt, response: str) -> Any:
        if self.with_row:
            return self.fn(prompt.question, response, row=prompt.row)
        return self.fn(prompt.question, response)


class LLMJudge(Judge):
    """The pairwise judge of `temper.eval.judge` turned into scores: each response's share of
    wins against the other responses to its prompt, every comparison asked in both orders (a
    win counts only when both orders agree; anything else is half a win each)."""

    def __init__(self, model_dir: str, *, device: Any = "cpu", template: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model, self.tokenizer = load_for_inference(model_dir, device=device)
        self.template = template
        self.name = f"llm:{model_dir}"

    def rank(self, prompts: Sequence[Prompt], responses: Sequence[Sequence[str]]) -> list[list[float | None]]:
        if len(prompts) != len(responses):
            raise TemperError(f"{len(prompts)} prompts but {len(responses)} lists of responses")
        before = Counter(self.stats.bad)
        out: list[list[float | None]] = []
        for prompt, rs in zip(prompts, responses):
            k = len(rs)
            if k < 2:
                out.append([0.5] * k)
                self.stats.judged += k
                continue
            wins = [0.0] * k
            try:
                for i in range(k):
                    for j in range(i + 1, k):
                        if rs[i] == rs[j]:
                            first, second = None, None
                        else:
                            first = judge_pair(self.model, self.tokenizer, prompt.question, rs[i], rs[j],
                                               template=self.template)
                            second = judge_pair(self.model, self.tokenizer, prompt.question, rs[j], rs[i],
                                                template=self.template)
                        if first == "A" and second == "B":
                            wins[i] += 1
                        elif first == "B" and second == "A":
                            wins[j] += 1
                        else:
                            wins[i] += 0.5
                            wins[j] += 0.5
            except TemperError:
                raise
            except Exception as e:  # the judge failed on this prompt: none of its responses is scored
                out.append([self.bad(prompt, j, "exception", f"{type(e).__name__}: {e}") for j in range(k)])
                continue
            self.stats.judged += k
            out.append([w / (k - 1) for w in wins])
        self.warn(before)
        return out

    def close(self) -> None:
        del self.model


class RewardJudge(Judge):
    """A reward model's scalar for each prompt + response, scored in batches.

    The text is what the reward model was trained on, in temper's DPO / TRL's RewardTrainer
    conventions (temper.data.preference):
    - the directory has a chat template: the prompt's messages + {"role": "assistant",
      "content": response} rendered without a generation prompt, tokenised without added
      special tokens (the template writes its own BOS), EOS appended only when the render
      ends with no end-of-turn marker;
    - no template: the last user turn and the response as plain text, "question\nresponse",
      after the tokenizer's leading special tokens (BOS) and followed by EOS (TRL appends the
      EOS text to non-conversational rows).
    A sequence longer than the model's positions keeps its last `max_seq_len` tokens (counted
    in `truncated`, warned once per batch of prompts), as the LLM judge keeps a prompt's end.
    """

    def __init__(self, model_dir: str, *, device: Any = "cpu", dtype: Any = None, batch_size: int = 16,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = load_reward_model(model_dir, device=device, dtype=dtype)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise TemperError(f"{model_dir}: the tokenizer has {self.tokenizer.vocab_size} tokens but the reward "
                              f"model only {self.model.config.vocab_size} embeddings")
        self.template = model_chat_template(model_dir, self.tokenizer)
        self.leading = _leading_special_ids(self.tokenizer)
        self.batch_size = batch_size
        self.truncated = 0
        self.name = f"reward:{model_dir}"

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """The token ids the reward model reads for `response` to `prompt` (see the class docstring)."""
        tokenizer = self.tokenizer
        if self.template:
            text = render(self.template, [*prompt.messages, {"role": "assistant", "content": response}],
                          add_generation_prompt=False, **render_kwargs(tokenizer))
            ids = tokenizer.encode(text)
            ended = _ends_with_end_marker(text, self.template, tokenizer)
        else:
            ids = self.leading + tokenizer.encode(f"{prompt.question}\n{response}")
            ended = False
        if not ended and tokenizer.eos_id is not None and (not ids or ids[-1] != tokenizer.eos_id):
            ids.append(tokenizer.eos_id)
        if not ids:
            raise TemperError("the prompt and response encode to no tokens")
        limit = self.model.config.max_seq_len
        if len(ids) > limit:
            self.truncated += 1
            ids = ids[-limit:]
        return ids

    def rank(self, prompts: Sequence[Prompt], responses: Sequence[Sequence[str]]) -> list[list[float | None]]:
        if len(prompts) != len(responses):
            raise TemperError(f"{len(prompts)} prompts but {len(responses)} lists of responses")
        before, truncated_before = Counter(self.stats.bad), self.truncated
        items = [(i, j) for i, rs in enumerate(responses) for j in range(len(rs))]
        encoded: dict[tuple[int, int], list[int]] = {}
        failed: dict[tuple[int, int], str] = {}
        for i, j in items:
            try:
                encoded[i, j] = self.encode(prompts[i], responses[i][j])
            except Exception as e:  # a template that fails on this prompt: that sample is judged bad
                failed[i, j] = f"{type(e).__name__}: {e}"
        # each distinct sequence scored once: the same text gets the same reward (a tie against
        # itself), not one that depends on its row and batch, whose sums another CPU orders otherwise
        rewards: dict[tuple[int, ...], float] = {}
        errors: dict[tuple[int, ...], str] = {}
        order = sorted({tuple(ids) for ids in encoded.values()}, key=len)  # similar lengths share a batch
        device = next(self.model.parameters()).device
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        self.model.eval()
        for start in range(0, len(order), self.batch_size):
            seqs = order[start:start + self.batch_size]
            lengths = [len(seq) for seq in seqs]
            ids = torch.full((len(seqs), max(lengths)), pad, dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, :lengths[row]] = torch.tensor(seq)
            try:
                with torch.no_grad():
                    values = self.model(ids.to(device), torch.tensor(lengths, device=device)).float().tolist()
            except TemperError:
                raise
            except Exception as e:  # e.g. out of memory: this batch's samples are judged bad
                errors.update({seq: f"{type(e).__name__}: {e}" for seq in seqs})
                continue
            rewards.update(zip(seqs, values))
        failed.update({key: errors[tuple(ids)] for key, ids in encoded.items() if tuple(ids) in errors})
        out: list[list[float | None]] = [[None] * len(rs) for rs in responses]
        for i, j in items:
            if (i, j) in failed:
                out[i][j] = self.bad(prompts[i], j, "exception", failed[i, j])
            else:
                out[i][j] = self._checked(prompts[i], j, lambda value=rewards[tuple(encoded[i, j])]: value)
        if self.truncated > truncated_before:
            warnings.warn(f"judge {self.name}: {self.truncated - truncated_before} of {len(items)} sequences are "
                          f"longer than the reward model's {self.model.config.max_seq_len} positions and kept their "
                          "last tokens", UserWarning, stacklevel=2)
        self.warn(before)
        return out

    def close(self) -> None:
        del self.model


def split_spec(spec: str, option: str = "judge=") -> tuple[str, str]:
    """(kind, argument) of KIND:ARGUMENT; a one-line error for anything else."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in KINDS or not arg:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" (did you mean '{close[0]}:'?)" if close and close[0] != kind else ""
        raise TemperError(f"{option}{spec}: expected KIND:ARGUMENT with KIND one of {', '.join(KINDS)}{hint}, "
                          "e.g. rule:world, regex:PATTERN, callable:my_module:score, llm:runs/judge, "
                          "reward:runs/rm, constitution:runs/sft")
    return kind, arg


def check_timeout(timeout: float) -> float:
    if not (timeout >= 0 and math.isfinite(timeout)):
        raise TemperError(f"judge_timeout must be a number of seconds >= 0 (0: no limit), got {timeout}")
    return float(timeout)


def make_judge(spec: str, *, device: Any = "cpu", skip_bad: bool = True, option: str = "judge=",
               timeout: float = DEFAULT_TIMEOUT) -> Judge:
    """The scoring judge named by `spec` (see the module docstring); `timeout`: seconds per call of a
    `callable:` judge (0: no limit)."""
    kind, arg = split_spec(spec, option)
    if kind == "rule":
        if arg != "world":
            raise TemperError(f"{option}{spec}: the rule judge is rule:world (the built-in world's checker); "
                              "for a pattern use regex:PATTERN, for your own rule callable:MODULE:FUNCTION")
        return WorldRuleJudge(skip_bad=skip_bad)
    if kind == "regex":
        return RegexJudge(arg, skip_bad=skip_bad)
    if kind == "callable":
        return CallableJudge(arg, skip_bad=skip_bad, timeout=timeout)
    if kind == "llm":
        check_model_dir(arg, f"{option}llm:")
        return LLMJudge(arg, device=device, skip_bad=skip_bad)
    if kind == "reward":
        check_model_dir(arg, f"{option}reward:")
        return RewardJudge(arg, device=device, skip_bad=skip_bad)
    raise TemperError(f"{option}{spec}: a constitution judge revises responses instead of scoring them; "
                      "it makes pairs in `temper dpo rounds=N`, not scores")


def check_model_dir(path: str, option: str) -> None:
    if not Path(path).expanduser().is_dir():
        raise TemperError(f"{option}{path}: no such model directory")


__all__ = ["DEFAULT_TIMEOUT", "CallableJudge", "Judge", "JudgeStats", "KINDS", "LLMJudge", "Prompt", "RegexJudge", "RewardJudge",
           "WorldRuleJudge", "call_with_timeout", "check_model_dir", "check_timeout", "failure", "import_callable",
           "make_judge", "split_spec"]
