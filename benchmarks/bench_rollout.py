"""GRPO-style rollouts: G sampled completions of each prompt, with one shared prefill per prompt,
against the same sampling with every prompt duplicated G times, and against transformers
`generate(num_return_sequences=G)`; same weights, same lengths, in one command.

    python benchmarks/bench_rollout.py [--groups 1x8,8x8 --prompt-len 64 --new-tokens 64 --repeats 3]

A random Llama of the llama-14m shape (hidden 384, 6 layers, 6/2 GQA heads, vocab 8192, tied)
is built with transformers and loaded into temper through the HF converter. Every side samples
at temperature 1 with no top-k or top-p and no EOS, so every row makes exactly --new-tokens
tokens (the same work). Before timing, the grouped and duplicated runs must give the same
tokens under the same seed (the shared prefill changes the work, not the samples), else the
script exits with status 1. Each case alternates the sides (best of --repeats, after a warm-up)
and prints completion tokens/s and the ratios; then the time of the old-policy log-probs of
that generation batch (`rollout_logprobs`, one no-grad forward), for scale. The load average
is printed next to the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import transformers

from temper.models.generate import SamplingConfig, generate
from temper.train.rollout import rollout_logprobs, sample_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import model_arguments, same_weights, timed  # noqa: E402  (the same model as bench_generate)


def bench_case(ours, hf, args, num_prompts: int, G: int) -> None:
    """Time the three sides on num_prompts x G completions and print the figures."""
    case = f"{num_prompts}x{G}"
    prompts = torch.randint(3, args.vocab, (num_prompts, args.prompt_len), device=args.device)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)

    def grouped():
        with torch.inference_mode():
            return generate(ours, prompts.tolist(), cfg, num_return_sequences=G)

    def duplicated():
        with torch.inference_mode():
            return generate(ours, prompts.repeat_interleave(G, dim=0).tolist(), cfg)

    def hf_generate():
        with torch.inference_mode():
            return hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                               temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               pad_token_id=0, eos_token_id=None)

    shared, copies, theirs = grouped(), duplicated(), hf_generate()  # also the warm-up
    if shared != copies:
        sys.exit(f"{case}: grouped and duplicated sampling differ under the same seed; not timing")
    n = num_prompts * G * args.new_tokens
    assert all(len(row) == args.new_tokens for row in shared) and theirs.shape[1] - args.prompt_len == \
        args.new_tokens and theirs.shape[0] == num_prompts * G, "every side makes the same tokens"
    times: dict[str, list[float]] = {"grouped": [], "duplicated": [], "transformers": []}
    for _ in range(args.repeats):  # alternate: drifts of a shared machine hit all sides alike
        for name, fn in (("grouped", grouped), ("duplicated", duplicated), ("transformers", hf_generate)):
            times[name].append(timed(fn))
    best = {name: min(t) for name, t in times.items()}
    rollout = sample_groups(ours, prompts.tolist(), G, cfg)
    start = time.perf_counter()
    rollout_logprobs(ours, rollout)
    t_logp = time.perf_counter() - start
    load = os.getloadavg()
    print(f"\n{num_prompts} prompt(s) x G={G} x {args.new_tokens} new tokens ({n} completion tokens), "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; grouped == duplicated tokens: True")
    for name, label in (("grouped", "temper, shared prefill"), ("duplicated", "temper, prompts duplicated"),
                        ("transformers", "transformers num_return_sequences")):
        print(f"  {label:36s} {n / best[name]:9.1f} tokens/s  ({best[name]:.3f} s)")
    print(f"  ratio shared prefill / duplicated:   {best['duplicated'] / best['grouped']:.2f}x")
    print(f"  ratio shared prefill / transformers: {best['transformers'] / best['grouped']:.2f}x")
    print(f"  old-policy log-probs of the batch (rollout_logprobs, one forward): {t_logp:.3f} s "
          f"({t_logp / best['grouped']:.2f}x the sampling time)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", default="1x8,8x8", help="comma-separated PROMPTSxG cases")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    model_arguments(ap)
    args = ap.parse_args()
    hf, ours = same_weights(args)
    params = sum(p.numel() for p in hf.parameters())
    print(f"model: llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
          f"vocab={args.vocab} ({params / 1e6:.1f}M params), prompt={args.prompt_len}, new={args.new_tokens}, "
          f"sampling temperature 1, no top-k/top-p, no EOS; device={args.device}, threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")

    for case in args.groups.split(","):
        num_prompts, G = (int(x) for x in case.lower().split("x"))
        bench_case(ours, hf, args, num_prompts, G)

if __name__ == "__main__":
    main()
