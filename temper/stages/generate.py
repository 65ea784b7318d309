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

Best-of-N: `best_of=N rank_by=SPEC` samples N completions of each prompts-file row (at
temperature > 0; seeded, completion r of the file draws from its own stream) and keeps the one
that the reward SPEC scores highest, ties to the first sampled. SPEC is any `rewards=` spec of
GRPO (`temper.rewards.functions.RewardSet`): prm:DIR (a process or outcome reward model of
`temper reward objective=prm`), world, gsm8k, judge:reward:DIR, MODULE:FUNCTION, ...; the
row's other columns (`answer`, ...) reach the function as in GRPO, `completion_ids` are the
completion's text re-encoded. Each row is written as {"prompt", "completion": the best,
"candidates": all N in sampling order, "scores": theirs (null where the function returned None;
such a candidate ranks last)}.

    temper generate model=runs/solver prompts_file=p.jsonl output_file=o.jsonl best_of=16 rank_by=prm:runs/prm
"""

from __future__ import annotations

import contextlib
import json
import math
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
from temper.rewards.functions import RewardSet
from temper.rewards.judges import DEFAULT_TIMEOUT, check_timeout
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
    best_of: int = opt(1, "sample this many completions of each prompt and write the one rank_by scores highest "
                          "(with all of them as candidates)")
    rank_by: str | None = opt(None, "best_of's reward: any rewards= spec of GRPO (prm:DIR, world, gsm8k, "
                                    "judge:reward:DIR, MODULE:FUNCTION)")
    rank_timeout: float = opt(DEFAULT_TIMEOUT, "seconds one call of rank_by's function or judge may take (0: no limit)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16")

    only_with: ClassVar = (
        GREEDY_IGNORES,
        OnlyWith(("stream",), "prompt=", lambda c: c.prompt is not None, "a prompts file is written as JSONL"),
        OnlyWith(("output_file", "prompt_field", "batch_size"), "prompts_file=", lambda c: c.prompts_file is not None),
        OnlyWith(("best_of", "rank_by"), "prompts_file=", lambda c: c.prompts_file is not None,
                 "best-of-N writes each prompt's candidates and their scores as a JSONL row"),
        OnlyWith(("rank_timeout",), "rank_by=", lambda c: c.rank_by is not None),
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
        check_range("best_of", self.best_of, low=1)
        check_timeout(self.rank_timeout)
        if self.best_of > 1 and not self.rank_by:
            raise TemperError(f"best_of={self.best_of} needs rank_by=: the reward that picks the best completion "
                              "(prm:DIR, world, judge:reward:DIR or MODULE:FUNCTION)")
        if self.rank_by is not None and self.best_of < 2:
            raise TemperError(f"rank_by={self.rank_by} ranks the samples of best_of=N (N > 1); give best_of=")
        if self.best_of > 1 and self.temperature == 0:
            raise TemperError(f"best_of={self.best_of} with temperature=0: greedy decoding gives {self.best_of} "
                              "copies of one completion; sample with temperature > 0 (e.g. temperature=1)")
        if self.overwrite and not (self.output_file and self.prompts_file):
            raise TemperError("overwrite=true replaces an existing output_file of prompts_file's results: give both")


def chat_messages(prompt: Prompt, system: str | None) -> list[dict[str, Any]]:
    """A prompt as a conversation: a string becomes one user message; `system` leads unless it has one."""
    messages = list(prompt.messages)
    if system and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def run(cfg: Config) -> dict | None:
    if not (cfg.output_file and cfg.prompts_file):
        return generate(cfg, None)
    # claimed before any work: never a device, an input, a model's file, nor another writer's
    with claim_output_file(cfg.output_file, key="output_file", inputs={"prompts_file": cfg.prompts_file},
                           overwrite=cfg.overwrite) as target:
        return generate(cfg, target)


def generate(cfg: Config, output: Path | None) -> dict | None:
    """Generate for `cfg`; a prompts file's results go to `output` (claimed), else to stdout. Returns
    what was written to a file; None when the text went to stdout (it is the command's output)."""
    prompts = [Prompt(cfg.prompt)] if cfg.prompt is not None else read_prompts(cfg.prompts_file,
                                                                               field_name=cfg.prompt_field)
    use_chat = cfg.chat or any(isinstance(p.prompt, list) for p in prompts)
    if not use_chat and (cfg.template or cfg.system):
        raise TemperError("template= and system= are for chat prompts: add chat=true")
    device = resolve_device(cfg.device)
    ranker = None
    if cfg.best_of > 1:  # built and checked against the rows before the model loads and samples
        ranker = RewardSet([cfg.rank_by], option="rank_by=", max_completion_length=cfg.max_new_tokens,
                           timeout=cfg.rank_timeout, device=device, timeout_setting="rank_timeout")
        ranker.check_prompts(prompts)
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
        return None

    # a file appears whole when every prompt is done, or not at all (an old one stays as it was)
    try:
        with atomic_writer(output) if output is not None else contextlib.nullcontext(sys.stdout) as out:
            bar = tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr,
                       disable=not sys.stderr.isatty())
            for start in range(0, len(prompts), cfg.batch_size):
                chunk = prompts[start:start + cfg.batch_size]
                if ranker is None:
                    completions = generate_text(model, tokenizer, texts[start:start + cfg.batch_size], sampling,
                                                batch_size=cfg.batch_size, first_prompt=start)
                    rows = [{"prompt": p.prompt, "completion": c} for p, c in zip(chunk, completions)]
                else:
                    rows = best_of_n(model, tokenizer, chunk, texts[start:start + cfg.batch_size], sampling,
                                     cfg.best_of, ranker, first=start)
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                bar.update(len(chunk))
            bar.close()
    finally:
        if ranker is not None:
            ranker.close()
    if output is None:
        return None
    return {"prompts": len(prompts), "output": str(output), "best_of": cfg.best_of,
            "max_new_tokens": cfg.max_new_tokens}


def summary_lines(cfg: Config, result: dict) -> list[str]:
    best = f", the best of {result['best_of']} by {cfg.rank_by}" if result["best_of"] > 1 else ""
    return [f"generate: {result['prompts']:,} completions (up to {result['max_new_tokens']} tokens each{best}) -> "
            f"{result['output']}"]


def best_of_n(model, tokenizer, prompts: list[Prompt], texts: list[str], sampling: SamplingConfig, n: int,
              ranker: RewardSet, *, first: int = 0) -> list[dict[str, Any]]:
    """Each prompt's row: n sampled candidates, `ranker`'s total score of each, and the best (the first
    of the highest; a candidate no function scores, NaN, ranks below every scored one)."""
    candidates = generate_text(model, tokenizer, texts, sampling, batch_size=len(texts), num_return_sequences=n,
                               first_prompt=first)
    ids = [tokenizer.encode(c) for c in candidates]
    total, _ = ranker.score([p for p in prompts for _ in range(n)], candidates, ids)
    rows = []
    for i, prompt in enumerate(prompts):
        mine = candidates[i * n:(i + 1) * n]
        scores = [None if math.isnan(v) else v for v in total[i * n:(i + 1) * n].tolist()]
        best = max(range(n), key=lambda k: (scores[k] is not None, scores[k] or 0.0, -k))
        rows.append({"prompt": prompt.prompt, "completion": mine[best], "candidates": mine, "scores": scores})
    return rows
