"""GGUF export on a preset's shape: size, time and error of each tensor type, and llama.cpp
running the files (where llama-cpp-python is installed).

    python benchmarks/bench_export.py [--preset llama-14m --new-tokens 32]

For F32, F16, Q8_0 and Q4_0: the export time (packing, writing and the read-back check), the
file size and bits per matrix weight, the relative RMS error of the matrices as gguf's
dequantize reads them back; with llama_cpp: its greedy decoding speed on the file (2
threads, the fastest of --repeats runs), the largest logit gap to temper's fp32 forward on the same ids, and how many
of its greedy tokens are temper's. Random weights (init_weights' N(0, 0.02)): the errors are of
Gaussian weights, not a trained model's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-14m")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    args = ap.parse_args()

    import gguf

    from temper.data.tokenizer import train_tokenizer
    from temper.export.gguf import write_gguf
    from temper.models import build_model, preset
    from temper.models.generate import SamplingConfig, generate
    from temper.models.registry import family

    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    text = Path(args.text).read_text(encoding="utf-8")
    config = preset(args.preset)
    tokenizer = train_tokenizer(text.split("\n\n"), vocab_size=config.vocab_size)
    torch.manual_seed(0)
    model = build_model(config).eval()
    source = dict(family("llama").gguf.tensors(model.state_dict(), config))
    matrices = sum(t.numel() for t in source.values() if t.dim() == 2)
    prompt = tokenizer.encode(text[:2000])[: args.prompt_len]
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=args.new_tokens))[0]
    print(f"{args.preset}: {matrices:,} matrix weights; prompt {len(prompt)} tokens, {args.new_tokens} new; "
          f"llama_cpp {llama_cpp.__version__ if llama_cpp else 'not installed'}")
    print("| type | export s | MB | bits/weight | rel. RMS error | llama.cpp tok/s | max logit gap | same greedy |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("f32", "f16", "q8_0", "q4_0"):
            path = Path(tmp) / f"model-{kind}.gguf"
            start = time.perf_counter()
            summary = write_gguf(model, tokenizer, path, tensor_type=kind)
            seconds = time.perf_counter() - start
            reader = gguf.GGUFReader(str(path))
            err = ref = 0.0
            nbytes = 0
            for t in reader.tensors:
                want = source[t.name]
                if want.dim() != 2:
                    continue
                got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(want.shape)
                err += float((got.double() - want.double()).pow(2).sum())
                ref += float(want.double().pow(2).sum())
                nbytes += t.data.nbytes
            row = [kind, f"{seconds:.2f}", f"{summary['bytes'] / 1e6:.1f}", f"{8 * nbytes / matrices:.2f}",
                   f"{(err / ref) ** 0.5:.2e}"]
            if llama_cpp is None:
                row += ["-", "-", "-"]
            else:
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + args.new_tokens + 1, n_threads=2,
                                      logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                                      type_v=llama_cpp.GGML_TYPE_F32)
                best = float("inf")
                for _ in range(args.repeats):  # the fastest of a few: the first pays for thread start-up
                    llm.reset()
                    llm.eval(prompt)
                    theirs = []
                    start = time.perf_counter()
                    for _ in range(args.new_tokens):
                        token = int(llm.scores[llm.n_tokens - 1].argmax())
                        theirs.append(token)
                        llm.eval([token])
                    best = min(best, time.perf_counter() - start)
                speed = args.new_tokens / best
                with torch.no_grad():
                    logits = model(torch.tensor([prompt + theirs]))[0]
                gap = float((torch.from_numpy(llm.scores[: logits.shape[0]].copy()) - logits).abs().max())
                same = sum(a == b for a, b in zip(theirs, ours))
                row += [f"{speed:.0f}", f"{gap:.2e}", f"{same}/{args.new_tokens}"]
                llm.close()
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
