"""Regenerate docs/bad-inputs.md: what temper prints for each bad or hostile input.

    python docs/bad_inputs.py            # writes docs/bad-inputs.md (a few minutes on 2 CPU cores)
    python docs/bad_inputs.py --check    # also exit 1 if a case shows a traceback or exits 0 when it should not

Every case runs the real command line (`python -m temper ...`) in a scratch directory with
tiny inputs made here, and the table keeps the command, its exit status and the last line it
printed on stderr. A case marked `ok` is expected to succeed (the input is handled, e.g. a
UTF-8 BOM is dropped); every other case must exit 2 with one line and no traceback. A case
may name paths (a 4th element) whose bytes and inode type must be unchanged afterwards: a
change fails the case as "destroyed data".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = "\n\n".join(f"Paragraph {i}: the river runs past the mill and the miller counts sacks of flour."
                   for i in range(120))
TINY = ["model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=4", "samples=0", "peak_flops=1e9",
        "logging.progress=false"]
DPO = ["seq_len=64", "batch_size=2", "max_steps=1", "peak_flops=1e9", "logging.progress=false"]
ONLINE = ["rounds=1", "prompts=questions.jsonl", "samples_per_prompt=2", "max_new_tokens=8",
          *(f"dpo.{setting}" for setting in DPO)]
SHORTHANDS = {"$TINY": TINY, "$DPO": DPO, "$ONLINE": ONLINE}
JUDGES = """calls = 0


def raises(prompt, response):
    raise RuntimeError("judge service timed out")


def text(prompt, response):
    return "7/10"


def flaky(prompt, response):  # the first three samples: an exception, text, NaN; then a score
    global calls
    calls += 1
    if calls == 1:
        raise RuntimeError("judge service timed out")
    return {2: "7/10", 3: float("nan")}.get(calls, float(calls))
"""


def temper(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TEMPER_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "temper", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, errors="replace", timeout=600)


def setup(work: Path) -> None:
    """Tiny inputs: text, a pretrained model, a second base, a LoRA adapter, data files."""
    (work / "corpus.txt").write_text(TEXT)
    for name, seed in (("base", 0), ("other-base", 1)):
        done = temper(["pretrain", *TINY, "data=corpus.txt", "max_steps=2", "checkpoint.every=1", f"seed={seed}",
                       f"output_dir={name}"], work)
        assert done.returncode == 0, done.stderr
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(24)]
    (work / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = temper(["sft", "model=base", "data=chats.jsonl", "max_steps=1", "batch_size=4", "seq_len=64",
                   "peft.method=lora", "eval_samples=0", "logging.progress=false", "output_dir=lora"], work)
    assert done.returncode == 0, done.stderr
    (work / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (work / "empty.txt").write_text("\n\n  \n")
    (work / "rows.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    (work / "nulls.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (work / "numbers.jsonl").write_text('{"text": 42}\n')
    (work / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
    (work / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet")
    (work / "bom.txt").write_bytes("\ufeff".encode() + TEXT.encode())
    (work / "no-assistant.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (work / "prompts.jsonl").write_text('{"prompt": "The river"}\n{"prompt": \n')
    (work / "dup.yaml").write_text("max_steps: 10\noptim:\n  lr: 1.0e-3\n  lr: 3.0e-3\n")
    (work / "bad.yaml").write_text("max_steps: [10\n")
    (work / "a_file").write_text("x")
    (work / "utf16.txt").write_bytes(TEXT[:200].encode("utf-16"))
    (work / "rows.json").write_text('{"text": "one"}\n{"text": "two"}\n')
    good = [{"prompt": f"Paragraph {i}: the river", "chosen": " runs past the mill.", "rejected": " counts sacks."}
            for i in range(4)]
    bad = {"same": {"prompt": "The mill", "chosen": " turns.", "rejected": " turns."},
           "empty-answer": {"prompt": "The mill", "chosen": " turns.", "rejected": ""},
           "long-prompt": {"prompt": "the river runs past the mill " * 20, "chosen": " yes.", "rejected": " no."},
           "no-shared-prompt": {"chosen": "The river runs.", "rejected": "A mill turns."},
           "prompt-in-one-answer": {"prompt": "The river", "chosen": "The river runs.", "rejected": " A mill turns."}}
    for name, row in bad.items():  # a bad row among good ones
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*good[:2], row, *good[2:]]))
    (work / "all-bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*good, *bad.values()]))
    many = [{**good[i % 4], "prompt": f"Row {i}: the river"} for i in range(12)]  # one bad row in thirteen
    (work / "one-in-13.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*many[:6], bad["empty-answer"],
                                                                                 *many[6:]]))
    (work / "gsm8k-like.jsonl").write_text("".join(json.dumps({"question": f"What is {i} plus 1?",
                                                               "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n"
                                                   for i in range(8)))
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    chat_pairs = [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
                   "chosen": [{"role": "assistant", "content": str(i + 1)}],
                   "rejected": [{"role": "assistant", "content": str(i + 2)}]} for i in range(4)]
    (work / "chat-pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_pairs))
    (work / "questions.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?"}) + "\n"
                                                  for i in range(6)))
    (work / "my_judges.py").write_text(JUDGES)
    shutil.copytree(work / "base", work / "bin-only")
    (work / "bin-only" / "model.safetensors").rename(work / "bin-only" / "pytorch_model.bin")
    shutil.copytree(work / "base", work / "nan-model")
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(work / "nan-model" / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name].clone().fill_(float("nan"))
    save_file(weights, str(work / "nan-model" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(work / "base", work / "int-model")
    weights = load_file(work / "int-model" / "model.safetensors")
    weights[name] = weights[name].to(torch.int64)
    save_file(weights, str(work / "int-model" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(work / "base", work / "no-template")
    config = json.loads((work / "no-template" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (work / "no-template" / "tokenizer_config.json").write_text(json.dumps(config))
    (work / "no-template" / "chat_template.jinja").unlink(missing_ok=True)
    shutil.copytree(work / "base", work / "damaged")  # a run whose newest checkpoint is cut short
    newest = work / "damaged" / "checkpoints" / "step_00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    (work / "damaged" / ".temper.lock").unlink(missing_ok=True)
    del torch
    for extra in (setup_writes, setup_divergence, setup_settings, setup_inputs, setup_grpo, setup_ppo, setup_reward,
                  setup_curate, setup_export, setup_encoder, setup_quantize, setup_run, setup_report):
        extra(work)


# (input, command args, expected: "error" = exit 2 and one line, "ok" = exit 0)
# The cases come in sections, one per class of mistake; `--section NAME` runs one.
FIRST_ROUND: list[tuple[str, list[str], str]] = [
    ("a misspelt key", ["pretrain", "optim.lrr=1e-3"], "error"),
    ("a renamed key", ["pretrain", "val_data=corpus.txt"], "error"),
    ("a value of the wrong type", ["pretrain", "max_steps=ten"], "error"),
    ("a negative learning rate", ["pretrain", "optim.lr=-1e-3"], "error"),
    ("a NaN learning rate", ["pretrain", "optim.lr=nan"], "error"),
    ("a zero loss chunk", ["pretrain", "loss_chunk=0"], "error"),
    ("a warmup ratio above 1", ["pretrain", "schedule.warmup_ratio=1.5"], "error"),
    ("a validation share of 100%", ["pretrain", "data=corpus.txt", "eval_fraction=1"], "error"),
    ("an option the mode ignores", ["pretrain", "eval_data=corpus.txt"], "error"),
    ("a key twice in one YAML file", ["pretrain", "--config", "dup.yaml"], "error"),
    ("YAML that does not parse", ["pretrain", "--config", "bad.yaml"], "error"),
    ("a config file that does not exist", ["pretrain", "--config", "nope.yaml"], "error"),
    ("an unknown stage", ["pretrian"], "error"),
    ("fp16 on a CPU", ["pretrain", "precision=fp16", "device=cpu"], "error"),
    ("resume and overwrite together", ["pretrain", "resume=auto", "overwrite=true"], "error"),
    ("a data file that does not exist", ["pretrain", *TINY, "data=missing.txt", "output_dir=o1"], "error"),
    ("Latin-1 bytes in a .txt file", ["pretrain", *TINY, "data=latin1.txt", "output_dir=o2"], "error"),
    ("a JSONL row without the text field", ["pretrain", *TINY, "data=rows.jsonl", "output_dir=o3"], "error"),
    ("a JSONL row whose text is null", ["pretrain", *TINY, "data=nulls.jsonl", "output_dir=o4"], "error"),
    ("a JSONL row whose text is a number", ["pretrain", *TINY, "data=numbers.jsonl", "output_dir=o5"], "error"),
    ("a JSONL line cut short", ["pretrain", *TINY, "data=broken.jsonl", "output_dir=o6"], "error"),
    ("a text file with no text", ["pretrain", *TINY, "data=empty.txt", "output_dir=o7"], "error"),
    ("a corrupt parquet file", ["pretrain", *TINY, "data=corrupt.parquet", "output_dir=o8"], "error"),
    ("a UTF-8 BOM at the start of a file (dropped, not trained on)",
     ["pretrain", *TINY, "data=bom.txt", "max_steps=1", "output_dir=o9"], "ok"),
    ("a damaged newest checkpoint (the one before is used)",
     ["pretrain", *TINY, "data=corpus.txt", "max_steps=3", "resume=auto", "output_dir=damaged"], "ok"),
    ("a rerun into a finished run's directory", ["pretrain", *TINY, "data=corpus.txt", "max_steps=2",
                                                 "output_dir=base"], "error"),
    ("resuming with another batch size", ["pretrain", *TINY, "data=corpus.txt", "max_steps=4", "batch_size=2",
                                          "resume=auto", "output_dir=base"], "error"),
    ("output_dir that is a file", ["pretrain", *TINY, "data=corpus.txt", "output_dir=a_file"], "error"),
    ("output_dir below a file", ["pretrain", *TINY, "data=corpus.txt", "output_dir=a_file/run"], "error"),
    ("sft into the base model's own directory", ["sft", "model=base", "data=chats.jsonl", "output_dir=base"],
     "error"),
    ("a model directory that does not exist", ["generate", "model=nowhere", "prompt=The river"], "error"),
    ("a model directory with only pytorch_model.bin", ["generate", "model=bin-only", "prompt=The river"], "error"),
    ("NaN weights", ["generate", "model=nan-model", "prompt=The river"], "error"),
    ("a model without a chat template, for SFT", ["sft", "model=no-template", "data=chats.jsonl",
                                                  "output_dir=o10"], "error"),
    ("a conversation without an assistant turn", ["sft", "model=base", "data=no-assistant.jsonl",
                                                  "output_dir=o11"], "error"),
    ("SFT rows of another format (GSM8K's question/answer, no columns=)",
     ["sft", "model=base", "data=gsm8k-like.jsonl", "output_dir=o34"], "error"),
    ("a choice that is not offered", ["sft", "model=base", "data=chats.jsonl", "loss_on=answers"], "error"),
    ("a prompt that is not UTF-8", ["generate", "model=base", "prompt=caf\udce9"], "error"),
    ("an empty prompt", ["generate", "model=base", "prompt="], "error"),
    ("a prompt and a prompts file", ["generate", "model=base", "prompt=x", "prompts_file=prompts.jsonl"], "error"),
    ("a prompts file with a broken line", ["generate", "model=base", "prompts_file=prompts.jsonl"], "error"),
    ("best-of-N with nothing to rank by", ["generate", "model=base", "prompts_file=questions.jsonl", "best_of=4"],
     "error"),
    ("best-of-N with greedy decoding", ["generate", "model=base", "prompts_file=questions.jsonl", "best_of=4",
                                        "rank_by=world", "temperature=0"], "error"),
    ("best-of-N ranked by the world's checker, rows without answers",
     ["generate", "model=base", "prompts_file=questions.jsonl", "best_of=2", "rank_by=world"], "error"),
    ("outcome labels for a pair reward model", ["reward", "model=base", "step_labels=last", "output_dir=o40"],
     "error"),
    ("merge into the base's own directory", ["merge", "model=base", "adapter=lora", "output_dir=base"], "error"),
    ("merge onto another base", ["merge", "model=other-base", "adapter=lora", "output_dir=o12"], "error"),
    ("evaluating an empty text file", ["eval", "model=base", "data=empty.txt", "output_dir=o13"], "error"),
    ("a judge that does not exist", ["eval", "models=[base,other-base]", "tasks=world_chat_qa", "judge=rulez",
                                     "output_dir=o14"], "error"),
    ("a task that needs the built-in world, without one", ["eval", "model=base", "tasks=world_facts_mc",
                                                           "output_dir=o16"], "error"),
    ("a UTF-16 text file", ["pretrain", *TINY, "data=utf16.txt", "output_dir=o17"], "error"),
    ("JSON Lines in a .json file", ["pretrain", *TINY, "data=rows.json", "output_dir=o18"], "error"),
    ("int64 weights", ["generate", "model=int-model", "prompt=The river"], "error"),
    ("a task that does not exist", ["eval", "model=base", "tasks=no_such_task", "output_dir=o15"], "error"),
    ("an unknown strategy", ["pretrain", "strategy=zero3"], "error"),
    ("tensor parallelism in one process", ["pretrain", "strategy=none", "parallel.tp=2"], "error"),
    ("a global batch the micro-batches cannot make", ["pretrain", *TINY, "data=corpus.txt", "global_batch_size=6",
                                                      "output_dir=o20"], "error"),
    ("global_batch_size and grad_accum together", ["pretrain", *TINY, "data=corpus.txt", "global_batch_size=8",
                                                   "grad_accum=2", "output_dir=o21"], "error"),
    ("pipeline stages for fine-tuning", ["sft", "model=base", "data=chats.jsonl", "parallel.pp=2"], "error"),
    ("adapters with FSDP", ["sft", "model=base", "data=chats.jsonl", "peft.method=lora", "strategy=fsdp"], "error"),
    ("one preference pair in five whose chosen equals its rejected (20%: above max_bad_row_fraction=0.1)",
     ["dpo", "model=base", "data=same.jsonl", *DPO, "output_dir=o22"], "error"),
    ("a preference pair with an empty answer, with skip_bad_rows=false (strict: the first bad row stops)",
     ["dpo", "model=base", "data=empty-answer.jsonl", "skip_bad_rows=false", *DPO, "output_dir=o23"], "error"),
    ("one preference pair in thirteen with an empty answer (skipped, counted, named)",
     ["dpo", "model=base", "data=one-in-13.jsonl", *DPO, "output_dir=o35"], "ok"),
    ("a preference prompt longer than the context (its end kept, counted as truncated)",
     ["dpo", "model=base", "data=long-prompt.jsonl", *DPO, "output_dir=o24"], "ok"),
    ("an implicit-prompt pair (chosen + rejected only) with no shared start",
     ["dpo", "model=base", "data=no-shared-prompt.jsonl", *DPO, "output_dir=o25"], "error"),
    ("a prompt repeated at the start of one answer but not the other",
     ["dpo", "model=base", "data=prompt-in-one-answer.jsonl", *DPO, "output_dir=o26"], "error"),
    ("each of the bad pairs above, with max_bad_row_fraction=1 (skipped and counted, however many)",
     ["dpo", "model=base", "data=all-bad.jsonl", "max_bad_row_fraction=1", *DPO, "output_dir=o27"], "ok"),
    ("message rows for a model without a chat template", ["dpo", "model=no-template", "data=chat-pairs.jsonl",
                                                          *DPO, "output_dir=o28"], "error"),
    ("a column rename to a column the file lacks", ["dpo", "model=base", "data=pairs.jsonl", "columns.chosen=good",
                                                    *DPO, "output_dir=o29"], "error"),
    ("a column rename of a column temper does not read", ["dpo", "columns.chosn=good"], "error"),
    ("a misspelt DPO loss", ["dpo", "loss_type=sigmod"], "error"),
    ("fewer loss weights than losses", ["dpo", "loss_type=[sigmoid,sft]", "loss_weights=[1]"], "error"),
    ("the adapter as reference, without an adapter", ["dpo", "reference=adapter"], "error"),
    ("a judge that raises, with skip_bad_judgements=false",
     ["online-dpo", "model=base", *ONLINE, "judge=callable:my_judges:raises", "skip_bad_judgements=false",
      "output_dir=o30"], "error"),
    ("a judge that returns text, with skip_bad_judgements=false",
     ["online-dpo", "model=base", *ONLINE, "judge=callable:my_judges:text", "skip_bad_judgements=false",
      "output_dir=o31"], "error"),
    ("a judge that raises or returns text or NaN on a few samples (skipped and counted)",
     ["online-dpo", "model=base", *ONLINE, "judge=callable:my_judges:flaky", "output_dir=o32"], "ok"),
    ("a judge that fails on every sample", ["online-dpo", "model=base", *ONLINE, "judge=callable:my_judges:raises",
                                            "output_dir=o33"], "error"),
    ("an online-DPO key given to offline DPO", ["dpo", "rounds=2", "judge=rule:world"], "error"),
    ("a round's DPO setting the rounds set themselves", ["online-dpo", "model=base", "dpo.data=pairs.jsonl"], "error"),
]


# ----------------------------------------------------------------------------- writes
# Every file or directory a command writes is claimed: never a device, an input, a model it did not make.


WORLD = ["num_people=4", "num_towns=2", "docs_per_person=2", "docs_per_town=1", "num_arithmetic_docs=4",
         "num_dialogue_docs=4", "num_sft_train=4", "num_sft_test=2", "num_pref_train=4", "num_pref_test=2",
         "num_rl_train=4", "num_rl_test=2"]


def setup_writes(work: Path) -> None:
    """Targets that must survive: special files, an earlier output, a world, a tokenizer, a model
    temper did not write, runs with caches to resume."""
    os.mkfifo(work / "pipe")
    (work / "fifo-link").symlink_to(work / "pipe")
    (work / "dev-link").symlink_to("/dev/null")
    try:  # a character device of our own (root only): /dev/null's numbers, in the scratch directory
        os.mknod(work / "char-dev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(work / "char-dev")
    (work / "results.jsonl").write_text('{"an earlier": "result"}\n')
    (work / "texts").mkdir()
    (work / "texts" / "corpus.txt").write_text(TEXT)
    for argv in (["world", "output_dir=world", *WORLD], ["tokenizer", "data=corpus.txt", "vocab_size=300",
                                                          "output_dir=tok"],
                 ["dpo", "model=base", "data=pairs.jsonl", *DPO, "reference=precomputed", "checkpoint.every=1",
                  "output_dir=dpo-run"]):
        done = temper(argv, work)
        assert done.returncode == 0, done.stderr
    shutil.copytree(work / "base", work / "resumable")  # a pretraining run with its data/ and tokenizer/ caches
    (work / "resumable" / ".temper.lock").unlink(missing_ok=True)
    shutil.copytree(work / "base", work / "hf-model", ignore=shutil.ignore_patterns(
        "temper.json", "checkpoints", "metrics.jsonl", "summary.json", "config.yaml", "data", "tokenizer", ".temper*"))


RESUME = ["pretrain", *TINY, "data=corpus.txt", "max_steps=3", "checkpoint.every=1", "output_dir=resumable",
          "resume=auto"]
GENERATE = ["generate", "model=base", "prompts_file=questions.jsonl", "max_new_tokens=2"]
CONTAMINATION = ["eval", "contamination", "train=corpus.txt", "eval=questions.jsonl"]
# (input, command args, expected, the paths whose bytes and inode type must be unchanged afterwards)
WRITES: list[tuple] = [
    ("generate into a FIFO", [*GENERATE, "output_file=pipe"], "error", ["pipe"]),
    ("generate into a symlink to a FIFO", [*GENERATE, "output_file=fifo-link"], "error", ["fifo-link", "pipe"]),
    ("generate into a character device", [*GENERATE, "output_file=char-dev", "overwrite=true"], "error",
     ["char-dev"]),
    ("generate into a symlink to /dev/null", [*GENERATE, "output_file=dev-link", "overwrite=true"], "error",
     ["dev-link"]),
    ("generate into a model's weights", [*GENERATE, "output_file=base/model.safetensors", "overwrite=true"], "error",
     ["base"]),
    ("generate into its own prompts file", [*GENERATE, "output_file=questions.jsonl", "overwrite=true"], "error",
     ["questions.jsonl"]),
    ("generate into an existing file", [*GENERATE, "output_file=results.jsonl"], "error", ["results.jsonl"]),
    ("generate into a file inside a temper output directory", [*GENERATE, "output_file=world/mine.jsonl"], "error",
     ["world"]),
    ("generate into a folder that does not exist", [*GENERATE, "output_file=no/such/out.jsonl"], "error"),
    ("overwrite=true without an output file", ["generate", "model=base", "prompt=The", "overwrite=true"], "error"),
    ("generate over an existing file with overwrite=true", [*GENERATE, "output_file=results.jsonl",
                                                            "overwrite=true"], "ok"),
    ("contamination report into its eval file", [*CONTAMINATION, "output=questions.jsonl", "overwrite=true"],
     "error", ["questions.jsonl"]),
    ("contamination report into a FIFO", [*CONTAMINATION, "output=pipe"], "error", ["pipe"]),
    ("contamination report into an adapter's weights", [*CONTAMINATION, "output=lora/adapter_model.safetensors",
                                                        "overwrite=true"], "error", ["lora"]),
    ("contamination report into an existing file", [*CONTAMINATION, "output=results.jsonl"], "error",
     ["results.jsonl"]),
    ("contamination report into a folder that does not exist", [*CONTAMINATION, "output=no/r.json"], "error"),
    ("a tokenizer into a model directory", ["tokenizer", "data=corpus.txt", "output_dir=base"], "error", ["base"]),
    ("a tokenizer into a model directory, overwrite=true", ["tokenizer", "data=corpus.txt", "output_dir=base",
                                                            "overwrite=true"], "error", ["base"]),
    ("a tokenizer over an earlier tokenizer", ["tokenizer", "data=corpus.txt", "vocab_size=290", "output_dir=tok"],
     "error", ["tok"]),
    ("pretrain into its tokenizer= directory", ["pretrain", *TINY, "data=corpus.txt", "tokenizer=tok", "max_steps=1",
                                                "output_dir=tok", "overwrite=true"], "error", ["tok"]),
    ("pretrain into its data directory", ["pretrain", *TINY, "data=texts", "max_steps=1", "output_dir=texts"],
     "error", ["texts"]),
    ("a tokenizer over an earlier one with overwrite=true", ["tokenizer", "data=corpus.txt", "vocab_size=290",
                                                             "output_dir=tok", "overwrite=true"], "ok"),
    ("a world re-run into a world", ["world", "output_dir=world", "seed=1", *WORLD], "error", ["world"]),
    ("a world into a model directory", ["world", "output_dir=base", "overwrite=true", *WORLD], "error", ["base"]),
    ("a world re-run with overwrite=true", ["world", "output_dir=world", "seed=1", "overwrite=true", *WORLD], "ok"),
    ("dpo into its reference model", ["dpo", "model=base", "ref_model=other-base", "data=pairs.jsonl", *DPO,
                                      "output_dir=other-base"], "error", ["other-base"]),
    ("dpo into its reference model, overwrite=true", ["dpo", "model=base", "ref_model=other-base",
                                                      "data=pairs.jsonl", *DPO, "output_dir=other-base",
                                                      "overwrite=true"], "error", ["other-base"]),
    ("sft into a model temper did not write", ["sft", "model=base", "data=chats.jsonl", "max_steps=1",
                                               "output_dir=hf-model"], "error", ["hf-model"]),
    ("pretrain into a model temper did not write", ["pretrain", *TINY, "data=corpus.txt", "max_steps=1",
                                                    "output_dir=hf-model"], "error", ["hf-model"]),
    ("merge into a model temper did not write", ["merge", "adapter=lora", "output_dir=hf-model"], "error",
     ["hf-model"]),
    ("eval into its model's directory", ["eval", "model=base", "data=corpus.txt", "output_dir=base"], "error",
     ["base"]),
    ("eval into another model's directory", ["eval", "model=base", "data=corpus.txt", "output_dir=other-base"],
     "error", ["other-base"]),
    ("online DPO into another model's directory", ["online-dpo", "model=base", *ONLINE, "judge=rule:world",
                                                   "output_dir=other-base"], "error", ["other-base"]),
    ("a refused resume (another vocab_size) keeps the caches", [*RESUME[:2], "vocab_size=290", *RESUME[3:]],
     "error", ["resumable"]),
    ("a refused resume (other data) keeps the caches", [*RESUME[:-5], "data=bom.txt", *RESUME[-4:]], "error",
     ["resumable"]),
    ("a refused dpo resume (other pairs) keeps the reference cache",
     ["dpo", "model=base", "data=chat-pairs.jsonl", *DPO[:2], "max_steps=2", *DPO[3:], "reference=precomputed",
      "checkpoint.every=1", "output_dir=dpo-run", "resume=auto"], "error", ["dpo-run"]),
]


# ----------------------------------------------------------------------------- divergence
# A non-finite loss or gradient stops the run; no NaN model is saved.


def setup_divergence(work: Path) -> None:
    """`stopped`: a run stopped at a NaN loss (no model); `stopped-late`: `base` continued at
    optim.lr=1e9, stopped at step 4 with its step-2 checkpoint kept; a judge that always scores."""
    pretrain = ["pretrain", *TINY, "data=corpus.txt"]
    done = temper([*pretrain, "max_steps=3", "optim.lr=1e9", "output_dir=stopped"], work)
    assert done.returncode == 2 and not (work / "stopped" / "model.safetensors").exists(), done.stderr
    shutil.copytree(work / "base", work / "stopped-late")
    done = temper([*pretrain, "max_steps=4", "checkpoint.every=2", "optim.lr=1e9", "resume=auto",
                   "output_dir=stopped-late"], work)
    assert done.returncode == 2 and "error: step 4: " in done.stderr, done.stderr
    (work / "length_judge.py").write_text("def score(prompt, response):\n    return float(len(response))\n")


DIVERGENCE: list[tuple[str, list[str], str]] = [
    ("a learning rate of 1e9: the loss turns NaN at step 2",
     ["pretrain", *TINY, "data=corpus.txt", "max_steps=3", "optim.lr=1e9", "output_dir=div1"], "error"),
    ("a learning rate of 1e30: a finite loss, a NaN gradient",
     ["pretrain", *TINY, "data=corpus.txt", "max_steps=3", "optim.lr=1e30", "output_dir=div2"], "error"),
    ("a learning rate that breaks the weights in the last step (finite losses, a NaN held-out loss)",
     ["pretrain", *TINY, "data=corpus.txt", "max_steps=1", "optim.lr=1e9", "output_dir=div3"], "error"),
    ("on_nonfinite=skip with weights that stay broken: NaN steps in a row still stop",
     ["pretrain", *TINY, "data=corpus.txt", "max_steps=8", "optim.lr=1e9", "on_nonfinite=skip",
      "output_dir=div4"], "error"),
    ("on_nonfinite=skip on a run that stays finite (skipped_steps: 0 in its metrics)",
     ["pretrain", *TINY, "data=corpus.txt", "max_steps=2", "on_nonfinite=skip", "output_dir=div5"], "ok"),
    ("on_nonfinite= a value it does not have",
     ["pretrain", *TINY, "data=corpus.txt", "max_steps=2", "on_nonfinite=ignore", "output_dir=div6"], "error"),
    ("sft with a learning rate of 1e9",
     ["sft", "model=base", "data=chats.jsonl", "max_steps=3", "batch_size=4", "seq_len=64", "eval_samples=0",
      "logging.progress=false", "optim.lr=1e9", "output_dir=div7"], "error"),
    ("dpo with a learning rate of 1e9",
     ["dpo", "model=base", "data=pairs.jsonl", "seq_len=64", "batch_size=2", "max_steps=3", "peak_flops=1e9",
      "logging.progress=false", "optim.lr=1e9", "output_dir=div8"], "error"),
    ("dpo with beta=1e30: an infinite gradient at step 1",
     ["dpo", "model=base", "data=pairs.jsonl", *DPO, "beta=1e30", "output_dir=div9"], "error"),
    ("online DPO whose round diverges (dpo.optim.lr=1e9)",
     ["online-dpo", "model=base", "rounds=1", "prompts=questions.jsonl", "samples_per_prompt=2", "max_new_tokens=8",
      "judge=callable:length_judge:score", "dpo.seq_len=64", "dpo.batch_size=2", "dpo.max_steps=3",
      "dpo.peak_flops=1e9", "dpo.logging.progress=false", "dpo.optim.lr=1e9", "output_dir=div10"], "error"),
    ("generate from a run that stopped at a NaN loss (it saved no model)",
     ["generate", "model=stopped", "prompt=The river", "max_new_tokens=4"], "error"),
    ("resume a stopped run at the same learning rate: it stops again",
     ["pretrain", *TINY, "data=corpus.txt", "max_steps=4", "checkpoint.every=2", "optim.lr=1e9", "resume=auto",
      "output_dir=stopped-late"], "error"),
    ("resume a stopped run from its last good checkpoint with a lower learning rate",
     ["pretrain", *TINY, "data=corpus.txt", "max_steps=4", "checkpoint.every=2", "optim.lr=1e-3", "resume=auto",
      "output_dir=stopped-late"], "ok"),
]


# ----------------------------------------------------------------------------- settings
# Settings refused at load with the key named.


def setup_settings(work: Path) -> None:
    """`other-tok`: `base` with a tokenizer trained on other text (`other-base` shares `base`'s: same
    corpus, same vocab_size); `printed.yaml`: what `temper sft --print-config` writes."""
    from temper.data.tokenizer import train_tokenizer

    shutil.copytree(work / "base", work / "other-tok")
    train_tokenizer(["Zebras graze quietly near the old stone bridge at dawn."] * 40, vocab_size=300).save(
        work / "other-tok")
    (work / "other-tok" / ".temper.lock").unlink(missing_ok=True)
    printed = temper(["sft", "model=base", "--print-config"], work)
    assert printed.returncode == 0, printed.stderr
    (work / "printed.yaml").write_text(printed.stdout)


NO_VOCAB = [a for a in TINY if not a.startswith("vocab_size=")]
DPO_ANY_LEN = [a for a in DPO if not a.startswith("seq_len=")]
SETTINGS: list[tuple[str, list[str], str]] = [
    # numbers that are not numbers: refused for every float key, by the one parser
    ("a NaN temperature", ["generate", "model=base", "prompt=The river", "temperature=nan"], "error"),
    ("a NaN top_p", ["generate", "model=base", "prompt=The river", "top_p=nan"], "error"),
    ("a NaN repetition penalty", ["generate", "model=base", "prompt=The river", "repetition_penalty=nan"], "error"),
    ("a NaN top_p in chat", ["chat", "model=base", "top_p=nan"], "error"),
    ("an infinite learning rate", ["pretrain", "optim.lr=inf"], "error"),
    ("a negative temperature (checked at load, before the model loads)",
     ["generate", "model=base", "prompt=The river", "temperature=-1"], "error"),
    # preference losses
    ("the same DPO loss twice", ["dpo", "model=base", "data=pairs.jsonl", "loss_type=[sigmoid,sigmoid]", *DPO,
                                 "output_dir=s1"], "error"),
    ("a negative loss weight", ["dpo", "model=base", "data=pairs.jsonl", "loss_type=[sigmoid,sft]",
                                "loss_weights=[1,-0.5]", *DPO, "output_dir=s2"], "error"),
    ("a zero loss weight", ["dpo", "model=base", "data=pairs.jsonl", "loss_type=[sigmoid,sft]", "loss_weights=[1,0]",
                            *DPO, "output_dir=s3"], "error"),
    ("a NaN loss weight", ["dpo", "model=base", "data=pairs.jsonl", "loss_weights=nan", *DPO, "output_dir=s4"],
     "error"),
    ("a negative SimPO margin", ["dpo", "model=base", "data=pairs.jsonl", "loss_type=[simpo]", "simpo_gamma=-1", *DPO,
                                 "output_dir=s5"], "error"),
    # shapes and vocabularies
    ("zero layers", ["pretrain", *TINY, "data=corpus.txt", "model_config.num_layers=0", "output_dir=s6"], "error"),
    ("a negative width", ["pretrain", *TINY, "data=corpus.txt", "model_config.hidden_size=-64", "output_dir=s7"],
     "error"),
    ("a layer count that is not a number", ["pretrain", *TINY, "data=corpus.txt", "model_config.num_layers=two",
                                            "output_dir=s8"], "error"),
    ("a vocabulary the tokenizer trainer cannot reserve (was a Rust abort, exit 134)",
     ["pretrain", *NO_VOCAB, "data=corpus.txt", "vocab_size=1000000000", "output_dir=s9"], "error"),
    ("a vocabulary past the trainer's u32 ids", ["tokenizer", "data=corpus.txt", "vocab_size=4294967296",
                                                  "output_dir=s10"], "error"),
    ("estimate with zero layers (was negative memory)", ["estimate", "model=llama-14m", "model_config.num_layers=0"],
     "error"),
    ("estimate with a negative width", ["estimate", "model=7b", "model_config.hidden_size=-4096"], "error"),
    ("estimate of a 50T-parameter count (was called too small)", ["estimate", "model=50t"], "error"),
    # the reference and the positions
    ("a reference model with another tokenizer", ["dpo", "model=base", "data=pairs.jsonl", "ref_model=other-tok",
                                                  *DPO, "output_dir=s11"], "error"),
    ("a reference model with the same tokenizer (another base)",
     ["dpo", "model=base", "data=pairs.jsonl", "ref_model=other-base", *DPO, "output_dir=s12"], "ok"),
    ("DPO sequences longer than the model's positions", ["dpo", "model=base", "data=pairs.jsonl", "seq_len=1024",
                                                         *DPO_ANY_LEN, "output_dir=s13"], "error"),
    ("SFT sequences longer than the model's positions", ["sft", "model=base", "data=chats.jsonl", "seq_len=1024",
                                                         "output_dir=s14"], "error"),
    # options a mode ignores
    ("a LoRA rank without LoRA", ["sft", "model=base", "data=chats.jsonl", "peft.r=4"], "error"),
    ("an adapter width with LoRA", ["sft", "model=base", "data=chats.jsonl", "peft.method=lora",
                                    "peft.adapter_dim=8"], "error"),
    ("a SimPO margin without SimPO", ["dpo", "model=base", "data=pairs.jsonl", "simpo_gamma=1"], "error"),
    ("label smoothing with IPO", ["dpo", "model=base", "data=pairs.jsonl", "loss_type=[ipo]", "label_smoothing=0.1"],
     "error"),
    ("KTO weights without KTO", ["dpo", "model=base", "data=pairs.jsonl", "desirable_weight=2"], "error"),
    ("top_k with greedy decoding", ["generate", "model=base", "prompt=The river", "temperature=0", "top_k=5"],
     "error"),
    ("an output file for a single prompt", ["generate", "model=base", "prompt=The river", "output_file=out.jsonl"],
     "error"),
    ("a perplexity window without perplexity data", ["eval", "model=base", "tasks=world_qa", "window=128"], "error"),
    ("vocab_size with a given tokenizer", ["pretrain", "tokenizer=base", "data=corpus.txt", "vocab_size=512"],
     "error"),
    ("a shape change for a model directory", ["pretrain", "model=base", "data=corpus.txt",
                                              "model_config.num_layers=4"], "error"),
    ("a warmup ratio beside warmup steps", ["sft", "model=base", "data=chats.jsonl", "schedule.warmup_steps=5",
                                            "schedule.warmup_ratio=0.2"], "error"),
    ("a pipeline schedule without pipeline stages", ["pretrain", "parallel.pp_schedule=gpipe"], "error"),
    ("an FSDP option with DDP", ["pretrain", "strategy=ddp", "parallel.cpu_offload=true"], "error"),
    ("a held-out share beside held-out data", ["sft", "model=base", "data=chats.jsonl", "eval_data=chats.jsonl",
                                               "eval_fraction=0.3"], "error"),
    ("a printed config read back (every key at its default is not a mode mistake)",
     ["sft", "--config", "printed.yaml", "--print-config"], "ok"),
    # one value per key, a value for every name
    ("a key given twice", ["pretrain", "max_steps=10", "max_steps=20"], "error"),
    ("a section and a key inside it", ["pretrain", "optim={lr: 1.0e-3}", "optim.lr=2.0e-3"], "error"),
    ("--config given twice", ["pretrain", "--config", "pretrain", "--config", "pretrain-shakespeare"], "error"),
    ("a config file's key overridden on the command line (the point of overrides)",
     ["pretrain", "--config", "pretrain", "max_steps=5", "--print-config"], "ok"),
    ("an empty output_dir (pretrain)", ["pretrain", *TINY, "data=corpus.txt", "output_dir="], "error"),
    ("an empty output_dir (merge)", ["merge", "adapter=lora", "output_dir="], "error"),
    ("an empty output_dir (tokenizer)", ["tokenizer", "data=corpus.txt", "output_dir="], "error"),
    ("an empty output_dir (world)", ["world", "output_dir="], "error"),
    ("an empty device", ["generate", "model=base", "prompt=The river", "device="], "error"),
]


# ----------------------------------------------------------------------------- inputs
# Special, endless or huge inputs, judges that hang, and messages that say what and where.


JUDGES_R2 = """import sys
import time


def sleeps(prompt, response):  # a judge service that never answers
    time.sleep(3600)
    return 1.0


def exits(prompt, response):
    sys.exit(3)


def revise_slowly(prompt, response, principle):
    time.sleep(3600)
    return response
"""


def setup_inputs(work: Path) -> None:
    """FIFOs and device links behind data names, over-long lines, judges that hang or exit, a world."""
    for name in ("fifo.txt", "fifo.jsonl", "fifo.yaml"):
        os.mkfifo(work / name)
    for name, target in (("zero.txt", "/dev/zero"), ("zero.jsonl", "/dev/zero"), ("urandom.txt", "/dev/urandom"),
                         ("urandom.jsonl", "/dev/urandom"), ("zero.yaml", "/dev/zero"), ("zero.jinja", "/dev/zero")):
        (work / name).symlink_to(target)
    (work / "with-device").mkdir()  # a data folder with a device link among its files
    (work / "with-device" / "a.txt").write_text(TEXT)
    (work / "with-device" / "b.txt").symlink_to("/dev/zero")
    with open(work / "nul-bytes.txt", "wb") as f:  # 1 GiB of NUL bytes, no newline (sparse: no disk used)
        f.truncate(1 << 30)
    words = "the river runs past the mill and the miller counts sacks of flour ".split()
    line = " ".join(words[i % len(words)] + str(i % 97) for i in range(250_000))  # ~2.4 MB, one line
    (work / "long-line.txt").write_text(line + "\n")
    (work / "long-line.jsonl").write_text(json.dumps({"text": line}) + "\n")
    (work / "long-paragraph.txt").write_text("intro\n\n" + "a line of the river and the mill\n" * 40_000)
    good = [{"prompt": f"Paragraph {i}: the river", "chosen": " runs past the mill.", "rejected": " counts sacks."}
            for i in range(4)]
    (work / "long-pair.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        *good[:2], {"prompt": line, "chosen": " " + line[:1_000_000], "rejected": " " + line[1_000:1_001_000]},
        *good[2:]]))
    (work / "my_judges_r2.py").write_text(JUDGES_R2)
    (work / "qa.jsonl").write_text("".join(json.dumps({"question": f"What is {i} plus 1?", "answer": str(i + 1)})
                                           + "\n" for i in range(3)))
    (work / "qa-task.yaml").write_text("name: qa\ntype: generation\ndata: qa.jsonl\nprompt: '{question}'\n"
                                       "generation: {max_new_tokens: 2}\n")
    (work / "test-rows.jsonl").write_text(json.dumps({"question": "the river runs past the mill", "answer": "yes"})
                                          + "\n")
    done = temper(["world", "output_dir=small-world", "num_people=8", "num_towns=4", "docs_per_person=2", "docs_per_town=1",
                   "num_arithmetic_docs=4", "num_dialogue_docs=4", "num_sft_train=4", "num_sft_test=4",
                   "num_pref_train=4", "num_pref_test=4", "num_rl_train=4", "num_rl_test=4"], work)
    assert done.returncode == 0, done.stderr
    shutil.copytree(work / "base", work / "fifo-weights")  # weights that are a FIFO
    (work / "fifo-weights" / "model.safetensors").unlink()
    os.mkfifo(work / "fifo-weights" / "model.safetensors")


EVAL_PAIR = ["eval", "models=[base,other-base]", "tasks=qa-task.yaml"]
INPUTS: list[tuple[str, list[str], str]] = [
    # special files: refused by name before they are opened (a FIFO would wait for a writer, a device never ends)
    ("a FIFO as pretraining data", ["pretrain", *TINY, "data=fifo.txt", "output_dir=r2-1"], "error"),
    ("a link named .txt to /dev/zero", ["pretrain", *TINY, "data=zero.txt", "output_dir=r2-2"], "error"),
    ("a link named .jsonl to /dev/zero", ["pretrain", *TINY, "data=zero.jsonl", "output_dir=r2-3"], "error"),
    ("a link named .txt to /dev/urandom", ["pretrain", *TINY, "data=urandom.txt", "output_dir=r2-4"], "error"),
    ("a data folder holding a link to /dev/zero", ["pretrain", *TINY, "data=with-device", "output_dir=r2-5"],
     "error"),
    ("a glob matching a link to /dev/zero", ["pretrain", *TINY, "data=with-device/*.txt", "output_dir=r2-6"],
     "error"),
    ("a FIFO as tokenizer data", ["tokenizer", "data=fifo.txt", "output_dir=r2-7"], "error"),
    ("a FIFO as SFT data", ["sft", "model=base", "data=fifo.jsonl", "output_dir=r2-8"], "error"),
    ("a link to /dev/urandom as DPO data", ["dpo", "model=base", "data=urandom.jsonl", *DPO, "output_dir=r2-9"],
     "error"),
    ("a FIFO as the prompts file", ["generate", "model=base", "prompts_file=fifo.jsonl"], "error"),
    ("a link to /dev/zero as the prompts file", ["generate", "model=base", "prompts_file=zero.jsonl"], "error"),
    ("a link to /dev/urandom as perplexity text", ["eval", "model=base", "data=urandom.txt", "output_dir=r2-10"],
     "error"),
    ("a FIFO as a task file", ["eval", "model=base", "tasks=fifo.yaml", "output_dir=r2-11"], "error"),
    ("a link to /dev/zero as --config", ["pretrain", "--config", "zero.yaml"], "error"),
    ("a FIFO as --config", ["pretrain", "--config", "fifo.yaml"], "error"),
    ("a link to /dev/zero as the chat template", ["sft", "model=base", "data=chats.jsonl", "template=zero.jinja",
                                                 "output_dir=r2-12"], "error"),
    ("a FIFO as contamination eval rows", ["eval", "contamination", "train=corpus.txt", "eval=fifo.jsonl"], "error"),
    ("a FIFO as the constitution", ["online-dpo", "model=base", *ONLINE, "judge=constitution:callable:my_judges_r2:"
                                    "revise_slowly", "constitution=fifo.txt", "output_dir=r2-13"], "error"),
    ("a FIFO where a model's weights should be", ["generate", "model=fifo-weights", "prompt=The river"], "error"),
    # a line or document past the cap: an error naming file and line, after reading that much of it only
    ("1 GiB of NUL bytes with no newline, named .txt", ["pretrain", *TINY, "data=nul-bytes.txt", "output_dir=r2-14"],
     "error"),
    ("a 2.4 MB line past max_document_mb=1", ["pretrain", *TINY, "data=long-line.txt", "max_document_mb=1",
                                              "output_dir=r2-15"], "error"),
    ("a 2.4 MB JSONL row past max_document_mb=1", ["tokenizer", "data=long-line.jsonl", "max_document_mb=1",
                                                   "output_dir=r2-16"], "error"),
    ("a 1.3 MB paragraph (no blank line) past max_document_mb=1",
     ["pretrain", *TINY, "data=long-paragraph.txt", "max_document_mb=1", "output_dir=r2-17"], "error"),
    ("a whole file past max_document_mb=1 with text_mode=file",
     ["pretrain", *TINY, "data=long-paragraph.txt", "text_mode=file", "max_document_mb=1", "output_dir=r2-18"],
     "error"),
    # long, within the cap: trained in bounded memory (the tokenizer trainer and DPO's encoder get pieces)
    ("a 2.4 MB one-line document (trained, the tokenizer learnt in pieces)",
     ["pretrain", *TINY, "data=long-line.jsonl", "max_steps=1", "output_dir=r2-19"], "ok"),
    ("a DPO row of 2.4 MB (cut by characters before tokenising, counted as truncated)",
     ["dpo", "model=base", "data=long-pair.jsonl", *DPO, "output_dir=r2-20"], "ok"),
    # judges that hang or exit
    ("an online-DPO judge that never returns (judge_timeout=1)",
     ["online-dpo", "model=base", *ONLINE, "judge=callable:my_judges_r2:sleeps", "judge_timeout=1",
      "output_dir=r2-21"], "error"),
    ("a constitution reviser that never returns (judge_timeout=1)",
     ["online-dpo", "model=base", *ONLINE, "judge=constitution:callable:my_judges_r2:revise_slowly",
      "judge_timeout=1", "output_dir=r2-22"], "error"),
    ("a judge that calls sys.exit(3), with skip_bad_judgements=false",
     ["online-dpo", "model=base", *ONLINE, "judge=callable:my_judges_r2:exits", "skip_bad_judgements=false",
      "output_dir=r2-23"], "error"),
    ("a judge that calls sys.exit(3) on every sample", ["online-dpo", "model=base", *ONLINE,
                                                        "judge=callable:my_judges_r2:exits", "output_dir=r2-24"],
     "error"),
    ("an eval judge that never returns (judge_timeout=1)",
     [*EVAL_PAIR, "judge=callable:my_judges_r2:sleeps", "judge_timeout=1", "output_dir=r2-25"], "error"),
    ("a negative judge_timeout", [*EVAL_PAIR, "judge=callable:my_judges_r2:sleeps", "judge_timeout=-1"], "error"),
    # an eval judge that fails on every sample: no win rate (the models' scores are kept in results.md)
    ("an eval judge that raises on every sample", [*EVAL_PAIR, "judge=callable:my_judges:raises", "output_dir=r2-26"],
     "error"),
    ("an eval judge that calls sys.exit on every sample", [*EVAL_PAIR, "judge=callable:my_judges_r2:exits",
                                                            "output_dir=r2-27"], "error"),
    ("an eval judge that fails on some samples (left out of the win rate, counted)",
     [*EVAL_PAIR, "judge=callable:my_judges:flaky", "output_dir=r2-28"], "ok"),
    ("contamination eval_fields naming no field of the rows",
     ["eval", "contamination", "train=corpus.txt", "eval=test-rows.jsonl", "eval_fields=questoin"], "error"),
    # the world task reads the world and writes only under output_dir; a relative world= is the working directory's
    ("world_facts_mc on a world without eval/facts_mc.jsonl, world= relative",
     ["eval", "model=base", "tasks=world_facts_mc", "world=small-world", "output_dir=r2-29"], "ok"),
    # messages that say what and where
    ("an adapter directory as SFT's model", ["sft", "model=lora", "data=chats.jsonl", "output_dir=r2-30"], "error"),
    ("an adapter directory as DPO's model", ["dpo", "model=lora", "data=pairs.jsonl", *DPO, "output_dir=r2-31"],
     "error"),
    ("an adapter directory as DPO's ref_model", ["dpo", "model=base", "ref_model=lora", "data=pairs.jsonl", *DPO,
                                                 "output_dir=r2-32"], "error"),
    ("SFT at seq_len=256 on a model whose validation split holds 126 tokens (the drift monitor fits it)",
     ["sft", "model=base", "data=chats.jsonl", "seq_len=256", "max_steps=1", "batch_size=4", "logging.progress=false",
      "output_dir=r2-33"], "ok"),
    ("DPO at seq_len=256 on the same model", ["dpo", "model=base", "data=pairs.jsonl", "seq_len=256", "batch_size=2",
                                              "max_steps=1", "peak_flops=1e9", "logging.progress=false",
                                              "output_dir=r2-34"], "ok"),
]


GRPO_REWARDS = """def raises(prompts, completions, **kwargs):
    raise RuntimeError("checker crashed")


def one_value(prompts, completions, **kwargs):
    return [1.0]


def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)
"""


def setup_grpo(work: Path) -> None:
    """Prompt rows with answers, and reward functions that raise, miscount and return NaN."""
    (work / "my_rewards.py").write_text(GRPO_REWARDS)
    (work / "rl-prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "answer": str(i + 1)})
                                                   + "\n" for i in range(8)))


GRPO_BASE = ["grpo", "model=base", "prompts=rl-prompts.jsonl", "num_generations=4", "max_steps=1", "peak_flops=1e9",
             "logging.progress=false"]
GRPO_RUN = [*GRPO_BASE, "batch_size=4", "max_completion_length=4"]
GRPO: list[tuple[str, list[str], str]] = [
    ("a reward function that raises", [*GRPO_RUN, "rewards=my_rewards:raises", "output_dir=g-1"], "error"),
    ("a reward function returning one value for 4 completions", [*GRPO_RUN, "rewards=my_rewards:one_value",
                                                                  "output_dir=g-2"], "error"),
    ("a reward function returning NaN", [*GRPO_RUN, "rewards=my_rewards:nan", "output_dir=g-3"], "error"),
    ("a reward import path that does not resolve", [*GRPO_RUN, "rewards=my_rewardz:exact", "output_dir=g-4"],
     "error"),
    ("a generation batch that does not divide into groups of G", [*GRPO_BASE, "rewards=world", "batch_size=6",
                                                                   "max_completion_length=4",
                                                                   "output_dir=g-5"], "error"),
    ("prompt + completion longer than the model's positions", [*GRPO_BASE, "rewards=world", "batch_size=4",
                                                                "max_completion_length=600", "output_dir=g-6"],
     "error"),
    ("GRPO sharded with FSDP (data-parallel only)", [*GRPO_RUN, "rewards=world", "strategy=fsdp", "output_dir=g-7"], "error"),
]


PPO_REWARDS = """def none(prompts, completions, **kwargs):
    return [None] * len(completions)
"""


def setup_ppo(work: Path) -> None:
    """A reward model on `base`'s body (`ppo-rm`), a value-model start whose head overflows every value to
    infinity (`overflowing-value`), and a reward function that applies to nothing (`ppo_rewards:none`)."""
    import torch

    from temper.data.tokenizer import Tokenizer
    from temper.models.hf import config_from_hf, read_hf_config
    from temper.models.reward import build_reward_model, save_reward_model

    tokenizer = Tokenizer.from_dir(work / "base")
    config = config_from_hf(read_hf_config(work / "base"), "base/config.json")
    torch.manual_seed(0)
    save_reward_model(build_reward_model(config), work / "ppo-rm", tokenizer=tokenizer)
    huge = build_reward_model(config)
    with torch.no_grad():
        huge.score.weight.fill_(3e38)  # finite weights (loading refuses NaN ones), infinite values
    save_reward_model(huge, work / "overflowing-value", tokenizer=tokenizer)
    (work / "ppo_rewards.py").write_text(PPO_REWARDS)


PPO_ALL = ["ppo", "model=base", "prompts=rl-prompts.jsonl", "max_steps=1", "batch_size=4", "peak_flops=1e9",
           "logging.progress=false"]
PPO_BASE = [*PPO_ALL, "max_completion_length=4"]
PPO: list[tuple[str, list[str], str]] = [
    ("a causal LM given as the reward model (no scalar head)", [*PPO_BASE, "reward_model=base", "output_dir=p-1"],
     "error"),
    ("a reward-model directory that does not exist", [*PPO_BASE, "reward_model=rm-nowhere", "output_dir=p-2"],
     "error"),
    ("prompt + completion longer than the model's positions", [*PPO_ALL, "reward_model=ppo-rm",
                                                                "max_completion_length=600", "output_dir=p-3"],
     "error"),
    ("a reward that scores no completion (NaN scores)", [*PPO_BASE, "rewards=ppo_rewards:none", "output_dir=p-4"],
     "error"),
    ("a value model whose values overflow to infinity", [*PPO_BASE, "reward_model=ppo-rm",
                                                          "value_model=overflowing-value", "output_dir=p-5"], "error"),
    ("an unknown KL estimator", [*PPO_BASE, "reward_model=ppo-rm", "kl_estimator=k2", "output_dir=p-6"], "error"),
    ("PPO sharded with FSDP (data-parallel only)", [*PPO_BASE, "reward_model=ppo-rm", "strategy=fsdp",
                                                    "output_dir=p-7"], "error"),
    ("no reward model and no reward function", [*PPO_BASE, "output_dir=p-8"], "error"),
]


def setup_reward(work: Path) -> None:
    """A trained reward model (`rm`), the same without its head (`rm-no-head`), pairs with bad or
    missing margins, and rows to score."""
    from safetensors.torch import load_file, save_file

    pairs = [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
              "chosen": [{"role": "assistant", "content": str(i + 1)}],
              "rejected": [{"role": "assistant", "content": f"{i + 7} or so"}]} for i in range(8)]
    (work / "rm-pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    done = temper(["reward", "model=base", "data=rm-pairs.jsonl", *DPO, "output_dir=rm"], work)
    assert done.returncode == 0, done.stderr
    shutil.copytree(work / "rm", work / "rm-no-head", ignore=shutil.ignore_patterns("checkpoints"))
    weights = load_file(work / "rm-no-head" / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, work / "rm-no-head" / "model.safetensors", metadata={"format": "pt"})
    margins = [{**r, "margin": 1.0} for r in pairs]
    (work / "margin-text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                    [*margins[:3], {**pairs[3], "margin": "high"}, *margins[4:]]))
    (work / "margin-some.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*margins[:3], *pairs[3:]]))
    (work / "qa-rows.jsonl").write_text("".join(json.dumps({"question": f"What is {i} plus 1?", "answer": str(i + 1)})
                                                + "\n" for i in range(3)))
    (work / "qa.yaml").write_text("name: qa\ntype: generation\ndata: qa-rows.jsonl\nprompt: 'Question: {question}\\n"
                                  "Answer:'\ntarget: answer\ngeneration: {max_new_tokens: 4}\n")
    steps = [{"prompt": f"Start from {i}, add 2. What do you get?", "completions": [f"{i} + 2 = {i + 2}"],
              "labels": [True]} for i in range(6)]
    (work / "steps-miscounted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        *steps[:3], {**steps[3], "labels": [True, False]}, *steps[4:]]))
    (work / "to-score.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n"
                                                 for r in pairs[:3]) + '{"question": "no prompt column"}\n')


REWARD = ["reward", "model=base", *DPO]
REWARD_CASES: list[tuple[str, list[str], str]] = [
    ("a reward model as temper reward's model (it trains a new head on a causal LM)",
     ["reward", "model=rm", "data=rm-pairs.jsonl", *DPO, "output_dir=rw-1"], "error"),
    ("a LoRA adapter directory as temper reward's model", ["reward", "model=lora", "data=rm-pairs.jsonl", *DPO,
                                                           "output_dir=rw-2"], "error"),
    ("peft.method=prefix (a reward model trains with LoRA or in full)",
     [*REWARD, "data=rm-pairs.jsonl", "peft.method=prefix", "output_dir=rw-3"], "error"),
    ("a margin that is not a number, skip_bad_rows=false",
     [*REWARD, "data=margin-text.jsonl", "skip_bad_rows=false", "output_dir=rw-4"], "error"),
    ("a margin column on some rows only", [*REWARD, "data=margin-some.jsonl", "output_dir=rw-5"], "error"),
    ("a causal LM given to reward score", ["reward", "score", "model=base", "data=to-score.jsonl"], "error"),
    ("a reward-model directory without its score.weight given to reward score",
     ["reward", "score", "model=rm-no-head", "data=to-score.jsonl"], "error"),
    ("the same directory as eval's judge=reward:",
     ["eval", "models=[base,base]", "tasks=qa.yaml", "judge=reward:rm-no-head", "output_dir=rw-6"], "error"),
    ("a row to score without prompt or response, skip_bad_rows=false",
     ["reward", "score", "model=rm", "data=to-score.jsonl", "skip_bad_rows=false"], "error"),
    ("reward score writing into the reward model's directory",
     ["reward", "score", "model=rm", "data=to-score.jsonl", "output=rm/scores.jsonl", "max_bad_row_fraction=0.5"],
     "error", ["rm"]),
    ("a process reward model with no data= from a model without the built-in world",
     [*REWARD, "objective=prm", "output_dir=rw-7"], "error"),
    ("a step-labelled row with two labels for one step, skip_bad_rows=false",
     [*REWARD, "objective=prm", "data=steps-miscounted.jsonl", "skip_bad_rows=false", "output_dir=rw-8"], "error"),
    ("reward centring asked of a process reward model", [*REWARD, "objective=prm", "data=steps-miscounted.jsonl",
                                                          "center_rewards_coefficient=0.1", "output_dir=rw-9"],
     "error"),
    ("reward score over a file with one bad row in four (skipped, counted, named)",
     ["reward", "score", "model=rm", "data=to-score.jsonl", "output=scores.jsonl", "max_bad_row_fraction=0.5"],
     "ok"),
]


def setup_curate(work: Path) -> None:
    """Raw documents for `temper curate`: a binary file among text, empty and NUL-holding rows, a line of
    2 MiB, Latin-1 bytes."""
    prose = ("The river runs past the old mill and the farmers bring their grain to it every week. People in "
             "the town say the water has shaped their lives for as long as anyone remembers.")
    raw = work / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "good.jsonl").write_text(json.dumps({"text": prose}) + "\n")
    (raw / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": ""}, {"text": "   \n\t "}, {"text": "bin\u0000ary\u0000"}, {"text": None}, {"body": prose},
        {"text": prose + " And again."}]))
    (work / "raw-bin").mkdir(exist_ok=True)
    (work / "raw-bin" / "notes.txt").write_text(prose + "\n")
    (work / "raw-bin" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (work / "huge-line.txt").write_text("word " * (420 * 1024) + "\n")  # 2.1 MiB on one line


CURATE = ["curate", "gopher_quality.enabled=false", "c4.enabled=false", "fineweb.enabled=false"]
CURATE_CASES: list[tuple[str, list[str], str]] = [
    ("empty, blank, NUL-holding and text-less rows among good ones (each rejected with its reason)",
     [*CURATE, "data=raw", "output_dir=cur-1"], "ok"),
    ("a binary file among text files", ["curate", "data=raw-bin", "output_dir=cur-2"], "error"),
    ("the same with encoding_errors=replace (rejected as binary, the text file kept)",
     [*CURATE, "data=raw-bin", "encoding_errors=replace", "output_dir=cur-9"], "ok"),
    ("Latin-1 bytes in a .txt file", ["curate", "data=latin1.txt", "output_dir=cur-3"], "error"),
    ("a 2 MiB line past max_document_mb=1", ["curate", "data=huge-line.txt", "max_document_mb=1",
                                             "output_dir=cur-4"], "error"),
    ("bands x rows that is not num_hashes", ["curate", "data=raw", "near_dedup.bands=10", "output_dir=cur-5"],
     "error"),
    ("an engine that does not exist", ["curate", "data=raw", "engine=spark", "output_dir=cur-6"], "error"),
    ("a Ray address without engine=ray", ["curate", "data=raw", "ray_address=auto", "output_dir=cur-7"], "error"),
    ("mix weights that do not match the sources", ["curate", "data=[raw,latin1.txt]", "mix.weights=[1]",
                                                   "output_dir=cur-8"], "error"),
]


# ----------------------------------------------------------------------------- export


def setup_export(work: Path) -> None:
    """A GPT-2 model (no GGUF export), a Llama of width 48 (rows not whole Q4_0 blocks), `base` without its
    tokenizer."""
    from temper.data.tokenizer import Tokenizer
    from temper.models import build_model, preset, save_model

    tokenizer = Tokenizer.from_dir(work / "base")
    save_model(build_model(preset("gpt2-tiny", vocab_size=tokenizer.vocab_size)), work / "gpt2-model",
               tokenizer=tokenizer)
    save_model(build_model(preset("llama-tiny", vocab_size=tokenizer.vocab_size, hidden_size=48)), work / "narrow",
               tokenizer=tokenizer)
    shutil.copytree(work / "base", work / "no-tokenizer", ignore=shutil.ignore_patterns("checkpoints"))
    (work / "no-tokenizer" / "tokenizer.json").unlink()


EXPORT_CASES: list[tuple[str, list[str], str] | tuple[str, list[str], str, list[str]]] = [
    ("an export format that does not exist", ["export", "model=base", "format=onnx", "output_dir=ex-1"], "error"),
    ("GGUF of a GPT-2 model (no GGUF export for its family)", ["export", "model=gpt2-model", "output_dir=ex-2"],
     "error"),
    ("GGUF of an adapter directory (merge it first)", ["export", "model=lora", "output_dir=ex-3"], "error"),
    ("Q4_0 on rows of 48 values (not whole blocks of 32)", ["export", "model=narrow", "tensor_type=q4_0",
                                                            "output_dir=ex-4"], "error"),
    ("the same in F16 (no blocks)", ["export", "model=narrow", "tensor_type=f16", "output_dir=ex-5"], "ok"),
    ("a GGUF type with format=safetensors", ["export", "model=lora", "format=safetensors", "tensor_type=q8_0",
                                             "output_dir=ex-6"], "error"),
    ("format=safetensors of a model directory (already one)", ["export", "model=base", "format=safetensors",
                                                               "output_dir=ex-7"], "error"),
    ("GGUF of a model without tokenizer.json", ["export", "model=no-tokenizer", "output_dir=ex-8"], "error"),
    ("GGUF into a model directory", ["export", "model=base", "output_dir=other-base"], "error", ["other-base"]),
    ("GGUF into its own model directory", ["export", "model=base", "output_dir=base"], "error", ["base"]),
    ("an export of the same type again", ["export", "model=narrow", "tensor_type=f16", "output_dir=ex-5"], "error",
     ["ex-5"]),
]


def setup_encoder(work: Path) -> None:
    """For the encoder objectives: `wp`, a WordPiece tokenizer (with [CLS], [SEP], [MASK], [PAD]);
    supervised pairs missing a `positive`; texts too short to mask; a document of one sentence;
    token-classification rows without tags or with fewer tags than words; classification rows
    without a label."""
    from temper.data.tokenizer import train_wordpiece

    prose = ["The river runs past the old mill. Farmers bring their grain to it every week.",
             "People in the town say the water has shaped their lives. Nobody remembers a dry year."] * 20
    train_wordpiece(prose, vocab_size=200, model_max_length=64).save(work / "wp")
    (work / "pairs-missing.jsonl").write_text(
        json.dumps({"anchor": "The river runs.", "positive": "A river flows."}) + "\n"
        + json.dumps({"anchor": "The mill is old."}) + "\n")
    (work / "too-short.jsonl").write_text(json.dumps({"text": "the river runs past the mill"}) + "\n"
                                          + json.dumps({"text": "[CLS] [SEP]"}) + "\n")
    (work / "one-sentence.jsonl").write_text(json.dumps({"text": "The river runs past the mill."}) + "\n")
    (work / "tags-missing.jsonl").write_text(json.dumps({"tokens": ["the", "river"], "tags": ["O", "B-LOC"]}) + "\n"
                                             + json.dumps({"tokens": ["the", "mill"]}) + "\n")
    (work / "tags-short.jsonl").write_text(json.dumps({"tokens": ["the", "river"], "tags": ["O", "B-LOC"]}) + "\n"
                                           + json.dumps({"tokens": ["the", "old", "mill"], "tags": ["O"]}) + "\n")
    (work / "labels-missing.jsonl").write_text(json.dumps({"text": "the river runs", "label": "water"}) + "\n"
                                               + json.dumps({"text": "the mill is old"}) + "\n")


ENCODER = ["seq_len=32", "batch_size=4", "max_steps=1", "tokenizer=wp", "logging.progress=false"]
ENCODER_CASES: list[tuple[str, list[str], str]] = [
    ("sentence-pair data with a row missing its second sentence (positive)",
     ["pretrain", "objective=contrastive", "data=pairs-missing.jsonl", *ENCODER, "output_dir=enc-1"], "error"),
    ("texts too short to mask anything", ["pretrain", "objective=mlm", "data=too-short.jsonl", *ENCODER,
                                          "output_dir=enc-2"], "error"),
    ("a tokenizer without [MASK] (a decoder's BPE)",
     ["pretrain", "objective=mlm", "data=too-short.jsonl", "tokenizer=base", "seq_len=32", "max_steps=1",
      "output_dir=enc-3"], "error"),
    ("NSP on documents of one sentence (no pair to make)",
     ["pretrain", "objective=nsp", "data=one-sentence.jsonl", *ENCODER, "output_dir=enc-4"], "error"),
    ("an objective that does not exist", ["pretrain", "objective=mlmx"], "error"),
    ("an ELECTRA setting with objective=mlm", ["pretrain", "objective=mlm", "disc_weight=10"], "error"),
    ("a decoder model for MLM", ["pretrain", "objective=mlm", "model=llama-tiny", "data=too-short.jsonl",
                                 *ENCODER, "output_dir=enc-5"], "error"),
    ("seq_len too short for [CLS] A [SEP] B [SEP]", ["pretrain", "objective=nsp", "seq_len=4"], "error"),
    ("task=tokens data without its tags", ["finetune-encoder", "task=tokens", "model=bert-tiny",
                                            "data=tags-missing.jsonl", *ENCODER, "output_dir=enc-6"], "error"),
    ("task=tokens with fewer tags than words", ["finetune-encoder", "task=tokens", "model=bert-tiny",
                                                "data=tags-short.jsonl", *ENCODER, "output_dir=enc-7"], "error"),
    ("task=classify data without a label", ["finetune-encoder", "task=classify", "model=bert-tiny",
                                            "data=labels-missing.jsonl", *ENCODER, "output_dir=enc-8"], "error"),
    ("embeddings of a decoder", ["embed", "model=base", "data=corpus.txt", "output=z.npy"], "error"),
]


SERVE_CASES: list[tuple[str, list[str], str]] = [
    ("an adapters= entry without a name", ["serve", "model=base", "adapters=lora"], "error"),
    ("an adapter directory that does not exist", ["serve", "model=base", "adapters=tuned=no-such-dir"], "error"),
    ("the same adapter name twice", ["serve", "model=base", "adapters=[a=lora,a=lora]"], "error"),
    ("an adapter named as the base", ["serve", "model=base", "name=tuned", "adapters=tuned=lora"], "error"),
    ("an adapter directory as model=", ["serve", "model=lora"], "error"),
    ("a port out of range", ["serve", "model=base", "port=70000"], "error"),
    ("no room for a single row", ["serve", "model=base", "max_batch=0"], "error"),
    ("a chat template file that does not exist", ["serve", "model=base", "template=nope.jinja"], "error"),
]


def setup_quantize(work: Path) -> None:
    """An INT4 (GPTQ, act order) directory of `base`, and copies of it with a tensor missing, of the wrong
    dtype, and zero-points out of range."""
    done = temper(["quantize", "model=base", "method=gptq", "act_order=true", "group_size=32", "nsamples=2",
                   "seq_len=16", "calibration=corpus.txt", "output_dir=q-gptq"], work)
    assert done.returncode == 0, done.stderr
    import torch
    from safetensors.torch import load_file, save_file

    edits = {"q-missing": lambda t: t.pop("model.layers.1.mlp.down_proj.scales"),
             "q-dtype": lambda t: t.update({"model.layers.0.self_attn.q_proj.qweight":
                                            t["model.layers.0.self_attn.q_proj.qweight"].to(torch.int32)}),
             "q-zeros": lambda t: t["model.layers.0.mlp.up_proj.zeros"].fill_(200)}
    for name, edit in edits.items():
        shutil.copytree(work / "q-gptq", work / name)
        (work / name / ".temper.lock").unlink(missing_ok=True)
        weights = load_file(work / name / "model.safetensors")
        edit(weights)
        save_file(weights, str(work / name / "model.safetensors"), metadata={"format": "pt"})


QUANTIZE_CASES: list[tuple[str, list[str], str]] = [
    ("an unknown method", ["quantize", "model=base", "method=int3", "output_dir=q-1"], "error"),
    ("a group size that does not divide a layer's in_features",
     ["quantize", "model=base", "method=int4", "group_size=48", "output_dir=q-2"], "error"),
    ("an odd group size", ["quantize", "model=base", "method=int4", "group_size=33", "output_dir=q-3"], "error"),
    ("a model directory that does not exist", ["quantize", "model=nowhere", "output_dir=q-4"], "error"),
    ("calibration text that does not exist",
     ["quantize", "model=base", "method=gptq", "calibration=missing.txt", "output_dir=q-5"], "error"),
    ("calibration text with no text", ["quantize", "model=base", "method=gptq", "calibration=empty.txt",
                                       "output_dir=q-6"], "error"),
    ("quantising into the model's own directory", ["quantize", "model=base", "method=int8", "output_dir=base"],
     "error"),
    ("a quantised directory with a tensor missing", ["generate", "model=q-missing", "prompt=The river"], "error"),
    ("a quantised directory with codes of the wrong dtype", ["generate", "model=q-dtype", "prompt=The river"],
     "error"),
    ("a quantised directory with zero-points out of range", ["generate", "model=q-zeros", "prompt=The river"],
     "error"),
    ("training on a quantised directory", ["sft", "model=q-gptq", "data=chats.jsonl", "output_dir=q-7"], "error"),
    ("quantising a quantised directory", ["quantize", "model=q-gptq", "method=int8", "output_dir=q-8"], "error"),
    ("generating from a GPTQ directory", ["generate", "model=q-gptq", "prompt=The river", "max_new_tokens=4"], "ok"),
]


def setup_run(work: Path) -> None:
    """Pipelines for `temper run`, each with one mistake its name says (`pipe-*.yaml`)."""
    world = "stages:\n  world:\n    command: world\n    num_people: 4\n"
    pipes = {
        "pipe-unknown-ref": world + "  tok:\n    command: tokenizer\n    data: ['${wrld}/pretrain/train.jsonl']\n",
        "pipe-cycle": world + "  a:\n    command: tokenizer\n    data: ['${b}/x']\n  b:\n    command: tokenizer\n"
                              "    data: ['${a}/x']\n",
        "pipe-bad-key": world + "  tok:\n    command: tokenizer\n    vocab_size: 512\n    min_frequncy: 2\n",
        "pipe-bad-value": world + "  pre:\n    command: pretrain\n    max_steps: many\n",
        "pipe-unknown-command": world + "  tok:\n    command: tokeniser\n",
        "pipe-no-command": world + "  tok:\n    data: [x]\n",
        "pipe-not-stages": "stage:\n  world:\n    command: world\n",
        "pipe-eval-key": world + "  eval:\n    command: eval\n    model: base\n    tasks: [world_chat_qa]\n"
                                 "    reward_modle: rm\n",
    }
    for name, text in pipes.items():
        (work / f"{name}.yaml").write_text(text)
    pair = {"prompt": "What is 1 plus 1?", "chosen": "2", "rejected": "3"}
    (work / "pairs-no-chosen.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "chosen": None}) + "\n")
    (work / "pref-task.yaml").write_text("name: pref\ntype: preference\ndata: pairs-no-chosen.jsonl\n"
                                         "prompt: 'Question: {prompt}\\nAnswer:'\n")
    (work / "pref-chat-task.yaml").write_text("name: pref\ntype: preference\ndata: pairs-no-chosen.jsonl\n"
                                              "prompt: '{prompt}'\nchat: sometimes\n")


RUN_CASES: list[tuple[str, list[str], str]] = [
    ("a reference to a stage that does not exist", ["run", "pipe-unknown-ref.yaml"], "error"),
    ("two stages that read each other (a cycle)", ["run", "pipe-cycle.yaml"], "error"),
    ("a misspelt key in a stage", ["run", "pipe-bad-key.yaml"], "error"),
    ("a value of the wrong type in a stage", ["run", "pipe-bad-value.yaml"], "error"),
    ("a command that does not exist", ["run", "pipe-unknown-command.yaml"], "error"),
    ("a stage without its command", ["run", "pipe-no-command.yaml"], "error"),
    ("a top-level key that is not stages:", ["run", "pipe-not-stages.yaml"], "error"),
    ("--from a stage that does not exist", ["run", "pipe-bad-key.yaml", "--from", "tk"], "error"),
    ("an override of a stage that does not exist", ["run", "pipe-bad-key.yaml", "wrold.num_people=3"], "error"),
    ("a pipeline file that does not exist", ["run", "nope.yaml"], "error"),
    ("a misspelt eval key in a pipeline stage (reward_modle)", ["run", "pipe-eval-key.yaml"], "error"),
    ("eval's reward_model= naming a causal LM, not a reward model",
     ["eval", "model=base", "tasks=qa-task.yaml", "reward_model=base", "output_dir=run-e1"], "error"),
    ("eval's reference= that does not exist",
     ["eval", "model=base", "tasks=qa-task.yaml", "reference=no-such-sft", "output_dir=run-e2"], "error"),
    ("eval's reference= with no generation task to compare replies on",
     ["eval", "model=base", "tasks=pref-task.yaml", "reference=base", "output_dir=run-e3"], "error"),
    ("a preference row whose chosen reply is null", ["eval", "model=base", "tasks=pref-task.yaml",
                                                     "output_dir=run-e4"], "error"),
    ("a task's chat: neither true, false nor auto", ["eval", "model=base", "tasks=pref-chat-task.yaml",
                                                     "output_dir=run-e5"], "error"),
]


def setup_report(work: Path) -> None:
    """Run directories for `temper report` (`rep-*`), each damaged as its name says; `rep-partial` is a run
    whose second stage never finished (no record, no output) and whose first stage's files are damaged."""
    def run_dir(name: str, run: str | None, records: dict[str, str] | None = None) -> Path:
        folder = work / name
        (folder / ".run").mkdir(parents=True)
        if run is not None:
            (folder / "run.json").write_text(run)
        for stage, text in (records or {}).items():
            (folder / ".run" / f"{stage}.json").write_text(text)
        return folder

    good = json.dumps({"pipeline": "p.yaml", "output_dir": "runs/p", "stages": [{"stage": "pretrain", "status": "ran",
                                                                                  "seconds": 1.0}]})
    run_dir("rep-no-run-json", None)
    run_dir("rep-run-json-not-json", "{\"stages\": [")
    run_dir("rep-stages-not-a-list", json.dumps({"stages": {"pretrain": "ran"}}))
    run_dir("rep-stage-without-name", json.dumps({"stages": [{"status": "ran"}]}))
    partial = run_dir("rep-partial", json.dumps({"pipeline": "p.yaml", "stages": [
        {"stage": "pretrain", "status": "ran", "seconds": 1.0}, {"stage": "eval", "status": "running"}]}),
        {"pretrain": json.dumps({"command": "pretrain", "config": {"output_dir": "elsewhere/pretrain"}})})
    (partial / "pretrain").mkdir()
    (partial / "pretrain" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    (partial / "pretrain" / "summary.json").write_text("{")
    run_dir("rep-record-damaged", good, {"pretrain": "\x00\x01 not json"})
    blocked = run_dir("rep-report-dir-is-a-file", good)
    (blocked / "report").write_text("a file where the PNGs go\n")
    blocked = run_dir("rep-report-html-is-a-dir", good)
    (blocked / "report.html").mkdir()
    (work / "rep-a-file").write_text("not a directory\n")


REPORT_CASES: list[tuple[str, list[str], str]] = [
    ("no run_dir=", ["report"], "error"),
    ("a run_dir that does not exist", ["report", "run_dir=nope"], "error"),
    ("a run_dir that is a file", ["report", "run_dir=rep-a-file"], "error"),
    ("a directory that is no run (no run.json)", ["report", "run_dir=rep-no-run-json"], "error"),
    ("run.json cut short", ["report", "run_dir=rep-run-json-not-json"], "error"),
    ("run.json whose stages are not a list", ["report", "run_dir=rep-stages-not-a-list"], "error"),
    ("a stage in run.json without its name", ["report", "run_dir=rep-stage-without-name"], "error"),
    ("a partial run: a stage never finished, a summary cut short, a metrics line not JSON (noted in the report's "
     "warnings)", ["report", "run_dir=rep-partial"], "ok"),
    ("a stage's record that is not JSON (noted in the report's warnings)", ["report", "run_dir=rep-record-damaged"],
     "ok"),
    ("a file where the report's PNG folder goes", ["report", "run_dir=rep-report-dir-is-a-file"], "error",
     ["rep-report-dir-is-a-file/report"]),
    ("a directory where report.html goes", ["report", "run_dir=rep-report-html-is-a-dir"], "error",
     ["rep-report-html-is-a-dir/report.html"]),
]


SECTIONS = {"first-round": FIRST_ROUND, "writes": WRITES, "divergence": DIVERGENCE, "settings": SETTINGS,
            "inputs": INPUTS, "grpo": GRPO, "ppo": PPO, "reward": REWARD_CASES, "curate": CURATE_CASES,
            "export": EXPORT_CASES, "encoder": ENCODER_CASES, "serve": SERVE_CASES, "quantize": QUANTIZE_CASES,
            "run": RUN_CASES, "report": REPORT_CASES}
TITLES = {
    "first-round": "Data files, settings and models: the first round",
    "writes": "Every write claims its target: never a device, an input, or a model the command did not make "
              "(the last column names what is checked unchanged, bytes and inode type)",
    "divergence": "A non-finite loss or gradient stops the run; no NaN model is saved",
    "settings": "Settings refused at load, with the key named",
    "inputs": "Special, endless or huge inputs, judges that hang, and messages that say what and where",
    "grpo": "GRPO: reward functions that fail, and batches and lengths that do not fit",
    "ppo": "PPO: reward models without a scalar head, lengths that do not fit, NaN scores and values",
    "reward": "Reward models (outcome and process): bodies that cannot be one, heads that are missing, margins, "
              "steps and rows that are bad",
    "curate": "Data curation: binary, empty and undecodable documents, gigantic lines, settings that do not fit",
    "export": "Export: formats, families and tensors GGUF cannot take, adapters, outputs that are not the export's",
    "encoder": "Encoders (pretrain objective=mlm|nsp|sop|electra|contrastive, finetune-encoder, embed): pairs "
               "missing a sentence, texts too short to mask, tokenizers without [MASK], rows without labels",
    "serve": "Serving: adapters, names, ports and templates refused before the server starts (request-level "
             "errors are 4xx JSON, tested by tests/test_serve.py's fuzz)",
    "quantize": "Quantisation: methods, group sizes and calibration that do not fit, damaged quantised directories",
    "run": "Pipelines (temper run): references to stages that do not exist or come later, stage config errors "
           "(named with the YAML line and the stage), commands that do not exist; refused before any stage runs; "
           "the eval stage's checkpoint-table keys (reward_model=, reference=, preference tasks, chat: auto)",
    "report": "Run reports (temper report): directories that are no run, damaged run.json; a partial or damaged "
              "run still gets the report of what it left, the damage listed among its warnings",
}


def snapshot(path: Path) -> tuple:
    """A path's inode type (the link's own and the followed one) and a regular file's bytes; a
    directory's every file (but its lock, which a claim rewrites)."""
    if path.is_dir() and not path.is_symlink():
        return tuple((str(p.relative_to(path)), snapshot(p)) for p in sorted(path.rglob("*"))
                     if p.name != ".temper.lock")
    if not os.path.lexists(path):
        return ("missing",)
    kind = stat.S_IFMT(os.lstat(path).st_mode)
    followed = os.stat(path).st_mode if os.path.exists(path) else 0
    return kind, stat.S_IFMT(followed), path.read_bytes() if stat.S_ISREG(followed) else None


def shown(args: list[str]) -> str:
    for name, settings in SHORTHANDS.items():  # the tiny-run settings, spelled out once in the header
        n = len(settings)
        for i in range(len(args) - n + 1):
            if args[i:i + n] == settings:
                args = [*args[:i], name, *args[i + n:]]
                break
    def quote(a: str) -> str:
        a = a.encode("utf-8", "surrogateescape").decode("latin-1") if any("\udc80" <= c <= "\udcff" for c in a) else a
        return a if a and all(c.isalnum() or c in "-_=./,[]:$" for c in a) else json.dumps(a, ensure_ascii=False)

    return "temper " + " ".join(quote(a) for a in args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any case misbehaves")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bad-inputs.md"))
    parser.add_argument("--section", choices=sorted(SECTIONS), help="run one section's cases (no table written)")
    args = parser.parse_args()
    cases = [(name, case) for name, section in SECTIONS.items() if args.section in (None, name) for case in section]
    rows, bad = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup(work)
        for section, (what, argv, expected, *kept) in cases:
            before = {p: snapshot(work / p) for p in (kept[0] if kept else [])}
            done = temper(argv, work)
            destroyed = [p for p in before if snapshot(work / p) != before[p]]
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            last = lines[-1] if lines else "(nothing)"
            if expected == "ok":  # handled: show what it said about it, if anything
                said = [line for line in lines if line.startswith(("warning:", "note:", "resumed from", "dpo data:"))]
                last = " / ".join(said) if said else "(handled without a message)"
            traceback = "Traceback" in done.stderr
            fine = (done.returncode == 0) if expected == "ok" else (done.returncode == 2 and not traceback)
            if destroyed:
                fine, last = False, f"destroyed data: {', '.join(destroyed)} changed; {last}"
            if not fine:
                bad.append(f"{what}: exit {done.returncode}: {last}")
            rows.append((section, what, shown(argv), done.returncode, last.replace(tmp, "..").replace("|", "\\|"),
                         ", ".join(f"`{p}`" for p in before)))
            print(f"[{'ok' if fine else 'BAD'}] {what}: {last}", file=sys.stderr)
    table = ["# Bad input: what temper says", "",
             "Generated by `python docs/bad_inputs.py` (tiny inputs made in a scratch directory; "
             "`base` and `other-base` are two-step pretrained models, `lora` a LoRA adapter of `base`; "
             "`no-template` is `base` without its chat template; each `dpo` data file holds four good pairs "
             "and the bad one its name says (`one-in-13.jsonl`: twelve good pairs and one with an empty answer, "
             "`all-bad.jsonl`: four good pairs and each of the others' bad one); `gsm8k-like.jsonl` holds "
             "`question`/`answer` rows; `my_judges.py` holds stand-in judges for "
             "online DPO: `raises` always raises, `text` returns \"7/10\", `flaky` raises, returns text and NaN "
             "on its first three samples and a number after; "
             + ", ".join(f"`{name}` stands for `{' '.join(settings)}`" for name, settings in SHORTHANDS.items())
             + "). "
             "Each command exits with status 2 and prints one line, except where the input is handled "
             "(exit 0); where a case names files to keep, the script checks their bytes and inode type are "
             "unchanged afterwards. The fixtures of the later sections are made by the script's `setup_*` "
             "functions; their names say what they are. Rerun the script after changing a message."]
    for name in SECTIONS:
        mine = [row for row in rows if row[0] == name]
        if mine:
            table += ["", f"## {TITLES[name]}", "", "| input | command | exit | the line temper prints | kept |",
                      "|---|---|---|---|---|"]
            table += [f"| {w} | `{c}` | {code} | {line} | {kept} |" for _, w, c, code, line, kept in mine]
    if not args.section:
        Path(args.out).write_text("\n".join(table) + "\n", encoding="utf-8")
    print(f"{'ran' if args.section else 'wrote ' + args.out + ':'} {len(rows)} cases, {len(bad)} misbehaving",
          file=sys.stderr)
    for b in bad:
        print("  " + b, file=sys.stderr)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
