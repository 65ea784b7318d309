"""Step-labelled solutions for process reward models: rows, tokens, batches.

Rows: TRL's stepwise-supervision format, `prompt` (a string, or messages ending with a user
turn) + `completions` (the solution's steps, a list of strings) + `labels` (one JSON boolean a
step: is the solution still right after it). The built-in world writes them in `prm/*`.

Tokens follow TRL's PRMTrainer (0.13-0.19, the last TRL with one): each step is tokenised on its
own and followed by the tokens of the step separator (`"\\n"`), and a step's label sits on its
last token (the separator's end), where its score is read. The prompt is the text itself after
the tokenizer's leading specials (BOS) for a string, or the chat template's render with the
generation prompt for messages (TRL renders no template). So a step's score depends only on
the prompt and the steps up to it, and scoring the prefix that ends there with a
sequence-classification reward model (transformers' last-non-pad-token rule) gives the same number.

Truncation to `max_len` tokens: a prompt keeps its end, down to half the context (or to the room
the steps leave, where that is more); then the steps keep their start, and a step cut before
its end loses its label (counted: `steps_dropped`). A row left with no labelled step is bad
(`no_step_fits`). Bad rows (skipped, counted by reason, named by `file:line`; refused above
`max_bad_row_fraction`): missing_column, no_columns, bad_type, bad_labels, empty_step,
bad_messages, empty_prompt, no_step_fits, last_step_cut.

Outcome labels (`step_labels="last"`, an outcome-supervised reward model on the same rows,
Lightman et al. 2023's ORM): the whole solution is kept as above, but only its last step carries
a label, the solution's outcome (its last label: right iff every step is); the other steps are
unlabelled. A row whose last step is cut off by `max_len` has no place for its outcome (it must
not sit on an earlier step): it is bad (`last_step_cut`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from temper.data.chat import check_messages, render, render_kwargs
from temper.data.loader import ExampleLoader
from temper.data.preference import _leading_special_ids
from temper.data.readers import iter_records, json_type
from temper.data.rows import DEFAULT_MAX_BAD_ROW_FRACTION, BadRow, BadRows, keep_end
from temper.data.sft import _remap, missing_column
from temper.errors import TemperError

STEP_SEPARATOR = "\n"  # TRL PRMConfig's default step_separator
COLUMNS = ("prompt", "completions", "labels")
STEP_LABELS = ("each", "last")  # a label on every step (process supervision) or the outcome on the last (outcome)


@dataclass
class StepwiseStats:
    rows: int = 0
    solutions: int = 0
    steps: int = 0  # labelled steps kept
    steps_dropped: int = 0  # steps cut off by max_len (their labels unused)
    prompt_truncated: int = 0
    bad: BadRows = field(default_factory=lambda: BadRows("step-labelled rows"))

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.bad.skipped.items())) or "none"
        return (f"{self.rows} rows read; {self.solutions} solutions with {self.steps} labelled steps kept; skipped: "
                f"{skipped}; {self.prompt_truncated} prompts kept their end, {self.steps_dropped} steps cut off")

    def counts(self) -> dict:
        return {"rows_read": self.rows, "skipped_rows": dict(self.bad.skipped), "labelled_steps": self.steps,
                "steps_dropped": self.steps_dropped, "prompt_truncated": self.prompt_truncated}


@dataclass
class EncodedSolution:
    ids: list[int]  # prompt + steps, each followed by the separator
    step_ends: list[int]  # the position of each kept step's last token
    labels: list[bool]
    source: str


def row_to_steps(row: dict, columns: dict[str, str] | None = None) -> tuple[str | list, list[str], list[bool]]:
    """(prompt, steps, labels) of one row; raises BadRow (message without the source)."""
    if why := missing_column(row, columns):
        raise BadRow("missing_column", why)
    row = _remap(row, columns or {})
    if not all(k in row for k in COLUMNS):
        keys = ", ".join(map(str, row)) or "none"
        raise BadRow("no_columns", f"no step-labelled columns (keys: {keys}); expected prompt + completions (a list "
                                   "of steps) + labels (one true/false a step)")
    prompt, steps, labels = row["prompt"], row["completions"], row["labels"]
    if not isinstance(prompt, (str, list)):
        raise BadRow("bad_type", f"field 'prompt' is {json_type(prompt)} (expected a string or a list of messages)")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise BadRow("bad_type", "field 'completions' must be a non-empty list of strings (the steps)")
    if not isinstance(labels, list) or not all(isinstance(v, bool) for v in labels):
        raise BadRow("bad_labels", "field 'labels' must be a list of true/false, one a step")
    if len(labels) != len(steps):
        raise BadRow("bad_labels", f"{len(labels)} labels for {len(steps)} steps: give one label a step")
    if empty := [i for i, s in enumerate(steps) if not s.strip()]:
        raise BadRow("empty_step", f"step {empty[0]} is empty")
    if isinstance(prompt, list):
        try:
            check_messages(prompt, "prompt", prompt=True)
        except TemperError as e:
            raise BadRow("bad_messages", str(e)) from None
    elif not prompt.strip():
        raise BadRow("empty_prompt", "'prompt' is empty")
    return prompt, steps, labels


class StepEncoder:
    """Token ids of a prompt and its steps (the module docstring)."""

    def __init__(self, tokenizer, template: str | None, *, max_len: int, separator: str = STEP_SEPARATOR,
                 step_labels: str = "each") -> None:
        if max_len < 2:
            raise TemperError(f"max_len must be >= 2, got {max_len}")
        if step_labels not in STEP_LABELS:
            raise TemperError(f"step_labels={step_labels}: expected one of {', '.join(STEP_LABELS)}")
        self.step_labels = step_labels
        self.tokenizer, self.template, self.max_len = tokenizer, template, max_len
        self.leading = _leading_special_ids(tokenizer)
        self.separator_ids = self._encode(separator)
        if not self.separator_ids:
            raise TemperError(f"the step separator {separator!r} encodes to no tokens")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.backend.encode(text, add_special_tokens=False).ids)

    def prompt_ids(self, prompt: str | list, source: str) -> list[int]:
        if isinstance(prompt, str):
            return self.leading + self._encode(prompt)
        if self.template is None:
            raise TemperError(f"{source}: conversational data needs a chat template, and the model has none: "
                              "pass template=chatml (or llama3, plain, a .jinja file)")
        return self._encode(render(self.template, prompt, add_generation_prompt=True,
                                   **render_kwargs(self.tokenizer)))

    def steps_ids(self, steps: list[str]) -> list[list[int]]:
        return [self._encode(step) + self.separator_ids for step in steps]

    def encode(self, prompt: str | list, steps: list[str], labels: list[bool], source: str,
               stats: StepwiseStats | None = None) -> EncodedSolution:
        prompt_ids, steps_ids = self.prompt_ids(prompt, source), self.steps_ids(steps)
        if not prompt_ids:
            raise BadRow("empty_prompt", "the prompt gives no tokens (and the tokenizer adds no BOS)")
        total = sum(map(len, steps_ids))
        if len(prompt_ids) + total > self.max_len:
            keep = min(len(prompt_ids), max(self.max_len // 2, self.max_len - total, 1))
            if keep < len(prompt_ids) and stats is not None:
                stats.prompt_truncated += 1
            prompt_ids = keep_end(prompt_ids, keep, self.tokenizer.bos_id)
        ids, ends, kept = list(prompt_ids), [], []
        for step, label in zip(steps_ids, labels):
            if len(ids) + len(step) > self.max_len:
                break
            ids += step
            ends.append(len(ids) - 1)
            kept.append(label)
        if not kept:
            raise BadRow("no_step_fits", f"not one step ends within {self.max_len} tokens")
        if self.step_labels == "last":  # the outcome, on the last step only
            if len(kept) < len(steps):
                raise BadRow("last_step_cut", f"the last step does not end within {self.max_len} tokens, so the "
                                              "solution's outcome label has no step to sit on")
            ends, kept = ends[-1:], [labels[-1]]
        elif stats is not None:
            stats.steps_dropped += len(steps) - len(kept)
        return EncodedSolution(ids, ends, kept, source)


def load_stepwise(spec, tokenizer, template: str | None, *, max_len: int, columns: dict[str, str] | None = None,
                  skip_bad_rows: bool = True, max_bad_row_fraction: float = DEFAULT_MAX_BAD_ROW_FRACTION,
                  limit: int = 0, step_labels: str = "each") -> tuple[list[EncodedSolution], StepwiseStats]:
    """Read and encode step-labelled rows, a label on each step or the outcome on the last (`step_labels`,
    the module docstring); bad rows skipped and counted (or the first refused)."""
    stats = StepwiseStats()
    bad = stats.bad.set_rule(skip_bad_rows, max_bad_row_fraction)
    encoder = StepEncoder(tokenizer, template, max_len=max_len, step_labels=step_labels)
    out: list[EncodedSolution] = []
    for rec in iter_records(spec):
        stats.rows += 1
        try:
            if not isinstance(rec.data, dict):
                raise BadRow("bad_type", "a row is a JSON object")
            prompt, steps, labels = row_to_steps(rec.data, columns)
            out.append(encoder.encode(prompt, steps, labels, rec.source, stats))
        except BadRow as e:
            bad.add(e, rec.source)
        if limit and len(out) >= limit:
            break
    bad.check(stats.rows)
    if not out:
        raise TemperError(f"{spec}: no usable step-labelled rows ({stats.summary()})")
    stats.solutions, stats.steps = len(out), sum(len(s.labels) for s in out)
    return out, stats


def stepwise_fingerprint(solutions: list[EncodedSolution]) -> str:
    h = hashlib.sha256()
    for s in solutions:
        for part in (s.ids, s.step_ends, [int(v) for v in s.labels]):
            h.update(np.asarray(part, dtype=np.int32).tobytes())
            h.update(b"|")
        h.update(b";")
    return h.hexdigest()[:16]


@dataclass
class StepBatch:
    """B solutions right-padded: `input_ids` (B, T); and every labelled step of them, flattened:
    `rows` (N,) its solution's row and `positions` (N,) where its score is read, `labels` (N,)
    1.0 right / 0.0 wrong."""

    input_ids: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    num_solutions: int

    def to(self, device) -> StepBatch:
        return StepBatch(self.input_ids.to(device), self.rows.to(device), self.positions.to(device),
                         self.labels.to(device), self.num_solutions)


def collate_steps(solutions: list[EncodedSolution], pad_id: int) -> StepBatch:
    T = max(len(s.ids) for s in solutions)
    input_ids = torch.full((len(solutions), T), pad_id, dtype=torch.long)
    rows, positions, labels = [], [], []
    for r, s in enumerate(solutions):
        input_ids[r, :len(s.ids)] = torch.tensor(s.ids)
        rows += [r] * len(s.step_ends)
        positions += s.step_ends
        labels += [float(v) for v in s.labels]
    return StepBatch(input_ids, torch.tensor(rows), torch.tensor(positions), torch.tensor(labels), len(solutions))


class StepwiseLoader(ExampleLoader):
    """`ExampleLoader` over step-labelled solutions, collated into `StepBatch`es."""

    def __init__(self, solutions: list[EncodedSolution], *, batch_size: int, pad_id: int, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                 max_len: int = 0) -> None:
        if not solutions:
            raise TemperError("no step-labelled data to load")
        self.pad_id, self.seq_len = pad_id, max_len
        super().__init__(solutions, partial(collate_steps, pad_id=pad_id), batch_size=batch_size, seed=seed,
                         shuffle=shuffle, rank=rank, world_size=world_size, grad_accum=grad_accum)


__all__ = ["COLUMNS", "STEP_LABELS", "STEP_SEPARATOR", "EncodedSolution", "StepBatch", "StepEncoder",
           "StepwiseLoader", "StepwiseStats", "collate_steps", "load_stepwise", "row_to_steps", "stepwise_fingerprint"]
