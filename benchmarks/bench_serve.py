"""Load test of `temper serve`: throughput and latency at 1, 4 and 16 concurrent clients, with
continuous batching (max_batch=16) and one request at a time (max_batch=1), on loopback.

    python benchmarks/bench_serve.py [--hidden 256 --layers 4 --prompt-len 32 --new-tokens 32 --requests 32]

Builds a random Llama of the given shape (seed 0) with a small trained tokenizer, starts
`temper serve` on 127.0.0.1 in a subprocess (its own interpreter, so clients do not share
its GIL), and runs C client threads that each send streaming greedy /v1/completions requests
back to back (`ignore_eos`, so every request makes exactly --new-tokens tokens) until
--requests are done (the fastest of --repeats such runs is kept). Reports completion tokens/s over the wall time, the latency of a whole
request and the time to the first token (p50/p90/p99), and the batching gain (tokens/s with
max_batch=16 over max_batch=1, the same server otherwise). The peer: transformers `generate` on the same weights,
one request at a time in this process, beside temper's own `generate` the same way (vLLM does
not run on this CPU-only machine).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("Alice lives in Paris. Alice has a cat named Tom. Bob lives in Rome; his dog is Rex. "
        "The sum of 3 and 4 is 7. Twelve minus two is ten. ") * 40


def build_model_dir(args, out: Path) -> Path:
    from temper.data.tokenizer import train_tokenizer
    from temper.models import build_model, preset, save_model

    tokenizer = train_tokenizer(TEXT.split(". "), vocab_size=args.vocab, min_frequency=1)
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=args.heads, num_kv_heads=args.kv_heads,
                               intermediate_size=int(args.hidden * 8 / 3) // 32 * 32, max_seq_len=1024))
    save_model(model, out, tokenizer=tokenizer)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch: int, threads: int):
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "temper", "serve", f"model={model_dir}", f"port={port}",
                             f"max_batch={max_batch}", "max_concurrent=64", "log_level=warning", "name=bench"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def one_request(http, port: int, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streaming request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    return time.perf_counter() - start, first if first is not None else float("nan"), tokens


def load(port: int, clients: int, requests: int, prompt: str, new_tokens: int) -> dict:
    import httpx

    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    left = [requests]

    def client():
        with httpx.Client() as http:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                r = one_request(http, port, prompt, new_tokens)
                with lock:
                    results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    return {"tokens_per_second": sum(r[2] for r in results) / wall, "wall": wall,
            "p50": pct(latencies, 50), "p90": pct(latencies, 90), "p99": pct(latencies, 99),
            "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
            "tokens": sum(r[2] for r in results)}


def peers(model_dir: Path, prompt_ids: list[int], new_tokens: int, requests: int, threads: int,
          repeats: int) -> tuple[float, float]:
    """Greedy tokens/s, one request at a time in this process (no HTTP): (transformers `generate`,
    temper `generate`) on the same weights, alternated, the best of `repeats` each."""
    import transformers

    from temper.models import load_model
    from temper.models.generate import SamplingConfig, generate

    torch.set_num_threads(threads)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = load_model(model_dir).eval()
    ids = torch.tensor([prompt_ids])
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    cfg = SamplingConfig(max_new_tokens=new_tokens)

    def run_hf():
        for _ in range(requests):
            hf.generate(ids, **kw)

    def run_ours():
        for _ in range(requests):
            generate(ours, [prompt_ids], cfg)

    best = [0.0, 0.0]
    with torch.inference_mode():
        hf.generate(ids, **kw)  # warm-up
        generate(ours, [prompt_ids], cfg)
        for _ in range(repeats):
            for i, fn in enumerate((run_hf, run_ours)):
                start = time.perf_counter()
                fn()
                best[i] = max(best[i], requests * new_tokens / (time.perf_counter() - start))
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (about)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement (at least the clients)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2, help="measure each row this many times, keep the fastest")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and the peers")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args, Path(tmp) / "model")
        from temper.data.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(model_dir)
        words = TEXT.split(" ")
        prompt = " ".join(words[:args.prompt_len])
        while len(tok.encode(prompt)) > args.prompt_len:
            prompt = prompt.rsplit(" ", 1)[0]
        prompt_ids = tok.encode(prompt)
        print(f"model: llama {args.layers} layers, width {args.hidden}, vocab {args.vocab}; prompt "
              f"{len(prompt_ids)} tokens, {args.new_tokens} new tokens per request, greedy, "
              f"{args.requests} requests per row; torch threads {args.threads}; {os.cpu_count()} CPUs")
        rows = {}
        for max_batch in (16, 1):
            proc, port = start_server(model_dir, max_batch, args.threads)
            try:
                load(port, 1, 2, prompt, args.new_tokens)  # warm-up
                for c in clients:
                    runs = [load(port, c, max(args.requests, c), prompt, args.new_tokens) for _ in range(args.repeats)]
                    rows[max_batch, c] = max(runs, key=lambda r: r["tokens_per_second"])
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        print("\n| max_batch | clients | tokens/s | latency p50 / p90 / p99 (s) | first token p50 / p90 / p99 (s) |")
        print("|---|---|---|---|---|")
        for (max_batch, c), r in rows.items():
            print(f"| {max_batch} | {c} | {r['tokens_per_second']:.1f} | {r['p50']:.2f} / {r['p90']:.2f} / "
                  f"{r['p99']:.2f} | {r['ttft_p50']:.3f} / {r['ttft_p90']:.3f} / {r['ttft_p99']:.3f} |")
        print("\n| clients | batching gain (tokens/s, max_batch=16 / max_batch=1) |")
        print("|---|---|")
        for c in clients:
            print(f"| {c} | {rows[16, c]['tokens_per_second'] / rows[1, c]['tokens_per_second']:.2f}x |")
        if not args.no_peer:
            hf, ours = peers(model_dir, prompt_ids, args.new_tokens, min(args.requests, 8), args.threads, args.repeats)
            print("\n| one request at a time, in this process (no HTTP) | tokens/s |\n|---|---|")
            print(f"| transformers generate (peer) | {hf:.1f} |\n| temper generate | {ours:.1f} |")


if __name__ == "__main__":
    main()
