"""The hooks DecoderBase offers features (named modules, inputs_embeds, prefix_kv), on both families."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_reorder_close, decoder_lengths
from test_adapters import FAMILIES, qkv, ragged_batch, reference_decoder, softmax_attention, tiny

from temper.errors import TemperError
from temper.models.common import build_attention_mask


@pytest.mark.parametrize("name, embedding, blocks, norm", [
    ("llama-tiny", "embed_tokens", "layers", "norm"),
    ("gpt2-tiny", "wte", "h", "ln_f"),
])
def test_named_accessors_are_the_family_modules(name, embedding, blocks, norm):
    model = tiny(name)
    assert model.input_embeddings is getattr(model, embedding)
    assert model.blocks is getattr(model, blocks)
    assert model.final_norm is getattr(model, norm)
    assert len(model.blocks) == model.config.num_layers
    assert model.lm_head.weight is model.input_embeddings.weight  # tied in both tiny presets
    # the accessors are views: state dict names stay the family's own (HF conversion needs them)
    keys = set(model.state_dict())
    assert f"{embedding}.weight" in keys and f"{blocks}.0.attn.{'q_proj' if blocks == 'layers' else 'c_attn'}.weight" in keys
    assert not any(k.startswith(("input_embeddings", "blocks", "final_norm")) for k in keys)


@pytest.mark.parametrize("name", FAMILIES)
def test_inputs_embeds_equal_ids(name):
    model = tiny(name)
    ids, positions, mask, valid = ragged_batch()
    embeds = model.input_embeddings(ids)
    with torch.no_grad():
        for kwargs in ({}, {"positions": positions, "mask": mask}, {"return_hidden": True, "last_only": True}):
            assert torch.equal(model(inputs_embeds=embeds, **kwargs), model(ids, **kwargs))
        # with a cache: an embedded prefill, then an embedded step, against ids all the way
        B, W = ids.shape
        by_ids, by_embeds = model.new_cache(B, W), model.new_cache(B, W)
        for start, end in ((0, W - 1), (W - 1, W)):
            step = {"positions": positions[:, start:end], "mask": valid[:, None, None, :end]}
            if start == 0:
                step["mask"] = build_attention_mask(valid, end, end)
            expected = model(ids[:, start:end], cache=by_ids, **step)
            assert torch.equal(model(inputs_embeds=embeds[:, start:end], cache=by_embeds, **step), expected)
        assert by_embeds.length == by_ids.length == W


def test_exactly_one_input_and_prefix_per_layer():
    model = tiny("llama-tiny")
    ids = torch.randint(1, 64, (1, 4))
    with pytest.raises(TemperError, match="exactly one"):
        model(ids, inputs_embeds=model.input_embeddings(ids))
    with pytest.raises(TemperError, match="exactly one"):
        model()
    one_layer = [(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))]
    with pytest.raises(TemperError, match="prefix_kv has 1 layers"):
        model(ids, prefix_kv=one_layer)


def random_prefix(model, P: int, batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    c = model.config
    shape = (batch, c.num_kv_heads, P, c.head_dim)
    return [(torch.randn(shape), torch.randn(shape)) for _ in range(c.num_layers)]


def prefix_kv_reference(model, prefix_kv, ids, positions, allowed):
    """The model by hand, each layer's keys/values preceded by its prefix (no rotary on it), all
    prefix columns visible to every query, the real columns under `allowed`."""

    def attention(attn, x, cos, sin):
        B, T, _ = x.shape
        q, k, v, out = qkv(attn, x, cos, sin)
        pk, pv = prefix_kv[attn.layer]
        k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
        seen = torch.ones(*allowed.shape[:3], pk.shape[2], dtype=torch.bool)
        y = softmax_attention(q, k, v, torch.cat([seen, allowed.expand(-1, -1, T, -1)], -1))
        return out(y.transpose(1, 2).reshape(B, T, -1))

    return reference_decoder(model, ids, positions, attention)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_kv_matches_hand_attention(name):
    model = tiny(name)
    torch.manual_seed(2)
    ids, positions, mask, _ = ragged_batch()
    with torch.no_grad():
        base = model(ids, positions=positions, mask=mask)
        for batch in (1, ids.shape[0]):  # one prefix for all rows, or one per row
            prefix = random_prefix(model, 3, batch)
            out = model(ids, positions=positions, mask=mask, prefix_kv=prefix)
            assert not torch.allclose(out, base, atol=1e-3)
            assert_reorder_close(out, prefix_kv_reference(model, prefix, ids, positions, mask),
                                 decoder_lengths(model, 3 + ids.shape[1]))
        plain = torch.randint(1, 64, (2, 7))  # no mask given: the causal default
        T = plain.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        prefix = random_prefix(model, 2)
        assert_reorder_close(model(plain, prefix_kv=prefix),
                             prefix_kv_reference(model, prefix, plain, torch.arange(T)[None], causal),
                             decoder_lengths(model, 2 + T))
        # a zero-length prefix changes nothing
        assert_reorder_close(model(ids, positions=positions, mask=mask, prefix_kv=random_prefix(model, 0)),
                             base, decoder_lengths(model, ids.shape[1]))


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_kv_is_not_cached(name):
    model = tiny(name)
    prefix = random_prefix(model, 4)
    ids = torch.randint(1, 64, (2, 9))
    with torch.no_grad():
        full = model(ids, prefix_kv=prefix)
        cache = model.new_cache(2, 9)
        parts = [model(ids[:, :5], prefix_kv=prefix, cache=cache)]
        parts += [model(ids[:, t:t + 1], prefix_kv=prefix, cache=cache) for t in range(5, 9)]
    assert cache.length == 9  # only the real tokens took cache slots
    assert_reorder_close(torch.cat(parts, 1), full, decoder_lengths(model, 4 + 9))


def test_extra_cache_slots_reserve_room():
    model = tiny("llama-tiny")
    assert model.new_cache(2, 10).max_len == 10
    model.extra_cache_slots = 3
    cache = model.new_cache(2, 10)
    assert cache.max_len == 13 and cache.keys[0].shape == (2, model.config.num_kv_heads, 13, model.config.head_dim)
