"""The model families, listed in one place, and the lookups every other module uses.

    family("gpt2")                         # the Family of ModelConfig.family
    for_architecture("LlamaForCausalLM")   # the Family that reads a config.json's architecture
    PRESETS, preset("llama-tiny")          # every family's presets

A new family is one folder under temper/models/ exporting `FAMILY` (see temper/models/family.py)
and one line in BUILTIN below; nothing else in temper names a family. `register` adds a family
at run time (a plugin, or a test's made-up family); the views (`FamilyTable`) that other modules
keep as dicts (`temper.models.FAMILIES`, `temper.models.hf.ADAPTERS`,
`temper.models.reward.REWARD_ARCHITECTURES`, `PRESETS`) read the registry on every access, so
they see it too.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from temper.errors import TemperError
from temper.models.bert import FAMILY as BERT
from temper.models.config import ModelConfig
from temper.models.family import Family
from temper.models.gpt2 import FAMILY as GPT2
from temper.models.llama import FAMILY as LLAMA

BUILTIN: tuple[Family, ...] = (LLAMA, GPT2, BERT)

_FAMILIES: dict[str, Family] = {}


def register(new: Family) -> Family:
    """Add a family; its name, architectures and preset names must be new."""
    if new.name in _FAMILIES:
        raise TemperError(f"model family {new.name!r} is registered already")
    for other in _FAMILIES.values():
        clash = (set(new.architectures) | set(new.reward_architectures)) & (
            set(other.architectures) | set(other.reward_architectures))
        clash |= set(new.presets) & set(other.presets)
        if clash:
            raise TemperError(f"model family {new.name!r}: {sorted(clash)[0]} belongs to family {other.name!r}")
    _FAMILIES[new.name] = new
    return new


def unregister(name: str) -> None:
    """Remove a family added by `register` (a test's)."""
    if any(f.name == name for f in BUILTIN):
        raise TemperError(f"model family {name!r} is built in")
    _FAMILIES.pop(name, None)


for _family in BUILTIN:
    register(_family)


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES.values())


def names() -> str:
    return ", ".join(_FAMILIES)


def family(name: str) -> Family:
    """The family of `ModelConfig.family`; an unknown name is one line listing the families."""
    found = _FAMILIES.get(name)
    if found is None:
        close = difflib.get_close_matches(str(name), list(_FAMILIES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TemperError(f"unknown model family {name!r}{hint}; expected one of {names()}")
    return found


def architectures() -> list[str]:
    """Every HF architecture temper reads as a model, in family order."""
    return [arch for f in _FAMILIES.values() for arch in f.architectures]


def for_architecture(arch: str) -> Family | None:
    """The family that reads HF architecture `arch` (a causal LM, an encoder's head), or None."""
    return next((f for f in _FAMILIES.values() if arch in f.architectures), None)


def for_model_type(model_type: str) -> str:
    """The default architecture of a config.json `model_type` ('' if no family has it)."""
    return next((f.model_types[model_type] for f in _FAMILIES.values() if model_type in f.model_types), "")


class FamilyTable(Mapping):
    """A read-only dict made from the registered families on each access (so a family registered
    later is in it): `FamilyTable(lambda f: {f.name: f.adapter})`."""

    def __init__(self, entries: Callable[[Family], Mapping[str, Any]]) -> None:
        self._entries = entries

    def _table(self) -> dict[str, Any]:
        table: dict[str, Any] = {}
        for f in _FAMILIES.values():
            table.update(self._entries(f))
        return table

    def __getitem__(self, key: str) -> Any:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


PRESETS: Mapping[str, ModelConfig] = FamilyTable(lambda f: f.presets)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A copy of a named preset, with fields changed."""
    presets = dict(PRESETS)
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TemperError(
            f"unknown model preset {name!r}{hint}; presets: {', '.join(presets)}; "
            "or give a model directory"
        )
    return presets[name].replace(**overrides)
