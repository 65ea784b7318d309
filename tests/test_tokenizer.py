import functools

import pytest
from conftest import SAMPLE_TEXT, shared_file
from hypothesis import given, settings
from hypothesis import strategies as st

from temper.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from temper.errors import TemperError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save(path)
    return path, transformers.AutoTokenizer.from_pretrained(path)


CASES = [
    "Alice lives in Paris.",
    "  leading spaces and trailing  ",
    "ünïcödé, 漢字 and 😀 emoji",
    "special <|eos|> and <|im_start|>user inside text",
    "",
    "line one\nline two\r\n\ttab",
]


@pytest.mark.parametrize("text", CASES)
def test_transformers_encodes_identically(saved, tiny_tokenizer, text):
    _, hf = saved
    assert hf.encode(text, add_special_tokens=True) == tiny_tokenizer.encode(text)
    assert hf.decode(tiny_tokenizer.encode(text)) == tiny_tokenizer.decode(tiny_tokenizer.encode(text))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_property_identical_and_lossless(saved, tiny_tokenizer, text):
    _, hf = saved
    ids = tiny_tokenizer.encode(text)
    assert hf.encode(text, add_special_tokens=True) == ids
    if not any(tok in text for tok in SPECIAL_TOKENS):
        assert tiny_tokenizer.decode(ids) == text  # byte-level: every string survives


def test_special_tokens_and_chat_template_survive(saved, tiny_tokenizer):
    path, hf = saved
    assert hf.eos_token == "<|eos|>" and hf.eos_token_id == tiny_tokenizer.eos_id
    assert hf.bos_token_id == tiny_tokenizer.bos_id and hf.pad_token_id == tiny_tokenizer.pad_id
    for tok in SPECIAL_TOKENS:
        assert len(tiny_tokenizer.encode(tok)) == 1
    again = Tokenizer.from_dir(path)
    assert again.chat_template == tiny_tokenizer.chat_template
    rendered = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_vocab_size_is_reached_on_real_text():
    path = shared_file("tinyshakespeare.txt")
    from itertools import islice

    from temper.data.readers import iter_texts

    tok = train_tokenizer(islice(iter_texts(path), 2000), vocab_size=600)
    assert tok.vocab_size == 600
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode()) * 0.7  # merges compress


def test_too_small_vocab_and_empty_data():
    with pytest.raises(TemperError, match="vocab_size 100 is too small"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(TemperError, match="the data is empty"):
        train_tokenizer([], vocab_size=300)


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TemperError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_sample_text_roundtrip(tiny_tokenizer):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(SAMPLE_TEXT)) == SAMPLE_TEXT


# ----------------------------------------------------------------------------- bytes per token (val_bpb)


def _sentencepiece_style(style: str) -> Tokenizer:
    """A small SentencePiece-style BPE (`▁word` pieces, byte fallback `<0xNN>`), trained here:
    `metaspace` (Metaspace pre-tokenizer and decoder, prepend_scheme first), `never` (no dummy
    prefix) or `llama2` (the Llama-2 tokenizer.json: Prepend/Replace normalizer, Replace,
    ByteFallback, Fuse, Strip decoder)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    scheme = "never" if style == "never" else "first"
    backend = HFTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    backend.train_from_iterator(SAMPLE_TEXT.split("\n\n"),
                                trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(backend.to_str())
    for b in range(256):  # SentencePiece's byte fallback: every byte has a piece
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    backend = HFTokenizer.from_str(json.dumps(spec))
    if style == "llama2":
        backend.pre_tokenizer = None
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    else:
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme=scheme)])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


def _counted_bytes(tokenizer: Tokenizer, ids: list[int]) -> int:
    """A text's bytes as val_bpb counts them: its first token (after BOS) at the start of a text,
    the rest mid-text."""
    first, rest = tokenizer.token_byte_lengths(at_start=True), tokenizer.token_byte_lengths()
    start = 1 if ids[:1] == [tokenizer.bos_id] else 0
    return first[ids[start]] + sum(rest[i] for i in ids[start + 1:]) + sum(rest[i] for i in ids[:start]) \
        if ids[start:] else 0


@pytest.mark.parametrize("style", ["metaspace", "never", "llama2"])
def test_sentencepiece_style_token_bytes_sum_to_the_text_bytes(style):
    """A `▁word` piece counts its space, a `<0xNN>` piece one byte, special tokens none; the dummy
    space a tokenizer puts in front of a text counts nothing. Decoding a piece alone drops its
    leading space: counted that way, every word after the first lost a byte."""
    tokenizer = _sentencepiece_style(style)
    lengths = tokenizer.token_byte_lengths()
    assert lengths[tokenizer.backend.token_to_id("<0x41>")] == 1 and lengths[tokenizer.eos_id] == 0
    word = next(p for p in tokenizer.backend.get_vocab() if p.startswith("▁") and len(p) > 2)
    assert lengths[tokenizer.backend.token_to_id(word)] == len(word.replace("▁", " ").encode())
    for text in ["Alice lives in Paris. Bob lives in Rome;  his dog is Rex.", "Ünïcödé, 漢字 and 😀\temoji",
                 "Zebra quux: unseen letters go through byte fallback", SAMPLE_TEXT.split("\n\n")[2]]:
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert any(tokenizer.backend.id_to_token(i).startswith("▁") for i in ids)
        assert _counted_bytes(tokenizer, tokenizer.encode(text)) == len(text.encode("utf-8"))
        assert _counted_bytes(tokenizer, ids) == len(text.encode("utf-8"))  # BOS, EOS: 0 bytes
    same = tokenizer.token_byte_lengths(at_start=True) == lengths
    assert same == (style == "never")  # a dummy prefix only where the tokenizer adds one


@functools.cache
def _bytes_tokenizers() -> list[Tokenizer]:
    return [_sentencepiece_style("metaspace"), _sentencepiece_style("llama2"),
            train_tokenizer(SAMPLE_TEXT.split("\n\n"), vocab_size=300, min_frequency=2)]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_property_token_bytes_sum_to_the_text_bytes(text):
    """Every text a tokenizer gives back whole (one that starts with a space does not come back
    from a dummy-prefix tokenizer: the decoder drops it) is counted at its UTF-8 length: byte-level
    BPE, SentencePiece style with Metaspace, and Llama-2's tokenizer.json."""
    for tokenizer in _bytes_tokenizers():
        ids = tokenizer.encode(text)
        specials = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values()]
        if tokenizer.decode(ids) == text and not any(t in text for t in specials):
            assert _counted_bytes(tokenizer, ids) == len(text.encode("utf-8"))
