"""The GPT-2 family in Hugging Face's terms: tensor names (Conv1D weights transposed), and
config.json read and written (GPT2LMHeadModel)."""

from __future__ import annotations

from typing import Any

from temper.errors import TemperError
from temper.models.config import ModelConfig
from temper.models.family import StateDictAdapter, config_or_error

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2"}
REWARD_ARCHITECTURES = {"GPT2ForSequenceClassification": "GPT2LMHeadModel"}


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


def config_from_hf(hf: dict[str, Any], arch: str, source: str) -> ModelConfig:
    def need(key: str) -> Any:
        if key not in hf:
            raise TemperError(f"{source}: missing key '{key}' for {arch}")
        return hf[key]

    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise TemperError(f"{source}: activation_function {act!r} is not supported (gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise TemperError(f"{source}: non-default GPT-2 attention scaling is not supported")
    hidden = need("n_embd")
    return config_or_error(
        source, family="gpt2", vocab_size=need("vocab_size"), hidden_size=hidden,
        num_layers=need("n_layer"), num_heads=need("n_head"), intermediate_size=hf.get("n_inner"),
        max_seq_len=need("n_positions"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        qkv_bias=True, mlp_bias=True, attn_out_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), hf_architecture=arch,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dict for `c`."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads,
        "n_inner": c.intermediate_size, "n_positions": c.max_seq_len, "n_ctx": c.max_seq_len,
        "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32", "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id, **c.extra,
    }
