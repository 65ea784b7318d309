"""PPO iteration time: temper vs TRL's PPOTrainer (TRL < 1.0: TRL 1.x ships none), the same work where
it runs.

    pip install --no-deps --target /tmp/trl026 trl==0.26.0        # beside the project's TRL, never over it
    python benchmarks/bench_ppo_trl.py --sft runs/demo/sft --rm runs/ppo/rm [--trl-path /tmp/trl026]
        [--iterations 4 --batch-size 32 --max-completion-length 24 --ppo-epochs 4 --lr 1e-4]

Each side in its own process, one after the other: the same SFT model (policy, and reference), the same
reward model (scorer, and the value model's start, TRL's and temper's default), the first
--batch-size x --iterations prompts of the world's rl/train.jsonl rendered with the model's chat
template (ChatML), one completion per prompt of at most --max-completion-length tokens sampled at
temperature 0.7 (stopping at the end of turn on both sides: TRL's stop_token_id is --stop-token's), --ppo-epochs passes of one minibatch over each
rollout batch, kl_coef 0.05 (k1), AdamW at --lr, fp32, no gradient (activation) checkpointing, no
evaluation, no saving. The TRL process imports TRL from --trl-path first (only that process).

Timed: one PPO iteration (a rollout batch: generation, scoring, the ppo epochs): temper: the
sum of the logged time/rollout, time/score and time/train over the iteration's optimiser steps (one
logged row per iteration); TRL: the wall time between consecutive `on_step_end` callbacks (one per
rollout batch in its PPOTrainer), so TRL's also holds its logging; median over the iterations after
the first. Not forced equal: completion lengths (each side samples its own, and stops at EOS), so the
ratio is of the same settings, not of the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_trl(args) -> dict:
    sys.path.insert(0, args.trl_path)
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(args.sft, padding_side="left")
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    rows = rows[:args.batch_size * args.iterations]
    ids = []
    for r in rows:
        enc = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)
        ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    ends: list[float] = []
    # TRL stops at one token: the chat template's end of turn (temper stops there too), not the
    # tokenizer's <|eos|>, which the SFT model never writes after a reply
    stop = tok.convert_tokens_to_ids(args.stop_token)
    if stop is None or stop == tok.unk_token_id:
        stop = tok.eos_token_id

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())

    fp32 = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(args.sft, **fp32)
    real_generate, generated = policy.generate, []

    def counting_generate(*a, **kw):  # TRL's rollouts: decoding steps, and lengths up to the stop token
        out = real_generate(*a, **kw)
        new = out.sequences[:, kw["input_ids"].shape[1]:]
        hit = new == stop
        lengths = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full((len(new),), new.shape[1]))
        generated.append({"decoding_steps": new.shape[1], "mean_length": float(lengths.float().mean())})
        return out

    policy.generate = counting_generate
    cfg = PPOConfig(output_dir=str(Path(args.out) / "trl"), per_device_train_batch_size=args.batch_size,
                    gradient_accumulation_steps=1, num_ppo_epochs=args.ppo_epochs, num_mini_batches=1,
                    total_episodes=len(ids), response_length=args.max_completion_length, temperature=0.7,
                    learning_rate=args.lr, lr_scheduler_type="constant", kl_coef=0.05, kl_estimator="k1",
                    bf16=False, fp16=False, gradient_checkpointing=False, report_to=[], logging_steps=1,
                    save_strategy="no", use_cpu=True, stop_token_id=stop, num_sample_generations=0,
                    seed=0, dataloader_num_workers=0)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy,
                         ref_model=AutoModelForCausalLM.from_pretrained(args.sft, **fp32),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1, **fp32),
                         value_model=AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1, **fp32),
                         train_dataset=Dataset.from_dict({"input_ids": ids}), callbacks=[Timer()])
    start = time.perf_counter()
    trainer.train()
    walls = [b - a for a, b in zip([start, *ends], ends)]
    return {"side": "trl", "version": trl.__version__, "iterations": walls,
            "stop_token_id": stop, "generated": generated,
            "log": [{k: v for k, v in r.items() if k in ("objective/scores", "objective/kl", "val/num_eos_tokens")}
                    for r in trainer.state.log_history]}


def run_temper(args) -> dict:
    out = Path(args.out) / "temper"
    cmd = [sys.executable, "-m", "temper", "ppo", f"model={args.sft}", f"reward_model={args.rm}",
           f"prompts=[{args.prompts}]", f"output_dir={out}", f"max_steps={args.iterations * args.ppo_epochs}",
           f"batch_size={args.batch_size}", f"max_completion_length={args.max_completion_length}",
           "temperature=0.7", f"num_ppo_epochs={args.ppo_epochs}", "kl_coef=0.05", f"optim.lr={args.lr!r}",
           "logging.eval_every=0", "logging.eval_at_start=false", f"logging.every={args.ppo_epochs}",
           "checkpoint.every=0", "seed=0", "logging.progress=false", "overwrite=true"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in rows if "time/train" in r]
    walls = [sum(r.get(f"time/{p}", 0.0) for p in ("rollout", "score", "train")) * args.ppo_epochs for r in timed]
    return {"side": "temper", "command": " ".join(cmd[2:]), "iterations": walls,
            "log": [{k: r.get(k) for k in ("objective/scores", "objective/kl", "completions/mean_length")} for r in timed],
            "generated": [{"mean_length": r["completions/mean_length"]} for r in timed]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", required=True)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--prompts", default=None, help="default: the SFT model's world rl/train.jsonl, cut to what runs")
    ap.add_argument("--out", default="runs/bench_ppo_trl")
    ap.add_argument("--trl-path", default="/tmp/trl026", help="a folder holding an older TRL with a PPOTrainer")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-completion-length", type=int, default=24)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--stop-token", default="<|im_end|>", help="TRL's stop_token_id: this token's id (the tokenizer's "
                    "EOS when it has none)")
    ap.add_argument("--side", choices=("temper", "trl"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side is not None:
        print(json.dumps(run_trl(args) if args.side == "trl" else run_temper(args)))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.prompts is None:  # the prompts both sides read, written once
        world = Path(json.loads((Path(args.sft) / "temper.json").read_text())["world_dir"])
        lines = (world / "rl" / "train.jsonl").read_text().splitlines()[:args.batch_size * args.iterations]
        args.prompts = str(Path(args.out) / "prompts.jsonl")
        Path(args.prompts).write_text("\n".join(lines) + "\n")
    results = {}
    for side in ("temper", "trl"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--prompts", args.prompts]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
            print(f"{side}: failed: {last[0]}")
            (Path(args.out) / f"{side}.err").write_text(proc.stderr)
            continue
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        walls = results[side]["iterations"][1:] or results[side]["iterations"]
        results[side]["median"] = statistics.median(walls)
        lengths = [g["mean_length"] for g in results[side]["generated"]]
        print(f"{side}: mean completion length per iteration (tokens, the stop token counted): "
              + ", ".join(f"{v:.1f}" for v in lengths)
              + ("; decoding steps: " + ", ".join(str(g["decoding_steps"]) for g in results[side]["generated"])
                 if side == "trl" else ""))
        print(f"{side}: PPO iteration median {results[side]['median']:.2f} s over {len(walls)} (after the first); "
              f"all: {', '.join(f'{w:.2f}' for w in results[side]['iterations'])}; log {results[side]['log']}")
    (Path(args.out) / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    if len(results) == 2:
        print(f"TRL / temper, per iteration: {results['trl']['median'] / results['temper']['median']:.2f}x")


if __name__ == "__main__":
    main()
