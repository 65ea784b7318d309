"""Pretrain a bidirectional encoder (BERT, ELECTRA, sentence embeddings): `temper pretrain
objective=...` with an objective other than clm runs this recipe.

    temper pretrain objective=mlm                       # bert-tiny on the built-in world
    temper pretrain objective=mlm+nsp data=docs.jsonl   # BERT: MLM + next-sentence prediction
    temper pretrain objective=electra                   # replaced-token detection
    temper pretrain objective=contrastive data=pairs.jsonl   # anchor/positive rows (or SimCSE on text)

Objectives (the losses are temper/losses/encoder.py's; the data temper/data/encoder.py's):

- `mlm`: 15% of the tokens (mlm_probability) selected, 80/10/10; whole_word_mask=true selects words.
- `nsp`, `sop`: the sentence-pair task alone on [CLS] (pairs of consecutive segments of a document);
  `mlm+nsp` (BERT) and `mlm+sop` (ALBERT) add MLM on the same masked pairs: one forward through
  BertForPreTraining gives both heads' logits; each loss is averaged over its own unit (masked
  tokens, pairs) in the whole step, and the two are summed (`loop.accumulate_shared`).
- `electra`: a generator (the discriminator's shape, `generator_width` of its width, its embeddings
  the discriminator's) trained with MLM samples replacements; the discriminator labels every token
  original/replaced; L = L_gen + disc_weight * L_disc (Clark et al. 2020, 50), each averaged over
  its own unit (masked tokens, real tokens). The two models are one `ModuleGroup` (DDP and FSDP
  hold the shared embeddings once), run one after the other on each micro-batch.
- `contrastive`: InfoNCE with in-batch negatives, temperature 0.05, pooling mean or cls; rows with
  `anchor` and `positive` are supervised pairs, rows with `text` are SimCSE's (the text twice,
  two dropout masks).

With no `model=`, the `bert-tiny` preset (ELECTRA: its shape as ElectraForPreTraining, i.e.
`electra-tiny`); with no `tokenizer=`, a WordPiece trained on the data; with no `data=`, the
built-in world (its documents; contrastive: SimCSE on them, measured by recall@1 on held-out
paraphrase pairs). Writes a Hugging Face directory: BertForMaskedLM (mlm), BertForPreTraining
(nsp, sop, mlm+nsp, mlm+sop), ElectraForPreTraining (electra; the generator in generator/ as
ElectraForMaskedLM), BertModel + sentence-transformers' files (contrastive).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from temper.config import OnlyWith, check_keys, check_range, opt
from temper.data.encoder import (
    ContrastivePair,
    EncoderCollate,
    EncoderVocab,
    collate_contrastive,
    frame,
    read_contrastive,
    read_documents,
    read_texts,
    sentence_pairs,
)
from temper.data.loader import ExampleLoader, batch_seed
from temper.data.readers import expand_paths, iter_records
from temper.data.sft import split_held_out
from temper.data.shards import files_fingerprint, fingerprint
from temper.data.tokenizer import Tokenizer, cached_tokenizer, check_vocab_size, train_wordpiece
from temper.data.world import WorldConfig, paraphrase_pairs, prepare_world
from temper.errors import TemperError
from temper.io import atomic_write_text
from temper.lineage import read_lineage
from temper.losses import IGNORE_INDEX
from temper.losses.encoder import (
    cls_pool,
    discriminator_loss,
    discriminator_metrics,
    info_nce_loss,
    info_nce_metrics,
    masked_lm_loss,
    masked_lm_metrics,
    mean_pool,
    replaced_token_inputs,
    sentence_pair_loss,
    sentence_pair_metrics,
)
from temper.models import build_model, load_model, preset, registry
from temper.models.bert import with_head
from temper.models.config import ModelConfig
from temper.train import recipe
from temper.train.distributed import unwrap
from temper.train.loop import TrainLoop

OBJECTIVES = ("mlm", "nsp", "sop", "mlm+nsp", "mlm+sop", "electra", "contrastive")
ARCHITECTURE = {"mlm": "BertForMaskedLM", "nsp": "BertForPreTraining", "sop": "BertForPreTraining",
                "mlm+nsp": "BertForPreTraining", "mlm+sop": "BertForPreTraining", "electra": "ElectraForPreTraining",
                "contrastive": "BertModel"}
@dataclass
class Config(recipe.TrainingConfig, command="pretrain",
             defaults=dict(model="bert-tiny", output_dir="runs/encoder", seq_len=128, batch_size=32, max_steps=300,
                           eval_batches=4, optim=dict(lr=1e-3, weight_decay=0.01), schedule=dict(warmup_ratio=0.06),
                           checkpoint=dict(every=200), logging=dict(every=20, eval_every=100))):
    objective: Literal["mlm", "nsp", "sop", "mlm+nsp", "mlm+sop", "electra", "contrastive"] = opt(
        "mlm", "clm (a decoder, recipes/pretrain.py), or an encoder's: mlm, nsp, sop, mlm+nsp (BERT), mlm+sop "
               "(ALBERT), electra, contrastive")
    mlm_probability: float = opt(0.15, "share of the tokens selected for masked language modelling")
    whole_word_mask: bool = opt(False, "select whole words (all their word pieces) rather than single tokens")
    disc_weight: float = opt(50.0, "ELECTRA: weight of the discriminator's loss (L_gen + w L_disc)")
    generator_width: float = opt(0.25, "ELECTRA: the generator's width as a share of the discriminator's")
    temperature: float = opt(0.05, "contrastive: the InfoNCE temperature")
    pooling: Literal["mean", "cls"] = opt("mean", "contrastive: sentence embedding = mean of the tokens or [CLS]")
    model_config: dict = opt({}, "override preset fields, e.g. model_config.num_layers=4")
    tokenizer: str | None = opt(None, "tokenizer directory (default: the model's, else a WordPiece trained on the data)")
    vocab_size: int = opt(2048, "vocabulary size when a WordPiece tokenizer is trained")
    text_field: str = opt("text", "the JSONL/parquet field that holds the text")
    text_mode: Literal["paragraph", "line", "file"] = opt("paragraph", "how .txt files split into documents")
    world: dict = opt({}, "settings of the built-in world when data is empty, e.g. world.num_people=40")

    only_with: ClassVar = (
        OnlyWith(("whole_word_mask",), "an objective with MLM (mlm, mlm+nsp, mlm+sop, electra)",
                 lambda c: c.objective not in ("nsp", "sop", "contrastive")),
        OnlyWith(("disc_weight", "generator_width"), "objective=electra", lambda c: c.objective == "electra"),
        OnlyWith(("temperature", "pooling"), "objective=contrastive", lambda c: c.objective == "contrastive"),
        OnlyWith(("world",), "the built-in world (data= empty)", lambda c: not c.data),
        OnlyWith(("model_config",), "a preset model", lambda c: not Path(c.model).is_dir()),
    )

    def validate(self) -> None:
        super().validate()
        check_range("mlm_probability", self.mlm_probability, low=0.0, high=1.0, low_open=True, high_open=True)
        check_range("disc_weight", self.disc_weight, low=0.0)
        check_range("generator_width", self.generator_width, low=0.0, high=1.0, low_open=True)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        check_vocab_size("vocab_size", self.vocab_size)
        if self.seq_len < 5:
            raise TemperError(f"seq_len must be at least 5 ([CLS] A [SEP] B [SEP]), got {self.seq_len}")
        if self.model in registry.PRESETS and not Path(self.model).is_dir():  # before any data is read
            shape = registry.PRESETS[self.model]
            registry.family(shape.family).require_architecture(shape, ARCHITECTURE[self.objective],
                                                               f"model={self.model}")


# ----------------------------------------------------------------------------- data


def data_files(cfg: Config, out: Path) -> tuple[list[str], list[str], dict | None]:
    """(train files, held-out files or [], world facts or None)."""
    if cfg.data:
        return cfg.data, cfg.eval_data, None
    check_keys(cfg.world, WorldConfig, "world")
    world = prepare_world(cfg.world, cfg.seed, out / "world")
    facts = json.loads((world / "facts.json").read_text(encoding="utf-8"))
    return [str(world / "pretrain" / "train.jsonl")], [str(world / "pretrain" / "val.jsonl")], facts


def resolve_tokenizer(cfg: Config, files: list[str], run: recipe.Run) -> Tokenizer:
    named = cfg.tokenizer or (cfg.model if (Path(cfg.model) / "tokenizer.json").is_file() else None)
    if named:
        return Tokenizer.from_dir(named)

    def train() -> Tokenizer:
        run.say(f"training a WordPiece tokenizer (vocab_size={cfg.vocab_size}) on {', '.join(files)}")
        texts = (r.data.get(cfg.text_field) or r.data.get("anchor") or "" for r in
                 iter_records(files, text_mode=cfg.text_mode))
        return train_wordpiece(texts, vocab_size=cfg.vocab_size, model_max_length=cfg.seq_len)

    key = fingerprint([files_fingerprint(expand_paths(files)), cfg.vocab_size, cfg.text_field, cfg.text_mode])
    return cached_tokenizer(run.out / "tokenizer", key, train)


def read_examples(cfg: Config, files: list[str], tokenizer, vocab: EncoderVocab, seed: int) -> list:
    """The objective's examples of `files`."""
    if cfg.objective in ("mlm", "electra"):
        return read_texts(files, tokenizer, vocab, max_len=cfg.seq_len, column=cfg.text_field,
                          text_mode=cfg.text_mode)
    if cfg.objective == "contrastive":
        first = next(iter(iter_records(files, text_mode="line")), None)
        supervised = first is not None and "anchor" in first.data
        return read_contrastive(files, tokenizer, vocab, max_len=cfg.seq_len, supervised=supervised,
                                text_column=cfg.text_field, text_mode=cfg.text_mode)
    return sentence_pairs(read_documents(files, column=cfg.text_field, text_mode=cfg.text_mode), tokenizer, vocab,
                          task=cfg.objective.split("+")[-1], max_len=cfg.seq_len, seed=seed)


def paraphrase_examples(tokenizer, vocab: EncoderVocab, seq_len: int, rows: list[dict]) -> list[ContrastivePair]:
    """Contrastive pairs of in-memory {"anchor", "positive"} rows (the world's paraphrases)."""

    def framed(text: str) -> list[int]:
        enc = tokenizer.backend.encode(text, add_special_tokens=False)
        return frame(vocab, (list(enc.ids), [0] * len(enc.ids)), max_len=seq_len).ids

    return [ContrastivePair(framed(r["anchor"]), framed(r["positive"]), f"paraphrase {i}") for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------- model


def build_encoder(cfg: Config, tokenizer: Tokenizer, vocab: EncoderVocab, device) -> torch.nn.Module:
    """The encoder with the objective's head: from a directory (another head is replaced by the
    objective's, new, as transformers starts one head from another's checkpoint; the encoder's
    weights and a head both have carry over), or a preset with random weights and the tokenizer's
    vocabulary."""
    architecture = ARCHITECTURE[cfg.objective]
    if Path(cfg.model).is_dir():
        model = load_model(cfg.model, device=device, dtype=torch.float32)
        registry.family(model.config.family).require_architecture(model.config, architecture, f"model={cfg.model}")
        if model.config.hf_architecture != architecture:
            source, model = model, build_model(with_head(model.config, architecture), device=device,
                                               dtype=torch.float32)
            missing, _ = model.load_state_dict(source.state_dict(), strict=False)
            assert all(not k.startswith(("embeddings.", "layers.")) for k in missing), missing
    else:
        config = preset(cfg.model, vocab_size=tokenizer.vocab_size, pad_token_id=vocab.pad_id,
                        max_seq_len=max(preset(cfg.model).max_seq_len, cfg.seq_len)).with_overrides(cfg.model_config)
        registry.family(config.family).require_architecture(config, architecture, f"model={cfg.model}")
        model = build_model(with_head(config, architecture), device=device, dtype=torch.float32)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TemperError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size} embeddings")
    recipe.check_positions(cfg.seq_len, model.config, f"model={cfg.model}")
    return model


def build_generator(discriminator: torch.nn.Module, width: float, device) -> torch.nn.Module:
    """ELECTRA's generator: the discriminator's depth, `width` of its hidden and feed-forward sizes,
    a quarter of its heads (at least one), and the discriminator's embeddings (the same modules:
    token, position and type embeddings are shared, as in Clark et al.'s best setting); its
    output layer is tied to those word embeddings."""
    c: ModelConfig = discriminator.config
    heads = max(1, round(c.num_heads * width))
    hidden = max(heads, round(c.hidden_size * width) // heads * heads)
    config = c.replace(hidden_size=hidden, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                       intermediate_size=max(1, round(c.intermediate_size * width)),
                       embedding_size=c.embedding_size or c.hidden_size, hf_architecture="ElectraForMaskedLM")
    generator = build_model(config, device=device, dtype=torch.float32)
    generator.embeddings = discriminator.embeddings
    generator.tie_weights()
    return generator


def write_sentence_transformers(out: Path, hidden_size: int, pooling: str, seq_len: int) -> None:
    """modules.json, sentence_bert_config.json and 1_Pooling/config.json: what `SentenceTransformer(out)`
    reads to run the BertModel in `out` and pool its tokens as this run did."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    atomic_write_text(out / "modules.json", json.dumps(modules, indent=1) + "\n")
    atomic_write_text(out / "sentence_bert_config.json",
                      json.dumps({"max_seq_length": seq_len, "do_lower_case": False}, indent=1) + "\n")
    (out / "1_Pooling").mkdir(exist_ok=True)
    atomic_write_text(out / "1_Pooling" / "config.json", json.dumps({
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=1) + "\n")


# ----------------------------------------------------------------------------- the run


def run(cfg: Config) -> dict:
    run = recipe.start(cfg)
    objective = cfg.objective

    # data and tokenizer
    train_files, eval_files, facts = data_files(cfg, run.out)
    tokenizer = resolve_tokenizer(cfg, train_files, run)
    vocab = EncoderVocab.from_tokenizer(tokenizer, cfg.tokenizer or cfg.model if (cfg.tokenizer or Path(
        cfg.model).is_dir()) else "the trained tokenizer")
    examples = read_examples(cfg, train_files, tokenizer, vocab, cfg.seed)
    if eval_files:
        held_out = read_examples(cfg, eval_files, tokenizer, vocab, cfg.seed + 1)
    else:
        examples, held_out = split_held_out(examples, cfg.eval_fraction, cfg.seed)
    paraphrases = None
    if objective == "contrastive" and facts is not None:  # the world: recall@1 on held-out paraphrases
        paraphrases = paraphrase_examples(tokenizer, vocab, cfg.seq_len, paraphrase_pairs(facts, "test"))
    run.say(f"{objective}: {len(examples)} training and {len(held_out)} held-out examples")

    with_mlm = objective in ("mlm", "mlm+nsp", "mlm+sop", "electra")
    if objective == "contrastive":
        collate = lambda chunk, seed: collate_contrastive(chunk, vocab.pad_id, seed)  # noqa: E731
    else:  # ELECTRA's generator sees 85% [MASK], 15% kept of the selected (the paper's code)
        collate = EncoderCollate(vocab, mlm_probability=cfg.mlm_probability if with_mlm else 0.0,
                                 whole_word=cfg.whole_word_mask, mask_fraction=0.85 if objective == "electra" else 0.8,
                                 random_fraction=0.0 if objective == "electra" else 0.1)
    loader = ExampleLoader(examples, collate, batch_size=cfg.batch_size, seed=cfg.seed, rank=run.par.dp_rank,
                           world_size=run.par.dp, grad_accum=run.grad_accum, seeded_collate=True)
    eval_loader = ExampleLoader(held_out, collate, batch_size=cfg.batch_size, seed=cfg.seed + 1, shuffle=False,
                                seeded_collate=True) if held_out else None

    # the model(s)
    discriminator = build_encoder(cfg, tokenizer, vocab, run.device)
    if objective == "electra":  # one module: the two share their embeddings (one wrapper holds each parameter once)
        generator = build_generator(discriminator, cfg.generator_width, run.device)
        trainable = recipe.make_trainable({"discriminator": discriminator, "generator": generator}, cfg, run,
                                          tokenizer=tokenizer, shared=True)
    else:
        trainable = recipe.make_trainable(discriminator, cfg, run, tokenizer=tokenizer)
    lineage = read_lineage(cfg.model) if Path(cfg.model).is_dir() else {}
    model = trainable.model
    run.say(f"model: {discriminator.config.hf_architecture}, {discriminator.num_parameters():,} parameters"
            + (f"; generator {generator.num_parameters():,} (embeddings shared)" if objective == "electra" else ""))

    # the losses: each objective's units (counted from the batch before any forward), and its summed
    # losses and metric sums from ONE forward per micro-batch (MLM+NSP: BertForPreTraining's two
    # heads; ELECTRA: the generator, the sampled replacements, the discriminator)
    weights = {"mlm": {"mlm": 1.0}, "nsp": {"sentence": 1.0}, "sop": {"sentence": 1.0},
               "mlm+nsp": {"mlm": 1.0, "sentence": 1.0}, "mlm+sop": {"mlm": 1.0, "sentence": 1.0},
               "electra": {"gen": 1.0, "disc": cfg.disc_weight}, "contrastive": {"contrastive": 1.0}}[objective]

    def units(batch) -> dict[str, int]:
        if objective == "contrastive":
            return {"contrastive": batch.num_pairs}
        if objective == "electra":
            return {"gen": int((batch.labels != IGNORE_INDEX).sum()), "disc": int(batch.attention_mask.sum())}
        counted = {"mlm": int((batch.labels != IGNORE_INDEX).sum())} if with_mlm else {}
        return {**counted, **({"sentence": len(batch.sentence_labels)} if objective != "mlm" else {})}

    def dropout_from(batch) -> None:
        """Draw this micro-batch's dropout masks from its own seed: one process and any number of
        ranks drop alike (ranks seeded alike at the start would otherwise draw the same masks as
        each other), and a resume too."""
        torch.manual_seed(batch_seed(batch.seed, 0, 2))

    def encoder_losses(batch) -> tuple[dict, dict]:
        """mlm, nsp, sop, mlm+nsp, mlm+sop: one forward through the head (MLM logits at the selected
        positions and the [CLS] sentence logits)."""
        batch = batch.to(run.device)
        dropout_from(batch)
        selected = batch.labels != IGNORE_INDEX if with_mlm else torch.zeros_like(batch.attention_mask,
                                                                                 dtype=torch.bool)
        out = model(batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids,
                    selected=selected)
        losses, metrics = {}, {}
        if with_mlm:
            targets = batch.labels[selected]
            losses["mlm"] = masked_lm_loss(out.logits, targets, reduction="sum")
            metrics.update(masked_lm_metrics(out.logits, targets))
        if objective != "mlm":
            losses["sentence"] = sentence_pair_loss(out.sentence_logits, batch.sentence_labels, reduction="sum")
            metrics.update(sentence_pair_metrics(out.sentence_logits, batch.sentence_labels))
        return losses, metrics

    def electra_losses(batch) -> tuple[dict, dict]:
        """L_gen and L_disc of one micro-batch: the replacements drawn from the batch's own seed (the
        same on any number of ranks, and after a resume)."""
        batch = batch.to(run.device)
        dropout_from(batch)
        selected = batch.labels != IGNORE_INDEX
        gen = model("generator", batch.input_ids, attention_mask=batch.attention_mask,
                    token_type_ids=batch.token_type_ids, selected=selected)
        sampler = torch.Generator(device=run.device).manual_seed(batch_seed(batch.seed, 0, 1))
        inputs, labels = replaced_token_inputs(batch.input_ids, batch.labels, gen.logits, generator=sampler)
        disc = model("discriminator", inputs, attention_mask=batch.attention_mask,
                     token_type_ids=batch.token_type_ids)
        targets = batch.labels[selected]
        return ({"gen": masked_lm_loss(gen.logits, targets, reduction="sum"),
                 "disc": discriminator_loss(disc.logits, labels, batch.attention_mask, reduction="sum")},
                {**{"gen_" + k: v for k, v in masked_lm_metrics(gen.logits, targets).items()},
                 **discriminator_metrics(disc.logits, labels, batch.attention_mask)})

    def embed(input_ids, attention_mask):
        hidden = model(input_ids, attention_mask=attention_mask, with_head=False).hidden
        return mean_pool(hidden, attention_mask) if cfg.pooling == "mean" else cls_pool(hidden)

    def contrastive_losses(batch) -> tuple[dict, dict]:
        batch = batch.to(run.device)
        dropout_from(batch)  # SimCSE: the anchor's and the positive's masks differ (one draw over 2B rows)
        z = embed(batch.input_ids, batch.attention_mask)  # (2B, H): anchors, then positives
        anchors, positives = z[:batch.num_pairs], z[batch.num_pairs:]
        return ({"contrastive": info_nce_loss(anchors, positives, temperature=cfg.temperature,
                                              duplicate_mask=batch.duplicate_mask, reduction="sum")},
                info_nce_metrics(anchors, positives, duplicate_mask=batch.duplicate_mask))

    losses_of = {"electra": electra_losses, "contrastive": contrastive_losses}.get(objective, encoder_losses)
    accuracies = {"mlm": ("mlm_accuracy", "mlm_accuracy"), "sentence": ("sentence_accuracy", "sentence_accuracy"),
                  "gen": ("gen_accuracy", "gen_mlm_accuracy"), "disc": ("disc_accuracy", "disc_accuracy"),
                  "contrastive": ("retrieval_accuracy", "retrieval_accuracy")}  # the row's name, the sum's

    def described(result: dict) -> dict:
        """The row of a step's (or the held-out set's) sums: each objective's mean loss and accuracy."""
        row: dict = {"loss": sum(w * result[k] for k, w in weights.items())}
        for k in weights:
            if k != "contrastive":
                row[f"{k}_loss"] = result[k]
            name, total = accuracies[k]
            row[name] = result[total] / max(result[f"{k}_count"], 1)
        if objective == "electra":
            row["replaced_share"] = result["replaced_tokens"] / max(result["disc_count"], 1)
        return row

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        plain = unwrap(model)
        plain.eval()
        result: dict = {}
        try:
            if eval_loader is not None:
                eval_loader.load_state_dict({"epoch": 0, "position": 0})
                sums: dict[str, float] = {}
                batches = eval_loader.batches_per_epoch
                limit = batches if cfg.eval_batches == 0 else min(batches, cfg.eval_batches)
                for _ in range(limit):
                    batch = eval_loader.next_batch()
                    with loop.autocast():
                        losses, metrics = losses_of(batch)
                    for k, n in units(batch).items():
                        sums[f"{k}_count"] = sums.get(f"{k}_count", 0.0) + n
                    for k, v in {**losses, **metrics}.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                means = {**sums, **{k: sums[k] / max(sums[f"{k}_count"], 1) for k in weights}}
                result.update({f"eval_{k}": v for k, v in described(means).items()
                               if k != "replaced_share" and k != "gen_accuracy"})
                if objective == "electra":
                    result["eval_gen_mlm_accuracy"] = described(means)["gen_accuracy"]
            if paraphrases:
                result["paraphrase_recall_at_1"] = paraphrase_recall(paraphrases)
        finally:
            plain.train()
        return result

    def paraphrase_recall(pairs: list[ContrastivePair]) -> float:
        """Share of held-out paraphrase anchors whose nearest positive (cosine, among all of them) is theirs."""
        batch = collate_contrastive(pairs, vocab.pad_id).to(run.device)
        with loop.autocast():
            z = embed(batch.input_ids, batch.attention_mask).float()
        return info_nce_metrics(z[:len(pairs)], z[len(pairs):])["retrieval_accuracy"].item() / len(pairs)

    loop = TrainLoop(cfg, "pretrain", run.out, model, trainable.optimizer, run.device, run.precision,
                     state={"loader": loader}, evaluate=evaluate, flops_per_token=trainable.flops_per_token,
                     par=run.par, global_batch=run.global_batch,
                     identity={"tokenizer": tokenizer.fingerprint(), "objective": objective})
    for _ in loop:
        micro = [loader.next_batch() for _ in range(run.grad_accum)]
        result = loop.accumulate_shared(micro, losses_of, units=units, weights=weights)
        loop.optimizer_step(described(result), tokens=sum(b.input_ids.numel() for b in micro))

    exported = recipe.save_outputs(loop, cfg, "pretrain", tokenizer,
                                   {**lineage, "objective": objective, "world_dir": str(run.out / "world")
                                    if facts is not None else lineage.get("world_dir")},
                                   module="discriminator")
    if exported is not None and objective == "electra":
        from temper.models import save_model
        save_model(exported["generator"], run.out / "generator", tokenizer=tokenizer)
    if exported is not None and objective == "contrastive":
        write_sentence_transformers(run.out, discriminator.config.hidden_size, cfg.pooling, cfg.seq_len)
    return loop.finish({"objective": objective, "examples": len(examples), "held_out": len(held_out),
                        "parameters": trainable.total_parameters})
