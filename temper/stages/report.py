"""(Re)build the report of a `temper run`: one self-contained HTML page and its PNG plots.

    temper report run_dir=runs/lifecycle-tiny

Reads the run directory (run.json, .run/<stage>.json and each stage's outputs) and writes
run_dir/report.html (inline CSS, images embedded as data URIs: open it anywhere, mail it) and
run_dir/report/*.png. A partial run (a stage interrupted or failed) gets the report of what
finished. What the page shows: docs/report.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from temper.config import opt
from temper.errors import TemperError
from temper.report import build_report


@dataclass
class Config:
    run_dir: str = opt("", "the run's output directory (runs/<pipeline name>: it holds run.json and .run/)")

    def validate(self) -> None:
        if not self.run_dir:
            raise TemperError("run_dir= is required: the output directory of a `temper run`, e.g. "
                              "run_dir=runs/lifecycle-tiny")


def run(cfg: Config) -> dict:
    return {"report": str(build_report(cfg.run_dir))}


def summary_lines(cfg: Config, result: dict) -> list[str]:
    return [f"report: {result['report']} (one self-contained page; open it in a browser)"]
