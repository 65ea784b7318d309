"""MinHash signatures and LSH banding for near-duplicate detection (datatrove's defaults).

A document's shingles are its word 5-grams (lower-cased `\\w+` words, the words of
`temper.eval.contamination`), each hashed to 64 bits with xxh3. Signature slot i is
min over shingles of `(a_i * h + b_i) mod 2**64` (a_i odd): 112 such hashes, numpy-vectorised
over all shingles of a document at once. LSH cuts the signature into `bands` bands of `rows`
rows (14 x 8 by default, datatrove's MinhashConfig); two documents are candidates when any band
is equal. A pair of Jaccard similarity s becomes a candidate with probability
1 - (1 - s**rows)**bands (the S-curve), which crosses 1/2 near (1/bands)**(1/rows) ~ 0.72.

Why our own and not `datasketch`: benchmarks/bench_minhash.py computes the same 112-hash
signatures both ways on the same documents; the numbers are in BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from temper.curate import xxhash
from temper.errors import TemperError

__all__ = ["MinHasher", "s_curve", "threshold", "check_bands", "UnionFind", "jaccard"]

_MASK = (1 << 64) - 1


def check_bands(num_hashes: int, bands: int, rows: int) -> None:
    """bands x rows must cover the signature exactly (one line otherwise)."""
    if bands < 1 or rows < 1:
        raise TemperError(f"near_dedup.bands and near_dedup.rows must be at least 1, got {bands} and {rows}")
    if bands * rows != num_hashes:
        raise TemperError(f"near_dedup: bands x rows = {bands} x {rows} = {bands * rows}, but num_hashes={num_hashes}; "
                          f"they must be equal (datatrove's default: 14 x 8 = 112)")


def threshold(bands: int, rows: int) -> float:
    """The similarity where the S-curve is steepest, ~ where a pair becomes a candidate: (1/b)^(1/r)."""
    return (1.0 / bands) ** (1.0 / rows)


def s_curve(similarity: float, bands: int, rows: int) -> float:
    """Probability that a pair of Jaccard similarity `similarity` shares at least one band."""
    return 1.0 - (1.0 - similarity ** rows) ** bands


def shingle_hashes(words: Sequence[str], n: int) -> np.ndarray:
    """64-bit hashes of the distinct word n-grams (the whole text as one shingle when shorter)."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    grams = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
    return np.fromiter((xxhash.xxh3_64_intdigest(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash sets."""
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class MinHasher:
    """`num_hashes` seeded permutations of 64-bit shingle hashes; `signature` of a document's shingles."""

    def __init__(self, num_hashes: int = 112, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 63, size=num_hashes, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=num_hashes, dtype=np.uint64)
        self.num_hashes = num_hashes

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """(num_hashes,) uint64: min over shingles of a*h + b (mod 2^64); all-ones for no shingles."""
        if not len(shingles):
            return np.full(self.num_hashes, _MASK, dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
            permuted = shingles[:, None] * self.a[None, :] + self.b[None, :]  # (S, num_hashes)
        return permuted.min(axis=0)


class UnionFind:
    """Clusters of document indices; the root of a cluster is its smallest (first-read) member."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = min(rx, ry), max(rx, ry)
            self.parent[hi] = lo
