"""Check the cheap claims of README.md, BENCHMARKS.md and docs/*.md against the code.

    python docs/check_docs.py              # every doc; exit 1 with one line per wrong claim
    python docs/check_docs.py FILE.md ...  # those files only

What it checks (each a pattern a sentence can be held to, not English in general):

  options    every `key=value` typed after `temper STAGE` (in a code block, or inline code) names a key
             of that command's config, as `temper STAGE --help` lists it: the variant's config for
             `temper pretrain objective=mlm ...`, `STAGE.key` of `temper run` against the stage's
             command (a stage of a shipped pipeline, or a command's name), any sub-key of a
             free-form mapping (`model_config.*`, `dpo.*`). Upper-case keys (`STAGE.key`) are
             placeholders. `--config NAME`, `temper run NAME` and `tasks=NAME` must name a shipped
             config, pipeline or task where they name no file (no `/`, no `.yaml`).
  defaults   "`key=value` (the default", "`key=value`, the default" and "default `key=value`"
             must give the default of `key` in a command that has it.
  presets    "`llama-3m` (1.97M", "llama-tiny 0.2M", "llama-14m: 12.6M parameters", "llama-14m (temper
             preset): llama, 12.59M parameters" must be the preset's parameter count (built on the
             meta device, tied weights once) rounded as quoted: at the preset's vocabulary, or at
             the one a model `temper pretrain` builds with its trained tokenizer gets (its
             `vocab_size` default, 2,048, or a little less where the corpus runs out of merges,
             rounded up to a multiple of 64).
  versions   "torch 2.13.0+cpu", "transformers 5.25", "TRL 1.16", "peft 0.21.2": one version of each
             library (as far as a mention goes: 5.25 agrees with 5.25.0), except in a sentence that
             marks the version as another one: "older", "earlier", "at the time", or one that names
             two versions of the library.

docs/bad-inputs.md is left out of the first two: its commands are wrong on purpose.
"""

from __future__ import annotations

import functools
import math
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GENERATED = {"bad-inputs.md"}  # its commands are bad inputs, on purpose
PLACEHOLDER_VALUES = {"", "...", "…"}
OLDER = re.compile(r"\bolder\b|\bearlier\b|\bat the time\b|\bthen-current\b", re.I)
LIBRARIES = {"torch": "torch", "transformers": "transformers", "trl": "trl", "peft": "peft"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


# ----------------------------------------------------------------------------- what the code says


@functools.cache
def command_keys(name: str, variant: str | None = None) -> dict[str, tuple[str, str]]:
    """{key: (type, default)} of `temper NAME [variant] --help`."""
    from temper.cli import help_rows

    return {key: (typ, default) for key, typ, default, _ in help_rows(name, variant)}


@functools.cache
def all_defaults() -> dict[str, set[str]]:
    """{key: the defaults it has in the commands (and variants) that have it}."""
    from temper.cli import COMMANDS

    out: dict[str, set[str]] = {}
    for name, command in COMMANDS.items():
        variants = [None, *sorted(set(command.variants.modules))] if command.variants else [None]
        for variant in variants:
            for key, (_typ, default) in command_keys(name, variant).items():
                out.setdefault(key, set()).add(default)
    return out


@functools.cache
def pipeline_stages() -> dict[str, str]:
    """{stage name: its command} over the shipped pipelines."""
    import yaml

    from temper.configs import shipped_dir

    out = {}
    for path in sorted(shipped_dir("pipelines").glob("*.yaml")):
        for stage, spec in (yaml.safe_load(path.read_text()) or {}).get("stages", {}).items():
            if isinstance(spec, dict) and isinstance(spec.get("command"), str):
                out[stage] = spec["command"]
    return out


@functools.cache
def shipped(kind: str) -> tuple[str, ...]:
    from temper.configs import shipped_names

    return tuple(shipped_names(kind))


def _preset_vocab(name: str) -> int:
    from temper.models import registry

    return registry.preset(name).vocab_size


@functools.cache
def preset_counts(name: str) -> dict[int, int]:
    """{vocabulary size: parameters} of the models a doc may mean by preset `name` (the module docstring)."""
    import torch

    from temper.models import build_model, registry
    from temper.recipes.pretrain import Config as Pretrain

    def count(vocab: int) -> int:
        with torch.device("meta"):
            return build_model(registry.preset(name, vocab_size=vocab), device="meta").num_parameters()

    own = registry.preset(name).vocab_size
    counts = {own: count(own)}  # vocabulary size -> parameters
    if registry.preset(name).family in ("llama", "gpt2"):  # decoders temper pretrain builds with its tokenizer
        trained = Pretrain().vocab_size
        per_token = count(own + 64) - counts[own]  # the count is linear in the vocabulary (64 rows at a time)
        for vocab in range(64, trained + 1, 64):
            if vocab >= 0.9 * trained:
                counts[vocab] = counts[own] + (vocab - own) // 64 * per_token
    return counts


@functools.cache
def preset_names() -> tuple[str, ...]:
    from temper.models import registry

    return tuple(sorted(registry.PRESETS, key=len, reverse=True))  # longest first: llama-3.2-1b before llama-3


# ----------------------------------------------------------------------------- where claims are


def code_spans(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every piece of code: each line of a fenced or indented block (a line
    ending in a backslash joined to the next), and each inline `span` (which may cross a line break)."""
    out: list[tuple[int, str]] = []
    prose = []
    lines = text.split("\n")
    fenced, i = False, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
            i += 1
            continue
        indented = not fenced and line.startswith("    ") and (i == 0 or not lines[i - 1].strip()
                                                              or lines[i - 1].startswith("    "))
        if fenced or (indented and not line.lstrip().startswith(("-", "|", "*"))):
            start, joined = i, line
            while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined.rstrip()[:-1] + " " + lines[i].strip()
                prose.append("")
            out.append((start + 1, joined))
            prose.append("")
        else:
            prose.append(line)
        i += 1
    body = "\n".join(prose)
    for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", body):
        out.append((body.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")))
    return sorted(out)


def sentences(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each sentence of the prose and each line of a table or code block."""
    out = []
    para: list[tuple[int, str]] = []

    def flush():
        if para:
            joined = " ".join(t for _, t in para)
            offsets, at = [], 0
            for n, t in para:
                offsets.append((at, n))
                at += len(t) + 1
            starts = [0, *(m.end() for m in re.finditer(r"[.!?]\s+(?=[A-Z(`*\"\[])", joined))]
            for start, end in zip(starts, [*starts[1:], len(joined)]):
                line = max(n for off, n in offsets if off <= start)
                out.append((line, joined[start:end]))
            para.clear()

    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            flush()
        elif line.lstrip().startswith(("|", "```", "    ", "#")):
            flush()
            out.append((n, line))
        else:
            para.append((n, line))
    flush()
    return out


# ----------------------------------------------------------------------------- the checks

COMMAND_AT = re.compile(r"(?<![\w/.'-])temper\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?")
KEY = re.compile(r"^[a-z_][a-z0-9_]*(?:\.[a-z0-9_*]+)*$")


def _tokens(rest: str) -> list[str]:
    rest = re.split(r"\s#\s|\s#$|&&|\|\||\s\|\s|;", rest)[0]
    try:
        return shlex.split(rest)
    except ValueError:  # an unbalanced quote in a fragment
        return rest.split()


def _valid_key(key: str, keys: dict[str, tuple[str, str]]) -> bool:
    if key in keys:
        return True
    parts = key.split(".")
    return any(keys.get(".".join(parts[:i]), ("",))[0] == "dict" for i in range(1, len(parts)))


def check_commands(name: str, text: str) -> list[str]:
    from temper.cli import COMMANDS

    problems = []
    for line, code in code_spans(text):
        for m in COMMAND_AT.finditer(code):
            command = m.group(1)
            if m.group(2) and f"{command} {m.group(2)}" in COMMANDS:
                command = f"{command} {m.group(2)}"
                rest = code[m.end():]
            else:
                rest = code[m.end(1):]
            rest = rest.split(" temper ")[0] if " temper " in rest else rest
            tokens = [t[1:] if t.startswith("[") and "=" in t else t for t in _tokens(rest)]
            tokens = [t[:-1] if t.endswith("]") and t.count("[") < t.count("]") else t for t in tokens]
            typed = [t for t in tokens if "=" in t and not t.startswith("-") and KEY.match(t.split("=", 1)[0])]
            if command not in COMMANDS:
                if typed:
                    problems.append(f"{name}:{line}: `temper {command}` is not a command")
                continue
            problems += _check_invocation(name, line, command, tokens, typed)
    return problems


def _check_invocation(name: str, line: int, command: str, tokens: list[str], typed: list[str]) -> list[str]:
    from temper.cli import COMMANDS

    problems = []
    variants = COMMANDS[command].variants
    variant = None
    if variants is not None:
        given = [t.split("=", 1)[1] for t in typed if t.split("=", 1)[0] == variants.key]
        if given and given[0] in variants.modules:
            variant = given[0]
    keys = command_keys(command, variant)
    for i, token in enumerate(tokens):
        if token in ("--config", "-c") and i + 1 < len(tokens):
            problems += _check_shipped(name, line, tokens[i + 1], "", "--config", "config")
        elif command == "run" and i == 0 and "=" not in token and not token.startswith("-"):
            problems += _check_shipped(name, line, token, "pipelines", "temper run", "pipeline")
    for token in typed:
        key, value = token.split("=", 1)
        if command == "run" and key not in keys and "." in key:
            stage, sub = key.split(".", 1)
            target = pipeline_stages().get(stage, stage if stage in COMMANDS else None)
            if target is None:
                problems.append(f"{name}:{line}: `temper run ... {token}`: '{stage}' is neither a stage of a "
                                "shipped pipeline nor a command")
            elif not _valid_key(sub, command_keys(target)):
                problems.append(f"{name}:{line}: `temper run ... {token}`: `temper {target}` has no key '{sub}'")
            continue
        if not _valid_key(key, keys):
            shown = f"temper {command}" + (f" {variants.key}={variant}" if variant else "")
            problems.append(f"{name}:{line}: `{shown} {token}`: no key '{key}' (`{shown} --help`)")
        elif key == "tasks":
            for task in value.strip("[]").split(","):
                problems += _check_shipped(name, line, task.strip(), "tasks", "tasks=", "task")
    return problems


def _check_shipped(name: str, line: int, value: str, kind: str, where: str, what: str) -> list[str]:
    if (value in PLACEHOLDER_VALUES or "/" in value or value.endswith((".yaml", ".yml")) or not value.islower()
            or "..." in value or value.startswith("$")):
        return []
    if value not in shipped(kind):
        return [f"{name}:{line}: {where} {value}: no shipped {what} of that name ({', '.join(shipped(kind))})"]
    return []


DEFAULT_CLAIMS = [
    re.compile(r"`([a-z_][a-z0-9_.]*)=([^`\s]*)`,?\s+\(?the default\b"),
    re.compile(r"`([a-z_][a-z0-9_.]*)=([^`\s]*)`\s+\(default\)"),
    re.compile(r"\bdefault\s+`([a-z_][a-z0-9_.]*)=([^`\s]*)`"),
]


def _same_value(claimed: str, default: str) -> bool:
    import yaml

    if claimed == default:
        return True
    try:
        a, b = yaml.safe_load(claimed), yaml.safe_load(default)
    except yaml.YAMLError:
        return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    return a == b


def check_defaults(name: str, text: str) -> list[str]:
    problems = []
    flat = text.replace("\n", " ")
    for pattern in DEFAULT_CLAIMS:
        for m in pattern.finditer(flat):
            key, value = m.groups()
            line = text.count("\n", 0, m.start()) + 1  # flat keeps text's offsets
            defaults = all_defaults().get(key)
            if defaults is None and "." not in key:  # `eval_at_start=true` for logging.eval_at_start
                nested = [d for k, d in all_defaults().items() if k.endswith("." + key)]
                defaults = set().union(*nested) if nested else None
            if defaults is None:
                problems.append(f"{name}:{line}: `{key}={value}` is called a default, but no command has '{key}'")
            elif not any(_same_value(value, d) for d in defaults):
                problems.append(f"{name}:{line}: `{key}={value}` is called the default; the default is "
                                f"{' or '.join(sorted(defaults))}")
    return problems


def check_presets(name: str, text: str) -> list[str]:
    names = "|".join(re.escape(n) for n in preset_names())
    patterns = [
        re.compile(rf"(?<![\w.-])`?({names})`?(?![\w.-])(?:\s*\(|:\s+|\s+)~?(\d+(?:\.\d+)?)\s?([kMB])\b"
                   rf"(?!\s+parameters\s+in\b)"),
        re.compile(rf"(?<![\w.-])({names}) \(temper preset\): \w+, (\d+(?:\.\d+)?)([kMB]) parameters"),
    ]
    scale = {"k": 1e3, "M": 1e6, "B": 1e9}
    problems = []
    for pattern in patterns:
        for m in pattern.finditer(text):
            preset, number, unit = m.groups()
            decimals = len(number.split(".")[1]) if "." in number else 0
            counts = preset_counts(preset)
            if not any(round(c / scale[unit], decimals) == float(number) for c in counts.values()):
                line = text.count("\n", 0, m.start()) + 1
                own = counts[min(counts)] if len(counts) == 1 else counts[_preset_vocab(preset)]
                trained = "" if len(counts) == 1 else \
                    f" ({min(counts.values()):,}-{max(counts.values()):,} with a tokenizer temper pretrain trains)"
                problems.append(f"{name}:{line}: {preset} is said to have {number}{unit} parameters; it has "
                                f"{own:,}{trained}")
    return problems


VERSION = re.compile(r"(?<![\w/.-])(torch|transformers|trl|TRL|peft|PEFT)(?:\s+|==)(\d\.\d+(?:\.\d+)?)"
                     r"(\+[a-z0-9]+)?(?![\d.]*\d|e-|[\w-])")


def check_versions(texts: dict[str, str]) -> list[str]:
    mentions: dict[str, list[tuple[str, int, str]]] = {}  # library -> (file, line, version)
    for name, text in texts.items():
        for line, sentence in sentences(text):
            found = [(m.group(1).lower(), m.group(2)) for m in VERSION.finditer(sentence)]
            for lib, version in found:
                others = {v for other, v in found if other == lib and not _agrees(v, version)}
                if others or OLDER.search(sentence):
                    continue  # named as another version than the project's
                mentions.setdefault(lib, []).append((name, line, version))
    problems = []
    for lib, found in mentions.items():
        # the project's version: the one most mentions agree with (the most precise spelling of it)
        versions = [v for _, _, v in found]
        current = max(versions, key=lambda v, vs=versions: (sum(_agrees(v, w) for w in vs), v.count(".")))
        for name, line, version in found:
            if not _agrees(version, current):
                problems.append(f"{name}:{line}: {lib} {version}, elsewhere {lib} {current}: say which is older "
                                "(\"an older ...\") or quote one version")
    return problems


def _agrees(a: str, b: str) -> bool:
    pa, pb = a.split("."), b.split(".")
    return pa[:len(pb)] == pb[:len(pa)]


# ----------------------------------------------------------------------------- the whole check


def check(texts: dict[str, str]) -> list[str]:
    """Every wrong claim of the docs `texts` ({name: Markdown}), one line each."""
    problems = []
    for name, text in texts.items():
        if Path(name).name not in GENERATED:
            problems += check_commands(name, text)
            problems += check_defaults(name, text)
        problems += check_presets(name, text)
    return problems + check_versions(texts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files = [Path(a) for a in argv] or doc_files()
    texts = {}
    for path in files:
        try:
            texts[str(path.relative_to(ROOT)) if path.is_absolute() and ROOT in path.parents else str(path)] = \
                path.read_text(encoding="utf-8")
        except OSError as e:
            print(f"{path}: {e.strerror}", file=sys.stderr)
            return 2
    problems = check(texts)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

