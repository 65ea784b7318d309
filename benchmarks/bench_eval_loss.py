"""The output-layer loss when no gradient is needed (evaluation) or only some (PEFT), one command.

    python benchmarks/bench_eval_loss.py [--preset llama-14m --batch 8 --seq-len 256 --repeats 5 --parts 123]

1. Evaluation: `temper.eval.perplexity.evaluate_batches` (the model's hidden states + the
   fused, chunked cross-entropy, under no_grad) vs transformers `LlamaForCausalLM(labels=)`
   under no_grad with the same weights (built by transformers, loaded into temper through
   its HF converter); the script first checks both give the same mean loss.
2. The loss alone under no_grad, on the same (tokens, hidden) x vocab shape:
   `fused_linear_cross_entropy` vs `F.cross_entropy(hidden @ W.T, reduction="sum")`.
3. A PEFT-like training step (LoRA r=8 on every linear layer, base and the tied lm_head
   frozen; forward + backward): `causal_lm_loss` vs the same model's full logits +
   `F.cross_entropy`.

Each pair alternates its two sides --repeats times after a warm-up and keeps each side's
best. `--baseline-clm OLD/temper/losses/clm.py` adds a third side to each: the same
measurement with another version of the loss, in the same process. Run it with PYTHONPATH
pointing at another checkout to time that checkout's temper as a whole.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F


def best_of(repeats: int, *fns) -> list[float]:
    """Best wall time of each fn, alternating them so a noisy machine's drifts hit all alike."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def report(title: str, tokens: int, names: list[str], times: list[float]) -> None:
    """tokens/s of each side and the speed ratio of the first side to each other one."""
    print(title)
    for name, t in zip(names, times):
        print(f"  {name:36s} {tokens / t:10,.0f} tokens/s  ({t * 1e3:7.1f} ms)")
    for name, t in zip(names[1:], times[1:]):
        print(f"  speed ratio {names[0]} / {name}: {t / times[0]:.2f}x")


def load_baseline(path: str):
    """Another version of temper/losses/clm.py (e.g. the parent commit's), as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_clm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-14m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="123", help="which of the three measurements to run")
    ap.add_argument("--baseline-clm", help="a clm.py to time beside this checkout's, in the same process")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import temper
    from temper.config import PeftConfig
    from temper.eval import perplexity
    from temper.losses import IGNORE_INDEX, causal_lm_loss, fused_linear_cross_entropy
    from temper.models import load_model, preset
    from temper.models.hf import config_to_hf
    from temper.peft import apply_peft

    torch.manual_seed(0)
    config = preset(args.preset, max_seq_len=max(args.seq_len, 512))
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                         if k not in ("architectures", "model_type")})
    hf = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = load_model(d, dtype=torch.float32).eval()
    cpu = torch.device("cpu")
    data = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1))
    inputs, targets = data[:, :-1], data[:, 1:].clone()
    # transformers' labels= shifts inside and ignores the last position: give temper the same targets
    targets[:, -1] = IGNORE_INDEX
    tokens = args.batch * args.seq_len
    baseline = load_baseline(args.baseline_clm) if args.baseline_clm else None
    print(f"temper from {temper.__file__}" + (f"; baseline loss from {args.baseline_clm}" if baseline else ""))
    print(f"{args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, hidden "
          f"{config.hidden_size}, vocab {config.vocab_size}), batch {args.batch} x {args.seq_len}, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")

    # 1. evaluation -----------------------------------------------------------------------------
    def temper_eval(loss_fn=fused_linear_cross_entropy):
        perplexity.fused_linear_cross_entropy = loss_fn  # the baseline's loss in the same evaluation loop
        try:
            out = perplexity.evaluate_batches(model, [(inputs, targets)], device=cpu)
        finally:
            perplexity.fused_linear_cross_entropy = fused_linear_cross_entropy
        # evaluate_batches divides by targets.numel(), ignored positions included: mean over real targets
        return out["val_loss"] * out["val_tokens"] / int((targets != IGNORE_INDEX).sum())

    def hf_eval():
        with torch.no_grad():
            return hf(input_ids=inputs, labels=inputs).loss.item()

    if "1" in args.parts:
        a, b = temper_eval(), hf_eval()
        assert abs(a - b) < 1e-4 * abs(b), f"not the same computation: temper {a} vs transformers {b}"
        sides = {"temper evaluate_batches": temper_eval, "transformers labels=": hf_eval}
        if baseline:
            sides["temper evaluate_batches (baseline)"] = lambda: temper_eval(baseline.fused_linear_cross_entropy)
        report(f"1. evaluation under no_grad (mean loss {a:.4f} both sides)", tokens, list(sides),
               best_of(args.repeats, *sides.values()))

    # 2. the loss alone -------------------------------------------------------------------------
    with torch.no_grad():
        hidden = model(inputs, return_hidden=True)  # (B, T, C)
    weight, flat_t = model.lm_head.weight, targets.reshape(-1)

    def fused_loss():
        with torch.no_grad():
            return fused_linear_cross_entropy(hidden, weight, targets)

    def full_logits_loss():
        with torch.no_grad():
            logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()  # (N, V)
            return F.cross_entropy(logits, flat_t, reduction="sum", ignore_index=IGNORE_INDEX)

    if "2" in args.parts:
        torch.testing.assert_close(fused_loss(), full_logits_loss(), rtol=1e-5, atol=1e-2)
        sides = {"fused_linear_cross_entropy": fused_loss, "F.cross_entropy(full logits)": full_logits_loss}
        if baseline:
            def baseline_loss():
                with torch.no_grad():
                    return baseline.fused_linear_cross_entropy(hidden, weight, targets)
            sides["fused_linear_cross_entropy (baseline)"] = baseline_loss
        report("2. output-layer loss alone under no_grad", tokens, list(sides), best_of(args.repeats, *sides.values()))

    if "3" not in args.parts:
        return
    # 3. PEFT-like training step ------------------------------------------------------------------
    model.train()
    apply_peft(model, PeftConfig(method="lora", r=8, target_modules=["all-linear"]))
    assert not model.lm_head.weight.requires_grad

    def step_fused(loss_fn=causal_lm_loss):
        loss_sum, n = loss_fn(model, inputs, targets)
        (loss_sum / n).backward()
        model.zero_grad(set_to_none=True)

    def step_full_logits():
        logits = model(inputs)  # (B, T, V)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_t, ignore_index=IGNORE_INDEX).backward()
        model.zero_grad(set_to_none=True)

    sides = {"causal_lm_loss (fused)": step_fused, "full logits + F.cross_entropy": step_full_logits}
    if baseline:
        sides["causal_lm_loss (baseline)"] = lambda: step_fused(baseline.causal_lm_loss)
    report("3. PEFT step (LoRA r=8 all-linear, frozen tied lm_head): forward + backward", tokens, list(sides),
           best_of(args.repeats, *sides.values()))


if __name__ == "__main__":
    main()
