"""Encoder pretraining data: MLM masking, NSP/SOP sentence pairs, contrastive pairs, and their collates.

Sequences are framed as BERT frames them: `[CLS] A [SEP]`, or `[CLS] A [SEP] B [SEP]` with token
types 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`, right-padded with [PAD] (attention_mask 0).

**Masked language modelling** (`mask_tokens`; Devlin et al. 2019, sec. 3.1): each token that is
not special ([CLS], [SEP], [PAD], [UNK], [MASK], ...) is selected with probability
`mlm_probability` (0.15), independently, as transformers' DataCollatorForLanguageModeling
draws; of the selected, 80% become [MASK], 10% a token drawn uniformly from the non-special
vocabulary (transformers draws from the whole vocabulary, specials included), 10% stay. Labels
are the original ids at the selected positions and -100 elsewhere. With `word_ids`, whole-word
masking: one draw per word, and a selected word has all its tokens selected (each then takes
its own 80/10/10 draw, as BERT's whole-word-masking release does). A row with no selectable
token is an error naming the row. The draws come from a `torch.Generator` seeded per batch
(`ExampleLoader(seeded_collate=True)`), so a resumed run and any number of ranks mask alike.

**Sentence pairs** (`sentence_pairs`): consecutive segments (A, B) of one document. NSP (BERT):
half the pairs keep their B (label 0, IsNext), half take B from a random segment of another
document (label 1, NotNext), transformers' label convention. SOP (ALBERT, Lan et al. 2020):
half stay in order (0), half are the same two segments swapped (1): a negative on the same
topic, so the task cannot be solved by topic alone. A pair longer than `max_len` is cut
longest-first, as transformers' fast tokenizers cut (`truncate_longest_first`).

**Contrastive pairs** (`read_contrastive`, `collate_contrastive`): supervised rows carry `anchor`
and `positive`; unsupervised (SimCSE, Gao et al. 2021) rows carry `text`, which is its own
positive (the two dropout masks come from two forwards of the same ids). A batch holds the B
anchors then the B positives and a (B, B) `duplicate_mask`: True at (i, j), i != j, when rows
i and j share a text (either side with either side), so a duplicate never serves as the
other's negative.

Bad input is one line naming `file:line` and the column: a pair row whose second text is
missing or empty, a row with nothing to mask, a tokenizer without [MASK]/[CLS]/[SEP]/[PAD].
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from temper.data.readers import iter_records, json_type
from temper.errors import TemperError
from temper.losses import IGNORE_INDEX

SENTENCE_TASKS = ("nsp", "sop")
IS_NEXT, NOT_NEXT = 0, 1  # transformers' next_sentence_label convention (SOP: 0 in order, 1 swapped)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ----------------------------------------------------------------------------- the vocabulary's roles


@dataclass(frozen=True)
class EncoderVocab:
    """The ids an encoder's data needs, and which ids are never masked nor drawn as replacements."""

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    vocab_size: int
    special_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, source: str = "the tokenizer") -> EncoderVocab:
        """From a `temper.data.tokenizer.Tokenizer`; `source` (its directory) names it in an error."""
        roles = {"[MASK] (mask_token)": tokenizer.mask_id, "[CLS] (cls_token)": tokenizer.cls_id,
                 "[SEP] (sep_token)": tokenizer.sep_id, "[PAD] (pad_token)": tokenizer.token_id(tokenizer.pad_token)}
        missing = [name for name, i in roles.items() if i is None]
        if missing:
            raise TemperError(f"{source}: the tokenizer has no {', '.join(missing)} token, which masked language "
                              "modelling and sentence pairs need: use a BERT-style tokenizer "
                              "(temper.data.tokenizer.train_wordpiece trains one)")
        specials = set(tokenizer.special_ids) | {i for i in roles.values() if i is not None}
        return cls(cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, mask_id=tokenizer.mask_id,
                   pad_id=tokenizer.token_id(tokenizer.pad_token), vocab_size=tokenizer.vocab_size,
                   special_ids=tuple(sorted(specials)))

    def __post_init__(self) -> None:
        if self.vocab_size <= len(set(self.special_ids)):
            raise TemperError(f"a vocabulary of {self.vocab_size} tokens, {len(self.special_ids)} of them special, "
                              "has no ordinary token to draw as a replacement")

    def replacement_ids(self) -> torch.Tensor:
        """(V - specials,) the ids a random replacement is drawn from."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[list(self.special_ids)] = False
        return keep.nonzero().squeeze(1)


# ----------------------------------------------------------------------------- masking


def mask_tokens(input_ids: torch.Tensor, vocab: EncoderVocab, *, generator: torch.Generator,
                mlm_probability: float = 0.15, mask_fraction: float = 0.8, random_fraction: float = 0.1,
                word_ids: torch.Tensor | None = None, sources: Sequence[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input_ids, labels) of (B, T) `input_ids`, as the module docstring says.

    `word_ids` (B, T): each token's word, numbered within its row, -1 where no word (specials,
    padding): whole-word masking. `mask_fraction` / `random_fraction` of the selected become
    [MASK] / a random token, the rest stay (ELECTRA's generator input: 0.85 / 0.0). `sources`
    name the rows (`file:line`) in the error for a row with nothing to mask."""
    if not 0.0 < mlm_probability < 1.0:
        raise TemperError(f"mlm_probability must be between 0 and 1 (exclusive), got {mlm_probability}")
    if not (mask_fraction >= 0 and random_fraction >= 0 and mask_fraction + random_fraction <= 1):
        raise TemperError(f"mask_fraction ({mask_fraction}) and random_fraction ({random_fraction}) must be "
                          "shares of the selected tokens: both >= 0, summing to at most 1")
    specials = torch.tensor(vocab.special_ids, dtype=input_ids.dtype, device=input_ids.device)
    selectable = ~torch.isin(input_ids, specials)
    if word_ids is not None:
        selectable &= word_ids >= 0
    empty = (~selectable.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        row = empty[0]
        where = sources[row] if sources is not None else f"row {row} of the batch"
        raise TemperError(f"{where}: nothing to mask: the sequence holds no token but special ones "
                          f"({len(empty)} such row(s) in the batch); drop it or give it text")
    B, T = input_ids.shape
    device = input_ids.device
    if word_ids is None:
        selected = torch.rand((B, T), generator=generator, device=device) < mlm_probability
    else:
        words = int(word_ids.max()) + 1
        word_selected = torch.rand((B, words), generator=generator, device=device) < mlm_probability
        selected = word_selected.gather(1, word_ids.clamp(min=0))
    selected &= selectable
    action = torch.rand((B, T), generator=generator, device=device)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    pool = vocab.replacement_ids().to(device)
    random_ids = pool[torch.randint(len(pool), (B, T), generator=generator, device=device)]
    masked = torch.where(to_mask, torch.full_like(input_ids, vocab.mask_id), input_ids)
    masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


# ----------------------------------------------------------------------------- examples


@dataclass
class EncoderExample:
    """One framed sequence: `[CLS] A [SEP]` (+ `B [SEP]`), its token types, word ids (-1 on specials)
    and, for NSP/SOP, its sentence label."""

    ids: list[int]
    token_type_ids: list[int]
    word_ids: list[int]
    source: str
    sentence_label: int | None = None


def _pieces(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids and word ids (-1 for a special token typed in the text) of `text`, no frame."""
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    return list(enc.ids), [-1 if w is None else w for w in enc.word_ids]


def truncate_longest_first(len_a: int, len_b: int, room: int) -> tuple[int, int]:
    """Tokens kept of A and B so that both fit in `room`, as transformers' fast tokenizers cut with
    `truncation="longest_first"`: the shorter side (A on a tie) keeps its length or half the room
    (rounded down), whichever is less, unless the longer leaves it more; the longer takes the rest.
    Both keep their starts."""
    if len_a + len_b <= room:
        return len_a, len_b
    if len_a <= len_b:
        keep_a = min(len_a, max(room // 2, room - len_b))
        return keep_a, min(len_b, room - keep_a)
    keep_b = min(len_b, max(room // 2, room - len_a))
    return min(len_a, room - keep_b), keep_b


def frame(vocab: EncoderVocab, a: tuple[list[int], list[int]], b: tuple[list[int], list[int]] | None = None, *,
          max_len: int, source: str = "", sentence_label: int | None = None) -> EncoderExample:
    """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` from (ids, word ids) pieces, cut to `max_len` (one
    text keeps its start; a pair is cut longest-first); B's words are numbered after A's."""
    (a_ids, a_words) = a
    if b is None:
        if max_len < 3:
            raise TemperError(f"max_len must be at least 3 ([CLS], a token, [SEP]), got {max_len}")
        n = min(len(a_ids), max_len - 2)
        return EncoderExample([vocab.cls_id, *a_ids[:n], vocab.sep_id], [0] * (n + 2), [-1, *a_words[:n], -1],
                              source, sentence_label)
    if max_len < 5:
        raise TemperError(f"max_len must be at least 5 for a pair ([CLS] A [SEP] B [SEP]), got {max_len}")
    b_ids, b_words = b
    na, nb = truncate_longest_first(len(a_ids), len(b_ids), max_len - 3)
    offset = max(a_words[:na], default=-1) + 1
    b_words = [w + offset if w >= 0 else -1 for w in b_words[:nb]]
    ids = [vocab.cls_id, *a_ids[:na], vocab.sep_id, *b_ids[:nb], vocab.sep_id]
    types = [0] * (na + 2) + [1] * (nb + 1)
    return EncoderExample(ids, types, [-1, *a_words[:na], -1, *b_words, -1], source, sentence_label)


def _text(record, column: str, what: str) -> str:
    """The row's `column` as a non-empty string, or one line naming file:line and the column."""
    value = record.data.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        state = "missing" if column not in record.data else "empty" if isinstance(value, str) else "null"
        keys = ", ".join(map(str, record.data)) or "none"
        raise TemperError(f"{record.source}: column '{column}' is {state} ({what}; the row's columns: {keys})")
    if not isinstance(value, str):
        raise TemperError(f"{record.source}: column '{column}' is {json_type(value)} (expected a string; {what})")
    return value


def _check_maskable(example: EncoderExample, vocab: EncoderVocab, what: str) -> EncoderExample:
    if all(i in vocab.special_ids for i in example.ids):
        raise TemperError(f"{example.source}: {what} has no token to mask (empty, or only special or unknown "
                          "tokens); drop the row")
    return example


def read_texts(spec, tokenizer, vocab: EncoderVocab, *, max_len: int, column: str = "text",
               text_mode: str = "paragraph") -> list[EncoderExample]:
    """One `[CLS] text [SEP]` example per record (text files: per paragraph), for MLM and ELECTRA."""
    out = []
    for rec in iter_records(spec, text_mode=text_mode):
        text = _text(rec, column, "masked language modelling reads one text per row")
        out.append(_check_maskable(frame(vocab, _pieces(tokenizer, text), max_len=max_len, source=rec.source),
                                   vocab, f"column '{column}'"))
    if not out:
        raise TemperError(f"{spec}: no text to train on")
    return out


def split_segments(text: str) -> list[str]:
    """A document's sentences: cut after . ! ? followed by whitespace, and at line breaks."""
    return [s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]


def read_documents(spec, *, column: str = "text", text_mode: str = "paragraph") -> list[tuple[str, list[str]]]:
    """(source, segments) per document: a record's `column` split into sentences (`split_segments`)."""
    return [(rec.source, split_segments(_text(rec, column, "a document is one text per row")))
            for rec in iter_records(spec, text_mode=text_mode)]


def sentence_pairs(documents: Iterable[tuple[str, list[str]]], tokenizer, vocab: EncoderVocab, *, task: str,
                   max_len: int, seed: int) -> list[EncoderExample]:
    """NSP or SOP examples (module docstring) from each document's consecutive segments; a
    document contributes its pairs (A, B) = (segment i, segment i + 1). Seeded with `seed`."""
    if task not in SENTENCE_TASKS:
        raise TemperError(f"task must be one of {', '.join(SENTENCE_TASKS)}, got {task!r}")
    documents = list(documents)
    docs = [(source, [p for p in (_pieces(tokenizer, s) for s in segments) if p[0]])
            for source, segments in documents]
    docs = [(source, segments) for source, segments in docs if segments]
    if task == "nsp" and len(docs) < 2:
        files = sorted({source.rsplit(":", 1)[0] for source, _ in documents}) or ["the data"]
        raise TemperError(f"{', '.join(files)}: NSP draws its negatives from other documents: it needs at least "
                          f"2 documents with text, got {len(docs)}")
    rng = random.Random(seed)
    out = []
    for d, (source, segments) in enumerate(docs):
        for i in range(len(segments) - 1):
            a, b = segments[i], segments[i + 1]
            label = IS_NEXT if rng.random() < 0.5 else NOT_NEXT
            if label == NOT_NEXT and task == "sop":
                a, b = b, a
            elif label == NOT_NEXT:  # nsp: B from another document
                other = rng.randrange(len(docs) - 1)
                other_segments = docs[other + (other >= d)][1]
                b = other_segments[rng.randrange(len(other_segments))]
            out.append(frame(vocab, a, b, max_len=max_len, source=f"{source} (segments {i + 1}-{i + 2})",
                             sentence_label=label))
    if not out:
        raise TemperError(f"no document holds two segments to pair for {task.upper()} "
                          f"({len(docs)} documents read): give documents of several sentences")
    return out


# ----------------------------------------------------------------------------- batches


@dataclass
class EncoderBatch:
    """B right-padded sequences: `input_ids`, `attention_mask` (1 real, 0 pad), `token_type_ids`
    (B, T); `labels` (B, T) the MLM targets (-100 where nothing is predicted) or None; `sentence_labels`
    (B,) NSP/SOP labels or None; `seed` the batch's (ExampleLoader's `batch_seed`: the same batch
    has the same seed on any number of ranks and after a resume; ELECTRA samples its replacements
    from it)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    num_sequences: int
    labels: torch.Tensor | None = None
    sentence_labels: torch.Tensor | None = None
    seed: int = 0

    def to(self, device) -> EncoderBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return EncoderBatch(move(self.input_ids), move(self.attention_mask), move(self.token_type_ids),
                            self.num_sequences, move(self.labels), move(self.sentence_labels), self.seed)


def pad_examples(examples: list[EncoderExample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / token_type_ids / word_ids, (B, T) right-padded."""
    B, T = len(examples), max(len(e.ids) for e in examples)
    out = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((B, T), dtype=torch.long),
           "token_type_ids": torch.zeros((B, T), dtype=torch.long),
           "word_ids": torch.full((B, T), -1, dtype=torch.long)}
    for r, e in enumerate(examples):
        n = len(e.ids)
        out["input_ids"][r, :n] = torch.tensor(e.ids)
        out["attention_mask"][r, :n] = 1
        out["token_type_ids"][r, :n] = torch.tensor(e.token_type_ids)
        out["word_ids"][r, :n] = torch.tensor(e.word_ids)
    return out


@dataclass
class EncoderCollate:
    """`collate(chunk, seed) -> EncoderBatch` for `ExampleLoader(..., seeded_collate=True)`: pads, masks
    for MLM when `mlm_probability` > 0 (whole words with `whole_word`), and carries the NSP/SOP
    labels when the examples have them."""

    vocab: EncoderVocab
    mlm_probability: float = 0.15
    whole_word: bool = False
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __call__(self, chunk: list[EncoderExample], seed: int = 0) -> EncoderBatch:
        padded = pad_examples(chunk, self.vocab.pad_id)
        input_ids, labels = padded["input_ids"], None
        if self.mlm_probability > 0:
            generator = torch.Generator().manual_seed(seed)
            input_ids, labels = mask_tokens(
                input_ids, self.vocab, generator=generator, mlm_probability=self.mlm_probability,
                mask_fraction=self.mask_fraction, random_fraction=self.random_fraction,
                word_ids=padded["word_ids"] if self.whole_word else None, sources=[e.source for e in chunk])
        sentence_labels = None
        if chunk[0].sentence_label is not None:
            sentence_labels = torch.tensor([e.sentence_label for e in chunk], dtype=torch.long)
        return EncoderBatch(input_ids, padded["attention_mask"], padded["token_type_ids"], len(chunk), labels,
                            sentence_labels, seed)


# ----------------------------------------------------------------------------- contrastive pairs


@dataclass
class ContrastivePair:
    """An anchor and its positive, each `[CLS] text [SEP]` (SimCSE: the same ids twice)."""

    anchor_ids: list[int]
    positive_ids: list[int]
    source: str


def read_contrastive(spec, tokenizer, vocab: EncoderVocab, *, max_len: int, supervised: bool,
                     anchor_column: str = "anchor", positive_column: str = "positive",
                     text_column: str = "text", text_mode: str = "line") -> list[ContrastivePair]:
    """Supervised pairs (`anchor`, `positive` columns) or SimCSE rows (`text`, its own positive).
    A supervised row without its second text is an error naming file:line and the column."""
    out = []
    for rec in iter_records(spec, text_mode=text_mode):
        if supervised:
            anchor = _text(rec, anchor_column, f"a supervised pair needs '{anchor_column}' and '{positive_column}'")
            positive = _text(rec, positive_column,
                             f"a supervised pair needs '{anchor_column}' and '{positive_column}'")
        else:
            anchor = positive = _text(rec, text_column, "unsupervised (SimCSE) rows are one text each")
        a = frame(vocab, _pieces(tokenizer, anchor), max_len=max_len, source=rec.source)
        p = frame(vocab, _pieces(tokenizer, positive), max_len=max_len, source=rec.source) if supervised else a
        for example, column in ((a, anchor_column if supervised else text_column), (p, positive_column)):
            if len(example.ids) <= 2:
                raise TemperError(f"{rec.source}: column '{column}' has no tokens; drop the row")
        out.append(ContrastivePair(a.ids, p.ids, rec.source))
    if not out:
        raise TemperError(f"{spec}: no contrastive rows")
    return out


@dataclass
class ContrastiveBatch:
    """B pairs as 2B right-padded rows, the B anchors then the B positives: `input_ids` and
    `attention_mask` (2B, T); `duplicate_mask` (B, B) True where pair j must not be a negative
    of anchor i (they share a text; never on the diagonal); `seed` the batch's (as `EncoderBatch.seed`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    duplicate_mask: torch.Tensor
    num_pairs: int
    seed: int = 0

    def to(self, device) -> ContrastiveBatch:
        return ContrastiveBatch(self.input_ids.to(device), self.attention_mask.to(device),
                                self.duplicate_mask.to(device), self.num_pairs, self.seed)


def duplicate_mask(anchors: Sequence[Sequence[int]], positives: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, B) bool: True at (i, j), i != j, when {anchor_i, positive_i} and {anchor_j, positive_j}
    share a text (compared as token ids)."""
    texts = [{tuple(a), tuple(p)} for a, p in zip(anchors, positives)]
    B = len(texts)
    mask = torch.zeros((B, B), dtype=torch.bool)
    for i in range(B):
        for j in range(i + 1, B):
            if texts[i] & texts[j]:
                mask[i, j] = mask[j, i] = True
    return mask


def collate_contrastive(chunk: list[ContrastivePair], pad_id: int, seed: int = 0) -> ContrastiveBatch:
    rows = [p.anchor_ids for p in chunk] + [p.positive_ids for p in chunk]
    T = max(map(len, rows))
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention_mask[r, :len(ids)] = 1
    return ContrastiveBatch(input_ids, attention_mask,
                            duplicate_mask([p.anchor_ids for p in chunk], [p.positive_ids for p in chunk]), len(chunk),
                            seed)


# ----------------------------------------------------------------------------- labelled examples (fine-tuning)

CLASSIFY_TASKS = ("classify", "tokens")


@dataclass
class LabelledExample:
    """`[CLS] text [SEP]` and its label: a class id (sequence classification) or one id per token,
    -100 on [CLS]/[SEP] and on every word piece but a word's first (token classification, as
    transformers' token-classification examples align word labels)."""

    ids: list[int]
    label: int | list[int]
    source: str


def _label_id(value, names: dict[str, int] | None, record, column: str) -> tuple[str, int | None]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TemperError(f"{record.source}: column '{column}' holds {json_type(value)} (expected a label: a string "
                          "or an integer)")
    key = str(value)
    if names is None:
        return key, None
    if key not in names:
        raise TemperError(f"{record.source}: label {key!r} in column '{column}' is not among the training labels "
                          f"({', '.join(names)})")
    return key, names[key]


def read_labelled(spec, tokenizer, vocab: EncoderVocab, *, task: str, max_len: int,
                  label_names: Sequence[str] | None = None, text_column: str = "text", label_column: str = "label",
                  tokens_column: str = "tokens", tags_column: str = "tags") -> tuple[list[LabelledExample], list[str]]:
    """(examples, label names) of `classify` rows (`text`, `label`) or `tokens` rows (`tokens`: a list of
    words, `tags`: a label per word). Without `label_names` they are the labels found, sorted (ids in
    that order); with them (the training set's), a label outside them is an error naming the row."""
    if task not in CLASSIFY_TASKS:
        raise TemperError(f"task must be one of {', '.join(CLASSIFY_TASKS)}, got {task!r}")
    records = list(iter_records(spec, text_mode="line"))
    if not records:
        raise TemperError(f"{spec}: no rows")
    raw = []
    for rec in records:
        if task == "classify":
            text = _text(rec, text_column, f"sequence classification reads '{text_column}' and '{label_column}'")
            if label_column not in rec.data:
                raise TemperError(f"{rec.source}: column '{label_column}' is missing (sequence classification reads "
                                  f"'{text_column}' and '{label_column}')")
            raw.append((rec, text, [_label_id(rec.data[label_column], None, rec, label_column)[0]]))
        else:
            words, tags = rec.data.get(tokens_column), rec.data.get(tags_column)
            for value, column in ((words, tokens_column), (tags, tags_column)):
                if not isinstance(value, list) or not value:
                    raise TemperError(f"{rec.source}: column '{column}' is {json_type(value) if value is not None else 'missing'} "
                                      f"(token classification reads '{tokens_column}' and '{tags_column}': lists of "
                                      "the same length)")
            if len(words) != len(tags):
                raise TemperError(f"{rec.source}: '{tokens_column}' has {len(words)} words but '{tags_column}' "
                                  f"{len(tags)} tags")
            if not all(isinstance(w, str) for w in words):
                raise TemperError(f"{rec.source}: column '{tokens_column}' must be a list of strings")
            raw.append((rec, words, [_label_id(t, None, rec, tags_column)[0] for t in tags]))
    names = list(label_names) if label_names is not None else sorted({k for _, _, keys in raw for k in keys})
    index = {name: i for i, name in enumerate(names)}
    out = []
    for rec, content, keys in raw:
        column = label_column if task == "classify" else tags_column
        ids_of = [_label_id(k, index, rec, column)[1] for k in keys]
        if task == "classify":
            example = frame(vocab, _pieces(tokenizer, content), max_len=max_len, source=rec.source)
            out.append(LabelledExample(example.ids, ids_of[0], rec.source))
            continue
        enc = tokenizer.backend.encode(content, is_pretokenized=True, add_special_tokens=False)
        word_ids = [-1 if w is None else w for w in enc.word_ids]
        example = frame(vocab, (list(enc.ids), word_ids), max_len=max_len, source=rec.source)
        labels, previous = [], None
        for w in example.word_ids:  # the first piece of each word carries its tag
            labels.append(ids_of[w] if w >= 0 and w != previous else IGNORE_INDEX)
            previous = w if w >= 0 else previous
        if all(x == IGNORE_INDEX for x in labels):
            raise TemperError(f"{rec.source}: no word of '{tokens_column}' is left after tokenizing (cut at "
                              f"max_len={max_len}, or only unknown characters)")
        out.append(LabelledExample(example.ids, labels, rec.source))
    return out, names


@dataclass
class LabelledBatch:
    """`input_ids`, `attention_mask` (B, T); `labels` (B,) or (B, T) with -100 where none."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    seed: int = 0  # the batch's (ExampleLoader's `batch_seed`): its dropout masks on any number of ranks

    def to(self, device) -> LabelledBatch:
        return LabelledBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                             self.seed)


def collate_labelled(chunk: list[LabelledExample], pad_id: int, seed: int = 0) -> LabelledBatch:
    padded = pad_examples([EncoderExample(e.ids, [0] * len(e.ids), [-1] * len(e.ids), e.source) for e in chunk],
                          pad_id)
    if isinstance(chunk[0].label, int):
        labels = torch.tensor([e.label for e in chunk], dtype=torch.long)
    else:
        labels = torch.full(padded["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
        for r, e in enumerate(chunk):
            labels[r, :len(e.label)] = torch.tensor(e.label)
    return LabelledBatch(padded["input_ids"], padded["attention_mask"], labels, seed)


__all__ = [
    "CLASSIFY_TASKS", "LabelledBatch", "LabelledExample", "collate_labelled", "read_labelled",
    "ContrastiveBatch", "ContrastivePair", "EncoderBatch", "EncoderCollate", "EncoderExample", "EncoderVocab",
    "IS_NEXT", "NOT_NEXT", "SENTENCE_TASKS", "collate_contrastive", "duplicate_mask", "frame", "mask_tokens",
    "pad_examples", "read_contrastive", "read_documents", "read_texts", "sentence_pairs", "split_segments",
    "truncate_longest_first",
]
