"""The memory planner against measured peaks of real temper runs, and against torchtitan's published one.

    python benchmarks/bench_estimate.py            # every plan (5-15 minutes on 2 CPU cores)
    python benchmarks/bench_estimate.py --plans full,lora

Each plan runs in a fresh process: temper's own training step (`build_model`, `apply_peft`,
`build_optimizer`, `causal_lm_loss`, `engine.accumulate`, `engine.optimizer_step`, as the
recipes call them) on a 27M-parameter Llama (and, for the last plans, llama-14m and a
4-layer GPT-2), one step to create the optimiser state, then the same step twice more: once
watching the resident set, once under `torch.profiler` with `profile_memory=True`. The
measured peak is every tensor alive when the step starts (found with `gc`) plus the highest
count of bytes the CPU allocator reports as allocated during the step. That is torch's tensor
memory, the CPU counterpart of `torch.cuda.max_memory_allocated`, free of the ~300 MB of
Python, torch libraries and allocator slack that a process's RSS also holds. The RSS check
adds the resident set's growth during the same work (peak reset through /proc/self/clear_refs,
glibc's mmap threshold fixed so freed blocks go back at once) to the same starting tensors: a
second, independent measurement. The inference plans generate with temper's KV cache.

The planner's prediction for the same shape and settings comes from `temper.train.memory`,
the code behind `temper estimate`. The last table sets the planner against torchtitan's
published Llama 3.1 8B FSDP peak (benchmarks/llama3_h100_202412_torchtitan.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# a 27M-parameter Llama: big enough that activations and model states are both well above noise
MODEL = ("llama-14m", dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                           vocab_size=8192, max_seq_len=1024))
NEW_TOKENS = 8  # generated after prompts that fill the rest of the context

# name -> settings (the planner's Plan fields), the model (preset, overrides), and what is shown
PLANS: dict[str, dict] = {
    "full": dict(method="full", dtype="fp32"),  # what `temper pretrain` runs on a CPU
    "full+ac": dict(method="full", dtype="fp32", activation_checkpointing="full"),
    "full-bf16": dict(method="full", dtype="bf16"),  # the model cast to bf16, bf16 AdamW states
    "lora": dict(method="lora", dtype="fp32"),  # `temper sft peft.method=lora`, rank 16 on all linears
    "qlora": dict(method="qlora", dtype="fp32"),  # an NF4 base computing in fp32, as on a CPU
    "inference": dict(method="full", dtype="fp32", inference=True, batch=8, context=1024),  # the KV cache
    # other shapes, checked with the same formulas
    "14m+ac 2x1024": dict(method="full", dtype="fp32", activation_checkpointing="full", micro_batch=2, seq_len=1024,
                          model=("llama-14m", {})),
    "gpt2-4l 4x512": dict(method="full", dtype="fp32", micro_batch=4, seq_len=512,
                          model=("gpt2", dict(num_layers=4, max_seq_len=1024))),
    "gpt2-4l infer": dict(method="full", dtype="fp32", inference=True, batch=4, context=512,
                          model=("gpt2", dict(num_layers=4, max_seq_len=1024))),
}


def plan_of(name: str):
    """(model shape, Plan) of a benchmark plan."""
    from temper.models.registry import preset
    from temper.train.memory import Plan

    settings = dict(PLANS[name])
    base, overrides = settings.pop("model", MODEL)
    settings = {"micro_batch": 8, "seq_len": 256, "lora_r": 16, "mixed_precision": False, **settings}
    return preset(base, **overrides), Plan(**settings)


def predict(name: str) -> tuple[int, dict]:
    from temper.train.memory import inference_memory, training_memory

    config, plan = plan_of(name)
    result = inference_memory(config, plan) if plan.inference else training_memory(config, plan)
    parts = {k: getattr(result, k) for k in ("weights", "gradients", "optimizer", "activations", "temporaries",
                                              "kv_cache")}
    return result.peak, parts


# ----------------------------------------------------------------------------- the measuring process


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive now."""
    import warnings

    import torch

    gc.collect()
    storages = {}
    warnings.simplefilter("ignore")  # looking at every object touches deprecated module attributes
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                st = obj.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: S112 - objects that only look like tensors
            continue
    return sum(storages.values())


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def rss_growth(fn) -> int | None:
    """How far the resident set grows above its level at the start while `fn` runs: the peak RSS
    is reset through /proc/self/clear_refs (Linux), and the parent runs this process with a fixed
    glibc mmap threshold, so large freed blocks go back to the system at once."""
    try:
        start = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    fn()
    return _status_bytes("VmHWM") - start


def profiled_peak(fn) -> int:
    """The highest number of bytes the CPU allocator reports allocated while `fn` runs, counted
    from zero at its start."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


def measure(name: str) -> dict:
    import torch

    from temper.config import OptimConfig, PeftConfig
    from temper.losses import causal_lm_loss
    from temper.models import build_model
    from temper.train import engine
    from temper.train.optim import build_optimizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config, plan = plan_of(name)
    model = build_model(config, dtype=plan.dtype)
    if plan.inference:
        from temper.models.generate import SamplingConfig, generate

        model.eval()
        prompts = torch.randint(0, config.vocab_size, (plan.batch, plan.context - NEW_TOKENS)).tolist()
        sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0)
        generate(model, [p[:32] for p in prompts], SamplingConfig(max_new_tokens=2))  # warm the kernels
        start = live_tensor_bytes()
        growth = rss_growth(lambda: generate(model, prompts, sampling))
        peak = profiled_peak(lambda: generate(model, prompts, sampling))
        return {"start": start, "peak": start + peak, "rss_growth": growth}
    if plan.method != "full":
        from temper.peft import apply_peft

        apply_peft(model, PeftConfig(method=plan.method, r=plan.lora_r, alpha=32.0, target_modules=["all-linear"]))
    if plan.activation_checkpointing == "full":
        engine.apply_activation_checkpointing(model)
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.0))
    inputs = torch.randint(0, config.vocab_size, (plan.micro_batch, plan.seq_len))
    targets = torch.randint(0, config.vocab_size, (plan.micro_batch, plan.seq_len))

    def step() -> None:
        engine.accumulate(model, [(inputs, targets)], lambda b: causal_lm_loss(model, b[0], b[1]),
                          autocast=engine.precision_context("fp32", torch.device("cpu")))
        engine.optimizer_step(model, optimizer, grad_clip=1.0)

    step()  # the optimiser state exists from the first step on
    start = live_tensor_bytes()
    growth = rss_growth(step)
    peak = profiled_peak(step)
    return {"start": start, "peak": start + peak, "rss_growth": growth}


# ----------------------------------------------------------------------------- the published comparison


def torchtitan_rows() -> list[tuple[str, float, float, dict]]:
    """torchtitan's Llama 3.1 8B FSDP runs (H100, local batch 2, seq 8192, bf16 mixed precision with
    fp32 reduction, per-op selective activation checkpointing, unfused fp32 cross-entropy, AdamW),
    published as max reserved GiB: (label, published GiB, predicted GiB, parts)."""
    from temper.train.memory import SHAPES, Plan, training_memory

    rows = []
    for gpus, published in ((8, 82.4), (128, 67.0)):
        plan = Plan(method="full", dtype="bf16", mixed_precision=True, zero=3, dp=gpus, micro_batch=2, seq_len=8192,
                    activation_checkpointing="selective", cross_entropy="full")
        result = training_memory(SHAPES["llama3.1-8b"], plan)
        parts = {k: getattr(result, k) / 2**30 for k in ("weights", "gradients", "optimizer", "activations",
                                                           "temporaries")}
        rows.append((f"FSDP, {gpus} GPUs (table {1 if gpus == 8 else 3}, eager)", published, result.peak / 2**30, parts))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: measure one plan, print JSON
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    names = args.plans.split(",")
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        sys.exit(f"unknown plan {unknown[0]!r}; plans: {', '.join(PLANS)}")
    from temper.train.memory import parameter_counts

    shape, _ = plan_of("full")
    print(f"plans: a Llama of {parameter_counts(shape).total / 1e6:.1f}M parameters (hidden {shape.hidden_size}, "
          f"{shape.num_layers} layers, {shape.num_heads}/{shape.num_kv_heads} heads, intermediate "
          f"{shape.intermediate_size}, vocab {shape.vocab_size}, tied), micro-batch 8 x 256 tokens, AdamW, fp32 unless "
          "named; inference: batch x context tokens of KV cache, 8 generated; then llama-14m and a 4-layer GPT-2 "
          f"({parameter_counts(plan_of('gpt2-4l 4x512')[0]).total / 1e6:.1f}M, vocab 50257). torch "
          f"{_torch_version()}, CPU, 2 threads")
    print("measured: tensors alive at the start + the CPU allocator's peak during the step (torch.profiler); "
          "RSS check: tensors alive at the start + the growth of the resident set during the same work\n")
    print("| plan | shape | predicted MiB | measured MiB | error | RSS check MiB | predicted parts (MiB) |")
    print("|---|---|---:|---:|---:|---:|---|")
    errors = []
    for name in names:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run([sys.executable, __file__, "--measure", name], capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        measured = result["peak"]
        rss = "n/a" if result["rss_growth"] is None else f"{(result['start'] + result['rss_growth']) / 2**20:,.1f}"
        predicted, parts = predict(name)
        error = (predicted - measured) / measured
        errors.append(abs(error))
        shown = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in parts.items() if v)
        _, plan = plan_of(name)
        shape = f"{plan.batch} x {plan.context}" if plan.inference else f"{plan.micro_batch} x {plan.seq_len}"
        print(f"| {name} | {shape} | {predicted / 2**20:,.1f} | {measured / 2**20:,.1f} | {error:+.1%} | {rss} | "
              f"{shown} |", flush=True)
    print(f"\nlargest error: {max(errors):.1%} (aim: within 15%)\n")
    print("torchtitan, Llama 3.1 8B, 8 or 128 H100s, FSDP (ZeRO-3), local batch 2 x 8192 tokens, bf16/fp32 mixed "
          "precision, selective (per-op) activation checkpointing, AdamW; published: max reserved memory")
    print("(pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, tables 1 and 3, row 'FSDP')\n")
    print("| run | published GiB | predicted GiB | difference | predicted parts (GiB) |")
    print("|---|---:|---:|---:|---|")
    for label, published, predicted, parts in torchtitan_rows():
        shown = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        print(f"| {label} | {published:.1f} | {predicted:.1f} | {(predicted - published) / published:+.1%} | {shown} |")


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
