"""temper curate against datatrove: the same filters and MinHash settings on the same input, one command.

    python benchmarks/bench_curate.py --mb 50                    # a generated corpus of ~50 MB
    python benchmarks/bench_curate.py --data ../shared/data/wikitext2/valid.txt
    python benchmarks/bench_curate.py --datatrove /tmp/dt_xx:/tmp/datatrove_pkg    # where datatrove is installed

The work, on both sides, in one process (temper `workers=1`, datatrove `tasks=1 workers=1`):
Gopher repetition -> Gopher quality -> C4 -> FineWeb filters with their published defaults, then
MinHash near-deduplication over word 5-grams with 14 bands x 8 rows (64-bit hashes), keeping one
document per cluster, writing JSONL. Steps only one side has are off: temper's normalisation,
exact dedup, boilerplate lines and PII masking; datatrove has no such steps in this pipeline.
(datatrove normalises text before shingling, temper lower-cases words: a few candidate pairs can
differ.)

The generated corpus is made of wikitext-2 paragraphs (../shared/data/wikitext2/valid.txt, its
spaced-out punctuation joined back as in running text, "river , and" -> "river, and", and "<unk>" as "Unk"): each
document 3-8 random paragraphs, with 5% exact copies and 5% near-copies (a few words dropped) of
earlier documents. Throughput is reported per core: documents (and input MB) per CPU second of the
process (datatrove's stages run in this process with workers=1), beside the wall time; the machine
is shared, so CPU time is the fairer measure.

datatrove is not a dependency of temper: install it apart (`pip install --target DIR datatrove spacy`,
spacy for its English word tokenizer) and pass `--datatrove DIR`. datatrove 0.10.1 hashes str
with xxhash, which xxhash 4.x refuses ("Strings must be encoded before hashing"): put an xxhash
3.5 first (`pip install --target DIR2 xxhash==3.5.0`, `--datatrove DIR2:DIR`). Each side runs in
its own process, so each has its own xxhash.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext2" / "valid.txt"


def paragraphs(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line.split()) >= 20 and not line.startswith("="):
            line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").replace("<unk>", "Unk")
            out.append(re.sub(r"\( ", "(", re.sub(r" ([,.;:!?)]|'s\b|n't\b)", r"\1", line)))  # wikitext's spaced-out punctuation
    return out


def generate(path: Path, megabytes: float, source: Path, seed: int = 0) -> int:
    """A JSONL corpus of about `megabytes` MB from wikitext paragraphs, with planted (near-)duplicates."""
    rng = random.Random(seed)
    pool = paragraphs(source)
    written = docs = 0
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            r = rng.random()
            if r < 0.05 and recent:
                text = rng.choice(recent)
            elif r < 0.10 and recent:
                words = rng.choice(recent).split(" ")
                for _ in range(max(1, len(words) // 100)):
                    del words[rng.randrange(len(words))]
                text = " ".join(words)
            else:
                text = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(3, 8)))
                recent = (recent + [text])[-1000:]
            line = json.dumps({"text": text, "id": str(docs)}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime + ch.ru_utime + ch.ru_stime


def run_temper(data: Path, out: Path, workers: int = 1, engine: str = "local") -> dict:
    from temper.config import load_config
    from temper.stages import curate as stage

    cfg = load_config(stage.Config, None, [f"data={data}", f"output_dir={out}", "overwrite=true",
                                           f"workers={workers}", f"engine={engine}",
                                           "normalize.enabled=false", "exact_dedup=false", "line_dedup.enabled=false",
                                           "pii.enabled=false", "resume=false"])
    t0, c0 = time.perf_counter(), cpu_seconds()
    report = stage.run(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if engine == "ray":  # Ray's workers are not this process's children: their CPU time is not counted
        cpu = wall * workers  # what `workers` cores for the whole run cost (an upper bound)
    peak = {"main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "largest_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    return {"wall_s": wall, "cpu_s": cpu, "kept": report["kept"]["documents"], "peak_rss": peak,
            "removed": {r: v["documents"] for r, v in report["rules"].items() if v["documents"]}}


def run_datatrove(data: Path, out: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    shutil.rmtree(out, ignore_errors=True)
    minhash = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1,
                            hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    reader = JsonlReader(str(data.parent), glob_pattern=data.name, text_key="text", id_key="id")
    stages = [
        [reader, GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter(),
         JsonlWriter(str(out / "filtered"), compression=None),
         MinhashDedupSignature(output_folder=str(out / "signatures"), config=minhash)],
        [MinhashDedupBuckets(input_folder=str(out / "signatures"), output_folder=str(out / "buckets"), config=minhash)],
        [MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove_ids"), config=minhash)],
        [JsonlReader(str(out / "filtered"), text_key="text", id_key="id"),
         MinhashDedupFilter(input_folder=str(out / "remove_ids")), JsonlWriter(str(out / "deduped"), compression=None)],
    ]
    t0, c0 = time.perf_counter(), cpu_seconds()
    for k, pipeline in enumerate(stages):
        tasks = minhash.num_buckets if k == 1 else 1  # the bucket stage runs one task per band (one at a time)
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(out / f"logs{k}"),
                              skip_completed=False).run()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    filtered = sum(1 for p in (out / "filtered").glob("*.jsonl") for _ in open(p, encoding="utf-8"))
    kept = sum(1 for p in (out / "deduped").glob("*.jsonl") for _ in open(p, encoding="utf-8"))
    return {"wall_s": wall, "cpu_s": cpu, "kept": kept, "removed": {"filters": None, "near_dedup": filtered - kept},
            "passed_filters": filtered}


def side(name: str, data: Path, work: Path) -> dict:
    """One side in its own process (datatrove needs its own xxhash: see --datatrove)."""
    env = dict(os.environ)
    if name == "datatrove" and ARGS.datatrove:
        env["PYTHONPATH"] = os.pathsep.join([ARGS.datatrove, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, "--side", name, "--data", str(data), "--work", str(work),
                           "--workers", str(ARGS.workers), "--engine", ARGS.engine], env=env, stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"the {name} side failed (exit {proc.returncode}); its log is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=20, help="size of the generated corpus in MB")
    ap.add_argument("--data", type=Path, help="a JSONL file with a `text` field, or a wikitext .txt, instead")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_curate"))
    ap.add_argument("--datatrove", help="folders put first on the datatrove side's PYTHONPATH (os.pathsep-separated)")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--workers", type=int, default=1, help="temper's workers= (processes, or Ray tasks with --engine ray)")
    ap.add_argument("--engine", choices=("local", "ray"), default="local", help="temper's engine=")
    ap.add_argument("--side", choices=("temper", "datatrove"), help=argparse.SUPPRESS)
    ARGS = args = ap.parse_args()
    if args.side:  # a child: run one side, print its result as the last line
        if args.side == "temper":
            result = run_temper(args.data, args.work / args.side, args.workers, args.engine)
        else:
            result = run_datatrove(args.data, args.work / args.side)
        sys.stdout.flush()
        print("\n" + json.dumps(result))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        data = args.work / f"corpus-{args.mb:g}mb.jsonl"
        if not data.is_file():
            generate(data, args.mb, WIKITEXT.resolve())
    elif args.data.suffix == ".txt":  # wikitext: one document per article (a " = Title = " line), as JSONL
        data = args.work / f"{args.data.stem}.jsonl"
        blocks = [b.strip() for b in re.split(r"\n(?= = [^=])", args.data.read_text(encoding="utf-8")) if b.strip()]
        data.write_text("".join(json.dumps({"text": b, "id": str(i)}) + "\n" for i, b in enumerate(blocks)))
    else:
        data = args.data
    docs = sum(1 for _ in open(data, encoding="utf-8"))
    mb = data.stat().st_size / 1e6
    print(f"input: {data} ({docs} documents, {mb:.1f} MB)", flush=True)
    results = {"temper": side("temper", data, args.work)}
    if not args.skip_datatrove:
        results["datatrove"] = side("datatrove", data, args.work)
    print(f"\n{'':<10} {'wall s':>8} {'CPU s':>8} {'docs/s/core':>12} {'MB/s/core':>10} {'kept':>8}  peak RSS")
    for name, r in results.items():
        peak = r.get("peak_rss")
        rss = f"  main {peak['main_mb']:.0f} MB, largest worker {peak['largest_worker_mb']:.0f} MB" if peak else ""
        print(f"{name:<10} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {docs / r['cpu_s']:>12.0f} {mb / r['cpu_s']:>10.2f} "
              f"{r['kept']:>8}{rss}")
    if args.engine == "ray":
        print(f"(engine=ray: CPU s is wall x {args.workers} workers; Ray's worker processes are not counted directly)")
    if "datatrove" in results:
        ratio = results["datatrove"]["cpu_s"] / results["temper"]["cpu_s"]
        print(f"temper does the same work in {1 / ratio:.2f}x datatrove's CPU time ({ratio:.2f}x its throughput "
              "per core)")
    print(json.dumps({"documents": docs, "mb": round(mb, 2), **results}))


ARGS = None

if __name__ == "__main__":
    main()
