"""`temper run`: a pipeline of temper commands from one YAML file, each stage skipped when
nothing it depends on changed. A workflow: every stage runs through the command runner the CLI
hands it (`temper.cli.Commands`); nothing here imports a recipe or a command.

    temper run                                         # the shipped pipelines/lifecycle.yaml (~6 min on 2 cores)
    temper run lifecycle-tiny                          # the same stages at tiny sizes (seconds)
    temper run my.yaml sft.max_steps=50                # a stage's key, as on its own command line
    temper run my.yaml --from sft                      # rerun sft and every stage after it
    temper run my.yaml --only eval                     # run eval alone (its inputs must exist)
    temper run my.yaml --force                         # rerun every stage
    temper run my.yaml --check                         # check every stage's config, print the plan, run nothing

The pipeline YAML:

    name: tiny                       # default: the file's name; outputs go to runs/<name>/<stage>
    stages:                          # run in this order
      world:
        command: world
        num_people: 10
      pretrain:
        command: pretrain
        data: ${world}/pretrain/train.jsonl   # ${STAGE}: that earlier stage's output_dir
      ...

A stage is one temper command (`command:`) and that command's keys; its `output_dir`
defaults to `runs/<name>/<stage>`. `${STAGE}` anywhere in a string value is an earlier stage's
output directory (`$${` writes a literal `${`). Every stage's config is built and checked before
the first one runs: an unknown command, a reference to a stage that is not earlier in the file
(missing, later, or itself: no cycle can be written), or a config error is one line naming the
YAML file, its line and the stage.

What a finished stage did is recorded in `runs/<name>/.run/<stage>.json`: its resolved config,
its inputs (the run ids of the stages it refers to; size and modification time of every other
file or directory its config names) and the temper version. On the next run a stage is
skipped when its record says it finished with the same fingerprint and its output_dir is still
there. A stage that was interrupted (its record says `running` with the same fingerprint)
continues: a training command with `resume=auto` from its last checkpoint, any other command
starts its output afresh (`overwrite=true`). A stage that runs again after its config or inputs
changed overwrites its output (`overwrite=true`), and every stage that refers to it runs again
(its input's run id changed).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import os
import re
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from temper import __version__
from temper.config import load_yaml, opt, to_dict
from temper.configs import shipped_names, shipped_path
from temper.errors import TemperError, error_line
from temper.io import atomic_write_text
from temper.report.build import build_report, read_run_dir
from temper.report.terminal import duration, summary_text

REFERENCE = re.compile(r"\$(\$?)\{([^}]*)\}")
NOT_STAGES = ("run", "serve", "chat")  # interactive, or this very workflow
HASH_LIMIT = 1 << 20  # files up to this size are hashed by content; larger ones by size and mtime


@dataclass
class Config:
    pipeline: str = opt("lifecycle", "the pipeline YAML file, or the name of a shipped one "
                                          "(temper/configs/pipelines)")
    from_stage: str = opt("", "rerun this stage and every one after it (--from STAGE)")
    only: str = opt("", "run this stage alone (--only STAGE); the stages it refers to must have run")
    force: bool = opt(False, "rerun every stage (--force)")
    output_dir: str = opt("", "where the stages' outputs go (default: runs/<pipeline name>)")
    stages: dict = opt({}, "per-stage overrides, typed as STAGE.key=value on the command line")
    check: bool = opt(False, "check the pipeline (every stage's config) and print its stages; run nothing (--check)")
    seed: int | None = opt(None, "set seed= of every stage that has one, except world (the same world, other "
                                 "training draws: for the spread of a pipeline's numbers over seeds)")

    def validate(self) -> None:
        if self.from_stage and self.only:
            raise TemperError("--from and --only contradict each other: give one")


@dataclass
class Stage:
    name: str
    command: str
    settings: dict[str, Any]
    line: int  # of the stage's name in the YAML
    key_lines: dict[str, int] = field(default_factory=dict)
    refs: list[str] = field(default_factory=list)
    config: Any = None
    output_dir: str = ""


# ----------------------------------------------------------------------------- reading the pipeline


def pipeline_file(spec: str) -> Path:
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_path(spec, "pipelines")
    if shipped is None:
        raise TemperError(f"pipeline file not found: {spec} (shipped pipelines: "
                          f"{', '.join(shipped_names('pipelines'))})")
    return Path(shipped)


def read_pipeline(path: Path) -> tuple[str | None, list[Stage]]:
    """The pipeline's name and stages, with the YAML line of each stage and key."""
    data = load_yaml(path)  # the file, UTF-8, YAML, duplicate keys and a top-level mapping, as every config's
    root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)  # the lines of its keys
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        raise TemperError(f"{path}: expected a mapping with 'stages:' at the top level")
    unknown = [k for k in data if k not in ("name", "stages")]
    if unknown:
        raise TemperError(f"{path}: unknown top-level key '{unknown[0]}' (expected: name, stages)")
    nodes = {k.value: v for k, v in root.value}
    stages_node = nodes.get("stages")
    if not isinstance(data.get("stages"), dict) or not data["stages"] or not isinstance(stages_node, yaml.MappingNode):
        line = f":{stages_node.start_mark.line + 1}" if stages_node is not None else ""
        raise TemperError(f"{path}{line}: 'stages:' must be a mapping of stage names to their settings")
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name)):
        raise TemperError(f"{path}:{nodes['name'].start_mark.line + 1}: name must be a word (letters, digits, _.-)")
    stages = []
    seen: dict[str, int] = {}
    for key_node, value_node in stages_node.value:
        stage_name, line = str(key_node.value), key_node.start_mark.line + 1
        where = f"{path}:{line}: stage '{stage_name}'"
        if stage_name in seen:
            raise TemperError(f"{where} appears twice (first at line {seen[stage_name]})")
        seen[stage_name] = line
        if not re.fullmatch(r"[\w-]+", stage_name):
            raise TemperError(f"{where}: a stage name is a word (letters, digits, _ or -)")
        settings = data["stages"][key_node.value]
        if not isinstance(settings, dict) or not isinstance(value_node, yaml.MappingNode):
            raise TemperError(f"{where}: expected a mapping with 'command:' and the command's keys")
        key_lines = {str(k.value): k.start_mark.line + 1 for k, _ in value_node.value}
        settings = dict(settings)
        command = settings.pop("command", None)
        if not isinstance(command, str) or not command:
            raise TemperError(f"{where}: no 'command:' (the temper command this stage runs)")
        stages.append(Stage(stage_name, command, settings, line, key_lines))
    return name, stages


def substitute(value: Any, outputs: dict[str, str], found: list[str]) -> Any:
    """`${STAGE}` -> that stage's output_dir in every string of `value`; `found` collects the names."""
    if isinstance(value, str):
        def one(m: re.Match) -> str:
            if m.group(1):  # $${...}: a literal ${...}
                return "${" + m.group(2) + "}"
            found.append(m.group(2))
            return outputs.get(m.group(2), m.group(0))
        return REFERENCE.sub(one, value)
    if isinstance(value, list):
        return [substitute(v, outputs, found) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, outputs, found) for k, v in value.items()}
    return value


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def plan(path: Path, name: str, stages: list[Stage], out_root: Path, overrides: dict, commands) -> None:
    """Check every stage and build its config, before anything runs."""
    known = [s.name for s in stages]
    unknown = [k for k in overrides if k not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TemperError(f"override {unknown[0]}.*: no stage '{unknown[0]}' in {path}{hint}")
    usable = [c for c in commands.names() if c not in NOT_STAGES]
    outputs: dict[str, str] = {}
    for index, stage in enumerate(stages):
        where = f"{path}:{stage.line}: stage '{stage.name}'"
        if stage.command not in usable:
            close = difflib.get_close_matches(stage.command, usable, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            line = stage.key_lines.get("command", stage.line)
            raise TemperError(f"{path}:{line}: stage '{stage.name}': unknown command '{stage.command}'{hint}")
        settings = _merge(stage.settings, overrides.get(stage.name) or {})
        for key in ("resume", "overwrite"):
            if key in settings:
                line = stage.key_lines.get(key, stage.line)
                raise TemperError(f"{path}:{line}: stage '{stage.name}': '{key}' is set by temper run (an "
                                  "interrupted stage resumes, a changed one is overwritten; --force reruns)")
        refs: list[str] = []
        settings = substitute(settings, outputs, refs)
        for ref in refs:
            if ref not in outputs:
                line = _line_of(stage, ref, settings)
                later = ref in known[index:]
                if ref == stage.name:
                    why = "refers to itself (a cycle)"
                elif later:
                    why = f"refers to '{ref}', a later stage (a stage reads only earlier ones: reorder them; two " \
                          "stages that read each other are a cycle)"
                else:
                    close = difflib.get_close_matches(ref, known[:index], n=1)
                    hint = f" (did you mean '${{{close[0]}}}'?)" if close else ""
                    why = f"refers to '${{{ref}}}', which is no stage of this pipeline{hint}"
                raise TemperError(f"{path}:{line}: stage '{stage.name}' {why}")
        stage.refs = list(dict.fromkeys(refs))
        if commands.has_output_dir(stage.command):
            settings.setdefault("output_dir", str(out_root / stage.name))
        else:
            raise TemperError(f"{where}: command '{stage.command}' writes no output directory; temper run runs "
                              "commands that do")
        try:
            stage.config = commands.config(stage.command, settings, source=f"{path}:{stage.line}: stage "
                                                                           f"'{stage.name}'")
        except TemperError as e:
            raise TemperError(_with_key_line(str(e), path, stage)) from None
        stage.output_dir = str(stage.config.output_dir)
        same = next((s for s in stages[:index] if os.path.abspath(s.output_dir) == os.path.abspath(stage.output_dir)),
                    None)
        if same is not None:
            line = stage.key_lines.get("output_dir", stage.line)
            raise TemperError(f"{path}:{line}: stage '{stage.name}': output_dir {stage.output_dir} is stage "
                              f"'{same.name}'s output too: give each stage its own")
        outputs[stage.name] = stage.output_dir


def _line_of(stage: Stage, ref: str, settings: dict) -> int:
    for key, value in stage.settings.items():
        if "${" + ref + "}" in json.dumps(value, default=str):
            return stage.key_lines.get(key, stage.line)
    return stage.line


def _with_key_line(message: str, path: Path, stage: Stage) -> str:
    """A config error as one line naming the YAML file, the line and the stage: the line of the key
    the message names (the first one, by position) where it names one of the stage's keys, else the
    stage's own line. Errors from a config's own checks (`seq_len must be at least 1`) carry no
    source; they get it here."""
    source = f"{path}:{stage.line}: stage '{stage.name}'"
    body = message.removeprefix(source + ": ") if message.startswith(source) else message
    hits = []
    for key, line in stage.key_lines.items():
        m = re.search(rf"(?:^|[\s'`(]){re.escape(key)}(?=[\s'`.=:)]|$)", body)
        if m and key != "command":
            hits.append((m.start(), line))
    line = min(hits)[1] if hits else stage.line
    return f"{path}:{line}: stage '{stage.name}': {body}"


# ----------------------------------------------------------------------------- records and fingerprints


def record_path(out_root: Path, stage: Stage) -> Path:
    return out_root / ".run" / f"{stage.name}.json"


def read_record(out_root: Path, stage: Stage) -> dict:
    path = record_path(out_root, stage)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(out_root: Path, stage: Stage, record: dict) -> None:
    path = record_path(out_root, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")


def _paths_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value and os.path.exists(value) else []
    if isinstance(value, list):
        return [p for v in value for p in _paths_in(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths_in(v)]
    return []


def _file_stamp(path: Path) -> str:
    stat = path.stat()
    if stat.st_size <= HASH_LIMIT:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return f"size:{stat.st_size} mtime_ns:{stat.st_mtime_ns}"


def external_inputs(config_dict: dict, inside: list[str]) -> dict[str, str]:
    """Files and directories the config names that no stage of the pipeline wrote: a stamp of each."""
    stamps = {}
    roots = [os.path.realpath(p) for p in inside]
    for name in sorted(set(_paths_in(config_dict))):
        real = os.path.realpath(name)
        if any(real == r or real.startswith(r + os.sep) for r in roots):
            continue
        path = Path(name)
        if path.is_file():
            stamps[name] = _file_stamp(path)
        elif path.is_dir():
            entries = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in path.rglob("*") if p.is_file())
            stamps[name] = "dir:" + hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return stamps


def fingerprint(resolved: dict, inputs: dict) -> str:
    return hashlib.sha256(json.dumps({"config": resolved, "inputs": inputs}, sort_keys=True,
                                     default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- running


def run(cfg: Config, commands) -> dict:
    path = pipeline_file(cfg.pipeline)
    name, stages = read_pipeline(path)
    name = name or path.stem
    out_root = Path(cfg.output_dir or f"runs/{name}")
    names = [s.name for s in stages]
    for flag, value in (("--from", cfg.from_stage), ("--only", cfg.only)):
        if value and value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TemperError(f"{flag} {value}: no such stage in {path}{hint}; stages: {', '.join(names)}")
    overrides = dict(cfg.stages)
    if cfg.seed is not None:
        for stage in stages:
            if stage.command != "world" and commands.has_key(stage.command, "seed"):
                overrides[stage.name] = _merge({"seed": cfg.seed}, overrides.get(stage.name) or {})
    plan(path, name, stages, out_root, overrides, commands)
    if cfg.check:
        plan_lines = [f"{stage.name}: temper {stage.command} -> {stage.output_dir}"
                      + (f" <- {', '.join(stage.refs)}" if stage.refs else "") for stage in stages]
        return {"pipeline": str(path), "output_dir": str(out_root), "stages": [s.name for s in stages],
                "plan": plan_lines}
    start = names.index(cfg.from_stage) if cfg.from_stage else 0
    by_name = {s.name: s for s in stages}
    outputs = [s.output_dir for s in stages]
    run_ids: dict[str, str] = {}
    results = []
    print(f"temper run: {path} ({len(stages)} stages) -> {out_root}", file=sys.stderr)
    for index, stage in enumerate(stages):
        resolved = {k: v for k, v in to_dict(stage.config).items() if k not in ("resume", "overwrite")}
        record = read_record(out_root, stage)
        missing = [r for r in stage.refs if r not in run_ids]
        if cfg.only and stage.name != cfg.only:
            if record.get("state") == "done":
                run_ids[stage.name] = record["run_id"]
            results.append(_row(stage, "not run (--only)"))
            continue
        if missing:  # --only a stage whose inputs never ran
            raise TemperError(f"stage '{stage.name}' (--only) refers to '{missing[0]}', which has not run yet: run "
                              f"the pipeline (or --only {missing[0]}) first")
        inputs = {"stages": {r: run_ids[r] for r in stage.refs},
                  "files": external_inputs(resolved, [by_name[r].output_dir for r in stage.refs] + outputs)}
        print_ = fingerprint(resolved, inputs)
        forced = cfg.force or index >= start and bool(cfg.from_stage) or stage.name == cfg.only
        if (not forced and record.get("state") == "done" and record.get("fingerprint") == print_
                and Path(stage.output_dir).is_dir()):
            run_ids[stage.name] = record["run_id"]
            print(f"temper run [{index + 1}/{len(stages)}] {stage.name} ({stage.command}): unchanged, skipped",
                  file=sys.stderr)
            results.append(_row(stage, "skipped"))  # the seconds it took when it ran are in its record
            continue
        settings = {}
        # an interrupted stage continues; one rerun on request (--force, --from, --only) starts afresh
        interrupted = record.get("state") == "running" and record.get("fingerprint") == print_ and not forced
        if interrupted and hasattr(stage.config, "resume") and _has_checkpoint(stage.output_dir):
            settings["resume"] = "auto"
            how = "resuming from its checkpoint"
        elif hasattr(stage.config, "overwrite") and Path(stage.output_dir).exists():
            settings["overwrite"] = True
            how = "overwriting its earlier output"
        else:
            how = "running"
        config = dataclasses.replace(stage.config, **settings) if settings else stage.config
        run_id = uuid.uuid4().hex
        base = {"stage": stage.name, "command": stage.command, "fingerprint": print_, "run_id": run_id,
                "config": resolved, "inputs": inputs, "temper_version": __version__}
        write_record(out_root, stage, {"state": "running", **base})
        print(f"temper run [{index + 1}/{len(stages)}] {stage.name} ({stage.command}): {how} -> {stage.output_dir}",
              file=sys.stderr, flush=True)
        log = record_path(out_root, stage).with_suffix(".log")
        began = time.perf_counter()
        with StageOutput(log, stage.name) as output:
            try:
                commands.show(stage.command, config, commands.run(stage.command, config))  # into the log
            except (ValueError, OSError) as e:  # a TemperError, a full disk, a path that cannot be written
                failed = f"stage '{stage.name}' ({stage.command}): {error_line(e)}"
            else:
                failed = ""
        seconds = time.perf_counter() - began
        if failed:
            write_record(out_root, stage, {"state": "running", **base, "warnings": output.warnings, "error": failed})
            results.append(_row(stage, "failed", round(seconds, 3)))
            _write_summary(out_root, path, results)
            finish(out_root)  # the report of what finished
            raise TemperError(f"{failed} (its output: {log})")
        write_record(out_root, stage, {"state": "done", **base, "seconds": round(seconds, 3),
                                       "warnings": output.warnings})
        print(f"temper run [{index + 1}/{len(stages)}] {stage.name}: done in {duration(seconds)}", file=sys.stderr,
              flush=True)
        run_ids[stage.name] = run_id
        results.append(_row(stage, "ran", round(seconds, 3)))
    summary = _write_summary(out_root, path, results)
    finish(out_root)
    return summary


def summary_lines(cfg: Config, result: dict) -> list[str]:
    """`--check`: the plan; a run: the stages, every checkpoint against every metric, the held-out
    questions (`temper.report.terminal`, read from the same files as the HTML report)."""
    if "plan" in result:
        return result["plan"]
    out_root = Path(result["output_dir"])
    try:
        return [summary_text(read_run_dir(out_root))]
    except (ValueError, OSError) as e:
        return [f"warning: the summary of {out_root} could not be read: {error_line(e)}"]


def finish(out_root: Path) -> None:
    """Build the report of what the run left (report.html, its PNGs); one that cannot be built is a
    warning, never the run's failure."""
    try:
        read = read_run_dir(out_root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what could not be read is in the summary's warnings already
            build_report(out_root, read)
    except (ValueError, OSError) as e:
        print(f"warning: the report of {out_root} could not be built: {error_line(e)}", file=sys.stderr)


def _write_summary(out_root: Path, path: Path, results: list[dict]) -> dict:
    summary = {"pipeline": str(path), "output_dir": str(out_root), "stages": results}
    atomic_write_text(out_root / "run.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _row(stage: Stage, status: str, seconds: float | None = None) -> dict:
    row = {"stage": stage.name, "command": stage.command, "output_dir": stage.output_dir, "status": status}
    if seconds is not None:
        row["seconds"] = seconds
    return row


class _Tee(io.TextIOBase):
    """The terminal's stream, with every finished line also written to the stage's log (a progress
    bar's redraws, lines ending in \r, are kept from the log: only what a line says last)."""

    def __init__(self, stream, log):
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.log.write(line.rsplit("\r", 1)[-1] + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


class StageOutput:
    """While a stage runs: what it prints on stdout (its summary lines, tables, file lists) goes to
    `.run/<stage>.log` only; what it prints on stderr (progress bars, step lines, notes) shows on
    the terminal as it comes and goes to the log too; its warnings are shown, and kept in
    `warnings` for the stage's record and the report."""

    def __init__(self, log: Path, stage: str):
        self.path, self.stage, self.warnings = log, stage, []

    def __enter__(self) -> StageOutput:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.file, _Tee(sys.stderr, self.file)
        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if text not in self.warnings:
                self.warnings.append(text)
            print(f"warning: {self.stage}: {text}", file=sys.stderr)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc) -> None:
        self.catcher.__exit__(*exc)
        sys.stdout.flush()
        sys.stdout, sys.stderr = self.saved
        self.file.close()


def _has_checkpoint(output_dir: str) -> bool:
    folder = Path(output_dir) / "checkpoints"
    return folder.is_dir() and any(folder.iterdir())
