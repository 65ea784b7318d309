"""The loop every training recipe shares, so recipes cannot drift apart.

A recipe builds its data, its model and its loss, then writes its loop as a plain `for`:

    loop = TrainLoop(cfg, "pretrain", out, model, optimizer, device, precision,
                     state={"loader": loader}, evaluate=evaluate, flops_per_token=flops)
    for step in loop:                                    # resumes; sets the lr; times the step
        micro = [loader.next_batch() for _ in range(cfg.grad_accum)]
        result = loop.accumulate(micro, loss_fn)          # loss_fn(batch) -> (sum, count[, metrics])
        loop.optimizer_step(result, tokens=...)           # clip, step; log/eval/checkpoint cadence
    save_model(...)                                       # the recipe's own output
    loop.finish({...})                                    # summary.json

What the loop owns, the same for every recipe: resume (`resume=auto` or a path, the
"checkpoints exist" note, restoring every stateful object named in `state`), the learning
rate of each step, step timing (synchronised on CUDA), the logging, evaluation and
checkpoint cadence of the shared `logging` and `checkpoint` sections, `metrics.jsonl` (one
row per logged step, evaluation results merged into it; TensorBoard when asked), the
progress bar (plain lines when stderr is not a terminal), the final evaluation and
checkpoint, and the summary. What stays in the recipe: its data, its model setup, its loss.

Online methods (PPO, GRPO) use the same loop:

    loop = TrainLoop(cfg, "ppo", out, {"policy": policy, "value": value}, optimizer, ...,
                     state={"rollout": source})                   # source: train/rollout.py
    for step in loop:
        batch = source.next()                                     # generates every k steps: phase "rollout"
        with loop.phase("score"):
            rewards = score(batch)
        result = loop.accumulate(micro_batches(batch, rewards), loss_fn)
        loop.optimizer_step({...}, tokens=...)

- **Several trained modules**: `model` is one module or a dict of named ones, with ONE
  optimiser over all (`build_optimizer` takes the same dict). Accumulation, clipping (one
  global norm over every module's parameters), checkpoints (one `NAME.safetensors` per
  module; `model.safetensors` for one module) and `export_model` (the dict of plain modules)
  cover each. Frozen modules (a reference, a reward model) are not passed: they do not train.
  Distributed checkpoints save the modules as one ModuleDict (keys `model.policy.<fqn>`).
  Pipeline parallelism takes one module.
- **Stateful parts** (`state={name: obj}`, `obj.state_dict()` / `obj.load_state_dict()`) may
  hold tensors anywhere in nested dicts and lists: they are saved to `state.safetensors` and
  come back exactly (dtype, shape, values; on the CPU if saved from it, else on the run's
  device). A part with a `use_phases(phase)` method is handed `loop.phase`, so its own work is
  timed (the rollout source's generation goes to `rollout`).
- **Adding to rows**: `on_log(row)` (say a reward-hacking watch, `temper.eval.hacking`) sees every
  row the cadence logs, evaluation results merged and the evaluation at the start included, on
  every rank, before it is written; the keys it returns join the row.
- **Phases**: `with loop.phase("rollout"):` charges the time inside to that phase (nested
  phases: the inner one's time is the inner one's); `train` is the rest of the step (the
  accumulation, the optimiser step, the recipe's batch preparation), so a recipe without
  phases times exactly as before. Boundaries are CUDA-synchronised. Each row has
  `time/train` and `time/NAME` for every phase used: seconds per step, averaged over the
  steps since the previous row (the same window as the throughput). `tokens_per_second` and
  `mfu` are over the train phase only; with other phases a row also has
  `step_tokens_per_second`, over the whole steps.
- **Divergence**: a step whose loss or global gradient norm is NaN or infinite is never applied
  (the norm is read once per step, before the update: the step's one read-back). With
  `on_nonfinite=stop` (the default) the run stops there with one line naming the step, what
  was not finite and the likely causes (the learning rate, the loss's settings such as `beta` or
  `loss_weights` where the recipe has them, a bad data row);
  its row goes to `metrics.jsonl` (`nonfinite`: loss or grad_norm), the checkpoints written so
  far stay, no model is saved. With `on_nonfinite=skip` the gradients are dropped (weights and
  optimiser moments untouched; the step counts and the learning-rate schedule moves on, so the
  run still ends at max_steps), rows carry `skipped_steps` (the run's count, kept across
  resume) and the summary too; `MAX_SKIPPED_IN_A_ROW` non-finite steps in a row stop the run
  anyway (then the weights, not one batch, are broken). Under fp16 the gradient scaler skips
  overflowing gradients itself, so only the loss is checked. Every rank reaches the same
  verdict: the loss is summed over the ranks and the norm is of the whole gradient. An update
  can also leave finite losses but broken weights: a held-out loss (any evaluation metric
  named `*loss*`, or a perplexity) that is NaN stops the run before that step's checkpoint,
  and no checkpoint and no exported model is written whose trained weights hold a NaN or Inf.

The settings it reads are the ones every training recipe's config declares under the same
names (`temper.train.recipe.TrainingConfig`): max_steps, resume, peak_flops and the sections
optim, schedule, checkpoint and logging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from temper.config import to_dict
from temper.errors import TemperError
from temper.train import checkpoint as ckpt
from temper.train import engine
from temper.train.distributed import ModuleGroup, Parallel, ParallelConfig, export_model, unwrap
from temper.train.optim import lr_at, set_lr
from temper.train.rundir import RunDir

# What makes two runs the same run: a checkpoint resumes only a run that agrees on all of these
# (plus what the recipe adds: its tokenizer, its data's fingerprint).
IDENTITY_KEYS = ("seq_len", "seed")  # and the global batch: sequences per optimiser step over all ranks
# what state.json holds besides the stateful parts: no part may take these names
RESERVED_STATE = ("step", "run", "config", "optimizer", "rng", "modules", "state_tensors", "world_size", "ranks",
                  "format", "state_tensor_ranks", "skipped_steps")
# on_nonfinite=skip: this many non-finite steps in a row stop the run all the same (one bad batch
# gives one; the next batches failing too means the weights or the learning rate are the cause)
MAX_SKIPPED_IN_A_ROW = 5
# the settings of a recipe's loss that can blow it up, named in the divergence message when the recipe has them
LOSS_SETTINGS = ("beta", "loss_weights", "replay_weight")


class Diverged(TemperError):
    """The run stopped at a NaN or infinite loss, gradient norm, held-out loss or weight."""


class TrainLoop:
    """Iterate over the optimiser steps of a run; see the module docstring."""

    def __init__(self, cfg: Any, name: str, out: Path, model: torch.nn.Module | dict[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: str, *, state: dict[str, Any] | None = None,
                 evaluate: Callable[[int], dict] | None = None, flops_per_token: float | None = None,
                 identity: dict[str, Any] | None = None, par: Any = None, global_batch: int | None = None,
                 on_log: Callable[[dict], dict] | None = None) -> None:
        self.cfg, self.name, self.out, self.model, self.optimizer = cfg, name, Path(out), model, optimizer
        self.device, self.precision = device, precision
        # one process unless the recipe passes its Parallel; rank 0 alone writes files and logs
        self.par = par if par is not None else Parallel("none", ParallelConfig(), device)
        self.main = self.par.is_main
        self._evaluate, self.flops_per_token, self.on_log = evaluate, flops_per_token, on_log
        self.autocast = engine.precision_context(precision, device)
        self.scaler = engine.grad_scaler(precision, device)
        self.modules = ckpt.named_modules(model)  # {"model": model} for one module
        if not isinstance(model, torch.nn.Module) and self.par.pipeline is not None:
            raise TemperError("pipeline parallelism (parallel.pp > 1) trains one module, not several")
        clash = sorted(set(state or {}) & {*RESERVED_STATE, "grad_scaler"})
        if clash:
            raise TemperError(f"state names {clash} are the checkpoint's own: name the stateful parts otherwise")
        self.stateful = {k: v for k, v in {**(state or {}), "grad_scaler": self.scaler}.items() if v is not None}
        if global_batch is None and hasattr(cfg, "batch_size"):
            global_batch = cfg.batch_size * getattr(cfg, "grad_accum", 1)
        # a pipeline stage's: the whole model's config
        described = getattr(unwrap(model), "decoder", unwrap(model)) if isinstance(model, torch.nn.Module) else \
            {k: unwrap(m) for k, m in model.items()}
        self.identity = run_identity(cfg, described, {"global_batch": global_batch, **(identity or {})})
        self.max_steps = cfg.max_steps
        # the device's peak for MFU: given (peak_flops), or measured now and, should a logged MFU
        # come out above 100% (the machine was busy during this measurement), once more then
        self.peak_flops = None
        self._peak_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self._peak_remeasured = False
        self._mfu_warned = False
        if flops_per_token:
            self.peak_flops = cfg.peak_flops or engine.measure_matmul_peak(device, self._peak_dtype)

        self.checkpoints = self.out / "checkpoints"
        self.start_step = 0
        self.on_nonfinite = getattr(cfg, "on_nonfinite", "stop")
        self.skipped_steps = 0  # the run's steps not applied for a NaN / Inf loss or gradient norm
        self._skipped_in_a_row = 0
        self._last_checkpoint: int | None = None  # the step of the newest checkpoint this run has
        self._step = 0  # 0-based index of the running step

        def find_checkpoint():  # rank 0 looks; every rank gets its answer (or its error)
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_leftovers(self.checkpoints)  # of a run killed while saving or pruning; we hold the lock
            found = ckpt.resolve_resume(cfg.resume, self.checkpoints)
            if found is not None:
                check_same_run(found, self.identity)
            return None if found is None else str(found)

        resume_from = self.par.agree(find_checkpoint)
        resume_from = Path(resume_from) if resume_from is not None else None
        if resume_from is not None:
            saved = ckpt.load_any_checkpoint(resume_from, model=model, optimizer=optimizer, device=self.par.device,
                                             par=self.par)
            for key, obj in self.stateful.items():
                obj.load_state_dict(saved[key])
            self.start_step = self._last_checkpoint = saved["step"]
            self.skipped_steps = int(saved.get("skipped_steps", 0))
            if self.main:
                print(f"resumed from {resume_from} at step {self.start_step}", file=sys.stderr)
        # training starts: an earlier run being started over goes now (the claim allowed it), not before
        self.run_dir = RunDir(self.out, main=self.main)
        self.run_dir.begin(cfg, start_over=resume_from is None and bool(getattr(cfg, "overwrite", False) or cfg.resume))
        self.metrics = self.run_dir.metrics(resume_step=self.start_step if resume_from else None,
                                            tensorboard=cfg.logging.tensorboard)
        self.par.barrier()
        if getattr(cfg, "precision", None) == "auto" and self.main:  # after every check of the inputs: an
            # error stays the one line on stderr; rank 0's measurement is cached, so this is what it chose
            print(f"precision auto -> {precision}: {engine.choose_precision('auto', self.par.device)[1]}",
                  file=sys.stderr)

        # a log file gets plain lines; ranks other than 0 print nothing
        self.interactive = cfg.logging.progress and sys.stderr.isatty() and self.main
        self.bar = tqdm(total=self.max_steps, initial=self.start_step, desc=name, unit="step", file=sys.stderr,
                        disable=not self.interactive, dynamic_ncols=True)
        self.lr = 0.0
        self.first_eval: dict = {}  # logging.eval_at_start: the numbers before training
        self.last_eval: dict = {}
        self.train_seconds = 0.0  # of the whole steps, every phase
        self.train_tokens = 0
        self.phase_seconds: dict[str, float] = {"train": 0.0}  # the run's total per phase
        self._phase_names: list[str] = []  # the named phases used so far, in order of first use
        self._step_phases: dict[str, float] = {}  # this step's seconds per phase
        self._phase_stack: list[str] = []  # the phases open now, innermost last
        self._mark: float | None = None  # time of the last phase boundary of the running step (None: no step)
        self._window: list[tuple[float, dict[str, float], int]] = []  # (seconds, phases, tokens) since the last row
        self._row: dict | None = None  # this step's metrics, set by optimizer_step
        self._tokens = 0  # this step's processed tokens, set by optimizer_step
        for obj in self.stateful.values():  # e.g. the rollout source: its generation is the rollout phase
            if hasattr(obj, "use_phases"):
                obj.use_phases(self.phase)

    # ------------------------------------------------------------------------- the steps

    def __iter__(self) -> Iterator[int]:
        """Yield the 0-based index of each remaining step; after the body, run the cadence."""
        if self.start_step == 0 and self.cfg.logging.eval_at_start and self._evaluate is not None:
            self.first_eval = self.evaluate(0)
            self._check_held_out(0, self.first_eval, {"step": 0, **self.first_eval})
            self._log_row({"step": 0, **self.first_eval})
        for step in range(self.start_step, self.max_steps):
            self.lr = lr_at(step, self.cfg.optim.lr, self.cfg.schedule, self.max_steps)
            set_lr(self.optimizer, self.lr)
            self._row, self._step = None, step
            self._step_phases, self._phase_stack = {"train": 0.0}, []
            start = self._mark = time.perf_counter()
            yield step
            assert self._row is not None, "a step ended without loop.optimizer_step()"
            end = self._phase_boundary()  # the step's kernels, not their launches
            self._mark = None
            self._end_step(step + 1, end - start)
        self.bar.close()
        if self.start_step >= self.max_steps and self._evaluate is not None:  # resumed a finished run
            self.evaluate(self.max_steps)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time inside to phase `name` of the running step (see the module docstring);
        outside a step (evaluation, setup) nothing is counted."""
        if name == "train":
            raise TemperError("'train' is the time of a step outside its named phases: give the phase another name")
        if self._mark is None:
            yield
            return
        self._phase_boundary()
        self._phase_stack.append(name)
        if name not in self._phase_names:
            self._phase_names.append(name)
        try:
            yield
        finally:
            self._phase_boundary()
            self._phase_stack.pop()

    def _phase_boundary(self) -> float:
        """Charge the time since the last boundary to the phase open now (train when none); returns now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        current = self._phase_stack[-1] if self._phase_stack else "train"
        self._step_phases[current] = self._step_phases.get(current, 0.0) + now - self._mark
        self._mark = now
        return now

    def accumulate(self, micro_batches: list, loss_fn: Callable, *, weight: float = 1.0) -> dict[str, float]:
        """`engine.accumulate` with this run's model(s), precision and gradient scaler. Under pipeline
        parallelism the micro-batches ((inputs, targets) pairs) are the pipeline's micro-batches
        and the schedule runs them through the stages (`loss_fn` is the stages' own: the fused
        next-token loss)."""
        if self.par.pipeline is not None:
            inputs = torch.cat([b[0] for b in micro_batches]).to(self.par.device)
            targets = torch.cat([b[1] for b in micro_batches]).to(self.par.device)
            result = self.par.pipeline.step(inputs, targets)
            self.par.reduce_pipeline_grads()
            return {"loss": float(result["loss"]), "count": float(result["count"])}
        return engine.accumulate(self.model, micro_batches, loss_fn, autocast=self.autocast, scaler=self.scaler,
                                 weight=weight, par=self.par)

    def accumulate_shared(self, micro_batches: list, loss_fn: Callable, *, units: Callable,
                          weights: dict[str, float]) -> dict[str, float]:
        """`engine.accumulate_shared` (several objectives of one forward per micro-batch) with this
        run's model(s), precision and gradient scaler; not under pipeline parallelism."""
        assert self.par.pipeline is None, "accumulate_shared runs whole models, not pipeline stages"
        return engine.accumulate_shared(self.model, micro_batches, loss_fn, units=units, weights=weights,
                                        autocast=self.autocast, scaler=self.scaler, par=self.par)

    def optimizer_step(self, metrics: dict[str, float], *, tokens: int) -> dict[str, float]:
        """Clip and step; `metrics` (loss and the recipe's extras) and `tokens` (processed this step by
        one data-parallel replica, padding included, for tokens/s and MFU) go into this step's row.
        A NaN or infinite loss or gradient norm: no update, then stop or skip (module docstring)."""
        if self.par.pipeline is not None:  # the norm of every stage's gradients, the same on every rank
            grad_norm = self.par.pipeline.clip_grad_norm_(self.cfg.optim.grad_clip)
            scaler = None
        else:  # the norm of the whole gradient (reduced over the ranks), read before the update
            grad_norm = float(engine.clip_gradients(self.model, self.optimizer, grad_clip=self.cfg.optim.grad_clip,
                                                    scaler=self.scaler))
            scaler = self.scaler
        row = {**metrics, "lr": self.lr, "grad_norm": grad_norm}
        loss = metrics.get("loss")
        bad = ("loss" if loss is not None and not math.isfinite(loss) else
               "grad_norm" if scaler is None and not math.isfinite(grad_norm) else None)  # fp16: the scaler's
        if bad is None:
            engine.apply_update(self.optimizer, scaler=scaler)
            self._skipped_in_a_row = 0
        else:
            engine.skip_update(self.optimizer, scaler=scaler)
            self.skipped_steps += 1
            self._skipped_in_a_row += 1
            if self.on_nonfinite != "skip" or self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                self._log({"step": self._step + 1, **row, "nonfinite": bad})
                what = (f"the loss is {_shown(loss)}" if bad == "loss" else
                        f"the gradient norm is {_shown(grad_norm)} (the loss {loss:.4g})")
                if self.on_nonfinite == "skip":
                    what += f", the {MAX_SKIPPED_IN_A_ROW}th such step in a row (on_nonfinite=skip)"
                    tail = "no model is saved"
                else:
                    tail = "the update was not applied and no model is saved"
                    if self.par.pipeline is None:
                        tail += "; on_nonfinite=skip skips such steps"
                self._stop(f"step {self._step + 1}: {what}: training diverged ({self._causes()}); {tail}; "
                           f"{self._kept()}")
        if self.on_nonfinite == "skip":
            row["skipped_steps"] = self.skipped_steps
        self._row = row
        self._tokens = tokens * self.par.dp  # every replica's
        return self._row

    def _causes(self) -> str:
        shown = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                 for k in LOSS_SETTINGS if (v := getattr(self.cfg, k, None)) not in (None, [], (), 0)]
        loss = f"a loss setting ({', '.join(shown)}), " if shown else ""
        return f"likely causes: a learning rate too high (optim.lr={self.cfg.optim.lr:g}), {loss}a bad data row"

    def _kept(self) -> str:
        if self._last_checkpoint is None:
            return "no checkpoint was written before it"
        return (f"the checkpoint of step {self._last_checkpoint} is kept: resume=auto continues from it (a lower "
                "optim.lr allowed), overwrite=true starts over")

    def _stop(self, message: str) -> None:
        """End the run with `message`: the bar and metrics closed, the output directory released
        (what was written stays: metrics rows, checkpoints)."""
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        self.run_dir.release()
        raise Diverged(message)

    def check_weights(self, when: str) -> None:
        """Stop if a trained weight holds a NaN or an Inf, on every rank alike (each checks its own
        shard; the count is summed over all ranks)."""
        bad = engine.nonfinite_parameters(self.model)
        count = len(bad)
        if self.par.distributed and dist.is_initialized():  # (not after `finish` closed the group)
            total = torch.tensor([float(count)], device=self.par.device)
            dist.all_reduce(total)  # every rank: shards of one weight may sit on different ranks
            count = int(total.item())
        if count:
            named = f"'{bad[0]}'" if bad else "on another rank"
            more = f" and {count - 1} more" if count > 1 else ""
            self._stop(f"{when}: the trained weights hold NaN or Inf ({named}{more}): training diverged "
                       f"({self._causes()}); it is not saved; {self._kept()}")

    def _end_step(self, done: int, seconds: float) -> None:
        cfg, row = self.cfg, self._row
        self.train_seconds += seconds
        self.train_tokens += self._tokens
        for phase, spent in self._step_phases.items():
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + spent
        self._window.append((seconds, self._step_phases, self._tokens))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{self.lr:.2e}")
        last = done == self.max_steps
        log_now = done % cfg.logging.every == 0 or last
        eval_now = last or (cfg.logging.eval_every and done % cfg.logging.eval_every == 0)
        if log_now or eval_now:
            tokens = sum(n for _, _, n in self._window)
            train_seconds = sum(phases["train"] for _, phases, _ in self._window)
            tokens_per_second = tokens / train_seconds  # the train phase's: what the FLOPs per token count
            full = {"step": done, **row, "tokens_per_second": tokens_per_second}
            if self.peak_flops:
                full["mfu"] = self._mfu(tokens_per_second)
            if self._phase_names:
                full["step_tokens_per_second"] = tokens / sum(s for s, _, _ in self._window)
            for phase in ("train", *self._phase_names):  # seconds per step over the window
                full[f"time/{phase}"] = sum(phases.get(phase, 0.0) for _, phases, _ in self._window) / len(self._window)
            full["memory_mb"] = engine.peak_memory_mb(self.device)
            self._window = []
            if cfg.logging.progress and not self.interactive and self.main:
                mfu = f" mfu {full['mfu']:.1%}" if full.get("mfu") is not None else ""
                print(f"step {done}/{self.max_steps} loss {row['loss']:.4f} lr {self.lr:.2e} "
                      f"{tokens_per_second:,.0f} tok/s{mfu}", file=sys.stderr)
            if eval_now and self._evaluate is not None:
                result = self.evaluate(done)
                full.update(result)
                self._check_held_out(done, result, full)
            self._log_row(full)
        if last or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
            self.save_checkpoint(done)

    def _mfu(self, tokens_per_second: float) -> float | None:
        """Model FLOPs utilisation against the peak of every device (each measured, or given, alike).

        Above 100% the peak is an under-estimate, never a real figure: a measured peak is measured
        once more (the larger of the two is kept); if the MFU still exceeds 1, or the peak was
        given by `peak_flops`, the row logs `mfu: null` and a warning says why, once."""
        def mfu() -> float:
            return tokens_per_second * self.flops_per_token / (self.peak_flops * self.par.world_size)

        if mfu() <= 1.0:
            return mfu()
        if not self.cfg.peak_flops and not self._peak_remeasured:
            self._peak_remeasured = True
            self.peak_flops = max(self.peak_flops, engine.measure_matmul_peak(self.device, self._peak_dtype))
            if mfu() <= 1.0:
                return mfu()
        if not self._mfu_warned and self.main:
            self._mfu_warned = True
            source = (f"peak_flops={self.cfg.peak_flops:g}" if self.cfg.peak_flops
                      else "the matmul peak measured on this device, twice")
            warnings.warn(f"MFU came out at {mfu():.0%}: the peak it divides by ({self.peak_flops / 1e12:.4g} TFLOP/s, "
                          f"{source}) is below what this run reaches, so mfu is logged as null; give the "
                          f"device's peak FLOP/s with peak_flops=", stacklevel=3)
        return None

    # ------------------------------------------------------------------------- evaluation, checkpoints, files

    def evaluate(self, step: int) -> dict:
        """Run the recipe's evaluation; print its numbers; remember them for the summary."""
        if self._evaluate is None:
            return {}
        result = self._evaluate(step)
        self.last_eval = result
        shown = " ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))
        if self.main:
            self.bar.write(f"eval step {step}: {shown}", file=sys.stderr)
        return result

    def _check_held_out(self, step: int, result: dict, row: dict) -> None:
        """Finite training losses so far, but weights that give a NaN on held-out data: log `row`
        (marked) and stop. Run after each evaluation, before that step's checkpoint."""
        broken = [k for k, v in result.items() if isinstance(v, float) and (
            ("loss" in k and not math.isfinite(v)) or ("ppl" in k and math.isnan(v)))]
        if broken:
            self._log({**row, "nonfinite": broken[0]})
            self._stop(f"step {step}: the held-out {broken[0]} is {_shown(result[broken[0]])}: the weights diverged "
                       f"({self._causes()}); no model is saved; {self._kept()}")

    def save_checkpoint(self, step: int) -> Path:
        """A checkpoint of this step (never of weights holding a NaN or an Inf)."""
        self.check_weights(f"step {step}")
        path = self._write_checkpoint(step)
        self._last_checkpoint = step
        return path

    def _write_checkpoint(self, step: int) -> Path:
        state = {k: obj.state_dict() for k, obj in self.stateful.items()}
        state = {**state, "skipped_steps": self.skipped_steps, "run": self.identity, "config": to_dict(self.cfg)}
        if self.par.distributed:  # sharded tensors through torch.distributed.checkpoint; every rank's data position
            return ckpt.save_distributed_checkpoint(self.checkpoints, step, model=self.model, optimizer=self.optimizer,
                                                    keep_last=self.cfg.checkpoint.keep_last, state=state, par=self.par)
        return ckpt.save_checkpoint(self.checkpoints, step, model=self.model, optimizer=self.optimizer,
                                    keep_last=self.cfg.checkpoint.keep_last, state=state)

    def _log_row(self, row: dict) -> None:
        """Log a cadence row (not a divergence's), with what `on_log` adds to it."""
        if self.on_log is not None:
            row.update(self.on_log(row))
        self._log(row)

    def _log(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(row)

    def summary(self) -> dict[str, Any]:
        """What every run reports: steps, time (`train_seconds`: the whole steps'; with named phases,
        `time`: the seconds of each phase), throughput (over the train phase), peak memory, the
        final evaluation (and under `before` the evaluation at the start, when there was one)."""
        result: dict[str, Any] = {"steps": self.max_steps, "train_seconds": self.train_seconds,
                                  "train_tokens": self.train_tokens}
        if self.on_nonfinite == "skip":
            result["skipped_steps"] = self.skipped_steps
        if self.phase_seconds["train"]:
            result["tokens_per_second"] = self.train_tokens / self.phase_seconds["train"]
        if self._phase_names:
            result["time"] = dict(self.phase_seconds)
        result["peak_memory_mb"] = engine.peak_memory_mb(self.device)
        result.update({k: v for k, v in self.last_eval.items() if k != "samples"})
        if self.first_eval:
            result["before"] = {k: v for k, v in self.first_eval.items() if k != "samples"}
        return result

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write `summary.json` (the shared summary, then the recipe's own keys) and return it (the
        CLI prints it: a few readable lines, or with --json this dict; `temper.report.summary`)."""
        summary = {**self.summary(), **summary}
        if self.par.distributed:
            summary["parallel"] = self.par.describe()
        if self.main:
            self.metrics.close()
            self.run_dir.finish(summary)
        self.par.barrier()
        self.par.close()
        return summary

    def export_model(self) -> torch.nn.Module | dict[str, torch.nn.Module] | None:
        """The trained model as one plain module for saving as a model directory (a dict of them
        for several named modules, or a `ModuleGroup`): the model itself in one process; in several, every rank takes
        part in gathering the full weights and rank 0 gets a plain copy (the others None). Weights
        holding a NaN or an Inf are refused (`check_weights`), on every rank alike."""
        self.check_weights(f"after step {self.max_steps}")
        if isinstance(self.model, torch.nn.Module):
            return export_model(self.model, self.par)
        plain = {name: export_model(module, self.par) for name, module in self.model.items()}
        return plain if self.main else None


def _shown(value: float) -> str:
    return "NaN" if math.isnan(value) else "infinite" if math.isinf(value) else f"{value:.4g}"


def run_identity(cfg: Any, model: torch.nn.Module | dict[str, torch.nn.Module], extra: dict[str, Any]) -> dict[str, Any]:
    """The facts a checkpoint must share with the run that resumes it (JSON-able). Several named
    modules: each one's config under `model` as `NAME.key`."""
    identity: dict[str, Any] = {k: getattr(cfg, k) for k in IDENTITY_KEYS if hasattr(cfg, k)}
    described: dict[str, Any] = {}
    core = unwrap(model) if isinstance(model, torch.nn.Module) else None
    for prefix, module in ([(f"{name}.", m) for name, m in core.parts.items()] if isinstance(core, ModuleGroup) else
                           [("", model)] if isinstance(model, torch.nn.Module) else
                           [(f"{name}.", m) for name, m in model.items()]):
        config = getattr(module, "config", None)
        if dataclasses.is_dataclass(config):
            described.update({prefix + k: v for k, v in dataclasses.asdict(config).items() if k != "extra"})
    if described:
        identity["model"] = described
    identity.update(extra)
    return json.loads(json.dumps(identity))  # tuples -> lists, as they come back from state.json


def check_same_run(checkpoint: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another run, naming every key that differs."""
    saved = json.loads((Path(checkpoint) / "state.json").read_text(encoding="utf-8")).get("run")
    if saved is None:  # written before runs carried an identity
        return
    differ = []
    for key in sorted(set(saved) | set(identity)):
        a, b = saved.get(key), identity.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differ += [f"{key}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            shown = "changed" if isinstance(a, str) and len(a) > 24 else f"{a!r} -> {b!r}"
            differ.append(f"{key} {shown}")
    if differ:
        raise TemperError(f"{checkpoint} belongs to another run ({'; '.join(differ)}): resume it with the same "
                          "settings, or overwrite=true to start over")
