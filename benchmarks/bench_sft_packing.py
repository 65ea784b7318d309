"""SFT throughput with and without packing, on the built-in world's instruction rows.

    python benchmarks/bench_sft_packing.py [--examples 512 --batch 16 --pack-len 256 --rows 4]

Builds the world, trains a 2,048-token BPE on its corpus, encodes the SFT rows with the
ChatML template (completion-only loss), and times full training steps (forward, backward,
AdamW) of a random `llama-3m` over the same examples: padded batches of --batch examples
vs packed rows of --pack-len tokens (--rows per batch, attention kept inside each
example). The two sides alternate for --repeats rounds; each keeps its best.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pack-len", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from temper.config import OptimConfig
    from temper.data.chat import BUILTIN_TEMPLATES
    from temper.data.readers import iter_texts
    from temper.data.sft import encode_all, pack, packed_batch, pad_batch, read_conversations
    from temper.data.tokenizer import train_tokenizer
    from temper.data.world import WorldConfig, build_world, write_world
    from temper.losses import IGNORE_INDEX, causal_lm_loss
    from temper.models import build_model, preset
    from temper.train.optim import build_optimizer

    with tempfile.TemporaryDirectory() as d:
        paths = write_world(build_world(WorldConfig()), d)
        tokenizer = train_tokenizer(islice(iter_texts(paths["pretrain/train"]), 3000), vocab_size=2048)
        convs, _ = read_conversations(paths["sft/train"], limit=args.examples)
    examples, _ = encode_all(convs, tokenizer, BUILTIN_TEMPLATES["chatml"], loss_on="completion", max_len=512)
    torch.manual_seed(0)
    model = build_model(preset("llama-3m", vocab_size=2048)).train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))

    padded = [pad_batch(examples[i:i + args.batch], tokenizer.pad_id) for i in range(0, len(examples), args.batch)]
    rows = pack(examples, args.pack_len)
    packed = [packed_batch(rows[i:i + args.rows], args.pack_len, tokenizer.pad_id) for i in range(0, len(rows), args.rows)]

    def epoch(batches) -> float:
        start = time.perf_counter()
        for b in batches:
            loss_sum, n = causal_lm_loss(model, b.inputs, b.targets, positions=b.positions, mask=b.attention_mask())
            (loss_sum / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    epoch(padded[:2])
    epoch(packed[:2])  # warm-up
    best = {"padded": float("inf"), "packed": float("inf")}
    for _ in range(args.repeats):
        best["padded"] = min(best["padded"], epoch(padded))
        best["packed"] = min(best["packed"], epoch(packed))
    real = sum(len(e.inputs) for e in examples)
    targets = sum((b.targets != IGNORE_INDEX).sum().item() for b in padded)
    slots = {"padded": sum(b.inputs.numel() for b in padded), "packed": sum(b.inputs.numel() for b in packed)}
    print(f"{len(examples)} world SFT examples, {real} real tokens ({real / len(examples):.1f} per example), "
          f"{targets} target tokens; llama-3m, fp32, CPU threads {torch.get_num_threads()}")
    for name in ("padded", "packed"):
        t = best[name]
        steps = len(padded) if name == "padded" else len(packed)
        print(f"{name:7s} {steps:4d} steps  {slots[name]:7d} token slots ({real / slots[name]:.0%} real)  "
              f"{len(examples) / t:7.1f} examples/s  {real / t:8.0f} real tokens/s")
    print(f"packing speed-up: {best['padded'] / best['packed']:.2f}x examples/s")


if __name__ == "__main__":
    main()
