"""Exporting a model for other runtimes: GGUF for llama.cpp (`gguf.py`). `temper export` is
temper/stages/export.py."""
