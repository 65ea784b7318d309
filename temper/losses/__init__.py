"""Loss functions: pure, tensors in and (loss, metrics) out, each tested against its formula."""

from temper.losses.clm import IGNORE_INDEX, causal_lm_loss, fused_linear_cross_entropy
from temper.losses.grpo import (
    group_advantages,
    grpo_loss,
    kl_k3,
    mask_truncated_completions,
    mean_grpo_metrics,
)
from temper.losses.logprobs import (
    causal_lm_sequence_logprobs,
    causal_lm_token_logprobs,
    completion_logprobs,
    sequence_logprobs,
    token_logprobs,
)
from temper.losses.preference import (
    kto_loss,
    kto_metrics,
    mean_preference_metrics,
    preference_loss,
    preference_metrics,
)

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_loss",
    "causal_lm_sequence_logprobs",
    "causal_lm_token_logprobs",
    "completion_logprobs",
    "fused_linear_cross_entropy",
    "group_advantages",
    "grpo_loss",
    "kl_k3",
    "kto_loss",
    "kto_metrics",
    "mask_truncated_completions",
    "mean_grpo_metrics",
    "mean_preference_metrics",
    "preference_loss",
    "preference_metrics",
    "sequence_logprobs",
    "token_logprobs",
]
