"""Pipeline parallelism for pretraining, on `torch.distributed.pipelining`.

The model's blocks are split into `pp` contiguous slices, one per rank of the pipeline
group; micro-batches flow through the stages under a GPipe (all forwards, then all
backwards) or 1F1B (one forward, one backward in the steady state: activations of at
most `pp` micro-batches alive at once) schedule (Huang et al. 2019; Narayanan et al. 2021).

    runner = PipelineRunner(model, pp_group=group, n_microbatches=8, schedule="1f1b")
    optimizer = build_optimizer(runner.module, cfg.optim)   # this stage's parameters only
    metrics = runner.step(input_ids, targets)  # every rank passes the whole batch; loss on every rank
    runner.clip_grad_norm_(1.0); optimizer.step(); optimizer.zero_grad()

For pretraining only: every window is attended causally from position 0 (positions 0..T-1,
no mask, no packing mask, no KV cache, no prefix), so each stage can rebuild the rotary
tables it needs from T alone and only hidden states (B, T, C) travel between stages.
Masks or positions are refused.

- Stage 0 embeds the ids (and adds learned positions, for GPT-2), every stage runs its
  blocks, the last stage applies the final norm and returns hidden states (B, T, C); the
  loss is temper's fused chunked cross-entropy against `lm_head.weight`, never full logits.
- Memory per stage is the point: each rank keeps only its stage's parameters; the model's
  other parameters and buffers are moved to the meta device (their storage freed, their
  names kept), so a rank's `model` is no longer usable as a whole model.
- Tied embeddings (embedding weight == output weight): the first and the last stage each
  hold a copy; after the backward pass their gradients are summed between those two ranks
  (Megatron's "embedding group"), so identical copies receive identical updates.
- Normalisation is `engine.accumulate`'s: the gradient is that of the summed token NLL of
  the whole batch (every micro-batch, every data-parallel rank) over the number of target
  tokens in it. The count is known on every rank before the schedule runs (the targets
  are), so each micro-batch's loss is its sum over that global count and gradients add up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from temper.errors import TemperError
from temper.losses.clm import IGNORE_INDEX, fused_linear_cross_entropy
from temper.models.common import AttentionInputs, DecoderBase

SCHEDULES = ("gpipe", "1f1b")


def split_blocks(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """[start, stop) block ranges of `pp` stages, as even as possible; when `num_layers` does
    not divide, the earlier stages take one block more (the last stage also runs the final
    norm and the loss, so it gets the lighter share)."""
    if pp < 1:
        raise TemperError(f"parallel.pp={pp} must be at least 1")
    if pp > num_layers:
        raise TemperError(f"parallel.pp={pp} is more than the model's {num_layers} blocks")
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        stop = start + base + (1 if stage < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def _child_name(model: nn.Module, module: nn.Module) -> str:
    """The attribute name under which `model` holds `module` (its name in the state dict)."""
    for name, child in model.named_children():
        if child is module:
            return name
    raise AssertionError(f"{type(module).__name__} is not a direct child of {type(model).__name__}")


class DecoderStage(nn.Module):
    """Blocks [start, stop) of a temper decoder, plus the embeddings on the first stage and the
    final norm (and output layer, for the loss) on the last.

    forward(input_ids (B, T) on the first stage | hidden (B, T, C) on the others) -> (B, T, C)

    The stage registers the model's own modules under the model's own names (blocks in a
    ModuleDict keyed by their index), so `state_dict()` / `named_parameters()` give the names
    of the full model's state dict: `layers.3.attn.q_proj.weight`, `embed_tokens.weight`.
    Nothing of the model is patched: the stage calls its hooks (`input_embeddings`,
    `_attention_inputs`, `_position_inputs`, `run_blocks`, `final_norm`).
    """

    def __init__(self, model: DecoderBase, start: int, stop: int, *, is_first: bool, is_last: bool) -> None:
        super().__init__()
        assert isinstance(model, DecoderBase), f"{type(model).__name__} is not a temper decoder"
        assert 0 <= start < stop <= len(model.blocks)
        self.__dict__["decoder"] = model  # a plain reference, not a submodule: the stage owns only its slice
        self.start, self.stop, self.is_first, self.is_last = start, stop, is_first, is_last
        self.tied = model.lm_head.weight is model.input_embeddings.weight
        # How positions enter, probed once while the whole model is still here: rotary tables
        # for the attention (every stage needs them; recomputed per stage from T), or learned
        # vectors added to the embeddings (stage 0 alone).
        probe = torch.zeros(1, 1, model.config.hidden_size, device=model.lm_head.weight.device)
        with torch.no_grad():
            probed, rope = model._position_inputs(probe, torch.zeros(1, 1, dtype=torch.long, device=probe.device))
        self.rotary = rope is not None
        assert not (self.rotary and probed is not probe), "a family with rotary *and* added positions"
        core = {id(model.input_embeddings), id(model.blocks), id(model.final_norm), id(model.lm_head)}
        position_modules = {name: m for name, m in model.named_children() if id(m) not in core}
        if is_first:
            self.add_module(_child_name(model, model.input_embeddings), model.input_embeddings)
        if is_first or self.rotary:
            for name, module in position_modules.items():
                assert is_first or next(module.parameters(), None) is None, f"{name}: rotary tables with weights"
                self.add_module(name, module)
        self.add_module(_child_name(model, model.blocks),
                        nn.ModuleDict({str(i): model.blocks[i] for i in range(start, stop)}))
        if is_last:
            self.add_module(_child_name(model, model.final_norm), model.final_norm)
            self.add_module("lm_head", model.lm_head)

    @property
    def checkpoint_names(self) -> dict[str, str]:
        """Names under which checkpoints store this stage's tensors, where they differ from its
        own: the last stage's copy of a tied weight is the embedding (as in a one-stage model),
        so a checkpoint resumes on any number of stages."""
        if not (self.tied and self.is_last and not self.is_first):
            return {}
        model = self.decoder
        return {"lm_head.weight": f"{_child_name(model, model.input_embeddings)}.weight"}

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, C) output projection the last stage's loss multiplies the hidden states by."""
        assert self.is_last
        return self.decoder.lm_head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.decoder
        if self.is_first:
            x = model.input_embeddings(x)  # (B, T) ids -> (B, T, C)
        T = x.shape[1]
        positions, mask, causal = model._attention_inputs(T, x.device, None, None, None)  # 0..T-1
        rope = None
        if self.is_first:
            x, rope = model._position_inputs(x, positions)
        elif self.rotary:
            _, rope = model._position_inputs(x, positions)  # x unchanged: the probe showed it
        x = model.run_blocks(x, AttentionInputs(mask, causal, None, rope), self.start, self.stop)
        return model.final_norm(x) if self.is_last else x  # (B, T, C)


def free_other_parameters(model: nn.Module, keep: nn.Module) -> int:
    """Move every parameter and buffer of `model` that `keep` does not hold to the meta device
    (names and shapes stay, storage goes); returns the number of elements freed."""
    kept = {id(t) for t in keep.parameters()} | {id(t) for t in keep.buffers()}
    replaced: dict[int, torch.Tensor] = {}  # shared tensors stay shared
    freed = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or id(tensor) in kept or tensor.is_meta:
                    continue
                if id(tensor) not in replaced:  # (a tensor-parallel DTensor becomes a plain meta tensor)
                    empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
                    is_parameter = isinstance(tensor, nn.Parameter)
                    replaced[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if is_parameter else empty
                    freed += tensor.numel()
                table[name] = replaced[id(tensor)]
    return freed


def build_stage(model: DecoderBase, pp_rank: int, pp_size: int) -> DecoderStage:
    """This rank's stage of `model` (see `split_blocks`); the other stages' parameters are freed."""
    start, stop = split_blocks(len(model.blocks), pp_size)[pp_rank]
    stage = DecoderStage(model, start, stop, is_first=pp_rank == 0, is_last=pp_rank == pp_size - 1)
    free_other_parameters(model, stage)
    return stage


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a (replicated) tensor-parallel DTensor, for plain collectives."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor-parallel DTensor (a collective over its mesh); a tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _as_group(pp_group) -> dist.ProcessGroup:
    if pp_group is None:
        return dist.group.WORLD
    if hasattr(pp_group, "get_group"):  # a 1-D DeviceMesh
        return pp_group.get_group()
    return pp_group


class PipelineRunner:
    """One pipeline stage of `model` on this rank, and the schedule that trains it.

    model: a temper decoder with the same weights on every rank of the pipeline (build it with
        the run's seed, or load the same checkpoint); this rank keeps its stage, the rest is freed.
    pp_group: the pipeline's process group (or a 1-D DeviceMesh); None is the whole world.
        The stage index is this rank's rank in it.
    n_microbatches: how many micro-batches `step` cuts the batch into (batch rows must divide;
        1F1B needs at least as many micro-batches as stages).
    schedule: "gpipe" or "1f1b".
    dp_group: the data-parallel group whose ranks each run a pipeline replica on their own
        batch: the target count, and the logged loss, are summed over it. Gradients are not
        reduced over it here (that is the data-parallel wrapper's job).
    loss_chunk: rows of logits the fused cross-entropy builds at once.
    autocast: a context factory for the forward passes (`engine.precision_context`).
    device: where the stage runs; by default where the model is.

    Every rank of the world constructs its runner at the same point (the tied-weight groups are
    created collectively). `module` is the stage's nn.Module: give its parameters to the optimiser.
    """

    def __init__(self, model: DecoderBase, *, n_microbatches: int, pp_group=None, schedule: str = "1f1b",
                 dp_group: dist.ProcessGroup | None = None, loss_chunk: int = 1024,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 device: torch.device | str | None = None) -> None:
        if schedule not in SCHEDULES:
            raise TemperError(f"parallel.pp_schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if not (dist.is_available() and dist.is_initialized()):
            raise TemperError("pipeline parallelism needs torch.distributed initialised (launch with torchrun)")
        self.group = _as_group(pp_group)
        self.pp_rank, self.pp_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if n_microbatches < 1:
            raise TemperError(f"grad_accum={n_microbatches}: the pipeline's micro-batches per step must be at least 1")
        if schedule == "1f1b" and n_microbatches < self.pp_size:
            raise TemperError(f"grad_accum={n_microbatches} (the pipeline's micro-batches per step) is fewer than "
                              f"the {self.pp_size} pipeline stages: 1F1B needs at least one micro-batch per stage")
        self.n_microbatches, self.dp_group, self.loss_chunk, self.autocast = n_microbatches, dp_group, loss_chunk, autocast
        self.device = torch.device(device) if device is not None else model.lm_head.weight.device
        self.module = build_stage(model, self.pp_rank, self.pp_size)  # the rest of the model is freed
        self.module.to(self.device)
        ranks = dist.get_process_group_ranks(self.group)
        self._first_rank, self._last_rank = ranks[0], ranks[-1]
        self._tied_group = self._embedding_group()
        if self._tied_group is not None:
            with torch.no_grad():  # start from stage 0's copy, whatever the last rank built
                dist.broadcast(_local(self.tied_weight.data), src=self._first_rank, group=self._tied_group)
        self._count: torch.Tensor | None = None
        self.schedule_name = schedule
        self._shape: tuple[int, int] | None = None  # the micro-batch shape the schedule was built for

    def _embedding_group(self) -> dist.ProcessGroup | None:
        """The group of the two ranks that hold a copy of the tied weight (first and last stage),
        or None on the other ranks. Every rank of the world takes part: each pipeline replica's
        pair is created, in the same order everywhere, as `new_group` requires (Megatron does
        the same); a pair created by its two ranks alone could hang if they had created
        different numbers of groups before."""
        mine = (self._first_rank, self._last_rank) if self.module.tied and self.pp_size > 1 else None
        pairs: list = [None] * dist.get_world_size()
        dist.all_gather_object(pairs, mine)
        found = None
        for pair in sorted({p for p in pairs if p is not None}):
            group = dist.new_group(list(pair))
            if dist.get_rank() in pair:
                found = group
        return found

    def _build_schedule(self, shape: tuple[int, int]) -> None:
        """A PipelineStage and schedule for micro-batches of `shape`: torch infers the shapes of
        the tensors sent between stages at the first step and keeps them, so a batch of another
        shape needs new ones (every rank sees the same batch shape, so all rebuild together)."""
        # lazy: torch.distributed.pipelining takes ~2-3 s to import; only pipeline-parallel runs get here
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.stage = PipelineStage(self.module, self.pp_rank, self.pp_size, self.device, group=self.group)
        kind = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        # scale_grads=False: the loss is already divided by the global count (not a per-micro-batch mean)
        self.schedule = kind(self.stage, self.n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
        self._shape = shape

    @property
    def tied_weight(self) -> torch.Tensor:
        """This stage's copy of the tied embedding / output weight (first or last stage)."""
        m = self.module.decoder
        return m.input_embeddings.weight if self.module.is_first else m.lm_head.weight

    def _loss_fn(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One micro-batch's summed token NLL over the whole batch's target count (every rank's)."""
        loss_sum = fused_linear_cross_entropy(hidden, self.module.output_weight, targets, chunk_size=self.loss_chunk)
        return loss_sum / self._count

    def step(self, input_ids: torch.Tensor, targets: torch.Tensor, *, positions: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> dict[str, float]:
        """Forward and backward the whole batch through the pipeline, micro-batch by micro-batch.

        Every rank of the pipeline passes the same `input_ids` (B, T) and `targets` (B, T)
        (stage 0 reads the ids, the last stage the targets, every stage counts the targets).
        Gradients accumulate into this stage's parameters (tied copies summed); returns
        {"loss": summed NLL / target count of the whole batch (all dp ranks), "count": that
        count}, the same on every rank.
        """
        if positions is not None or mask is not None:
            raise TemperError("pipeline parallelism is for pretraining windows (positions 0..T-1, causal, no mask): "
                              "train packed or padded data without parallel.pp")
        if input_ids.shape != targets.shape or input_ids.dim() != 2:
            raise TemperError(f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} must both be (B, T)")
        if input_ids.shape[0] % self.n_microbatches:
            raise TemperError(f"a batch of {input_ids.shape[0]} rows does not split into "
                              f"{self.n_microbatches} equal pipeline micro-batches (grad_accum)")
        count = (targets != IGNORE_INDEX).sum().to(self.device)  # int64: exact at any batch size
        if self.dp_group is not None:
            dist.all_reduce(count, group=self.dp_group)
        if int(count) == 0:
            raise TemperError("a batch has nothing to learn from: every target is masked")
        shape = (input_ids.shape[0] // self.n_microbatches, input_ids.shape[1])
        if shape != self._shape:
            self._build_schedule(shape)
        self._count = count.float()
        # gradients already there (an earlier step not yet applied) are set aside, so that only
        # this step's tied-weight gradients are summed across the two copies
        earlier = None
        if self._tied_group is not None:
            earlier, self.tied_weight.grad = self.tied_weight.grad, None
        losses: list[torch.Tensor] = []
        with self.autocast():
            if self.module.is_first:
                self.schedule.step(input_ids.to(self.device), target=targets.to(self.device) if self.module.is_last
                                   else None, losses=losses, return_outputs=False)
            elif self.module.is_last:
                self.schedule.step(target=targets.to(self.device), losses=losses, return_outputs=False)
            else:
                self.schedule.step(return_outputs=False)
        self._count = None
        self._sum_tied_grads()
        if earlier is not None:
            self.tied_weight.grad.add_(earlier)
        loss = torch.stack(losses).sum().detach().float() if losses else torch.zeros((), device=self.device)
        dist.broadcast(loss, src=self._last_rank, group=self.group)
        if self.dp_group is not None:
            dist.all_reduce(loss, group=self.dp_group)
        return {"loss": float(loss), "count": float(count)}

    def _sum_tied_grads(self) -> None:
        """Sum the tied weight's gradients of the first and last stage, on both (no-op elsewhere):
        the embedding's on stage 0, the output layer's on the last, so both copies get the whole."""
        if self._tied_group is None:
            return
        weight = self.tied_weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(_local(weight.grad), group=self._tied_group)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the norm of the whole model's gradient (every stage, the tied weight once);
        returns the norm before clipping. max_norm <= 0 only measures it."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        counted = [p for p in params if not (self._tied_group is not None and self.module.is_last
                                              and p is self.tied_weight)]
        # sums of squares, not torch's fp32 CPU norm kernel (1e-5 off on a 131k-element embedding)
        square = torch.zeros((), device=self.device, dtype=torch.float32)
        if counted:  # a tensor-parallel shard's partial sum is completed over its mesh (full_tensor)
            square = torch.stack([_full(p.grad.detach().float().pow(2).sum()) for p in counted]).sum()
        dist.all_reduce(square, group=self.group)
        norm = float(square.sqrt())
        if max_norm > 0 and norm > max_norm:
            torch._foreach_mul_([p.grad for p in params], max_norm / (norm + 1e-6))
        return norm

    def stage_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's parameters and persistent buffers under the full model's state-dict names."""
        return self.module.state_dict()

    def gather_state_dict(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict (CPU tensors, the keys of `model.state_dict()`) on pipeline
        rank `dst`, None elsewhere; every rank of the pipeline must call it."""
        mine = {k: _full(v.detach()).cpu() for k, v in self.stage_state_dict().items()}  # TP shards gathered
        gathered: list | None = [None] * self.pp_size if self.pp_rank == dst else None
        dist.gather_object(mine, gathered, group_dst=dst, group=self.group)
        if gathered is None:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in gathered:
            full.update(part)
        return full
