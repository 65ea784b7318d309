"""Where the time of one step goes: a pretraining step or a decode step, per op family.

    python benchmarks/profile_step.py [--case pretrain|generate] [--precision fp32|bf16]
                                      [--batch 8] [--past 64] [--peer] [--json]

Cases (llama-14m, `temper.models.preset('llama-14m')`, random weights, seed 0):
- pretrain: one optimiser step as benchmarks/bench_pretrain.py's temper side runs it: batch 8 x
  256, `temper.losses.causal_lm_loss` (the fused chunked output-layer cross-entropy), backward,
  `clip_grad_norm_(foreach=True)`, the fused AdamW of `temper.train.optim.build_optimizer`,
  `zero_grad(set_to_none=True)`.
- generate: one greedy decode step of one token for --batch rows (8; 1 for the single-stream
  case) with a KV cache holding 64 + --past tokens (a 64-token prompt and --past tokens decoded
  so far: the shape of benchmarks/bench_generate.py half-way through its 128 new tokens): the
  model call with the cache, the fp32 next-token logits, argmax and the token ids to the host
  (what `temper.models.generate` does per token for an unpadded batch). The cache is set back to
  64 + --past slots before each step, so every step has the same shape.
- --peer: the same step with transformers' LlamaForCausalLM of the same shape (SDPA attention;
  pretraining with `labels=`, torch's default AdamW and clip, as bench_pretrain.py's peer;
  decoding with its DynamicCache, cropped back to 64 + --past before each step).
--precision bf16 is torch.autocast(cpu, bf16) around the forward and the loss, fp32 master weights.

How time is attributed. The step runs --warmup times, then --steps times without the profiler
(the step's wall time: the best of them), then --profile-steps times under torch.profiler
(record_shapes, with_flops, with_stack); the profiled step with the least op time is reported.
Every profiler event whose name is an operator ("aten::...", any "ns::op" but the autograd
engine's own records) contributes its *self* time (its duration less its children's), so each
microsecond of operator time is counted once; the families sum exactly to the total op time.
Each op gets a context:
- forward ops: the innermost enclosing region range, opened and closed by forward pre/post hooks
  this script registers (public module-hook API; the model's code is not touched) on the norms
  (class name with "RMSNorm"/"LayerNorm"), the rotary table module ("Rotary"), the attention
  module ("Attention"), the MLP ("MLP") and the body; plus ranges the script opens itself around
  the loss (`causal_lm_loss` and the division by the token count; for the peer, its forward
  outside the body) and around grad clip + optimiser step + zero_grad; whether an enclosing op
  is a matmul (linear/matmul/mm/addmm/bmm) or SDPA; and whether the Python stack (with_stack)
  passes through the rotary function (`apply_rotary`, HF's `apply_rotary_pos_emb`/`rotate_half`),
  which runs inside the attention module but has no module of its own.
- backward ops: the autograd node they run under (the enclosing
  "autograd::engine::evaluate_function: XBackward" event) carries the `sequence_nr` of the node;
  the forward op that created the node is the latest-starting forward event recorded with that
  sequence number (ops record the number the next node will get, so the creator is the last one
  to see it, and the ones before it are its parents, in the same context); the backward op
  inherits that forward op's context. Gradient accumulation into .grad (AccumulateGrad) is
  "other".
Family of an op, first rule that applies: in the optimiser range -> optimiser (+ grad clip);
inside SDPA -> attention; inside a matmul op or a matmul op itself -> matmuls, except the dtype
casts autocast makes there (-> copies); copy_/_to_copy/to/clone/contiguous -> copies and casts;
cat -> RoPE inside the rotary function, else copies (a KV cache appended by cat); in the rotary
function or the rotary table module -> RoPE; views/allocations -> other; in a norm -> norms; in the
MLP -> activations (SiLU * up); in the loss range -> cross-entropy (its exp, log-sum-exp, softmax
gradient; its matmuls are matmuls, its casts copies); anything else (embedding lookup and its
backward, argmax, AccumulateGrad's adds, ...) -> other.
Python/framework overhead = a step's duration - its summed op self times, both from the same
step run --profile-steps more times under a plain profiler (no stack tracing, no hooks; the
shortest kept): Python, module calls, the autograd engine between nodes, the allocator. Taken
within one step, a shared machine's load hits it and the op time alike; the other way (the wall
time of an unprofiled step - the op time of a profiled one) mixes two moments and goes negative
under load, so it is printed beside it only. The profiler's own per-op cost counts here (a few µs
per op): on a decode step of a few ms it is a visible part of the overhead row.
The table's 100% is op time + that overhead; the unprofiled wall time gives tokens/s.
Matmul efficiency: the FLOPs the profiler counts on the matmul ops (with_flops: mm/addmm/bmm)
over the matmul family's time, against `temper.train.engine.measure_matmul_peak` of the same
precision (a 1024^2 matmul); MFU (pretrain) is `flops_per_token` x tokens/s over that peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function

FAMILIES = {
    "matmul": "matmuls (mm/addmm/bmm/linear)",
    "attention": "attention (SDPA fwd+bwd)",
    "norm": "norms (RMSNorm fwd+bwd)",
    "rope": "RoPE (fwd+bwd)",
    "activation": "activations (SiLU * up)",
    "cross_entropy": "cross-entropy (fused chunked loss)",
    "optimiser": "optimiser + grad clip",
    "copies": "copies and dtype casts",
    "other": "other ops",
}
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul", "aten::addmv",
          "aten::mv", "aten::dot", "aten::_addmm_activation", "aten::addbmm"}
COPIES = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::_copy_from",
          "aten::_copy_from_and_resize"}
VIEWS = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t",
         "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::expand",
         "aten::expand_as", "aten::as_strided", "aten::narrow", "aten::detach", "aten::alias", "aten::view_as",
         "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::empty", "aten::empty_like",
         "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type", "aten::lift_fresh",
         "aten::resize_", "aten::_unsafe_split", "aten::_has_compatible_shallow_copy_type"}
ROPE_FUNCTIONS = ("apply_rotary", "apply_rotary_pos_emb", "rotate_half")
REGION = "region::"
STEP = "profile::step"


def is_op(event) -> bool:
    """An operator (its self time is kernel time), not a range, a Python function or an autograd
    engine record."""
    name = event.name
    return not event.is_python_function and "::" in name and not name.startswith(("autograd::", "torch::autograd::", REGION, "profile::"))


def is_sdpa(name: str) -> bool:
    return name.startswith(("aten::scaled_dot_product", "aten::_scaled_dot_product", "aten::_flash_attention",
                            "aten::_efficient_attention"))


def region_of(module: torch.nn.Module) -> str | None:
    """The region a module's forward opens (None: none), from its class name (temper's and HF's)."""
    name = type(module).__name__
    if "RMSNorm" in name or "LayerNorm" in name:
        return "norm"
    if "Rotary" in name:
        return "rope"
    if name.endswith("MLP"):
        return "mlp"
    if name.endswith("Attention"):
        return "attn"
    return None


@contextlib.contextmanager
def region_hooks(model: torch.nn.Module, body: torch.nn.Module):
    """Forward pre/post hooks that open and close a `region::<name>` range around the forward of
    each module with a region (and of `body`, as region::model); removed on exit."""
    handles = []

    def add(module, label):
        open_ranges: list = []

        def pre(mod, args):
            rf = record_function(REGION + label)
            rf.__enter__()
            open_ranges.append(rf)

        def post(mod, args, out):
            open_ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))

    for module in model.modules():
        label = "model" if module is body else region_of(module)
        if label is not None:
            add(module, label)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- attribution


class Context(NamedTuple):
    region: str  # innermost region range ("" outside every one)
    in_matmul: bool
    in_sdpa: bool
    in_rope_function: bool


def forward_context(event) -> Context:
    """A forward event's context, from its ancestors: region ranges, enclosing matmul / SDPA ops and
    the Python functions the profiler's stack tracing records as events (with_stack)."""
    region, in_matmul, in_sdpa, in_rope = "", False, False, False
    e = event
    while e is not None:
        if e.is_python_function:
            in_rope |= e.name.rstrip().endswith(ROPE_FUNCTIONS)
        elif not region and e.name.startswith(REGION):
            region = e.name[len(REGION):]
        else:
            in_matmul |= e.name in MATMUL
            in_sdpa |= is_sdpa(e.name)
        e = e.cpu_parent
    return Context(region, in_matmul, in_sdpa, in_rope)


def family_of(name: str, c: Context) -> str:
    """The one family of an op named `name` in context `c` (the rules of the module docstring)."""
    if c.region == "optim":
        return "optimiser"
    if c.in_sdpa or is_sdpa(name):
        return "attention"
    if name in COPIES:
        return "copies"
    if c.in_matmul or name in MATMUL:
        return "matmul"
    if name == "aten::cat":
        return "rope" if c.in_rope_function else "copies"
    if c.in_rope_function or c.region == "rope":
        return "rope"
    if name in VIEWS:
        return "other"
    return {"norm": "norm", "mlp": "activation", "loss": "cross_entropy"}.get(c.region, "other")


def _node_of(event):
    """The autograd node (evaluate_function event) an op runs under, or None in the forward."""
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return e
        e = e.cpu_parent
    return None


def attribute(events) -> list[dict]:
    """Per profiled step: {family: µs}, {family: backward µs}, op total µs, flops on matmul ops,
    the profiled step's duration µs, per-(family, region) µs and per-op µs."""
    events = list(events)
    steps = sorted((e for e in events if e.name == STEP), key=lambda e: e.time_range.start)
    nodes = {id(e): _node_of(e) for e in events if is_op(e)}
    creator: dict[int, object] = {}  # sequence_nr -> the forward event that created that node
    for e in events:
        if e.sequence_nr is not None and e.sequence_nr >= 0 and not e.name.startswith(
                ("autograd::", "torch::autograd::")) and _node_of(e) is None and "Backward" not in e.name:
            if e.sequence_nr not in creator or e.time_range.start >= creator[e.sequence_nr].time_range.start:
                creator[e.sequence_nr] = e
    contexts: dict[int, Context] = {}

    def context_of(e) -> tuple[Context, bool]:
        node = nodes[id(e)]
        if node is None:
            return forward_context(e), False
        if "AccumulateGrad" in node.name:
            return Context("accumulate_grad", False, False, False), True
        fwd = creator.get(node.sequence_nr)
        if fwd is None:
            return Context("unmapped", False, False, False), True
        if id(fwd) not in contexts:
            contexts[id(fwd)] = forward_context(fwd)
        return contexts[id(fwd)], True

    out = []
    for step in steps:
        lo, hi = step.time_range.start, step.time_range.end
        fam, back, by_region, by_op = defaultdict(float), defaultdict(float), defaultdict(float), defaultdict(float)
        flops = 0.0
        total = 0.0
        for e in events:
            if not is_op(e) or not lo <= e.time_range.start <= hi:
                continue
            c, backward = context_of(e)
            f = family_of(e.name, c)
            t = e.self_cpu_time_total
            fam[f] += t
            total += t
            if backward:
                back[f] += t
            by_region[f"{f}|{c.region or '-'}"] += t
            by_op[f"{e.name}|{f}|{c.region or '-'}|{'bwd' if backward else 'fwd'}"] += t
            if f == "matmul":
                flops += float(getattr(e, "flops", 0) or 0)
        out.append({"families_us": dict(fam), "backward_us": dict(back), "op_total_us": total,
                    "matmul_flops": flops, "profiled_step_us": hi - lo, "by_region_us": dict(by_region),
                    "by_op_us": dict(by_op)})
    return out


def profile_steps(step: Callable[[], None], model, body, n: int) -> list[dict]:
    """Run `step` n times under the profiler, with the region hooks on; the attribution of each."""
    with region_hooks(model, body), profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                                           with_flops=True, with_stack=True) as prof:
        for _ in range(n):
            with record_function(STEP):
                step()
    return attribute(prof.events())


def framework_gaps(step: Callable[[], None], n: int) -> list[tuple[float, float]]:
    """(step duration, duration - summed op self times) in µs for n steps under a plain profiler
    (no stack tracing, no hooks): the time of a step outside its operators, measured within the
    same step as its op time (a shared machine's load hits both alike)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            with record_function(STEP):
                step()
    events = list(prof.events())
    out = []
    for s in (e for e in events if e.name == STEP):
        lo, hi = s.time_range.start, s.time_range.end
        ops = sum(e.self_cpu_time_total for e in events if is_op(e) and lo <= e.time_range.start <= hi)
        out.append((hi - lo, hi - lo - ops))
    return out


# ----------------------------------------------------------------------------- the steps


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def build_temper(args):
    from temper.models import build_model, preset

    torch.manual_seed(0)
    return build_model(preset(args.preset, max_seq_len=max(1024, args.seq_len + 1, 64 + args.past + 1)))


def build_peer(args):
    import transformers

    from temper.models.hf import config_to_hf

    torch.manual_seed(0)
    from temper.models import preset

    config = preset(args.preset, max_seq_len=max(1024, args.seq_len + 1, 64 + args.past + 1))
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                         if k not in ("architectures", "model_type")})
    return transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")


def pretrain_step(args):
    """(step function, model, body, tokens per step, flops per token)."""
    from temper.train.engine import flops_per_token

    temper_model = build_temper(args)
    flops, vocab = flops_per_token(temper_model, args.seq_len), temper_model.config.vocab_size
    data = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    if args.peer:
        model = build_peer(args).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = data[:, :-1]

        def step():
            with autocast(args.precision), record_function(REGION + "loss"):
                loss = model(input_ids=ids, labels=ids.clone()).loss
            loss.backward()
            with record_function(REGION + "optim"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step, model, model.model, args.batch * args.seq_len, flops

    from temper.config import OptimConfig
    from temper.losses import causal_lm_loss
    from temper.train.optim import build_optimizer

    model = temper_model.train()
    opt = build_optimizer(model, OptimConfig(lr=1e-4, fused=True))

    def step():
        with autocast(args.precision), record_function(REGION + "loss"):
            loss_sum, n = causal_lm_loss(model, data[:, :-1], data[:, 1:])
            loss = loss_sum / n
        loss.backward()
        with record_function(REGION + "optim"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step, model, model, args.batch * args.seq_len, flops


def decode_step(args):
    """(step function, model, body, tokens per step, None): one token for each of --batch rows
    after 64 + --past cached tokens; the cache is set back to that length before each step."""
    filled = 64 + args.past
    model = (build_peer(args) if args.peer else build_temper(args)).eval()
    prompt = torch.randint(3, model.config.vocab_size, (args.batch, filled), generator=torch.Generator().manual_seed(1))
    if args.peer:
        import warnings

        from transformers import DynamicCache

        warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated")

        cache = DynamicCache(config=model.config)
        with torch.no_grad(), autocast(args.precision):
            logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1]
        next_ids = [logits.float().argmax(-1)]

        def step():
            cache.crop(-(cache.get_seq_length() - filled))  # negative: drop that many of the last tokens
            with torch.no_grad(), autocast(args.precision):
                out = model(input_ids=next_ids[0][:, None], past_key_values=cache, use_cache=True)
                next_ids[0] = out.logits[:, -1].float().argmax(-1)
            next_ids[0].tolist()
        return step, model, model.model, args.batch, None

    cache = model.new_cache(args.batch, filled + 1)
    with torch.no_grad(), autocast(args.precision):
        logits = model(prompt, cache=cache, last_only=True)[:, -1]
    next_ids = [logits.float().argmax(-1)]

    def step():
        cache.length = filled
        with torch.no_grad(), autocast(args.precision):
            logits = model(next_ids[0][:, None], cache=cache)[:, -1].float()
            next_ids[0] = logits.argmax(-1)
        next_ids[0].tolist()
    return step, model, model, args.batch, None


# ----------------------------------------------------------------------------- the report


def measure(args) -> dict:
    from temper.train.engine import measure_matmul_peak

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = measure_matmul_peak(torch.device("cpu"), dtype, seconds=2.0, size=1024, trials=10)
    step, model, body, tokens, flops_per_token = (pretrain_step if args.case == "pretrain" else decode_step)(args)
    for _ in range(args.warmup):
        step()
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    wall_us = min(walls) * 1e6
    profiled = profile_steps(step, model, body, args.profile_steps)
    best = min(profiled, key=lambda p: p["op_total_us"])
    gap_us = min(framework_gaps(step, args.profile_steps))[1]  # the gap of the shortest plain-profiled step
    families = {f: best["families_us"].get(f, 0.0) for f in FAMILIES}
    matmul_us = families["matmul"]
    result = {
        "side": "transformers" if args.peer else "temper", "case": args.case, "precision": args.precision,
        "preset": args.preset, "batch": args.batch,
        "seq_len": args.seq_len if args.case == "pretrain" else 1,
        "cached_tokens": None if args.case == "pretrain" else 64 + args.past,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "wall_ms": wall_us / 1e3, "wall_ms_all": [w * 1e3 for w in walls],
        "profiled_step_ms": best["profiled_step_us"] / 1e3, "op_total_ms": best["op_total_us"] / 1e3,
        "families_ms": {f: t / 1e3 for f, t in families.items()},
        "backward_ms": {f: best["backward_us"].get(f, 0.0) / 1e3 for f in FAMILIES},
        "overhead_ms": gap_us / 1e3, "wall_minus_ops_ms": (wall_us - best["op_total_us"]) / 1e3,
        "accounted_ms": (best["op_total_us"] + gap_us) / 1e3,
        "tokens_per_s": tokens / (wall_us / 1e6),
        "matmul_peak_gflops": peak / 1e9,
        "matmul_gflops": best["matmul_flops"] / matmul_us / 1e3 if matmul_us else 0.0,
        "matmul_flops_per_step": best["matmul_flops"],
        "mfu": flops_per_token * tokens / (wall_us / 1e6) / peak if flops_per_token else None,
        "by_region_ms": {k: v / 1e3 for k, v in sorted(best["by_region_us"].items(), key=lambda kv: -kv[1])},
        "top_ops_ms": {k: v / 1e3 for k, v in sorted(best["by_op_us"].items(), key=lambda kv: -kv[1])[:args.top]},
    }
    return result


def markdown(r: dict) -> str:
    wall = r["accounted_ms"]
    what = (f"pretraining step, batch {r['batch']} x {r['seq_len']}" if r["case"] == "pretrain"
            else f"decode step, batch {r['batch']}, {r['cached_tokens']} cached tokens")
    lines = [f"### {r['side']}: {what}, {r['precision']} ({r['preset']}, {r['threads']} threads, torch {r['torch']})",
             "", "| family | ms per step | share of step |" + (" of which backward (ms) |" if r["case"] == "pretrain"
                                                                 else ""),
             "| --- | ---: | ---: |" + (" ---: |" if r["case"] == "pretrain" else "")]
    for f, label in FAMILIES.items():
        t = r["families_ms"][f]
        row = f"| {label} | {t:.2f} | {t / wall:.1%} |"
        if r["case"] == "pretrain":
            row += f" {r['backward_ms'][f]:.2f} |"
        lines.append(row)
    extra = " |" if r["case"] == "pretrain" else ""
    lines.append(f"| Python/framework overhead (step - op time) | {r['overhead_ms']:.2f} | "
                 f"{r['overhead_ms'] / wall:.1%} |{extra}")
    lines.append(f"| **step (ops + overhead)** | **{wall:.2f}** | 100% |{extra}")
    lines.append("")
    mm_share = r["families_ms"]["matmul"] / wall
    lines.append(f"step wall time without the profiler {r['wall_ms']:.2f} ms (that - op time = "
                 f"{r['wall_minus_ops_ms']:.2f} ms), tokens/s {r['tokens_per_s']:,.0f}; "
                 f"measured {r['precision']} matmul peak "
                 f"{r['matmul_peak_gflops']:.1f} GFLOP/s; matmuls take {mm_share:.1%} of the step and run at "
                 f"{r['matmul_gflops']:.1f} GFLOP/s = {r['matmul_gflops'] / r['matmul_peak_gflops']:.1%} of the peak"
                 + (f"; MFU {r['mfu']:.1%}" if r["mfu"] is not None else "") + ".")
    lines.append("")
    lines.append("Largest ops (op | family | region | fwd/bwd | ms): " + "; ".join(
        f"{k.replace('|', ' | ')} {v:.2f}" for k, v in list(r["top_ops_ms"].items())[:8]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["pretrain", "generate"], default="pretrain")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--preset", default="llama-14m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256, help="pretraining sequence length")
    ap.add_argument("--past", type=int, default=64, help="generate: tokens decoded after the 64-token prompt")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="unprofiled steps (default 3 pretrain, 20 generate)")
    ap.add_argument("--profile-steps", type=int, default=None, help="profiled steps (default 2 / 10)")
    ap.add_argument("--top", type=int, default=15, help="largest ops kept in the JSON")
    ap.add_argument("--peer", action="store_true", help="transformers' LlamaForCausalLM instead of temper")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is None:
        args.steps = 3 if args.case == "pretrain" else 20
    if args.profile_steps is None:
        args.profile_steps = 2 if args.case == "pretrain" else 10
    result = measure(args)
    print(json.dumps(result) if args.json else markdown(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
