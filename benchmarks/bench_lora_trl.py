"""LoRA SFT speed: temper vs transformers + peft + trl (SFTTrainer), same model, data, batch, steps.

    python benchmarks/bench_lora_trl.py --model runs/pretrain [--steps 40 --batch 16]

`--model` is a `temper pretrain` output (a Hugging Face directory, so transformers loads
it as is). Data: the built-in world's instruction rows (`messages`, rendered with the
model's ChatML template by both). LoRA r=8, alpha=16 on all linear layers, AdamW lr 2e-3,
fp32 on CPU, no evaluation, no checkpoints. Timed: the training loop only (temper's
`train_seconds`, TRL's `train_runtime`); each side runs in its own process, alternating
for --rounds rounds, and keeps its best.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run_trl(args) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(Path(args.model) / "world" / "sft" / "train.jsonl")]
    data = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                           learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=10_000,
                           save_strategy="no", report_to=[], use_cpu=True, max_length=512, packing=False,
                           dataloader_num_workers=0, seed=0, disable_tqdm=True)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
        result = trainer.train()
    return {"seconds": result.metrics["train_runtime"], "versions": f"transformers {transformers.__version__}, "
            f"peft {__import__('peft').__version__}, trl {__import__('trl').__version__}"}


def run_temper(args) -> dict:
    from temper.config import load_config
    from temper.recipes import sft

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(sft.Config, None, [
            f"model={args.model}", f"output_dir={out}", f"max_steps={args.steps}", f"batch_size={args.batch}",
            "peft.method=lora", "peft.r=8", "peft.alpha=16", "peft.target_modules=all-linear", "optim.lr=2e-3",
            "eval_samples=0", "general_eval_batches=1", "logging.eval_every=0", "logging.progress=false"])
        summary = sft.run(cfg)
    return {"seconds": summary["train_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/pretrain")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=["temper", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        result = run_temper(args) if args.only == "temper" else run_trl(args)
        print("RESULT " + json.dumps(result))
        return
    if not (Path(args.model) / "world" / "sft" / "train.jsonl").is_file():
        sys.exit(f"{args.model}: run `temper pretrain output_dir={args.model}` (the built-in world) first")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in ("temper", "trl"):
            proc = subprocess.run([sys.executable, __file__, "--only", side, "--model", args.model,
                                   "--steps", str(args.steps), "--batch", str(args.batch)], capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[7:])
            if side not in best or r["seconds"] < best[side]["seconds"]:
                best[side] = r
    n = args.steps * args.batch
    print(f"LoRA r=8 all-linear SFT, {args.model}, {args.steps} steps x batch {args.batch}, fp32 CPU; "
          f"{best['trl']['versions']}")
    for side in ("temper", "trl"):
        print(f"{side:7s} {best[side]['seconds']:7.2f} s  {n / best[side]['seconds']:7.1f} examples/s")
    print(f"ratio temper/trl: {best['trl']['seconds'] / best['temper']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
