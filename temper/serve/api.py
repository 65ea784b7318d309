"""The OpenAI-compatible HTTP API on Starlette: /v1/models, /v1/completions,
/v1/chat/completions and /health, over an `Engine`.

Requests are checked field by field before they reach the engine; every refusal is a 4xx
JSON body in OpenAI's error shape {"error": {"message", "type", "param", "code"}}. Limits
(body size, prompt tokens, max_tokens, n, concurrent requests) come from `Limits`.
Streaming follows OpenAI's server-sent events: one `id` and `created` per stream, the
first chunk of each chat choice carries the role, `finish_reason` only on the choice's last
chunk, a usage chunk (empty `choices`) when `stream_options.include_usage`, then
`data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from temper.data.chat import check_messages, render, render_kwargs, stop_settings
from temper.errors import TemperError
from temper.models.generate import SamplingConfig
from temper.serve.engine import Engine, Event
from temper.serve.engine import Request as EngineRequest

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_SEED = 2**63 - 1


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 0  # 0: the model's context
    max_tokens: int = 512  # the most new tokens one choice may ask for
    max_n: int = 8
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_concurrent: int = 64  # requests in flight (waiting or generating); more get 429
    body_timeout_s: float = 10.0  # a body that takes longer to arrive gets 408


@dataclass
class ServedModel:
    """What the app serves: an engine, its tokenizer and chat template, and the names it answers to."""

    engine: Engine
    tokenizer: object
    base_name: str
    adapters: list[str] = field(default_factory=list)
    template: str | None = None  # None: /v1/chat/completions is refused (the model has no chat template)
    max_seq_len: int = 2048
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    """A request refused with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, kind=self.kind)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


# ----------------------------------------------------------------------------- field checks


def _int(body: dict, key: str, default, low: int, high: int):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer, got {type(value).__name__}", param=key)
    if not low <= value <= high:
        raise ApiError(400, f"{key} must be in [{low}, {high}], got {value}", param=key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a finite number", param=key)
    if value < low or value > high or (low_open and value == low):
        bound = "(" if low_open else "["
        raise ApiError(400, f"{key} must be in {bound}{low}, {high}], got {value}", param=key)
    return float(value)


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", param=key)
    return value


def _text(value, key: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{key} must be a string, got {type(value).__name__}", param=key)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{key} is not valid Unicode (a lone surrogate)", param=key) from None
    return value


COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
                 "logit_bias", "user", "ignore_eos", "frequency_penalty", "presence_penalty", "logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                               "parallel_tool_calls", "store", "metadata"}


@dataclass
class Params:
    """A generation request, checked: what the engine needs for each prompt."""

    model: str
    adapter: str | None
    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    logit_bias: dict[int, float] | None
    ignore_eos: bool


def check_common(body: dict, served: ServedModel, allowed: set[str], *, chat: bool) -> dict:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise ApiError(400, f"unrecognized request argument: {unknown[0]}", param=unknown[0],
                       code="unrecognized_argument")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required: a string naming a served model (see /v1/models)", param="model")
    names = [served.base_name, *served.adapters]
    if model not in names:
        raise ApiError(404, f"the model {model!r} does not exist; served here: {', '.join(names)}", param="model",
                       code="model_not_found")
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(400, f"{key} is not supported (only 0)", param=key)
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    for key in ("echo",):
        if _bool(body, key):
            raise ApiError(400, f"{key} is not supported", param=key)
    if body.get("suffix") is not None:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of is not supported (only 1)", param="best_of")
    if body.get("top_logprobs") is not None:
        raise ApiError(400, "top_logprobs is not supported", param="top_logprobs")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError(400, "response_format is not supported (only {\"type\": \"text\"})", param="response_format")
    if "user" in body and body["user"] is not None:
        _text(body["user"], "user")
    limits = served.limits
    n = _int(body, "n", 1, 1, limits.max_n)
    stop = body.get("stop")
    stops: list[str] = []
    if isinstance(stop, str):
        stops = [_text(stop, "stop")]
    elif isinstance(stop, list):
        if len(stop) > MAX_STOPS:
            raise ApiError(400, f"stop takes at most {MAX_STOPS} sequences, got {len(stop)}", param="stop")
        stops = [_text(s, "stop") for s in stop]
    elif stop is not None:
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must not be empty", param="stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options must be {\"include_usage\": true|false}", param="stream_options")
        include_usage = _bool(options, "include_usage")
    bias = body.get("logit_bias")
    logit_bias = None
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > 300:
            raise ApiError(400, "logit_bias must be an object of at most 300 token ids", param="logit_bias")
        logit_bias = {}
        vocab = served.engine.model.config.vocab_size
        for key, value in bias.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < vocab):
                raise ApiError(400, f"logit_bias key {key[:20]!r} is not a token id in [0, {vocab})",
                               param="logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise ApiError(400, "logit_bias values must be numbers in [-100, 100]", param="logit_bias")
            logit_bias[int(key)] = float(value)
    max_key = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        max_key = "max_completion_tokens"
    max_tokens = _int(body, max_key, None, 1, limits.max_tokens)
    return dict(model=model, adapter=None if model == served.base_name else model, n=n, stop=stops, stream=stream,
                include_usage=include_usage, logit_bias=logit_bias, max_tokens=max_tokens,
                temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                seed=_int(body, "seed", None, -MAX_SEED, MAX_SEED), ignore_eos=_bool(body, "ignore_eos"))


def fit_prompt(ids: list[int], served: ServedModel, max_tokens: int | None, default_tokens: int, param: str) -> int:
    """The max_tokens to use for this prompt; 400 when the prompt or prompt + max_tokens do not fit."""
    if not ids:
        raise ApiError(400, f"{param} encodes to no tokens (is it empty?)", param=param)
    limit = served.limits.max_prompt_tokens or served.max_seq_len - 1
    if len(ids) > min(limit, served.max_seq_len - 1):
        raise ApiError(400, f"{param} has {len(ids)} tokens; this server takes at most "
                            f"{min(limit, served.max_seq_len - 1)}", param=param, code="context_length_exceeded")
    room = served.max_seq_len - len(ids)
    if max_tokens is None:
        return min(default_tokens, room, served.limits.max_tokens)
    if max_tokens > room:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the model's "
                            f"context of {served.max_seq_len} tokens", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


def completion_prompts(body: dict, served: ServedModel) -> list[list[int]]:
    prompt = body.get("prompt")
    vocab = served.engine.model.config.vocab_size
    if isinstance(prompt, str):
        return [served.tokenizer.encode(_text(prompt, "prompt"))]
    if isinstance(prompt, list) and prompt:
        if len(prompt) > served.limits.max_prompts and not all(isinstance(t, int) for t in prompt):
            raise ApiError(400, f"at most {served.limits.max_prompts} prompts per request", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            return [served.tokenizer.encode(_text(p, "prompt")) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [prompt]
        elif all(isinstance(p, list) for p in prompt):
            prompts = prompt
        else:
            raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                                "lists of token ids", param="prompt")
        for p in prompts:
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
                raise ApiError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        return [list(p) for p in prompts]
    raise ApiError(400, "prompt is required: a string, a list of strings or token ids", param="prompt")


def chat_prompt(body: dict, served: ServedModel) -> list[int]:
    if served.template is None:
        raise ApiError(400, "this model has no chat template: use /v1/completions, or start the server with "
                            "template=chatml|llama3|plain", param="messages")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > 1024:
        raise ApiError(400, "messages must be a non-empty list (at most 1,024) of {role, content}",
                       param="messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text parts only
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        if content is not None:
            _text(content, f"messages[{i}].content")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        plain.append({"role": role, "content": content})
    try:
        check_messages(plain, "messages", prompt=True)
        text = render(served.template, plain, add_generation_prompt=True, **render_kwargs(served.tokenizer))
    except TemperError as e:
        raise ApiError(400, str(e), param="messages") from None
    return served.tokenizer.encode(text)


# ----------------------------------------------------------------------------- the app


def build_app(served: ServedModel) -> Starlette:
    """The Starlette app serving `served` (its engine already started)."""
    in_flight = 0
    chat_stops, chat_eos = ([], [])
    if served.template is not None:
        chat_stops, chat_eos = stop_settings(served.tokenizer, served.template)
    eos = [served.tokenizer.eos_id] if served.tokenizer.eos_id is not None else []

    def authorised(request: Request) -> bool:
        if served.api_key is None:
            return True
        return request.headers.get("authorization", "") == f"Bearer {served.api_key}"

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        limit = served.limits.max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), served.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {served.limits.body_timeout_s:g} s",
                           code="timeout") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, f"the body is not valid JSON ({type(e).__name__}: {str(e)[:100]})",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    async def guarded(request: Request, handler) -> Response:
        nonlocal in_flight
        if not authorised(request):
            return error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                  kind="authentication_error", code="invalid_api_key")
        if in_flight >= served.limits.max_concurrent:
            return error_response(429, f"the server is busy ({served.limits.max_concurrent} requests in "
                                       "flight); retry later", kind="rate_limit_error", code="too_many_requests")
        in_flight += 1
        handed_over = False
        try:
            body = await read_json(request)
            response = await handler(body)
            if isinstance(response, StreamingResponse):  # the stream releases its slot when it ends
                handed_over = True
                inner = response.body_iterator

                async def release() -> AsyncIterator[str]:
                    nonlocal in_flight
                    try:
                        async for piece in inner:
                            yield piece
                    finally:
                        in_flight -= 1

                response.body_iterator = release()
            return response
        except ApiError as e:
            return e.response()
        except ClientDisconnect:
            return error_response(400, "the client closed the connection", code="client_disconnect")
        finally:
            if not handed_over:
                in_flight -= 1

    def params(body: dict, chat: bool) -> Params:
        common = check_common(body, served, CHAT_FIELDS if chat else COMPLETION_FIELDS, chat=chat)
        prompts = [chat_prompt(body, served)] if chat else completion_prompts(body, served)
        default_tokens = served.limits.max_tokens if chat else 16  # OpenAI's completions default is 16
        budgets = [fit_prompt(p, served, common["max_tokens"], default_tokens, "messages" if chat else "prompt")
                   for p in prompts]
        common["max_tokens"] = min(budgets)
        return Params(prompts=prompts, **common)

    def submit(p: Params, chat: bool) -> tuple[list[EngineRequest], asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stops = list(dict.fromkeys([*p.stop, *chat_stops])) if chat else p.stop
        ends = [] if p.ignore_eos else (chat_eos if chat else eos)
        requests = []
        for i, prompt in enumerate(p.prompts):
            sampling = SamplingConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                      eos_token_ids=tuple(ends), stop=tuple(stops), seed=p.seed)

            def emit(event: Event, i: int = i) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, event))
                except RuntimeError:  # the event loop has closed (shutting down): nobody is listening
                    pass

            request = EngineRequest(prompt, sampling, emit, n=p.n, adapter=p.adapter, logit_bias=p.logit_bias,
                                    first_row=i * p.n)
            requests.append(request)
        if not served.engine.alive:
            raise ApiError(503, "the engine has stopped", kind="server_error", code="engine_down")
        for request in requests:
            served.engine.submit(request)
        return requests, events

    async def events_of(p: Params, requests, events: asyncio.Queue) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished; cancels the requests if abandoned."""
        left = len(requests) * p.n
        try:
            while left:
                i, event = await events.get()
                if event.error is not None:
                    raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
                if event.finish_reason is not None:
                    left -= 1
                yield i * p.n + event.choice, event
        finally:
            for r in requests:
                r.cancel()

    def usage(p: Params, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(x) for x in p.prompts)  # once per prompt, whatever n (as OpenAI counts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def complete(body: dict, chat: bool) -> Response:
        p = params(body, chat)
        requests, events = submit(p, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if p.stream:
            return StreamingResponse(stream(p, requests, events, rid, created, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        tokens = 0
        async for index, event in events_of(p, requests, events):
            texts.setdefault(index, []).append(event.text)
            if event.finish_reason is not None:
                finish[index] = event.finish_reason
                tokens += len(event.tokens or [])
        choices = []
        for index in sorted(finish):
            text = "".join(texts[index])
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": finish[index]})
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish[index]})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": p.model, "choices": choices,
                             "usage": usage(p, tokens), "system_fingerprint": None})

    async def stream(p: Params, requests, events, rid: str, created: int, chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, **extra) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": p.model, "choices": choices,
                    "system_fingerprint": None, **extra}
            if p.include_usage and "usage" not in extra:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        if chat:
            for index in range(len(p.prompts) * p.n):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        tokens = 0
        try:
            async for index, event in events_of(p, requests, events):
                if event.finish_reason is not None:
                    tokens += len(event.tokens or [])
                if chat:
                    if event.text:
                        yield chunk([{"index": index, "delta": {"content": event.text}, "logprobs": None,
                                      "finish_reason": None}])
                    if event.finish_reason is not None:
                        yield chunk([{"index": index, "delta": {}, "logprobs": None,
                                      "finish_reason": event.finish_reason}])
                elif event.text or event.finish_reason is not None:
                    yield chunk([{"index": index, "text": event.text, "logprobs": None,
                                  "finish_reason": event.finish_reason}])
        except ApiError as e:  # the status line has gone: report in the stream, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': None, 'code': e.code}})}\n\n"
            return
        if p.include_usage:
            yield chunk([], usage=usage(p, tokens))
        yield "data: [DONE]\n\n"

    async def completions(request: Request) -> Response:
        return await guarded(request, lambda body: complete(body, chat=False))

    async def chat_completions(request: Request) -> Response:
        return await guarded(request, lambda body: complete(body, chat=True))

    async def models(request: Request) -> Response:
        if not authorised(request):
            return error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                  kind="authentication_error", code="invalid_api_key")
        data = [{"id": name, "object": "model", "created": served.created, "owned_by": "temper",
                 **({"parent": served.base_name} if name != served.base_name else {})}
                for name in [served.base_name, *served.adapters]]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        if not served.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "running": served.engine.running(), "in_flight": in_flight})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
