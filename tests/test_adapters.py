"""Bottleneck adapters, prefix tuning and prompt tuning (temper.peft.adapters) on both families."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_reorder_close, decoder_lengths

from temper.errors import TemperError
from temper.losses import causal_lm_loss
from temper.models import build_model, init_weights, preset
from temper.models.common import apply_rotary, build_attention_mask, positions_from_valid
from temper.models.generate import SamplingConfig, generate
from temper.peft.adapters import (
    freeze_all_but,
    inject_bottleneck_adapters,
    inject_prefix_tuning,
    inject_prompt_tuning,
)

FAMILIES = ["llama-tiny", "gpt2-tiny"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3, 4, 5, 6, 7, 8, 9, 10, 2]]  # ragged: left padding


def tiny(name: str, seed: int = 0):
    """A tiny model with weights large enough that its greedy output depends on its input
    (with the default 0.02 init, the tied embeddings make it repeat the last token)."""
    torch.manual_seed(seed)
    model = build_model(preset(name, vocab_size=64)).eval()
    init_weights(model, std=0.2)
    return model


def ragged_batch(prompts=PROMPTS):
    """Left-padded ids, their positions and the generation-style mask."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    return ids, positions_from_valid(valid), build_attention_mask(valid, width, width), valid


@torch.no_grad()
def assert_ragged_cache_matches(model):
    """Left-padded prefill with a cache, then two one-token steps with the masks and positions
    generation passes, against one uncached pass over the whole batch (real tokens only)."""
    ids, positions, mask, valid = ragged_batch()
    B, W = ids.shape
    full = model(ids, positions=positions, mask=mask)
    cache = model.new_cache(B, W)
    parts = [model(ids[:, :W - 2], positions=positions[:, :W - 2], cache=cache,
                   mask=build_attention_mask(valid, W - 2, W - 2))]
    for t in (W - 2, W - 1):
        parts.append(model(ids[:, t:t + 1], positions=positions[:, t:t + 1], cache=cache,
                           mask=valid[:, None, None, :t + 1]))
    assert_reorder_close(torch.cat(parts, 1)[valid], full[valid], decoder_lengths(model, W))


def norms(block):
    return (block.attn_norm, block.mlp_norm) if hasattr(block, "attn_norm") else (block.ln_1, block.ln_2)


def reference_decoder(model, ids, positions, attention, mlp=None):
    """The decoder by hand: `attention(block.attn, x, cos, sin)` and `mlp(block.mlp, x)` per block."""
    cos = sin = None
    x = model.input_embeddings(ids)
    if model.config.family == "llama":
        cos, sin = model.rope(positions)
    else:
        x = x + model.wpe(positions)
    for block in model.blocks:
        n1, n2 = norms(block)
        x = x + attention(block.attn, n1(x), cos, sin)
        x = x + (mlp or (lambda m, h: type(m).forward(m, h)))(block.mlp, n2(x))
    return model.lm_head(model.final_norm(x))


def qkv(attn, x, cos, sin):
    B, T, _ = x.shape
    if hasattr(attn, "q_proj"):
        q = attn.q_proj(x).view(B, T, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, attn.num_kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, attn.num_kv_heads, -1).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, attn.o_proj
    q, k, v = attn.c_attn(x).chunk(3, dim=-1)
    q, k, v = (t.view(B, T, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    return q, k, v, attn.c_proj


def softmax_attention(q, k, v, allowed):
    """Plain attention: q (B,nh,T,d), k/v (B,nkv,S,d), allowed (B|1,1,T,S) bool."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


# ----------------------------------------------------------------------------- bottleneck adapters


@pytest.mark.parametrize("name", FAMILIES)
def test_adapters_identity_at_init_then_match_reference(name):
    model = tiny(name)
    ids, positions, mask, _ = ragged_batch()
    before = model(ids, positions=positions, mask=mask)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    c, dim = model.config, 4
    count = inject_bottleneck_adapters(model, dim)
    assert count == c.num_layers * 2 * (2 * c.hidden_size * dim + dim + c.hidden_size)
    prefix = "layers" if c.family == "llama" else "h"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())  # base names unchanged
    assert set(state) - set(base_state) == {
        f"{prefix}.{i}.{m}.adapter.{lin}.{p}" for i in range(c.num_layers) for m in ("attn", "mlp")
        for lin in ("down", "up") for p in ("weight", "bias")}
    assert torch.equal(model(ids, positions=positions, mask=mask), before)  # W_up = 0: exact identity

    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if ".adapter.up." in n:
            torch.nn.init.normal_(p, std=0.5)
    after = model(ids, positions=positions, mask=mask)
    assert not torch.allclose(after, before, atol=1e-3)

    def adapted(module, h):
        return h + module.adapter.up(torch.nn.functional.gelu(module.adapter.down(h)))

    def attention(attn, x, cos, sin):
        q, k, v, out = qkv(attn, x, cos, sin)
        y = softmax_attention(q, k, v, mask)
        return adapted(attn, out(y.transpose(1, 2).reshape(*x.shape[:2], -1)))

    ref = reference_decoder(model, ids, positions, attention,
                            lambda m, h: adapted(m, type(m).forward(m, h)))
    assert_reorder_close(after, ref, decoder_lengths(model, ids.shape[1]) + (c.hidden_size, dim))


@pytest.mark.parametrize("name", FAMILIES)
def test_adapters_train_alone_and_generate(name):
    model = tiny(name)
    inject_bottleneck_adapters(model, 8)
    adapters = [m.adapter for b in model.blocks for m in (b.attn, b.mlp)]
    trainable = freeze_all_but(model, adapters)
    assert trainable == sum(p.numel() for a in adapters for p in a.parameters())
    ids = torch.randint(1, 64, (2, 10))
    loss, _ = causal_lm_loss(model, ids[:, :-1], ids[:, 1:])
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".adapter." in n), n
    assert all(a.up.weight.grad.abs().sum() > 0 for a in adapters)  # W_down's grad is 0 while W_up = 0
    with torch.no_grad():
        for a in adapters:
            a.up.weight.normal_(std=0.3)
    cfg = SamplingConfig(max_new_tokens=8)
    assert generate(model, PROMPTS, cfg) == generate(model, PROMPTS, cfg, use_cache=False)
    with pytest.raises(TemperError):
        inject_bottleneck_adapters(model, 8)


# ----------------------------------------------------------------------------- prefix tuning


def prefix_reference(model, encoder, ids, positions, allowed):
    """The model by hand, attention over [prefix ; keys] with the prefix columns always visible."""

    def attention(attn, x, cos, sin):
        B, T, _ = x.shape
        q, k, v, out = qkv(attn, x, cos, sin)
        keys, values = encoder()
        pk, pv = keys[attn.layer], values[attn.layer]  # (P, nkv, d): no rotary on the prefix
        k = torch.cat([pk.transpose(0, 1).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.transpose(0, 1).expand(B, -1, -1, -1), v], dim=2)
        full = torch.cat([torch.ones(*allowed.shape[:3], pk.shape[0], dtype=torch.bool), allowed], -1)
        y = softmax_attention(q, k, v, full)
        return out(y.transpose(1, 2).reshape(B, T, -1))

    return reference_decoder(model, ids, positions, attention)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_matches_reference_attention(name, projection):
    model = tiny(name)
    ids, positions, mask, _ = ragged_batch()
    base = model(ids, positions=positions, mask=mask)
    P, hidden = 3, 16
    encoder = inject_prefix_tuning(model, P, projection=projection, hidden=hidden)
    c = model.config
    kv = c.num_kv_heads * c.head_dim
    expected = (P * c.hidden_size + c.hidden_size * hidden + hidden + hidden * c.num_layers * 2 * kv
                + c.num_layers * 2 * kv) if projection else P * c.num_layers * 2 * kv
    assert sum(p.numel() for p in encoder.parameters()) == expected
    assert model.prefix_encoder is encoder
    assert {n for n in model.state_dict() if n.startswith("prefix_encoder.")} == (
        {"prefix_encoder.embedding.weight"} | ({f"prefix_encoder.transform.{i}.{p}" for i in (0, 2)
                                               for p in ("weight", "bias")} if projection else set()))
    keys, values = encoder()
    assert keys.shape == values.shape == (c.num_layers, P, c.num_kv_heads, c.head_dim)

    with torch.no_grad():
        out = model(ids, positions=positions, mask=mask)
        assert not torch.allclose(out, base, atol=1e-3)
        assert_reorder_close(out, prefix_reference(model, encoder, ids, positions, mask),
                             decoder_lengths(model, P + ids.shape[1]))
        plain = torch.randint(1, 64, (2, 9))  # no mask: the causal default
        T = plain.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        assert_reorder_close(model(plain), prefix_reference(model, encoder, plain, torch.arange(T)[None], causal),
                             decoder_lengths(model, P + T))


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_cache_and_generation(name, projection):
    model = tiny(name)
    inject_prefix_tuning(model, 4, projection=projection)
    ids = torch.randint(1, 64, (2, 12))
    with torch.no_grad():  # prefill then a chunk of several tokens, against one uncached pass
        full = model(ids)
        cache = model.new_cache(2, 16)
        first = model(ids[:, :5], cache=cache)
        second = model(ids[:, 5:], cache=cache)
    assert cache.length == 12  # the prefix is never cached
    assert_reorder_close(torch.cat([first, second], 1), full, decoder_lengths(model, 4 + 12))
    assert_ragged_cache_matches(model)
    cfg = SamplingConfig(max_new_tokens=10)
    cached = generate(model, PROMPTS, cfg)
    assert cached == generate(model, PROMPTS, cfg, use_cache=False)
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    assert generate(model, PROMPTS, sampled) == generate(model, PROMPTS, sampled, use_cache=False)
    # a batch row decodes as it would alone (padding masks reach the patched attention)
    assert [generate(model, [p], cfg)[0] for p in PROMPTS] == cached


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_gradients_reach_only_the_prefix(name, projection):
    model = tiny(name)
    encoder = inject_prefix_tuning(model, 4, projection=projection, hidden=8)
    assert freeze_all_but(model, [encoder]) == sum(p.numel() for p in encoder.parameters())
    ids, positions, mask, valid = ragged_batch()
    targets = torch.where(valid[:, 1:], ids[:, 1:], -100)
    loss, count = causal_lm_loss(model, ids[:, :-1], targets, positions=positions[:, :-1],
                                 mask=mask[:, :, :-1, :-1])
    assert count > 0
    loss.backward()
    for n, p in model.named_parameters():
        if n.startswith("prefix_encoder."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_prefix_survives_deepcopy():
    model = tiny("llama-tiny")
    inject_prefix_tuning(model, 2)
    twin = copy.deepcopy(model)
    ids = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids), model(ids), rtol=0, atol=0)  # the same code and shapes
        twin.prefix_encoder.embedding.weight.mul_(3.0)  # the copy uses its own prefix
        assert not torch.allclose(twin(ids), model(ids), atol=1e-3)


# ----------------------------------------------------------------------------- prompt tuning


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_from_init_ids_equals_base_on_longer_input(name):
    model = tiny(name)
    P, init = 5, [7, 3]
    virtual = [7, 3, 7, 3, 7]  # init_ids repeated, then truncated to P
    ids, positions, mask, _ = ragged_batch()
    with torch.no_grad():
        base_rows = [model(torch.tensor([virtual + p]))[0, P:] for p in PROMPTS]
        base_hidden = model(torch.tensor([virtual + PROMPTS[0]]), return_hidden=True)[:, P:]
        encoder = inject_prompt_tuning(model, P, init_ids=init)
        assert sum(p.numel() for p in encoder.parameters()) == P * model.config.hidden_size
        assert "prompt_encoder.embedding.weight" in model.state_dict()
        forward = decoder_lengths(model, P + max(map(len, PROMPTS)))  # the same positions, another order
        assert_reorder_close(model(torch.tensor([PROMPTS[0]])), base_rows[0][None], forward)
        assert_reorder_close(model(torch.tensor([PROMPTS[0]]), return_hidden=True), base_hidden, forward)
        out = model(ids, positions=positions, mask=mask)  # left padding, generation-style mask
        assert out.shape == (len(PROMPTS), ids.shape[1], 64)
        for row, ref in enumerate(base_rows):
            assert_reorder_close(out[row, -len(PROMPTS[row]):], ref, forward)
        last = model(ids, positions=positions, mask=mask, return_hidden=True, last_only=True)
        assert last.shape == (len(PROMPTS), 1, model.config.hidden_size)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_init_ids_repeat_and_random_init(name):
    model = tiny(name)
    embed = model.input_embeddings
    enc = inject_prompt_tuning(model, 5, init_ids=[7, 3])
    torch.testing.assert_close(enc.embedding.weight, embed.weight[[7, 3, 7, 3, 7]], rtol=0, atol=0)  # copied
    other = tiny(name)
    rand = inject_prompt_tuning(other, 400)
    assert abs(rand.embedding.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_generation_cached_uncached_and_equal_to_base(name):
    base = tiny(name)
    model = copy.deepcopy(base)
    init = [7, 3, 9]
    inject_prompt_tuning(model, len(init), init_ids=init)
    cfg = SamplingConfig(max_new_tokens=10)
    cached = generate(model, PROMPTS, cfg)
    assert cached == generate(model, PROMPTS, cfg, use_cache=False)
    assert cached == generate(base, [init + p for p in PROMPTS], cfg)
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.normal_(std=1.0)
    cached = generate(model, PROMPTS, cfg)
    assert cached == generate(model, PROMPTS, cfg, use_cache=False)
    assert [generate(model, [p], cfg)[0] for p in PROMPTS] == cached
    with torch.no_grad():  # a chunk after the cached prefill
        ids = torch.randint(1, 64, (2, 10))
        cache = model.new_cache(2, 10)
        parts = [model(ids[:, :4], cache=cache), model(ids[:, 4:], cache=cache)]
        assert cache.length == 10 + 3
        assert_reorder_close(torch.cat(parts, 1), model(ids), decoder_lengths(model, 3 + 10))
    assert_ragged_cache_matches(model)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_loss_gradients_reach_only_the_soft_prompt(name):
    model = tiny(name)
    encoder = inject_prompt_tuning(model, 4)
    freeze_all_but(model, [encoder])
    ids, positions, mask, valid = ragged_batch()
    targets = torch.where(valid[:, 1:], ids[:, 1:], -100)
    loss, count = causal_lm_loss(model, ids[:, :-1], targets, positions=positions[:, :-1],
                                 mask=mask[:, :, :-1, :-1])
    assert count == int(valid[:, 1:].sum())
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.startswith("prompt_encoder."), n
    assert encoder.embedding.weight.grad.abs().sum() > 0
    with pytest.raises(TemperError):
        inject_prompt_tuning(model, 4)


def test_prompt_positions_past_gpt2_table_raise():
    model = tiny("gpt2-tiny")
    inject_prompt_tuning(model, 8)
    with pytest.raises(ValueError, match="learned positions"):
        model(torch.zeros(1, model.config.max_seq_len - 4, dtype=torch.long))


def test_prompt_survives_deepcopy():
    model = tiny("gpt2-tiny")
    inject_prompt_tuning(model, 3)
    twin = copy.deepcopy(model)
    ids = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids), model(ids), rtol=0, atol=0)  # the same code and shapes
        twin.prompt_encoder.embedding.weight.mul_(3.0)  # the copy's hooks use the copy's prompt
        assert not torch.allclose(twin(ids), model(ids), atol=1e-3)
        assert twin.new_cache(1, 6).max_len == 6 + 3


# ----------------------------------------------------------------------------- no patched forwards


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "adapter", "prefix", "prompt"])
@pytest.mark.parametrize("name", FAMILIES)
def test_peft_replaces_no_forward(name, method):
    """Every method works through the model's hooks: no module carries an instance-level
    `forward` (or `new_cache`), so a change to a model file is the only change needed."""
    from temper.config import PeftConfig
    from temper.peft import apply_peft

    model = tiny(name)
    targets = ["q_proj", "v_proj"] if model.config.family == "llama" else ["c_attn"]
    apply_peft(model, PeftConfig(method=method, target_modules=targets, num_virtual_tokens=2, adapter_dim=4,
                                 quant_block_size=32))
    for module_name, module in model.named_modules():
        assert "forward" not in vars(module), f"{method} replaced {module_name or 'the model'}.forward"
    assert "new_cache" not in vars(model)
    cfg = SamplingConfig(max_new_tokens=4)
    assert generate(model, PROMPTS, cfg) == generate(model, PROMPTS, cfg, use_cache=False)
