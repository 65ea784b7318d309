"""Typed configs: dataclasses, YAML files and `key.sub=value` overrides.

Every stage declares one dataclass. A field is declared with `opt(default, "help")`, so
`temper STAGE --help` can list its type, default and description. Loading goes
YAML file -> dotted command-line overrides -> `from_dict`, which checks every key and
coerces every value to the declared type. A mistake is one `TemperError` line that names
the key (and the YAML file) and suggests the nearest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from temper.errors import TemperError, require_file

__all__ = [
    "opt",
    "load_config",
    "from_dict",
    "to_dict",
    "config_help",
    "parse_overrides",
    "check_given_once",
    "OnlyWith",
    "OptimConfig",
    "ScheduleConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "PeftConfig",
]


def opt(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """Declare a config field with its one-line description."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": help})
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help})
    if is_dataclass(default):
        value = default
        return field(default_factory=lambda: copy.deepcopy(value), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check_range(key: str, value: float, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """A number within [low, high] (open ends where asked), finite, or one line naming the key."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    bad = value != value or value in (float("inf"), float("-inf"))
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        if low is not None and high is not None:
            expected = f"in {lo}, {hi}"
        elif low is not None:
            expected = f"{'greater than' if low_open else 'at least'} {low:g}"
        else:
            expected = f"{'less than' if high_open else 'at most'} {high:g}"
        raise TemperError(f"{key} must be {expected}, got {value}")


def check_utf8(key: str, value: str | None) -> None:
    """Text typed on a command line or read from a terminal reaches Python with undecodable bytes
    kept as surrogates; say which byte, instead of failing later inside the tokenizer."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = value[e.start:e.end].encode("utf-8", "surrogateescape")
        raise TemperError(f"{key} is not valid UTF-8 (byte 0x{raw[0]:02x} at character {e.start}); "
                          "give the text in UTF-8") from None


@dataclass(frozen=True)
class OnlyWith:
    """Keys that only one mode of a command reads. Set to anything but their default while the mode
    is off, they would be ignored, so loading refuses them in one line naming the mode that reads them.

    A config class lists its rules in `only_with` (a subclass adds to its bases'; a section's rules
    name its own keys and apply wherever it is embedded); `active(config)` says whether the mode is
    on, for the config that declares the rule. `why`, if given, replaces the generic ending."""

    keys: tuple[str, ...]
    mode: str  # what turns the mode on, as a user writes it: "peft.method=lora, dora or qlora"
    active: Callable[[Any], bool]
    why: str = ""


def _rules(cls: type) -> list[OnlyWith]:
    return [rule for klass in reversed(cls.__mro__) for rule in vars(klass).get("only_with", ())]


def check_only_with(obj: Any) -> None:
    """Refuse every key of a rule (`OnlyWith`) that is set while its mode is off, in `obj` and its
    sections; "set" is "differs from the default of the top-level class", so a value spelled out
    as the default (`--print-config` output read back) is not a mistake."""
    root = type(obj)

    def default_at(path: list[str]) -> Any:
        value = field_default(root, path[0])
        for part in path[1:]:
            value = getattr(value, part)
        return value

    def walk(node: Any, prefix: list[str]) -> None:
        for rule in _rules(type(node)):
            if rule.active(node):
                continue
            for key in rule.keys:
                path = [*prefix, *key.split(".")]
                value = node
                for part in key.split("."):
                    value = getattr(value, part)
                if value != default_at(path):
                    name = ".".join(path) + (".*" if isinstance(value, dict) else "")
                    ending = f"; {rule.why}" if rule.why else ": here it would be ignored; drop it"
                    raise TemperError(f"{name} is used only with {rule.mode}{ending}")
        for f in fields(node):
            value = getattr(node, f.name)
            if is_dataclass(value) and not isinstance(value, type):
                walk(value, [*prefix, f.name])

    walk(obj, [])


def field_default(cls: type, key: str) -> Any:
    """A config class's default for `key` (a factory's product for lists and sections)."""
    f = cls.__dataclass_fields__[key]
    return f.default_factory() if f.default_factory is not MISSING else f.default


# ----------------------------------------------------------------------------- shared sections
# One schema for what every training stage shares; each training recipe embeds these.


@dataclass
class OptimConfig:
    name: Literal["adamw"] = opt("adamw", "optimiser")
    lr: float = opt(3e-4, "peak learning rate")
    weight_decay: float = opt(0.1, "decoupled weight decay, applied to matrices only (dim >= 2)")
    betas: list[float] = opt([0.9, 0.95], "AdamW (beta1, beta2)")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 disables)")
    fused: bool = opt(True, "use the fused / foreach AdamW kernels where available")

    def validate(self) -> None:
        check_range("optim.lr", self.lr, low=0.0)
        check_range("optim.weight_decay", self.weight_decay, low=0.0)
        check_range("optim.eps", self.eps, low=0.0, low_open=True)
        check_range("optim.grad_clip", self.grad_clip, low=0.0)
        if len(self.betas) != 2:
            raise TemperError(f"optim.betas must be two numbers (beta1, beta2), got {self.betas}")
        for i, b in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", b, low=0.0, high=1.0, high_open=True)


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate schedule after warmup")
    warmup_steps: int = opt(-1, "linear warmup steps (-1: warmup_ratio of max_steps)")
    warmup_ratio: float = opt(0.02, "warmup as a fraction of max_steps when warmup_steps is -1")
    min_lr_ratio: float = opt(0.1, "floor of the decay as a fraction of the peak lr")

    only_with: ClassVar = (
        OnlyWith(("warmup_ratio",), "schedule.warmup_steps=-1", lambda s: s.warmup_steps == -1,
                 "schedule.warmup_steps sets the warmup here: give one of them"),
        OnlyWith(("min_lr_ratio",), "schedule.name=cosine or linear", lambda s: s.name != "constant",
                 "a constant schedule keeps the peak lr after warmup"),
    )

    def validate(self) -> None:
        if self.warmup_steps < -1:
            raise TemperError(f"schedule.warmup_steps must be -1 (use warmup_ratio) or at least 0, got {self.warmup_steps}")
        check_range("schedule.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        check_range("schedule.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)


@dataclass
class CheckpointConfig:
    every: int = opt(0, "save a checkpoint every N optimiser steps (0: only at the end)")
    keep_last: int = opt(2, "keep the newest K checkpoints (0: keep all)")

    def validate(self) -> None:
        check_range("checkpoint.every", self.every, low=0)
        check_range("checkpoint.keep_last", self.keep_last, low=0)


@dataclass
class LoggingConfig:
    every: int = opt(10, "log training metrics every N steps")
    eval_every: int = opt(0, "evaluate on the validation split every N steps (0: only at the end)")
    eval_at_start: bool = opt(False, "also evaluate before the first step (the 'before' numbers)")
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(False, "also write TensorBoard events (needs the tensorboard package)")

    def validate(self) -> None:
        check_range("logging.every", self.every, low=1)
        check_range("logging.eval_every", self.eval_every, low=0)


@dataclass
class PeftConfig:
    method: Literal["none", "lora", "dora", "qlora", "adapter", "prefix", "prompt"] = opt(
        "none", "parameter-efficient method (none: full fine-tuning)"
    )
    r: int = opt(8, "LoRA rank")
    alpha: float = opt(16.0, "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    target_modules: list[str] = opt(["q_proj", "v_proj"], "module names, a regex (re:...), or all-linear")
    rslora: bool = opt(False, "rank-stabilised LoRA scaling alpha/sqrt(r)")
    modules_to_save: list[str] = opt([], "modules trained in full and saved with the adapter (e.g. lm_head)")
    adapter_dim: int = opt(16, "bottleneck adapter width")
    num_virtual_tokens: int = opt(16, "prefix / prompt tuning: learned virtual tokens")
    prefix_projection: bool = opt(False, "prefix tuning: reparameterise the prefixes through an MLP")
    prefix_hidden: int = opt(128, "prefix tuning: hidden width of the reparameterisation MLP")
    prompt_init_text: str | None = opt(None, "prompt tuning: initialise the soft prompt from this text's embeddings")
    quant_block_size: int = opt(64, "QLoRA: NF4 block size")
    double_quant: bool = opt(True, "QLoRA: quantise the block scales too (8-bit, blocks of 256)")

    only_with: ClassVar = (
        OnlyWith(("r", "alpha", "dropout", "target_modules", "rslora", "modules_to_save"),
                 "peft.method=lora, dora or qlora", lambda p: p.method in ("lora", "dora", "qlora")),
        OnlyWith(("quant_block_size", "double_quant"), "peft.method=qlora", lambda p: p.method == "qlora"),
        OnlyWith(("adapter_dim",), "peft.method=adapter", lambda p: p.method == "adapter"),
        OnlyWith(("num_virtual_tokens",), "peft.method=prefix or prompt", lambda p: p.method in ("prefix", "prompt")),
        OnlyWith(("prefix_projection", "prefix_hidden"), "peft.method=prefix", lambda p: p.method == "prefix"),
        OnlyWith(("prompt_init_text",), "peft.method=prompt", lambda p: p.method == "prompt"),
    )


# ----------------------------------------------------------------------------- loading


class _Raw(str):
    """A value typed on the command line: parsed as YAML unless the field is a string."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict of raw strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise TemperError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise TemperError(f"empty key in {item!r}")
        _set_dotted(out, key.split("."), _Raw(value))
    return out


def check_given_once(items: list[str]) -> None:
    """One value per key on a command line: a key typed twice, or a section and a key inside it
    (`optim=...` and `optim.lr=...`), would silently lose one of them. (Programs that build a list
    of overrides may let a later one win; a person typing both made a mistake.)"""
    given: dict[str, str] = {}  # key -> the item that set it
    for item in items:
        key = item.split("=", 1)[0].strip()
        for other, earlier in given.items():
            if other == key or other.startswith(key + ".") or key.startswith(other + "."):
                both = f"{earlier!r} and {item!r}"
                raise TemperError(f"key '{key}' is given twice on the command line ({both}): give it once"
                                  if other == key else f"{both} both set '{min(key, other, key=len)}': give one")
        given[key] = item


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        node = tree.get(p)
        if not isinstance(node, dict):
            node = tree[p] = {}
        tree = node
    tree[parts[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_yaml(path: str | Path) -> dict:
    p = require_file(path, "config file")  # a FIFO or /dev/zero behind a .yaml name is refused, not read
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as e:
        raise TemperError(f"{p}:{e.line}: key '{e.key}' appears twice in one mapping (the first would be lost)") from None
    except UnicodeDecodeError as e:
        raise TemperError(f"{p}: not UTF-8 at byte offset {e.start}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise TemperError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TemperError(f"{p}: expected a mapping of keys at the top level")
    return data


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(cls: type, config_file: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from an optional YAML file and `key=value` overrides (the latter win)."""
    data: dict = {}
    source = "command line"
    if config_file is not None:
        data = load_yaml(config_file)
        source = str(config_file)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data, source=source)


def from_dict(cls: type, data: dict, *, prefix: str = "", source: str = "config", root: type | None = None,
              check_modes: bool = True):
    """Check keys and coerce values of `data` into dataclass `cls`; `check_modes=False` skips the
    `OnlyWith` rules (for a record written by temper itself, not typed by a user)."""
    root = root or cls
    if not isinstance(data, dict):
        raise TemperError(f"{source}: '{prefix.rstrip('.') or cls.__name__}' must be a mapping")
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in by_name:
            raise TemperError(_unknown_key(root, prefix + str(key), source))
        f = by_name[key]
        if is_dataclass(hints[key]) and isinstance(value, dict) and f.default_factory is not MISSING:
            # a section keeps the stage's own defaults for the keys not given
            section = from_dict(hints[key], value, prefix=prefix + key + ".", source=source, root=root)
            given = {k: getattr(section, k) for k in value}
            kwargs[key] = dataclasses.replace(f.default_factory(), **given)
            continue
        kwargs[key] = _coerce(value, hints[key], prefix + key, source, root)
        if hints[key] is str and not kwargs[key].strip() and isinstance(f.default, str) and f.default.strip():
            # `output_dir=$UNSET`: an empty value where the default names something is a value left out
            raise TemperError(f"{source}: key '{prefix}{key}' is empty; give a value (default: {f.default})")
    try:
        obj = cls(**kwargs)
    except TypeError:  # a required field is missing
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in kwargs]
        if missing:
            raise TemperError(f"{source}: missing required key '{prefix}{missing[0]}'") from None
        raise
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    if not prefix and check_modes:  # the whole config: its keys that a mode it is not in would ignore
        check_only_with(obj)
    return obj


def check_keys(given: dict, dataclass_type: type, prefix: str, source: str = "config") -> dict:
    """A free-form mapping of overrides (e.g. `model_config.*`) must name fields of `dataclass_type`;
    returns the values coerced to the fields' types (a wrong type is one line naming the key)."""
    known = sorted(f.name for f in fields(dataclass_type))
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{prefix}.{close[0]}'?)" if close else ""
            raise TemperError(f"unknown key '{prefix}.{key}'{hint}")
    hints = typing.get_type_hints(dataclass_type)
    return {key: _coerce(value, hints[key], f"{prefix}.{key}", source) for key, value in given.items()}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        keys.append(prefix + f.name)
        if is_dataclass(t):
            keys.extend(_all_keys(t, prefix + f.name + "."))
    return keys


# Keys that were renamed so that every recipe uses one name per setting: old -> new.
RENAMED_KEYS = {"val_data": "eval_data", "val_fraction": "eval_fraction", "max_seq_len": "seq_len",
                "general_eval_batches": "eval_batches"}


def _unknown_key(root: type, key: str, source: str) -> str:
    new = RENAMED_KEYS.get(key)
    if new is not None and new in {f.name for f in fields(root)}:
        return f"{source}: key '{key}' is now called '{new}' (one name in every recipe)"
    moved = getattr(root, "moved_keys", {})  # a config's own record of keys that left it: key -> where they went
    if key in moved:
        return f"{source}: key '{key}' {moved[key]}"
    candidates = _all_keys(root)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # try the last part alone: `lrr` -> `optim.lr`
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        m = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[m[0]]] if m else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown key '{key}'{hint}"


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(t)) + "}"
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + (" | null" if len(args) < len(typing.get_args(t)) else "")
    if origin in (list, tuple):
        args = typing.get_args(t)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "dict"
    if is_dataclass(t):
        return "section"
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, t: Any, key: str, source: str, root: type | None = None) -> Any:
    def fail(expected: str) -> TemperError:
        shown = str(value) if isinstance(value, _Raw) else repr(value)
        return TemperError(f"{source}: key '{key}' expects {expected}, got {shown}")

    origin = typing.get_origin(t)
    if t is Any:
        return _parse_raw(value)
    if origin in (Union, types.UnionType):
        args = typing.get_args(t)
        if type(None) in args and (value is None or (isinstance(value, _Raw) and value.strip().lower() in ("null", "none", "~", ""))):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source, root)
            except TemperError:
                pass
        raise fail(_type_name(t))
    if is_dataclass(t):
        if isinstance(value, _Raw):
            raise fail(f"a section (set its keys as {key}.NAME=VALUE)")
        return from_dict(t, value, prefix=key + ".", source=source, root=root)
    if origin is Literal:
        choices = typing.get_args(t)
        v = str(value) if isinstance(value, _Raw) else value
        if v not in choices:
            raise TemperError(f"{source}: key '{key}' must be one of {', '.join(map(str, choices))}; got {v!r}")
        return v
    if origin in (list, tuple):
        (item_t,) = typing.get_args(t)[:1] or (Any,)
        if isinstance(value, _Raw):
            s = value.strip()
            if s.startswith("["):
                value = _parse_raw(value)
            elif s == "":
                value = []
            else:
                value = [_Raw(x.strip()) for x in s.split(",")]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item_t, f"{key}[{i}]", source, root) for i, v in enumerate(value)]
    if origin is dict or t is dict:
        value = _parse_raw(value)
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {k: _parse_nested(v) for k, v in value.items()}
    if t is str:
        if isinstance(value, (dict, list)):
            raise fail("a string")
        return str(value)
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            s = value.strip().lower()
            if s in ("true", "yes", "on", "1"):
                return True
            if s in ("false", "no", "off", "0"):
                return False
        raise fail("true or false")
    if t is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.strip().replace("_", ""))
            except ValueError:
                raise fail("an integer") from None
            if f.is_integer():
                return int(f)
        raise fail("an integer")
    if t is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise fail("a number") from None
        else:
            raise fail("a number")
        if not math.isfinite(number):  # no setting means anything by NaN or infinity
            raise fail("a finite number")
        return number
    if t is Path:
        return Path(str(value))
    raise AssertionError(f"config type {t!r} of '{key}' is not supported")


def _parse_raw(value: Any) -> Any:
    if isinstance(value, _Raw):
        try:
            return yaml.safe_load(str(value))
        except yaml.YAMLError:
            return str(value)
    return value


def _parse_nested(value: Any) -> Any:
    """A free-form mapping's values as YAML would give them, at every depth (`dpo.optim.lr=1e-3`)."""
    value = _parse_raw(value)
    if isinstance(value, dict):
        return {k: _parse_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_parse_nested(v) for v in value]
    return value


def to_dict(obj: Any) -> Any:
    """A config as plain data (for `config.yaml` beside a run's outputs)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_help(cls: type, prefix: str = "", values: Any = None) -> list[tuple[str, str, str, str]]:
    """Rows of (key, type, default, help) for every field, sections flattened with dots. A
    section's defaults are those of the instance its field defaults to (`values`: a recipe's
    own, e.g. GRPO's optim.lr), not its class's."""
    rows, sections = [], []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if values is not None:
            default = getattr(values, f.name)
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if is_dataclass(t):  # sections after the plain keys
            sections.extend(config_help(t, prefix + f.name + ".", default if is_dataclass(default) else None))
            continue
        shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else str(default))
        rows.append((prefix + f.name, _type_name(t), shown, f.metadata.get("help", "")))
    return rows + sections


def replace(obj, **changes):
    """`dataclasses.replace` re-exported for configs."""
    return dataclasses.replace(obj, **changes)
