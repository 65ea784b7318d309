"""Chat templates: built-ins, resolving a `template=` option, rendering, and assistant spans.

A chat template is a Jinja program that turns a list of messages
(`{"role": "user", "content": "..."}`) into the one string a model reads. `render` runs it
the way `transformers`' `tokenizer.apply_chat_template(..., tokenize=False)` does (a
sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`, `raise_exception`,
`tojson`, and the `{% generation %}` tag), so a template gives the same text in both.

`assistant_spans` finds, in the rendered text, the characters the model learns to write
(each assistant reply and its end-of-turn marker), for supervised fine-tuning.
`end_of_turn_strings` gives the strings that end a reply, for stopping generation.
`read_chat_template` is the one reader of a model directory's template (chat_template.jinja
or tokenizer_config.json, with transformers' precedence), used by every command.
`chat_template_for`, `render_kwargs`, `stop_settings` and `StopWriter` are what `temper
generate` and `temper chat` share.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from temper.data.templates import (
    BUILTIN_END_OF_TURN,
    BUILTIN_TEMPLATES,
    TEMPLATE_FILE_SUFFIXES,
    read_chat_template,
)
from temper.errors import TemperError, TemperFileNotFoundError, require_file
from temper.lineage import check_template

__all__ = [
    "BUILTIN_TEMPLATES",
    "ROLES",
    "resolve_template",
    "model_chat_template",
    "render",
    "check_messages",
    "assistant_spans",
    "end_of_turn_strings",
    "read_chat_template",
    "chat_template_for",
    "render_kwargs",
    "stop_settings",
    "StopWriter",
]

ROLES = ("system", "user", "assistant", "tool")


def _builtin_names() -> str:
    return ", ".join(BUILTIN_TEMPLATES)


def model_chat_template(model_dir: str | Path, tokenizer: Any = None) -> str | None:
    """A model's own chat template: the tokenizer's, else the directory's files; None if it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template
    path = Path(model_dir)
    return read_chat_template(path) if path.is_dir() else None


def resolve_template(spec: str | None, tokenizer: Any = None) -> str | None:
    """The Jinja source named by a `template=` option.

    None or "" -> the tokenizer's own `chat_template` (None when it has none); a built-in
    name (chatml, llama3, plain) -> its source; a .jinja/.j2/.txt file -> its content; a
    directory -> the chat template saved in it (tokenizer_config.json or chat_template.jinja);
    a string with `{%` or `{{` -> the string itself.
    """
    if not spec:
        return getattr(tokenizer, "chat_template", None) or None
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if "{%" in spec or "{{" in spec:  # inline Jinja (checked first: it is never a path)
        return spec
    path = Path(spec).expanduser()
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
        if not (is_file or is_dir) and path.exists():
            require_file(path, "chat template")  # a FIFO or a device: refused by name, not read
    except OSError:  # e.g. a name too long to be a path
        is_file = is_dir = False
    if is_dir:
        template = read_chat_template(path)
        if template is None:
            raise TemperError(
                f"{path}: no chat_template in its tokenizer_config.json (nor a chat_template.jinja); "
                f"pass template={'|'.join(BUILTIN_TEMPLATES)} or a .jinja file"
            )
        return template
    if is_file:
        if path.name == "tokenizer_config.json":
            template = read_chat_template(path.parent)
            if template is None:
                raise TemperError(f"{path}: it has no chat_template")
            return template
        if path.suffix.lower() not in TEMPLATE_FILE_SUFFIXES:
            raise TemperError(
                f"{path}: a chat template file must end in {', '.join(TEMPLATE_FILE_SUFFIXES)}"
            )
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise TemperError(f"{path}: the chat template file is empty")
        return text
    if path.suffix.lower() in (*TEMPLATE_FILE_SUFFIXES, ".json") or "/" in spec or "\\" in spec:
        raise TemperFileNotFoundError(f"chat template file not found: {path}")
    raise TemperError(
        f"unknown chat template {spec!r}: expected one of {_builtin_names()}, "
        "a .jinja file, a model directory, or a Jinja string"
    )


# ----------------------------------------------------------------------------- rendering


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # like transformers: no HTML escaping, and the json.dumps options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str):
    """Compile a template in the environment `transformers` renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemperError(f"chat template is not valid Jinja: line {e.lineno}: {e.message}") from None


def _plain(value: Any) -> Any:
    """A copy made of plain dicts, lists and scalars (what the template may see)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
           bos_token: str | None = "", eos_token: str | None = "", **extra: Any) -> str:
    """Render `messages` with a chat template, as `apply_chat_template(tokenize=False)` does.

    A `None` bos/eos token is left undefined in the template (as for a tokenizer without
    one). Keys whose value is None are dropped from the messages, and `tools` and
    `documents` default to None, both as in `transformers`. `extra` reaches the template
    as variables.
    """
    compiled = _compile(template)
    if not isinstance(messages, (list, tuple)):
        raise TemperError(f"chat template failed to render: messages must be a list, got {type(messages).__name__}")
    chat = [{k: _plain(v) for k, v in m.items() if v is not None} if isinstance(m, dict) else m
            for m in messages]
    variables: dict[str, Any] = {"tools": None, "documents": None, **_plain(extra)}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    try:
        return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
    except TemperError:
        raise
    except Exception as e:  # the template is user input: any failure in it is the user's to fix
        message = " ".join(str(e).split()) or type(e).__name__
        raise TemperError(f"chat template failed to render: {message}") from None


# ----------------------------------------------------------------------------- messages


def check_messages(messages: Any, source: str, *, prompt: bool = False) -> None:
    """Raise `TemperError(f"{source}: ...")` unless `messages` is a well-formed conversation.

    A conversation is a non-empty list of {"role", "content"} dicts with string values;
    roles are system, user, assistant or tool; a system message comes only first; then
    user and assistant alternate, starting with user (tool messages follow an assistant
    turn or another tool message, and are answered by the assistant). A training
    conversation (`prompt=False`) needs an assistant turn, and no assistant content may be
    empty (unless the message carries `tool_calls`). A prompt (`prompt=True`) must end
    with a user (or tool) message instead, for the model to answer.
    """
    if not isinstance(messages, list) or not messages:
        raise TemperError(f"{source}: expected a non-empty list of messages "
                          "({\"role\": ..., \"content\": ...})")
    expected = "user"  # what may come next
    has_assistant = False
    for i, m in enumerate(messages):
        where = f"{source}: message {i}"
        if not isinstance(m, dict):
            raise TemperError(f"{where}: expected an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise TemperError(f"{where}: 'role' must be a string")
        if not isinstance(content, str):
            raise TemperError(f"{where}: 'content' must be a string")
        if role not in ROLES:
            raise TemperError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system":
            if i != 0:
                raise TemperError(f"{where}: a system message may only be the first message")
            continue
        allowed = {"user": ("user",), "assistant": ("assistant",), "after_assistant": ("user", "tool"),
                   "after_tool": ("tool", "assistant")}[expected]
        if role not in allowed:
            if expected == "user":  # the opening turn
                after = " after the system message" if i > 0 else ""
                raise TemperError(f"{where}: the first message{after} must be from the user, got {role!r}")
            raise TemperError(
                f"{where}: user and assistant must alternate; expected {' or '.join(allowed)} here, got {role!r}"
            )
        if role == "assistant":
            has_assistant = True
            if not content.strip() and not m.get("tool_calls") and not prompt:
                raise TemperError(f"{where}: the assistant's content is empty")
            expected = "after_assistant"
        elif role == "user":
            expected = "assistant"
        else:  # tool
            expected = "after_tool"
    if prompt:
        if messages[-1]["role"] not in ("user", "tool"):
            raise TemperError(f"{source}: a prompt must end with a user message, got {messages[-1]['role']!r}")
    elif not has_assistant:
        raise TemperError(f"{source}: the conversation has no assistant message to learn from")


# ----------------------------------------------------------------------------- spans and stops


def assistant_spans(template: str, messages: Sequence[dict], **variables: Any
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant message, its [start, end) character span.

    A span runs from the end of the conversation before that message rendered with the
    generation prompt, to the end of the conversation up to and including it: the reply and
    the template's end-of-turn marker (`...<|im_end|>\\n` in ChatML, `...<|eot_id|>` in
    Llama 3). The template must render a conversation's start the same way whatever
    follows (prefix-stable); one that does not is refused.
    """
    variables.pop("add_generation_prompt", None)
    messages = list(messages)
    full = render(template, messages, add_generation_prompt=False, **variables)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        before = render(template, messages[:i], add_generation_prompt=True, **variables)
        upto = render(template, messages[:i + 1], add_generation_prompt=False, **variables)
        if not full.startswith(upto) or not upto.startswith(before):
            bad = before if not upto.startswith(before) else upto
            at = next((k for k, (a, b) in enumerate(zip(bad, full)) if a != b), min(len(bad), len(full)))
            raise TemperError(
                f"the chat template is not prefix-stable: the conversation up to message {i} renders "
                f"differently from the start of the whole conversation (from character {at}: "
                f"{bad[at:at + 30]!r} vs {full[at:at + 30]!r}), so assistant replies cannot be located; "
                "use a template that renders earlier turns the same way whatever follows"
            )
        start, end = len(before), len(upto)
        if end <= start:
            raise TemperError(f"the chat template renders nothing for the assistant message {i}")
        spans.append((start, end))
    return full, spans


def end_of_turn_strings(template: str) -> list[str]:
    """The strings that end an assistant turn, to stop generation at (EOS aside).

    ChatML: `<|im_end|>`; Llama 3: `<|eot_id|>`; plain: none (its turns end with EOS).
    For another template, what it renders after the reply of a probe conversation
    [user "x", assistant "Y"], whitespace stripped (none when that is empty, as for
    templates that end a turn with `eos_token`).
    """
    if template in BUILTIN_END_OF_TURN:
        return list(BUILTIN_END_OF_TURN[template])
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Y"}]
    try:
        text = render(template, probe, bos_token="", eos_token="")
    except TemperError:
        return []
    at = text.rfind("Y")
    if at < 0:
        return []
    tail = text[at + 1:].strip()
    return [tail] if tail else []


# ----------------------------------------------------------------------------- what generate and chat share


def chat_template_for(model_dir: str | Path, tokenizer: Any, spec: str | None) -> str:
    """The template named by `spec`, else the model's own; a one-line error when there is none."""
    template = resolve_template(spec, tokenizer) if spec else model_chat_template(model_dir, tokenizer)
    if template is None:
        raise TemperError(
            f"{model_dir}: the model has no chat template; pass template=chatml|llama3|plain (or a .jinja file)"
        )
    check_template(model_dir, template)  # warns when it is not the template the model was tuned with
    return template


def render_kwargs(tokenizer: Any) -> dict[str, str]:
    """The special tokens a template sees (as in SFT, so training and inference render alike)."""
    return {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}


def stop_settings(tokenizer: Any, template: str, extra: Sequence[str] = ()) -> tuple[list[str], list[int]]:
    """Stop strings (`extra` and the template's end-of-turn strings) and the ids that end a reply.

    The ids are EOS and every end-of-turn string that is one token of the vocabulary, so
    that generation ends on it at once and it is never streamed.
    """
    turn_ends = end_of_turn_strings(template)
    stops = list(dict.fromkeys([*extra, *turn_ends]))
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for s in turn_ends:
        token = tokenizer.token_id(s)
        if token is not None and token not in ids:
            ids.append(token)
    return stops, ids


class StopWriter:
    """An `on_text` callback that writes streamed text but never a stop string.

    Text that may be the beginning of a stop string is held back until it is clearly
    not; once a stop string appears, nothing more is written. `finish(reply)` writes what
    is left of the final (already cut) reply.
    """

    def __init__(self, stops: Sequence[str], write: Callable[[str], Any]) -> None:
        self.stops = [s for s in stops if s]
        self.write = write
        self.text = ""
        self.shown = 0
        self.stopped = False

    def __call__(self, _row: int, piece: str) -> None:
        if self.stopped:
            return
        self.text += piece
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if cut >= 0:
            self.stopped = True
            self._emit(cut)
            return
        safe = len(self.text)
        for s in self.stops:  # hold back a tail that a stop string starts with
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        self._emit(safe)

    def _emit(self, upto: int) -> None:
        if upto > self.shown:
            self.write(self.text[self.shown:upto])
            self.shown = upto

    def finish(self, reply: str) -> None:
        done = self.text[:self.shown]
        if reply.startswith(done) and len(reply) > len(done):
            self.write(reply[len(done):])
