"""Hugging Face model directories in and out, through one state-dict adapter per family.

A temper model directory *is* a Hugging Face directory (`config.json`,
`model.safetensors` or shards with `model.safetensors.index.json`,
`generation_config.json`, tokenizer files), so `transformers` loads what temper writes
and temper loads what `transformers` writes. Weights are read only from safetensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from temper.errors import TemperError, TemperFileNotFoundError, require_file
from temper.io import atomic_write_text, write_safetensors
from temper.models.config import ModelConfig

# ----------------------------------------------------------------------------- config.json


_LLAMA_LIKE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_ARCHITECTURES = [*_LLAMA_LIKE, "GPT2LMHeadModel"]
_MODEL_TYPE_TO_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


_SIZE_KEYS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "hidden_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
              "max_position_embeddings", "sliding_window")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Read a transformers `config.json` dict into a `ModelConfig`; every size is checked to be a
    positive integer here, so a bad value is named instead of failing deep inside torch."""
    if not isinstance(hf, dict):
        raise TemperError(f"{source}: expected a JSON object of settings, got {type(hf).__name__}")
    for key in _SIZE_KEYS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TemperError(f"{source}: {key} is {value!r} (expected a positive integer)")
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    arch = archs[0] if archs else _MODEL_TYPE_TO_ARCH.get(hf.get("model_type", ""), "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise TemperError(
            f"{source}: architecture {arch or hf.get('model_type')!r} is not supported; "
            f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if key not in hf:
            raise TemperError(f"{source}: missing key '{key}' for {arch}")
        return hf[key]

    ids = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
               pad_token_id=hf.get("pad_token_id"))
    if arch == "GPT2LMHeadModel":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise TemperError(f"{source}: activation_function {act!r} is not supported (gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise TemperError(f"{source}: non-default GPT-2 attention scaling is not supported")
        return _model_config(
            source, family="gpt2", vocab_size=need("vocab_size"), hidden_size=need("n_embd"),
            num_layers=need("n_layer"), num_heads=need("n_head"), intermediate_size=hf.get("n_inner"),
            max_seq_len=need("n_positions"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            qkv_bias=True, mlp_bias=True, attn_out_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True), hf_architecture=arch, **ids,
        )

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise TemperError(f"{source}: hidden_act {act!r} is not supported (silu)")
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:  # transformers 4.x keeps rope_theta and rope_scaling apart
        rope = dict(hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise TemperError(f"{source}: rope type {kind!r} is not supported (default, linear, llama3)")
    family = _LLAMA_LIKE[arch]
    bias = bool(hf.get("attention_bias", False))
    sliding = None
    if family == "mistral":
        sliding = hf.get("sliding_window")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise TemperError(f"{source}: Qwen2 with use_sliding_window=true is not supported")
    return _model_config(
        source, family="llama", vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), intermediate_size=need("intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=rope if kind != "default" else None,
        qkv_bias=True if family == "qwen2" else bias, attn_out_bias=bias if family != "qwen2" else False,
        mlp_bias=bool(hf.get("mlp_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding, hf_architecture=arch, **ids,
    )


def _model_config(source: str, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except TemperError as e:
        raise TemperError(f"{source}: {e}") from None


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dict for `c` (readable by transformers 4.4x and 5.x)."""
    ids = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    if c.family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads,
            "n_inner": c.intermediate_size, "n_positions": c.max_seq_len, "n_ctx": c.max_seq_len,
            "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32", **ids, **c.extra,
        }
    arch = c.hf_architecture if c.hf_architecture in _LLAMA_LIKE else "LlamaForCausalLM"
    model_type = _LLAMA_LIKE[arch]
    if model_type == "qwen2" and (not c.qkv_bias or c.attn_out_bias):
        arch, model_type = "LlamaForCausalLM", "llama"
    rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": rope,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if c.rope_scaling else None,
        "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0, "torch_dtype": "float32",
        **ids,
    }
    if model_type == "llama":
        if c.qkv_bias != c.attn_out_bias:
            raise TemperError("a Llama export needs q/k/v and output biases alike (attention_bias)")
        out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    if model_type == "mistral":
        out["sliding_window"] = c.sliding_window
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    out.update(c.extra)
    return out


# ----------------------------------------------------------------------------- state-dict adapters


@dataclass(frozen=True)
class StateDictAdapter:
    """Renames between temper's parameter names and a family's HF names, both ways."""

    rules: tuple[tuple[str, str], ...]  # (temper regex with {i}, hf template with {i})
    transposed: tuple[str, ...] = ()  # temper names (regex) whose HF weight is transposed (Conv1D)
    ignored_hf: tuple[str, ...] = ()  # HF buffers that carry no weights
    normalise_hf: Callable[[str], str] = staticmethod(lambda k: k)

    def _convert(self, name: str, to_hf: bool) -> str:
        for temper_pat, hf_pat in self.rules:
            src, dst = (temper_pat, hf_pat) if to_hf else (hf_pat, temper_pat)
            m = re.fullmatch(re.escape(src).replace(r"\{i\}", r"(\d+)").replace(r"\{p\}", r"(\w+)"), name)
            if m:
                out = dst
                for g in m.groups():
                    out = re.sub(r"\{[ip]\}", g, out, count=1)
                return out
        return ""

    def to_hf(self, name: str) -> str:
        hf = self._convert(name, True)
        assert hf, f"no HF name for temper parameter {name}"
        return hf

    def from_hf(self, name: str) -> str:
        """temper name for an HF tensor name, '' when it is an ignored buffer, None if unknown."""
        name = self.normalise_hf(name)
        if any(re.fullmatch(p, name) for p in self.ignored_hf):
            return ""
        return self._convert(name, False) or None

    def is_transposed(self, temper_name: str) -> bool:
        return any(re.fullmatch(p, temper_name) for p in self.transposed)


LLAMA_ADAPTER = StateDictAdapter(
    rules=(
        ("embed_tokens.weight", "model.embed_tokens.weight"),
        ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
        ("layers.{i}.attn.{p}.weight", "model.layers.{i}.self_attn.{p}.weight"),
        ("layers.{i}.attn.{p}.bias", "model.layers.{i}.self_attn.{p}.bias"),
        ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
        ("layers.{i}.mlp.{p}.weight", "model.layers.{i}.mlp.{p}.weight"),
        ("layers.{i}.mlp.{p}.bias", "model.layers.{i}.mlp.{p}.bias"),
        ("norm.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ),
    ignored_hf=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"),
)


def _gpt2_normalise(name: str) -> str:
    # the original OpenAI checkpoints have no `transformer.` prefix
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


GPT2_ADAPTER = StateDictAdapter(
    rules=(
        ("wte.weight", "transformer.wte.weight"),
        ("wpe.weight", "transformer.wpe.weight"),
        ("h.{i}.{p}.weight", "transformer.h.{i}.{p}.weight"),
        ("h.{i}.{p}.bias", "transformer.h.{i}.{p}.bias"),
        ("h.{i}.attn.{p}.weight", "transformer.h.{i}.attn.{p}.weight"),
        ("h.{i}.attn.{p}.bias", "transformer.h.{i}.attn.{p}.bias"),
        ("h.{i}.mlp.{p}.weight", "transformer.h.{i}.mlp.{p}.weight"),
        ("h.{i}.mlp.{p}.bias", "transformer.h.{i}.mlp.{p}.bias"),
        ("ln_f.weight", "transformer.ln_f.weight"),
        ("ln_f.bias", "transformer.ln_f.bias"),
        ("lm_head.weight", "lm_head.weight"),
    ),
    transposed=(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight",),
    ignored_hf=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),
    normalise_hf=_gpt2_normalise,
)

ADAPTERS = {"llama": LLAMA_ADAPTER, "gpt2": GPT2_ADAPTER}


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
    adapter = ADAPTERS[config.family]
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
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
                if name == "lm_head.weight" and config.tie_embeddings:
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
    adapter = ADAPTERS[config.family]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
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
