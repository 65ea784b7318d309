"""The BERT family in Hugging Face's terms: tensor names (under `bert.` or `electra.`, the heads
under theirs), and config.json read and written for every architecture in `model.HEADS`."""

from __future__ import annotations

import re
from typing import Any

from temper.errors import TemperError
from temper.models.bert.model import HEADS
from temper.models.config import ModelConfig
from temper.models.family import StateDictAdapter, config_or_error

ARCHITECTURES = {arch: "electra" if arch.startswith("Electra") else "bert" for arch in HEADS}
CLASSIFIERS = ("BertForSequenceClassification", "BertForTokenClassification")


def _adapter(prefix: str) -> StateDictAdapter:
    """Names under `prefix` ('bert.', 'electra.': the encoder inside a model with a head), or none
    (BertModel, ElectraModel; their files may still carry the prefix, as some hub checkpoints do)."""
    return StateDictAdapter(
        rules=(
            ("embeddings.{p}.weight", f"{prefix}embeddings.{{p}}.weight"),
            ("embeddings.{p}.bias", f"{prefix}embeddings.{{p}}.bias"),
            ("embeddings_project.weight", f"{prefix}embeddings_project.weight"),
            ("embeddings_project.bias", f"{prefix}embeddings_project.bias"),
            ("layers.{i}.{p}.{p}.{p}.weight", f"{prefix}encoder.layer.{{i}}.{{p}}.{{p}}.{{p}}.weight"),
            ("layers.{i}.{p}.{p}.{p}.bias", f"{prefix}encoder.layer.{{i}}.{{p}}.{{p}}.{{p}}.bias"),
            ("layers.{i}.{p}.{p}.weight", f"{prefix}encoder.layer.{{i}}.{{p}}.{{p}}.weight"),
            ("layers.{i}.{p}.{p}.bias", f"{prefix}encoder.layer.{{i}}.{{p}}.{{p}}.bias"),
            ("pooler.dense.weight", f"{prefix}pooler.dense.weight"),
            ("pooler.dense.bias", f"{prefix}pooler.dense.bias"),
            ("mlm.transform.{p}.weight", "cls.predictions.transform.{p}.weight"),
            ("mlm.transform.{p}.bias", "cls.predictions.transform.{p}.bias"),
            ("mlm.decoder.weight", "cls.predictions.decoder.weight"),
            ("mlm.decoder.bias", "cls.predictions.bias"),
            ("nsp.weight", "cls.seq_relationship.weight"),
            ("nsp.bias", "cls.seq_relationship.bias"),
            ("discriminator.{p}.weight", "discriminator_predictions.{p}.weight"),
            ("discriminator.{p}.bias", "discriminator_predictions.{p}.bias"),
            ("generator.transform.{p}.weight", "generator_predictions.{p}.weight"),
            ("generator.transform.{p}.bias", "generator_predictions.{p}.bias"),
            ("generator.decoder.weight", "generator_lm_head.weight"),
            ("generator.decoder.bias", "generator_lm_head.bias"),
            ("classifier.weight", "classifier.weight"),
            ("classifier.bias", "classifier.bias"),
        ),
        # buffers older files carry, and the decoder's bias, which transformers ties to cls.predictions.bias
        ignored_hf=(re.escape(prefix) + r"embeddings\.(position_ids|token_type_ids)", r"cls\.predictions\.decoder\.bias"),
        normalise_hf=(lambda name: name) if prefix else _without_prefix,
    )


def _without_prefix(name: str) -> str:
    return name.split(".", 1)[1] if name.startswith(("bert.", "electra.")) else name


BERT_ADAPTER = _adapter("bert.")
ELECTRA_ADAPTER = _adapter("electra.")
BARE_ADAPTER = _adapter("")
ADAPTERS = {arch: ELECTRA_ADAPTER for arch, model_type in ARCHITECTURES.items() if model_type == "electra"}
ADAPTERS.update(BertModel=BARE_ADAPTER, ElectraModel=BARE_ADAPTER)


def config_from_hf(hf: dict[str, Any], arch: str, source: str) -> ModelConfig:
    def need(key: str) -> Any:
        if key not in hf:
            raise TemperError(f"{source}: missing key '{key}' for {arch}")
        return hf[key]

    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise TemperError(f"{source}: hidden_act {act!r} is not supported (gelu, the erf GELU of BERT and ELECTRA)")
    positions = hf.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise TemperError(f"{source}: position_embedding_type {positions!r} is not supported (absolute)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise TemperError(f"{source}: is_decoder / add_cross_attention: temper reads {arch} as a bidirectional encoder")
    hidden = need("hidden_size")
    electra = ARCHITECTURES[arch] == "electra"
    width = hf.get("embedding_size", 128 if electra else hidden)  # ElectraConfig's default is 128
    extra: dict[str, Any] = {}
    num_labels = None
    if arch in CLASSIFIERS:
        id2label = hf.get("id2label")
        if isinstance(id2label, dict) and id2label:
            num_labels = len(id2label)
            extra.update(id2label=id2label, label2id=hf.get("label2id") or {v: int(k) for k, v in id2label.items()})
        else:
            num_labels = hf.get("num_labels", 2)  # transformers' default
            if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
                raise TemperError(f"{source}: num_labels is {num_labels!r} (expected a positive integer)")
        if hf.get("classifier_dropout") is not None:
            extra["classifier_dropout"] = hf["classifier_dropout"]
    type_vocab = hf.get("type_vocab_size", 2)
    if isinstance(type_vocab, bool) or not isinstance(type_vocab, int) or type_vocab < 1:
        raise TemperError(f"{source}: type_vocab_size is {type_vocab!r} (expected a positive integer)")
    return config_or_error(
        source, family="bert", vocab_size=need("vocab_size"), hidden_size=hidden,
        num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
        intermediate_size=need("intermediate_size"), max_seq_len=hf.get("max_position_embeddings", 512),
        norm_eps=hf.get("layer_norm_eps", 1e-12), qkv_bias=True, mlp_bias=True, attn_out_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), type_vocab_size=type_vocab,
        embedding_size=None if width == hidden else width, dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1), num_labels=num_labels,
        hf_architecture=arch, pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), extra=extra,
    )


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dict for `c` (BertConfig or ElectraConfig keys)."""
    arch = c.hf_architecture
    if arch not in ARCHITECTURES:
        raise TemperError(f"a bert-family export needs hf_architecture one of {', '.join(ARCHITECTURES)}, not {arch!r}")
    if c.num_heads * c.head_dim != c.hidden_size or c.num_kv_heads != c.num_heads:
        raise TemperError("a BERT export needs num_heads x head_dim = hidden_size and num_kv_heads = num_heads")
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": ARCHITECTURES[arch], "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "intermediate_size": c.intermediate_size, "hidden_act": "gelu", "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.attention_dropout, "max_position_embeddings": c.max_seq_len,
        "type_vocab_size": c.type_vocab_size, "initializer_range": 0.02, "layer_norm_eps": c.norm_eps,
        "position_embedding_type": "absolute", "tie_word_embeddings": c.tie_embeddings,
        "pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "torch_dtype": "float32",
    }
    if ARCHITECTURES[arch] == "electra":
        out["embedding_size"] = c.embedding_size or c.hidden_size
    extra = dict(c.extra)
    id2label, label2id = extra.pop("id2label", None), extra.pop("label2id", None)
    if arch in CLASSIFIERS:
        if not (isinstance(id2label, dict) and len(id2label) == c.num_labels):
            id2label = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
            label2id = {v: int(k) for k, v in id2label.items()}
        out.update(id2label=id2label, label2id=label2id or {v: int(k) for k, v in id2label.items()})
    out.update(extra)
    return out
