"""Reward functions: what GRPO (and any RL recipe) scores completions with, several combined with
weights.

A reward function is a plain Python callable with the calling convention of TRL 1.16's
`GRPOTrainer`, so a function written for TRL works here unchanged:

    fn(prompts=[...], completions=[...], completion_ids=[[...]], log_metric=f, log_extra=g, **columns)
        -> [one float, or None (not applicable), per completion]

One entry per completion (a prompt's G completions each repeat it): `prompts` holds each row's
prompt as given (text, or the messages of a conversation); `completions` the generated text, or
for a conversational prompt TRL's form `[{"role": "assistant", "content": text}]`;
`completion_ids` the completion's token ids; and every other column of the prompt rows (all but
`prompt`, `completion` and `completion_ids`, as in TRL) is a keyword with one value per
completion (None where a row lacks a column that others have; `answer` is also filled from
`Prompt.answer` for a row built without one). `log_metric(name, value)` and
`log_extra(column, values)` collect into `RewardSet.pop_logged()`; what else the recipe passes to
`score` (TRL's `trainer_state`) is passed on. An `async def` function is awaited.

Specs (`rewards=[...]`, `RewardSet`), with the name each is logged under (`rewards/NAME/mean`):

  world              1.0 when the completion answers the built-in world's question (`temper world`'s
                     rl/*.jsonl rows, `answer` column), by the world's own checker
                     (`temper.eval.world_checker.is_correct`): a numeric answer is the completion's
                     last number (commas removed, "7." and "7.0" are 7); a word answer occurs as whole
                     words after normalisation (capitals kept for an all-capitals answer); else 0.0
  gsm8k              1.0 when the completion's final number equals the reference's `#### N` (the
                     `answer` column of GSM8K's own rows, or a bare number), else 0.0. Both numbers
                     are read as `temper eval`'s GSM8K task reads them (`temper.eval.metrics.
                     extract_answer`): the last `#### N` of the text, else its last number; commas,
                     `$` and a trailing "." removed; compared as numbers (18 == 18.00)
  format             1.0 when the completion holds exactly one `<answer>...</answer>` block, with
                     something other than whitespace inside and nothing but whitespace after it
                     (reasoning before it is free), else 0.0
  length, length:C   DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL's
                     `get_soft_overlong_punishment`) over the completion's tokens, with L_max the
                     recipe's max_completion_length and L_cache = C tokens (default L_max // 5, DAPO's
                     4,096 of 20,480): 0 up to L_max - L_cache, then falling linearly to -1 at L_max,
                     -1 beyond (a truncated completion gets -1)
  prm:DIR            a process reward model (`temper reward objective=prm`): the completion's lines
                     are its steps, the reward the lowest step's probability of being right
                     (`temper.rewards.process`)
  MODULE:FUNCTION    your function (dots allowed in both), imported; logged under its `__name__` as
                     TRL logs it
  judge:JUDGE        any scoring judge of `temper.rewards.judges`, the same spec as `judge=`:
                     judge:rule:world, judge:regex:PATTERN, judge:callable:MODULE:FUNC,
                     judge:llm:DIR, judge:reward:DIR. Its `rank` sees the completions of each
                     prompt together, so the pairwise LLM judge compares a prompt's G completions
                     with one another. Logged as KIND:ARG (a model directory by its last part)

`world` and `gsm8k` read the answer inside the last `<answer>...</answer>` block when the
completion has one, so they combine with `format`.

Combining: total_i = sum over k of w_k * r_ik, where a None is NaN and the sum is `nansum`, as in
TRL (`multi_objective_aggregation="sum_then_normalize"`, its default); a completion that no
function scores gets total NaN (TRL then excludes it from its group's baseline and zeroes its
advantage, and warns: so does `score`). Weights are any finite numbers (TRL allows negative ones).

Bad output never reaches the run: a function that raises (SystemExit too), returns anything but
one value per completion, or a value that is not a number or is NaN/infinite (None, not NaN,
says "does not apply") stops the run with one line naming the function and the row
(`file:line completion i`); for an exception the batch is tried one completion at a time to find
the row. This departs from TRL, which turns a NaN into "not applicable" and accepts any value
`torch.tensor` takes. A user's function runs under a time limit (`timeout`, seconds per call,
`call_with_timeout`); a judge's bad judgements stop the run too unless `skip_bad_judgements`.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import inspect
import math
import numbers
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from temper.data.prompts import Prompt
from temper.errors import TemperError
from temper.eval.metrics import GSM8K_PATTERN, extract_answer
from temper.eval.world_checker import is_correct
from temper.rewards.judges import (
    DEFAULT_TIMEOUT,
    KINDS,
    Judge,
    call_with_timeout,
    check_timeout,
    failure,
    import_callable,
    make_judge,
    split_spec,
)

SHIPPED = ("world", "gsm8k", "format", "length", "prm")
EXCLUDED_COLUMNS = ("prompt", "completion", "completion_ids")  # TRL passes every column but these
RESERVED = ("prompts", "completions", "completion_ids", "log_metric", "log_extra")
DAPO_CACHE_FRACTION = 5  # L_cache = L_max // 5: DAPO's 4,096 of 20,480 tokens

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# ---------------------------------------------------------------------- shipped reward functions

def completion_text(completion: Any) -> str:
    """The text of a completion in either of TRL's forms: text, or a list of messages (the
    assistant messages' contents, joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        return "".join(str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant")
    raise TypeError(f"a completion is text or a list of messages, got {type(completion).__name__}")


def answer_span(text: str) -> str:
    """The content of the last `<answer>...</answer>` block of `text`, or all of it without one."""
    blocks = _ANSWER_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def _answers(answer: Sequence[Any] | None, n: int, reward: str) -> Sequence[Any]:
    if answer is None:
        raise ValueError(f"the {reward} reward needs an 'answer' column in the prompt rows")
    if len(answer) != n:
        raise ValueError(f"{len(answer)} answers for {n} completions")
    return answer


def world_answer_reward(completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs: Any
                        ) -> list[float | None]:
    """1.0 when the completion answers the built-in world's question (`is_correct` of the world's
    checker, on the last `<answer>` block when there is one), else 0.0; None for a row with no answer."""
    answers = _answers(answer, len(completions), "world")
    return [None if a is None else float(is_correct(answer_span(completion_text(c)), str(a)))
            for c, a in zip(completions, answers)]


def _as_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:  # "1.2.3": no number
        return None
    return value if math.isfinite(value) else None


def gsm8k_reference(answer: Any) -> float:
    """The number a GSM8K reference answer ends with (`#### N`; a bare number is taken as it is)."""
    text = str(answer).replace("$", "")
    found = extract_answer(text, GSM8K_PATTERN, fallback=False) if "####" in text else text.strip()
    value = _as_number(found.replace(",", "").rstrip(".") if found else None)
    if value is None:
        raise ValueError(f"the answer {str(answer)[-60:]!r} ends with no '#### N' (GSM8K's form) and is not a number")
    return value


def gsm8k_reward(completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs: Any
                 ) -> list[float | None]:
    """1.0 when the completion's final number (its last `#### N`, else its last number; inside the
    last `<answer>` block when there is one) equals the reference's `#### N`, else 0.0; None for a
    row with no answer."""
    answers = _answers(answer, len(completions), "gsm8k")
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        if a is None:
            out.append(None)
            continue
        reference = gsm8k_reference(a)
        predicted = _as_number(extract_answer(answer_span(completion_text(c)).replace("$", "")))
        out.append(float(predicted == reference))
    return out


def well_formed(text: str) -> bool:
    """Exactly one `<answer>...</answer>` block, not blank inside, nothing but whitespace after it."""
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return False
    start, end = text.index("<answer>"), text.index("</answer>")
    return start < end and text[start + len("<answer>"):end].strip() != "" and not text[end + len("</answer>"):].strip()


def answer_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 for a well-formed `<answer>...</answer>` completion (`well_formed`), else 0.0."""
    return [float(well_formed(completion_text(c))) for c in completions]


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment (eq. 13), as TRL's `get_soft_overlong_punishment`:
    0 for |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache up to L_max; -1 beyond."""

    __name__ = "length"

    def __init__(self, max_completion_length: int, soft_punish_cache: int) -> None:
        self.max_completion_length = max_completion_length
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float]:
        if completion_ids is None:
            raise ValueError("the length reward needs completion_ids (the completions' tokens)")
        start = self.max_completion_length - self.soft_punish_cache
        return [0.0 if len(ids) <= start else (start - len(ids)) / self.soft_punish_cache
                if len(ids) <= self.max_completion_length else -1.0 for ids in completion_ids]


class JudgeReward:
    """A `Judge` as a reward function: `judge.rank` over the completions of each prompt (grouped by
    the prompt's row, wherever they sit in the batch), its scores put back in the batch's order."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge
        self.__name__ = judge.name

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float | None]:
        groups: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault((p.source, repr(p.prompt)), []).append(i)
        order = list(groups.values())
        scores = self.judge.rank([prompts[rows[0]] for rows in order], [[completions[i] for i in rows] for rows in order])
        out: list[float | None] = [None] * len(prompts)
        for rows, values in zip(order, scores):
            for i, value in zip(rows, values):
                out[i] = value
        return out


def callable_name(fn: Callable) -> str:
    """The name TRL logs a reward function under (`trl.trainer.utils.get_callable_name`)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


# ---------------------------------------------------------------------- the set of rewards

@dataclass
class RewardFunction:
    name: str  # as logged: rewards/{name}/mean
    spec: str
    fn: Callable[..., Any]
    weight: float = 1.0
    timeout: float = 0.0  # seconds per call (a user's function); 0: no limit
    judge: Judge | None = None  # set for judge:...: fn takes (Prompt objects, completion texts)
    needs_answer: bool = False


class _Batch:
    """The arguments of one `score` call, as TRL passes them, for all rows or a subset."""

    def __init__(self, prompts: list[Prompt], completions: list[str], completion_ids: Sequence[Sequence[int]] | None,
                 context: dict[str, Any]) -> None:
        self.prompts, self.completions, self.completion_ids, self.context = prompts, completions, completion_ids, context
        keys: dict[str, None] = {}
        for p in prompts:
            keys.update(dict.fromkeys(k for k in p.row if k not in EXCLUDED_COLUMNS))
        if any(p.answer is not None for p in prompts):
            keys.setdefault("answer")
        for key in keys:
            if key in RESERVED or key in context:
                source = next(p.source for p in prompts if key in p.row)
                raise TemperError(f"{source}: the prompt rows' column '{key}' has the name of an argument every reward "
                                  "function is given; rename the column")
        self.columns = {key: [p.row.get(key, p.answer if key == "answer" else None) for p in prompts] for key in keys}

    def kwargs(self, rows: Sequence[int], log_metric: Callable, log_extra: Callable) -> dict[str, Any]:
        completions = [self.completions[i] if isinstance(self.prompts[i].prompt, str)
                       else [{"role": "assistant", "content": self.completions[i]}] for i in rows]
        return {"prompts": [self.prompts[i].prompt for i in rows], "completions": completions,
                "completion_ids": None if self.completion_ids is None else [self.completion_ids[i] for i in rows],
                **{key: [values[i] for i in rows] for key, values in self.columns.items()},
                "log_metric": log_metric, "log_extra": log_extra, **self.context}

    def row(self, i: int) -> str:
        return f"{self.prompts[i].source or f'prompt {i}'} completion {i}"

    def where(self) -> str:
        first, last = self.prompts[0].source, self.prompts[-1].source
        span = first if first == last else f"{first} ... {last}"
        n = len(self.prompts)
        return f"{span} ({n} completion{'' if n == 1 else 's'})"


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _call(fn: Callable, kwargs: dict[str, Any]) -> Any:
    result = fn(**kwargs)
    return asyncio.run(result) if inspect.isawaitable(result) else result


class RewardSet:
    """The reward functions of `specs` (see the module docstring) with their `weights` (1 each by
    default), checked when built: an unknown name, an import path that does not resolve, a weight
    count that does not match, a weight that is not a finite number, two functions logged under one
    name are one-line errors.

    `max_completion_length`: the recipe's, for `length`; `timeout`: seconds per call of a user's
    function or `judge:callable:` (0: no limit), the recipe's `timeout_setting`; `device`: where a
    judge's model runs; `skip_bad_judgements`: a judge's bad judgement is None (counted and warned)
    instead of stopping the run. `specs` may also hold callables (logged under their `__name__`)."""

    def __init__(self, specs: Sequence[str | Callable] | str, weights: Sequence[float] | None = None, *,
                 max_completion_length: int | None = None, timeout: float = DEFAULT_TIMEOUT, device: Any = "cpu",
                 skip_bad_judgements: bool = False, option: str = "rewards=", weights_option: str = "reward_weights=",
                 timeout_setting: str = "judge_timeout") -> None:
        if isinstance(specs, str) or callable(specs):
            specs = [specs]
        if not specs:
            raise TemperError(f"{option}[]: no reward function; name one, e.g. {option}gsm8k "
                              f"(shipped: {', '.join(SHIPPED)}; or MODULE:FUNCTION, judge:JUDGE)")
        self.option, self.timeout_setting = option, timeout_setting
        self.max_completion_length = max_completion_length
        self.timeout = check_timeout(timeout)
        self.device, self.skip_bad_judgements = device, skip_bad_judgements
        self.functions = [self._build(spec) for spec in specs]
        if weights is None:
            weights = [1.0] * len(self.functions)
        weights = list(weights)
        if len(weights) != len(self.functions):
            raise TemperError(f"{weights_option}{weights}: {len(weights)} weights for {len(self.functions)} reward "
                              f"functions ({', '.join(f.name for f in self.functions)}); give one weight each")
        for f, w in zip(self.functions, weights):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise TemperError(f"{weights_option}{weights}: the weight of {f.name} is {w!r}; expected a finite number")
            f.weight = float(w)
        seen: dict[str, str] = {}
        for f in self.functions:
            if f.name in seen:
                raise TemperError(f"{option}: {seen[f.name]} and {f.spec} would both be logged as rewards/{f.name}; "
                                  "give each function its own name")
            seen[f.name] = f.spec
        self.weights = torch.tensor([f.weight for f in self.functions], dtype=torch.float32)
        self.logged_metrics: dict[str, list[float]] = defaultdict(list)
        self.logged_columns: dict[str, list] = defaultdict(list)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    # ------------------------------------------------------------------ building
    def _build(self, spec: str | Callable) -> RewardFunction:
        option = self.option
        if callable(spec):
            return RewardFunction(callable_name(spec), callable_name(spec), spec, timeout=self.timeout)
        if not isinstance(spec, str):
            raise TemperError(f"{option}{spec!r}: expected a reward name, MODULE:FUNCTION or judge:JUDGE")
        spec = spec.strip()
        head, sep, arg = spec.partition(":")
        if head == "judge":
            return self._judge(spec, arg)
        if head in SHIPPED:
            return self._shipped(spec, head, arg if sep else None)
        if not sep:
            close = difflib.get_close_matches(head, [*SHIPPED, "judge"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TemperError(f"{option}{spec}: not a shipped reward ({', '.join(SHIPPED)}){hint}, a MODULE:FUNCTION "
                              "or a judge:JUDGE")
        try:
            fn = import_callable(spec, option)
        except TemperError as e:
            if head in KINDS:
                raise TemperError(f"{e}; a judge as a reward is written judge:{spec}") from None
            raise
        return RewardFunction(callable_name(fn), spec, fn, timeout=self.timeout)

    def _shipped(self, spec: str, name: str, arg: str | None) -> RewardFunction:
        if name == "length":
            limit = self.max_completion_length
            if limit is None or isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise TemperError(f"{self.option}{spec}: the length penalty needs the recipe's max_completion_length "
                                  f"(a positive number of tokens), got {limit!r}")
            cache = limit // DAPO_CACHE_FRACTION
            if arg is not None:
                if not re.fullmatch(r"\d+", arg) or int(arg) > limit:
                    raise TemperError(f"{self.option}{spec}: length:C takes the soft punishment window C in tokens, "
                                      f"0 to max_completion_length={limit}")
                cache = int(arg)
            return RewardFunction("length", spec, SoftOverlongPunishment(limit, cache))
        if name == "prm":
            if not arg:
                raise TemperError(f"{self.option}{spec}: the prm reward takes the process reward model's directory: "
                                  "prm:DIR")
            if not Path(arg).expanduser().is_dir():
                raise TemperError(f"{self.option}{spec}: no such model directory")
            from temper.rewards.process import ProcessReward  # lazy: loads a model only when named

            return RewardFunction(f"prm:{Path(arg.rstrip('/')).name}", spec, ProcessReward(arg, device=self.device))
        if arg is not None:
            raise TemperError(f"{self.option}{spec}: the {name} reward takes no argument; write {name}")
        fn = {"world": world_answer_reward, "gsm8k": gsm8k_reward, "format": answer_format_reward}[name]
        return RewardFunction(name, spec, fn, needs_answer=name in ("world", "gsm8k"))

    def _judge(self, spec: str, judge_spec: str) -> RewardFunction:
        option = f"{self.option}judge:"
        kind, arg = split_spec(judge_spec, option)
        judge = make_judge(judge_spec, device=self.device, skip_bad=self.skip_bad_judgements, option=option,
                           timeout=self.timeout)
        name = f"{kind}:{Path(arg.rstrip('/')).name}" if kind in ("llm", "reward") else judge_spec
        return RewardFunction(name, spec, JudgeReward(judge), judge=judge)

    # ------------------------------------------------------------------ checking and scoring
    def check_prompts(self, prompts: Sequence[Prompt]) -> None:
        """Refuse, before any sampling, a prompt row that a function cannot score: no `answer` for
        world/gsm8k/rule:world, a GSM8K answer with no final number, a column named like an argument."""
        _Batch(list(prompts), [""] * len(prompts), None, {})
        for f in self.functions:
            if f.judge is not None:
                f.judge.check_prompts(prompts)
            if not f.needs_answer:
                continue
            for p in prompts:
                answer = p.row.get("answer", p.answer)
                if answer is None:
                    raise TemperError(f"{p.source}: reward {f.name} needs an 'answer' in every prompt row; this one "
                                      "has none")
                if f.name == "gsm8k":
                    try:
                        gsm8k_reference(answer)
                    except ValueError as e:
                        raise TemperError(f"{p.source}: reward gsm8k: {e}") from None

    def score(self, prompts: Sequence[Prompt | str], completions: Sequence[str],
              completion_ids: Sequence[Sequence[int]] | None = None, **context: Any
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, per_function) for N completions, each with its prompt (`prompts[i]`, a prompt's
        row repeated for each of its completions; its `row` gives the columns): float32 tensors of N,
        NaN where no function (total) or that function (per_function[name]) applies."""
        prompts = [p if isinstance(p, Prompt) else Prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]
        n = len(prompts)
        if not n or len(completions) != n or (completion_ids is not None and len(completion_ids) != n):
            raise TemperError(f"score: {n} prompts, {len(completions)} completions"
                              + ("" if completion_ids is None else f", {len(completion_ids)} completion_ids")
                              + "; expected the same number (> 0) of each")
        batch = _Batch(prompts, list(completions), completion_ids, context)
        per_function: dict[str, torch.Tensor] = {}
        for f in self.functions:
            values = self._values(f, self._run(f, batch), batch)
            per_function[f.name] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
        stacked = torch.stack(list(per_function.values()), dim=1)  # (N, functions)
        total = (stacked * self.weights.unsqueeze(0)).nansum(dim=1)
        unscorable = stacked.isnan().all(dim=1)
        if unscorable.any():
            total[unscorable] = math.nan
            first = int(unscorable.nonzero()[0, 0])
            warnings.warn(f"rewards: {int(unscorable.sum())} of {n} completions got no reward (every function returned "
                          f"None), first {batch.row(first)}; they have no reward (NaN) and should get no advantage",
                          UserWarning, stacklevel=2)
        return total, per_function

    def _run(self, f: RewardFunction, batch: _Batch) -> Any:
        if f.judge is not None:  # the judge names a bad sample itself (or counts it with skip_bad_judgements)
            return f.fn(batch.prompts, batch.completions)
        kwargs = batch.kwargs(range(len(batch.prompts)), self._log_metric, self._log_extra)
        try:
            return call_with_timeout(lambda: _call(f.fn, kwargs), f.timeout, f.name, batch.where(),
                                     kind="reward function", setting=self.timeout_setting)
        except (TemperError, KeyboardInterrupt):
            raise
        except (Exception, SystemExit) as e:  # a user's function may raise anything: the run stops, naming the row
            raise TemperError(f"{self._failing_row(f, batch)}: reward function {f.name} raised {failure(e)}") from None

    def _failing_row(self, f: RewardFunction, batch: _Batch) -> str:
        """The first completion the function fails on alone, or the batch where none does."""
        for i in range(len(batch.prompts)):
            kwargs = batch.kwargs([i], _ignore, _ignore)
            try:
                call_with_timeout(lambda kwargs=kwargs: _call(f.fn, kwargs), f.timeout, f.name, batch.row(i),
                                  kind="reward function", setting=self.timeout_setting)
            except (TemperError, KeyboardInterrupt):
                break
            except (Exception, SystemExit):
                return batch.row(i)
        return f"{batch.where()} (no single completion fails alone)"

    def _values(self, f: RewardFunction, raw: Any, batch: _Batch) -> list[float | None]:
        n = len(batch.prompts)
        expected = f"expected a list of {n} numbers, one per completion (None where it does not apply)"
        if isinstance(raw, (torch.Tensor, np.ndarray)):
            raw = raw.tolist()
        if not isinstance(raw, (list, tuple)):
            raise TemperError(f"{batch.where()}: reward function {f.name} returned {type(raw).__name__} "
                              f"{raw!r:.60}; {expected}")
        if len(raw) != n:
            raise TemperError(f"{batch.where()}: reward function {f.name} returned {len(raw)} values for {n} "
                              f"completions; {expected}")
        out: list[float | None] = []
        for i, value in enumerate(raw):
            if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
                value = value.item()
            if value is None:
                out.append(None)
                continue
            if not isinstance(value, numbers.Real):  # bool is a Real: True is 1.0
                raise TemperError(f"{batch.row(i)}: reward function {f.name} returned {type(value).__name__} "
                                  f"{value!r:.60}, not a number (None says it does not apply)")
            value = float(value)
            if not math.isfinite(value):
                raise TemperError(f"{batch.row(i)}: reward function {f.name} returned {value}; a reward is a finite "
                                  "number (None, not NaN, says it does not apply)")
            out.append(value)
        return out

    # ------------------------------------------------------------------ metrics and logs
    def _log_metric(self, name: str, value: float) -> None:
        self.logged_metrics[name].append(float(value))

    def _log_extra(self, column: str, values: list) -> None:
        self.logged_columns[column].extend(values)

    def pop_logged(self) -> tuple[dict[str, float], dict[str, list]]:
        """What the functions logged since the last call: each `log_metric` name's mean (as TRL averages
        them per logging step), and the `log_extra` columns."""
        metrics = {name: sum(values) / len(values) for name, values in self.logged_metrics.items() if values}
        columns = dict(self.logged_columns)
        self.logged_metrics.clear()
        self.logged_columns.clear()
        return metrics, columns

    def close(self) -> None:
        for f in self.functions:
            if f.judge is not None:
                f.judge.close()


def nanstd(values: torch.Tensor) -> torch.Tensor:
    """The standard deviation of the non-NaN values, with Bessel's correction (TRL's `nanstd`:
    NaN for fewer than two values)."""
    mean = torch.nanmean(values)
    variance = torch.nanmean((values - mean) ** 2)
    count = (~values.isnan()).sum()
    correction = torch.where(count > 1, count / (count - 1), torch.tensor(math.nan))
    return torch.sqrt(variance * correction)


def reward_metrics(total: torch.Tensor, per_function: dict[str, torch.Tensor]) -> dict[str, float]:
    """TRL's reward metrics of one generation batch: `reward` and `reward_std` (nanmean / nanstd of
    the totals, unscored completions left out) and `rewards/{name}/mean|std` of each function over
    the completions it applies to (NaN when it applies to none, or std of one value, as in TRL)."""
    out = {"reward": torch.nanmean(total).item(), "reward_std": nanstd(total).item()}
    for name, values in per_function.items():
        out[f"rewards/{name}/mean"] = torch.nanmean(values).item()
        out[f"rewards/{name}/std"] = nanstd(values).item()
    return out


__all__ = ["JudgeReward", "RewardFunction", "RewardSet", "SHIPPED", "SoftOverlongPunishment", "answer_format_reward",
           "answer_span", "callable_name", "completion_text", "gsm8k_reference", "gsm8k_reward", "nanstd",
           "reward_metrics", "well_formed", "world_answer_reward"]
