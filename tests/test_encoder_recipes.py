"""The encoder objectives end to end: `temper pretrain objective=...`, `temper finetune-encoder`,
`temper embed`, through the CLI on a tiny world; the saved directories read by transformers and
sentence-transformers; resume; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import decoder_lengths, reorder_tol
from safetensors.torch import load_file

from temper.cli import main
from temper.models import load_model
from temper.train.rundir import read_metrics

TINY_WORLD = ["world.num_people=6", "world.num_towns=3", "world.docs_per_person=4", "world.docs_per_town=2",
              "world.num_arithmetic_docs=8", "world.num_dialogue_docs=8"]
FAST = ["seq_len=48", "batch_size=8", "vocab_size=400", "logging.progress=false", "logging.eval_at_start=false",
        "eval_batches=2", *TINY_WORLD]


def pretrain(out, objective: str, *extra: str) -> dict:
    code = main(["pretrain", f"objective={objective}", f"output_dir={out}", *FAST, *extra])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def logged(out, key: str) -> list[float]:
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "mlm"
    pretrain(out, "mlm", "max_steps=30", "logging.every=5", "logging.eval_every=30", "optim.lr=2e-3")
    return out


def test_mlm_loss_falls_and_transformers_reads_the_directory(mlm_dir):
    import transformers

    losses = logged(mlm_dir, "mlm_loss")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses  # from ~ln(V) down
    assert json.loads((mlm_dir / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    ours = load_model(mlm_dir).eval()
    theirs = transformers.BertForMaskedLM.from_pretrained(mlm_dir).eval()
    ids = torch.tensor([[2, 10, 11, 12, 4, 13, 3, 0], [2, 20, 4, 21, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        actual = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    tol = reorder_tol(float(expected.abs().max()), *decoder_lengths(ours.config, ids.shape[1]))
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=tol)


def test_objective_picks_the_recipe_and_its_config(capsys, tmp_path):
    from temper.cli import Commands

    yaml_file = tmp_path / "encoder.yaml"
    yaml_file.write_text("objective: sop\nmax_steps: 7\n")
    assert main(["pretrain", "--config", str(yaml_file), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "objective: sop" in printed and "mlm_probability" in printed and "max_steps: 7" in printed
    assert type(Commands().config("pretrain", {"objective": "contrastive"})).__module__ == "temper.recipes.encoder"
    assert type(Commands().config("pretrain", ["objective=clm"])).__module__ == "temper.recipes.pretrain"
    assert main(["pretrain", "objective=electra", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "disc_weight: 50.0" in printed and "model: bert-tiny" in printed
    assert main(["pretrain", "--print-config"]) == 0
    assert "objective: clm" in capsys.readouterr().out
    assert main(["pretrain", "objective=mlm", "--help"]) == 0
    assert "mlm_probability" in capsys.readouterr().out
    assert main(["pretrain", "--help"]) == 0
    assert "mlm_probability" not in capsys.readouterr().out
    assert main(["pretrain", "objective=mlmx"]) == 2
    assert "objective=mlmx is not one of clm, mlm" in capsys.readouterr().err


@pytest.mark.parametrize("objective,architecture", [("mlm+nsp", "BertForPreTraining"), ("sop", "BertForPreTraining")])
def test_sentence_objectives_train_and_load_in_transformers(objective, architecture, tmp_path):
    import transformers

    out = tmp_path / "run"
    summary = pretrain(out, objective, "max_steps=4", "logging.every=2", "logging.eval_every=4")
    assert 0.0 <= summary["eval_sentence_accuracy"] <= 1.0
    assert all(torch.isfinite(torch.tensor(logged(out, "sentence_loss"))))
    assert bool(logged(out, "mlm_loss")) == objective.startswith("mlm+")
    ours = load_model(out).eval()
    theirs = getattr(transformers, architecture).from_pretrained(out).eval()
    ids = torch.tensor([[2, 10, 11, 3, 12, 13, 3]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        expected = theirs(input_ids=ids, token_type_ids=types)
        actual = ours(ids, token_type_ids=types)
    lengths = decoder_lengths(ours.config, ids.shape[1])
    for a, e in ((actual.logits, expected.prediction_logits),
                 (actual.sentence_logits, expected.seq_relationship_logits)):
        torch.testing.assert_close(a, e, rtol=0, atol=reorder_tol(float(e.abs().max()), *lengths))


def test_electra_generator_learns_and_the_discriminator_weight_counts(tmp_path):
    import transformers

    out = tmp_path / "electra"
    pretrain(out, "electra", "max_steps=30", "logging.every=5", "logging.eval_every=30", "optim.lr=2e-3")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "gen_loss" in r]
    gen = [r["gen_loss"] for r in rows]
    assert sum(gen[-2:]) / 2 < sum(gen[:2]) / 2 - 0.3, gen  # the generator learns (its MLM loss falls)
    for r in rows:  # the logged loss is L_gen + 50 L_disc
        assert r["loss"] == pytest.approx(r["gen_loss"] + 50 * r["disc_loss"], rel=1e-9)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ElectraForPreTraining"]
    disc = transformers.ElectraForPreTraining.from_pretrained(out).eval()
    generator = transformers.ElectraForMaskedLM.from_pretrained(out / "generator")
    assert generator.config.hidden_size * 4 == disc.config.hidden_size
    # the embeddings are shared: the generator's saved copy is the discriminator's
    torch.testing.assert_close(generator.electra.embeddings.word_embeddings.weight,
                               disc.electra.embeddings.word_embeddings.weight, rtol=0, atol=0)
    ours = load_model(out).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    with torch.no_grad():
        expected, actual = disc(input_ids=ids).logits, ours(ids).logits
    tol = reorder_tol(float(expected.abs().max()), *decoder_lengths(ours.config, ids.shape[1]))
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)

    # with weight 0 the discriminator's head gets no gradient: its bias (no weight decay) stays at 0
    zero = tmp_path / "zero"
    pretrain(zero, "electra", "max_steps=2", "disc_weight=0", "logging.every=1", "logging.eval_every=2")
    trained = load_file(out / "model.safetensors")["discriminator_predictions.dense_prediction.bias"]
    untouched = load_file(zero / "model.safetensors")["discriminator_predictions.dense_prediction.bias"]
    assert float(untouched.abs().max()) == 0.0 and float(trained.abs().max()) > 0.0


def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path, mlm_dir):
    """ELECTRA: masks seeded per batch, replacements sampled from a per-step seed, two modules. One
    tokenizer for both runs (WordPiece training breaks ties differently from one run to the next;
    a resumed run reads the one it saved in output_dir/tokenizer)."""
    common = ["max_steps=4", "logging.every=1", "logging.eval_every=100", "checkpoint.every=2",
              f"tokenizer={mlm_dir}", "schedule.name=constant", "schedule.warmup_steps=0"]  # lr not tied to max_steps
    pretrain(tmp_path / "straight", "electra", *common)
    pretrain(tmp_path / "cut", "electra", *common[1:], "max_steps=2")
    pretrain(tmp_path / "cut", "electra", *common, "resume=auto")
    for name in ("model.safetensors", "generator/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "cut" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert logged(tmp_path / "straight", "loss") == logged(tmp_path / "cut", "loss")
    assert len(logged(tmp_path / "cut", "loss")) == 4


def test_contrastive_export_gives_sentence_transformers_the_same_embeddings(tmp_path):
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from temper.data.world import WorldConfig, build_world, paraphrase_pairs

    facts = build_world(WorldConfig(num_people=6, num_towns=3, docs_per_person=2, num_arithmetic_docs=2,
                                    num_dialogue_docs=2)).facts()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in paraphrase_pairs(facts, "train")))
    out = tmp_path / "simcse"
    main(["pretrain", "objective=contrastive", f"data={pairs}", f"output_dir={out}", "max_steps=6",
          "seq_len=48", "batch_size=8", "vocab_size=300", "logging.progress=false", "logging.every=2",
          "logging.eval_every=6", "eval_fraction=0.2", "pooling=mean"])
    losses = logged(out, "loss")
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    texts = [r["anchor"] for r in paraphrase_pairs(facts, "test")[:12]]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["embed", f"model={out}", f"data={data}", f"output={tmp_path / 'z.npy'}"]) == 0
    ours = np.load(tmp_path / "z.npy")
    theirs = SentenceTransformer(str(out), device="cpu").encode(texts, batch_size=4)
    assert ours.shape == theirs.shape == (len(texts), 64)
    config = load_model(out).config
    tol = reorder_tol(float(np.abs(theirs).max()), *decoder_lengths(config, 48)[:-3], 48)  # no output layer; a mean
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol)
    assert main(["embed", f"model={out}", f"data={data}", f"output={tmp_path / 'z.jsonl'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "z.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows], dtype=np.float32), ours, rtol=0, atol=0)


@pytest.mark.parametrize("task,architecture", [("classify", "BertForSequenceClassification"),
                                               ("tokens", "BertForTokenClassification")])
def test_finetune_encoder_from_a_pretrained_directory(task, architecture, mlm_dir, tmp_path):
    import transformers

    out = tmp_path / task
    assert main(["finetune-encoder", f"task={task}", f"model={mlm_dir}", f"output_dir={out}", "max_steps=12",
                 "batch_size=16", "seq_len=48", "logging.progress=false", "logging.every=4",
                 "logging.eval_every=12", "optim.lr=3e-3", *TINY_WORLD]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    losses = logged(out, "loss")
    assert losses[-1] < losses[0], losses
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert sorted(config["id2label"].values()) == sorted(summary["labels"])
    theirs = getattr(transformers, architecture).from_pretrained(out).eval()
    ours = load_model(out).eval()
    ids = torch.tensor([[2, 30, 31, 32, 3]])
    with torch.no_grad():
        expected, actual = theirs(input_ids=ids).logits, ours(ids).logits
    tol = reorder_tol(float(expected.abs().max()), *decoder_lengths(ours.config, ids.shape[1]))
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


def test_token_labels_sit_on_the_first_word_piece(mlm_dir):
    from temper.data.encoder import EncoderVocab, read_labelled
    from temper.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(mlm_dir)
    vocab = EncoderVocab.from_tokenizer(tokenizer)
    words = ["Zqxwvut", "lives", "in", "Brimholt", "."]
    path = mlm_dir.parent / "tags.jsonl"
    path.write_text(json.dumps({"tokens": words, "tags": ["B-PER", "O", "O", "B-LOC", "O"]}) + "\n")
    (example,), names = read_labelled(str(path), tokenizer, vocab, task="tokens", max_len=48)
    pieces = [len(tokenizer.backend.encode(w, add_special_tokens=False).ids) for w in words]
    assert pieces[0] > 1  # an invented word splits into several pieces
    expected = [-100]
    for word_pieces, tag in zip(pieces, ["B-PER", "O", "O", "B-LOC", "O"]):
        expected += [names.index(tag)] + [-100] * (word_pieces - 1)
    assert example.label == [*expected, -100]


def test_bad_inputs_are_one_line_naming_file_and_row(tmp_path, mlm_dir, tiny_tokenizer, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"anchor": "a b c", "positive": "a b d"}\n{"anchor": "e f g"}\n')
    args = [f"output_dir={tmp_path / 'o'}", "max_steps=1", "seq_len=32", "vocab_size=300", "overwrite=true"]
    assert main(["pretrain", "objective=contrastive", f"data={pairs}", f"tokenizer={mlm_dir}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{pairs}:2" in err and "'positive' is missing" in err

    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "the town is big"}\n{"text": "[CLS] [SEP]"}\n')
    assert main(["pretrain", "objective=mlm", f"data={short}", f"tokenizer={mlm_dir}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{short}:2" in err and "no token to mask" in err

    tok_dir = tmp_path / "bpe"
    tiny_tokenizer.save(tok_dir)
    assert main(["pretrain", "objective=mlm", f"data={short}", f"tokenizer={tok_dir}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tok_dir) in err and "[MASK]" in err

    assert main(["pretrain", "objective=mlm", "model=llama-tiny", f"data={short}", f"tokenizer={mlm_dir}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model=llama-tiny is a Llama" in err and "without BertForMaskedLM" in err

    tags = tmp_path / "tags.jsonl"
    tags.write_text('{"tokens": ["a", "b"], "tags": ["O", "O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n')
    assert main(["finetune-encoder", "task=tokens", f"model={mlm_dir}", f"data={tags}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tags}:2" in err and "2 words but 'tags' 1 tags" in err
