"""DPO step time and peak memory: temper vs TRL's DPOTrainer, both sides doing the same work.

    python benchmarks/bench_dpo_trl.py [--steps 10 --warmup 2 --batch 4 --rounds 2 --modes copy,precomputed,...]
                                       [--padded] [--precision fp32|bf16]

Setup (built here, no hub): the built-in world (`temper.data.world`, seed 0); a byte-level
BPE trained on its pretraining text (ChatML template; the corpus yields ~2.4k tokens); temper's
`llama-14m` preset (hidden 384, 6 layers, 6/2 GQA heads, SwiGLU 1024, vocab 8192, tied:
12.6M parameters) built with seed 0 and saved with `temper.models.save_model` as a Hugging
Face directory, which TRL loads with `AutoModelForCausalLM.from_pretrained`. Data: the first
(warmup + steps) x batch rows of the world's `preference/train.jsonl` (message rows, ChatML),
one epoch, so every step sees new pairs; no pair of the world is longer than 208 tokens (T <= 256).

Same work on both sides (TRL 1.x defaults that differ from temper's are set; the script
prints both sides' settings):
  - the same batches in the same order: TRL's rows are written in the order temper's loader
    draws them (seed 0) and TRL reads them sequentially (`train_sampling_strategy`); the
    script stops unless TRL's tokenised dataset equals temper's `EncodedPair`s (prompt,
    chosen, rejected ids) and every collated batch trains the same targets from the same
    inputs (checked again, token for token, by `tests/test_benchmarks.py`).
  - no activation (gradient) checkpointing on either: TRL's configs turn it ON by default.
  - fp32 (TRL defaults to bf16 where the machine has it), or with `--precision bf16` bf16 autocast
    over fp32 weights on both (temper `precision=bf16`, TRL `bf16=True`: accelerate's autocast);
    max length 257 tokens = temper's
    seq_len 256 positions (nothing is cut); no pad-to-multiple.
  - batch 4 pairs (8 rows, chosen and rejected in one forward on both), 1 micro-batch per
    step; sigmoid loss, beta 0.1; AdamW lr 5e-6, betas (0.9, 0.999), eps 1e-8, weight decay 0,
    fused kernel, gradient clipping at 1.0; constant lr, no warmup.
  - both log every step (loss and TRL's metrics), no evaluation, checkpoints or saving inside
    the timed steps; 0 dataloader workers.
  - the reference: a frozen copy loaded from the same directory (`copy`), log-probs computed
    before training (`precomputed`: TRL `precompute_ref_log_probs`), LoRA r=8 alpha 16 on
    every linear layer but the (tied) output layer with the adapter disabled (`lora-adapter`:
    TRL with `peft_config` and no `ref_model`), or LoRA with a frozen copy (`lora-copy`).
What still differs is how each computes the same thing. temper packs each batch's 8
sequences into as few rows of 256 positions as hold them (`padding_free=true`, its default;
positions restart and attention stays inside each sequence, the same log-probs to 1e-5 as
padded rows, tested in tests/test_preference_data.py), so its blocks run on real tokens only;
TRL pads every sequence to the longest of the batch (its `padding_free` is unavailable in
1.16: it falls back to padding) and runs its blocks over the padding too. `--padded` also
times temper with `padding_free=false`, the batch layout TRL uses. temper's output layer scores only the completion tokens,
while TRL's fused LM head scores every position (prompt and padding too: it compacts to the
completion tokens on Triton devices only) and also computes entropy, the mean logit and top-1
accuracy every step (TRL metrics that cannot be turned off); TRL's model reads one more
position per row (the last token, whose prediction is dropped); transformers' SDPA gets a
padding mask, temper's causal attention needs none.

Timed: the wall time between the ends of consecutive optimiser steps (temper: when its loop
ends a step; TRL: `on_step_end`), so data loading, collation and metrics count on both sides;
median (and mean) over the --steps after --warmup; --rounds alternating runs of each side in
its own process, each side keeping its fastest. Both sides log their loss every step; the
script stops unless the two loss curves agree to 1e-3 (they agree to ~1e-6: the same maths).

Memory: one more run of each side, in its own process, which imports the same libraries
(torch, transformers, trl, peft, datasets, temper) before anything else; the peaks are those
of the steps after the first (once the weights, the reference and the optimiser states
exist; loading and precomputing are not counted), over what the imports hold. Two measures:
live, the bytes malloc has handed out (glibc's mallinfo2, sampled every 0.5 ms by a thread:
activations, gradients, optimiser states, temporaries, but not the weights, which both
libraries map from the safetensors file), and RSS, the resident pages (everything, and also
what the allocator keeps after a free), its high-water mark reset through
/proc/self/clear_refs (Linux). The sampling thread slows both sides by ~20%, so the timing
runs do without it. The peaks while loading and in the first step are printed too.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SEQ_LEN = 256  # temper: input positions; a sequence holds at most SEQ_LEN + 1 tokens
LR, BETAS, EPS, WEIGHT_DECAY, CLIP, BETA = 5e-6, (0.9, 0.999), 1e-8, 0.0, 1.0, 0.1
LORA = dict(r=8, alpha=16, dropout=0.0)
# the largest per-step loss gap between the two sides (and between temper packed and padded, a tenth of it)
# before the script says they do not compute the same thing: fp32 sides agree to ~1e-6; under bf16 autocast
# each side rounds its matmuls to 8 bits of mantissa (2**-8 relative) in its own order, and the log-ratios
# the loss reads (times beta) sum ~100 such per-token log-probs: a loose guard, a wrong side is off by far more
LOSS_GAP = {"fp32": 1e-3, "bf16": 2e-2}
# mode -> (LoRA?, temper's reference=)
MODES = {"copy": (False, "copy"), "precomputed": (False, "precomputed"), "lora-adapter": (True, "adapter"),
         "lora-copy": (True, "copy")}
WHAT_IS_HELD = {
    "copy": "policy + grads + AdamW m, v + a frozen fp32 copy",
    "precomputed": "policy + grads + AdamW m, v; the reference is two numbers per pair "
                   "(its copy was loaded once before training, then freed)",
    "lora-adapter": "base (frozen) + LoRA + its grads and m, v; the reference is the base with the adapter off",
    "lora-copy": "base (frozen) + LoRA + its grads and m, v + a frozen fp32 copy",
}


# ----------------------------------------------------------------------------- setup


def prepare(workdir: Path, n_pairs: int) -> tuple[Path, Path]:
    """(model directory, pairs file): the world, a tokenizer, llama-14m with seed 0, the first n_pairs pairs."""
    import torch

    from temper.data.tokenizer import train_tokenizer
    from temper.data.world import WorldConfig, build_world, write_world
    from temper.models import build_model, preset, save_model

    world_dir, model_dir, pairs = workdir / "world", workdir / "model", workdir / "pairs.jsonl"
    if not (world_dir / "preference" / "train.jsonl").is_file():
        write_world(build_world(WorldConfig(seed=0)), world_dir)
    if not (model_dir / "config.json").is_file():
        with open(world_dir / "pretrain" / "train.jsonl", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        tokenizer = train_tokenizer(texts, vocab_size=8192)
        torch.manual_seed(0)
        save_model(build_model(preset("llama-14m")), model_dir, tokenizer=tokenizer)
    with open(world_dir / "preference" / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n_pairs), f)]
    if len(rows) < n_pairs:
        sys.exit(f"the world has {len(rows)} preference pairs, fewer than {n_pairs}")
    pairs.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows),
                     encoding="utf-8")
    return model_dir, pairs


def temper_settings(mode: str, padded: bool = False, precision: str = "fp32") -> list[str]:
    lora, reference = MODES[mode]
    settings = [f"padding_free={str(not padded).lower()}",
        f"seq_len={SEQ_LEN}", "loss_type=[sigmoid]", f"beta={BETA}", f"reference={reference}", f"precision={precision}",
        "grad_accum=1", "eval_fraction=0", f"optim.lr={LR}", f"optim.betas=[{BETAS[0]},{BETAS[1]}]",
        f"optim.eps={EPS}", f"optim.weight_decay={WEIGHT_DECAY}", f"optim.grad_clip={CLIP}", "optim.fused=true",
        "schedule.name=constant", "schedule.warmup_steps=0", "activation_checkpointing=false",
        "logging.every=1", "logging.eval_every=0", "logging.eval_at_start=false", "logging.progress=false",
        "checkpoint.every=0", "seed=0",
    ]
    if lora:
        settings += ["peft.method=lora", f"peft.r={LORA['r']}", f"peft.alpha={LORA['alpha']}",
                     f"peft.dropout={LORA['dropout']}", "peft.target_modules=all-linear"]
    return settings


def temper_config(model_dir, pairs_path, out, mode: str, steps: int, batch: int, padded: bool = False,
                  precision: str = "fp32"):
    from temper.config import load_config
    from temper.recipes import dpo

    return load_config(dpo.Config, None, [f"model={model_dir}", f"data={pairs_path}", f"output_dir={out}",
                                          f"max_steps={steps}", f"batch_size={batch}",
                                          *temper_settings(mode, padded, precision)])


def temper_pairs(cfg):
    """(the encoded pairs temper trains on, its loader over them), as `temper dpo` builds them."""
    from temper.data.chat import resolve_template
    from temper.data.preference import PreferenceLoader
    from temper.data.tokenizer import Tokenizer
    from temper.recipes import dpo

    tokenizer = Tokenizer.from_dir(cfg.model)
    template = None if cfg.template == "none" else resolve_template(cfg.template, tokenizer)
    train, held, stats, _ = dpo.resolve_pairs(cfg, {}, tokenizer, template)
    assert not held and stats.truncated == 0 and stats.prompt_truncated == 0, stats.summary()
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return train, PreferenceLoader(train, batch_size=cfg.batch_size, pad_id=pad_id, seed=cfg.seed,
                                   pack_len=cfg.seq_len if cfg.padding_free else 0)


def temper_order(cfg) -> list[int]:
    """Indices (0-based rows of the data file) in the order temper's loader draws its first epoch."""
    _, loader = temper_pairs(cfg)
    return [int(p.source.rsplit(":", 1)[1]) - 1 for batch in loader._epoch_batches() for p in batch]


def trl_settings(mode: str, steps: int, batch: int, precision: str = "fp32") -> dict:
    """DPOConfig arguments that make TRL do temper's work (see the module docstring)."""
    import transformers

    # transformers >= 5.2x renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing
    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return dict(
        max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        **{checkpointing: False}, bf16=precision == "bf16", fp16=False, use_cpu=True,
        max_length=SEQ_LEN + 1, truncation_mode="keep_start", padding_free=False, pad_to_multiple_of=None,
        precompute_ref_log_probs=MODES[mode][1] == "precomputed", loss_type=["sigmoid"], beta=BETA,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, eval_strategy="no",
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
    )


def trl_trainer(model_dir, rows: list[dict], out: str, mode: str, steps: int, batch: int, callbacks=(),
                precision: str = "fp32"):
    """TRL's DPOTrainer over `rows` (in the order given: it reads them sequentially)."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    lora, reference = MODES[mode]

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return DPOTrainer(model=load(), ref_model=load() if reference == "copy" else None,
                      args=DPOConfig(output_dir=out, **trl_settings(mode, steps, batch, precision)), train_dataset=data,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))


def read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the same tokens


def check_same_work(model_dir, pairs_path, steps: int, batch: int, mode: str = "copy", warmup: int = 0) -> dict:
    """Stop unless TRL tokenises and batches the pairs exactly as temper does; a summary of the batches."""
    import torch

    with tempfile.TemporaryDirectory() as out:
        cfg = temper_config(model_dir, pairs_path, Path(out) / "temper", mode, steps, batch, padded=True)
        ours, loader = temper_pairs(cfg)  # padded, as TRL's batches are
        _, packed_loader = temper_pairs(temper_config(model_dir, pairs_path, Path(out) / "packed", mode, steps, batch))
        order = temper_order(cfg)
        rows = read_rows(pairs_path)
        trainer = trl_trainer(model_dir, [rows[i] for i in order], str(Path(out) / "trl"), mode, steps, batch)
        theirs = trainer.train_dataset
        by_row = {int(p.source.rsplit(":", 1)[1]) - 1: p for p in ours}
        if len(theirs) != len(ours):
            sys.exit(f"not the same work: TRL has {len(theirs)} pairs, temper {len(ours)}")
        for k, i in enumerate(order):
            for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
                if theirs[k][field] != getattr(by_row[i], field):
                    sys.exit(f"not the same work: pair {k} (row {i + 1}) {field} differ:\n  temper {getattr(by_row[i], field)}"
                             f"\n  trl    {theirs[k][field]}")
        lengths, completion_tokens, positions = [], 0, {"temper": 0, "trl": 0}
        for step, trl_batch in zip(range(steps), trainer.get_train_dataloader()):
            ids, attention, completion = trl_batch["input_ids"], trl_batch["attention_mask"], trl_batch["completion_mask"]
            ours_batch = loader.next_batch()
            labels = ids.masked_fill(completion == 0, -100)[:, 1:]  # TRL's targets, shifted as temper's are
            if ours_batch.inputs.shape != labels.shape or not torch.equal(ours_batch.targets, labels):
                sys.exit(f"not the same work: step {step} trains different targets")
            real = attention[:, 1:].bool()  # positions whose next token exists: the predictions used
            if not torch.equal(ours_batch.inputs[real], ids[:, :-1][real]):
                sys.exit(f"not the same work: step {step} reads different inputs")
            packed = packed_loader.next_batch()  # what temper trains on: the same sequences, packed
            for r in range(ours_batch.inputs.shape[0]):
                slots, n = packed.segments == r, int(real[r].sum())
                if not (torch.equal(packed.inputs[slots], ours_batch.inputs[r, :n])
                        and torch.equal(packed.targets[slots], ours_batch.targets[r, :n])):
                    sys.exit(f"not the same work: step {step} packs sequence {r} differently")
            lengths.append(ids.shape[1])
            completion_tokens += int(completion.sum())
            if step >= warmup:
                positions["temper"] += packed.inputs.numel()
                positions["trl"] += ids.numel()
    return {"pairs": len(ours), "sequence_lengths": lengths, "completion_tokens": completion_tokens,
            "positions": positions, "trl_args": trainer.args}


# ----------------------------------------------------------------------------- one side, in its own process


def _import_everything() -> dict[str, float]:
    """Both sides import the same libraries first, so memory compares what training needs: the memory after imports."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import temper.recipes.dpo  # noqa: F401
    import temper.train.loop  # noqa: F401

    return {"base_rss_mb": _memory()["rss"], "base_live_mb": _live_mb()}


def _memory() -> dict[str, float]:
    """This process's resident set now and its high-water mark since start (or the last reset), MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss": float(fields["VmRSS"].split()[0]) / 1024, "peak": float(fields["VmHWM"].split()[0]) / 1024}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _live_mb() -> float:
    """Bytes malloc has handed out and not got back (glibc's mallinfo2: heap in use + mmapped chunks), MB:
    torch's CPU tensors live there; unlike RSS it drops as soon as memory is freed."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


class StepMeter:
    """At the end of each optimiser step: its time and the loss; and memory in three phases, loading
    (until the training loop starts: models, data, a precomputed reference), the first step (it
    creates the optimiser states) and the steps after it (`training_*`: what training holds at its
    most). Two measures: the RSS high-water mark, reset between phases (Linux: /proc/self/clear_refs),
    and the peak of live malloc'd bytes, sampled every 0.5 ms by a thread."""

    def __init__(self, sample: bool = True) -> None:
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.peaks: dict[str, float] = {}
        self.live_peak, self.sampling = 0.0, sample
        self.lock = threading.Lock()  # a phase's end resets the peak: no sample may land in between
        self.sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.sampling:
            with self.lock:
                self.live_peak = max(self.live_peak, _live_mb())
            time.sleep(0.0005)

    def _phase_ends(self, name: str) -> None:
        with self.lock:
            self.peaks[f"{name}_peak_mb"] = _memory()["peak"]
            self.peaks[f"{name}_live_mb"] = max(self.live_peak, _live_mb())
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
            self.live_peak = _live_mb()

    def training_begins(self) -> None:
        self.live_peak = _live_mb()
        if self.sampling:
            self.sampler.start()
        self._phase_ends("loading")

    def step_ended(self) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) == 1:
            self._phase_ends("first_step")
        with self.lock:
            self.peaks["training_peak_mb"] = _memory()["peak"]
            self.peaks["training_live_mb"] = max(self.live_peak, _live_mb())

    def result(self, warmup: int, base: dict[str, float]) -> dict:
        self.sampling = False
        steps = [b - a for a, b in zip(self.ends, self.ends[1:])]  # steps[k]: the time of step k + 1 (0-based)
        return {"step_seconds": steps[warmup - 1:], "losses": self.losses, **base, **self.peaks}


def run_temper(args) -> dict:
    import torch

    from temper.recipes import dpo
    from temper.train.loop import TrainLoop

    base = _import_everything()
    meter = StepMeter(sample=not args.no_sampling)
    end_step = TrainLoop._end_step

    def timed_end_step(self, done, seconds):  # a step has ended; logging and saving come after
        meter.step_ended()
        meter.losses.append(float(self._row["loss"]))
        end_step(self, done, seconds)

    TrainLoop._end_step = timed_end_step
    steps = TrainLoop.__iter__

    def metered_steps(self):
        meter.training_begins()
        yield from steps(self)

    TrainLoop.__iter__ = metered_steps
    with tempfile.TemporaryDirectory() as out:
        cfg = temper_config(args.model, args.pairs, Path(out) / "run", args.mode, args.warmup + args.steps, args.batch,
                            padded=args.padded, precision=args.precision)
        summary = dpo.run(cfg)
    return {**meter.result(args.warmup, base), "trainable": summary["trainable_parameters"],
            "threads": torch.get_num_threads(), "settings": temper_settings(args.mode, args.padded, args.precision)}


def run_trl(args) -> dict:
    import torch
    import transformers
    from transformers import TrainerCallback

    base = _import_everything()
    meter = StepMeter(sample=not args.no_sampling)

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.training_begins()

        def on_step_end(self, args, state, control, **kwargs):  # after the optimiser step and zero_grad
            meter.step_ended()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                meter.losses.append(float(logs["loss"]))

    rows = read_rows(args.pairs)
    order = json.loads(args.order)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(args.model, [rows[i] for i in order], out, args.mode, args.warmup + args.steps,
                              args.batch, callbacks=[Meter()], precision=args.precision)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    settings = {k: v for k, v in trl_settings(args.mode, args.steps, args.batch, args.precision).items()
                if k not in ("max_steps", "per_device_train_batch_size")}
    return {**meter.result(args.warmup, base), "trainable": trainable, "threads": torch.get_num_threads(),
            "settings": settings, "versions": f"transformers {transformers.__version__}, peft "
            f"{__import__('peft').__version__}, trl {__import__('trl').__version__}, torch {torch.__version__}"}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each side; the fastest is kept")
    ap.add_argument("--modes", default=",".join(MODES), help=f"reference modes to run, of {', '.join(MODES)}")
    ap.add_argument("--workdir", help="keep the world, tokenizer and model here (default: a temporary directory)")
    ap.add_argument("--only", choices=["temper", "trl", "temper-padded"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=list(MODES), default="copy", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--order", help=argparse.SUPPRESS)
    ap.add_argument("--no-sampling", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast over fp32 weights on both sides (temper precision=bf16, TRL bf16=True)")
    ap.add_argument("--padded", action="store_true",
                    help="also time temper with padding_free=false (TRL's batch layout)")
    args = ap.parse_args()
    if args.warmup < 1:
        sys.exit("--warmup must be at least 1: a step's time is measured from the end of the one before")
    if args.only:
        args.padded = args.only == "temper-padded"
        result = run_temper(args) if args.only.startswith("temper") else run_trl(args)
        print("RESULT " + json.dumps(result))
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this benchmark reads and resets the peak RSS through /proc (Linux)")
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            sys.exit(f"unknown mode {mode!r}: expected some of {', '.join(MODES)}")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        steps_total = args.warmup + args.steps
        model_dir, pairs_path = prepare(workdir, steps_total * args.batch)
        same = check_same_work(model_dir, pairs_path, steps_total, args.batch, warmup=args.warmup)
        order = temper_order(temper_config(model_dir, pairs_path, workdir / "unused", "copy", steps_total,
                                           args.batch))
        lengths = same["sequence_lengths"]
        print(f"same work: {same['pairs']} pairs, identical prompt/chosen/rejected ids and identical batches on both "
              f"sides; {same['completion_tokens']} completion tokens, batches of 8 rows x {min(lengths)}-"
              f"{max(lengths)} tokens (timed steps: {lengths[args.warmup:]}); positions the blocks run in the timed "
              f"steps: temper {same['positions']['temper']:,} (packed), TRL {same['positions']['trl']:,} (padded)",
              flush=True)

        def run(side: str, mode: str, sampling: bool) -> dict:
            cmd = [sys.executable, __file__, "--only", side, "--mode", mode, "--model", str(model_dir), "--pairs",
                   str(pairs_path), "--order", json.dumps(order), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch", str(args.batch), "--precision", args.precision,
                   *([] if sampling else ["--no-sampling"])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{side} ({mode}) failed:\n{proc.stderr[-4000:]}")
            r = json.loads(line[7:])
            r["median"], r["mean"] = statistics.median(r["step_seconds"]), statistics.mean(r["step_seconds"])
            return r

        results: dict[tuple[str, str], dict] = {}
        sides = ("temper", "trl", "temper-padded") if args.padded else ("temper", "trl")
        for _ in range(args.rounds):  # timing runs: no memory sampling (its thread slows both sides by ~20%)
            for mode in modes:
                for side in sides:
                    r = run(side, mode, sampling=False)
                    print(f"  {mode:12s} {side:6s} step median {r['median'] * 1000:6.0f} ms, mean "
                          f"{r['mean'] * 1000:6.0f} ms", file=sys.stderr, flush=True)
                    if (mode, side) not in results or r["median"] < results[(mode, side)]["median"]:
                        results[(mode, side)] = r
        memory: dict[tuple[str, str], dict] = {}
        for mode in modes:  # memory runs: one each, sampling live bytes
            for side in ("temper", "trl"):
                r = memory[(mode, side)] = run(side, mode, sampling=True)
                print(f"  {mode:12s} {side:6s} peak live / RSS MB: after imports {r['base_live_mb']:.0f} / "
                      f"{r['base_rss_mb']:.0f}, loading {r['loading_live_mb']:.0f} / {r['loading_peak_mb']:.0f}, "
                      f"first step {r['first_step_live_mb']:.0f} / {r['first_step_peak_mb']:.0f}, training "
                      f"{r['training_live_mb']:.0f} / {r['training_peak_mb']:.0f}", file=sys.stderr, flush=True)

    for mode in modes:
        t, h = results[(mode, "temper")], results[(mode, "trl")]
        if args.padded:
            q = results[(mode, "temper-padded")]
            if max(abs(a - b) for a, b in zip(t["losses"], q["losses"])) > LOSS_GAP[args.precision] / 10:
                sys.exit(f"padding-free changed the maths ({mode}): {t['losses']} vs {q['losses']}")
        if t["trainable"] != h["trainable"]:
            sys.exit(f"not the same work ({mode}): trainable parameters temper {t['trainable']} vs trl {h['trainable']}")
        gap = max(abs(a - b) for a, b in zip(t["losses"], h["losses"]))
        if len(t["losses"]) != len(h["losses"]) or gap > LOSS_GAP[args.precision]:
            sys.exit(f"not the same maths ({mode}): losses temper {t['losses']} vs trl {h['losses']}")
        results[(mode, "gap")] = gap

    t, h = results[(modes[0], "temper")], results[(modes[0], "trl")]
    print(f"temper settings: {' '.join(t['settings'])}")
    print(f"trl settings:    {json.dumps(h['settings'])}")
    print(f"\nllama-14m (12.6M parameters) DPO, the world's first {same['pairs']} preference pairs (ChatML), batch "
          f"{args.batch} pairs, {args.warmup} warm-up + {args.steps} timed steps, {args.precision} CPU ({t['threads']} "
          f"threads), "
          f"no activation checkpointing, best of {args.rounds} rounds; {h['versions']}")
    print("\n| reference | trainable | temper step, median (mean) | TRL step, median (mean) | speed ratio | "
          "largest per-step loss gap |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        t, h = results[(mode, "temper")], results[(mode, "trl")]
        print(f"| {mode} | {t['trainable']:,} | {t['median'] * 1000:.0f} ms ({t['mean'] * 1000:.0f}) | "
              f"{h['median'] * 1000:.0f} ms ({h['mean'] * 1000:.0f}) | **{h['median'] / t['median']:.2f}x** | "
              f"{results[(mode, 'gap')]:.1e} |")
    if args.padded:
        print("\ntemper with padding_free=false (one right-padded row a sequence, TRL's layout):\n")
        print("| reference | temper padded step, median (mean) | speed ratio vs TRL | padding-free speed-up |")
        print("|---|---|---|---|")
        for mode in modes:
            t, h, q = results[(mode, "temper")], results[(mode, "trl")], results[(mode, "temper-padded")]
            print(f"| {mode} | {q['median'] * 1000:.0f} ms ({q['mean'] * 1000:.0f}) | {h['median'] / q['median']:.2f}x | "
                  f"{q['median'] / t['median']:.2f}x |")
    print("\nPeak memory while training (the steps after the first), over what the imports hold, one run each. "
          "live: bytes malloc has handed out (activations, gradients, optimiser states, temporaries; not the weights, "
          "which both libraries map from the safetensors file), sampled every 0.5 ms; RSS: resident pages "
          "(everything, weights included, and what the allocator keeps after a free).\n")
    print("| reference | temper: what it holds | temper live | TRL live | live ratio | temper RSS | TRL RSS | "
          "RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        t, h = memory[(mode, "temper")], memory[(mode, "trl")]
        tl, hl = t["training_live_mb"] - t["base_live_mb"], h["training_live_mb"] - h["base_live_mb"]
        tr, hr = t["training_peak_mb"] - t["base_rss_mb"], h["training_peak_mb"] - h["base_rss_mb"]
        print(f"| {mode} | {WHAT_IS_HELD[mode]} | {tl:.0f} MB | {hl:.0f} MB | **{tl / hl:.2f}x** | {tr:.0f} MB | "
              f"{hr:.0f} MB | {tr / hr:.2f}x |")
    print()
    for mode in modes:
        t, h = results[(mode, "temper")], results[(mode, "trl")]
        print(f"step seconds {mode}: temper {[round(s, 3) for s in t['step_seconds']]}; "
              f"trl {[round(s, 3) for s in h['step_seconds']]}")


if __name__ == "__main__":
    main()
