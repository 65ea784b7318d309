"""Streaming readers for text data: `.txt`, `.jsonl`, `.jsonl.gz`, `.json`, `.parquet`, directories and globs.

Every record comes with where it came from (file and line), so a bad row is reported as
`file:line: what was wrong`. Nothing is read whole into memory except a `.json` array.
A UTF-8 byte order mark at the start of a file (Windows editors write one) is dropped, so
it is never trained on; a UTF-16 file is refused by name instead of read as noise.
A `.jsonl.gz` file is decompressed as it streams (line numbers are those of the
decompressed text).

Only regular files are read: a FIFO, a device (a link named `x.txt` to /dev/zero) or a socket
is refused by name before it is opened, never read without end. One line, and one document
(a paragraph of a text file, or the whole file with `text_mode="file"`), holds at most
`max_document_mb` MiB (64 by default, `MAX_DOCUMENT_MB`); a longer one is an error naming
the file and line, found after reading that much of it, not after the whole line.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temper.errors import TemperError, TemperFileNotFoundError, require_file

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
MAX_DOCUMENT_MB = 64  # the longest line, or document, read (a 48 MB line trains in ~0.6 GB, see shards.py)


@dataclass(frozen=True)
class Record:
    data: dict[str, Any]
    source: str  # "file:line" (line is 1-based; for parquet, the row number)


def expand_paths(spec: str | Path | list, what: str = "data") -> list[Path]:
    """Files named by a path, a directory (its supported files, sorted), a glob or a list of these."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    files: list[Path] = []
    for s in specs:
        s = str(s)
        if any(ch in s for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(s, recursive=True))
            if not matched:
                raise TemperFileNotFoundError(f"{what}: the pattern {s!r} matches no file")
            files.extend(p for p in matched if _data_file(p, what))
            continue
        p = Path(s).expanduser()
        if not p.exists():
            raise TemperFileNotFoundError(f"{what} not found: {p}")
        if p.is_dir():
            inside = sorted(q for q in p.rglob("*") if _suffix(q) in SUPPORTED_SUFFIXES and _data_file(q, what))
            if not inside:
                raise TemperError(f"{what}: directory {p} holds no {', '.join(SUPPORTED_SUFFIXES)} files")
            files.extend(inside)
        else:
            files.append(require_file(p, what))
    for f in files:
        if _suffix(f) not in SUPPORTED_SUFFIXES:
            raise TemperError(f"{f}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    return files


def _data_file(p: Path, what: str) -> bool:
    """A file found by a glob or in a directory: True for a regular file, False for a directory (or a
    dangling link); a FIFO or a device among them is refused by name, not skipped or read."""
    if not p.exists() or p.is_dir():
        return False
    require_file(p, what)
    return True


def too_long(where: str, max_mb: int, what: str = "the line is") -> TemperError:
    return TemperError(f"{where}: {what} longer than {max_mb} MiB, the cap on one line or document "
                       f"(max_document_mb={max_mb}); split the text into smaller documents")


def _suffix(p: Path) -> str:
    name = p.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else p.suffix.lower()


UTF8_BOM = "\ufeff"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _decode(raw: bytes, path: Path, offset: int, errors: str) -> str:
    """UTF-8 text of `raw` (found at byte `offset` of `path`); a BOM at the file's start is dropped."""
    if offset == 0 and raw.startswith(_UTF16_BOMS):
        raise TemperError(f"{path}: UTF-16 text (byte order mark at the start); temper reads UTF-8 "
                          "(convert it, e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise TemperError(
            f"{path}: not UTF-8 at byte offset {offset + e.start} "
            "(set encoding_errors=replace to decode with replacement characters)"
        ) from None
    return text[1:] if offset == 0 and text.startswith(UTF8_BOM) else text


def iter_lines(path: Path, encoding_errors: str = "strict", max_mb: int = MAX_DOCUMENT_MB
               ) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without newline), decoded strictly unless told otherwise; a line
    over `max_mb` MiB is an error naming it, raised once that much of it is read."""
    for lineno, line, _ in _lines(path, encoding_errors, max_mb):
        yield lineno, line


def _lines(path: Path, encoding_errors: str, max_mb: int) -> Iterator[tuple[int, str, int]]:
    """`iter_lines`, with each line's size in bytes."""
    offset, lineno, limit = 0, 0, max_mb << 20
    path = require_file(path, "data")
    compressed = _suffix(path) == ".jsonl.gz"
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
        while True:
            try:
                raw = f.readline(limit + 1)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a truncated or non-gzip file
                raise TemperError(f"{path}: not a readable gzip file after byte {offset} of its text "
                                  f"({e or type(e).__name__})") from None
            if not raw:
                return
            lineno += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise too_long(f"{path}:{lineno}", max_mb)
            yield lineno, _decode(raw, path, offset, encoding_errors).rstrip("\r\n"), len(raw)
            offset += len(raw)


def iter_records(spec: str | Path | list, *, encoding_errors: str = "strict",
                 text_mode: str = "paragraph", max_document_mb: int = MAX_DOCUMENT_MB) -> Iterator[Record]:
    """Records from every file. Text files become `{"text": ...}` records: one per paragraph
    (blank-line separated, the default), one per line, or one per file (`text_mode`). A line or a
    text document over `max_document_mb` MiB is an error naming its file and line."""
    for path in expand_paths(spec):
        suffix = _suffix(path)
        if suffix in TEXT_SUFFIXES:
            yield from _text_records(path, encoding_errors, text_mode, max_document_mb)
        elif suffix in (".jsonl", ".jsonl.gz"):
            for lineno, line in iter_lines(path, encoding_errors, max_document_mb):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TemperError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise TemperError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield Record(obj, f"{path}:{lineno}")
        elif suffix == ".json":  # a regular file (expand_paths): read whole, as JSON must be
            try:
                obj = json.loads(_decode(path.read_bytes(), path, 0, encoding_errors))
            except json.JSONDecodeError as e:
                hint = " (one object per line is JSON Lines: name the file .jsonl)" if e.msg == "Extra data" else ""
                raise TemperError(f"{path}:{e.lineno}: not valid JSON ({e.msg}){hint}") from None
            rows = obj if isinstance(obj, list) else [obj]
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise TemperError(f"{path}: item {i} is not a JSON object")
                yield Record(row, f"{path}:item {i}")
        elif suffix == ".parquet":
            yield from _parquet_records(path)


def _text_records(path: Path, encoding_errors: str, text_mode: str, max_mb: int) -> Iterator[Record]:
    if text_mode not in ("paragraph", "line", "file"):
        raise TemperError(f"text_mode must be paragraph, line or file; got {text_mode!r}")
    if text_mode == "file":
        if require_file(path, "data").stat().st_size > max_mb << 20:
            raise too_long(f"{path}", max_mb, "the file (one document with text_mode=file) is")
        yield Record({"text": _decode(path.read_bytes(), path, 0, encoding_errors)}, f"{path}:1")
        return
    buffer: list[str] = []
    start, size = 1, 0
    for lineno, line, nbytes in _lines(path, encoding_errors, max_mb):
        if text_mode == "line":
            if line.strip():
                yield Record({"text": line}, f"{path}:{lineno}")
            continue
        if line.strip():
            if not buffer:
                start, size = lineno, 0
            buffer.append(line)
            size += nbytes
            if size > max_mb << 20:
                raise too_long(f"{path}:{start}", max_mb, f"a paragraph (lines {start}-{lineno}, no blank line) is")
        elif buffer:
            yield Record({"text": "\n".join(buffer)}, f"{path}:{start}")
            buffer = []
    if buffer:
        yield Record({"text": "\n".join(buffer)}, f"{path}:{start}")


def _parquet_records(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TemperError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    import pyarrow as pa

    row = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        for batch in batches:
            for obj in batch.to_pylist():
                row += 1
                yield Record(obj, f"{path}:row {row}")
    except (pa.ArrowException, OSError) as e:  # pyarrow's errors name neither the file nor the row
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a real I/O error (permissions, a vanished file): the CLI names the path
        where = f"{path}" if row == 0 else f"{path}:after row {row}"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TemperError(f"{where}: not a readable parquet file ({reason})") from None


def iter_texts(spec: str | Path | list, *, field: str = "text", encoding_errors: str = "strict",
               text_mode: str = "paragraph", max_document_mb: int = MAX_DOCUMENT_MB) -> Iterator[str]:
    """The `field` string of every record; a record without it is an error naming file and line."""
    for rec in iter_records(spec, encoding_errors=encoding_errors, text_mode=text_mode,
                            max_document_mb=max_document_mb):
        value = rec.data.get(field)
        if not isinstance(value, str):
            if field not in rec.data:
                keys = ", ".join(map(str, rec.data)) or "none"
                raise TemperError(f"{rec.source}: field '{field}' is missing (keys: {keys})")
            raise TemperError(f"{rec.source}: field '{field}' is {json_type(value)} (expected a string)")
        yield value


def json_type(value: Any) -> str:
    """How a user would name the type of a JSON / parquet value in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"of type {type(value).__name__}"
