"""temper ppo: a tiny run end to end logging every metric (full and LoRA), the score on the EOS when the
pad id is the EOS id, exact resume across a rollout batch (value model and KL controller included), and
bad input as one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import eos_only_sampler
from safetensors.torch import load_file

from temper.config import load_config
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.models import build_model, preset, save_model
from temper.models.reward import build_reward_model, load_reward_model, save_reward_model
from temper.recipes import ppo
from temper.train import rollout as rollout_module
from temper.train.rollout import Rollout

METRICS = ("loss", "objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
           "objective/entropy", "policy/entropy_avg", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
           "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/explained_variance", "completions/mean_length",
           "completions/clipped_ratio", "completions/repetition_rate", "beta", "episode", "time/rollout",
           "time/score", "time/train", "hacking/length_ratio", "hacking/repetition_drift")
TIMING = ("time/", "tokens_per_second", "step_tokens_per_second", "mfu", "memory_mb")


def none_reward(prompts, completions, **kwargs):  # "does not apply" to every completion: no score
    return [None] * len(completions)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_tokenizer):
    """A temper-written Llama reward model (random body, head scaled so scores vary by a few units)."""
    torch.manual_seed(1)
    model = build_reward_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size))
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    path = tmp_path_factory.mktemp("rm")
    save_reward_model(model, path, tokenizer=tiny_tokenizer)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(12)))
    return path


def settings(model, rm, prompts, out, *extra):
    return [f"model={model}", f"reward_model={rm}", f"prompts={prompts}", "batch_size=4", "max_completion_length=6",
            "max_steps=2", "logging.every=1", "logging.eval_every=0", "logging.eval_at_start=false",
            "logging.progress=false", "peak_flops=1e12", f"output_dir={out}", *extra]


def train(*args):
    return ppo.run(load_config(ppo.Config, None, list(args)))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_run_logs_every_metric_and_saves_policy_and_value(tiny_model_dir, rm_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    # 1 epoch x 2 minibatches: 2 optimiser steps per rollout batch of 8; the adaptive controller on
    summary = train(*settings(tiny_model_dir, rm_dir, prompts_file, out, "num_mini_batches=2", "num_ppo_epochs=1",
                              "max_steps=3", "target_kl=0.01", "kl_horizon=100", "optim.lr=1e-3",
                              f"eval_prompts={prompts_file}", "eval_limit=3", "eval_reward=world",
                              "logging.eval_every=3"))
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2, 3]
    for name in METRICS:
        assert all(name in r for r in logged), name
    assert "eval_pass_rate" in logged[-1] and "hacking/reward_vs_heldout" not in logged[0]
    first = logged[0]
    # the first rollout's policy is the reference: KL 0, and π_old = π_θ at the first step
    assert first["objective/kl"] == 0.0 and first["objective/non_score_reward"] == 0.0
    assert first["val/ratio"] == pytest.approx(1.0) and first["policy/clipfrac_avg"] == 0.0
    assert first["objective/rlhf_reward"] == first["objective/scores"] != 0.0
    assert first["objective/entropy"] > 0 and 0.0 <= first["completions/repetition_rate"] <= 1.0
    # steps 1-2 share the first rollout batch; the second step's policy has moved off π_old
    assert logged[0]["objective/scores"] == logged[1]["objective/scores"] and logged[2]["episode"] == 16
    assert logged[1]["policy/approxkl_avg"] > 0 and logged[1]["val/ratio"] != 1.0
    assert logged[2]["objective/kl"] != 0.0
    # the adaptive controller: the first batch's KL (0) is below target 0.01, so β shrank by 20% x 8/100
    assert logged[2]["beta"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 100))
    assert summary["generations"] == 2 and summary["value_model"] == str(rm_dir)
    # the value model started from the reward model and trained: saved beside the policy, loadable as one
    value = load_reward_model(out / "value")
    start = load_reward_model(rm_dir)
    assert not torch.equal(value.score.weight, start.score.weight)
    assert (out / "model.safetensors").is_file()


def test_lora_policy_with_the_disabled_adapter_as_reference(tiny_model_dir, rm_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    summary = train(*settings(tiny_model_dir, rm_dir, prompts_file, out, "peft.method=lora", "num_ppo_epochs=1",
                              "optim.lr=1e-2", f"value_model={tiny_model_dir}"))
    logged = rows(out)
    assert logged[0]["objective/kl"] == 0.0 and logged[1]["objective/kl"] != 0.0  # the adapter moved the policy
    assert summary["peft"] == "lora" and any(out.glob("adapter*"))
    assert (out / "value" / "model.safetensors").is_file()  # a causal LM's body and a new head, trained in full
    # value_peft: the value model through the same adapter settings (its head in full), saved merged
    lora_value = train(*settings(tiny_model_dir, rm_dir, prompts_file, tmp_path / "both", "peft.method=lora",
                                 "num_ppo_epochs=1", "optim.lr=1e-2", "value_peft=true", "max_steps=1"))
    assert lora_value["trainable_parameters"] < summary["trainable_parameters"] / 10
    merged, start = load_reward_model(tmp_path / "both" / "value"), load_reward_model(rm_dir)
    assert not torch.equal(merged.score.weight, start.score.weight)  # the head trained
    body, before = merged.body.state_dict(), start.body.state_dict()
    assert torch.equal(body["layers.0.mlp.down_proj.weight"], before["layers.0.mlp.down_proj.weight"])  # frozen
    assert not torch.equal(body["layers.0.attn.q_proj.weight"], before["layers.0.attn.q_proj.weight"])  # LoRA merged


def test_pad_equal_to_eos_keeps_the_eos_in_the_mask_and_scores_it(tiny_model_dir, rm_dir, prompts_file, tmp_path,
                                                                   monkeypatch):
    """A tokenizer without a pad token pads with EOS. Rows made to end with EOS at position 2 are right-padded
    with the same id: the buffer's mask (the rollout's) keeps the EOS and the score lands there, giving it
    an advantage; a mask of "token != pad id" would have dropped it."""
    tiny = Tokenizer.from_dir(tiny_model_dir)
    no_pad = Tokenizer(tiny.backend, bos_token=tiny.bos_token, eos_token=tiny.eos_token, pad_token=None,
                       chat_template=tiny.chat_template)
    eos = no_pad.eos_id
    assert no_pad.pad_id == eos
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    save_model(build_model(preset("llama-tiny", vocab_size=no_pad.vocab_size)), model_dir, tokenizer=no_pad)
    real = rollout_module.sample_groups

    def ending_early(model, prompts, k, sampling, **kw):
        r = real(model, prompts, k, sampling, **kw)
        ids, mask = r.completion_ids.clone(), r.completion_mask.clone()
        ids[::2, 2], ids[::2, 3:], mask[::2, 3:] = eos, kw["pad_id"], False  # even rows: 2 tokens, then EOS
        finished = r.finished.clone()
        finished[::2] = True
        return Rollout(r.prompt_ids, r.prompt_mask, ids, mask, finished, k)

    monkeypatch.setattr(ppo, "sample_groups", ending_early)
    out = tmp_path / "run"
    train(*settings(model_dir, rm_dir, prompts_file, out, "max_steps=1", "checkpoint.every=1", "num_ppo_epochs=1",
                    "max_completion_length=5", "gamma=1", "lam=1", "missing_eos_penalty=1000"))
    state = load_file(out / "checkpoints" / "step_00000001" / "state.safetensors")
    ids, mask = state["rollout/buffer/completion_ids"], state["rollout/buffer/mask"]
    advantages, returns = state["rollout/buffer/advantages"], state["rollout/buffer/returns"]
    scores = state["rollout/buffer/scores"]
    ended = ids[:, 2] == eos
    assert ended.sum() >= 2 and (ids[ended, 3:] == eos).all()  # pad == EOS after the EOS
    assert mask[ended, :3].all() and not mask[ended, 3:].any()  # the EOS is in the mask, the padding is not
    # γ = λ = 1: the return at the EOS is its score (β KL is 0 at the first rollout), and nothing after it
    assert torch.allclose(returns[ended, 2], scores[ended])
    assert (advantages[ended, 3:] == 0).all() and (advantages[ended, 2] != 0).all()
    assert scores[~ended].max() < scores[ended].min() - 500  # the rows that never ended paid the penalty
    trap = ids != eos  # the wrong mask would have left the EOS out
    assert not trap[ended, 2].any()


def test_resume_across_a_rollout_batch_is_exact(tiny_model_dir, rm_dir, prompts_file, tmp_path):
    # 2 epochs x 2 minibatches: steps 1-4 and 5-8 per rollout batch; stopped at 2, mid-buffer; β adaptive
    extra = ("num_mini_batches=2", "num_ppo_epochs=2", "checkpoint.every=2", "max_steps=5", "optim.lr=1e-2",
             "target_kl=0.01", "kl_horizon=100", "schedule.name=constant", "schedule.warmup_steps=0")
    train(*settings(tiny_model_dir, rm_dir, prompts_file, tmp_path / "a", *extra))
    train(*settings(tiny_model_dir, rm_dir, prompts_file, tmp_path / "b", *extra, "max_steps=2"))
    train(*settings(tiny_model_dir, rm_dir, prompts_file, tmp_path / "b", *extra, "resume=auto"))

    def trained(out):
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows(out)]

    straight, resumed = trained(tmp_path / "a"), trained(tmp_path / "b")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert resumed == straight
    assert straight[4]["beta"] != straight[0]["beta"] and straight[4]["objective/kl"] != 0
    for name in ("model.safetensors", "value/model.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.fixture
def nan_value_dir(tmp_path, tiny_tokenizer):
    model = build_reward_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size))
    with torch.no_grad():
        model.score.weight.fill_(3e38)  # finite weights (loading refuses NaN ones), values that overflow to inf
    return save_reward_model(model, tmp_path / "nan_value", tokenizer=tiny_tokenizer)


@pytest.mark.parametrize("args, message", [
    (["reward_model={model}"], r"reward_model=.*architectures is \['LlamaForCausalLM'\] \(a causal language model\); "
                               r"a reward model is a sequence-classification model"),
    (["reward_model={tmp}/nowhere"], r"reward_model=.*nowhere"),
    (["max_prompt_length=510"], r"max_prompt_length \(510\) \+ max_completion_length \(6\) do not fit"),
    (["max_completion_length=600"], r"do not fit the model's 512 positions"),
    (["reward_model=", "rewards=test_ppo:none_reward"], r"step 1, rollout batch 1: completion 0 .* has a nan reward"),
    (["value_model={nan}"], r"step 1, rollout batch 1: the value model predicts NaN or infinite values"),
    (["kl_estimator=k2"], r"kl_estimator 'k2' is not one of k1, k3"),
    (["strategy=fsdp"], r"strategy=fsdp: temper ppo trains data-parallel only"),
    (["reward_model="], r"reward_model= is required"),
])
def test_bad_input_is_one_line(tiny_model_dir, rm_dir, prompts_file, tmp_path, nan_value_dir, args, message):
    args = [a.format(model=tiny_model_dir, tmp=tmp_path, nan=nan_value_dir) for a in args]
    with pytest.raises(TemperError, match=message) as err:
        train(*settings(tiny_model_dir, rm_dir, prompts_file, tmp_path / "run", *args))
    assert "\n" not in str(err.value)


def test_a_rollout_of_only_eos_stops_the_run(tiny_model_dir, rm_dir, prompts_file, tmp_path, monkeypatch):
    eos = Tokenizer.from_dir(tiny_model_dir).eos_id

    monkeypatch.setattr(ppo, "sample_groups", eos_only_sampler(eos))
    with pytest.warns(UserWarning, match="every one of the 4 completions is empty"):
        with pytest.raises(TemperError, match=r"2 generation batches in a row whose completions are all empty"):
            train(*settings(tiny_model_dir, rm_dir, prompts_file, tmp_path / "run", "max_empty_rollouts=2",
                            "num_ppo_epochs=1", "max_steps=4"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_ranks_equal_one_process_with_the_same_global_batch(tiny_model_dir, rm_dir, prompts_file, tmp_path):
    """DDP under torchrun: 2 ranks x 4 completions = 1 process x 8 per rollout batch. Each rank samples its
    block of the prompt stream with its rows' own sampling streams, so the completions are one process's;
    whitening, explained variance, the KL controller and the metrics use every rank's rows. With one
    minibatch every step sees the whole rollout batch in both runs (equal lengths: no completion ends
    early at this size), so losses, metrics and weights agree within fp32 reordering."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    common = [f"model={tiny_model_dir}", f"reward_model={rm_dir}", f"prompts={prompts_file}", "max_completion_length=4",
              "num_ppo_epochs=2", "max_steps=3", "optim.lr=1e-2", "target_kl=0.01", "kl_horizon=100",
              "schedule.name=constant", "schedule.warmup_steps=0", "logging.every=1", "logging.eval_every=0",
              "logging.eval_at_start=false", "logging.progress=false", "peak_flops=1e12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}

    def launch(*launcher, out, extra):
        done = subprocess.run([sys.executable, *launcher, "-m", "temper", "ppo", *common, *extra, f"output_dir={out}"],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    launch(out=tmp_path / "one", extra=["batch_size=8"])
    log = launch("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", out=tmp_path / "two",
                 extra=["batch_size=4", "strategy=ddp"])
    assert log.stderr.count("4 on each of 2 ranks") == 1  # rank 0 alone speaks
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(two, one):
        assert a["completions/mean_length"] == b["completions/mean_length"] and a["episode"] == b["episode"]
        for key in ("objective/scores", "objective/kl", "beta", "loss", "loss/value_avg", "val/explained_variance",
                    "policy/approxkl_avg", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert one[2]["objective/kl"] != 0 and one[2]["beta"] != one[0]["beta"]  # the second rollout moved both
    for name in ("model.safetensors", "value/model.safetensors"):
        a, b = load_file(tmp_path / "two" / name), load_file(tmp_path / "one" / name)
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (name, key)


def test_the_value_model_needs_the_policys_tokenizer(tiny_model_dir, prompts_file, tmp_path):
    """A reward model with another tokenizer still scores (it reads text), but the value model reads the
    policy's ids: by default it then starts from model=; named as value_model=, it is refused."""
    from conftest import SAMPLE_TEXT

    from temper.data.tokenizer import train_tokenizer

    other = train_tokenizer(SAMPLE_TEXT.split("\n\n"), vocab_size=280, min_frequency=2)
    torch.manual_seed(2)
    other_rm = save_reward_model(build_reward_model(preset("llama-tiny", vocab_size=other.vocab_size)),
                                 tmp_path / "other_rm", tokenizer=other)
    summary = train(*settings(tiny_model_dir, other_rm, prompts_file, tmp_path / "run", "max_steps=1",
                              "num_ppo_epochs=1"))
    assert summary["value_model"] == str(tiny_model_dir) and summary["rewards"] == [f"judge:reward:{other_rm}"]
    with pytest.raises(TemperError, match=r"value_model=.*other_rm has another tokenizer than model=.*\(280 tokens "
                                          r"vs 300\): the value model reads the policy's token ids") as err:
        train(*settings(tiny_model_dir, other_rm, prompts_file, tmp_path / "refused", f"value_model={other_rm}"))
    assert "\n" not in str(err.value)
