"""Reward models: a temper decoder body and a linear scalar head, in Hugging Face's
`*ForSequenceClassification` layout (what TRL's RewardTrainer saves).

    rm = load_reward_model("runs/rm")                  # LlamaForSequenceClassification, num_labels=1
    rewards = rm(input_ids, lengths)                   # (B,) for right-padded ids
    save_reward_model(rm, "out_dir", tokenizer=tok)    # AutoModelForSequenceClassification loads it

A directory is `config.json` with `architectures: [LlamaForSequenceClassification]` (or the
Mistral, Qwen2 or GPT-2 one) and one label (`id2label` with one entry, or `num_labels: 1`),
and safetensors weights: the body under the causal LM's names without its output layer
(`model.*`, GPT-2: `transformer.*`) and the head `score.weight` (1, hidden), no bias.

The reward of a sequence is the head applied to the final hidden state (after the final norm)
of one token, picked as transformers 5.x's `GenericForSequenceClassification` picks it: the
rightmost token whose id is not `pad_token_id` (position 0 when every token is); with no
`pad_token_id`, the last token. So when the pad id is also the EOS id (TRL pads with EOS when
a tokenizer has no pad token), a trailing EOS is read past and the reward is that of the token
before it, in training with transformers and here alike. temper reads it within each row's
length, i.e. as transformers would on that row padded with `pad_token_id`, whatever the batch
was padded with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.models import (
    _finish_meta_load,
    init_weights,
    registry,
    resolve_dtype,
    with_tokenizer_ids,
)
from temper.models.common import DecoderBase
from temper.models.config import ModelConfig
from temper.models.hf import (
    _atomic_write_json,
    config_from_hf,
    config_to_hf,
    load_state_dict_from_hf,
    open_weights,
    read_hf_config,
    save_hf_weights,
    weight_files,
)

# the sequence-classification class of each causal-LM architecture temper reads (each family's
# `reward_architectures`, through the registry) and the other way round
REWARD_ARCHITECTURES = registry.FamilyTable(lambda f: f.reward_architectures)
_CAUSAL_TO_REWARD = registry.FamilyTable(lambda f: {causal: reward for reward, causal in f.reward_architectures.items()})
HEAD = "score.weight"


class RewardModel(nn.Module):
    """body (a DecoderBase without output layer) + score (hidden -> 1, no bias).

    forward(input_ids (B, T) right-padded, lengths (B,) | None, attention_mask (B, T) | None)
        -> rewards (B,), in the model's dtype;
    forward(input_ids, at=(rows (N,), positions (N,))) -> (N,) scores at those positions (a
        process reward model's steps).
    """

    def __init__(self, body: DecoderBase) -> None:
        super().__init__()
        body.lm_head = None  # a reward model reads hidden states; the vocabulary projection is dead weight
        self.body = body
        self.score = nn.Linear(body.config.hidden_size, 1, bias=False)

    @property
    def config(self) -> ModelConfig:
        return self.body.config

    @property
    def blocks(self) -> nn.ModuleList:  # what training wrappers (FSDP, activation checkpointing) walk
        return self.body.blocks

    @property
    def activation_checkpointing(self) -> bool:
        return self.body.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.body.activation_checkpointing = value

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None,
                at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if at is not None:  # a process reward model's step scores: (N,) at (rows, positions)
            # causal attention: the score at a position is the reward of the sequence cut there,
            # as the rule below (and transformers) reads that shorter sequence
            rows, positions = at
            hidden = self.body(input_ids, return_hidden=True)  # (B, T, C)
            return self.score(hidden[rows, positions]).squeeze(-1)  # (N,)
        if attention_mask is not None:
            if lengths is not None:
                raise TemperError("give the reward model lengths or attention_mask, not both")
            lengths = right_padded_lengths(attention_mask)
        if lengths is None:
            lengths = torch.full((B,), T, device=input_ids.device)
        index = last_token_index(input_ids, lengths, self.config.pad_token_id)  # (B,)
        # causal attention: a right-padded row's tokens never see its padding, so no mask is needed
        hidden = self.body(input_ids, return_hidden=True)  # (B, T, C)
        pooled = hidden[torch.arange(B, device=hidden.device), index]  # (B, C)
        return self.score(pooled).squeeze(-1)  # (B,)




def right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's length from a right-padding mask (ones, then zeros); anything else is refused."""
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, expected):
        row = int((mask != expected).any(-1).nonzero()[0])
        raise TemperError(f"attention_mask row {row} is not right-padded (ones, then zeros): the reward model "
                          "reads right-padded batches")
    return lengths


def last_token_index(input_ids: torch.Tensor, lengths: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) the position whose hidden state is scored: transformers' rule (the module docstring)
    applied to each row's first `length` tokens."""
    T = input_ids.shape[1]
    positions = torch.arange(T, device=input_ids.device)
    lengths = lengths.to(input_ids.device)
    if bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise TemperError(f"reward model lengths must be within 1..{T}, got {lengths.tolist()}")
    if pad_token_id is None:
        return lengths - 1
    real = (input_ids != pad_token_id) & (positions[None, :] < lengths[:, None])
    return (positions[None, :] * real).argmax(-1)  # all zeros (every token a pad id): position 0


# ----------------------------------------------------------------------------- directories


def read_reward_config(model_dir: str | Path) -> ModelConfig:
    """The body's ModelConfig of a reward-model directory; a one-line error naming the file and
    what was expected when it is not a one-label sequence-classification model."""
    model_dir = Path(model_dir)
    hf = read_hf_config(model_dir)
    source = str(model_dir / "config.json")
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else archs if isinstance(archs, str) else None
    expected = ", ".join(REWARD_ARCHITECTURES)
    if arch not in REWARD_ARCHITECTURES:
        what = "a causal language model" if arch in _CAUSAL_TO_REWARD else "not a supported reward model"
        raise TemperError(f"{source}: architectures is {archs!r} ({what}); a reward model is a sequence-"
                          f"classification model with one label: expected one of {expected}")
    id2label = hf.get("id2label")
    if isinstance(id2label, dict):
        num_labels, key = len(id2label), "id2label"
    else:
        num_labels, key = hf.get("num_labels", 2), "num_labels"  # transformers' default is 2 labels
    if num_labels != 1:
        where = f"{key} has {num_labels} labels" if key == "id2label" else (
            f"num_labels is {num_labels!r}" if "num_labels" in hf else "no id2label or num_labels (transformers "
                                                                         "then reads 2 labels)")
        raise TemperError(f"{source}: {where}; a reward model has one scalar output: expected num_labels 1 "
                          "(id2label with one entry)")
    config = config_from_hf({**hf, "architectures": [REWARD_ARCHITECTURES[arch]]}, source)
    return config.replace(tie_embeddings=False)  # the body has no output layer to tie


def check_reward_model_dir(model_dir: str | Path) -> None:
    """Cheap checks that `model_dir` will load as a reward model (config, weight files holding
    score.weight, tokenizer), without reading the weights."""
    read_reward_config(model_dir)
    files = weight_files(Path(model_dir))
    names = set()
    for path in files:
        with open_weights(path) as f:
            names.update(f.keys())
    if HEAD not in names:
        raise TemperError(f"{model_dir}: tensor '{HEAD}' (the reward head) missing from the safetensors files")
    Tokenizer.from_dir(model_dir)


def build_reward_model(config: ModelConfig, *, device: torch.device | str = "cpu",
                       dtype: str | torch.dtype | None = None, init: bool = True) -> RewardModel:
    """A reward model of `config` with fresh weights (the head N(0, 0.02), as transformers inits it)."""
    with torch.device(device):
        model = RewardModel(registry.family(config.family).model(config.replace(tie_embeddings=False)))
    if init and str(device) != "meta":
        init_weights(model.body)
        nn.init.normal_(model.score.weight, std=0.02)
    return model.to(resolve_dtype(dtype, device))


def reward_model_from_causal(body: DecoderBase, *, tokenizer=None, head_std: float = 0.02) -> RewardModel:
    """A reward model on a causal LM's decoder (its output layer dropped, an input embedding it
    was tied to kept) and a new head N(0, head_std^2), as transformers' `_init_weights` draws a
    new `score` layer (std = the config's `initializer_range`, 0.02 by default), so
    `AutoModelForSequenceClassification.from_pretrained(causal_dir, num_labels=1)` starts alike.
    With a tokenizer its ids go into the config: the pad id decides which token is scored, in
    training as in the saved directory."""
    body.config = with_tokenizer_ids(body.config.replace(tie_embeddings=False), tokenizer)
    weight = body.input_embeddings.weight
    model = RewardModel(body)
    with torch.no_grad():
        model.score.to(device=weight.device, dtype=weight.dtype)
        nn.init.normal_(model.score.weight, std=head_std)
    return model


def load_reward_model(model_dir: str | Path, *, device: torch.device | str = "cpu",
                      dtype: str | torch.dtype | None = None) -> RewardModel:
    """A sequence-classification directory (one label, safetensors) as a RewardModel in eval mode."""
    config = read_reward_config(model_dir)
    with torch.device("meta"):
        model = RewardModel(registry.family(config.family).model(config))
    state = load_state_dict_from_hf(model_dir, model.body, config, device="cpu",
                                    extra={HEAD: (1, config.hidden_size)})
    target = resolve_dtype(dtype, device)
    state = {(k if k == HEAD else f"body.{k}"): v.to(device=device, dtype=target) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _finish_meta_load(model.body, device)
    return model.eval()


def save_reward_model(model: RewardModel, out_dir: str | Path, *, tokenizer=None,
                      max_shard_bytes: int | None = None) -> Path:
    """Write `model` (and its tokenizer) as a directory transformers' AutoModelForSequenceClassification
    loads. With a tokenizer its pad id (EOS when it has no pad token) becomes `pad_token_id`, which
    transformers needs to read batches."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = with_tokenizer_ids(model.config, tokenizer)
    save_hf_weights(model.body, config, out, max_shard_bytes, extra={HEAD: model.score.weight})
    hf = config_to_hf(config)
    hf.update(architectures=[_CAUSAL_TO_REWARD[hf["architectures"][0]]], id2label={"0": "LABEL_0"},
              label2id={"LABEL_0": 0}, tie_word_embeddings=False)
    _atomic_write_json(out / "config.json", hf)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


__all__ = ["REWARD_ARCHITECTURES", "RewardModel", "build_reward_model", "check_reward_model_dir",
           "last_token_index", "load_reward_model", "read_reward_config", "reward_model_from_causal",
           "right_padded_lengths", "save_reward_model"]
