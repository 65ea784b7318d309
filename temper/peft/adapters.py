"""Bottleneck adapters, prefix tuning and prompt tuning for temper's decoders, from outside.

Every method uses the hooks the model offers (`temper.models.common.DecoderBase`) through
PyTorch's own hook API; no `forward` is replaced and nothing switches on the family:
adapters are forward hooks on the attention and MLP modules; prefix tuning is a forward
pre-hook on the model that passes `prefix_kv=`; prompt tuning is a forward pre-hook that
passes `inputs_embeds=` with the soft prompt in front (and moves positions and masks), a
forward hook that drops the virtual tokens' outputs, and `model.extra_cache_slots`. The
hooks are module-level functions that read the new modules from the module they are
called on, so `copy.deepcopy(model)` gives a copy that uses its own parameters. The base
model's parameter names never change.

    n = inject_bottleneck_adapters(model, dim=16)             # layers.{i}.attn.adapter.*, ...
    enc = inject_prefix_tuning(model, num_virtual_tokens=16)  # model.prefix_encoder
    enc = inject_prompt_tuning(model, 16, init_ids=tok.encode("Classify the review:"))
    freeze_all_but(model, [enc])                              # train only the new parameters

Parameters added (L layers, C hidden size, kv = num_kv_heads * head_dim, P virtual tokens):

    adapters   layers.{i}.attn.adapter.{down,up}.{weight,bias}, layers.{i}.mlp.adapter.*
               (GPT-2: h.{i}.attn.adapter.*, h.{i}.mlp.adapter.*)
               count = L * 2 * (2*C*dim + dim + C)
    prefix     prefix_encoder.embedding.weight                        (P, L*2*kv)
               count = P * L * 2 * kv
      with projection=True (the names PEFT uses):
               prefix_encoder.embedding.weight (P, C),
               prefix_encoder.transform.0.{weight,bias} (C -> hidden),
               prefix_encoder.transform.2.{weight,bias} (hidden -> L*2*kv)
               count = P*C + C*hidden + hidden + hidden*L*2*kv + L*2*kv
    prompt     prompt_encoder.embedding.weight                        (P, C)
               count = P * C

Freezing is the caller's: `freeze_all_but(model, [module])`, or by hand
`for p in model.parameters(): p.requires_grad = False` and then unfreeze the module returned
(for adapters: the parameters whose name contains ".adapter.").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from temper.errors import TemperError
from temper.models.common import DecoderBase

__all__ = [
    "BottleneckAdapter", "PrefixEncoder", "PromptEncoder", "inject_bottleneck_adapters",
    "inject_prefix_tuning", "inject_prompt_tuning", "freeze_all_but",
]


def _check_decoder(model: nn.Module) -> None:
    if not isinstance(model, DecoderBase):
        raise TemperError(f"adapters need one of temper's decoders, not {type(model).__name__}")


def _like(model: nn.Module) -> dict:
    p = next(model.parameters())
    return {"device": p.device, "dtype": p.dtype}


def freeze_all_but(model: nn.Module, modules: Iterable[nn.Module]) -> int:
    """Freeze every parameter of `model`, then unfreeze those of `modules`; the trainable count."""
    for p in model.parameters():
        p.requires_grad = False
    trainable = {id(p): p for m in modules for p in m.parameters()}
    for p in trainable.values():
        p.requires_grad = True
    return sum(p.numel() for p in trainable.values())


# ----------------------------------------------------------------------------- bottleneck adapters


class BottleneckAdapter(nn.Module):
    """a(h) = W_up gelu(W_down h + b_down) + b_up, with W_up = b_up = 0 at init (so a(h) = 0)."""

    def __init__(self, hidden: int, dim: int, **like) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, dim, **like)
        self.up = nn.Linear(dim, hidden, **like)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(h)))


def _add_adapter(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter(output)


def inject_bottleneck_adapters(model: DecoderBase, dim: int) -> int:
    """Houlsby adapters after the attention output and after the MLP of every block.

    Each sublayer output h (before the residual add) becomes h + a(h), a as in
    `BottleneckAdapter`: x <- x + attn(norm(x)) + a1(attn(norm(x))), likewise for the MLP.
    The adapter is registered as a child `adapter` of the attention / MLP module and added by a
    forward hook, so the base parameter names are unchanged. The GELU between W_down and
    W_up makes the adapter non-linear: it cannot be merged into the weights and costs two small
    matmuls per sublayer at inference. Returns the number of adapter parameters,
    L * 2 * (2*C*dim + dim + C).
    """
    _check_decoder(model)
    if dim < 1:
        raise TemperError(f"adapter_dim must be at least 1, got {dim}")
    hidden, like, total = model.config.hidden_size, _like(model), 0
    for block in model.blocks:
        for module in (block.attn, block.mlp):
            if hasattr(module, "adapter"):
                raise TemperError("bottleneck adapters are already injected into this model")
            module.adapter = BottleneckAdapter(hidden, dim, **like)
            module.register_forward_hook(_add_adapter)
            total += sum(p.numel() for p in module.adapter.parameters())
    return total


# ----------------------------------------------------------------------------- prefix tuning


class PrefixEncoder(nn.Module):
    """Learned keys and values, (P, num_kv_heads, head_dim) each, for every layer.

    Without projection the table `embedding.weight` (P, L*2*kv) holds them directly. With
    projection (Li & Liang's reparameterisation, PEFT's `prefix_projection`):
    table = W_2 tanh(W_1 E + b_1) + b_2 with E (P, C). Each row is laid out as
    (layer, key|value, head, head_dim), as in PEFT. Init as PEFT: E ~ N(0, 1), linears default.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int,
                 hidden_size: int, projection: bool = False, hidden: int = 128, **like) -> None:
        super().__init__()
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens, self.projection = num_virtual_tokens, projection
        out = num_layers * 2 * num_kv_heads * head_dim
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size if projection else out, **like)
        if projection:
            self.transform = nn.Sequential(nn.Linear(hidden_size, hidden, **like), nn.Tanh(),
                                           nn.Linear(hidden, out, **like))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All prefixes: keys and values, (L, P, num_kv_heads, head_dim) each."""
        table = self.embedding.weight  # (P, L*2*kv)
        if self.projection:
            table = self.transform(table)
        kv = table.view(self.num_virtual_tokens, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        kv = kv.transpose(0, 1)  # (L, P, 2, nkv, hs)
        return kv[:, :, 0], kv[:, :, 1]

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefixes as the model's `prefix_kv`: per layer (keys, values), (1, nkv, P, hs) each."""
        keys, values = self()
        keys, values = keys.transpose(1, 2)[:, None], values.transpose(1, 2)[:, None]  # (L, 1, nkv, P, hs)
        return list(zip(keys, values))


def _pass_prefix(model: DecoderBase, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook: every call of the model gets the learned prefix as `prefix_kv`."""
    if kwargs.get("prefix_kv") is not None:
        raise TemperError("this model is prefix-tuned: its prefix_kv comes from model.prefix_encoder")
    return args, {**kwargs, "prefix_kv": model.prefix_encoder.key_values()}


def inject_prefix_tuning(model: DecoderBase, num_virtual_tokens: int, projection: bool = False,
                         hidden: int = 128) -> PrefixEncoder:
    """Prefix tuning: every attention call attends over [prefix_l ; keys] and [prefix_l ; values].

    For a query at slot t: softmax(q_t [K_p ; K]^T / sqrt(d) + mask) [V_p ; V], where all P prefix
    columns are visible to every query and the real columns keep the model's own mask (causal,
    padding, packing, sliding window, KV cache). Real tokens keep their positions (0.. as
    without the prefix); prefix keys get no rotary: they live in the post-rotary key space, like
    the cached past_key_values PEFT feeds HF Llama. The prefix is not stored in the KV cache but
    put in front at every call, so cached and uncached generation agree. The encoder is
    registered as `model.prefix_encoder`; a forward pre-hook passes its keys and values to the
    model's `prefix_kv`.
    """
    _check_decoder(model)
    if hasattr(model, "prefix_encoder"):
        raise TemperError("prefix tuning is already injected into this model")
    if num_virtual_tokens < 1:
        raise TemperError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}")
    c = model.config
    encoder = PrefixEncoder(c.num_layers, c.num_kv_heads, c.head_dim, num_virtual_tokens, c.hidden_size,
                            projection, hidden, **_like(model))
    model.prefix_encoder = encoder
    model.register_forward_pre_hook(_pass_prefix, with_kwargs=True)
    return encoder


# ----------------------------------------------------------------------------- prompt tuning


class PromptEncoder(nn.Module):
    """The soft prompt: `embedding.weight`, (P, C) learned input embeddings."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int, **like) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size, **like)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


def _prefill_mask(mask: torch.Tensor, P: int) -> torch.Tensor:
    """(B|1,1,T,T) over the real tokens -> (B|1,1,P+T,P+T) over [virtual ; real]: the virtual
    tokens see each other causally and no real token; every real token sees all of them."""
    n, T = mask.shape[0], mask.shape[-1]
    ones = torch.ones(P, P + T, dtype=torch.bool, device=mask.device)
    top = torch.cat([ones[:, :P].tril(), ~ones[:, P:]], dim=1)[None, None].expand(n, 1, P, P + T)
    bottom = torch.cat([ones[None, None, :1, :P].expand(n, 1, T, P), mask.expand(-1, -1, T, T)], dim=-1)
    return torch.cat([top, bottom], dim=2)


def _put_prompt_in_front(model: DecoderBase, args: tuple, kwargs: dict[str, Any]
                         ) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook: the model gets `inputs_embeds`, with the soft prompt in front on the
    first call of a sequence (no cache, or an empty one); positions and masks make room for it."""
    kwargs = dict(kwargs)
    input_ids = args[0] if args else kwargs.pop("input_ids", None)
    x = kwargs.pop("inputs_embeds", None)
    if (input_ids is None) == (x is None):
        return None  # the model's own error says what is wrong
    if x is None:
        x = model.input_embeddings(input_ids)  # (B, T, C)
    soft = model.prompt_encoder()  # (P, C)
    P = soft.shape[0]
    positions, mask, cache = kwargs.get("positions"), kwargs.get("mask"), kwargs.get("cache")
    if cache is None or cache.length == 0:  # [virtual ; real]: virtual at 0..P-1, real shifted by P
        x = torch.cat([soft.to(x.dtype)[None].expand(x.shape[0], -1, -1), x], dim=1)  # (B, P+T, C)
        if positions is not None:
            virtual = torch.arange(P, device=x.device)[None].expand(positions.shape[0], P)
            positions = torch.cat([virtual, positions + P], dim=1)
        if mask is not None:
            mask = _prefill_mask(mask, P)
    else:  # the virtual tokens are in the cache already: P more positions and key columns
        if positions is not None:
            positions = positions + P
        if mask is not None:
            seen = torch.ones(mask.shape[0], 1, mask.shape[2], P, dtype=torch.bool, device=mask.device)
            mask = torch.cat([seen, mask], dim=-1)
    kwargs.update(inputs_embeds=x, positions=positions, mask=mask)
    return (), kwargs


def _drop_prompt_outputs(model: DecoderBase, args: tuple, kwargs: dict[str, Any],
                         output: torch.Tensor) -> torch.Tensor:
    """Forward hook: callers get outputs for their own tokens only, as without the soft prompt."""
    cache = kwargs.get("cache")
    total = kwargs["inputs_embeds"].shape[1]
    # the prompt went in front iff the cache grew from empty by the whole input (or there is none)
    prompt_in_front = cache is None or cache.length == total
    if not prompt_in_front or kwargs.get("last_only"):
        return output
    return output[:, model.prompt_encoder.embedding.num_embeddings:]


def inject_prompt_tuning(model: DecoderBase, num_virtual_tokens: int,
                         init_ids: list[int] | None = None) -> PromptEncoder:
    """Prompt tuning: input embeddings [S ; E(ids)] with a learned S of shape (P, C).

    S starts as the embeddings of `init_ids` (repeated / truncated to P) or N(0, 0.02). The
    virtual tokens take positions 0..P-1 (rotary, or GPT-2's learned positions) and the real
    tokens are shifted by P; the model returns logits / hidden states for the real tokens only,
    so `causal_lm_loss` and generation work unchanged. Given boolean masks (B|1,1,T,S) get P
    True columns in front (the virtual tokens see only each other, causally). With a KV cache
    the soft prompt is put in front on the first call (`cache.length == 0`) and stays in the
    cache; `model.extra_cache_slots = P` makes `new_cache` reserve room for it. With
    S = E(init_ids) the model's output on ids equals the base model's on init_ids + ids at the
    positions of ids.
    """
    _check_decoder(model)
    if hasattr(model, "prompt_encoder"):
        raise TemperError("prompt tuning is already injected into this model")
    if num_virtual_tokens < 1:
        raise TemperError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}")
    encoder = PromptEncoder(num_virtual_tokens, model.config.hidden_size, **_like(model))
    if init_ids:
        ids = (list(init_ids) * math.ceil(num_virtual_tokens / len(init_ids)))[:num_virtual_tokens]
        embed = model.input_embeddings
        with torch.no_grad():
            encoder.embedding.weight.copy_(embed.weight[torch.tensor(ids, device=embed.weight.device)])
    model.prompt_encoder = encoder
    model.extra_cache_slots = num_virtual_tokens
    model.register_forward_pre_hook(_put_prompt_in_front, with_kwargs=True)
    model.register_forward_hook(_drop_prompt_outputs, with_kwargs=True)
    return encoder
