"""LoRA SFT speed: temper vs transformers + peft + trl (SFTTrainer), both sides doing the same work.

    python benchmarks/bench_lora_trl.py --model runs/pretrain [--steps 40 --batch 16 --rounds 2]
    python benchmarks/bench_lora_trl.py --model runs/pretrain --precision bf16
    python benchmarks/bench_lora_trl.py --model runs/pretrain --packing   # each side at its best

`--packing`: each side packs the way it recommends, over ONE epoch of the same examples.
temper `packing=true`: the shuffled examples go greedily into rows of `seq_len` tokens
(positions restart and attention stays inside each example; only a row's tail is padding).
TRL `packing=True` with its default `packing_strategy="bfd"` (best-fit decreasing), which
turns on padding-free: a batch's packed rows become one flat sequence with position ids
that restart per example (no attention mask; transformers derives a block-diagonal mask
from the position ids for SDPA, so no example sees another; flash attention is not
needed for correctness, and this CPU has none). Both sides: `--batch` packed rows of 512
per step, one epoch (each side's own number of steps), the same completion-only tokens
trained (counted from each side's packed rows; TRL masks every example's first label,
a prompt token here). Reported: examples/s and trained tokens/s.

`--model` is a `temper pretrain` output (a Hugging Face directory, so transformers loads
it as is). Data: every row of the built-in world's `sft/train.jsonl` (single-turn
`messages`), rendered by both with the model's ChatML template.

Same work on both sides (TRL 1.x defaults differ from temper's in several places, so
every one that changes the work or the maths is set; the script prints them):
  - loss masking: the last assistant reply and its end of turn (`reply<|im_end|>\\n`),
    no EOS after it. temper: `loss_on=completion` (assistant span from the template).
    TRL: the rows become conversational prompt-completion (prompt = the messages before
    the last reply, completion = the last reply), so `completion_only_loss` applies (TRL
    trains the whole conversation for a plain `messages` dataset, and appends no EOS to a
    conversational completion). Both sides count the trained tokens; the script stops if
    the counts differ.
  - no gradient checkpointing on either (TRL's SFTConfig turns it ON by default);
    padding to the longest row of the batch, no packing, no padding-free (unless
    `--packing`); max length 512 (temper `seq_len`, TRL `max_length`); `--precision` fp32
    (TRL defaults to bf16 where the machine has it) or bf16 (autocast with fp32 master
    weights on both: temper `precision=bf16`, TRL `bf16=True`); batch 16, 1 micro-batch
    per step, the same number of steps.
  - LoRA r=8, alpha 16, dropout 0 on every linear layer but lm_head (trainable parameter
    counts printed; the script stops if they differ).
  - AdamW lr 2e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0, fused kernel, gradient
    clipping at 1.0; 2 linear warmup steps, then cosine to 10% of the peak (temper's warmup
    starts at peak/2, HF's at 0: a difference in the lr values, not in the work).
  - no evaluation, logging, checkpoints or saving inside the timed loop.
What still differs is how each computes the same thing: temper's fused chunked
cross-entropy vs TRL's fused LM head (which also computes entropy and top-1 accuracy
every step, a TRL metric that cannot be turned off).

Timed: the training loop only (temper's `train_seconds`, TRL's `train_runtime`); each side
runs in its own process, alternating for --rounds rounds, and keeps its best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_LEN = 512
LR, WARMUP, MIN_LR_RATIO, BETAS, EPS, CLIP = 2e-3, 2, 0.1, (0.9, 0.95), 1e-8, 1.0
LORA = dict(r=8, alpha=16, dropout=0.0)


def rows(model: str) -> list[dict]:
    with open(Path(model) / "world" / "sft" / "train.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def trl_settings(steps: int, batch: int, precision: str = "fp32", packing: bool = False) -> dict:
    """SFTConfig arguments that make TRL do temper's work (see the module docstring). Packing: TRL's
    recommended `packing=True` (strategy "bfd", which implies padding-free), over one epoch."""
    import transformers

    # transformers >= 5.2x renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing
    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return dict(
        max_steps=-1 if packing else steps, num_train_epochs=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, **{checkpointing: False}, bf16=precision == "bf16", fp16=False, use_cpu=True,
        max_length=MAX_LEN, completion_only_loss=True,
        **(dict(packing=True, packing_strategy="bfd") if packing else dict(packing=False, padding_free=False)),
        assistant_only_loss=False, learning_rate=LR, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATIO}, warmup_steps=WARMUP, optim="adamw_torch_fused",
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=0.0, max_grad_norm=CLIP,
        logging_steps=10_000, eval_strategy="no", save_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )


def trl_trainer(model_dir: str | Path, data_rows: list[dict], out: str, steps: int, batch: int,
                precision: str = "fp32", packing: bool = False):
    """TRL's SFTTrainer over `data_rows`, as prompt-completion so only the last reply is trained."""
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    data = datasets.Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                                       for r in data_rows])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=out, **trl_settings(steps, batch, precision, packing))
    return SFTTrainer(model=model, args=args, train_dataset=data,
                      processing_class=tokenizer, peft_config=lora)


def temper_examples(model_dir: str | Path, data_rows: list[dict]):
    """The (inputs, targets) examples temper's SFT recipe trains on for these rows."""
    from temper.data.sft import encode_all, row_to_conversations
    from temper.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    conversations = [c for r in data_rows for c in row_to_conversations(r, "world")]
    return encode_all(conversations, tokenizer, tokenizer.chat_template, loss_on="completion", max_len=MAX_LEN)[0]


def run_trl(args) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(args.model, rows(args.model), out, args.steps, args.batch, args.precision, args.packing)
        data = trainer.train_dataset
        if args.packing:  # a packed row holds several examples; each one's first label is never predicted
            trained_tokens = sum(_trained_in_packed_row(labels, lengths)
                                 for labels, lengths in zip(data["labels"], data["seq_lengths"]))
        else:
            trained_tokens = sum(sum(t != -100 for t in labels[1:]) for labels in data["labels"])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        result = trainer.train()
    settings = {k: v for k, v in trl_settings(args.steps, args.batch, args.precision, args.packing).items()
                if k not in ("max_steps", "per_device_train_batch_size")}
    return {"seconds": result.metrics["train_runtime"], "trained_tokens": trained_tokens, "trainable": trainable,
            "steps": result.global_step, "examples": len(rows(args.model)),
            "settings": settings, "versions": f"transformers {transformers.__version__}, "
            f"peft {__import__('peft').__version__}, trl {__import__('trl').__version__}"}


def _trained_in_packed_row(labels: list[int], lengths: list[int]) -> int:
    at, n = 0, 0
    for length in lengths:
        n += sum(t != -100 for t in labels[at + 1:at + length])
        at += length
    return n


def temper_epoch_steps(examples, batch: int) -> int:
    """Steps of one epoch of temper's packed loader (seed 0), as sft.run builds it."""
    from temper.data.sft import SFTLoader

    return SFTLoader(examples, batch_size=batch, seq_len=MAX_LEN, pad_id=0, seed=0, packing=True).batches_per_epoch


def run_temper(args) -> dict:
    from temper.config import load_config
    from temper.recipes import sft

    settings = [
        f"seq_len={MAX_LEN}", "loss_on=completion", f"packing={str(args.packing).lower()}",
        f"precision={args.precision}", "grad_accum=1",
        "peft.method=lora", f"peft.r={LORA['r']}", f"peft.alpha={LORA['alpha']}", f"peft.dropout={LORA['dropout']}",
        "peft.target_modules=all-linear", f"optim.lr={LR}", f"optim.betas=[{BETAS[0]},{BETAS[1]}]",
        f"optim.eps={EPS}", "optim.weight_decay=0.0", f"optim.grad_clip={CLIP}", "optim.fused=true",
        "schedule.name=cosine", f"schedule.warmup_steps={WARMUP}", f"schedule.min_lr_ratio={MIN_LR_RATIO}",
        "replay_weight=0", "checkpoint.every=0", "eval_samples=0", "eval_batches=1", "logging.eval_at_start=false",
        "logging.eval_every=0", "logging.progress=false", "seed=0",
    ]
    examples = temper_examples(args.model, rows(args.model))  # to count the trained tokens
    steps = temper_epoch_steps(examples, args.batch) if args.packing else args.steps
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(sft.Config, None, [f"model={args.model}", f"output_dir={out}", f"max_steps={steps}",
                                             f"batch_size={args.batch}", f"data={Path(args.model) / 'world' / 'sft' / 'train.jsonl'}",
                                             f"eval_data={Path(args.model) / 'world' / 'sft' / 'test.jsonl'}", *settings])
        summary = sft.run(cfg)
    return {"seconds": summary["train_seconds"], "trained_tokens": sum(e.num_targets for e in examples),
            "trainable": summary["trainable_parameters"], "settings": settings, "steps": steps,
            "examples": len(examples)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/pretrain")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--packing", action="store_true", help="each side packs as it recommends; one epoch")
    ap.add_argument("--only", choices=["temper", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        result = run_temper(args) if args.only == "temper" else run_trl(args)
        print("RESULT " + json.dumps(result))
        return
    if not (Path(args.model) / "world" / "sft" / "train.jsonl").is_file():
        sys.exit(f"{args.model}: run `temper pretrain output_dir={args.model}` (the built-in world) first")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in ("temper", "trl"):
            proc = subprocess.run([sys.executable, __file__, "--only", side, "--model", args.model, "--steps",
                                   str(args.steps), "--batch", str(args.batch), "--precision", args.precision,
                                   *(["--packing"] if args.packing else [])], capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[7:])
            if side not in best or r["seconds"] < best[side]["seconds"]:
                best[side] = r
    print(f"temper settings: {' '.join(best['temper']['settings'])}")
    print(f"trl settings:    {json.dumps(best['trl']['settings'])}")
    for key, what in (("trained_tokens", "trained tokens per epoch"), ("trainable", "trainable parameters")):
        if best["temper"][key] != best["trl"][key]:
            sys.exit(f"not the same work: {what} temper {best['temper'][key]} vs trl {best['trl'][key]}")
    tokens = best["temper"]["trained_tokens"]
    layout = (f"packed, one epoch ({best['temper']['examples']} examples; temper {best['temper']['steps']} steps, "
              f"trl {best['trl']['steps']} steps of {args.batch} rows of {MAX_LEN})") if args.packing else \
        f"{args.steps} steps x batch {args.batch}, padded to the longest"
    print(f"LoRA r=8 all-linear SFT, {args.model}, {layout}, {args.precision} CPU, no gradient checkpointing, "
          f"completion-only loss ({tokens} trained tokens per epoch, {best['temper']['trainable']:,} trainable "
          f"parameters on both); {best['trl']['versions']}")
    for side in ("temper", "trl"):
        r = best[side]
        n = r["examples"] if args.packing else args.steps * args.batch
        print(f"{side:7s} {r['seconds']:7.2f} s  {n / r['seconds']:7.1f} examples/s"
              + (f"  {tokens / r['seconds']:8.1f} trained tokens/s" if args.packing else ""))
    print(f"ratio temper/trl: {best['trl']['seconds'] / best['temper']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
