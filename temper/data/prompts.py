"""Prompt rows: what generation, online preference rounds and RL recipes answer.

A row holds the prompt under `prompt` (or another field, `field_name=`) as text or as a
conversation ending with a user turn, or a `messages` conversation, which is cut after its last
user turn (a whole chat row becomes the prompt of its last reply);
`answer` (text or a number) is kept for judges and verifiable rewards that check one. A bad
row is one line naming `file:line`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from temper.data.chat import check_messages
from temper.data.readers import iter_records, json_type
from temper.errors import TemperError


@dataclass
class Prompt:
    """One prompt to answer: text (a raw completion prompt) or a conversation ending with a user
    turn, where it came from, and the checkable answer when its row has one."""

    prompt: str | list[dict]
    source: str = ""  # "file:line"
    answer: str | None = None
    row: dict = field(default_factory=dict)

    @property
    def messages(self) -> list[dict]:
        """The prompt as a conversation (text becomes one user message)."""
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else self.prompt

    @property
    def question(self) -> str:
        """The last user turn's text: what a judge is shown as the question."""
        return next(m["content"] for m in reversed(self.messages) if m.get("role") == "user")

    @classmethod
    def from_text(cls, question: str, *, answer: str | None = None, source: str = "") -> Prompt:
        return cls([{"role": "user", "content": question}], source, answer)


def row_prompt(row: dict, source: str, field_name: str = "prompt") -> Prompt:
    """The Prompt of one row, or one line naming `source` and what was expected. `field_name="auto"`:
    `prompt` where the row has one, else `question` (GSM8K's own rows), else `messages`."""
    if field_name == "auto":
        field_name = "question" if "prompt" not in row and "question" in row else "prompt"
    value, chat_row = row.get(field_name), False
    if value is None and "messages" in row:
        value, chat_row = row["messages"], True
    if isinstance(value, str):
        if not value.strip():
            raise TemperError(f"{source}: the prompt is empty")
    elif isinstance(value, list):
        if chat_row:  # a whole conversation: the prompt of its last reply
            last_user = max((i for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") == "user"),
                            default=None)
            if last_user is None:
                raise TemperError(f"{source}: the conversation has no user message")
            value = value[:last_user + 1]
        check_messages(value, source, prompt=True)  # a prompt given as messages ends with the user's turn
    else:
        got = json_type(value) if value is not None else "keys " + ", ".join(map(str, row)) if row else "an empty row"
        raise TemperError(f"{source}: expected a '{field_name}' field (text or messages) or 'messages', got {got}")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise TemperError(f"{source}: 'answer' is {json_type(answer)} (expected text or a number)")
    return Prompt(value, source, None if answer is None else str(answer), row)


def read_prompts(spec: Any, *, field_name: str = "prompt") -> list[Prompt]:
    """Every prompt row of `spec` (files, globs, directories: JSONL, JSON, parquet)."""
    prompts = [row_prompt(rec.data, rec.source, field_name) for rec in iter_records(spec)]
    if not prompts:
        raise TemperError(f"{spec if isinstance(spec, str) else ', '.join(map(str, spec))}: no prompts (the file is empty)")
    return prompts
