"""Do two versions of temper compute the same losses? The built-in world's tiny lifecycle, run at
each revision, every training stage's first 20 steps compared.

    python benchmarks/compare_losses.py --base 0635f7e [--head WORKTREE] [--steps 20] [--precision fp32]
    python benchmarks/compare_losses.py --bf16-vs-fp32 [--head WORKTREE]

`--bf16-vs-fp32` runs the same code twice instead, in fp32 and in bf16 autocast (what `auto` picks
on a CPU with fast bf16), and checks that bf16's losses track fp32's within 0.05 absolute per step
(the tolerance of tests/test_pretrain.py's bf16 test).

Runs `temper run lifecycle-tiny` (world -> curate -> tokenizer -> pretrain -> SFT (LoRA) -> merge ->
reward -> DPO -> GRPO -> quantise -> eval) once with the code of `--base` (checked out into a
temporary git worktree) and once with `--head` (default: this checkout), each training stage
overridden to `max_steps=STEPS` with a metrics row every step, the same seed, the same precision
(`TEMPER_AUTO_PRECISION`, so the CPU cannot choose differently between the two runs). It prints, per
stage, the steps compared and the largest absolute and relative difference of the logged loss and
gradient norm, and
exits 1 if a stage differs by more than `--rtol` (default 1e-5: fp32 reassociation -- a sum taken in
a different order -- moves a loss by a few ulps per step, and 20 steps of training may grow that to
~1e-6 relative; a change of the maths moves it by far more).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "reward", "dpo", "grpo")


def run_lifecycle(code: Path, out: Path, steps: int, precision: str) -> None:
    overrides = [f"{s}.{k}" for s in STAGES for k in (f"max_steps={steps}", "logging.every=1")]
    overrides += [f"{s}.checkpoint.every={steps}" for s in STAGES]
    env = {**os.environ, "PYTHONPATH": str(code), "TEMPER_AUTO_PRECISION": precision}
    cmd = [sys.executable, "-m", "temper", "run", "lifecycle-tiny", f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code)
    if proc.returncode:
        sys.exit(f"{code}: temper run failed:\n{proc.stderr[-3000:]}")


def losses(run_dir: Path, stage: str) -> dict[int, tuple[float, float]]:
    """step -> (loss, gradient norm): GRPO's loss is ~0 by construction (advantages centred per
    group), so the gradient norm is what shows its maths."""
    path = run_dir / stage / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: (r["loss"], r.get("grad_norm", 0.0)) for r in rows if "loss" in r and "step" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="the revision to compare against (a commit, tag or branch)")
    ap.add_argument("--bf16-vs-fp32", action="store_true", help="compare bf16 with fp32 on --head instead")
    ap.add_argument("--head", default=str(ROOT), help="a checkout of the new code (default: this one)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rtol", type=float, default=1e-5)
    args = ap.parse_args()
    if args.bf16_vs_fp32:
        return precisions(args)
    if not args.base:
        ap.error("--base REV (or --bf16-vs-fp32)")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.base], check=True)
        try:
            run_lifecycle(base, Path(tmp) / "runs-base", args.steps, args.precision)
            run_lifecycle(Path(args.head), Path(tmp) / "runs-head", args.steps, args.precision)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
        print(f"lifecycle-tiny, first {args.steps} steps of each training stage, {args.precision}: "
              f"{args.base} vs {args.head}")
        print(f"{'stage':10s} {'steps':>5s} {'max |diff|':>12s} {'max rel':>10s}  (loss and grad norm, first -> last step)")
        worst = 0.0
        for stage in STAGES:
            old, new = losses(Path(tmp) / "runs-base", stage), losses(Path(tmp) / "runs-head", stage)
            steps = sorted(set(old) & set(new))
            if not steps or set(old) != set(new):
                sys.exit(f"{stage}: logged steps differ ({sorted(old)} vs {sorted(new)})")
            pairs = [(old[s][i], new[s][i]) for s in steps for i in (0, 1)]
            diff = max(abs(a - b) for a, b in pairs)
            rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
            worst = max(worst, rel)
            print(f"{stage:10s} {len(steps):5d} {diff:12.3g} {rel:10.3g}  loss {new[steps[0]][0]:.4f} -> "
                  f"{new[steps[-1]][0]:.4f}, grad norm {new[steps[0]][1]:.4f} -> {new[steps[-1]][1]:.4f}")
    verdict = "identical" if worst == 0 else f"within {worst:.2g} relative"
    print(f"losses {verdict} (limit {args.rtol:g})")
    sys.exit(0 if worst <= args.rtol else 1)


def precisions(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            run_lifecycle(Path(args.head), Path(tmp) / precision, args.steps, precision)
        print(f"lifecycle-tiny, first {args.steps} steps of each training stage, bf16 autocast vs fp32: {args.head}")
        print(f"{'stage':10s} {'steps':>5s} {'max |dloss|':>12s}  loss fp32 -> bf16, first and last step")
        worst = 0.0
        for stage in STAGES:
            fp32, bf16 = losses(Path(tmp) / "fp32", stage), losses(Path(tmp) / "bf16", stage)
            steps = sorted(set(fp32) & set(bf16))
            diff = max(abs(fp32[s][0] - bf16[s][0]) for s in steps)
            worst = max(worst, diff)
            print(f"{stage:10s} {len(steps):5d} {diff:12.3g}  {fp32[steps[0]][0]:.4f} / {bf16[steps[0]][0]:.4f}, "
                  f"{fp32[steps[-1]][0]:.4f} / {bf16[steps[-1]][0]:.4f}")
    print(f"bf16 tracks fp32 within {worst:.3g} absolute (limit 0.05)")
    sys.exit(0 if worst <= 0.05 else 1)


if __name__ == "__main__":
    main()
