"""Heuristic quality filters with their published thresholds (as datatrove implements them).

- Gopher quality and Gopher repetition: Rae et al. 2021, "Scaling Language Models" (Table A1).
- C4: Raffel et al. 2020, section 2.2 (datatrove's C4QualityFilter: it also edits the text, dropping
  lines without terminal punctuation, short lines, lines naming javascript or cookie/terms policies).
- FineWeb: Penedo et al. 2024 (datatrove's FineWebQualityFilter).

Each check returns None (keep) or the name of the reason ("gopher_short_doc", ...); the C4 filter
also returns the edited text. Departure from datatrove: words are `\\w+` runs and single
punctuation marks (a regex), not nltk's `word_tokenize`, so counts differ slightly on
contractions and quotes; C4 counts sentences by terminal punctuation marks inside kept lines
(not nltk's punkt).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

from temper.config import opt

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))  # Gopher's
_TOKEN = re.compile(r"\w+|[^\w\s]")
_PUNCT = set(string.punctuation)
CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$|[\"'])")


def tokens(text: str) -> list[str]:
    """Words and punctuation marks, in order (a stand-in for nltk's word_tokenize)."""
    return _TOKEN.findall(text)


@dataclass
class GopherQualityConfig:
    enabled: bool = opt(True, "apply Gopher's quality rules")
    min_doc_words: int = opt(50, "fewer words (punctuation not counted) drops the document; 0 turns it off")
    max_doc_words: int = opt(100_000, "more words drops the document; 0 turns it off")
    min_avg_word_length: float = opt(3.0, "mean word length below this drops the document")
    max_avg_word_length: float = opt(10.0, "mean word length above this drops the document")
    max_symbol_word_ratio: float = opt(0.1, "'#' per word, or '...' per word, above this drops the document")
    max_bullet_lines_ratio: float = opt(0.9, "share of lines starting with a bullet above this drops it")
    max_ellipsis_lines_ratio: float = opt(0.3, "share of lines ending in an ellipsis above this drops it")
    max_non_alpha_words_ratio: float = opt(0.8, "fewer than this share of words with a letter drops it")
    min_stop_words: int = opt(2, "fewer distinct Gopher stop words (the, be, to, of, and, that, have, with; "
                                 "case-sensitive, as datatrove) drops it")


def gopher_quality(text: str, cfg: GopherQualityConfig) -> str | None:
    toks = tokens(text)
    words = [w for w in toks if w not in _PUNCT]
    n = len(words)
    if cfg.min_doc_words and n < cfg.min_doc_words:
        return "gopher_short_doc"
    if cfg.max_doc_words and n > cfg.max_doc_words:
        return "gopher_long_doc"
    if n == 0:
        return "gopher_short_doc"
    mean = sum(map(len, words)) / n
    if cfg.min_avg_word_length and mean < cfg.min_avg_word_length:
        return "gopher_below_avg_word_length"
    if cfg.max_avg_word_length and mean > cfg.max_avg_word_length:
        return "gopher_above_avg_word_length"
    every = len(toks)  # as datatrove: the symbol and letter ratios count punctuation tokens as words
    if cfg.max_symbol_word_ratio and text.count("#") / every > cfg.max_symbol_word_ratio:
        return "gopher_too_many_hashes"
    if cfg.max_symbol_word_ratio and (text.count("...") + text.count("…")) / every > cfg.max_symbol_word_ratio:
        return "gopher_too_many_ellipsis"
    lines = text.splitlines() or [""]
    if cfg.max_bullet_lines_ratio and sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) \
            > cfg.max_bullet_lines_ratio:
        return "gopher_too_many_bullets"
    if cfg.max_ellipsis_lines_ratio and sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) \
            > cfg.max_ellipsis_lines_ratio:
        return "gopher_too_many_end_ellipsis"
    if cfg.max_non_alpha_words_ratio and sum(any(c.isalpha() for c in w) for w in toks) / every \
            < cfg.max_non_alpha_words_ratio:
        return "gopher_below_alpha_threshold"
    if cfg.min_stop_words and len(STOP_WORDS.intersection(toks)) < cfg.min_stop_words:  # distinct, as datatrove
        return "gopher_not_enough_stop_words"
    return None


@dataclass
class GopherRepetitionConfig:
    enabled: bool = opt(True, "apply Gopher's repetition rules")
    dup_line_frac: float = opt(0.3, "share of lines that repeat an earlier line above this drops it; 0: off")
    dup_para_frac: float = opt(0.3, "share of paragraphs that repeat an earlier one above this drops it")
    dup_line_char_frac: float = opt(0.2, "characters in repeated lines / all characters above this drops it")
    dup_para_char_frac: float = opt(0.2, "characters in repeated paragraphs / all characters above this drops it")
    top_ngram_fracs: list[float] = opt([0.2, 0.18, 0.16], "characters of the most frequent 2-, 3-, 4-gram "
                                                          "(times its count) / all characters above these drops it")
    dup_ngram_fracs: list[float] = opt([0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
                                       "characters in repeated 5- ... 10-grams / all characters above these drops it")


def _duplicates(items: list[str]) -> tuple[int, int]:
    seen: set[str] = set()
    count = chars = 0
    for x in items:
        if x in seen:
            count += 1
            chars += len(x)
        else:
            seen.add(x)
    return count, chars


def _repeated_ngram_chars(words: list[str], n: int) -> int:
    seen: set[str] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = " ".join(words[i:i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_repetition(text: str, cfg: GopherRepetitionConfig) -> str | None:
    size = len(text) or 1
    paragraphs = re.split(r"\n{2,}", text.strip())
    count, chars = _duplicates(paragraphs)
    if cfg.dup_para_frac and count / len(paragraphs) > cfg.dup_para_frac:
        return "gopher_dup_para_frac"
    if cfg.dup_para_char_frac and chars / size > cfg.dup_para_char_frac:
        return "gopher_dup_para_char_frac"
    lines = re.split(r"\n+", text)  # as datatrove: blank lines are no lines (else each counts as a duplicate)
    count, chars = _duplicates(lines)
    if cfg.dup_line_frac and count / len(lines) > cfg.dup_line_frac:
        return "gopher_dup_line_frac"
    if cfg.dup_line_char_frac and chars / size > cfg.dup_line_char_frac:
        return "gopher_dup_line_char_frac"
    words = tokens(text)
    for n, frac in zip((2, 3, 4), cfg.top_ngram_fracs, strict=False):
        grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        if grams and frac:
            gram, times = Counter(grams).most_common(1)[0]
            if len(gram) * times / size > frac:
                return f"gopher_top_{n}_gram"
    for n, frac in zip(range(5, 11), cfg.dup_ngram_fracs, strict=False):
        if frac and _repeated_ngram_chars(words, n) / size > frac:
            return f"gopher_duplicated_{n}_grams"
    return None


@dataclass
class C4Config:
    enabled: bool = opt(True, "apply C4's rules (they also remove lines from kept documents)")
    filter_no_terminal_punct: bool = opt(True, "remove lines not ending in . ? ! or a quote (or ending in ...)")
    min_num_sentences: int = opt(5, "fewer sentences left after line removal drops the document; 0: off")
    min_words_per_line: int = opt(3, "remove lines with fewer words; 0: off")
    max_word_length: int = opt(1000, "remove lines holding a longer word; 0: off")
    filter_lorem_ipsum: bool = opt(True, "drop documents containing 'lorem ipsum'")
    filter_javascript: bool = opt(True, "remove lines mentioning javascript")
    filter_curly_bracket: bool = opt(True, "drop documents containing '{'")
    filter_policy: bool = opt(True, "remove lines naming cookie / terms-of-use / privacy policies")
    remove_citations: bool = opt(True, "remove Wikipedia-style citations ([1], [edit], [citation needed])")


def c4(text: str, cfg: C4Config) -> tuple[str | None, str]:
    """(reason or None, the text with C4's line removals)."""
    kept, sentences = [], 0
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if cfg.max_word_length and any(len(w) > cfg.max_word_length for w in words):
            continue
        if cfg.remove_citations:
            line = CITATION.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
            continue
        if cfg.min_words_per_line and len(words) < cfg.min_words_per_line:
            continue
        low = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in low:
            return "c4_lorem_ipsum", text
        if cfg.filter_javascript and "javascript" in low:
            continue
        if cfg.filter_curly_bracket and "{" in line:
            return "c4_curly_bracket", text
        if cfg.filter_policy and any(p in low for p in POLICY_SUBSTRINGS):
            continue
        sentences += max(1, len(_SENTENCE_END.findall(line)))
        kept.append(line)
    if cfg.min_num_sentences and sentences < cfg.min_num_sentences:
        return "c4_too_few_sentences", text
    return None, "\n".join(kept).strip()


@dataclass
class FineWebConfig:
    enabled: bool = opt(True, "apply FineWeb's own quality rules")
    line_punct_thr: float = opt(0.12, "share of lines ending in punctuation at or below this drops it")
    line_punct_exclude_zero: bool = opt(False, "keep documents where no line ends in punctuation")
    short_line_thr: float = opt(0.67, "share of short lines at or above this drops it")
    short_line_length: int = opt(30, "a line of at most this many characters is short")
    char_duplicates_ratio: float = opt(0.01, "characters in repeated lines / all characters at or above this drops it")
    new_line_ratio: float = opt(0.3, "newlines per word above this drops it (a list, not prose)")


def fineweb(text: str, cfg: FineWebConfig) -> str | None:
    lines = text.split("\n")
    ratio = sum(line.endswith((".", "'", '"', "!", "?")) for line in lines) / len(lines)
    if ratio <= cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
        return "fineweb_line_punct_ratio"
    if sum(len(line) <= cfg.short_line_length for line in lines) / len(lines) >= cfg.short_line_thr:
        return "fineweb_short_line_ratio"
    chars = len(text.replace("\n", "")) or 1
    if _duplicates([line for line in lines if line.strip()])[1] / chars >= cfg.char_duplicates_ratio:
        return "fineweb_char_dup_ratio"
    words = tokens(text)
    if text.count("\n") / max(1, len(words)) > cfg.new_line_ratio:
        return "fineweb_list_ratio"
    return None
