"""Train/eval contamination: word n-gram overlap between a training corpus and eval sets.

Words are the lower-cased `\\w+` runs of a text, so case and punctuation do not matter.
The training side is streamed once and only 8-byte blake2b hashes of its n-grams are kept
(stable across processes, about 8 bytes of payload per distinct n-gram; a set costs more
per entry, so budget ~70 bytes each). An eval row is contaminated when any of its n-grams
occurs in the training corpus. A row shorter than `n` words is checked on its whole word
sequence when that has at least `MIN_SHORT_WORDS` words, and is skipped (counted) otherwise.
The default n=13 is the GPT-3 / lm-eval decontamination convention.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from temper.data.readers import iter_records, iter_texts
from temper.errors import TemperError

__all__ = ["words", "ngrams", "ngram_hashes", "build_index", "contamination_report", "row_text", "read_eval_set",
           "MIN_SHORT_WORDS"]

MIN_SHORT_WORDS = 8
MAX_EXAMPLES = 5
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits and underscore)."""
    return _WORD.findall(text.lower())


def _ngram_list(tokens: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    for i in range(len(tokens) - n + 1):
        yield tuple(tokens[i:i + n])


def ngrams(text: str, n: int = 13) -> list[tuple[str, ...]]:
    """The word n-grams of `text`, in order (empty when it has fewer than n words)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return list(_ngram_list(words(text), n))


def _hash(gram: Sequence[str]) -> int:
    digest = hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def ngram_hashes(tokens: Sequence[str], n: int) -> Iterator[int]:
    """The 8-byte hash of each word n-gram of `tokens` (from `words`), in order: the keys of `build_index`."""
    return (_hash(g) for g in _ngram_list(tokens, n))


def _texts(train: Iterable[str] | str | Path) -> Iterable[str]:
    if isinstance(train, (str, Path)):  # a data spec: files, a glob, a directory
        return iter_texts(train)
    return train


def build_index(texts: Iterable[str] | str | Path, n: int = 13) -> set[int]:
    """Hashes of every word n-gram of `texts` (an iterable of strings, or a data path for
    `temper.data.readers.iter_texts`), streamed: the texts themselves are not kept."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    index: set[int] = set()
    for text in _texts(texts):
        index.update(_hash(g) for g in _ngram_list(words(text), n))
    return index


def contamination_report(train_texts: Iterable[str] | str | Path,
                         eval_rows_texts: Mapping[str, Sequence[str]] | Sequence[str],
                         n: int = 13) -> dict[str, dict]:
    """Overlap of each eval set with the training texts (streamed once).

    `eval_rows_texts`: {set name: row texts}, or one list of row texts (named "eval").
    Returns {set name: {rows, checked, contaminated, fraction, skipped_short, examples}},
    where `fraction` = contaminated / checked (0.0 when nothing was checked) and `examples`
    holds up to 5 {index, ngram} of contaminated rows (ngram: the first overlapping one).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    sets = dict(eval_rows_texts) if isinstance(eval_rows_texts, Mapping) else {"eval": list(eval_rows_texts)}
    tokenized = {name: [words(t) for t in rows] for name, rows in sets.items()}
    # short rows: their whole word sequence is looked for among the training k-grams
    short: dict[int, set[int]] = {}
    for rows in tokenized.values():
        for toks in rows:
            if MIN_SHORT_WORDS <= len(toks) < n:
                short.setdefault(len(toks), set()).add(_hash(toks))
    index: set[int] = set()
    found_short: set[int] = set()
    for text in _texts(train_texts):
        toks = words(text)
        index.update(_hash(g) for g in _ngram_list(toks, n))
        for k, wanted in short.items():
            for g in _ngram_list(toks, k):
                h = _hash(g)
                if h in wanted:
                    found_short.add(h)

    report: dict[str, dict] = {}
    for name, rows in tokenized.items():
        contaminated, skipped, examples = 0, 0, []
        for i, toks in enumerate(rows):
            if len(toks) < n:
                if len(toks) < MIN_SHORT_WORDS:
                    skipped += 1
                    continue
                hit = tuple(toks) if _hash(toks) in found_short else None
            else:
                hit = next((g for g in _ngram_list(toks, n) if _hash(g) in index), None)
            if hit is not None:
                contaminated += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append({"index": i, "ngram": " ".join(hit)})
        checked = len(rows) - skipped
        report[name] = {"rows": len(rows), "checked": checked, "contaminated": contaminated,
                        "fraction": contaminated / checked if checked else 0.0,
                        "skipped_short": skipped, "examples": examples}
    return report


def row_text(row: dict, fields: list[str]) -> str:
    parts = []
    for key, value in row.items():
        if fields and key not in fields:
            continue
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return " ".join(parts)


def read_eval_set(spec: str, fields: list[str]) -> list[str]:
    """The texts of one eval= file's rows; a field of `fields` that no row has is an error (a typo would
    otherwise check nothing and report 0% contamination)."""
    rows = [r.data for r in iter_records(spec)]
    if fields:
        seen = {key for row in rows for key in row}
        missing = [f for f in fields if f not in seen]
        if missing:
            close = difflib.get_close_matches(missing[0], sorted(map(str, seen)), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TemperError(f"eval_fields={','.join(fields)}: no row of {spec} has a field '{missing[0]}'{hint}; "
                              f"its fields: {', '.join(sorted(map(str, seen))) or 'none'}")
    return [row_text(row, fields) for row in rows]
