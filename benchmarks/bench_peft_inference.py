"""Two PEFT claims at inference time, measured on one machine in one command.

    python benchmarks/bench_peft_inference.py [--preset llama-14m --batch 8 --new-tokens 64]

1. Base-weight memory: the bytes of the linear layers' weights in fp32, fp16 and NF4 with
   double quantisation (what QLoRA keeps frozen), on a preset's shape.
2. Merging: greedy generation speed of the base model, the same model with an unmerged
   LoRA (r=8 on every linear layer) and with that LoRA merged; the merged model should
   cost the same as the base, and produce the same tokens as the unmerged one.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-14m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from temper.config import PeftConfig
    from temper.models import build_model, preset
    from temper.models.generate import SamplingConfig, generate
    from temper.peft.lora import inject_lora, lora_modules, merge_lora
    from temper.quant.nf4 import Linear4bit, quantize_model

    torch.manual_seed(0)
    model = build_model(preset(args.preset)).eval()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not model.lm_head.weight]
    n = sum(m.weight.numel() for m in linear)
    quantized = build_model(preset(args.preset))
    quantize_model(quantized)
    nf4 = sum(sum(b.numel() * b.element_size() for b in m.buffers()) for m in quantized.modules()
              if isinstance(m, Linear4bit))
    print(f"{args.preset}: {n:,} linear-layer weights")
    print(f"  fp32 {n * 4 / 2**20:7.2f} MB   fp16 {n * 2 / 2**20:7.2f} MB   NF4+double quant {nf4 / 2**20:7.2f} MB "
          f"({n * 2 / nf4:.2f}x smaller than fp16, {8 * nf4 / n:.3f} bits/weight)")

    prompts = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len)).tolist()
    cfg = SamplingConfig(max_new_tokens=args.new_tokens)

    def timed(m) -> tuple[float, list]:
        generate(m, prompts, cfg)  # warm-up
        best, out = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = generate(m, prompts, cfg)
            best = min(best, time.perf_counter() - t0)
        return best, out

    t_base, _ = timed(model)
    inject_lora(model, PeftConfig(method="lora", r=8, target_modules=["all-linear"]))
    with torch.no_grad():
        for _, module in lora_modules(model):
            for b in module.lora_B.values():
                b.weight.normal_(0, 0.02)  # a trained-looking adapter, not the zero init
    t_lora, tokens_lora = timed(model)
    merged = merge_lora(model)
    t_merged, tokens_merged = timed(merged)
    tokens = args.batch * args.new_tokens
    print(f"greedy generation, batch {args.batch}, {args.new_tokens} new tokens:")
    for name, t in (("base", t_base), ("LoRA unmerged", t_lora), ("LoRA merged", t_merged)):
        print(f"  {name:14s} {tokens / t:8.1f} tokens/s  ({t / t_base:.2f}x the base's time)")
    print(f"  merged tokens identical to unmerged: {tokens_merged == tokens_lora}")


if __name__ == "__main__":
    main()
