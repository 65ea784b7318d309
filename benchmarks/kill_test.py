"""Kill test: SIGKILL a real `temper pretrain` again and again, resume it with resume=auto each
time, and require the final model to be byte-identical to an uninterrupted run.

    PYTHONPATH=. python benchmarks/kill_test.py [--kills 20 --max-steps 1000 --checkpoint-every 5 --seed 0]

One command: it writes a small text file, runs the uninterrupted reference once (timing its
start-up and its steps), then launches the same run into a second directory with resume=auto
and kills it with SIGKILL `--kills` times before letting a last launch finish. The kills come
in four kinds, in turn, their moments drawn from a seeded RNG:
  first-row    kill #1: as soon as the first metrics row is written, before any checkpoint
               exists (the rerun finds metrics and caches but nothing to resume)
  checkpoint   kills #2, 5, 8, ... (and the last one if no kill has yet found a checkpoint
               being written): when the n-th (n in 1..3) `.tmp-step_*` directory of this
               launch appears in checkpoints/ (polled every 0.2 ms), at once or 0-3 ms later
  in-training  kills #3, 6, 9, ...: uniformly within this launch's share of the remaining
               steps' time (2 x remaining / kills to come, at most 80% of it), counted from
               the launch's first metrics row
  timed        kills #4, 7, 10, ...: the same, counted from the launch itself, so that it can
               also land in the start-up (imports, data, tokenizer, model, resume)
The remaining time comes from the uninterrupted run's pace. After each kill the directory is
read as the process left it, which tells what it was doing: starting up, a training step,
writing a checkpoint (its `.tmp-step_*` directory and the files in it), pruning an old
checkpoint, or writing the model directory after the last step.

The verdict: model.safetensors has the same sha256 as the reference; metrics.jsonl has the
same rows (every field but the timings, floats compared exactly); the kept checkpoints are the
same; no `.tmp*` or `.old-*` leftovers anywhere in the output directory. Exit status 1 otherwise,
or when a relaunch fails (e.g. is refused). Each process runs one thread (OMP_NUM_THREADS=1
unless set): on a shared 2-core machine two spin-waiting OpenMP threads made steps ~50x slower.

tests/test_kill.py runs the same code with 3 kills on a smaller run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the temper this script checks is the one its subprocesses run
    sys.path.insert(0, str(ROOT))

from temper.train.checkpoint import STEP_DIR, checkpoint_problem, latest_checkpoint  # noqa: E402

TINY = ["model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=4", "logging.every=1", "samples=0",
        "logging.progress=false", "peak_flops=1e9", "eval_fraction=0.1", "logging.eval_every=0"]
TIMING_FIELDS = ("tokens_per_second", "step_tokens_per_second", "mfu", "memory_mb")  # differ between any two runs
POLL_S = 0.0002


def write_corpus(path: Path, paragraphs: int, seed: int = 0) -> Path:
    """Paragraphs of made-up sentences, blank-line separated (one document each)."""
    rng = random.Random(seed)
    words = ("the a one small big red green old new cat dog bird fox river hill house tree stone road "
             "sees finds likes carries follows crosses under over near behind slowly quickly and then").split()
    text = []
    for _ in range(paragraphs):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 11))).capitalize() + "."
                     for _ in range(rng.randint(1, 4))]
        text.append(" ".join(sentences))
    path.write_text("\n\n".join(text) + "\n", encoding="utf-8")
    return path


def pretrain_command(corpus: Path, out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "temper", "pretrain", f"data={corpus}", f"output_dir={out}", *args]


def child_env() -> dict[str, str]:
    """This checkout's temper; one thread unless told otherwise (on a shared 2-core machine, two
    spin-waiting OpenMP threads made steps ~50x slower, and every launch uses the same setting)."""
    path = os.environ.get("PYTHONPATH")
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metrics_rows(path: Path) -> list[dict]:
    """Complete rows of metrics.jsonl (a line cut short by a kill is left out)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def last_row_step(path: Path) -> int:
    """The step of the last complete row (read from the end: polled every millisecond)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().split(b"\n")[:-1]  # the part after the last newline is unfinished
        return json.loads(lines[-1]).get("step", 0) if lines else 0
    except (OSError, ValueError):
        return 0


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS and not k.startswith("time/")} for r in rows]


def leftovers(out: Path) -> list[str]:
    """What an interrupted write leaves behind: `*.tmp*` files or directories, `.old-*` swaps."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".old-"))


def checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(m.group(1)) for p in (root.iterdir() if root.is_dir() else []) if (m := STEP_DIR.match(p.name)))


def newest_valid_step(out: Path) -> int:
    import warnings

    with warnings.catch_warnings():  # a checkpoint half-deleted by a kill during pruning is skipped
        warnings.simplefilter("ignore")
        path = latest_checkpoint(out / "checkpoints")
    return json.loads((path / "state.json").read_text())["step"] if path else 0



# ----------------------------------------------------------------------------- one launch


@dataclass
class Plan:
    """How one launch is to be killed."""

    mode: str  # first-row | checkpoint | in-training | timed | finish (left to run to the end)
    at: float = 0.0  # timed: seconds after the launch; in-training: after its first metrics row
    nth: int = 0  # checkpoint: kill when this launch's nth .tmp-step_* directory appears
    delay: float = 0.0  # checkpoint: and this many seconds later

    def describe(self) -> str:
        if self.mode == "timed":
            return f"timed @{self.at:.2f}s"
        if self.mode == "in-training":
            return f"1st row +{self.at:.2f}s"
        if self.mode == "checkpoint":
            return f"ckpt-write #{self.nth} +{self.delay * 1e3:.1f}ms"
        return self.mode


@dataclass
class Launch:
    index: int
    plan: Plan
    resumes_from: int  # what resume=auto should pick: the newest valid checkpoint's step (0: none)
    killed_at: float | None = None  # seconds after the launch
    seconds: float = 0.0
    setup_seconds: float | None = None  # launch -> the loop set up (its "params |" line)
    doing: str = ""
    doing_kind: str = ""
    valid_after: int = 0
    returncode: int | None = None
    pid: int = 0
    log: str = ""
    notes: list[str] = field(default_factory=list)


def run_launch(cmd: list[str], out: Path, log_path: Path, launch: Launch, *, max_steps: int, every: int,
               limit_s: float = 300.0) -> Launch:
    """Start `cmd`, SIGKILL it as `launch.plan` says (or let it finish), then read what it left."""
    plan, ckdir = launch.plan, out / "checkpoints"
    seen: set[str] = set()
    appeared, kill = 0, False
    first_row: float | None = None  # when this launch's first metrics row appeared
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        launch.pid = proc.pid
        mine = f"-{proc.pid}"  # a .tmp dir an earlier launch left stays until this one's first save
        try:
            while proc.poll() is None:
                now = time.perf_counter() - start
                if now > limit_s:
                    raise RuntimeError(f"launch {launch.index} ran past {limit_s:.0f} s: see {log_path}")
                if plan.mode == "timed":
                    kill = now >= plan.at
                elif plan.mode == "checkpoint":
                    try:
                        names = {n for n in os.listdir(ckdir) if n.startswith(".tmp-step_") and n.endswith(mine)}
                    except FileNotFoundError:
                        names = set()
                    appeared += len(names - seen)
                    seen |= names
                    if appeared >= plan.nth:
                        if plan.delay:
                            time.sleep(plan.delay)
                        kill = True
                if launch.setup_seconds is None and plan.mode in ("first-row", "in-training", "finish") and \
                        "params |" in log_path.read_text(errors="replace"):
                    launch.setup_seconds = now
                if plan.mode in ("first-row", "in-training") and launch.setup_seconds is not None:
                    if first_row is None and last_row_step(out / "metrics.jsonl") > launch.resumes_from:
                        first_row = now  # this launch's first step is done
                    kill = first_row is not None and now >= first_row + plan.at
                if kill:
                    os.kill(proc.pid, signal.SIGKILL)
                    launch.killed_at = time.perf_counter() - start
                    break
                time.sleep(POLL_S if plan.mode == "checkpoint" else 0.001)
        finally:
            if proc.poll() is None and not kill:
                proc.kill()
            launch.returncode = proc.wait()
            launch.seconds = time.perf_counter() - start
    launch.log = log_path.read_text(encoding="utf-8", errors="replace")
    if kill and launch.returncode != -signal.SIGKILL:  # it ended on its own just before the signal
        launch.killed_at = None
        launch.notes.append(f"ended by itself (exit {launch.returncode}) before the kill")
    resumed = [line for line in launch.log.splitlines() if line.startswith("resumed from ")]
    if resumed and int(resumed[0].rsplit(" ", 1)[1]) != launch.resumes_from:
        launch.notes.append(f"expected resume=auto to pick step {launch.resumes_from}: {resumed[0]}")
    if not resumed and launch.resumes_from and "params |" in launch.log:
        launch.notes.append(f"did not resume from step {launch.resumes_from}")
    if launch.killed_at is not None:
        launch.doing_kind, launch.doing = what_it_was_doing(out, launch, max_steps, every)
    launch.valid_after = newest_valid_step(out)
    return launch


def what_it_was_doing(out: Path, launch: Launch, max_steps: int, every: int) -> tuple[str, str]:
    """(kind, details): read the directory as the killed process left it."""
    ckdir = out / "checkpoints"
    if "params |" not in launch.log:  # printed once the loop is set up (and has resumed)
        return "starting up", "starting up (imports, data, tokenizer, model, resume)"
    tmps = sorted(ckdir.glob(f".tmp-step_*-{launch.pid}")) if ckdir.is_dir() else []  # its own, not a leftover
    if tmps:
        step = int(tmps[-1].name.split("_")[1].split("-")[0])
        files = sorted(p.name for p in tmps[-1].iterdir())
        return "writing a checkpoint", f"writing checkpoint {step} (its .tmp dir holds: {', '.join(files) or 'nothing yet'})"
    pruning = sorted(ckdir.glob(f".old-step_*-{launch.pid}")) if ckdir.is_dir() else []
    damaged = sorted(p.name for p in ckdir.iterdir() if STEP_DIR.match(p.name) and checkpoint_problem(p)) \
        if ckdir.is_dir() else []
    if pruning or damaged:
        name = pruning[0].name.split("-")[1] if pruning else damaged[0]
        return "pruning an old checkpoint", f"pruning old checkpoint {name} ({'half' if damaged else 'being'} deleted)"
    metrics = out / "metrics.jsonl"
    newest = max([launch.resumes_from] + [r["step"] for r in metrics_rows(metrics) if "loss" in r])
    if metrics.is_file() and metrics.stat().st_size and not metrics.read_bytes().endswith(b"\n"):
        return "writing a metrics row", f"writing the metrics row of step {newest + 1}"
    due = newest == max_steps or newest % every == 0
    if due and newest not in checkpoint_steps(out):
        return "between a metrics row and its checkpoint", f"between step {newest}'s metrics row and its checkpoint"
    if newest == max_steps:
        return "after the last step", "after the last step (model directory, samples, summary)"
    return "training a step", f"training step {newest + 1}"


# ----------------------------------------------------------------------------- the test


def remaining_checkpoints(start: int, max_steps: int, every: int) -> int:
    return len({s for s in range(start + 1, max_steps + 1) if s % every == 0} | ({max_steps} - {start}))


def kill_test(workdir: Path, *, kills: int, max_steps: int, every: int, paragraphs: int, seed: int = 0,
              extra: tuple[str, ...] = (), echo=print) -> dict:
    """Run the reference and the killed run in `workdir`; return the verdict and every launch."""
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(workdir / "corpus.txt", paragraphs, seed)
    args = [*TINY, f"max_steps={max_steps}", f"checkpoint.every={every}", *extra]
    ref_out, out = workdir / "uninterrupted", workdir / "killed"
    for d in (ref_out, out):
        shutil.rmtree(d, ignore_errors=True)

    ref = run_launch(pretrain_command(corpus, ref_out, args), ref_out, workdir / "uninterrupted.log",
                     Launch(0, Plan("finish"), 0), max_steps=max_steps, every=every)
    if ref.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {ref.returncode}):\n{ref.log[-3000:]}")
    startup = ref.setup_seconds or ref.seconds / 2
    train_seconds = max(ref.seconds - startup, 0.1)
    echo(f"command (each launch): {' '.join(pretrain_command(corpus, out, [*args, 'resume=auto']))}")
    echo(f"uninterrupted run: {ref.seconds:.2f} s (start-up ~{startup:.2f} s, {max_steps} steps ~{train_seconds:.2f} s)")

    rng = random.Random(seed)
    launches: list[Launch] = []
    problems: list[str] = []
    killed = 0
    while killed < kills:
        start_step = newest_valid_step(out)
        left = remaining_checkpoints(start_step, max_steps, every)
        missed_writes = not any(x.doing_kind == "writing a checkpoint" for x in launches)
        # this launch's share of the remaining steps' time, so that the kills spread over the whole run
        train_left = train_seconds * (max_steps - start_step) / max_steps
        share = min(2 * train_left / (kills - killed), 0.8 * train_left)
        if killed == 0:
            plan = Plan("first-row")
        elif (killed % 3 == 1 or (killed == kills - 1 and missed_writes)) and left:
            plan = Plan("checkpoint", nth=rng.randint(1, min(3, left)), delay=rng.choice([0.0, rng.uniform(0, 0.003)]))
        elif killed % 3 == 2:
            plan = Plan("in-training", at=rng.uniform(0, share))
        else:
            plan = Plan("timed", at=rng.uniform(0, min(startup + share, 0.8 * (startup + train_left))))
        launch = run_launch(pretrain_command(corpus, out, [*args, "resume=auto"]), out,
                            workdir / f"launch_{len(launches) + 1:02d}.log", Launch(len(launches) + 1, plan, start_step),
                            max_steps=max_steps, every=every)
        launches.append(launch)
        if launch.killed_at is None:
            tail = "\n    ".join(launch.log.strip().splitlines()[-3:])
            echo(f"launch {launch.index:2d} [{plan.describe():>22}] from step {start_step}: not killed, exit "
                 f"{launch.returncode}\n    {tail}")
            problems.append(f"launch {launch.index} was not killed: it ended by itself with exit {launch.returncode}"
                            + (" (the run finished early: use more --max-steps)" if launch.returncode == 0 else ""))
            break
        killed += 1
        notes = f" [{'; '.join(launch.notes)}]" if launch.notes else ""
        echo(f"kill {killed:2d} [{plan.describe():>22}] resumed from {_step(start_step)}, killed at "
             f"{launch.killed_at:5.2f} s: {launch.doing} -> newest valid checkpoint {_step(launch.valid_after)}{notes}")
        problems += [f"launch {launch.index}: {n}" for n in launch.notes]

    if not problems:
        start_step = newest_valid_step(out)
        final = run_launch(pretrain_command(corpus, out, [*args, "resume=auto"]), out, workdir / "final.log",
                           Launch(len(launches) + 1, Plan("finish"), start_step), max_steps=max_steps, every=every)
        launches.append(final)
        echo(f"final launch: resumed from {_step(start_step)}, exit {final.returncode} after {final.seconds:.2f} s")
        problems += [f"final launch: {n}" for n in final.notes]
        if final.returncode != 0:
            problems.append(f"the final launch failed (exit {final.returncode}): {final.log.strip()[-2000:]}")
    return _verdict(ref_out, out, killed, launches, problems, echo)


def _verdict(ref_out: Path, out: Path, killed: int, launches: list[Launch], problems: list[str], echo) -> dict:
    result: dict = {"kills": killed, "launches": launches}
    doing: dict[str, int] = {}
    for launch in launches:
        if launch.killed_at is not None:
            doing[launch.doing_kind] = doing.get(launch.doing_kind, 0) + 1
    result["doing"] = doing
    echo("kills by what the process was doing: " + ", ".join(f"{k}: {v}" for k, v in sorted(doing.items())))
    model, ref_model = out / "model.safetensors", ref_out / "model.safetensors"
    result["sha256"] = (sha256(ref_model), sha256(model) if model.is_file() else None)
    echo(f"model.safetensors sha256: uninterrupted {result['sha256'][0]}")
    echo(f"                          killed+resumed {result['sha256'][1]}")
    if result["sha256"][0] != result["sha256"][1]:
        problems.append("model.safetensors differs from the uninterrupted run's")
    ref_rows, rows = comparable(metrics_rows(ref_out / "metrics.jsonl")), comparable(metrics_rows(out / "metrics.jsonl"))
    fields = sorted({k for r in ref_rows for k in r})
    if rows == ref_rows:
        echo(f"metrics.jsonl: {len(rows)} rows identical to the uninterrupted run's on {', '.join(fields)}")
    else:
        first = next((i for i, (a, b) in enumerate(zip(ref_rows, rows)) if a != b), min(len(rows), len(ref_rows)))
        problems.append(f"metrics.jsonl differs ({len(rows)} rows vs {len(ref_rows)}); first difference at row {first}: "
                        f"{rows[first] if first < len(rows) else None} vs {ref_rows[first] if first < len(ref_rows) else None}")
    kept, ref_kept = checkpoint_steps(out), checkpoint_steps(ref_out)
    echo(f"checkpoints kept: {kept} (uninterrupted: {ref_kept})")
    if kept != ref_kept:
        problems.append(f"checkpoints kept {kept}, the uninterrupted run kept {ref_kept}")
    left = leftovers(out) + [f"(uninterrupted) {p}" for p in leftovers(ref_out)]
    echo(f"leftovers (.tmp*, .old-*): {', '.join(left) or 'none'}")
    if left:
        problems.append(f"leftovers of interrupted writes: {', '.join(left)}")
    result["problems"], result["ok"] = problems, not problems
    for p in problems:
        echo(f"PROBLEM: {p}")
    echo(f"VERDICT: {'PASS' if not problems else 'FAIL'} ({killed} kills; the final model is "
         f"{'byte-identical to' if result['sha256'][0] == result['sha256'][1] else 'NOT the same as'} the uninterrupted run's)")
    return result


def _step(step: int) -> str:
    return f"step {step}" if step else "none (fresh start)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--paragraphs", type=int, default=300, help="documents in the training text")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill schedule and the text")
    parser.add_argument("--workdir", default="", help="keep everything here (default: a temporary directory)")
    args = parser.parse_args()
    print(f"kill test: {args.kills} SIGKILLs of `temper pretrain` (llama-tiny, {args.max_steps} steps, checkpoint "
          f"every {args.checkpoint_every}), each followed by resume=auto; seed {args.seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="temper-kill-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        result = kill_test(workdir, kills=args.kills, max_steps=args.max_steps, every=args.checkpoint_every,
                           paragraphs=args.paragraphs, seed=args.seed, echo=lambda s: print(s, flush=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
