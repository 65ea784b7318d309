"""Peak memory of tokenising one huge single-line document into shards, against encoding it whole.

    python benchmarks/bench_long_document.py [--mb 50 --peer-mb 5]

Writes a text file holding one document of --mb MB on a single line (words of the test
corpus), then in a fresh subprocess reads it with `iter_texts` and packs it with
`build_shards` (pieces cut where the tokenizer splits). The peer, in another subprocess,
reads the same kind of file (--peer-mb MB) and encodes the document whole with one
`encode_batch` call, as `build_shards` did before. Each side reports the growth of its
peak resident memory (ru_maxrss) over its state after loading the tokenizer, per MB of
text, and its time.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {tests!r})
from conftest import SAMPLE_TEXT
from temper.data.readers import iter_texts
from temper.data.shards import build_shards, read_index
from temper.data.tokenizer import train_tokenizer

tok = train_tokenizer(SAMPLE_TEXT.split("\n\n"), vocab_size=300, min_frequency=2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if {whole!r}:
    doc = next(iter_texts({path!r}))
    tokens = len(tok.encode_batch([doc])[0]) + 1
else:
    out = build_shards(iter_texts({path!r}), tok, {out!r})
    tokens = read_index(out)["splits"]["train"]["num_tokens"]
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"growth_mb": (peak - base) / 1024, "tokens": tokens, "seconds": seconds}}))
"""


def write_document(path: Path, mb: float) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import SAMPLE_TEXT

    words = SAMPLE_TEXT.split()
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < mb * 1e6:
            chunk = " ".join(rng.choice(words) for _ in range(10_000)) + " "
            f.write(chunk)
            written += len(chunk.encode())
        f.write("\n")


def measure(path: Path, whole: bool, tmp: str) -> dict:
    code = CHILD.format(tests=str(ROOT / "tests"), path=str(path), whole=whole, out=f"{tmp}/shards")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if run.returncode:
        raise SystemExit(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--peer-mb", type=float, default=5.0, help="encoding whole needs ~200x the text in memory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for label, mb, whole in (("build_shards (pieces)", args.mb, False), ("encode whole (peer)", args.peer_mb, True)):
            path = Path(tmp) / f"doc_{mb}.txt"
            write_document(path, mb)
            size = path.stat().st_size / 1e6
            r = measure(path, whole, tmp)
            rows.append((label, size, r))
            print(f"{label:24s} {size:7.1f} MB text  peak RSS +{r['growth_mb']:8.1f} MB "
                  f"({r['growth_mb'] / size:6.1f} MB per MB)  {r['tokens']:>10,} tokens  {r['seconds']:.1f} s")
        ours, peer = rows[0][2]["growth_mb"] / rows[0][1], rows[1][2]["growth_mb"] / rows[1][1]
        print(f"memory per MB of text: encode whole / pieces = {peer / ours:.1f}x")


if __name__ == "__main__":
    main()
