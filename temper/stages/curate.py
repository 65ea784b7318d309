"""Curate raw text into a clean, deduplicated, decontaminated training corpus (`temper curate`).

    temper curate data=raw/ output_dir=runs/curated
    temper curate data=runs/world/pretrain/train.jsonl output_dir=runs/curated gopher_quality.min_doc_words=5

Reads text/JSONL/JSON/parquet/gzip (streaming), normalises it, removes exact duplicates, applies
the Gopher quality and repetition, C4 and FineWeb filters with their published thresholds,
drops documents sharing a 13-gram with decontaminate.eval files or tasks, removes near-duplicates
(MinHash + LSH, datatrove's 14 x 8), masks e-mails, phones and IPs, and writes the kept
documents to output_dir/data/part-NNNNN.jsonl, every dropped one to output_dir/rejected/RULE.jsonl
with its reason, and report.json with counts per rule (plus precision and recall against the
built-in world's planted noise labels when the input carries `meta.kind`) and its histograms as
SVG images in plots/. `mix.weights` (one per data= entry) up- or down-samples each source's kept
documents and `mix.shuffle` shuffles them; `tokenize.tokenizer=DIR` also writes them as
pretraining token shards to output_dir/tokens.

    temper curate data=[web/,books/] mix.weights=[0.5,2] mix.shuffle=true tokenize.tokenizer=runs/pretrain/tokenizer
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from temper.config import check_range, opt, to_dict
from temper.curate.decontam import DecontamConfig
from temper.curate.filters import (
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from temper.curate.pipeline import (
    WORK_DIR,
    LineDedupConfig,
    MixConfig,
    NearDedupConfig,
    TokenizeConfig,
    curate,
    describe_near_dedup,
    summary,
    write_plots,
)
from temper.curate.text import NormalizeConfig, PiiConfig
from temper.data.readers import MAX_DOCUMENT_MB, SUPPORTED_SUFFIXES
from temper.errors import TemperError, TemperFileNotFoundError
from temper.io import atomic_write_text, owned_output_dir

OUTPUTS = ("report.json", "summary.txt", "data", "rejected", "tokens", "plots")


@dataclass
class Config:
    data: list[str] = opt([], f"raw documents: {'/'.join(SUPPORTED_SUFFIXES)} files, directories, globs")
    output_dir: str = opt("runs/curated", "where data/, rejected/, report.json and summary.txt are written")
    overwrite: bool = opt(False, "replace a curation written earlier in output_dir")
    text_field: str = opt("text", "the field of JSONL/parquet rows that holds the document")
    text_mode: str = opt("paragraph", "how .txt/.md files split into documents: paragraph, line or file")
    encoding_errors: str = opt("strict", "invalid UTF-8: strict (an error naming file and byte) or replace")
    max_document_mb: int = opt(MAX_DOCUMENT_MB, "the longest line or document read, in MiB (longer: an error)")
    shard_docs: int = opt(100_000, "kept documents per output shard")
    output_format: str = opt("jsonl", "kept shards as jsonl or parquet (pyarrow; a shard is held in memory)")
    resume: bool = opt(True, "keep each finished input file's per-document results in output_dir/.work until the "
                             "run succeeds; a rerun after a failure reads them back instead of computing them")
    workers: int = opt(1, "processes for the per-document steps (normalise, filters, signatures); the output is "
                          "the same for any number (engine=ray: Ray tasks at once, and a local Ray's CPUs)")
    engine: str = opt("local", "local: this machine (workers= processes); ray: Ray Data, on a local Ray or the "
                               "cluster of ray_address (pip install 'temper[ray]'); the output is the same")
    ray_address: str = opt("", "engine=ray: the Ray cluster to join ('auto', 'ray://HOST:10001'); empty: RAY_ADDRESS "
                               "if set, else a local Ray started for this run")
    normalize: NormalizeConfig = opt(NormalizeConfig(), "Unicode normal form, whitespace, control characters")
    exact_dedup: bool = opt(True, "drop documents whose normalised text was seen before (xxh3-128)")
    gopher_repetition: GopherRepetitionConfig = opt(GopherRepetitionConfig(), "Gopher repetition rules")
    gopher_quality: GopherQualityConfig = opt(GopherQualityConfig(), "Gopher quality rules")
    c4: C4Config = opt(C4Config(), "C4 rules")
    fineweb: FineWebConfig = opt(FineWebConfig(), "FineWeb's quality rules")
    decontaminate: DecontamConfig = opt(DecontamConfig(), "drop documents sharing n-grams with eval sets")
    line_dedup: LineDedupConfig = opt(LineDedupConfig(), "drop documents made mostly of lines repeated across "
                                                          "documents (boilerplate)")
    near_dedup: NearDedupConfig = opt(NearDedupConfig(), "MinHash + LSH near-duplicate removal")
    pii: PiiConfig = opt(PiiConfig(), "mask e-mail addresses, phone numbers, IP addresses")
    mix: MixConfig = opt(MixConfig(), "weights per source (data= entry) and shuffling of the written documents")
    tokenize: TokenizeConfig = opt(TokenizeConfig(), "also tokenise the written documents into pretraining shards")

    def validate(self) -> None:
        if not self.data:
            raise TemperError("data= is required (files, directories or globs of raw documents)")
        if self.text_mode not in ("paragraph", "line", "file"):
            raise TemperError(f"text_mode must be paragraph, line or file; got {self.text_mode!r}")
        if self.encoding_errors not in ("strict", "replace"):
            raise TemperError(f"encoding_errors must be strict or replace; got {self.encoding_errors!r}")
        check_range("shard_docs", self.shard_docs, low=1)
        if self.output_format not in ("jsonl", "parquet"):
            raise TemperError(f"output_format must be jsonl or parquet; got {self.output_format!r}")
        check_range("workers", self.workers, low=1)
        if self.engine not in ("local", "ray"):
            raise TemperError(f"engine must be local or ray; got {self.engine!r}")
        if self.ray_address and self.engine != "ray":
            raise TemperError("ray_address is used only with engine=ray")
        check_range("max_document_mb", self.max_document_mb, low=1)
        check_range("decontaminate.n", self.decontaminate.n, low=1)
        check_range("line_dedup.min_docs", self.line_dedup.min_docs, low=2)
        check_range("line_dedup.max_fraction", self.line_dedup.max_fraction, low=0, high=1)
        self.normalize.validate()
        self.near_dedup.validate()
        if self.mix.weights and len(self.mix.weights) != len(self.data):
            raise TemperError(f"mix.weights has {len(self.mix.weights)} value(s) but data= names {len(self.data)} "
                              "source(s); expected one weight per data= entry, in the same order")
        for k, w in enumerate(self.mix.weights):
            check_range(f"mix.weights[{k}]", w, low=0)
        if self.tokenize.tokenizer:
            if not (Path(self.tokenize.tokenizer) / "tokenizer.json").is_file():
                raise TemperFileNotFoundError(f"tokenize.tokenizer: {self.tokenize.tokenizer} holds no tokenizer.json; "
                                              "expected a tokenizer directory (a model's, or a `temper pretrain` "
                                              "output_dir/tokenizer)")
            check_range("tokenize.val_fraction", self.tokenize.val_fraction, low=0, high=0.5)
            check_range("tokenize.shard_tokens", self.tokenize.shard_tokens, low=1)


def earlier_curation(out: Path) -> list[str]:
    return [name for name in OUTPUTS if (out / name).exists()]


def run(cfg: Config) -> dict:
    cfg.validate()
    with owned_output_dir(cfg.output_dir, command="curate", inputs={"data": cfg.data}, overwrite=cfg.overwrite,
                          earlier=earlier_curation) as out:
        if cfg.overwrite:
            _remove_earlier(out)
        try:
            report = curate(cfg, out)
        except BaseException:
            _remove_earlier(out)  # this run's own folders (an earlier run's were refused or removed above)
            raise
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)  # the run succeeded: nothing to resume
        report["config"] = to_dict(cfg)
        report["plots"] = write_plots(report, out / "plots")
        text = summary(report)
        atomic_write_text(out / "summary.txt", text + "\n")
        atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def summary_lines(cfg: Config, report: dict) -> list[str]:
    out = Path(cfg.output_dir)
    near = [f"  {describe_near_dedup(cfg.near_dedup)}"] if cfg.near_dedup.enabled else []
    return ["curate: " + summary(report), *near, f"  report -> {out / 'report.json'} (dropped documents with their rule: "
                                          f"{out / 'rejected'}/)", f"  next: temper pretrain data={out / 'data'}"]


def _remove_earlier(out: Path) -> None:
    """overwrite=true: an earlier run's outputs go first, so no stale shard or report stays beside new ones
    (nor alone, if this run fails)."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
