"""A reward model on the built-in world, from a model temper trains here.

    python benchmarks/bench_reward_model.py [--out runs/bench_reward] [--pretrain-steps 300 --sft-steps 200
                                             --reward-steps 200]

Pretrains a llama-3m on the world (`temper pretrain` defaults but --pretrain-steps), SFTs it
(`temper sft` defaults but --sft-steps), then trains a reward model from the SFT model on the
world's preference/train pairs (`temper reward` defaults but --reward-steps) and reports, on the
world's held-out preference/test pairs (`temper reward`'s own evaluation, before and after
training): pairwise accuracy (a tie is a miss), mean margin r_w - r_l, and the Pearson
correlation of the reward with the response's length in tokens over chosen and rejected
responses; then `temper reward score` over the same pairs gives the accuracy by the pair's
`reason` (why the world's rejected reply loses). With --prm-steps N > 0, also a process reward
model from the same SFT model on the world's step-labelled arithmetic (`prm/*`, written by
`temper world` with the pretraining world's config; `temper reward objective=prm` defaults but N
steps): held-out step accuracy, solution accuracy (right iff every step scores > 0) and
first-error accuracy, before and after. Each stage's own output goes to OUT/logs/*.log.
Nothing is tuned here: the settings are the recipes' defaults, and every number is printed as
it comes out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_online_dpo import stage, world_sft  # noqa: E402  one command in-process, its output in OUT/logs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_reward")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--reward-steps", type=int, default=200)
    ap.add_argument("--prm-steps", type=int, default=0, help="also train a process reward model (0: skip)")
    ap.add_argument("--skip-to-prm", action="store_true", help="reuse OUT's sft model; train only the PRM")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    pre, tuned, rm = out / "pretrain", out / "sft", out / "reward"
    common = ["logging.progress=false", "overwrite=true"]
    if args.skip_to_prm:
        print(json.dumps(process_reward_model(out, tuned, args.prm_steps, common), indent=2))
        return
    world_sft(out, args.pretrain_steps, args.sft_steps, common)
    summary = stage("reward", "reward", out, [f"model={tuned}", f"output_dir={rm}",
                                              f"max_steps={args.reward_steps}", *common])
    test_pairs = pre / "world" / "preference" / "test.jsonl"
    scored_file = out / "scored-test.jsonl"
    if scored_file.exists():
        scored_file.unlink()
    stage("score", "reward score", out, [f"model={rm}", f"data={test_pairs}", f"output={scored_file}"])
    by_reason: dict[str, list[bool]] = defaultdict(list)
    for line in scored_file.read_text().splitlines():
        row = json.loads(line)
        by_reason[row.get("reason", "?")].append(row["chosen_score"] > row["rejected_score"])
    keys = ("eval_accuracy", "eval_margin", "eval_length_correlation", "eval_reward/min", "eval_reward/mean",
            "eval_reward/max")
    report = {"held_out_pairs": summary["held_out_pairs"], "training_pairs": summary["pairs"],
              "before": {k: summary["before"][k] for k in keys}, "after": {k: summary[k] for k in keys},
              "accuracy_by_reason": {reason: {"pairs": len(v), "accuracy": sum(v) / len(v)}
                                     for reason, v in sorted(by_reason.items())},
              "reward_train_seconds": summary["train_seconds"]}
    if args.prm_steps:
        report["prm"] = process_reward_model(out, tuned, args.prm_steps, common)
    print(json.dumps(report, indent=2))


def process_reward_model(out: Path, tuned: Path, steps: int, common: list[str]) -> dict:
    world = out / "world-prm"
    stage("world", "world", out, [f"output_dir={world}", "overwrite=true"])  # the pretraining world's config
    summary = stage("prm", "reward", out, [f"model={tuned}", "objective=prm", f"output_dir={out / 'prm'}",
                                           f"data={world / 'prm' / 'train.jsonl'}",
                                           f"eval_data={world / 'prm' / 'test.jsonl'}", f"max_steps={steps}", *common])
    keys = ("eval_step_accuracy", "eval_solution_accuracy", "eval_first_error_accuracy", "eval_loss")
    return {"held_out_solutions": summary["held_out_solutions"], "before": {k: summary["before"].get(k) for k in keys},
            "after": {k: summary.get(k) for k in keys}, "prm_train_seconds": summary["train_seconds"]}


if __name__ == "__main__":
    main()
