"""temper serve's HTTP API through the official `openai` client against a server on 127.0.0.1,
then a fuzz of hostile requests."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_serve_engine import generate

from temper.models import build_model, load_model, preset
from temper.models.generate import SamplingConfig
from temper.serve.engine import Engine

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

API_KEY = "test-key"


# ----------------------------------------------------------------------------- the HTTP server


def _lora_adapter(out, base, seed):
    from temper.config import PeftConfig
    from temper.data.tokenizer import Tokenizer
    from temper.peft import apply_peft, save_peft

    torch.manual_seed(seed)
    model = load_model(base)
    cfg = PeftConfig(method="lora", r=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    apply_peft(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_peft(model, out, cfg, base_model=str(base.resolve()))
    Tokenizer.from_dir(base).save(out)
    return out


class Server:
    def __init__(self, app, engine):
        self.engine = engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical",
                                                    timeout_keep_alive=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key=API_KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    from temper.stages.serve import Config, build

    adapter = _lora_adapter(tmp_path_factory.mktemp("adapter"), tiny_model_dir, seed=4)
    cfg = Config(model=str(tiny_model_dir), name="base", adapters=[f"tuned={adapter}"], template="chatml",
                 api_key=API_KEY, max_batch=8, max_concurrent=6, max_tokens=48, max_prompt_tokens=200,
                 max_n=4, max_body_bytes=32768)
    cfg.validate()
    app, engine = build(cfg)
    server = Server(app, engine)
    server.adapter = adapter
    server.model = load_model(tiny_model_dir).eval()
    from temper.data.tokenizer import Tokenizer

    server.tokenizer = Tokenizer.from_dir(tiny_model_dir)
    yield server
    server.close()


PROMPT = "Alice lives in"


def test_models_lists_the_base_and_adapters(served):
    ids = [m.id for m in served.client().models.list().data]
    assert ids == ["base", "tuned"]


def test_completion_greedy_equals_generate_and_max_tokens(served):
    client = served.client()
    out = client.completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and len(out.choices) == 1
    tok = served.tokenizer
    alone = generate(served.model, [tok.encode(PROMPT)], SamplingConfig(max_new_tokens=12))[0]
    assert out.choices[0].text == tok.decode(alone)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(tok.encode(PROMPT))


def test_stop_string_cuts_and_reports_stop(served):
    client = served.client()
    full = client.completions.create(model="base", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop
    out = client.completions.create(model="base", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "\x00"],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[:full.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_seeded_sampling_with_n_is_reproducible(served):
    client = served.client()
    kw = dict(model="base", prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=11, **kw)
    b = client.completions.create(seed=11, **kw)
    c = client.completions.create(seed=12, **kw)
    texts = [ch.text for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.text for ch in b.choices] and texts != [ch.text for ch in c.choices]
    assert len(set(texts)) > 1  # each choice its own stream
    tok = served.tokenizer
    alone = generate(served.model, [tok.encode(PROMPT)], SamplingConfig(max_new_tokens=16, temperature=1.0, seed=11),
                     num_return_sequences=3)
    assert texts == [tok.decode(t) for t in alone]


def _chat_stream(client, **kw):
    return list(client.chat.completions.create(stream=True, **kw))


def test_chat_streaming_chunks_as_openai_sends_them(served):
    client = served.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does Alice live?"}]
    whole = client.chat.completions.create(model="base", messages=messages, max_tokens=20, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = _chat_stream(client, model="base", messages=messages, max_completion_tokens=20, temperature=0, n=2,
                          stream_options={"include_usage": True})
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 2 * whole.usage.completion_tokens
    assert all(c.usage is None for c in body)
    for index in (0, 1):
        mine = [c.choices[0] for c in body if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [m.finish_reason is not None for m in mine] == [False] * (len(mine) - 1) + [True]
        assert "".join(m.delta.content or "" for m in mine) == whole.choices[0].message.content
        assert mine[-1].finish_reason == whole.choices[0].finish_reason


def test_completion_streaming_and_done_marker(served):
    with httpx.stream("POST", served.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "base", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True,
                            "ignore_eos": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    tok = served.tokenizer
    alone = generate(served.model, [tok.encode(PROMPT)], SamplingConfig(max_new_tokens=10))[0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == tok.decode(alone)


def test_chat_stops_on_the_end_of_turn_token(served):
    """ChatML's <|im_end|> (one token, not EOS here) ends the reply at once: forced by logit_bias."""
    tok = served.tokenizer
    im_end = tok.token_id("<|im_end|>")
    assert im_end is not None and im_end != tok.eos_id
    out = served.client().chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=20, temperature=0,
        logit_bias={str(im_end): 100})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content == ""
    assert out.usage.completion_tokens == 1


def test_adapters_by_name_equal_the_adapter_alone_in_a_mixed_batch(served):
    """Base and adapter requests sent together (so their batches overlap in the engine's steps): each
    answer is what that model gives alone (the adapter loaded by itself through load_for_inference),
    greedy and seeded."""
    from temper.loading import load_for_inference

    tuned, tok = load_for_inference(served.adapter)
    ids = tok.encode(PROMPT)
    greedy, sampled = SamplingConfig(max_new_tokens=14), SamplingConfig(max_new_tokens=14, temperature=1.0, seed=5)
    want = {(name, cfg.temperature): tok.decode(generate(model, [ids], cfg)[0])
            for name, model in [("tuned", tuned), ("base", served.model)] for cfg in (greedy, sampled)}
    assert want["tuned", 1.0] != want["base", 1.0]
    client = served.client()

    def ask(job):
        name, temperature = job
        return job, client.completions.create(model=name, prompt=PROMPT, max_tokens=14, temperature=temperature,
                                              seed=5, extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [("tuned", 1.0), ("base", 1.0), ("tuned", 0.0), ("base", 0.0)] * 2))
    for job, text in answers:
        assert text == want[job], job


def test_api_key_is_required(served):
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").completions.create(model="base", prompt="x", max_tokens=2)
    assert httpx.get(served.url + "/health").json()["status"] == "ok"  # health needs no key


def test_limits_answer_4xx_in_openai_shape(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="Alice " * 300, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt=PROMPT, max_tokens=49)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    r = httpx.post(served.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   content=b"{" + b" " * 40000 + b"}")
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------- fuzz


def _hostile_requests():
    """(method, path, body bytes, headers) of malformed or hostile requests, deterministic."""
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    good = {"model": "base", "prompt": PROMPT, "max_tokens": 2}
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    values = [None, True, -1, 0, 10**30, -(10**30), 1e308, float("nan"), "", "x" * 5000, [], {}, [1, "a"],
              {"a": 1}, 3.5, "\ud800", -1e-9, [[]], [[-5]], [[10**9]], "😀" * 50]
    out = []
    for key in ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                "stream_options", "logit_bias", "logprobs", "echo", "unknown_field"]:
        for v in values:
            body = json.dumps({**good, key: v}).encode("utf-8", "surrogatepass")
            out.append(("POST", "/v1/completions", body, auth))
    for key in ["messages", "max_completion_tokens", "n", "stop", "temperature"]:
        for v in values + [[{"role": "bot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}],
                           [{"role": "assistant", "content": "x"}], [{"role": "user", "content": [{"type": "image"}]}]]:
            body = json.dumps({**chat, key: v}).encode("utf-8", "surrogatepass")
            out.append(("POST", "/v1/chat/completions", body, auth))
    raw = [b"", b"{", b"null", b"[]", b"\"x\"", b"{\"model\": \"base\", \"prompt\": \"\xff\xfe\"}", b"\xc3\x28",
           b"[" * 5000 + b"]" * 5000, b"{\"max_tokens\": 1" + b"0" * 5000 + b"}", b"{\"a\":" * 3000,
           json.dumps({**good, "max_tokens": 2, "max_tokens ": 3}).encode(), b"NaN", b"1e999"]
    for body in raw:
        out.append(("POST", "/v1/completions", body, auth))
        out.append(("POST", "/v1/chat/completions", body, auth))
    for method, path in [("GET", "/v1/completions"), ("DELETE", "/v1/models"), ("POST", "/v2/x"), ("GET", "/"),
                         ("PUT", "/health"), ("POST", "/v1/models"), ("GET", "/v1/../etc/passwd")]:
        out.append((method, path, json.dumps(good).encode(), auth))
    for headers in [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic eA=="}, {"Authorization": "x" * 4000},
                    {**auth, "Content-Type": "text/plain"}, {**auth, "Authorization": f"bearer {API_KEY}"}]:
        out.append(("POST", "/v1/completions", json.dumps(good).encode(), headers))
    return out


def _raw(port, data: bytes, *, pause: float = 0.0, close_early: bool = False, half_close: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if pause:
            head, tail = data[:len(data) // 2], data[len(data) // 2:]
            s.sendall(head)
            time.sleep(pause)
            if close_early:
                return b""
            s.sendall(tail)
        else:
            s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_fuzz_hostile_requests_never_take_the_server_down(served):
    start = time.monotonic()
    requests = _hostile_requests()
    statuses = []
    with httpx.Client(base_url=served.url, timeout=20) as http:
        for method, path, body, headers in requests:
            r = http.request(method, path, content=body, headers=headers)
            statuses.append(r.status_code)
            assert r.status_code < 500, (path, body[:80], r.text[:200])
            if r.status_code >= 400:
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert len(requests) >= 200
    assert statuses.count(200) < len(statuses) // 2  # most were refused, as they should be
    # the socket level: partial, slow, oversized, garbage
    body = json.dumps({"model": "base", "prompt": PROMPT, "max_tokens": 2}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    assert b" 200 " in _raw(served.port, head + body, pause=0.3)  # slow but complete
    _raw(served.port, head + body[:10], pause=0.1, close_early=True)  # client leaves mid-body
    short = head.replace(f"Content-Length: {len(body)}".encode(), b"Content-Length: 500")
    _raw(served.port, short + body, half_close=True)  # promised more than it sent, then closed its side
    for bad_length in [b"-5", b"abc", b"1e3"]:
        reply = _raw(served.port, head.replace(f"Content-Length: {len(body)}".encode(), b"Content-Length: " + bad_length)
                     + body)
        assert reply.startswith(b"HTTP/1.1 4"), reply[:100]
    huge = head.replace(f"Content-Length: {len(body)}".encode(), b"Content-Length: 99999999")
    assert b" 413 " in _raw(served.port, huge + body)
    for junk in [b"\x00\xff" * 100 + b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\n" +
                 b"X: " + b"a" * 70000 + b"\r\n\r\n"]:
        _raw(served.port, junk)
    # a burst over max_concurrent: some 429s, the rest answered correctly
    with ThreadPoolExecutor(16) as pool:
        burst = list(pool.map(lambda _: httpx.post(
            served.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
            json={"model": "base", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}),
            range(16)))
    codes = [r.status_code for r in burst]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in burst if r.status_code == 429)
    texts = {r.json()["choices"][0]["text"] for r in burst if r.status_code == 200}
    tok = served.tokenizer
    assert texts == {tok.decode(generate(served.model, [tok.encode(PROMPT)], SamplingConfig(max_new_tokens=40))[0])}
    # still alive and correct
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    out = served.client().completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
    alone = generate(served.model, [tok.encode(PROMPT)], SamplingConfig(max_new_tokens=8))[0]
    assert out.choices[0].text == tok.decode(alone)
    assert time.monotonic() - start < 30


def test_llama3_eot_id_ends_a_chat_reply():
    """Llama 3's <|eot_id|> (not the tokenizer's EOS) ends a reply at once; the app in-process."""
    from starlette.testclient import TestClient

    from temper.data.templates import BUILTIN_TEMPLATES
    from temper.data.tokenizer import SPECIAL_TOKENS, train_tokenizer
    from temper.serve.api import ServedModel, build_app

    extra = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>"]
    tok = train_tokenizer(["Alice lives in Paris. Bob lives in Rome."] * 20, vocab_size=300,
                          special_tokens=[*SPECIAL_TOKENS, *extra])
    eot = tok.token_id("<|eot_id|>")
    assert eot is not None and eot != tok.eos_id
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=tok.vocab_size)).eval()
    engine = Engine(model, tok).start()
    app = build_app(ServedModel(engine, tok, "m", template=BUILTIN_TEMPLATES["llama3"], max_seq_len=512))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0}
    try:
        with TestClient(app) as client:
            ended = client.post("/v1/chat/completions", json={**body, "logit_bias": {str(eot): 100}}).json()
            other = tok.encode("Paris")[0]
            ran = client.post("/v1/chat/completions", json={**body, "logit_bias": {str(other): 100}}).json()
    finally:
        engine.stop()
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["choices"][0]["message"]["content"] == ""
    assert ended["usage"]["completion_tokens"] == 1
    assert ran["choices"][0]["finish_reason"] == "length" and ran["usage"]["completion_tokens"] == 12


def test_a_quantised_directory_serves_what_it_generates(tiny_model_dir, tmp_path):
    """`temper serve` on a `temper quantize` directory (GPTQ int4, act order) loads its quantised
    layers and serves the greedy completion the quantised model's own `generate` gives."""
    from starlette.testclient import TestClient

    from temper.cli import main
    from temper.loading import load_for_inference
    from temper.stages.serve import Config, build

    out = tmp_path / "int4"
    assert main(["quantize", f"model={tiny_model_dir}", "method=gptq", "act_order=true", "group_size=32",
                 "nsamples=2", "seq_len=16", f"output_dir={out}"]) == 0
    quantised, tok = load_for_inference(out)
    assert any("Linear" in type(m).__name__ and type(m).__module__.startswith("temper.quant")
               for m in quantised.modules())
    cfg = Config(model=str(out), name="q", max_batch=4, max_tokens=16)
    cfg.validate()
    app, engine = build(cfg)
    try:
        with TestClient(app) as client:
            got = client.post("/v1/completions", json={"model": "q", "prompt": PROMPT, "max_tokens": 10,
                                                       "temperature": 0, "ignore_eos": True}).json()
    finally:
        engine.stop()
    alone = generate(quantised, [tok.encode(PROMPT)], SamplingConfig(max_new_tokens=10))[0]
    assert got["choices"][0]["text"] == tok.decode(alone)
