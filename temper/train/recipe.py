"""The recipe skeleton: the keys every training recipe shares, declared once, and the steps
every recipe calls in order. A recipe still reads top to bottom:

    @dataclass
    class Config(TrainingConfig):
        capabilities: ClassVar = Capabilities(peft=True)
        model: str = shared("model", "runs/sft")            # a shared key, this recipe's default
        beta: float = opt(0.1, "...")                        # the recipe's own keys
        peft: PeftConfig = shared("peft", PeftConfig())

    def run(cfg):
        run = start(cfg)                                     # claim output_dir, device, ranks, seed
        policy = load_policy(cfg, run)                       # model, tokenizer, lineage
        ...                                                  # the recipe's data
        trainable = make_trainable(policy.model, cfg, run, tokenizer=policy.tokenizer)
        loop = TrainLoop(cfg, "NAME", run.out, trainable.model, trainable.optimizer, ...)
        for _ in loop: ...                                   # the recipe's loss
        save_outputs(loop, cfg, "NAME", policy.tokenizer, policy.lineage)
        return loop.finish({...})

`TrainingConfig.validate` holds the checks every recipe shares and the refusals that follow
from a recipe's `capabilities` (tensor or pipeline parallelism, PEFT, PEFT with FSDP), so one
mistake reads the same in every command. A recipe adds its own checks after
`super().validate()`. Keys that several (not all) recipes share, such as `peft`,
`general_data` or `skip_bad_rows`, take their help text from `SHARED_HELP` too.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from temper.config import (
    CheckpointConfig,
    LoggingConfig,
    OnlyWith,
    OptimConfig,
    PeftConfig,
    ScheduleConfig,
    check_range,
    field_default,
    opt,
)
from temper.data.readers import SUPPORTED_SUFFIXES, TEXT_SUFFIXES
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.eval.hacking import WatchConfig
from temper.lineage import read_lineage, write_lineage
from temper.models import load_model, registry, save_model
from temper.models.hf import config_from_hf, read_hf_config
from temper.models.reward import REWARD_ARCHITECTURES
from temper.peft import apply_peft, save_peft
from temper.runtime import resolve_device, seed_everything
from temper.train import engine
from temper.train.distributed import (
    ModuleGroup,
    Parallel,
    ParallelConfig,
    check_precision,
    global_batch,
    wrap_model,
)
from temper.train.optim import build_optimizer
from temper.train.rundir import RunDir

# One help text per key, whichever recipe declares it.
SHARED_HELP: dict[str, str] = {
    "model": "the model to train: a model directory (temper or Hugging Face format), or a preset name where the "
             "recipe starts from random weights",
    "data": f"training data: {'/'.join(SUPPORTED_SUFFIXES)} files (rows of the recipe's formats; "
            f"{'/'.join(TEXT_SUFFIXES)} give `text` rows), globs or directories (empty: the built-in world's split "
            "for this method, recorded with the model)",
    "eval_data": "held-out data (empty: the built-in world's test split, or eval_fraction of data)",
    "eval_fraction": "share of data held out for evaluation when eval_data is empty",
    "output_dir": "where the model directory, metrics and checkpoints go",
    "seq_len": "longest training sequence in tokens; a longer example is cut, never dropped: its prompt keeps its "
               "end (down to seq_len/2), then its reply keeps its start (pretraining: tokens per window)",
    "batch_size": "examples per micro-batch on each rank (the recipe's unit: sequences, conversations or pairs)",
    "grad_accum": "micro-batches per optimiser step",
    "global_batch_size": "examples per optimiser step over all ranks (0: batch_size x grad_accum x data-parallel "
                         "ranks); when set, grad_accum follows from it",
    "max_steps": "optimiser steps",
    "seed": "seed for initialisation, data order and sampling",
    "resume": "'' starts fresh; 'auto' continues from the newest valid checkpoint; or a checkpoint path",
    "overwrite": "start over in an output_dir that holds an earlier run (its checkpoints and metrics go)",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "precision": "auto: bf16 on a GPU; on a CPU, bf16 autocast where its bf16 matmuls measure >= 1.5x fp32's "
                 "(AVX512_BF16, AMX), else fp32 (TEMPER_AUTO_PRECISION=fp32|bf16 skips the measurement)",
    "compile": "torch.compile the model",
    "activation_checkpointing": "recompute block activations in backward to save memory",
    "strategy": "none (one process), ddp, fsdp, or auto: ddp under torchrun (fsdp with parallel.tp alone), else none",
    "parallel": "tensor / pipeline parallelism (where the recipe has them) and FSDP options",
    "eval_batches": "batches of held-out text per perplexity evaluation (0: all)",
    "peak_flops": "the device's peak FLOP/s for MFU (0: measure a matmul now)",
    "optim": "optimiser",
    "schedule": "learning-rate schedule",
    "checkpoint": "checkpointing",
    "logging": "logging and evaluation",
    "on_nonfinite": "a step whose loss or gradient norm is NaN or infinite: stop (the run ends there, its checkpoints "
                    "kept, no model saved) or skip (no update, counted as skipped_steps; 5 in a row still stop)",
    # keys several recipes share
    "peft": "parameter-efficient training (peft.method=lora|dora|qlora|adapter|prefix|prompt)",
    "general_data": "general text for the drift perplexity (and replay) (default: the pretraining shards recorded "
                    "with the model)",
    "columns": "rename columns to temper's, e.g. columns.prompt=question",
    "skip_bad_rows": "skip bad rows (an empty answer, a malformed conversation, ...), count them and warn naming the "
                     "first of each reason (false: stop at the first bad row)",
    "max_bad_row_fraction": "stop when more than this share of the rows read is bad (skipped rows are expected to "
                            "be few; many mean a wrong format or columns=)",
    "template": "chat template: chatml, llama3, plain, a .jinja file, or none (default: the model's)",
    "watch": "the reward-hacking watch of online methods (temper.eval.hacking): warn and mark the log when the "
             "reward climbs while the held-out signal does not, or completions drift far from the reference's length",
}

SHARED_KEYS = ("model", "data", "eval_data", "eval_fraction", "output_dir", "seq_len", "batch_size", "grad_accum",
               "global_batch_size", "max_steps", "seed", "resume", "overwrite", "device", "precision", "compile",
               "activation_checkpointing", "strategy", "parallel", "eval_batches", "peak_flops", "optim", "schedule",
               "checkpoint", "logging", "on_nonfinite")


def shared(key: str, default: Any) -> Any:
    """A field of a shared key: the recipe's default, the one help text."""
    return opt(default, SHARED_HELP[key])


@dataclass(frozen=True)
class Capabilities:
    """What a recipe supports beyond one process with DDP or FSDP; the rest is refused in one line."""

    tensor_parallel: bool = False
    pipeline: bool = False
    peft: bool = False
    peft_with_fsdp: bool = False


# The keys several (not all) recipes share, with their types: a recipe that has one names it in `defaults`.
SHARED_TYPES: dict[str, Any] = {"peft": PeftConfig, "general_data": list[str], "columns": dict,
                                "skip_bad_rows": bool, "max_bad_row_fraction": float, "template": str | None,
                                "watch": WatchConfig}


@dataclass
class TrainingConfig:
    """The keys every training recipe has, with one meaning (and one help text) each.

    A recipe's config is a subclass that names its command, its capabilities and its defaults:

        @dataclass
        class Config(TrainingConfig, command="sft", capabilities=Capabilities(peft=True),
                     defaults=dict(max_steps=400, peft={}, optim=dict(lr=3e-4))):
            loss_on: str = opt("completion", "...")         # the recipe's own keys

    `defaults` changes a shared key's default (its type and help stay the ones declared here) or
    adds one of the keys several recipes share (`SHARED_TYPES`), so a key never has two help texts; a
    section's default is given as the keys that differ from the section's own defaults.
    """

    command: ClassVar[str] = "train"
    capabilities: ClassVar[Capabilities] = Capabilities()
    only_with: ClassVar = (
        OnlyWith(("eval_fraction",), "data= and no eval_data=", lambda c: bool(c.data) and not c.eval_data,
                 "it holds out a share of data= when eval_data= is empty (the built-in world brings its own "
                 "held-out split): give one of them"),
        OnlyWith(("parallel.pp_schedule",), "parallel.pp > 1", lambda c: c.parallel.pp > 1),
        OnlyWith(("parallel.reshard_after_forward", "parallel.cpu_offload"), "strategy=fsdp (or auto under torchrun)",
                 lambda c: c.strategy in ("fsdp", "auto")),
    )
    # the settings a resumed run may change (how long, how fast, where, how logged); every other one
    # must be the checkpoint's (checked at the claim, before any cache is built); a recipe adds its own
    resume_may_change: ClassVar[tuple[str, ...]] = (
        "max_steps", "resume", "overwrite", "output_dir", "device", "precision", "compile", "activation_checkpointing",
        "strategy", "parallel", "eval_batches", "peak_flops", "optim", "schedule", "checkpoint", "logging",
        "batch_size", "grad_accum", "global_batch_size")

    def __init_subclass__(cls, *, command: str | None = None, capabilities: Capabilities | None = None,
                          defaults: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if command is not None:
            cls.command = command
        if capabilities is not None:
            cls.capabilities = capabilities
        base = typing.get_type_hints(TrainingConfig)
        shared_fields: dict[str, Any] = {}
        for key, value in (defaults or {}).items():
            if key not in base and key not in SHARED_TYPES:
                raise TypeError(f"{cls.__name__}: defaults names {key!r}, which is not a shared key")
            shared_fields[key] = kind = base.get(key, SHARED_TYPES.get(key))
            if dataclasses.is_dataclass(kind) and isinstance(value, dict):  # a section: its defaults, changed here
                start = field_default(TrainingConfig, key) if key in base else kind()
                value = dataclasses.replace(start, **value)
            setattr(cls, key, shared(key, value))  # the field @dataclass then finds: this default, the one help
        own = dict(cls.__dict__.get("__annotations__", {}))
        cls.__annotations__ = {**shared_fields, **{k: v for k, v in own.items() if k not in shared_fields}}

    model: str = shared("model", "")
    data: list[str] = shared("data", [])
    eval_data: list[str] = shared("eval_data", [])
    eval_fraction: float = shared("eval_fraction", 0.05)
    output_dir: str = shared("output_dir", "runs/run")
    seq_len: int = shared("seq_len", 512)
    batch_size: int = shared("batch_size", 8)
    grad_accum: int = shared("grad_accum", 1)
    global_batch_size: int = shared("global_batch_size", 0)
    max_steps: int = shared("max_steps", 100)
    seed: int = shared("seed", 0)
    resume: str = shared("resume", "")
    overwrite: bool = shared("overwrite", False)
    device: str = shared("device", "auto")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = shared("precision", "auto")
    compile: bool = shared("compile", False)
    activation_checkpointing: bool = shared("activation_checkpointing", False)
    strategy: str = shared("strategy", "auto")
    parallel: ParallelConfig = shared("parallel", ParallelConfig())
    eval_batches: int = shared("eval_batches", 8)
    peak_flops: float = shared("peak_flops", 0.0)
    optim: OptimConfig = shared("optim", OptimConfig())
    schedule: ScheduleConfig = shared("schedule", ScheduleConfig())
    checkpoint: CheckpointConfig = shared("checkpoint", CheckpointConfig())
    logging: LoggingConfig = shared("logging", LoggingConfig())
    on_nonfinite: Literal["stop", "skip"] = shared("on_nonfinite", "stop")

    def validate(self) -> None:
        """The checks every recipe shares; a recipe calls this first, then checks its own keys."""
        name, caps = self.command, self.capabilities
        if not self.model:
            raise TemperError("model= is required: the model directory to train")
        for key in ("batch_size", "grad_accum", "max_steps", "seq_len"):
            check_range(key, getattr(self, key), low=1)
        for key in ("global_batch_size", "eval_batches", "peak_flops"):
            check_range(key, getattr(self, key), low=0)
        check_range("eval_fraction", self.eval_fraction, low=0.0, high=1.0, high_open=True)
        if hasattr(self, "max_bad_row_fraction"):
            check_range("max_bad_row_fraction", self.max_bad_row_fraction, low=0.0, high=1.0)
        if self.parallel.tp > 1 and not caps.tensor_parallel:
            raise TemperError(f"parallel.tp: temper {name} has no tensor parallelism yet (temper pretrain has): "
                              "use strategy=fsdp or ddp")
        if self.parallel.pp > 1 and not caps.pipeline:
            raise TemperError(f"parallel.pp: temper {name} has no pipeline parallelism yet (temper pretrain has): "
                              "use strategy=fsdp or ddp")
        method = getattr(getattr(self, "peft", None), "method", "none")
        if method != "none" and not caps.peft:
            raise TemperError(f"peft.method={method}: temper {name} trains every weight")
        if method != "none" and self.strategy == "fsdp" and not caps.peft_with_fsdp:
            raise TemperError(f"peft.method={method} with strategy=fsdp is not supported yet: an adapter's few "
                              "weights train well with strategy=ddp")


# ----------------------------------------------------------------------------- the steps


@dataclass
class Run:
    """What `start` resolved: the output directory, device, precision, ranks and batch split."""

    out: Path
    device: torch.device
    precision: str
    par: Parallel
    grad_accum: int
    global_batch: int

    @property
    def main(self) -> bool:
        return self.par.is_main

    @property
    def autocast(self):
        """The precision's autocast context factory (a null context in fp32)."""
        return engine.precision_context(self.precision, self.device)

    @property
    def agree_first(self):
        """`Parallel.agree` when there are several processes (rank 0 prepares a cache first, then
        every rank reads it), else None."""
        return self.par.agree if self.par.world_size > 1 else None

    def say(self, text: str) -> None:
        """A line on stderr, from rank 0 only."""
        if self.main:
            print(text, file=sys.stderr)


DATA_KEYS = ("data", "eval_data", "general_data")  # a directory of data is an input too


def start(cfg: TrainingConfig, *, inputs: tuple[str, ...] = ("model",)) -> Run:
    """Join the other processes (under torchrun, or with a strategy), claim the output directory
    (one run at a time; rank 0 claims and every rank hears its verdict), refuse to mix this run
    with an earlier one there unless told to continue (`resume=`) or start over
    (`overwrite=true`), resolve device and precision, seed everything.

    `inputs` names the keys of directories the run reads (besides its data, `DATA_KEYS`), which
    output_dir must not be; nor may it hold a model another command wrote (unless
    `overwrite=true`); and a resumed checkpoint must have recorded this run's settings (but
    `resume_may_change`). All of it is checked here, before any cache is built. Nothing of an earlier run is changed here: `TrainLoop` clears an
    overwritten run's files only once the model and data are ready and training starts."""
    for key in inputs:  # every model the run feeds seq_len tokens to has positions enough
        value = getattr(cfg, key, None)
        if value and (Path(value) / "config.json").is_file():
            hf = read_hf_config(value)
            if set(hf.get("architectures") or []) & set(REWARD_ARCHITECTURES):
                continue  # a reward model (PPO's reward_model=): scored sequences are checked where it reads them
            check_positions(cfg.seq_len, config_from_hf(hf, f"{value}/config.json"), f"{key}={value}")
    device = resolve_device(cfg.device)
    if cfg.precision != "auto":  # a wrong one is refused before any process group forms
        engine.resolve_precision(cfg.precision, device)
    par = Parallel(cfg.strategy, cfg.parallel, device)
    # auto may measure the CPU: rank 0 decides for every rank (TrainLoop says what and why once training starts)
    precision = par.agree(engine.resolve_precision, cfg.precision, device)
    check_precision(par, precision)
    run_dir = RunDir(cfg.output_dir)
    try:
        out = Path(par.agree(lambda: str(run_dir.claim(
            resume=cfg.resume, overwrite=cfg.overwrite, command=cfg.command,
            inputs={key: getattr(cfg, key, None) for key in (*inputs, *DATA_KEYS)}, settings=cfg,
            may_change=cfg.resume_may_change))))
    except TemperError:
        par.close()
        raise
    seed_everything(cfg.seed)
    grad_accum, batch = global_batch(cfg, par.dp)
    return Run(out, par.device, precision, par, grad_accum, batch)


def check_positions(seq_len: int, model_config: Any, whose: str, advice: str = "lower seq_len") -> None:
    """Sequences of `seq_len` tokens fit the model's positions, or one line naming both."""
    if seq_len > model_config.max_seq_len:
        raise TemperError(f"seq_len {seq_len} is larger than the context of {whose} ({model_config.max_seq_len} "
                          f"positions): {advice}")


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: Tokenizer
    lineage: dict


def load_policy(cfg: TrainingConfig, run: Run, path: str | None = None) -> Policy:
    """The model to train (fp32 master weights), its tokenizer and its lineage."""
    path = path or cfg.model
    model = load_model(path, device=run.device, dtype=torch.float32)
    registry.family(model.config.family).require_causal_lm(model.config, f"model={path}")
    return Policy(model, Tokenizer.from_dir(path), read_lineage(path))


@dataclass
class Trainable:
    model: torch.nn.Module | dict[str, torch.nn.Module]  # wrapped for the strategy (DDP, FSDP, ...)
    optimizer: torch.optim.Optimizer
    flops_per_token: float
    trainable_parameters: int
    total_parameters: int


def make_trainable(model: torch.nn.Module | dict[str, torch.nn.Module], cfg: TrainingConfig, run: Run, *,
                   tokenizer: Tokenizer | None = None, flops_factor: float = 1.0,
                   peft_modules: tuple[str, ...] | dict[str, PeftConfig] | None = None,
                   shared: bool = False, **wrap_options: Any) -> Trainable:
    """PEFT (when the config has a `peft` section), training mode, FLOPs per token (times
    `flops_factor` for work the recipe adds, e.g. a reference model's forward), the strategy's
    wrapping and the optimiser over what trains.

    `model` may be a dict of named modules trained together (PPO's policy and value model): each is
    wrapped on its own, ONE optimiser covers them all (`TrainLoop` takes the same dict), their FLOPs per
    token add up and so do their parameter counts. PEFT (the config's `peft` section) goes to the modules
    named in `peft_modules` (default: every one), or each module named in a dict gets the PEFT config
    given there (a value model's adapter keeping its head in modules_to_save); the others train in full.
    `shared=True`: the modules share parameters (ELECTRA's generator and discriminator their
    embeddings), so they are wrapped together as one `ModuleGroup`, which the returned model is:
    call it as `model(name, ...)`."""
    if isinstance(model, dict):
        section = getattr(cfg, "peft", None)
        configs = dict(peft_modules) if isinstance(peft_modules, dict) else \
            {name: section for name in (tuple(model) if peft_modules is None else peft_modules)}
        unknown = sorted(set(configs) - set(model))
        assert not unknown, f"peft_modules names {unknown}, not among {sorted(model)}"
        parts = {name: _prepare(module, run, tokenizer, configs.get(name), name, cfg.seq_len)
                 for name, module in model.items()}
        options = dict(precision=run.precision, activation_checkpointing=cfg.activation_checkpointing,
                       compile=cfg.compile, **wrap_options)
        if shared:
            wrapped = wrap_model(ModuleGroup({name: module for name, (module, _, _, _) in parts.items()}), run.par,
                                 **options)
        else:
            wrapped = {name: wrap_model(module, run.par, **options) for name, (module, _, _, _) in parts.items()}
        return Trainable(wrapped, build_optimizer(wrapped, cfg.optim),
                         sum(p[1] for p in parts.values()) * flops_factor, sum(p[2] for p in parts.values()),
                         sum(p[3] for p in parts.values()))
    model, flops, trainable, total = _prepare(model, run, tokenizer, getattr(cfg, "peft", None), None, cfg.seq_len)
    model = wrap_model(model, run.par, precision=run.precision, activation_checkpointing=cfg.activation_checkpointing,
                       compile=cfg.compile, **wrap_options)
    return Trainable(model, build_optimizer(model, cfg.optim), flops * flops_factor, trainable, total)


def _prepare(model: torch.nn.Module, run: Run, tokenizer: Tokenizer | None, peft: PeftConfig | None,
             name: str | None, seq_len: int) -> tuple[torch.nn.Module, float, int, int]:
    """One module's PEFT (None: none), training mode, FLOPs per token and (trainable, total) parameter counts."""
    if peft is not None:
        info = apply_peft(model, peft, tokenizer)
        trainable, total = info["trainable"], info["total"]
        whose = f"{name}: " if name else ""
        run.say(f"{whose}trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}); "
                f"peft.method={peft.method} | {run.par.describe()}")
    else:
        trainable = total = sum(p.numel() for p in model.parameters())
        if name:
            run.say(f"{name}: trainable parameters: {trainable:,} (all)")
    model.train()
    return model, engine.flops_per_token(model, seq_len), trainable, total


def save_outputs(loop: Any, cfg: TrainingConfig, stage: str, tokenizer: Tokenizer, lineage: dict, *,
                 eos_ids: list[int] | None = None, template: str | None = None, module: str = "policy"
                 ) -> torch.nn.Module | dict[str, torch.nn.Module] | None:
    """The trained model as a model directory, or only its adapter with PEFT (`temper merge` folds
    a LoRA in), plus its lineage; written by rank 0, which gets the plain model back (others None).
    A loop of several modules saves the one named `module` and returns the dict of them all (the
    recipe writes the others where it wants them)."""
    exported = loop.export_model()
    if exported is None:
        return None
    plain = exported[module] if isinstance(exported, dict) else exported
    peft = getattr(cfg, "peft", None)
    if peft is None or peft.method == "none":
        save_model(plain, loop.out, tokenizer=tokenizer, eos_ids=eos_ids)
    else:
        save_peft(plain, loop.out, peft, base_model=str(Path(cfg.model).resolve()))
        tokenizer.save(loop.out)
    method = peft.method if peft is not None else "none"
    write_lineage(loop.out, {**lineage, "stage": stage, "parent": cfg.model, "chat_template_trained": template,
                             **({"peft": method} if peft is not None else {})})
    return exported

