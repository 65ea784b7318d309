"""Text generation: a preallocated KV cache, batched prompts with left padding, greedy and
sampled decoding (temperature, top-k, top-p, repetition penalty), EOS and stop strings.

The order of the logit transforms follows `transformers` (repetition penalty, then
temperature, top-k, top-p), so a seeded run means the same thing in both.

Seeded sampling (`SamplingConfig.seed`) gives every row its own random stream, keyed by
(seed, the row's index): a row's tokens depend on its own logits only, never on which other
rows share the batch, so a batch split over processes or calls (`first_row=`) samples what
the whole batch would have. Unseeded sampling draws from torch's global generator.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from temper.config import OnlyWith, check_range
from temper.errors import TemperError
from temper.models import registry
from temper.models.common import DecoderBase, KVCache, build_attention_mask, positions_from_valid


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the sequence
    eos_token_ids: Sequence[int] = ()
    stop: Sequence[str] = field(default_factory=tuple)  # stop strings (need a tokenizer)
    seed: int | None = None

    def validate(self) -> None:
        """Each setting in its range and finite (NaN compares false with every bound), named as the
        generate and chat commands name it."""
        check_range("max_new_tokens", self.max_new_tokens, low=1)
        check_range("temperature", self.temperature, low=0.0)
        check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_range("top_k", self.top_k, low=0)
        check_range("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)

    @classmethod
    def of(cls, settings, *, eos_token_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> SamplingConfig:
        """The sampling settings of a command's config (max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, seed), checked."""
        sampling = cls(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                       top_k=settings.top_k, top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
                       eos_token_ids=tuple(eos_token_ids), stop=tuple(stop), seed=settings.seed)
        sampling.validate()
        return sampling


# a command whose config has the sampling settings refuses the ones greedy decoding ignores
GREEDY_IGNORES = OnlyWith(("top_k", "top_p"), "temperature > 0", lambda c: c.temperature > 0,
                          "temperature=0 decodes greedily (the most likely token, whatever the others)")


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to (B, V) fp32 logits."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * cfg.repetition_penalty, logits / cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def seen_tokens(ids: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens occur at the valid (non-padding) positions of (B, T) `ids`.

    Counted with `scatter_add_`, not a `scatter_` of the valid flags: padding holds the pad
    id, so a prompt that also contains the pad id would write True and False to the same
    index, and which write lands is undefined (the last one on CPU, any on GPU).
    """
    counts = torch.zeros((ids.shape[0], vocab_size), dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, ids, valid.to(torch.int32))
    return counts > 0


def row_streams(seed: int, rows: range, device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded from (seed, row index) through a hash (nearby seeds and rows
    give unrelated streams)."""
    def key(row: int) -> int:
        digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)
    return [torch.Generator(device=device).manual_seed(key(r)) for r in rows]


def choose_next(logits: torch.Tensor, cfg: SamplingConfig, streams: list[torch.Generator] | None) -> torch.Tensor:
    """(B,) next tokens from (B, V) processed logits: the argmax (greedy); else a draw from their
    softmax, each row from its own stream (`streams`) or all from torch's global generator."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if streams is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    # the exponential race: argmax p_v / E_v with E_v ~ Exp(1) is a draw from p (what multinomial does)
    race = torch.empty_like(probs)
    for i, stream in enumerate(streams):
        race[i].exponential_(generator=stream)
    race.clamp_(min=torch.finfo(race.dtype).tiny)  # a draw of exactly 0 would make 0 / 0 = NaN win
    return (probs / race).argmax(-1)


@torch.no_grad()
def check_generates(model: torch.nn.Module) -> None:
    """One line when `model` is of a family that does not generate text (an encoder)."""
    family = registry.family(model.config.family)
    if not family.causal_lm:
        raise TemperError(f"a {family.description} model ({model.config.hf_architecture}) is an encoder: bidirectional "
                          "attention and no next-token head, so it does not generate or score text; generate, chat, "
                          "eval and judges take a decoder (a causal LM)")


def generate(
    model: DecoderBase,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    pad_id: int = 0,
    use_cache: bool = True,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    num_return_sequences: int = 1,
    first_row: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (EOS included when it ended the sequence).

    `should_stop(row, new_tokens)` may end a row early (stop strings); `on_token(row, token)`
    is called for every token as it is chosen (streaming).

    `num_return_sequences=G` samples G completions of each prompt, rows prompt-major (row
    b*G + g is prompt b's g-th): each prompt is prefilled once, and its KV cache, tokens and
    next-token logits are repeated G times before decoding. Row for row this is the same work,
    the same logits and (seeded) the same tokens as passing each prompt G times, less the
    prefill of the copies. Rows that finish (EOS, a stop) leave the batch and its cache.

    Seeded, row r (of the B x G) samples from stream (seed, first_row + r): a caller that splits
    one batch into parts (processes, chunks) gives each part the index of its first row.
    """
    cfg.validate()
    check_generates(model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be at least 1, got {num_return_sequences}")
    device = next(model.parameters()).device
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    prompt_len = max(lengths)
    total = prompt_len + cfg.max_new_tokens
    if total > model.config.max_seq_len:
        message = (f"prompt ({prompt_len} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                   f"{model.config.max_seq_len} positions")
        layout = registry.family(model.config.family).layout
        if layout is not None and layout.positions == "learned":  # learned positions end there
            raise ValueError(message)
        warnings.warn(f"{message}; tokens beyond them are positions it never trained on and degrade",
                      stacklevel=2)
    padded = any(n != prompt_len for n in lengths)
    ids = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    key_valid = torch.zeros((B, total), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, prompt_len - len(p):prompt_len] = torch.tensor(list(p), dtype=torch.long)
        key_valid[b, prompt_len - len(p):] = True  # generated slots are valid too
    eos = torch.tensor(sorted(set(cfg.eos_token_ids)), dtype=torch.long, device=device)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = seen_tokens(ids[:, :prompt_len], key_valid[:, :prompt_len], model.config.vocab_size)

    rows = torch.arange(B, device=device)  # original index of each active row
    outputs: list[list[int]] = [[] for _ in range(B)]
    cache = model.new_cache(B, total) if use_cache else None
    positions = positions_from_valid(key_valid[:, :prompt_len]) if padded else None
    next_position = key_valid[:, :prompt_len].sum(-1, keepdim=True)  # (B, 1): left padding does not count
    mask = build_attention_mask(key_valid, prompt_len, prompt_len) if padded else None
    logits = model(ids[:, :prompt_len], positions=positions, mask=mask, cache=cache, last_only=True)[:, -1].float()
    if num_return_sequences > 1:  # the copies share the prefill: repeat its results, not its work
        copies = torch.arange(B, device=device).repeat_interleave(num_return_sequences)  # (B*G,)
        ids, key_valid, next_position, logits = ids[copies], key_valid[copies], next_position[copies], logits[copies]
        if seen is not None:
            seen = seen[copies]
        if cache is not None:
            cache.select(copies)
        B = B * num_return_sequences
        rows = torch.arange(B, device=device)
        outputs = [[] for _ in range(B)]
    streams = row_streams(cfg.seed, range(first_row, first_row + B), device) \
        if cfg.seed is not None and cfg.temperature > 0 else None

    # The chosen tokens stay in `ids` on the device; they are read back (`flush`) only where the
    # host needs them: every step for `on_token` / `should_stop`, the step a row ends on EOS (one
    # boolean read per step tells), when rows leave, and at the end. Greedy decoding without EOS
    # or callbacks reads nothing back until the end.
    per_token = on_token is not None or should_stop is not None
    flushed = prompt_len  # ids[:, :flushed] of the active rows are in `outputs` already

    def flush(end: int) -> list[int]:
        """Copy the active rows' ids[flushed:end] to `outputs` (calling on_token); their indices."""
        active = rows.tolist()
        for r, new in zip(active, ids[:, flushed:end].tolist()):
            for t in new:
                outputs[r].append(t)
                if on_token is not None:
                    on_token(r, t)
        return active

    for step in range(cfg.max_new_tokens):
        S = prompt_len + step  # tokens so far
        next_tokens = choose_next(process_logits(logits, cfg, seen), cfg, streams)  # (B_active,)
        ids[:, S] = next_tokens
        if seen is not None:
            seen.scatter_(1, next_tokens[:, None], True)
        last = step == cfg.max_new_tokens - 1
        finished = torch.isin(next_tokens, eos) if eos.numel() else None
        if per_token or last or (finished is not None and bool(finished.any())):
            active = flush(S + 1)
            flushed = S + 1
            done = finished.tolist() if finished is not None else [False] * len(active)
            if should_stop is not None:
                for i, r in enumerate(active):
                    if not done[i] and should_stop(r, outputs[r]):
                        done[i] = True
            if last or all(done):
                break
            if any(done):  # finished rows leave the batch
                keep = torch.tensor([i for i, d in enumerate(done) if not d], device=device)
                rows, ids, key_valid, next_position = rows[keep], ids[keep], key_valid[keep], next_position[keep]
                if streams is not None:
                    streams = [streams[i] for i in keep.tolist()]
                if seen is not None:
                    seen = seen[keep]
                if cache is not None:
                    cache.select(keep)
        if cache is not None:
            step_ids = ids[:, S:S + 1]
            positions = next_position if padded else None
            next_position = next_position + 1
            mask = key_valid[:, None, None, :S + 1] if padded else None
            logits = _as_float(model(step_ids, positions=positions, mask=mask, cache=cache)[:, -1])
        else:
            positions = positions_from_valid(key_valid[:, :S + 1]) if padded else None
            mask = build_attention_mask(key_valid, S + 1, S + 1) if padded else None
            logits = model(ids[:, :S + 1], positions=positions, mask=mask, last_only=True)[:, -1].float()
    return outputs


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logits (no cast call where they are fp32 already: one dispatch less per token)."""
    return logits if logits.dtype == torch.float32 else logits.float()


def generate_text(model: DecoderBase, tokenizer, prompts: Sequence[str], cfg: SamplingConfig, *,
                  batch_size: int = 8, use_cache: bool = True,
                  on_text: Callable[[int, str], None] | None = None, num_return_sequences: int = 1,
                  first_prompt: int = 0, new_token_counts: list[int] | None = None) -> list[str]:
    """Completions of `prompts` (prompt not included), cut at the first stop string or EOS.

    `on_text(prompt_index, text)` receives the completion piece by piece as it is generated.
    `num_return_sequences=G`: G completions of each prompt, prompt-major (`generate`'s, each prompt
    prefilled once; `batch_size` counts prompts). Seeded, completion r of the call draws from
    stream (seed, first_prompt * G + r) whatever the batch size: a caller that feeds one list in
    parts gives each part the index of its first prompt, and no two completions share a stream.
    `new_token_counts`, when given, gets each completion's number of generated tokens appended (EOS
    and tokens past a stop string included: the work done, for a tokens-per-second figure).
    """
    if on_text is not None and num_return_sequences != 1:
        raise ValueError("on_text streams one completion per prompt: num_return_sequences must be 1")
    eos = list(cfg.eos_token_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    cfg = SamplingConfig(**{**cfg.__dict__, "eos_token_ids": eos})
    results: list[str] = []
    for start in range(0, len(prompts), batch_size):
        results.extend(_generate_text_batch(model, tokenizer, prompts[start:start + batch_size], start,
                                            cfg, use_cache, on_text, num_return_sequences, first_prompt,
                                            new_token_counts))
    return results


def _generate_text_batch(model, tokenizer, prompts, offset, cfg, use_cache, on_text,
                         num_return_sequences=1, first_prompt=0, new_token_counts=None) -> list[str]:
    eos = set(cfg.eos_token_ids)
    stops = [s for s in cfg.stop if s]
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, e in enumerate(encoded):
        if not e:
            raise ValueError(f"prompt {offset + i} encodes to no tokens (is it empty?)")

    def should_stop(row: int, new: list[int]) -> bool:
        text = tokenizer.decode(new[-64:])  # a window is enough for short stop strings
        return any(s in text for s in stops)

    shown: dict[int, str] = {}

    def stream(row: int, token: int) -> None:
        # emit new text once it decodes cleanly (one character may span several tokens)
        if token in eos:
            return
        text = tokenizer.decode(streamed[row])
        if not text.endswith("\ufffd") and len(text) > len(shown.get(row, "")):
            on_text(offset + row, text[len(shown.get(row, "")):])
            shown[row] = text

    streamed: list[list[int]] = [[] for _ in prompts]

    def on_token(row: int, token: int) -> None:
        streamed[row].append(token)
        stream(row, token)

    new_tokens = generate(model, encoded, cfg, pad_id=tokenizer.pad_id or 0, use_cache=use_cache,
                          should_stop=should_stop if stops else None,
                          on_token=on_token if on_text is not None else None,
                          num_return_sequences=num_return_sequences,
                          first_row=(first_prompt + offset) * num_return_sequences)
    texts = []
    if new_token_counts is not None:
        new_token_counts.extend(len(tokens) for tokens in new_tokens)
    for row, tokens in enumerate(new_tokens):
        if tokens and tokens[-1] in eos:
            tokens = tokens[:-1]
        text = tokenizer.decode(tokens)
        if on_text is not None and len(text) > len(shown.get(row, "")):  # what was held back
            on_text(offset + row, text[len(shown.get(row, "")):])
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        texts.append(text[:cut] if cut >= 0 else text)
    return texts


__all__ = ["SamplingConfig", "generate", "generate_text", "process_logits", "seen_tokens", "KVCache"]
