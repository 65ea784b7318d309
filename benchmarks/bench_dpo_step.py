"""One DPO step's compute, the old log-prob path against the new, interleaved in one process.

    python benchmarks/bench_dpo_step.py [--layout padded|packed] [--precision fp32|bf16] [--rounds 3]
                                        [--threads N] [--clock wall|cpu]

The step of `temper dpo reference=copy`: the frozen copy's forward under no_grad, the policy's
forward and backward, the sigmoid loss, gradient clipping (no optimiser update, so every call sees
the same weights). `old`: every position through the last block and the final norm, then the output
layer on the completion tokens (`sequence_logprobs` on the (rows, T, C) hidden states, as temper did
before issue 25). `new`: `completion_logprobs`, whose model call passes `hidden_at` so that the last
block's output projection and MLP and the final norm run on the completion tokens alone. The same
model (llama-14m, seed 0) and batches as `bench_dpo_trl.py` (the built-in world's first pairs, 4 a
batch). Each step is timed `--rounds` times per side, alternating, each side keeping its best; the
losses of the two sides must agree to 1e-6 (they are the same maths). `--clock cpu` times the
process's CPU time instead of the wall clock: steadier on a shared machine (use it with --threads 1).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_dpo_trl as trl_bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=["padded", "packed"], default="padded")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=4, help="batches (steps) timed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--workdir", help="keep the world, tokenizer and model here (default: a temporary directory)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    from temper.losses.clm import output_weight
    from temper.losses.logprobs import completion_logprobs, sequence_logprobs
    from temper.losses.preference import preference_loss
    from temper.models import load_model

    def old(model, batch):  # every position through the last block, then the completion tokens' log-probs
        hidden = model(batch.inputs, return_hidden=True, positions=batch.positions, mask=batch.attention_mask())
        return sequence_logprobs(hidden, output_weight(model), batch.targets, sequence_index=batch.sequence_index(),
                                 num_sequences=batch.completion_tokens.shape[0])[0]

    def new(model, batch):
        return completion_logprobs(model, batch)[0]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model_dir, pairs = trl_bench.prepare(workdir, args.steps * 4)
        cfg = trl_bench.temper_config(model_dir, pairs, workdir / "unused", "copy", args.steps, 4,
                                      padded=args.layout == "padded")
        _, loader = trl_bench.temper_pairs(cfg)
        batches = [loader.next_batch() for _ in range(args.steps)]
        policy = load_model(model_dir, dtype=torch.float32).train()
        reference = load_model(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext

    def step(logps_of, batch) -> tuple[float, float]:
        start = clock()
        with autocast():
            with torch.no_grad():
                ref = logps_of(reference, batch)
            logps = logps_of(policy, batch)
            B = batch.num_pairs
            loss = preference_loss("sigmoid", logps[:B], logps[B:], ref[:B], ref[B:], beta=0.1)[0].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        policy.zero_grad(set_to_none=True)
        return clock() - start, float(loss.detach())

    best = {"old": [float("inf")] * len(batches), "new": [float("inf")] * len(batches)}
    losses: dict[str, list[float]] = {"old": [0.0] * len(batches), "new": [0.0] * len(batches)}
    for _ in range(args.rounds):
        for i, batch in enumerate(batches):
            for name, fn in (("old", old), ("new", new)):
                seconds, losses[name][i] = step(fn, batch)
                best[name][i] = min(best[name][i], seconds)
    gap = max(abs(a - b) for a, b in zip(losses["old"], losses["new"]))
    if gap > 1e-6:
        sys.exit(f"the two paths give different losses: {losses}")
    shapes = [tuple(b.inputs.shape) for b in batches]
    scored = [int((b.targets != -100).sum()) for b in batches]
    old_s, new_s = sum(best["old"]), sum(best["new"])
    print(f"DPO step (reference=copy), llama-14m, {args.layout} {args.precision}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, best of {args.rounds}; batches (rows, T) {shapes}, completion tokens {scored}")
    print("| path | step time, summed over the batches | per batch (ms) |")
    print("|---|---|---|")
    for name in ("old", "new"):
        print(f"| {name} | {sum(best[name]) * 1000:.0f} ms | {[round(s * 1000) for s in best[name]]} |")
    print(f"new / old: {new_s / old_s:.3f} (largest loss gap {gap:.1e})")


if __name__ == "__main__":
    main()
