"""MinHash signatures: temper's numpy-vectorised MinHasher against datasketch, same documents, same settings.

    python benchmarks/bench_minhash.py [--docs 2000] [--words 300] [--repeats 3]

Both compute 112-hash signatures (datatrove's 14 bands x 8 rows) over the same word 5-gram
shingles of the same documents: temper hashes each shingle once with xxh3-64 and permutes all
112 slots in one numpy expression per document; datasketch (`MinHash(num_perm=112)` with
`update_batch`) hashes with SHA-1 to 32 bits and permutes modulo the Mersenne prime 2^61-1,
also in numpy. The time includes the shingle hashing for both (that is the work a curation run
does per document). Alongside the speed, the script checks the estimates: over pairs of
documents with a known share of changed words, the mean absolute error of each side's
Jaccard estimate against the exact Jaccard of the shingle sets, and which pairs each side's
14 x 8 banding makes candidates.

The documents are synthetic (random words from a 5,000-word vocabulary), so every doc has
`words - 4` distinct shingles; the machine is shared, so each side keeps its best of `repeats`.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from temper.curate.minhash import MinHasher, jaccard, shingle_hashes


def documents(n: int, length: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    docs = []
    for i in range(n):
        if i % 2 and docs:  # every other doc: a variant of the one before, a share of its words changed
            base = list(docs[-1])
            for j in rng.sample(range(length), int(length * rng.choice((0.02, 0.05, 0.1, 0.2)))):
                base[j] = rng.choice(vocab)
            docs.append(base)
        else:
            docs.append([rng.choice(vocab) for _ in range(length)])
    return docs


def shingles(doc: list[str], n: int = 5) -> list[str]:
    return [" ".join(doc[i:i + n]) for i in range(len(doc) - n + 1)]


def temper_signatures(docs):
    hasher = MinHasher(112, seed=1)
    return [hasher.signature(shingle_hashes(d, 5)) for d in docs]


def datasketch_signatures(docs):
    from datasketch import MinHash

    out = []
    for d in docs:
        m = MinHash(num_perm=112, seed=1)
        m.update_batch([s.encode("utf-8") for s in set(shingles(d))])
        out.append(m.hashvalues)
    return out


def candidates(sigs, bands=14, rows=8) -> set[int]:
    """Indices i (odd) whose pair (i-1, i) shares a band."""
    found = set()
    for i in range(1, len(sigs), 2):
        a, b = sigs[i - 1], sigs[i]
        if any(np.array_equal(a[k * rows:(k + 1) * rows], b[k * rows:(k + 1) * rows]) for k in range(bands)):
            found.add(i)
    return found


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--words", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    docs = documents(args.docs, args.words)
    for i, d in enumerate(docs):  # the same work: both sides see the same distinct shingles of every document
        if len(set(shingles(d))) != len(shingle_hashes(d, 5)):
            raise SystemExit(f"document {i}: the two sides would hash different shingles; not timing different work")
    best = {"temper": float("inf"), "datasketch": float("inf")}
    sigs = {}
    for _ in range(args.repeats):  # alternate the sides, keep each one's best
        for name, fn in (("temper", temper_signatures), ("datasketch", datasketch_signatures)):
            t0 = time.perf_counter()
            sigs[name] = fn(docs)
            best[name] = min(best[name], time.perf_counter() - t0)
    exact = [jaccard(shingle_hashes(docs[i - 1], 5), shingle_hashes(docs[i], 5)) for i in range(1, len(docs), 2)]
    print(f"{args.docs} documents x {args.words} words, 112 hashes over word 5-grams (best of {args.repeats})")
    print(f"{'side':<11} {'docs/s':>10} {'MB/s':>7} {'mean |est - exact| Jaccard':>28} {'pairs made candidates':>22}")
    megabytes = sum(len(" ".join(d)) for d in docs) / 1e6
    for name in ("temper", "datasketch"):
        s = sigs[name]
        est = [float(np.mean(s[i - 1] == s[i])) for i in range(1, len(s), 2)]
        err = float(np.mean(np.abs(np.array(est) - np.array(exact))))
        print(f"{name:<11} {args.docs / best[name]:>10,.0f} {megabytes / best[name]:>7.2f} {err:>28.4f} "
              f"{len(candidates(s)):>22}")
    print(f"speed ratio temper / datasketch: {best['datasketch'] / best['temper']:.2f}x; pairs: {len(exact)}, "
          f"exact Jaccard from {min(exact):.2f} to {max(exact):.2f}")


if __name__ == "__main__":
    main()
