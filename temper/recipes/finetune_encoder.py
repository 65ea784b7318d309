"""Fine-tune an encoder for sequence classification (`task=classify`: `text`, `label` columns) or
token classification (`task=tokens`: `tokens`, a list of words, and `tags`, a label per word).

    temper finetune-encoder model=runs/encoder                        # the world's understanding task
    temper finetune-encoder model=runs/encoder task=tokens            # tag people and towns
    temper finetune-encoder model=bert-tiny tokenizer=runs/encoder    # random init, same budget
    temper finetune-encoder model=DIR data=train.jsonl eval_data=test.jsonl

The encoder's weights come from `model=` (any bert-family directory: BertForMaskedLM,
BertForPreTraining, ElectraForPreTraining, BertModel, ...); the head is new (the pooler too
when the directory has none), as transformers starts BertFor{Sequence,Token}Classification from
such a checkpoint. A preset name starts from random weights. Token labels sit on each word's
first word piece, -100 on the others and on [CLS]/[SEP] (transformers' alignment). The loss is
cross-entropy over sequences or labelled words; held-out accuracy (of sequences, or of words) is
logged at each evaluation. With no `data=`, the built-in world's understanding task
(`temper.data.world.understanding_rows`): its held-out split words every fact in a template no
training row uses. Saved as BertForSequenceClassification / BertForTokenClassification with the
label names in config.json's id2label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from temper.config import OnlyWith, check_keys, check_range, opt
from temper.data.encoder import EncoderVocab, collate_labelled, read_labelled
from temper.data.loader import ExampleLoader, batch_seed
from temper.data.readers import expand_paths, iter_records
from temper.data.sft import split_held_out
from temper.data.shards import files_fingerprint, fingerprint
from temper.data.tokenizer import Tokenizer, cached_tokenizer, check_vocab_size, train_wordpiece
from temper.data.world import WorldConfig, prepare_world, understanding_rows
from temper.errors import TemperError
from temper.io import atomic_write_text
from temper.lineage import read_lineage
from temper.losses import IGNORE_INDEX
from temper.models import build_model, load_model, preset, registry
from temper.models.bert import with_head
from temper.train import recipe
from temper.train.distributed import unwrap
from temper.train.loop import TrainLoop

ARCHITECTURES = {"classify": "BertForSequenceClassification", "tokens": "BertForTokenClassification"}


@dataclass
class Config(recipe.TrainingConfig, command="finetune-encoder",
             defaults=dict(model="runs/encoder", output_dir="runs/finetune-encoder", seq_len=64, batch_size=32,
                           max_steps=200, eval_fraction=0.1, optim=dict(lr=1e-3, weight_decay=0.01),
                           schedule=dict(warmup_ratio=0.1), logging=dict(every=20, eval_every=100))):
    task: Literal["classify", "tokens"] = opt("classify", "classify: a label per text; tokens: a tag per word")
    tokenizer: str | None = opt(None, "tokenizer directory (default: the model's; a preset: a WordPiece trained on "
                                      "the data)")
    vocab_size: int = opt(2048, "vocabulary size when a WordPiece tokenizer is trained (a preset model, no tokenizer)")
    model_config: dict = opt({}, "override preset fields, e.g. model_config.num_layers=4")
    world: dict = opt({}, "settings of the built-in world when data is empty, e.g. world.num_people=40")

    only_with: ClassVar = (
        OnlyWith(("world",), "the built-in world (data= empty)", lambda c: not c.data),
        OnlyWith(("model_config",), "a preset model", lambda c: not Path(c.model).is_dir()),
    )

    def validate(self) -> None:
        super().validate()
        check_vocab_size("vocab_size", self.vocab_size)
        check_range("seq_len", self.seq_len, low=3)
        if self.model in registry.PRESETS and not Path(self.model).is_dir():  # before any data is read
            shape = registry.PRESETS[self.model]
            registry.family(shape.family).require_architecture(shape, ARCHITECTURES[self.task], f"model={self.model}")


def data_files(cfg: Config, out: Path) -> tuple[list[str], list[str]]:
    """(train files, held-out files or []); the world's understanding task written under out/world."""
    if cfg.data:
        return cfg.data, cfg.eval_data
    check_keys(cfg.world, WorldConfig, "world")
    world = prepare_world(cfg.world, cfg.seed, out / "world")
    facts = json.loads((world / "facts.json").read_text(encoding="utf-8"))
    files = []
    for split in ("train", "test"):
        path = world / "understanding" / cfg.task / f"{split}.jsonl"
        rows = understanding_rows(facts, cfg.task, split)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not (path.is_file() and path.read_text(encoding="utf-8") == text):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        files.append(str(path))
    return [files[0]], [files[1]]


def load_encoder(cfg: Config, num_labels: int, label_names: list[str], tokenizer: Tokenizer, vocab: EncoderVocab,
                 device) -> torch.nn.Module:
    """The classifier: the encoder of `model=` (its head dropped) or a preset's random weights, plus a new head."""
    arch = ARCHITECTURES[cfg.task]
    id2label = {str(i): name for i, name in enumerate(label_names)}
    extra = {"id2label": id2label, "label2id": {name: i for i, name in enumerate(label_names)}}
    if Path(cfg.model).is_dir():
        source = load_model(cfg.model, device=device, dtype=torch.float32)
        registry.family(source.config.family).require_architecture(source.config, arch, f"model={cfg.model}")
        config = with_head(source.config, arch, num_labels)
        model = build_model(config.replace(extra={**config.extra, **extra}), device=device, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        new = [k for k in missing if not k.startswith(("classifier.", "pooler."))]
        assert not new, f"encoder weights not carried over: {new}"
        del source, unexpected  # the pretraining head's weights
    else:
        config = preset(cfg.model, vocab_size=tokenizer.vocab_size, pad_token_id=vocab.pad_id,
                        max_seq_len=max(preset(cfg.model).max_seq_len, cfg.seq_len)).with_overrides(cfg.model_config)
        registry.family(config.family).require_architecture(config, arch, f"model={cfg.model}")
        config = with_head(config, arch, num_labels)
        model = build_model(config.replace(extra={**config.extra, **extra}), device=device, dtype=torch.float32)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TemperError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size} embeddings")
    recipe.check_positions(cfg.seq_len, model.config, f"model={cfg.model}")
    return model


def run(cfg: Config) -> dict:
    run = recipe.start(cfg)
    train_files, eval_files = data_files(cfg, run.out)
    named = cfg.tokenizer or (cfg.model if (Path(cfg.model) / "tokenizer.json").is_file() else None)
    if named:
        tokenizer = Tokenizer.from_dir(named)
    else:  # a preset from random weights: a WordPiece of the training texts (kept for a resume)
        def train() -> Tokenizer:
            texts = (r.data.get("text") or " ".join(r.data.get("tokens") or []) for r in
                     iter_records(train_files, text_mode="line"))
            return train_wordpiece(texts, vocab_size=cfg.vocab_size, model_max_length=cfg.seq_len)

        key = fingerprint([files_fingerprint(expand_paths(train_files)), cfg.vocab_size])
        tokenizer = cached_tokenizer(run.out / "tokenizer", key, train)
    vocab = EncoderVocab.from_tokenizer(tokenizer, named or "the trained tokenizer")
    examples, names = read_labelled(train_files, tokenizer, vocab, task=cfg.task, max_len=cfg.seq_len)
    if eval_files:
        held_out, _ = read_labelled(eval_files, tokenizer, vocab, task=cfg.task, max_len=cfg.seq_len,
                                    label_names=names)
    else:
        examples, held_out = split_held_out(examples, cfg.eval_fraction, cfg.seed)
    run.say(f"finetune-encoder task={cfg.task}: {len(examples)} training and {len(held_out)} held-out examples, "
            f"{len(names)} labels ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")

    collate = lambda chunk, seed=0: collate_labelled(chunk, vocab.pad_id, seed)  # noqa: E731
    loader = ExampleLoader(examples, collate, batch_size=cfg.batch_size, seed=cfg.seed, rank=run.par.dp_rank,
                           world_size=run.par.dp, grad_accum=run.grad_accum, seeded_collate=True)
    model = load_encoder(cfg, len(names), names, tokenizer, vocab, run.device)
    lineage = read_lineage(cfg.model) if Path(cfg.model).is_dir() else {}
    trainable = recipe.make_trainable(model, cfg, run, tokenizer=tokenizer)
    model = trainable.model

    def loss_fn(batch):  # (summed cross-entropy over sequences or labelled words, their number, correct ones)
        batch = batch.to(run.device)
        if unwrap(model).training:  # dropout drawn from the batch's seed: ranks drop as one process does
            torch.manual_seed(batch_seed(batch.seed, 0, 2))
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        labelled = batch.labels != IGNORE_INDEX
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((logits.detach().argmax(-1) == batch.labels) & labelled).sum()
        return loss, int(labelled.sum()), {"correct": correct.float()}

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        if not held_out:
            return {}
        plain = unwrap(model)
        plain.eval()
        total = correct = count = 0.0
        try:
            for i in range(0, len(held_out), cfg.batch_size):
                with loop.autocast():
                    loss, n, metrics = loss_fn(collate(held_out[i:i + cfg.batch_size]))
                total, count, correct = total + float(loss), count + n, correct + float(metrics["correct"])
        finally:
            plain.train()
        return {"eval_loss": total / max(count, 1), "eval_accuracy": correct / max(count, 1)}

    loop = TrainLoop(cfg, "finetune-encoder", run.out, model, trainable.optimizer, run.device, run.precision,
                     state={"loader": loader}, evaluate=evaluate, flops_per_token=trainable.flops_per_token,
                     par=run.par, global_batch=run.global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "task": cfg.task, "labels": names})
    for _ in loop:
        micro = [loader.next_batch() for _ in range(run.grad_accum)]
        result = loop.accumulate(micro, loss_fn)
        loop.optimizer_step({"loss": result["loss"], "accuracy": result["correct"] / result["count"]},
                            tokens=sum(b.input_ids.numel() for b in micro))

    recipe.save_outputs(loop, cfg, "finetune-encoder", tokenizer, {**lineage, "task": cfg.task})
    return loop.finish({"task": cfg.task, "labels": names, "examples": len(examples), "held_out": len(held_out),
                        "parameters": trainable.total_parameters})
