"""The run report (temper.report): PNG encoding read back independently, charts whose pixels sit
where their data says, the HTML built from a real (tiny) `temper run` directory, and the page
rendered by headless Chromium."""

import base64
import html
import json
import math
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from temper.cli import main
from temper.errors import TemperError
from temper.report import build_report, font
from temper.report.build import checkpoint_names, curation_funnel, fmt, plots, read_stages
from temper.report.charts import BOTTOM, PALETTE, TOP, Series, bar_chart, line_chart, scatter_chart
from temper.report.png import Canvas, decode_png

RED, BLUE = (255, 0, 0), (0, 0, 255)


# ----------------------------------------------------------------------------- PNG


def read_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The chunks of a PNG, each CRC checked with zlib.crc32 here (not the module's reader)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def unfilter(data: bytes) -> np.ndarray:
    """Pixels by hand: zlib, then the row filters (the writer uses None or Sub)."""
    chunks = read_chunks(data)
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 2)
    raw = np.frombuffer(zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT")), np.uint8)
    raw = raw.reshape(height, width * 3 + 1)
    out = np.zeros((height, width, 3), np.uint8)
    for y in range(height):
        row = raw[y, 1:].reshape(width, 3).astype(np.int64)
        assert raw[y, 0] in (0, 1)
        out[y] = (row.cumsum(axis=0) if raw[y, 0] == 1 else row) % 256
    return out


def test_png_round_trip_pixels_as_drawn():
    canvas = Canvas(80, 60)
    canvas.rect(10, 10, 30, 20, RED)  # whole pixels: exactly red inside, white beside
    canvas.line([(40, 30), (70, 30)], BLUE, width=2)  # covers rows 29 and 30 whole
    canvas.line([(40, 46.0), (70, 46.0)], BLUE, width=1)  # half of row 45, half of row 46: anti-aliased
    canvas.text(2, 40, "Ag", scale=2)
    data = canvas.png()
    pixels = unfilter(data)
    assert pixels.shape == (60, 80, 3)
    assert (pixels == decode_png(data)).all() and (pixels == canvas.pixels()).all()
    assert (pixels[10:20, 10:30] == RED).all() and (pixels[9, 10:30] == 255).all() and (pixels[10:20, 30] == 255).all()
    assert (pixels[29:31, 45:65] == BLUE).all() and (pixels[28, 45:65] == 255).all() and (pixels[31, 45:65] == 255).all()
    half = pixels[45:47, 50]
    assert (half[:, 2] == 255).all() and (half[:, 0] > 60).all() and (half[:, 0] < 200).all()  # blended, not solid
    # text: each font pixel a 2x2 block of black; "g" a row lower (a descender)
    expected = np.zeros((font.CELL_H, 2 * font.CELL_W), bool)
    expected[0:7, 0:5] = font.glyph("A")
    expected[1:8, 6:11] = font.glyph("g")
    drawn = (pixels[40:40 + 2 * font.CELL_H:2, 2:2 + 4 * font.CELL_W:2] == 0).all(axis=2)
    assert (drawn == expected).all()


def test_font_covers_printable_ascii_with_distinct_glyphs():
    shapes = {font.glyph(chr(c)).tobytes() for c in range(33, 127)}
    assert len(shapes) == 94  # no two printable characters drawn alike
    assert (font.glyph("\u00e9") == font.glyph("?")).all()


def test_decode_refuses_a_corrupt_chunk():
    data = bytearray(Canvas(4, 4).png())
    data[-20] ^= 0xFF  # inside IDAT
    with pytest.raises(ValueError, match="CRC"):
        decode_png(bytes(data))


# ----------------------------------------------------------------------------- charts


def test_line_chart_puts_each_series_point_where_its_value_is():
    a = Series("train", [(0, 4.0), (10, 3.0), (20, 2.5)], markers=True)
    b = Series("eval", [(0, 4.2), (20, 2.0)], markers=True)
    chart = line_chart([a, b], title="loss", y_label="loss")
    pixels = unfilter(chart.png())
    assert list(chart.colours) == ["train", "eval"] and chart.colours["eval"] == PALETTE[1]
    # the axes span the data and map linearly: the plot box's edges are the first and last ticks
    assert chart.y_ticks[0] <= 2.0 and chart.y_ticks[-1] >= 4.2
    height = chart.canvas.height
    for s in (a, b):
        for x, y in s.points:
            expected_y = TOP + (chart.y_ticks[-1] - y) / (chart.y_ticks[-1] - chart.y_ticks[0]) * (height - BOTTOM - TOP)
            assert abs(chart.y_px(y) - expected_y) < 1e-9
            px, py = round(chart.x_px(x) - 0.5), round(chart.y_px(y) - 0.5)
            assert tuple(pixels[py, px]) == chart.colours[s.name], (s.name, x, y)
    assert all((pixels == c).all(axis=2).sum() > 50 for c in chart.colours.values())  # both lines drawn


def test_log_y_chart_spaces_decades_evenly():
    chart = line_chart([Series("ppl", [(0, 1000.0), (1, 100.0), (2, 10.0)], markers=True)], log_y=True)
    assert chart.y_ticks == [10.0, 100.0, 1000.0]
    top, bottom = chart.y_px(1000.0), chart.y_px(10.0)
    assert abs(top - TOP) < 1e-9 and abs(bottom - (chart.canvas.height - BOTTOM)) < 1e-9
    assert abs(chart.y_px(100.0) - (top + bottom) / 2) < 1e-9
    pixels = unfilter(chart.png())
    assert tuple(pixels[round(chart.y_px(100.0) - 0.5), round(chart.x_px(1) - 0.5)]) == PALETTE[0]
    # non-positive values cannot sit on a log axis: skipped, not drawn at a wrong place
    assert line_chart([Series("x", [(0, 0.0), (1, 5.0)])], log_y=True).y_ticks[0] <= 5.0


def test_bar_chart_bar_ends_at_its_value_and_scatter_marks_each_point():
    chart = bar_chart(["input", "dedup", "quality"], [400, 350, 120])
    pixels = unfilter(chart.png())
    for i, v in enumerate([400, 350, 120]):
        row, end = round(chart.y_px(i)), chart.x_px(v)
        assert tuple(pixels[row, round(end) - 3]) == PALETTE[0] and tuple(pixels[row, round(end) + 2]) == (255, 255, 255)
    assert chart.x_px(0) < chart.x_px(120) < chart.x_px(350) < chart.x_px(400)
    scatter = scatter_chart([("full", 4.0, 12.0), ("int8", 1.0, 12.3), ("int4", 0.55, 14.0)])
    pixels = unfilter(scatter.png())
    for (name, x, y), colour in zip([("full", 4.0, 12.0), ("int8", 1.0, 12.3), ("int4", 0.55, 14.0)], PALETTE):
        assert tuple(pixels[round(scatter.y_px(y) - 0.5), round(scatter.x_px(x) - 0.5)]) == colour, name
    assert scatter.x_px(0.55) < scatter.x_px(1.0) < scatter.x_px(4.0) and scatter.y_px(14.0) < scatter.y_px(12.0)


# ----------------------------------------------------------------------------- a real run

PIPELINE = """
name: report-test
stages:
  world:
    command: world
    num_people: 12
    num_towns: 3
    docs_per_person: 8
    num_arithmetic_docs: 40
    num_dialogue_docs: 40
    num_sft_train: 200
    num_sft_test: 20
    num_pref_train: 40
    num_pref_test: 10
    num_rl_train: 10
    num_rl_test: 10
    num_prm_train: 10
    num_prm_test: 10
  curate:
    command: curate
    data: ["${world}/pretrain/train.jsonl"]
  tokenizer:
    command: tokenizer
    data: ["${world}/pretrain/train.jsonl"]
    vocab_size: 512
  pretrain:
    command: pretrain
    data: ["${world}/pretrain/train.jsonl"]
    eval_data: ["${world}/pretrain/val.jsonl"]
    tokenizer: ${tokenizer}
    model: llama-tiny
    model_config: {hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}
    seq_len: 64
    batch_size: 8
    max_steps: 12
    samples: 0
    optim: {lr: 3.0e-3}
    logging: {every: 3, eval_every: 6}
  sft:
    command: sft
    model: ${pretrain}
    data: ["${world}/sft/train.jsonl"]
    eval_data: ["${world}/sft/test.jsonl"]
    seq_len: 96
    batch_size: 8
    max_steps: 4
    eval_samples: 2
    eval_max_new_tokens: 8
    logging: {every: 2, eval_every: 4}
  dpo:
    command: dpo
    model: ${sft}
    data: ["${world}/preference/train.jsonl"]
    eval_data: ["${world}/preference/test.jsonl"]
    seq_len: 96
    batch_size: 4
    max_steps: 3
    eval_pairs: 4
    logging: {every: 1, eval_every: 3}
  eval:
    command: eval
    models: ["${pretrain}", "${sft}", "${dpo}"]
    tasks: [world_qa]
    world: ${world}
"""
STAGES = ["world", "curate", "tokenizer", "pretrain", "sft", "dpo", "eval"]


class Tables(HTMLParser):
    """Every <table class=...> as rows of cell texts, and every <img src=...>."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table = self._row = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("class") or "", [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real tiny `temper run` (world -> curate -> tokenizer -> pretrain -> sft -> dpo -> eval)."""
    base = tmp_path_factory.mktemp("report-run")
    (base / "p.yaml").write_text(PIPELINE)
    here = os.getcwd()
    os.chdir(base)
    try:
        assert main(["run", str(base / "p.yaml")]) == 0
    finally:
        os.chdir(here)
    return base / "runs" / "report-test"


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy whose records' output_dirs (relative to where the run ran) only resolve by the default layout."""
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    return out


def test_report_of_a_real_run(run_dir):
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    page = Tables(path.read_text(encoding="utf-8"))
    stages = page.tables["stages"]
    assert [r[0] for r in stages[1:]] == STAGES and all(r[2] == "ran" for r in stages[1:])
    run = json.loads((run_dir / "run.json").read_text())
    assert [r[3] for r in stages[1:]] == [f"{s['seconds']:.1f}" for s in run["stages"]]
    # a key metric from the stage's own files
    curate = json.loads((run_dir / "curate" / "report.json").read_text())
    assert stages[2][4] == f"documents: {fmt(curate['input']['documents'])} -> {fmt(curate['kept']['documents'])}"
    dpo_rows = [json.loads(line) for line in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    accs = [r["eval_rewards/accuracies"] for r in dpo_rows if "eval_rewards/accuracies" in r]
    summary = json.loads((run_dir / "dpo" / "summary.json").read_text())
    before = summary.get("before", {}).get("eval_rewards/accuracies", accs[0])
    assert stages[6][4] == f"eval_rewards/accuracies: {fmt(before)} -> {fmt(summary['eval_rewards/accuracies'])}"
    # one checkpoint row per evaluated model, named by the stage that wrote it, values from results.json
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    table = page.tables["checkpoints"]
    assert [r[0] for r in table[1:]] == ["pretrain", "sft", "dpo"]
    header = table[0]
    for row, model in zip(table[1:], results["models"]):
        scores = results["per_model"][model]["world_qa"]
        for metric, label in (("exact_match", "exact match"), ("answer_accuracy", "answer accuracy")):
            assert row[header.index(f"world_qa: {label}")] == fmt(scores[metric])
    # every plot written and embedded, byte for byte
    files = sorted((run_dir / "report").glob("*.png"))
    stems = {f.stem for f in files}
    assert {"pretrain-loss", "pretrain-lr", "sft-loss", "dpo-loss", "dpo-reward-margins",
            "dpo-preference-accuracy", "curate-funnel"} <= stems
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in page.images if src.startswith("data:image/png;base64,")}
    assert len(page.images) == len(files) and embedded == {f.read_bytes() for f in files}
    assert all(decode_png(f.read_bytes()).shape[2] == 3 for f in files)
    text = path.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # nothing fetched, no JS
    assert "<section id=warnings" not in text  # nothing warned in this run
    # each plot carries the series its stage logged: evaluation points beside the training curve
    views = read_stages(run_dir, run, [])
    charts = {stem: chart for _, stem, chart in plots(views, results, checkpoint_names(results, views))}
    assert list(charts["pretrain-loss"].colours) == ["loss", "val_loss"]
    assert list(charts["dpo-loss"].colours) == ["loss", "eval_loss"]
    assert list(charts["dpo-reward-margins"].colours) == ["rewards/margins", "eval_rewards/margins"]
    assert charts["dpo-preference-accuracy"].y_ticks[0] <= min(accs) and charts["dpo-preference-accuracy"].y_ticks[-1] >= max(accs)
    funnel = curation_funnel(curate)
    assert funnel[0] == ("read", curate["input"]["documents"]) and funnel[-1][1] == curate["kept"]["documents"]


def test_report_shows_warnings_answers_and_new_metrics(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path)
    record = json.loads((copy / ".run" / "sft.json").read_text())
    record["warnings"] = ["<b>lr</b> too high & loss rose"]
    (copy / ".run" / "sft.json").write_text(json.dumps(record))
    summary = json.loads((copy / "dpo" / "summary.json").read_text())
    summary["before"] = {**summary.get("before", {}), "general_ppl": 10.0}
    summary["general_ppl"] = 20.0
    (copy / "dpo" / "summary.json").write_text(json.dumps(summary))
    with open(copy / "dpo" / "metrics.jsonl", "a") as log:  # the rows GRPO/PPO's watch marks
        log.write(json.dumps({"step": 98, "reward": 1.0, "hacking": ""}) + "\n")
        log.write(json.dumps({"step": 99, "reward": 1.0, "hacking": "length,reward_vs_heldout"}) + "\n")
    # eval's results.json as the extended eval writes it: correctness, model info, perplexity, contamination
    results_path = copy / "eval" / "results.json"
    results = json.loads(results_path.read_text())
    for i, model in enumerate(results["models"]):
        scores = results["per_model"][model]
        for j, out in enumerate(scores["world_qa"]["outputs"]):
            out["correct"] = (i + j) % 2 == 0
        scores["world_qa"]["tokens_per_second"] = 100.0 + i
        scores["model"] = {"size_bytes": 1_500_000 * (i + 1), "parameters": 30_000, "quantized": None, "stage": None}
        scores["perplexity"] = {"token_perplexity": 50.0 - i, "bits_per_byte": 2.5 - i / 10}
    results["contamination_n"] = 8
    results["contamination"] = {"world_qa": {"rows": 10, "checked": 10, "contaminated": 3, "fraction": 0.3}}
    results_path.write_text(json.dumps(results))
    assert main(["report", f"run_dir={copy}"]) == 0
    text = (copy / "report.html").read_text()
    page = Tables(text)
    warnings = text[text.index("<section id=warnings"):text.index("</section>")]
    assert "&lt;b&gt;lr&lt;/b&gt; too high &amp; loss rose" in warnings  # escaped, not markup
    assert "forgetting: perplexity of general text rose from 10 to 20" in warnings
    assert "contamination: 3 of 10 rows of world_qa" in warnings
    assert "reward hacking (length, reward_vs_heldout) flagged at 1 logged row(s), first at step 99" in warnings
    table = page.tables["checkpoints"]
    header = table[0]
    for col, values in (("held-out perplexity", ["50", "49", "48"]), ("bits per byte", ["2.5", "2.4", "2.3"]),
                        ("tokens/s (world_qa)", ["100", "101", "102"]), ("size", ["1.5 MB", "3 MB", "4.5 MB"])):
        assert [r[header.index(col)] for r in table[1:]] == values, col
    questions = page.tables["questions"]
    outputs = [results["per_model"][m]["world_qa"]["outputs"] for m in results["models"]]
    assert len(questions) == 1 + len(outputs[0]) + 1  # header, a row per question, the totals
    for j, row in enumerate(questions[1:-1]):
        assert row[0].startswith(outputs[0][j]["context"])
        for i in range(3):
            assert row[1 + i].startswith("\u2713" if outputs[i][j]["correct"] else "\u2717")
    assert questions[-1][1:] == [f"{sum(o['correct'] for o in outs)} / {len(outs)}" for outs in outputs]
    assert (copy / "report" / "perplexity-vs-size.png").is_file()


def test_report_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(TemperError, match="run.json not found"):
        build_report(tmp_path)
    (tmp_path / "run.json").write_text("{\"stages\": 3}")
    with pytest.raises(TemperError, match="'stages' list"):
        build_report(tmp_path)


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PROBE = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (i) { return i.complete && i.naturalWidth > 0; });
  var cells = Array.prototype.map.call(document.querySelectorAll('table.checkpoints td'),
                                       function (c) { return c.textContent.trim(); });
  document.body.setAttribute('data-images', JSON.stringify(images));
  document.body.setAttribute('data-cells', JSON.stringify(cells));
});
</script></body>"""


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip(f"no headless browser installed (looked for {', '.join(BROWSERS)} on PATH)")
    page = build_report(run_dir).read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE), encoding="utf-8")  # a copy: the report itself has no script
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-dev-shm-usage", "--dump-dom", "--virtual-time-budget=5000", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = {k: json.loads(html.unescape(v)) for k, v in re.findall(r'data-(images|cells)="([^"]*)"', done.stdout)}
    assert set(found) == {"images", "cells"}, done.stdout[:2000]
    assert len(found["images"]) == len(list((run_dir / "report").glob("*.png"))) > 0 and all(found["images"])
    cells = found["cells"]
    assert len(cells) == 3 * len(Tables(page).tables["checkpoints"][0]) and all(c for c in cells)
    assert cells[0] == "pretrain" and not math.isnan(float(cells[1]))


def test_report_of_a_partial_run(run_dir, tmp_path):
    """A run stopped in its eval stage: the report of what finished, no checkpoint table, the stop warned."""
    copy = copy_run(run_dir, tmp_path)
    shutil.rmtree(copy / "eval")
    (copy / ".run" / "eval.json").unlink()
    run = json.loads((copy / "run.json").read_text())
    run["stages"][-1] = {"stage": "eval", "status": "running"}
    (copy / "run.json").write_text(json.dumps(run))
    text = build_report(copy).read_text()
    page = Tables(text)
    assert "checkpoints" not in page.tables and "<section id=questions" not in text
    assert page.tables["stages"][-1] == ["eval", "-", "running", "-", "-"]
    assert "<b>eval</b>: status: running" in text
    assert (copy / "report" / "dpo-loss.png").is_file()
