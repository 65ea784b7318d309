"""The serving engine: continuous batching of generation requests on one model.

One background thread owns the model. It keeps a running batch per adapter (the base is the
adapter `None`); each engine step it admits waiting requests (each is prefilled alone, its
KV cache joined to its adapter's running batch, right-aligned: `KVCache.stack`), then for
every running batch samples one token per row and runs one decode forward for the rows
still going. A request that arrives while others decode therefore joins them at the next
step, and a finished row leaves its batch at once.

Rows of different lengths share one cache through left padding: each row carries its own
positions (`next_position`) and a padding mask (`key_valid`), as in `generate`'s ragged
batches, so a row's logits are those it would get alone (the padding slots are masked out).
Sampling is `generate`'s own: `process_logits` and `choose_next`, with one random stream per
choice keyed by (seed, choice index), `row_streams`: a seeded request samples the same
tokens whatever else shares its batch, the same tokens `generate(..., num_return_sequences=n)`
gives it alone.

Adapters: `LoRALinear` applies one active adapter per forward pass, so rows are grouped by
adapter and each group runs its own forward pass in the step (one batch per adapter, in
turn). A per-row adapter inside one forward pass would need a gathered low-rank product in
every LoRA layer (code that belongs to `temper.peft`, and that base rows would pay for).
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from temper.data.chat import StopWriter
from temper.models.common import KVCache
from temper.models.generate import SamplingConfig, choose_next, process_logits, row_streams


@dataclass
class Event:
    """What the engine reports for one choice: new text, and on its last event the finish reason."""

    choice: int
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the choice's last event
    tokens: list[int] | None = None  # the choice's generated token ids, on its last event
    error: str | None = None  # the engine failed on this request; the request is over


@dataclass
class Request:
    """One prompt to complete `n` times. `emit` is called from the engine thread."""

    prompt: Sequence[int]
    sampling: SamplingConfig  # max_new_tokens, temperature, top_p, seed, eos_token_ids, stop
    emit: Callable[[Event], None]
    n: int = 1
    adapter: str | None = None
    logit_bias: dict[int, float] | None = None
    first_row: int = 0  # seeded: choice j draws from stream (seed, first_row + j)
    cancelled: threading.Event = field(default_factory=threading.Event)
    streams: list[torch.Generator] | None = None
    bias: torch.Tensor | None = None

    def cancel(self) -> None:
        """Stop generating (the client left): the rows leave their batch at the next step."""
        self.cancelled.set()


class _Choice:
    """One row of a running batch: a choice of a request, its tokens and the text shown so far."""

    def __init__(self, request: Request, index: int, tokenizer) -> None:
        self.request, self.index, self.tokenizer = request, index, tokenizer
        self.tokens: list[int] = []
        self.shown = ""  # decoded text handed to the writer so far
        self.writer = StopWriter(request.sampling.stop, self._write)
        self.pending: list[str] = []

    def _write(self, text: str) -> None:
        self.pending.append(text)

    def add(self, token: int) -> str | None:
        """Take a new token; the finish reason when this choice is over."""
        cfg = self.request.sampling
        if token in cfg.eos_token_ids:
            self.tokens.append(token)
            self._finish(self.tokens[:-1])
            return "stop"
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd") and len(text) > len(self.shown):  # a whole character more
            self.writer(0, text[len(self.shown):])
            self.shown = text
        if self.writer.stopped:
            return "stop"
        if len(self.tokens) >= cfg.max_new_tokens:
            self._finish(self.tokens)
            return "length"
        return None

    def _finish(self, tokens: list[int]) -> None:
        text = self.tokenizer.decode(tokens)
        if len(text) > len(self.shown):  # the held-back end of a character
            self.writer(0, text[len(self.shown):])
            self.shown = text
        if not self.writer.stopped:
            self.writer.finish(text)

    def take_text(self) -> str:
        text = "".join(self.pending)
        self.pending.clear()
        return text


class _Batch:
    """The running rows of one adapter: their KV cache, padding mask, positions and next logits."""

    def __init__(self) -> None:
        self.choices: list[_Choice] = []
        self.cache: KVCache | None = None
        self.key_valid: torch.Tensor | None = None  # (B, max_len) bool: real slots
        self.next_position: torch.Tensor | None = None  # (B, 1) long
        self.logits: torch.Tensor | None = None  # (B, V) fp32: the next token's

    def __len__(self) -> int:
        return len(self.choices)

    def join(self, choices: list[_Choice], cache: KVCache, logits: torch.Tensor) -> None:
        """Add prefilled rows (their cache holds exactly their prompt) to this batch."""
        n, P = logits.shape[0], cache.length
        device = logits.device
        valid_new = torch.ones((n, P), dtype=torch.bool, device=device)
        position_new = torch.full((n, 1), P, dtype=torch.long, device=device)
        need = max(c.request.sampling.max_new_tokens - len(c.tokens) for c in [*self.choices, *choices])
        if self.cache is None:
            self.cache = KVCache.stack([cache], P + need)
            self.key_valid = torch.zeros((n, P + need), dtype=torch.bool, device=device)
            self.key_valid[:, :P] = valid_new
            self.choices, self.next_position, self.logits = list(choices), position_new, logits
            return
        L = self.cache.length
        used = self.key_valid[:, :L]
        skip = int(used.any(0).long().argmax()) if used.any() else L  # leading slots padding in every row
        length = max(L - skip, P)
        capacity = length + need
        self.cache = KVCache.stack([self.cache, cache], capacity, skip=[skip, 0])
        key_valid = torch.zeros((len(self.choices) + n, capacity), dtype=torch.bool, device=device)
        key_valid[:len(self.choices), length - (L - skip):length] = used[:, skip:]
        key_valid[len(self.choices):, length - P:length] = valid_new
        self.key_valid = key_valid
        self.choices.extend(choices)
        self.next_position = torch.cat([self.next_position, position_new])
        self.logits = torch.cat([self.logits, logits])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (finished and cancelled ones leave)."""
        if not rows:
            self.__init__()
            return
        if len(rows) == len(self.choices):
            return
        index = torch.tensor(rows, device=self.key_valid.device)
        self.cache.select(index)
        self.key_valid, self.next_position = self.key_valid[index], self.next_position[index]
        self.logits = self.logits[index]
        self.choices = [self.choices[i] for i in rows]


class Engine:
    """Continuous batching on one model: `submit` requests from any thread; one engine thread runs them.

    `max_batch` caps the rows (choices) decoding at once; requests beyond it wait their turn.
    `steps` records the rows of every decode forward pass (tests and benchmarks read it).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 16,
                 use_adapter: Callable[[str | None], contextlib.AbstractContextManager] | None = None) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.use_adapter = use_adapter or (lambda name: contextlib.nullcontext())
        self.device = next(model.parameters()).device
        self._incoming: queue.Queue[Request | None] = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._batches: dict[str | None, _Batch] = {}
        self.steps: list[int] = []
        self.failure: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="temper-serve-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._incoming.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: Request) -> None:
        if request.n > self.max_batch:
            raise ValueError(f"n={request.n} exceeds the engine's max_batch={self.max_batch}")
        self._incoming.put(request)

    def running(self) -> int:
        return sum(len(b) for b in list(self._batches.values()))  # a copy: the engine thread changes the dict

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._admit()
                    for name in list(self._batches):
                        batch = self._batches[name]
                        if len(batch):
                            self._step(name, batch)
                        if not len(batch):
                            del self._batches[name]
                except Exception as e:  # never leave a client waiting: fail what was running, go on
                    self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        traceback.print_exc(file=sys.stderr)
        requests = {id(c.request): c.request for b in self._batches.values() for c in b.choices}
        for r in requests.values():
            r.emit(Event(0, "", error=message))
        self._batches.clear()

    def _admit(self) -> None:
        block = not self._batches and not self._waiting  # idle: sleep until a request comes
        while True:
            try:
                item = self._incoming.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                break
            block = False
            if item is None:
                return
            self._waiting.append(item)
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled.is_set():
                self._waiting.popleft()
                continue
            if self.running() + request.n > self.max_batch:
                break  # first come, first served: the head waits for rows to free
            self._waiting.popleft()
            try:
                self._prefill(request)
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                request.emit(Event(0, "", error=f"{type(e).__name__}: {e}"))

    def _prefill(self, request: Request) -> None:
        cfg = request.sampling
        if cfg.temperature > 0:  # unseeded: a fresh seed, so every choice still has its own stream
            seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
            request.streams = row_streams(seed, range(request.first_row, request.first_row + request.n), self.device)
        if request.logit_bias:
            bias = torch.zeros(self.model.config.vocab_size, device=self.device)
            for token, value in request.logit_bias.items():
                bias[token] = value
            request.bias = bias
        ids = torch.tensor([list(request.prompt)], dtype=torch.long, device=self.device)
        cache = self.model.new_cache(1, ids.shape[1])
        with self.use_adapter(request.adapter):
            logits = self.model(ids, cache=cache, last_only=True)[:, -1].float()  # (1, V)
        if request.n > 1:  # the choices share the prefill
            copies = torch.zeros(request.n, dtype=torch.long, device=self.device)
            cache.select(copies)
            logits = logits[copies]
        choices = [_Choice(request, j, self.tokenizer) for j in range(request.n)]
        self._batches.setdefault(request.adapter, _Batch()).join(choices, cache, logits)

    def _step(self, name: str | None, batch: _Batch) -> None:
        # sample: each request with its own settings and streams, over its own rows
        tokens = torch.empty(len(batch), dtype=torch.long, device=self.device)
        start = 0
        while start < len(batch):
            request = batch.choices[start].request
            stop = start
            while stop < len(batch) and batch.choices[stop].request is request:
                stop += 1
            logits = batch.logits[start:stop]
            if request.bias is not None:
                logits = logits + request.bias
            streams = None
            if request.streams is not None:
                streams = [request.streams[c.index] for c in batch.choices[start:stop]]
            tokens[start:stop] = choose_next(process_logits(logits, request.sampling, None), request.sampling,
                                             streams)
            start = stop
        keep = []
        for row, (choice, token) in enumerate(zip(batch.choices, tokens.tolist())):
            if choice.request.cancelled.is_set():
                continue
            reason = choice.add(token)
            text = choice.take_text()
            if reason is not None:
                choice.request.emit(Event(choice.index, text, reason, tokens=list(choice.tokens)))
            else:
                if text:
                    choice.request.emit(Event(choice.index, text))
                keep.append(row)
        batch.keep(keep)
        if not keep:
            return
        # decode: one forward pass for every row still going
        L = batch.cache.length
        if L + 1 > batch.cache.max_len:  # cannot happen while join sizes the cache; kept as a guard
            raise AssertionError("KV cache full")
        tokens = tokens[torch.tensor(keep, device=self.device)]
        batch.key_valid[:, L] = True
        mask = batch.key_valid[:, None, None, :L + 1]
        with self.use_adapter(name):
            logits = self.model(tokens[:, None], positions=batch.next_position, mask=mask, cache=batch.cache)
        batch.logits = logits[:, -1].float()
        batch.next_position = batch.next_position + 1
        self.steps.append(len(batch))


def wait_all(engine: Engine, requests: Sequence[Request], events: queue.Queue, timeout: float = 60.0
             ) -> dict[int, dict[int, Event]]:
    """Collect the last events of `requests` (whose emit puts (request index, Event) on `events`)."""
    done: dict[int, dict[int, Event]] = {i: {} for i in range(len(requests))}
    deadline = time.monotonic() + timeout
    while any(len(done[i]) < r.n for i, r in enumerate(requests)):
        i, event = events.get(timeout=max(0.01, deadline - time.monotonic()))
        if event.error:
            raise RuntimeError(event.error)
        if event.finish_reason is not None:
            done[i][event.choice] = event
    return done
