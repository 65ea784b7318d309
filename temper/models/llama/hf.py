"""The Llama family in Hugging Face's terms: tensor names, and config.json read and written
(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)."""

from __future__ import annotations

from typing import Any

from temper.errors import TemperError
from temper.models.config import ModelConfig
from temper.models.family import StateDictAdapter, config_or_error

# HF architecture -> model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
REWARD_ARCHITECTURES = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
}

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


def config_from_hf(hf: dict[str, Any], arch: str, source: str) -> ModelConfig:
    def need(key: str) -> Any:
        if key not in hf:
            raise TemperError(f"{source}: missing key '{key}' for {arch}")
        return hf[key]

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
    model_type = ARCHITECTURES[arch]
    bias = bool(hf.get("attention_bias", False))
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise TemperError(f"{source}: Qwen2 with use_sliding_window=true is not supported")
    return config_or_error(
        source, family="llama", vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), intermediate_size=need("intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=rope if kind != "default" else None,
        qkv_bias=True if model_type == "qwen2" else bias, attn_out_bias=bias if model_type != "qwen2" else False,
        mlp_bias=bool(hf.get("mlp_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding, hf_architecture=arch, bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dict for `c` (readable by transformers 4.4x and 5.x)."""
    ids = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    arch = c.hf_architecture if c.hf_architecture in ARCHITECTURES else "LlamaForCausalLM"
    model_type = ARCHITECTURES[arch]
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
