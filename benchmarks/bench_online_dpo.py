"""DPO, iterative DPO and AI feedback on the built-in world, from a model temper trains here.

    python benchmarks/bench_online_dpo.py [--out runs/bench_online] [--pretrain-steps 500 --sft-steps 400
                                           --dpo-steps 200 --round-steps 100 --prompts-per-round 128
                                           --sft-style-noise 0.0]

Pretrains a llama-3m on the world (`temper pretrain` defaults but --pretrain-steps, and
`world.sft_style_noise=` --sft-style-noise), SFTs it (`temper sft` defaults but --sft-steps), then
from the SFT model:

(a) offline DPO on the world's preference pairs (`temper dpo` defaults but --dpo-steps);
(b) one online round: the SFT model samples 4 responses to --prompts-per-round of the world's
    rl/train prompts, `rule:world` (the world's checker) picks best > worst, one DPO round of
    --round-steps;
(c) one AI-feedback round: the SFT model itself critiques and revises one sample per prompt
    against the shipped constitution (revised > original), one DPO round of --round-steps.

Every model is measured the same way:
  held-out preference accuracy  on the world's preference/test pairs, the implicit DPO reward
      (log pi/pi_ref of chosen minus that of rejected, the reference being the SFT model) > 0,
      a margin of exactly 0 counting half: the SFT model itself scores 0.5 by construction;
  log-prob preference  the share of those pairs where the model alone gives the chosen reply
      the higher total log-probability (no reference; long rejected replies make this easy);
  checker, greedy  `temper.eval.world_checker` on greedy replies to the world's rl/test prompts
      (held out: no round saw them): its score and its four criteria;
  checker, sampled  the same on 4 replies per rl/test prompt sampled at temperature 1 (top_p 1,
      seed 0 for every model): greedy decoding shows the model's most likely style only, and
      a style the SFT data taught at some rate (--sft-style-noise) shows up in samples first;
  drift perplexity  on the pretraining validation shards (what `temper dpo` logs as general_ppl).
Rounds also report their judge's score of the policy's samples before and after the round.
--sft-style-noise writes that share of the world's sft/train replies rambling, repetitive or rude
(still correct), like scraped instruction data, so that the SFT model has a style for preference
tuning to fix; 0 (the default) is the clean world, whose SFT model already writes in the chosen
style. Each stage's own output goes to OUT/logs/*.log. Nothing is tuned here: the settings above
are the recipes' defaults, and every number is printed as it comes out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch


def stage(name: str, command: str, out: Path, overrides: list[str]) -> dict:
    """Run one temper command in-process with its output in OUT/logs/NAME.log."""
    from temper.cli import Commands

    commands = Commands()
    cfg = commands.config(command, overrides)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"{name} ...", end=" ", flush=True)
    with open(out / "logs" / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        result = commands.run(command, cfg)
    print(f"{time.perf_counter() - start:.0f} s", flush=True)
    return result


def world_sft(out: Path, pretrain_steps: int, sft_steps: int, common: list[str], *pretrain_extra: str) -> Path:
    """Pretrain on the built-in world (OUT/pretrain, its world in OUT/pretrain/world), then SFT it
    (OUT/sft): the SFT model's directory."""
    pre, tuned = out / "pretrain", out / "sft"
    stage("pretrain", "pretrain", out, [f"output_dir={pre}", f"max_steps={pretrain_steps}", *pretrain_extra, *common])
    stage("sft", "sft", out, [f"model={pre}", f"output_dir={tuned}", f"max_steps={sft_steps}", *common])
    return tuned


@torch.no_grad()
def preference_accuracy(policy_dir, ref_dir, pairs_file) -> dict:
    """Implicit-reward accuracy (ties half) and the policy's own log-prob preference, overall and per reason."""
    from temper.data.chat import resolve_template
    from temper.data.preference import collate_pairs, load_preferences
    from temper.data.tokenizer import Tokenizer
    from temper.losses.logprobs import completion_logprobs as pair_logps
    from temper.models import load_model

    tokenizer = Tokenizer.from_dir(policy_dir)
    encoded, _ = load_preferences([str(pairs_file)], tokenizer, resolve_template(None, tokenizer), max_len=512)
    reasons = [json.loads(line)["reason"] for line in Path(pairs_file).read_text().splitlines()]
    assert len(encoded) == len(reasons)
    policy, ref = (load_model(d).eval() for d in (policy_dir, ref_dir))
    margins, own = [], []
    for i in range(0, len(encoded), 16):
        batch = collate_pairs(encoded[i:i + 16], tokenizer.pad_id or 0)
        B = batch.num_pairs
        lp, rp = pair_logps(policy, batch)[0], pair_logps(ref, batch)[0]
        margins += ((lp[:B] - rp[:B]) - (lp[B:] - rp[B:])).tolist()
        own += (lp[:B] > lp[B:]).tolist()
    hit = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    result = {"preference_accuracy": sum(hit) / len(hit), "logprob_preference": sum(own) / len(own)}
    for reason in sorted(set(reasons)):
        idx = [i for i, r in enumerate(reasons) if r == reason]
        result[f"preference_accuracy/{reason}"] = sum(hit[i] for i in idx) / len(idx)
    return result


SAMPLES_PER_PROMPT = 4  # sampled replies per held-out prompt for the sampled checker


def world_checker(model_dir, prompts_file) -> dict:
    """The world checker's means on greedy replies (checker/greedy/*) and on SAMPLES_PER_PROMPT
    replies per prompt sampled at temperature 1 with a fixed seed (checker/sampled/*)."""
    from temper.data.chat import chat_template_for
    from temper.data.prompts import read_prompts
    from temper.eval.world_checker import mean_check
    from temper.loading import load_for_inference
    from temper.train.rollout import sample_responses

    prompts = read_prompts(prompts_file)
    answers = [p.answer for p in prompts]
    model, tokenizer = load_for_inference(model_dir)
    template = chat_template_for(model_dir, tokenizer, None)
    result = {}
    for name, k, temperature in (("greedy", 1, 0.0), ("sampled", SAMPLES_PER_PROMPT, 1.0)):
        replies = sample_responses(model, tokenizer, template, prompts, k, temperature=temperature, top_p=1.0,
                                   max_new_tokens=48, seed=0)
        scores = mean_check([r for rs in replies for r in rs], [a for a in answers for _ in range(k)])
        result.update({f"checker/{name}/{c}": v for c, v in scores.items()})
    return result


def measure(model_dir, sft_dir, world: Path) -> dict:
    return {**preference_accuracy(model_dir, sft_dir, world / "preference" / "test.jsonl"),
            **world_checker(model_dir, world / "rl" / "test.jsonl")}


def label(metric: str) -> str:
    """A table row name: the checker's rows say how the replies were decoded."""
    if metric.startswith("checker/greedy/"):
        return f"world checker, greedy: {metric.rsplit('/', 1)[1]}"
    if metric.startswith("checker/sampled/"):
        return f"world checker, sampled (T=1, {SAMPLES_PER_PROMPT}/prompt): {metric.rsplit('/', 1)[1]}"
    return metric


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_online")
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--dpo-steps", type=int, default=200)
    ap.add_argument("--round-steps", type=int, default=100)
    ap.add_argument("--prompts-per-round", type=int, default=128)
    ap.add_argument("--sft-style-noise", type=float, default=0.0,
                    help="share of the world's sft/train replies written rambling, repetitive or rude (0: clean)")
    args = ap.parse_args()
    if not 0.0 <= args.sft_style_noise < 1.0:
        ap.error(f"--sft-style-noise must be in [0, 1), got {args.sft_style_noise}")

    from temper.errors import TemperError

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    pre, tuned = out / "pretrain", out / "sft"
    common = ["logging.progress=false", "overwrite=true"]
    start = time.perf_counter()
    world_sft(out, args.pretrain_steps, args.sft_steps, common,
              f"world.sft_style_noise={float(args.sft_style_noise)!r}")
    world = pre / "world"
    rounds = ["rounds=1", f"dpo.max_steps={args.round_steps}", f"prompts_per_round={args.prompts_per_round}",
              "overwrite=true"]

    offline = stage("dpo", "dpo", out, [f"model={tuned}", f"output_dir={out / 'dpo'}", f"max_steps={args.dpo_steps}",
                                      *common])
    online = stage("online_rule", "online-dpo", out, [f"model={tuned}", f"output_dir={out / 'online_rule'}",
                                             "judge=rule:world", *rounds, "dpo.logging.progress=false"])["rounds"][0]
    try:
        feedback = stage("online_feedback", "online-dpo", out, [f"model={tuned}", f"output_dir={out / 'online_feedback'}",
                                                       f"judge=constitution:{tuned}", "samples_per_prompt=1",
                                                       "monitor_judge=rule:world", *rounds,
                                                       "dpo.logging.progress=false"])["rounds"][0]
    except TemperError as e:  # no pairs to train on: reported, not hidden
        print(f"refused: {e}")
        feedback = json.loads((out / "online_feedback" / "round_1" / "judged.json").read_text())

    print("measuring ...", flush=True)
    results = {"sft": measure(tuned, tuned, world), "dpo": measure(out / "dpo", tuned, world),
               "online_rule": measure(online["model"], tuned, world)}
    drift = {"sft": offline["before"]["general_ppl"], "dpo": offline["general_ppl"],
             "online_rule": online["dpo"]["general_ppl_after"]}
    trl = [offline["before"]["eval_rewards/accuracies"], offline["eval_rewards/accuracies"],
           online["dpo"]["eval_rewards/accuracies_after"]]
    if "model" in feedback:  # the round trained
        results["online_feedback"] = measure(feedback["model"], tuned, world)
        drift["online_feedback"] = feedback["dpo"]["general_ppl_after"]
        trl.append(feedback["dpo"]["eval_rewards/accuracies_after"])
    (out / "bench.json").write_text(json.dumps({"results": results, "drift_ppl": drift, "online_rule": online,
                                                "online_feedback": feedback}, indent=2) + "\n")

    names = list(results)
    metrics = [k for k in results["sft"]]
    print(f"\nbuilt-in world (sft_style_noise {args.sft_style_noise:g}), llama-3m: pretrain {args.pretrain_steps} "
          f"steps, SFT {args.sft_steps}; DPO {args.dpo_steps} "
          f"steps on the world's pairs; one round each ({args.round_steps} steps, {args.prompts_per_round} prompts) "
          f"from the SFT model; {time.perf_counter() - start:.0f} s in all (cpu threads: {torch.get_num_threads()})\n")
    print("| metric | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for m in metrics:
        print(f"| {label(m)} | " + " | ".join(f"{results[n][m]:.3f}" for n in names) + " |")
    print("| drift perplexity | " + " | ".join(f"{drift[n]:.3f}" for n in names) + " |")
    print("| TRL eval_rewards/accuracies (strict >) | " + " | ".join(f"{v:.3f}" for v in trl) + " |")
    for name, r in (("online round, judge rule:world", online), ("AI-feedback round, constitution: the SFT model", feedback)):
        skipped = r.get("skipped_prompts") or r.get("skipped_responses")
        after = r.get("judge_score_after")
        print(f"\n{name}: {r['prompts']} prompts x {r['samples_per_prompt']} samples; {r['pairs']} pairs; skipped "
              f"{skipped}; {r['empty_responses']} empty responses; rule:world score of the policy's samples "
              f"{r['judge_score_before']:.3f} -> {'not trained' if after is None else f'{after:.3f}'}")
    for reason, example in (feedback.get("first_skipped") or {}).items():
        print(f"  first skipped as {reason}: {example}")
    pairs = [json.loads(line) for line in (out / "online_feedback" / "round_1" / "pairs.jsonl").read_text().splitlines()]
    for p in pairs[:4]:
        print(f"  a pair: Q: {p['prompt'][-1]['content']!r}\n          original: {p['rejected'][0]['content']!r}\n"
              f"          critique: {p['critique']!r}\n          revision: {p['chosen'][0]['content']!r}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
