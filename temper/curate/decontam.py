"""Decontamination: documents sharing a word 13-gram with an evaluation set are dropped.

The n-grams, words and hashes are those of `temper.eval.contamination` (the report of
`temper eval contamination`), so a corpus curated with the same eval files and n reports no
contamination there. An eval row shorter than n words is matched on its whole word sequence
when it has at least `MIN_SHORT_WORDS` (8) words, as the report does; shorter rows are counted
as unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from temper.config import OnlyWith, opt
from temper.eval.contamination import MIN_SHORT_WORDS, ngram_hashes, read_eval_set, words


@dataclass
class DecontamConfig:
    eval: list[str] = opt([], "evaluation files (JSONL/JSON/parquet/text; GSM8K test, temper eval sets, any file): "
                              "a document sharing an n-gram with any of their rows is dropped")
    eval_fields: list[str] = opt([], "fields of eval rows to read (default: every string field and message contents)")
    tasks: list[str] = opt([], "temper eval tasks (shipped names such as world_qa, or task YAMLs): each scored "
                               "row's prompt and reference, as `temper eval contamination=` checks them")
    world: str | None = opt(None, "the built-in world's directory, for tasks whose data is '{world}/...'")
    n: int = opt(13, "n-gram length in words (13: GPT-3's and lm-eval's convention)")

    only_with: ClassVar = (OnlyWith(("world",), "decontaminate.tasks=", lambda c: bool(c.tasks)),)

    def sets(self) -> dict[str, list[str]]:
        """{eval file or task name: its row texts}."""
        found = {spec: read_eval_set(spec, self.eval_fields) for spec in self.eval}
        if self.tasks:
            from temper.eval.tasks import (  # imports torch: only when asked
                iter_task_rows,
                load_task,
                resolve_task,
            )

            for spec in self.tasks:
                task = load_task(resolve_task(spec))
                found[f"task:{task.name}"] = [f"{r.context} {r.target or ''}".strip()
                                              for r in iter_task_rows(task, world_dir=self.world)]
        return found


class EvalIndex:
    """Hashes of the eval rows' n-grams (and of short rows' whole word sequences, by length)."""

    def __init__(self, cfg: DecontamConfig) -> None:
        self.n = cfg.n
        self.index: set[int] = set()
        self.short: dict[int, set[int]] = {}
        self.rows = self.unchecked = 0
        self.sets: dict[str, int] = {}
        for name, texts in cfg.sets().items():
            self.sets[name] = len(texts)
            for text in texts:
                toks = words(text)
                self.rows += 1
                if len(toks) >= self.n:
                    self.index.update(ngram_hashes(toks, self.n))
                elif len(toks) >= MIN_SHORT_WORDS:
                    self.short.setdefault(len(toks), set()).update(ngram_hashes(toks, len(toks)))
                else:
                    self.unchecked += 1

    def hit(self, text: str) -> bool:
        toks = words(text)
        if any(h in self.index for h in ngram_hashes(toks, self.n)):
            return True
        return any(h in wanted for k, wanted in self.short.items() for h in ngram_hashes(toks, k))

    def describe(self) -> dict:
        return {"sets": self.sets, "rows": self.rows, "n": self.n, "ngrams": len(self.index),
                "short_rows_checked_whole": sum(map(len, self.short.values())), "rows_too_short": self.unchecked}
