"""The decode step's fast paths keep the maths: rotary by roll with a signed sin table, rotary
tables sliced for default positions, the cached one-token steps against the full forward, and
greedy decoding that reads nothing back from the device per token (issue 25)."""

import pytest
import torch
from conftest import assert_reorder_close, context_sensitive_model, decoder_lengths

from temper.models.common import RotaryEmbedding, apply_rotary, rope_inverse_frequencies
from temper.models.generate import SamplingConfig, generate


def test_rotary_by_roll_is_rotate_half_to_the_bit():
    """x * cos + rotate_half(x) * sin (HF's formula, plain sin) and the signed-sin roll give the same
    floats: the sign fold only moves an exact negation. The sliced tables of default positions are
    the gathered ones, and a slice beyond the table grows it."""
    torch.manual_seed(0)
    hs, L = 16, 12
    rope = RotaryEmbedding(hs, L, 10000.0)
    freqs = torch.outer(torch.arange(L, dtype=torch.float32), rope_inverse_frequencies(hs, 10000.0))
    emb = torch.cat((freqs, freqs), -1)
    positions = torch.tensor([[3, 4, 5], [0, 7, 11]])
    cos, sin = rope(positions)
    x = torch.randn(2, 3, 3, hs)  # (B, nh, T, hs)
    rotate_half = torch.cat((-x[..., hs // 2:], x[..., :hs // 2]), -1)
    reference = x * emb.cos()[positions][:, None] + rotate_half * emb.sin()[positions][:, None]
    assert torch.equal(apply_rotary(x, cos, sin), reference)
    sliced = rope(positions[:1], first=3)
    assert sliced[0].shape == (1, 1, 3, hs)
    assert torch.equal(sliced[0], cos[:1]) and torch.equal(sliced[1], sin[:1])
    far = rope(torch.arange(14, 16)[None], first=14)  # beyond the 12 positions: rebuilt, as HF does
    assert rope.cos.shape[0] == 16 and torch.equal(far[0], rope(torch.arange(14, 16)[None])[0])


def test_cached_decode_steps_give_the_full_forward_logits():
    """Prefill, then one token at a time through the KV cache with default positions (the sliced
    rotary tables): every step's logits are the full forward's, within fp32 reordering."""
    model = context_sensitive_model()
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        parts = [model(ids[:, :5], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert_reorder_close(torch.cat(parts, 1), full, decoder_lengths(model, 12))


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the tensor reads that wait for the device: .tolist(), .item(), bool() and int()."""
    count = [0]
    for name in ("tolist", "item", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            count[0] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


def test_greedy_decoding_reads_nothing_back_per_token(host_reads):
    """Greedy tokens without EOS or callbacks stay on the device until the end: 4 or 12 new tokens
    take the same number of reads. With an EOS, one boolean per token (did a row end?)."""
    model = context_sensitive_model()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]

    def reads(**cfg) -> int:
        before = host_reads[0]
        generate(model, prompts, SamplingConfig(**cfg))
        return host_reads[0] - before
    assert reads(max_new_tokens=4) == reads(max_new_tokens=12)
    out = generate(model, prompts, SamplingConfig(max_new_tokens=12))
    never = next(t for t in range(64) if all(t not in row for row in out))  # an EOS no row reaches
    assert reads(max_new_tokens=12, eos_token_ids=[never]) - reads(max_new_tokens=4, eos_token_ids=[never]) == 8
    assert generate(model, prompts, SamplingConfig(max_new_tokens=12, eos_token_ids=[never])) == out
