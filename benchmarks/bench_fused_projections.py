"""Would fused projections pay? One (q|k|v) matmul instead of three, one (gate|up) instead of two.

    python benchmarks/bench_fused_projections.py [--preset llama-14m --batch 8 --seq-len 256 --precision fp32]

The projections of one block at a preset's shapes, forward and backward (weight and input
gradients, as in training), both ways in one process, alternating, best of --rounds:
  separate: x @ Wq^T, x @ Wk^T, x @ Wv^T, x @ Wgate^T, x @ Wup^T  (temper's modules, HF's names)
  fused:    x @ [Wq; Wk; Wv]^T split three ways, x @ [Wgate; Wup]^T split two ways
Fusing would cost the HF/PEFT names of the modules (`target_modules=[q_proj, v_proj]`, tensor-
parallel slicing by head, GGUF and quantisation per module) unless a state-dict adapter rebuilt
them, so it is worth doing only where this measures a real gain.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-14m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from temper.models import preset

    c = preset(args.preset)
    torch.manual_seed(0)
    C, q, kv, ff = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    x = torch.randn(args.batch * args.seq_len, C, requires_grad=True)
    separate = [torch.randn(n, C).mul_(C ** -0.5).requires_grad_() for n in (q, kv, kv, ff, ff)]
    qkv = torch.cat(separate[:3]).detach().requires_grad_()
    gate_up = torch.cat(separate[3:]).detach().requires_grad_()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext
    grads = [torch.randn(x.shape[0], n) for n in (q, kv, kv, ff, ff)]

    def run_separate() -> None:
        with autocast():
            outs = [x @ w.t() for w in separate]
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])

    def run_fused() -> None:
        with autocast():
            outs = [*(x @ qkv.t()).split([q, kv, kv], -1), *(x @ gate_up.t()).split([ff, ff], -1)]
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])

    best = {"separate": float("inf"), "fused": float("inf")}
    for _ in range(args.rounds):
        for name, fn in (("separate", run_separate), ("fused", run_fused)):
            for _ in range(2):
                fn()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / args.iters)
    flops = 3 * 2 * x.shape[0] * C * (q + 2 * kv + 2 * ff)  # forward + two backward matmuls
    print(f"{args.preset} projections of one block, {x.shape[0]} tokens x {C}, {args.precision}, "
          f"{torch.get_num_threads()} threads, forward + backward, best of {args.rounds} x {args.iters}")
    for name, t in best.items():
        print(f"{name:9s} {t * 1e3:8.2f} ms   {flops / t / 1e9:7.1f} GFLOP/s")
    print(f"fused / separate speed: {best['separate'] / best['fused']:.3f}x")


if __name__ == "__main__":
    main()
