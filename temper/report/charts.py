"""Charts as PNG (`temper.report.png`): a line chart (several series, a legend, round axis ticks, an
optional log-scale y axis, evaluation points marked), a horizontal bar chart (a curation funnel)
and a scatter of labelled points (perplexity against size).

Each function returns a `Chart`: the canvas plus the data-to-pixel mapping it was drawn with
(`x_px`, `y_px`), so that a test can look up the pixel where a value must be. Axis ticks are
`temper.eval.plot.nice_ticks` (1, 2, 2.5 or 5 times a power of ten), the same as `temper plot`'s SVG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from temper.eval.plot import COLOURS, nice_ticks, tick_label
from temper.report.png import BLACK, Canvas, Colour

PALETTE: tuple[Colour, ...] = tuple((int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)) for c in COLOURS)
GRID: Colour = (225, 225, 225)
AXIS: Colour = (90, 90, 90)
TEXT_SCALE = 2  # font pixels are 2x2: 12 px per character, legible at 100% zoom
SMALL = 1
LEFT, RIGHT, TOP, BOTTOM = 96, 24, 60, 52


@dataclass
class Series:
    """One line: `points` are (x, y); points whose y is not finite (or not positive, on a log axis)
    are skipped. `markers`: a marker at each point (evaluations: measured only there)."""

    name: str
    points: Sequence[tuple[float, float]]
    markers: bool = False


@dataclass
class Chart:
    canvas: Canvas
    x_px: Callable[[float], float]
    y_px: Callable[[float], float]
    colours: dict[str, Colour] = field(default_factory=dict)  # legend: series or bar name -> colour
    x_ticks: list[float] = field(default_factory=list)
    y_ticks: list[float] = field(default_factory=list)

    def png(self) -> bytes:
        return self.canvas.png()


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _log_ticks(low: float, high: float) -> list[float]:
    """Powers of ten covering [low, high] (with 2 and 5 between them when that spans under two decades)."""
    first, last = math.floor(math.log10(low) + 1e-9), math.ceil(math.log10(high) - 1e-9)
    if last == first:
        last += 1
    if last - first >= 2:
        return [10.0 ** k for k in range(first, last + 1)]
    ticks = [m * 10.0 ** k for k in range(first, last + 1) for m in (1, 2, 5)]
    lo = max(t for t in ticks if t <= low * (1 + 1e-9))
    hi = min(t for t in ticks if t >= high * (1 - 1e-9))
    return [t for t in ticks if lo <= t <= hi]


def _frame(canvas: Canvas, title: str, x_label: str, y_label: str) -> tuple[float, float, float, float]:
    """Title and axis labels; the plot area's (left, top, right, bottom) in pixels."""
    w, h = canvas.width, canvas.height
    if title:
        canvas.text(w / 2, 8, title, BLACK, TEXT_SCALE, anchor="centre")
    if x_label:
        canvas.text((LEFT + w - RIGHT) / 2, h - 22, x_label, AXIS, TEXT_SCALE, anchor="centre")
    if y_label:
        canvas.text(6, (TOP + h - BOTTOM) / 2, y_label, AXIS, TEXT_SCALE, anchor="centre", vertical=True)
    return LEFT, TOP, w - RIGHT, h - BOTTOM


def _axes(canvas: Canvas, box, x_ticks: list[float], y_ticks: list[float], x_px, y_px, *, x_names=None,
          y_names=None) -> None:
    left, top, right, bottom = box
    for t in y_ticks:
        y = y_px(t)
        canvas.line([(left, y), (right, y)], GRID, 1)
        label = y_names(t) if y_names else tick_label(t, y_ticks)
        canvas.text(left - 6, y - 4, label, AXIS, SMALL, anchor="right")
    for t in x_ticks:
        x = x_px(t)
        canvas.line([(x, bottom), (x, bottom + 4)], AXIS, 1)
        label = x_names(t) if x_names else tick_label(t, x_ticks)
        canvas.text(x, bottom + 7, label, AXIS, SMALL, anchor="centre")
    canvas.line([(left, top), (left, bottom), (right, bottom)], AXIS, 1)


def _legend(canvas: Canvas, names: list[str], colours: list[Colour]) -> None:
    """One row under the title: a swatch and the name of each entry, wrapped to the canvas width."""
    x, y = LEFT, 34
    for name, colour in zip(names, colours):
        w = 18 + Canvas.text_size(name, SMALL)[0] + 14
        if x + w > canvas.width - RIGHT and x > LEFT:
            x, y = LEFT, y + 12
        canvas.line([(x, y + 4), (x + 14, y + 4)], colour, 3)
        canvas.text(x + 18, y, name, BLACK, SMALL)
        x += w


def _linear(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    span = hi - lo or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def line_chart(series: Sequence[Series], *, title: str = "", x_label: str = "step", y_label: str = "",
               log_y: bool = False, width: int = 560, height: int = 340) -> Chart:
    """Every series as a coloured line (the palette in order), named in the legend."""
    keep = [(s, [(float(x), float(y)) for x, y in s.points if _finite(x) and _finite(y) and (y > 0 or not log_y)])
            for s in series]
    keep = [(s, pts) for s, pts in keep if pts]
    canvas = Canvas(width, height)
    box = left, top, right, bottom = _frame(canvas, title, x_label, y_label)
    if not keep:
        canvas.text((left + right) / 2, (top + bottom) / 2, "no data", AXIS, TEXT_SCALE, anchor="centre")
        return Chart(canvas, lambda v: left, lambda v: bottom)
    xs = [x for _, pts in keep for x, _ in pts]
    ys = [y for _, pts in keep for _, y in pts]
    x_ticks = nice_ticks(min(xs), max(xs), count=6)
    if log_y:
        y_ticks = _log_ticks(min(ys), max(ys))
        lo, hi = math.log10(y_ticks[0]), math.log10(y_ticks[-1])
        to_y = _linear(lo, hi, bottom, top)

        def y_px(v: float) -> float:
            return to_y(math.log10(v))
    else:
        y_ticks = nice_ticks(min(ys), max(ys), count=5)
        y_px = _linear(y_ticks[0], y_ticks[-1], bottom, top)
    x_px = _linear(x_ticks[0], x_ticks[-1], left, right)
    _axes(canvas, box, x_ticks, y_ticks, x_px, y_px, y_names=(lambda t: f"{t:g}") if log_y else None)
    colours = {}
    for i, (s, pts) in enumerate(keep):
        colour = PALETTE[i % len(PALETTE)]
        colours[s.name] = colour
        pixels = [(x_px(x), y_px(y)) for x, y in pts]
        canvas.line(pixels, colour, 2)
        if s.markers or len(pixels) == 1:
            for px, py in pixels:
                canvas.marker(px, py, colour, 7)
    _legend(canvas, list(colours), list(colours.values()))
    return Chart(canvas, x_px, y_px, colours, x_ticks, y_ticks)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str = "", x_label: str = "",
              width: int = 560, height: int | None = None) -> Chart:
    """Horizontal bars, one per label, top to bottom in order, each with its value at its end.
    `y_px(i)` is the middle of bar i."""
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels for {len(values)} values")
    row = 26
    label_w = max([Canvas.text_size(str(s), SMALL)[0] for s in labels] + [40]) + 12
    height = height or TOP - 24 + row * len(labels) + BOTTOM
    canvas = Canvas(width, height)
    left, top, right, bottom = label_w, TOP - 24, width - RIGHT - 50, height - BOTTOM
    if title:
        canvas.text(width / 2, 8, title, BLACK, TEXT_SCALE, anchor="centre")
    if x_label:
        canvas.text((left + right) / 2, height - 22, x_label, AXIS, TEXT_SCALE, anchor="centre")
    finite = [float(v) for v in values if _finite(v)]
    ticks = nice_ticks(0.0, max(finite + [0.0]) or 1.0, count=5)
    x_px = _linear(0.0, ticks[-1], left, right)

    def y_px(i: float) -> float:
        return top + row * i + row / 2

    _axes(canvas, (left, top, right, bottom), ticks, [], x_px, y_px)
    colour = PALETTE[0]
    for i, (label, value) in enumerate(zip(labels, values)):
        yc = y_px(i)
        canvas.text(left - 6, yc - 4, str(label), BLACK, SMALL, anchor="right")
        if _finite(value):
            canvas.rect(left, yc - row * 0.35, x_px(float(value)), yc + row * 0.35, colour)
            canvas.text(x_px(float(value)) + 4, yc - 4, f"{value:g}", BLACK, SMALL)
    return Chart(canvas, x_px, y_px, {"bars": colour}, ticks, [])


def scatter_chart(points: Sequence[tuple[str, float, float]], *, title: str = "", x_label: str = "",
                  y_label: str = "", width: int = 560, height: int = 340) -> Chart:
    """Labelled points (label, x, y), each in its own colour, its label beside it."""
    keep = [(name, float(x), float(y)) for name, x, y in points if _finite(x) and _finite(y)]
    canvas = Canvas(width, height)
    box = left, top, right, bottom = _frame(canvas, title, x_label, y_label)
    if not keep:
        canvas.text((left + right) / 2, (top + bottom) / 2, "no data", AXIS, TEXT_SCALE, anchor="centre")
        return Chart(canvas, lambda v: left, lambda v: bottom)
    x_ticks = nice_ticks(min(p[1] for p in keep), max(p[1] for p in keep), count=6)
    y_ticks = nice_ticks(min(p[2] for p in keep), max(p[2] for p in keep), count=5)
    x_px = _linear(x_ticks[0], x_ticks[-1], left + 10, right - 10)
    y_px = _linear(y_ticks[0], y_ticks[-1], bottom - 10, top + 10)
    _axes(canvas, box, x_ticks, y_ticks, x_px, y_px)
    colours = {}
    placed: list[tuple[float, float, float, float]] = []  # the labels' boxes so far
    for i, (name, x, y) in enumerate(keep):
        colour = PALETTE[i % len(PALETTE)]
        colours[name] = colour
        px, py = x_px(x), y_px(y)
        canvas.marker(px, py, colour, 10)
        w, h = Canvas.text_size(name, SMALL)
        lx = px + 8 if px + 8 + w < width - 2 else px - 8 - w  # the label where it fits
        ly = py - 12
        while any(lx < b[2] and b[0] < lx + w and ly < b[3] and b[1] < ly + h for b in placed):
            ly += h + 1  # points at (nearly) the same place: their labels stacked, not overprinted
        placed.append((lx, ly, lx + w, ly + h))
        canvas.text(lx, ly, name, colour, SMALL)
    return Chart(canvas, x_px, y_px, colours, x_ticks, y_ticks)
