"""Bottleneck adapters, prefix tuning and prompt tuning for temper's decoders, from outside.

The model files stay as they are: adapters are forward hooks on the attention and MLP
modules, prefix tuning replaces each attention module's bound `forward`, prompt tuning
replaces the model's bound `forward` (and `new_cache`). The patches are module-level
functions bound with `types.MethodType`, so `copy.deepcopy(model)` gives a copy that uses its
own parameters (pickling a whole patched module does not work; temper saves state dicts).
The base model's parameter names never change.

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
import types
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from temper.errors import TemperError
from temper.models.common import DecoderBase, KVCache, apply_rotary, attend

__all__ = [
    "BottleneckAdapter", "PrefixEncoder", "PromptEncoder", "inject_bottleneck_adapters",
    "inject_prefix_tuning", "inject_prompt_tuning", "freeze_all_but",
]


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "layers", None) or getattr(model, "h", None)
    if blocks is None:
        raise TemperError(f"{type(model).__name__} has no list of blocks (layers or h)")
    return blocks


def _family(model: nn.Module) -> str:
    family = getattr(getattr(model, "config", None), "family", None)
    if family not in ("llama", "gpt2"):
        raise TemperError(f"adapters support temper's llama and gpt2 decoders, not {family!r}")
    return family


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
    _family(model)
    if dim < 1:
        raise TemperError(f"adapter_dim must be at least 1, got {dim}")
    hidden, like, total = model.config.hidden_size, _like(model), 0
    for block in _blocks(model):
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

    def layer_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer`, (P, num_kv_heads, head_dim) each."""
        width = 2 * self.num_kv_heads * self.head_dim
        cols = slice(layer * width, (layer + 1) * width)
        if self.projection:  # only this layer's slice of the last linear is computed
            first, last = self.transform[0], self.transform[2]
            kv = F.linear(torch.tanh(first(self.embedding.weight)), last.weight[cols], last.bias[cols])
        else:
            kv = self.embedding.weight[:, cols]
        kv = kv.view(self.num_virtual_tokens, 2, self.num_kv_heads, self.head_dim)
        return kv[:, 0], kv[:, 1]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All prefixes: keys and values, (L, P, num_kv_heads, head_dim) each."""
        pairs = [self.layer_prefix(i) for i in range(self.num_layers)]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])


def _attend_with_prefix(self, q, k, v, mask, causal):
    """attend() over [prefix ; k] with mask [True (P columns) ; the mask the model meant]."""
    pk, pv = self._prefix_encoder.layer_prefix(self.layer)  # (P, nkv, hs)
    B, T, S, P = q.shape[0], q.shape[2], k.shape[2], pk.shape[0]
    pk = pk.to(k.dtype).transpose(0, 1)[None].expand(B, -1, -1, -1)  # (B, nkv, P, hs)
    pv = pv.to(v.dtype).transpose(0, 1)[None].expand(B, -1, -1, -1)
    if mask is None:  # what attend() would have done: causal (past == 0, so S == T) or full
        q_slot = torch.arange(S - T, S, device=q.device)[:, None]
        k_slot = torch.arange(S, device=q.device)[None, :]
        mask = (k_slot <= q_slot if causal else torch.ones(T, S, dtype=torch.bool, device=q.device))[None, None]
    seen = torch.ones(mask.shape[0], 1, T, P, dtype=torch.bool, device=mask.device)
    mask = torch.cat([seen, mask.expand(-1, -1, T, S)], dim=-1)  # (B|1, 1, T, P + S)
    return attend(q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), mask, causal=False)


def _llama_prefix_forward(self, x, cos, sin, mask, causal, cache):
    """temper.models.llama.Attention.forward with the layer's prefix in front of the keys."""
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
        k, v = cache.update(self.layer, k, v)  # real tokens only: the prefix is never cached
    y = _attend_with_prefix(self, q, k, v, mask, causal)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _gpt2_prefix_forward(self, x, mask, causal, cache):
    """temper.models.gpt2.Attention.forward with the layer's prefix in front of the keys."""
    B, T, _ = x.shape
    q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
               for t in self.c_attn(x).split(self.num_heads * self.head_dim, dim=2))
    if cache is not None:
        k, v = cache.update(self.layer, k, v)
    y = _attend_with_prefix(self, q, k, v, mask, causal)
    return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


def inject_prefix_tuning(model: DecoderBase, num_virtual_tokens: int, projection: bool = False,
                         hidden: int = 128) -> PrefixEncoder:
    """Prefix tuning: every attention call attends over [prefix_l ; keys] and [prefix_l ; values].

    For a query at slot t: softmax(q_t [K_p ; K]^T / sqrt(d) + mask) [V_p ; V], where all P prefix
    columns are visible to every query and the real columns keep the model's own mask (causal,
    padding, packing, sliding window, KV cache). Real tokens keep their positions (0.. as
    without the prefix); prefix keys get no rotary: they live in the post-rotary key space, like
    the cached past_key_values PEFT feeds HF Llama. The prefix is not stored in the KV cache but
    put in front at every call, so cached and uncached generation agree. The encoder is
    registered as `model.prefix_encoder`; each attention module's `forward` is replaced.
    """
    family = _family(model)
    if hasattr(model, "prefix_encoder"):
        raise TemperError("prefix tuning is already injected into this model")
    if num_virtual_tokens < 1:
        raise TemperError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}")
    c = model.config
    encoder = PrefixEncoder(c.num_layers, c.num_kv_heads, c.head_dim, num_virtual_tokens, c.hidden_size,
                            projection, hidden, **_like(model))
    model.prefix_encoder = encoder
    patched = _llama_prefix_forward if family == "llama" else _gpt2_prefix_forward
    for block in _blocks(model):
        object.__setattr__(block.attn, "_prefix_encoder", encoder)  # a reference, not a submodule
        block.attn.forward = types.MethodType(patched, block.attn)
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


def _run_decoder(model, x, positions, mask, causal, cache):
    """The blocks of either family on input embeddings x (B, T, C); returns hidden states and the final norm."""
    if model.config.family == "llama":
        cos, sin = model.rope(positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in model.layers:
            x = block(x, cos, sin, mask, causal, cache)
        return x, model.norm
    if int(positions.max()) >= model.config.max_seq_len:
        raise ValueError(f"position {int(positions.max())} (virtual tokens included) is beyond the "
                         f"model's {model.config.max_seq_len} learned positions")
    x = x + model.wpe(positions)
    for block in model.h:
        x = block(x, mask, causal, cache)
    return x, model.ln_f


def _prompt_forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, cache: KVCache | None = None,
                    return_hidden: bool = False, last_only: bool = False) -> torch.Tensor:
    """DecoderBase.forward with the soft prompt in front; outputs for the real tokens only."""
    soft = self.prompt_encoder()
    P, B = soft.shape[0], input_ids.shape[0]
    embed = self.embed_tokens if self.config.family == "llama" else self.wte
    x = embed(input_ids)
    prefill = cache is None or cache.length == 0
    if prefill:  # [virtual ; real]: virtual at positions 0..P-1, real positions shifted by P
        x = torch.cat([soft.to(x.dtype)[None].expand(B, -1, -1), x], dim=1)
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
    # _attention_inputs reads only the shape and device of its first argument
    positions, mask, causal = self._attention_inputs(x[..., 0], positions, mask, cache,
                                                     self.config.sliding_window)
    x, norm = _run_decoder(self, x, positions, mask, causal, cache)
    if cache is not None:
        cache.length += x.shape[1]
    if prefill:
        x = x[:, P:]
    if last_only:
        x = x[:, -1:]
    x = norm(x)
    return x if return_hidden else self.lm_head(x)


def _prompt_new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> KVCache:
    """A cache with room for the virtual tokens too."""
    P = self.prompt_encoder.embedding.num_embeddings
    return DecoderBase.new_cache(self, batch_size, max_len + P, dtype, device)


def inject_prompt_tuning(model: DecoderBase, num_virtual_tokens: int,
                         init_ids: list[int] | None = None) -> PromptEncoder:
    """Prompt tuning: input embeddings [S ; E(ids)] with a learned S of shape (P, C).

    S starts as the embeddings of `init_ids` (repeated / truncated to P) or N(0, 0.02). The
    virtual tokens take positions 0..P-1 (rotary, or GPT-2's learned positions) and the real
    tokens are shifted by P; the model returns logits / hidden states for the real tokens only,
    so `causal_lm_loss` and generation work unchanged. Given boolean masks (B|1,1,T,S) get P
    True columns in front (the virtual tokens see only each other, causally). With a KV cache
    the soft prompt is put in front on the first call (`cache.length == 0`) and stays in the
    cache; `model.new_cache` reserves P more slots. With S = E(init_ids) the model's output on
    ids equals the base model's on init_ids + ids at the positions of ids.
    """
    _family(model)
    if hasattr(model, "prompt_encoder"):
        raise TemperError("prompt tuning is already injected into this model")
    if num_virtual_tokens < 1:
        raise TemperError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}")
    encoder = PromptEncoder(num_virtual_tokens, model.config.hidden_size, **_like(model))
    if init_ids:
        ids = (list(init_ids) * math.ceil(num_virtual_tokens / len(init_ids)))[:num_virtual_tokens]
        embed = model.embed_tokens if model.config.family == "llama" else model.wte
        with torch.no_grad():
            encoder.embedding.weight.copy_(embed.weight[torch.tensor(ids, device=embed.weight.device)])
    model.prompt_encoder = encoder
    model.forward = types.MethodType(_prompt_forward, model)
    model.new_cache = types.MethodType(_prompt_new_cache, model)
    return encoder
