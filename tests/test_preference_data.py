"""Preference data for the DPO family and KTO: formats, tokens, bad rows, batches."""

import gzip
import json

import pytest
import torch
from conftest import assert_reorder_close, decoder_lengths, shared_file

from temper.data.chat import BUILTIN_TEMPLATES
from temper.data.preference import (
    EncodedPair,
    EncodedUnpaired,
    PreferenceLoader,
    PreferenceStats,
    collate_pairs,
    encode_pairs,
    encode_unpaired,
    load_preferences,
    preference_fingerprint,
    read_preferences,
    read_unpaired,
    split_implicit_prompt,
)
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.losses import IGNORE_INDEX

CHATML = BUILTIN_TEMPLATES["chatml"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def only(pairs_or_examples):
    assert len(pairs_or_examples) == 1
    return pairs_or_examples[0]


# ----------------------------------------------------------------------------- formats, exact ids


def test_explicit_string_rows_use_the_text_as_is_with_eos(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 3 + 4?", "chosen": " 7", "rejected": " 8"}])
    pairs, stats = read_preferences(f)
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("Q: 3 + 4?", " 7", " 8")
    enc = only(encode_pairs(pairs, tok, CHATML, max_len=64, stats=stats)[0])  # no template for text rows
    assert enc.prompt_ids == tok.encode("Q: 3 + 4?")  # the temper tokenizer adds no BOS
    assert enc.chosen_ids == tok.encode(" 7") + [tok.eos_id]
    assert enc.rejected_ids == tok.encode(" 8") + [tok.eos_id]
    assert enc.prompt_ids + enc.chosen_ids == tok.encode("Q: 3 + 4? 7", add_eos=True)
    assert "<|im_start|>" not in tok.decode(enc.prompt_ids)
    assert stats.pairs == 1 and stats.rows == 1 and not stats.skipped


def test_string_prompts_get_the_bos_the_tokenizer_adds(tiny_tokenizer):
    """A Llama-style tokenizer.json adds BOS in front of every text: a string prompt starts with it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing

    backend = HFTokenizer.from_str(tiny_tokenizer.backend.to_str())
    bos = tiny_tokenizer.bos_token
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tiny_tokenizer.bos_id)])
    tok = Tokenizer(backend, bos_token=bos, eos_token=tiny_tokenizer.eos_token, pad_token=tiny_tokenizer.pad_token)
    pairs, _ = read_preferences_rows([{"prompt": "Q: 3 + 4?", "chosen": " 7", "rejected": " 8"}])
    enc = only(encode_pairs(pairs, tok, None, max_len=64)[0])
    assert enc.prompt_ids == [tok.bos_id, *tiny_tokenizer.encode("Q: 3 + 4?")]
    assert enc.chosen_ids == tiny_tokenizer.encode(" 7") + [tok.eos_id]


def read_preferences_rows(rows, tmp=None, **kw):
    import tempfile
    from pathlib import Path

    folder = Path(tmp or tempfile.mkdtemp())
    return read_preferences(write_jsonl(folder / "rows.jsonl", rows), **kw)


def test_explicit_message_rows_go_through_the_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    row = {"prompt": [user("Hi there")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}
    pairs, _ = read_preferences_rows([row])
    enc = only(encode_pairs(pairs, tok, CHATML, max_len=64)[0])
    assert enc.prompt_ids == tok.encode("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert enc.chosen_ids == tok.encode("Hello!<|im_end|>\n")  # the template's end of turn, no extra EOS
    assert enc.rejected_ids == tok.encode("Go away.<|im_end|>\n")
    # strings mixed with messages are a user prompt and assistant answers, as in SFT
    mixed, _ = read_preferences_rows([{"prompt": "Hi there", "chosen": [assistant("Hello!")], "rejected": "Go away."}])
    assert encode_pairs(mixed, tok, CHATML, max_len=64)[0] == [EncodedPair(**{**enc.__dict__,
                                                                             "source": mixed[0].source})]
    # a system column is put in front of a conversational prompt, as in SFT
    sys_pairs, _ = read_preferences_rows([{**row, "system": "Be brief."}])
    assert sys_pairs[0].prompt[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(TemperError, match="needs a chat template"):
        encode_pairs(pairs, tok, None, max_len=64)


def test_implicit_string_prompt_ends_at_the_assistant_turn(tiny_tokenizer):
    chosen = "\n\nHuman: Hi\n\nAssistant: I can help."
    rejected = "\n\nHuman: Hi\n\nAssistant: I won't."
    assert split_implicit_prompt(chosen, rejected) == ("\n\nHuman: Hi\n\nAssistant:", " I can help.", " I won't.")
    # TRL's extract_prompt to the letter: the common prefix, its trailing space handed to the answers
    assert split_implicit_prompt(chosen, rejected, "common_prefix") == (
        "\n\nHuman: Hi\n\nAssistant: I", " can help.", " won't.")
    # no turn marker: TRL's documented example, under both rules
    for rule in ("turn", "common_prefix"):
        assert split_implicit_prompt("The sky is blue.", "The sky is green.", rule) == ("The sky is", " blue.",
                                                                                        " green.")
    pairs, _ = read_preferences_rows([{"chosen": chosen, "rejected": rejected}])
    enc = only(encode_pairs(pairs, tiny_tokenizer, None, max_len=128)[0])
    tok = tiny_tokenizer
    assert enc.prompt_ids == tok.encode("\n\nHuman: Hi\n\nAssistant:")
    assert enc.chosen_ids == tok.encode(" I can help.") + [tok.eos_id]
    assert enc.rejected_ids == tok.encode(" I won't.") + [tok.eos_id]
    trl_pairs, _ = read_preferences_rows([{"chosen": chosen, "rejected": rejected}], implicit_prompt="common_prefix")
    assert trl_pairs[0].prompt.endswith("Assistant: I")
    with pytest.raises(TemperError, match="implicit_prompt='first'"):
        read_preferences_rows([{"chosen": chosen, "rejected": rejected}], implicit_prompt="first")


def test_implicit_message_prompt_is_the_common_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    history = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("2 plus 3?")]
    row = {"chosen": history + [assistant("5.")], "rejected": history + [assistant("6.")]}
    pair = only(read_preferences_rows([row])[0])
    assert pair.prompt == history and pair.chosen == [assistant("5.")] and pair.rejected == [assistant("6.")]
    enc = only(encode_pairs([pair], tok, CHATML, max_len=128)[0])
    prompt_text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2 plus 3?<|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert enc.prompt_ids == tok.encode(prompt_text)
    assert enc.chosen_ids == tok.encode("5.<|im_end|>\n") and enc.rejected_ids == tok.encode("6.<|im_end|>\n")
    # a shared assistant turn at the end of the common prefix stays in the answers (the prompt ends on a user turn)
    longer = {"chosen": [user("Hi"), assistant("Yo"), user("More")], "rejected": [user("Hi"), assistant("Yo")]}
    with pytest.raises(TemperError, match="rows.jsonl:1: 'chosen' message 1: an answer holds only assistant"):
        read_preferences_rows([longer])


def test_explicit_prompt_repeated_in_the_answers_is_stripped_once(tiny_tokenizer):
    prompt = [user("Hi")]
    row = {"prompt": prompt, "chosen": prompt + [assistant("Hello!")], "rejected": prompt + [assistant("No.")]}
    strings = {"prompt": "Q:", "chosen": "Q: yes", "rejected": "Q: no"}
    pairs, stats = read_preferences_rows([row, strings])
    assert pairs[0].prompt == prompt and pairs[0].chosen == [assistant("Hello!")]
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == ("Q:", " yes", " no")
    assert stats.prompt_stripped == 2


def test_unpaired_rows_and_paired_rows_for_kto(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "Q: 3 + 4?", "completion": " 7", "label": True},
            {"prompt": [user("Hi")], "completion": [assistant("Go away.")], "label": False},
            {"prompt": "Q: 1 + 1?", "chosen": " 2", "rejected": " 3"}]
    import tempfile
    from pathlib import Path

    f = write_jsonl(Path(tempfile.mkdtemp()) / "kto.jsonl", rows)
    examples, stats = read_unpaired(f)
    assert [(e.completion, e.label) for e in examples] == [(" 7", True), ([assistant("Go away.")], False),
                                                           (" 2", True), (" 3", False)]
    encoded, stats = encode_unpaired(examples, tok, CHATML, max_len=64, stats=stats)
    assert encoded[0].prompt_ids == tok.encode("Q: 3 + 4?") and encoded[0].completion_ids == tok.encode(" 7") + [
        tok.eos_id]
    assert encoded[1].prompt_ids == tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert encoded[1].completion_ids == tok.encode("Go away.<|im_end|>\n")
    assert [e.label for e in encoded] == [True, False, True, False]
    assert stats.pairs == 4 and "3 rows read; 4 examples kept" in stats.summary()
    with pytest.raises(TemperError, match="kto.jsonl:1: an unpaired"):
        read_preferences(f)


def test_column_renames(tiny_tokenizer):
    rows = [{"question": "Q: 3 + 4?", "good": " 7", "bad": " 8"}]
    pair = only(read_preferences_rows(rows, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})[0])
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q: 3 + 4?", " 7", " 8")
    with pytest.raises(TemperError, match=r"rows.jsonl:1: no preference columns found \(keys: question, good, bad\)"):
        read_preferences_rows(rows)


def test_a_rename_to_a_column_the_row_lacks_is_a_bad_row_not_ignored(tmp_path):
    # the file's own 'chosen' column must not stand in for a misspelt rename (it did, silently)
    rows = [{"prompt": "Q", "chosen": " ok", "rejected": " no", "good": " 7"}, {"prompt": "Q", "chosen": " A", "rejected": " B"}]
    f = write_jsonl(tmp_path / "f.jsonl", rows)
    with pytest.raises(TemperError, match=r"f.jsonl:2: columns.chosen=good: the row has no column 'good' "
                                          r"\(keys: prompt, chosen, rejected\) \(set skip_bad_rows=true"):
        read_preferences(f, columns={"chosen": "good"}, skip_bad_rows=False)
    with pytest.raises(TemperError, match=r"too many bad preference rows: 1 of 2 read \(50.0%, above "
                                          r"max_bad_row_fraction=0.1\): 1 missing_column; first of each: .*f.jsonl:2"):
        read_preferences(f, columns={"chosen": "good"})
    with pytest.warns(UserWarning, match=r"1 bad preference rows skipped \(1 missing_column; first of each: .*f.jsonl:2"):
        pairs, stats = read_preferences(f, columns={"chosen": "good"}, max_bad_row_fraction=0.5)
    assert only(pairs).chosen == " 7" and dict(stats.skipped) == {"missing_column": 1}
    with pytest.raises(TemperError, match=r"f.jsonl:1: columns.completion=answer: the row has no column 'answer'"):
        read_unpaired(f, columns={"completion": "answer"})


def test_gzip_json_parquet_and_directories(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Q{i}", "chosen": f" A{i}", "rejected": f" B{i}"} for i in range(4)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "b.json").write_text(json.dumps(rows[2:3]))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "c.parquet")
    pairs, stats = read_preferences(tmp_path)
    assert [p.prompt for p in pairs] == ["Q0", "Q1", "Q2", "Q3"]
    assert [p.source.rsplit("/", 1)[1] for p in pairs] == ["a.jsonl.gz:1", "a.jsonl.gz:2", "b.json:item 0",
                                                           "c.parquet:row 1"]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(TemperError, match="bad.jsonl.gz: not a readable gzip file"):
        read_preferences(tmp_path / "bad.jsonl.gz")


# ----------------------------------------------------------------------------- parity with SFT and transformers


def _llama3_ready(tokenizer):
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    backend.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    return Tokenizer(backend, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                     pad_token=tokenizer.pad_token)


NO_MARKER_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


@pytest.mark.parametrize("name", ["chatml", "llama3", "plain", "no_marker"])
def test_pair_tokens_are_what_sft_trains(tiny_tokenizer, name):
    """prompt + chosen is SFT's sequence for that conversation, and chosen is exactly SFT's trained span."""
    from temper.data.sft import Conversation, encode_conversation

    template = BUILTIN_TEMPLATES.get(name, NO_MARKER_TEMPLATE)
    tok = _llama3_ready(tiny_tokenizer)
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("2 plus 3?")]
    pair = only(read_preferences_rows([{"prompt": prompt, "chosen": [assistant("5.")],
                                        "rejected": [assistant("It is 6.")]}])[0])
    enc = only(encode_pairs([pair], tok, template, max_len=256)[0])
    for answer, ids in ((pair.chosen, enc.chosen_ids), (pair.rejected, enc.rejected_ids)):
        sft = encode_conversation(Conversation(prompt + answer, None, "x"), tok, template, loss_on="completion",
                                  max_len=256)
        assert enc.prompt_ids + ids == [*sft.inputs, sft.targets[-1]]
        assert ids == [t for t in sft.targets if t != IGNORE_INDEX]
    # one end marker: the template's own, or (plain renders EOS itself; no_marker none) one EOS
    assert enc.chosen_ids.count(tok.eos_id) == (1 if name in ("plain", "no_marker") else 0)
    assert (enc.chosen_ids[-1] == tok.eos_id) == (name == "no_marker")


def test_chat_pairs_match_transformers_apply_chat_template(tmp_path, tiny_tokenizer):
    transformers = pytest.importorskip("transformers")
    Tokenizer(tiny_tokenizer.backend, bos_token=tiny_tokenizer.bos_token, eos_token=tiny_tokenizer.eos_token,
              pad_token=tiny_tokenizer.pad_token, chat_template=CHATML).save(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)

    def hf_ids(messages, **kw):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
        return list(out["input_ids"])

    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Ünïcödé 😀?")]
    chosen, rejected = [assistant("Yes 😀.")], [assistant("No.")]
    pair = only(read_preferences_rows([{"prompt": prompt, "chosen": chosen, "rejected": rejected}])[0])
    enc = only(encode_pairs([pair], tok, tok.chat_template, max_len=256)[0])
    assert enc.prompt_ids == hf_ids(prompt, add_generation_prompt=True)
    assert enc.prompt_ids + enc.chosen_ids == hf_ids(prompt + chosen)
    assert enc.prompt_ids + enc.rejected_ids == hf_ids(prompt + rejected)
    batch = collate_pairs([enc], tok.pad_id)
    P = len(enc.prompt_ids)
    for row, answer in ((0, enc.chosen_ids), (1, enc.rejected_ids)):
        seq = enc.prompt_ids + answer
        assert batch.inputs[row, :len(seq) - 1].tolist() == seq[:-1]
        assert (batch.targets[row, :P - 1] == IGNORE_INDEX).all()  # the prompt: no loss
        assert batch.targets[row, P - 1:len(seq) - 1].tolist() == answer  # every answer token, shifted by one
        assert (batch.targets[row, len(seq) - 1:] == IGNORE_INDEX).all()  # padding
    assert batch.completion_tokens.tolist() == [len(enc.chosen_ids), len(enc.rejected_ids)]


# ----------------------------------------------------------------------------- real data


def test_hh_rlhf_gzip_reads_with_turn_prompts(tiny_tokenizer):
    from temper.data.readers import iter_records

    path = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    with pytest.warns(UserWarning, match="4 bad preference rows skipped"):
        pairs, stats = read_preferences(path)
    assert stats.rows == 2312 and len(pairs) == 2308
    assert dict(stats.skipped) == {"empty_response": 4}  # chosen is a lone space after "Assistant:" in 4 rows
    raw = {rec.source: rec.data for rec in iter_records(path)}
    for pair in pairs:
        assert pair.prompt.startswith("\n\nHuman: ") and pair.prompt.endswith("\n\nAssistant:")
        assert pair.prompt + pair.chosen == raw[pair.source]["chosen"]
        assert pair.prompt + pair.rejected == raw[pair.source]["rejected"]
        assert pair.chosen.startswith(" ") and pair.chosen.strip() and pair.rejected.strip()
    with pytest.raises(TemperError, match=r"harmless-base-test.jsonl.gz:87: 'chosen' is empty \(set skip_bad_rows"):
        read_preferences(path, skip_bad_rows=False)
    encoded, stats = encode_pairs(pairs[:150], tiny_tokenizer, None, max_len=4096, stats=stats)
    assert len(encoded) == 150 and dict(stats.skipped) == {"empty_response": 4}  # no token-boundary losses
    assert all(e.chosen_ids[-1] == tiny_tokenizer.eos_id for e in encoded)


def test_string_rows_use_no_template_whatever_the_model_has(tiny_tokenizer):
    """HH-RLHF's rows are strings with their own Human:/Assistant: markers: a model's chat template does not
    touch them (no `template=none` needed)."""
    path = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    plain, _ = load_preferences(path, tiny_tokenizer, None, max_len=512, limit=30)
    chat, _ = load_preferences(path, tiny_tokenizer, CHATML, max_len=512, limit=30)
    assert plain == chat and preference_fingerprint(plain) == preference_fingerprint(chat)


def _load_recording_cuts(path, tokenizer, **options):
    """load_preferences with its defaults, and the (prompt tokens, longest answer tokens) of every kept pair
    before any cut: what `fit_to_context` was asked to fit."""
    from unittest import mock

    from temper.data import preference

    with mock.patch.object(preference, "fit_to_context", wraps=preference.fit_to_context) as fit:
        encoded, stats = load_preferences(path, tokenizer, None, **options)
    return encoded, stats, [c.args[:2] for c in fit.call_args_list]


@pytest.mark.parametrize("unpaired,limit", [(False, 0), (True, 400)], ids=["pairs", "kto"])
def test_hh_rlhf_trains_on_every_good_row_at_the_default_settings(tiny_tokenizer, unpaired, limit):
    """`temper dpo data=harmless-base-test.jsonl.gz` with its defaults (seq_len=512, bad rows skipped up to
    10%): the 4 rows with an empty answer are skipped and named, every other row is kept, and the long ones
    (half of them, with this 300-token vocabulary) are cut to fit, counted, never dropped. KTO: the first
    400 rows (a paired row gives two examples), to keep the test short."""
    path = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    with pytest.warns(UserWarning, match=r"bad preference rows skipped \(\d empty_response; first of each: "
                                         r".*harmless-base-test.jsonl.gz:87: 'chosen' is empty\)"):
        encoded, stats, asked = _load_recording_cuts(path, tiny_tokenizer, max_len=512, unpaired=unpaired,
                                                     limit=limit * 2)
    rows, bad = (2312, 4) if not unpaired else (stats.rows, stats.skipped["empty_response"])
    assert stats.rows == rows and dict(stats.skipped) == {"empty_response": bad} and bad >= 1
    assert len(encoded) == stats.pairs == len(asked) == (rows - bad) * (2 if unpaired else 1)
    too_long = [(p, a) for p, a in asked if p + a > 513]  # 512 input positions hold 513 tokens
    assert len(too_long) > 0.3 * len(asked) and stats.truncated == len(too_long)
    assert stats.prompt_truncated == sum(p > max(513 - a, 256) for p, a in too_long) > 0
    assert stats.answer_truncated == sum(a > 513 - min(p, max(513 - a, 256)) for p, a in too_long) > 0
    for enc, (p, a) in zip(encoded, asked):
        longest = max(len(enc.chosen_ids), len(enc.rejected_ids)) if not unpaired else len(enc.completion_ids)
        assert len(enc.prompt_ids) == min(p, max(513 - a, 256))  # the prompt's end, down to seq_len / 2
        assert longest == min(a, 513 - len(enc.prompt_ids))  # then the answers' start
        assert len(enc.prompt_ids) + longest <= 513
    what = "examples" if unpaired else "pairs"
    assert f"{rows} rows read; {len(encoded)} {what} kept; skipped: {bad} empty_response; {len(too_long)} " \
           f"{what} truncated to fit seq_len=512" in stats.summary()
    assert stats.counts() == {"rows_read": rows, "skipped_rows": {"empty_response": bad},
                              "truncated": stats.truncated, "prompt_truncated": stats.prompt_truncated,
                              "answer_truncated": stats.answer_truncated}


def test_world_preference_files_read_and_tokenise(tmp_path, tiny_tokenizer):
    from temper.data.world import WorldConfig, build_world, write_world

    write_world(build_world(WorldConfig(num_pref_train=40, num_pref_test=8, num_sft_train=10, num_sft_test=5,
                                        num_rl_train=5, num_rl_test=5)), tmp_path)
    for split, n in (("train", 40), ("test", 8)):
        encoded, stats = load_preferences(tmp_path / "preference" / f"{split}.jsonl", tiny_tokenizer, CHATML,
                                          max_len=512)
        assert len(encoded) == n and stats.rows == n and not stats.skipped and not stats.truncated
    rows = [json.loads(line) for line in (tmp_path / "preference" / "train.jsonl").read_text().splitlines()]
    pairs, _ = read_preferences(tmp_path / "preference" / "train.jsonl")
    encoded, _ = encode_pairs(pairs, tiny_tokenizer, CHATML, max_len=512)
    for row, enc in zip(rows, encoded):
        assert tiny_tokenizer.decode(enc.chosen_ids) == row["chosen"][0]["content"] + "<|im_end|>\n"
        assert tiny_tokenizer.decode(enc.rejected_ids) == row["rejected"][0]["content"] + "<|im_end|>\n"
    loader = PreferenceLoader(encoded, batch_size=4, pad_id=tiny_tokenizer.pad_id, seed=0)
    assert loader.next_batch().inputs.shape[0] == 8


# ----------------------------------------------------------------------------- bad rows

GOOD = {"prompt": "Q: 1 + 1?", "chosen": " 2", "rejected": " 3"}

BAD_ROWS = [
    ("identical", {"prompt": "Q", "chosen": " A", "rejected": " A"}, "'chosen' and 'rejected' are identical"),
    ("identical", {"prompt": [user("Q")], "chosen": [assistant("A")], "rejected": "A"}, "identical"),
    ("empty_response", {"prompt": "Q", "chosen": "  ", "rejected": " B"}, "'chosen' is empty"),
    ("empty_response", {"prompt": [user("Q")], "chosen": [assistant("A")], "rejected": [assistant("")]},
     "'rejected' message 0: the assistant's content is empty"),
    ("no_common_prefix", {"chosen": "abc", "rejected": "xyz"}, "share no prompt"),
    ("no_common_prefix", {"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]},
     "share no prompt"),
    ("identical", {"chosen": "same text", "rejected": "same text"}, "identical"),
    ("prompt_not_prefix", {"prompt": [user("Q")], "chosen": [user("Other"), assistant("A")],
                           "rejected": [user("Q"), assistant("B")]}, "'chosen' is a whole conversation"),
    ("prompt_not_prefix", {"prompt": "Q:", "chosen": "Q: A", "rejected": " B"}, "begins 'chosen' but not"),
    ("bad_type", {"prompt": 3, "chosen": " a", "rejected": " b"}, "field 'prompt' is a number \\(3\\)"),
    ("bad_type", {"chosen": {"x": 1}, "rejected": "b"}, "field 'chosen' is an object"),
    ("bad_type", {"chosen": "a", "rejected": [assistant("b")]}, "both be strings or both be message lists"),
    ("bad_messages", {"prompt": [user("a"), user("b")], "chosen": [assistant("c")], "rejected": [assistant("d")]},
     "prompt: message 1: user and assistant must alternate"),
    ("no_columns", {"foo": 1}, "no preference columns found \\(keys: foo\\)"),
    ("empty_prompt", {"prompt": "", "chosen": " a", "rejected": " b"}, "the prompt gives no tokens"),
    ("token_boundary", {"prompt": "Alic", "chosen": "e lives", "rejected": " lives"},
     "not the start of the tokens of prompt\\+chosen"),
    ("identical_after_truncation", {"prompt": "Q", "chosen": " same same same same same same same same X",
                                    "rejected": " same same same same same same same same Y"},
     "the same within seq_len=16"),
]


@pytest.mark.parametrize("reason,row,message", BAD_ROWS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_ROWS)])
def test_bad_pair_rows_are_counted_or_refused(tmp_path, tiny_tokenizer, reason, row, message):
    import re

    # a few bad rows (1 of 11, under max_bad_row_fraction=0.1): skipped, counted, named in one warning
    f = write_jsonl(tmp_path / "f.jsonl", [GOOD, row, *[GOOD] * 9])
    with pytest.warns(UserWarning, match=f"1 bad preference rows skipped \\(1 {reason}; first of each: .*f.jsonl:2: "):
        encoded, stats = load_preferences(f, tiny_tokenizer, CHATML, max_len=16)
    assert len(encoded) == 10 and stats.rows == 11 and dict(stats.skipped) == {reason: 1}
    assert f"1 {reason}" in stats.summary() and re.search(message, stats.first_bad[reason])
    # strict: the first bad row stops, with its file:line
    with pytest.raises(TemperError) as err:
        load_preferences(f, tiny_tokenizer, CHATML, max_len=16, skip_bad_rows=False)
    text = str(err.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"{f}:2: ")
    assert re.search(message, text), text
    assert "skip_bad_rows=true" in text
    # a large share bad (1 of 3): refused, with the counts and the first row of the reason
    f = write_jsonl(tmp_path / "g.jsonl", [GOOD, row, GOOD])
    with pytest.raises(TemperError) as err:
        load_preferences(f, tiny_tokenizer, CHATML, max_len=16)
    text = str(err.value)
    assert len(text.splitlines()) == 1
    assert text.startswith(f"too many bad preference rows: 1 of 3 read (33.3%, above max_bad_row_fraction=0.1): "
                           f"1 {reason}; first of each: {f}:2: ")
    assert re.search(message, text) and "raise max_bad_row_fraction" in text


def test_a_long_prompt_is_cut_to_its_end_not_dropped(tmp_path, tiny_tokenizer):
    """A prompt longer than the context (a bad row once, `prompt_too_long`) keeps its end, down to half the
    context, and its answers keep their start: the pair trains, counted as truncated."""
    tok = tiny_tokenizer
    long = {"prompt": "word " * 40, "chosen": " a", "rejected": " b"}
    f = write_jsonl(tmp_path / "f.jsonl", [GOOD, long, GOOD])
    encoded, stats = load_preferences(f, tok, CHATML, max_len=16)
    assert len(encoded) == 3 and not stats.skipped
    whole = only(encode_pairs(read_preferences(f)[0][1:2], tok, None, max_len=1000)[0])
    assert len(whole.prompt_ids) > 16 and (whole.chosen_ids, whole.rejected_ids) == (encoded[1].chosen_ids,
                                                                                       encoded[1].rejected_ids)
    room = 17 - max(len(whole.chosen_ids), len(whole.rejected_ids))  # 16 input positions: 17 tokens
    assert encoded[1].prompt_ids == whole.prompt_ids[-room:]  # the prompt's end, the answers whole
    assert (stats.truncated, stats.prompt_truncated, stats.answer_truncated) == (1, 1, 0)
    assert "1 pairs truncated to fit seq_len=16 (1 prompts kept their end, 0 with an answer that lost its end)" \
        in stats.summary()


def test_an_hh_rlhf_row_whose_prompt_outruns_the_context_trains_even_when_strict(tmp_path, tiny_tokenizer):
    """The README's `temper dpo data=harmless-base-test.jsonl.gz` once stopped at the file's row 4 (a
    529-token prompt at seq_len=512, then a `prompt_too_long` bad row, and bad rows stopped the run):
    an HH-RLHF-style implicit-prompt row (chosen/rejected dialogues only) whose prompt alone is longer
    than the context keeps its end, down to half the context, with its `Assistant:` marker, and its
    answers whole; counted, not a bad row even with skip_bad_rows=false."""
    tok = tiny_tokenizer
    history = "".join(f"\n\nHuman: tell me about item {i}\n\nAssistant: item {i} is fine" for i in range(12))
    row = {"chosen": history + "\n\nHuman: and the last?\n\nAssistant: I can help.",
           "rejected": history + "\n\nHuman: and the last?\n\nAssistant: No."}
    f = write_jsonl(tmp_path / "hh.jsonl", [row])
    pairs, _ = read_preferences(f, skip_bad_rows=False)
    assert only(pairs).prompt.endswith("\n\nHuman: and the last?\n\nAssistant:")
    prompt_ids = tok.encode(only(pairs).prompt)
    max_len = 32
    assert len(prompt_ids) > 2 * max_len  # the prompt alone outruns the context
    enc, stats = encode_pairs(pairs, tok, None, max_len=max_len, skip_bad_rows=False)
    enc = only(enc)
    longest = max(len(enc.chosen_ids), len(enc.rejected_ids))
    assert enc.chosen_ids == tok.encode(row["chosen"])[len(prompt_ids):] + [tok.eos_id]  # answers whole
    assert enc.prompt_ids == prompt_ids[-(max_len + 1 - longest):]  # the prompt's end, leading into the answers
    assert len(enc.prompt_ids) >= max_len // 2 and len(enc.prompt_ids) + longest <= max_len + 1
    assert tok.decode(enc.prompt_ids).endswith("Assistant:")
    assert (stats.truncated, stats.prompt_truncated, stats.answer_truncated) == (1, 1, 0) and not stats.skipped


@pytest.mark.parametrize("label", ["yes", 1, None])
def test_a_kto_label_must_be_a_boolean(tmp_path, tiny_tokenizer, label):
    f = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Q", "completion": " A", "label": True},
                                           {"prompt": "Q", "completion": " B", "label": label}])
    with pytest.warns(UserWarning, match="1 bad_label"):
        examples, stats = read_unpaired(f, max_bad_row_fraction=0.5)
    assert len(examples) == 1 and dict(stats.skipped) == {"bad_label": 1}
    with pytest.raises(TemperError, match=r"k.jsonl:2: field 'label' is .* \(expected true or false\) \(set skip"):
        read_unpaired(f, skip_bad_rows=False)
    with pytest.raises(TemperError, match=r"too many bad preference rows: 1 of 2 read .*k.jsonl:2: field 'label'"):
        read_unpaired(f)


def test_truncation_keeps_the_prompt_end_and_counts(tiny_tokenizer):
    tok = tiny_tokenizer
    pairs, _ = read_preferences_rows([{"prompt": "one two three four five six seven", "chosen": " yes " * 20,
                                       "rejected": " no"}])
    full_prompt = tok.encode("one two three four five six seven")
    enc, stats = encode_pairs(pairs, tok, None, max_len=12, max_prompt_len=5)
    enc = only(enc)
    assert enc.prompt_ids == full_prompt[-5:]  # keep_end: the prompt's start is dropped
    assert len(enc.prompt_ids) + len(enc.chosen_ids) == 12 + 1  # 12 input positions
    assert enc.chosen_ids == (tok.encode(" yes " * 20) + [tok.eos_id])[:8]  # cut at the end, EOS lost
    assert enc.rejected_ids == tok.encode(" no") + [tok.eos_id]
    assert (stats.truncated, stats.prompt_truncated, stats.answer_truncated) == (1, 1, 1)
    assert collate_pairs([enc], tok.pad_id).inputs.shape == (2, 12)


# ----------------------------------------------------------------------------- batches


def _pairs(n: int) -> list[EncodedPair]:
    return [EncodedPair([1, 100 + i], [10 + i] * (1 + i % 3), [20 + i] * (1 + (i + 1) % 2), f"f:{i + 1}")
            for i in range(n)]


def test_concatenated_batch_layout_and_masks():
    pairs = _pairs(3)
    batch = collate_pairs(pairs, pad_id=0)
    B = 3
    assert batch.num_pairs == B and batch.inputs.shape == (2 * B, 2 + 3 - 1)
    for i, p in enumerate(pairs):
        for row, answer in ((i, p.chosen_ids), (B + i, p.rejected_ids)):  # first B chosen, then B rejected
            seq = p.prompt_ids + answer
            n = len(seq) - 1
            assert batch.inputs[row, :n].tolist() == seq[:-1] and (batch.inputs[row, n:] == 0).all()
            expected = [IGNORE_INDEX] * (len(p.prompt_ids) - 1) + answer
            expected += [IGNORE_INDEX] * (batch.inputs.shape[1] - len(expected))
            assert batch.targets[row].tolist() == expected
    assert batch.completion_tokens.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids)
                                                                                       for p in pairs]
    assert batch.attention_mask() is None and batch.positions is None  # right padding: plain causal attention
    assert batch.to("cpu").num_pairs == B


def test_batch_sequence_logprobs_equal_each_sequence_alone(tiny_tokenizer):
    """Right padding in the concatenated batch changes no row's answer log-probability."""
    from temper.losses import causal_lm_sequence_logprobs
    from temper.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size)).eval()
    rows = [{"prompt": [user(f"Question {i}?" + " more" * i)], "chosen": [assistant(f"Answer {i}.")],
             "rejected": [assistant("No" + " no" * (3 - i))]} for i in range(3)]
    encoded, _ = encode_pairs(read_preferences_rows(rows)[0], tiny_tokenizer, CHATML, max_len=128)
    batch = collate_pairs(encoded, tiny_tokenizer.pad_id)
    with torch.no_grad():
        logps, counts = causal_lm_sequence_logprobs(model, batch.inputs, batch.targets,
                                                    positions=batch.positions, mask=batch.attention_mask())
        for r, (prompt, answer) in enumerate([(e.prompt_ids, e.chosen_ids) for e in encoded]
                                             + [(e.prompt_ids, e.rejected_ids) for e in encoded]):
            seq = prompt + answer
            targets = torch.tensor([[IGNORE_INDEX] * (len(prompt) - 1) + answer])
            alone, n = causal_lm_sequence_logprobs(model, torch.tensor([seq[:-1]]), targets)
            T = batch.inputs.shape[1]  # one row of the batch vs the sequence alone: another order
            assert_reorder_close(logps[r], alone[0], decoder_lengths(model, T) + (T,))
            assert counts[r] == n[0] == len(answer) == batch.completion_tokens[r]


def _order(loader, n):
    return [[int(t) for t in loader.next_batch().inputs[:loader.batch_size, 1]] for _ in range(n)]


def test_loader_deterministic_resumable_and_split_over_ranks_like_sft():
    from temper.data.sft import Example, SFTLoader

    pairs = _pairs(24)  # inputs[:, 1] = 100 + the pair's index
    a = PreferenceLoader(pairs, batch_size=3, pad_id=0, seed=1)
    first = _order(a, 6)
    assert first == _order(PreferenceLoader(pairs, batch_size=3, pad_id=0, seed=1), 6)
    assert first != _order(PreferenceLoader(pairs, batch_size=3, pad_id=0, seed=2), 6)
    epoch = _order(PreferenceLoader(pairs, batch_size=3, pad_id=0, seed=1), 8)
    assert epoch[:6] == first and sorted(sum(epoch, [])) == [100 + i for i in range(24)]  # each pair once
    # the same order as SFTLoader gives its examples, for the same seed
    sft = SFTLoader([Example([i], [i]) for i in range(24)], batch_size=3, seq_len=8, pad_id=0, seed=1, packing=False)
    assert [[100 + e for e in sft.next_batch().inputs[:, 0].tolist()] for _ in range(6)] == first
    # resume: a fresh loader given the state continues where the first one stopped, across epochs too
    b = PreferenceLoader(pairs, batch_size=3, pad_id=0, seed=1)
    b.load_state_dict(a.state_dict())
    assert _order(b, 5) == _order(a, 5) and a.epoch == 1
    # two ranks: rank r's k-th batch is the epoch's (2k + r)-th; a 2-rank state resumes on one rank
    ranks = [PreferenceLoader(pairs, batch_size=3, pad_id=0, seed=1, rank=r, world_size=2) for r in (0, 1)]
    got = [_order(ranks[0], 1)[0], _order(ranks[1], 1)[0], _order(ranks[0], 1)[0], _order(ranks[1], 1)[0]]
    assert got == first[:4]
    single = PreferenceLoader(pairs, batch_size=3, pad_id=0, seed=1)
    single.load_state_dict(ranks[0].state_dict())
    assert single.position == 4 and _order(single, 1) == [first[4]]
    with pytest.raises(TemperError, match="fewer than one step"):
        PreferenceLoader(pairs[:3], batch_size=3, pad_id=0, seed=1, world_size=2).next_batch()


def test_unpaired_batches_with_kl_rows(tiny_tokenizer):
    rows = [{"prompt": f"Q{i}", "completion": f" answer {i}", "label": i % 2 == 0} for i in range(4)]
    import tempfile
    from pathlib import Path

    f = write_jsonl(Path(tempfile.mkdtemp()) / "u.jsonl", rows)
    encoded, stats = load_preferences(f, tiny_tokenizer, None, max_len=32, unpaired=True)
    loader = PreferenceLoader(encoded, batch_size=4, pad_id=tiny_tokenizer.pad_id, seed=0, shuffle=False,
                              kl=True, max_len=32)
    batch = loader.next_batch()
    assert batch.labels.tolist() == [True, False, True, False] and batch.num_examples == 4 and batch.kl
    assert batch.inputs.shape[0] == 8
    text = [tiny_tokenizer.decode([t for t in row.tolist() if t != tiny_tokenizer.pad_id]) for row in batch.inputs]
    assert text[0] == "Q0 answer 0" and text[4] == "Q0 answer 3"  # KL row i: prompt i, completion i - 1
    assert text[5] == "Q1 answer 0"
    with pytest.raises(TemperError, match="needs unpaired examples"):
        PreferenceLoader(_pairs(4), batch_size=2, pad_id=0, seed=0, kl=True)


def test_fingerprint_follows_the_encoded_data(tiny_tokenizer):
    rows = [{"prompt": [user(f"Q{i}")], "chosen": [assistant(f"A{i}")], "rejected": [assistant(f"B{i}")]}
            for i in range(3)]
    pairs, _ = read_preferences_rows(rows)
    chatml = preference_fingerprint(encode_pairs(pairs, tiny_tokenizer, CHATML, max_len=64)[0])
    assert chatml == preference_fingerprint(encode_pairs(pairs, tiny_tokenizer, CHATML, max_len=64)[0])
    assert chatml != preference_fingerprint(encode_pairs(pairs, tiny_tokenizer, BUILTIN_TEMPLATES["plain"],
                                                         max_len=64)[0])
    assert chatml != preference_fingerprint(encode_pairs(pairs, tiny_tokenizer, CHATML, max_len=20)[0])
    assert chatml != preference_fingerprint(encode_pairs(pairs[::-1], tiny_tokenizer, CHATML, max_len=64)[0])
    assert isinstance(PreferenceStats().summary(), str)


def test_packed_batch_layout():
    """Padding-free: each sequence exactly once, in rows of max(pack_len, the longest) slots,
    positions restarting at 0, segments naming the sequence, fewer slots than padding uses."""
    pairs = [EncodedPair([1, 2, 3], [10] * (1 + 5 * (i % 3)), [20] * (1 + 2 * (i % 2)), f"f:{i + 1}")
             for i in range(6)]
    padded, packed = collate_pairs(pairs, pad_id=0), collate_pairs(pairs, pad_id=0, pack_len=1)
    longest = padded.inputs.shape[1]
    assert packed.inputs.shape[1] <= longest and packed.inputs.shape[0] < padded.inputs.shape[0]
    assert packed.inputs.numel() < padded.inputs.numel()
    assert packed.completion_tokens.tolist() == padded.completion_tokens.tolist()
    index = packed.sequence_index()
    for r in range(2 * len(pairs)):
        slots = index == r
        assert slots.any(dim=1).sum() == 1  # a sequence is never split over rows
        row = int(slots.any(dim=1).nonzero())
        n = int(slots.sum())
        cols = slots[row].nonzero().flatten()
        assert cols.tolist() == list(range(int(cols[0]), int(cols[0]) + n))  # contiguous
        assert packed.positions[row, cols].tolist() == list(range(n))
        assert packed.inputs[row, cols].tolist() == padded.inputs[r, :n].tolist()
        assert packed.targets[row, cols].tolist() == padded.targets[r, :n].tolist()
    assert (packed.targets[index == -1] == IGNORE_INDEX).all()
    mask = packed.attention_mask()
    assert mask is not None and not mask[0, 0][index[0][:, None] != index[0][None, :]].any()  # no cross-talk
    assert padded.sequence_index().tolist() == [[r] * longest for r in range(12)]
    one = collate_pairs(pairs, pad_id=0, pack_len=1000)  # all in one row, as long as the sequences together
    assert one.inputs.shape == (1, int(padded.completion_tokens.sum() + 12 * 2))


@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("pack", [False, True])
def test_completion_logprobs_run_the_last_block_on_completion_tokens_only(tiny_tokenizer, family, pack):
    """completion_logprobs runs the last block's output projection and MLP, the final norm and the
    output layer on the completion tokens alone (`hidden_at`), padded or packed: the same log-probs,
    logit sums and gradients as every position through the whole model followed by the full
    (tokens x vocab) log-softmax gathered at the targets, the way it was done before."""
    from temper.losses.clm import output_weight
    from temper.losses.logprobs import completion_logprobs
    from temper.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset(family, vocab_size=tiny_tokenizer.vocab_size))
    rows = [{"prompt": [user(f"Question {i}?" + " more" * (2 * i))], "chosen": [assistant(f"Answer {i}." * (1 + i))],
             "rejected": [assistant("No" + " no" * (5 - i))]} for i in range(4)]
    encoded, _ = encode_pairs(read_preferences_rows(rows)[0], tiny_tokenizer, CHATML, max_len=128)
    batch = collate_pairs(encoded, tiny_tokenizer.pad_id, pack_len=40 if pack else 0)
    scored, index = batch.targets != IGNORE_INDEX, batch.sequence_index()
    weights = torch.linspace(0.5, 1.5, 2 * len(encoded))  # a different weight per sequence

    rows_seen = []
    hook = model.blocks[-1].mlp.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[:-1].numel()))
    logps, counts, logits = completion_logprobs(model, batch, with_logits=True)
    hook.remove()
    (logps * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert rows_seen == [int(scored.sum())] and rows_seen[0] < batch.inputs.numel() / 2  # the completions only

    model.zero_grad()
    hidden = model(batch.inputs, return_hidden=True, positions=batch.positions, mask=batch.attention_mask())
    z = hidden @ output_weight(model).t()  # (rows, T, V)
    token = z.log_softmax(-1).gather(-1, batch.targets.clamp(min=0)[..., None]).squeeze(-1)
    old = token.new_zeros(len(weights)).index_add(0, index[scored], token[scored])
    old_logits = z.detach().mean(-1).new_zeros(len(weights)).index_add(0, index[scored], z.detach().mean(-1)[scored])
    (old * weights).sum().backward()

    T = batch.inputs.shape[1]
    per_sequence = decoder_lengths(model, T) + (T,)  # a forward pass, then a sum over a sequence's tokens
    assert_reorder_close(logps.detach(), old.detach(), per_sequence)
    assert_reorder_close(logits, old_logits, per_sequence)
    assert counts.tolist() == batch.completion_tokens.tolist()
    for (name, _), new, before in zip(model.named_parameters(), grads, [p.grad for p in model.parameters()]):
        assert_reorder_close(new, before, decoder_lengths(model, T, tokens=batch.inputs.numel()), msg=name)


@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny"])
def test_packed_logprobs_and_gradients_equal_padded(tiny_tokenizer, family):
    """pair_logps on a padding-free batch gives the padded batch's log-probs, logit sums and
    gradients (rotary and learned positions both restart per sequence); KTO's rows too."""
    from temper.data.preference import collate_unpaired
    from temper.losses.logprobs import completion_logprobs as pair_logps
    from temper.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset(family, vocab_size=tiny_tokenizer.vocab_size))
    rows = [{"prompt": [user(f"Question {i}?" + " more" * (2 * i))], "chosen": [assistant(f"Answer {i}." * (1 + i))],
             "rejected": [assistant("No" + " no" * (5 - i))]} for i in range(5)]
    encoded, _ = encode_pairs(read_preferences_rows(rows)[0], tiny_tokenizer, CHATML, max_len=128)
    grads = []
    results = []
    for pack in (False, True):
        model.zero_grad()
        batch = collate_pairs(encoded, tiny_tokenizer.pad_id, pack_len=40 if pack else 0)
        logps, counts, logits = pair_logps(model, batch, with_logits=True)
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()  # a different weight per sequence
        results.append((logps.detach(), counts, logits))
        grads.append([p.grad.clone() for p in model.parameters()])
    (lp, cp, gp), (lk, ck, gk) = results
    # the same maths in another order: per sequence, a forward pass then a sum over its tokens;
    # per gradient entry, forward and backward then a sum over every position of the batch
    T = batch.inputs.shape[1]
    per_sequence = decoder_lengths(model, T) + (T,)
    assert_reorder_close(lk, lp, per_sequence)
    assert_reorder_close(gk, gp, per_sequence)
    assert ck.tolist() == cp.tolist()
    for (name, _), a, b in zip(model.named_parameters(), grads[0], grads[1]):
        assert_reorder_close(b, a, decoder_lengths(model, T, tokens=len(encoded) * 2 * T), msg=name)
    examples = [EncodedUnpaired(e.prompt_ids, e.chosen_ids, i % 2 == 0, e.source) for i, e in enumerate(encoded)]
    with torch.no_grad():
        padded = pair_logps(model, collate_unpaired(examples, tiny_tokenizer.pad_id, kl=True, max_len=128))[0]
        packed = pair_logps(model, collate_unpaired(examples, tiny_tokenizer.pad_id, kl=True, max_len=128,
                                                    pack_len=1))[0]
    assert_reorder_close(packed, padded, decoder_lengths(model, 128) + (128,))


def test_kto_mismatched_rows_never_take_an_answer_to_the_same_prompt():
    """KTO's KL rows pair prompt i with another example's answer. Unpaired from pairs, a prompt's
    desirable and undesirable examples sit side by side (an unshuffled held-out loader): rotating by
    one gave the undesirable example its own pair's chosen answer. Each KL row now takes the
    nearest earlier example with another prompt; with one prompt in the batch, the previous one."""
    from temper.data.preference import collate_unpaired

    examples = []
    for k in range(3):  # pairs of examples sharing a prompt, in order: (p0+, p0-), (p1+, p1-), (p2+, p2-)
        prompt = [10 + k, 11 + k]
        examples += [EncodedUnpaired(prompt, [20 + k, 2], True, f"f:{k}"),
                     EncodedUnpaired(prompt, [30 + k, 2], False, f"f:{k}")]
    batch = collate_unpaired(examples, 0, kl=True, max_len=16)
    B = len(examples)
    for i in range(B):  # row B + i: the prompt of example i, then an answer
        row = batch.inputs[B + i].tolist()
        answer = batch.targets[B + i][batch.targets[B + i] != IGNORE_INDEX].tolist()
        assert row[:2] == examples[i].prompt_ids
        owner = next(j for j, e in enumerate(examples) if e.completion_ids == answer)
        assert examples[owner].prompt_ids != examples[i].prompt_ids, (i, owner)
    alone = collate_unpaired(examples[:2], 0, kl=True, max_len=16)  # one prompt: nothing else to take
    assert alone.inputs.shape[0] == 4


def test_a_held_out_share_keeps_a_pairs_two_kto_examples_together():
    from temper.data.sft import split_held_out

    examples = [EncodedUnpaired([k, k + 1], [k + 2], label, f"f:{k}") for k in range(40) for label in (True, False)]
    kept, held = split_held_out(examples, 0.2, seed=3, group=lambda e: tuple(e.prompt_ids))
    assert len(held) == 16 and len(kept) == 64
    assert not {tuple(e.prompt_ids) for e in kept} & {tuple(e.prompt_ids) for e in held}
    plain_kept, plain_held = split_held_out(list(range(80)), 0.2, seed=3)  # ungrouped: unchanged behaviour
    assert len(plain_held) == 16 and sorted(plain_kept + plain_held) == list(range(80))
