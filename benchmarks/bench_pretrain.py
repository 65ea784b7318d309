"""Training throughput and peak memory: temper vs transformers' LlamaForCausalLM, same shape.

    python benchmarks/bench_pretrain.py [--preset llama-14m --batch 8 --seq-len 256 --steps 8]
                                        [--precision fp32|bf16] [--compile]

One command: it measures the dense matmul peak of this machine in the precision benchmarked
(`--precision bf16`: torch.autocast bf16 with fp32 master weights on BOTH sides, what temper's
`precision=bf16` does), then runs each side
in its own subprocess (so peak memory is that side's alone), alternating the sides for --rounds rounds and
keeping each side's best, on the same shape, batch,
sequence length and optimiser (AdamW; temper: fused kernels and the chunked output-layer
cross-entropy; transformers: SDPA attention, `labels=` loss, torch's default AdamW), and
prints tokens/s, MFU and peak RSS for both with the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch


def side(args) -> dict:
    from temper.models import build_model, preset
    from temper.train.engine import flops_per_token

    torch.manual_seed(0)
    config = preset(args.preset, max_seq_len=max(args.seq_len, 512))
    temper_model = build_model(config)
    flops = flops_per_token(temper_model, args.seq_len)
    params = temper_model.num_parameters()
    device = torch.device(args.device)
    data = torch.randint(0, config.vocab_size, (args.steps + args.warmup, args.batch, args.seq_len + 1)).to(device)

    # bf16: the forward under autocast (the backward follows its dtypes), fp32 master weights
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext
    if args.only == "temper":
        from temper.config import OptimConfig
        from temper.losses import causal_lm_loss
        from temper.train.optim import build_optimizer

        model = temper_model.to(device).train()
        if args.compile:
            model.compile()
        opt = build_optimizer(model, OptimConfig(lr=1e-4, fused=True))

        def step(batch):
            with autocast():
                loss_sum, n = causal_lm_loss(model, batch[:, :-1], batch[:, 1:])
            (loss_sum / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import transformers

        from temper.models.hf import config_to_hf

        del temper_model
        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                             if k not in ("architectures", "model_type")})
        model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(batch):
            with autocast():
                out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        step(data[i])
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    tokens_per_second = args.batch * args.seq_len / median
    if device.type == "cuda":  # the GPU's memory, not the host's
        peak_rss_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": args.only, "tokens_per_second": tokens_per_second, "flops_per_token": flops,
            "params": params, "peak_rss_mb": peak_rss_mb}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-14m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile temper's model")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a GPU row: --device cuda --precision bf16 "
                    "--preset llama-125m --batch 16 --seq-len 1024)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast with fp32 master weights, both sides")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each side; the best is kept")
    ap.add_argument("--only", choices=["temper", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(side(args)))
        return

    from temper.train.engine import measure_matmul_peak

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    device = torch.device(args.device)
    size = 1024 if device.type == "cpu" else 8192  # a GPU needs large matrices to reach its peak
    peak = measure_matmul_peak(device, dtype, seconds=3.0, size=size, trials=15)
    spec = None
    if device.type == "cuda":  # MFU against the data sheet's dense peak too, where the GPU is known
        from temper.train.memory import PEAK_TFLOPS

        name = torch.cuda.get_device_name(device).lower()
        spec = next((p[args.precision] * 1e12 for gpu, p in PEAK_TFLOPS.items() if gpu in name), None)
    results: dict[str, dict] = {}
    for _ in range(args.rounds):  # alternate the sides; keep each side's best round
        for name in ("temper", "transformers"):
            cmd = [sys.executable, __file__, "--only", name, "--preset", args.preset, "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision, "--device", args.device]
            if args.compile:
                cmd.append("--compile")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if name not in results or r["tokens_per_second"] > results[name]["tokens_per_second"]:
                results[name] = r
    t, h = results["temper"], results["transformers"]
    import transformers

    print(f"shape: {args.preset} ({t['params'] / 1e6:.1f}M params), batch {args.batch} x seq {args.seq_len}, {args.precision}, "
          f"{args.device}, CPU threads {torch.get_num_threads()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"measured {args.precision} matmul peak: {peak / 1e9:.1f} GFLOP/s"
          + (f"; data-sheet dense peak {spec / 1e12:.0f} TFLOP/s" if spec else ""))
    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    for name, r in results.items():
        mfu = r["tokens_per_second"] * r["flops_per_token"] / peak
        sheet = f" ({r['tokens_per_second'] * r['flops_per_token'] / spec:.1%} of the data sheet)" if spec else ""
        print(f"{name:13s} {r['tokens_per_second']:9.0f} tokens/s   MFU {mfu:6.1%}{sheet}   {memory} "
              f"{r['peak_rss_mb']:7.0f} MB")
    print(f"ratio temper/transformers: speed {t['tokens_per_second'] / h['tokens_per_second']:.2f}x, "
          f"peak memory {t['peak_rss_mb'] / h['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
