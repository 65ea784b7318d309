"""`temper curate engine=ray`: the curation stages on Ray Data, on one machine or a cluster.

What runs where, and why the result is the single-process run's:

- Reading and the per-document steps (normalise, the filters, decontamination, the MinHash
  signature and the line hashes: `DocWork`, a function of the text alone) are a Ray Data pipeline
  per input file: one read task streams the file's records, `map_batches` runs `DocWork` on
  batches of `WORKER_BATCH` documents across the cluster's CPUs, and the driver takes the
  outcomes back in input order (`preserve_order`), exactly as the local pool gives them.
- Near-deduplication's banding runs as a Ray Data shuffle: every signature becomes one row per
  band (band, the band's bytes, document), `groupby(band, bytes)` puts the documents of an LSH
  bucket together wherever their input shards were read, and each bucket of two or more comes back
  as its members. The driver sorts the buckets into `pipeline.lsh_buckets`' order (band, then
  bytes) and runs the same union-find (and, with `near_dedup.verify`, the same exact-Jaccard check),
  so clusters, kept members and counts are the single-process run's.
- Exact and line deduplication (dictionary look-ups on hashes) and the writing stay in the driver,
  shared with the local engine.

Ray is an optional extra (`pip install 'temper[ray]'`); nothing else in temper imports it.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from temper.curate.outcome import decode_outcome, encode_outcome
from temper.errors import TemperError

__all__ = ["RayEngine", "lsh_buckets", "import_ray"]


BLOCK_BYTES = 1 << 20  # Ray Data blocks of about 1 MiB (Ray's default, 128 MiB, puts a whole file in one task)


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part used
    except ImportError:
        raise TemperError("engine=ray needs Ray Data: pip install 'temper[ray]' (or engine=local)") from None
    return ray


def _unwrap(error: BaseException) -> BaseException | None:
    """The TemperError a Ray task raised (Ray wraps it in its own exceptions), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None)  # RayTaskError(TemperError) is both: its cause is the original
        if isinstance(inner, BaseException):
            error = inner
            continue
        if isinstance(error, TemperError):
            return error
        error = error.__cause__
    return None


class RayEngine:
    """A Ray session for one curate run: joins `address` (or RAY_ADDRESS), or starts a local Ray with
    `workers` CPUs and stops it at the end."""

    def __init__(self, cfg, work, *, batch: int) -> None:
        self.cfg, self.work, self.batch = cfg, work, batch
        self.ray = import_ray()
        self._started = False

    def __enter__(self) -> RayEngine:
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if self.cfg.ray_address:
                ray.init(address=self.cfg.ray_address, **kwargs)
            else:  # RAY_ADDRESS set: join it; else a local Ray of `workers` CPUs
                ray.init(num_cpus=None if _env_address() else max(2, self.cfg.workers), **kwargs)
            self._started = True
        # a file smaller than a block is one task, fewer than `workers`: expected, not worth a warning
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
        # Ray Data logs a failed task's traceback itself; the run says it in one line (the error re-raised)
        self._levels = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
        for name in self._levels:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        ctx = ray.data.DataContext.get_current()
        self._saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size)
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.target_max_block_size = BLOCK_BYTES  # a read task's records leave in small blocks: the work spreads
        self.work_ref = ray.put(self.work)
        return self

    def __exit__(self, *exc) -> None:
        ctx = self.ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size = self._saved
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        if self._started:
            self.ray.shutdown()

    def outcomes(self, path: Path) -> Iterator[tuple[str, dict, Any, Any]]:
        """(source, row, raw text, Outcome or None) of every record of `path`, in input order."""
        cfg = self.cfg
        read = dict(encoding_errors=cfg.encoding_errors, text_mode=cfg.text_mode, max_document_mb=cfg.max_document_mb,
                    text_field=cfg.text_field)
        ds = self.ray.data.from_items([{"path": str(path)}]).flat_map(_read_rows, fn_kwargs=read)
        ds = ds.map_batches(_work_batch, fn_kwargs={"work_ref": self.work_ref, "text_field": cfg.text_field},
                            batch_size=self.batch, batch_format="pyarrow",
                            compute=self.ray.data.TaskPoolStrategy(size=cfg.workers))
        try:
            for row in ds.iter_rows():
                data = json.loads(row["d"])
                o = json.loads(row["o"])
                sig = row["sig"]
                yield row["s"], data, data.get(cfg.text_field), decode_outcome(o, sig if sig else None)
        except Exception as e:
            cause = _unwrap(e)
            if cause is not None:
                raise cause from None
            raise

    def lsh_buckets(self, signatures: np.ndarray, bands: int, rows: int) -> Iterator[np.ndarray]:
        return lsh_buckets(signatures, bands, rows, ray=self.ray, parallelism=self.cfg.workers)


def _env_address() -> str:
    import os

    return os.environ.get("RAY_ADDRESS", "")


# ----------------------------------------------------------------------------- Ray tasks (run in workers)


def _read_rows(item: dict, *, encoding_errors: str, text_mode: str, max_document_mb: int, text_field: str
               ) -> Iterator[dict]:
    from temper.data.readers import iter_records

    for rec in iter_records(item["path"], encoding_errors=encoding_errors, text_mode=text_mode,
                            max_document_mb=max_document_mb):
        yield {"s": rec.source, "d": json.dumps(rec.data, ensure_ascii=False)}


_WORK_CACHE: dict = {}


def _work_batch(batch, *, work_ref, text_field: str):
    """DocWork over a batch of rows: the outcome as JSON and the signature's bytes (b'' for none)."""
    import pyarrow as pa

    key = work_ref.hex()
    if key not in _WORK_CACHE:
        import ray

        _WORK_CACHE.clear()
        _WORK_CACHE[key] = ray.get(work_ref)
    work = _WORK_CACHE[key]
    outcomes, sigs = [], []
    for d in batch.column("d").to_pylist():
        raw = json.loads(d).get(text_field)
        done = work(raw) if isinstance(raw, str) else None
        outcomes.append(json.dumps(encode_outcome(done), ensure_ascii=False))
        sigs.append(b"" if done is None or done.signature is None else done.signature.tobytes())
    return batch.append_column("o", pa.array(outcomes, pa.string())).append_column("sig", pa.array(sigs, pa.binary()))


def _fixed_binary(values: np.ndarray):
    """(n, w) uint64 as an arrow column of n fixed-size binary values of 8 x w bytes (no Python bytes)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(8 * values.shape[1]), len(values),
                                                [None, pa.py_buffer(values)])


def _fixed_binary_values(column, width: int) -> np.ndarray:
    """The inverse of `_fixed_binary`: (n, width) uint64."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8)[arr.offset * 8 * width:(arr.offset + len(arr)) * 8 * width]
    return raw.view(np.uint64).reshape(len(arr), width)


def _band_rows(batch, *, bands: int, rows: int):
    """One row per (document, band): the band's index, its bytes and the document."""
    import pyarrow as pa

    idx = batch.column("idx").to_numpy()
    sig = _fixed_binary_values(batch.column("sig"), bands * rows)
    return pa.concat_tables([pa.table({"band": np.full(len(idx), b, dtype=np.int32),
                                       "key": _fixed_binary(sig[:, b * rows:(b + 1) * rows]), "idx": idx})
                             for b in range(bands)])


def _bucket_members(group):
    """A bucket of two or more documents as one row (its members ascending); a lone document as none."""
    import pyarrow as pa

    idx = np.sort(group.column("idx").to_numpy())
    key_type = group.schema.field("key").type
    if len(idx) < 2:
        return pa.table({"band": pa.array([], pa.int32()), "key": pa.array([], key_type),
                         "members": pa.array([], pa.list_(pa.int64()))})
    return pa.table({"band": pa.array([group.column("band")[0].as_py()], pa.int32()),
                     "key": pa.array([group.column("key")[0].as_py()], key_type),
                     "members": pa.array([idx.tolist()], pa.list_(pa.int64()))})


def lsh_buckets(signatures: np.ndarray, bands: int, rows: int, *, ray=None, parallelism: int = 2
                ) -> Iterator[np.ndarray]:
    """`pipeline.lsh_buckets` computed on Ray Data: the banding in tasks, the buckets by a distributed
    groupby; the same buckets, in the same order."""
    import pyarrow as pa

    ray = ray or import_ray()
    n = len(signatures)
    if not n:
        return
    chunk = max(1, min(-(-n // max(1, parallelism)), 1 << 15))  # blocks of at most 32k rows (28 MiB)
    ds = ray.data.from_arrow([pa.table({"idx": np.arange(start, min(n, start + chunk), dtype=np.int64),
                                        "sig": _fixed_binary(signatures[start:start + chunk])})
                              for start in range(0, n, chunk)])
    ds = ds.map_batches(_band_rows, fn_kwargs={"bands": bands, "rows": rows}, batch_format="pyarrow")
    ds = ds.groupby(["band", "key"]).map_groups(_bucket_members, batch_format="pyarrow")
    found = [(r["band"], r["key"], r["members"]) for r in ds.iter_rows()]
    found.sort(key=lambda x: (x[0], x[1]))  # band, then bytes: numpy's order of the band's void values
    for _, _, members in found:
        yield np.asarray(members, dtype=np.int64)
