"""The default lifecycle's numbers over seeds: each stage's seconds and the metric each stage moved.

    temper run lifecycle seed=0 output_dir=runs/seeds/s0      # and s1, s2 (one after another)
    python benchmarks/lifecycle_seeds.py runs/seeds/s0 runs/seeds/s1 runs/seeds/s2

Reads what the runs wrote (nothing is recomputed): `.run/<stage>.json` (seconds), `eval/results.json`
(the checkpoint table), `curate/report.json` (the funnel) and `reward/summary.json` (held-out pair
accuracy). Prints a table per run and the min-max range of every figure over the runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = ["world", "curate", "tokenizer", "pretrain", "sft", "sft_merged", "reward", "dpo", "grpo", "int8", "int4",
          "eval"]
CHECKPOINTS = ["pretrain", "sft_merged", "dpo", "grpo", "int8", "int4"]


def figures(run: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for stage in STAGES:
        record = json.loads((run / ".run" / f"{stage}.json").read_text())
        out[f"seconds/{stage}"] = record["seconds"]
    out["seconds/total"] = sum(out[f"seconds/{s}"] for s in STAGES)
    funnel = json.loads((run / "curate" / "report.json").read_text())
    out["curate/removed_documents"] = funnel["removed"]["documents"]
    out["curate/input_documents"] = funnel["input"]["documents"]
    out["reward/eval_accuracy"] = json.loads((run / "reward" / "summary.json").read_text())["eval_accuracy"]
    sft = json.loads((run / "sft" / "summary.json").read_text())
    out["sft/own_eval_answer_accuracy_before"] = sft["before"]["answer_accuracy"]
    out["sft/own_eval_answer_accuracy"] = sft["answer_accuracy"]
    results = json.loads((run / "eval" / "results.json").read_text())
    for name in CHECKPOINTS:
        model = next(m for m in results["per_model"] if Path(m).name == name)
        scores = results["per_model"][model]
        row = {"perplexity": scores["perplexity"]["token_perplexity"],
               "bits_per_byte": scores["perplexity"]["bits_per_byte"],
               "instruction_acc": scores["world_instruct"]["answer_accuracy"],
               "preference_acc": scores["world_preference"]["acc"],
               "preference_acc_norm": scores["world_preference"]["acc_norm"],
               "pass_rate": scores["world_chat_qa"]["answer_accuracy"],
               "rm_score": scores["world_chat_qa"]["reward_model_score"],
               "kl_to_sft": scores["world_chat_qa"]["kl_to_reference"],
               "size_mb": scores["model"]["size_bytes"] / 1e6,
               "tokens_per_second": scores["world_chat_qa"]["tokens_per_second"]}
        out.update({f"{name}/{k}": v for k, v in row.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="output_dir of each `temper run lifecycle`")
    args = ap.parse_args()
    per_run = [figures(r) for r in args.runs]
    print("| figure | " + " | ".join(r.name for r in args.runs) + " | min-max |")
    print("|---|" + "---|" * (len(args.runs) + 1))
    for key in per_run[0]:
        values = [f[key] for f in per_run]
        known = [v for v in values if v is not None]
        cells = ["-" if v is None else f"{v:.4g}" for v in values]
        span = f"{min(known):.4g} - {max(known):.4g}" if known else "-"
        print(f"| {key} | " + " | ".join(cells) + f" | {span} |")


if __name__ == "__main__":
    main()
