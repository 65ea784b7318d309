"""`temper plot`: metrics.jsonl files -> one self-contained SVG, read back with xml.etree."""

import json
import math
import xml.etree.ElementTree as ET

import pytest

from temper.cli import main
from temper.errors import TemperError
from temper.eval.plot import Run, nice_ticks, render_svg, tick_label

SVG = "{http://www.w3.org/2000/svg}"


def write_run(directory, rows):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def grpo_rows(rewards, evals):
    """Training rows every 10 steps (reward), an eval row at step 0 and pass rates merged at `evals` steps."""
    rows = [{"step": 0, "eval_pass_rate": evals[0]}]
    for i, r in enumerate(rewards, 1):
        row = {"step": 10 * i, "reward": r, "loss": 0.0}
        if 10 * i in evals:
            row["eval_pass_rate"] = evals[10 * i]
        rows.append(row)
    return rows


def points(polyline):
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


def panel(root, metric):
    found = [g for g in root.iter(f"{SVG}g") if g.get("data-metric") == metric]
    assert len(found) == 1, metric
    return found[0]


def test_plot_command_draws_one_panel_per_metric_and_one_line_per_run(tmp_path, capsys):
    a = write_run(tmp_path / "lr-high", grpo_rows([0.1, float("nan"), 0.5, 0.3, 0.9], {0: 0.2, 20: 0.4, 50: 0.6}))
    b = write_run(tmp_path / "lr-low", grpo_rows([0.2, 0.2, 0.25], {0: 0.2, 30: 0.1}))
    out = tmp_path / "plots" / "reward.svg"
    out.parent.mkdir()
    code = main(["plot", f"runs=[{a},{b / 'metrics.jsonl'}]", "metrics=[reward,eval_pass_rate]", f"output={out}"])
    assert code == 0, capsys.readouterr().err
    root = ET.parse(out).getroot()  # well-formed XML
    assert [t.get("data-run") for t in root.iter(f"{SVG}text") if t.get("class") == "legend"] == ["lr-high", "lr-low"]

    reward = {p.get("data-run"): points(p) for p in panel(root, "reward").iter(f"{SVG}polyline")}
    assert len(reward["lr-high"]) == 4  # the NaN row is skipped, not drawn at 0
    assert len(reward["lr-low"]) == 3
    values = [0.1, 0.5, 0.3, 0.9]
    xs, ys = zip(*reward["lr-high"])
    assert list(xs) == sorted(xs) and len(set(xs)) == 4  # in step order
    for (v1, y1), (v2, y2) in zip(zip(values, ys), zip(values[1:], ys[1:])):
        assert (v1 < v2) == (y1 > y2)  # a higher value is drawn higher up: a smaller y
    # equal values at the same height; the line of the lower run's 0.2 lies below the other's 0.5
    assert reward["lr-low"][0][1] == reward["lr-low"][1][1] > reward["lr-high"][1][1]

    evals = panel(root, "eval_pass_rate")
    lines = {p.get("data-run"): points(p) for p in evals.iter(f"{SVG}polyline")}
    assert len(lines["lr-high"]) == 3 and len(lines["lr-low"]) == 2  # only the evaluation rows
    markers = [(c.get("data-run"), float(c.get("cx")), float(c.get("cy"))) for c in evals.iter(f"{SVG}circle")]
    assert sorted(markers) == sorted((run, x, y) for run, pts in lines.items() for x, y in pts)
    assert not list(panel(root, "reward").iter(f"{SVG}circle"))  # logged every row: a line, no markers
    ticks = [t.text for t in evals.iter(f"{SVG}text") if t.get("class") == "ytick"]
    assert ticks and all(len(t) <= 5 for t in ticks) and "0.2" in ticks  # round, readable numbers

    # the file is claimed: an existing one is kept unless overwrite=true
    assert main(["plot", f"runs=[{a}]", "metrics=[reward]", f"output={out}"]) == 2
    assert "exists: overwrite=true replaces it" in capsys.readouterr().err
    assert main(["plot", f"runs=[{a}]", "metrics=[reward]", f"output={out}", "overwrite=true"]) == 0
    assert len(list(ET.parse(out).getroot().iter(f"{SVG}polyline"))) == 1


def error_of(capsys, *args):
    code = main(["plot", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_plot_errors_name_the_metric_or_file(tmp_path, capsys):
    run = write_run(tmp_path / "grpo", grpo_rows([0.1, 0.2], {0: 0.1}))
    out = tmp_path / "p.svg"
    err = error_of(capsys, f"runs=[{run}]", "metrics=[reward,eval_pas_rate]", f"output={out}")
    assert "'eval_pas_rate'" in err and "logged metrics: eval_pass_rate, loss, reward" in err
    assert not out.exists()  # refused before any file is claimed
    err = error_of(capsys, f"runs=[{tmp_path / 'nowhere'}]", "metrics=[reward]", f"output={out}")
    assert "nowhere" in err and "no such file or directory" in err
    err = error_of(capsys, f"runs=[{tmp_path}]", "metrics=[reward]", f"output={out}")  # a dir with no metrics
    assert "holds no metrics.jsonl" in err
    err = error_of(capsys, f"runs=[{run}]", f"output={out}")
    assert "metrics= is required" in err
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 1}\n{"step": 2, "rew\n')
    err = error_of(capsys, f"runs=[{run}]", "metrics=[reward]", f"output={out}")
    assert "metrics.jsonl:2: not JSON" in err
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 1}\n{"step": 2, "rew')  # a run writing its row now
    assert main(["plot", f"runs=[{run}]", "metrics=[reward]", f"output={out}"]) == 0
    assert len(points(next(ET.parse(out).getroot().iter(f"{SVG}polyline")))) == 1
    out.unlink()
    err = error_of(capsys, f"runs=[{run}]", "metrics=[reward]", f"output={tmp_path / 'p.png'}")
    assert "ending in .svg" in err
    assert not out.exists()


def test_render_svg_handles_a_single_point_and_only_nan():
    one = Run("one", None, [{"step": 5, "kl": 0.25, "entropy": float("nan")}])
    root = ET.fromstring(render_svg([one], ["kl", "entropy"]))
    kl = panel(root, "kl")
    assert len(points(next(kl.iter(f"{SVG}polyline")))) == 1 and len(list(kl.iter(f"{SVG}circle"))) == 1
    entropy = panel(root, "entropy")
    assert not list(entropy.iter(f"{SVG}polyline"))
    assert any(t.text == "no finite values" for t in entropy.iter(f"{SVG}text"))
    def y_ticks(svg, metric):
        return [float(t.text) for t in panel(ET.fromstring(svg), metric).iter(f"{SVG}text") if t.get("class") == "ytick"]

    rates = Run("r", None, [{"step": s, "eval_pass_rate": v} for s, v in ((0, 0.38), (20, 0.41), (40, 0.44))])
    assert min(y_ticks(render_svg([rates], ["eval_pass_rate"]), "eval_pass_rate")) > 0.3  # spans the values
    assert y_ticks(render_svg([rates], ["eval_pass_rate"], y_zero=True), "eval_pass_rate")[0] == 0.0
    with pytest.raises(TemperError, match="no run logs 'reward'"):
        render_svg([one], ["reward"])


@pytest.mark.parametrize("low,high", [(0.0, 1.0), (-0.013, 0.044), (3.2e-7, 9.9e-7), (0.0, 200.0), (7.0, 7.0),
                                      (1234.0, 98765.0)])
def test_nice_ticks_cover_the_range_with_round_steps(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 8
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5, 10))
    labels = [tick_label(t, ticks) for t in ticks]
    assert len(set(labels)) == len(labels)  # no two ticks read the same
