"""PPO against a reward model on the built-in world, from a model temper trains here: does the reward
model's score rise, does the world checker agree, and what does the KL coefficient β change?

    python benchmarks/bench_ppo_world.py [--out runs/bench_ppo_world] [--pretrain-steps 500 --sft-steps 400]
        [--sft-style-noise 0.3]      # that share of the world's SFT replies rambling, repetitive or rude
        [--sft DIR]                  # start from this SFT model (skip pretraining and SFT)
        [--rm DIR | --reward-steps 80]   # a reward model to use, or train one from the SFT model
        [--rm-reasons wrong]         # train it on the world's pairs of these `reason`s only
        [--rm-pairs onpolicy --rm-samples 8 --rm-temperature 1.0]   # or on the SFT model's own samples
        [--steps 80 --lr 1e-4 --batch-size 32 --max-completion-length 24 --temperature 0.7 --ppo-epochs 4
         --kl-coefs 0.0,0.05,1.0 --eval-every 16 --eval-limit 0 --seed 0]
        [--plots docs]               # ppo-beta.svg (and ppo-beta-eval.svg) there, with `temper plot`
        [--timing --timing-steps 32] # time per PPO iteration by phase and peak RSS: full vs LoRA-shared

Pretrains a llama-3m on the world (`temper pretrain` defaults but --pretrain-steps, and
`world.sft_style_noise=` --sft-style-noise: that share of the sft/train replies written in a rejected
style, the answer still in them, as in benchmarks/bench_online_dpo.py, so that the SFT model has a
style for RLHF to fix), SFTs it (`temper sft` defaults but --sft-steps), trains a reward model from the SFT model on the world's preference
pairs (`temper reward` defaults but --reward-steps, evaluated at the start, half way and the end; its
held-out accuracy and the reward's correlation with response length are printed from its own
evaluation; --rm-reasons keeps only the world's train and test pairs whose `reason` (why the rejected
reply loses: wrong, rambling, repetitive, rude) is listed, written to OUT/rm_pairs/ and passed as
data= and eval_data=; --rm-pairs onpolicy instead trains it on InstructGPT's kind of comparisons:
the SFT model's own --rm-samples replies (temperature --rm-temperature, --max-completion-length
tokens) to each rl/train prompt, and to each preference/test prompt for the held-out pairs, ranked by
the world checker's score as the labeler, one pair per prompt (best over worst; ties make none)),
then runs `temper ppo
model=SFT reward_model=RM` once per β in --kl-coefs (the same seed, steps and every other setting) on
the world's rl/train prompts. Each run evaluates `eval_pass_rate` (greedy replies to the held-out
rl/test prompts scored by the world's exact-answer reward, `eval_reward=world`) at the start and every
--eval-every steps. The recipe's defaults follow TRL (lr 3e-6, for billion-parameter models); the PPO
settings given here (printed in full, and in OUT/ppo_*/config.yaml) are what this script passes;
every other key is the recipe's default. One logged row is one PPO iteration (logging.every = the
optimiser steps per rollout batch = --ppo-epochs).

After the runs, the SFT model and each PPO model are measured on every rl/test prompt by the world
checker (`temper.eval.world_checker`: correct, concise, not repetitive, polite; greedy and 4 samples
per prompt at temperature 1, as benchmarks/bench_online_dpo.py measures). Printed per β: the reward
model's score of the training rollouts (objective/scores, mean of the first and of the last 3
iterations), the KL to the SFT model (objective/kl: first, max, last), length and repetition of the
completions, eval_pass_rate at the start and end, the checker's scores, and every row the
reward-hacking watch marked (`hacking` in metrics.jsonl) with its conditions.

--timing: two short `temper ppo` runs in their own processes (the first β, no evaluation), the value
model in full vs `peft.method=lora value_peft=true` (the policy and the value model through LoRA, the
reference the disabled adapter): the seconds of one PPO iteration split into generation
(`time/rollout`: sampling, the old and reference log-probs, the values), scoring (`time/score`: the
reward model) and optimisation (`time/train`: the --ppo-epochs optimiser steps), median over the
iterations after the first, and the process's peak RSS (its VmHWM, polled every 0.1 s; with all four
roles loaded; the logged `memory_mb` is the same VmHWM, read by the process itself).
Each stage's output goes to OUT/logs/*.log.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grpo_world import cpu_name, rows_of  # noqa: E402
from bench_online_dpo import stage, world_checker, world_sft  # noqa: E402  one temper command in-process; the checker

REPO = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "score", "train")


def ppo_settings(args, kl_coef: float) -> list[str]:
    """The `temper ppo` keys this benchmark sets for one β (every other key: the recipe's default)."""
    return [f"max_steps={args.steps}", f"optim.lr={args.lr!r}", f"batch_size={args.batch_size}",
            f"max_completion_length={args.max_completion_length}", f"temperature={args.temperature!r}",
            f"num_ppo_epochs={args.ppo_epochs}", f"kl_coef={float(kl_coef)!r}", f"seed={args.seed}",
            f"logging.every={args.ppo_epochs}", f"logging.eval_every={args.eval_every}",
            f"eval_limit={args.eval_limit}", "logging.eval_at_start=true", "checkpoint.every=0"]


def timing_settings(args, lora: bool) -> list[str]:
    """A short run's keys: the first β, no evaluation; LoRA on the policy and the value model."""
    keys = [k for k in ppo_settings(args, args.kl_coefs[0]) if not k.startswith(("max_steps=", "logging.eval"))]
    keys += [f"max_steps={args.timing_steps}", "logging.eval_every=0", "logging.eval_at_start=false"]
    return keys + (["peft.method=lora", "value_peft=true"] if lora else [])


def hacking_marks(rows: list[dict]) -> list[tuple[int, str]]:
    """(step, conditions) of every row the reward-hacking watch marked."""
    return [(r["step"], r["hacking"]) for r in rows if r.get("hacking")]


def iteration_times(rows: list[dict], steps_per_iteration: int) -> dict:
    """Seconds per PPO iteration by phase (each logged row: the mean per optimiser step over one
    iteration's steps), median over the rows after the first; and the last row's memory_mb."""
    timed = [r for r in rows if "time/train" in r][1:] or [r for r in rows if "time/train" in r]
    result = {p: statistics.median(r.get(f"time/{p}", 0.0) * steps_per_iteration for r in timed) for p in PHASES}
    result["total"] = sum(result[p] for p in PHASES)
    result["iterations"] = len(timed)
    result["memory_mb"] = max(r.get("memory_mb", 0.0) for r in rows)
    return result


def vm_hwm_mb(pid: int) -> float:
    """A live process's peak resident set size (VmHWM, Linux), MB; 0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def run_timing(args, sft: Path, rm: Path, out: Path) -> dict:
    results = {}
    for name, lora in (("full", False), ("lora", True)):
        run_dir = out / f"timing_{name}"
        cmd = [sys.executable, "-m", "temper", "ppo", f"model={sft}", f"reward_model={rm}", f"output_dir={run_dir}",
               *timing_settings(args, lora), "logging.progress=false", "overwrite=true"]
        print(f"timing {name}: {' '.join(cmd[2:])} ...", end=" ", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        start, load_before = time.perf_counter(), os.getloadavg()
        with open(out / "logs" / f"timing_{name}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            peak = 0.0
            while proc.poll() is None:  # the child's own high-water mark, watched from outside
                peak = max(peak, vm_hwm_mb(proc.pid))
                time.sleep(0.1)
            if proc.returncode:
                raise SystemExit(f"timing {name}: temper ppo failed ({proc.returncode}): see {log.name}")
        print(f"{time.perf_counter() - start:.0f} s", flush=True)
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        results[name] = {**iteration_times(rows_of(run_dir / "metrics.jsonl"), args.ppo_epochs),
                         "trainable_parameters": summary.get("trainable_parameters"), "command": " ".join(cmd[2:]),
                         "name": name, "load_before": load_before, "load_after": os.getloadavg(),
                         "peak_rss_mb": peak}
    return results


def reason_pairs(sft: Path, reasons: str, folder: Path) -> list[str]:
    """The world's preference train/test pairs of these reasons only, written to FOLDER: temper reward keys."""
    world = Path(json.loads((Path(sft) / "temper.json").read_text())["world_dir"])
    keep = {r.strip() for r in reasons.split(",") if r.strip()}
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = (world / "preference" / f"{split}.jsonl").read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("reason") in keep]
        if not kept:
            raise SystemExit(f"--rm-reasons {reasons}: no {split} pair has one of these reasons")
        (folder / f"{split}.jsonl").write_text("\n".join(kept) + "\n")
    return [f"data=[{folder / 'train.jsonl'}]", f"eval_data=[{folder / 'test.jsonl'}]"]


def onpolicy_pairs(sft: Path, folder: Path, samples: int, temperature: float, max_new_tokens: int,
                   seed: int) -> tuple[list[str], dict]:
    """InstructGPT's comparisons (Ouyang et al. 2022: labelers rank the SFT model's own samples),
    with the world checker as the labeler: `samples` replies of the SFT model to each rl/train prompt
    (train) and each preference/test prompt (held out), each scored by `check_reply`, and one pair
    per prompt, its best-scored reply over its worst (online DPO's `best_vs_worst`: ties and empty
    replies make none). Written to FOLDER; returns the `temper reward` keys and the counts."""
    from temper.data.chat import chat_template_for
    from temper.data.prompts import read_prompts
    from temper.eval.world_checker import check_reply
    from temper.loading import load_for_inference
    from temper.train.rollout import sample_responses
    from temper.workflows.online_dpo import best_vs_worst

    world = Path(json.loads((Path(sft) / "temper.json").read_text())["world_dir"])
    model, tokenizer = load_for_inference(str(sft))
    template = chat_template_for(str(sft), tokenizer, None)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, source in (("train", world / "rl" / "train.jsonl"), ("test", world / "preference" / "test.jsonl")):
        prompts = read_prompts(str(source))
        replies = sample_responses(model, tokenizer, template, prompts, samples, temperature=temperature, top_p=1.0,
                                   max_new_tokens=max_new_tokens, seed=seed + (split == "test"))
        checks = [[check_reply(r, p.answer) for r in rs] for p, rs in zip(prompts, replies)]
        pairs, skipped = best_vs_worst(prompts, replies, [[c["score"] for c in cs] for cs in checks])
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
        correct = [c["correct"] for cs in checks for c in cs]
        counts[split] = {"prompts": len(prompts), "pairs": len(pairs), "skipped": dict(skipped),
                         "sampled_correct": sum(correct) / len(correct)}
        print(f"on-policy comparisons, {split} ({source.name}): {len(prompts)} prompts x {samples} samples "
              f"(T={temperature:g}), {sum(correct) / len(correct):.3f} correct; {len(pairs)} pairs, skipped "
              f"{dict(skipped)}", flush=True)
    return [f"data=[{folder / 'train.jsonl'}]", f"eval_data=[{folder / 'test.jsonl'}]"], counts


def reward_model_report(rm: Path) -> dict:
    """The reward model's own held-out evaluation: the first and the last rows with eval_accuracy."""
    evals = [r for r in rows_of(rm / "metrics.jsonl") if "eval_accuracy" in r]
    keys = ("step", "eval_accuracy", "eval_margin", "eval_length_correlation")
    return {"first": {k: evals[0].get(k) for k in keys}, "last": {k: evals[-1].get(k) for k in keys}}


def greedy_examples(model_dir, prompts_file, n: int, max_new_tokens: int) -> list[tuple[str, str, str]]:
    """(question, answer, greedy reply) for the first n held-out prompts."""
    from temper.data.chat import chat_template_for
    from temper.data.prompts import read_prompts
    from temper.loading import load_for_inference
    from temper.train.rollout import sample_responses

    prompts = read_prompts(str(prompts_file))[:n]
    model, tokenizer = load_for_inference(str(model_dir))
    replies = sample_responses(model, tokenizer, chat_template_for(str(model_dir), tokenizer, None), prompts, 1,
                               temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0)
    return [(p.messages[-1]["content"], p.answer, r[0]) for p, r in zip(prompts, replies)]


def run_summary(rows: list[dict]) -> dict:
    train = [r for r in rows if "objective/scores" in r]
    evals = [(r["step"], r["eval_pass_rate"], r.get("eval_reward")) for r in rows if "eval_pass_rate" in r]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    first, last = train[:3], train[-3:]
    return {"scores": (mean(first, "objective/scores"), mean(last, "objective/scores")),
            "kl": (train[0]["objective/kl"], max(r["objective/kl"] for r in train), train[-1]["objective/kl"]),
            "length": (mean(first, "completions/mean_length"), mean(last, "completions/mean_length")),
            "repetition": (mean(first, "completions/repetition_rate"), mean(last, "completions/repetition_rate")),
            "clipped": (mean(first, "completions/clipped_ratio"), mean(last, "completions/clipped_ratio")),
            "evals": evals, "marks": hacking_marks(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_ppo_world")
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--sft-style-noise", type=float, default=0.0,
                    help="share of the world's sft/train replies written rambling, repetitive or rude (0: clean)")
    ap.add_argument("--sft", default=None, help="an SFT model directory to start from (skips pretrain and SFT)")
    ap.add_argument("--rm", default=None, help="a reward model directory (skips training one)")
    ap.add_argument("--reward-steps", type=int, default=80, help="temper reward's max_steps (evaluated every half)")
    ap.add_argument("--rm-reasons", default="", help="train the reward model on the world's pairs with these "
                    "reasons only, comma-separated (default: all)")
    ap.add_argument("--rm-pairs", choices=("world", "onpolicy"), default="world",
                    help="the reward model's comparisons: the world's preference pairs, or the SFT model's own "
                    "samples ranked by the world checker (InstructGPT's recipe)")
    ap.add_argument("--rm-samples", type=int, default=8, help="--rm-pairs onpolicy: samples per prompt")
    ap.add_argument("--rm-temperature", type=float, default=1.0, help="--rm-pairs onpolicy: their temperature")
    ap.add_argument("--steps", type=int, default=80, help="PPO optimiser steps (--ppo-epochs per rollout batch)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32, help="completions per rollout batch (one per prompt)")
    ap.add_argument("--max-completion-length", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--kl-coefs", default="0.0,0.05,1.0", help="one PPO run per β, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--eval-limit", type=int, default=0, help="held-out prompts per evaluation (0: all 100)")
    ap.add_argument("--no-checker", action="store_true", help="skip the world checker's measurement after the runs")
    ap.add_argument("--plots", default=None, help="a folder for ppo-beta.svg and ppo-beta-eval.svg")
    ap.add_argument("--timing", action="store_true", help="also time one PPO iteration by phase: full vs LoRA")
    ap.add_argument("--timing-steps", type=int, default=32)
    ap.add_argument("--timing-only", action="store_true", help="--timing alone: no β runs (needs --sft and --rm)")
    args = ap.parse_args()
    args.kl_coefs = [float(b) for b in args.kl_coefs.split(",") if b.strip()]
    if not args.kl_coefs:
        ap.error("--kl-coefs: give at least one β")

    if not 0.0 <= args.sft_style_noise < 1.0:
        ap.error(f"--sft-style-noise must be in [0, 1), got {args.sft_style_noise}")
    if args.sft is not None and args.sft_style_noise:
        ap.error("--sft-style-noise is the world the benchmark pretrains and SFTs on: not with --sft")
    if args.rm_pairs == "onpolicy" and args.rm_reasons:
        ap.error("--rm-reasons picks among the world's pairs: not with --rm-pairs onpolicy")
    if args.timing_only and (args.sft is None or args.rm is None):
        ap.error("--timing-only needs --sft and --rm")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    if args.timing_only:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        timing = run_timing(args, Path(args.sft), Path(args.rm), out)
        (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        print_timing(args, timing)
        return
    common = ["logging.progress=false", "overwrite=true"]
    start = time.perf_counter()
    sft = (world_sft(out, args.pretrain_steps, args.sft_steps, common,
                     f"world.sft_style_noise={float(args.sft_style_noise)!r}") if args.sft is None else Path(args.sft))
    pair_counts = None
    if args.rm is None:
        rm = out / "rm"
        if args.rm_pairs == "onpolicy":
            pairs, pair_counts = onpolicy_pairs(sft, out / "rm_pairs", args.rm_samples, args.rm_temperature,
                                                args.max_completion_length, args.seed)
        else:
            pairs = reason_pairs(sft, args.rm_reasons, out / "rm_pairs") if args.rm_reasons else []
        stage("reward", "reward", out, [f"model={sft}", f"output_dir={rm}", f"max_steps={args.reward_steps}", *pairs,
                                         f"logging.eval_every={max(1, args.reward_steps // 2)}", *common])
    else:
        rm = Path(args.rm)
    prep_seconds = time.perf_counter() - start
    world = Path(json.loads((sft / "temper.json").read_text())["world_dir"])
    test = world / "rl" / "test.jsonl"

    runs, seconds = {}, {}
    for beta in args.kl_coefs:
        run_dir = out / f"ppo_kl{beta:g}"
        settings = ppo_settings(args, beta)
        print(f"temper ppo model={sft} reward_model={rm} output_dir={run_dir} " + " ".join(settings), flush=True)
        t = time.perf_counter()
        stage(f"ppo_kl{beta:g}", "ppo", out, [f"model={sft}", f"reward_model={rm}", f"output_dir={run_dir}",
                                             *settings, *common])
        seconds[beta] = time.perf_counter() - t
        runs[beta] = run_dir

    checker = {}
    if not args.no_checker:
        print("measuring with the world checker ...", flush=True)
        checker["SFT"] = world_checker(sft, test)
        for beta, run_dir in runs.items():
            checker[f"β={beta:g}"] = world_checker(run_dir, test)

    examples = {"SFT": greedy_examples(sft, test, 4, args.max_completion_length),
                **{f"β={b:g}": greedy_examples(d, test, 4, args.max_completion_length) for b, d in runs.items()}}

    if args.plots:
        plots = Path(args.plots)
        plots.mkdir(parents=True, exist_ok=True)
        names = "[" + ",".join(f"kl_coef {b:g}" for b in runs) + "]"
        dirs = "[" + ",".join(str(d) for d in runs.values()) + "]"
        title = f"temper ppo from the SFT llama-3m against its reward model: β (kl_coef) {', '.join(f'{b:g}' for b in runs)}"
        stage("plot_beta", "plot", out, [f"runs={dirs}", f"names={names}", "metrics=[objective/scores,objective/kl,"
                                         "completions/mean_length,completions/repetition_rate]",
                                         f"output={plots / 'ppo-beta.svg'}", "overwrite=true", f"title={title}"])
        stage("plot_beta_eval", "plot", out, [f"runs={dirs}", f"names={names}",
                                              "metrics=[eval_pass_rate,objective/rlhf_reward,beta,val/explained_variance]",
                                              f"output={plots / 'ppo-beta-eval.svg'}", "overwrite=true",
                                              f"title={title}: held-out pass rate (world checker's exact answer)"])

    timing = run_timing(args, sft, rm, out) if args.timing else None
    total = time.perf_counter() - start
    summaries = {b: run_summary(rows_of(d / "metrics.jsonl")) for b, d in runs.items()}
    rm_report = reward_model_report(rm)
    (out / "bench.json").write_text(json.dumps({
        "settings": {b: ppo_settings(args, b) for b in runs}, "sft": str(sft), "rm": str(rm), "rm_report": rm_report,
        "rm_pairs": {"source": args.rm_pairs, "counts": pair_counts},
        "runs": {str(b): s for b, s in summaries.items()}, "seconds": {str(b): s for b, s in seconds.items()},
        "checker": checker, "examples": examples, "timing": timing, "prep_seconds": prep_seconds, "total_seconds": total,
    }, indent=2, default=str) + "\n")

    made = (f"pretrain {args.pretrain_steps} steps, SFT {args.sft_steps} (sft_style_noise {args.sft_style_noise:g})" if args.sft is None
            else f"the SFT model {sft} (--sft)")
    made += f", reward model {rm}" + (f" ({args.reward_steps} steps)" if args.rm is None else " (--rm)")
    print(f"\nbuilt-in world, llama-3m: {made} ({prep_seconds / 60:.1f} min); PPO {args.steps} steps per β "
          f"({', '.join(f'{s / 60:.1f}' for s in seconds.values())} min); {total / 60:.1f} min in all; CPU: {cpu_name()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads; seed {args.seed}")
    f, la = rm_report["first"], rm_report["last"]
    print(f"reward model, held-out preference/test pairs: accuracy {f['eval_accuracy']:.3f} (step {f['step']}) -> "
          f"{la['eval_accuracy']:.3f} (step {la['step']}); margin {la['eval_margin']:.3f}; correlation with "
          f"length {la['eval_length_correlation']:.3f}")
    print("\n| kl_coef β | RM score (first 3 -> last 3 iterations) | KL first / max / last | mean length | "
          "repetition rate | eval_pass_rate start -> end | hacking marks |")
    print("|---|---|---|---|---|---|---|")
    for b, s in summaries.items():
        ev = s["evals"]
        marks = "; ".join(f"{step}: {m}" for step, m in s["marks"]) or "none"
        print(f"| {b:g} | {s['scores'][0]:.3f} -> {s['scores'][1]:.3f} | {s['kl'][0]:.2f} / {s['kl'][1]:.2f} / "
              f"{s['kl'][2]:.2f} | {s['length'][0]:.1f} -> {s['length'][1]:.1f} | {s['repetition'][0]:.3f} -> "
              f"{s['repetition'][1]:.3f} | {ev[0][1]:.2f} -> {ev[-1][1]:.2f} | {marks} |")
    for b, s in summaries.items():
        print(f"eval_pass_rate over steps, β={b:g}: " + ", ".join(f"{st}: {v:.2f}" for st, v, _ in s["evals"]))
    if checker:
        names = list(checker)
        keys = list(checker["SFT"])
        print("\n| world checker on rl/test (100 prompts) | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for k in keys:
            print(f"| {k} | " + " | ".join(f"{checker[n][k]:.3f}" for n in names) + " |")
    print("\ngreedy replies to the first held-out prompts:")
    for name, rows in examples.items():
        for q, a, r in rows:
            print(f"  {name}: Q {q!r} (answer {a!r}) -> {r!r}")
    if timing:
        print_timing(args, timing)
    sys.stdout.flush()


def print_timing(args, timing: dict) -> None:
    print(f"\nPPO iteration ({args.batch_size} completions of at most {args.max_completion_length} tokens, "
          f"{args.ppo_epochs} optimiser steps), seconds, median of {timing['full']['iterations']} iterations "
          "after the first:")
    print("| value model | generation (time/rollout) | scoring (time/score) | optimisation (time/train) | "
          "iteration | peak RSS MB (VmHWM) | trainable parameters |")
    print("|---|---|---|---|---|---|---|")
    for name, t in timing.items():
        print(f"| {name} | {t['rollout']:.2f} | {t['score']:.2f} | {t['train']:.2f} | {t['total']:.2f} | "
              f"{t['peak_rss_mb']:.0f} | {t['trainable_parameters']} |")
    load = ", ".join(f"{t['name']}: {t['load_before'][0]:.1f} -> {t['load_after'][0]:.1f}" for t in timing.values())
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; 1-minute load average before -> after each run: {load}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
