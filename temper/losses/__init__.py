"""Loss functions: pure, tensors in and (loss, metrics) out, each tested against its formula."""

from temper.losses.clm import IGNORE_INDEX, causal_lm_loss, fused_linear_cross_entropy

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "fused_linear_cross_entropy"]
