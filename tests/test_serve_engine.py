"""temper serve's engine: continuous batching against one-at-a-time `generate` (no HTTP needed)."""

from __future__ import annotations

import queue
import time

import torch
from conftest import context_sensitive_model

from temper.models import build_model, preset
from temper.models.generate import SamplingConfig
from temper.models.generate import generate as _generate
from temper.serve.engine import Engine, Request, wait_all


def generate(*args, **kwargs):
    """The one-at-a-time reference, without autograd bookkeeping."""
    with torch.inference_mode():
        return _generate(*args, **kwargs)


class LetterTokenizer:
    """Every id decodes to one letter: the engine's text handling without a real vocabulary."""

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


# ----------------------------------------------------------------------------- the engine


def test_a_request_joins_the_running_batch_and_rows_equal_one_at_a_time():
    """B (seeded sampling, n=2, a prompt longer than A's whole sequence so far) and C (greedy, a short
    prompt) arrive while A decodes: they join A's forward passes (no extra passes: A's 59 decode passes
    are all there are, 4 rows at the widest), leave before A ends, and every row's tokens are those
    `generate` gives the request alone (its cache padded on the left in the batch, not alone)."""
    model = context_sensitive_model()
    engine = Engine(model, LetterTokenizer(), max_batch=8).start()
    events: queue.Queue = queue.Queue()
    a_cfg = SamplingConfig(max_new_tokens=60)
    b_cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    c_cfg = SamplingConfig(max_new_tokens=5)
    prompts = [[5, 6, 7], list(range(10, 24)), [9, 3]]
    others = [Request(prompts[1], b_cfg, lambda e: events.put((1, e)), n=2),
              Request(prompts[2], c_cfg, lambda e: events.put((2, e)))]
    finished_order = []

    seen = []

    def emit_a(event):
        events.put((0, event))
        seen.append(event)
        if event.finish_reason is not None:
            finished_order.append(0)
        if len(seen) == 5:  # A's 5th token: submit from the engine thread itself, so that they
            for r in others:  # join at exactly the next step
                engine.submit(r)

    def record(i):
        def put(e):
            if e.finish_reason is not None:
                finished_order.append(i)
            events.put((i, e))
        return put

    others[0].emit, others[1].emit = record(1), record(2)
    a = Request(prompts[0], a_cfg, emit_a)
    engine.submit(a)
    try:
        done = wait_all(engine, [a, *others], events)
    finally:
        engine.stop()
    assert sorted(finished_order) == [0, 1, 1, 2] and finished_order[-1] == 0  # B, C done while A decoded
    assert done[0][0].tokens == generate(model, [prompts[0]], a_cfg)[0]
    assert [done[1][j].tokens for j in range(2)] == generate(model, [prompts[1]], b_cfg, num_return_sequences=2)
    assert done[2][0].tokens == generate(model, [prompts[2]], c_cfg)[0]
    assert len(engine.steps) == a_cfg.max_new_tokens - 1  # every pass of B and C was one of A's
    assert max(engine.steps) == 4 and engine.steps[0] == 1 and engine.steps[-1] == 1


def test_many_requests_batched_equal_one_at_a_time_greedy_and_seeded():
    """A burst of requests of different lengths and settings, over a batch cap that makes some wait,
    rows leaving and joining all along: each equals `generate` on its own; max_batch is respected."""
    model = context_sensitive_model(seed=1)
    engine = Engine(model, LetterTokenizer(), max_batch=5).start()
    events: queue.Queue = queue.Queue()
    g = torch.Generator().manual_seed(3)
    requests, configs = [], []
    for i in range(10):
        prompt = torch.randint(1, 64, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        if i % 2:
            cfg = SamplingConfig(max_new_tokens=3 + i, temperature=0.7 + 0.1 * i, top_p=0.95, seed=i)
        else:
            cfg = SamplingConfig(max_new_tokens=3 + 2 * i)
        requests.append(Request(prompt, cfg, lambda e, i=i: events.put((i, e)), n=1 + i % 3))
        configs.append(cfg)
    for r in requests:
        engine.submit(r)
    try:
        done = wait_all(engine, requests, events)
    finally:
        engine.stop()
    for i, (r, cfg) in enumerate(zip(requests, configs)):
        alone = generate(model, [r.prompt], cfg, num_return_sequences=r.n)
        assert [done[i][j].tokens for j in range(r.n)] == alone, f"request {i}"
    assert max(engine.steps) <= 5 and max(engine.steps) > 1


def test_a_cancelled_request_leaves_and_a_failing_one_does_not_stop_the_engine():
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64)).eval()
    engine = Engine(model, LetterTokenizer(), max_batch=4).start()
    events: queue.Queue = queue.Queue()
    try:
        long = Request([1, 2, 3], SamplingConfig(max_new_tokens=400), lambda e: events.put((0, e)))

        def cancel_at_third(e):
            events.put((0, e))
            if events.qsize() >= 3:
                long.cancel()

        long.emit = cancel_at_third
        engine.submit(long)
        deadline = time.monotonic() + 20
        while engine.running() or not long.cancelled.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(engine.steps) < 10  # left at once, not after 400 tokens
        assert all(e.finish_reason is None for _, e in list(events.queue))
        broken = Request([1, 99], SamplingConfig(max_new_tokens=3), lambda e: events.put((1, e)))  # 99 >= vocab
        engine.submit(broken)
        while True:
            i, e = events.get(timeout=20)
            if i == 1:
                break
        assert e.error and engine.alive
        fine = Request([1, 2], SamplingConfig(max_new_tokens=3), lambda e: events.put((0, e)))
        engine.submit(fine)
        done = wait_all(engine, [fine], events)
        assert done[0][0].tokens == generate(model, [[1, 2]], SamplingConfig(max_new_tokens=3))[0]
    finally:
        engine.stop()


def test_kv_cache_stack_right_aligns_and_skips():
    from temper.models.common import KVCache

    a = KVCache(1, 2, 1, 6, 1, dtype=torch.float32, device="cpu")
    b = KVCache(1, 1, 1, 4, 1, dtype=torch.float32, device="cpu")
    a.keys[0][:, 0, :4, 0] = torch.tensor([[0.0, 1, 2, 3], [0, 5, 6, 7]])
    a.length = 4
    b.keys[0][0, 0, :2, 0] = torch.tensor([8.0, 9])
    b.length = 2
    s = KVCache.stack([a, b], 5, skip=[1, 0])  # a's slot 0 is padding in both rows
    assert s.length == 3 and s.max_len == 5
    assert s.keys[0][:, 0, :3, 0].tolist() == [[1, 2, 3], [5, 6, 7], [0, 8, 9]]
