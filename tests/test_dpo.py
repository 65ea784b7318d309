"""`temper dpo`: the loss starts at log 2, held-out preference accuracy rises, the three
reference modes agree, HH-RLHF pairs without a chat template train, and two processes equal one."""

import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    ADAMW_EPS,
    adamw_drift,
    approx_reordered,
    assert_weights_close,
    decoder_lengths,
    reorder_tol,
    shared_file,
)
from safetensors.torch import load_file

from temper.config import load_config
from temper.data.tokenizer import Tokenizer, train_tokenizer
from temper.errors import TemperError
from temper.models import preset
from temper.recipes import dpo
from temper.train.rundir import read_metrics

TRL_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected"]
# llama-tiny on the tiny tokenizer, rows of at most 64 tokens, 4 pairs (8 rows) a step
CONFIG = preset("llama-tiny", vocab_size=300)  # tiny_model_dir's shape


def step_lengths(seq_len: int) -> tuple[int, ...]:
    return decoder_lengths(CONFIG, seq_len, tokens=8 * seq_len)  # 4 pairs, 8 rows, a step


def dpo_bounds(row: dict, lengths, *, prefix: str = "", beta: float = 0.1) -> dict[str, float]:
    """How far each DPO metric of `row` may move when its sums run in another order (conftest.
    reorder_tol over `lengths`): a sequence's log-prob within tol of its size; a reward is
    beta x 2 of them, a margin and the sigmoid loss (slope at most 1) beta x 4; an accuracy counts
    margins, which are exactly 0 (policy = reference) or far from it."""
    # the logged log-probs are means over pairs: the longest sequences here hold at most twice the mean
    logp = 2 * max(abs(row[f"{prefix}logps/chosen"]), abs(row[f"{prefix}logps/rejected"]))
    logits = max(abs(row[f"{prefix}logits/chosen"]), abs(row[f"{prefix}logits/rejected"]))
    tol = reorder_tol(logp, *lengths)
    return {"loss": 4 * beta * tol, "rewards/chosen": 2 * beta * tol, "rewards/rejected": 2 * beta * tol,
            "rewards/margins": 4 * beta * tol, "rewards/accuracies": 0.0, "logps/chosen": tol,
            "logps/rejected": tol, "logits/chosen": reorder_tol(logits, *lengths),
            "logits/rejected": reorder_tol(logits, *lengths)}


def assert_same_dpo_rows(got: list[dict], expected: list[dict], keys, *, seq_len: int = 64) -> None:
    """Two DPO trainings of the same maths in another order: step t after t - 1 chained steps
    and a forward pass summed over a sequence's tokens."""
    assert len(got) == len(expected) > 0
    forward = decoder_lengths(CONFIG, seq_len) + (seq_len,)
    for t, (a, b) in enumerate(zip(got, expected)):
        bounds = dpo_bounds(b, step_lengths(seq_len) * t + forward)
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=0, abs=bounds[key]), (key, t + 1)


@pytest.fixture()
def pairs(tmp_path):
    """Prompts answered in a preferred style (a number) and a dispreferred one (a refusal)."""
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" The answer is {2 * i}.",
             "rejected": " I will not say."} for i in range(48)]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    return train, test


def run_dpo(tmp_path, model_dir, *extra, out="dpo"):
    cfg = load_config(dpo.Config, None, [f"model={model_dir}", f"output_dir={tmp_path / out}", "batch_size=4",
                                         "logging.progress=false", "logging.every=1", "seq_len=64",
                                         "optim.lr=3e-3", "schedule.name=constant", "schedule.warmup_steps=0",
                                         *extra])
    return dpo.run(cfg)


def test_dpo_starts_at_log2_and_learns_the_preference(tmp_path, tiny_model_dir, pairs):
    train, test = pairs
    summary = run_dpo(tmp_path, tiny_model_dir, f"data={train}", f"eval_data={test}", "max_steps=12",
                      "logging.eval_every=6")
    before = summary["before"]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert before["eval_rewards/accuracies"] == 0.0 and before["eval_rewards/margins"] == 0.0
    assert summary["eval_rewards/accuracies"] == 1.0
    assert summary["eval_rewards/margins"] > 0.5 and summary["eval_loss"] < 0.5
    rows = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(k in rows[-1] for k in TRL_METRICS)
    assert rows[-1]["rewards/chosen"] > rows[-1]["rewards/rejected"]
    assert (tmp_path / "dpo" / "model.safetensors").is_file()


def test_reference_modes_agree(tmp_path, tiny_model_dir, pairs):
    """A frozen copy and log-probs computed once give the same training; with LoRA, the adapter
    disabled gives what a frozen copy of the base gives (without a second model in memory)."""
    train, _ = pairs
    common = [f"data={train}", "max_steps=3", "eval_fraction=0.1", "logging.eval_at_start=false",
              f"optim.eps={ADAMW_EPS}"]
    copy = run_dpo(tmp_path, tiny_model_dir, *common, "reference=copy", out="copy")
    pre = run_dpo(tmp_path, tiny_model_dir, *common, "reference=precomputed", out="pre")
    assert copy["reference"] == "copy" and pre["reference"] == "precomputed"
    assert (tmp_path / "pre" / "reference_logps.safetensors").is_file()

    def rows(name):
        return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]

    assert_same_dpo_rows(rows("pre"), rows("copy"), ["loss"])
    lora = ["peft.method=lora", "peft.r=4", "peft.target_modules=[q_proj,v_proj]"]
    adapter = run_dpo(tmp_path, tiny_model_dir, *common, *lora, out="adapter")
    assert adapter["reference"] == "adapter"
    run_dpo(tmp_path, tiny_model_dir, *common, *lora, "reference=copy", out="lora_copy")
    assert_same_dpo_rows(rows("adapter"), rows("lora_copy"), ["loss"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_kto_on_unpaired_examples(tmp_path, tiny_model_dir, pairs):
    """KTO: every pair becomes a desirable and an undesirable example; at initialisation r = 0 and
    the reference point is 0, so each example's loss is 1 - sigma(0) = 0.5; training moves the
    desirable rewards above the undesirable ones."""
    train, test = pairs
    summary = run_dpo(tmp_path, tiny_model_dir, f"data={train}", f"eval_data={test}", "loss_type=[kto]",
                      "max_steps=12", "logging.eval_every=0")
    rows = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == 0.0
    assert summary["before"]["eval_loss"] == pytest.approx(0.5, abs=1e-6)
    assert summary["pairs"] == 80  # 40 pairs, unpaired
    assert summary["eval_rewards/chosen"] > summary["eval_rewards/rejected"]
    assert summary["eval_loss"] < 0.45 and all(r["kl"] >= 0 for r in rows)


def test_hh_rlhf_pairs_train_at_the_default_settings(tmp_path, tiny_model_dir):
    """HH-RLHF read straight from gzip (implicit prompts ending at '\\n\\nAssistant:') with the data defaults,
    by a model that has a chat template (string rows use none: `template=none` is not needed): the row with
    an empty answer is skipped and counted, the long ones are cut to fit and counted, none is dropped; the
    loss starts at log 2 and the margin grows."""
    import shutil

    from temper.data.chat import BUILTIN_TEMPLATES
    from temper.data.tokenizer import Tokenizer

    model = tmp_path / "chat_model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = Tokenizer.from_dir(model)
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    tokenizer.save(model)
    data = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    with pytest.warns(UserWarning, match=r"1 bad preference rows skipped \(1 empty_response; first of each: "
                                         r".*harmless-base-test.jsonl.gz:87: 'chosen' is empty\)"):
        summary = run_dpo(tmp_path, model, f"data={data}", "limit=100", "seq_len=128", "max_steps=16",
                          "logging.eval_every=0", "eval_fraction=0.8", "eval_pairs=8", "optim.lr=1e-3")
    assert summary["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["rows_read"] == 101 and summary["skipped_rows"] == {"empty_response": 1}  # limit: 100 pairs
    assert (summary["pairs"], summary["held_out_pairs"]) == (20, 8)  # 80 held out: every other row is kept
    assert summary["truncated"] >= 50 and summary["prompt_truncated"] > 0 and summary["answer_truncated"] > 0
    rows = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["rewards/margins"] == 0.0
    late = rows[-4:]  # 3 epochs over 20 pairs: the margin of the pairs trained on grows, the loss falls
    assert min(r["rewards/margins"] for r in late) > 0.05 and max(r["loss"] for r in late) < math.log(2) - 0.01


def test_bad_settings_are_one_line(tmp_path, tiny_model_dir, pairs):
    train, _ = pairs
    cases = [
        (["loss_type=[sigmod]"], r"loss_type 'sigmod' is not one of .*did you mean 'sigmoid'"),
        (["loss_type=[sigmoid,sft]", "loss_weights=[1]"], "loss_weights has 1 numbers for 2 loss types"),
        (["reference=adapter"], "reference=adapter disables a LoRA adapter"),
        (["loss_type=[simpo]", "reference=copy"], "reference is used only with a loss that uses a reference"),
        (["beta=0"], "beta must be greater than 0"),
        (["loss_type=[kto,sigmoid]"], "loss_type=kto trains on unpaired examples"),
        (["loss_type=[kto]", "reference=precomputed"], "reference=precomputed is for pair losses"),
        (["columns.chosn=good"], r"columns.chosn: not a preference column \(did you mean 'columns.chosen'\?\)"),
    ]
    for extra, message in cases:
        with pytest.raises(TemperError, match=message):
            run_dpo(tmp_path, tiny_model_dir, f"data={train}", *extra)


def test_two_processes_equal_one(tmp_path, tiny_model_dir, pairs):
    """Distributed by construction: DDP on 2 ranks x 2 pairs = 1 rank x 2 micro-batches of 2 pairs."""
    train, _ = pairs
    common = [f"model={tiny_model_dir}", f"data={train}", "max_steps=3", "batch_size=2", "seq_len=64",
              "logging.progress=false", "logging.every=1", "logging.eval_at_start=false", "eval_fraction=0.1",
              "optim.lr=3e-3", "schedule.name=constant", "schedule.warmup_steps=0", f"optim.eps={ADAMW_EPS}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "temper", "dpo", *common, "grad_accum=2",
                          f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True, timeout=240, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "temper", "dpo", *common, "strategy=ddp", f"output_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert_same_dpo_rows(b, a, ["loss", "rewards/margins", "rewards/accuracies"])
    params = sum(t.numel() for t in load_file(tmp_path / "one" / "model.safetensors").values())
    for t, (x, y) in enumerate(zip(b, a), start=1):  # a norm over every parameter, after t steps
        assert x["grad_norm"] == approx_reordered(y["grad_norm"], step_lengths(64) * t + (params,))


def test_padding_free_trains_as_padded(tmp_path, tiny_model_dir):
    """padding_free=true (the default) packs a batch's sequences into fewer rows: the same losses,
    metrics and weights as one right-padded row a sequence, with fewer positions run."""
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" The answer is {2 * i}.",
             "rejected": " I will not say." * (1 + i % 4)} for i in range(24)]  # lengths differ: rows pack
    train, test = tmp_path / "varied.jsonl", tmp_path / "varied_test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    common = [f"data={train}", f"eval_data={test}", "max_steps=3", "logging.eval_every=3", "reference=copy",
              "seq_len=256", f"optim.eps={ADAMW_EPS}"]
    packed = run_dpo(tmp_path, tiny_model_dir, *common, out="packed")
    padded = run_dpo(tmp_path, tiny_model_dir, *common, "padding_free=false", out="padded")
    rows = {name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
            for name in ("packed", "padded")}
    assert_same_dpo_rows(rows["packed"], rows["padded"], ["loss", *TRL_METRICS], seq_len=256)
    after = step_lengths(256) * 3 + decoder_lengths(CONFIG, 256) + (256,)  # 3 steps, then a forward pass
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], abs=dpo_bounds(padded, after, prefix="eval_")["loss"])
    drift = adamw_drift([r["lr"] for r in rows["padded"]], [r["grad_norm"] for r in rows["padded"]], step_lengths(256))
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("packed", "padded"))
    assert_weights_close(a, b, drift, steps=3)
    assert packed["train_tokens"] < 0.8 * padded["train_tokens"]  # positions run, padding included


def test_lora_on_lm_head_trains(tmp_path, tiny_model_dir, pairs):
    """peft.target_modules=[lm_head] was a traceback (the log-probs read lm_head.weight of a LoRA
    wrapper): the policy's log-probs go through the adapted output layer, the reference's through
    the adapter switched off."""
    from safetensors.torch import load_file

    train, _ = pairs
    run_dpo(tmp_path, tiny_model_dir, f"data={train}", "max_steps=2", "eval_fraction=0", "logging.eval_at_start=false",
            "peft.method=lora", "peft.target_modules=[lm_head]", "optim.lr=1e-2")
    rows = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[-1]["loss"] < rows[0]["loss"]
    saved = load_file(tmp_path / "dpo" / "adapter_model.safetensors")
    assert sorted(saved) == ["base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"]
    assert saved["base_model.model.lm_head.lora_B.weight"].abs().max() > 0


@pytest.mark.parametrize("reference, share", [("copy", 4 / 3), ("precomputed", 1.0)])
def test_mfu_counts_each_position_once_and_the_reference_forward(tmp_path, tiny_model_dir, pairs, reference, share):
    """tokens are every position run (chosen and rejected rows); a reference model adds its forward
    (a third of the policy's forward + backward), a precomputed one nothing."""
    from temper.models import load_model
    from temper.train.engine import flops_per_token

    train, _ = pairs
    run_dpo(tmp_path, tiny_model_dir, f"data={train}", "max_steps=2", "eval_fraction=0",
            "logging.eval_at_start=false", "peak_flops=1e12", f"reference={reference}", out=reference)
    row = [r for r in read_metrics(tmp_path / reference / "metrics.jsonl") if "mfu" in r][-1]
    expected = row["tokens_per_second"] * share * flops_per_token(load_model(tiny_model_dir), 64) / 1e12
    assert row["mfu"] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- the reference component


def test_adapter_reference_uses_the_original_modules_to_save(tmp_path, tiny_model_dir, pairs):
    """With peft.modules_to_save=[lm_head] the adapter-disabled reference is the untrained base, as a
    frozen copy is (PEFT disables a modules_to_save wrapper to its original module): both references
    give the same training. Before the fix the trained lm_head leaked into the reference."""
    train, _ = pairs
    common = [f"data={train}", "max_steps=6", "eval_fraction=0.1", "logging.eval_at_start=false",
              f"optim.eps={ADAMW_EPS}", "peft.method=lora", "peft.r=4", "peft.target_modules=[q_proj,v_proj]",
              "peft.modules_to_save=[lm_head]"]
    run_dpo(tmp_path, tiny_model_dir, *common, "reference=adapter", out="adapter")
    run_dpo(tmp_path, tiny_model_dir, *common, "reference=copy", out="copy")

    def rows(name):
        return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]

    assert rows("copy")[-1]["loss"] < math.log(2) - 0.05  # the policy moved away from its reference
    # the same maths in another order (the base's lm_head kept beside the adapter vs a copy's)
    assert_same_dpo_rows(rows("adapter"), rows("copy"), ["loss"])


def test_disabled_adapters_restore_tied_modules_to_save():
    """Unit: after training a tied lm_head in place, the disabled model's logits are the base's, and
    enabling again gives the trained ones; the originals are not parameters and not in the state dict."""
    from temper.config import PeftConfig
    from temper.models import build_model, preset
    from temper.peft.lora import disable_adapters, inject_lora, mark_trainable

    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64))
    assert model.config.tie_embeddings
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        base = model(ids).clone()
    inject_lora(model, PeftConfig(method="lora", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    mark_trainable(model)
    names = set(model.state_dict())
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # "training" the tied weight moves the input embedding too
        trained = model(ids).clone()
        with disable_adapters(model):
            disabled = model(ids)
        again = model(ids)
    assert (trained - base).abs().max() > 0.1
    torch.testing.assert_close(disabled, base, atol=0, rtol=0)
    torch.testing.assert_close(again, trained, atol=0, rtol=0)
    assert set(model.state_dict()) == names and all(not n.startswith("lora_original") for n in names)


def test_precomputed_reference_cache_is_keyed_on_the_weights(tmp_path, tiny_model_dir, pairs):
    """overwrite=true keeps caches; a reference model whose weights changed at the same path must not
    reuse the old log-probs: the loss of a policy equal to its reference starts at log 2 again."""
    import shutil

    from temper.data.tokenizer import Tokenizer
    from temper.models import load_model, save_model

    train, test = pairs
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    common = [f"data={train}", f"eval_data={test}", "max_steps=1", "reference=precomputed"]
    first = run_dpo(tmp_path, model_dir, *common)
    assert first["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    model = load_model(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    save_model(model, model_dir, tokenizer=Tokenizer.from_dir(model_dir))  # new weights, same path
    again = run_dpo(tmp_path, model_dir, *common, "overwrite=true")
    assert again["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------- the reference and the positions, at load


def test_a_reference_with_another_tokenizer_is_refused_before_anything_runs(tmp_path, tiny_model_dir, pairs):
    """The reference scores the policy's token ids: the same tokenizer (a copy of the policy) trains; a
    tokenizer with other tokens, or the same tokens with another end-of-sequence token, is refused
    naming what differs, before the output directory is made."""
    train, _ = pairs
    same = tmp_path / "same"
    shutil.copytree(tiny_model_dir, same)
    summary = run_dpo(tmp_path, tiny_model_dir, f"data={train}", f"ref_model={same}", "max_steps=1", out="ok")
    assert summary["reference"] == "copy"

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    train_tokenizer(["Zebras graze quietly near the old stone bridge."] * 40, vocab_size=300).save(other)
    with pytest.raises(TemperError, match=rf"ref_model={other} has another tokenizer than model={tiny_model_dir} "
                                          r"\((\d+ tokens vs \d+|token \d+ is .* in ref_model's, .* in model's)\)"):
        run_dpo(tmp_path, tiny_model_dir, f"data={train}", f"ref_model={other}", out="o1")
    assert not (tmp_path / "o1").exists()

    eos = tmp_path / "eos"
    shutil.copytree(tiny_model_dir, eos)
    tokenizer = Tokenizer.from_dir(eos)
    tokenizer.eos_token = tokenizer.pad_token
    tokenizer.save(eos)
    with pytest.raises(TemperError, match=r"has another tokenizer .*\(eos_token is '<\|pad\|>' in ref_model's, "
                                          r"'<\|eos\|>' in model's\)"):
        run_dpo(tmp_path, tiny_model_dir, f"data={train}", f"ref_model={eos}", "reference=precomputed", out="o2")


@pytest.mark.parametrize("command", ["dpo", "sft"])
def test_sequences_longer_than_the_models_positions_are_refused_at_load(tmp_path, tiny_model_dir, pairs, command):
    """Pretraining refused a seq_len beyond the model's positions; fine-tuning trained it. Every recipe
    checks it as it starts, for each model it feeds (DPO's reference too), before the output directory."""
    train, _ = pairs
    positions = preset("llama-tiny").max_seq_len
    module = dpo if command == "dpo" else importlib.import_module("temper.recipes.sft")
    args = [f"model={tiny_model_dir}", f"data={train}", f"output_dir={tmp_path / 'out'}", f"seq_len={positions + 1}"]
    with pytest.raises(TemperError, match=rf"seq_len {positions + 1} is larger than the context of "
                                          rf"model={re.escape(str(tiny_model_dir))} \({positions} positions\)"):
        module.run(load_config(module.Config, None, args))
    assert not (tmp_path / "out").exists()
    if command == "dpo":  # a reference with fewer positions than the policy
        short = tmp_path / "short"
        shutil.copytree(tiny_model_dir, short)
        config = json.loads((short / "config.json").read_text())
        config["max_position_embeddings"] = 32
        (short / "config.json").write_text(json.dumps(config))
        with pytest.raises(TemperError, match=rf"seq_len 64 is larger than the context of ref_model={short} \(32 "):
            run_dpo(tmp_path, tiny_model_dir, f"data={train}", f"ref_model={short}")
