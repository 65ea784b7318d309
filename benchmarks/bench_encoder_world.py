"""Encoder objectives on the built-in world (CPU, bert-tiny): what each pretraining buys.

    nice -n 19 env PYTHONPATH=. python benchmarks/bench_encoder_world.py --out runs/bench-encoder
    nice -n 19 env PYTHONPATH=. python benchmarks/bench_encoder_world.py --out /tmp/b --smoke   # a minute

Every run goes through the CLI (`temper pretrain objective=...`, `temper finetune-encoder`) as a user
types it, with one WordPiece tokenizer (the MLM run's) for all. It prints one JSON object per
result and a summary table:

1. **MLM-pretrained vs random-init fine-tuning** on the world's understanding task (`classify`:
   which fact a sentence states), fine-tuned on the rows of the first `--finetune-people` people
   only, measured on every person's held-out split (a template no fine-tuning row uses), the same
   fine-tuning budget for both; `tokens` (tag people and towns) likewise.
2. **ELECTRA vs MLM** per pretraining compute: each pretraining run keeps `--checkpoints` checkpoints; each is
   fine-tuned as in 1 (both tasks, the mean over the seeds); pretraining FLOPs = training FLOPs per token (`engine.flops_per_token`,
   PaLM's 6N + attention; ELECTRA: the generator's plus the discriminator's) x the tokens seen so
   far (the run's padded tokens x the share of its steps).
3. **NSP vs SOP** (sentence task alone, `objective=nsp|sop`): accuracy on held-out pairs (the
   world's validation documents) whose negatives are (a) a segment of a random document (NSP's
   negatives), (b) a segment of another document on the same topic (the same person, town, or
   kind of document), (c) the same two segments swapped (SOP's negatives).
5. **[CLS] trained by a sentence task**: `objective=mlm+nsp` pretrained like MLM, then fine-tuned
   as in 1, to test whether classification from [CLS] fails after MLM because MLM never trains it.
4. **SimCSE**: recall@1 of held-out paraphrase pairs (one fact in two templates; the anchor's
   template unseen in training pairs) among all of them: an untrained encoder, the MLM encoder
   (mean pooling), unsupervised SimCSE on the world's documents from the MLM encoder, and
   supervised pairs (the train split's paraphrases) from the MLM encoder.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from temper.cli import main
from temper.data.encoder import (
    EncoderVocab,
    collate_labelled,
    frame,
    pad_examples,
    read_labelled,
    split_segments,
)
from temper.data.tokenizer import Tokenizer
from temper.data.world import paraphrase_pairs, prepare_world, understanding_rows
from temper.models import load_model, save_model
from temper.stages.embed import embed_texts
from temper.train.engine import flops_per_token

COMMON = ["seq_len=64", "logging.progress=false", "logging.eval_at_start=false"]


REUSE = False  # --reuse: a pretraining run whose summary.json exists is read, not run again


def temper(*args: str) -> dict:
    started = time.time()
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    if REUSE and args[0] == "pretrain" and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    code = main(list(args))
    if code != 0:
        raise SystemExit(f"temper {' '.join(args)} failed ({code})")
    summary = json.loads((out / "summary.json").read_text())
    print(f"# {args[0]} {out.name}: {time.time() - started:.0f} s", file=sys.stderr)
    return summary


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def report(**row) -> dict:
    print(json.dumps(row), flush=True)
    return row


def checkpoint_dirs(run: Path, module: str, root: Path) -> list[tuple[int, Path]]:
    """Each checkpoint of `run` as a model directory (the final directory's config and tokenizer)."""
    final = load_model(run)
    tokenizer = Tokenizer.from_dir(run)
    out = []
    for ckpt in sorted((run / "checkpoints").iterdir()):
        step = int(ckpt.name.split("_")[1])
        missing, unexpected = final.load_state_dict(load_file(ckpt / f"{module}.safetensors"), strict=False)
        assert not unexpected and all(k.endswith("decoder.weight") for k in missing), (missing, unexpected)
        final.tie_weights()  # the tied decoder is stored once, as the word embeddings
        target = root / f"{run.name}-{step}"
        save_model(final, target, tokenizer=tokenizer)
        out.append((step, target))
    return out


def finetune(root: Path, name: str, model: str, task: str, data: Path, eval_data: Path, args, seed: int = 0,
             tokenizer: str | None = None, shape: list[str] = ()) -> float:
    settings = [f"task={task}", f"model={model}", f"data={data}", f"eval_data={eval_data}",
                f"output_dir={root / 'ft' / f'{name}-{task}-{seed}'}", f"max_steps={args.finetune_steps}",
                "batch_size=16", f"seed={seed}", "optim.lr=1e-3", f"logging.every={args.finetune_steps}",
                f"logging.eval_every={args.finetune_steps}", "overwrite=true", *COMMON]
    if tokenizer:
        settings.append(f"tokenizer={tokenizer}")
    settings += shape  # a preset's random weights in the pretrained models' shape
    return temper("finetune-encoder", *settings)["eval_accuracy"]


@torch.no_grad()
def confusion(model_dir: Path, test: Path) -> dict[str, dict[str, int]]:
    """{true label: {predicted label: held-out sentences}} of a fine-tuned classifier."""
    model = load_model(model_dir).eval()
    tokenizer = Tokenizer.from_dir(model_dir)
    names = [model.config.extra["id2label"][str(i)] for i in range(len(model.config.extra["id2label"]))]
    vocab = EncoderVocab.from_tokenizer(tokenizer)
    examples, _ = read_labelled([str(test)], tokenizer, vocab, task="classify", max_len=64, label_names=names)
    table: dict[str, dict[str, int]] = {}
    for i in range(0, len(examples), 64):
        batch = collate_labelled(examples[i:i + 64], vocab.pad_id)
        predicted = model(batch.input_ids, attention_mask=batch.attention_mask).logits.argmax(-1)
        for truth, guess in zip(batch.labels.tolist(), predicted.tolist()):
            row = table.setdefault(names[truth], {})
            row[names[guess]] = row.get(names[guess], 0) + 1
    return table


# ----------------------------------------------------------------------------- NSP vs SOP


def sentence_eval_sets(world: Path, tokenizer: Tokenizer, seq_len: int, seed: int = 0) -> dict[str, list]:
    """{negatives kind: [(example, label)]}: every consecutive pair of every validation document as a
    positive, and one negative of each kind per positive."""
    docs = [json.loads(line) for line in (world / "pretrain" / "val.jsonl").read_text().splitlines()]
    vocab = EncoderVocab.from_tokenizer(tokenizer)

    def pieces(text: str):
        enc = tokenizer.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [-1 if w is None else w for w in enc.word_ids]

    segmented = [(d["meta"]["topic"], d["meta"].get("about"), [pieces(s) for s in split_segments(d["text"])])
                 for d in docs]
    segmented = [d for d in segmented if len(d[2]) >= 2]
    rng = random.Random(seed)
    sets: dict[str, list] = {"random document": [], "same topic": [], "swapped": []}
    for i, (topic, about, segments) in enumerate(segmented):
        same = [j for j, d in enumerate(segmented) if j != i and d[0] == topic and d[1] == about]
        for k in range(len(segments) - 1):
            a, b = segments[k], segments[k + 1]
            other = rng.choice([j for j in range(len(segmented)) if j != i])
            negatives = {"random document": (a, rng.choice(segmented[other][2])), "swapped": (b, a)}
            if same:
                negatives["same topic"] = (a, rng.choice(segmented[rng.choice(same)][2]))
            for kind, (x, y) in negatives.items():
                sets[kind] += [(frame(vocab, a, b, max_len=seq_len), 0), (frame(vocab, x, y, max_len=seq_len), 1)]
    return sets


@torch.no_grad()
def sentence_accuracy(model_dir: Path, pairs: list, pad_id: int) -> float:
    model = load_model(model_dir).eval()
    correct = 0
    for i in range(0, len(pairs), 128):
        chunk = pairs[i:i + 128]
        padded = pad_examples([e for e, _ in chunk], pad_id)
        logits = model(padded["input_ids"], attention_mask=padded["attention_mask"],
                       token_type_ids=padded["token_type_ids"],
                       selected=torch.zeros_like(padded["input_ids"], dtype=torch.bool)).sentence_logits
        correct += int((logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
    return correct / len(pairs)


# ----------------------------------------------------------------------------- SimCSE


def recall_at_1(model_dir_or_model, tokenizer: Tokenizer, pairs: list[dict], pooling: str = "mean") -> float:
    model = load_model(model_dir_or_model) if isinstance(model_dir_or_model, (str, Path)) else model_dir_or_model
    a = embed_texts(model, tokenizer, [p["anchor"] for p in pairs], pooling=pooling, seq_len=64, batch_size=128,
                    normalize=True)
    b = embed_texts(model, tokenizer, [p["positive"] for p in pairs], pooling=pooling, seq_len=64, batch_size=128,
                    normalize=True)
    return float(((a @ b.T).argmax(1) == np.arange(len(pairs))).mean())


def run(args) -> None:
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    S = args.pretrain_steps
    shape = [f"model_config.{kv}" for kv in args.model_config]
    pre = [*COMMON, *shape, "batch_size=32", f"max_steps={S}", f"checkpoint.every={S // args.checkpoints}", "checkpoint.keep_last=0",
           f"logging.every={max(1, S // 10)}", f"logging.eval_every={S}", "overwrite=true"]
    world = prepare_world({}, 0, root / "world")
    facts = json.loads((world / "facts.json").read_text())
    results = []

    # MLM and ELECTRA, the same steps, batch and tokenizer
    mlm = root / "mlm"
    temper("pretrain", "objective=mlm", f"output_dir={mlm}", *pre)
    tok = str(mlm)
    tokenizer = Tokenizer.from_dir(mlm)
    electra = root / "electra"
    temper("pretrain", "objective=electra", f"output_dir={electra}", f"tokenizer={tok}", *pre)

    # the understanding task: fine-tune on a few people's rows, test on everyone's held-out templates
    keep = {p["name"] for p in facts["people"][:args.finetune_people]}
    tasks = {}
    for task in ("classify", "tokens"):
        train_rows = [r for r in understanding_rows(facts, task, "train")
                      if (r.get("text") or " ".join(r["tokens"])).startswith(tuple(keep))
                      or any(name in (r.get("text") or " ".join(r["tokens"])) for name in keep)]
        tasks[task] = (write_rows(root / "task" / task / "train.jsonl", train_rows),
                       write_rows(root / "task" / task / "test.jsonl", understanding_rows(facts, task, "test")))
        print(f"# {task}: {len(train_rows)} fine-tuning rows, {len(understanding_rows(facts, task, 'test'))} "
              "held-out", file=sys.stderr)

    # 1. pretrained vs random init, the same fine-tuning budget (--seeds seeds)
    for task, (train, test) in tasks.items() if 1 in args.experiments else ():
        for seed in range(args.seeds):
            results.append(report(experiment="pretrained vs random", task=task, seed=seed, init="random",
                                  accuracy=finetune(root, "random", "bert-tiny", task, train, test, args, seed, tok,
                                                    shape)))
            results.append(report(experiment="pretrained vs random", task=task, seed=seed, init="mlm",
                                  accuracy=finetune(root, "mlm", str(mlm), task, train, test, args, seed)))
        if task == "classify":  # which fact each held-out template was taken for (seed 0)
            for init in ("random", "mlm"):
                results.append(report(experiment="classify confusion", init=init, seed=0,
                                      confusion=confusion(root / "ft" / f"{init}-classify-0", test)))

    # 2. ELECTRA vs MLM per pretraining FLOPs (classify)
    summaries = {name: json.loads((root / name / "summary.json").read_text()) for name in ("mlm", "electra")}
    per_token = {"mlm": flops_per_token(load_model(mlm), 64),
                 "electra": flops_per_token(load_model(electra), 64) + flops_per_token(load_model(electra / "generator"), 64)}
    for name, module in (("mlm", "model"), ("electra", "discriminator")) if 2 in args.experiments else ():
        for step, directory in checkpoint_dirs(root / name, module, root / "ckpt"):
            flops = per_token[name] * summaries[name]["train_tokens"] * step / summaries[name]["steps"]
            for task, (train, test) in tasks.items():
                accuracies = [finetune(root, f"{name}{step}", str(directory), task, train, test, args, seed)
                              for seed in range(args.electra_seeds)]
                results.append(report(experiment="electra vs mlm", objective=name, task=task, step=step,
                                      pretrain_flops=flops, accuracy=sum(accuracies) / len(accuracies),
                                      accuracies=accuracies))

    # 3. NSP vs SOP
    sets = sentence_eval_sets(world, tokenizer, 64)
    pad = EncoderVocab.from_tokenizer(tokenizer).pad_id
    for objective in ("nsp", "sop") if 3 in args.experiments else ():
        out = root / objective
        temper("pretrain", f"objective={objective}", f"output_dir={out}", f"tokenizer={tok}",
               *[p for p in pre if not p.startswith(("checkpoint", "max_steps"))], f"max_steps={args.sentence_steps}")
        for kind, pairs in sets.items():
            results.append(report(experiment="nsp vs sop", objective=objective, negatives=kind, pairs=len(pairs),
                                  accuracy=sentence_accuracy(out, pairs, pad)))

    # 5. [CLS] trained by NSP: mlm+nsp pretraining, then fine-tuning as in 1
    if 5 in args.experiments:
        both = root / "mlm+nsp"
        temper("pretrain", "objective=mlm+nsp", f"output_dir={both}", f"tokenizer={tok}",
               *[p for p in pre if not p.startswith("checkpoint")])
        for task, (train, test) in tasks.items():
            for seed in range(args.seeds):
                results.append(report(experiment="cls trained by nsp", task=task, seed=seed, init="mlm+nsp",
                                      accuracy=finetune(root, "mlm+nsp", str(both), task, train, test, args, seed)))

    # 4. SimCSE recall@1 on held-out paraphrases
    if 4 not in args.experiments:
        write_rows(root / "results.jsonl", results)
        return
    test_pairs = paraphrase_pairs(facts, "test")
    fresh = load_model("bert-tiny")  # the preset's vocabulary is larger than the tokenizer's: ids stay in range
    results.append(report(experiment="simcse", encoder="untrained", pairs=len(test_pairs),
                          recall_at_1=recall_at_1(fresh, tokenizer, test_pairs)))
    results.append(report(experiment="simcse", encoder="mlm (no contrastive training)", pairs=len(test_pairs),
                          recall_at_1=recall_at_1(mlm, tokenizer, test_pairs)))
    paraphrases = write_rows(root / "paraphrases" / "train.jsonl", paraphrase_pairs(facts, "train"))
    for label, extra in (("unsupervised simcse (world documents), from mlm", []),
                         ("supervised paraphrase pairs, from mlm", [f"data={paraphrases}", "eval_fraction=0.1"])):
        out = root / ("simcse" if not extra else "supervised")
        temper("pretrain", "objective=contrastive", f"model={mlm}", f"output_dir={out}",
               *[p for p in pre if not p.startswith(("checkpoint", "max_steps", "model_config"))], f"max_steps={args.contrastive_steps}",
               "optim.lr=3e-4", *extra)
        results.append(report(experiment="simcse", encoder=label, pairs=len(test_pairs),
                              recall_at_1=recall_at_1(out, tokenizer, test_pairs)))
    write_rows(root / "results.jsonl", results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-encoder")
    parser.add_argument("--pretrain-steps", type=int, default=900)
    parser.add_argument("--sentence-steps", type=int, default=400)
    parser.add_argument("--contrastive-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--finetune-people", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--electra-seeds", type=int, default=1, help="fine-tuning seeds per checkpoint")
    parser.add_argument("--model-config", nargs="*", default=[],
                        help="bert-tiny overrides for every model, e.g. hidden_size=128 num_layers=4")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints per pretraining run (experiment 2)")
    parser.add_argument("--experiments", type=lambda v: {int(x) for x in v.split(",")}, default={1, 2, 3, 4, 5},
                        help="which of the five to run, e.g. 3 or 1,2")
    parser.add_argument("--reuse", action="store_true", help="read finished pretraining runs in --out again")
    parser.add_argument("--smoke", action="store_true", help="tiny step counts: checks the script runs")
    args = parser.parse_args()
    REUSE = args.reuse
    if args.smoke:
        args.pretrain_steps, args.sentence_steps, args.contrastive_steps, args.finetune_steps, args.seeds = \
            6, 4, 4, 4, 1
    run(args)
