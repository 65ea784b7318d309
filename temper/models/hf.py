"""Hugging Face model directories in and out, through one state-dict adapter per family.

A temper model directory *is* a Hugging Face directory (`config.json`,
`model.safetensors` or shards with `model.safetensors.index.json`,
`generation_config.json`, tokenizer files), so `transformers` loads what temper writes
and temper loads what `transformers` writes. Weights are read only from safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from temper.errors import TemperError, TemperFileNotFoundError, require_file
from temper.io import atomic_write_text, write_safetensors
from temper.models import registry
from temper.models.config import ModelConfig
from temper.models.family import StateDictAdapter

# ----------------------------------------------------------------------------- config.json


# sizes any family's config.json may hold: each must be a positive integer where present
_SIZE_KEYS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "hidden_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
              "max_position_embeddings", "sliding_window", "embedding_size")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Read a transformers `config.json` dict into a `ModelConfig`, through the family that reads
    its architecture; every size is checked to be a positive integer here, so a bad value is named
    instead of failing deep inside torch."""
    if not isinstance(hf, dict):
        raise TemperError(f"{source}: expected a JSON object of settings, got {type(hf).__name__}")
    for key in _SIZE_KEYS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TemperError(f"{source}: {key} is {value!r} (expected a positive integer)")
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    arch = archs[0] if archs else registry.for_model_type(hf.get("model_type", ""))
    found = registry.for_architecture(arch) if isinstance(arch, str) else None
    if found is None:
        raise TemperError(
            f"{source}: architecture {arch or hf.get('model_type')!r} is not supported; "
            f"expected one of {', '.join(registry.architectures())}"
        )
    return found.config_from_hf(hf, arch, source)


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dict for `c`, written by its family."""
    return registry.family(c.family).config_to_hf(c)


# ----------------------------------------------------------------------------- state-dict adapters

# each family's names live in its folder (temper/models/<family>/hf.py); these are views of them
ADAPTERS: Mapping[str, StateDictAdapter] = registry.FamilyTable(lambda f: {f.name: f.adapter})
LLAMA_ADAPTER, GPT2_ADAPTER = ADAPTERS["llama"], ADAPTERS["gpt2"]


def tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names that are another name's tensor (a tied output layer): stored once, under
    the first name (the embedding), in HF files and in temper's."""
    seen: set[int] = set()
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied


# ----------------------------------------------------------------------------- safetensors I/O


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TemperError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TemperError(f"{index}: weight_map must map tensor names to file names")
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise TemperFileNotFoundError(f"{index}: names shard {f.name}, which does not exist")
            require_file(f, "weights")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():  # a FIFO or a device there is named, not opened
        return [require_file(single, "weights")]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise TemperError(
            f"{model_dir}: only pickled weights (*.bin / *.pt) found; temper reads safetensors only "
            "(convert them with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise TemperFileNotFoundError(f"{model_dir}: no model.safetensors (or sharded index) found")


def adapter_not_model(adapter_dir: Path) -> str:
    """What to say when an adapter directory is given where a model directory is read."""
    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    name = base if isinstance(base, str) and base else "BASE"
    return (f"{adapter_dir}: a PEFT adapter of {name} (adapter_config.json, no config.json), not a model: give its "
            f"base, {name}, or merge the adapter into it first (temper merge model={name} adapter={adapter_dir} "
            "output_dir=DIR); generate, chat and eval take the adapter directory as it is")


def open_weights(path: str | Path, device: str = "cpu"):
    """`safe_open` on a weights file; a failure is one line saying why. safetensors reports every
    file it cannot open as 'No such file or directory', so an unreadable file is opened here once
    more to name the real reason (permission denied, a directory, ...)."""
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error types
        try:
            with open(path, "rb"):
                pass
        except OSError as os_error:
            reason = (os_error.strerror or str(os_error)).lower()
            raise TemperError(f"{path}: cannot read the weights file ({reason})") from None
        raise TemperError(f"{path}: not a readable safetensors file ({e})") from None


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise TemperFileNotFoundError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise TemperError(f"{model_dir}: expected a model directory, got a file")
    cfg_path = model_dir / "config.json"
    if cfg_path.exists():
        require_file(cfg_path, "config.json")
    if not cfg_path.is_file():
        if (model_dir / "adapter_config.json").is_file():
            raise TemperError(adapter_not_model(model_dir))
        raise TemperFileNotFoundError(f"{model_dir}: no config.json; is this a model directory?")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TemperError(f"{cfg_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise TemperError(f"{cfg_path}: not UTF-8 at byte offset {e.start}") from None
    if not isinstance(hf, dict):
        raise TemperError(f"{cfg_path}: expected a JSON object of settings, got {type(hf).__name__}")
    return hf


def load_state_dict_from_hf(model_dir: str | Path, model: torch.nn.Module, config: ModelConfig,
                            *, device: torch.device | str = "cpu",
                            extra: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of an HF directory into temper names, checking names and shapes.

    `extra`: HF tensors outside the decoder (a sequence-classification head's `score.weight`),
    returned under their own names and checked against these shapes."""
    model_dir = Path(model_dir)
    adapter = registry.family(config.family).adapter_for(config)
    tied = tied_names(model)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    extra = extra or {}
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        with open_weights(path, str(device)) as f:
            for hf_name in f.keys():
                if hf_name in extra:
                    tensor = f.get_tensor(hf_name)
                    check_weight(path, hf_name, tensor)
                    if tuple(tensor.shape) != tuple(extra[hf_name]):
                        raise TemperError(f"{path}: tensor '{hf_name}' has shape {tuple(tensor.shape)}, "
                                          f"expected {tuple(extra[hf_name])} from config.json")
                    out[hf_name] = tensor
                    continue
                name = adapter.from_hf(hf_name)
                if name == "":
                    continue
                if name is None:
                    raise TemperError(f"{path}: unexpected tensor '{hf_name}' for a {config.hf_architecture}")
                if name in tied:
                    continue  # tied: the embedding is the output layer
                tensor = f.get_tensor(hf_name)
                check_weight(path, hf_name, tensor)
                if adapter.is_transposed(name):
                    tensor = tensor.t().contiguous()
                if name not in expected:
                    raise TemperError(f"{path}: unexpected tensor '{hf_name}' for this config")
                if tuple(tensor.shape) != tuple(expected[name]):
                    raise TemperError(
                        f"{path}: tensor '{hf_name}' has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(expected[name])} from config.json"
                    )
                out[name] = tensor
    missing = [adapter.to_hf(k) for k in expected if k not in out] + [k for k in extra if k not in out]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TemperError(f"{model_dir}: tensor '{missing[0]}'{more} missing from the safetensors files")
    return out


def check_weight(path: str | Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse weights that are not floating point, or hold NaN / Inf: such a model loads and then
    generates nothing (every logit NaN), which looks like a bug in temper, not in the file."""
    if not tensor.is_floating_point():
        raise TemperError(f"{path}: tensor '{name}' has dtype {str(tensor.dtype).removeprefix('torch.')} "
                          "(expected floating-point weights: float32, bfloat16 or float16)")
    flat = tensor.reshape(-1)
    try:  # in chunks: the boolean temporary of one huge embedding matrix would be as large as it
        finite = all(bool(torch.isfinite(c).all()) for c in flat.split(1 << 24))
    except (RuntimeError, NotImplementedError):  # a dtype without isfinite on this device (float8)
        finite = all(bool(torch.isfinite(c.float()).all()) for c in flat.split(1 << 24))
    if not finite:
        nan = int(torch.isnan(flat.float()).sum())
        inf = int(torch.isinf(flat.float()).sum())
        raise TemperError(f"{path}: tensor '{name}' holds {nan} NaN and {inf} Inf values of {flat.numel()} "
                          "(expected finite weights: the file is damaged, or the training that wrote it diverged)")


def check_weights_file(path: str | Path) -> None:
    """`check_weight` on every tensor of one safetensors file (an adapter, before it is applied)."""
    with open_weights(path) as f:
        for name in f.keys():
            check_weight(path, name, f.get_tensor(name))


def _atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_hf_weights(model: torch.nn.Module, config: ModelConfig, out_dir: Path,
                    max_shard_bytes: int | None = None, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights in HF names (tied output layer omitted), as one file or shards + index;
    `extra`: tensors outside the decoder, under their HF names (a classification head)."""
    adapter = registry.family(config.family).adapter_for(config)
    tied = tied_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        t = tensor.detach()
        if adapter.is_transposed(name):
            t = t.t()
        tensors[adapter.to_hf(name)] = t.contiguous().cpu()
    for name, tensor in (extra or {}).items():
        tensors[name] = tensor.detach().contiguous().cpu()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    # the new files first, each whole (a full disk leaves the earlier model as it was), then the
    # earlier model's files that the new one does not have
    stale = {p.name for p in out_dir.glob("model*.safetensors")} | {"model.safetensors.index.json"}
    if len(shards) == 1:
        write_safetensors(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        written = {"model.safetensors"}
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, out_dir / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_write_json(out_dir / "model.safetensors.index.json",
                           {"metadata": {"total_size": total}, "weight_map": weight_map})
        written = {*weight_map.values(), "model.safetensors.index.json"}
    for name in stale - written:
        (out_dir / name).unlink(missing_ok=True)


def write_generation_config(config: ModelConfig, out_dir: Path, eos_ids: list[int] | None = None) -> None:
    """`generation_config.json`; `eos_ids` lists every id that ends a reply (EOS and a chat template's
    end-of-turn token), so `transformers`' generate stops where temper's does."""
    eos = eos_ids if eos_ids and len(eos_ids) > 1 else config.eos_token_id
    gen = {k: v for k, v in (("bos_token_id", config.bos_token_id), ("eos_token_id", eos),
                             ("pad_token_id", config.pad_token_id)) if v is not None}
    _atomic_write_json(out_dir / "generation_config.json", gen)


def write_hf_config(config: ModelConfig, out_dir: Path) -> None:
    _atomic_write_json(out_dir / "config.json", config_to_hf(config))
