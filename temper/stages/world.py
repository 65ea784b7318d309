"""Write the built-in synthetic world (corpus, instructions, preferences, RL prompts) as JSONL.

A pretraining corpus with labelled planted noise, instruction rows, preference pairs and RL
prompts with verifiable answers, all generated from one seed.

    temper world output_dir=runs/world seed=0 num_people=60

Same seed, same bytes. See temper/data/world.py for what the world holds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from temper.config import opt
from temper.data.world import WorldConfig, build_world, write_world
from temper.io import owned_output_dir


@dataclass
class Config:
    output_dir: str = opt("runs/world", "where the JSONL files, facts.json and README.md are written")
    overwrite: bool = opt(False, "replace a world written earlier in output_dir")
    seed: int = opt(0, "random seed; the same seed writes byte-identical files")
    num_people: int = opt(60, "invented people, each with job, town, pet, colour, age and a friend")
    num_towns: int = opt(12, "invented towns (at most 16), each with a country and a river")
    docs_per_person: int = opt(50, "pretraining train documents about each person")
    docs_per_town: int = opt(6, "pretraining train documents about each town")
    num_arithmetic_docs: int = opt(500, "pretraining documents of arithmetic statements")
    num_dialogue_docs: int = opt(500, "pretraining documents of short Q/A dialogues")
    val_docs_per_person: int = opt(2, "pretraining val documents about each person (val also gets a tenth of the other kinds)")
    noise_fraction: float = opt(0.1, "fraction of pretraining train documents that are planted noise")
    heldout_fraction: float = opt(0.15, "fraction of question identities held out for the test splits")
    num_sft_train: int = opt(2000, "instruction rows in sft/train.jsonl")
    num_sft_test: int = opt(200, "instruction rows in sft/test.jsonl")
    num_pref_train: int = opt(1000, "preference pairs in preference/train.jsonl")
    num_pref_test: int = opt(100, "preference pairs in preference/test.jsonl")
    num_rl_train: int = opt(1000, "RL prompts in rl/train.jsonl")
    num_rl_test: int = opt(100, "RL prompts in rl/test.jsonl")
    num_prm_train: int = opt(1000, "step-labelled solutions in prm/train.jsonl (process reward models)")
    num_prm_test: int = opt(100, "step-labelled solutions in prm/test.jsonl")
    sft_style_noise: float = opt(0.0, "share of sft/train rows whose last reply is rambling, repetitive or rude "
                                      "(still correct; the row's `style` says which), like scraped instruction data")

    def world_config(self):
        names = {f.name for f in fields(WorldConfig)}
        return WorldConfig(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in names})

    def validate(self) -> None:
        self.world_config().validate()


def earlier_world(out: Path) -> list[str]:
    """What a world written earlier left in `out` (a model trained on it may name it as its world)."""
    return [name for name in ("facts.json", "README.md", "pretrain", "sft", "preference", "rl", "prm") if (out / name).exists()]


def run(cfg: Config) -> dict:
    # claimed first: never a model's directory, nor another run's; an earlier world only with overwrite=true
    with owned_output_dir(cfg.output_dir, command="world", overwrite=cfg.overwrite, earlier=earlier_world) as out:
        world = build_world(cfg.world_config())
        paths = write_world(world, out)
    files = {name: {"path": str(path), **({"rows": len(world.splits[name])} if name in world.splits else {})}
             for name, path in paths.items()}
    return {"output_dir": str(out), "people": len(world.people), "towns": len(world.towns), "files": files}


def summary_lines(cfg: Config, result: dict) -> list[str]:
    out, files = result["output_dir"], result["files"]
    splits: dict[str, list[str]] = {}
    for name, file in files.items():
        if "rows" in file:
            kind, _, split = name.partition("/")
            splits.setdefault(kind, []).append(f"{file['rows']:,} {split}")
    return [f"world: {result['people']} people, {result['towns']} towns -> {out} (what each file holds: {out}/README.md)",
            "  rows: " + " · ".join(f"{kind} {' / '.join(parts)}" for kind, parts in splits.items()),
            f"  next: temper pretrain data={out}/pretrain/train.jsonl eval_data={out}/pretrain/val.jsonl"]
