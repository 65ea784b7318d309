"""LoRA / DoRA adapters in the PEFT format, both ways.

An adapter directory holds `adapter_config.json` (PEFT's `LoraConfig` fields) and
`adapter_model.safetensors` with PEFT's tensor names on the Hugging Face model, without
the adapter name, e.g. for temper's `layers.0.attn.q_proj`:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight          (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight          (out, r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  (out,)  DoRA
    base_model.model.lm_head.weight                                         modules_to_save

For GPT-2's Conv1D layers (weight stored (in, out)) PEFT keeps lora_A and lora_B in the
nn.Linear layout above and only sets `fan_in_fan_out: true`, so no tensor is transposed;
only a Conv1D module saved whole (modules_to_save) is written transposed, as in the model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from temper.config import PeftConfig
from temper.errors import TemperError, TemperFileNotFoundError
from temper.io import atomic_write_bytes, atomic_write_text
from temper.models import registry
from temper.models.hf import open_weights
from temper.peft.lora import inject_lora, linear_modules, lora_modules

__all__ = ["save_adapter", "load_adapter"]

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")


def _hf_module(adapter, name: str) -> str:
    return adapter.to_hf(name + ".weight")[: -len(".weight")]


def _tied_pair(model: nn.Module) -> tuple[str, str] | None:
    """(output layer, input embedding) names when they share one weight."""
    emb = model.input_embeddings
    if getattr(getattr(model, "lm_head", None), "weight", None) is not emb.weight:  # 4-bit, LoRA: none; encoders
        return None
    return "lm_head", next(name for name, m in model.named_children() if m is emb)


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: PeftConfig, *, base_model_name_or_path: str,
                 adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` of `model` as a PEFT LoRA adapter directory.

    `target_modules` is written as the leaf names of the wrapped modules when those select
    exactly them on the HF model, else as a regex (PEFT full-matches it) of their HF names.
    With tied embeddings, a saved `lm_head` or embedding is written under both names.
    """
    adapter = _family_adapter(model)
    wrapped = [(n, m) for n, m in lora_modules(model) if adapter_name in m.lora_A]
    if not wrapped:
        raise TemperError(f"model has no LoRA adapter named {adapter_name!r}")
    tensors: dict[str, torch.Tensor] = {}
    hf_names = []
    for name, m in wrapped:
        if m.rank[adapter_name] != cfg.r:
            raise TemperError(f"{name}: adapter {adapter_name!r} has rank {m.rank[adapter_name]}, config says r={cfg.r}")
        hf = _hf_module(adapter, name)
        hf_names.append(hf)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = m.lora_A[adapter_name].weight
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = m.lora_B[adapter_name].weight
        if adapter_name in m.lora_magnitude:
            tensors[f"{PREFIX}{hf}.lora_magnitude_vector"] = m.lora_magnitude[adapter_name]
    dora = {adapter_name in m.lora_magnitude for _, m in wrapped}
    assert len(dora) == 1, "an adapter is DoRA on every module or on none"

    to_save = list(getattr(model, "lora_modules_to_save", {}).get(adapter_name, []))
    tied = _tied_pair(model)
    if tied and set(tied) & set(to_save):
        to_save = list(dict.fromkeys([*to_save, *tied]))  # PEFT unties them: write both
    saved_leaves = []
    for mod_name in to_save:
        for rel, p in model.get_submodule(mod_name).named_parameters():
            name = f"{mod_name}.{rel}"
            t = p.t() if adapter.is_transposed(name) else p
            tensors[PREFIX + adapter.to_hf(name)] = t.detach().clone()  # tied weights: two copies
        saved_leaves.append(_hf_module(adapter, mod_name).rsplit(".", 1)[-1])

    all_hf = [_hf_module(adapter, n) for n in linear_modules(model)]
    leaves = sorted({h.rsplit(".", 1)[-1] for h in hf_names})
    if {h for h in all_hf if h.rsplit(".", 1)[-1] in leaves} == set(hf_names):
        targets: list[str] | str = leaves
    else:
        targets = "(?:" + "|".join(re.escape(h) for h in hf_names) + ")"
    config = {
        # PEFT wraps a CAUSAL_LM adapter's model for generation; an encoder's is the plain PeftModel
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if registry.family(model.config.family).causal_lm else None,
        "r": cfg.r,
        "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": targets, "use_rslora": cfg.rslora,
        "use_dora": dora.pop(), "modules_to_save": saved_leaves or None, "bias": "none",
        "fan_in_fan_out": any(adapter.is_transposed(n + ".weight") for n, _ in wrapped),
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "adapter_model.safetensors",
                       save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt"}))
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return out


def _family_adapter(model: nn.Module):
    family = getattr(getattr(model, "config", None), "family", None)
    if family not in {f.name for f in registry.families()}:
        raise TemperError(f"PEFT adapters need a temper model of a known family ({registry.names()})")
    return registry.family(family).adapter_for(model.config)


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise TemperFileNotFoundError(f"{adapter_dir}: no adapter_config.json; is this a PEFT adapter directory?")
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TemperError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if conf.get("peft_type") != "LORA":
        raise TemperError(f"{path}: peft_type {conf.get('peft_type')!r} is not supported (LORA)")
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "target_parameters", "trainable_token_indices",
                               "layer_replication") if conf.get(k)]
    if conf.get("bias", "none") != "none" or conf.get("lora_bias"):
        unsupported.append("bias")
    if unsupported:
        raise TemperError(f"{path}: LoRA option {unsupported[0]!r} is not supported by temper")
    return conf


def load_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default") -> PeftConfig:
    """Inject and load a PEFT-format LoRA/DoRA adapter (written by temper or by peft).

    Every tensor name and shape is checked before the model is touched.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise TemperFileNotFoundError(f"adapter directory not found: {adapter_dir}")
    conf = _read_config(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise TemperError(f"{adapter_dir}: adapter_model.bin is a pickle; temper reads safetensors only "
                              "(re-save it with peft: model.save_pretrained(dir, safe_serialization=True))")
        raise TemperFileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")
    with open_weights(weights) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    family = _family_adapter(model)
    linears = linear_modules(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    r, dora = int(conf["r"]), bool(conf.get("use_dora"))
    lora: dict[str, dict[str, torch.Tensor]] = {}  # temper module -> {"A","B","m"}
    full: dict[str, torch.Tensor] = {}  # temper parameter -> tensor (modules_to_save)
    bad_shape: TemperError | None = None
    for key, t in tensors.items():
        if not key.startswith(PREFIX) or "lora_embedding" in key:
            raise TemperError(f"{weights}: tensor '{key}' is not a LoRA tensor temper can load")
        hf = key[len(PREFIX):]
        m = _LORA_KEY.fullmatch(hf)
        if m is None:  # a module saved whole
            name = family.from_hf(hf)
            if not name or name not in params:
                raise TemperError(f"adapter {adapter_dir} saves {hf}, which this model does not have")
            full[name] = t.t() if family.is_transposed(name) else t
            expected = tuple(params[name].shape)
        else:
            mod = family.from_hf(m.group(1) + ".weight")
            mod = mod[: -len(".weight")] if mod else mod
            if not mod or mod not in linears:
                raise TemperError(f"adapter {adapter_dir} targets {m.group(1)}, which this model does not have")
            part = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m"}[m.group(2)]
            lora.setdefault(mod, {})[part] = t
            lin = linears[mod]
            expected = {"A": (r, lin.in_features), "B": (lin.out_features, r), "m": (lin.out_features,)}[part]
        if tuple(t.shape) != expected and bad_shape is None:  # names first: they say more
            bad_shape = TemperError(f"{weights}: tensor '{key}' has shape {tuple(t.shape)}, but this model "
                                    f"needs {expected} (was the adapter trained on another base model?)")
    if bad_shape is not None:
        raise bad_shape
    if not lora:
        raise TemperError(f"{weights}: no LoRA tensors (lora_A / lora_B) found")
    for mod, parts in lora.items():
        need = {"A", "B", "m"} if dora else {"A", "B"}
        if set(parts) != need:
            raise TemperError(f"{weights}: {_hf_module(family, mod)} has tensors {sorted(parts)}, expected {sorted(need)}")

    saved_modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in full))
    targets = conf.get("target_modules")
    cfg = PeftConfig(
        method="dora" if dora else "lora", r=r, alpha=float(conf.get("lora_alpha", 8)),
        dropout=float(conf.get("lora_dropout", 0.0)), rslora=bool(conf.get("use_rslora", False)),
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in lora}) if isinstance(targets, list)
        else ["re:(?:" + "|".join(re.escape(n) for n in lora) + ")"],
        modules_to_save=list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in saved_modules)),
    )
    _untie_if_needed(model, full)
    inject_lora(model, dataclasses.replace(cfg, modules_to_save=[]), adapter_name, modules=list(lora))
    model.lora_modules_to_save[adapter_name] = saved_modules
    wrapped = dict(lora_modules(model))
    with torch.no_grad():
        for mod, parts in lora.items():
            w = wrapped[mod]
            w.lora_A[adapter_name].weight.copy_(parts["A"])
            w.lora_B[adapter_name].weight.copy_(parts["B"])
            if dora:
                w.lora_magnitude[adapter_name].copy_(parts["m"])
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, t in full.items():
            params[name].copy_(t)
    return cfg


def _untie_if_needed(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """PEFT trains a tied output layer and embedding as separate copies: untie them when the
    adapter gives only one of the two, or two different tensors."""
    tied = _tied_pair(model)
    if not tied:
        return
    given = [full.get(f"{n}.weight") for n in tied]
    if given[0] is None and given[1] is None:
        return
    if given[0] is not None and given[1] is not None and torch.equal(given[0], given[1]):
        return
    warnings.warn("the adapter trains the output layer and the embedding apart: untying them", stacklevel=3)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config = model.config.replace(tie_embeddings=False)
