"""GRPO on the built-in world's verifiable prompts, from a model temper trains here: does the held-out
pass rate rise, in minutes on CPU?

    python benchmarks/bench_grpo_world.py [--out runs/bench_grpo_world] [--pretrain-steps 500 --sft-steps 400]
        [--steps 100 --lr 3e-4 --num-generations 8 --batch-size 64 --max-completion-length 32
         --rewards world,length:16 --eval-every 20 ...]
        [--sft DIR]            # start from this SFT model (skip pretraining and SFT)
        [--plots docs]         # write grpo-world.svg (reward, pass rate, ...) there with `temper plot`
        [--gsm8k]              # also a few GRPO steps on GSM8K's test prompts with the GSM8K checker

Pretrains a llama-3m on the world (`temper pretrain` defaults but --pretrain-steps), SFTs it (`temper
sft` defaults but --sft-steps), then runs `temper grpo model=SFT` on the world's rl/train prompts with
the `world` reward (exact answers: fact, arithmetic, string tasks) and DAPO's soft overlong
penalty past 16 tokens (`length:16`: with the world reward alone the replies grow, see docs/grpo.md),
evaluating `eval_pass_rate` (greedy replies to every rl/test prompt scored by the world reward; prompts
no step trains on) at the start and every --eval-every steps. The recipe's defaults follow TRL, whose lr 1e-6 barely moves a 2M-parameter
model in a few dozen steps: the GRPO settings given here (printed in full, and in OUT/grpo/config.yaml)
are what this script passes; every other key is the recipe's default.

After the run, the SFT model and the GRPO model are measured again on every rl/test prompt the same
way the recipe evaluates (greedy, the world reward), split by the prompts' `task` column; the overall
numbers must equal the logged eval_pass_rate at step 0 and at the end, else the script says so. Also
measured: the pass rate of each reply's first sentence alone (a reply that runs on past its answer
can hit the right word by listing more facts: the world reward looks for the answer anywhere) and
the words per reply.

--gsm8k: `temper grpo model=SFT prompts=../shared/data/gsm8k/test.jsonl rewards=gsm8k` for
--gsm8k-steps steps (shorter completions; no evaluation): it runs and scores, and what a tiny model
trained on the world scores there is printed as logged. Each stage's output goes to OUT/logs/*.log.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_online_dpo import stage, world_sft  # noqa: E402  one temper command in-process, its output in OUT/logs

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def grpo_settings(args) -> list[str]:
    """The `temper grpo` keys this benchmark sets (every other key: the recipe's default)."""
    return [f"max_steps={args.steps}", f"optim.lr={args.lr!r}", f"num_generations={args.num_generations}",
            f"batch_size={args.batch_size}", f"max_completion_length={args.max_completion_length}",
            f"temperature={args.temperature!r}", f"beta={args.beta!r}", f"seed={args.seed}",
            f"logging.every={args.log_every}", f"logging.eval_every={args.eval_every}",
            f"eval_limit={args.eval_limit}", "logging.eval_at_start=true", "checkpoint.every=0",
            f"rewards=[{args.rewards}]", f"mask_truncated_completions={str(args.mask_truncated).lower()}"]


def pass_rates(model_dir, prompts_file, max_new_tokens: int) -> dict:
    """Greedy replies to every prompt, scored by the world reward as `temper grpo` evaluates: the
    share scoring 1, overall and per `task`."""
    from temper.data.chat import resolve_template, stop_settings
    from temper.data.prompts import read_prompts
    from temper.loading import load_for_inference
    from temper.models.generate import SamplingConfig
    from temper.rewards.functions import world_answer_reward
    from temper.train.rollout import prompt_ids, sample_groups

    prompts = read_prompts(str(prompts_file))
    tasks = [json.loads(line).get("task", "?") for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    model, tokenizer = load_for_inference(str(model_dir))
    template = resolve_template(None, tokenizer)
    stops, eos_ids = stop_settings(tokenizer, template)
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=eos_ids, stop=stops)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    model.eval()
    rows = sample_groups(model, [prompt_ids(tokenizer, template, p) for p in prompts], 1, greedy, pad_id=pad_id,
                         tokenizer=tokenizer).completions()
    replies = []
    for r in rows:  # as the recipe's texts(): the EOS dropped, cut at the first stop string
        text = tokenizer.decode(r[:-1] if r and r[-1] in eos_ids else r)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        replies.append(text[:cut] if cut >= 0 else text)
    scores = world_answer_reward(replies, answer=[p.answer for p in prompts])
    # a reply that goes on past its answer may hit a right word by listing more facts: the strict
    # score reads the first sentence only (where the SFT data puts the answer)
    first = world_answer_reward([re.split(r"(?<=[.?!])\s+", r.strip())[0] for r in replies],
                                answer=[p.answer for p in prompts])
    by_task = collections.defaultdict(list)
    for task, s in zip(tasks, scores):
        by_task[task].append(s >= 1.0)
    result = {"all": sum(s >= 1.0 for s in scores) / len(scores), "n": len(scores),
              "first_sentence": sum(s >= 1.0 for s in first) / len(first),
              "mean_words": sum(len(r.split()) for r in replies) / len(replies)}
    for task in sorted(by_task):
        result[task] = sum(by_task[task]) / len(by_task[task])
        result[f"n_{task}"] = len(by_task[task])
    result["examples"] = [{"prompt": p.messages[-1]["content"], "answer": p.answer, "reply": r}
                          for p, r in list(zip(prompts, replies))[:3]]
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_grpo_world")
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--sft", default=None, help="an SFT model directory to start from (skips pretrain and SFT)")
    ap.add_argument("--steps", type=int, default=100, help="GRPO optimiser steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--num-generations", type=int, default=8, help="G")
    ap.add_argument("--batch-size", type=int, default=64, help="completions per step (batch_size / G prompts)")
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--rewards", default="world,length:16", help="reward functions, comma-separated (the pass rate is always "
                                                         "scored by world), e.g. world,length:16")
    ap.add_argument("--mask-truncated", action="store_true", help="mask_truncated_completions=true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-limit", type=int, default=0, help="held-out prompts per evaluation (0: all 100)")
    ap.add_argument("--plots", default=None, help="a folder for grpo-world.svg (and grpo-gsm8k.svg with --gsm8k)")
    ap.add_argument("--gsm8k", action="store_true", help="also GRPO on GSM8K's test prompts for --gsm8k-steps")
    ap.add_argument("--gsm8k-steps", type=int, default=5)
    ap.add_argument("--gsm8k-max-completion-length", type=int, default=64)
    args = ap.parse_args()
    if args.gsm8k and not GSM8K.is_file():
        ap.error(f"--gsm8k: {GSM8K} not found (the shared data's GSM8K test split)")

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    common = ["logging.progress=false", "overwrite=true"]
    start = time.perf_counter()
    sft = world_sft(out, args.pretrain_steps, args.sft_steps, common) if args.sft is None else Path(args.sft)
    prep_seconds = time.perf_counter() - start
    world = Path(json.loads((sft / "temper.json").read_text())["world_dir"])
    settings = grpo_settings(args)
    grpo_dir = out / "grpo"
    print(f"temper grpo model={sft} output_dir={grpo_dir} " + " ".join(settings), flush=True)
    grpo_start = time.perf_counter()
    summary = stage("grpo", "grpo", out, [f"model={sft}", f"output_dir={grpo_dir}", *settings, *common])
    grpo_seconds = time.perf_counter() - grpo_start

    rows = rows_of(grpo_dir / "metrics.jsonl")
    evals = [(r["step"], r["eval_pass_rate"]) for r in rows if "eval_pass_rate" in r]
    print("measuring per task ...", flush=True)
    test = world / "rl" / "test.jsonl"
    before, after = (pass_rates(d, test, args.max_completion_length) for d in (sft, grpo_dir))
    for name, measured, logged in (("SFT", before, evals[0][1]), ("GRPO", after, evals[-1][1])):
        if args.eval_limit == 0 and abs(measured["all"] - logged) > 1e-6:  # logged as a float32
            print(f"note: {name}: the pass rate measured here ({measured['all']:.3f}) differs from the logged "
                  f"eval_pass_rate ({logged:.3f})")

    gsm = None
    if args.gsm8k:
        gsm_dir = out / "grpo_gsm8k"
        gsm_settings = [f"prompts={os.path.relpath(GSM8K)}", "rewards=gsm8k", f"max_steps={args.gsm8k_steps}", f"optim.lr={args.lr!r}",
                        f"num_generations={args.num_generations}", f"batch_size={args.batch_size}",
                        f"max_completion_length={args.gsm8k_max_completion_length}", f"seed={args.seed}",
                        "logging.every=1", "checkpoint.every=0"]
        print(f"temper grpo model={sft} output_dir={gsm_dir} " + " ".join(gsm_settings), flush=True)
        t = time.perf_counter()
        stage("grpo_gsm8k", "grpo", out, [f"model={sft}", f"output_dir={gsm_dir}", *gsm_settings, *common])
        gsm = {"seconds": time.perf_counter() - t, "rows": rows_of(gsm_dir / "metrics.jsonl"), "dir": gsm_dir}

    if args.plots:
        plots = Path(args.plots)
        plots.mkdir(parents=True, exist_ok=True)
        stage("plot_world", "plot", out, [f"runs=[{grpo_dir}]", "names=[grpo (world rl/train)]",
                                          "metrics=[reward,eval_pass_rate,completions/mean_length,entropy]",
                                          f"output={plots / 'grpo-world.svg'}", "overwrite=true",
                                          "title=temper grpo from the SFT llama-3m: built-in world", "y_zero=true"])
        if gsm is not None:
            stage("plot_gsm8k", "plot", out, [f"runs=[{gsm['dir']}]", "names=[grpo (gsm8k test)]",
                                              "metrics=[reward,frac_reward_zero_std,completions/mean_length,"
                                              "completions/clipped_ratio]",
                                              f"output={plots / 'grpo-gsm8k.svg'}", "overwrite=true",
                                              "title=temper grpo from the same model: GSM8K, rewards=gsm8k"])

    total = time.perf_counter() - start
    threads = torch.get_num_threads()
    (out / "bench.json").write_text(json.dumps({
        "settings": settings, "sft": str(sft), "before": before, "after": after, "evals": evals,
        "grpo_seconds": grpo_seconds, "prep_seconds": prep_seconds, "total_seconds": total,
        "summary": summary, "gsm8k": None if gsm is None else {"seconds": gsm["seconds"], "rows": gsm["rows"]},
    }, indent=2, default=str) + "\n")

    made = (f"pretrain {args.pretrain_steps} steps, SFT {args.sft_steps} ({prep_seconds / 60:.1f} min)"
            if args.sft is None else f"the SFT model {sft} (--sft)")
    print(f"\nbuilt-in world, llama-3m: {made}, GRPO {args.steps} steps "
          f"({grpo_seconds / 60:.1f} min); {total / 60:.1f} min in all; CPU: {cpu_name()}, {os.cpu_count()} cores, "
          f"{threads} torch threads; seed {args.seed}")
    print("eval_pass_rate over steps (greedy, world reward, rl/test): "
          + ", ".join(f"{s}: {v:.2f}" for s, v in evals))
    tasks = [k for k in before if k not in ("all", "n", "examples", "first_sentence", "mean_words")
             and not k.startswith("n_")]
    print("\n| held-out pass rate (rl/test, greedy) | SFT (step 0) | GRPO (step " f"{args.steps}) | change |")
    print("|---|---|---|---|")
    for k in ("all", *tasks):
        n = before["n"] if k == "all" else before[f"n_{k}"]
        print(f"| {k} ({n} prompts) | {before[k]:.3f} | {after[k]:.3f} | {after[k] - before[k]:+.3f} |")
    print(f"| all, first sentence of the reply only | {before['first_sentence']:.3f} | {after['first_sentence']:.3f} | "
          f"{after['first_sentence'] - before['first_sentence']:+.3f} |")
    print(f"| words per greedy reply | {before['mean_words']:.1f} | {after['mean_words']:.1f} | "
          f"{after['mean_words'] - before['mean_words']:+.1f} |")
    hacking = sorted({r["hacking"] for r in rows if r.get("hacking")})
    if hacking:
        print(f"the reward-hacking watch marked rows: {', '.join(hacking)} (first at step "
              f"{next(r['step'] for r in rows if r.get('hacking'))})")
    train_rows = [r for r in rows if "reward" in r]
    if train_rows:
        first, last = train_rows[:3], train_rows[-3:]
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        print(f"\ntraining reward (mean of the first / last 3 logged rows): {mean(first, 'reward'):.3f} -> "
              f"{mean(last, 'reward'):.3f}; frac_reward_zero_std {mean(first, 'frac_reward_zero_std'):.2f} -> "
              f"{mean(last, 'frac_reward_zero_std'):.2f}; completions/mean_length "
              f"{mean(first, 'completions/mean_length'):.1f} -> {mean(last, 'completions/mean_length'):.1f}")
    for name, m in (("SFT", before), ("GRPO", after)):
        for e in m["examples"]:
            print(f"  {name}: Q {e['prompt']!r} (answer {e['answer']!r}) -> {e['reply']!r}")
    if gsm is not None:
        print(f"\nGSM8K test prompts, rewards=gsm8k, {args.gsm8k_steps} steps ({gsm['seconds']:.0f} s):")
        keys = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "loss", "grad_norm")
        print("| step | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for r in gsm["rows"]:
            print(f"| {r['step']} | " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), (int, float)) else "-"
                                                   for k in keys) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
