"""Weight-only quantisation of a pretrained temper model: size, memory, speed and perplexity.

    python benchmarks/bench_quantize.py [--cache runs/bench_quantize --steps 300 --layers 2]

1. Pretrains a small Llama with temper itself (cached in --cache/pretrain; width 256, 2 layers,
   intermediate 768, so group 128 divides every layer; vocabulary 2048, 300 steps of 8 x 128
   tokens: a few CPU minutes) on the first 90% of WikiText-2's
   validation text (../shared/data/wikitext2/valid.txt); the last 10% is held out.
2. Quantises it with `temper quantize` (int8, int4 RTN g128, GPTQ g128 with and without act
   order, NF4), GPTQ calibrated on 128 windows of 256 tokens of the training text.
3. For fp32, bf16 and each quantised directory, in a fresh subprocess: size of the weight
   files on disk, bytes of the model's tensors, the process's RSS growth from loading,
   greedy generation tokens/s (batch 1, KV cache), and perplexity on the held-out text
   (non-overlapping windows of 256 tokens, every token scored once).

With --peer, runs a peer GPTQ (GPTQModel) on the same model and calibration windows where it
installs and runs on CPU (see docs/quantization.md for what was tried).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from temper.io import weights_bytes

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "valid.txt"
VARIANTS = ("fp32", "bf16", "int8", "int4", "gptq", "gptq-actorder", "nf4")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def prepare(cache: Path, steps: int, layers: int) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    train, heldout = cache / "train.txt", cache / "heldout.txt"
    if not heldout.exists():
        text = TEXT.read_text(encoding="utf-8")
        cut = text.index("\n \n = ", int(len(text) * 0.9))  # at an article boundary
        train.write_text(text[:cut], encoding="utf-8")
        heldout.write_text(text[cut:], encoding="utf-8")
    model = cache / "pretrain"
    if not (model / "config.json").is_file():
        cmd = [sys.executable, "-m", "temper", "pretrain", "model=llama-3m", f"data={train}", f"eval_data={heldout}",
               f"output_dir={model}", "model_config.hidden_size=256", "model_config.intermediate_size=768",
               f"model_config.num_layers={layers}", "model_config.num_heads=4", "model_config.num_kv_heads=2",
               "vocab_size=2048", "seq_len=128", "batch_size=8", f"max_steps={steps}", "samples=0",
               "overwrite=true"]
        print("pretraining:", " ".join(cmd[2:]), file=sys.stderr)
        subprocess.run(cmd, check=True, env=os.environ)
    return model


def quantize(cache: Path, model: Path, variant: str) -> tuple[Path, float]:
    out = cache / variant
    if (out / "config.json").is_file():
        return out, float(json.loads((out / "bench.json").read_text())["seconds"])
    method = {"gptq-actorder": "gptq"}.get(variant, variant)
    cmd = [sys.executable, "-m", "temper", "quantize", f"model={model}", f"method={method}", f"output_dir={out}",
           "group_size=128", f"calibration={cache / 'train.txt'}", "nsamples=128", "seq_len=256", "overwrite=true"]
    if variant == "gptq-actorder":
        cmd.append("act_order=true")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=os.environ)
    seconds = time.perf_counter() - t0
    (out / "bench.json").write_text(json.dumps({"seconds": seconds}))
    return out, seconds


def heldout_nll(forward, ids: list[int], window: int) -> tuple[float, int]:
    """Summed NLL and token count of `ids` in disjoint windows of `window` predictions;
    `forward(input_ids) -> logits` (temper's model, or the peer's)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits = forward(chunk[:, :-1]).float()
            nll += float(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return nll, count


def measure(path: str, dtype: str, heldout: str, gen_tokens: int, window: int) -> dict:
    """One variant in this process: load, memory, perplexity, generation speed."""
    from temper.loading import load_for_inference
    from temper.models.generate import SamplingConfig, generate

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    before = rss_mb()
    model, tokenizer = load_for_inference(path, dtype=dtype)
    loaded = rss_mb() - before
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    tensor_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    ids = tokenizer.encode(Path(heldout).read_text(encoding="utf-8"))
    nll, count = heldout_nll(model, ids, window)
    with torch.no_grad():
        prompt = [ids[:32]]
        cfg = SamplingConfig(max_new_tokens=gen_tokens, temperature=0.0)
        generate(model, prompt, SamplingConfig(max_new_tokens=4, temperature=0.0))  # warm-up

        def speed() -> float:
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                new = generate(model, prompt, cfg)
                best = min(best, time.perf_counter() - t0)
            return len(new[0]) / best

        tokens_per_second = speed()
        switchable = [m for m in model.modules() if hasattr(m, "use_fast_kernel")]
        for m in switchable:
            m.use_fast_kernel = False
        reference_speed = speed() if switchable else float("nan")
    return {"ppl": math.exp(nll / count), "tokens": count, "tokens_per_second": tokens_per_second,
            "reference_tokens_per_second": reference_speed,
            "tensor_mb": tensor_mb, "load_rss_mb": loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def best_ms(module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        module(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def kernels(repeats: int = 20) -> None:
    """The matmul alone: aten's weight-only CPU kernels against dequantise-then-F.linear."""
    from temper.quant import weight_only
    from temper.quant.weight_only import Int4Linear, Int8Linear

    weight_only.FAST_MAX_ROWS = 1 << 20  # the fast kernels at every row count, to measure where they lose

    torch.manual_seed(0)
    print("| layer (out x in) | tokens | fp32 F.linear (ms) | int8 reference / fast (ms) | "
          "int4 g128 reference / fast (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for out_f, in_f in ((768, 256), (4096, 4096)):
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        layers = {"int8": Int8Linear.from_linear(linear), "int4": Int4Linear.from_linear(linear, 128)}
        for tokens in (1, 128):
            x = torch.randn(tokens, in_f)
            cells = [f"{best_ms(linear, x, repeats):.3f}"]
            with torch.no_grad():
                for layer in layers.values():
                    layer.use_fast_kernel = False
                    ref = best_ms(layer, x, repeats)
                    layer.use_fast_kernel = True
                    fast = best_ms(layer, x, repeats)
                    cells.append(f"{ref:.3f} / {fast:.3f}")
            print(f"| {out_f} x {in_f} | {tokens} | " + " | ".join(cells) + " |")


def peer_gptq(model: Path, cache: Path, act_order: bool, window: int) -> dict:
    """GPTQModel's GPTQ (4 bits, group 128) on the same model and the same calibration windows as
    temper's, then its own quantised model's perplexity on the same held-out windows (its torch
    CPU kernel); run in the interpreter that has gptqmodel (--peer-python)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    from temper.data.tokenizer import Tokenizer
    from temper.stages.quantize import calibration_windows

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tokenizer = Tokenizer.from_dir(model)
    windows = calibration_windows([(cache / "train.txt").read_text(encoding="utf-8")], tokenizer, 128, 256, 0)
    calibration = [{"input_ids": w[0].tolist(), "attention_mask": [1] * w.shape[1]} for w in windows]
    t0 = time.perf_counter()
    # asymmetric with zero-points and fp32 like temper's (GPTQModel's defaults: symmetric, bf16 on CPU)
    config = QuantizeConfig(bits=4, group_size=128, desc_act=act_order, sym=False)
    qmodel = GPTQModel.load(str(model), config, device="cpu", dtype=torch.float32)
    qmodel.quantize(calibration, batch_size=1, calibration_sort=None)
    seconds = time.perf_counter() - t0
    out = cache / f"peer-gptq{'-actorder' if act_order else ''}"
    qmodel.save(str(out))
    del qmodel
    loaded = GPTQModel.load(str(out), device="cpu", dtype=torch.float32)
    ids = tokenizer.encode((cache / "heldout.txt").read_text(encoding="utf-8"))
    nll, count = heldout_nll(lambda x: loaded.model(input_ids=x).logits, ids, window)
    import gptqmodel
    return {"ppl": math.exp(nll / count), "tokens": count, "quantize_s": seconds, "disk_mb": disk_mb(out),
            "version": gptqmodel.__version__}


def disk_mb(path: Path) -> float:
    return weights_bytes(path) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="runs/bench_quantize")
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps (cached)")
    ap.add_argument("--layers", type=int, default=2, help="pretrained model's blocks (cached)")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--kernels", action="store_true", help="only the matmul micro-benchmark")
    ap.add_argument("--peer-python", help="an interpreter with gptqmodel installed: add GPTQModel's GPTQ rows")
    ap.add_argument("--peer-run", nargs=2, metavar=("MODEL", "ACT_ORDER"), help=argparse.SUPPRESS)
    ap.add_argument("--measure", nargs=3, metavar=("PATH", "DTYPE", "HELDOUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_run:
        result = peer_gptq(Path(args.peer_run[0]), Path(args.cache), args.peer_run[1] == "1", args.window)
        print(json.dumps(result))
        return
    if args.measure:
        print(json.dumps(measure(*args.measure, args.gen_tokens, args.window)))
        return
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.kernels:
        kernels()
        return
    if not TEXT.exists():
        sys.exit(f"{TEXT} is absent: this benchmark needs ../shared/data")
    cache = Path(args.cache)
    model = prepare(cache, args.steps, args.layers)
    rows = {}
    for variant in args.variants.split(","):
        path, seconds = (model, 0.0) if variant in ("fp32", "bf16") else quantize(cache, model, variant)
        dtype = "bfloat16" if variant == "bf16" else "float32"
        proc = subprocess.run([sys.executable, __file__, "--measure", str(path), dtype, str(cache / "heldout.txt"),
                               "--gen-tokens", str(args.gen_tokens), "--window", str(args.window)],
                              capture_output=True, text=True, env=os.environ)
        if proc.returncode:
            sys.exit(f"{variant} failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["disk_mb"] = disk_mb(path) / (2 if variant == "bf16" else 1)  # bf16: what a bf16 save would hold
        r["quantize_s"] = seconds
        rows[variant] = r
        print(f"{variant}: {r}", file=sys.stderr)
    peers = {}
    for act_order in ("0", "1") if args.peer_python else ():
        proc = subprocess.run([args.peer_python, __file__, "--peer-run", str(model), act_order, "--cache", str(cache),
                               "--window", str(args.window)], capture_output=True, text=True, env=os.environ)
        if proc.returncode:
            print(f"peer GPTQ failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        peers["GPTQModel " + ("act order" if act_order == "1" else "g128")] = json.loads(
            proc.stdout.strip().splitlines()[-1])
    base = rows.get("fp32")
    print(f"model: {model} ({json.loads((model / 'config.json').read_text())['hidden_size']} wide), held-out "
          f"tokens {next(iter(rows.values()))['tokens']}, torch {torch.__version__}, threads "
          f"{os.environ.get('BENCH_THREADS', '2')}")
    print("| variant | weights on disk (MiB) | tensors in memory (MiB) | RSS growth at load (MiB) | greedy tokens/s | "
          "tokens/s, fast kernels off | held-out ppl | ppl delta vs fp32 | quantise time (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, r in rows.items():
        delta = f"{r['ppl'] - base['ppl']:+.3f}" if base else "-"
        print(f"| {variant} | {r['disk_mb']:.2f} | {r['tensor_mb']:.2f} | {r['load_rss_mb']:.1f} | "
              f"{r['tokens_per_second']:.1f} | {r['reference_tokens_per_second']:.1f} | {r['ppl']:.3f} | {delta} | "
              f"{r['quantize_s']:.1f} |")
    for name, r in peers.items():
        delta = f"{r['ppl'] - base['ppl']:+.3f}" if base else "-"
        print(f"| {name} ({r['version']}) | {r['disk_mb']:.2f} | - | - | - | - | {r['ppl']:.3f} | {delta} | "
              f"{r['quantize_s']:.1f} |")


if __name__ == "__main__":
    main()
