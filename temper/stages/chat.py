"""Chat with a model directory in the terminal, using its chat template.

    temper chat model=runs/sft
    temper chat model=DIR template=chatml system="You are terse." temperature=0.7

Each turn renders the whole conversation with the chat template (the model's own unless
`template=` names another: chatml, llama3, plain, or a .jinja file), streams the reply,
and stops at EOS or the template's end-of-turn marker. Commands: /reset clears the
conversation (the system prompt stays), /system TEXT sets the system prompt and resets,
/exit (or end of input) quits. Lines are read from standard input, so a conversation can
be piped in.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from temper.config import check_utf8, opt
from temper.data.chat import StopWriter, chat_template_for, render, render_kwargs, stop_settings
from temper.errors import TemperError
from temper.loading import load_for_inference
from temper.models.generate import GREEDY_IGNORES, SamplingConfig, generate_text
from temper.runtime import resolve_device

PROMPT = "you> "
REPLY_PREFIX = "model> "
_KEEP = object()  # Session.reset: keep the system prompt
HELP = "commands: /reset (clear the conversation), /system TEXT (new system prompt), /exit"


@dataclass
class Config:
    model: str = opt("", "model directory (Hugging Face format: config.json, model.safetensors, tokenizer.json)")
    template: str | None = opt(None, "chat template: chatml, llama3, plain, a .jinja file, or the model's (default)")
    system: str | None = opt(None, "system prompt (change it in the chat with /system TEXT)")
    max_new_tokens: int = opt(256, "the most tokens per reply")
    temperature: float = opt(0.7, "sampling temperature; 0 is greedy decoding")
    top_k: int = opt(50, "sample from the k most likely tokens (0: off)")
    top_p: float = opt(1.0, "nucleus sampling: the smallest set of tokens with this much probability (1: off)")
    repetition_penalty: float = opt(1.0, "divide the logits of tokens already present by this (1: off)")
    seed: int = opt(0, "random seed; the same seed and conversation give the same replies")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16")

    only_with: ClassVar = (GREEDY_IGNORES,)

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: a model directory")
        check_utf8("system=", self.system)
        SamplingConfig.of(self)


# ----------------------------------------------------------------------------- the chat loop


class Session:
    """A conversation with a model: the messages so far and how to render and answer them."""

    def __init__(self, model, tokenizer, template: str, sampling, *, system: str | None = None) -> None:
        self.model, self.tokenizer, self.template, self.sampling = model, tokenizer, template, sampling
        self.system = system or None
        self.history: list[dict[str, str]] = []  # user/assistant messages, oldest first
        self.turns = 0

    def messages(self, history: list[dict[str, str]]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + history

    def reset(self, *, system: str | None | object = _KEEP) -> None:
        """Clear the conversation; a new system prompt when one is given (None clears it)."""
        if system is not _KEEP:
            self.system = system or None
        self.history = []

    def prompt_for(self, user: str) -> tuple[str, list[dict[str, str]]]:
        """The rendered prompt for a new user message, dropping the oldest exchanges that do not fit."""
        history = [*self.history, {"role": "user", "content": user}]
        limit = self.model.config.max_seq_len - self.sampling.max_new_tokens
        while True:
            prompt = render(self.template, self.messages(history), add_generation_prompt=True,
                            **render_kwargs(self.tokenizer))
            if len(history) <= 1 or len(self.tokenizer.encode(prompt)) <= limit:
                break
            history = history[2:]  # the oldest user message and its reply
            print("(the oldest exchange was dropped to fit the context)", file=sys.stderr)
        return prompt, history

    def reply(self, user: str, write: Callable[[str], Any]) -> str:
        """Answer `user`, streaming the reply through `write`; the exchange joins the history."""
        prompt, history = self.prompt_for(user)
        sampling = replace(self.sampling, seed=None if self.sampling.seed is None else self.sampling.seed + self.turns)
        writer = StopWriter(sampling.stop, write)
        text = generate_text(self.model, self.tokenizer, [prompt], sampling, on_text=writer)[0]
        writer.finish(text)
        self.turns += 1
        self.history = [*history, {"role": "assistant", "content": text.strip()}]
        return text


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat_loop(session: Session, read: Callable[[str], str] = input) -> None:
    """Read lines until /exit or end of input; answer each one that is not a command."""
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            _write("\n")
            return
        text = line.strip()
        if not text:
            continue
        try:
            check_utf8("this line", text)
        except TemperError as e:  # one bad line does not end the conversation
            print(f"({e}; skipped)", file=sys.stderr)
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                print("(conversation cleared)", file=sys.stderr)
            elif command == "/system":
                session.reset(system=arg.strip() or None)
                print(f"(system prompt {'set' if session.system else 'cleared'}; conversation cleared)",
                      file=sys.stderr)
            else:
                print(f"(unknown command {command}) {HELP}", file=sys.stderr)
            continue
        _write(REPLY_PREFIX)
        try:
            session.reply(text, _write)
        except KeyboardInterrupt:  # stop this reply, keep chatting
            print("\n(interrupted)", file=sys.stderr)
            continue
        _write("\n")


def run(cfg: Config) -> None:
    device = resolve_device(cfg.device)
    model, tokenizer = load_for_inference(cfg.model, device=device, dtype=cfg.dtype)
    template = chat_template_for(cfg.model, tokenizer, cfg.template)
    probe = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": "hi"}]
    render(template, probe, add_generation_prompt=True, **render_kwargs(tokenizer))  # fail now, not mid-chat
    stops, eos_ids = stop_settings(tokenizer, template)
    sampling = SamplingConfig.of(cfg, eos_token_ids=eos_ids, stop=stops)
    torch.manual_seed(cfg.seed)

    # undecodable input bytes become surrogates that chat_loop names, instead of a decoding traceback
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        try:
            # lazy: importing readline changes input() for the whole process; only at a terminal
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"chatting with {cfg.model}; {HELP}", file=sys.stderr)
    chat_loop(Session(model, tokenizer, template, sampling, system=cfg.system))
