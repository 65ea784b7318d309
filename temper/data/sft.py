"""Supervised fine-tuning data: the dataset formats TRL users have, loss masks, packing.

Rows become conversations (lists of {role, content}):
  messages                        conversational, multi-turn, system/user/assistant
  prompt + completion             strings (one user turn, one assistant turn) or message lists
  instruction [+ input] + output  Alpaca
  instruction + instances         self-instruct (one example per instance)
  text                            plain language modelling (every token trained, no template)
Column names can be remapped (`columns={"prompt": "question", "completion": "answer"}`).

A conversation is rendered with the chat template, tokenised with character offsets, and
each token is trained when it falls inside an assistant span (the reply and the template's
end-of-turn marker). Each assistant turn ends with exactly one trained end marker: the
template's own (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3, EOS in `plain`), or, for
a template that renders none after the last reply (and for plain text rows), an appended
EOS. Padding is masked by position, never by id, so the marker is trained even where
pad == eos. Examples are shifted into (inputs, targets) *before* packing, so a packed
row never asks one example to predict the next.

Real data (`temper.data.rows`, the rule DPO's data follows too): bad rows (no known columns,
a field of the wrong type, messages that do not alternate, an empty reply) are skipped,
counted by reason and warned about with the first `file:line` of each; more than
`max_bad_row_fraction` of the rows read bad stops the run; `skip_bad_rows=False` stops at the
first. A conversation longer than `max_len` is cut, never dropped for being long: the part
before the first trained token (the prompt) keeps its end, down to half the context, then the
rest keeps its start (TRL's `truncation_mode="keep_start"` keeps the start of the whole and
drops, uncounted, the examples left with nothing to train; here the prompt gives up its start
so the reply stays). Counted in `EncodeStats`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from temper.data.chat import assistant_spans, check_messages, end_of_turn_strings, render_kwargs
from temper.data.loader import ExampleLoader
from temper.data.readers import iter_records, json_type
from temper.data.rows import DEFAULT_MAX_BAD_ROW_FRACTION, BadRow, BadRows, fit_to_context, keep_end
from temper.errors import TemperError
from temper.losses import IGNORE_INDEX
from temper.masks import build_attention_mask

FORMATS = ("messages", "prompt_completion", "alpaca", "self_instruct", "text")


@dataclass
class Conversation:
    messages: list[dict[str, str]] | None  # None for plain text rows
    text: str | None
    source: str
    answer: str | None = None  # a canonical short answer, when the row has one (eval)
    task: str | None = None  # the row's task label, when it has one (eval reports per task)


def missing_column(row: dict, columns: dict[str, str] | None) -> str | None:
    """Why `columns` cannot rename this row (a rename names a column it lacks), or None: such a
    setting is never ignored without a word, nor the row's own column used instead."""
    for ours, theirs in (columns or {}).items():
        if theirs not in row:
            keys = ", ".join(map(str, row)) or "none"
            return f"columns.{ours}={theirs}: the row has no column '{theirs}' (keys: {keys})"
    return None


def _remap(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    out = dict(row)
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
    return out


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "instances" in row:
        return "self_instruct"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise TypeError


# Column names that usually hold a prompt / an answer, for the hint of a row with no SFT columns.
_PROMPT_LIKE = ("question", "query", "problem", "input", "instruction")
_ANSWER_LIKE = ("answer", "response", "solution", "output", "target")


def _no_columns(row: dict, source: str) -> BadRow:
    keys = ", ".join(map(str, row)) or "none"
    prompt = next((k for k in _PROMPT_LIKE if k in row), None)
    answer = next((k for k in _ANSWER_LIKE if k in row and k != prompt), None)
    hint = (f"columns.prompt={prompt} columns.completion={answer}" if prompt and answer
            else "columns.prompt=... etc.")
    return BadRow("no_columns", f"no SFT columns found (keys: {keys}); expected messages, prompt+completion, "
                                f"instruction+output, instruction+instances or text (remap with {hint})", source)


def _string(row: dict, name: str, source: str, *, optional: bool = False) -> str:
    value = row.get(name)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow("bad_type", f"field '{name}' is {json_type(value)} (expected a string)", source)
    return value


def row_to_conversations(row: dict, source: str, columns: dict[str, str] | None = None) -> list[Conversation]:
    """One row -> conversations (self-instruct rows give one per instance); a bad row raises `BadRow`
    (a TemperError whose message starts with `source`), its `reason` one of missing_column, no_columns,
    bad_type, empty_text, no_instances, bad_messages."""
    if why := missing_column(row, columns):
        raise BadRow("missing_column", why, source)
    row = _remap(row, columns or {})
    kind = detect_format(row)
    answer = row.get("answer") if isinstance(row.get("answer"), str) else None
    task = row.get("task") if isinstance(row.get("task"), str) else None
    if kind is None:
        raise _no_columns(row, source)
    if kind == "text":
        if not _string(row, "text", source).strip():
            raise BadRow("empty_text", "field 'text' is empty", source)
        return [Conversation(None, row["text"], source)]
    if kind == "messages":
        messages = row["messages"]
    elif kind == "prompt_completion":
        try:
            messages = _as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant")
        except TypeError:
            raise BadRow("bad_type", "prompt and completion must be strings or lists of messages", source) from None
    elif kind == "alpaca":
        instruction, extra = _string(row, "instruction", source), _string(row, "input", source, optional=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _string(row, "output", source)}]
    else:  # self_instruct
        instances = row["instances"]
        if not isinstance(instances, list) or not instances:
            raise BadRow("no_instances", "'instances' must be a non-empty list", source)
        conversations = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise BadRow("bad_type", f"instance {i} is not an object", source)
            alpaca = {"instruction": row["instruction"], "input": inst.get("input"), "output": inst.get("output")}
            conversations += row_to_conversations(alpaca, f"{source} instance {i}")
        return conversations
    if row.get("system") and isinstance(row["system"], str) and messages and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": row["system"]}, *messages]
    try:
        check_messages(messages, source)
    except TemperError as e:
        raise BadRow("bad_messages", str(e).removeprefix(f"{source}: "), source) from None
    return [Conversation(messages, None, source, answer, task)]


def read_conversations(spec, *, columns: dict[str, str] | None = None, skip_bad_rows: bool = True,
                       max_bad_row_fraction: float = DEFAULT_MAX_BAD_ROW_FRACTION, limit: int = 0
                       ) -> tuple[list[Conversation], BadRows]:
    """All conversations of the data files, and the bad rows skipped (`BadRows`: by reason, the first of
    each): warned about, refused above `max_bad_row_fraction` of the rows read; `skip_bad_rows=False`
    stops at the first."""
    bad = BadRows("SFT rows", skip_bad_rows, max_bad_row_fraction)
    conversations: list[Conversation] = []
    rows = 0
    for rec in iter_records(spec):
        rows += 1
        try:
            conversations += row_to_conversations(rec.data, rec.source, columns)
        except BadRow as e:
            bad.add(e, rec.source)
        if limit and len(conversations) >= limit:
            conversations = conversations[:limit]
            break
    bad.check(rows)
    if not conversations:
        raise TemperError(f"{spec}: no usable rows")
    return conversations, bad


# ----------------------------------------------------------------------------- tokenising with masks


@dataclass
class Example:
    inputs: list[int]
    targets: list[int]  # IGNORE_INDEX where no loss

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # examples cut to fit max_len (the start of their prompt, the end of the rest)
    prompt_truncated: int = 0  # of those, examples whose prompt (the part before the first trained token) lost its start
    dropped: int = 0  # nothing left to train after the cut: not trained on (not expected: the reply keeps its room)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.examples} examples; {self.truncated} truncated to fit seq_len ({self.prompt_truncated} "
                f"prompts kept their end); {self.dropped} dropped (nothing left to train)")


def encode_conversation(conv: Conversation, tokenizer, template: str | None, *, loss_on: str = "completion",
                        max_len: int, stats: EncodeStats | None = None) -> Example | None:
    """Token ids and next-token targets for one conversation, cut to fit max_len as the module docstring
    says (None when nothing is left to train)."""
    stats = stats if stats is not None else EncodeStats()
    ends_with_marker = False  # does the last reply already end with an end-of-turn marker?
    if conv.messages is None:  # plain text: every token is a target
        text, spans = conv.text, [(0, len(conv.text))]
    else:
        if template is None:
            raise TemperError(
                f"{conv.source}: conversational data needs a chat template, and the model has none: "
                "pass template=chatml (or llama3, plain, a .jinja file)"
            )
        text, spans = assistant_spans(template, conv.messages, **render_kwargs(tokenizer))
        ends_with_marker = _ends_with_end_marker(text[slice(*spans[-1])], template, tokenizer)
        if loss_on == "completion":
            spans = spans[-1:]
        elif loss_on == "all":
            spans = [(0, len(text))]
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), enc.offsets
    trained = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    if not ends_with_marker and tokenizer.eos_id is not None and (not ids or ids[-1] != tokenizer.eos_id):
        ids.append(tokenizer.eos_id)  # the one end marker of a reply (or document) that has none
        trained.append(True)
    elif ids and ids[-1] == tokenizer.eos_id:
        trained[-1] = True  # a trailing EOS is always learned, even with loss_on=completion
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]
    if len(ids) > max_len + 1:
        first = next((i for i, keep in enumerate(trained) if keep), len(ids))  # the prompt: ids[:first]
        prompt_kept, rest_kept = fit_to_context(first, len(ids) - first, max_len)
        head = keep_end(ids[:first], prompt_kept, tokenizer.bos_id)
        ids = head + ids[first:first + rest_kept]
        labels = [IGNORE_INDEX] * len(head) + labels[first:first + rest_kept]
        stats.truncated += 1
        stats.prompt_truncated += prompt_kept < first
        if all(x == IGNORE_INDEX for x in labels[1:]):
            stats.dropped += 1
            return None
    stats.examples += 1
    example = Example(ids[:-1], labels[1:])
    return example if example.num_targets else None


def _ends_with_end_marker(span_text: str, template: str, tokenizer) -> bool:
    """Whether a rendered reply ends (trailing whitespace aside) with EOS or the template's end of turn."""
    markers = [m for m in (tokenizer.eos_token, *end_of_turn_strings(template)) if m]
    return any(span_text.rstrip().endswith(m) for m in markers)


def encode_all(conversations: Iterable[Conversation], tokenizer, template, *, loss_on: str, max_len: int
               ) -> tuple[list[Example], EncodeStats]:
    stats = EncodeStats()
    out = [e for c in conversations if (e := encode_conversation(c, tokenizer, template, loss_on=loss_on,
                                                                  max_len=max_len, stats=stats)) is not None]
    if not out:
        raise TemperError(f"no trainable examples: {stats.summary()}")
    return out, stats


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    positions: torch.Tensor | None = None  # (B, T) reset per packed example
    segments: torch.Tensor | None = None  # (B, T) which example each slot belongs to (-1: padding)

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.inputs), move(self.targets), move(self.positions), move(self.segments))

    def attention_mask(self) -> torch.Tensor | None:
        if self.segments is None:
            return None  # right padding: causal attention never looks at later padding
        T = self.inputs.shape[1]
        return build_attention_mask(None, T, T, segment_ids=self.segments)


def pad_batch(examples: list[Example], pad_id: int) -> Batch:
    T = max(len(e.inputs) for e in examples)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        inputs[i, :len(e.inputs)] = torch.tensor(e.inputs)
        targets[i, :len(e.targets)] = torch.tensor(e.targets)
    return Batch(inputs, targets)


def pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Greedy packing in order: start a new row when the next example does not fit."""
    rows: list[list[Example]] = [[]]
    used = 0
    for e in examples:
        if used + len(e.inputs) > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e.inputs)
    return rows


def packed_batch(rows: list[list[Example]], seq_len: int, pad_id: int) -> Batch:
    B = len(rows)
    inputs = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, seq_len), dtype=torch.long)
    segments = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            n = len(e.inputs)
            inputs[b, at:at + n] = torch.tensor(e.inputs)
            targets[b, at:at + n] = torch.tensor(e.targets)
            positions[b, at:at + n] = torch.arange(n)
            segments[b, at:at + n] = s
            at += n
    return Batch(inputs, targets, positions, segments)


def examples_fingerprint(examples: list[Example]) -> str:
    """A short hash of every example's token ids and loss mask (template, masking, truncation and
    data all change it); hashed as int32 bytes, so it costs little even for large data sets."""
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray(e.inputs, dtype=np.int32).tobytes())
        h.update(b"|")
        h.update(np.asarray(e.targets, dtype=np.int32).tobytes())
        h.update(b";")
    return h.hexdigest()[:16]


class SFTLoader(ExampleLoader):
    """`ExampleLoader` over SFT examples: padded batches, or packed rows of `seq_len` (`packing`).

    Order, rank split and resumable position are ExampleLoader's; packing runs on each epoch's
    shuffled examples, so a batch is `batch_size` packed rows.
    """

    def __init__(self, examples: list[Example], *, batch_size: int, seq_len: int, pad_id: int, seed: int,
                 packing: bool, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1) -> None:
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing
        super().__init__(examples, self._collate, batch_size=batch_size, seed=seed, shuffle=shuffle, rank=rank,
                         world_size=world_size, grad_accum=grad_accum,
                         arrange=(lambda items: pack(items, seq_len)) if packing else None)

    def _collate(self, chunk: list) -> Batch:
        if self.packing:
            return packed_batch(chunk, self.seq_len, self.pad_id)
        return pad_batch(chunk, self.pad_id)


def split_held_out(items: list, fraction: float, seed: int, group=None) -> tuple[list, list]:
    """(kept, held out): a deterministic share `fraction` of `items` (at least one when there
    are two or more and fraction > 0), drawn with `seed`, for recipes without eval_data.

    `group(item)` keeps items with the same key on one side (e.g. the two examples KTO makes of
    one preference pair, which share a prompt): the share is counted in groups."""
    keys = [group(x) if group is not None else i for i, x in enumerate(items)]
    distinct = list(dict.fromkeys(keys))
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(distinct) * fraction)) if len(distinct) > 1 and fraction > 0 else 0
    held = {distinct[i] for i in order[:n_eval]}
    return [x for x, k in zip(items, keys) if k not in held], [x for x, k in zip(items, keys) if k in held]

