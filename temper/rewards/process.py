"""A process reward model as a reward function (`rewards=prm:DIR` in GRPO): the completion's
lines are its steps, each scored by the PRM where it ends, and the reward is the lowest step's
probability of being right, min_k sigmoid(s_k) (Math-Shepherd's aggregation, Wang et al. 2024;
Lightman et al. 2023 take the product): one wrong step sinks the solution. A model trained with
outcome labels (`temper reward objective=prm step_labels=last`, its lineage's `reward_step_labels`:
an ORM on the same rows) learned to score only a solution's last step, so its reward is
sigmoid(s_last), the score where the completion's last step (that fits the context) ends.

Steps are encoded as `temper reward objective=prm` trained on them (`temper.data.stepwise`):
the prompt through the directory's chat template for messages (the text itself for a string),
each non-empty line of the completion tokenised alone and followed by the separator. Steps that
end beyond the model's context are not scored (the reward is the minimum over those that fit);
a completion with no non-empty line gets 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from temper.data.chat import model_chat_template
from temper.data.rows import BadRow
from temper.data.stepwise import STEP_LABELS, STEP_SEPARATOR, StepEncoder, collate_steps
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.lineage import read_lineage
from temper.models.reward import check_reward_model_dir, load_reward_model


class ProcessReward:
    """`fn(prompts, completions, **kwargs) -> [one reward per completion]`: min_k sigmoid(s_k) for a model
    trained with a label on each step, sigmoid(s_last) for one trained on outcomes (module docstring)."""

    def __init__(self, model_dir: str, *, device: Any = "cpu", batch_size: int = 16) -> None:
        check_reward_model_dir(model_dir)
        lineage = read_lineage(model_dir)
        objective = lineage.get("reward_objective")
        if objective not in (None, "prm"):
            raise TemperError(f"prm:{model_dir}: an outcome reward model (temper reward objective={objective}); "
                              f"score whole completions with judge:reward:{model_dir}")
        self.step_labels = lineage.get("reward_step_labels", "each")
        if self.step_labels not in STEP_LABELS:
            raise TemperError(f"prm:{model_dir}: its lineage records reward_step_labels={self.step_labels!r}; "
                              f"expected one of {', '.join(STEP_LABELS)}")
        self.model = load_reward_model(model_dir, device=device)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.encoder = StepEncoder(self.tokenizer, model_chat_template(model_dir, self.tokenizer),
                                   max_len=self.model.config.max_seq_len)
        self.batch_size, self.device = batch_size, device
        self.__name__ = "prm"

    def steps(self, completion: Any) -> list[str]:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        return [line for line in str(text).split(STEP_SEPARATOR) if line.strip()]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        rewards: list[float] = [0.0] * len(completions)
        encoded = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            steps = self.steps(completion)
            if not steps:
                continue
            try:
                solution = self.encoder.encode(prompt, steps, [True] * len(steps), f"completion {i}")
            except BadRow as e:  # not one step fits the context
                raise TemperError(f"prm reward, completion {i}: {e.detail}") from None
            encoded.append((i, solution))
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            batch = collate_steps([s for _, s in chunk], pad).to(self.device)
            scores = self.model(batch.input_ids, at=(batch.rows, batch.positions)).float().sigmoid()
            for r, (i, _) in enumerate(chunk):
                mine = scores[batch.rows == r]  # the steps that fit, in order
                rewards[i] = float(mine[-1] if self.step_labels == "last" else mine.min())
        return rewards


__all__ = ["ProcessReward"]
