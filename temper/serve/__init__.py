"""Serving: an OpenAI-compatible HTTP API (`temper serve`) over a continuous-batching engine.

`engine` holds the batching (no HTTP dependency); `api` the Starlette app, which needs the
optional `serve` extra (starlette, uvicorn), imported only when a server is built.
"""
