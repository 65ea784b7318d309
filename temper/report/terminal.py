"""The end of a `temper run` in the terminal: the stages (time, the number each moved), every
checkpoint against every metric, and held-out questions marked right or wrong per checkpoint,
read from the same files as the HTML report (`read_run_dir`), so the two never disagree.

    print(summary_text(read_run_dir("runs/lifecycle")))
"""

from __future__ import annotations

import sys

from temper.report.build import (
    REPORT_FILE,
    RunView,
    checkpoint_table,
    find_warnings,
    key_metric,
    question_tables,
)
from temper.report.summary import duration

QUESTIONS = 8  # questions per task shown in the terminal (the report has more; the totals count all)
ANSWER = 28  # characters of an answer shown


def _grid(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), *(line(r) for r in rows)]


def _cut(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "~"


def _marks() -> tuple[str, str]:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return ("✓", "✗") if encoding in ("utf8", "utf_8") else ("+", "x")


def summary_text(read: RunView, *, questions: int = QUESTIONS) -> str:
    right, wrong = _marks()
    out = [f"temper run: {read.run.get('pipeline', read.run_dir)} -> {read.run_dir}", "", "Stages:"]
    rows = [[v.name, v.command or "-", v.status or "-", duration(v.seconds) if v.seconds is not None else "-",
             key_metric(v) or ""] for v in read.views]
    out += _grid(["stage", "command", "status", "time", "what it moved (before -> after)"], rows, {3})
    total = sum(v.seconds for v in read.views if v.seconds is not None and v.status == "ran")
    out.append(f"  ran in {duration(total)} (skipped stages not counted)")
    if read.results and read.names:
        header, table = checkpoint_table(read.results, read.names)
        # transposed: a row per metric, a column per checkpoint (six checkpoints fit a terminal; twenty metrics)
        out += ["", "Checkpoints (eval):"]
        out += _grid(["metric", *[r[0] for r in table]], [[h, *[r[i] for r in table]]
                                                          for i, h in enumerate(header) if i > 0],
                     set(range(1, len(table) + 1)))
        names = list(read.names.values())
        for task, contexts, answers in question_tables(read.results, read.names):
            shown = answers[:questions]
            last = names[-1]
            out += ["", f"Held-out questions, {task} ({right} right, {wrong} wrong; the first {len(shown)} of "
                        f"{len(answers)}; answers of {last}):"]
            rows = []
            for context, outs in zip(contexts, shown):
                ref = next((o.get("reference") for o in outs if o.get("reference") is not None), "")
                rows.append([_cut(context.replace("Question:", "").replace("Answer:", ""), 44), _cut(ref, 16),
                             *[(right if o.get("correct") else wrong) if "correct" in o else "-" for o in outs],
                             _cut(outs[-1].get("prediction", ""), ANSWER)])
            rows.append(["right (all questions)", "",
                         *[f"{sum(bool(a[j].get('correct')) for a in answers)}/{len(answers)}"
                           for j in range(len(names))], ""])
            out += _grid(["question", "expected", *names, f"{last} said"], rows)
    found = find_warnings(read.views, read.results, read.notes)
    if found:
        out.append("")
        out += [f"warning: {stage}: {message}" for stage, message in found]
    report = read.run_dir / REPORT_FILE
    if report.is_file():
        out += ["", f"report: {report}"]
    return "\n".join(out)
