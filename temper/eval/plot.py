"""Line charts of logged metrics as self-contained SVG, drawn by hand (no plotting library).

`read_run` reads one run's `metrics.jsonl` (a run directory, or the file itself); `series` takes
one metric's (step, value) points from its rows, skipping rows that do not log it and values that
are not finite numbers; `render_svg` draws one panel per metric, one coloured line per run, a
legend of the runs, and axes with round tick values. A metric logged at fewer of a run's rows
than its most often logged metric (an evaluation's `eval_pass_rate`, say), or named eval*, is
drawn with a marker at each point as well, so that a line between two evaluations is not
mistaken for measurements in between.

The SVG carries what a test (or a script) needs to read it back: each panel is a
`<g class="panel" data-metric="...">`, each line a `<polyline class="series" data-run="...">`
whose points are the logged values in step order, each legend entry a `<text class="legend">`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from temper.errors import TemperError

METRICS_FILE = "metrics.jsonl"
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")  # matplotlib's tab10: distinguishable, and familiar
PANEL_W, PANEL_H = 440, 280
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 30, 40
LEGEND_ROW = 20
FONT = "font-family=\"Helvetica, Arial, sans-serif\""


@dataclass
class Run:
    name: str
    path: Path | None  # the metrics file
    rows: list[dict] = field(default_factory=list)

    def metrics(self) -> set[str]:
        """The metrics this run logged as numbers (NaN included; `step` is the x axis, not a metric)."""
        return {k for row in self.rows for k, v in row.items() if k != "step" and _is_number(v)}

    def logged_rows(self, metric: str) -> int:
        return sum(1 for row in self.rows if metric in row)

    def most_logged(self) -> int:
        """The rows of the most often logged metric: fewer means logged at some steps only (evaluations)."""
        return max((self.logged_rows(m) for m in self.metrics()), default=0)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics_path(spec: str | Path) -> Path:
    """A run directory's metrics file, or the file given."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / METRICS_FILE
        if not path.is_file():
            raise TemperError(f"runs=[{spec}]: the directory holds no {METRICS_FILE}; expected a run's output_dir "
                              f"or a metrics .jsonl file")
        return path
    if not path.exists():
        raise TemperError(f"runs=[{spec}]: no such file or directory; expected a run's output_dir or its "
                          f"{METRICS_FILE}")
    if not path.is_file():
        raise TemperError(f"runs=[{spec}] is not a regular file; expected a run's output_dir or its {METRICS_FILE}")
    return path


def read_run(spec: str | Path, name: str | None = None) -> Run:
    """One run's logged rows (JSON objects, one a line; blank lines and a running run's unfinished last
    line skipped), named `name` or after its directory."""
    path = metrics_path(spec)
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemperError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected JSON lines") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break  # a row being written by a running run: plotted next time
            raise TemperError(f"{path}:{number}: not JSON ({e.msg}); expected one metrics object per line") from None
        if not isinstance(row, dict):
            raise TemperError(f"{path}:{number}: a {type(row).__name__}, not a JSON object of metrics")
        if not _is_number(row.get("step")):
            raise TemperError(f"{path}:{number}: no numeric 'step'; expected rows like {{\"step\": 10, ...}}")
        rows.append(row)
    if not rows:
        raise TemperError(f"{path}: no rows logged yet; nothing to plot")
    if name is None:
        name = path.parent.name if path.name == METRICS_FILE else path.stem
    return Run(name or str(path), path, rows)


def series(run: Run, metric: str) -> list[tuple[float, float]]:
    """`metric`'s (step, value) points in step order; rows without it and NaN/inf values skipped."""
    points = [(float(r["step"]), float(r[metric])) for r in run.rows if _is_number(r.get(metric))]
    return sorted((p for p in points if math.isfinite(p[1])), key=lambda p: p[0])


def check_metrics(runs: list[Run], metrics: list[str]) -> None:
    """Every metric logged by some run, else one line naming it and what the runs do log."""
    logged = set().union(*(r.metrics() for r in runs))
    for metric in metrics:
        if metric not in logged:
            where = ", ".join(str(r.path) for r in runs)
            raise TemperError(f"metrics=[{metric}]: no run logs '{metric}' ({where}); logged metrics: "
                              f"{', '.join(sorted(logged)) or 'none'}")


# ----------------------------------------------------------------------------- axes


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("tick range must be finite")
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_label(value: float, ticks: list[float]) -> str:
    """A tick's number with as many decimals as the ticks' spacing needs (scientific when tiny or huge)."""
    if value == 0:
        return "0"
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value)
    biggest = max(abs(t) for t in ticks)
    if biggest >= 1e6 or step < 1e-4:
        return f"{value:.3g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if step * 10 ** decimals % 1 > 1e-6:  # 2.5 x 10^k needs one more decimal
        decimals += 1
    return f"{value:.{decimals}f}"


# ----------------------------------------------------------------------------- drawing


def _panel(metric: str, lines: list[tuple[int, str, list[tuple[float, float]], bool]], x0: float, y0: float,
           steps: tuple[float, float], y_zero: bool = False) -> list[str]:
    """One panel's SVG elements: frame, ticks, grid, one polyline (and markers) per run."""
    left, top = x0 + MARGIN_L, y0 + MARGIN_T
    width, height = PANEL_W - MARGIN_L - MARGIN_R, PANEL_H - MARGIN_T - MARGIN_B
    out = [f'<g class="panel" data-metric={quoteattr(metric)}>',
           f'<text x="{x0 + PANEL_W / 2:.1f}" y="{y0 + 18:.1f}" text-anchor="middle" font-size="14" '
           f'font-weight="bold" {FONT}>{escape(metric)}</text>',
           f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{height:.1f}" fill="none" '
           f'stroke="#444" stroke-width="1"/>']
    values = [v for _, _, points, _ in lines for _, v in points]
    if not values:
        out.append(f'<text x="{left + width / 2:.1f}" y="{top + height / 2:.1f}" text-anchor="middle" '
                   f'font-size="12" fill="#888" {FONT}>no finite values</text></g>')
        return out
    if y_zero:  # the axis from 0: a change looks as large as it is against the whole value
        values.append(0.0)
    xt, yt = nice_ticks(*steps, count=6), nice_ticks(min(values), max(values), count=5)
    x_lo, x_hi, y_lo, y_hi = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * width

    def py(y: float) -> float:
        return top + height - (y - y_lo) / (y_hi - y_lo) * height

    for t in xt:
        out.append(f'<line x1="{px(t):.1f}" y1="{top:.1f}" x2="{px(t):.1f}" y2="{top + height + 4:.1f}" '
                   f'stroke="#e4e4e4" stroke-width="1"/>')
        out.append(f'<text class="xtick" x="{px(t):.1f}" y="{top + height + 17:.1f}" text-anchor="middle" '
                   f'font-size="11" {FONT}>{tick_label(t, xt)}</text>')
    for t in yt:
        out.append(f'<line x1="{left - 4:.1f}" y1="{py(t):.1f}" x2="{left + width:.1f}" y2="{py(t):.1f}" '
                   f'stroke="#e4e4e4" stroke-width="1"/>')
        out.append(f'<text class="ytick" x="{left - 7:.1f}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="11" '
                   f'{FONT}>{tick_label(t, yt)}</text>')
    out.append(f'<text x="{left + width / 2:.1f}" y="{top + height + 33:.1f}" text-anchor="middle" font-size="11" '
               f'fill="#444" {FONT}>step</text>')
    for colour_index, run_name, points, markers in lines:
        if not points:
            continue
        colour = COLOURS[colour_index % len(COLOURS)]
        coords = " ".join(f"{px(x):.2f},{py(y):.2f}" for x, y in points)
        out.append(f'<polyline class="series" data-run={quoteattr(run_name)} points="{coords}" fill="none" '
                   f'stroke="{colour}" stroke-width="1.8" stroke-linejoin="round"/>')
        if markers or len(points) == 1:
            for x, y in points:
                out.append(f'<circle class="marker" data-run={quoteattr(run_name)} cx="{px(x):.2f}" cy="{py(y):.2f}" '
                           f'r="3.2" fill="{colour}"><title>{escape(run_name)}: step {x:g}, {y:.6g}</title></circle>')
    out.append("</g>")
    return out


def render_svg(runs: list[Run], metrics: list[str], *, title: str = "", columns: int = 2,
               y_zero: bool = False) -> str:
    """One panel per metric (in `columns` columns), one line per run, a legend of the runs on top;
    `y_zero`: every y axis includes 0 (else it spans the values)."""
    if not runs or not metrics:
        raise ValueError("render_svg needs at least one run and one metric")
    check_metrics(runs, metrics)
    columns = max(1, min(columns, len(metrics)))
    rows = math.ceil(len(metrics) / columns)
    legend_cols = max(1, (PANEL_W * columns - 20) // 220)
    legend_h = LEGEND_ROW * math.ceil(len(runs) / legend_cols) + 8
    head = (28 if title else 6) + legend_h
    width, height = PANEL_W * columns, head + PANEL_H * rows
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="16" font-weight="bold" '
                   f'{FONT}>{escape(title)}</text>')
    legend_top = (28 if title else 6)
    for i, run in enumerate(runs):
        lx = 14 + (i % legend_cols) * 220
        ly = legend_top + (i // legend_cols) * LEGEND_ROW + 12
        colour = COLOURS[i % len(COLOURS)]
        out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 22}" y2="{ly - 4}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text class="legend" data-run={quoteattr(run.name)} x="{lx + 28}" y="{ly}" font-size="12" '
                   f'{FONT}>{escape(run.name)}</text>')
    for k, metric in enumerate(metrics):
        lines, steps = [], []
        for i, run in enumerate(runs):
            points = series(run, metric)
            sparse = 0 < run.logged_rows(metric) < run.most_logged() or metric.startswith("eval")
            lines.append((i, run.name, points, sparse))
            steps += [x for x, _ in points]
        if not steps:  # no finite value anywhere: the frame over the runs' steps
            steps = [float(r["step"]) for run in runs for r in run.rows]
        x0, y0 = PANEL_W * (k % columns), head + PANEL_H * (k // columns)
        out += _panel(metric, lines, x0, y0, (min(steps), max(steps)), y_zero)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render_bars_svg(title: str, labels: list[str], bars: dict[str, list[float]], *, x_label: str = "",
                    y_label: str = "documents") -> str:
    """A histogram or bar chart as SVG: one group per label, one coloured bar per series in it, a legend
    of the series. Each bar is a `<rect class="bar" data-series="..." data-label="..." data-value="...">`,
    so a test (or a script) can read the counts back."""
    if not labels or not bars:
        raise ValueError("render_bars_svg needs at least one label and one series")
    for name, values in bars.items():
        if len(values) != len(labels):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(labels)} labels")
    group_w = max(24.0, min(64.0, 800 / len(labels)))
    width = MARGIN_L + MARGIN_R + group_w * len(labels)
    legend_h = LEGEND_ROW * len(bars) + 4
    top, height = 28 + legend_h, PANEL_H - MARGIN_T - MARGIN_B
    total_h = top + height + MARGIN_B + 30
    yt = nice_ticks(0.0, max([v for values in bars.values() for v in values] + [1.0]), count=5)
    y_hi = yt[-1]

    def py(y: float) -> float:
        return top + height - y / y_hi * height

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{total_h:.0f}" '
           f'viewBox="0 0 {width:.0f} {total_h:.0f}">', f'<rect width="{width:.0f}" height="{total_h:.0f}" fill="white"/>',
           f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="15" font-weight="bold" '
           f'{FONT}>{escape(title)}</text>']
    for i, name in enumerate(bars):
        ly = 28 + i * LEGEND_ROW + 12
        out.append(f'<rect x="14" y="{ly - 10}" width="14" height="12" fill="{COLOURS[i % len(COLOURS)]}"/>')
        out.append(f'<text class="legend" data-series={quoteattr(name)} x="34" y="{ly}" font-size="12" '
                   f'{FONT}>{escape(name)}</text>')
    for t in yt:
        out.append(f'<line x1="{MARGIN_L - 4}" y1="{py(t):.1f}" x2="{width - MARGIN_R:.1f}" y2="{py(t):.1f}" '
                   f'stroke="#e4e4e4" stroke-width="1"/>')
        out.append(f'<text class="ytick" x="{MARGIN_L - 7}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="11" '
                   f'{FONT}>{tick_label(t, yt)}</text>')
    bar_w = (group_w - 6) / len(bars)
    for k, label in enumerate(labels):
        gx = MARGIN_L + k * group_w + 3
        for i, (name, values) in enumerate(bars.items()):
            v = values[k]
            out.append(f'<rect class="bar" data-series={quoteattr(name)} data-label={quoteattr(label)} '
                       f'data-value="{v:g}" x="{gx + i * bar_w:.1f}" y="{py(v):.1f}" width="{bar_w:.1f}" '
                       f'height="{top + height - py(v):.1f}" fill="{COLOURS[i % len(COLOURS)]}">'
                       f'<title>{escape(name)}, {escape(label)}: {v:g}</title></rect>')
        out.append(f'<text class="xtick" x="{gx + (group_w - 6) / 2:.1f}" y="{top + height + 14:.1f}" '
                   f'text-anchor="end" font-size="10" transform="rotate(-35 {gx + (group_w - 6) / 2:.1f} '
                   f'{top + height + 14:.1f})" {FONT}>{escape(label)}</text>')
    out.append(f'<rect x="{MARGIN_L}" y="{top:.1f}" width="{width - MARGIN_L - MARGIN_R:.1f}" height="{height:.1f}" '
               f'fill="none" stroke="#444" stroke-width="1"/>')
    if x_label:
        out.append(f'<text x="{(MARGIN_L + width - MARGIN_R) / 2:.1f}" y="{total_h - 6:.1f}" text-anchor="middle" '
                   f'font-size="11" fill="#444" {FONT}>{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{top + height / 2:.1f}" text-anchor="middle" font-size="11" fill="#444" '
               f'transform="rotate(-90 14 {top + height / 2:.1f})" {FONT}>{escape(y_label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
