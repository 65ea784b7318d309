"""4-bit NormalFloat (NF4), QLoRA's frozen base-weight format (Dettmers et al. 2023), in plain PyTorch.

A weight is flattened and cut into blocks of B = `block_size` values (64). Each block keeps
its absmax s = max|w| as its scale; every value is normalised to w / s in [-1, 1] and
replaced by the index of the nearest of the 16 NF4 code values q_i, two indices per byte:

    w_hat = q[idx] * s                      (a block's absmax element comes back exactly)

Double quantisation stores the fp32 scales in 8 bits too: with m = mean(s), the centred
scales c = s - m are cut into blocks of 256, each with one fp32 scale t = max|c| / 127 and
int8 codes round(c / t), so s_hat = int8 * t + m. bitsandbytes quantises this second level
with its dynamic 8-bit map; the symmetric linear int8 used here costs the same bits.

Storage per parameter: 4 + 32/B bits, or 4 + 8/B + 32/(256 B) with double quantisation
(4.5 and 4.127 bits for B = 64). A size that is not a multiple of B is zero-padded to one
(the scales likewise to a multiple of 256 while quantising them); `numel` remembers the
real size and dequantisation drops the padding. Everything runs on any device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from temper.errors import TemperError

SCALE_BLOCK = 256  # double quantisation: block scales per second-level scale

# The 16 NF4 values of the paper and bitsandbytes, sorted; index 7 is an exact zero.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044006, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def nf4_code_values(offset: float = 0.9677083) -> Tensor:
    """Derive NF4 from N(0, 1) quantiles, as bitsandbytes' create_normal_map(offset, True).

    8 positive quantiles Phi^-1(p), p = linspace(offset, 0.5, 9)[:-1]; 7 negative ones
    -Phi^-1(p), p = linspace(offset, 0.5, 8)[:-1]; an exact 0; all divided by the largest,
    Phi^-1(offset), so the code spans [-1, 1]. The asymmetry gives 0 a code of its own.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()


@functools.cache
def _code(device: torch.device) -> Tensor:
    return NF4_CODE.to(device)


@functools.cache
def _byte_table(device: torch.device) -> Tensor:
    """(256, 2): the two code values a packed byte stands for (high nibble first)."""
    byte = torch.arange(256)
    return torch.stack((NF4_CODE[byte >> 4], NF4_CODE[byte & 15]), dim=1).to(device)


@dataclass
class QuantState:
    """One NF4-quantised tensor: every stored tensor plus what is needed to undo it."""

    packed: Tensor  # uint8 (padded numel / 2,): two code indices per byte, high nibble first
    absmax: Tensor  # (n_blocks,) fp32 block scales; int8 codes of them with double quant
    scale2: Tensor | None  # fp32 (ceil(n_blocks / 256),): second-level scales (double quant)
    offset: Tensor | None  # fp32 (1,): the mean m subtracted from the scales (double quant)
    shape: torch.Size
    dtype: torch.dtype  # the original weight's dtype, the default to dequantise to
    block_size: int
    numel: int

    def tensors(self) -> dict[str, Tensor]:
        names = ("packed", "absmax", "scale2", "offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def nbytes(self) -> int:
        """Bytes of all stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _blocks(x: Tensor, block: int) -> Tensor:
    """Flatten, zero-pad to a multiple of `block` and view as (n_blocks, block)."""
    x = x.reshape(-1)
    return F.pad(x, (0, -x.numel() % block)).view(-1, block)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise TemperError(f"NF4 block size must be a positive even integer, got {block_size!r}")


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> QuantState:
    """NF4-quantise `weight` in blocks of `block_size` (zero-padded to a multiple of it)."""
    _check_block_size(block_size)
    blocks = _blocks(weight.detach().float(), block_size)
    absmax = blocks.abs().amax(dim=1)  # s per block
    normed = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]  # in [-1, 1]
    code = _code(weight.device)
    idx = torch.bucketize(normed, (code[1:] + code[:-1]) / 2, out_int32=True)  # nearest code
    idx = idx.to(torch.uint8).view(-1)
    packed = (idx[0::2] << 4) | idx[1::2]
    scale2 = offset = None
    if double_quant:
        offset = absmax.mean().reshape(1)  # m
        centred = _blocks(absmax - offset, SCALE_BLOCK)  # c = s - m, blocks of 256
        scale2 = centred.abs().amax(dim=1) / 127  # t = max|c| / 127
        q = torch.round(centred / scale2.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
        absmax = q.clamp(-127, 127).to(torch.int8).view(-1)[:absmax.numel()]
    return QuantState(packed, absmax, scale2, offset, weight.shape, weight.dtype, block_size,
                      weight.numel())


def dequantize_scales(state: QuantState) -> Tensor:
    """The fp32 block scales: s itself, or s_hat = int8 * t + m with double quantisation."""
    if state.scale2 is None:
        return state.absmax.float()
    n = state.absmax.numel()
    q = _blocks(state.absmax.float(), SCALE_BLOCK)
    return (q * state.scale2[:, None]).view(-1)[:n] + state.offset


def dequantize_nf4(state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """w_hat = q[idx] * s per block, computed in fp32, unpadded, reshaped and cast to `dtype`."""
    values = _byte_table(state.packed.device)[state.packed.long()].view(-1, state.block_size)
    values = values * dequantize_scales(state)[:, None]
    return values.view(-1)[:state.numel].view(state.shape).to(dtype or state.dtype)


def bits_per_parameter(block_size: int = 64, double_quant: bool = True,
                       scale_block: int = SCALE_BLOCK) -> float:
    """4 + 32/B bits, or 4 + 8/B + 32/(B * scale_block) with double quantisation.

    Exact for sizes that fill whole blocks; the one fp32 mean m of double quantisation and
    the padding of a last partial block are per-tensor constants this leaves out.
    """
    if not double_quant:
        return 4 + 32 / block_size
    return 4 + 8 / block_size + 32 / (block_size * scale_block)


class _LinearNF4(torch.autograd.Function):
    """F.linear whose backward dequantises the weight again rather than keeping it: the saved
    activations of a QLoRA model then hold no full-precision copy of the base weights."""

    @staticmethod
    def forward(ctx, x: Tensor, module: Linear4bit, bias: Tensor | None) -> Tensor:
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = grad @ ctx.module.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


class Linear4bit(nn.Module):
    """A frozen NF4 linear layer: y = x W_hat^T + b, W_hat dequantised on the fly, never kept.

    The quantised tensors are buffers (`packed`, `absmax`, and with double quantisation
    `scale2`, `offset`), so they go to state_dict and safetensors and no optimizer sees
    them; there is no `weight` Parameter: `dequantize()` gives W_hat (out, in). A weight whose
    in * out is not a multiple of `block_size` is zero-padded (see `quantize_nf4`).
    Cast a model to its compute dtype *before* quantising: `.to(dtype)` afterwards would
    also round the fp32 scale buffers.
    """

    def __init__(self, state: QuantState, bias: Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.block_size, self.compute_dtype = state.block_size, compute_dtype or state.dtype
        for name in ("packed", "absmax", "scale2", "offset"):
            self.register_buffer(name, getattr(state, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> Linear4bit:
        state = quantize_nf4(linear.weight, block_size, double_quant)
        return cls(state, linear.bias, compute_dtype or linear.weight.dtype)

    @property
    def quant_state(self) -> QuantState:
        shape = torch.Size((self.out_features, self.in_features))
        return QuantState(self.packed, self.absmax, self.scale2, self.offset, shape,
                          self.compute_dtype, self.block_size, shape.numel())

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """W_hat (out_features, in_features) in `dtype` (default: the compute dtype)."""
        return dequantize_nf4(self.quant_state, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _LinearNF4.apply(x, self, bias)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"double_quant={self.scale2 is not None}")


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, block_size: int = 64, double_quant: bool = True,
                   skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear of `model` by a Linear4bit in place; return how many.

    Kept in full precision: a Linear whose dotted name ends with an entry of `skip` (whole
    name components: "lm_head", "attn.o_proj"), and one whose weight is tied to an embedding.
    """
    _check_block_size(block_size)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and id(m.weight) not in tied and not _skipped(name, skip)]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Linear4bit.from_linear(linear, block_size, double_quant))
    return len(targets)


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, a shared (tied) tensor counted once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def dequantize_model(model: nn.Module) -> int:
    """Replace every Linear4bit by a plain nn.Linear holding its dequantised weight (for export)."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.packed.device, dtype=module.compute_dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
            replaced += 1
    return replaced
