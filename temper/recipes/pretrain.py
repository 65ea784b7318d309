"""Pretrain a decoder from scratch with the causal language-modelling objective,
L = -sum_i log P(x_i | x_<i), on your text or (by default) temper's built-in world.

    temper pretrain                                   # the built-in world, a ~2M-parameter Llama
    temper pretrain data=corpus.txt model=llama-14m max_steps=2000 seq_len=512
    temper pretrain resume=auto                       # continue after an interruption
    torchrun --nproc-per-node 8 -m temper pretrain strategy=fsdp global_batch_size=256

Writes `output_dir` as a Hugging Face model directory (config.json, model.safetensors,
tokenizer with chat template) plus metrics.jsonl, config.yaml, samples.jsonl and
checkpoints/.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from temper.config import (
    OnlyWith,
    check_keys,
    check_range,
    opt,
)
from temper.data.readers import MAX_DOCUMENT_MB, expand_paths, iter_texts
from temper.data.shards import (
    INDEX,
    TokenLoader,
    build_shards,
    files_fingerprint,
    fingerprint,
    read_index,
)
from temper.data.tokenizer import Tokenizer, check_vocab_size, train_tokenizer
from temper.data.world import WorldConfig, build_world, fact_probes, write_world
from temper.errors import TemperError
from temper.eval.perplexity import evaluate_batches
from temper.io import atomic_write_text
from temper.losses import causal_lm_loss
from temper.models import build_model, load_model, preset, registry
from temper.models.config import ModelConfig
from temper.models.generate import SamplingConfig, generate_text
from temper.runtime import seed_everything
from temper.train import recipe
from temper.train.loop import TrainLoop


@dataclass
class Config(recipe.TrainingConfig, command="pretrain",
             capabilities=recipe.Capabilities(tensor_parallel=True, pipeline=True),
             defaults=dict(model="llama-3m", output_dir="runs/pretrain", seq_len=256, batch_size=16, max_steps=500,
                           eval_batches=0, optim=dict(lr=3e-3, weight_decay=0.1), checkpoint=dict(every=200),
                           logging=dict(every=20, eval_every=200))):
    resume_may_change: ClassVar = (*recipe.TrainingConfig.resume_may_change, "samples", "sample_prompts",
                                   "sample_tokens", "loss_chunk")
    objective: Literal["clm"] = opt("clm", "clm: a decoder's next-token loss (this recipe); mlm, nsp, sop, mlm+nsp, "
                                           "mlm+sop, electra, contrastive: an encoder (temper.recipes.encoder)")
    model_config: dict = opt({}, "override preset fields, e.g. model_config.num_layers=6")
    text_field: str = opt("text", "the JSONL/parquet field that holds the text")
    text_mode: Literal["paragraph", "line", "file"] = opt("paragraph", "how .txt files split into documents")
    encoding_errors: Literal["strict", "replace"] = opt("strict", "non-UTF-8 bytes: stop with the byte offset, or replace")
    max_document_mb: int = opt(MAX_DOCUMENT_MB, "the longest line or document read from data, in MiB (a longer one "
                                                "is an error naming its file and line)")
    world: dict = opt({}, "settings of the built-in world when data is empty, e.g. world.num_people=40")
    tokenizer: str | None = opt(None, "tokenizer directory (default: the model's, else train one on the data)")
    vocab_size: int = opt(2048, "vocabulary size when a tokenizer is trained")
    loss_chunk: int = opt(1024, "tokens per chunk of the fused output-layer cross-entropy")
    samples: int = opt(4, "greedy samples written at the end")
    sample_prompts: list[str] = opt([], "prompts for the samples (default: the opening tokens of validation documents)")
    sample_tokens: int = opt(40, "tokens per sample")

    only_with: ClassVar = (
        OnlyWith(("eval_data",), "data=", lambda c: bool(c.data),
                 "the built-in world brings its own validation split (set data= to train on your own text)"),
        OnlyWith(("world",), "the built-in world (data= empty)", lambda c: not c.data),
        OnlyWith(("text_field", "text_mode", "encoding_errors"), "data=", lambda c: bool(c.data),
                 "the built-in world is JSONL of UTF-8 text"),
        OnlyWith(("model_config",), "a preset model (model= a directory has its config.json)",
                 lambda c: not Path(c.model).is_dir()),
        OnlyWith(("vocab_size",), "a tokenizer trained here (no tokenizer=, and a model= without one)",
                 lambda c: not c.tokenizer and not (Path(c.model) / "tokenizer.json").is_file()),
    )

    def validate(self) -> None:
        super().validate()
        for key in ("loss_chunk", "sample_tokens", "max_document_mb"):
            check_range(key, getattr(self, key), low=1)
        check_vocab_size("vocab_size", self.vocab_size)
        check_range("samples", self.samples, low=0)
        if self.model_config and not Path(self.model).is_dir():
            preset(self.model).with_overrides(self.model_config)  # the changed shape, checked now: keys, types, sizes
            self.model_config = check_keys(self.model_config, ModelConfig, "model_config")  # as typed values
        if self.model in registry.PRESETS and not Path(self.model).is_dir():  # before any data is prepared
            shape = registry.PRESETS[self.model]
            registry.family(shape.family).require_causal_lm(shape, f"model={self.model}")


# ----------------------------------------------------------------------------- data and tokenizer


def prepare_data(cfg: Config, out: Path) -> tuple[list[str], list[str] | None, str, dict | None]:
    """(train files, val files or None, text field, world facts or None)."""
    if cfg.data:
        return cfg.data, cfg.eval_data or None, cfg.text_field, None
    check_keys(cfg.world, WorldConfig, "world")
    world_cfg = WorldConfig(**{"seed": cfg.seed, **cfg.world})
    world_cfg.validate()
    world_dir = out / "world"
    stamp = world_dir / "world_config.json"
    wanted = json.dumps(asdict(world_cfg), sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == wanted):  # unchanged files keep the shard cache valid
        write_world(build_world(world_cfg), world_dir)
        atomic_write_text(stamp, wanted)
    facts = json.loads((world_dir / "facts.json").read_text(encoding="utf-8"))
    pretrain_dir = world_dir / "pretrain"
    return [str(pretrain_dir / "train.jsonl")], [str(pretrain_dir / "val.jsonl")], "text", facts


def token_folder(cfg: Config) -> Path | None:
    """`data=` naming one folder of token shards (`index.json`; `temper curate tokenize.tokenizer=`
    writes them in output_dir/tokens): the run trains on them as they are, no text read."""
    if len(cfg.data) != 1 or not (Path(cfg.data[0]) / INDEX).is_file():
        return None
    folder = Path(cfg.data[0])
    if cfg.eval_data:
        raise TemperError(f"data={folder} is a folder of token shards: its validation split is its own "
                          "(curate's tokenize.val_fraction); drop eval_data=")
    return folder


def shards_tokenizer(cfg: Config, folder: Path):
    """The tokenizer the shards in `folder` were written with (folder/tokenizer, or tokenizer=, which
    must then be the same one); a model directory's own tokenizer must be that one too."""
    theirs = folder / "tokenizer"
    named = cfg.tokenizer or (str(theirs) if (theirs / "tokenizer.json").is_file() else None)
    if named is None:
        raise TemperError(f"data={folder}: token shards without their tokenizer (no {theirs}/tokenizer.json): give "
                          "tokenizer=DIR, the one they were written with")
    tokenizer = Tokenizer.from_dir(named)
    for other, where in ((theirs, f"data={folder}"), (Path(cfg.model), f"model={cfg.model}")):
        if str(other) != named and (other / "tokenizer.json").is_file() and \
                Tokenizer.from_dir(other).backend.to_str() != tokenizer.backend.to_str():
            raise TemperError(f"{where}: its tokenizer ({other}) is not the one given ({named}); token ids would "
                              "mean other words: use one tokenizer for the shards and the model")
    return tokenizer


def prepare_tokenizer(cfg: Config, out: Path, train_files: list[str]):
    if cfg.tokenizer:
        return Tokenizer.from_dir(cfg.tokenizer)
    if Path(cfg.model).is_dir() and (Path(cfg.model) / "tokenizer.json").is_file():
        return Tokenizer.from_dir(cfg.model)
    tok_dir = out / "tokenizer"
    key = fingerprint([files_fingerprint(expand_paths(train_files)), cfg.vocab_size, cfg.text_field, cfg.text_mode])
    stamp = tok_dir / "fingerprint.txt"
    if stamp.is_file() and stamp.read_text() == key:  # resume: the very same tokenizer
        return Tokenizer.from_dir(tok_dir)
    texts = iter_texts(train_files, field=cfg.text_field, encoding_errors=cfg.encoding_errors, text_mode=cfg.text_mode,
                       max_document_mb=cfg.max_document_mb)
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size, model_max_length=cfg.seq_len)
    tokenizer.save(tok_dir)
    atomic_write_text(stamp, key)
    return tokenizer


def prepare_shards(cfg: Config, out: Path, tokenizer, train_files: list[str], val_files: list[str] | None) -> Path:
    def texts(files):
        return iter_texts(files, field=cfg.text_field, encoding_errors=cfg.encoding_errors, text_mode=cfg.text_mode,
                          max_document_mb=cfg.max_document_mb)

    files = expand_paths(train_files) + (expand_paths(val_files) if val_files else [])
    key = fingerprint([files_fingerprint(files), tokenizer.backend.to_str(), cfg.eval_fraction, cfg.seed,
                       cfg.text_field, cfg.text_mode, val_files is not None])
    return build_shards(texts(train_files), tokenizer, out / "data",
                        val_documents=texts(val_files) if val_files else None,
                        val_fraction=0.0 if val_files else cfg.eval_fraction, seed=cfg.seed, fingerprint_id=key)


def prepare_model(cfg: Config, tokenizer, device, dtype):
    if Path(cfg.model).is_dir():
        model = load_model(cfg.model, device=device, dtype=dtype)
    else:
        vocab = 64 * math.ceil(tokenizer.vocab_size / 64)  # a multiple of 64 keeps the matmuls fast
        config = preset(cfg.model, vocab_size=vocab, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id).with_overrides(cfg.model_config)
        model = build_model(config, device=device, dtype=dtype)
    registry.family(model.config.family).require_causal_lm(model.config, f"model={cfg.model}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TemperError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size} embeddings")
    recipe.check_positions(cfg.seq_len, model.config, f"model={cfg.model}",
                           "lower seq_len, or for a preset raise model_config.max_seq_len")
    return model


# ----------------------------------------------------------------------------- the run


def run(cfg: Config) -> dict:
    run = recipe.start(cfg, inputs=("model", "tokenizer"))

    # data -> tokenizer -> shards -> model (rank 0 prepares and caches; the other ranks then read)
    def prepare():
        if (folder := token_folder(cfg)) is not None:  # already tokenised (temper curate): used as they are
            return [str(folder)], None, cfg.text_field, None, shards_tokenizer(cfg, folder), folder
        train_files, val_files, text_field, world_facts = prepare_data(cfg, run.out)
        cfg.text_field = text_field
        tokenizer = prepare_tokenizer(cfg, run.out, train_files)
        return train_files, val_files, text_field, world_facts, tokenizer, prepare_shards(cfg, run.out, tokenizer,
                                                                                          train_files, val_files)

    if run.agree_first is not None:
        run.agree_first(lambda: prepare() and None)
    train_files, val_files, cfg.text_field, world_facts, tokenizer, shard_dir = prepare()
    seed_everything(cfg.seed)  # the model's init does not depend on how data preparation went
    core = prepare_model(cfg, tokenizer, run.device, torch.float32)  # fp32 master weights
    trainable = recipe.make_trainable(core, cfg, run, pipeline_microbatches=run.grad_accum, loss_chunk=cfg.loss_chunk)
    model, par = trainable.model, run.par
    loader = TokenLoader(shard_dir, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                         rank=par.dp_rank, world_size=par.dp, grad_accum=run.grad_accum)
    has_val = _has_split(shard_dir, "val")
    unused = [0] * (core.config.vocab_size - tokenizer.vocab_size)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths() + unused)
    start_token_bytes = torch.tensor(tokenizer.token_byte_lengths(at_start=True) + unused)  # after EOS

    def evaluate(step: int) -> dict:
        if not has_val:
            return {}
        # pipeline stages hold a part each: rank 0 evaluates the gathered model (the others go on)
        scored = loop.export_model() if par.pipeline is not None else model
        if scored is None:
            return {}
        val = TokenLoader(shard_dir, "val", seq_len=cfg.seq_len, batch_size=cfg.batch_size, shuffle=False,
                          drop_last=False)
        return evaluate_batches(scored, val, device=run.device, autocast=loop.autocast, token_bytes=token_bytes,
                                start_token_bytes=start_token_bytes, eos_id=tokenizer.eos_id,
                                max_batches=cfg.eval_batches)

    def lm_loss(batch):  # (summed next-token NLL, number of target tokens)
        inputs, targets = batch
        return causal_lm_loss(model, inputs.to(run.device), targets.to(run.device), chunk_size=cfg.loss_chunk)

    loop = TrainLoop(cfg, "pretrain", run.out, model, trainable.optimizer, run.device, run.precision,
                     state={"loader": loader}, evaluate=evaluate, flops_per_token=trainable.flops_per_token, par=par,
                     global_batch=run.global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "data": read_index(shard_dir)["fingerprint"]})
    tokens_per_step = cfg.batch_size * cfg.seq_len * run.grad_accum  # per data-parallel replica
    run.say(f"model {core.num_parameters() / 1e6:.2f}M params | train {loader.num_tokens:,} tokens | "
            f"{run.global_batch * cfg.seq_len:,} tokens/step | {cfg.max_steps} steps | {run.device} {run.precision} | "
            f"{par.describe()}")
    for _ in loop:
        micro = [loader.next_batch() for _ in range(run.grad_accum)]
        result = loop.accumulate(micro, lm_loss)
        loop.optimizer_step({"loss": result["loss"], "epoch": loader.epoch}, tokens=tokens_per_step)

    # the model directory (one, whatever the layout), its lineage and samples: rank 0
    lineage = {"pretrain_shards": str(shard_dir.resolve()),
               "world_dir": str((run.out / "world").resolve()) if world_facts is not None else None}
    plain = recipe.save_outputs(loop, cfg, "pretrain", tokenizer, lineage)
    summary: dict = {}
    if plain is not None:
        summary = {"params": plain.num_parameters()}
        summary.update(write_samples(plain, tokenizer, run.out, cfg, world_facts, shard_dir))
        if has_val:
            summary["unigram_val_ppl"] = unigram_perplexity(shard_dir)
    return loop.finish(summary)


def _has_split(shard_dir: Path, split: str) -> bool:
    return read_index(shard_dir)["splits"].get(split, {}).get("num_tokens", 0) > 0


def unigram_perplexity(shard_dir: Path) -> float:
    """exp(cross-entropy of val tokens under train unigram frequencies, add-one smoothed): the
    baseline a model that ignores context reaches."""

    index = read_index(shard_dir)
    dtype = np.dtype(index["dtype"])
    vocab = index["vocab_size"]

    def counts(split: str) -> np.ndarray:
        total = np.zeros(vocab, dtype=np.float64)
        for s in index["splits"][split]["shards"]:
            total += np.bincount(np.fromfile(Path(shard_dir) / s["file"], dtype=dtype), minlength=vocab)[:vocab]
        return total

    train, val = counts("train"), counts("val")
    p = (train + 1) / (train.sum() + vocab)
    return float(np.exp(-(val * np.log(p)).sum() / val.sum()))


def opening_prompts(shard_dir: Path, tokenizer, count: int, tokens: int = 6) -> list[str]:
    """The first tokens of the first validation (else training) documents."""

    index = read_index(shard_dir)
    split = "val" if index["splits"]["val"]["num_tokens"] else "train"
    shard = index["splits"][split]["shards"][0]
    ids = np.fromfile(shard_dir / shard["file"], dtype=np.dtype(index["dtype"]))
    starts = [0, *np.load(shard_dir / shard["docs"], allow_pickle=False)[:-1].tolist()]
    prompts = [tokenizer.decode(ids[s:s + tokens].tolist()) for s in starts[:count]]
    return [p for p in prompts if p.strip()] or ["The"]


def write_samples(model, tokenizer, out: Path, cfg: Config, world_facts: dict | None, shard_dir: Path) -> dict:
    """Greedy samples (and, on the built-in world, how many facts they state correctly)."""
    model.eval()
    greedy = SamplingConfig(max_new_tokens=cfg.sample_tokens, temperature=0.0)
    result: dict = {}
    rows = []
    if world_facts is not None:
        probes = fact_probes(world_facts)
        completions = generate_text(model, tokenizer, [p["prompt"] for p in probes], greedy, batch_size=32)
        correct = [c.strip().lower().startswith(p["answer"].lower()) for p, c in zip(probes, completions)]
        result["fact_accuracy"] = sum(correct) / len(correct)
        result["fact_probes"] = len(probes)
        rows = [{"prompt": p["prompt"], "completion": c, "fact": p["fact"], "answer": p["answer"], "correct": ok}
                for p, c, ok in zip(probes, completions, correct)]
    if not rows and cfg.samples > 0:
        prompts = cfg.sample_prompts or opening_prompts(shard_dir, tokenizer, cfg.samples)
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, generate_text(model, tokenizer, prompts, greedy))]
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for r in rows[:cfg.samples]:
        print(f"sample> {r['prompt']!r} -> {r['completion']!r}", file=sys.stderr)
    return result
