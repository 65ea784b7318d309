"""Preference data for the DPO family and KTO: formats, tokens, bad rows, batches.

Formats (TRL 1.x's "preference" and "unpaired preference" types; column names can be
remapped with `columns={"prompt": "question", ...}` as in SFT):

  explicit prompt   prompt + chosen + rejected: strings, or message lists (prompt: the
                    conversation up to its last user turn; chosen/rejected: the assistant
                    message(s)). A string among message lists is a user prompt or an
                    assistant answer, as in SFT. A row may repeat its prompt at the start
                    of both answers (full conversations, or full texts): the prompt is
                    then stripped from both (counted in `prompt_stripped`); a row whose
                    answers are full conversations that do not start with its prompt, or
                    whose prompt text begins one answer but not the other, is a bad row.
  implicit prompt   chosen + rejected only: the prompt is their shared start, following
                    TRL's `extract_prompt`: for message lists, the longest common prefix
                    of messages (backed off, here, to end on a user or tool turn); for
                    strings, the longest common prefix of characters, a trailing space
                    handed back to the answers. With `implicit_prompt="turn"` (the
                    default) a string prefix that holds a `\\n\\nAssistant:` marker
                    (HH-RLHF's dialogues) is cut back to end right after the last one, so
                    the prompt ends at the turn boundary and words both answers happen to
                    start with stay in the answers (TRL would move them into the prompt);
                    `implicit_prompt="common_prefix"` is TRL's rule to the letter.
  unpaired (KTO)    prompt + completion + label (a JSON boolean). Paired rows given to
                    `read_unpaired` become two examples (chosen: true, rejected: false),
                    as TRL's KTO trainer unpairs them.

Files: whatever `temper.data.readers` reads (.jsonl, .jsonl.gz, .json, .parquet,
directories, globs); every row is named `file:line`.

Tokens (what TRL 1.x's DPO trainer computes, so a pair scores the tokens SFT trained):
  message rows  prompt text = the chat template's render of the prompt with the generation
                prompt; full text = the render of prompt + answer. Both are tokenised as
                `apply_chat_template(tokenize=True)` does (no special tokens added: the
                template writes its own BOS), and the answer's ids are the full ids after
                the prompt's. The answer keeps the template's end-of-turn marker
                (`<|im_end|>\\n` in ChatML); as in SFT, an EOS is appended only where the
                template renders no end marker. prompt + chosen ids are exactly the ids SFT
                trains for the conversation prompt + chosen.
  string rows   used as they are, no template (HH-RLHF carries its own Human:/Assistant:
                markers): prompt ids = the special tokens the tokenizer adds in front of a
                text (BOS for Llama-style tokenizers, none for temper's) + the prompt's
                tokens; answer ids = the tokens of prompt + answer after the prompt's, then
                EOS (TRL appends the EOS text unless the answer ends with it).
  Where the prompt's tokens are not the start of the prompt + answer tokens (a token
  straddles the boundary) the row is bad (`token_boundary`); TRL only warns and slices.
  Memory: the encoder needs ~200 bytes per character of one input (a 20 MB row took 4.3 GB),
  and truncation keeps at most max_len + 1 tokens, so a prompt or answer text longer than
  `max_chars` = 2 (max_len + 2) x the most characters one token stands for is cut by
  characters before it is tokenised (a prompt keeps its end, and a leading BOS text; an answer
  its start). That many characters make more tokens than the context holds, so truncation
  then cuts the same pair (counted the same), and the tokens kept lie far from the cut.

Truncation (`max_len`: the context, `seq_len` in `temper dpo` and so named in messages, i.e.
at most max_len input positions, so a sequence holds at most max_len + 1 tokens;
`max_prompt_len`: optional), `temper.data.rows.fit_to_context`'s rule: long rows are cut and
counted, never dropped:
  a prompt over max_prompt_len keeps its last max_prompt_len tokens (and its leading BOS);
  a pair whose prompt + longer answer does not fit max_len then cuts its prompt's start
  (keeping the end that leads into the answers) down to half the context, or to the room the
  answers leave where that is more; then its answers keep their start, cut at the end to fit
  (a cut answer loses its EOS). Counted: `truncated` (pairs with any cut), `prompt_truncated`
  (prompts that lost their start), `answer_truncated` (pairs with an answer that lost its end).
  TRL 1.x (`max_length`, `truncation_mode="keep_start"`, no `max_prompt_length`) keeps the start
  of each prompt + answer, so a long prompt stays whole and a prompt that fills `max_length` is
  filtered out uncounted; here that prompt keeps its end and the pair trains. An unpaired
  example (KTO) is cut the same way, with its one completion.

Bad rows are never trained silently (`temper.data.rows.BadRows`): by default they are
skipped, counted by reason (`PreferenceStats.skipped`), and one warning names the first row
of each reason; more than `max_bad_row_fraction` (0.1) of the rows read bad stops the run
with the counts; `skip_bad_rows=False` stops at the first with `file:line: what is wrong`.
Reasons: missing_column (a `columns=` rename names a column the row lacks), no_columns,
bad_type, bad_messages, empty_response, identical, no_common_prefix, prompt_not_prefix,
empty_prompt, token_boundary, identical_after_truncation, bad_label, bad_margin.

Margins: a paired row may carry TRL RewardTrainer's optional `margin` column (a number, or
null), kept on the pair (`EncodedPair.margin`) for a reward model's loss; the DPO family
ignores it. A margin that is not a finite number is a bad row (`bad_margin`).

Batches: `PreferenceLoader` yields `PairBatch`es holding B pairs as 2B right-padded rows,
the B chosen first and then the B rejected (one concatenated forward), with targets
shifted (targets[t] = token t+1) and IGNORE_INDEX on the prompt and padding; or, for
unpaired data, `UnpairedBatch`es of B rows with their labels (and, with `kl=True`, B more
mismatched rows for KTO's KL estimate, as TRL builds them); with `sequences=True`,
`SequencePairBatch`es of whole right-padded sequences and their lengths, what a reward
model reads (every token, no targets).
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from temper.data.chat import check_messages, render, render_kwargs
from temper.data.loader import ExampleLoader
from temper.data.readers import iter_records, json_type
from temper.data.rows import DEFAULT_MAX_BAD_ROW_FRACTION, BadRow, BadRows, fit_to_context, keep_end
from temper.data.sft import Batch, _ends_with_end_marker, _remap, missing_column
from temper.errors import TemperError
from temper.losses import IGNORE_INDEX

IMPLICIT_PROMPT_RULES = ("turn", "common_prefix")
# Where a string dialogue hands the turn to the assistant (HH-RLHF's format).
ASSISTANT_TURN_MARKERS = ("\n\nAssistant:",)
# The columns a row may carry, which `columns=` may rename.
COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "system", "margin")


# ----------------------------------------------------------------------------- rows


@dataclass
class PreferencePair:
    prompt: str | list[dict]  # text, or messages ending with a user (or tool) turn
    chosen: str | list[dict]  # text, or the assistant message(s)
    rejected: str | list[dict]
    source: str  # "file:line"
    margin: float | None = None  # the optional `margin` column (reward models: r_w - r_l must pass it)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class UnpairedExample:
    prompt: str | list[dict]
    completion: str | list[dict]
    label: bool  # True: desirable
    source: str

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class PreferenceStats:
    rows: int = 0  # rows read
    pairs: int = 0  # pairs (or unpaired examples) encoded and kept
    bad: BadRows = field(default_factory=lambda: BadRows("preference rows"))  # skipped rows by reason
    truncated: int = 0  # kept pairs with any cut (a prompt's start, an answer's end) to fit max_len
    prompt_truncated: int = 0  # of those, prompts that lost their start (max_prompt_len, or to fit max_len)
    answer_truncated: int = 0  # of those, pairs with an answer that lost its end to fit max_len
    prompt_stripped: int = 0  # rows that repeated their prompt at the start of the answers
    unpaired: bool = False
    max_len: int = 0  # the context the pairs were cut to (for the summary)

    @property
    def skipped(self) -> Counter:  # reason -> rows skipped
        return self.bad.skipped

    @property
    def first_bad(self) -> dict[str, str]:  # reason -> "file:line: message" of its first row
        return self.bad.first

    def summary(self) -> str:
        what = "examples" if self.unpaired else "pairs"
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        context = f"seq_len={self.max_len}" if self.max_len else "seq_len"
        answers = "an answer that lost its end" if not self.unpaired else "a completion that lost its end"
        cuts = (f" ({self.prompt_truncated} prompts kept their end, {self.answer_truncated} with {answers})"
                if self.truncated else "")
        return (f"{self.rows} rows read; {self.pairs} {what} kept; skipped: {skipped}; {self.truncated} {what} "
                f"truncated to fit {context}{cuts}; {self.prompt_stripped} rows repeated their prompt in the answers "
                "(stripped)")

    def counts(self) -> dict:
        """The numbers of `summary()`, for a run's summary.json."""
        return {"rows_read": self.rows, "skipped_rows": dict(self.skipped), "truncated": self.truncated,
                "prompt_truncated": self.prompt_truncated, "answer_truncated": self.answer_truncated}


def _kind(value: Any) -> str:
    return json_type(value)


def _field(row: dict, name: str) -> str | list:
    value = row[name]
    if not isinstance(value, (str, list)):
        raise BadRow("bad_type", f"field '{name}' is {_kind(value)} (expected a string or a list of messages)")
    return value


def _messages(value: str | list, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _check(messages: list[dict], what: str, *, prompt: bool = False) -> None:
    try:
        check_messages(messages, what, prompt=prompt)
    except TemperError as e:
        raise BadRow("bad_messages", str(e)) from None


def _check_answer(answer: str | list, name: str) -> None:
    """An answer must have text: a non-blank string, or assistant messages with content."""
    if isinstance(answer, str):
        if not answer.strip():
            raise BadRow("empty_response", f"'{name}' is empty")
        return
    if not answer:
        raise BadRow("empty_response", f"'{name}' has no messages")
    for i, m in enumerate(answer):
        if (isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)
                and not m["content"].strip() and not m.get("tool_calls")):
            raise BadRow("empty_response", f"'{name}' message {i}: the assistant's content is empty")
        if isinstance(m, dict) and m.get("role") in ("user", "system"):
            raise BadRow("bad_messages", f"'{name}' message {i}: an answer holds only assistant (and tool) "
                                         f"messages, got {m.get('role')!r}")


def _common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_implicit_prompt(chosen: str | list, rejected: str | list, rule: str = "turn"
                          ) -> tuple[str | list, str | list, str | list]:
    """(prompt, chosen, rejected) of an implicit-prompt pair: the shared start is the prompt.

    Messages: the longest common prefix of messages, backed off to end on a user or tool
    turn. Strings: the longest common prefix of characters; where the first difference
    follows a space, the space goes to the answers (TRL's `extract_prompt`); with rule
    "turn", a prefix holding an `ASSISTANT_TURN_MARKERS` marker ends right after the last one.
    """
    if rule not in IMPLICIT_PROMPT_RULES:
        raise TemperError(f"implicit_prompt={rule!r}: expected one of {', '.join(IMPLICIT_PROMPT_RULES)}")
    if type(chosen) is not type(rejected):
        raise BadRow("bad_type", "'chosen' and 'rejected' must both be strings or both be message lists")
    if chosen == rejected:
        raise BadRow("identical", "'chosen' and 'rejected' are identical")
    n = _common_prefix_length(chosen, rejected)
    if isinstance(chosen, list):
        while n and not (isinstance(chosen[n - 1], dict) and chosen[n - 1].get("role") in ("user", "tool")):
            n -= 1
        if n == 0:
            raise BadRow("no_common_prefix", "'chosen' and 'rejected' share no prompt (no common messages "
                                             "ending with a user turn)")
        return chosen[:n], chosen[n:], rejected[n:]
    if n < min(len(chosen), len(rejected)) and n and chosen[n - 1] == " ":
        n -= 1  # TRL: the space before the first difference belongs to the answers
    if rule == "turn":
        at = max(chosen.rfind(marker, 0, n) + len(marker) if chosen.rfind(marker, 0, n) >= 0 else -1
                 for marker in ASSISTANT_TURN_MARKERS)
        if at > 0:
            n = at
    if n == 0:
        raise BadRow("no_common_prefix", "'chosen' and 'rejected' share no prompt (they differ from the first "
                                         "character)")
    return chosen[:n], chosen[n:], rejected[n:]


def _strip_repeated_prompt(prompt: str | list, chosen: str | list, rejected: str | list
                           ) -> tuple[str | list, str | list, bool]:
    """Answers that repeat the prompt at their start (full conversations / full texts) lose it."""
    if isinstance(prompt, list):
        full = [isinstance(a, list) and any(isinstance(m, dict) and m.get("role") in ("user", "system")
                                            for m in a) for a in (chosen, rejected)]
        if not any(full):
            return chosen, rejected, False
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if not (isinstance(answer, list) and answer[:len(prompt)] == prompt):
                raise BadRow("prompt_not_prefix", f"'{name}' is a whole conversation but does not start with "
                                                  "the row's prompt")
        return chosen[len(prompt):], rejected[len(prompt):], True
    if not prompt or not isinstance(chosen, str) or not isinstance(rejected, str):
        return chosen, rejected, False
    starts = [chosen.startswith(prompt), rejected.startswith(prompt)]
    if all(starts):
        return chosen[len(prompt):], rejected[len(prompt):], True
    if any(starts):
        name = "chosen" if starts[0] else "rejected"
        raise BadRow("prompt_not_prefix", f"the prompt text begins '{name}' but not the other answer: give "
                                          "both answers with the prompt in front, or neither")
    return chosen, rejected, False


def _with_system(row: dict, prompt: list[dict]) -> list[dict]:
    system = row.get("system")
    if isinstance(system, str) and system and prompt and prompt[0].get("role") != "system":
        return [{"role": "system", "content": system}, *prompt]
    return prompt


def detect_preference_format(row: dict) -> str | None:
    if "chosen" in row and "rejected" in row:
        return "explicit" if "prompt" in row else "implicit"
    if "prompt" in row and "completion" in row and "label" in row:
        return "unpaired"
    return None


def check_columns(columns: dict[str, str]) -> None:
    """A `columns.OURS=THEIRS` rename must name one of temper's preference columns."""
    for ours in columns:
        if ours not in COLUMNS:
            close = difflib.get_close_matches(str(ours), COLUMNS, n=1)
            hint = f" (did you mean 'columns.{close[0]}'?)" if close else ""
            raise TemperError(f"columns.{ours}: not a preference column{hint}; columns renames {', '.join(COLUMNS)}")


def _remap_columns(row: dict, columns: dict[str, str] | None) -> dict:
    """The row with `columns` renames applied; a rename whose column the row lacks is a bad row."""
    if why := missing_column(row, columns):
        raise BadRow("missing_column", why)
    return _remap(row, columns or {})


def _no_columns(row: dict) -> BadRow:
    keys = ", ".join(map(str, row)) or "none"
    return BadRow("no_columns", f"no preference columns found (keys: {keys}); expected prompt+chosen+rejected, "
                                "chosen+rejected or prompt+completion+label (remap with columns.chosen=... etc.)")


def row_to_pair(row: dict, source: str, columns: dict[str, str] | None = None, *,
                implicit_prompt: str = "turn", stats: PreferenceStats | None = None) -> PreferencePair:
    """One paired row -> a `PreferencePair`; raises `BadRow` (message without the source)."""
    row = _remap_columns(row, columns)
    kind = detect_preference_format(row)
    if kind not in ("explicit", "implicit"):
        raise _no_columns(row)
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if kind == "implicit":
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, implicit_prompt)
    else:
        prompt = _field(row, "prompt")
        conversational = any(isinstance(v, list) for v in (prompt, chosen, rejected))
        if conversational:
            prompt = _messages(prompt, "user")
            chosen, rejected = _messages(chosen, "assistant"), _messages(rejected, "assistant")
        chosen, rejected, stripped = _strip_repeated_prompt(prompt, chosen, rejected)
        if stripped and stats is not None:
            stats.prompt_stripped += 1
    _check_answer(chosen, "chosen")
    _check_answer(rejected, "rejected")
    if chosen == rejected:
        raise BadRow("identical", "'chosen' and 'rejected' are identical")
    if isinstance(prompt, list):
        prompt = _with_system(row, prompt)
        _check(prompt, "prompt", prompt=True)
        _check(prompt + chosen, "prompt+chosen")
        _check(prompt + rejected, "prompt+rejected")
    return PreferencePair(prompt, chosen, rejected, source, _margin(row))


def _margin(row: dict) -> float | None:
    """The optional `margin` column (TRL RewardTrainer's): a finite number, or absent / null."""
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow("bad_margin", f"field 'margin' is {_kind(value) if not isinstance(value, float) else value} "
                                   "(expected a finite number)")
    return float(value)


def row_to_unpaired(row: dict, source: str, columns: dict[str, str] | None = None, *,
                    implicit_prompt: str = "turn", stats: PreferenceStats | None = None) -> list[UnpairedExample]:
    """One row -> unpaired examples: a prompt+completion+label row gives one, a paired row two."""
    row = _remap_columns(row, columns)
    kind = detect_preference_format(row)
    if kind is None:
        raise _no_columns(row)
    if kind != "unpaired":
        pair = row_to_pair(row, source, implicit_prompt=implicit_prompt, stats=stats)
        return [UnpairedExample(pair.prompt, pair.chosen, True, source),
                UnpairedExample(pair.prompt, pair.rejected, False, source)]
    label = row["label"]
    if not isinstance(label, bool):
        raise BadRow("bad_label", f"field 'label' is {_kind(label)} (expected true or false)")
    prompt, completion = _field(row, "prompt"), _field(row, "completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt, completion = _messages(prompt, "user"), _messages(completion, "assistant")
        if any(isinstance(m, dict) and m.get("role") in ("user", "system") for m in completion):
            if completion[:len(prompt)] != prompt:
                raise BadRow("prompt_not_prefix", "'completion' is a whole conversation but does not start with "
                                                  "the row's prompt")
            completion = completion[len(prompt):]
            if stats is not None:
                stats.prompt_stripped += 1
    _check_answer(completion, "completion")
    if isinstance(prompt, list):
        prompt = _with_system(row, prompt)
        _check(prompt, "prompt", prompt=True)
        _check(prompt + completion, "prompt+completion")
    return [UnpairedExample(prompt, completion, label, source)]


def _read(spec, convert, *, skip_bad_rows: bool, max_bad_row_fraction: float, limit: int,
          stats: PreferenceStats) -> list:
    """Every row of `spec` through `convert`; bad rows counted (or the first refused) by `stats.bad`'s rule."""
    bad = stats.bad.set_rule(skip_bad_rows, max_bad_row_fraction)
    before = Counter(bad.skipped)
    out: list = []
    for rec in iter_records(spec):
        stats.rows += 1
        try:
            out += convert(rec)
        except BadRow as e:
            bad.add(e, rec.source)
        if limit and len(out) >= limit:
            out = out[:limit]
            break
    bad.check(stats.rows, before)
    if not out:
        raise TemperError(f"{spec}: no usable preference rows ({stats.summary()})")
    return out


def read_preferences(spec, *, columns: dict[str, str] | None = None, skip_bad_rows: bool = True,
                     max_bad_row_fraction: float = DEFAULT_MAX_BAD_ROW_FRACTION, limit: int = 0,
                     implicit_prompt: str = "turn", stats: PreferenceStats | None = None
                     ) -> tuple[list[PreferencePair], PreferenceStats]:
    """The preference pairs of the data files, and the stats (rows read, bad rows skipped by reason).

    Bad rows: skipped, counted and warned about, refused above `max_bad_row_fraction` of the rows
    read; `skip_bad_rows=False` stops at the first (`temper.data.rows.BadRows`)."""
    stats = stats if stats is not None else PreferenceStats()
    if implicit_prompt not in IMPLICIT_PROMPT_RULES:
        raise TemperError(f"implicit_prompt={implicit_prompt!r}: expected one of {', '.join(IMPLICIT_PROMPT_RULES)}")

    def convert(rec) -> list[PreferencePair]:
        if detect_preference_format(_remap_columns(rec.data, columns)) == "unpaired":
            raise BadRow("no_columns", "an unpaired (prompt+completion+label) row; paired methods need "
                                       "chosen and rejected (KTO reads unpaired rows)")
        return [row_to_pair(rec.data, rec.source, columns, implicit_prompt=implicit_prompt, stats=stats)]

    pairs = _read(spec, convert, skip_bad_rows=skip_bad_rows, max_bad_row_fraction=max_bad_row_fraction, limit=limit,
                  stats=stats)
    return pairs, stats


def read_unpaired(spec, *, columns: dict[str, str] | None = None, skip_bad_rows: bool = True,
                  max_bad_row_fraction: float = DEFAULT_MAX_BAD_ROW_FRACTION, limit: int = 0,
                  implicit_prompt: str = "turn", stats: PreferenceStats | None = None
                  ) -> tuple[list[UnpairedExample], PreferenceStats]:
    """KTO's examples: unpaired rows as they are, paired rows as a desirable and an undesirable example
    (bad rows as `read_preferences` treats them)."""
    stats = stats if stats is not None else PreferenceStats(unpaired=True)
    stats.unpaired = True
    examples = _read(spec, lambda rec: row_to_unpaired(rec.data, rec.source, columns, implicit_prompt=implicit_prompt,
                                                       stats=stats),
                     skip_bad_rows=skip_bad_rows, max_bad_row_fraction=max_bad_row_fraction, limit=limit, stats=stats)
    return examples, stats


# ----------------------------------------------------------------------------- tokens


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the answer's tokens only
    rejected_ids: list[int]
    source: str
    ref_logps: tuple[float, float] | None = None  # the reference's (chosen, rejected) log-probs, when precomputed
    margin: float | None = None  # the row's `margin` column, if it has one


@dataclass
class EncodedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: str


def longest_token_chars(tokenizer) -> int:
    """The most characters one token stands for (a special token's text included): n characters
    make at least n / this many tokens."""
    added = [len(t.content) for t in tokenizer.backend.get_added_tokens_decoder().values()]
    return max([1, *tokenizer.token_byte_lengths(), *added])


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts in front of any text when asked for special tokens (BOS, or none)."""
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    full = tokenizer.backend.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    return []


class PreferenceEncoder:
    """Token ids of a prompt and of its answers, as described in the module docstring."""

    def __init__(self, tokenizer, template: str | None, *, max_len: int, max_prompt_len: int = 0) -> None:
        if max_len < 1:
            raise TemperError(f"max_len must be >= 1, got {max_len}")
        if max_prompt_len < 0:
            raise TemperError(f"max_prompt_len must be >= 0, got {max_prompt_len}")
        self.tokenizer, self.template = tokenizer, template
        self.max_len, self.max_prompt_len = max_len, max_prompt_len
        self.leading = _leading_special_ids(tokenizer)
        self.render_kwargs = render_kwargs(tokenizer)
        self.max_chars = 2 * (max_len + 2) * longest_token_chars(tokenizer)
        self.answer_cut = False  # an answer of the last pair was cut by characters

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.backend.encode(text, add_special_tokens=False).ids)

    def _prompt_end(self, text: str) -> str:
        """The prompt text, or its last `max_chars` characters (after a leading BOS text) when longer."""
        if len(text) <= self.max_chars:
            return text
        bos = self.tokenizer.bos_token
        head = bos if bos and text.startswith(bos) else ""
        return head + text[len(text) - self.max_chars:]

    def prompt(self, prompt: str | list, source: str) -> tuple[str, list[int]]:
        """(prompt text, its tokens): the chat template's render for messages, the text itself for a string
        (the tokens of its end only, when it is longer than `max_chars`)."""
        self.answer_cut = False
        if isinstance(prompt, str):
            return prompt, self._encode(self._prompt_end(prompt))
        if self.template is None:
            raise TemperError(f"{source}: conversational data needs a chat template, and the model has none: "
                              "pass template=chatml (or llama3, plain, a .jinja file)")
        text = render(self.template, prompt, add_generation_prompt=True, **self.render_kwargs)
        return text, self._encode(self._prompt_end(text))

    def prompt_ids(self, prompt: str | list, prompt_tokens: list[int]) -> list[int]:
        """What the model reads before an answer: a string prompt gets the tokenizer's leading specials (BOS)."""
        return self.leading + prompt_tokens if isinstance(prompt, str) else list(prompt_tokens)

    def answer(self, prompt: str | list, prompt_text: str, prompt_tokens: list[int], answer: str | list, name: str,
               source: str) -> list[int]:
        """The answer's ids: those of prompt + answer after the prompt's, ending with one end marker."""
        tokenizer = self.tokenizer
        if isinstance(answer, str):
            answer_text, has_marker = answer, False
        else:
            full_text = render(self.template, prompt + answer, add_generation_prompt=False, **self.render_kwargs)
            if not full_text.startswith(prompt_text):
                at = _common_prefix_length(full_text, prompt_text)
                raise TemperError(
                    f"{source}: the chat template is not prefix-stable: prompt+{name} renders differently from the "
                    f"prompt with its generation prompt (from character {at}: {prompt_text[at:at + 30]!r} vs "
                    f"{full_text[at:at + 30]!r}); use a template that renders earlier turns the same way")
            answer_text = full_text[len(prompt_text):]
            has_marker = _ends_with_end_marker(answer_text, self.template, tokenizer)
        if len(answer_text) > self.max_chars:  # more tokens than the context holds: its end is cut anyway
            answer_text, self.answer_cut = answer_text[:self.max_chars], True
        full_ids = self._encode(self._prompt_end(prompt_text) + answer_text)
        if full_ids[:len(prompt_tokens)] != prompt_tokens:
            raise BadRow("token_boundary", f"the prompt's tokens are not the start of the tokens of prompt+{name} "
                                           "(a token straddles the boundary)")
        ids = full_ids[len(prompt_tokens):]
        if not ids:
            raise BadRow("empty_response", f"'{name}' gives no tokens")
        if not has_marker and tokenizer.eos_id is not None and ids[-1] != tokenizer.eos_id:
            ids.append(tokenizer.eos_id)  # the one end marker of an answer that has none (TRL: add_eos)
        return ids

    def fit(self, prompt_ids: list[int], answers: list[list[int]]) -> tuple[list[int], list[list[int]], bool, bool]:
        """(prompt ids, answers' ids, prompt cut, an answer cut) cut to fit the context: a prompt over
        max_prompt_len keeps its end, then `temper.data.rows.fit_to_context` (the prompt gives up its start
        down to half the context, the answers their end)."""
        if not prompt_ids:
            raise BadRow("empty_prompt", "the prompt gives no tokens (and the tokenizer adds no BOS): the first "
                                         "answer token would have nothing to follow")
        bos, full = self.tokenizer.bos_id, len(prompt_ids)
        if self.max_prompt_len:
            prompt_ids = keep_end(prompt_ids, self.max_prompt_len, bos)
        prompt_kept, answer_kept = fit_to_context(len(prompt_ids), max(map(len, answers)), self.max_len)
        prompt_ids = keep_end(prompt_ids, prompt_kept, bos)
        cut = [a[:answer_kept] for a in answers]
        return prompt_ids, cut, len(prompt_ids) < full, any(len(a) > answer_kept for a in answers)


def _count_cuts(stats: PreferenceStats, prompt_cut: bool, answer_cut: bool) -> None:
    stats.truncated += prompt_cut or answer_cut
    stats.prompt_truncated += prompt_cut
    stats.answer_truncated += answer_cut


def encode_pairs(pairs: Iterable[PreferencePair], tokenizer, template: str | None, *, max_len: int,
                 max_prompt_len: int = 0, skip_bad_rows: bool = True,
                 max_bad_row_fraction: float = DEFAULT_MAX_BAD_ROW_FRACTION, stats: PreferenceStats | None = None
                 ) -> tuple[list[EncodedPair], PreferenceStats]:
    """Token ids of every pair (answers only in chosen_ids/rejected_ids), cut to fit max_len (the module
    docstring says how; every cut counted in `stats`); bad pairs as `read_preferences` treats bad rows."""
    stats = stats if stats is not None else PreferenceStats()
    stats.max_len = max_len
    encoder = PreferenceEncoder(tokenizer, template, max_len=max_len, max_prompt_len=max_prompt_len)
    bad = stats.bad.set_rule(skip_bad_rows, max_bad_row_fraction)
    out: list[EncodedPair] = []
    before, seen = Counter(bad.skipped), 0
    for pair in pairs:
        seen += 1
        try:
            prompt_text, tokens = encoder.prompt(pair.prompt, pair.source)
            chosen = encoder.answer(pair.prompt, prompt_text, tokens, pair.chosen, "chosen", pair.source)
            rejected = encoder.answer(pair.prompt, prompt_text, tokens, pair.rejected, "rejected", pair.source)
            if chosen == rejected and not encoder.answer_cut:
                raise BadRow("identical", "'chosen' and 'rejected' give the same tokens")
            prompt_ids, (chosen, rejected), prompt_cut, answer_cut = encoder.fit(
                encoder.prompt_ids(pair.prompt, tokens), [chosen, rejected])
            if chosen == rejected:
                raise BadRow("identical_after_truncation", f"'chosen' and 'rejected' are the same within seq_len="
                                                           f"{max_len} (they differ only beyond it)")
        except BadRow as e:
            bad.add(e, pair.source)
            continue
        _count_cuts(stats, prompt_cut, answer_cut)
        out.append(EncodedPair(prompt_ids, chosen, rejected, pair.source, margin=pair.margin))
    stats.pairs += len(out)
    bad.check(max(stats.rows, seen + sum(before.values())), before)
    if not out:
        raise TemperError(f"no trainable preference pairs: {stats.summary()}")
    return out, stats


def encode_unpaired(examples: Iterable[UnpairedExample], tokenizer, template: str | None, *, max_len: int,
                    max_prompt_len: int = 0, skip_bad_rows: bool = True,
                    max_bad_row_fraction: float = DEFAULT_MAX_BAD_ROW_FRACTION, stats: PreferenceStats | None = None
                    ) -> tuple[list[EncodedUnpaired], PreferenceStats]:
    """Token ids of every unpaired example (KTO), tokenised, cut and counted as pairs are (the prompt and
    its one completion). The bad share counts an example as a row (a paired row gives two)."""
    stats = stats if stats is not None else PreferenceStats(unpaired=True)
    stats.unpaired, stats.max_len = True, max_len
    encoder = PreferenceEncoder(tokenizer, template, max_len=max_len, max_prompt_len=max_prompt_len)
    bad = stats.bad.set_rule(skip_bad_rows, max_bad_row_fraction)
    out: list[EncodedUnpaired] = []
    before, seen = Counter(bad.skipped), 0
    last: tuple = (None, None)  # the examples of a paired row share their prompt: tokenised once
    for ex in examples:
        seen += 1
        try:
            if last[0] is not ex.prompt:
                last = (ex.prompt, encoder.prompt(ex.prompt, ex.source))
            prompt_text, tokens = last[1]
            completion = encoder.answer(ex.prompt, prompt_text, tokens, ex.completion, "completion", ex.source)
            prompt_ids, (completion,), prompt_cut, answer_cut = encoder.fit(encoder.prompt_ids(ex.prompt, tokens),
                                                                            [completion])
        except BadRow as e:
            bad.add(e, ex.source)
            continue
        _count_cuts(stats, prompt_cut, answer_cut)
        out.append(EncodedUnpaired(prompt_ids, completion, ex.label, ex.source))
    stats.pairs += len(out)
    bad.check(max(stats.rows, seen + sum(before.values())), before)
    if not out:
        raise TemperError(f"no trainable examples: {stats.summary()}")
    return out, stats


def preference_fingerprint(encoded: list[EncodedPair] | list[EncodedUnpaired]) -> str:
    """A short hash of every pair's (or example's) prompt and answer ids and label: the data's identity
    for a run (template, truncation, prompt extraction and data all change it)."""
    h = hashlib.sha256()
    for e in encoded:
        answers = (e.chosen_ids, e.rejected_ids) if isinstance(e, EncodedPair) else (e.completion_ids,)
        for ids in (e.prompt_ids, *answers):
            h.update(np.asarray(ids, dtype=np.int32).tobytes())
            h.update(b"|")
        if isinstance(e, EncodedUnpaired):
            h.update(b"+" if e.label else b"-")
        elif e.margin is not None:  # absent margins hash as before (fingerprints of earlier runs stay)
            h.update(f"m{e.margin!r}".encode())
        h.update(b";")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- batches


class _SequenceBatch(Batch):
    """Rows holding whole (prompt, answer) sequences, padded one a row or packed."""

    def sequence_index(self) -> torch.Tensor:
        """(rows, T): the sequence each slot belongs to (packed: -1 on padding)."""
        if self.segments is not None:
            return self.segments
        rows, T = self.inputs.shape
        return torch.arange(rows, device=self.inputs.device)[:, None].expand(rows, T)


@dataclass
class PairBatch(_SequenceBatch):
    """B pairs as 2B sequences: sequences [0, B) chosen, [B, 2B) the same prompts' rejected.

    Padded (`pack_len=0`): inputs (2B, T), targets (2B, T), one right-padded row a sequence;
    targets[:, t] = the token after inputs[:, t] on the answers and IGNORE_INDEX on prompts
    and padding. Right padding needs no mask or positions (`attention_mask()` is None): causal
    attention never reaches the padding after a row.

    Packed (`pack_len > 0`, padding-free): the 2B sequences share as few rows of
    max(pack_len, the longest sequence) slots as hold them (first-fit decreasing); `segments`
    (rows, T) names each slot's sequence (-1: padding) and keeps attention inside it,
    `positions` restart at 0 for each. The blocks then run on (nearly) real tokens only; the
    masked attention over a packed row costs more than per-sequence attention would, which is
    small next to the projections until rows reach thousands of tokens. `sequence_index()` maps every slot to its
    sequence either way, so per-sequence sums (`temper.losses.logprobs.sequence_logprobs`) read the same.
    """

    num_pairs: int = 0
    completion_tokens: torch.Tensor | None = None  # (2B,) trained answer tokens per row
    ref_logps: torch.Tensor | None = None  # (2B,) the reference's log-probs of each row, when precomputed

    def to(self, device) -> PairBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(self.inputs.to(device), self.targets.to(device), move(self.positions), move(self.segments),
                         num_pairs=self.num_pairs, completion_tokens=self.completion_tokens.to(device),
                         ref_logps=move(self.ref_logps))


@dataclass
class UnpairedBatch(_SequenceBatch):
    """B unpaired examples (KTO), padded or packed as PairBatch's sequences, with `labels` (B,)
    True where desirable.

    With `kl=True`, rows [B, 2B) pair prompt i with the answer of the nearest earlier example
    (mod B) whose prompt differs, the mismatched pairs KTO estimates its KL reference point on
    (TRL's rotation by one, skipping a pair's own other answer).
    """

    labels: torch.Tensor | None = None  # (B,) bool
    completion_tokens: torch.Tensor | None = None  # (rows,)
    num_examples: int = 0
    kl: bool = False

    def to(self, device) -> UnpairedBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return UnpairedBatch(self.inputs.to(device), self.targets.to(device), move(self.positions),
                             move(self.segments), labels=self.labels.to(device),
                             completion_tokens=self.completion_tokens.to(device), num_examples=self.num_examples,
                             kl=self.kl)


def _pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, pack_len: int = 0) -> dict:
    """(prompt, answer) sequences -> {inputs, targets (rows, T), completion_tokens (R,)}, right-padded
    one a row, or packed (first-fit decreasing) with `positions` and `segments` (see PairBatch)."""
    lengths = [len(p) + len(a) - 1 for p, a in rows]  # the last token is only a target
    for prompt, answer in rows:
        assert prompt and answer, "encoded rows always have a prompt and an answer token"
    if pack_len:
        capacity = max(pack_len, *lengths)
        bins: list[list[int]] = []  # sequence indices a row
        room: list[int] = []
        for r in sorted(range(len(rows)), key=lambda r: (-lengths[r], r)):
            slot = next((b for b, free in enumerate(room) if free >= lengths[r]), None)
            if slot is None:
                bins.append([])
                room.append(capacity)
                slot = len(bins) - 1
            bins[slot].append(r)
            room[slot] -= lengths[r]
    else:
        bins = [[r] for r in range(len(rows))]
    T = max(sum(lengths[r] for r in b) for b in bins)
    inputs = torch.full((len(bins), T), pad_id, dtype=torch.long)
    targets = torch.full((len(bins), T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(bins), T), dtype=torch.long)
    segments = torch.full((len(bins), T), -1, dtype=torch.long)
    for row, members in enumerate(bins):
        start = 0
        for r in members:
            prompt, answer = rows[r]
            seq, n = prompt + answer, lengths[r]
            inputs[row, start:start + n] = torch.tensor(seq[:-1])
            targets[row, start + len(prompt) - 1:start + n] = torch.tensor(answer)  # target t predicts token t + 1
            positions[row, start:start + n] = torch.arange(n)
            segments[row, start:start + n] = r
            start += n
    out = {"inputs": inputs, "targets": targets, "completion_tokens": torch.tensor([len(a) for _, a in rows])}
    if pack_len:
        out.update(positions=positions, segments=segments)
    return out


def collate_pairs(pairs: list[EncodedPair], pad_id: int, *, pack_len: int = 0) -> PairBatch:
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    ref = None
    if all(p.ref_logps is not None for p in pairs):
        ref = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs], dtype=torch.float32)
    return PairBatch(**_pad_rows(rows, pad_id, pack_len), num_pairs=len(pairs), ref_logps=ref)


@dataclass
class SequencePairBatch:
    """B pairs as 2B whole sequences for a reward model, which reads every token (no targets):
    `input_ids` (2B, T) right-padded with `pad_id`, rows [0, B) prompt + chosen and [B, 2B) the
    same prompts + rejected; `lengths` (2B,) each row's tokens; `response_tokens` (2B,) each
    answer's; `margins` (B,) the rows' `margin` column (None when no pair has one)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    response_tokens: torch.Tensor
    num_pairs: int
    margins: torch.Tensor | None = None

    def to(self, device) -> SequencePairBatch:
        return SequencePairBatch(self.input_ids.to(device), self.lengths.to(device), self.response_tokens.to(device),
                                 self.num_pairs, None if self.margins is None else self.margins.to(device))


def collate_sequence_pairs(pairs: list[EncodedPair], pad_id: int) -> SequencePairBatch:
    """Right-padded whole sequences of `pairs` (see SequencePairBatch); a pair without a margin
    among pairs with one is an internal error (the recipe checks the data first)."""
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    lengths = [len(s) for s in seqs]
    input_ids = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, :len(seq)] = torch.tensor(seq)
    answers = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    margins = None
    if any(p.margin is not None for p in pairs):
        assert all(p.margin is not None for p in pairs), "pairs with and without a margin in one batch"
        margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return SequencePairBatch(input_ids, torch.tensor(lengths), torch.tensor(answers), len(pairs), margins)


def _mismatched(examples: list[EncodedUnpaired], i: int) -> int:
    """The example whose answer KTO's mismatched row i takes: the nearest earlier one (cyclically)
    with another prompt. Rotating by one alone would give a pair's rejected example its own
    chosen answer whenever a pair's two examples are neighbours (an unshuffled loader)."""
    for j in range(1, len(examples)):
        if examples[i - j].prompt_ids != examples[i].prompt_ids:
            return (i - j) % len(examples)
    return (i - 1) % len(examples)  # one prompt in the whole batch: nothing else to take


def collate_unpaired(examples: list[EncodedUnpaired], pad_id: int, *, kl: bool = False, max_len: int = 0,
                     pack_len: int = 0) -> UnpairedBatch:
    rows = [(e.prompt_ids, e.completion_ids) for e in examples]
    if kl:
        for i, e in enumerate(examples):
            answer = examples[_mismatched(examples, i)].completion_ids
            if max_len:
                answer = answer[:max_len + 1 - len(e.prompt_ids)]
            rows.append((e.prompt_ids, answer))
    labels = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return UnpairedBatch(**_pad_rows(rows, pad_id, pack_len), labels=labels, num_examples=len(examples), kl=kl)


class PreferenceLoader(ExampleLoader):
    """`ExampleLoader` over encoded pairs (or unpaired examples): only the collate is its own.

    Pairs become `PairBatch`es (`pack_len`: padding-free, see PairBatch), or with
    `sequences=True` `SequencePairBatch`es for a reward model; unpaired examples become
    `UnpairedBatch`es, with KTO's mismatched rows when `kl`.
    """

    def __init__(self, examples: list[EncodedPair] | list[EncodedUnpaired], *, batch_size: int, pad_id: int,
                 seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                 kl: bool = False, max_len: int = 0, pack_len: int = 0, sequences: bool = False) -> None:
        if not examples:
            raise TemperError("no preference data to load")
        self.unpaired = isinstance(examples[0], EncodedUnpaired)
        if kl and not self.unpaired:
            raise TemperError("kl=True builds KTO's mismatched rows: it needs unpaired examples")
        if kl and max_len < 1:
            raise TemperError("kl=True needs max_len: a mismatched row is cut to fit the context")
        if sequences and (self.unpaired or pack_len):
            raise TemperError("sequences=True batches whole pairs for a reward model: paired data, no packing")
        self.pad_id, self.seq_len, self.kl, self.pack_len, self.sequences = pad_id, max_len, kl, pack_len, sequences
        if self.unpaired:
            collate = partial(collate_unpaired, pad_id=pad_id, kl=kl, max_len=max_len, pack_len=pack_len)
        elif sequences:
            collate = partial(collate_sequence_pairs, pad_id=pad_id)
        else:
            collate = partial(collate_pairs, pad_id=pad_id, pack_len=pack_len)
        super().__init__(examples, collate, batch_size=batch_size, seed=seed, shuffle=shuffle, rank=rank,
                         world_size=world_size, grad_accum=grad_accum)


def load_preferences(spec, tokenizer, template: str | None, *, max_len: int, max_prompt_len: int = 0,
                     columns: dict[str, str] | None = None, skip_bad_rows: bool = True,
                     max_bad_row_fraction: float = DEFAULT_MAX_BAD_ROW_FRACTION, limit: int = 0,
                     implicit_prompt: str = "turn", unpaired: bool = False
                     ) -> tuple[list[EncodedPair] | list[EncodedUnpaired], PreferenceStats]:
    """Read and encode in one call: what a recipe needs (pairs for the DPO family, examples for KTO)."""
    stats = PreferenceStats(unpaired=unpaired)
    read, encode = (read_unpaired, encode_unpaired) if unpaired else (read_preferences, encode_pairs)
    rules = dict(skip_bad_rows=skip_bad_rows, max_bad_row_fraction=max_bad_row_fraction)
    rows, _ = read(spec, columns=columns, limit=limit, implicit_prompt=implicit_prompt, stats=stats, **rules)
    return encode(rows, tokenizer, template, max_len=max_len, max_prompt_len=max_prompt_len, stats=stats, **rules)


__all__ = [
    "ASSISTANT_TURN_MARKERS", "BadRow", "COLUMNS", "EncodedPair", "EncodedUnpaired", "PairBatch", "PreferenceEncoder",
    "PreferenceLoader", "PreferencePair", "PreferenceStats", "SequencePairBatch", "UnpairedBatch", "UnpairedExample", "collate_pairs",
    "collate_sequence_pairs", "collate_unpaired", "detect_preference_format", "encode_pairs", "encode_unpaired", "load_preferences",
    "preference_fingerprint", "read_preferences", "read_unpaired", "row_to_pair", "row_to_unpaired",
    "split_implicit_prompt",
]
