"""Sentence embeddings for retrieval: `temper embed model=DIR data=FILE output=FILE`.

    temper embed model=runs/encoder data=sentences.jsonl output=vectors.jsonl   # {"text", "embedding"} rows
    temper embed model=runs/encoder data=sentences.txt output=vectors.npy       # one (N, H) float32 array

Each row's `text` (a .txt file: one text per line) is encoded as `[CLS] text [SEP]` (cut to
`seq_len` tokens) by the encoder in `model=` (any bert-family directory) and pooled as the
directory says (sentence-transformers' `1_Pooling/config.json`, which `temper pretrain
objective=contrastive` writes; else `pooling=`): the mean of the last hidden states over the
real tokens, or the [CLS] position's. `SentenceTransformer(DIR).encode(texts)` gives the same
numbers. `normalize=true` scales each vector to unit length (cosine = dot product).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from temper.config import check_range, opt
from temper.data.encoder import EncoderVocab, frame, pad_examples
from temper.data.readers import iter_records, json_type
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.io import atomic_writer, claim_output_file
from temper.losses.encoder import cls_pool, mean_pool
from temper.models import load_model, registry
from temper.runtime import resolve_device


@dataclass
class Config:
    model: str = opt("", "the encoder directory (bert family; its 1_Pooling/config.json chooses the pooling)")
    data: list[str] = opt([], "texts: JSONL/JSON/parquet rows with the text column, or .txt (one per line)")
    output: str = opt("", "where the embeddings go: a .jsonl file ({text, embedding} rows) or a .npy array")
    overwrite: bool = opt(False, "replace an existing output file")
    column: str = opt("text", "the column that holds each text")
    pooling: Literal["auto", "mean", "cls"] = opt("auto", "auto: the directory's (sentence-transformers' "
                                                          "1_Pooling/config.json), else mean")
    normalize: bool = opt(False, "scale each embedding to unit length")
    seq_len: int = opt(0, "cut each text to this many tokens, [CLS] and [SEP] included (0: the directory's "
                          "sentence_bert_config.json max_seq_length, else the model's context)")
    batch_size: int = opt(64, "texts encoded together")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: an encoder directory (temper pretrain objective=...)")
        if not self.data:
            raise TemperError("data= is required: the texts to embed")
        if not self.output:
            raise TemperError("output= is required: a .jsonl or .npy file")
        if Path(self.output).suffix not in (".jsonl", ".npy"):
            raise TemperError(f"output={self.output}: the file must end in .jsonl or .npy")
        check_range("batch_size", self.batch_size, low=1)
        check_range("seq_len", self.seq_len, low=0)


def directory_pooling(model_dir: Path) -> str | None:
    """The pooling sentence-transformers' files in `model_dir` name (mean or cls), or None."""
    path = model_dir / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    pooling = json.loads(path.read_text(encoding="utf-8"))
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    raise TemperError(f"{path}: only mean or cls pooling is supported (pooling_mode_mean_tokens or "
                      "pooling_mode_cls_token)")


def read_texts(spec, column: str) -> list[tuple[str, str]]:
    """(source, text) of every row; a row without a string in `column` is an error naming it."""
    out = []
    for rec in iter_records(spec, text_mode="line"):
        value = rec.data.get(column)
        if not isinstance(value, str):
            what = "missing" if column not in rec.data else json_type(value)
            raise TemperError(f"{rec.source}: column '{column}' is {what} (expected the text to embed)")
        out.append((rec.source, value))
    if not out:
        raise TemperError(f"{spec}: no texts to embed")
    return out


@torch.no_grad()
def embed_texts(model, tokenizer: Tokenizer, texts: list[str], *, pooling: str, seq_len: int, batch_size: int,
                normalize: bool = False, device="cpu") -> np.ndarray:
    """(N, H) float32 sentence embeddings of `texts` (module docstring)."""
    vocab = EncoderVocab.from_tokenizer(tokenizer)
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = [frame(vocab, (list(e.ids), [0] * len(e.ids)), max_len=seq_len) for e in
                 tokenizer.backend.encode_batch(texts[i:i + batch_size], add_special_tokens=False)]
        padded = pad_examples(chunk, vocab.pad_id)
        ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        hidden = model(ids, attention_mask=mask, with_head=False).hidden.float()
        z = mean_pool(hidden, mask) if pooling == "mean" else cls_pool(hidden)
        if normalize:
            z = torch.nn.functional.normalize(z, dim=-1)
        out.append(z.cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def run(cfg: Config) -> dict:
    cfg.validate()
    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise TemperError(f"model={cfg.model}: not a model directory (no config.json)")
    device = resolve_device(cfg.device)
    model = load_model(model_dir, device=device, dtype=torch.float32)
    family = registry.family(model.config.family)
    if family.causal_lm:
        raise TemperError(f"model={cfg.model} is a {family.description} decoder ({model.config.hf_architecture}): "
                          "temper embed reads an encoder (temper pretrain objective=contrastive writes one)")
    tokenizer = Tokenizer.from_dir(model_dir)
    pooling = cfg.pooling if cfg.pooling != "auto" else (directory_pooling(model_dir) or "mean")
    seq_len = cfg.seq_len
    st_config = model_dir / "sentence_bert_config.json"
    if seq_len == 0 and st_config.is_file():
        seq_len = int(json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length") or 0)
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    rows = read_texts(cfg.data, cfg.column)
    texts = [t for _, t in rows]
    vectors = embed_texts(model, tokenizer, texts, pooling=pooling, seq_len=seq_len, batch_size=cfg.batch_size,
                          normalize=cfg.normalize, device=device)
    with claim_output_file(cfg.output, key="output", inputs={"model": cfg.model, "data": cfg.data},
                           overwrite=cfg.overwrite) as target:
        if target.suffix == ".npy":
            with atomic_writer(target, "wb") as fh:
                np.save(fh, vectors)
        else:
            with atomic_writer(target) as fh:
                for text, vector in zip(texts, vectors):
                    fh.write(json.dumps({"text": text, "embedding": [float(x) for x in vector]}) + "\n")
    summary = {"texts": len(texts), "dimension": int(vectors.shape[1]), "pooling": pooling, "seq_len": seq_len,
               "output": str(cfg.output)}
    return summary


def summary_lines(cfg: Config, summary: dict) -> list[str]:
    return [f"embed: {summary['texts']:,} texts -> {summary['output']} ({summary['dimension']} dimensions, "
            f"{summary['pooling']} pooling, up to {summary['seq_len']} tokens each)"]
