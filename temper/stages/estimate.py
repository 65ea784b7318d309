"""Plan memory and compute before a run: what each device holds for training (weights,
gradients, optimiser states, activations, temporaries) or inference (weights, KV cache; an encoder:
one forward pass, no KV cache), and
the Chinchilla-optimal tokens, FLOPs and time of training the model.

    temper estimate model=llama-14m                        # a temper preset: full fine-tuning, bf16 mixed precision
    temper estimate model=7b method=qlora                  # a bare count: a Llama-2-like shape of 7B parameters
    temper estimate model=llama3.1-8b strategy=fsdp dp=8 micro_batch=2 seq_len=8192
    temper estimate model=runs/pretrain inference=true batch=8 context=4096
    temper estimate model=70b method=lora format=json      # JSON on stdout, every size in bytes

`model` is a preset (temper's, or a published shape: llama2-7b, llama2-13b, llama2-70b,
llama3.1-8b, llama3.1-70b, llama3.1-405b), a model directory (only config.json is read) or a
parameter count (`7b`, `350m`, `8e9`: the scaled shape is described in
`temper.train.memory.scaled_llama`). Nothing is downloaded and no weights are loaded. How each
part is counted, and how the counts were checked against measured runs, is in docs/memory.md.
"""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import yaml

from temper.config import OnlyWith, check_range, opt
from temper.errors import TemperError
from temper.runtime import resolve_device
from temper.train import memory
from temper.train.engine import measure_matmul_peak, resolve_precision
from temper.train.rundir import read_metrics

TRAINING_KEYS = ("micro_batch", "seq_len", "grad_accum", "activation_checkpointing", "cross_entropy", "loss_chunk",
                 "packing",
                 "optimizer", "mixed_precision", "zero", "strategy", "reshard_after_forward", "dp", "mfu",
                 "peak_tflops", "gpus", "tokens", "tokens_per_param", "mfu_from")
GPU_MEMORY_GIB = {"h100": 80, "h200": 141, "a100": 80}


@dataclass
class Config:
    model: str = opt("", "a preset (llama-14m, llama3.1-8b, ...), a model directory, or a parameter count (7b, 8e9)")
    model_config: dict = opt({}, "override shape fields, e.g. model_config.num_layers=48")
    method: Literal["full", "lora", "qlora"] = opt("full", "full fine-tuning, LoRA on a frozen base, or LoRA on an NF4 base")
    dtype: Literal["fp32", "bf16", "fp16"] = opt("bf16", "dtype of the weights (and of the compute)")
    mixed_precision: bool | None = opt(None, "fp32 master weights and optimiser states beside bf16/fp16 weights "
                                             "(null: on for full fine-tuning in bf16/fp16)")
    optimizer: Literal["adamw", "adamw8bit", "sgd"] = opt("adamw", "AdamW (2 states), 8-bit AdamW, SGD with momentum")
    zero: int = opt(0, "ZeRO stage: 1 shards optimiser states over dp, 2 also gradients, 3 also weights")
    strategy: Literal["ddp", "fsdp"] | None = opt(None, "ddp (= zero=0) or fsdp (= zero=3; with "
                                                        "reshard_after_forward=false, zero=2)")
    reshard_after_forward: bool | None = opt(None, "fsdp: free gathered weights after the forward pass (null: true)")
    dp: int = opt(1, "data-parallel devices the states are sharded over")
    tp: int = opt(1, "tensor-parallel devices (with sequence parallelism)")
    micro_batch: int = opt(1, "sequences per device per forward pass")
    seq_len: int = opt(0, "tokens per training sequence (0: the model's context, at most 2048)")
    grad_accum: int = opt(1, "micro-batches per optimiser step (above 1, gradients live beside the activations)")
    activation_checkpointing: bool | str = opt(False, "true: keep only each block's input and recompute the rest; "
                                                      "selective: torchtitan's per-op policy")
    cross_entropy: Literal["fused", "full"] = opt("fused", "temper's chunked loss, or an unfused one on fp32 logits "
                                                           "(transformers, torchtitan)")
    loss_chunk: int = opt(1024, "tokens per chunk of the fused cross-entropy")
    packing: bool = opt(False, "SFT packing: an explicit (B, 1, T, T) attention mask, of which SDPA keeps a "
                               "copy per layer")
    lora_r: int = opt(16, "LoRA rank")
    lora_targets: list[str] = opt(["all-linear"], "linears that get adapters: all-linear, or names (q_proj, v_proj, ...)")
    quant_block_size: int = opt(64, "QLoRA: NF4 block size")
    double_quant: bool = opt(True, "QLoRA: quantise the block scales too")
    inference: bool = opt(False, "plan generation instead: weights + KV cache for batch x context tokens (an "
                                       "encoder: weights + one forward pass, no KV cache)")
    batch: int = opt(1, "inference: sequences generated together")
    context: int = opt(0, "inference: prompt + generated tokens per sequence (0: the model's context)")
    gpu: Literal["h100", "h200", "a100"] = opt("h100", "the GPU for peak FLOP/s and memory: H100 SXM, H200, A100 SXM")
    peak_tflops: float = opt(0.0, "peak TFLOP/s per GPU (0: the gpu's dense figure for dtype)")
    mfu: float = opt(0.4, "model FLOPs utilisation the training time assumes")
    gpus: int = opt(0, "GPUs the training time assumes (0: dp x tp)")
    mfu_from: str = opt("", "a temper training run's directory: its measured MFU, on this machine's measured matmul "
                            "peak (or the run's peak_flops), replace mfu and peak_tflops")
    tokens: float = opt(0.0, "training tokens (0: Chinchilla's tokens_per_param x parameters)")
    tokens_per_param: float = opt(20.0, "Chinchilla's compute-optimal tokens per parameter")
    format: Literal["table", "json"] = opt("table", "a readable table, or JSON (sizes in bytes) on stdout")

    only_with: ClassVar = (
        OnlyWith(("mixed_precision",), "method=full", lambda c: c.method == "full",
                 "method=lora and qlora train fp32 adapters whatever the base dtype"),
        OnlyWith(("lora_r", "lora_targets"), "method=lora or method=qlora", lambda c: c.method != "full"),
        OnlyWith(("quant_block_size", "double_quant"), "method=qlora", lambda c: c.method == "qlora"),
        OnlyWith(("reshard_after_forward",), "strategy=fsdp", lambda c: c.strategy == "fsdp"),
        OnlyWith(TRAINING_KEYS, "inference=false", lambda c: not c.inference,
                 "inference=true plans weights + KV cache (batch=, context=)"),
        OnlyWith(("batch", "context"), "inference=true", lambda c: c.inference,
                 "training uses micro_batch= and seq_len="),
    )

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: a preset, a model directory or a parameter count (7b)")
        for key in ("dp", "tp", "micro_batch", "grad_accum", "batch", "lora_r", "loss_chunk"):
            check_range(key, getattr(self, key), low=1)
        for key in ("seq_len", "context", "gpus", "peak_tflops", "tokens"):
            check_range(key, getattr(self, key), low=0)
        check_range("zero", self.zero, low=0, high=3)
        check_range("mfu", self.mfu, low=0.0, high=1.0, low_open=True)
        check_range("tokens_per_param", self.tokens_per_param, low=0.0, low_open=True)
        if self.quant_block_size < 2 or self.quant_block_size % 2:
            raise TemperError(f"quant_block_size must be a positive even integer, got {self.quant_block_size}")
        if self.checkpointing not in ("none", "full", "selective"):
            raise TemperError(f"activation_checkpointing must be true, false or selective; got "
                              f"{self.activation_checkpointing!r}")
        if self.strategy is not None and self.zero != 0:
            raise TemperError(f"strategy={self.strategy} and zero={self.zero} both set the sharding; give one of them")
        if self.mixed_precision and self.dtype == "fp32":
            raise TemperError("mixed_precision=true keeps fp32 master weights beside bf16/fp16 ones; with "
                              "dtype=fp32 there is nothing to mix (set dtype=bf16, or drop mixed_precision)")

    @property
    def checkpointing(self) -> str:
        value = self.activation_checkpointing
        if isinstance(value, bool):
            return "full" if value else "none"
        return value


def plan_from(cfg: Config, shape) -> object:
    """The `Plan` of `cfg` for model shape `shape`, with the model-dependent checks."""
    zero = cfg.zero
    if cfg.strategy == "fsdp":
        zero = 2 if cfg.reshard_after_forward is False else 3
    for what, size in (("attention heads", shape.num_heads), ("intermediate size", shape.intermediate_size),
                       ("vocabulary", shape.vocab_size)):
        if size % cfg.tp:
            raise TemperError(f"tp={cfg.tp} does not divide the model's {size} {what}")
    if shape.num_kv_heads % cfg.tp and cfg.tp % shape.num_kv_heads:
        raise TemperError(f"tp={cfg.tp} neither divides the model's {shape.num_kv_heads} KV heads nor is a multiple "
                          "of them (to replicate them)")
    if cfg.gpus and cfg.gpus % (cfg.dp * cfg.tp):
        raise TemperError(f"gpus={cfg.gpus} is not a multiple of dp x tp = {cfg.dp * cfg.tp}")
    seq_len = cfg.seq_len or min(shape.max_seq_len, 2048)
    context = cfg.context or shape.max_seq_len
    longest = context if cfg.inference else seq_len
    if longest > shape.max_seq_len:
        key = "context" if cfg.inference else "seq_len"
        warnings.warn(f"{key}={longest} is beyond the model's context of {shape.max_seq_len} positions", stacklevel=2)
    mixed = cfg.mixed_precision if cfg.mixed_precision is not None else (cfg.method == "full" and cfg.dtype != "fp32")
    plan = memory.Plan(method=cfg.method, dtype=cfg.dtype, mixed_precision=mixed, optimizer=cfg.optimizer, zero=zero,
                dp=cfg.dp, tp=cfg.tp, micro_batch=cfg.micro_batch, seq_len=seq_len, grad_accum=cfg.grad_accum,
                activation_checkpointing=cfg.checkpointing, cross_entropy=cfg.cross_entropy,
                loss_chunk=cfg.loss_chunk, packing=cfg.packing, lora_r=cfg.lora_r, lora_targets=list(cfg.lora_targets),
                quant_block_size=cfg.quant_block_size, double_quant=cfg.double_quant, inference=cfg.inference,
                batch=cfg.batch, context=context)
    if cfg.method != "full":
        smallest = min(min(i, o) for _, i, o, _ in memory.lora_targets(shape, plan.lora_targets))
        if cfg.lora_r > smallest:
            raise TemperError(f"lora_r={cfg.lora_r} is larger than the smallest wrapped linear dimension ({smallest})")
    return plan


def estimate(cfg: Config) -> dict:
    """Everything `temper estimate` reports, as plain data (sizes in bytes)."""
    shape, source = memory.resolve_model(cfg.model, cfg.model_config)
    plan = plan_from(cfg, shape)
    counts = memory.parameter_counts(shape)
    n = counts.total
    result = memory.inference_memory(shape, plan) if plan.inference else memory.training_memory(shape, plan)
    report: dict = {
        "model": {"spec": cfg.model, "source": source, "family": shape.family, "parameters": n,
                  "trainable_parameters": memory.trainable_parameters(shape, plan), "hidden_size": shape.hidden_size,
                  "num_layers": shape.num_layers, "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
                  "head_dim": shape.head_dim, "intermediate_size": shape.intermediate_size,
                  "vocab_size": shape.vocab_size, "tie_embeddings": shape.tie_embeddings,
                  "max_seq_len": shape.max_seq_len},
        "plan": asdict(plan),
        "per_device": {k: getattr(result, k) for k in ("weights", "gradients", "optimizer", "activations",
                                                        "temporaries", "kv_cache", "model_states", "peak")},
        "how": result.how,
        "gpu": {"name": cfg.gpu, "memory_gib": GPU_MEMORY_GIB[cfg.gpu],
                "fits": result.peak <= GPU_MEMORY_GIB[cfg.gpu] * memory.GiB},
    }
    report["model"]["encoder"] = memory.is_encoder(shape)
    if plan.inference and report["model"]["encoder"]:
        return report
    if plan.inference:
        report["kv_cache_per_token"] = memory.kv_cache_bytes(shape, 1, 1, plan.dt, plan.tp)
        report["kv_cache_per_sequence"] = memory.kv_cache_bytes(shape, 1, plan.context, plan.dt, plan.tp)
        return report
    whole = memory.training_memory(shape, memory.Plan(**{**asdict(plan), "zero": 0, "dp": 1, "tp": 1}))
    report["bytes_per_parameter"] = whole.model_states / n  # before any sharding
    tokens = cfg.tokens or memory.chinchilla_tokens(n, cfg.tokens_per_param)
    flops = memory.training_flops(n, tokens)
    peak = cfg.peak_tflops or memory.PEAK_TFLOPS[cfg.gpu][cfg.dtype]
    mfu, measured = cfg.mfu, None
    if cfg.mfu_from:
        measured = measured_mfu(cfg.mfu_from)
        mfu, peak = measured["mfu"], measured["peak_tflops"]
    gpus = cfg.gpus or cfg.dp * cfg.tp
    seconds = memory.training_seconds(flops, gpus, peak, mfu)
    report["compute"] = {"parameters": n, "tokens": tokens, "tokens_per_param": tokens / n, "flops": flops,
                         "peak_tflops": peak, "mfu": mfu, "gpus": gpus, "seconds": seconds,
                         "days": seconds / 86400, "gpu_hours": seconds * gpus / 3600}
    if measured is not None:
        report["compute"]["measured"] = measured
    inference = memory.Plan(method=plan.method, dtype=plan.dtype, tp=plan.tp, lora_r=plan.lora_r,
                            lora_targets=plan.lora_targets, quant_block_size=plan.quant_block_size,
                            double_quant=plan.double_quant, inference=True, batch=plan.micro_batch,
                            context=plan.seq_len)
    same = memory.inference_memory(shape, inference)
    report["inference_comparison"] = {"batch": plan.micro_batch, "context": plan.seq_len, "weights": same.weights,
                                      "kv_cache": same.kv_cache, "temporaries": same.temporaries, "peak": same.peak}
    return report


def _size(n: float) -> str:
    return memory._mib(n)


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} minutes"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:,.1f} days"


def render(report: dict) -> str:
    """The readable table of a report."""
    m, p, d, how = report["model"], report["plan"], report["per_device"], report["how"]
    heads = f"{m['num_heads']} heads" + (f" ({m['num_kv_heads']} KV)" if m["num_kv_heads"] != m["num_heads"] else "")
    lines = [f"model  {m['source']}: {m['family']}, {_count(m['parameters'])} parameters, hidden {m['hidden_size']}, "
             f"{m['num_layers']} layers, {heads}, intermediate {m['intermediate_size']}, vocab {m['vocab_size']}"
             + (", tied" if m["tie_embeddings"] else "")]
    if p["inference"]:
        method = {"full": "the model's weights", "lora": f"a LoRA adapter (r={p['lora_r']}) unmerged",
                  "qlora": f"an NF4 base with a LoRA adapter (r={p['lora_r']})"}[p["method"]]
    else:
        method = {"full": "full fine-tuning", "lora": f"LoRA r={p['lora_r']}", "qlora": f"QLoRA r={p['lora_r']}"}[
            p["method"]]
    devices = f"dp {p['dp']}, tp {p['tp']}" + (f", ZeRO-{p['zero']}" if p["zero"] else "")
    encoder = m.get("encoder", False)
    if p["inference"] and encoder:
        lines.append(f"plan   inference with {method}, {p['dtype']}, batch {p['batch']} x {p['context']} tokens "
                     f"(one forward pass: an encoder keeps no KV cache); tp {p['tp']}")
        rows = [("weights", d["weights"]), ("temporaries", d["temporaries"])]
        keys = ["weights", "temporaries"]
    elif p["inference"]:
        lines.append(f"plan   inference with {method}, {p['dtype']}, batch {p['batch']} x {p['context']} tokens "
                     f"(KV cache); tp {p['tp']}")
        rows = [("weights", d["weights"]), ("KV cache", d["kv_cache"]), ("temporaries", d["temporaries"])]
        keys = ["weights", "kv_cache", "temporaries"]
    else:
        mixed = ", mixed precision (fp32 master)" if p["mixed_precision"] else ""
        ac = {"none": "no activation checkpointing", "full": "activation checkpointing",
              "selective": "selective activation checkpointing"}[p["activation_checkpointing"]]
        loss = "fused cross-entropy" if p["cross_entropy"] == "fused" else "unfused cross-entropy"
        loss = f"an MLM loss at {memory.MLM_SHARE:.0%} of the tokens" if encoder else loss
        loss += ", packed (explicit attention mask)" if p["packing"] else ""
        lines.append(f"plan   training, {method}, {p['dtype']} weights{mixed}, {p['optimizer']}; {devices}; "
                     f"micro-batch {p['micro_batch']} x {p['seq_len']} tokens"
                     + (f", {p['grad_accum']} accumulated" if p["grad_accum"] > 1 else "") + f"; {ac}; {loss}")
        rows = [("weights", d["weights"]), ("gradients", d["gradients"]), ("optimiser states", d["optimizer"]),
                ("activations", d["activations"]), ("temporaries", d["temporaries"])]
        keys = ["weights", "gradients", "optimizer", "activations", "temporaries"]
    lines += ["", "per device"]
    for (label, size), key in zip(rows, keys):
        lines.append(f"  {label:<18}{_size(size):>12}   {how.get(key, '')}")
    lines.append("  " + "-" * 32)
    if not p["inference"]:
        per_param = report["bytes_per_parameter"]
        sharded = " before sharding" if p["dp"] > 1 and p["zero"] or p["tp"] > 1 else ""
        lines.append(f"  {'model states':<18}{_size(d['model_states']):>12}   weights + gradients + optimiser "
                     f"({d['model_states'] / 1e9:,.2f} GB): {per_param:.2f} B per parameter{sharded}")
    lines.append(f"  {'peak':<18}{_size(d['peak']):>12}   {how['peak']}")
    g = report["gpu"]
    lines.append(f"  {'':<18}{'':>12}   {'fits' if g['fits'] else 'does not fit'} in one {g['name'].upper()} "
                 f"({g['memory_gib']} GiB)")
    if p["inference"] and encoder:
        return "\n".join(lines)
    if p["inference"]:
        lines.append(f"\nKV cache: {_size(report['kv_cache_per_token'])} per token, "
                     f"{_size(report['kv_cache_per_sequence'])} per sequence of {p['context']} tokens")
        return "\n".join(lines)
    inf = report["inference_comparison"]
    cache = "" if encoder else f"KV cache {_size(inf['kv_cache'])} + "
    lines.append(f"\ninference{' (one forward pass, no KV cache)' if encoder else ''} with the same weights on one "
                 f"device{' per tp rank' if p['tp'] > 1 else ''}, batch "
                 f"{inf['batch']} x {inf['context']} tokens: {_size(inf['peak'])} (weights {_size(inf['weights'])} + "
                 f"{cache}temporaries {_size(inf['temporaries'])}); training's peak per "
                 f"device is {d['peak'] / inf['peak']:.1f}x that")
    c = report["compute"]
    lines.append(f"\ncompute (Chinchilla): N = {_count(c['parameters'])} parameters, D = {c['tokens_per_param']:g} N = "
                 f"{_count(c['tokens'])} tokens, C = 6 N D = {c['flops']:.3g} FLOPs")
    if "measured" in c:
        m = c["measured"]
        lines.append(f"  {_duration(c['seconds'])} on {c['gpus']} device{'s' if c['gpus'] > 1 else ''} like {m['device']} "
                     f"at the {c['mfu']:.0%} MFU temper measured there ({m['run']}: median of {m['rows']} rows) of "
                     f"{c['peak_tflops']:.3g} TFLOP/s ({m['peak_source']}, {m['precision']}): "
                     f"{c['gpu_hours']:,.{0 if c['gpu_hours'] >= 10 else 2}f} device-hours")
    else:
        lines.append(f"  {_duration(c['seconds'])} on {c['gpus']} GPU{'s' if c['gpus'] > 1 else ''} at {c['mfu']:.0%} MFU "
                     f"of {c['peak_tflops']:g} TFLOP/s ({p['dtype']}): {c['gpu_hours']:,.{0 if c['gpu_hours'] >= 10 else 2}f} GPU-hours")
    return "\n".join(lines)


def measured_mfu(run_dir: str) -> dict:
    """The MFU a temper training run logged (median over its rows) and the peak it was measured
    against: the run's `peak_flops` when it gave one, else this machine's matmul peak measured
    now in the run's precision (the same measurement the run made)."""
    path = Path(run_dir)
    metrics, config = path / "metrics.jsonl", path / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        raise TemperError(f"mfu_from={run_dir}: not a temper training run (no metrics.jsonl and config.yaml)")
    rows = [r["mfu"] for r in read_metrics(metrics) if isinstance(r.get("mfu"), (int, float))]
    if not rows:
        raise TemperError(f"mfu_from={run_dir}: its metrics.jsonl logs no mfu")
    run_cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    device = resolve_device(str(run_cfg.get("device", "auto")))
    precision = resolve_precision(str(run_cfg.get("precision", "auto")), device)
    if run_cfg.get("peak_flops"):
        peak, source = float(run_cfg["peak_flops"]), "the run's peak_flops"
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak, source = measure_matmul_peak(device, dtype), "a matmul measured now"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"this machine's {device.type}"
    return {"run": str(path), "rows": len(rows), "mfu": statistics.median(rows), "peak_tflops": peak / 1e12,
            "peak_source": source, "precision": precision, "device": name}


def run(cfg: Config) -> dict:
    return estimate(cfg)


def summary_lines(cfg: Config, report: dict) -> list[str]:
    """The plan as tables (format=json: the JSON, as --json prints it)."""
    return [json.dumps(report, indent=2)] if cfg.format == "json" else [render(report)]
