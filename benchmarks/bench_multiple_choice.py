"""Multiple-choice scoring speed on the world's facts task: shared-context KV cache vs naive.

    python benchmarks/bench_multiple_choice.py [--few-shot 5 --rows 120 --device cpu]

Writes a built-in world (temper.data.world), trains a 2048-token BPE tokenizer on its
pretraining corpus, builds a random llama-3m with that vocabulary, and scores the
world_facts_mc task (temper/configs/tasks/world_facts_mc.yaml, 4 choices per question) twice:
with the context run once and its KV cache shared by the batch of choices, and naively
(every context + choice from scratch). Prints examples/s of both and the ratio, after
checking that the two give the same accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--few-shot", type=int, default=5, help="few-shot examples before every question")
    ap.add_argument("--rows", type=int, default=120, help="questions scored per run")
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs each")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from temper.data.readers import iter_texts
    from temper.data.tokenizer import train_tokenizer
    from temper.data.world import WorldConfig, build_world, write_world
    from temper.eval.tasks import load_task, resolve_task, run_task
    from temper.models import build_model, preset

    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        write_world(build_world(WorldConfig()), world)
        tokenizer = train_tokenizer(iter_texts(world / "pretrain" / "train.jsonl"), vocab_size=2048)
        torch.manual_seed(0)
        model = build_model(preset("llama-3m", vocab_size=2048)).to(args.device).eval()
        task_file = resolve_task("world_facts_mc")  # shipped in the package: temper/configs/tasks
        task = dataclasses.replace(load_task(task_file), few_shot=args.few_shot, limit=args.rows)
        task.base_dir = str(task_file.parent)

        def run(use_cache: bool) -> tuple[float, dict]:
            best, out = float("inf"), {}
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = run_task(model, tokenizer, task, world_dir=world, use_cache=use_cache)
                best = min(best, time.perf_counter() - start)
            return out["examples"] / best, out

        run(True)  # warm-up of both (CPU kernels are tuned per sequence length on first use)
        run(False)
        cached_eps, cached = run(True)
        naive_eps, naive = run(False)
        assert cached["acc"] == naive["acc"] and cached["acc_norm"] == naive["acc_norm"], (cached, naive)
        print(f"world_facts_mc, llama-3m (random), {cached['examples']} questions x 4 choices, "
              f"{args.few_shot}-shot, device {args.device}, {torch.get_num_threads()} threads")
        print(f"  shared-context cache: {cached_eps:8.1f} examples/s  (acc {cached['acc']:.3f}, "
              f"acc_norm {cached['acc_norm']:.3f})")
        print(f"  naive (from scratch): {naive_eps:8.1f} examples/s")
        print(f"  ratio cached/naive:   {cached_eps / naive_eps:8.2f}x")


if __name__ == "__main__":
    main()
