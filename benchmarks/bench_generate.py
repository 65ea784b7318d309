"""Batched greedy generation: temper vs transformers `generate`, same weights, same batch.

    python benchmarks/bench_generate.py [--batch 8 --prompt-len 64 --new-tokens 128 --hidden 384 --layers 6]

Builds a random Llama of the given shape with transformers, loads the same weights into
temper through the HF converter, checks the greedy tokens agree (and exits with status 1,
timing nothing, when they do not), then times both (best of --repeats runs, alternating
the two, after a warm-up) and prints tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_arguments(ap: argparse.ArgumentParser) -> None:
    """The shape of the random Llama (llama-14m's by default), the threads and the device."""
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu")


def same_weights(args):
    """(transformers model, temper model): one random Llama of `args`' shape (seed 0), loaded into
    temper through the HF converter; both in eval mode."""
    import transformers

    from temper.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 32 * 32,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens, tie_word_embeddings=True,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval().to(args.device)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d, device=args.device, dtype=torch.float32).eval()
    return hf, ours


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    model_arguments(ap)
    args = ap.parse_args()

    import transformers

    from temper.models.generate import SamplingConfig, generate

    hf, ours = same_weights(args)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), device=args.device)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens)

    def run_temper():
        return generate(ours, prompts.tolist(), cfg)

    def run_hf():
        with torch.no_grad():
            return hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               pad_token_id=0, eos_token_id=None)

    ours_tokens, hf_tokens = run_temper(), run_hf()[:, args.prompt_len:].tolist()
    if ours_tokens != hf_tokens:  # a speed of different work means nothing
        row = next(i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b)
        step = next(i for i, (a, b) in enumerate(zip(ours_tokens[row], hf_tokens[row])) if a != b)
        sys.exit(f"greedy tokens differ (row {row}, step {step}: temper {ours_tokens[row][step]}, "
                 f"transformers {hf_tokens[row][step]}); not timing different work")
    # interleave the two sides so that drifts of a shared, noisy machine hit both alike
    t_temper, t_hf = [], []
    for _ in range(args.repeats):
        t_temper.append(timed(run_temper))
        t_hf.append(timed(run_hf))
    t_temper, t_hf = min(t_temper), min(t_hf)
    n = args.batch * args.new_tokens
    params = sum(p.numel() for p in hf.parameters())
    print(f"model: llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
          f"vocab={args.vocab} ({params / 1e6:.1f}M params), batch={args.batch}, prompt={args.prompt_len}, "
          f"new={args.new_tokens}, device={args.device}, threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("greedy tokens identical: True (checked before timing)")
    print(f"temper        {n / t_temper:10.1f} tokens/s  ({t_temper:.3f} s)")
    print(f"transformers  {n / t_hf:10.1f} tokens/s  ({t_hf:.3f} s)")
    print(f"ratio temper/transformers: {t_hf / t_temper:.2f}x")


if __name__ == "__main__":
    main()
