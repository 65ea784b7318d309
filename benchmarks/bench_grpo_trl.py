"""GRPO step time and rollout speed: temper vs TRL's GRPOTrainer, both sides doing the same work.

    python benchmarks/bench_grpo_trl.py [--steps 8 --warmup 2 --new-tokens 64 --rounds 2]

Setup (built here, no hub; `bench_dpo_trl.prepare`): the built-in world (seed 0), a byte-level BPE
trained on its pretraining text (ChatML template), temper's `llama-14m` preset (12.6M parameters)
built with seed 0 and saved with `temper.models.save_model` as a Hugging Face directory, which TRL
loads with `AutoModelForCausalLM.from_pretrained`. Prompts: the first (warmup + steps) rows of the
world's `rl/train.jsonl` (one user message each), rendered with the model's ChatML template.

Same work on both sides (TRL 1.x defaults that differ from temper's are set):
  - one prompt per step, G=8 completions of exactly --new-tokens tokens each, sampled at
    temperature 1 (top-p 1, top-k off); every completion has the same length on both sides:
    TRL is given `min_new_tokens` = max_completion_length (its EOS is masked out of the logits),
    temper is run with no EOS and no stop strings (`stop_settings` patched to none in its process);
    the script stops unless both sides generated exactly steps x G x new-tokens tokens.
  - the same prompts in the same order: TRL's rows are written in the order temper draws them
    (seed 0) and TRL reads them unshuffled (`shuffle_dataset=False`); the script stops unless
    TRL's chat-templated prompt ids equal temper's.
  - μ=1, steps_per_generation=1, one micro-batch of 8 completions per optimiser step; loss_type
    dapo, beta 0 (no reference model), epsilon 0.2 both sides of the clip; group-scaled advantages.
  - the same reward, `bench_grpo_trl:crc_reward` (a deterministic pseudo-random number from the
    completion's text), called in-process on both sides (temper: `judge_timeout=0`).
  - no activation (gradient) checkpointing (TRL's configs turn it ON by default), fp32 (TRL defaults
    to bf16), no vLLM; AdamW lr 1e-6, betas (0.9, 0.999), eps 1e-8, weight decay 0, fused, gradient
    clipping at 1.0, constant lr; both log every step, no evaluation or checkpoints.
What still differs is how each computes the same thing: temper prefills each prompt once and
samples the G completions from that one KV cache, TRL (transformers `generate`) prefills the
prompt G times, once per row (8 x ~20 prompt positions more a step). With μ=1 and one micro-batch
per generation neither computes old log-probs: one forward with gradients (log-probs and entropy)
and one backward on each side. TRL masks EOS out of the sampling distribution for the
--new-tokens tokens, temper samples from the full distribution and does not stop at EOS (the same
number of tokens and of decoding steps either way). Rewards differ (each side samples its own
completions from its own random stream), so the losses are not compared.

Timed: the wall time between the ends of consecutive optimiser steps (temper: when its loop ends a
step; TRL: `on_step_end`), so the rollout, the reward, the loss, backward and the optimiser all
count; median (and mean) over --steps after --warmup; --rounds alternating runs of each side in its
own process, each side keeping its fastest. Rollout: the wall time of each generation call
(temper: `sample_groups`, TRL: the model's `generate`), completion tokens / that time, median over
the timed steps. Memory: the RSS high-water mark over the steps after the first (reset through
/proc/self/clear_refs after the first step), over the RSS after both sides' imports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo_trl import StepMeter, _memory, prepare  # noqa: E402  the shared setup and step meter

G = 8
LR, BETAS, EPS, WEIGHT_DECAY, CLIP, EPSILON = 1e-6, (0.9, 0.999), 1e-8, 0.0, 1.0, 0.2


def crc_reward(prompts, completions, **kwargs):
    """A deterministic pseudo-random reward in [0, 1) from each completion's text (TRL's calling
    convention; conversational completions are lists of messages)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [zlib.crc32(t.encode("utf-8")) % 1000 / 1000 for t in texts]


# ----------------------------------------------------------------------------- setup


def write_prompts(workdir: Path, n: int) -> Path:
    path = workdir / "prompts.jsonl"
    with open(workdir / "world" / "rl" / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    if len(rows) < n:
        sys.exit(f"the world has {len(rows)} RL prompts, fewer than {n}")
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows), encoding="utf-8")
    return path


def temper_settings(new_tokens: int) -> list[str]:
    return [f"num_generations={G}", f"batch_size={G}", "grad_accum=1", "steps_per_generation=1", "num_iterations=1",
            f"max_completion_length={new_tokens}", "temperature=1.0", "top_p=1.0", "beta=0.0", "loss_type=dapo",
            f"epsilon={EPSILON}", "scale_rewards=group", "rewards=bench_grpo_trl:crc_reward", "judge_timeout=0",
            "precision=fp32", "activation_checkpointing=false", f"optim.lr={LR}", f"optim.betas=[{BETAS[0]},{BETAS[1]}]",
            f"optim.eps={EPS}", f"optim.weight_decay={WEIGHT_DECAY}", f"optim.grad_clip={CLIP}", "optim.fused=true",
            "schedule.name=constant", "schedule.warmup_steps=0", "logging.every=1", "logging.eval_every=0",
            "logging.eval_at_start=false", "logging.progress=false", "checkpoint.every=0", "peak_flops=1e12", "seed=0"]


def temper_config(model_dir, prompts_path, out, steps: int, new_tokens: int):
    from temper.config import load_config
    from temper.recipes import grpo

    return load_config(grpo.Config, None, [f"model={model_dir}", f"prompts={prompts_path}", f"output_dir={out}",
                                           f"max_steps={steps}", *temper_settings(new_tokens)])


def temper_order(n_prompts: int, steps: int) -> list[int]:
    """The prompt (0-based row) temper's step k samples (one prompt per generation batch, seed 0)."""
    from temper.train.rollout import prompt_order

    return [prompt_order(n_prompts, k, 0) for k in range(steps)]


def temper_prompt_ids(model_dir, prompts_path) -> list[list[int]]:
    from temper.data.chat import resolve_template
    from temper.data.prompts import read_prompts
    from temper.data.tokenizer import Tokenizer
    from temper.train.rollout import prompt_ids

    tokenizer = Tokenizer.from_dir(model_dir)
    template = resolve_template(None, tokenizer)
    return [prompt_ids(tokenizer, template, p) for p in read_prompts([str(prompts_path)], field_name="auto")]


def trl_settings(steps: int, new_tokens: int) -> dict:
    """GRPOConfig arguments that make TRL do temper's work (see the module docstring)."""
    import dataclasses

    import transformers

    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return dict(
        max_steps=steps, per_device_train_batch_size=G, gradient_accumulation_steps=1, num_generations=G,
        steps_per_generation=1, num_iterations=1, max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, loss_type="dapo", epsilon=EPSILON, scale_rewards="group", shuffle_dataset=False,
        **{checkpointing: False}, bf16=False, fp16=False, use_cpu=True, use_vllm=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP,
        dataloader_num_workers=0, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=[], seed=0,
        disable_tqdm=True,
    )


def trl_trainer(model_dir, rows: list[dict], out: str, steps: int, new_tokens: int, callbacks=()):
    """TRL's GRPOTrainer over `rows` (in the order given: it reads them unshuffled)."""
    import datasets
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return GRPOTrainer(model=model, reward_funcs=[crc_reward], args=GRPOConfig(output_dir=out,
                       **trl_settings(steps, new_tokens)), train_dataset=datasets.Dataset.from_list(rows),
                       processing_class=tokenizer, callbacks=list(callbacks))


def read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def check_same_prompts(model_dir, prompts_path, order: list[int], new_tokens: int) -> list[int]:
    """Stop unless TRL tokenises every prompt as temper does; the prompts' lengths in step order."""
    ours = temper_prompt_ids(model_dir, prompts_path)
    rows = read_rows(prompts_path)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(model_dir, [rows[i] for i in order], out, len(order), new_tokens)
        theirs = trainer._tokenize_prompts([r["prompt"] for r in trainer.train_dataset])
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        theirs = theirs["input_ids"] if isinstance(theirs, dict) else theirs
        args = trainer.args
        for name in ("gradient_checkpointing", "activation_checkpointing", "bf16", "use_vllm"):
            if getattr(args, name, False):
                sys.exit(f"TRL runs with {name}=True: not the same work")
    for k, i in enumerate(order):
        if list(theirs[k]) != ours[i]:
            sys.exit(f"not the same work: prompt {k} (row {i + 1}) ids differ:\n  temper {ours[i]}\n  trl    "
                     f"{list(theirs[k])}")
    return [len(ours[i]) for i in order]


# ----------------------------------------------------------------------------- one side, in its own process


def _import_everything() -> dict[str, float]:
    """Both sides import the same libraries first; memory is counted over what they hold."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import temper.recipes.grpo  # noqa: F401
    import temper.train.loop  # noqa: F401

    return {"base_rss_mb": _memory()["rss"]}


def run_temper(args) -> dict:
    import torch

    from temper.recipes import grpo
    from temper.train.loop import TrainLoop

    base = _import_everything()
    meter, rollouts = StepMeter(sample=False), []
    end_step = TrainLoop._end_step

    def timed_end_step(self, done, seconds):  # a step has ended; logging and saving come after
        meter.step_ended()
        end_step(self, done, seconds)

    TrainLoop._end_step = timed_end_step
    steps = TrainLoop.__iter__

    def metered_steps(self):
        meter.training_begins()
        yield from steps(self)

    TrainLoop.__iter__ = metered_steps
    from temper.train import rollout as rollout_module  # where the recipe's TextSettings reads them

    rollout_module.stop_settings = lambda tokenizer, template: ([], [])  # no EOS, no stop strings: every completion is full
    sample = grpo.sample_groups

    def timed_sample(*a, **kw):
        start = time.perf_counter()
        out = sample(*a, **kw)
        seconds = time.perf_counter() - start
        rollouts.append((seconds, sum(len(r) for r in out.completions())))
        return out

    grpo.sample_groups = timed_sample
    with tempfile.TemporaryDirectory() as out:
        cfg = temper_config(args.model, args.prompts, Path(out) / "run", args.warmup + args.steps, args.new_tokens)
        summary = grpo.run(cfg)
    return {**meter.result(args.warmup, base), "rollouts": rollouts[args.warmup:],
            "trainable": summary["trainable_parameters"], "threads": torch.get_num_threads(),
            "settings": temper_settings(args.new_tokens)}


def run_trl(args) -> dict:
    import torch
    import transformers
    from transformers import TrainerCallback

    base = _import_everything()
    meter, rollouts = StepMeter(sample=False), []

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.training_begins()

        def on_step_end(self, args, state, control, **kwargs):  # after the optimiser step and zero_grad
            meter.step_ended()

    rows = read_rows(args.prompts)
    order = json.loads(args.order)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(args.model, [rows[i] for i in order], out, args.warmup + args.steps, args.new_tokens,
                              callbacks=[Meter()])
        model = trainer.model
        generate = model.generate

        def timed_generate(*a, **kw):
            start = time.perf_counter()
            ids = generate(*a, **kw)
            seconds = time.perf_counter() - start
            prompt = kw["input_ids"] if "input_ids" in kw else a[0]
            rollouts.append((seconds, (ids.shape[1] - prompt.shape[1]) * ids.shape[0]))
            return ids

        model.generate = timed_generate
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trainer.train()
    settings = {k: v for k, v in trl_settings(args.steps, args.new_tokens).items() if k != "max_steps"}
    return {**meter.result(args.warmup, base), "rollouts": rollouts[args.warmup:], "trainable": trainable,
            "threads": torch.get_num_threads(), "settings": settings,
            "versions": f"transformers {transformers.__version__}, trl {__import__('trl').__version__}, "
                        f"torch {torch.__version__}"}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens in every completion")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each side; the fastest is kept")
    ap.add_argument("--workdir", help="keep the world, tokenizer and model here (default: a temporary directory)")
    ap.add_argument("--only", choices=["temper", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--order", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        sys.exit("--warmup must be at least 1: a step's time is measured from the end of the one before")
    if args.only:
        result = run_temper(args) if args.only == "temper" else run_trl(args)
        print("RESULT " + json.dumps(result))
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this benchmark reads and resets the peak RSS through /proc (Linux)")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        steps_total = args.warmup + args.steps
        model_dir, _ = prepare(workdir, 1)
        prompts_path = write_prompts(workdir, steps_total)
        order = temper_order(steps_total, steps_total)
        prompt_lengths = check_same_prompts(model_dir, prompts_path, order, args.new_tokens)
        print(f"same work: {steps_total} prompts, identical chat-templated prompt ids on both sides, in temper's order "
              f"(prompt lengths {min(prompt_lengths)}-{max(prompt_lengths)} tokens)", flush=True)

        def run(side: str) -> dict:
            cmd = [sys.executable, __file__, "--only", side, "--model", str(model_dir), "--prompts", str(prompts_path),
                   "--order", json.dumps(order), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--new-tokens", str(args.new_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(line[7:])
            r["median"], r["mean"] = statistics.median(r["step_seconds"]), statistics.mean(r["step_seconds"])
            r["tokens"] = [n for _, n in r["rollouts"]]
            r["rollout_tps"] = statistics.median(n / s for s, n in r["rollouts"])
            r["rollout_s"] = statistics.median(s for s, _ in r["rollouts"])
            r["rss_mb"] = r["training_peak_mb"] - r["base_rss_mb"]
            return r

        results: dict[str, dict] = {}
        for _ in range(args.rounds):
            for side in ("temper", "trl"):
                r = run(side)
                print(f"  {side:6s} step median {r['median'] * 1000:6.0f} ms, mean {r['mean'] * 1000:6.0f} ms; rollout "
                      f"median {r['rollout_s'] * 1000:6.0f} ms, {r['rollout_tps']:.0f} tokens/s; training RSS peak "
                      f"+{r['rss_mb']:.0f} MB", file=sys.stderr, flush=True)
                if side not in results or r["median"] < results[side]["median"]:
                    results[side] = r

    t, h = results["temper"], results["trl"]
    expected = [G * args.new_tokens] * args.steps
    for side, r in results.items():
        if r["tokens"] != expected:
            sys.exit(f"not the same work: {side} generated {r['tokens']} completion tokens in the timed steps, "
                     f"expected {expected}")
    if t["trainable"] != h["trainable"]:
        sys.exit(f"not the same work: trainable parameters temper {t['trainable']} vs trl {h['trainable']}")
    print(f"temper settings: {' '.join(t['settings'])}")
    print(f"trl settings:    {json.dumps(h['settings'])}")
    print(f"\nllama-14m ({t['trainable'] / 1e6:.1f}M parameters) GRPO, 1 prompt x G={G} x {args.new_tokens} new tokens "
          f"a step (both sides generated {sum(t['tokens'])} completion tokens in the timed steps), {args.warmup} "
          f"warm-up + {args.steps} timed steps, fp32 CPU ({t['threads']} threads), no activation checkpointing, "
          f"best of {args.rounds} rounds; {h['versions']}")
    print("\n| | temper | TRL | ratio temper/TRL (time) | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| GRPO step, median (mean) | {t['median']:.3f} s ({t['mean']:.3f}) | {h['median']:.3f} s ({h['mean']:.3f}) | "
          f"{t['median'] / h['median']:.2f} | **{h['median'] / t['median']:.2f}x** |")
    print(f"| rollout ({G} x {args.new_tokens} tokens), median | {t['rollout_s']:.3f} s | {h['rollout_s']:.3f} s | "
          f"{t['rollout_s'] / h['rollout_s']:.2f} | {h['rollout_s'] / t['rollout_s']:.2f}x |")
    print(f"| rollout completion tokens/s, median | {t['rollout_tps']:.0f} | {h['rollout_tps']:.0f} | "
          f"{h['rollout_tps'] / t['rollout_tps']:.2f} | {t['rollout_tps'] / h['rollout_tps']:.2f}x |")
    print(f"| peak RSS while training, over imports | {t['rss_mb']:.0f} MB | {h['rss_mb']:.0f} MB | "
          f"{t['rss_mb'] / h['rss_mb']:.2f} | |")
    print(f"\nstep seconds: temper {[round(s, 3) for s in t['step_seconds']]}; "
          f"trl {[round(s, 3) for s in h['step_seconds']]}")


if __name__ == "__main__":
    main()
