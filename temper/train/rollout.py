"""Rollouts: the policy's own answers to prompts, sampled inside training (online DPO rounds now;
GRPO and PPO next).

    responses = sample_responses(model, tokenizer, template, prompts, k=4, temperature=1.0, top_p=1.0,
                                 max_new_tokens=48, seed=0)    # k answers to each prompt

Sampling is temper's batched generation (`temper.models.generate`: KV cache, left padding)
with the policy's chat template and its stop strings; one seeded stream for the whole call,
so the same seed gives the same answers.
"""

from __future__ import annotations

import torch

from temper.data.chat import render, render_kwargs, stop_settings
from temper.data.prompts import Prompt
from temper.models.generate import SamplingConfig, generate_text


def sample_responses(model, tokenizer, template: str, prompts: list[Prompt], k: int, *, temperature: float,
                     top_p: float, max_new_tokens: int, seed: int, batch_size: int = 32) -> list[list[str]]:
    """k responses to each prompt (stripped), sampled in batches that keep a prompt's copies together."""
    texts = [render(template, p.messages, add_generation_prompt=True, **render_kwargs(tokenizer)) for p in prompts]
    stops, eos_ids = stop_settings(tokenizer, template)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stops,
                              eos_token_ids=eos_ids)
    torch.manual_seed(seed)  # one stream for all batches (a per-call seed would repeat itself batch after batch)
    was_training = model.training
    model.eval()
    flat = generate_text(model, tokenizer, [t for t in texts for _ in range(k)], sampling,
                         batch_size=max(k, batch_size // k * k))
    model.train(was_training)
    flat = [r.strip() for r in flat]
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
