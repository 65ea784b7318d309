"""Under bf16 autocast on a CPU, is SDPA faster in bf16 or in fp32 (casts included)?

    python benchmarks/bench_sdpa_precision.py [--batch 8 --heads 6 --kv-heads 2 --seq-len 256 --head-dim 64]

One layer's causal grouped-query attention at llama-14m's shapes, forward + backward, with the
inputs laid out as the model makes them (transposed (B, T, H, D) views of the projections):
  bf16:        SDPA on the bf16 q, k, v (what autocast runs today)
  fp32:        q, k, v cast to fp32, SDPA, the output cast back to bf16 (the casts counted)
  bf16-contig: SDPA on contiguous copies of the bf16 inputs
alternating, best of --rounds x --iters.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    B, T, D = args.batch, args.seq_len, args.head_dim

    def inputs():
        return [torch.randn(B, T, h, D).transpose(1, 2).to(torch.bfloat16).requires_grad_()
                for h in (args.heads, args.kv_heads, args.kv_heads)]

    def run(mode: str) -> None:
        q, k, v = inputs()
        if mode == "fp32":
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                               enable_gqa=True).to(torch.bfloat16)
        elif mode == "bf16-contig":
            y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True,
                                               enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        y.backward(torch.ones_like(y))

    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for mode in ("bf16", "fp32", "bf16-contig"):
            run(mode)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                run(mode)
            best[mode] = min(best.get(mode, float("inf")), (time.perf_counter() - t0) / args.iters)
    print(f"SDPA fwd+bwd, {B} x {args.heads}/{args.kv_heads} heads x {T} x {D}, causal, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} x {args.iters}")
    for mode, t in best.items():
        print(f"{mode:12s} {t * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
