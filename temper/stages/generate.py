"""Generate text from a model directory: one `prompt=`, or every row of `prompts_file=`.

    temper generate model=runs/pretrain prompt="Once upon a time" max_new_tokens=64
    temper generate model=DIR prompts_file=prompts.jsonl output_file=out.jsonl batch_size=16

A single prompt streams its completion to the terminal. A prompts file is JSONL with a
`prompt` field per line; each result is written as {"prompt", "completion"}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from temper.config import opt
from temper.errors import TemperError


@dataclass
class Config:
    model: str = opt("", "model directory (Hugging Face format: config.json, model.safetensors, tokenizer.json)")
    prompt: str | None = opt(None, "the prompt to complete")
    prompts_file: str | None = opt(None, "JSONL file with one {\"prompt\": ...} per line, generated in batches")
    prompt_field: str = opt("prompt", "the field of prompts_file that holds the prompt")
    output_file: str | None = opt(None, "where to write the JSONL results of prompts_file (default: stdout)")
    max_new_tokens: int = opt(128, "the most tokens to generate per prompt")
    temperature: float = opt(0.8, "sampling temperature; 0 is greedy decoding")
    top_k: int = opt(50, "sample from the k most likely tokens (0: off)")
    top_p: float = opt(1.0, "nucleus sampling: the smallest set of tokens with this much probability (1: off)")
    repetition_penalty: float = opt(1.0, "divide the logits of tokens already present by this (1: off)")
    stop: list[str] = opt([], "stop strings: generation ends when one appears (it is not printed)")
    seed: int = opt(0, "random seed; the same seed gives the same samples")
    batch_size: int = opt(8, "prompts generated together (left-padded)")
    stream: bool = opt(True, "stream the completion of a single prompt as it is generated")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16")

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: a model directory")
        if (self.prompt is None) == (self.prompts_file is None):
            raise TemperError("give exactly one of prompt=\"...\" or prompts_file=FILE.jsonl")
        if self.prompt is not None and not self.prompt:
            raise TemperError("prompt= is empty")
        if self.batch_size < 1:
            raise TemperError(f"batch_size must be at least 1, got {self.batch_size}")


def read_prompts(path: str, field: str) -> list[str]:
    from temper.data.readers import iter_records

    prompts = []
    for rec in iter_records(path):
        value = rec.data.get(field)
        if not isinstance(value, str) or not value:
            raise TemperError(f"{rec.source}: expected a non-empty string field '{field}'")
        prompts.append(value)
    if not prompts:
        raise TemperError(f"{path}: no prompts (the file is empty)")
    return prompts


def run(cfg: Config) -> None:
    import torch
    from tqdm import tqdm

    from temper.data.tokenizer import Tokenizer
    from temper.models import load_model
    from temper.models.generate import SamplingConfig, generate_text
    from temper.runtime import resolve_device

    prompts = [cfg.prompt] if cfg.prompt is not None else read_prompts(cfg.prompts_file, cfg.prompt_field)
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype).eval()
    tokenizer = Tokenizer.from_dir(cfg.model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TemperError(
            f"{cfg.model}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size} embeddings"
        )
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty, stop=tuple(cfg.stop), seed=cfg.seed,
    )
    try:
        sampling.validate()
    except ValueError as e:
        raise TemperError(str(e)) from None
    torch.manual_seed(cfg.seed)

    if cfg.prompt is not None:
        if cfg.stream and sys.stdout.isatty() and not cfg.stop:
            def show(_row: int, text: str) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            generate_text(model, tokenizer, prompts, sampling, on_text=show)
            sys.stdout.write("\n")
        else:
            print(generate_text(model, tokenizer, prompts, sampling)[0])
        return

    out = open(cfg.output_file, "w", encoding="utf-8") if cfg.output_file else sys.stdout
    try:
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr,
                   disable=not sys.stderr.isatty())
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start:start + cfg.batch_size]
            for prompt, completion in zip(chunk, generate_text(model, tokenizer, chunk, sampling,
                                                               batch_size=cfg.batch_size)):
                out.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
        bar.close()
    finally:
        if out is not sys.stdout:
            out.close()
