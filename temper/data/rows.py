"""What every reader of training rows shares: the rule for bad rows, and the one for long rows.

Bad rows (`BadRows`): a row that cannot be trained on (an empty answer, a column of the wrong
type, a conversation that does not alternate, ...) is skipped and counted by reason, and the
pass over the data ends with one warning naming how many of each reason and the first
`file:line` of each. A small share of bad rows is what real data sets hold (HH-RLHF's
harmless-base test split: 4 of 2,312 rows answer with a lone space), so by default they
are skipped; a large share means the data is not what the reader thinks it is (a wrong
column mapping, another format), so above `max_bad_row_fraction` of the rows read
(default 0.1) the run stops and says so, naming the counts and the first of each reason.
`skip_bad_rows=false` is strict: the first bad row stops the run with its `file:line`.

Long rows (`fit_to_context`): a sequence longer than the context is truncated, never dropped.
The answer (the trained part) keeps its start, as TRL 1.x's default `truncation_mode=
"keep_start"` keeps the start of prompt + answer; a prompt that does not leave the answer
room keeps its end (its last tokens lead into the answer; a leading BOS stays), as TRL before
1.0 cut prompts with `max_prompt_length`. What differs from TRL 1.x: TRL keeps every prompt
whole and filters out, uncounted, the rows whose prompt alone fills `max_length`; here such a
prompt gives up its start instead, down to half the context, so every row trains and every
cut is counted.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from temper.errors import TemperError

DEFAULT_MAX_BAD_ROW_FRACTION = 0.1
SKIP_HINT = "set skip_bad_rows=true to skip and count such rows"


class BadRow(TemperError):
    """A row that cannot be trained on: `reason` is its key in the counts, `detail` says what is wrong.

    `source` ("file:line"), when the raiser knows it, leads the message; otherwise whoever
    counts the row adds it."""

    def __init__(self, reason: str, detail: str, source: str | None = None) -> None:
        super().__init__(f"{source}: {detail}" if source else detail)
        self.reason, self.detail, self.source = reason, detail, source


@dataclass
class BadRows:
    """The bad rows of one data set: skipped and counted by reason up to a share, refused above it.

    `skip=False`: `add` raises at the first bad row, naming its `file:line`. Otherwise `add`
    counts it (and keeps the first of each reason), and `check(rows)`, after a pass over
    `rows` rows, warns once for the rows skipped since `since`, or refuses when more than
    `max_fraction` of the rows read are bad (`max_fraction=0`: any bad row, after counting
    them all; 1: never)."""

    what: str = "rows"  # how the warning names them: "preference rows", "SFT rows"
    skip: bool = True
    max_fraction: float = DEFAULT_MAX_BAD_ROW_FRACTION
    skipped: Counter = field(default_factory=Counter)  # reason -> rows skipped
    first: dict[str, str] = field(default_factory=dict)  # reason -> "file:line: what is wrong" of its first row

    def __post_init__(self) -> None:
        self.set_rule(self.skip, self.max_fraction)

    def set_rule(self, skip: bool, max_fraction: float) -> BadRows:
        """Skip (or stop at the first) and the share refused above, for the passes to come."""
        if not 0.0 <= max_fraction <= 1.0:
            raise TemperError(f"max_bad_row_fraction must be between 0 and 1, got {max_fraction}")
        self.skip, self.max_fraction = skip, max_fraction
        return self

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def add(self, error: BadRow, source: str) -> None:
        """Count a bad row found at `source`, or stop at it (skip=False)."""
        where = error.source or source
        if not self.skip:
            raise TemperError(f"{where}: {error.detail} ({SKIP_HINT})")
        self.skipped[error.reason] += 1
        self.first.setdefault(error.reason, f"{where}: {error.detail}")

    def describe(self, reasons: Counter | None = None) -> str:
        """'2 empty_response, 1 identical; first of each: f:3: ...; f:9: ...' for `reasons` (default: all)."""
        reasons = self.skipped if reasons is None else reasons
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        return f"{counts}; first of each: " + "; ".join(self.first[reason] for reason in sorted(reasons))

    def check(self, rows: int, since: Counter | None = None) -> None:
        """After a pass over the data (`rows` rows read so far): refuse above the share, else warn for the new ones."""
        if rows and self.total > self.max_fraction * rows:
            raise TemperError(
                f"too many bad {self.what}: {self.total} of {rows} read ({self.total / rows:.1%}, above "
                f"max_bad_row_fraction={self.max_fraction:g}): {self.describe()}; fix the data or its columns= "
                "mapping, or raise max_bad_row_fraction to skip them")
        new = self.skipped - (since or Counter())
        if new:
            warnings.warn(f"{sum(new.values())} bad {self.what} skipped ({self.describe(new)})", UserWarning,
                          stacklevel=3)


def fit_to_context(prompt_len: int, answer_len: int, max_len: int) -> tuple[int, int]:
    """(prompt tokens kept, answer tokens kept) of a prompt + answer in a context of `max_len` input
    positions (a sequence of at most max_len + 1 tokens: the last is only a target).

    A sequence that fits is kept whole. Otherwise the prompt keeps its end: as many tokens as
    the answer leaves room for, but no fewer than half the context (nor than one, nor more
    than it has); then the answer keeps its start, to fit. For a pair, `answer_len` is the
    longer answer's, so both answers follow the same prompt."""
    assert max_len >= 1 and prompt_len >= 0 and answer_len >= 0
    room = max_len + 1
    if prompt_len + answer_len <= room:
        return prompt_len, answer_len
    prompt_kept = min(prompt_len, max(room - answer_len, max_len // 2, 1))
    return prompt_kept, min(answer_len, room - prompt_kept)


def keep_end(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last `keep` of `ids`, where a leading BOS stays first (it counts in `keep`)."""
    if len(ids) <= keep:
        return list(ids)
    if bos_id is not None and ids and ids[0] == bos_id and keep > 1:
        return [bos_id, *ids[len(ids) - keep + 1:]]
    return list(ids[len(ids) - keep:])


__all__ = ["BadRow", "BadRows", "DEFAULT_MAX_BAD_ROW_FRACTION", "SKIP_HINT", "fit_to_context", "keep_end"]
