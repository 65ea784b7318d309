"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): 4-bit group-wise weights that minimise the layer's output error.

For one linear layer y = W x with calibration inputs X (in, n), GPTQ minimises
||W X - W_hat X||^2 column by column. The proxy Hessian is H = 2 X X^T (in, in) (here the mean
over calibration tokens, 2/n sum x x^T: the same minimiser). Quantising column j with its
rounding error e_j = (w_j - q_j) / [H^-1]_jj, the not-yet-quantised columns k > j absorb it:
w_k -= e_j [H^-1]_jk, with H^-1 in its upper Cholesky form so that one row holds what column j
needs (the paper's Algorithm 1).

- Dampening: H + lambda I with lambda = percdamp * mean(diag H). A Hessian that is not
  positive-definite even then (rank-deficient calibration, a layer that saw few distinct
  inputs, rounding in low precision) fails the Cholesky; the dampening is raised tenfold
  and the factorisation retried, with a warning, rather than letting NaN into the weights.
  Columns whose diagonal is 0 (an input feature that was always 0) are set to 0, as the paper's code does.
- Lazy batch updates: columns are processed in blocks of B (128); within a block the updates
  touch only the block, and the rest of W is updated once per block (the paper's Section 3.2).
- Groups: each run of G columns gets its own (scale, zero) grid, computed when the quantiser
  reaches the group's first column, from the weights as updated so far. The block is widened
  to a multiple of G so a group never straddles two blocks.
- Activation order (desc_act): columns are processed in order of decreasing diag(H), the most
  active inputs first. The result keeps that column order with `perm` (stored column j is input
  feature perm[j]), so the groups stay contiguous runs of the stored order, the layout
  `Int4Linear` uses (AutoGPTQ instead scatters groups with a per-column g_idx).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from temper.errors import TemperError
from temper.quant.weight_only import (
    INT4_MAX,
    check_group_size,
    int4_params,
    quantize_int4,
    quantize_to_grid,
)

MAX_DAMP = 100.0  # percdamp is raised tenfold up to this before giving up


@dataclass
class GPTQResult:
    codes: Tensor  # uint8 (out, in) in [0, 15], columns in stored order
    scales: Tensor  # fp32 (out, in / G)
    zeros: Tensor  # uint8 (out, in / G)
    perm: Tensor | None  # int64 (in,): stored column j is input feature perm[j]; None without act order
    percdamp: float  # the dampening that factorised (raised from the requested one after a failed Cholesky)

    def dequantize(self) -> Tensor:
        """W_hat (out, in), fp32, columns back in input-feature order."""
        out_features, groups = self.scales.shape
        q = self.codes.float().view(out_features, groups, -1)
        w = ((q - self.zeros.float()[..., None]) * self.scales[..., None]).view(out_features, -1)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w


def inverse_hessian_factor(hessian: Tensor, percdamp: float, name: str = "") -> tuple[Tensor, float]:
    """(upper Cholesky factor U of (H + lambda I)^-1, the percdamp used), lambda = percdamp * mean(diag H).

    A failed factorisation (not positive-definite, or non-finite) raises percdamp tenfold
    (from at least 0.01) and retries up to MAX_DAMP; beyond that a TemperError names the layer.
    """
    if not torch.isfinite(hessian).all():
        raise TemperError(f"{name or 'GPTQ'}: the calibration Hessian holds NaN or Inf (the model's activations "
                          "overflowed on the calibration text)")
    mean_diag = float(torch.diag(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp
    while True:
        factor, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0 and torch.isfinite(factor).all():
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp
        raised = max(damp * 10, 0.01)
        if raised > MAX_DAMP:
            raise TemperError(f"{name or 'GPTQ'}: the calibration Hessian is not positive-definite even with "
                              f"dampening {damp:g} x mean(diag H); use more (or more varied) calibration text")
        warnings.warn(f"{name or 'GPTQ'}: Cholesky of the dampened Hessian failed at percdamp={damp:g}; "
                      f"retrying with {raised:g}", stacklevel=2)
        damp = raised


def gptq_quantize(weight: Tensor, hessian: Tensor, *, group_size: int = 128, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, name: str = "") -> GPTQResult:
    """GPTQ-quantise `weight` (out, in) to 4-bit groups of `group_size` given `hessian` (in, in)."""
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size, name)
    if hessian.shape != (in_features, in_features):
        raise TemperError(f"{name or 'GPTQ'}: Hessian shape {tuple(hessian.shape)} does not match the weight's "
                          f"in_features {in_features}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = inverse_hessian_factor(H, percdamp, name)

    block = group_size * max(1, math.ceil(block_size / group_size))  # groups never straddle blocks
    codes = torch.zeros_like(W)
    groups = in_features // group_size
    scales = torch.empty(out_features, groups, device=W.device)
    zeros = torch.empty(out_features, groups, device=W.device)
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        scale = zero = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # a new group: its grid from the weights as updated so far
                scale, zero = int4_params(W1[:, i:i + group_size])
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero
            w = W1[:, i]
            q = quantize_to_grid(w, scale, zero)
            codes[:, col] = q
            err = (w - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    assert int(codes.max()) <= INT4_MAX
    return GPTQResult(codes.to(torch.uint8), scales, zeros.to(torch.uint8), perm, damp)


def rtn_as_gptq(weight: Tensor, group_size: int) -> GPTQResult:
    """Round-to-nearest in GPTQResult form (for comparisons)."""
    codes, scales, zeros = quantize_int4(weight, group_size)
    return GPTQResult(codes, scales, zeros, None, 0.0)


class HessianAccumulator:
    """H = 2/n sum_t x_t x_t^T over every calibration token x_t (in,) a linear layer sees, in fp64
    (a long sum of outer products; fp32 loses the small eigenvalues that matter here)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sum += x.T @ x
        self.count += x.shape[0]

    def hessian(self) -> Tensor:
        if self.count == 0:
            raise TemperError("GPTQ: a layer saw no calibration tokens")
        return (2 * self.sum / self.count).float()
