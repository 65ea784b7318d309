"""torch.compile on CPU: eager against compiled, for a pretraining step and a decode step.

    python benchmarks/bench_compile.py [--cases pretrain,decode --precisions fp32,bf16 --modes full,regional]

Cases (llama-14m, random weights, seed 0):
- pretrain: one optimiser step as benchmarks/bench_pretrain.py's temper side runs it (batch 8 x
  256, `causal_lm_loss`, backward, grad clip, fused AdamW); compiled `full` is `model.compile()`
  (what `compile: true` does through temper.train.engine.compile_model), `regional` compiles each
  block alone (`for b in model.layers: b.compile()`: one graph reused by every block).
- decode: greedy decoding of one token at a time with temper's KV cache (batch 8, a 64-token
  prompt prefilled, then --decode-steps tokens: the calls temper.models.generate makes for an
  unpadded batch); the cache length grows by one each step, as in real generation.

Each (case, precision, mode) runs in its own process with a fresh, empty inductor cache (so the
compile time is a cold one), holding an eager model and a compiled model of the same weights:
the two are stepped alternately (eager, compiled, eager, ...) so a shared machine's drifts hit both
alike, and each side's best step is kept. The compiled side's first step (first two for decode,
whose prefill and decode shapes are two graphs) is reported apart as the compile time; the
number of graphs dynamo compiled and the recompilations are printed. bf16 is torch.autocast(bf16)
around both sides, with fp32 weights. The losses / tokens of the two sides are compared, so a
speed is never reported for different work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def _autocast(precision: str):
    import contextlib

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _model(args):
    from temper.models import build_model, preset

    torch.manual_seed(0)
    return build_model(preset(args.preset, max_seq_len=max(1024, args.seq_len + 1)))


def _compile(model, mode: str):
    if mode == "full":
        model.compile()
    else:
        for block in model.layers:
            block.compile()
    return model


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def run_pretrain(args) -> dict:
    from temper.config import OptimConfig
    from temper.losses import causal_lm_loss
    from temper.train.optim import build_optimizer

    sides = {}
    for name in ("eager", args.mode):
        model = _model(args).train()
        if name != "eager":
            _compile(model, args.mode)
        sides[name] = (model, build_optimizer(model, OptimConfig(lr=1e-4, fused=True)))
    vocab = sides["eager"][0].config.vocab_size
    data = torch.randint(0, vocab, (args.steps + 2, args.batch, args.seq_len + 1),
                         generator=torch.Generator().manual_seed(1))

    def step(name, batch):
        model, opt = sides[name]
        with _autocast(args.precision):
            loss_sum, n = causal_lm_loss(model, batch[:, :-1], batch[:, 1:])
            loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times: dict[str, list[float]] = {"eager": [], args.mode: []}
    losses: dict[str, list[float]] = {"eager": [], args.mode: []}
    first: list[float] = []
    for i in range(args.steps + 2):  # steps 0 and 1: warm-up (the compiled side compiles there)
        for name in times:
            t0 = time.perf_counter()
            losses[name].append(step(name, data[i]))
            dt = time.perf_counter() - t0
            if i >= 2:
                times[name].append(dt)
            elif name != "eager":
                first.append(dt)
    best = {k: min(v) for k, v in times.items()}
    tokens = args.batch * args.seq_len
    return {"case": "pretrain", "precision": args.precision, "mode": args.mode,
            "eager_step_s": best["eager"], "compiled_step_s": best[args.mode],
            "eager_tokens_per_s": tokens / best["eager"], "compiled_tokens_per_s": tokens / best[args.mode],
            "first_steps_s": first, "compile_s": sum(first) - len(first) * best[args.mode],
            "graphs": _graphs(), "loss_eager": losses["eager"], "loss_compiled": losses[args.mode]}


def run_decode(args) -> dict:
    sides = {}
    for name in ("eager", args.mode):
        model = _model(args).eval()
        if name != "eager":
            _compile(model, args.mode)
        sides[name] = model
    prompt = torch.randint(3, sides["eager"].config.vocab_size, (args.gen_batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(1))
    total = args.prompt_len + args.decode_steps + 1
    caches, next_ids, tokens = {}, {}, {"eager": [], args.mode: []}
    step_times: dict[str, list[float]] = {"eager": [], args.mode: []}
    graphs_after: list[int] = []
    with torch.no_grad(), _autocast(args.precision):
        for name, model in sides.items():
            caches[name] = model.new_cache(args.gen_batch, total)
            t0 = time.perf_counter()
            logits = model(prompt, cache=caches[name], last_only=True)[:, -1].float()
            if name != "eager":
                prefill_s = time.perf_counter() - t0
            next_ids[name] = logits.argmax(-1)
            tokens[name].append(next_ids[name].tolist())
        for _ in range(args.decode_steps):
            for name, model in sides.items():
                t0 = time.perf_counter()
                logits = model(next_ids[name][:, None], cache=caches[name])[:, -1].float()
                next_ids[name] = logits.argmax(-1)
                tokens[name].append(next_ids[name].tolist())
                step_times[name].append(time.perf_counter() - t0)
            graphs_after.append(_graphs())
    steady = args.decode_steps // 2  # the second half of the steps: past any recompilation
    best = {k: min(v[steady:]) for k, v in step_times.items()}
    return {"case": "decode", "precision": args.precision, "mode": args.mode, "batch": args.gen_batch,
            "eager_step_s": best["eager"], "compiled_step_s": best[args.mode],
            "eager_tokens_per_s": args.gen_batch / best["eager"],
            "compiled_tokens_per_s": args.gen_batch / best[args.mode],
            "prefill_compiled_s": prefill_s, "first_steps_s": step_times[args.mode][:4],
            "compile_s": prefill_s + sum(step_times[args.mode][:steady]) - steady * best[args.mode],
            "graphs": _graphs(), "graphs_after_each_step": graphs_after,
            "tokens_agree": tokens["eager"] == tokens[args.mode]}


def one(args) -> None:
    try:
        result = run_pretrain(args) if args.case == "pretrain" else run_decode(args)
    except Exception as e:  # a compile failure is a result: say where and why, in one line
        first_line = (str(e).strip().splitlines() or [""])[0]
        result = {"case": args.case, "precision": args.precision, "mode": args.mode,
                  "error": f"{type(e).__name__}: {first_line[:300]}"}
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-14m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed pretraining steps per side (after 2 warm-up)")
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--cases", default="pretrain,decode")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--modes", default="full,regional")
    ap.add_argument("--json", action="store_true", help="print the results as JSON lines too")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        one(args)
        return
    results = []
    for case in args.cases.split(","):
        for precision in args.precisions.split(","):
            for mode in args.modes.split(","):
                with tempfile.TemporaryDirectory() as cache_dir:  # a cold inductor cache each time
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
                    cmd = [sys.executable, __file__, "--case", case, "--precision", precision, "--mode", mode,
                           "--preset", args.preset, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                           "--steps", str(args.steps), "--gen-batch", str(args.gen_batch),
                           "--prompt-len", str(args.prompt_len), "--decode-steps", str(args.decode_steps)]
                    t0 = time.perf_counter()
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    wall = time.perf_counter() - t0
                lines = proc.stdout.strip().splitlines()
                if proc.returncode or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                    r = {"case": case, "precision": precision, "mode": mode, "error": f"exit {proc.returncode}: {tail}"}
                else:
                    r = json.loads(lines[-1])
                r["process_wall_s"] = wall
                results.append(r)
                print(json.dumps(r) if args.json else _row(r), flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}; "
          f"pretrain batch {args.batch} x {args.seq_len}, decode batch {args.gen_batch} after a "
          f"{args.prompt_len}-token prompt, {args.decode_steps} steps")


def _row(r: dict) -> str:
    head = f"{r['case']:8s} {r['precision']:4s} {r['mode']:8s}"
    if "error" in r:
        return f"{head} FAILED: {r['error']}"
    same = (r["tokens_agree"] if r["case"] == "decode"
            else max(abs(a - b) for a, b in zip(r["loss_eager"], r["loss_compiled"])))
    return (f"{head} eager {r['eager_tokens_per_s']:8.0f} tok/s  compiled {r['compiled_tokens_per_s']:8.0f} tok/s  "
            f"speedup {r['eager_step_s'] / r['compiled_step_s']:.2f}x  compile {r['compile_s']:6.1f} s  "
            f"graphs {r['graphs']}  {'tokens agree' if r['case'] == 'decode' else 'max |loss diff|'} {same}")


if __name__ == "__main__":
    main()
