"""Encoder objectives: MLM masking, NSP/SOP pairs, contrastive batches, their losses, the WordPiece tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SAMPLE_TEXT, reorder_tol
from hypothesis import given, settings
from hypothesis import strategies as st

from temper.data.encoder import (
    IS_NEXT,
    EncoderCollate,
    EncoderVocab,
    collate_contrastive,
    duplicate_mask,
    frame,
    mask_tokens,
    read_contrastive,
    read_documents,
    read_texts,
    sentence_pairs,
    split_segments,
)
from temper.data.loader import ExampleLoader
from temper.data.tokenizer import Tokenizer, train_wordpiece
from temper.errors import TemperError
from temper.losses.encoder import (
    cls_pool,
    discriminator_loss,
    electra_loss,
    info_nce_loss,
    info_nce_metrics,
    masked_lm_loss,
    masked_lm_metrics,
    mean_pool,
    replaced_token_inputs,
    sample_replacements,
    sentence_pair_loss,
    sentence_pair_metrics,
)

SIGMAS = 5  # a statistical band: a correct implementation leaves it about once in 1.7 million runs

# a synthetic vocabulary: 0 [PAD], 1 [CLS], 2 [SEP], 3 [MASK], 4 [UNK], 5..49 ordinary
VOCAB = EncoderVocab(cls_id=1, sep_id=2, mask_id=3, pad_id=0, vocab_size=50, special_ids=(0, 1, 2, 3, 4))
ORDINARY = 45


def band(n: int, p: float) -> tuple[float, float]:
    """The counts a Binomial(n, p) draw falls between, SIGMAS standard deviations either side."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - SIGMAS * sd, n * p + SIGMAS * sd


def synthetic_rows(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """[CLS] ordinary tokens (with some [UNK]) [SEP] then padding, of varying lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (rows, length), generator=g)
    ids[torch.rand((rows, length), generator=g) < 0.02] = 4  # [UNK]
    lengths = torch.randint(length // 2, length, (rows,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        ids[r, 0], ids[r, n - 1], ids[r, n:] = 1, 2, 0
    return ids


# ----------------------------------------------------------------------------- the tokenizer


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    tok = train_wordpiece(SAMPLE_TEXT.split("\n\n"), vocab_size=200)
    path = tmp_path_factory.mktemp("wordpiece")
    tok.save(path)
    return tok, path


def test_wordpiece_loads_in_transformers_with_the_same_ids_and_roles(wordpiece):
    transformers = pytest.importorskip("transformers")
    tok, path = wordpiece
    vocab = EncoderVocab.from_tokenizer(tok, str(path))
    assert (vocab.pad_id, vocab.cls_id, vocab.sep_id, vocab.mask_id) == (0, 2, 3, 4)
    again = Tokenizer.from_dir(path)
    assert (again.cls_id, again.sep_id, again.mask_id, again.special_ids) == (2, 3, 4, [0, 1, 2, 3, 4])
    a, b = "Alice lives in Paris.", "Bob has a dog named Rex."
    for cls in (transformers.AutoTokenizer, transformers.BertTokenizerFast):
        hf = cls.from_pretrained(path)
        assert (hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.pad_token_id) == (2, 3, 4, 0)
        single = frame(vocab, (tok.encode(a), [0] * len(tok.encode(a))), max_len=64)
        assert hf(a)["input_ids"] == single.ids
        pair = frame(vocab, (tok.encode(a), [0] * len(tok.encode(a))), (tok.encode(b), [0] * len(tok.encode(b))),
                     max_len=64)
        ref = hf(a, b)
        assert ref["input_ids"] == pair.ids and ref["token_type_ids"] == pair.token_type_ids


@settings(max_examples=60, deadline=None)
@given(a=st.integers(1, 14), b=st.integers(1, 14), max_len=st.integers(5, 24))
def test_pairs_are_cut_longest_first_as_transformers_cuts(wordpiece, a, b, max_len):
    transformers = pytest.importorskip("transformers")
    tok, path = wordpiece
    hf = _cached_hf(transformers, path)
    vocab = EncoderVocab.from_tokenizer(tok)
    words = "alice lives in paris bob rome cat dog tom rex sum".split()
    text_a, text_b = " ".join(words[i % 11] for i in range(a)), " ".join(words[(i * 7) % 11] for i in range(b))
    pieces = [(tok.encode(t), list(range(len(tok.encode(t))))) for t in (text_a, text_b)]
    ours = frame(vocab, *pieces, max_len=max_len)
    ref = hf(text_a, text_b, truncation="longest_first", max_length=max_len)
    assert ours.ids == ref["input_ids"] and ours.token_type_ids == ref["token_type_ids"]


_HF = {}


def _cached_hf(transformers, path):
    if path not in _HF:
        _HF[path] = transformers.AutoTokenizer.from_pretrained(path)
    return _HF[path]


def test_a_tokenizer_without_mask_is_refused_by_name(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    with pytest.raises(TemperError, match=rf"^{tmp_path}: the tokenizer has no \[MASK\]"):
        EncoderVocab.from_tokenizer(Tokenizer.from_dir(tmp_path), str(tmp_path))


# ----------------------------------------------------------------------------- MLM masking


def test_mlm_proportions_follow_bert():
    ids = synthetic_rows(500, 1000)
    masked, labels = mask_tokens(ids, VOCAB, generator=torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor(VOCAB.special_ids))
    selectable = int((~special).sum())
    assert selectable > 300_000
    selected = labels != -100
    assert not (selected & special).any()  # [CLS] [SEP] [PAD] [UNK] are never selected
    assert torch.equal(masked[~selected], ids[~selected])  # nothing else changes
    assert torch.equal(labels[selected], ids[selected])  # labels are the originals
    lo, hi = band(selectable, 0.15)
    k = int(selected.sum())
    assert lo <= k <= hi
    became_mask = int((masked[selected] == VOCAB.mask_id).sum())
    lo, hi = band(k, 0.8)
    assert lo <= became_mask <= hi
    # a random token equals the original 1 time in 45: 10% x 44/45 change, 10% + 10%/45 stay
    changed = int(((masked[selected] != VOCAB.mask_id) & (masked[selected] != ids[selected])).sum())
    lo, hi = band(k, 0.1 * (ORDINARY - 1) / ORDINARY)
    assert lo <= changed <= hi
    lo, hi = band(k, 0.1 + 0.1 / ORDINARY)
    assert lo <= int((masked[selected] == ids[selected]).sum()) <= hi
    # random replacements come from the ordinary vocabulary only, all of it
    replaced = masked[selected & (masked != VOCAB.mask_id) & (masked != ids)]
    assert not torch.isin(replaced, torch.tensor(VOCAB.special_ids)).any()
    assert set(replaced.tolist()) == set(range(5, 50))


def test_mlm_is_seeded_and_configurable():
    ids = synthetic_rows(8, 64)
    a = mask_tokens(ids, VOCAB, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, VOCAB, generator=torch.Generator().manual_seed(3))
    c = mask_tokens(ids, VOCAB, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    big = synthetic_rows(40, 500)
    _, labels = mask_tokens(big, VOCAB, generator=torch.Generator().manual_seed(5), mlm_probability=0.4)
    n = int((~torch.isin(big, torch.tensor(VOCAB.special_ids))).sum())
    lo, hi = band(n, 0.4)
    assert lo <= int((labels != -100).sum()) <= hi
    masked, labels = mask_tokens(big, VOCAB, generator=torch.Generator().manual_seed(5), mask_fraction=1.0,
                                 random_fraction=0.0)
    assert (masked[labels != -100] == VOCAB.mask_id).all()  # ELECTRA-style settings are honoured


def test_whole_word_masking_selects_whole_words():
    g = torch.Generator().manual_seed(0)
    rows, length = 120, 300
    ids = torch.randint(5, 50, (rows, length), generator=g)
    word_ids = torch.full((rows, length), -1)
    words = 0
    for r in range(rows):
        t, w = 1, 0
        while t < length - 1:
            n = int(torch.randint(1, 5, (1,), generator=g))
            word_ids[r, t:min(t + n, length - 1)] = w
            t, w = t + n, w + 1
        words += w
        ids[r, 0], ids[r, length - 1] = 1, 2
    _, labels = mask_tokens(ids, VOCAB, generator=torch.Generator().manual_seed(2), word_ids=word_ids)
    selected = labels != -100
    assert not selected[word_ids < 0].any()
    chosen_words = 0
    for r in range(rows):
        for w in range(int(word_ids[r].max()) + 1):
            flags = selected[r, word_ids[r] == w]
            assert flags.all() or not flags.any(), f"row {r} word {w} partly selected"
            chosen_words += int(flags.all())
    lo, hi = band(words, 0.15)
    assert lo <= chosen_words <= hi


def test_nothing_to_mask_names_the_row(tmp_path):
    ids = torch.tensor([[1, 5, 6, 2], [1, 4, 2, 0]])  # row 1: [CLS] [UNK] [SEP] [PAD]
    with pytest.raises(TemperError, match="^data.jsonl:7: nothing to mask"):
        mask_tokens(ids, VOCAB, generator=torch.Generator(), sources=["data.jsonl:3", "data.jsonl:7"])


def test_reading_texts_refuses_rows_too_short_to_mask(wordpiece, tmp_path):
    tok, _ = wordpiece
    vocab = EncoderVocab.from_tokenizer(tok)
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"text": "Alice lives in Paris."}) + "\n")
    (example,) = read_texts(good, tok, vocab, max_len=5)
    assert example.ids[0] == vocab.cls_id and example.ids[-1] == vocab.sep_id and len(example.ids) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "Alice."}) + "\n" + json.dumps({"text": "☃ ♞"}) + "\n")
    with pytest.raises(TemperError, match=rf"^{bad}:2: column 'text' has no token to mask"):
        read_texts(bad, tok, vocab, max_len=16)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"body": "Alice."}) + "\n")
    with pytest.raises(TemperError, match=rf"^{missing}:1: column 'text' is missing"):
        read_texts(missing, tok, vocab, max_len=16)


# ----------------------------------------------------------------------------- NSP / SOP


def _documents(n_docs: int = 40, sentences: int = 5) -> list[tuple[str, list[str]]]:
    names = "alice bob tom rex paris rome cat dog".split()
    assert n_docs <= 64 and sentences <= 8
    return [(f"docs.txt:{d}", [f"{names[d // 8]} {names[d % 8]} {names[s]} lives in paris." for s in range(sentences)])
            for d in range(n_docs)]  # every sentence is its document's own


def _sides(example, tok):
    sep = example.ids.index(3)
    return tuple(example.ids[1:sep]), tuple(example.ids[sep + 1:-1])


def test_sop_negatives_are_the_same_two_segments_swapped(wordpiece):
    tok, _ = wordpiece
    vocab = EncoderVocab.from_tokenizer(tok)
    docs = _documents()
    pairs = sentence_pairs(docs, tok, vocab, task="sop", max_len=128, seed=0)
    assert len(pairs) == 40 * 4
    lo, hi = band(len(pairs), 0.5)
    assert lo <= sum(p.sentence_label for p in pairs) <= hi
    k = 0
    for _, segments in docs:
        encoded = [tuple(tok.encode(s)) for s in segments]
        for i in range(len(segments) - 1):
            p = pairs[k]
            k += 1
            a, b = _sides(p, tok)
            expected = (encoded[i], encoded[i + 1]) if p.sentence_label == IS_NEXT else (encoded[i + 1], encoded[i])
            assert (a, b) == expected
            assert p.token_type_ids == [0] * (len(a) + 2) + [1] * (len(b) + 1)
            assert p.ids[0] == vocab.cls_id and p.ids[-1] == vocab.sep_id


def test_nsp_negatives_come_from_another_document(wordpiece):
    tok, _ = wordpiece
    vocab = EncoderVocab.from_tokenizer(tok)
    docs = _documents()
    pairs = sentence_pairs(docs, tok, vocab, task="nsp", max_len=128, seed=1)
    lo, hi = band(len(pairs), 0.5)
    assert lo <= sum(p.sentence_label for p in pairs) <= hi
    k = 0
    for _, segments in docs:
        encoded = [tuple(tok.encode(s)) for s in segments]
        for i in range(len(segments) - 1):
            a, b = _sides(pairs[k], tok)
            assert a == encoded[i]
            if pairs[k].sentence_label == IS_NEXT:
                assert b == encoded[i + 1]
            else:
                assert b not in encoded  # sentences are unique to their document here
                assert any(b in {tuple(tok.encode(s)) for s in other} for _, other in docs)
            k += 1
    with pytest.raises(TemperError, match=r"^docs\.txt: NSP .* at least 2 documents with text, got 1"):
        sentence_pairs(docs[:1], tok, vocab, task="nsp", max_len=64, seed=0)
    with pytest.raises(TemperError, match="two segments"):
        sentence_pairs([("x:1", ["One sentence."])], tok, vocab, task="sop", max_len=64, seed=0)


def test_documents_split_into_sentences(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("Alice lives in Paris. Bob lives in Rome!\nTom is a cat?\n\nRex is a dog.\n")
    assert read_documents(f) == [(f"{f}:1", ["Alice lives in Paris.", "Bob lives in Rome!", "Tom is a cat?"]),
                                 (f"{f}:4", ["Rex is a dog."])]
    assert split_segments("3.5 is a number. Yes") == ["3.5 is a number.", "Yes"]


# ----------------------------------------------------------------------------- the collate on the loader


def test_encoder_collate_masks_alike_after_resume_and_on_two_ranks(wordpiece):
    tok, _ = wordpiece
    vocab = EncoderVocab.from_tokenizer(tok)
    examples = sentence_pairs(_documents(12), tok, vocab, task="sop", max_len=64, seed=0)
    collate = EncoderCollate(vocab, whole_word=True)

    def loader(**kw):
        return ExampleLoader(examples, collate, batch_size=4, seed=3, seeded_collate=True, **kw)

    one = loader()
    batches = [one.next_batch() for _ in range(6)]
    b = batches[0]
    assert b.input_ids.shape == b.token_type_ids.shape == b.labels.shape and b.sentence_labels.shape == (4,)
    assert not torch.equal(batches[0].labels, batches[1].labels)
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "position": 3, "world_size": 1, "batch_size": 4})
    assert torch.equal(resumed.next_batch().input_ids, batches[3].input_ids)
    ranks = [loader(rank=r, world_size=2) for r in (0, 1)]
    for k in range(3):
        for r in (0, 1):
            got = ranks[r].next_batch()
            assert torch.equal(got.input_ids, batches[2 * k + r].input_ids)
            assert torch.equal(got.labels, batches[2 * k + r].labels)


# ----------------------------------------------------------------------------- contrastive data


def test_contrastive_rows_and_duplicate_mask(wordpiece, tmp_path):
    tok, _ = wordpiece
    vocab = EncoderVocab.from_tokenizer(tok)
    f = tmp_path / "pairs.jsonl"
    rows = [{"anchor": "Alice lives in Paris.", "positive": "Paris is where Alice lives."},
            {"anchor": "Bob lives in Rome.", "positive": "Rome is home to Bob."},
            {"anchor": "Alice lives in Paris.", "positive": "Alice: Paris."},  # the same anchor as row 0
            {"anchor": "Tom is a cat.", "positive": "Bob lives in Rome."}]  # row 1's anchor as positive
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_contrastive(f, tok, vocab, max_len=32, supervised=True)
    batch = collate_contrastive(pairs, vocab.pad_id)
    assert batch.input_ids.shape[0] == 8 and batch.num_pairs == 4
    assert batch.input_ids[0, :len(pairs[0].anchor_ids)].tolist() == pairs[0].anchor_ids
    assert batch.input_ids[4, :len(pairs[0].positive_ids)].tolist() == pairs[0].positive_ids
    assert batch.duplicate_mask.tolist() == [[False, False, True, False], [False, False, False, True],
                                             [True, False, False, False], [False, True, False, False]]
    simcse = tmp_path / "s.txt"
    simcse.write_text("Alice lives in Paris.\nBob lives in Rome.\nAlice lives in Paris.\n")
    batch = collate_contrastive(read_contrastive(simcse, tok, vocab, max_len=32, supervised=False), vocab.pad_id)
    assert torch.equal(batch.input_ids[:3], batch.input_ids[3:])  # the same sentence twice
    assert batch.duplicate_mask[0, 2] and batch.duplicate_mask[2, 0] and not batch.duplicate_mask[0, 1]
    assert not batch.duplicate_mask.diagonal().any()


def test_a_pair_without_its_second_sentence_names_file_row_and_column(wordpiece, tmp_path):
    tok, _ = wordpiece
    vocab = EncoderVocab.from_tokenizer(tok)
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"anchor": "a b", "positive": "b a"}) + "\n" + json.dumps({"anchor": "Alice."}) + "\n")
    with pytest.raises(TemperError, match=rf"^{f}:2: column 'positive' is missing"):
        read_contrastive(f, tok, vocab, max_len=16, supervised=True)
    f.write_text(json.dumps({"anchor": "Alice.", "positive": "  "}) + "\n")
    with pytest.raises(TemperError, match=rf"^{f}:1: column 'positive' is empty"):
        read_contrastive(f, tok, vocab, max_len=16, supervised=True)
    f.write_text(json.dumps({"anchor": "Alice.", "positive": ["x"]}) + "\n")
    with pytest.raises(TemperError, match=rf"^{f}:1: column 'positive' is a list"):
        read_contrastive(f, tok, vocab, max_len=16, supervised=True)


def test_duplicate_mask_compares_both_sides():
    mask = duplicate_mask([[1], [2], [3]], [[4], [1], [5]])  # row 1's positive is row 0's anchor
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


# ----------------------------------------------------------------------------- losses


def _log_softmax_64(row: torch.Tensor) -> torch.Tensor:
    row = row.double()
    top = row.max()
    return row - top - torch.log(torch.exp(row - top).sum())


def test_mlm_loss_is_cross_entropy_over_the_selected_positions_only():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 40
    logits = torch.randn((B, T, V), generator=g) * 3
    labels = torch.full((B, T), -100)
    chosen = [(0, 1, 5), (0, 4, 9), (1, 0, 39), (2, 6, 0), (2, 2, 17)]
    for b, t, y in chosen:
        labels[b, t] = y
    expected = -sum(float(_log_softmax_64(logits[b, t])[y]) for b, t, y in chosen) / len(chosen)
    scale = float(logits.abs().max()) + math.log(V)
    assert masked_lm_loss(logits, labels).item() == pytest.approx(expected, abs=reorder_tol(scale, V, len(chosen)))
    assert masked_lm_loss(logits, labels, reduction="sum").item() == pytest.approx(
        expected * len(chosen), abs=len(chosen) * reorder_tol(scale, V, len(chosen)))
    other = logits.clone()
    other[labels == -100] += torch.randn(other[labels == -100].shape, generator=g) * 5
    assert masked_lm_loss(other, labels).item() == masked_lm_loss(logits, labels).item()
    metrics = masked_lm_metrics(logits, labels)
    assert metrics["masked_tokens"] == 5
    assert metrics["mlm_accuracy"] == sum(int(logits[b, t].argmax() == y) for b, t, y in chosen)
    assert masked_lm_loss(logits, torch.full((B, T), -100)).item() == 0.0  # nothing selected: 0, not NaN


def test_sentence_pair_loss_and_accuracy():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.25], [-3.0, 1.0], [0.0, 4.0]])
    labels = torch.tensor([0, 1, 1, 0])
    expected = -sum(float(_log_softmax_64(logits[i])[y]) for i, y in enumerate(labels.tolist())) / 4
    assert sentence_pair_loss(logits, labels).item() == pytest.approx(expected, abs=reorder_tol(4.0, 2, 4))
    assert sentence_pair_metrics(logits, labels)["sentence_accuracy"] == 2  # rows 0 and 2


def test_electra_inputs_count_a_sample_equal_to_the_original_as_original():
    masked = torch.tensor([[1, 3, 7, 3, 2, 0], [1, 8, 3, 9, 2, 0]])
    original = torch.tensor([[1, 5, 7, 6, 2, 0], [1, 8, 9, 9, 2, 0]])
    labels = torch.full_like(masked, -100)
    sel = torch.tensor([[0, 1, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)  # (1,3) was left unchanged
    labels[sel] = original[sel]
    V = 12
    logits = torch.full((2, 6, V), -30.0, requires_grad=False)
    logits[0, 1, 5] = 30.0  # samples the original: not replaced
    logits[0, 3, 11] = 30.0  # another token: replaced
    logits[1, 2, 4] = 30.0
    logits[1, 3, 9] = 30.0  # original
    logits.requires_grad_(True)
    inputs, disc_labels = replaced_token_inputs(masked, labels, logits, generator=torch.Generator().manual_seed(0))
    assert inputs.tolist() == [[1, 5, 7, 11, 2, 0], [1, 8, 4, 9, 2, 0]]
    assert disc_labels.tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert not inputs.requires_grad and not disc_labels.requires_grad
    # the same at the selected positions only, (N, V) in row-major order
    again, _ = replaced_token_inputs(masked, labels, logits[sel], generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, inputs)


def test_electra_gradient_stops_at_sampling_and_the_disc_weight_applies():
    g = torch.Generator().manual_seed(0)
    V, D = 16, 8
    embedding = torch.nn.Embedding(V, D)
    head = torch.nn.Linear(D, 1)
    masked = torch.randint(5, V, (2, 6), generator=g)
    labels = torch.full_like(masked, -100)
    labels[:, 2] = masked[:, 2]
    masked[:, 2] = 3
    gen_logits = torch.randn((2, 6, V), generator=g, requires_grad=True)
    gen_loss = masked_lm_loss(gen_logits, labels)
    inputs, disc_labels = replaced_token_inputs(masked, labels, gen_logits, generator=g)
    disc_logits = head(embedding(inputs)).squeeze(-1)
    attention = torch.ones_like(masked)
    attention[1, 5] = 0
    disc = discriminator_loss(disc_logits, disc_labels, attention)
    (grad_disc_only,) = torch.autograd.grad(disc, head.weight, retain_graph=True)
    total = electra_loss(gen_loss, disc)
    assert total.item() == pytest.approx(gen_loss.item() + 50 * disc.item(), rel=4 * torch.finfo(torch.float32).eps)
    total.backward()
    torch.testing.assert_close(head.weight.grad, 50 * grad_disc_only)  # the weight reaches the gradient
    # the generator learns from its MLM loss alone: its gradient is that of L_gen
    (grad_gen_only,) = torch.autograd.grad(masked_lm_loss(gen_logits, labels), gen_logits)
    torch.testing.assert_close(gen_logits.grad, grad_gen_only)
    assert grad_gen_only[:, 2].abs().sum() > 0


def test_discriminator_loss_is_bce_over_real_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn((2, 5), generator=g) * 2
    targets = torch.tensor([[0.0, 1, 0, 0, 1], [1, 0, 0, 1, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    terms = []
    for b in range(2):
        for t in range(5):
            if attention[b, t]:
                p = 1 / (1 + math.exp(-float(logits[b, t])))
                y = float(targets[b, t])
                terms.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
    expected = sum(terms) / len(terms)
    assert discriminator_loss(logits, targets, attention).item() == pytest.approx(
        expected, abs=reorder_tol(float(logits.abs().max()), len(terms)))
    padded = logits.clone()
    padded[1, 3:] = 100.0  # padding's logits change nothing
    assert discriminator_loss(padded, targets, attention).item() == discriminator_loss(logits, targets, attention).item()


def test_sampling_follows_the_generator_softmax():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20_000, 1)
    draws = sample_replacements(logits, generator=torch.Generator().manual_seed(0))
    for token, p in enumerate((0.7, 0.2, 0.1)):
        lo, hi = band(20_000, p)
        assert lo <= int((draws == token).sum()) <= hi
    hot = sample_replacements(logits, generator=torch.Generator().manual_seed(0), temperature=0.05)
    assert (hot == 0).float().mean() > 0.99  # a low temperature sharpens


def _info_nce_64(a, p, tau, excluded=()):
    """The formula term by term in float64: -log exp(s_ii/tau) / sum_{j not excluded} exp(s_ij/tau)."""
    a, p = a.double(), p.double()
    total = 0.0
    for i in range(len(a)):
        sims = [float(a[i] @ p[j] / (a[i].norm() * p[j].norm())) / tau for j in range(len(a))]
        keep = [j for j in range(len(a)) if j == i or (i, j) not in excluded]
        total += -(sims[i] - math.log(sum(math.exp(sims[j]) for j in keep)))
    return total / len(a)


def test_info_nce_matches_the_formula_and_leaves_duplicates_out():
    g = torch.Generator().manual_seed(0)
    B, D, tau = 5, 16, 0.05
    anchors, positives = torch.randn((B, D), generator=g), torch.randn((B, D), generator=g)
    positives[2] = anchors[2] + 0.1 * torch.randn(D, generator=g)
    tol = reorder_tol(1 / tau, D, D, B)
    assert info_nce_loss(anchors, positives).item() == pytest.approx(_info_nce_64(anchors, positives, tau), abs=tol)
    mask = torch.zeros((B, B), dtype=torch.bool)
    mask[0, 3] = mask[3, 0] = True
    mask[1, 1] = True  # the diagonal is the positive: never left out
    excluded = {(0, 3), (3, 0)}
    with_mask = info_nce_loss(anchors, positives, duplicate_mask=mask).item()
    assert with_mask == pytest.approx(_info_nce_64(anchors, positives, tau, excluded), abs=tol)
    assert abs(with_mask - info_nce_loss(anchors, positives).item()) > 100 * tol
    other_tau = info_nce_loss(anchors, positives, temperature=0.5).item()
    assert other_tau == pytest.approx(_info_nce_64(anchors, positives, 0.5), abs=reorder_tol(2.0, D, D, B))
    assert abs(other_tau - info_nce_loss(anchors, positives).item()) > 1e-3
    assert info_nce_metrics(anchors, positives, duplicate_mask=mask)["retrieval_accuracy"] >= 1  # row 2 finds its own


def test_info_nce_gradient_and_duplicates_leave_the_loss_unchanged_by_them():
    g = torch.Generator().manual_seed(2)
    anchors = torch.randn((4, 8), generator=g, requires_grad=True)
    positives = torch.randn((4, 8), generator=g)
    mask = torch.zeros((4, 4), dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    moved = positives.clone()
    moved[1] = torch.randn(8, generator=g)  # pair 1's positive moves: anchor 0's loss must not notice
    a = info_nce_loss(anchors, positives, duplicate_mask=mask, reduction="none")
    b = info_nce_loss(anchors, moved, duplicate_mask=mask, reduction="none")
    assert a[0].item() == b[0].item() and a[1].item() != b[1].item()
    a.sum().backward()
    assert anchors.grad.abs().sum() > 0


def test_pooling():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    hidden2 = hidden.clone()
    hidden2[0, 2] = 1e6  # padding changes nothing
    torch.testing.assert_close(mean_pool(hidden2, mask), pooled)
    torch.testing.assert_close(cls_pool(hidden), hidden[:, 0])
