"""Weight-only integer quantisation of linear layers: INT8 per output channel, INT4 per group.

INT8 (symmetric absmax, one scale per output row r):

    s_r = max_k |W_rk| / 127,   q = round(W / s_r) in [-127, 127],   W_hat = q * s_r

so every element is off by at most s_r / 2.

INT4 (asymmetric round-to-nearest, groups of G consecutive input columns, one scale and one
zero-point per row and group, as GPTQ / AWQ store them):

    s = (max(w, 0) - min(w, 0)) / 15,   z = round(-min(w, 0) / s) in [0, 15],
    q = clamp(round(w / s) + z, 0, 15),  W_hat = (q - z) * s

(the range is widened to hold 0, so a zero weight comes back exactly; every element inside the
range is off by at most s / 2). Two 4-bit codes share a byte, the even column in the low nibble.

`Int8Linear` and `Int4Linear` hold only the codes and scales as buffers and compute
y = x W_hat^T + b, dequantising on the fly. On CPU with fp32 activations and one row (a decode
step) they call PyTorch's own weight-only kernels instead (`aten._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`), which read the codes directly; for more rows those kernels
were measured 13-38x slower than dequantise + F.linear (BENCHMARKS.md), so the reference
path runs. `use_fast_kernel=False` forces the reference path, which the tests compare with. A GPTQ layer with activation order stores its columns in the order GPTQ
quantised them, so groups stay contiguous, plus `perm`: the layer computes x[..., perm] W_perm^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from temper.errors import TemperError

INT4_MAX = 15
INT8_MAX = 127
FAST_INT4_GROUPS = (32, 64, 128, 256)  # what aten's CPU int4 kernel accepts
# aten's weight-only CPU kernels beat dequantise + F.linear 5-7x for one row (a decode step) of a
# 4096 x 4096 layer and lose 13-38x at 128 rows (prefill): benchmarks/bench_quantize.py --kernels
FAST_MAX_ROWS = 1


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 (out, in), scales fp32 (out,)): symmetric absmax per output row."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / INT8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: any scale
    q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales[:, None]


def check_group_size(in_features: int, group_size: int, where: str = "") -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise TemperError(f"group_size must be a positive even integer, got {group_size!r}")
    if in_features % group_size:
        raise TemperError(f"{where or 'a linear layer'}: group_size {group_size} does not divide its "
                          f"in_features {in_features} (choose a divisor, e.g. {_divisor_hint(in_features)})")


def _divisor_hint(n: int) -> int:
    return next(g for g in (128, 64, 32, 16, 8, 4, 2, 1) if n % g == 0)


def int4_params(w: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, zero) of the asymmetric 4-bit grid of each row of `w` (rows, G) (range widened to 0)."""
    low = w.amin(dim=-1).clamp(max=0)
    high = w.amax(dim=-1).clamp(min=0)
    scale = (high - low) / INT4_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, INT4_MAX)
    return scale, zero


def quantize_to_grid(w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The 4-bit codes of `w` on the grid (scale, zero), broadcast along the last dimension."""
    return torch.clamp(torch.round(w / scale) + zero, 0, INT4_MAX)


def quantize_int4(weight: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: (codes uint8 (out, in) in [0, 15], scales fp32 (out, in/G), zeros uint8 (out, in/G))."""
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    w = weight.detach().float().view(out_features, in_features // group_size, group_size)
    scales, zeros = int4_params(w)
    q = quantize_to_grid(w, scales[..., None], zeros[..., None])
    return q.view(out_features, in_features).to(torch.uint8), scales, zeros.to(torch.uint8)


def pack_int4(q: Tensor) -> Tensor:
    """(out, in) codes in [0, 15] -> (out, in/2) uint8, the even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """(out, in/2) uint8 -> (out, in) uint8 codes."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """W_hat = (q - z) * s per group, fp32 (out, in), columns in stored order."""
    q = unpack_int4(packed).float()
    out_features, groups = scales.shape
    q = q.view(out_features, groups, -1)
    return ((q - zeros.float()[..., None]) * scales[..., None]).view(out_features, -1)


def _frozen_bias(bias: Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


def _flat(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


class Int8Linear(nn.Module):
    """A frozen weight-only INT8 linear layer: buffers `qweight` int8 (out, in) and `scales` fp32 (out,)."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None,
                 use_fast_kernel: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = _frozen_bias(bias)
        self.use_fast_kernel = use_fast_kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(*quantize_int8(linear.weight), linear.bias)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, dtype: torch.dtype) -> Int8Linear:
        """A layer of the right shapes and dtypes to load a state dict into (on the current device)."""
        return cls(torch.empty(out_features, in_features, dtype=torch.int8), torch.empty(out_features),
                   torch.empty(out_features, dtype=dtype) if bias else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int8(self.qweight, self.scales).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if (self.use_fast_kernel and x.device.type == "cpu" and x.dtype == torch.float32
                and x.numel() <= FAST_MAX_ROWS * self.in_features):
            flat, lead = _flat(x)
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scales)
            y = y.view(*lead, self.out_features)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """A frozen group-wise INT4 linear layer (RTN or GPTQ): buffers `qweight` uint8 (out, in/2),
    `scales` fp32 (out, in/G), `zeros` uint8 (out, in/G), and with activation order `perm` int64 (in,):
    the stored column j is the input feature perm[j]."""

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 bias: Tensor | None = None, perm: Tensor | None = None, use_fast_kernel: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        if perm is not None:
            self.register_buffer("perm", perm)
        else:
            self.perm = None
        self.bias = _frozen_bias(bias)
        self.use_fast_kernel = use_fast_kernel
        self._kernel_weight: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        q, scales, zeros = quantize_int4(linear.weight, group_size)
        return cls(pack_int4(q), scales, zeros, group_size, linear.bias)

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int, bias: bool, dtype: torch.dtype,
              act_order: bool = False) -> Int4Linear:
        groups = in_features // group_size
        return cls(torch.empty(out_features, in_features // 2, dtype=torch.uint8), torch.empty(out_features, groups),
                   torch.empty(out_features, groups, dtype=torch.uint8), group_size,
                   torch.empty(out_features, dtype=dtype) if bias else None,
                   torch.empty(in_features, dtype=torch.int64) if act_order else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat (out, in) with the columns in the input features' order."""
        w = dequantize_int4(self.qweight, self.scales, self.zeros)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    def _fast_applies(self, x: Tensor) -> bool:
        return (self.use_fast_kernel and x.device.type == "cpu" and x.dtype == torch.float32
                and x.numel() <= FAST_MAX_ROWS * self.in_features and self.group_size in FAST_INT4_GROUPS)

    def kernel_weight(self) -> tuple[Tensor, Tensor]:
        """(aten's packed int4 weight, its (in/G, out, 2) scale-and-zero tensor), built once.

        aten dequantises w = (q - 8) * s + m; with m = (8 - z) * s that is (q - z) * s.
        """
        if self._kernel_weight is None or self._kernel_weight[0].device != self.qweight.device:
            codes = unpack_int4(self.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            scale_zero = torch.stack((self.scales, (8 - self.zeros.float()) * self.scales), dim=-1)
            self._kernel_weight = packed, scale_zero.transpose(0, 1).contiguous()
        return self._kernel_weight

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)  # stored column order
        if self._fast_applies(x):
            packed, scale_zero = self.kernel_weight()
            flat, lead = _flat(x)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), packed, self.group_size, scale_zero)
            y = y.view(*lead, self.out_features)
            return y if bias is None else y + bias
        w = dequantize_int4(self.qweight, self.scales, self.zeros).to(x.dtype)
        return F.linear(x, w, bias)

    def _apply(self, fn, recurse: bool = True):  # a move or cast rebuilds the kernel's copy
        self._kernel_weight = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}")
