"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching.

    temper serve model=runs/sft
    temper serve model=runs/base adapters=tuned=runs/lora,terse=runs/lora2 port=8000 api_key=secret

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's
chat template, or `template=`), GET /health. Any OpenAI client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}])

The base answers to `name=` (default: the model directory's name), each adapter to its own
name. Binds 127.0.0.1 unless `host=` says otherwise. Limits on body size, prompt tokens,
max_tokens, n and requests in flight are answered with 4xx errors in OpenAI's shape.
Needs the `serve` extra: pip install 'temper[serve]'. See docs/serving.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from temper.config import check_range, check_utf8, opt
from temper.data.chat import chat_template_for, render, render_kwargs
from temper.data.tokenizer import tokenizer_difference
from temper.errors import TemperError, TemperFileNotFoundError
from temper.loading import check_lora_config, load_for_inference
from temper.peft import LORA_FAMILY, adapter_method, load_peft, read_adapter_config
from temper.peft.lora import disable_adapters, set_adapter
from temper.runtime import resolve_device


@dataclass
class Config:
    model: str = opt("", "model directory (Hugging Face format: config.json, model.safetensors, tokenizer.json)")
    name: str | None = opt(None, "the name clients ask for the base model by (default: the directory's name)")
    adapters: list[str] = opt([], "LoRA/DoRA adapters served on the base, as NAME=DIR (comma-separated)")
    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    port: int = opt(8000, "port to listen on")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1 requests (default: the "
                                    "TEMPER_API_KEY environment variable, which other users cannot read in ps)")
    template: str | None = opt(None, "chat template: chatml, llama3, plain, a .jinja file, or the model's (default)")
    max_batch: int = opt(16, "the most sequences decoded together (continuous batching); 1: one at a time")
    max_concurrent: int = opt(64, "requests in flight (waiting or generating); more are answered 429")
    max_tokens: int = opt(512, "the most new tokens a request may ask for per choice")
    max_prompt_tokens: int = opt(0, "the longest prompt in tokens (0: the model's context less one)")
    max_n: int = opt(8, "the most choices (n) per request (at most max_batch: a request's choices decode together)")
    max_body_bytes: int = opt(1 << 20, "the largest request body in bytes")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16")
    log_level: str = opt("info", "uvicorn's log level: critical, error, warning, info, debug")

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: a model directory")
        check_range("port", self.port, low=0, high=65535)
        for key in ("max_batch", "max_concurrent", "max_tokens", "max_n", "max_body_bytes"):
            check_range(key, getattr(self, key), low=1)
        check_range("max_prompt_tokens", self.max_prompt_tokens, low=0)
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise TemperError(f"log_level={self.log_level!r}: expected critical, error, warning, info or debug")
        check_utf8("api_key=", self.api_key)
        if self.api_key is not None and not self.api_key.strip():
            raise TemperError("api_key= is empty: give a key, or leave api_key out")
        parse_adapters(self.adapters)


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """NAME=DIR entries -> {name: directory}; one line for a malformed or repeated entry."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise TemperError(f"adapters= entry {spec!r}: expected NAME=DIR")
        if name in out:
            raise TemperError(f"adapters= names {name!r} twice")
        out[name] = Path(path).expanduser()
    return out


def load_adapters(model, base_dir: Path, adapters: dict[str, Path]) -> None:
    """Put each LoRA/DoRA adapter on the base under its serving name, checked to fit it."""
    for name, path in adapters.items():
        if not path.is_dir():
            raise TemperFileNotFoundError(f"adapters= {name}: directory not found: {path}")
        conf = read_adapter_config(path)
        check_lora_config(path, conf)
        method = adapter_method(path, conf)
        if method not in LORA_FAMILY or method == "qlora":
            raise TemperError(f"{path}: a {method} adapter cannot share a base with others here (serve takes LoRA "
                              "and DoRA adapters); merge it (temper merge) and serve the merged model")
        if conf.get("modules_to_save"):
            raise TemperError(f"{path}: the adapter trains whole modules ({', '.join(conf['modules_to_save'])}), "
                              "which other adapters would share; merge it (temper merge) and serve that")
        if (path / "tokenizer.json").is_file() and (base_dir / "tokenizer.json").is_file():
            difference = tokenizer_difference(path / "tokenizer.json", base_dir / "tokenizer.json",
                                              ("the adapter's", "the base's"))
            if difference:
                raise TemperError(f"{path}/tokenizer.json differs from the base's: {difference}")
        load_peft(model, path, adapter_name=name, quantize=False)


def adapter_switch(model, names: list[str]):
    """The engine's `use_adapter`: the base (adapters disabled) for None, else that adapter active."""
    if not names:
        return lambda name: contextlib.nullcontext()

    def use(name: str | None):
        if name is None:
            return disable_adapters(model)
        set_adapter(model, name)
        return contextlib.nullcontext()

    return use


def build(cfg: Config):
    """(the app, its engine) for `cfg`: the model loaded, adapters on, engine started."""
    from temper.serve.api import Limits, ServedModel, build_app
    from temper.serve.engine import Engine

    device = resolve_device(cfg.device)
    base_dir = Path(cfg.model).expanduser()
    if (base_dir / "adapter_config.json").is_file() and not (base_dir / "config.json").is_file():
        raise TemperError(f"model={base_dir} is an adapter: pass its base as model= and the adapter as "
                          f"adapters=NAME={base_dir}")
    adapters = parse_adapters(cfg.adapters)
    base_name = cfg.name or base_dir.resolve().name
    if base_name in adapters:
        raise TemperError(f"adapters= name {base_name!r} is the base's name; pick another (or name=)")
    model, tokenizer = load_for_inference(base_dir, device=device, dtype=cfg.dtype)
    load_adapters(model, base_dir, adapters)
    model.eval()
    template = None
    try:
        template = chat_template_for(base_dir, tokenizer, cfg.template)
        render(template, [{"role": "user", "content": "hi"}], add_generation_prompt=True, **render_kwargs(tokenizer))
    except TemperError as e:
        if cfg.template:  # asked for by name: it must work
            raise
        print(f"note: /v1/chat/completions is off ({e})", file=sys.stderr)
        template = None
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch,
                    use_adapter=adapter_switch(model, list(adapters))).start()
    limits = Limits(max_body_bytes=cfg.max_body_bytes, max_prompt_tokens=cfg.max_prompt_tokens,
                    max_tokens=cfg.max_tokens, max_n=min(cfg.max_n, cfg.max_batch), max_concurrent=cfg.max_concurrent)
    api_key = cfg.api_key or os.environ.get("TEMPER_API_KEY") or None
    served = ServedModel(engine, tokenizer, base_name, list(adapters), template, model.config.max_seq_len,
                         api_key, limits)
    return build_app(served), engine


def run(cfg: Config) -> None:
    try:
        import uvicorn
    except ImportError:
        raise TemperError("temper serve needs uvicorn and starlette: pip install 'temper[serve]'") from None
    app, engine = build(cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        keyed = cfg.api_key or os.environ.get("TEMPER_API_KEY")
        print(f"note: serving on {cfg.host}, reachable from other machines{'' if keyed else ' without an api_key'}",
              file=sys.stderr)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_keep_alive=5)
    finally:
        engine.stop()
