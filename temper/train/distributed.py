"""Training on several processes with PyTorch's own distributed stack, launched by `torchrun`.

    torchrun --nproc-per-node 8 -m temper pretrain strategy=fsdp            # one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m temper pretrain strategy=fsdp parallel.tp=2   # two machines

Everything is applied from outside the model (`wrap_model`), in this order:
1. tensor parallelism (`parallel.tp`): DTensor `parallelize_module` of each block, column-wise
   q/k/v/gate/up and row-wise o/down (`temper.train.tensor_parallel`);
2. activation checkpointing: the model's own flag;
3. data parallelism over the `dp` dimension of the device mesh:
   - `strategy=ddp`: `DistributedDataParallel`; the micro-batches of an accumulated step run
     under `no_sync`, so gradients are all-reduced once per optimiser step;
   - `strategy=fsdp`: FSDP2 `fully_shard` per transformer block, then the root (parameters,
     gradients and optimiser states sharded: ZeRO-3); `parallel.reshard_after_forward=false`
     keeps the gathered parameters from forward to backward (ZeRO-2-like: more memory, less
     communication); `parallel.cpu_offload=true` keeps the shards on the CPU;
     `precision=bf16` becomes FSDP's mixed-precision policy (bf16 parameters for compute,
     fp32 gradient reduction, fp32 master shards).
Pipeline parallelism (`parallel.pp`, pretraining) splits the blocks into stages
(`temper.train.pipeline`), after tensor parallelism when both are asked for (3-D: pp x dp x
tp); replicas of the pipeline sum their gradients over the data-parallel ranks.

Normalisation. The loss of a step is sum(unit losses) / (units in the whole global batch):
`engine.accumulate` all-reduces the count over the data-parallel ranks and divides. DDP and
FSDP *average* gradients over those ranks, so the loop passes `grads_averaged_over=dp` and
accumulate multiplies it back: the gradient equals one process's on the same global batch
(tested against a single process in tests/test_distributed.py).

One process (no `torchrun`) is `strategy=none` unless a strategy is asked for, in which case
a one-process group is made (useful to resume a multi-process checkpoint on one machine with
the same code path). Rank 0 alone writes files, logs and shows progress; the others compute.
A failure on one rank is printed with its rank and ends its process with an error, and
torchrun then stops every other rank; mistakes in the config are found before the first
collective call, identically on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from temper.config import check_range, opt
from temper.errors import TemperError, error_line
from temper.models import _finish_meta_load, build_model, registry
from temper.train import engine
from temper.train.pipeline import PipelineRunner

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class ParallelConfig:
    tp: int = opt(1, "tensor-parallel degree: each block's matmuls split over this many ranks (DTensor)")
    pp: int = opt(1, "pipeline-parallel degree: the blocks split into this many stages (pretraining)")
    pp_schedule: str = opt("1f1b", "pipeline schedule over the micro-batches: gpipe or 1f1b")
    reshard_after_forward: bool = opt(True, "fsdp: free gathered parameters after forward (ZeRO-3); false: ZeRO-2-like")
    cpu_offload: bool = opt(False, "fsdp: keep parameter, gradient and optimiser shards on the CPU")
    timeout_minutes: float = opt(10.0, "how long a collective waits for the other ranks before failing")

    def validate(self) -> None:
        check_range("parallel.tp", self.tp, low=1)
        check_range("parallel.pp", self.pp, low=1)
        check_range("parallel.timeout_minutes", self.timeout_minutes, low=0.0, low_open=True)
        if self.pp_schedule not in ("gpipe", "1f1b"):
            raise TemperError(f"parallel.pp_schedule must be gpipe or 1f1b, got {self.pp_schedule!r}")


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def check_layout(strategy: str, parallel: ParallelConfig, world_size: int) -> tuple[str, int]:
    """(resolved strategy, data-parallel degree), or one line saying what does not fit.
    Pure: every rank reaches the same verdict before any collective call."""
    if strategy not in STRATEGIES:
        raise TemperError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "auto":
        strategy = "none" if world_size == 1 and parallel.tp == 1 and parallel.pp == 1 else \
            ("fsdp" if parallel.tp > 1 and parallel.pp == 1 else "ddp")
    if strategy == "none":
        if world_size > 1:
            raise TemperError(f"strategy=none runs one process, but torchrun started {world_size}: "
                              "use strategy=ddp or strategy=fsdp (or auto)")
        if parallel.tp > 1 or parallel.pp > 1:
            raise TemperError("parallel.tp and parallel.pp need several processes: launch with torchrun "
                              "and strategy=ddp or fsdp")
        return strategy, 1
    model_parallel = parallel.tp * parallel.pp
    if world_size % model_parallel:
        raise TemperError(f"{world_size} processes cannot form a mesh of parallel.tp={parallel.tp} x "
                          f"parallel.pp={parallel.pp}: the world size must be a multiple of {model_parallel}")
    if strategy == "ddp" and parallel.tp > 1 and parallel.pp == 1:
        raise TemperError("parallel.tp composes with strategy=fsdp (a 2-D mesh), not ddp: use strategy=fsdp")
    if strategy == "fsdp" and parallel.pp > 1:
        raise TemperError("parallel.pp runs pipeline replicas with strategy=ddp (their gradients summed over the "
                          "data-parallel ranks), not fsdp")
    return strategy, world_size // model_parallel


def global_batch(cfg: Any, dp: int) -> tuple[int, int]:
    """(grad_accum, sequences per optimiser step over all ranks). `global_batch_size` > 0 fixes
    the global batch and derives grad_accum = global / (batch_size x dp), so the same config
    trains the same steps on any number of ranks; 0 keeps grad_accum as given."""
    per_pass = cfg.batch_size * dp
    if not cfg.global_batch_size:
        return cfg.grad_accum, per_pass * cfg.grad_accum
    if cfg.grad_accum != 1:
        raise TemperError("give global_batch_size or grad_accum, not both: grad_accum follows from "
                          "global_batch_size / (batch_size x data-parallel ranks)")
    if cfg.global_batch_size % per_pass:
        raise TemperError(f"global_batch_size={cfg.global_batch_size} is not a multiple of batch_size x "
                          f"data-parallel ranks = {cfg.batch_size} x {dp} = {per_pass}")
    return cfg.global_batch_size // per_pass, cfg.global_batch_size


class Parallel:
    """How this process takes part: its rank, the device mesh (pp, dp, tp) and the strategy."""

    def __init__(self, strategy: str, parallel: ParallelConfig, device: torch.device) -> None:
        self.rank, self.world_size, self.local_rank = launched_world()
        self.strategy, self.dp = check_layout(strategy, parallel, self.world_size)
        self.config, self.tp, self.pp = parallel, parallel.tp, parallel.pp
        self.device = device
        self.mesh = None
        self.pipeline = None  # the PipelineRunner of this rank's stage, when parallel.pp > 1
        self._own_group = False
        if self.strategy == "none":
            return
        if device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
            if "RANK" in os.environ:
                dist.init_process_group(backend, timeout=timeout)
            else:  # one process asked for a strategy: a group of one
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            self._own_group = True
        self.mesh = init_device_mesh(self.device.type, (self.pp, self.dp, self.tp),
                                     mesh_dim_names=("pp", "dp", "tp"))

    # ------------------------------------------------------------------------- facts

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank() if self.mesh is not None else 0

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        dims = f"dp={self.dp}" + (f" tp={self.tp}" if self.tp > 1 else "") + (f" pp={self.pp}" if self.pp > 1 else "")
        return f"{self.world_size} processes, {self.strategy} ({dims})"

    # ------------------------------------------------------------------------- collectives

    def all_reduce_sum(self, value: torch.Tensor, group=None) -> torch.Tensor:
        """Sum over the data-parallel ranks (every rank of a replica holds the same count)."""
        if not self.distributed:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group or self.dp_group)
        return value

    def all_gather_rows(self, value: torch.Tensor) -> torch.Tensor:
        """Every data-parallel rank's `value` (the same shape on each), concatenated along dim 0 in
        rank order: what one process holding the whole batch would hold."""
        if not self.distributed or self.dp == 1:
            return value
        sent = value.to(self.device, torch.uint8 if value.dtype == torch.bool else value.dtype).contiguous()
        parts = [torch.empty_like(sent) for _ in range(self.dp)]
        dist.all_gather(parts, sent, group=self.dp_group)
        return torch.cat(parts).to(value.device, value.dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(self, fn, *args, **kwargs):
        """Run `fn` on rank 0 and give its result (or its error, as the same TemperError) to every
        rank: what one rank decides (claiming the output directory, say) never leaves the
        others waiting in a collective."""
        if not self.distributed or self.world_size == 1:
            return fn(*args, **kwargs)
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn(*args, **kwargs))
            except (ValueError, OSError) as e:
                box[0] = ("error", error_line(e))
        dist.broadcast_object_list(box, src=0)  # our own processes' objects, never a file's
        kind, value = box[0]
        if kind == "error":
            raise TemperError(value if self.is_main else f"{value} (said by rank 0)")
        return value

    def gather_objects(self, value: Any) -> list[Any]:
        if not self.distributed or self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    # ------------------------------------------------------------------------- the model

    def reduce_pipeline_grads(self) -> None:
        """Pipeline replicas (dp > 1) sum their stages' gradients: the loss is already divided by
        the global count, so the sum is the gradient of the whole global batch."""
        if self.dp > 1:
            for p in self.pipeline.module.parameters():
                if p.grad is not None:  # (a tensor-parallel gradient: its local shard)
                    dist.all_reduce(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad, group=self.dp_group)

    def no_sync(self, model: torch.nn.Module, last: bool):
        """Skip the gradient reduction on all but the last micro-batch of a step."""
        if self.strategy == "ddp" and not last:
            return model.no_sync()
        if self.strategy == "fsdp":
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def close(self) -> None:
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False


class ModuleGroup(torch.nn.Module):
    """Named models trained as ONE module because they share parameters (ELECTRA's generator runs
    on the discriminator's embedding modules): a data-parallel wrapper must hold each parameter
    once (two FSDP roots cannot both shard the embeddings; two DDP reducers would both reduce
    their gradient), and every forward pass must go through that wrapper (DDP's reducer, FSDP's
    all-gathers), so `group(name, *args, **kwargs)` runs the model `name`. `wrap_model` sees
    `config` (the first model's: the family's checks) and `blocks` (every model's: FSDP shards
    each, activation checkpointing covers all); `parts` are the models by name."""

    def __init__(self, models: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        assert models, "a ModuleGroup needs at least one model"
        for name, model in models.items():
            self.add_module(name, model)

    @property
    def parts(self) -> dict[str, torch.nn.Module]:
        return dict(self.named_children())

    @property
    def config(self):
        return next(iter(self.children())).config

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return [block for model in self.children() for block in model.blocks]

    @property
    def activation_checkpointing(self) -> bool:
        return all(model.activation_checkpointing for model in self.children())

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        for model in self.children():
            model.activation_checkpointing = value

    def forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.parts[name](*args, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The temper model inside a DDP wrapper (FSDP2 and DTensor work in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap_model(model: torch.nn.Module, par: Parallel, *, precision: str, activation_checkpointing: bool,
               compile: bool, pipeline_microbatches: int = 1, loss_chunk: int = 1024) -> torch.nn.Module:
    """Apply TP, activation checkpointing, compile and DDP/FSDP (see the module docstring); the
    optimiser is built after this, over the parameters it leaves. Returns the module to call
    (under pipeline parallelism: this rank's stage, driven by `par.pipeline`)."""
    # advice that does not apply here: the loss never changes the returned hidden states in place, and
    # a norm over a 2-D mesh of small degrees costs two all-reduces
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    if par.tp > 1:
        # lazy: tensor_parallel imports torch.distributed.tensor at load (~2 s), needed only when tp > 1
        from temper.train.tensor_parallel import apply_tensor_parallel, check_tensor_parallel

        check_tensor_parallel(model.config, par.tp)
        apply_tensor_parallel(model, par.mesh["tp"])
    if activation_checkpointing:
        engine.apply_activation_checkpointing(model)
    if par.pp > 1:
        family = registry.family(model.config.family)
        if not family.causal_lm:
            raise TemperError(f"parallel.pp: pipeline stages cut decoders; a {family.description} model is an "
                              "encoder (use parallel.pp=1)")
        if compile or precision == "fp16":
            raise TemperError("parallel.pp runs without compile, in fp32 or bf16")
        par.pipeline = PipelineRunner(model, n_microbatches=pipeline_microbatches, pp_group=par.mesh["pp"],
                                      schedule=par.config.pp_schedule, dp_group=par.dp_group, loss_chunk=loss_chunk,
                                      autocast=engine.precision_context(precision, par.device), device=par.device)
        return par.pipeline.module
    if compile:
        engine.compile_model(model)
    if par.strategy == "fsdp":
        # lazy: torch.distributed.fsdp takes ~2 s to import; only FSDP runs need it
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        if par.config.cpu_offload and par.device.type != "cuda":
            raise TemperError("parallel.cpu_offload=true moves FSDP's shards from GPU memory to the host; on "
                              f"{par.device.type} they are there already (drop the option)")
        offload = CPUOffloadPolicy() if par.config.cpu_offload else OffloadPolicy()
        options = dict(mesh=par.mesh["dp"], mp_policy=policy, offload_policy=offload)
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=par.config.reshard_after_forward, **options)
        fully_shard(model, **options)
        return model
    if par.strategy == "ddp":
        ids = [par.device.index] if par.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=par.dp_group)
    return model


def check_precision(par: Parallel, precision: str) -> None:
    if par.strategy == "fsdp" and precision == "fp16":
        raise TemperError("precision=fp16 with strategy=fsdp is not supported: use bf16 (FSDP's mixed-precision "
                          "policy: bf16 compute, fp32 reduction)")


def full_state_dict(model: torch.nn.Module, par: Parallel) -> dict[str, torch.Tensor] | None:
    """Every rank takes part; rank 0 gets the model's whole weights on the CPU, under the model's
    own names (DDP's `module.` and FSDP's wrapping left out), the others None."""
    if not par.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # lazy: torch.distributed.checkpoint takes ~2 s to import; only distributed runs need it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if par.is_main else None


def export_model(model: torch.nn.Module, par: Parallel) -> torch.nn.Module | dict[str, torch.nn.Module] | None:
    """A plain (unsharded, unwrapped) copy of the trained model on rank 0's device, for saving
    as a Hugging Face directory and sampling; None on the other ranks. One process: the model.
    A `ModuleGroup`: a dict of its models, each plain (shared tensors as copies of equal values)."""
    core = unwrap(model)
    if isinstance(core, ModuleGroup) and (not par.distributed or par.strategy == "ddp"):
        return core.parts if par.is_main else None
    if not par.distributed:
        return unwrap(model)
    if par.pipeline is not None:  # each stage sends its part to the first stage of its pipeline
        weights = par.pipeline.gather_state_dict(dst=0)
        core = par.pipeline.module.decoder  # its config; its other stages' tensors are on meta
    elif par.strategy == "ddp":  # every rank holds the whole model already
        return unwrap(model) if par.is_main else None
    else:
        weights = full_state_dict(model, par)
    if not par.is_main:
        return None
    if isinstance(core, ModuleGroup):
        return {name: _plain_copy(part, {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")},
                                  par) for name, part in core.parts.items()}
    return _plain_copy(core, weights, par)


def _plain_copy(core: torch.nn.Module, weights: dict[str, torch.Tensor], par: Parallel) -> torch.nn.Module:
    plain = build_model(core.config, device=torch.device("meta"))
    plain.load_state_dict(weights, assign=True, strict=not core.config.tie_embeddings)
    _finish_meta_load(plain, "cpu")
    return plain.to(par.device).train(core.training)
