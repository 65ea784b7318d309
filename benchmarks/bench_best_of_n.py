"""Best-of-N on the built-in world: a process reward model (PRM) against an outcome reward
model (ORM) trained on the same rows, as verifiers of a solver's samples (issue 20;
Lightman et al. 2023, "Let's verify step by step", at toy scale).

    python benchmarks/bench_best_of_n.py --pretrain runs/pretrain [--out runs/bench_best_of_n --sft-steps 200
                                         --reward-steps 200 --n 16 --seed 0 --num-prm-train 1000]

From a world-pretrained model (--pretrain DIR; without it `temper pretrain max_steps=--pretrain-steps`
first), all in OUT/:
  world   `temper world` with the pretraining world's config (its world_config.json) and
          num_prm_train=--num-prm-train: the step-labelled arithmetic of `prm/train|test`;
  solver  `temper sft` (defaults but --sft-steps) on the prm/train rows whose every step is right,
          as chat rows: user = the question, assistant = the steps joined by "\\n";
  prm     `temper reward objective=prm` from the solver: a label on every step;
  orm     the same command, data, steps, lr and seed with step_labels=last: only the outcome;
  sample  `temper generate best_of=N rank_by=prm:OUT/prm temperature=1 top_k=0` over the
          prm/test questions (the answer column rides along): N candidates per question; the ORM
          scores the same candidates (`temper.rewards.process.ProcessReward`, as rank_by=prm:OUT/orm
          would).
A candidate is right when its last line's "= X" equals the row's answer. For n in 1, 2, 4, 8, N:
the pass rate of the candidate each verifier ranks first among n (ties to the first sampled),
of a random pick (its expectation: the share right), and of the oracle (any of n right), each
averaged over the N/n disjoint groups of n candidates of a question, then over questions, with a
95% bootstrap interval over questions (2,000 resamples). Also each verifier's held-out metrics
(`temper reward`'s own evaluation) and how well its score separates the solver's right and wrong
candidates (AUROC). Nothing is tuned: every number is printed as it comes out, with the commands
and wall times; each stage's own output is in OUT/logs/*.log.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grpo_world import cpu_name  # noqa: E402
from bench_online_dpo import stage  # noqa: E402  one command in-process, its output in OUT/logs

FINAL = re.compile(r"=\s*(-?\d+)\s*$")


def run_stage(name: str, command: str, out: Path, overrides: list[str], walls: dict) -> dict:
    print(f"$ temper {command} {' '.join(shlex.quote(o) for o in overrides)}", flush=True)
    start = time.perf_counter()
    result = stage(name, command, out, overrides)
    walls[name] = time.perf_counter() - start
    return result


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def final_value(text: str) -> int | None:
    lines = [line for line in text.strip().split("\n") if line.strip()]
    match = FINAL.search(lines[-1]) if lines else None
    return int(match.group(1)) if match else None


def pick(scores: list[float]) -> int:
    """The first of the highest scores."""
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


def per_question(right: list[bool], prm: list[float], orm: list[float], n: int) -> dict[str, float]:
    """The four pass rates of one question at best-of-n, averaged over its disjoint groups of n."""
    groups = [range(g, g + n) for g in range(0, len(right) - n + 1, n)]
    out = {"prm": 0.0, "orm": 0.0, "random": 0.0, "oracle": 0.0}
    for group in groups:
        r = [right[k] for k in group]
        out["prm"] += r[pick([prm[k] for k in group])]
        out["orm"] += r[pick([orm[k] for k in group])]
        out["random"] += sum(r) / n
        out["oracle"] += any(r)
    return {k: v / len(groups) for k, v in out.items()}


def bootstrap(values: list[float], rng: random.Random, resamples: int = 2000) -> tuple[float, float]:
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def auroc(scores: list[float], right: list[bool]) -> float:
    """P(a right candidate scores above a wrong one), ties half (the Mann-Whitney statistic)."""
    pos = [s for s, r in zip(scores, right) if r]
    neg = [s for s, r in zip(scores, right) if not r]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_best_of_n")
    ap.add_argument("--pretrain", default=None, help="a world-pretrained model directory (else pretrain here)")
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--reward-steps", type=int, default=200)
    ap.add_argument("--num-prm-train", type=int, default=1000, help="step-labelled solutions to train the verifiers on")
    ap.add_argument("--n", type=int, default=16, help="candidates per question")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.n < 1 or args.n & (args.n - 1):
        raise SystemExit("--n must be a power of two (best-of-n for n = 1, 2, 4, ... --n)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["logging.progress=false", "overwrite=true", f"seed={args.seed}"]
    walls: dict[str, float] = {}
    begin = time.perf_counter()
    print(f"cpu: {cpu_name()} | torch threads: {torch.get_num_threads()} | seed: {args.seed} | "
          f"python {platform.python_version()}, torch {torch.__version__}", flush=True)

    pre = Path(args.pretrain) if args.pretrain else out / "pretrain"
    if not args.pretrain:
        run_stage("pretrain", "pretrain", out, [f"output_dir={pre}", f"max_steps={args.pretrain_steps}", *common],
                  walls)
    world_config = json.loads((pre / "world" / "world_config.json").read_text())
    world = out / "world"
    run_stage("world", "world", out, [f"output_dir={world}", "overwrite=true", f"num_prm_train={args.num_prm_train}",
                                      *(f"{k}={v}" for k, v in world_config.items() if k != "num_prm_train")], walls)
    train_rows, test_rows = rows_of(world / "prm" / "train.jsonl"), rows_of(world / "prm" / "test.jsonl")

    # the solver: SFT on the right solutions, the steps one per line
    right_rows = [r for r in train_rows if all(r["labels"])]
    solver_data = write_rows(out / "solver-data" / "train.jsonl", [
        {"messages": [*r["prompt"], {"role": "assistant", "content": "\n".join(r["completions"])}]} for r in right_rows])
    solver = out / "solver"
    solver_summary = run_stage("solver", "sft", out, [f"model={pre}", f"data={solver_data}", f"output_dir={solver}",
                                                      f"max_steps={args.sft_steps}", *common], walls)

    # the two verifiers: the same start, data, steps, lr and seed; only the supervision differs
    verifier = [f"model={solver}", "objective=prm", f"data={world / 'prm' / 'train.jsonl'}",
                f"eval_data={world / 'prm' / 'test.jsonl'}", f"max_steps={args.reward_steps}", *common]
    summaries = {"prm": run_stage("prm", "reward", out, [*verifier, f"output_dir={out / 'prm'}"], walls),
                 "orm": run_stage("orm", "reward", out, [*verifier, "step_labels=last", f"output_dir={out / 'orm'}"],
                                  walls)}

    # N candidates per held-out question, ranked by the PRM in `temper generate`; the ORM scores the same ones
    prompts = write_rows(out / "prompts.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in test_rows])
    sampled = out / "best_of_n.jsonl"
    run_stage("sample", "generate", out, [f"model={solver}", f"prompts_file={prompts}", f"output_file={sampled}",
                                          "overwrite=true", f"best_of={args.n}", f"rank_by=prm:{out / 'prm'}",
                                          "temperature=1", "top_k=0", f"max_new_tokens={args.max_new_tokens}",
                                          f"seed={args.seed}", "batch_size=4"], walls)
    generated = rows_of(sampled)
    assert len(generated) == len(test_rows)
    from temper.rewards.process import ProcessReward

    start = time.perf_counter()
    orm = ProcessReward(str(out / "orm"))
    orm_scores = [orm([row["prompt"]] * args.n, row["candidates"]) for row in generated]
    walls["orm_scoring"] = time.perf_counter() - start

    right = [[final_value(c) == int(t["answer"]) for c in row["candidates"]] for row, t in zip(generated, test_rows)]
    prm_scores = [row["scores"] for row in generated]
    rng = random.Random(args.seed)
    table = []
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.n]
    for n in ns:
        per = [per_question(r, p, o, n) for r, p, o in zip(right, prm_scores, orm_scores)]
        line = {"n": n}
        for key in ("prm", "orm", "random", "oracle"):
            values = [q[key] for q in per]
            line[key] = sum(values) / len(values)
            line[f"{key}_ci"] = bootstrap(values, rng)
        table.append(line)

    flat_right = [x for r in right for x in r]
    keys = ("eval_step_accuracy", "eval_solution_accuracy", "eval_first_error_accuracy", "eval_loss")
    report = {
        "cpu": cpu_name(), "seed": args.seed, "pretrain": str(pre), "questions": len(test_rows),
        "candidates_per_question": args.n,
        "solver": {"sft_rows": len(right_rows), "steps": args.sft_steps,
                   "sampled_right": sum(flat_right) / len(flat_right),
                   "sampled_unparsed": sum(final_value(c) is None for row in generated for c in row["candidates"])
                   / len(flat_right), "greedy_exact_match_held_out_sft": solver_summary.get("exact_match")},
        "held_out_base_rates": {"solutions_right": sum(all(r["labels"]) for r in test_rows) / len(test_rows),
                                "steps_right": sum(map(sum, (r["labels"] for r in test_rows)))
                                / sum(len(r["labels"]) for r in test_rows)},
        "verifiers": {name: {"train_rows": s["solutions"], "held_out_rows": s["held_out_solutions"],
                             "before": {k: s["before"].get(k) for k in keys}, "after": {k: s.get(k) for k in keys},
                             "auroc_on_samples": auroc([x for r in (prm_scores if name == "prm" else orm_scores)
                                                        for x in r], flat_right)}
                      for name, s in summaries.items()},
        "best_of_n": table, "wall_seconds": {k: round(v, 1) for k, v in walls.items()},
        "total_seconds": round(time.perf_counter() - begin, 1),
        "example": {"question": test_rows[0]["prompt"][-1]["content"], "answer": test_rows[0]["answer"],
                    "prm_choice": generated[0]["completion"]},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"\npass rate on {len(test_rows)} held-out questions, {args.n} samples each at temperature 1 "
          "(95% bootstrap interval over questions)")
    print("| n | PRM best-of-n | ORM best-of-n | random pick | oracle (any right) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for line in table:
        cells = [f"{line[k]:.3f} [{line[f'{k}_ci'][0]:.2f}, {line[f'{k}_ci'][1]:.2f}]"
                 for k in ("prm", "orm", "random", "oracle")]
        print(f"| {line['n']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
