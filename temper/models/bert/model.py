"""The BERT family: bidirectional encoders (BERT, ELECTRA) and their heads.

Learned absolute positions, token-type (segment) embeddings, post-LayerNorm blocks, GELU
(erf), attention over every non-padding token (SDPA with a key-padding mask). ELECTRA is the
same encoder with embeddings of `embedding_size` projected up to the hidden size.

The head comes from `config.hf_architecture`, as in transformers:

    BertForMaskedLM                 mlm: transform (dense, gelu, LayerNorm) + decoder tied to the word
                                    embeddings + a bias                          -> logits (B, T, V)
    BertForPreTraining              mlm + pooler (dense, tanh on [CLS]) + nsp (2 logits: NSP or SOP)
    ElectraForPreTraining           discriminator (dense, gelu, dense -> 1)       -> logits (B, T)
    ElectraForMaskedLM              generator (dense to embedding_size, gelu, LayerNorm) + tied decoder
    BertForSequenceClassification   pooler + classifier                          -> logits (B, num_labels)
    BertForTokenClassification      classifier on every token                   -> logits (B, T, num_labels)
    BertModel                       the pooler alone (sentence-transformers' directories): hidden, pooled
    ElectraModel                    no head: hidden states

Module names inside a block are Hugging Face's (query, key, value, dense, LayerNorm), so PEFT's
`target_modules` for BERT work unchanged; `temper/models/bert/hf.py` adds the prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from temper.errors import TemperError
from temper.models.common import count_parameters
from temper.models.config import ModelConfig

# HF architecture -> its head
HEADS = {
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "pretraining",
    "ElectraForPreTraining": "discriminator",
    "ElectraForMaskedLM": "generator",
    "BertForSequenceClassification": "sequence",
    "BertForTokenClassification": "tokens",
    "BertModel": "pooler",
    "ElectraModel": "encoder",
}
POOLED_HEADS = ("pretraining", "sequence", "pooler")  # the heads with the pooler ([CLS], dense, tanh)


@dataclass
class EncoderOutput:
    """hidden: the last block's output (B, T, H); logits: the head's (see the module docstring;
    with `selected`, token heads give (N, ...) for the N selected positions); sentence_logits:
    BertForPreTraining's NSP/SOP logits (B, 2); pooled: the pooler's output (B, H)."""

    hidden: torch.Tensor
    logits: torch.Tensor | None = None
    sentence_logits: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


def head_of(config: ModelConfig) -> str:
    head = HEADS.get(config.hf_architecture)
    if head is None:
        raise TemperError(f"a bert-family model's hf_architecture is {config.hf_architecture!r}; expected one of "
                          f"{', '.join(HEADS)}")
    return head


class Embeddings(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        width = c.embedding_size or c.hidden_size
        self.word_embeddings = nn.Embedding(c.vocab_size, width, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_seq_len, width)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=c.norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.position_embeddings.num_embeddings:
            raise TemperError(f"position {int(positions.max())} is beyond the model's "
                              f"{self.position_embeddings.num_embeddings} learned positions")
        x = x + self.token_type_embeddings(token_type_ids) + self.position_embeddings(positions)  # (B, T, E)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.head_dim, self.dropout = c.head_dim, c.attention_dropout
        self.query = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.key = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.value = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.query(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.value(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        # mask (B, 1, 1, T): every query sees every real key, in both directions
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs)


class Output(nn.Module):
    """dense, dropout, then LayerNorm of the residual sum (post-LN)."""

    def __init__(self, c: ModelConfig, width: int, bias: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size, bias=bias)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.self = SelfAttention(c)  # HF's name: attention.self.query
        self.output = Output(c, c.num_heads * c.head_dim, c.attn_out_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # erf GELU, BERT's "gelu"


class Block(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = Output(c, c.intermediate_size, c.mlp_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Transform(nn.Module):
    """dense, gelu, LayerNorm: the MLM head's transform (width: the hidden size, or ELECTRA's
    generator's embedding size)."""

    def __init__(self, c: ModelConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=c.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MaskedLMHead(nn.Module):
    def __init__(self, c: ModelConfig, width: int) -> None:
        super().__init__()
        self.transform = Transform(c, width)
        self.decoder = nn.Linear(width, c.vocab_size)  # weight tied to the word embeddings; its own bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class Pooler(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # [CLS]: (B, H)


class DiscriminatorHead(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.dense_prediction = nn.Linear(c.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_prediction(F.gelu(self.dense(x))).squeeze(-1)  # replaced-token logit per token


class Bert(nn.Module):
    """An encoder of `config` with the head its `hf_architecture` names.

    forward(input_ids (B, T) | inputs_embeds (B, T, E), attention_mask (B, T) 1 = real token,
            token_type_ids (B, T), positions (B, T), selected (B, T) bool, with_head)
        -> EncoderOutput; `selected`: the token heads (MLM, generator, discriminator, token
    classification) run only at those positions (an MLM loss reads ~15% of them);
    `with_head=False`: the hidden states alone (sentence embeddings).
    """

    activation_checkpointing: bool = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.head = head = head_of(c)
        if c.type_vocab_size < 1:
            raise TemperError("a bert-family model needs type_vocab_size >= 1 (token-type embeddings; BERT has 2)")
        if c.num_kv_heads != c.num_heads:
            raise TemperError(f"a bert-family model has one key/value head per query head: num_kv_heads "
                              f"{c.num_kv_heads} must equal num_heads {c.num_heads}")
        if head in ("sequence", "tokens") and c.num_labels is None:
            raise TemperError(f"{c.hf_architecture} needs num_labels (classes per sequence or per token)")
        width = c.embedding_size or c.hidden_size
        self.embeddings = Embeddings(c)
        self.embeddings_project = nn.Linear(width, c.hidden_size) if width != c.hidden_size else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.pooler = Pooler(c) if head in POOLED_HEADS else None
        self.mlm = MaskedLMHead(c, c.hidden_size) if head in ("mlm", "pretraining") else None
        self.nsp = nn.Linear(c.hidden_size, 2) if head == "pretraining" else None
        self.generator = MaskedLMHead(c, width) if head == "generator" else None
        self.discriminator = DiscriminatorHead(c) if head == "discriminator" else None
        self.classifier = nn.Linear(c.hidden_size, c.num_labels) if head in ("sequence", "tokens") else None
        self.classifier_dropout = nn.Dropout(c.extra.get("classifier_dropout") or c.dropout)
        self.tie_weights()

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    @property
    def token_decoder(self) -> nn.Linear | None:
        """The vocabulary projection (MLM or generator), whose weight is the word embeddings'."""
        lm = self.mlm or self.generator
        return lm.decoder if lm is not None else None

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and self.token_decoder is not None:
            self.token_decoder.weight = self.input_embeddings.weight

    def encode(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's hidden states (B, T, H)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise TemperError("the model takes input_ids or inputs_embeds: exactly one of them")
        x = self.input_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, E)
        B, T = x.shape[:2]
        if positions is None:
            positions = torch.arange(T, device=x.device)[None, :]
        if token_type_ids is None:
            token_type_ids = torch.zeros(1, T, dtype=torch.long, device=x.device)
        x = self.embeddings(x, positions, token_type_ids)
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)  # (B, T, H)
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise TemperError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys that are real tokens
        checkpointed = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.layers:
            if checkpointed:  # keep the block's input only; recompute the rest in the backward pass
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x

    def forward(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, selected: torch.Tensor | None = None,
                with_head: bool = True) -> EncoderOutput:
        hidden = self.encode(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             positions=positions, inputs_embeds=inputs_embeds)
        out = EncoderOutput(hidden=hidden)
        if not with_head:
            return out
        if self.pooler is not None:
            out.pooled = self.pooler(hidden)
        tokens = hidden if selected is None else hidden[selected]  # (B, T, H) or (N, H)
        if self.head in ("mlm", "pretraining"):
            out.logits = self.mlm(tokens)
        if self.head == "pretraining":
            out.sentence_logits = self.nsp(out.pooled)  # (B, 2)
        elif self.head == "generator":
            out.logits = self.generator(tokens)
        elif self.head == "discriminator":
            out.logits = self.discriminator(tokens)
        elif self.head == "sequence":
            out.logits = self.classifier(self.classifier_dropout(out.pooled))  # (B, num_labels)
        elif self.head == "tokens":
            out.logits = self.classifier(self.classifier_dropout(tokens))  # (B, T, num_labels)
        return out

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied decoder counts once)."""
        return count_parameters(self, trainable_only)
