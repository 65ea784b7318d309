"""PPO's value model: a decoder body and a linear head (hidden -> 1) read at every position, in the
reward model's layout (`temper.models.reward`: body `model.*`, head `score.weight`), so it starts from
a reward model or from the SFT model and is saved as a `*ForSequenceClassification` directory.

    value = load_value_model("runs/rm", device=device)       # body and head of the reward model (TRL's default)
    value = load_value_model("runs/sft", device=device)      # the causal LM's body, a fresh head N(0, 0.02)
    values = rollout_token_values(value, prompt_ids, completion_ids, mask, pad_id=pad)   # (B, T), 0 off the mask
    save_reward_model(value, out / "value", tokenizer=tok)

V_t is the head on the hidden state of the position that predicts completion token t (the state before
the policy chose it), the same positions as `temper.losses.logprobs.rollout_token_logprobs` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from temper.losses.logprobs import rollout_inputs
from temper.models import load_model
from temper.models.config import ModelConfig
from temper.models.hf import read_hf_config
from temper.models.reward import REWARD_ARCHITECTURES, load_reward_model


class ValueModel(nn.Module):
    """body (a DecoderBase without output layer) + score (hidden -> 1, no bias).

    forward(input_ids (B, T)) -> values (B, T), one per position (causal: a right-padded row's values
    at its real tokens never see its padding)."""

    def __init__(self, body: nn.Module, score: nn.Linear) -> None:
        super().__init__()
        body.lm_head = None  # values read hidden states; the vocabulary projection is dead weight
        self.body, self.score = body, score

    @property
    def config(self) -> ModelConfig:
        return self.body.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.body.blocks

    @property
    def activation_checkpointing(self) -> bool:  # the body's flag (`engine.apply_activation_checkpointing`)
        return self.body.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.body.activation_checkpointing = on

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids, return_hidden=True)  # (B, T, C)
        return self.score(hidden).squeeze(-1)  # (B, T)


def is_reward_model_dir(model_dir: str | Path) -> bool:
    archs = read_hf_config(Path(model_dir)).get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else archs
    return arch in REWARD_ARCHITECTURES


def load_value_model(model_dir: str | Path, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> ValueModel:
    """A value model from a reward-model directory (its body and head) or a causal LM's (its body and a
    new head drawn N(0, 0.02) from the global generator, as transformers initialises a score layer)."""
    if is_reward_model_dir(model_dir):
        reward = load_reward_model(model_dir, device=device, dtype=dtype)
        value = ValueModel(reward.body, reward.score)
    else:
        body = load_model(model_dir, device=device, dtype=dtype)
        score = nn.Linear(body.config.hidden_size, 1, bias=False, device=device, dtype=dtype)
        nn.init.normal_(score.weight, std=0.02)
        body.config = body.config.replace(tie_embeddings=False)
        value = ValueModel(body, score)
    value.requires_grad_(True)
    return value.train()


def rollout_token_values(model: nn.Module, prompt_ids, completion_ids: torch.Tensor, mask: torch.Tensor, *,
                         pad_id: int = 0) -> torch.Tensor:
    """(B, T) fp32 values of the state before each completion token, 0 where `mask` is 0; one forward
    of prompt + completion (differentiable unless run without grad)."""
    inputs, at = rollout_inputs(prompt_ids, completion_ids, pad_id)
    values = model(inputs)  # (B, L)
    return values.gather(1, at).float().masked_fill(~mask.bool(), 0.0)


__all__ = ["ValueModel", "is_reward_model_dir", "load_value_model", "rollout_token_values"]
