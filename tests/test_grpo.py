"""temper grpo: a tiny run end to end, the zero-advantage and μ=1 properties, exact resume across a
generation buffer, GSM8K's own rows, and bad input as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ADAMW_EPS,
    adamw_drift,
    approx_reordered,
    assert_weights_close,
    decoder_lengths,
    eos_only_sampler,
    reorder_tol,
    shared_file,
)
from safetensors.torch import load_file

from temper.config import load_config
from temper.data.prompts import row_prompt
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.losses.clm import IGNORE_INDEX
from temper.losses.logprobs import causal_lm_token_logprobs, rollout_token_logprobs
from temper.models import load_model
from temper.recipes import grpo

TRL_METRICS = ("loss", "reward", "reward_std", "rewards/world/mean", "rewards/world/std", "frac_reward_zero_std",
               "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
               "completions/mean_length", "completions/clipped_ratio", "time/rollout", "time/score", "time/train")
TIMING = ("time/", "tokens_per_second", "step_tokens_per_second", "mfu", "memory_mb")


def constant_reward(prompts, completions, **kwargs):
    return [0.5] * len(completions)


def text_length(prompts, completions, **kwargs):  # varies within a group: advantages are not 0
    return [float(len(c)) for c in completions]


def wrong_count(prompts, completions, **kwargs):
    return [1.0]


def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def raises(prompts, completions, **kwargs):
    raise RuntimeError("checker crashed")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(12)))
    return path


def settings(model, prompts, out, *extra):
    return [f"model={model}", f"prompts={prompts}", "rewards=world", "num_generations=4", "batch_size=4",
            "max_completion_length=6", "max_steps=2", "logging.every=1", "logging.eval_every=0",
            "logging.eval_at_start=false", "logging.progress=false", "peak_flops=1e12", f"output_dir={out}", *extra]


def train(*args):
    return grpo.run(load_config(grpo.Config, None, list(args)))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_run_logs_every_trl_metric_with_lora_and_the_adapter_as_reference(tiny_model_dir, prompts_file,
                                                                                  tmp_path):
    out = tmp_path / "run"
    summary = train(*settings(tiny_model_dir, prompts_file, out, "beta=0.04", "peft.method=lora",
                              f"eval_prompts={prompts_file}", "eval_limit=3", "logging.eval_every=2", "optim.lr=1e-3"))
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2]
    for name in TRL_METRICS:
        assert all(name in r for r in logged), name
    assert "eval_pass_rate" in logged[-1] and 0.0 <= logged[-1]["eval_pass_rate"] <= 1.0
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    # μ = 1 and one optimiser step per generation batch: π_old = π_θ, no token clipped
    assert all(r[f"clip_ratio/{k}_mean"] == 0.0 for r in logged for k in ("low", "high", "region"))
    assert summary["generations"] == 2 and summary["peft"] == "lora" and "eval_pass_rate" in summary
    assert (out / "adapter_model.safetensors").is_file() or any(out.glob("adapter*"))


def test_identical_rewards_leave_the_policy_unchanged(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    train(*settings(tiny_model_dir, prompts_file, out, "rewards=test_grpo:constant_reward", "max_steps=1",
                    "optim.lr=0.1", "optim.weight_decay=0.0"))
    row = rows(out)[0]
    assert row["frac_reward_zero_std"] == 1.0 and row["reward"] == 0.5 and row["grad_norm"] == 0.0
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # the same run with a reward that varies moves the weights (the check above can fail)
    train(*settings(tiny_model_dir, prompts_file, tmp_path / "moved", "rewards=test_grpo:text_length", "max_steps=1",
                    "optim.lr=0.1"))
    moved = load_file(tmp_path / "moved" / "model.safetensors")
    assert any(not torch.equal(before[k], moved[k]) for k in before)


def test_resume_across_a_generation_buffer_is_exact(tiny_model_dir, prompts_file, tmp_path):
    # 3 optimiser steps per generation batch (old log-probs in play): steps 1-3 and 4-6; stopped at 2, mid-buffer
    extra = ("steps_per_generation=3", "checkpoint.every=1", "max_steps=5", "rewards=test_grpo:text_length", "optim.lr=1e-2",
             "schedule.name=constant", "schedule.warmup_steps=0")  # the lr of a step must not depend on max_steps
    train(*settings(tiny_model_dir, prompts_file, tmp_path / "a", *extra))
    train(*settings(tiny_model_dir, prompts_file, tmp_path / "b", *extra, "max_steps=2"))
    train(*settings(tiny_model_dir, prompts_file, tmp_path / "b", *extra, "resume=auto"))

    def trained(out):
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows(out)]

    straight, resumed = trained(tmp_path / "a"), trained(tmp_path / "b")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert resumed == straight
    assert any(r["clip_ratio/region_mean"] >= 0 and r["loss"] != 0 for r in straight)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_ranks_equal_one_process_with_the_same_global_batch(tiny_model_dir, prompts_file, tmp_path):
    """DDP under torchrun: 2 ranks x 1 prompt x G=4 = 1 process x 2 prompts x G=4 per step, the 2-rank
    run stopped after step 2 and resumed (a distributed checkpoint, each rank's rollout source). Each rank
    samples its own prompts with its rows' own streams, so the completions, rewards and generation
    metrics are the same as one process's, to the bit; advantages per group, dapo's token count
    summed over the ranks, the held-out pass rate from 3 prompts split 2 + 1: losses, gradient norms,
    weights and eval numbers agree within fp32 reordering."""
    given = settings(tiny_model_dir, prompts_file, "", "rewards=test_grpo:text_length", "max_steps=3",
                     "optim.lr=1e-2", "schedule.name=constant", "schedule.warmup_steps=0", f"optim.eps={ADAMW_EPS}",
                     f"eval_prompts={prompts_file}", "eval_limit=3", "eval_reward=world", "logging.eval_every=3",
                     "logging.eval_at_start=true")
    # the command line takes each key once: the later setting wins, output_dir is each run's
    common = [f"{k}={v}" for k, v in dict(a.split("=", 1) for a in given).items() if k not in ("output_dir", "batch_size", "max_steps")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}

    def launch(*launcher, out, extra):
        done = subprocess.run([sys.executable, *launcher, "-m", "temper", "grpo", *common, *extra,
                               f"output_dir={out}"], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    launch(out=tmp_path / "one", extra=["batch_size=8", "max_steps=3"])
    ranks = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    # the 2-rank run stops after step 2 and resumes from its checkpoint (each rank its own rollout state)
    two = ["batch_size=4", "strategy=ddp", "checkpoint.every=1"]
    log = launch(*ranks, out=tmp_path / "two", extra=[*two, "max_steps=2"])
    resumed = launch(*ranks, out=tmp_path / "two", extra=[*two, "max_steps=3", "resume=auto"])
    assert "resumed from" in resumed.stderr
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3]
    assert log.stderr.count("on each of 2 ranks") == 1  # rank 0 alone speaks
    same = ("reward", "reward_std", "rewards/text_length/mean", "frac_reward_zero_std", "completions/mean_length",
            "completions/clipped_ratio")
    seq = 40 + 6  # the longest prompt (tiny tokenizer: about a byte a token) and completion
    for t, (a, b) in enumerate(zip(two[1:], one[1:]), start=1):
        assert {k: a[k] for k in same} == {k: b[k] for k in same}, t
        lengths = decoder_lengths(load_model(tiny_model_dir).config, seq, tokens=8 * seq)
        assert a["loss"] == pytest.approx(b["loss"], abs=reorder_tol(2.0, *lengths * t)), t  # advantages up to ~1.5
        params = sum(x.numel() for x in load_file(tmp_path / "one" / "model.safetensors").values())
        assert a["grad_norm"] == approx_reordered(b["grad_norm"], lengths * t + (params,)), t
    assert one[1]["reward_std"] > 0 and one[1]["loss"] != 0  # something was learnt from
    for step in (0, 3):
        assert two[step if step == 0 else -1]["eval_pass_rate"] == one[step if step == 0 else -1]["eval_pass_rate"]
    trained = [r for r in one if "loss" in r]
    drift = adamw_drift([r["lr"] for r in trained], [r["grad_norm"] for r in trained],
                        decoder_lengths(load_model(tiny_model_dir).config, seq, tokens=8 * seq))
    assert_weights_close(load_file(tmp_path / "two" / "model.safetensors"),
                         load_file(tmp_path / "one" / "model.safetensors"), drift, steps=3)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["parallel"] == "2 processes, ddp (dp=2)"


def test_gsm8k_rows_as_they_are(tiny_model_dir, tmp_path):

    gsm8k = shared_file("gsm8k", "test.jsonl")
    summary = train(f"model={tiny_model_dir}", f"prompts={gsm8k}", "rewards=gsm8k", "num_generations=4",
                    "batch_size=4", "max_completion_length=4", "max_steps=1", "logging.progress=false",
                    "peak_flops=1e12", f"output_dir={tmp_path / 'run'}")
    row = rows(tmp_path / "run")[-1]
    assert "rewards/gsm8k/mean" in row and summary["prompts"] == 1319
    assert 0 <= summary["truncated_prompts"] < 20  # a few overlong for the tiny tokenizer: cut, counted


@pytest.mark.parametrize("args, message", [
    (["rewards=test_grpo:raises"], r"reward function raises raised RuntimeError.*checker crashed"),
    (["rewards=test_grpo:wrong_count"], r"reward function wrong_count returned 1 values for 4 completions"),
    (["rewards=test_grpo:nan_reward"], r"completion 0: reward function nan_reward returned nan"),
    (["rewards=no_such_module_xyz:fn"], r"no_such_module_xyz"),
    (["batch_size=3"], r"a generation batch of 3 completions .* does not divide into groups of num_generations=4"),
    (["max_completion_length=600"], r"do not fit the model's 512 positions"),
    (["max_prompt_length=510"], r"max_prompt_length \(510\) \+ max_completion_length \(6\) do not fit"),
    (["strategy=fsdp"], r"strategy=fsdp: temper grpo trains data-parallel only"),
])
def test_bad_input_is_one_line(tiny_model_dir, prompts_file, tmp_path, args, message):
    with pytest.raises(TemperError, match=message) as err:
        train(*settings(tiny_model_dir, prompts_file, tmp_path / "run", *args))
    assert "\n" not in str(err.value)


def test_all_empty_rollouts_stop_the_run(tiny_model_dir, prompts_file, tmp_path, monkeypatch):

    eos = Tokenizer.from_dir(tiny_model_dir).eos_id
    monkeypatch.setattr(grpo, "sample_groups", eos_only_sampler(eos))
    with pytest.warns(UserWarning, match="every one of the 4 completions is empty"):
        with pytest.raises(TemperError, match=r"2 generation batches in a row whose completions are all empty"):
            train(*settings(tiny_model_dir, prompts_file, tmp_path / "run", "max_empty_rollouts=2", "max_steps=4"))


def test_prompt_field_auto_takes_question_and_long_prompts_are_cut_on_the_left(tiny_model_dir, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": "the river " * (100 if i == 0 else 1), "answer": "1"}) + "\n"
                            for i in range(4)))
    summary = train(*settings(tiny_model_dir, path, tmp_path / "run", "max_prompt_length=60", "max_steps=1"))
    assert summary["prompts"] == 4 and summary["truncated_prompts"] == 1


def test_rollout_token_logprobs_are_the_causal_lm_log_probs_of_the_completion_tokens(tiny_model_dir):

    model = load_model(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12]]
    mask = torch.tensor([[1, 0], [1, 1]])
    logps, entropies = rollout_token_logprobs(model, prompts, torch.tensor(completions), mask, temperature=0.7,
                                              with_entropy=True)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([p + c])
        targets = torch.full_like(ids, IGNORE_INDEX)
        targets[0, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
        full = causal_lm_token_logprobs(model, ids, targets, temperature=0.7)[0, len(p) - 1:len(p) + len(c) - 1]
        expected = full * mask[b]
        torch.testing.assert_close(logps[b], expected)
    assert logps[0, 1] == 0 and entropies[0, 1] == 0 and (entropies[mask.bool()] > 0).all()


def test_prompt_field_auto():

    assert row_prompt({"question": "q?", "answer": "1"}, "f:1", "auto").prompt == "q?"
    assert row_prompt({"prompt": "p", "question": "q?"}, "f:1", "auto").prompt == "p"
