"""Rollouts: the policy's own answers to prompts, sampled inside training (online DPO rounds now;
GRPO and PPO next).

    responses = sample_responses(model, tokenizer, template, prompts, k=4, temperature=1.0, top_p=1.0,
                                 max_new_tokens=48, seed=0)    # k answers to each prompt

    rollout = sample_groups(model, prompt_ids, group_size=8, sampling=SamplingConfig(...), pad_id=0)
    old_logps, _ = rollout_logprobs(model, rollout, temperature=1.0)   # once per generation batch

`sample_groups` is the token-level path for RL (GRPO's G completions of each prompt): each
prompt is prefilled once and its KV cache repeated G times (`generate(num_return_sequences=G)`),
decoding runs in inference mode, and rows that end (EOS, a stop) leave the batch. It returns
tensors (`Rollout`: left-padded prompts, right-padded completions, their masks, and whether
each row finished or was cut at max_new_tokens). `rollout_logprobs` scores the completions under
the current policy in one no-grad forward (in row batches), for the buffer: the old-policy
log-probs of every iteration over it, computed once.

Sampling is temper's batched generation (`temper.models.generate`: KV cache, left padding)
with the policy's chat template and its stop strings; one seeded stream for the whole call,
so the same seed gives the same answers.

`RolloutSource` is what the training loop pulls its rollouts from: every
`steps_per_generation x num_iterations` optimiser steps it calls `generate()` for one
generation batch, keeps it, and serves one slice per step:

    source = RolloutSource(generate, steps_per_generation=4, num_iterations=2, shuffle="generation", seed=0)
    loop = TrainLoop(..., state={"rollout": source})     # checkpointed; its generation timed as "rollout"
    for step in loop:
        batch = source.next()                            # a slice: the same keys, 1/4 of the rows

A generation batch is a dict (or list, or tuple) of tensors sharing their first dimension
(the rows: prompts, completions, old log-probs, advantages), and of lists as long (prompt
texts, say). Each of the `num_iterations` passes over it is split into `steps_per_generation`
equal slices (TRL's GRPO `steps_per_generation` and `num_iterations`; PPO's minibatches and
epochs). `shuffle`: "none" keeps the generated order; "generation" draws one order per
generation batch, the same slices in every pass (TRL's GRPO); "pass" draws a new order for
every pass (PPO's minibatch epochs). The orders come from the source's own seeded generator.
Its `state_dict()` holds the buffer (tensors, saved by the loop's checkpoints in
safetensors), the position in it, the order and the generator's state: a run resumed
mid-buffer serves exactly the slices an uninterrupted run would have, without generating
again. Generic: the method's maths (advantages, clipping) stays in its recipe.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from temper.data.chat import render, render_kwargs, resolve_template, stop_settings
from temper.data.prompts import Prompt, read_prompts
from temper.errors import TemperError
from temper.losses.logprobs import rollout_token_logprobs
from temper.models.generate import SamplingConfig, generate, generate_text


def sample_responses(model, tokenizer, template: str, prompts: list[Prompt], k: int, *, temperature: float,
                     top_p: float, max_new_tokens: int, seed: int, batch_size: int = 32) -> list[list[str]]:
    """k responses to each prompt (stripped), sampled in batches that keep a prompt's copies together."""
    texts = [render(template, p.messages, add_generation_prompt=True, **render_kwargs(tokenizer)) for p in prompts]
    stops, eos_ids = stop_settings(tokenizer, template)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stops,
                              eos_token_ids=eos_ids)
    torch.manual_seed(seed)  # one stream for all batches (a per-call seed would repeat itself batch after batch)
    was_training = model.training
    model.eval()
    flat = generate_text(model, tokenizer, [t for t in texts for _ in range(k)], sampling,
                         batch_size=max(k, batch_size // k * k))
    model.train(was_training)
    flat = [r.strip() for r in flat]
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]


@dataclass
class Rollout:
    """G sampled completions of each of P prompts: N = P x G rows, prompt-major (row p*G + g)."""

    prompt_ids: torch.Tensor  # (N, Lp) long, left-padded with pad_id
    prompt_mask: torch.Tensor  # (N, Lp) bool, True on the prompt's tokens
    completion_ids: torch.Tensor  # (N, T) long, right-padded with pad_id; T: the longest completion
    completion_mask: torch.Tensor  # (N, T) bool, True on the completion's tokens (the EOS or stop included)
    finished: torch.Tensor  # (N,) bool: ended by EOS or a stop; False: cut at max_new_tokens
    group_size: int

    @property
    def truncated(self) -> torch.Tensor:
        """(N,) bool: cut at max_new_tokens before EOS or a stop (`mask_truncated_completions`)."""
        return ~self.finished

    def completions(self) -> list[list[int]]:
        """Each row's completion as a token list (the EOS or stop token that ended it included)."""
        return [ids[mask].tolist() for ids, mask in zip(self.completion_ids.cpu(), self.completion_mask.cpu())]

    def as_batch(self) -> dict[str, torch.Tensor]:
        """The tensors, one row per completion, as `RolloutSource` keeps and slices them."""
        return {"prompt_ids": self.prompt_ids, "prompt_mask": self.prompt_mask,
                "completion_ids": self.completion_ids, "completion_mask": self.completion_mask,
                "finished": self.finished}


def sample_groups(model, prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingConfig, *,
                  pad_id: int = 0, tokenizer=None, first_row: int = 0) -> Rollout:
    """`group_size` completions of each tokenised prompt, sampled with one shared prefill per prompt.

    In inference mode and eval mode (restored after). Seeded (`sampling.seed`), row r draws from
    its own stream (seed, first_row + r) (`generate`), so prompts split over ranks sample what one
    batch would; None draws from torch's global generator. Stop strings (`sampling.stop`) need `tokenizer`; a row ends at the token that completes one.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if sampling.stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer: sample_groups(..., tokenizer=tokenizer)")
    eos = set(sampling.eos_token_ids)
    stops = [s for s in sampling.stop if s]
    stopped: set[int] = set()

    def should_stop(row: int, new: list[int]) -> bool:
        if any(s in tokenizer.decode(new[-64:]) for s in stops):  # a window is enough for short stops
            stopped.add(row)
            return True
        return False

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            completions = generate(model, prompts, sampling, pad_id=pad_id, num_return_sequences=group_size,
                                   should_stop=should_stop if stops else None, first_row=first_row)
    finally:
        model.train(was_training)
    # built outside inference mode: ordinary tensors, which the loss may save for its backward
    N, Lp = len(completions), max(len(p) for p in prompts)
    T = max(len(c) for c in completions)
    prompt_ids = torch.full((N, Lp), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((N, Lp), dtype=torch.bool)
    completion_ids = torch.full((N, T), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((N, T), dtype=torch.bool)
    finished = torch.zeros(N, dtype=torch.bool)
    for row, tokens in enumerate(completions):
        prompt = list(prompts[row // group_size])
        prompt_ids[row, Lp - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        prompt_mask[row, Lp - len(prompt):] = True
        completion_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        completion_mask[row, :len(tokens)] = True
        finished[row] = tokens[-1] in eos or row in stopped
    device = next(model.parameters()).device
    return Rollout(prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                   completion_mask.to(device), finished.to(device), group_size)


def rollout_logprobs(model, rollout: Rollout, *, temperature: float = 1.0, with_entropy: bool = False,
                     batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs (N, T), entropies (N, T) or None) of the completion tokens under `model`, fp32,
    0 where `completion_mask` is False, computed without autograd.

    Once per generation batch: these are the old-policy log-probs every iteration over the buffer
    divides by (and the reference's, called with the reference model). The same computation as
    the loss's (`temper.losses.logprobs.rollout_token_logprobs`: logits divided by the sampling
    `temperature`, only completion positions through the output layer), in inference mode, one
    forward per `batch_size` rows (all at once by default), in the model's current mode.
    """
    N = rollout.prompt_ids.shape[0]
    prompts = [ids[mask].tolist() for ids, mask in zip(rollout.prompt_ids.cpu(), rollout.prompt_mask.cpu())]
    size = batch_size or N
    logps, entropies = [], []
    with torch.inference_mode():
        for start in range(0, N, size):
            rows = slice(start, start + size)
            logp, entropy = rollout_token_logprobs(model, prompts[rows], rollout.completion_ids[rows],
                                                   rollout.completion_mask[rows], temperature=temperature,
                                                   with_entropy=with_entropy)
            logps.append(logp)
            entropies.append(entropy)
    # concatenated outside inference mode: ordinary tensors, which the loss may save for its backward
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def prompt_ids(tokenizer, template: str | None, prompt: Prompt) -> list[int]:
    """A prompt's token ids as the policy answers it: rendered with the chat template (generation
    prompt added), or, for a model with no template (`template=None`), its last user turn as raw text."""
    if template is None:
        return tokenizer.encode(prompt.question)
    return tokenizer.encode(render(template, prompt.messages, add_generation_prompt=True, **render_kwargs(tokenizer)))




# ----------------------------------------------------------------------------- what online recipes share


@dataclass
class TextSettings:
    """How the policy's prompts are rendered and its completions end: the chat template (None: raw
    text), the stop strings, the ids that end a completion, and the padding id."""

    template: str | None
    stops: list[str]
    eos_ids: list[int]
    pad_id: int

    @classmethod
    def of(cls, tokenizer, template_setting: str | None) -> TextSettings:
        """`template=` of an online recipe: the model's template (None), a named one, or "none" (raw text)."""
        template = None if template_setting == "none" else resolve_template(template_setting, tokenizer)
        stops, eos_ids = stop_settings(tokenizer, template) if template else ([], [tokenizer.eos_id])
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        return cls(template, stops, [i for i in eos_ids if i is not None], pad_id)

    def texts(self, tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
        """Each completion's text as a reward function reads it: its ending EOS dropped and the text cut
        at the first stop string."""
        out = []
        for r in rows:
            text = tokenizer.decode(list(r[:-1]) if r and r[-1] in self.eos_ids else list(r))
            cut_at = min((text.find(s) for s in self.stops if s in text), default=-1)
            out.append(text[:cut_at] if cut_at >= 0 else text)
        return out


def prompt_limit(max_prompt_length: int, max_completion_length: int, positions: int) -> int:
    """The most prompt tokens kept (`max_prompt_length`, or 0: the positions left after the completion),
    or one line when prompt and completion cannot both fit the model's positions."""
    if max_completion_length >= positions or max_prompt_length + max_completion_length > positions:
        raise TemperError(f"max_prompt_length ({max_prompt_length or 'auto'}) + max_completion_length "
                          f"({max_completion_length}) do not fit the model's {positions} positions: lower them")
    return max_prompt_length or positions - max_completion_length


def encode_prompts(prompts: list[Prompt], tokenizer, template: str | None, limit: int) -> tuple[list[list[int]], int]:
    """Each prompt's token ids, the longer ones keeping their last `limit` tokens (TRL cuts on the
    left too); and how many were cut."""
    encoded, cut = [], 0
    for p in prompts:
        ids = prompt_ids(tokenizer, template, p)
        if not ids:
            raise TemperError(f"{p.source}: the prompt encodes to no tokens")
        if len(ids) > limit:
            ids, cut = ids[-limit:], cut + 1
        encoded.append(ids)
    return encoded, cut


def prompt_order(n: int, index: int, seed: int) -> int:
    """The prompt at position `index` of an endless stream of seeded shuffles of n prompts (one per epoch)."""
    epoch, at = divmod(index, n)
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))[at])


def generation_prompts(n: int, generation: int, per_rank: int, *, world: int = 1, rank: int = 0,
                       seed: int = 0) -> list[int]:
    """The prompts (indices into n) of this rank's block of generation batch `generation`: the global
    batch is world x per_rank prompts of the seeded stream (`prompt_order`), rank r takes block r, so
    any number of ranks covers the prompts one process would."""
    first = (generation * world + rank) * per_rank
    return [prompt_order(n, first + j, seed) for j in range(per_rank)]


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, T), mask (N, T)) of token lists, right-padded (T at least 1)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


class EmptyRollouts:
    """Counts generation batches in a row whose completions are all empty (the policy ends at once):
    warns at each (rank 0) and stops the run at `limit` in a row. `empty` must be every rank's flags,
    so every rank decides alike."""

    def __init__(self, limit: int, *, main: bool = True) -> None:
        self.limit, self.main, self.in_a_row = limit, main, 0

    def check(self, empty: torch.Tensor, generation: int) -> None:
        """`empty` (N,) bool of generation batch `generation` (1-based)."""
        self.in_a_row = self.in_a_row + 1 if bool(empty.all()) else 0
        if not self.in_a_row:
            return
        if self.main:
            warnings.warn(f"generation batch {generation}: every one of the {len(empty)} completions is empty (the "
                          f"policy ends at once); {self.in_a_row} such batches in a row", UserWarning, stacklevel=3)
        if self.in_a_row >= self.limit:
            raise TemperError(f"generation batch {generation}: {self.in_a_row} generation batches in a row whose "
                              "completions are all empty: the policy answers nothing, so nothing can be learnt "
                              "(check the model's template and EOS, or raise temperature)")

    def finish(self) -> None:
        if self.main and self.in_a_row:
            print(f"warning: the last {self.in_a_row} generation batches held only empty completions",
                  file=sys.stderr)



def online_prompts(spec: list[str], eval_spec: list[str], *, lineage: dict, field_name: str, eval_limit: int
                   ) -> tuple[list[Prompt], list[Prompt], bool]:
    """(training prompts, held-out prompts (the first `eval_limit`, 0: all), whether they are the built-in
    world's): `prompts=`, else the world's rl/train.jsonl when the model records one; `eval_prompts=`,
    else the world's rl/test.jsonl when the training prompts are the world's."""
    world = lineage.get("world_dir")
    from_world = not spec and bool(world)
    spec = spec or ([str(Path(world) / "rl" / "train.jsonl")] if world else [])
    if not spec:
        raise TemperError("prompts= is required: the model records no built-in world to take prompts from")
    eval_spec = eval_spec or ([str(Path(world) / "rl" / "test.jsonl")] if from_world else [])
    prompts = read_prompts(spec, field_name=field_name)
    held = read_prompts(eval_spec, field_name=field_name) if eval_spec else []
    return prompts, held[:eval_limit] if eval_limit else held, from_world


def heldout_scores(model, prompts: list[Prompt], ids: list[list[int]], scorer, text: TextSettings, tokenizer, *,
                   max_new_tokens: int, par) -> dict[str, float]:
    """Greedy answers to the held-out prompts, every world-th on each rank, scored by `scorer` (a
    RewardSet) and summed over the ranks: eval_reward (the mean of the scored ones) and eval_pass_rate
    (the share scoring >= 1)."""
    world, rank = (par.dp, par.dp_rank) if par.distributed else (1, 0)
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=text.eos_ids,
                            stop=text.stops)
    mine = list(range(rank, len(ids), world))
    totals = torch.zeros(4, dtype=torch.float64)  # scored, sum of scores, passed, answered
    if mine:
        rows = sample_groups(model, [ids[i] for i in mine], 1, greedy, pad_id=text.pad_id,
                             tokenizer=tokenizer).completions()
        scores, _ = scorer.score([prompts[i] for i in mine], text.texts(tokenizer, rows), completion_ids=rows)
        scored = ~scores.isnan()
        totals += torch.tensor([scored.sum(), scores[scored].sum(), (scores >= 1.0).sum(), len(mine)],
                               dtype=torch.float64)
    scored, total, passed, answered = par.all_reduce_sum(totals.to(par.device)).tolist()
    return {"eval_reward": total / scored if scored else float("nan"), "eval_pass_rate": passed / answered}



class GenerationMeans:
    """Running means of per-step metric sums since the current generation batch began (PPO logs TRL's
    *_avg over its whole update this way); a stateful part of the checkpoint, so a resumed run logs
    the same means. `add(generation, sums, count)` returns the means so far."""

    def __init__(self) -> None:
        self.generation, self.count, self.sums = -1, 0.0, {}

    def add(self, generation: int, sums: dict[str, float], count: float) -> dict[str, float]:
        if generation != self.generation:
            self.generation, self.count, self.sums = generation, 0.0, {}
        self.count += count
        self.sums = {k: self.sums.get(k, 0.0) + v for k, v in sums.items()}
        return {k: v / self.count for k, v in self.sums.items()}

    def state_dict(self) -> dict:
        return {"generation": self.generation, "count": self.count, "sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        self.generation, self.count, self.sums = state["generation"], state["count"], dict(state["sums"])


SHUFFLES = ("none", "generation", "pass")


class RolloutSource:
    """A buffer of generation batches served in slices; see the module docstring."""

    def __init__(self, generate: Callable[[], Any], *, steps_per_generation: int, num_iterations: int = 1,
                 shuffle: str = "none", seed: int = 0) -> None:
        if steps_per_generation < 1 or num_iterations < 1:
            raise TemperError(f"steps_per_generation and num_iterations must be at least 1, got "
                              f"{steps_per_generation} and {num_iterations}")
        if shuffle not in SHUFFLES:
            raise TemperError(f"shuffle must be one of {', '.join(SHUFFLES)}, got {shuffle!r}")
        self.generate = generate
        self.steps_per_generation, self.num_iterations, self.shuffle = steps_per_generation, num_iterations, shuffle
        self.generator = torch.Generator().manual_seed(seed)  # CPU: the orders are the same on every device
        self.buffer: Any = None  # the current generation batch
        self.order: torch.Tensor | None = None  # the current pass's row order
        self.served = 0  # slices served from the current buffer (0 .. steps_per_generation x num_iterations)
        self.generations = 0  # generation batches made so far (in this run and the runs it resumes)
        self._phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()

    @property
    def slices_per_generation(self) -> int:
        return self.steps_per_generation * self.num_iterations

    def use_phases(self, phase: Callable[[str], contextlib.AbstractContextManager]) -> None:
        """The training loop hands its `phase`: generation is timed as the `rollout` phase."""
        self._phase = phase

    def next(self) -> Any:
        """The slice for this optimiser step; generates first when the buffer is spent (or empty)."""
        if self.buffer is None or self.served == self.slices_per_generation:
            with self._phase("rollout"):
                batch = self.generate()
            self.buffer = _check_batch(batch, self.steps_per_generation)
            self.generations += 1
            self.served = 0
        index = self.served % self.steps_per_generation
        if index == 0 and (self.served == 0 or self.shuffle == "pass"):
            rows = _rows(self.buffer)
            self.order = torch.randperm(rows, generator=self.generator) if self.shuffle != "none" else \
                torch.arange(rows)
        self.served += 1
        size = len(self.order) // self.steps_per_generation
        return _take(self.buffer, self.order[index * size:(index + 1) * size])

    def state_dict(self) -> dict[str, Any]:
        buffer = self.buffer
        kind = type(buffer).__name__ if buffer is not None else None
        return {"buffer": list(buffer) if isinstance(buffer, tuple) else buffer, "kind": kind, "order": self.order,
                "served": self.served, "generations": self.generations, "generator": self.generator.get_state(),
                "steps_per_generation": self.steps_per_generation, "num_iterations": self.num_iterations,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state["steps_per_generation"], state["num_iterations"], state["shuffle"])
        if saved != (self.steps_per_generation, self.num_iterations, self.shuffle):
            raise TemperError(f"the checkpoint's rollout source served steps_per_generation, num_iterations, shuffle "
                              f"= {saved}; this run asks for {(self.steps_per_generation, self.num_iterations, self.shuffle)}")
        buffer = state["buffer"]
        self.buffer = tuple(buffer) if state["kind"] == "tuple" else buffer
        self.order = state["order"]
        self.served, self.generations = state["served"], state["generations"]
        self.generator.set_state(state["generator"])


def _rows(batch: Any) -> int:
    values = batch.values() if isinstance(batch, dict) else batch
    return len(next(iter(values)))


def _check_batch(batch: Any, steps_per_generation: int) -> Any:
    if not isinstance(batch, (dict, list, tuple)) or not batch:
        raise TemperError(f"generate() must return a non-empty dict, list or tuple of tensors (and lists), got "
                          f"{type(batch).__name__}")
    items = batch.items() if isinstance(batch, dict) else enumerate(batch)
    sizes = {}
    for key, value in items:
        if torch.is_tensor(value) and value.dim() > 0:
            sizes[key] = value.shape[0]
        elif isinstance(value, list):
            sizes[key] = len(value)
        else:
            raise TemperError(f"generate(): {key!r} is a {type(value).__name__}; each entry is a tensor or a list, "
                              "one row per example")
    if len(set(sizes.values())) != 1:
        raise TemperError(f"generate(): the entries hold different numbers of rows: {sizes}")
    rows = next(iter(sizes.values()))
    if rows % steps_per_generation:
        raise TemperError(f"a generation batch of {rows} rows does not split into steps_per_generation="
                          f"{steps_per_generation} equal slices")
    return batch


def _take(batch: Any, rows: torch.Tensor) -> Any:
    def take(value: Any) -> Any:
        if torch.is_tensor(value):
            return value[rows.to(value.device)]
        return [value[i] for i in rows.tolist()]

    if isinstance(batch, dict):
        return {k: take(v) for k, v in batch.items()}
    return type(batch)(take(v) for v in batch)
