"""Tensor parallelism of a family's blocks with DTensor, applied from outside the model (the
family's `tensor_parallel` plan names the modules; the llama family has one).

Megatron-LM's layout (Shoeybi et al. 2019), as torchtitan lays it out: in each block,
q/k/v and gate/up are split column-wise (each rank holds a slice of the attention heads
and of the MLP's hidden units) and o/down row-wise, so a block costs one all-reduce in
the attention and one in the MLP, forward and backward:

    attention:  x (replicated) -> q, k, v of the rank's heads -> SDPA -> o_proj partial sums -> all-reduce
    MLP:        x (replicated) -> gate, up of the rank's units -> silu(gate) * up -> down partial sums -> all-reduce

Everything else (the embedding, the norms, the output layer) is replicated: its
parameters become `Replicate()` DTensors on the tensor-parallel mesh, and its inputs and
outputs stay plain tensors, the same on every rank. Why DTensors and not plain tensors:
with every parameter a DTensor on one mesh, `torch.nn.utils.clip_grad_norm_` and the
optimisers' foreach kernels take the whole parameter list (they refuse a mix of plain
tensors and DTensors), and `fully_shard` on the data-parallel dimension puts every
parameter on the same 2-D mesh. The fused cross-entropy reads the output layer's
weight directly; it takes the rank's local copy (see `temper.losses.clm`).

The model is still called through its own forward: `parallelize_module` installs the
layout changes as forward hooks on the linear layers, nothing is patched, and each rank's
attention reshapes with the number of heads it holds (`view(B, T, -1, head_dim)`).

With FSDP2 on a 2-D mesh (data parallel x tensor parallel), apply tensor parallelism first:

    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    apply_tensor_parallel(model, mesh["tp"])
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = build_optimizer(model, ...)  # after: it must hold the DTensor parameters
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from temper.errors import TemperError
from temper.models import registry
from temper.models.common import DecoderBase
from temper.models.config import ModelConfig
from temper.models.family import TensorParallelPlan

__all__ = ["check_tensor_parallel", "apply_tensor_parallel"]


def block_plan(config: ModelConfig, tp: int) -> TensorParallelPlan:
    """The family's plan for one block, or one line saying which families have one and why this has not."""
    plan = registry.family(config.family).tensor_parallel
    if isinstance(plan, TensorParallelPlan):
        return plan
    able = [f for f in registry.families() if isinstance(f.tensor_parallel, TensorParallelPlan)]
    which = " and the ".join(f"{f.name} family ({f.description})" for f in able) or "no family yet"
    raise TemperError(f"parallel.tp={tp}: tensor parallelism supports the {which}, not {config.family} ({plan}); "
                      "use parallel.tp=1")


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise a one-line TemperError unless `tp` ranks can split this model's blocks evenly."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise TemperError(f"parallel.tp is {tp!r}: expected a positive integer (1: no tensor parallelism)")
    if tp == 1:
        return
    block_plan(config, tp)
    allowed = math.gcd(config.num_heads, config.num_kv_heads, config.intermediate_size)
    choices = ", ".join(str(d) for d in range(1, allowed + 1) if allowed % d == 0)
    for count, what in ((config.num_heads, "attention heads"), (config.num_kv_heads, "key/value heads"),
                        (config.intermediate_size, "MLP hidden units (intermediate_size)")):
        if count % tp:
            raise TemperError(f"parallel.tp={tp} does not divide the model's {count} {what}: choose a tp that "
                              f"divides {count} (this model allows tp = {choices})")


def _check_full_weight_model(model: DecoderBase, tp: int, plan: TensorParallelPlan) -> None:
    """Only the base model's own layers are split or replicated: refuse LoRA, 4-bit layers,
    adapters and prefix/prompt encoders, which would be left as plain tensors on every rank."""
    covered = {id(p) for m in (model.input_embeddings, model.final_norm, model.lm_head) for p in m.parameters()}
    for i, block in enumerate(model.blocks):
        for name in (*plan.column_wise, *plan.row_wise, *plan.replicated):
            layer = block.get_submodule(name)
            if name not in plan.replicated and type(layer) is not nn.Linear:
                raise TemperError(
                    f"parallel.tp={tp}: layer {i}'s {name} is a {type(layer).__name__}, not a plain linear layer; "
                    "tensor parallelism splits full-weight models only (no LoRA, no 4-bit)"
                )
            covered.update(id(p) for p in layer.parameters())
    extra = [name for name, p in model.named_parameters() if id(p) not in covered]
    if extra:
        raise TemperError(
            f"parallel.tp={tp}: tensor parallelism splits the base model only, not {extra[0]} "
            f"({len(extra)} such parameters: adapters, prefix or prompt tuning); use parallel.tp=1"
        )


class _Replicated(ParallelStyle):
    """Parameters as Replicate() DTensors; plain inputs (the same on every rank) go in as
    Replicate() DTensors and outputs come out as plain tensors. No communication: every rank
    computes the same values and the same gradients."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, self._replicate_inputs, self._local_outputs)

    @staticmethod
    def _replicate_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    @staticmethod
    def _local_outputs(module: nn.Module, output, mesh: DeviceMesh):
        return output.to_local() if isinstance(output, DTensor) else output


def apply_tensor_parallel(model: DecoderBase, tp_mesh: DeviceMesh) -> None:
    """Split every block of a temper decoder over the ranks of `tp_mesh`, in place, by its family's plan.

    Llama: column-wise q/k/v/gate/up, row-wise o/down; the embedding, the norms and lm_head stay
    replicated (Replicate() DTensor parameters, plain-tensor activations). Shards and replicas
    are cut from the weights of the mesh's first rank (broadcast); every rank of `tp_mesh`
    must then feed the same batch. Call it before `fully_shard` and before building the
    optimizer. Generation, the KV cache and prefix tuning use the global head counts: a
    tensor-parallel model is for training.
    """
    assert tp_mesh.ndim == 1, "apply_tensor_parallel takes the one-dimensional tensor-parallel mesh (mesh['tp'])"
    check_tensor_parallel(model.config, tp_mesh.size())
    layout = block_plan(model.config, tp_mesh.size())
    _check_full_weight_model(model, tp_mesh.size(), layout)
    plan: dict[str, ParallelStyle] = {name: ColwiseParallel() for name in layout.column_wise}
    plan.update({name: RowwiseParallel() for name in layout.row_wise})
    plan.update({name: _Replicated() for name in layout.replicated})
    for block in model.blocks:
        parallelize_module(block, tp_mesh, plan)

    tied = model.lm_head.weight is model.input_embeddings.weight
    parallelize_module(model.input_embeddings, tp_mesh, _Replicated())
    if tied:  # replicating the embedding made a new Parameter; the output layer must share it again
        model.lm_head.weight = model.input_embeddings.weight
    parallelize_module(model.lm_head, tp_mesh, _Replicated())  # a tied weight, already a DTensor, is kept
    parallelize_module(model.final_norm, tp_mesh, _Replicated())
    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    assert not plain, f"parameters left as plain tensors under tensor parallelism: {plain}"
