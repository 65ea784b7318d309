"""Tokenizers through Hugging Face `tokenizers`: byte-level BPE for decoders, WordPiece for encoders.

`train_tokenizer` learns a byte-level BPE vocabulary (GPT-2 style: every byte is a
token, so any text encodes, and no automatic BOS/EOS is added). `train_wordpiece` learns a
BERT-style WordPiece vocabulary with [PAD] [UNK] [CLS] [SEP] [MASK] (BERT's normaliser and
pre-tokeniser, `##` continuations, `[CLS] A [SEP] B [SEP]` as the post-processor that
transformers applies; temper's own `encode` adds nothing, the encoder data code builds the
frame). `Tokenizer` wraps any
`tokenizer.json` plus its `tokenizer_config.json` (special tokens, chat template; the
template may also be in `chat_template.jinja`, see `temper.data.templates.read_chat_template`) and
saves both so that `transformers.AutoTokenizer.from_pretrained(dir)` encodes the same.

The trainer's pre-tokeniser needs ~80 bytes of memory per character of one input (a 48 MB
one-line document took 3.9 GB), so a text longer than `TRAIN_PIECE_CHARS` is handed to it in
pieces cut before a whitespace that follows a non-space, where the byte-level pre-tokeniser
splits anyway: the words counted, and so the vocabulary learnt, are those of the whole text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from temper.data.templates import CHATML_TEMPLATE, read_chat_template
from temper.errors import TemperError, TemperFileNotFoundError
from temper.io import atomic_path, atomic_write_text

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Special tokens of a temper-trained tokenizer: BOS/EOS/PAD, ChatML's turn markers and
# the chat roles (so role names are one token each and cannot be split by BPE).
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END, "<|system|>", "<|user|>", "<|assistant|>"]
# An encoder's special tokens (BERT's names and roles, in the order of their ids).
WORDPIECE_SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                            "mask_token": "[MASK]"}
TRAIN_PIECE_CHARS = 1 << 17  # a longer text reaches the BPE trainer in pieces of about this many characters
_CUT_SEARCH = 8192  # how far back from a piece's end a cut before whitespace is looked for
_BEFORE_SPACE = re.compile(r"\S(?=\s)")


def check_vocab_size(key: str, vocab_size: int) -> None:
    """A vocabulary size the tokenizer trainer can take (see MAX_VOCAB_SIZE), or one line naming `key`."""
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise TemperError(f"{key} must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE:,}] (every byte and the special "
                          f"tokens; the tokenizer trainer reserves memory for every token up front), got {vocab_size:,}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template of its model."""

    def __init__(self, backend: HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 model_max_length: int | None = None, extra_config: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.extra_config = extra_config or {}
        for tok in (bos_token, eos_token, pad_token):
            if tok is not None and backend.token_to_id(tok) is None:
                raise TemperError(f"special token {tok!r} is not in the tokenizer's vocabulary")

    # -- ids
    def fingerprint(self) -> str:
        """A short hash of the whole tokenizer (vocabulary, merges, special tokens): what a
        checkpoint records to refuse being resumed with another tokenizer."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """The padding id; falls back to EOS, as most causal LMs do."""
        pad = self.token_id(self.pad_token)
        return pad if pad is not None else self.eos_id

    def special_token(self, role: str) -> str | None:
        """The token of a role other than BOS/EOS/PAD, from tokenizer_config.json (`cls_token`,
        `sep_token`, `mask_token`, `unk_token`), or None when the config names none."""
        value = self.extra_config.get(role)
        return value.get("content") if isinstance(value, dict) else value

    @property
    def cls_id(self) -> int | None:
        return self.token_id(self.special_token("cls_token"))

    @property
    def sep_id(self) -> int | None:
        return self.token_id(self.special_token("sep_token"))

    @property
    def mask_id(self) -> int | None:
        return self.token_id(self.special_token("mask_token"))

    @property
    def special_ids(self) -> list[int]:
        """Every special token's id (the added tokens marked special, and the named roles), sorted."""
        ids = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        roles = [self.bos_token, self.eos_token, self.pad_token, *map(self.special_token, WORDPIECE_SPECIAL_TOKENS)]
        ids.update(i for i in map(self.token_id, roles) if i is not None)
        return sorted(ids)

    # -- text
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_byte_lengths(self, *, at_start: bool = False) -> list[int]:
        """UTF-8 bytes of text each token stands for (0 for special tokens): for bits per byte.

        Byte-level BPE (a ByteLevel decoder): one symbol per byte. Other tokenizers (SentencePiece
        style, `▁word` pieces with a Metaspace or Replace decoder; WordPiece): the bytes a token adds
        to a decoded text after another token, len(decode([i, i])) - len(decode([i])), so `▁word`
        counts its space (decoding one token alone drops a leading space); a byte-fallback piece
        `<0xNN>` is one byte.

        `at_start`: the bytes as the first token of a text. A tokenizer that puts a dummy space in
        front of every text (SentencePiece's add_dummy_prefix, Metaspace's prepend_scheme
        first/always, ByteLevel's add_prefix_space) makes a text's first token carry a space that
        stands for no byte of the text: there the decoder's first-token form counts (decode([i]),
        or a byte-level piece without its leading "Ġ"). Otherwise the same lengths as mid-text.
        """
        spec = json.loads(self.backend.to_str())
        byte_level = '"ByteLevel"' in json.dumps(spec.get("decoder"))
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        pieces = [self.backend.id_to_token(i) for i in range(self.vocab_size)]
        lengths: list = []
        for piece in pieces:
            if piece is None or piece in special:
                lengths.append(0)
            elif byte_level and all(ch in byte_of for ch in piece):  # one symbol per byte
                lengths.append(len(piece))
            elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                lengths.append(1)
            else:
                lengths.append(None)  # decoded below, all at once
        todo = [i for i, n in enumerate(lengths) if n is None]
        alone = self.backend.decode_batch([[i] for i in todo], skip_special_tokens=False)
        twice = self.backend.decode_batch([[i, i] for i in todo], skip_special_tokens=False)
        for i, one, two in zip(todo, alone, twice):
            lengths[i] = len(two.encode("utf-8")) - len(one.encode("utf-8"))
        probe = self.backend.encode("a", add_special_tokens=False).ids
        if not at_start or sum(lengths[i] for i in probe) <= 1:  # no dummy prefix: the same everywhere
            return lengths
        first = list(lengths)
        for i, one in zip(todo, alone):
            first[i] = len(one.encode("utf-8"))
        if byte_level:
            space = _bytes_to_unicode()[ord(" ")]
            for i, piece in enumerate(pieces):
                if first[i] and piece.startswith(space) and all(ch in byte_of for ch in piece):
                    first[i] -= 1
        return first

    # -- files
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json" if path.is_dir() else path
        if not tok_file.is_file():
            raise TemperFileNotFoundError(
                f"{path}: no tokenizer.json (train one with `temper tokenizer`, or copy the model's)"
            )
        try:
            backend = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise TemperError(f"{tok_file}: not a valid tokenizer.json ({e})") from None
        cfg: dict[str, Any] = {}
        cfg_file = tok_file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TemperError(f"{cfg_file}:{e.lineno}: not valid JSON ({e.msg})") from None

        def token(key: str) -> str | None:
            value = cfg.get(key)
            return value.get("content") if isinstance(value, dict) else value

        template = read_chat_template(tok_file.parent)  # chat_template.jinja or the config's entry
        known = {"bos_token", "eos_token", "pad_token", "chat_template", "model_max_length"}
        return cls(backend, bos_token=token("bos_token"), eos_token=token("eos_token"),
                   pad_token=token("pad_token"), chat_template=template,
                   model_max_length=cfg.get("model_max_length"),
                   extra_config={k: v for k, v in cfg.items() if k not in known})

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "tokenizer.json") as tmp:  # whole or not at all; a full disk in one line
            self.backend.save(str(tmp))
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.extra_config}
        cfg.update(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token,
                   clean_up_tokenization_spaces=False)
        if self.model_max_length:
            cfg["model_max_length"] = self.model_max_length
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        stale = out / "chat_template.jinja"  # it would take precedence over the config's entry
        if stale.is_file():
            if self.chat_template:
                atomic_write_text(stale, self.chat_template)
            else:
                stale.unlink()
        sp = {k: getattr(self, k) for k in ("bos_token", "eos_token", "pad_token") if getattr(self, k)}
        sp.update({role: token for role in WORDPIECE_SPECIAL_TOKENS if role not in sp
                   and (token := self.special_token(role))})
        atomic_write_text(out / "special_tokens_map.json", json.dumps(sp, indent=2) + "\n")


def tokenizer_difference(a: str | Path | Tokenizer, b: str | Path | Tokenizer,
                         names: tuple[str, str] = ("the first's", "the second's")) -> str | None:
    """What differs between two tokenizers in what decides the ids, or None: the vocabulary (token by
    token), the BPE merges, the normaliser and pre-tokeniser, and for loaded tokenizers the
    BOS/EOS/PAD tokens. `a` and `b` are `tokenizer.json` files or `Tokenizer`s; `names` say whose
    each is in the message ("the adapter's", "the base's")."""
    ja, jb = _tokenizer_json(a), _tokenizer_json(b)
    va, vb = _id_to_token(ja), _id_to_token(jb)
    if len(va) != len(vb):
        return f"{len(va)} tokens vs {len(vb)}"
    for i in sorted(va):
        if va[i] != vb.get(i):
            return f"token {i} is {va[i]!r} in {names[0]}, {vb.get(i)!r} in {names[1]}"
    if _merges(ja) != _merges(jb):
        return "the same tokens but different BPE merges"
    for part in ("normalizer", "pre_tokenizer"):
        if ja.get(part) != jb.get(part):
            return f"a different {part}"
    if isinstance(a, Tokenizer) and isinstance(b, Tokenizer):
        for role in ("bos_token", "eos_token", "pad_token"):
            if getattr(a, role) != getattr(b, role):
                return f"{role} is {getattr(a, role)!r} in {names[0]}, {getattr(b, role)!r} in {names[1]}"
    return None


def _tokenizer_json(t: str | Path | Tokenizer) -> dict:
    if isinstance(t, Tokenizer):
        return json.loads(t.backend.to_str())
    try:
        return json.loads(Path(t).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TemperError(f"{t}:{e.lineno}: not valid JSON ({e.msg})") from None


def _id_to_token(tok: dict) -> dict[int, str]:
    model = tok.get("model") or {}
    vocab = model.get("vocab") or {}
    ids = {i: t for t, i in vocab.items()} if isinstance(vocab, dict) else {
        i: (t[0] if isinstance(t, list) else t) for i, t in enumerate(vocab)}  # Unigram: [piece, score]
    ids.update({t["id"]: t["content"] for t in tok.get("added_tokens") or [] if "id" in t and "content" in t})
    return ids


def _merges(tok: dict) -> list[str]:
    return [" ".join(m) if isinstance(m, list) else m for m in (tok.get("model") or {}).get("merges") or []]


# The trainer (tokenizers' BpeTrainer) reserves its tables for `vocab_size` tokens before it reads a merge:
# a HashMap<String, u32> and a Vec<String> with that capacity, about 33 bytes x the power of two above 8/7 of
# vocab_size plus 24 bytes x vocab_size. Its ids are u32 (at most 2**32 tokens), but memory runs out long
# before: 10**9 asks for one 71 GB block at once and a refused allocation aborts the process (exit 134,
# no Python error). 2**24 reserves ~1.5 GB, 64 times the largest vocabularies in use (262,144).
MAX_VOCAB_SIZE = 2**24
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus temper's special tokens


def text_pieces(text: str, max_chars: int = 0) -> Iterable[str]:
    """`text` in pieces of at most `max_chars` (default `TRAIN_PIECE_CHARS`) characters, each cut (where it
    can be) just before a whitespace that follows a non-space character, where byte-level pre-tokenisers split."""
    max_chars = max_chars or TRAIN_PIECE_CHARS
    start = 0
    while len(text) - start > max_chars:
        target = start + max_chars
        cuts = [m.end() for m in _BEFORE_SPACE.finditer(text, max(start + 1, target - _CUT_SEARCH), target)]
        cut = cuts[-1] if cuts else target
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2,
                    special_tokens: Sequence[str] = SPECIAL_TOKENS, model_max_length: int | None = None,
                    show_progress: bool = False) -> Tokenizer:
    """Learn a byte-level BPE vocabulary of `vocab_size` tokens (specials included)."""
    if vocab_size < 256 + len(special_tokens):
        raise TemperError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 256 bytes "
            f"+ {len(special_tokens)} special tokens = {256 + len(special_tokens)}"
        )
    check_vocab_size("vocab_size", vocab_size)
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    seen = 0

    def counted() -> Iterable[str]:
        nonlocal seen
        for t in texts:
            seen += 1
            yield from text_pieces(t)

    backend.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise TemperError("no text to train the tokenizer on: the data is empty")
    specials = set(special_tokens)
    return Tokenizer(
        backend,
        bos_token=BOS if BOS in specials else None,
        eos_token=EOS if EOS in specials else None,
        pad_token=PAD if PAD in specials else None,
        chat_template=CHATML_TEMPLATE if {IM_START, IM_END} <= specials else None,
        model_max_length=model_max_length,
    )


def train_wordpiece(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2, lowercase: bool = True,
                    model_max_length: int | None = 512, show_progress: bool = False) -> Tokenizer:
    """Learn a BERT-style WordPiece vocabulary of at most `vocab_size` tokens, the five
    `WORDPIECE_SPECIAL_TOKENS` first ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4).

    Saved, it is what `transformers.BertTokenizerFast` / `AutoTokenizer` read: BERT's normaliser
    (lower-casing and accent stripping with `lowercase`) and pre-tokeniser, `##` continuations,
    and the `[CLS] A [SEP] B [SEP]` post-processor with token types 0 / 1."""
    specials = list(WORDPIECE_SPECIAL_TOKENS.values())
    if not len(specials) < vocab_size <= MAX_VOCAB_SIZE:
        raise TemperError(f"vocab_size must be in [{len(specials) + 1}, {MAX_VOCAB_SIZE:,}] (the {len(specials)} "
                          f"special tokens and at least one more), got {vocab_size:,}")
    backend = HFTokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIAL_TOKENS["unk_token"]))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                        continuing_subword_prefix="##", show_progress=show_progress)
    seen = 0

    def counted() -> Iterable[str]:
        nonlocal seen
        for t in texts:
            seen += 1
            yield from text_pieces(t)  # cut before whitespace, where BERT's pre-tokeniser splits too

    backend.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise TemperError("no text to train the tokenizer on: the data is empty")
    cls, sep = WORDPIECE_SPECIAL_TOKENS["cls_token"], WORDPIECE_SPECIAL_TOKENS["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])
    roles = {role: token for role, token in WORDPIECE_SPECIAL_TOKENS.items() if role != "pad_token"}
    return Tokenizer(backend, pad_token=WORDPIECE_SPECIAL_TOKENS["pad_token"], model_max_length=model_max_length,
                     extra_config={"tokenizer_class": "BertTokenizerFast", "do_lower_case": lowercase, **roles})


def cached_tokenizer(directory: str | Path, key: str, train: Callable[[], Tokenizer]) -> Tokenizer:
    """The tokenizer saved in `directory` when it was trained for the same `key` (a fingerprint of
    the data and settings), else `train()`'s, saved there with the key. A resumed run then gets
    the very tokenizer it started with (WordPiece training is not reproducible bit for bit)."""
    directory = Path(directory)
    stamp = directory / "fingerprint.txt"
    if stamp.is_file() and stamp.read_text() == key:
        return Tokenizer.from_dir(directory)
    tokenizer = train()
    tokenizer.save(directory)
    atomic_write_text(stamp, key)
    return tokenizer
