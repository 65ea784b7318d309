"""SFT data: formats, loss masks, EOS, truncation, packing; and the `temper sft` recipe."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_reorder_close, decoder_lengths, shared_file

from temper.data.sft import (
    EncodeStats,
    SFTLoader,
    encode_all,
    encode_conversation,
    pack,
    packed_batch,
    pad_batch,
    read_conversations,
    row_to_conversations,
)
from temper.errors import TemperError
from temper.losses import IGNORE_INDEX

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."}]


def trained_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t in example.targets if t != IGNORE_INDEX])


def test_formats_become_conversations():
    conv = row_to_conversations({"messages": CHAT}, "f:1")[0]
    assert conv.messages == CHAT
    pc = row_to_conversations({"prompt": "Q?", "completion": "A."}, "f:2")[0]
    assert pc.messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    pc_list = row_to_conversations({"prompt": [{"role": "user", "content": "Q?"}],
                                    "completion": [{"role": "assistant", "content": "A."}]}, "f:3")[0]
    assert pc_list.messages == pc.messages
    alpaca = row_to_conversations({"instruction": "Sum", "input": "2 3", "output": "5"}, "f:4")[0]
    assert alpaca.messages[0]["content"] == "Sum\n\n2 3" and alpaca.messages[1]["content"] == "5"
    si = row_to_conversations({"instruction": "Rev", "instances": [{"input": "ab", "output": "ba"},
                                                                   {"input": "cd", "output": "dc"}]}, "f:5")
    assert [c.messages[1]["content"] for c in si] == ["ba", "dc"]
    text = row_to_conversations({"text": "plain words"}, "f:6")[0]
    assert text.messages is None and text.text == "plain words"
    mapped = row_to_conversations({"question": "Q?", "answer": "A."}, "f:7",
                                  {"prompt": "question", "completion": "answer"})[0]
    assert mapped.messages == pc.messages


@pytest.mark.parametrize("row,match", [
    ({"foo": 1}, r"f.jsonl:3: no SFT columns found \(keys: foo\)"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, r"f.jsonl:3: .*alternat"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"f.jsonl:3: .*assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, r"f.jsonl:3: .*empty"),
])
def test_bad_rows_name_file_and_line(row, match):
    with pytest.raises(TemperError, match=match):
        row_to_conversations(row, "f.jsonl:3")


def test_a_rename_to_a_missing_column_is_an_error_not_ignored():
    """columns.completion=answer on a row without 'answer' must not quietly train on its own 'completion'."""
    row = {"prompt": "Q?", "completion": "the row's own answer"}
    with pytest.raises(TemperError, match=r"f.jsonl:3: columns.completion=answer: the row has no column 'answer'"):
        row_to_conversations(row, "f.jsonl:3", {"completion": "answer"})


def test_bad_rows_are_skipped_up_to_a_share_and_refused_above(tmp_path):
    """The rule DPO's data follows too (temper.data.rows.BadRows): a few bad rows skipped, counted and named;
    more than max_bad_row_fraction of the rows read refused; skip_bad_rows=False stops at the first."""
    empty_reply = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}
    rows = [{"messages": CHAT}, {"bad": 1}, *[{"messages": CHAT}] * 8, empty_reply, {"messages": CHAT}, {"text": 3}]
    few = tmp_path / "few.jsonl"  # 3 bad of 13 (23%)
    few.write_text("".join(json.dumps(r) + "\n" for r in rows * 2 + [{"messages": CHAT}] * 4))  # 6 of 30: 20%
    with pytest.warns(UserWarning, match=r"6 bad SFT rows skipped \(2 bad_messages, 2 bad_type, 2 no_columns; first "
                                         r"of each: .*few.jsonl:11: message 1: the assistant's content is empty; "
                                         r".*few.jsonl:13: field 'text' is a number \(3\) \(expected a string\); "
                                         r".*few.jsonl:2: no SFT columns found \(keys: bad\)"):
        convs, bad = read_conversations(few, max_bad_row_fraction=0.2)
    assert len(convs) == 24 and bad.total == 6 and dict(bad.skipped) == {"bad_messages": 2, "bad_type": 2,
                                                                          "no_columns": 2}
    with pytest.raises(TemperError, match=r"too many bad SFT rows: 6 of 30 read \(20.0%, above max_bad_row_fraction"
                                          r"=0.1\): 2 bad_messages, 2 bad_type, 2 no_columns; first of each: "):
        read_conversations(few)
    with pytest.raises(TemperError, match=r"few.jsonl:2: no SFT columns found .* \(set skip_bad_rows=true"):
        read_conversations(few, skip_bad_rows=False)
    one = tmp_path / "one.jsonl"  # 1 bad of 11: under the default share
    one.write_text("".join(json.dumps(r) + "\n" for r in [{"messages": CHAT}] * 5 + [{"bad": 1}]
                           + [{"messages": CHAT}] * 5))
    with pytest.warns(UserWarning, match=r"1 bad SFT rows skipped \(1 no_columns; first of each: .*one.jsonl:6: "):
        convs, bad = read_conversations(one)
    assert len(convs) == 10 and bad.total == 1


@pytest.mark.parametrize("row,reason", [
    ({"instruction": "Sum", "output": None}, "bad_type"),  # once trained on the text "None"
    ({"instruction": ["Sum"], "output": "5"}, "bad_type"),
    ({"instruction": "Sum", "instances": []}, "no_instances"),
    ({"instruction": "Sum", "instances": [{"input": "1", "output": ""}]}, "bad_messages"),
    ({"text": ""}, "empty_text"),
    ({"prompt": 3, "completion": "A"}, "bad_type"),
])
def test_sft_bad_row_reasons(row, reason):
    from temper.data.rows import BadRow

    with pytest.raises(BadRow) as err:
        row_to_conversations(row, "f.jsonl:3")
    assert err.value.reason == reason and str(err.value).startswith("f.jsonl:3")


def test_loss_masks(tiny_tokenizer):
    from temper.data.chat import BUILTIN_TEMPLATES

    tpl = BUILTIN_TEMPLATES["chatml"]
    conv = row_to_conversations({"messages": CHAT}, "x")[0]
    eos = tiny_tokenizer.eos_token
    completion = encode_conversation(conv, tiny_tokenizer, tpl, loss_on="completion", max_len=512)
    assert trained_text(completion, tiny_tokenizer) == "2 plus 3 is 5.<|im_end|>\n"  # no EOS after <|im_end|>
    assert eos not in tiny_tokenizer.decode(completion.inputs)
    assistant = encode_conversation(conv, tiny_tokenizer, tpl, loss_on="assistant", max_len=512)
    assert trained_text(assistant, tiny_tokenizer) == "Hello!<|im_end|>\n2 plus 3 is 5.<|im_end|>\n"
    everything = encode_conversation(conv, tiny_tokenizer, tpl, loss_on="all", max_len=512)
    assert everything.num_targets == len(everything.targets)
    # targets are the inputs shifted by one
    assert everything.targets[:-1] == everything.inputs[1:]


# A template that renders nothing after a reply: the one end marker must be an appended EOS.
NO_MARKER_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def _trained_runs(example) -> list[list[int]]:
    """The trained targets, split into runs of consecutive trained positions (one per assistant turn)."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for t in example.targets:
        if t != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(t)
        previous = t
    return runs


@pytest.mark.parametrize("name", ["chatml", "llama3", "plain", "no_marker"])
def test_each_assistant_turn_trains_exactly_one_end_marker(tiny_tokenizer, name):
    """`plain` once trained `<eos>\n\n<eos>` and ChatML `<|im_end|>\n<eos>`: two ends for one turn."""
    from tokenizers import Tokenizer as HFTokenizer

    from temper.data.chat import BUILTIN_TEMPLATES, end_of_turn_strings

    template = BUILTIN_TEMPLATES.get(name, NO_MARKER_TEMPLATE)
    backend = HFTokenizer.from_str(tiny_tokenizer.backend.to_str())
    backend.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])  # Llama 3's
    eos = tiny_tokenizer.eos_token
    tok = type(tiny_tokenizer)(backend, bos_token=tiny_tokenizer.bos_token, eos_token=eos, pad_token=eos)
    assert tok.pad_id == tok.eos_id
    markers = {tok.eos_id, *(tok.token_id(s) for s in end_of_turn_strings(template))}
    conv = row_to_conversations({"messages": CHAT}, "x")[0]
    short = row_to_conversations({"prompt": "Q?", "completion": "A."}, "y")[0]
    examples = [encode_conversation(c, tok, template, loss_on="assistant", max_len=512) for c in (conv, short)]
    for example, turns in zip(examples, (2, 1)):
        runs = _trained_runs(example)
        assert len(runs) == turns
        for i, run in enumerate(runs):
            ends = [t for t in run if t in markers]
            if name == "no_marker" and i < len(runs) - 1:
                assert ends == []  # earlier turns render no end (adding one would change the text)
                continue
            assert len(ends) == 1, (name, tok.decode(run))
            assert tok.decode(run[run.index(ends[0]) + 1:]).strip() == ""  # the marker ends the turn
    batch = pad_batch(examples, tok.pad_id)  # padding with the EOS id never hides a trained marker
    expected = 2 if name == "no_marker" else 3
    assert int(torch.isin(batch.targets, torch.tensor(sorted(markers))).sum()) == expected


def test_truncation_is_counted_never_silent(tiny_tokenizer):
    from temper.data.chat import BUILTIN_TEMPLATES

    tpl = BUILTIN_TEMPLATES["chatml"]
    long_prompt = row_to_conversations({"prompt": "word " * 200, "completion": "short"}, "x")[0]
    long_reply = row_to_conversations({"prompt": "Q", "completion": "answer " * 200}, "y")[0]
    stats = EncodeStats()
    whole = encode_conversation(long_prompt, tiny_tokenizer, tpl, max_len=10_000)
    cut = encode_conversation(long_prompt, tiny_tokenizer, tpl, max_len=32, stats=stats)
    # the prompt keeps its end (the turn that leads into the reply), the reply is whole: it trains, not dropped
    assert len(cut.inputs) == 32 and trained_text(cut, tiny_tokenizer) == "short<|im_end|>\n"
    assert cut.inputs == whole.inputs[-len(cut.inputs):] and cut.targets == whole.targets[-len(cut.targets):]
    kept = encode_conversation(long_reply, tiny_tokenizer, tpl, max_len=48, stats=stats)  # a prompt under 24 tokens
    assert len(kept.inputs) == 48 and kept.num_targets > 0
    assert kept.inputs[:5] == encode_conversation(long_reply, tiny_tokenizer, tpl, max_len=10_000).inputs[:5]
    reply = [t for t in encode_conversation(long_reply, tiny_tokenizer, tpl, max_len=10_000).targets if t >= 0]
    assert [t for t in kept.targets if t >= 0] == reply[:kept.num_targets]  # the reply keeps its start
    assert (stats.examples, stats.dropped, stats.truncated, stats.prompt_truncated) == (2, 0, 2, 1)
    # a prompt and a reply both long: the prompt keeps half the context (its end), the reply the rest (its start)
    both = row_to_conversations({"prompt": "word " * 200, "completion": "answer " * 200}, "z")[0]
    example = encode_conversation(both, tiny_tokenizer, tpl, max_len=32)
    assert len(example.inputs) == 32 and example.targets[:15] == [IGNORE_INDEX] * 15
    assert all(t != IGNORE_INDEX for t in example.targets[15:])  # 16 prompt tokens, then 17 of the reply


def test_packed_batch_gives_the_same_per_example_loss(tiny_tokenizer):
    from temper.data.chat import BUILTIN_TEMPLATES
    from temper.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size)).eval()
    rows = [{"prompt": f"Question number {i}?" + " more" * i, "completion": f"Answer {i}."} for i in range(6)]
    convs = [c for r in rows for c in row_to_conversations(r, "x")]
    examples, _ = encode_all(convs, tiny_tokenizer, BUILTIN_TEMPLATES["chatml"], loss_on="all", max_len=128)
    packed_rows = pack(examples, 160)
    assert len(packed_rows) < len(examples)  # several examples share a row
    batch = packed_batch(packed_rows, 160, tiny_tokenizer.pad_id)
    with torch.no_grad():
        logits = model(batch.inputs, positions=batch.positions, mask=batch.attention_mask())
        token_loss = F.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none", ignore_index=IGNORE_INDEX)
        i = 0
        for b, row in enumerate(packed_rows):
            for s, ex in enumerate(row):
                alone = model(torch.tensor([ex.inputs]))
                expected = F.cross_entropy(alone[0], torch.tensor(ex.targets), reduction="sum")
                got = token_loss[b][batch.segments[b] == s].sum()
                # a segment of a packed row vs the example alone: the same sums in another order
                assert_reorder_close(got, expected, decoder_lengths(model, 160) + (len(ex.targets),))
                i += 1
    assert i == len(examples)


def test_loader_is_deterministic_and_resumable(tiny_tokenizer):
    from temper.data.chat import BUILTIN_TEMPLATES

    convs = [c for i in range(20) for c in row_to_conversations({"prompt": f"q{i}", "completion": f"a{i}"}, "x")]
    examples, _ = encode_all(convs, tiny_tokenizer, BUILTIN_TEMPLATES["chatml"], loss_on="completion", max_len=64)
    a = SFTLoader(examples, batch_size=3, seq_len=64, pad_id=0, seed=1, packing=False)
    first = [a.next_batch().inputs for _ in range(4)]
    b = SFTLoader(examples, batch_size=3, seq_len=64, pad_id=0, seed=1, packing=False)
    b.load_state_dict({"epoch": 0, "position": 2})
    assert torch.equal(b.next_batch().inputs, first[2])


def test_real_data_formats_read():
    si = shared_file("self-instruct", "seed_tasks.jsonl")
    convs, skipped = read_conversations(si)
    assert len(convs) >= 175 and skipped.total == 0
    gsm = shared_file("gsm8k", "test.jsonl")
    convs, _ = read_conversations(gsm, columns={"prompt": "question", "completion": "answer"})
    assert len(convs) == 1319 and "####" in convs[0].messages[1]["content"]


@pytest.mark.parametrize("parts,columns,rows", [
    (("gsm8k", "test.jsonl"), {"prompt": "question", "completion": "answer"}, 1319),
    (("self-instruct", "seed_tasks.jsonl"), {}, 175),
    (("self-instruct", "user_oriented_instructions.jsonl"), {}, 252),
])
def test_real_data_trains_whole_at_the_default_settings(tiny_tokenizer, parts, columns, rows):
    """GSM8K and self-instruct with `temper sft`'s defaults (seq_len=512, bad rows skipped up to 10%): every
    row is read, every conversation trains; the long ones (a 300-token vocabulary makes many) are cut and
    counted, none dropped (a prompt filling the context once dropped 32 of GSM8K's train rows)."""
    import warnings

    from temper.data.chat import BUILTIN_TEMPLATES

    path = shared_file(*parts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bad rows: no warning
        convs, bad = read_conversations(path, columns=columns)
    assert bad.total == 0 and len({c.source.split(" instance")[0] for c in convs}) == rows
    examples, stats = encode_all(convs, tiny_tokenizer, BUILTIN_TEMPLATES["chatml"], loss_on="completion",
                                 max_len=512)
    assert len(examples) == stats.examples == len(convs) and stats.dropped == 0
    assert stats.truncated > 0 and stats.prompt_truncated > 0
    assert all(len(e.inputs) <= 512 and e.num_targets > 0 for e in examples)
    assert f"{len(convs)} examples; {stats.truncated} truncated to fit seq_len" in stats.summary()


def test_gsm8k_without_columns_is_refused_with_the_mapping_to_use():
    with pytest.raises(TemperError, match=r"too many bad SFT rows: 1319 of 1319 read \(100.0%.*1319 no_columns; "
                                          r"first of each: .*test.jsonl:1: no SFT columns found \(keys: question, "
                                          r"answer\).*remap with columns.prompt=question columns.completion=answer"):
        read_conversations(shared_file("gsm8k", "test.jsonl"))


# ----------------------------------------------------------------------------- the recipe


@pytest.fixture()
def sft_data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i + 1}"}], "answer": str(i + 1), "task": "arithmetic"}
            for i in range(40)]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    general = tmp_path / "general.txt"
    general.write_text("\n\n".join(f"Paragraph {i} of plain general text about numbers." for i in range(200)))
    return train, test, general


def run_sft(tmp_path, model_dir, *extra, out="sft"):
    from temper.config import load_config
    from temper.recipes import sft

    cfg = load_config(sft.Config, None, [f"model={model_dir}", f"output_dir={tmp_path / out}", "batch_size=8",
                                         "logging.progress=false", "eval_max_new_tokens=4", *extra])
    return sft.run(cfg)


def test_sft_end_to_end_with_replay_and_packing(tmp_path, tiny_model_dir, sft_data):
    import transformers

    from temper.lineage import read_lineage
    from temper.train.rundir import read_metrics

    train, test, general = sft_data
    summary = run_sft(tmp_path, tiny_model_dir, f"data={train}", f"eval_data={test}", f"general_data={general}",
                      "max_steps=30", "optim.lr=3e-3", "logging.every=10", "logging.eval_every=15",
                      "replay_weight=0.2", "packing=true", "seq_len=128")
    out = tmp_path / "sft"
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert all("replay_loss" in r for r in train_rows)
    evals = [r for r in rows if "exact_match" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]  # before, during, after
    assert all("general_ppl" in r and "answer_accuracy/arithmetic" in r for r in evals)
    assert summary["before"]["eval_examples"] == 8
    lineage = read_lineage(out)
    assert lineage["stage"] == "sft" and lineage["chat_template_trained"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == lineage["chat_template_trained"]  # the template travels with the model
    # transformers' generate stops where temper's does: at EOS and at the template's end of turn
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_sft_bad_input_is_one_line(tmp_path, tiny_model_dir, sft_data, capsys):
    from temper.cli import main

    train, _, _ = sft_data
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code = main(["sft", f"model={tiny_model_dir}", f"data={bad}", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl:1" in err[0] and "assistant" in err[0]
    code = main(["sft", f"model={tiny_model_dir}", f"data={train}", "loss_on=answers"])
    assert code == 2 and "must be one of completion, assistant, all" in capsys.readouterr().err


def test_model_without_template_is_refused(tmp_path, tiny_model_dir, sft_data):
    import shutil

    train, _, _ = sft_data
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TemperError, match="no chat template; pass template=chatml"):
        run_sft(tmp_path, bare, f"data={train}", "max_steps=1")
    summary = run_sft(tmp_path, bare, f"data={train}", "max_steps=2", "template=plain", out="plain")
    assert summary["steps"] == 2


def test_template_mismatch_warns(tmp_path):
    from temper.data.chat import BUILTIN_TEMPLATES
    from temper.lineage import check_template, write_lineage

    write_lineage(tmp_path, {"chat_template_trained": BUILTIN_TEMPLATES["chatml"]})
    assert check_template(tmp_path, BUILTIN_TEMPLATES["chatml"])
    with pytest.warns(UserWarning, match="differs from the one the model was fine-tuned with"):
        assert not check_template(tmp_path, BUILTIN_TEMPLATES["plain"])


def test_sft_accepts_a_template_that_transformers_saved_as_jinja(tmp_path, tiny_model_dir, sft_data):
    """transformers >= 4.43 keeps the template in chat_template.jinja; `temper sft` must find it there."""
    import shutil

    import transformers

    from temper.data.tokenizer import Tokenizer
    from temper.lineage import read_lineage

    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    model_dir = tmp_path / "hf_saved"
    shutil.copytree(tiny_model_dir, model_dir)
    ours = Tokenizer.from_dir(model_dir)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.backend, bos_token=ours.bos_token,
                                              eos_token=ours.eos_token, pad_token=ours.pad_token,
                                              chat_template=template)
    (model_dir / "tokenizer_config.json").unlink()
    hf.save_pretrained(model_dir)
    assert (model_dir / "chat_template.jinja").read_text() == template
    assert "chat_template" not in json.loads((model_dir / "tokenizer_config.json").read_text())

    tokenizer = Tokenizer.from_dir(model_dir)  # what the recipe loads
    assert tokenizer.chat_template == template
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    conv = row_to_conversations({"messages": CHAT}, "x")[0]
    ex = encode_conversation(conv, tokenizer, tokenizer.chat_template, loss_on="assistant", max_len=512)
    rendered = hf.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode([*ex.inputs, ex.targets[-1]]) == rendered
    assert [*ex.inputs, ex.targets[-1]] == hf(rendered, add_special_tokens=False)["input_ids"]

    train, _, _ = sft_data
    summary = run_sft(tmp_path, model_dir, f"data={train}", "max_steps=1")
    assert summary["steps"] == 1
    assert read_lineage(tmp_path / "sft")["chat_template_trained"] == template
