"""LoRA and DoRA, injected into a model from outside by module replacement.

LoRA (Hu et al. 2021) freezes a linear layer W (out x in) and learns a low-rank update:

    h = W x + b + s * B A dropout(x),   A: (r, in), B: (out, r),   s = alpha / r

(s = alpha / sqrt(r) with rank-stabilised LoRA). A starts like PEFT's (kaiming-uniform,
a = sqrt(5)) and B at zero, so an untrained adapter leaves the model unchanged.

DoRA (Liu et al. 2024) splits the adapted weight into a learned magnitude m (out,) and a
direction, normalised per output row (the norm runs over the input dimension):

    W' = m * (W + s B A) / ||W + s B A||_c,   m initialised to ||W||_c

As in the paper (section 4.3) and PEFT, the norm is treated as a constant (detached), and
the output is computed the way PEFT's `lora_magnitude_vector` computes it, with k = m / norm:

    h = W x + b + (k - 1) * W x + k * s * B A dropout(x)

The base layer is an `nn.Linear`, or any module with `in_features`, `out_features`, an
optional `bias` and a `dequantize()` returning its (out, in) weight (a 4-bit NF4 layer).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import re
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from temper.config import PeftConfig
from temper.errors import TemperError

__all__ = ["LoRALinear", "base_weight", "inject_lora", "mark_trainable", "set_adapter",
           "disable_adapters", "adapter_names", "merge_lora", "lora_modules", "linear_modules"]


def base_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear base: `weight` of an nn.Linear, else `dequantize()`."""
    return module.weight if isinstance(module, nn.Linear) else module.dequantize()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        hasattr(module, "dequantize") and hasattr(module, "in_features") and hasattr(module, "out_features"))


class LoRALinear(nn.Module):
    """A frozen linear `base` plus named LoRA / DoRA adapters, one of them `active`."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.active: str | None = None
        self.disabled = False

    def add_adapter(self, name: str, r: int, alpha: float, *, dropout: float = 0.0,
                    rslora: bool = False, dora: bool = False) -> None:
        if name in self.lora_A:
            raise TemperError(f"adapter {name!r} is already injected here")
        w = base_weight(self.base)
        # half-precision bases get fp32 adapters, as PEFT's autocast_adapter_dtype does
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        kw = dict(device=w.device, dtype=dtype)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        self.rank[name] = r
        if dora:  # m = ||W||_c, since B = 0 at init
            self.lora_magnitude[name] = nn.Parameter(torch.linalg.norm(w.detach().to(kw["dtype"]), dim=1))

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A, shape (out, in)."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def merged_weight(self, name: str | None) -> torch.Tensor:
        """W + s B A (LoRA) or m * (W + s B A) / ||W + s B A||_c (DoRA), in W's dtype; W if name is None."""
        w = base_weight(self.base).detach()
        if name is None:
            return w.clone()
        merged = w.to(self.lora_A[name].weight.dtype) + self.delta_weight(name)
        if name in self.lora_magnitude:
            merged = (self.lora_magnitude[name] / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
        return merged.to(w.dtype)

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies now, differentiable in the adapter's tensors (for
        a fused output layer that takes a weight, not a module): W when no adapter is active or
        adapters are disabled; W + s B A (LoRA); (m / ||W + s B A||_c) (W + s B A) with the norm a
        constant, as in `forward` (DoRA). In the adapter's dtype. Dropout has no place in a
        weight: `forward` with an active dropout differs (`temper.peft.apply_peft` refuses that
        for the output layer)."""
        w = base_weight(self.base)
        name = self.active
        if self.disabled or name is None:
            return w
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        merged = w.to(A.dtype) + s * (B @ A)
        if name in self.lora_magnitude:
            norm = torch.linalg.norm(merged.detach(), dim=1)
            merged = (self.lora_magnitude[name] / norm).view(-1, 1) * merged
        return merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        name = self.active
        if self.disabled or name is None:
            return result
        A, B, drop, s = self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name]
        x = x.to(A.weight.dtype)
        xd = drop(x)
        if name not in self.lora_magnitude:
            return _add_low_rank(result, xd, A.weight, B.weight, s)
        # DoRA, as PEFT's DoraLinearLayer: the norm is a constant of the graph
        w = base_weight(self.base).to(x.dtype)
        norm = torch.linalg.norm(w + s * (B.weight @ A.weight).detach(), dim=1).to(w.dtype).detach()
        k = (self.lora_magnitude[name] / norm).view(1, -1)
        if isinstance(drop, nn.Identity) or not self.training:
            bias = getattr(self.base, "bias", None)
            base_result = result if bias is None else result - bias
        else:
            base_result = F.linear(xd, w)
        return (result + (k - 1) * base_result + k * B(A(xd)) * s).to(result.dtype)

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}(r={self.rank[n]}{', dora' if n in self.lora_magnitude else ''})" for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ads}], active={self.active}"


class _AddLowRank(torch.autograd.Function):
    """out = result + h B^T for 2-D result (N, out), h (N, r), B (out, r): addmm, whose own backward
    would build B's gradient as g^T h, an (out, N) x (N, r) product that runs several times slower
    than the same numbers as (h^T g)^T; this one takes the fast order. Under autocast the forward's
    addmm runs in the autocast dtype, and the gradients come back in each input's dtype."""

    @staticmethod
    def forward(ctx, result: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(result, h, B.t())
        ctx.save_for_backward(h, B)
        ctx.dtypes = (result.dtype, h.dtype, B.dtype)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, B = ctx.saved_tensors
        result_dtype, h_dtype, B_dtype = ctx.dtypes
        grad_result = g.to(result_dtype) if ctx.needs_input_grad[0] else None
        grad_h = (g @ B.to(g.dtype)).to(h_dtype) if ctx.needs_input_grad[1] else None
        grad_B = (h.to(g.dtype).t() @ g).t().to(B_dtype) if ctx.needs_input_grad[2] else None
        return grad_result, grad_h, grad_B


def _add_low_rank(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """result + (s x A^T) B^T, in result's dtype: the rank-r product first, s on that (N, r) product
    (the smallest tensor here), then one addmm that adds the base output in the same call: no
    (..., out) temporaries for the scale or the sum, forward or backward."""
    h = F.linear(x, A) * s  # (..., r)
    out = _AddLowRank.apply(result.reshape(-1, result.shape[-1]).to(h.dtype), h.reshape(-1, h.shape[-1]), B)
    return out.view(result.shape).to(result.dtype)


# ----------------------------------------------------------------------------- finding modules


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> linear module (plain, 4-bit or already LoRA-wrapped), not looking inside wrappers."""
    out: dict[str, nn.Module] = {}
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, LoRALinear):
            out[name] = module
            inside = (*inside, name + ".")
        elif name and _is_linear(module):
            out[name] = module
    return out


def _leaf_names(names) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _no_match(entry: str, candidates: list[str], what: str) -> TemperError:
    leaves = _leaf_names(candidates)
    close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TemperError(f"{what} entry {entry!r} matches no module; {'linear ' if what == 'target_modules' else ''}"
                       f"modules here: {', '.join(leaves)}{hint}")


def resolve_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Module names selected by leaf names, ["all-linear"] (not lm_head) or a 're:REGEX'."""
    linears = linear_modules(model)
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not entries:
        raise TemperError("target_modules is empty; name modules (e.g. q_proj, v_proj), all-linear or re:REGEX")
    if entries == ["all-linear"]:
        return [n for n in linears if n.rsplit(".", 1)[-1] != "lm_head"]
    if len(entries) == 1 and entries[0].startswith("re:"):
        try:
            pattern = re.compile(entries[0][3:])
        except re.error as e:
            raise TemperError(f"target_modules regex {entries[0]!r} is invalid ({e})") from None
        chosen = [n for n in linears if pattern.fullmatch(n)]
        if not chosen:
            raise _no_match(entries[0], list(linears), "target_modules")
        return chosen
    for entry in entries:
        if entry == "all-linear" or entry.startswith("re:"):
            raise TemperError(f"target_modules: {entry!r} must be the only entry")
        if not any(_matches(n, entry) for n in linears):
            raise _no_match(entry, list(linears), "target_modules")
    return [n for n in linears if any(_matches(n, e) for e in entries)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _active_adapter(model: nn.Module) -> str | None:
    return next((m.active for _, m in lora_modules(model) if m.active is not None), None)


# ----------------------------------------------------------------------------- public API


def inject_lora(model: nn.Module, cfg: PeftConfig, adapter_name: str = "default",
                *, modules: list[str] | None = None) -> list[str]:
    """Wrap the target modules of `model` in `LoRALinear` (in place); return their names.

    `modules` (exact module names) overrides `cfg.target_modules`. A second adapter name
    joins the same wrappers; the active adapter stays the active one (the first becomes it).
    `cfg.modules_to_save` (leaf names) are trained in full and saved with the adapter. They
    are trained in place, shared by all adapters; with tied embeddings, training `lm_head`
    trains the input embedding too (the save writes both, so PEFT reproduces it).
    """
    if cfg.method not in ("lora", "dora", "qlora"):
        raise TemperError(f"peft.method {cfg.method!r} is not LoRA (expected lora, dora or qlora)")
    linears = linear_modules(model)
    names = list(modules) if modules is not None else resolve_targets(model, cfg.target_modules)
    for name in names:
        if name not in linears:
            raise TemperError(f"no linear module named {name!r} in this model")
        m = linears[name]
        if not 1 <= cfg.r <= min(m.in_features, m.out_features):
            raise TemperError(f"LoRA rank peft.r={cfg.r} does not fit {name} of shape (out={m.out_features}, "
                              f"in={m.in_features}); expected 1 <= r <= {min(m.in_features, m.out_features)}")
    save = _resolve_modules_to_save(model, cfg.modules_to_save, names)
    previous = _active_adapter(model)
    for name in names:
        m = linears[name]
        if not isinstance(m, LoRALinear):
            m = LoRALinear(m)
            _set_module(model, name, m)
        m.add_adapter(adapter_name, cfg.r, cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
                      dora=cfg.method == "dora")
    registry = dict(getattr(model, "lora_modules_to_save", {}))
    registry[adapter_name] = save
    model.lora_modules_to_save = registry
    _keep_originals(model, save)
    set_adapter(model, previous or adapter_name)
    return names


def _resolve_modules_to_save(model: nn.Module, entries: list[str], targets: list[str]) -> list[str]:
    all_names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for entry in entries:
        found = [n for n in all_names if _matches(n, entry) and not isinstance(model.get_submodule(n), LoRALinear)]
        if not found:
            raise _no_match(entry, [n for n, m in model.named_modules() if n and not list(m.children())],
                            "modules_to_save")
        clash = [n for n in found if n in targets]
        if clash:
            raise TemperError(f"{clash[0]} is both a LoRA target and in modules_to_save")
        out += found
    return out


def _keep_originals(model: nn.Module, names: list[str]) -> None:
    """Frozen copies of the modules trained in full, as they are before training: what the model is
    with its adapters disabled (PEFT keeps an `original_module` the same way). A module that shares
    a weight with one of them (the input embedding of a tied `lm_head`) is copied with it, so the
    copies share it too. Kept as a plain attribute: not parameters, not in the state dict."""
    originals = dict(getattr(model, "lora_original_modules", {}))
    todo = [n for n in names if n not in originals]
    if not todo:
        return
    shared = {id(p) for n in todo for p in model.get_submodule(n).parameters()}
    partners = [n for n, m in model.named_modules()
                if n and n not in todo and n not in originals and any(id(p) in shared for p in m.parameters(recurse=False))]
    with torch.no_grad():
        copies = copy.deepcopy({n: model.get_submodule(n) for n in todo + partners})  # one memo: ties stay tied
    for module in copies.values():
        module.requires_grad_(False)
    originals.update(copies)
    model.lora_original_modules = originals


def mark_trainable(model: nn.Module) -> tuple[int, int]:
    """Freeze all; unfreeze the active adapter (A, B, DoRA m) and modules_to_save.

    Returns (trainable, total) counts of unique parameters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in lora_modules(model):
        if m.active is not None:
            for p in [m.lora_A[m.active].weight, m.lora_B[m.active].weight]:
                p.requires_grad_(True)
            if m.active in m.lora_magnitude:
                m.lora_magnitude[m.active].requires_grad_(True)
    for names in getattr(model, "lora_modules_to_save", {}).values():
        for name in names:
            model.get_submodule(name).requires_grad_(True)
    params = list(model.parameters())  # unique already (shared tensors appear once)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter injected into `model`, in the order they were added."""
    return list(dict.fromkeys(n for _, m in lora_modules(model) for n in m.lora_A))


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active adapter of every wrapped module (None where it is absent)."""
    if name not in adapter_names(model):
        raise TemperError(f"no adapter named {name!r}; adapters here: {', '.join(adapter_names(model)) or 'none'}")
    for _, m in lora_modules(model):
        m.active = name if name in m.lora_A else None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model is its base: every `LoRALinear` returns base(x), and the modules
    trained in full (`modules_to_save`) are their original, untrained copies. The frozen reference
    model of DPO, for free."""
    wrapped = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in wrapped]
    originals = getattr(model, "lora_original_modules", {})
    trained = {name: model.get_submodule(name) for name in originals}
    for m in wrapped:
        m.disabled = True
    for name, module in originals.items():
        _set_module(model, name, module)
    try:
        yield
    finally:
        for m, flag in zip(wrapped, before):
            m.disabled = flag
        for name, module in trained.items():
            _set_module(model, name, module)


def merge_lora(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Replace every `LoRALinear` by an nn.Linear holding the merged weight of `adapter_name`
    (default: each module's active adapter): W + s B A, or DoRA's m (W + s B A) / ||W + s B A||_c.
    Other adapters are dropped. A 4-bit base is dequantised: the result is full precision. An
    adapted output layer that was tied to the input embedding is untied (the adapter changes the
    output layer only, as in its forward): the model's config says tie_embeddings=False."""
    if adapter_name is not None and adapter_name not in adapter_names(model):
        raise TemperError(f"no adapter named {adapter_name!r}; adapters here: {', '.join(adapter_names(model))}")
    warned = False
    for name, m in list(lora_modules(model)):
        chosen = m.active if adapter_name is None else (adapter_name if adapter_name in m.lora_A else None)
        if isinstance(m.base, nn.Linear) and chosen is None:
            _set_module(model, name, m.base)
            continue
        if not isinstance(m.base, nn.Linear) and not warned:
            warnings.warn("merging LoRA into a 4-bit base: the merged model is dequantised to full precision",
                          stacklevel=2)
            warned = True
        with torch.no_grad():
            w = m.merged_weight(chosen)
            bias = getattr(m.base, "bias", None)
            linear = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
            linear.weight.copy_(w)
            if bias is not None:
                linear.bias.copy_(bias.detach().to(w.dtype))
        _set_module(model, name, linear)
    if hasattr(model, "lora_modules_to_save"):
        del model.lora_modules_to_save
    if hasattr(model, "lora_original_modules"):
        del model.lora_original_modules
    config, head = getattr(model, "config", None), getattr(model, "lm_head", None)
    if getattr(config, "tie_embeddings", False) and isinstance(head, nn.Linear) \
            and head.weight is not model.input_embeddings.weight:  # the adapted output layer, merged alone
        model.config = config.replace(tie_embeddings=False)
        warnings.warn("the LoRA on lm_head is merged into the output layer only: the merged model unties it "
                      "from the input embedding and stores both (tie_word_embeddings false)", stacklevel=2)
    return model
