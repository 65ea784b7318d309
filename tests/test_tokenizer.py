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
