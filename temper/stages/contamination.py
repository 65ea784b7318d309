"""N-gram overlap between training data and evaluation sets (`temper eval contamination`).

    temper eval contamination train=corpus.jsonl eval=test.jsonl,other.jsonl n=13

Reports, per eval file, how many rows share at least one n-gram (13 words by default) with
the training data, with examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from temper.config import opt
from temper.data.readers import SUPPORTED_SUFFIXES, iter_texts
from temper.errors import TemperError
from temper.eval.contamination import contamination_report, read_eval_set
from temper.io import atomic_write_text, claim_output_file


@dataclass
class Config:
    train: list[str] = opt([], f"training data ({'/'.join(SUPPORTED_SUFFIXES)} files, dirs, globs)")
    eval: list[str] = opt([], "evaluation files, each reported separately")
    text_field: str = opt("text", "the field of training rows that holds the text")
    eval_fields: list[str] = opt([], "fields of eval rows to check (default: every string field, and message contents)")
    n: int = opt(13, "n-gram length in words")
    output: str | None = opt(None, "also write the report as JSON here")
    overwrite: bool = opt(False, "replace an existing output file")

    def validate(self) -> None:
        if not self.train or not self.eval:
            raise TemperError("train= and eval= are required")


def run(cfg: Config) -> dict:
    if not cfg.output:
        if cfg.overwrite:
            raise TemperError("overwrite=true replaces an existing output= file: give output=")
        return report_overlap(cfg, None)
    # claimed before any work: never a device, an input, a model's file, nor another writer's
    with claim_output_file(cfg.output, key="output", inputs={"train": cfg.train, "eval": cfg.eval},
                           overwrite=cfg.overwrite) as target:
        return report_overlap(cfg, target)


def summary_lines(cfg: Config, report: dict) -> list[str]:
    lines = [f"{name}: {rep['contaminated']:,}/{rep['checked']:,} rows share a {cfg.n}-gram with the training data "
             f"({rep['fraction']:.1%}); {rep['skipped_short']:,} rows too short to check" for name, rep in report.items()]
    return lines + ([f"  -> {cfg.output}"] if cfg.output else [])


def report_overlap(cfg: Config, output: Path | None) -> dict:
    eval_sets = {str(p): read_eval_set(p, cfg.eval_fields) for p in cfg.eval}
    report = contamination_report(iter_texts(cfg.train, field=cfg.text_field), eval_sets, n=cfg.n)
    if output is not None:
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report
