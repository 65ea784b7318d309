"""Run lm-evaluation-harness (lm-eval >= 0.4) tasks on temper models.

    import lm_eval
    from temper.eval.lm_eval_adapter import TemperLM

    lm = TemperLM(pretrained="runs/sft/final", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

Importing this module registers the adapter under the name "temper" when lm_eval is
installed (`lm_eval.simple_evaluate(model="temper", model_args="pretrained=DIR")`), next to
lm-eval's own models ("hf", ...), whatever was imported first (see the end). Without
lm_eval the class has the same three methods on a plain base class, so it can be used and
tested directly with objects that carry lm-eval's `.args`.

Conventions follow lm-eval's `HFLM`: trailing whitespace of a context moves onto the
continuation, the continuation's tokens are those of encode(context + continuation) after
encode(context), an empty context is replaced by the BOS (else EOS) token, and rolling
log-likelihoods score every token of the text (the first after that prefix token) with
lm-eval's own windows (`get_rolling_token_windows` + `make_disjoint_window`, context_len=1):
disjoint windows of `max_length` predictions, except that the last, partial window is fed a
full `max_length` tokens of context (see `temper.eval.sliding.rolling_windows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from temper.errors import TemperError
from temper.eval.sliding import rolling_windows
from temper.loading import load_for_inference
from temper.models.generate import SamplingConfig, generate_text

try:  # lm_eval is optional
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model as _register_model

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_LM_EVAL = False

    class _Base:  # type: ignore[no-redef]
        """Stand-in for `lm_eval.api.model.LM` when lm_eval is not installed."""

        def __init__(self) -> None:
            self._rank, self._world_size, self.cache_hook = 0, 1, None

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

    def _register_model(*names):  # type: ignore[no-redef]
        return lambda cls: cls

__all__ = ["TemperLM", "HAVE_LM_EVAL"]


class TemperLM(_Base):
    """An lm-eval model backed by a temper model and tokenizer.

    Pass `pretrained` (a model or adapter directory, loaded with `load_for_inference`) or
    an already loaded `model` and `tokenizer`.
    """

    def __init__(self, pretrained: str | Path | None = None, *, model=None, tokenizer=None,
                 device: str = "cpu", dtype: Any = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, **_: Any) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise TemperError("TemperLM needs pretrained=DIR or model= and tokenizer=")
            model, tokenizer = load_for_inference(pretrained, device=device, dtype=dtype)
        elif tokenizer is None:
            raise TemperError("TemperLM(model=...) needs its tokenizer too")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size)) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.max_length = int(max_length or model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise TemperError("TemperLM needs a tokenizer with a BOS or EOS token (the empty-context prefix)")
        self.prefix_id = prefix

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:  # for lm-eval's request cache key
        return type(self.tokenizer).__name__

    # ------------------------------------------------------------------ helpers

    def _cache(self, kind: str, args, result) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None and hasattr(hook, "add_partial"):
            hook.add_partial(kind, args, result)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        cont = whole[len(ctx):]
        if not ctx:
            ctx = [self.prefix_id]
        if not cont:  # a continuation that merged into the context's last token
            cont = self.tokenizer.encode(continuation)
        return ctx, cont

    @torch.no_grad()
    def _score(self, pieces: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(target), all targets greedy) for (input ids, targets) pairs whose targets
        are the last len(targets) next-token predictions of the input; right-padded batches."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(pieces), self.batch_size):
            batch = pieces[start:start + self.batch_size]
            width = max(len(inp) for inp, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for b, (inp, _) in enumerate(batch):
                ids[b, :len(inp)] = torch.tensor(inp)
            logprobs = self.model(ids.to(self.device)).float().log_softmax(-1)  # causal: pads come after
            for b, (inp, targets) in enumerate(batch):
                end = len(inp)
                lp = logprobs[b, end - len(targets):end]
                tgt = torch.tensor(targets, device=lp.device)
                total = lp.gather(-1, tgt[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == tgt).all())
                out.append((total, greedy))
        return out

    # ------------------------------------------------------------------ lm-eval API

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation)."""
        pieces = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = self._encode_pair(context, continuation)
            whole = (ctx + cont)[-(self.max_length + 1):]
            pieces.append((whole[:-1], cont[-(len(whole) - 1):]))
        results = self._score(pieces)
        for req, res in zip(requests, results):
            self._cache("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) over all its tokens, the first conditioned on the BOS (else EOS) token,
        by lm-eval's rolling windows of `max_length` tokens."""
        results = []
        for req in requests:
            tokens = self.tokenizer.encode(req.args[0])
            pieces = rolling_windows(tokens, self.prefix_id, self.max_length, self.max_length)
            total = sum(lp for lp, _ in self._score(pieces)) if pieces else 0.0
            self._cache("loglikelihood_rolling", req.args, total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample and a temperature, sampled) continuations cut at `until`."""
        eos = self.tokenizer.eos_token
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.pop("until", None) or ([eos] if eos else [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            groups.setdefault((tuple(until), max_new, temperature), []).append(i)
        for (until, max_new, temperature), idx in groups.items():
            limit = max(1, self.max_length - max_new)
            prompts = []
            for i in idx:
                context = requests[i].args[0]
                ids = self.tokenizer.encode(context)
                if not ids:
                    ids = [self.prefix_id]
                    context = self.tokenizer.decode(ids)
                elif len(ids) > limit:  # keep the end of an over-long context
                    context = self.tokenizer.decode(ids[-limit:])
                prompts.append(context)
            cfg = SamplingConfig(max_new_tokens=max_new, temperature=temperature, stop=until, seed=1234)
            texts = generate_text(self.model, self.tokenizer, prompts, cfg, batch_size=self.batch_size)
            for i, text in zip(idx, texts):
                results[i] = text
                self._cache("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]


if HAVE_LM_EVAL:
    # lm-eval (0.4.13 here) fills its model registry with its own models ("hf", "vllm", ...) lazily:
    # `get_model` imports `lm_eval.models`, whose import registers them, only when the registry is
    # EMPTY. Registering "temper" into an untouched registry would make it non-empty, and `hf` & co.
    # would never arrive. So take lm-eval's own step first: import `lm_eval.models`, then register.
    # In 0.4.13 that import only records "module:Class" strings (no backend is imported); in older
    # 0.4.x, whose registry is a plain dict with no lazy fill, it imports the backends eagerly,
    # which `lm_eval.evaluator` does at its top anyway. No lm-eval internals are touched; the
    # alternative of registering "temper" lazily would still leave the registry non-empty.
    import lm_eval.models  # noqa: F401

    try:
        _register_model("temper")(TemperLM)
    except (AssertionError, ValueError):  # pragma: no cover - already registered (module reloaded)
        pass
