"""The report of a `temper run`: `build_report(run_dir)` writes `run_dir/report.html` (one file:
inline CSS, every image a base64 PNG, no script, nothing fetched) and `run_dir/report/*.png`.

It reads what the run left: `run.json` (the stages in order, their status and seconds), each
stage's record `.run/<stage>.json` (command, resolved config, seconds, state, warnings) and, in each
stage's output_dir, by its command: `metrics.jsonl` and `summary.json` of a training stage, curate's
`report.json`, eval's `results.json`. Every section is optional: what a run did not produce is
not shown, and a partial run (an interrupted or failed stage) gets the report of what finished.

The page, top to bottom: the title (pipeline, when, CPU); warnings (raised by any stage, forgetting,
reward hacking, contamination); the stage table (command, status, seconds, the stage's key metric
before -> after); the checkpoint table (every model eval scored x every metric it has); the held-out
questions (each checkpoint's answer, right or wrong); the plots; sample generations side by side.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temper.errors import TemperError, TemperFileNotFoundError
from temper.eval.plot import Run, read_run, series
from temper.io import atomic_write_bytes, atomic_write_text, weights_bytes
from temper.report.charts import Chart, Series, bar_chart, line_chart, scatter_chart
from temper.report.summary import number

REPORT_FILE = "report.html"
IMAGES_DIR = "report"
FORGETTING_RISE = 0.05  # general_ppl above `before` by more than this share: a forgetting warning
SAMPLE_PROMPTS = 4  # prompts per task in "sample generations"
QUESTIONS_SHOWN = 25  # questions per task in "held-out questions" (the totals count them all)
ANSWER_CHARS = 80  # an answer longer than this is cut in the questions table (samples show it whole)
# a stage's key metric, by command: the first of these its summary or its log has
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "pretrain": ("val_ppl", "val_loss", "eval_loss", "loss"),
    "sft": ("answer_accuracy", "exact_match", "eval_loss", "loss"),
    "dpo": ("eval_rewards/accuracies", "rewards/accuracies", "eval_loss", "loss"),
    "grpo": ("eval_pass_rate", "reward"),
    "ppo": ("eval_pass_rate", "objective/scores"),
    "reward": ("eval_accuracy", "eval_loss", "loss"),
}
# extra plots of a training stage beside loss and lr: (title, y label, [(metric, marked)])
EXTRA_PLOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("reward margins", "chosen - rejected reward", ("rewards/margins", "eval_rewards/margins")),
    ("preference accuracy", "share of pairs", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("reward", "reward", ("reward", "eval_reward", "objective/scores")),
    ("pass rate", "held-out pass rate", ("eval_pass_rate",)),
    ("reward-model accuracy", "held-out accuracy", ("eval_accuracy",)),
)
POST_TRAINING = ("sft", "dpo", "grpo", "ppo", "online-dpo", "reward")
# results.json task metrics, in column order, with their names in the table
TASK_METRICS: dict[str, str] = {"exact_match": "exact match", "answer_accuracy": "answer accuracy",
                                "acc": "accuracy", "acc_norm": "accuracy (length-normalised)"}
NOT_METRICS = ("examples", "examples_per_second", "outputs", "tokens_per_second", "reward_model_score",
               "kl_to_reference")
TASK_EXTRAS: dict[str, str] = {"reward_model_score": "reward-model score", "kl_to_reference": "KL to reference",
                               "tokens_per_second": "tokens/s"}


@dataclass
class StageView:
    name: str
    command: str = ""
    status: str = ""
    seconds: float | None = None
    output_dir: Path | None = None
    record: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    log: Run | None = None


# ----------------------------------------------------------------------------- reading


def _json(path: Path, notes: list[str] | None = None) -> Any:
    """A JSON file's content; None when it is absent (or, with `notes`, unreadable: the reason is noted)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if notes is None:
            raise TemperError(f"{path}: not readable JSON ({e}); expected the file a `temper run` wrote") from None
        notes.append(f"{path}: not readable JSON ({e}); skipped")
        return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _stage_dir(run_dir: Path, name: str, config: dict) -> Path | None:
    """A stage's output_dir: as recorded (relative to where `temper run` ran, so try it as given),
    else the default layout run_dir/<stage>."""
    recorded = config.get("output_dir") if isinstance(config, dict) else None
    candidates = [Path(recorded)] if isinstance(recorded, str) and recorded else []
    candidates += [run_dir / name] + ([run_dir / Path(recorded).name] if candidates else [])
    return next((p for p in candidates if p.is_dir()), None)


def read_stages(run_dir: Path, run: dict, notes: list[str]) -> list[StageView]:
    views = []
    for i, row in enumerate(run["stages"]):
        if not isinstance(row, dict) or not isinstance(row.get("stage"), str):
            raise TemperError(f"{run_dir / 'run.json'}: stages[{i}] has no 'stage' name; expected "
                              "{\"stage\": NAME, \"status\": ...}")
        name = row["stage"]
        record = _json(run_dir / ".run" / f"{name}.json", notes) or {}
        record = record if isinstance(record, dict) else {}
        config = record.get("config") if isinstance(record.get("config"), dict) else {}
        seconds = row.get("seconds", record.get("seconds") if row.get("status") == "skipped" else None)
        view = StageView(name, str(record.get("command", "")), str(row.get("status", "")),
                         float(seconds) if _number(seconds) else None, _stage_dir(run_dir, name, config), record)
        if view.output_dir is not None:
            summary = _json(view.output_dir / "summary.json", notes)
            view.summary = summary if isinstance(summary, dict) else {}
            if (view.output_dir / "metrics.jsonl").is_file():
                try:
                    view.log = read_run(view.output_dir, name)
                except TemperError as e:
                    notes.append(f"stage '{name}': {e}")
        views.append(view)
    return views


# ----------------------------------------------------------------------------- formatting


def fmt(v: Any) -> str:
    """A metric as the tables print it: 4 significant digits (integers whole, from 10,000 up with
    separators); '-' for none. The terminal's one-line summaries use `summary.number` (3 digits)."""
    if isinstance(v, float) and math.isfinite(v) and abs(v) < 1e4:
        return f"{v:.4g}"
    return number(v)


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _size(n: int | float) -> str:
    return f"{n / 1e6:.3g} MB"


# ----------------------------------------------------------------------------- what the run did


def _config(view: StageView) -> dict:
    config = view.record.get("config")
    return config if isinstance(config, dict) else {}


def key_metric(view: StageView) -> str:
    """The stage's key metric as 'name: before -> after' ('' when it has none)."""
    if view.command == "curate" and view.output_dir is not None:
        rep = _json(view.output_dir / "report.json", []) or {}
        if isinstance(rep.get("input"), dict) and isinstance(rep.get("kept"), dict):
            return f"documents: {fmt(rep['input'].get('documents'))} -> {fmt(rep['kept'].get('documents'))}"
    if view.command == "quantize" and view.output_dir is not None:
        source = _config(view).get("model")
        after = weights_bytes(view.output_dir)
        if isinstance(source, str) and Path(source).is_dir() and after:
            return f"weights: {_size(weights_bytes(Path(source)))} -> {_size(after)}"
    rows = view.log.rows if view.log else []
    before_summary = view.summary.get("before") if isinstance(view.summary.get("before"), dict) else {}
    for key in KEY_METRICS.get(view.command, ("eval_loss", "loss")):
        logged = [r[key] for r in rows if _number(r.get(key))]
        before = before_summary.get(key) if _number(before_summary.get(key)) else (logged[0] if logged else None)
        after = view.summary.get(key) if _number(view.summary.get(key)) else (logged[-1] if logged else None)
        if after is not None and (len(logged) > 1 or key in before_summary):
            return f"{key}: {fmt(before)} -> {fmt(after)}"
        if after is not None:  # measured once (a pretraining run's final evaluation): no before
            return f"{key}: {fmt(after)}"
    return ""


def find_warnings(views: list[StageView], results: dict | None, notes: list[str]) -> list[tuple[str, str]]:
    """(stage, message) for every warning: the records', forgetting, reward hacking, contamination."""
    found = []
    for v in views:
        said = v.record.get("warnings") or []
        for w in said if isinstance(said, list) else [said]:
            found.append((v.name, str(w)))
        before = v.summary.get("before") if isinstance(v.summary.get("before"), dict) else {}
        was, now = before.get("general_ppl"), v.summary.get("general_ppl")
        if v.command in POST_TRAINING and _number(was) and _number(now) and now > was * (1 + FORGETTING_RISE):
            found.append((v.name, f"forgetting: perplexity of general text rose from {fmt(was)} to {fmt(now)} "
                                  f"(+{(now / was - 1) * 100:.0f}%)"))
        hacked = [r for r in (v.log.rows if v.log else []) if isinstance(r.get("hacking"), str) and r["hacking"]]
        if hacked:
            kinds = sorted({k for r in hacked for k in r["hacking"].split(",") if k})
            found.append((v.name, f"reward hacking ({', '.join(kinds)}) flagged at {len(hacked)} logged row(s), "
                                  f"first at step {fmt(hacked[0].get('step'))}"))
        if v.status and v.status not in ("ran", "skipped") and not v.status.startswith("not run"):
            found.append((v.name, f"status: {v.status}"))
    eval_stage = next((v.name for v in views if v.command == "eval"), "eval")
    for task, rep in ((results or {}).get("contamination") or {}).items():
        if isinstance(rep, dict) and _number(rep.get("contaminated")) and rep["contaminated"] > 0:
            found.append((eval_stage, f"contamination: {rep['contaminated']} of {rep.get('checked')} rows of "
                                      f"{task} share a {results.get('contamination_n', '')}-gram with the training "
                                      "data"))
    found += [("report", n) for n in notes]
    return found


def checkpoint_names(results: dict, views: list[StageView]) -> dict[str, str]:
    """Each evaluated model directory -> the name of the stage that wrote it (else its lineage stage
    or its directory's name)."""
    by_dir = {}
    for v in views:
        if v.output_dir is not None:
            by_dir[os.path.realpath(v.output_dir)] = v.name
        recorded = _config(v).get("output_dir")
        if isinstance(recorded, str):
            by_dir.setdefault(os.path.realpath(recorded), v.name)
    names = {}
    for m in results.get("models") or list(results.get("per_model", {})):
        info = (results["per_model"].get(m) or {}).get("model") or {}
        names[m] = by_dir.get(os.path.realpath(m)) or info.get("stage") or Path(m).name or m
    return names


def checkpoint_table(results: dict, names: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: a row per model, a column per metric any model has ('-' where it has none)."""
    per_model = results.get("per_model") or {}
    columns: list[tuple[str, Any]] = []  # (header, getter)

    def add(header: str, get) -> None:
        if any(_present(get(per_model[m])) for m in names):
            columns.append((header, get))

    add("held-out perplexity", lambda s: _dig(s, "perplexity", "token_perplexity"))
    add("bits per byte", lambda s: _dig(s, "perplexity", "bits_per_byte"))
    tasks = [t for t in results.get("tasks") or [] if isinstance(t, str)]
    for task in tasks:
        seen = [k for m in names for k, v in (per_model[m].get(task) or {}).items() if k not in NOT_METRICS
                and _number(v) and "/" not in k]
        order = [k for k in TASK_METRICS if k in seen] + sorted(set(seen) - set(TASK_METRICS))
        for key in order:
            add(f"{task}: {TASK_METRICS.get(key, key)}", lambda s, t=task, k=key: _dig(s, t, k))
    reference = results.get("reference")
    reference = names.get(reference, Path(reference).name) if isinstance(reference, str) and reference else ""
    for key, label in TASK_EXTRAS.items():
        if key == "kl_to_reference" and reference:
            label = f"KL to {reference}"
        for task in tasks:
            add(f"{label} ({task})", lambda s, t=task, k=key: _dig(s, t, k))
    add("parameters", lambda s: _dig(s, "model", "parameters"))
    add("quantised", lambda s: _dig(s, "model", "quantized"))
    add("size", lambda s: _dig(s, "model", "size_bytes"))
    rows = []
    for m, name in names.items():
        row = [name]
        for header, get in columns:
            v = get(per_model[m])
            row.append(_size(v) if header == "size" and _number(v) else fmt(v) if _present(v) else "-")
        rows.append(row)
    return ["checkpoint"] + [h for h, _ in columns], rows


def _present(v: Any) -> bool:
    return _number(v) or (isinstance(v, str) and bool(v))


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def question_tables(results: dict, names: dict[str, str]) -> list[tuple[str, list[str], list[list[dict]]]]:
    """Per task whose outputs carry `correct`: (task, contexts, [per question: per model output])."""
    per_model = results.get("per_model") or {}
    tables = []
    for task in results.get("tasks") or []:
        outs = {m: _dig(per_model[m], task, "outputs") for m in names}
        if not all(isinstance(o, list) for o in outs.values()) or not outs:
            continue
        if not any(isinstance(o, dict) and "correct" in o for rows in outs.values() for o in rows):
            continue
        count = min(len(o) for o in outs.values())
        contexts = [str((outs[next(iter(outs))][i] or {}).get("context", "")) for i in range(count)]
        tables.append((task, contexts, [[outs[m][i] if isinstance(outs[m][i], dict) else {} for m in names]
                                        for i in range(count)]))
    return tables


# ----------------------------------------------------------------------------- plots


def plots(views: list[StageView], results: dict | None, names: dict[str, str]) -> list[tuple[str, str, Chart]]:
    """(group, file stem, chart) for every plot the run's data supports; a group is a stage's name or
    "checkpoints"."""
    charts = []
    for v in views:
        if v.log is None:
            continue
        loss = [Series(k, series(v.log, k), markers=k != "loss") for k in ("loss", "eval_loss", "val_loss")]
        if any(s.points for s in loss):
            charts.append((v.name, f"{v.name}-loss", line_chart([s for s in loss if s.points], title=f"{v.name}: loss",
                                                        y_label="loss")))
        lr = series(v.log, "lr")
        if lr:
            charts.append((v.name, f"{v.name}-lr", line_chart([Series("lr", lr)], title=f"{v.name}: learning rate",
                                                      y_label="learning rate")))
        for title, label, keys in EXTRA_PLOTS:
            found = [Series(k, series(v.log, k), markers=k.startswith("eval")) for k in keys]
            found = [s for s in found if s.points]
            if found:
                stem = f"{v.name}-{title.replace(' ', '-')}"
                charts.append((v.name, stem, line_chart(found, title=f"{v.name}: {title}", y_label=label)))
    for v in views:
        if v.command != "curate" or v.output_dir is None:
            continue
        rep = _json(v.output_dir / "report.json", []) or {}
        funnel = curation_funnel(rep)
        if funnel:
            labels, values = zip(*funnel)
            charts.append((v.name, f"{v.name}-funnel", bar_chart(labels, values, title=f"{v.name}: the curation funnel",
                                                         x_label="documents kept after each rule")))
    if results:
        points = []
        for m, name in names.items():
            scores = results["per_model"].get(m) or {}
            size, ppl = _dig(scores, "model", "size_bytes"), _dig(scores, "perplexity", "token_perplexity")
            if _number(size) and _number(ppl):
                points.append((name, size / 1e6, ppl))
        if points:
            charts.append(("checkpoints", "perplexity-vs-size", scatter_chart(points, title="held-out perplexity vs size",
                                                               x_label="weights on disk (MB)",
                                                               y_label="perplexity")))
    return charts


def curation_funnel(report: dict) -> list[tuple[str, int]]:
    """[("read", N), (rule, documents left after it), ...] over the rules that removed or could remove
    documents, in the order curate applies them."""
    total = _dig(report, "input", "documents")
    rules = report.get("rules") if isinstance(report.get("rules"), dict) else None
    if not _number(total) or rules is None:
        return []
    funnel, left = [("read", int(total))], int(total)
    for rule, info in rules.items():
        if isinstance(info, dict) and (info.get("enabled") or info.get("documents")):
            left -= int(info.get("documents") or 0)
            funnel.append((rule, left))
    return funnel


# ----------------------------------------------------------------------------- the page


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
 padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#666}table{border-collapse:collapse;margin:.6em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap;overflow-wrap:normal}
.warnings{background:#fff4e5;border:1px solid #f0a040;padding:.6em 1em;border-radius:4px}.warnings h2{margin-top:.2em}
.right{background:#e8f6e8}.wrong{background:#fbe9e9}.mark{font-weight:bold}
table.questions,table.samples{table-layout:fixed;width:100%}
table.questions th:first-child,table.samples th:first-child{width:24%}td{overflow-wrap:anywhere}.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0}.plots img{border:1px solid #ddd}
pre{white-space:pre-wrap;margin:0;font-size:13px}.wide{overflow-x:auto}
"""


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i and _numeric(c) else ''}>{esc(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _numeric(cell: str) -> bool:
    return cell[:1].isdigit() or cell[:1] == "-" and cell[1:2].isdigit()


@dataclass
class RunView:
    """What a run left, read once: for the HTML page and the terminal summary."""

    run_dir: Path
    run: dict
    run_file: Path
    views: list[StageView]
    results: dict | None  # the (last) eval stage's results.json
    names: dict[str, str]  # evaluated model directory -> checkpoint name
    notes: list[str]  # files that could not be read


def read_run_dir(run_dir: str | Path) -> RunView:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise TemperError(f"run_dir={run_dir} is not a directory: expected the output directory of a "
                              "`temper run`")
        raise TemperFileNotFoundError(f"run_dir= directory not found: {run_dir}")
    run_file = run_dir / "run.json"
    run = _json(run_file)
    if run is None:
        raise TemperFileNotFoundError(f"{run_file} not found: expected the output directory of a `temper run` "
                                      "(it holds run.json and .run/)")
    if not isinstance(run, dict) or not isinstance(run.get("stages"), list):
        raise TemperError(f"{run_file}: expected an object with a 'stages' list, as `temper run` writes")
    notes: list[str] = []
    views = read_stages(run_dir, run, notes)
    results = None
    for v in views:
        if v.command == "eval" and v.output_dir is not None:
            found = _json(v.output_dir / "results.json", notes)
            if isinstance(found, dict) and isinstance(found.get("per_model"), dict):
                results = found
    names = checkpoint_names(results, views) if results else {}
    names = {m: n for m, n in names.items() if isinstance(results["per_model"].get(m), dict)}
    return RunView(run_dir, run, run_file, views, results, names, notes)


def build_report(run_dir: str | Path, read: RunView | None = None) -> Path:
    """Write run_dir/report.html and run_dir/report/*.png from what the run left; the HTML's path."""
    read = read or read_run_dir(run_dir)
    run_dir, run, run_file, views, results, names, notes = (read.run_dir, read.run, read.run_file, read.views,
                                                            read.results, read.names, read.notes)
    images, out = run_dir / IMAGES_DIR, run_dir / REPORT_FILE
    for path, kind in ((images, "a directory (the report's PNGs)"), (out, "a file (the report)")):
        if os.path.lexists(path) and (path.is_dir() != (path is images) or path.is_symlink()):
            raise TemperError(f"{path}: expected {kind} there; move it away and rebuild")
    images.mkdir(exist_ok=True)
    figures: dict[str, list[tuple[str, bytes]]] = {}  # group -> (stem, PNG)
    for group, stem, chart in plots(views, results, names):
        data = chart.png()
        atomic_write_bytes(images / f"{stem}.png", data)
        figures.setdefault(group, []).append((stem, data))

    pipeline = Path(str(run.get("pipeline", run_dir.name))).stem
    finished = _dt.datetime.fromtimestamp(run_file.stat().st_mtime, _dt.timezone.utc)
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>temper run: {esc(pipeline)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>temper run: {esc(pipeline)}</h1>",
             f"<p class=meta>pipeline {esc(run.get('pipeline', ''))} &middot; outputs {esc(run.get('output_dir', run_dir))}"
             f" &middot; run finished {finished:%Y-%m-%d %H:%M} UTC &middot; CPU: {esc(_cpu())}</p>"]
    for note in notes:  # what could not be read: said here too, not only in the page
        warnings.warn(note, stacklevel=2)
    found = find_warnings(views, results, notes)
    if found:
        items = "".join(f"<li><b>{esc(stage)}</b>: {esc(msg)}</li>" for stage, msg in found)
        parts.append(f'<section id=warnings class=warnings><h2>Warnings</h2><ul>{items}</ul></section>')
    rows = [[v.name, v.command or "-", v.status or "-", f"{v.seconds:.1f}" if v.seconds is not None else "-",
             key_metric(v) or "-"] for v in views]
    parts.append("<section id=stages><h2>Stages</h2>"
                 + _table(["stage", "command", "status", "seconds", "key metric: before -> after"], rows, "stages")
                 + "</section>")
    if names:
        header, rows = checkpoint_table(results, names)
        parts.append("<section id=checkpoints><h2>Checkpoints</h2><div class=wide>"
                     + _table(header, rows, "checkpoints") + "</div></section>")
        tables = question_tables(results, names)
        if tables:
            parts.append("<section id=questions><h2>Held-out questions</h2>")
            for task, contexts, answers in tables:
                head = "".join(f"<th>{esc(n)}</th>" for n in names.values())
                body = []
                for context, outs in zip(contexts[:QUESTIONS_SHOWN], answers):
                    ref = next((o.get("reference") for o in outs if o.get("reference") is not None), "")
                    cells = "".join(_answer_cell(o) for o in outs)
                    body.append(f"<tr><td>{esc(context)}<br><small>expected: {esc(ref)}</small></td>{cells}</tr>")
                totals = "".join(f"<td class=num>{sum(bool(a[j].get('correct')) for a in answers)} / "
                                 f"{len(answers)}</td>" for j in range(len(names)))
                shown = (f"<p class=meta>the first {QUESTIONS_SHOWN} of {len(answers)} questions; the last row "
                         "counts them all</p>") if len(answers) > QUESTIONS_SHOWN else ""
                parts.append(f"<h3>{esc(task)}</h3>{shown}<div class=wide><table class=questions><thead><tr>"
                             f"<th>question</th>{head}</tr></thead><tbody>{''.join(body)}<tr class=total><th>right</th>"
                             f"{totals}</tr></tbody></table></div>")
            parts.append("</section>")
    if figures:
        parts.append("<section id=plots><h2>Plots</h2>")
        for group, pngs in figures.items():
            imgs = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(d).decode()}" '
                           f'alt="{esc(stem)}" title="{esc(stem)}.png"></figure>' for stem, d in pngs)
            parts.append(f"<h3>{esc(group)}</h3><div class=plots>{imgs}</div>")
        parts.append("</section>")
    if names:
        samples = _samples(results, names)
        if samples:
            parts.append(f"<section id=samples><h2>Sample generations</h2>{samples}</section>")
    parts.append(f"<p class=meta>built {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC by "
                 "<code>temper report</code></p></body></html>")
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out


def _answer_cell(output: dict) -> str:
    if "correct" not in output:
        return f"<td>{esc(_cut(str(output.get('prediction', '-'))))}</td>"
    right = bool(output["correct"])
    mark = "&#10003;" if right else "&#10007;"
    return (f'<td class="{"right" if right else "wrong"}"><span class=mark>{mark}</span> '
            f"{esc(_cut(str(output.get('prediction', ''))))}</td>")


def _cut(text: str) -> str:
    return text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS - 1] + "\u2026"


def _samples(results: dict, names: dict[str, str]) -> str:
    """For each generation task: its first prompts, each checkpoint's reply side by side."""
    out = []
    for task in results.get("tasks") or []:
        outs = {m: _dig(results["per_model"][m], task, "outputs") for m in names}
        if not outs or not all(isinstance(o, list) and o for o in outs.values()):
            continue
        count = min(SAMPLE_PROMPTS, *(len(o) for o in outs.values()))
        head = "".join(f"<th>{esc(n)}</th>" for n in names.values())
        rows = []
        for i in range(count):
            first = outs[next(iter(outs))][i] if isinstance(outs[next(iter(outs))][i], dict) else {}
            cells = "".join(f"<td><pre>{esc((o[i] if isinstance(o[i], dict) else {}).get('prediction', ''))}</pre></td>"
                            for o in outs.values())
            rows.append(f"<tr><td><pre>{esc(first.get('context', ''))}</pre></td>{cells}</tr>")
        out.append(f"<h3>{esc(task)}</h3><div class=wide><table class=samples><thead><tr><th>prompt</th>{head}</tr>"
                   f"</thead><tbody>{''.join(rows)}</tbody></table></div>")
    return "".join(out)
