import pytest
from conftest import shared_file

from temper.data.readers import expand_paths, iter_records, iter_texts
from temper.errors import TemperError


def test_jsonl_malformed_line_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(TemperError, match=r"d.jsonl:3: not valid JSON"):
        list(iter_texts(f))


def test_jsonl_missing_field_lists_keys(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"question": "q", "answer": "a"}\n')
    with pytest.raises(TemperError, match=r"d.jsonl:2: field 'text' is missing \(keys: question, answer\)"):
        list(iter_texts(f))


def test_non_utf8_reports_byte_offset_or_replaces(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"hello\nwor\xe9ld\n")
    with pytest.raises(TemperError, match=r"latin1.txt: not UTF-8 at byte offset 9"):
        list(iter_texts(f))
    assert list(iter_texts(f, encoding_errors="replace")) == ["hello\nwor\ufffdld"]


def test_text_modes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a\nb\n\n\nc\n")
    assert list(iter_texts(f)) == ["a\nb", "c"]
    assert list(iter_texts(f, text_mode="line")) == ["a", "b", "c"]
    assert list(iter_texts(f, text_mode="file")) == ["a\nb\n\n\nc\n"]


def test_directories_globs_and_sources(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("one\n")
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n')
    assert sorted(iter_texts(tmp_path)) == ["one", "two"]
    assert list(iter_texts(str(tmp_path / "*.jsonl"))) == ["two"]
    rec = next(iter(iter_records(tmp_path / "b.jsonl")))
    assert rec.source.endswith("b.jsonl:1")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_paths(str(tmp_path / "*.parquet"))
    with pytest.raises(TemperError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b")
        expand_paths(tmp_path / "x.csv")


def test_real_jsonl_reads():
    gsm = shared_file("gsm8k", "test.jsonl")
    questions = list(iter_texts(gsm, field="question"))
    assert len(questions) == 1319 and all(q.strip() for q in questions)


def test_parquet_rows_and_missing_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc"], "id": [1, 2]}), path)
    assert list(iter_texts(path)) == ["first doc", "second doc"]
    with pytest.raises(TemperError, match=r"d.parquet:row 1: field 'body' is missing"):
        list(iter_texts(path, field="body"))
