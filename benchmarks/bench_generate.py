"""Batched greedy generation: temper vs transformers `generate`, same weights, same batch.

    python benchmarks/bench_generate.py [--batch 8 --prompt-len 64 --new-tokens 128 --hidden 384 --layers 6]
                                        [--precision fp32|bf16] [--ops]

Builds a random Llama of the given shape with transformers, loads the same weights into
temper through the HF converter, checks the greedy tokens agree (and exits with status 1,
timing nothing, when they do not), then times both (best of --repeats runs, alternating
the two, after a warm-up) and prints tokens/s and the ratio.

--precision bf16 runs both models with bf16 weights (and so a bf16 KV cache), as one serves a
model for inference (`load_model(dtype=bfloat16)`, `from_pretrained(dtype=bfloat16)`), not
autocast over fp32 weights. Two libraries round differently in bf16, so their greedy tokens
may part after a near tie; the check is then that each side's bf16 tokens agree with the fp32
tokens (which both sides share, checked) about as well as the other side's: the agreement
rates are printed, and the run is timed whatever they are.

--ops also counts the top-level aten calls per decode token of each side (torch.profiler,
two runs of different lengths, differenced): the per-token dispatch work, which a loaded
machine does not blur.
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
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: both models with bf16 weights, as served for inference")


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


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of rows' tokens that agree up to each row's first difference (after it, a greedy
    decode follows another text, and later agreement means nothing)."""
    agreed = 0
    for x, y in zip(a, b):
        agreed += next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
    return agreed / sum(len(x) for x in a)


def ops_per_token(run, short: int, long: int) -> float:
    """Top-level aten calls per decode token: a run of `long` new tokens less one of `short`."""
    from torch.profiler import profile

    def count(n: int) -> int:
        with profile() as prof:
            run(n)
        return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))
    return (count(long) - count(short)) / (long - short)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ops", action="store_true", help="also count aten calls per decode token of each side")
    model_arguments(ap)
    args = ap.parse_args()

    import transformers

    from temper.models.generate import SamplingConfig, generate

    hf, ours = same_weights(args)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), device=args.device)

    def run_temper(new_tokens=args.new_tokens):
        return generate(ours, prompts.tolist(), SamplingConfig(max_new_tokens=new_tokens))

    def run_hf(new_tokens=args.new_tokens):
        with torch.no_grad():
            return hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=0, eos_token_id=None)

    ours_tokens, hf_tokens = run_temper(), run_hf()[:, args.prompt_len:].tolist()
    if ours_tokens != hf_tokens:  # a speed of different work means nothing
        row = next(i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b)
        step = next(i for i, (a, b) in enumerate(zip(ours_tokens[row], hf_tokens[row])) if a != b)
        sys.exit(f"greedy tokens differ (row {row}, step {step}: temper {ours_tokens[row][step]}, "
                 f"transformers {hf_tokens[row][step]}); not timing different work")
    check = "greedy tokens identical: True (checked before timing)"
    if args.precision == "bf16":  # the fp32 tokens above are the reference each side's bf16 is held to
        hf.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        ours_bf16, hf_bf16 = run_temper(), run_hf()[:, args.prompt_len:].tolist()
        check = (f"greedy tokens identical in fp32: True; in bf16, agreement with the fp32 tokens: temper "
                 f"{agreement(ours_bf16, ours_tokens):.1%}, transformers {agreement(hf_bf16, hf_tokens):.1%}; "
                 f"temper with transformers {agreement(ours_bf16, hf_bf16):.1%}")
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
          f"new={args.new_tokens}, precision={args.precision}, device={args.device}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(check)
    print(f"temper        {n / t_temper:10.1f} tokens/s  ({t_temper:.3f} s)")
    print(f"transformers  {n / t_hf:10.1f} tokens/s  ({t_hf:.3f} s)")
    print(f"ratio temper/transformers: {t_hf / t_temper:.2f}x")
    if args.ops:
        short, long = min(8, args.new_tokens), max(args.new_tokens, 9)
        print(f"aten calls per decode token: temper {ops_per_token(run_temper, short, long):.0f}, "
              f"transformers {ops_per_token(run_hf, short, long):.0f}")


if __name__ == "__main__":
    main()
