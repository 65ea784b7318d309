"""Quantise a whole decoder's linear layers in place: INT8, INT4 round-to-nearest, GPTQ or NF4.

    spec = QuantSpec(method="gptq", group_size=128)
    quantize_decoder(model, spec, calibration=[ids (1, T), ...])   # GPTQ needs calibration ids

Every nn.Linear of the blocks is replaced by its quantised module, once (no forward patched).
Kept in full precision, as GPTQ, AWQ and bitsandbytes keep them: the embeddings, the norms
and the output layer (`lm_head`, or the tied embedding).

GPTQ runs block by block (the paper's sequential scheme): the calibration activations that
enter block i are those of the already *quantised* blocks 0..i-1; every linear of block i
accumulates its Hessian from one pass of the full-precision block, all are quantised, and the
quantised block is run again to give block i+1 its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from temper.errors import TemperError
from temper.quant.gptq import HessianAccumulator, gptq_quantize
from temper.quant.nf4 import Linear4bit, quantize_nf4
from temper.quant.weight_only import Int4Linear, Int8Linear, check_group_size, pack_int4

METHODS = ("int8", "int4", "gptq", "nf4")
QUANT_BUFFERS = ("qweight", "scales", "zeros", "perm", "packed", "absmax", "scale2", "offset")


@dataclass
class QuantSpec:
    """What `config.json`'s `quantization_config` records (with `quant_method: temper`)."""

    method: Literal["int8", "int4", "gptq", "nf4"] = "int4"
    group_size: int = 128  # int4 / gptq
    act_order: bool = False  # gptq
    percdamp: float = 0.01  # gptq, as requested (a layer may have needed more: see the layer's log)
    block_size: int = 128  # gptq lazy-update block
    nf4_block_size: int = 64  # nf4
    double_quant: bool = True  # nf4
    modules: tuple[str, ...] = ()  # temper names of the quantised linears, filled in by quantize_decoder

    def to_json(self) -> dict[str, Any]:
        data = {"quant_method": "temper", **asdict(self), "modules": list(self.modules)}
        data["bits"] = 8 if self.method == "int8" else 4
        return data

    @classmethod
    def from_json(cls, data: Any, source: str) -> QuantSpec:
        if not isinstance(data, dict) or data.get("quant_method") != "temper":
            method = data.get("quant_method") if isinstance(data, dict) else data
            raise TemperError(f"{source}: quantization_config quant_method {method!r} is not temper's (only "
                              "directories written by `temper quantize` are read)")
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        spec = cls(**fields)
        if spec.method not in METHODS:
            raise TemperError(f"{source}: quantization_config method {spec.method!r} (expected one of "
                              f"{', '.join(METHODS)})")
        if not isinstance(spec.modules, (list, tuple)) or not all(isinstance(m, str) for m in spec.modules):
            raise TemperError(f"{source}: quantization_config modules must be a list of module names")
        for key in ("group_size", "nf4_block_size"):
            value = getattr(spec, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
                raise TemperError(f"{source}: quantization_config {key} is {value!r} (expected an even integer >= 2)")
        spec.modules = tuple(spec.modules)
        return spec


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The block linears: every nn.Linear except the output layer and one tied to an embedding."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in tied and name != "lm_head"
            and not name.endswith(".lm_head")]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def check_spec(model: nn.Module, spec: QuantSpec) -> None:
    if spec.method not in METHODS:
        raise TemperError(f"method={spec.method!r} is not a quantisation method; expected one of {', '.join(METHODS)}")
    if spec.method in ("int4", "gptq"):
        for name, linear in quantizable_linears(model):
            check_group_size(linear.in_features, spec.group_size, name)


def quantized_module(linear: nn.Linear, spec: QuantSpec, name: str = "",
                     hessian: Tensor | None = None) -> nn.Module:
    """The quantised replacement of one linear layer (`hessian` for GPTQ)."""
    if spec.method == "int8":
        return Int8Linear.from_linear(linear)
    if spec.method == "int4":
        return Int4Linear.from_linear(linear, spec.group_size)
    if spec.method == "nf4":
        state = quantize_nf4(linear.weight, spec.nf4_block_size, spec.double_quant)
        return Linear4bit(state, linear.bias, linear.weight.dtype)
    assert spec.method == "gptq" and hessian is not None
    result = gptq_quantize(linear.weight, hessian, group_size=spec.group_size, block_size=spec.block_size,
                           percdamp=spec.percdamp, act_order=spec.act_order, name=name)
    return Int4Linear(pack_int4(result.codes), result.scales, result.zeros, spec.group_size, linear.bias,
                      result.perm)


def empty_module(linear: nn.Linear, spec: QuantSpec, dtype: torch.dtype) -> nn.Module:
    """A quantised module of the right shapes and dtypes for loading (built on the current device)."""
    out_f, in_f, bias = linear.out_features, linear.in_features, linear.bias is not None
    if spec.method == "int8":
        return Int8Linear.empty(out_f, in_f, bias, dtype)
    if spec.method in ("int4", "gptq"):
        return Int4Linear.empty(out_f, in_f, spec.group_size, bias, dtype, act_order=spec.act_order)
    state = quantize_nf4(torch.zeros(out_f, in_f, dtype=dtype, device="meta"), spec.nf4_block_size,
                         spec.double_quant)
    return Linear4bit(state, torch.empty(out_f, dtype=dtype) if bias else None, dtype)


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model: nn.Module, calibration: Sequence[Tensor]) -> list[tuple[Tensor, Any]]:
    """(x (1, T, C), AttentionInputs) entering the first block, one per calibration sequence."""
    captured: list[tuple[Tensor, Any]] = []

    def grab(module, args):
        captured.append(args)
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(grab)
    try:
        for ids in calibration:
            try:
                model(ids)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def quantize_decoder(model: nn.Module, spec: QuantSpec, calibration: Sequence[Tensor] = (),
                     log: Callable[[str], None] | None = None) -> QuantSpec:
    """Quantise `model`'s block linears in place as `spec` says; returns `spec` with `modules` filled in."""
    check_spec(model, spec)
    targets = quantizable_linears(model)
    if not targets:
        raise TemperError("the model has no linear layers to quantise")
    if spec.method != "gptq":
        for name, linear in targets:
            _replace(model, name, quantized_module(linear, spec, name))
    else:
        if not calibration:
            raise TemperError("GPTQ needs calibration text: no calibration sequences were given")
        _gptq_blocks(model, spec, calibration, log)
    spec.modules = tuple(name for name, _ in targets)
    return spec


def _gptq_blocks(model: nn.Module, spec: QuantSpec, calibration: Sequence[Tensor],
                 log: Callable[[str], None] | None) -> None:
    inputs = block_inputs(model, calibration)
    prefix = {id(b): name for name, b in model.named_modules() if b in list(model.blocks)}
    for i, block in enumerate(model.blocks):
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        stats = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in linears}
        handles = [m.register_forward_pre_hook(lambda mod, args, acc=stats[n]: acc.add(args[0])) for n, m in linears]
        try:
            for x, attention in inputs:
                block(x, attention)
        finally:
            for h in handles:
                h.remove()
        for n, m in linears:
            full = f"{prefix[id(block)]}.{n}"
            _replace(block, n, quantized_module(m, spec, full, stats[n].hessian()))
        inputs = [(block(x, attention), attention) for x, attention in inputs]  # through the quantised block
        if log:
            log(f"GPTQ block {i + 1}/{len(model.blocks)}: {len(linears)} linears")
