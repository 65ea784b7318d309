"""The curation pipeline: raw documents in, a clean corpus, its rejects and a report out.

    read (streaming) -> normalise -> exact dedup -> Gopher repetition -> Gopher quality -> C4
    -> FineWeb -> decontamination -> MinHash near-dedup -> PII masking -> shards
    (-> mix: sources weighted, shuffled -> token shards)

The first rule that fires drops the document, which is written to `rejected/RULE.jsonl` with
the rule, its reason (e.g. `gopher_short_doc`) and where the document came from; nothing
disappears silently. Near-deduplication needs every signature before it can decide, so the
documents that pass the per-document rules wait in a staging file beside the output (removed
at the end, or by the next run if this one is killed), and so do their 112 x 8-byte signatures
(read back in chunks). In each duplicate cluster the document read first is kept.

Sizes are counted in words (whitespace-separated) and characters, not tokenizer tokens.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from temper.config import OnlyWith, opt, to_dict
from temper.curate import xxhash
from temper.curate.decontam import EvalIndex
from temper.curate.filters import c4, fineweb, gopher_quality, gopher_repetition
from temper.curate.minhash import (
    MinHasher,
    UnionFind,
    check_bands,
    jaccard,
    s_curve,
    shingle_hashes,
    threshold,
)
from temper.curate.outcome import Outcome, decode_outcome, encode_outcome
from temper.curate.text import mask_pii, normalize
from temper.data.readers import expand_paths, iter_records, json_type
from temper.errors import TemperError
from temper.eval.contamination import words as lower_words
from temper.io import atomic_path, atomic_writer

RULES = ("input", "exact_dedup", "gopher_repetition", "gopher_quality", "c4", "fineweb", "decontamination",
         "line_dedup", "near_dedup")
NOISE_TARGETS = {  # which planted kinds of the built-in world each rule exists to remove
    "exact_dedup": ("exact_duplicate",), "near_dedup": ("near_duplicate", "exact_duplicate"),
    "gopher_repetition": ("spam", "boilerplate"), "gopher_quality": ("spam", "boilerplate"),
    "c4": ("spam", "boilerplate"), "fineweb": ("spam", "boilerplate"), "line_dedup": ("boilerplate", "spam"),
    "pii": ("pii",),
}
MAX_EXAMPLES = 3
EXAMPLE_CHARS = 300
CURVE_POINTS = (0.5, 0.6, 0.7, 0.72, 0.8, 0.9)
WORKER_BATCH = 256  # documents per worker per batch (what workers>1 holds in memory at once)


@dataclass
class LineDedupConfig:
    enabled: bool = opt(True, "drop documents made mostly of lines that many documents repeat (boilerplate: "
                              "cookie banners, menus, footers; CCNet's paragraph hashing, at document level)")
    min_docs: int = opt(10, "a line held by at least this many documents counts as boilerplate")
    max_fraction: float = opt(0.5, "drop a document when more than this share of its characters is in such lines")


@dataclass
class NearDedupConfig:
    enabled: bool = opt(True, "MinHash + LSH near-duplicate removal")
    ngram: int = opt(5, "shingle length in words")
    num_hashes: int = opt(112, "MinHash signature length; must equal bands x rows")
    bands: int = opt(14, "LSH bands")
    rows: int = opt(8, "rows (hashes) per band")
    seed: int = opt(1, "seed of the hash permutations")
    verify: bool = opt(False, "check each candidate pair's exact Jaccard similarity (re-reads its documents)")
    verify_threshold: float = opt(0.0, "with verify: the least exact Jaccard of a duplicate pair; 0 means the "
                                       "LSH threshold (1/bands)^(1/rows)")
    only_with: ClassVar = (OnlyWith(("verify_threshold",), "near_dedup.verify=true", lambda c: c.verify),)

    def validate(self) -> None:
        check_bands(self.num_hashes, self.bands, self.rows)
        if self.ngram < 1:
            raise TemperError(f"near_dedup.ngram must be at least 1, got {self.ngram}")

    def curve(self) -> dict[str, float]:
        return {f"{s:g}": round(s_curve(s, self.bands, self.rows), 4) for s in CURVE_POINTS}


@dataclass
class MixConfig:
    weights: list[float] = opt([], "one weight per data= entry (a source): each kept document of a source is "
                                   "written floor(w) times and once more with probability w - floor(w) (0.5 "
                                   "keeps about half, 2 writes each twice); empty: 1 each")
    shuffle: bool = opt(False, "write the documents in a seeded random order instead of source by source")
    seed: int = opt(0, "seed of the shuffle, of the fractional weights and of tokenize's val split")

    def active(self) -> bool:
        return self.shuffle or any(w != 1 for w in self.weights)


@dataclass
class TokenizeConfig:
    tokenizer: str = opt("", "a tokenizer directory (holding tokenizer.json: a model's, or `temper pretrain`'s "
                             "output_dir/tokenizer): also write the written documents as pretraining token shards "
                             "to output_dir/tokens (temper.data.shards' format); empty: off")
    val_fraction: float = opt(0.0, "share of the documents that go to the val split of the token shards")
    shard_tokens: int = opt(1 << 24, "tokens per token shard")
    only_with: ClassVar = (OnlyWith(("val_fraction", "shard_tokens"), "tokenize.tokenizer=DIR",
                                    lambda c: bool(c.tokenizer)),)


def describe_near_dedup(cfg: NearDedupConfig) -> str:
    """One line: the banding, its threshold and a few points of its S-curve."""
    t = threshold(cfg.bands, cfg.rows)
    points = ", ".join(f"P({s})={p:.2f}" for s, p in cfg.curve().items())
    return (f"near_dedup: {cfg.bands} bands x {cfg.rows} rows = {cfg.num_hashes} hashes over word {cfg.ngram}-grams; "
            f"threshold (1/{cfg.bands})^(1/{cfg.rows}) = {t:.3f}; chance a pair of Jaccard s is a candidate: {points}")


def _words(text: str) -> int:
    return len(text.split())


def _label(data: dict) -> tuple[str | None, str | None, str | None]:
    """(kind, id, source id) of a built-in world document's `meta`, else Nones."""
    meta = data.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
        return None, None, None
    return meta["kind"], meta.get("id"), meta.get("source")


class Rejects:
    """rejected/RULE.jsonl writers (atomic, opened on first use), counts and examples per rule."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack, mask, text_field: str) -> None:
        self.folder, self.stack, self.mask, self.field = folder, stack, mask, text_field
        self.files: dict[str, IO] = {}
        self.docs: Counter = Counter()
        self.words: Counter = Counter()
        self.reasons: dict[str, Counter] = defaultdict(Counter)
        self.examples: dict[str, list] = defaultdict(list)

    def write(self, i: int, rule: str, reason: str, source: str, data: dict, text: str | None,
              dup_of: str | None = None) -> None:
        if rule not in self.files:
            self.folder.mkdir(exist_ok=True)
            self.files[rule] = self.stack.enter_context(atomic_writer(self.folder / f"{rule}.jsonl", newline="\n"))
        masked = self.mask(i, text or "")
        row: dict[str, Any] = {"rule": rule, "reason": reason, "source": source}
        if dup_of is not None:
            row["duplicate_of"] = dup_of
        row["record"] = data if text is None else {**data, self.field: masked}  # None: the row as read
        self.files[rule].write(json.dumps(row, ensure_ascii=False) + "\n")
        self.docs[rule] += 1
        self.words[rule] += _words(text or "")
        self.reasons[rule][reason] += 1
        if len(self.examples[rule]) < MAX_EXAMPLES:
            example = {"source": source, "reason": reason, "text": masked[:EXAMPLE_CHARS]}
            if dup_of is not None:
                example["duplicate_of"] = dup_of
            self.examples[rule].append(example)


class Shards:
    """Kept documents as data/part-NNNNN.jsonl (or .parquet), `per_shard` documents each, each written
    atomically. A parquet shard is held in memory until it is written (one shard's rows)."""

    def __init__(self, folder: Path, per_shard: int, fmt: str = "jsonl") -> None:
        self.folder, self.per_shard, self.fmt = folder, per_shard, fmt
        self.paths: list[Path] = []
        self._cm = None
        self._file: IO | None = None
        self._rows: list[dict] | None = None
        self._count = 0

    def write(self, row: dict) -> None:
        if (self._file is None and self._rows is None) or self._count >= self.per_shard:
            self.close()
            self.folder.mkdir(exist_ok=True)
            path = self.folder / f"part-{len(self.paths):05d}.{self.fmt}"
            self.paths.append(path)
            self._count = 0
            if self.fmt == "parquet":
                self._rows = []
            else:
                self._cm = atomic_writer(path, newline="\n")
                self._file = self._cm.__enter__()
        if self._rows is not None:
            self._rows.append(row)
        else:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._count += 1

    def close(self, error: BaseException | None = None) -> None:
        if self._rows is not None:
            rows, self._rows = self._rows, None
            if error is None:
                _write_parquet(self.paths[-1], rows)
        if self._cm is not None:
            cm, self._cm, self._file = self._cm, None, None
            if error is None:
                cm.__exit__(None, None, None)
            else:
                cm.__exit__(type(error), error, error.__traceback__)


def _write_parquet(path: Path, rows: list[dict]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TemperError("output_format=parquet needs pyarrow (pip install 'temper[parquet]')") from None
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError) as e:
        raise TemperError(f"{path}: the kept rows do not fit one parquet schema ({str(e).splitlines()[0]}); "
                          "use output_format=jsonl") from None
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


@dataclass(slots=True)
class _Doc:
    """What pass 1 remembers of a document (the text itself stays on disk)."""
    source: str
    kind: str | None
    id: str | None
    source_id: str | None
    entry: int = 0  # which data= entry (source) it was read from


def _word_bin(words: int) -> int:
    """Histogram bin of a word count: 0, 1, 2-3, 4-7, 8-15, ... (powers of two)."""
    return words.bit_length()


def _bin_label(b: int) -> str:
    if b <= 1:
        return str(b)
    low, high = 1 << (b - 1), (1 << b) - 1
    return f"{low}-{high}"


class DocWork:
    """The per-document steps (normalise, the filters, decontamination, the signature and line hashes):
    a function of the text alone, so that worker processes can run it; deduplication, which needs
    what came before, stays in the main process."""

    def __init__(self, cfg) -> None:
        self.normalize, self.exact = cfg.normalize, cfg.exact_dedup
        self.checks = [(name, check, getattr(cfg, name)) for name, check in (
            ("gopher_repetition", gopher_repetition), ("gopher_quality", gopher_quality), ("c4", c4),
            ("fineweb", fineweb)) if getattr(cfg, name).enabled]
        self.eval_index = EvalIndex(cfg.decontaminate) if cfg.decontaminate.eval or cfg.decontaminate.tasks else None
        self.hasher = MinHasher(cfg.near_dedup.num_hashes, cfg.near_dedup.seed) if cfg.near_dedup.enabled else None
        self.ngram, self.lines = cfg.near_dedup.ngram, cfg.line_dedup.enabled

    def __call__(self, raw: str) -> Outcome:
        if "\x00" in raw:  # NUL bytes: a binary file read as text
            return Outcome("input", "binary", raw.replace("\x00", "\\0"), raw)
        text = normalize(raw, self.normalize)
        if not text:
            return Outcome("input", "empty", raw, raw)
        normalized, edited = text, False
        digest = xxhash.xxh3_128_digest(text.encode("utf-8")) if self.exact else None
        for name, check, section in self.checks:
            if name == "c4":
                reason, cut = check(text, section)
                if reason is None and cut != text:
                    edited, text = True, cut
            else:
                reason = check(text, section)
            if reason is not None:
                return Outcome(name, reason, text, normalized, digest)
        if self.eval_index is not None and self.eval_index.hit(text):
            return Outcome("decontamination", f"shares a {self.eval_index.n}-gram with an eval set", text, normalized,
                           digest)
        if not text:  # C4 removed every line, and min_num_sentences is off
            return Outcome("c4", "c4_no_lines_left", raw, normalized, digest)
        signature = None if self.hasher is None else self.hasher.signature(shingle_hashes(lower_words(text),
                                                                                          self.ngram))
        lines = None if not self.lines else {xxhash.xxh3_64_intdigest(line.encode("utf-8"))
                                              for line in text.split("\n") if line.strip()}
        return Outcome(None, None, text, normalized, digest, signature, lines, edited)


_WORK: DocWork | None = None  # a worker process's DocWork


def _init_worker(work: DocWork) -> None:
    global _WORK
    _WORK = work


def _work(raw: str) -> Outcome:
    assert _WORK is not None
    return _WORK(raw)


WORK_DIR = ".work"  # per-input-file results of the per-document steps, kept until the run succeeds
WORK_KEYS = ("text_field", "text_mode", "encoding_errors", "max_document_mb", "normalize", "exact_dedup",
             "gopher_repetition", "gopher_quality", "c4", "fineweb", "decontaminate", "near_dedup", "line_dedup")


def _work_key(cfg, path: Path) -> str:
    """What the per-document results of `path` depend on: the file (size, mtime), the eval files and every
    setting of the per-document steps."""
    def stamp(p: Path) -> list:
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]

    key = {"file": stamp(path), "settings": {k: to_dict(getattr(cfg, k)) for k in WORK_KEYS},
           "eval": [stamp(p) for spec in cfg.decontaminate.eval for p in expand_paths(spec, "decontaminate.eval")]}
    return xxhash.xxh3_128_hexdigest(json.dumps(key, sort_keys=True).encode("utf-8"))


class _Recorder:
    """Writes one input file's outcomes to .work/KEY.jsonl (+ KEY.sig, the signatures' bytes) under temporary
    names, renamed into place when the file is finished: a finished file is never computed again."""

    def __init__(self, folder: Path, key: str) -> None:
        folder.mkdir(exist_ok=True)
        self.final = folder / f"{key}.jsonl", folder / f"{key}.sig"
        self.tmp = tuple(p.with_name(f"{p.name}.tmp-{os.getpid()}") for p in self.final)
        self.rows = open(self.tmp[0], "w", encoding="utf-8", newline="\n")  # noqa: SIM115 - closed in finish/abort
        self.sigs = open(self.tmp[1], "wb")  # noqa: SIM115

    def add(self, source: str, data: dict, raw: Any, done: Outcome | None) -> None:
        if done is not None and done.signature is not None:
            self.sigs.write(done.signature.tobytes())
        self.rows.write(json.dumps({"s": source, "d": data, "r": raw, "o": encode_outcome(done)},
                                   ensure_ascii=False) + "\n")

    def finish(self) -> None:
        for f in (self.rows, self.sigs):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        os.replace(self.tmp[1], self.final[1])
        os.replace(self.tmp[0], self.final[0])  # last: the rows file says the file is finished

    def abort(self) -> None:
        for f, tmp in zip((self.rows, self.sigs), self.tmp, strict=True):
            f.close()
            tmp.unlink(missing_ok=True)


def _replay(folder: Path, key: str, num_hashes: int) -> Iterator[tuple[str, dict, Any, Outcome | None]]:
    with open(folder / f"{key}.jsonl", encoding="utf-8") as rows, open(folder / f"{key}.sig", "rb") as sigs:
        for line in rows:
            row = json.loads(line)
            o = row["o"]
            signature = sigs.read(8 * num_hashes) if o is not None and o["sig"] else None
            yield row["s"], row["d"], row["r"], decode_outcome(o, signature)


def _compute(records: Iterator[tuple[str, dict, Any]], work: DocWork, pool, workers: int
             ) -> Iterator[tuple[str, dict, Any, Outcome | None]]:
    if pool is None:
        for source, data, raw in records:
            yield source, data, raw, work(raw) if isinstance(raw, str) else None
        return
    while True:
        batch = list(itertools.islice(records, WORKER_BATCH * workers))
        if not batch:
            return
        texts = [raw for _, _, raw in batch if isinstance(raw, str)]
        results = iter(pool.map(_work, texts, chunksize=max(1, len(texts) // (4 * workers))))
        for source, data, raw in batch:
            yield source, data, raw, next(results) if isinstance(raw, str) else None


def _outcomes(cfg, work: DocWork, stack: contextlib.ExitStack, out: Path, resumed: list[str], engine=None
              ) -> Iterator[tuple[int, str, dict, Any, Outcome | None]]:
    """(data= entry, source, row, raw text, outcome) in input order, file by file. `workers` > 1 computes the outcomes in
    worker processes, a batch at a time (memory stays bounded by the batch, not the corpus). With `resume`,
    each finished input file's outcomes are kept in output_dir/.work, and a file finished by an earlier,
    failed run with the same settings is read back from there instead of computed again (`resumed`).
    `engine` (engine=ray: a ray_engine.RayEngine) computes them on Ray Data instead of the local pool."""
    pool = None
    if cfg.workers > 1 and engine is None:
        import multiprocessing

        pool = stack.enter_context(multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(
            cfg.workers, initializer=_init_worker, initargs=(work,)))
    folder = out / WORK_DIR
    if folder.is_dir():
        for leftover in folder.glob("*.tmp-*"):  # a killed run's unfinished file
            leftover.unlink(missing_ok=True)
    for entry, path in ((j, p) for j, spec in enumerate(cfg.data) for p in expand_paths(spec)):
        if engine is not None:
            computed = engine.outcomes(path)
        else:
            records = ((rec.source, rec.data, rec.data.get(cfg.text_field)) for rec in iter_records(
                path, encoding_errors=cfg.encoding_errors, text_mode=cfg.text_mode,
                max_document_mb=cfg.max_document_mb))
            computed = _compute(records, work, pool, cfg.workers)
        if not cfg.resume:
            for item in computed:
                yield entry, *item
            continue
        key = _work_key(cfg, path)
        if (folder / f"{key}.jsonl").is_file() and (folder / f"{key}.sig").is_file():
            resumed.append(str(path))
            for item in _replay(folder, key, cfg.near_dedup.num_hashes):
                yield entry, *item
            continue
        recorder = _Recorder(folder, key)
        try:
            for item in computed:
                recorder.add(*item)
                yield entry, *item
        except BaseException:
            recorder.abort()
            raise
        recorder.finish()


def curate(cfg, out: Path) -> dict:
    """Run the pipeline of `cfg` (temper.stages.curate.Config) into the claimed directory `out`."""
    work = DocWork(cfg)
    eval_index = work.eval_index
    near = cfg.near_dedup
    hasher = work.hasher
    lines_cfg = cfg.line_dedup
    line_docs: Counter = Counter()  # line hash -> documents holding it (staged documents only)
    stage = near.enabled or lines_cfg.enabled
    seen_exact: dict[bytes, int] = {}
    exact_sizes: Counter = Counter()
    docs: list[_Doc] = []
    signatures = _Signatures(out, near.num_hashes)  # on disk: memory does not grow with them
    staged_offsets = array.array("q")  # each staged document's offset in the staging file
    staged_index = array.array("q")  # its document index
    totals = Counter()
    pii_docs: list[int] = []
    pii_counts: Counter = Counter()
    c4_edited = 0
    kept_index: set[int] = set()
    removed_by: dict[int, tuple[str, int | None]] = {}  # doc index -> (rule, index of the duplicate kept)
    staging = out / f".staging.jsonl.tmp-{os.getpid()}"
    shards = Shards(out / "data", cfg.shard_docs, cfg.output_format)
    kept_words = kept_chars = 0
    resumed: list[str] = []
    input_bins: Counter = Counter()  # _word_bin -> documents read
    kept_bins: Counter = Counter()  # _word_bin -> documents kept (once each, before mixing)
    mixing = cfg.mix.active()
    mix_staging = out / f".kept.jsonl.tmp-{os.getpid()}"
    # per source: the kept documents' offsets in the mixing staging file and their words
    per_source: list[tuple[list[int], list[int]]] = [([], []) for _ in cfg.data]

    def mask(i: int, text: str) -> str:
        masked, counts = mask_pii(text, cfg.pii)
        if counts:
            pii_docs.append(i)
            pii_counts.update(counts)
        return masked

    def keep(i: int, data: dict, text: str) -> None:
        nonlocal kept_words, kept_chars
        masked = mask(i, text)
        row = {**data, cfg.text_field: masked}
        words = _words(masked)
        offsets, source_words = per_source[docs[i].entry]
        if mixing:
            offsets.append(mix_file.tell())
            mix_file.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            offsets.append(-1)
            shards.write(row)
        source_words.append(words)
        kept_index.add(i)
        kept_bins[_word_bin(words)] += 1
        kept_words += words
        kept_chars += len(masked)

    with contextlib.ExitStack() as stack:
        engine = None
        if cfg.engine == "ray":
            from temper.curate.ray_engine import RayEngine

            engine = stack.enter_context(RayEngine(cfg, work, batch=WORKER_BATCH))
        rejects = Rejects(out / "rejected", stack, mask, cfg.text_field)
        stage_file = stack.enter_context(open(staging, "w+", encoding="utf-8", newline="\n")) if stage else None
        stack.callback(lambda: staging.unlink(missing_ok=True))
        mix_file = stack.enter_context(open(mix_staging, "w+", encoding="utf-8", newline="\n")) if mixing else None
        stack.callback(signatures.close)
        stack.callback(lambda: mix_staging.unlink(missing_ok=True))
        try:
            for entry, source, data, raw, done in _outcomes(cfg, work, stack, out, resumed, engine):
                i = len(docs)
                kind, doc_id, source_id = _label(data)
                docs.append(_Doc(source, kind, doc_id, source_id, entry))
                totals["documents"] += 1
                if done is None:
                    reason = (f"field '{cfg.text_field}' missing" if cfg.text_field not in data
                              else f"field '{cfg.text_field}' is {json_type(raw)}")
                    rejects.write(i, "input", reason, source, data, None)
                    removed_by[i] = ("input", None)
                    continue
                raw_words = _words(raw)
                totals["words"] += raw_words
                totals["characters"] += len(raw)
                input_bins[_word_bin(raw_words)] += 1
                if done.rule == "input":
                    rejects.write(i, "input", done.reason, source, data, done.text)
                    removed_by[i] = ("input", None)
                    continue
                if done.digest is not None:
                    first = seen_exact.setdefault(done.digest, i)
                    if first != i:
                        exact_sizes[first] += 1
                        rejects.write(i, "exact_dedup", "exact_duplicate", source, data, done.normalized,
                                      docs[first].source)
                        removed_by[i] = ("exact_dedup", first)
                        continue
                if done.rule is not None:
                    rejects.write(i, done.rule, done.reason, source, data, done.text)
                    removed_by[i] = (done.rule, None)
                    continue
                c4_edited += done.c4_edited
                text = done.text
                if not stage:
                    keep(i, data, text)
                    continue
                if done.signature is not None:
                    signatures.append(done.signature)
                if done.lines is not None:
                    line_docs.update(done.lines)
                staged_offsets.append(stage_file.tell())
                staged_index.append(i)
                stage_file.write(json.dumps({"data": {**data, cfg.text_field: None}, "text": text},  # the text once
                                            ensure_ascii=False) + "\n")
            near_report = None
            if stage:
                stage_file.flush()
                boiler = _boilerplate(lines_cfg, line_docs, stage_file) if lines_cfg.enabled else {}
                del line_docs
                dropped: dict[int, int] = {}
                if hasher is not None:
                    alive = [k for k in range(len(staged_index)) if k not in boiler]
                    near_report, dropped_alive = _near_duplicates(
                        near, signatures.array(alive), array.array("q", (staged_offsets[k] for k in alive)), stage_file,
                        lsh_buckets if engine is None else engine.lsh_buckets)
                    dropped = {alive[k]: alive[rep] for k, rep in dropped_alive.items()}
                    signatures.close()
                stage_file.seek(0)
                for k, line in enumerate(stage_file):
                    i = staged_index[k]
                    row = json.loads(line)
                    if k in boiler:
                        rejects.write(i, "line_dedup", "boilerplate_lines", docs[i].source, row["data"], row["text"])
                        removed_by[i] = ("line_dedup", None)
                    elif k in dropped:
                        rep = staged_index[dropped[k]]
                        rejects.write(i, "near_dedup", "near_duplicate", docs[i].source, row["data"], row["text"],
                                      docs[rep].source)
                        removed_by[i] = ("near_dedup", rep)
                    else:
                        keep(i, row["data"], row["text"])
                if near_report is not None:
                    near_report["cluster_sizes"] = {str(k): v for k, v in sorted(near_report["cluster_sizes"].items())}
            mix_report = _mix(cfg, per_source, mix_file, shards) if mixing else None
        except BaseException as e:
            shards.close(e)
            raise
        shards.close()

    tokens_report = _tokenize(cfg, out, shards.paths) if cfg.tokenize.tokenizer else None
    removed_docs = sum(rejects.docs.values())
    assert removed_docs + len(kept_index) == totals["documents"], "every document is kept or rejected"
    report: dict[str, Any] = {
        "sizes_are": "words = whitespace-separated words of the text; characters = Unicode code points "
                     "(input: as read; kept: after normalisation, C4's line removal and PII masking)",
        "input": {"data": list(map(str, cfg.data)), "documents": totals["documents"], "words": totals["words"],
                  "characters": totals["characters"], "files_resumed": resumed},
        "kept": {"documents": len(kept_index), "words": kept_words, "characters": kept_chars,
                 "shards": [str(p.relative_to(out)) for p in shards.paths]},
        "sources": [{"data": str(spec), "kept_documents": len(offs), "kept_words": sum(ws)}
                    for spec, (offs, ws) in zip(cfg.data, per_source, strict=True)],
        "mix": mix_report or {"enabled": False},
        "tokens": tokens_report or {"enabled": False},
        "histograms": _histograms(input_bins, kept_bins),
        "removed": {"documents": removed_docs, "words": sum(rejects.words.values())},
        "rules": {rule: {"enabled": _enabled(cfg, rule), "documents": rejects.docs[rule], "words": rejects.words[rule],
                         "reasons": dict(rejects.reasons[rule].most_common()), "examples": rejects.examples[rule],
                         "file": f"rejected/{rule}.jsonl" if rejects.docs[rule] else None}
                  for rule in RULES},
        "modified": {"c4_lines_removed_documents": c4_edited,
                     "pii": {"enabled": cfg.pii.enabled, "documents": len(pii_docs),
                             "documents_kept": len(kept_index.intersection(pii_docs)), **dict(pii_counts)}},
        "exact_dedup": {"enabled": cfg.exact_dedup, "clusters": len(exact_sizes),
                        "cluster_sizes": {str(k): v for k, v in sorted(Counter(n + 1 for n in exact_sizes.values()).items())}},
        "near_dedup": {"enabled": near.enabled, **({"bands": near.bands, "rows": near.rows,
                       "num_hashes": near.num_hashes, "ngram": near.ngram,
                       "threshold": round(threshold(near.bands, near.rows), 4), "s_curve": near.curve(),
                       **(near_report or {})} if near.enabled else {})},
        "line_dedup": {"enabled": lines_cfg.enabled, **({"min_docs": lines_cfg.min_docs,
                       "max_fraction": lines_cfg.max_fraction} if lines_cfg.enabled else {})},
        "decontamination": eval_index.describe() if eval_index is not None else {"enabled": False},
    }
    if any(d.kind is not None for d in docs):
        report["ground_truth"] = ground_truth(docs, removed_by, set(pii_docs), exact_first=cfg.exact_dedup)
    return report


def _mix(cfg, per_source: list[tuple[list[int], list[int]]], staged: IO, shards: Shards) -> dict:
    """Write the kept documents (waiting in `staged`) to the shards, each source's repeated by its weight
    (a fractional part drawn per document), shuffled if asked; the report of what was written."""
    rng = np.random.default_rng(cfg.mix.seed)
    weights = cfg.mix.weights or [1.0] * len(cfg.data)
    order, sources = [], []
    for spec, weight, (offsets, words) in zip(cfg.data, weights, per_source, strict=True):
        whole = int(weight)
        copies = np.full(len(offsets), whole, dtype=np.int64) + (rng.random(len(offsets)) < weight - whole)
        order.append(np.repeat(np.asarray(offsets, dtype=np.int64), copies))
        sources.append({"data": str(spec), "weight": weight, "kept_documents": len(offsets),
                        "written_documents": int(copies.sum()),
                        "written_words": int(np.dot(copies, np.asarray(words, dtype=np.int64))) if words else 0})
    every = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    if cfg.mix.shuffle:
        rng.shuffle(every)
    staged.flush()
    for offset in every:
        staged.seek(int(offset))
        shards.write(json.loads(staged.readline()))
    total = sum(s["written_documents"] for s in sources)
    for s in sources:
        s["share_of_written"] = round(s["written_documents"] / total, 4) if total else None
    return {"enabled": True, "shuffle": cfg.mix.shuffle, "seed": cfg.mix.seed, "written_documents": total,
            "sources": sources}


def _tokenize(cfg, out: Path, shard_paths: list[Path]) -> dict:
    """The written shards, in order, tokenised into pretraining token shards in out/tokens."""
    from temper.data.readers import iter_texts
    from temper.data.shards import build_shards, read_index
    from temper.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(cfg.tokenize.tokenizer)
    if not shard_paths:
        raise TemperError("tokenize.tokenizer is set but no document was kept: there is nothing to tokenise")
    texts = iter_texts([str(p) for p in shard_paths], field=cfg.text_field)
    folder = build_shards(texts, tokenizer, out / "tokens", val_fraction=cfg.tokenize.val_fraction,
                          seed=cfg.mix.seed, shard_tokens=cfg.tokenize.shard_tokens)
    tokenizer.save(folder / "tokenizer")  # `temper pretrain data=DIR/tokens` reads the shards with it
    splits = read_index(folder)["splits"]
    return {"enabled": True, "dir": "tokens", "tokenizer": cfg.tokenize.tokenizer, "vocab_size": tokenizer.vocab_size,
            **{f"{name}_tokens": split["num_tokens"] for name, split in splits.items()},
            **{f"{name}_documents": split["num_docs"] for name, split in splits.items()}}


def _histograms(input_bins: Counter, kept_bins: Counter) -> dict:
    top = max([*input_bins, *kept_bins, 0])
    return {"words_per_document": {"bins": [_bin_label(b) for b in range(top + 1)],
                                   "input": [input_bins[b] for b in range(top + 1)],
                                   "kept": [kept_bins[b] for b in range(top + 1)]}}


PLOTS = {"words.svg": "words per document, read and kept", "rules.svg": "documents removed per rule",
         "clusters.svg": "duplicate cluster sizes"}


def write_plots(report: dict, folder: Path) -> list[str]:
    """The report's histograms as SVG images in `folder` (temper's own SVG drawing; no plotting library)."""
    from temper.eval.plot import render_bars_svg
    from temper.io import atomic_write_text

    folder.mkdir(exist_ok=True)
    words = report["histograms"]["words_per_document"]
    images = {"words.svg": render_bars_svg("words per document (whitespace words)", words["bins"] or ["0"],
                                           {"read": words["input"] or [0], "kept": words["kept"] or [0]},
                                           x_label="words")}
    rules = [r for r, v in report["rules"].items() if v["enabled"] or v["documents"]]
    images["rules.svg"] = render_bars_svg("documents removed per rule", rules,
                                          {"removed": [report["rules"][r]["documents"] for r in rules]}, x_label="rule")
    exact = report["exact_dedup"]["cluster_sizes"]
    near = report["near_dedup"].get("cluster_sizes", {})
    sizes = sorted({*exact, *near}, key=int) or ["2"]
    images["clusters.svg"] = render_bars_svg("duplicate clusters by size", sizes,
                                             {"exact": [exact.get(k, 0) for k in sizes],
                                              "near (MinHash)": [near.get(k, 0) for k in sizes]},
                                             x_label="documents in the cluster", y_label="clusters")
    for name, svg in images.items():
        atomic_write_text(folder / name, svg)
    return [f"{folder.name}/{name}" for name in images]


def _enabled(cfg, rule: str) -> bool:
    switches = {"input": True, "exact_dedup": cfg.exact_dedup,
                "decontamination": bool(cfg.decontaminate.eval or cfg.decontaminate.tasks)}
    return switches[rule] if rule in switches else getattr(cfg, rule).enabled


def _boilerplate(cfg: LineDedupConfig, line_docs: Counter, stage: IO) -> dict[int, float]:
    """{staged index: share of its characters in lines held by >= min_docs documents} for those above
    max_fraction (one more read of the staging file)."""
    found: dict[int, float] = {}
    stage.seek(0)
    for k, line in enumerate(stage):
        lines = [x for x in json.loads(line)["text"].split("\n") if x.strip()]
        total = sum(map(len, lines))
        repeated = sum(len(x) for x in lines if line_docs[xxhash.xxh3_64_intdigest(x.encode("utf-8"))] >= cfg.min_docs)
        if total and repeated / total > cfg.max_fraction:
            found[k] = repeated / total
    return found


class _Signatures:
    """The staged documents' MinHash signatures in a file beside the output (removed at the end, or by the
    next run if this one is killed): the main process keeps no signature."""

    def __init__(self, out: Path, num_hashes: int) -> None:
        self.path = out / f".signatures.bin.tmp-{os.getpid()}"
        self.num_hashes, self.count, self._file = num_hashes, 0, None

    def append(self, signature: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(signature.tobytes())
        self.count += 1

    def array(self, keep: list[int]) -> SignatureRows:
        """The signatures of staged documents `keep` (ascending), as (len(keep), num_hashes) rows read on use."""
        if self._file is not None:
            self._file.flush()
        return SignatureRows(self.path, self.count, self.num_hashes,
                             None if len(keep) == self.count else np.asarray(keep, dtype=np.int64))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self.path.unlink(missing_ok=True)


class SignatureRows:
    """(n, num_hashes) uint64 signatures in a file (row `keep[k]` of it is row k; all rows without `keep`),
    indexed like an array for what the banding needs (`rows[:, lo:hi]`, `rows[start:stop]`, `len(rows)`).
    Each access reads the file in chunks and returns only what was asked: neither the signatures nor a
    memory map of them stay in the process (a mapped page read counts in its resident memory)."""

    CHUNK = 1 << 12  # rows read at a time (3.5 MiB of 112-hash signatures)

    def __init__(self, path: Path, count: int, num_hashes: int, keep: np.ndarray | None = None) -> None:
        self.path, self.count, self.num_hashes, self.keep = path, count, num_hashes, keep

    def __len__(self) -> int:
        return self.count if self.keep is None else len(self.keep)

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        assert isinstance(rows, slice) and isinstance(cols, slice), "rows[start:stop] or rows[:, lo:hi]"
        start, stop, step = rows.indices(len(self))
        assert step == 1
        wanted = np.arange(start, stop) if self.keep is None else self.keep[start:stop]  # file rows, ascending
        width = len(range(*cols.indices(self.num_hashes)))
        if not len(wanted):
            return np.zeros((0, width), dtype=np.uint64)
        parts = []
        with open(self.path, "rb") as f:
            for first in range(int(wanted[0]), int(wanted[-1]) + 1, self.CHUNK):
                last = min(first + self.CHUNK, int(wanted[-1]) + 1)
                lo, hi = np.searchsorted(wanted, [first, last])
                if lo == hi:
                    continue
                f.seek(first * 8 * self.num_hashes)
                block = np.fromfile(f, dtype=np.uint64, count=(last - first) * self.num_hashes)
                parts.append(block.reshape(last - first, self.num_hashes)[wanted[lo:hi] - first, cols])
        return np.concatenate(parts)


def lsh_buckets(signatures: np.ndarray, bands: int, rows: int) -> Iterator[np.ndarray]:
    """The LSH buckets of two or more documents: band by band, buckets in the order of their band's bytes,
    each bucket's members (indices into `signatures`, shape (n, bands x rows)) ascending."""
    n = len(signatures)
    for b in range(bands):
        band = np.ascontiguousarray(signatures[:, b * rows:(b + 1) * rows]).view(f"V{8 * rows}").ravel()
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        starts = np.flatnonzero(np.r_[True, sorted_band[1:] != sorted_band[:-1]])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts, ends, strict=True):
            if e - s >= 2:
                yield order[s:e]  # ascending doc order (stable sort)


def _near_duplicates(cfg: NearDedupConfig, signatures: np.ndarray | SignatureRows, offsets: Sequence[int], stage: IO,
                     buckets=lsh_buckets) -> tuple[dict, dict[int, int]]:
    """LSH over the signatures: {staged index dropped: staged index of its cluster's kept member}, and the
    report (candidate pairs, clusters, their sizes, pairs refused by the exact-Jaccard check). `buckets` is
    `lsh_buckets` or an engine's equal (engine=ray: temper.curate.ray_engine.lsh_buckets)."""
    n = len(signatures)
    uf = UnionFind()
    candidates = refused = 0
    verify_at = cfg.verify_threshold or threshold(cfg.bands, cfg.rows)
    shingle_cache: dict[int, np.ndarray] = {}

    def shingles(k: int) -> np.ndarray:
        if k not in shingle_cache:
            stage.seek(offsets[k])
            shingle_cache[k] = shingle_hashes(lower_words(json.loads(stage.readline())["text"]), cfg.ngram)
        return shingle_cache[k]

    if n:
        for members in buckets(signatures, cfg.bands, cfg.rows):
            for m in members[1:]:
                candidates += 1
                if cfg.verify and uf.find(int(m)) != uf.find(int(members[0])):
                    if jaccard(shingles(int(m)), shingles(int(members[0]))) < verify_at:
                        refused += 1
                        continue
                uf.union(int(members[0]), int(m))
    dropped = {k: uf.find(k) for k in range(n) if uf.find(k) != k}
    sizes = Counter(Counter(dropped.values()).values())
    report = {"candidate_pairs": candidates, "clusters": sum(sizes.values()),
              "cluster_sizes": Counter({k + 1: v for k, v in sizes.items()})}
    if cfg.verify:
        report["verified_jaccard_at_least"] = round(verify_at, 4)
        report["candidate_pairs_refused"] = refused
    return report, dropped


def ground_truth(docs: list[_Doc], removed_by: dict[int, tuple[str, int | None]], pii_docs: set[int],
                 exact_first: bool = True) -> dict:
    """Precision and recall of each rule against the planted `meta.kind` labels of the built-in world.

    Precision: the share of a rule's flagged documents that are planted noise of any kind (a spam
    document removed as an exact duplicate of another spam document is no mistake); only a clean
    document lost is one. For the dedup rules a removed clean document is no loss either when the copy
    kept in its place is the planted duplicate made from it (`meta.source`): the pair was read in the
    other order and the corpus keeps one copy ("swapped"; a copy of another planted kind, such as a
    near-duplicate that normalisation made exact, also saves the source from counting as lost). Recall: the documents of the kinds a rule
    targets (NOISE_TARGETS) that it flagged (with the swapped ones) / the planted documents of those
    kinds; an earlier rule that removed one first takes it from a later rule's recall. Near-dedup
    targets exact duplicates too when exact dedup is off (`exact_first`). PII is masked, not removed:
    its row counts masked documents."""
    kinds = Counter(d.kind for d in docs if d.kind is not None)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for i, (rule, _) in removed_by.items():
        if docs[i].kind is not None:
            by_kind[docs[i].kind][rule] += 1
    rules: dict[str, dict] = {}
    for rule, targets in NOISE_TARGETS.items():
        if rule == "near_dedup" and exact_first:
            targets = ("near_duplicate",)
        if rule == "pii":
            hits = [i for i in pii_docs if docs[i].kind is not None]
            tp, swapped, replaced = sum(docs[i].kind in targets for i in hits), 0, 0
        else:
            hits = [i for i, (r, _) in removed_by.items() if r == rule and docs[i].kind is not None]
            tp = swapped = replaced = 0
            for i in hits:
                if docs[i].kind in targets:
                    tp += 1
                    continue
                rep = removed_by[i][1]
                if rep is not None and docs[rep].kind != "clean" and docs[rep].source_id == docs[i].id:
                    replaced += 1  # a clean source whose planted copy (of any kind) stays in its place
                    if docs[rep].kind in targets:
                        tp += 1
                        swapped += 1
        planted = sum(kinds[k] for k in targets)
        wrong = sum(docs[i].kind == "clean" for i in hits) - replaced  # clean text lost
        rules[rule] = {"targets": list(targets), "flagged": len(hits), "on_target": tp,
                       **({"swapped": swapped} if swapped else {}), "clean_lost": wrong,
                       "precision": round(1 - wrong / len(hits), 4) if hits else None,
                       "recall": round(tp / planted, 4) if planted else None,
                       "flagged_by_kind": dict(Counter(docs[i].kind for i in hits).most_common())}
    in_place: Counter = Counter()  # planted copies kept because their source, read later, was removed
    for i, (_rule, rep) in removed_by.items():
        if rep is not None and rep not in removed_by and docs[i].kind == "clean" and docs[rep].source_id == docs[i].id:
            in_place[docs[rep].kind] += 1
    table = {kind: {"documents": n, "removed": sum(by_kind[kind].values()),
                    **({"kept_in_place_of_removed_source": in_place[kind]} if in_place[kind] else {}),
                    "removed_fraction": round(sum(by_kind[kind].values()) / n, 4),
                    "by_rule": dict(by_kind[kind].most_common()),
                    **({"masked_pii": sum(docs[i].kind == kind for i in pii_docs)} if kind == "pii" else {})}
             for kind, n in sorted(kinds.items())}
    return {"kinds": table, "rules": rules}


def summary(report: dict) -> str:
    """The report as a few readable lines."""
    inp, kept, rem = report["input"], report["kept"], report["removed"]

    def pct(a: int, b: int) -> str:
        return f"{a / b:.1%}" if b else "-"

    lines = [f"read {inp['documents']} documents ({inp['words']} words); kept {kept['documents']} "
             f"({pct(kept['documents'], inp['documents'])}, {kept['words']} words) in {len(kept['shards'])} shard(s); "
             f"removed {rem['documents']} ({rem['words']} words)"
             + (f"; {len(inp['files_resumed'])} input file(s) read back from an earlier, failed run"
                if inp.get("files_resumed") else ""),
             f"  {'rule':<18} {'docs':>8} {'words':>10}  top reasons"]
    for rule, r in report["rules"].items():
        if not r["enabled"] and not r["documents"]:
            lines.append(f"  {rule:<18} {'off':>8}")
            continue
        reasons = ", ".join(f"{k} {v}" for k, v in list(r["reasons"].items())[:3])
        lines.append(f"  {rule:<18} {r['documents']:>8} {r['words']:>10}  {reasons}")
    pii = report["modified"]["pii"]
    if pii["enabled"]:
        found = ", ".join(f"{k} {pii[k]}" for k in ("email", "phone", "ip") if k in pii) or "none found"
        lines.append(f"  PII masked in {pii['documents']} documents, {pii['documents_kept']} of them kept ({found}; "
                     "rejected/ holds masked text too)")
    near = report["near_dedup"]
    if near["enabled"]:
        lines.append(f"  near-dup clusters: {near.get('clusters', 0)} (sizes {near.get('cluster_sizes', {})}); "
                     f"exact-dup clusters: {report['exact_dedup']['clusters']} "
                     f"(sizes {report['exact_dedup']['cluster_sizes']})")
    mix = report.get("mix", {})
    if mix.get("enabled"):
        parts = "; ".join(f"{m['data']} x{m['weight']:g}: {m['kept_documents']} kept -> {m['written_documents']} "
                          f"written ({m['share_of_written']:.1%})" for m in mix["sources"] if m["share_of_written"] is not None)
        lines.append(f"  mix ({'shuffled' if mix['shuffle'] else 'source by source'}, seed {mix['seed']}): "
                     f"{mix['written_documents']} documents written; {parts or 'nothing kept'}")
    tokens = report.get("tokens", {})
    if tokens.get("enabled"):
        lines.append(f"  token shards in {tokens['dir']}/: {tokens['train_tokens']} train tokens "
                     f"({tokens['train_documents']} documents), {tokens['val_tokens']} val tokens")
    if report.get("plots"):
        lines.append(f"  histograms: {', '.join(report['plots'])}")
    truth = report.get("ground_truth")
    if truth:
        lines.append("  against the planted labels (meta.kind):")
        lines.append(f"    {'rule':<18} {'flagged':>8} {'precision':>10} {'recall':>8}  targets")
        for rule, r in truth["rules"].items():
            p = "-" if r["precision"] is None else f"{r['precision']:.3f}"
            rc = "-" if r["recall"] is None else f"{r['recall']:.3f}"
            lines.append(f"    {rule:<18} {r['flagged']:>8} {p:>10} {rc:>8}  {', '.join(r['targets'])}")
        lines.append(f"    {'kind':<18} {'docs':>8} {'removed':>10}")
        for kind, k in truth["kinds"].items():
            swapped = k.get("kept_in_place_of_removed_source")
            note = f"; {swapped} more kept in place of their source, removed instead" if swapped else ""
            lines.append(f"    {kind:<18} {k['documents']:>8} {k['removed_fraction']:>10.1%}  {k['by_rule']}{note}")
    return "\n".join(lines)
