"""Plot logged metrics over steps: one or more runs' metrics.jsonl as one self-contained SVG.

    temper plot runs=[runs/grpo] metrics=[reward,eval_pass_rate] output=reward.svg
    temper plot runs=[runs/a,runs/b/metrics.jsonl] names=[lr-1e-5,lr-1e-4] metrics=[loss] output=loss.svg

A run is a run's output_dir (its metrics.jsonl is read) or a metrics file. Each metric gets a
panel (x: step, y: the metric), each run a coloured line, named in the legend after its
directory (or `names=`). Rows that do not log a metric and NaN/infinite values are skipped;
a metric logged at only some rows (eval_pass_rate, eval_loss: evaluation steps) is drawn with a
marker at each point. No plotting library is needed: the SVG is written by hand
(`temper.eval.plot`), and opens in any browser or Markdown viewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from temper.config import check_range, check_utf8, opt
from temper.errors import TemperError
from temper.eval.plot import check_metrics, read_run, render_svg
from temper.io import atomic_write_text, claim_output_file


@dataclass
class Config:
    runs: list[str] = opt([], "runs to plot: output directories (their metrics.jsonl) or metrics .jsonl files")
    metrics: list[str] = opt([], "metrics to plot, one panel each, e.g. [reward,eval_pass_rate] (required; an "
                                 "unknown one lists those logged)")
    output: str = opt("plot.svg", "the SVG file to write")
    overwrite: bool = opt(False, "replace an existing output file")
    names: list[str] = opt([], "legend names, one per run (default: each run's directory name)")
    title: str = opt("", "a title above the panels")
    columns: int = opt(2, "panels per row")
    y_zero: bool = opt(False, "start every y axis at 0 (or end it there), so a change is seen against the whole "
                              "value; default: the axis spans the values")

    def validate(self) -> None:
        if not self.runs:
            raise TemperError("runs= is required: e.g. runs=[runs/grpo] (an output_dir or a metrics.jsonl file)")
        if self.names and len(self.names) != len(self.runs):
            raise TemperError(f"names= has {len(self.names)} names for {len(self.runs)} runs: give one per run")
        if not self.output:
            raise TemperError("output= is empty: name the SVG file to write")
        if not self.output.lower().endswith(".svg"):
            raise TemperError(f"output={self.output}: the plot is SVG; give a file name ending in .svg")
        check_range("columns", self.columns, low=1)
        check_utf8("title=", self.title)


def run(cfg: Config) -> dict:
    runs = [read_run(spec, cfg.names[i] if cfg.names else None) for i, spec in enumerate(cfg.runs)]
    if not cfg.names:  # two runs from directories of the same name: the legend says which is which
        for run_ in runs:
            if sum(r.name == run_.name for r in runs) > 1:
                run_.name = str(run_.path.parent if run_.path.name == "metrics.jsonl" else run_.path)
    if not cfg.metrics:
        logged = sorted(set().union(*(r.metrics() for r in runs)))
        raise TemperError(f"metrics= is required: name the metrics to plot, e.g. metrics=[{logged[0] if logged else 'loss'}]"
                          f"; logged: {', '.join(logged) or 'none'}")
    check_metrics(runs, cfg.metrics)
    svg = render_svg(runs, cfg.metrics, title=cfg.title, columns=cfg.columns, y_zero=cfg.y_zero)
    inputs = {f"runs[{i}]": str(r.path) for i, r in enumerate(runs)}
    with claim_output_file(cfg.output, key="output", inputs=inputs, overwrite=cfg.overwrite) as target:
        atomic_write_text(target, svg)
    return {"output": str(Path(cfg.output)), "metrics": list(cfg.metrics), "runs": [r.name for r in runs]}


def summary_lines(cfg: Config, result: dict) -> list[str]:
    return [f"plot: {len(result['metrics'])} panel(s) ({', '.join(result['metrics'])}) x {len(result['runs'])} run(s) "
            f"({', '.join(result['runs'])}) -> {result['output']}"]
