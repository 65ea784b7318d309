"""Generate text from a model directory: one `prompt=`, or every row of `prompts_file=`.

    temper generate model=runs/pretrain prompt="Once upon a time" max_new_tokens=64
    temper generate model=DIR prompts_file=prompts.jsonl output_file=out.jsonl batch_size=16

A single prompt streams its completion to the terminal. A prompts file is JSONL with a
`prompt` field per line; each result is written as {"prompt", "completion"}.

Chat models: `chat=true` wraps each prompt as a user message (after `system=`, if given)
and renders it with the chat template (the model's own, or `template=`), with the
generation prompt, and stops at the template's end-of-turn marker. A prompts-file row
that holds a conversation, as a `messages` list or as a `prompt` list of messages (TRL's
conversational prompt format), is rendered the same way, chat=true or not.

    temper generate model=runs/sft chat=true prompt="Where does Alice live?"
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from temper.config import OnlyWith, check_range, check_utf8, opt
from temper.data.chat import StopWriter, chat_template_for, render, render_kwargs, stop_settings
from temper.data.prompts import Prompt, read_prompts
from temper.errors import TemperError
from temper.io import atomic_writer, claim_output_file
from temper.lineage import read_lineage
from temper.loading import load_for_inference
from temper.models.generate import GREEDY_IGNORES, SamplingConfig, generate_text
from temper.runtime import resolve_device


@dataclass
class Config:
    model: str = opt("", "model directory (Hugging Face format: config.json, model.safetensors, tokenizer.json)")
    prompt: str | None = opt(None, "the prompt to complete")
    prompts_file: str | None = opt(None, "JSONL file with one {\"prompt\": ...} per line, generated in batches")
    prompt_field: str = opt("prompt", "the field of prompts_file that holds the prompt")
    output_file: str | None = opt(None, "where to write the JSONL results of prompts_file (default: stdout)")
    overwrite: bool = opt(False, "replace an existing output_file")
    max_new_tokens: int = opt(128, "the most tokens to generate per prompt")
    temperature: float = opt(0.8, "sampling temperature; 0 is greedy decoding")
    top_k: int = opt(50, "sample from the k most likely tokens (0: off)")
    top_p: float = opt(1.0, "nucleus sampling: the smallest set of tokens with this much probability (1: off)")
    repetition_penalty: float = opt(1.0, "divide the logits of tokens already present by this (1: off)")
    stop: list[str] = opt([], "stop strings: generation ends when one appears (it is not printed)")
    seed: int = opt(0, "random seed; the same seed gives the same samples")
    batch_size: int = opt(8, "prompts generated together (left-padded)")
    stream: bool = opt(True, "stream the completion of a single prompt as it is generated")
    chat: bool = opt(False, "wrap each prompt as a user message and render it with the model's chat template")
    template: str | None = opt(None, "chat template: chatml, llama3, plain, a .jinja file, or the model's (default)")
    system: str | None = opt(None, "system prompt of chat prompts (those without a system message of their own)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16")

    only_with: ClassVar = (
        GREEDY_IGNORES,
        OnlyWith(("stream",), "prompt=", lambda c: c.prompt is not None, "a prompts file is written as JSONL"),
        OnlyWith(("output_file", "prompt_field", "batch_size"), "prompts_file=", lambda c: c.prompts_file is not None),
    )

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: a model directory")
        if (self.prompt is None) == (self.prompts_file is None):
            raise TemperError("give exactly one of prompt=\"...\" or prompts_file=FILE.jsonl")
        if self.prompt is not None and not self.prompt:
            raise TemperError("prompt= is empty")
        check_utf8("prompt=", self.prompt)
        check_utf8("system=", self.system)
        for i, stop in enumerate(self.stop):
            check_utf8(f"stop[{i}]=", stop)
        check_range("batch_size", self.batch_size, low=1)
        SamplingConfig.of(self)
        if self.overwrite and not (self.output_file and self.prompts_file):
            raise TemperError("overwrite=true replaces an existing output_file of prompts_file's results: give both")


def chat_messages(prompt: Prompt, system: str | None) -> list[dict[str, Any]]:
    """A prompt as a conversation: a string becomes one user message; `system` leads unless it has one."""
    messages = list(prompt.messages)
    if system and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def run(cfg: Config) -> None:
    if not (cfg.output_file and cfg.prompts_file):
        return generate(cfg, None)
    # claimed before any work: never a device, an input, a model's file, nor another writer's
    with claim_output_file(cfg.output_file, key="output_file", inputs={"prompts_file": cfg.prompts_file},
                           overwrite=cfg.overwrite) as target:
        return generate(cfg, target)


def generate(cfg: Config, output: Path | None) -> None:
    """Generate for `cfg`; a prompts file's results go to `output` (claimed), else to stdout."""
    prompts = [Prompt(cfg.prompt)] if cfg.prompt is not None else read_prompts(cfg.prompts_file,
                                                                               field_name=cfg.prompt_field)
    use_chat = cfg.chat or any(isinstance(p.prompt, list) for p in prompts)
    if not use_chat and (cfg.template or cfg.system):
        raise TemperError("template= and system= are for chat prompts: add chat=true")
    device = resolve_device(cfg.device)
    model, tokenizer = load_for_inference(cfg.model, device=device, dtype=cfg.dtype)
    if not use_chat:
        if read_lineage(cfg.model).get("chat_template_trained"):
            warnings.warn(f"{cfg.model} was fine-tuned with a chat template; a raw prompt bypasses it "
                          "and the model will look worse than it is: add chat=true", stacklevel=2)
    stops, eos_ids = list(cfg.stop), []
    texts: list[str] = [p.prompt for p in prompts if isinstance(p.prompt, str)]
    if use_chat:  # what the model reads: each conversation rendered with its generation prompt
        template = chat_template_for(cfg.model, tokenizer, cfg.template)
        texts = [render(template, chat_messages(p, cfg.system), add_generation_prompt=True,
                        **render_kwargs(tokenizer)) for p in prompts]
        stops, eos_ids = stop_settings(tokenizer, template, cfg.stop)
    sampling = SamplingConfig.of(cfg, eos_token_ids=eos_ids, stop=stops)
    torch.manual_seed(cfg.seed)

    if cfg.prompt is not None:
        if cfg.stream and sys.stdout.isatty():
            def show(text: str) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            writer = StopWriter(sampling.stop, show)  # never prints a stop string
            writer.finish(generate_text(model, tokenizer, texts, sampling, on_text=writer)[0])
            sys.stdout.write("\n")
        else:
            print(generate_text(model, tokenizer, texts, sampling)[0])
        return

    # a file appears whole when every prompt is done, or not at all (an old one stays as it was)
    with atomic_writer(output) if output is not None else contextlib.nullcontext(sys.stdout) as out:
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr,
                   disable=not sys.stderr.isatty())
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start:start + cfg.batch_size]
            completions = generate_text(model, tokenizer, texts[start:start + cfg.batch_size], sampling,
                                        batch_size=cfg.batch_size)
            for prompt, completion in zip(chunk, completions):
                out.write(json.dumps({"prompt": prompt.prompt, "completion": completion}, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
        bar.close()
