"""Endless, special and huge inputs; judges that hang or exit; messages that say what and where.

The cases that would hang or eat memory if their fix broke run in a subprocess with a time and
an address-space limit, so a regression fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, shared_file

import temper.data.tokenizer as tokenizer_module
import temper.models.hf as hf
from temper.cli import main
from temper.data.preference import (
    PreferenceEncoder,
    PreferencePair,
    encode_pairs,
    longest_token_chars,
)
from temper.data.readers import iter_records, iter_texts
from temper.data.shards import build_shards
from temper.data.tokenizer import text_pieces, train_tokenizer
from temper.data.world import WorldConfig, build_world, write_world
from temper.errors import TemperError
from temper.eval.drift import DriftMonitor
from temper.models import build_model, load_model, preset
from temper.rewards.feedback import CallableReviser
from temper.rewards.judges import Prompt, make_judge
from temper.stages.eval import scored_pairwise

ROOT = Path(__file__).resolve().parent.parent


def guarded(code: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python -c code` with 2 GiB of address space and a time limit: an endless read fails, never hangs."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ----------------------------------------------------------------------------- special and endless files


def test_fifos_devices_and_huge_lines_are_refused_by_name_without_reading_them(tmp_path):
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    (tmp_path / "random.jsonl").symlink_to("/dev/urandom")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "ok.txt").write_text("fine\n")
    (tmp_path / "dir" / "z.txt").symlink_to("/dev/zero")
    with open(tmp_path / "sparse.txt", "wb") as f:  # 1 GiB of zero bytes, no newline: valid UTF-8, never ends
        f.truncate(1 << 30)
    done = guarded("""
        from temper.config import load_yaml
        from temper.data.chat import resolve_template
        from temper.data.readers import iter_texts
        from temper.errors import TemperError
        for call in (lambda: list(iter_texts("fifo.txt")), lambda: list(iter_texts("zero.txt")),
                     lambda: list(iter_texts(["random.jsonl"])), lambda: list(iter_texts("dir")),
                     lambda: list(iter_texts("dir/*.txt")), lambda: load_yaml("zero.yaml"),
                     lambda: resolve_template("fifo.txt"),
                     lambda: list(iter_texts("sparse.txt", max_document_mb=1))):
            try:
                call()
                print("READ")
            except TemperError as e:
                print(e)
        """, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ("fifo.txt: a FIFO (named pipe), not a regular file; temper reads data only from regular "
                        "files (save the stream to a file first)")
    assert lines[1].startswith("zero.txt: a character device (a link to /dev/zero), not a regular file")
    assert lines[2].startswith("random.jsonl: a character device (a link to /dev/urandom)")
    assert lines[3].startswith("dir/z.txt: a character device") and lines[4].startswith("dir/z.txt: a character")
    assert lines[5].startswith("zero.yaml: a character device") and "config file" in lines[5]
    assert lines[6].startswith("fifo.txt: a FIFO") and "chat template" in lines[6]
    assert lines[7].startswith("sparse.txt:1: the line is longer than 1 MiB, the cap on one line or document "
                               "(max_document_mb=1)")


def test_a_fifo_as_data_or_config_is_one_line_on_the_command_line(tmp_path):
    os.mkfifo(tmp_path / "fifo.jsonl")
    done = guarded("""
        from temper.cli import main
        print(main(["pretrain", "data=fifo.jsonl", "output_dir=out"]))
        print(main(["pretrain", "--config", "fifo.jsonl"]))
        """, tmp_path)
    assert done.stdout.split() == ["2", "2"], done.stderr
    assert done.stderr.strip().splitlines() == [
        "temper pretrain: error: fifo.jsonl: a FIFO (named pipe), not a regular file; temper reads data only from "
        "regular files (save the stream to a file first)",
        "temper pretrain: error: fifo.jsonl: a FIFO (named pipe), not a regular file; temper reads config file only "
        "from regular files (save the stream to a file first)"]  # not "not found", and not a wait for a writer


def test_a_line_paragraph_or_file_past_the_cap_names_file_and_line(tmp_path, capsys):
    big = "word " * (300 * 1024)  # 1.5 MiB
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n' + json.dumps({"text": big}) + "\n")
    with pytest.raises(TemperError, match=r"rows.jsonl:3: the line is longer than 1 MiB, the cap on one line or "
                                          r"document \(max_document_mb=1\)"):
        list(iter_texts(tmp_path / "rows.jsonl", max_document_mb=1))
    assert len(list(iter_texts(tmp_path / "rows.jsonl", max_document_mb=2))) == 3
    (tmp_path / "para.txt").write_text("intro\n\n" + "a short line of text\n" * 60000)  # 1.2 MiB, no blank line
    with pytest.raises(TemperError, match=r"para.txt:3: a paragraph \(lines 3-\d+, no blank line\) is longer than "
                                          r"1 MiB"):
        list(iter_texts(tmp_path / "para.txt", max_document_mb=1))
    with pytest.raises(TemperError, match=r"para.txt: the file \(one document with text_mode=file\) is longer"):
        list(iter_texts(tmp_path / "para.txt", text_mode="file", max_document_mb=1))
    # the key on the command line reaches the reader
    (tmp_path / "long.txt").write_text(big + "\n")
    assert main(["pretrain", f"data={tmp_path / 'long.txt'}", "max_document_mb=1", f"output_dir={tmp_path / 'o'}"]) == 2
    assert f"{tmp_path / 'long.txt'}:1: the line is longer than 1 MiB" in capsys.readouterr().err


def test_the_shared_real_data_sets_are_within_the_default_cap():
    hh = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    assert sum(1 for _ in iter_records(hh)) == 2312
    assert sum(1 for _ in iter_records(shared_file("gsm8k", "train.jsonl"))) == 7473
    assert len(list(iter_texts(shared_file("tinyshakespeare.txt"), text_mode="file"))) == 1
    assert len(list(iter_texts(shared_file("wikitext2", "valid.txt")))) > 100


# ----------------------------------------------------------------------------- memory: long texts in pieces


def test_the_tokenizer_trainer_gets_a_long_text_in_pieces_and_learns_the_same_vocabulary(monkeypatch):
    text = " ".join(SAMPLE_TEXT.split()) * 20  # one line, no newline
    assert "".join(text_pieces(text, 500)) == text
    assert max(len(p) for p in text_pieces(text, 500)) <= 500
    whole = train_tokenizer([text], vocab_size=300).backend.to_str()

    fed: list[int] = []
    real = tokenizer_module.HFTokenizer

    class Recording:  # the real backend, with what the trainer is handed written down
        def __init__(self, model) -> None:
            object.__setattr__(self, "real", real(model))

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __setattr__(self, name, value) -> None:
            setattr(self.real, name, value)

        def train_from_iterator(self, texts, trainer) -> None:
            def spy():
                for t in texts:
                    fed.append(len(t))
                    yield t
            self.real.train_from_iterator(spy(), trainer=trainer)

    monkeypatch.setattr(tokenizer_module, "HFTokenizer", Recording)
    monkeypatch.setattr(tokenizer_module, "TRAIN_PIECE_CHARS", 500)
    pieces = train_tokenizer([text], vocab_size=300)
    assert len(fed) > 1 and max(fed) <= 500  # never the whole line at once
    assert pieces.backend.to_str() == whole


@pytest.mark.parametrize("rows", ["strings", "messages"])
def test_a_long_preference_row_is_cut_by_characters_before_it_is_tokenised(tiny_tokenizer, monkeypatch, rows):
    words = SAMPLE_TEXT.split()
    long_prompt = " ".join(words * 30)
    chosen, rejected = " " + " ".join(words[3:] * 30), " " + " ".join(words[5:] * 30)
    if rows == "messages":
        pair = PreferencePair([{"role": "user", "content": long_prompt}],
                              [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}],
                              "pairs.jsonl:1")
    else:
        pair = PreferencePair(long_prompt, chosen, rejected, "pairs.jsonl:1")
    template = tiny_tokenizer.chat_template if rows == "messages" else None
    max_len = 24
    bound = 2 * (max_len + 2) * longest_token_chars(tiny_tokenizer)
    assert len(long_prompt) > 5 * bound

    encoded: list[int] = []
    real_encode = PreferenceEncoder._encode

    def spy(self, text):
        encoded.append(len(text))
        return real_encode(self, text)

    monkeypatch.setattr(PreferenceEncoder, "_encode", spy)
    cut, cut_stats = encode_pairs([pair], tiny_tokenizer, template, max_len=max_len)
    assert max(encoded) <= 2 * bound + 200  # prompt end + answer start (+ the template's markers), not the row
    monkeypatch.setattr(PreferenceEncoder, "_encode", real_encode)
    real_init = PreferenceEncoder.__init__

    def uncut_init(self, *args, **kwargs):  # the whole row tokenised, as before the cut
        real_init(self, *args, **kwargs)
        self.max_chars = 10**9

    monkeypatch.setattr(PreferenceEncoder, "__init__", uncut_init)
    whole, whole_stats = encode_pairs([pair], tiny_tokenizer, template, max_len=max_len)
    assert (cut[0].prompt_ids, cut[0].chosen_ids, cut[0].rejected_ids) == \
        (whole[0].prompt_ids, whole[0].chosen_ids, whole[0].rejected_ids)
    assert cut_stats.counts() == whole_stats.counts() and cut_stats.truncated == 1


# ----------------------------------------------------------------------------- judges that hang or exit

JUDGES = """
import sys
import time


def sleepy(prompt, response):
    time.sleep(5)
    return 1.0


def exits(prompt, response):
    sys.exit(3)


def interrupted(prompt, response):
    raise KeyboardInterrupt


def fails_first(prompt, response):
    if "first" in prompt:
        raise RuntimeError("judge service timed out")
    return float(len(response))


def raises(prompt, response):
    raise RuntimeError("judge service timed out")


def revise_slowly(prompt, response, principle):
    time.sleep(5)
    return response + "!"
"""


@pytest.fixture
def judges(tmp_path, monkeypatch):
    name = f"judges_r2_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_judge_that_never_returns_stops_at_its_timeout_naming_judge_and_sample(judges):
    judge = make_judge(f"callable:{judges}:sleepy", timeout=0.2)
    prompts = [Prompt.from_text("q", source="prompts.jsonl:4")]
    start = time.perf_counter()
    with pytest.raises(TemperError, match=rf"prompts.jsonl:4 sample 0: judge callable:{judges}:sleepy did not return "
                                          r"within judge_timeout=0.2 s"):
        judge.rank(prompts, [["a", "b"]])
    assert time.perf_counter() - start < 3
    reviser = CallableReviser(f"{judges}:revise_slowly", timeout=0.2)
    with pytest.raises(TemperError, match=rf"prompts.jsonl:4 response 0: judge constitution:callable:{judges}:"
                                          r"revise_slowly did not return within judge_timeout=0.2 s"):
        reviser.revise_all(prompts, ["a"], ["Be brief."])
    with pytest.raises(TemperError, match="judge_timeout must be a number of seconds >= 0"):
        make_judge(f"callable:{judges}:sleepy", timeout=-1)


def test_a_judge_that_calls_sys_exit_fails_on_that_sample_and_ctrl_c_still_stops(judges):
    prompts = [Prompt.from_text("q", source="prompts.jsonl:2")]
    strict = make_judge(f"callable:{judges}:exits", skip_bad=False)
    with pytest.raises(TemperError, match=rf"prompts.jsonl:2 sample 0: judge callable:{judges}:exits SystemExit: 3 "
                                          r"\(the judge called sys.exit\)"):
        strict.rank(prompts, [["a"]])
    lenient = make_judge(f"callable:{judges}:exits", timeout=0)  # called on this thread: the same
    assert lenient.rank(prompts, [["a", "b"]]) == [[None, None]]
    assert lenient.stats.bad == {"exception": 2} and "SystemExit: 3" in lenient.stats.first_bad["exception"]
    with pytest.raises(KeyboardInterrupt):
        make_judge(f"callable:{judges}:interrupted").rank(prompts, [["a"]])


def test_an_eval_judge_failing_on_some_answers_leaves_them_out_and_on_all_gives_no_win_rate(judges):
    questions, refs = ["first question", "second", "third"], ["x", "y", "z"]
    report = scored_pairwise(f"callable:{judges}:fails_first", "t", questions, refs, ["aa", "a", "aaa"],
                             ["a", "aa", "a"], "cpu")
    assert (report["n"], report["unjudged"], report["wins_1"], report["wins_2"]) == (2, 1, 1, 1)
    failed = scored_pairwise(f"callable:{judges}:raises", "t", questions, refs, ["a"] * 3, ["b"] * 3, "cpu")
    assert failed["win_rate_1"] is None and failed["n"] == 0 and failed["unjudged"] == 3
    assert failed["failed"].startswith(f"judge callable:{judges}:raises failed on every answer of 3 questions "
                                       "(6 exception; first: t row 1 sample 0: RuntimeError: judge service timed out)")


def test_temper_eval_with_a_judge_that_always_fails_writes_no_win_rate(tmp_path, tiny_model_dir, judges, capsys):
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"What is {i}?", "answer": str(i)}) + "\n"
                                               for i in range(2)))
    (tmp_path / "qa.yaml").write_text("name: qa\ntype: generation\ndata: qa.jsonl\nprompt: '{question}'\n"
                                      "generation: {max_new_tokens: 2}\n")
    out = tmp_path / "eval"
    code = main(["eval", f"models=[{tiny_model_dir},{tiny_model_dir}]", f"tasks={tmp_path / 'qa.yaml'}",
                 f"judge=callable:{judges}:raises", f"output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"temper eval: error: qa: judge callable:{judges}:raises failed on every "
                                            "answer of 2 questions")
    table = (out / "results.md").read_text()  # the models' scores are kept, with no win rate
    assert "model 1 win rate" not in table and "95% CI" not in table and "qa: exact_match" in table
    assert "judge on qa: no win rate: judge" in table
    assert json.loads((out / "results.json").read_text())["judge"]["qa"]["win_rate_1"] is None


def test_contamination_eval_fields_naming_no_field_is_an_error(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog"}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "a question", "answer": "an answer"}) + "\n")
    assert main(["eval", "contamination", f"train={tmp_path / 'train.jsonl'}", f"eval={tmp_path / 'test.jsonl'}",
                 "eval_fields=questoin"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"temper eval contamination: error: eval_fields=questoin: no row of {tmp_path / 'test.jsonl'} has a field 'questoin' "
        "(did you mean 'question'?); its fields: answer, question")
    assert main(["eval", "contamination", f"train={tmp_path / 'train.jsonl'}", f"eval={tmp_path / 'test.jsonl'}",
                 "eval_fields=question"]) == 0


# ----------------------------------------------------------------------------- the world task, relative worlds


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_world_facts_mc_writes_only_under_output_dir_and_a_relative_world_works(tmp_path, tiny_model_dir,
                                                                                  monkeypatch, capsys):
    world = tmp_path / "w"
    write_world(build_world(WorldConfig(num_people=8, num_towns=4, docs_per_person=1, docs_per_town=1,
                                        num_arithmetic_docs=2, num_dialogue_docs=2, num_sft_train=2, num_sft_test=2,
                                        num_pref_train=2, num_pref_test=2, num_rl_train=2, num_rl_test=2)), world)
    assert not (world / "eval" / "facts_mc.jsonl").exists()
    before = tree(world)
    monkeypatch.chdir(tmp_path)
    code = main(["eval", f"model={tiny_model_dir}", "tasks=world_facts_mc", "world=w", "output_dir=out"])
    assert code == 0, capsys.readouterr().err
    assert tree(world) == before  # nothing written into the input world
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["per_model"][str(tiny_model_dir)]["world_facts_mc"]["examples"] == 3 * 8


# ----------------------------------------------------------------------------- messages that say what and where


def test_an_unreadable_weights_file_says_permission_denied(tiny_model_dir, monkeypatch):
    weights = tiny_model_dir / "model.safetensors"
    real_open = open

    def safetensors_open(path, *args, **kwargs):  # what safetensors 0.x raises for any file it cannot open
        raise FileNotFoundError(f"No such file or directory: {path}")

    def guarded_open(path, *args, **kwargs):
        if Path(path) == weights:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(hf, "safe_open", safetensors_open)
    monkeypatch.setattr("builtins.open", guarded_open)
    with pytest.raises(TemperError, match=rf"^{weights}: cannot read the weights file \(permission denied\)$"):
        load_model(tiny_model_dir)
    monkeypatch.setattr("builtins.open", real_open)  # readable, but not safetensors: that is what is said
    with pytest.raises(TemperError, match=r"not a readable safetensors file \(No such file or directory"):
        load_model(tiny_model_dir)


def test_an_adapter_directory_given_as_a_model_says_so_and_how_to_use_it(tmp_path, capsys):
    adapter = tmp_path / "my-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                             "base_model_name_or_path": "runs/base"}))
    with pytest.raises(TemperError, match=rf"^{adapter}: a PEFT adapter of runs/base \(adapter_config.json, no "
                                          r"config.json\), not a model: give its base, runs/base, or merge the "
                                          rf"adapter into it first \(temper merge model=runs/base adapter={adapter} "):
        hf.read_hf_config(adapter)
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "hello"}]}) + "\n")
    assert main(["sft", f"model={adapter}", f"data={tmp_path / 'chats.jsonl'}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "a PEFT adapter of runs/base" in capsys.readouterr().err


def test_the_drift_monitor_sizes_itself_to_a_small_validation_split(tmp_path, tiny_tokenizer):
    docs = [p for p in SAMPLE_TEXT.split("\n\n") if p.strip()]
    shards = build_shards(docs, tiny_tokenizer, tmp_path / "shards", val_documents=docs[:1])
    val_tokens = json.loads((shards / "index.json").read_text())["splits"]["val"]["num_tokens"]
    assert 2 < val_tokens < 256
    monitor = DriftMonitor(shards, seq_len=256, max_batches=4)  # seq_len 256, batches of 8: more than exists
    assert monitor.window == val_tokens - 1
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size)).eval()
    assert torch.isfinite(torch.tensor(monitor.perplexity(model, device=torch.device("cpu"))))
    replay = monitor.replay_loader(batch_size=2, seed=0)
    assert replay.next_batch()[0].shape[0] == 2
    with pytest.raises(TemperError, match=r"training split holds \d+ tokens, fewer than the \d+ one replay batch of "
                                          r"replay_batch_size=100000 needs"):
        monitor.replay_loader(batch_size=100000, seed=0)
