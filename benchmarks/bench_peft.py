"""One row per fine-tuning method on the same model, data and number of steps.

    python benchmarks/bench_peft.py --model runs/pretrain [--steps 300 --methods full,lora8,...]

`--model` is a `temper pretrain` output (the built-in world; run the README's main job
first). Each method runs `temper sft` in its own process (so peak memory is its own) on
the world's 2,000 instruction rows, batch 16, and reports: trainable parameters and their
share, base-weight memory, peak RSS, step time, the size on disk of what is saved, and
answer accuracy / exact match on 100 held-out instructions after the same steps.
Learning rates differ per method (the usual practice: adapters and soft prompts need
larger ones); they are printed in the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = {
    "full": ("none", ["optim.lr=3e-4"]),
    "lora8": ("lora", ["peft.r=8", "peft.alpha=16", "peft.target_modules=all-linear", "optim.lr=2e-3"]),
    "lora16": ("lora", ["peft.r=16", "peft.alpha=32", "peft.target_modules=all-linear", "optim.lr=2e-3"]),
    "dora8": ("dora", ["peft.r=8", "peft.alpha=16", "peft.target_modules=all-linear", "optim.lr=2e-3"]),
    "qlora8": ("qlora", ["peft.r=8", "peft.alpha=16", "peft.target_modules=all-linear", "optim.lr=2e-3"]),
    "adapter": ("adapter", ["peft.adapter_dim=16", "optim.lr=2e-3"]),
    "prefix": ("prefix", ["peft.num_virtual_tokens=16", "peft.prefix_projection=true", "optim.lr=3e-3"]),
    "prompt": ("prompt", ["peft.num_virtual_tokens=16", "optim.lr=3e-2"]),
}


def base_weight_mb(model_dir: str, method: str) -> float:
    """Bytes of the frozen base's weights as this method holds them (fp32, or NF4 for QLoRA)."""
    import torch

    from temper.models import load_model

    model = load_model(model_dir, dtype=torch.float32)
    if method == "qlora":
        from temper.quant.nf4 import quantize_model

        quantize_model(model)
    from temper.quant.nf4 import base_weight_bytes

    return base_weight_bytes(model) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/pretrain")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model}: not a model directory; run `temper pretrain output_dir={args.model}` first")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            method, extra = METHODS[name]
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "temper", "sft", f"model={args.model}", f"output_dir={out}",
                   f"max_steps={args.steps}", "eval_samples=100", "logging.eval_every=0", "logging.progress=false",
                   f"peft.method={method}", *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
            summary = json.loads((out / "summary.json").read_text())
            saved = out / ("model.safetensors" if method == "none" else "adapter_model.safetensors")
            after = summary  # the final evaluation is flat in summary.json
            rows.append({
                "method": name, "lr": [e for e in extra if e.startswith("optim.lr")][0].split("=")[1],
                "trainable": summary["trainable_parameters"], "total": summary["total_parameters"],
                "base_mb": base_weight_mb(args.model, method), "peak_mb": summary["peak_memory_mb"],
                "step_ms": 1000 * summary["train_seconds"] / args.steps, "disk_mb": saved.stat().st_size / 2**20,
                "accuracy": after.get("answer_accuracy", float("nan")), "exact": after["exact_match"],
                "general_ppl": after.get("general_ppl", float("nan")),
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"model {args.model}, {args.steps} steps, batch 16, world SFT (2,000 rows), 100 held-out instructions\n")
    print("| method | lr | trainable | share | base weights | peak RSS | step | saved | answer acc. | exact | general ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['lr']} | {r['trainable']:,} | {r['trainable'] / r['total']:.2%} | "
              f"{r['base_mb']:.2f} MB | {r['peak_mb']:.0f} MB | {r['step_ms']:.0f} ms | {r['disk_mb']:.3f} MB | "
              f"{r['accuracy']:.1%} | {r['exact']:.1%} | {r['general_ppl']:.2f} |")


if __name__ == "__main__":
    main()
