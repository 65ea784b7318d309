"""Train a byte-level BPE tokenizer on text files or JSONL and save it as a model directory's
tokenizer (`tokenizer.json` + `tokenizer_config.json`, loadable by `transformers.AutoTokenizer`).

    temper tokenizer data=corpus.txt vocab_size=8192 output_dir=runs/tokenizer
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from temper.config import check_range, opt
from temper.data.readers import MAX_DOCUMENT_MB, SUPPORTED_SUFFIXES, iter_texts
from temper.data.tokenizer import check_vocab_size, train_tokenizer
from temper.errors import TemperError
from temper.io import owned_output_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Config:
    data: list[str] = opt([], f"input files, directories or globs ({', '.join(SUPPORTED_SUFFIXES)})")
    output_dir: str = opt("runs/tokenizer", "where tokenizer.json and tokenizer_config.json are written")
    vocab_size: int = opt(8192, "vocabulary size, special tokens included")
    min_frequency: int = opt(2, "a pair must occur this often to be merged")
    text_field: str = opt("text", "the JSONL/parquet field that holds the text")
    text_mode: Literal["paragraph", "line", "file"] = opt("paragraph", "how .txt files split into documents")
    encoding_errors: Literal["strict", "replace"] = opt("strict", "non-UTF-8 bytes: stop with the byte offset, or replace")
    max_document_mb: int = opt(MAX_DOCUMENT_MB, "the longest line or document read from data, in MiB (a longer one "
                                                "is an error naming its file and line)")
    max_documents: int = opt(0, "train on at most this many documents (0: all)")
    model_max_length: int = opt(2048, "the context length recorded in tokenizer_config.json")
    overwrite: bool = opt(False, "replace a tokenizer written earlier in output_dir (never a model's)")

    def validate(self) -> None:
        if not self.data:
            raise TemperError("data= is required: text files, JSONL files, directories or globs")
        check_vocab_size("vocab_size", self.vocab_size)
        for key in ("min_frequency", "max_documents"):
            check_range(key, getattr(self, key), low=0)
        for key in ("model_max_length", "max_document_mb"):
            check_range(key, getattr(self, key), low=1)


def earlier_tokenizer(out: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (out / name).exists()]


def run(cfg: Config) -> dict:
    # claimed before training: never a model's directory, an input's, or another run's
    with owned_output_dir(cfg.output_dir, command="tokenizer", inputs={"data": cfg.data}, overwrite=cfg.overwrite,
                          earlier=earlier_tokenizer) as out:
        return train(cfg, out)


def summary_lines(cfg: Config, result: dict) -> list[str]:
    out = result["output_dir"]
    return [f"tokenizer: {result['vocab_size']:,} tokens (byte-level BPE) -> {out}",
            f"  next: temper pretrain tokenizer={out} data=..."]


def train(cfg: Config, out: Path) -> dict:
    texts = iter_texts(cfg.data, field=cfg.text_field, encoding_errors=cfg.encoding_errors,
                       text_mode=cfg.text_mode, max_document_mb=cfg.max_document_mb)
    if cfg.max_documents > 0:
        texts = itertools.islice(texts, cfg.max_documents)
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                model_max_length=cfg.model_max_length)
    tokenizer.save(out)
    return {"vocab_size": tokenizer.vocab_size, "output_dir": str(out)}
