"""NF4 quantisation: the code, the round trip, the storage, Linear4bit and whole models."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FP32_EPS, assert_reorder_close
from safetensors.torch import load_file, save_file
from torch import nn

from temper.errors import TemperError
from temper.models import build_model, preset
from temper.quant.nf4 import (
    NF4_CODE,
    Linear4bit,
    base_weight_bytes,
    bits_per_parameter,
    dequantize_nf4,
    dequantize_scales,
    nf4_code_values,
    quantize_model,
    quantize_nf4,
)


def gaussian(*shape, std=0.02, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def rel_error(w, w_hat):
    return ((w - w_hat).norm() / w.norm()).item()


def test_code_values_derived_from_normal_quantiles():
    derived = nf4_code_values()
    # codes in [-1, 1], each side one rounding to fp32 of the same float64 quantile: 2 x eps/2
    torch.testing.assert_close(derived, NF4_CODE, atol=FP32_EPS, rtol=0)
    assert NF4_CODE.numel() == 16 and NF4_CODE.unique().numel() == 16
    assert (NF4_CODE == 0).sum() == 1
    assert torch.equal(NF4_CODE.sort().values, NF4_CODE)
    assert NF4_CODE.min() == -1.0 and NF4_CODE.max() == 1.0
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7  # asymmetric
    assert not torch.allclose(nf4_code_values(offset=0.99), NF4_CODE, atol=1e-3)


def on_code_grid(w_hat, scales, block_size):
    """Largest distance of w_hat / its block scale to the nearest code value: code x scale and the
    division back each round by eps/2 of a code in [-1, 1], so at most FP32_EPS on the grid."""
    normed = w_hat.reshape(-1, block_size) / scales[:, None]
    return (normed[..., None] - NF4_CODE).abs().amin(-1).max().item()


def test_round_trip_lies_on_the_code_grid():
    w = gaussian(512, 512)
    state = quantize_nf4(w, block_size=64, double_quant=False)
    w_hat = dequantize_nf4(state)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    absmax = w.reshape(-1, 64).abs().amax(1)
    torch.testing.assert_close(state.absmax, absmax, atol=0, rtol=0)
    assert on_code_grid(w_hat, absmax, 64) <= FP32_EPS
    # each value went to its nearest code: the error is at most half the widest code gap, give or
    # take the roundings of w / s (choosing the code), code x s, w - w_hat and / s: 4 x eps/2
    err = (w - w_hat).reshape(-1, 64).abs() / absmax[:, None]
    assert err.max() <= (NF4_CODE.diff().max() / 2) + 2 * FP32_EPS
    # a block's absmax element comes back exactly
    blocks, blocks_hat = w.reshape(-1, 64), w_hat.reshape(-1, 64)
    at = blocks.abs().argmax(1, keepdim=True)
    assert torch.equal(blocks.gather(1, at), blocks_hat.gather(1, at))

    dq = quantize_nf4(w, block_size=64, double_quant=True)
    scales = dequantize_scales(dq)
    assert dq.absmax.dtype == torch.int8 and dq.scale2.numel() == (512 * 512 // 64) // 256
    # the scales are off by at most half an int8 step of their block of 256, give or take the
    # roundings of s - m, / t (choosing the step), q x t and + m: 4 x eps/2 of values up to 2 max |s|
    step = dq.scale2.repeat_interleave(256)[: scales.numel()]
    assert ((scales - absmax).abs() <= step / 2 + 4 * FP32_EPS * absmax.max()).all()
    assert (scales - absmax).abs().max() > 0  # double quantisation did round something
    assert on_code_grid(dequantize_nf4(dq), scales, 64) <= FP32_EPS


def test_relative_error_and_block_size():
    w = gaussian(512, 512)
    errors = {(b, dq): rel_error(w, dequantize_nf4(quantize_nf4(w, b, dq)))
              for b in (32, 64, 256) for dq in (False, True)}
    # measured: block 64 -> 0.0921 (no double quant), 0.0921 (double quant); 32 -> 0.0874; 256 -> 0.0991
    assert errors[64, False] < 0.1 and errors[64, True] < 0.1
    assert errors[32, False] < errors[64, False] < errors[256, False]
    assert errors[32, True] < errors[256, True]
    assert abs(errors[64, True] - errors[64, False]) < 1e-3  # the 8-bit scales cost little


def test_zeros_stay_zero():
    w = gaussian(64, 64)
    w[::3] = 0.0  # whole zero blocks (scale 0) ...
    w[1, ::2] = 0.0  # ... and zeros inside live blocks
    for dq in (False, True):
        w_hat = dequantize_nf4(quantize_nf4(w, 64, dq))
        assert (w_hat[w == 0] == 0).all()
        assert torch.isfinite(w_hat).all()
    assert (dequantize_nf4(quantize_nf4(torch.zeros(10, 10))) == 0).all()


def test_odd_shape_is_padded_and_unpadded():
    w = gaussian(33, 70, seed=3)  # 2310 values: 36 full blocks of 64 and 6 left over
    for dq in (False, True):
        state = quantize_nf4(w, 64, dq)
        assert state.numel == 2310 and state.packed.numel() == 37 * 64 // 2
        assert state.absmax.numel() == 37
        w_hat = dequantize_nf4(state)
        assert w_hat.shape == (33, 70)
        assert rel_error(w, w_hat) < 0.1
    # the last partial block has its own scale: its absmax element comes back exactly
    tail = w.reshape(-1)[36 * 64:]
    tail_hat = dequantize_nf4(quantize_nf4(w, 64, False)).reshape(-1)[36 * 64:]
    i = tail.abs().argmax()
    assert tail_hat[i] == tail[i]


def test_bad_block_size():
    with pytest.raises(TemperError, match="block size"):
        quantize_nf4(gaussian(8, 8), block_size=3)


def test_bits_per_parameter_exact_and_measured():
    assert bits_per_parameter(64, double_quant=False) == 4.5
    assert bits_per_parameter(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    assert round(bits_per_parameter(64), 3) == 4.127  # the paper's number
    assert bits_per_parameter(32, double_quant=False) == 5.0
    w = gaussian(4096, 4096)  # numel 16,777,216
    for dq in (False, True):
        state = quantize_nf4(w, 64, dq)
        measured = state.nbytes() * 8 / w.numel()
        assert abs(measured - bits_per_parameter(64, dq)) < 1e-3, measured


def test_linear4bit_forward_state_dict_and_gradients(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    q = Linear4bit.from_linear(linear)
    assert (q.in_features, q.out_features) == (96, 80)
    assert "weight" not in dict(q.named_parameters()) and not hasattr(q, "weight")
    assert [n for n, p in q.named_parameters() if p.requires_grad] == []
    assert set(q.state_dict()) == {"packed", "absmax", "scale2", "offset", "bias"}
    assert q.packed.dtype == torch.uint8 and q.absmax.dtype == torch.int8

    x = torch.randn(4, 7, 96, requires_grad=True)
    y = q(x)
    assert torch.equal(y, F.linear(x, q.dequantize(), q.bias))
    with torch.no_grad():
        assert torch.equal(q(x), y)
        expected = linear(x)
    assert rel_error(expected, y.detach()) < 0.1
    # gradients reach the input, through a weight dequantised again in backward
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, q.dequantize(), q.bias).square().sum().backward()
    # the same y; 2 y @ W over its 80 outputs, in the backward of our function vs autograd's
    assert_reorder_close(x.grad, x2.grad, (80,))
    assert q.bias.grad is None

    save_file(q.state_dict(), tmp_path / "q.safetensors")
    again = Linear4bit.from_linear(nn.Linear(96, 80))
    assert not torch.equal(again.dequantize(), q.dequantize())
    again.load_state_dict(load_file(tmp_path / "q.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(x), y)


def test_linear4bit_without_bias_and_in_bf16():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=False)
    q = Linear4bit.from_linear(linear, block_size=32, double_quant=False, compute_dtype=torch.bfloat16)
    assert q.bias is None and set(q.state_dict()) == {"packed", "absmax"}
    assert q.dequantize().dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16
    assert torch.equal(q(x), F.linear(x, q.dequantize()))


def test_quantize_model():
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny")).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = model(x)
    linears = {n: m.weight.numel() * 4 + (m.bias.numel() * 4 if m.bias is not None else 0)
               for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    before = base_weight_bytes(model)

    assert quantize_model(model) == 7 * model.config.num_layers
    for name, module in model.named_modules():
        if name.endswith(("_proj",)):
            assert isinstance(module, Linear4bit), name
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed_tokens.weight
    assert not any("proj.weight" in n for n, _ in model.named_parameters())

    with torch.no_grad():
        got = model(x)
    cosine = F.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.99, cosine

    quantised = sum(model.get_submodule(n).quant_state.nbytes() for n in linears)
    assert before - base_weight_bytes(model) == sum(linears.values()) - quantised
    ratio = sum(linears.values()) / quantised  # small layers pay a few bytes of second-level scales
    assert 0.98 * 32 / bits_per_parameter() < ratio <= 32 / bits_per_parameter()
    assert quantize_model(model) == 0  # nothing left to quantise


def test_quantize_model_skip_and_untied_head():
    model = build_model(preset("llama-tiny", tie_embeddings=False))
    assert quantize_model(model, skip=("lm_head", "mlp.down_proj")) == 6 * model.config.num_layers
    assert isinstance(model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(model.layers[0].attn.o_proj, Linear4bit)
    assert isinstance(model.lm_head, nn.Linear)
    model = build_model(preset("llama-tiny", tie_embeddings=False))
    assert quantize_model(model, skip=()) == 7 * model.config.num_layers + 1
    assert isinstance(model.lm_head, Linear4bit)
    model = build_model(preset("llama-tiny"))  # tied: the head stays, even when not skipped
    assert quantize_model(model, skip=()) == 7 * model.config.num_layers
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed_tokens.weight
