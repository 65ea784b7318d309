"""Benchmarks refuse to report a speed for different work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--batch", "2", "--prompt-len", "4", "--new-tokens", "3", "--hidden", "32", "--layers", "1",
        "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--repeats", "1"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generate_stops_when_the_tokens_differ(monkeypatch, capsys):
    pytest.importorskip("transformers")
    import temper.models.generate as gen

    bench = _load("bench_generate")
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", *TINY])
    bench.main()  # the same tokens: it times and reports
    assert "ratio temper/transformers" in capsys.readouterr().out

    real = gen.generate

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs)
        out[1][2] = (out[1][2] + 1) % 64
        return out

    monkeypatch.setattr(gen, "generate", off_by_one)
    with pytest.raises(SystemExit, match=r"greedy tokens differ \(row 1, step 2: .*not timing different work"):
        bench.main()
    assert "tokens/s" not in capsys.readouterr().out


def test_bench_lora_trl_peers_train_the_same_tokens(tmp_path, tiny_model_dir):
    """TRL's labels and temper's targets must be the same tokens, and TRL must not recompute activations."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    bench = _load("bench_lora_trl")
    data_rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                               {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]} for i in range(3)]
    data_rows.append({"messages": [{"role": "system", "content": "Be brief."}, *data_rows[0]["messages"],
                                   {"role": "user", "content": "And 2 plus 2?"},
                                   {"role": "assistant", "content": "4"}]})
    trainer = bench.trl_trainer(tiny_model_dir, data_rows, str(tmp_path), steps=1, batch=2)
    assert trainer.args.gradient_checkpointing is False and not trainer.args.bf16
    assert getattr(trainer.args, "activation_checkpointing", False) is False
    assert not trainer.args.packing and not trainer.args.padding_free
    ours = bench.temper_examples(tiny_model_dir, data_rows)
    theirs = trainer.train_dataset
    assert len(ours) == len(theirs) == len(data_rows)
    for example, ids, labels in zip(ours, theirs["input_ids"], theirs["labels"]):
        assert ids == [*example.inputs, example.targets[-1]]  # the same rendered tokens
        assert labels[1:] == example.targets  # trained at the same positions (TRL shifts inside the model)


def test_bench_lora_trl_packed_peers_train_the_same_tokens(tmp_path, tiny_model_dir):
    """--packing: TRL's packed rows (bfd, padding-free) hold temper's examples, each whole, with the
    same trained positions; the count the script compares is the sum of temper's targets."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    bench = _load("bench_lora_trl")
    data_rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i % 3}?"},
                               {"role": "assistant", "content": f"{i} plus {i % 3} is {i + i % 3}." * (i % 2 + 1)}]}
                 for i in range(6)]
    trainer = bench.trl_trainer(tiny_model_dir, data_rows, str(tmp_path), steps=1, batch=2, packing=True)
    assert trainer.args.packing and trainer.args.packing_strategy == "bfd" and trainer.padding_free
    ours = bench.temper_examples(tiny_model_dir, data_rows)
    data = trainer.train_dataset
    segments = []
    for ids, labels, lengths in zip(data["input_ids"], data["labels"], data["seq_lengths"]):
        at = 0
        for n in lengths:
            segments.append((ids[at:at + n], labels[at + 1:at + n]))  # TRL never predicts a segment's first label
            at += n
    assert sorted(segments) == sorted(([*e.inputs, e.targets[-1]], e.targets) for e in ours)
    counted = sum(bench._trained_in_packed_row(labels, lengths)
                  for labels, lengths in zip(data["labels"], data["seq_lengths"]))
    assert counted == sum(e.num_targets for e in ours)


def test_bench_dpo_trl_peers_see_the_same_tokens(tmp_path, tiny_model_dir, monkeypatch):
    """TRL's tokenised pairs and collated batches must be temper's, token for token, in temper's order,
    and TRL must not recompute activations, cast to bf16 or precompute the reference."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import json

    from temper.data.preference import PreferenceEncoder

    bench = _load("bench_dpo_trl")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": "I will not say. " * (i % 3 + 1)}]} for i in range(7)]
    rows.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
                            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "And 2 plus 2?"}],
                 "chosen": [{"role": "assistant", "content": "4"}],
                 "rejected": [{"role": "assistant", "content": "Five, I think."}]})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))

    same = bench.check_same_work(tiny_model_dir, pairs, steps=4, batch=2)  # exits unless identical
    assert same["pairs"] == len(rows) and len(same["sequence_lengths"]) == 4 and same["completion_tokens"] > 0
    assert 0 < same["positions"]["temper"] < same["positions"]["trl"]  # temper packs, TRL pads
    args = same["trl_args"]
    assert args.gradient_checkpointing is False and getattr(args, "activation_checkpointing", False) is False
    assert not args.bf16 and not args.fp16 and not args.padding_free and not args.precompute_ref_log_probs
    assert args.train_sampling_strategy == "sequential" and args.max_length == bench.SEQ_LEN + 1
    assert args.dataloader_num_workers == 0 and args.max_grad_norm == 1.0 and args.beta == 0.1

    order = bench.temper_order(bench.temper_config(tiny_model_dir, pairs, tmp_path / "o", "copy", 4, 2))
    assert sorted(order) == list(range(len(rows))) and order != sorted(order)  # shuffled: TRL must follow it

    real = PreferenceEncoder.answer

    def one_token_short(self, *args, **kwargs):  # temper drops each answer's end marker: TRL keeps it
        return real(self, *args, **kwargs)[:-1]

    monkeypatch.setattr(PreferenceEncoder, "answer", one_token_short)
    with pytest.raises(SystemExit, match="not the same work: pair 0 .* differ"):
        bench.check_same_work(tiny_model_dir, pairs, steps=4, batch=2)


def test_bench_online_dpo_checks_greedy_and_sampled_replies(tmp_path, tiny_model_dir, monkeypatch):
    import json

    import temper.train.rollout as online

    bench = _load("bench_online_dpo")
    prompts = tmp_path / "rl.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": a}) + "\n"
                               for q, a in (("What is 2 plus 3?", "5"), ("Reverse the word 'cat'.", "tac"))))
    calls, real = [], online.sample_responses

    def recording(model, tokenizer, template, ps, k, **kw):
        calls.append((len(ps), k, kw["temperature"], kw["seed"]))
        return real(model, tokenizer, template, ps, k, **kw)

    monkeypatch.setattr(online, "sample_responses", recording)
    first = bench.world_checker(tiny_model_dir, prompts)
    assert calls == [(2, 1, 0.0, 0), (2, bench.SAMPLES_PER_PROMPT, 1.0, 0)]
    criteria = ("correct", "concise", "not_repetitive", "polite", "score")
    assert set(first) == {f"checker/{how}/{c}" for how in ("greedy", "sampled") for c in criteria}
    assert bench.world_checker(tiny_model_dir, prompts) == first  # a fixed seed: the same samples
    assert bench.label("checker/sampled/polite") == "world checker, sampled (T=1, 4/prompt): polite"


def test_bench_grpo_trl_peers_sample_the_same_prompts(tmp_path, tiny_model_dir):
    """TRL must read temper's prompts, token for token, in temper's order, generate completions of a fixed
    length with no EOS, and not recompute activations, cast to bf16 or use vLLM."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import json

    bench = _load("bench_grpo_trl")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}]}) + "\n"
                               for i in range(5)))
    order = bench.temper_order(5, 5)
    assert sorted(order) == list(range(5))
    lengths = bench.check_same_prompts(tiny_model_dir, prompts, order, new_tokens=4)  # exits on any difference
    assert len(lengths) == 5 and min(lengths) > 0
    trainer = bench.trl_trainer(tiny_model_dir, bench.read_rows(prompts), str(tmp_path / "trl"), 1, 4)
    args = trainer.args
    assert getattr(args, "activation_checkpointing", False) is False and args.gradient_checkpointing is False
    assert not args.bf16 and not args.use_vllm and args.beta == 0.0 and args.loss_type == "dapo"
    assert args.generation_batch_size == 8 and args.num_generations == 8 and args.shuffle_dataset is False
    assert args.generation_kwargs["min_new_tokens"] == args.max_completion_length == 4
    assert bench.crc_reward([], ["a", [{"role": "assistant", "content": "a"}]]) == [bench.crc_reward([], ["a"])[0]] * 2


def test_bench_grpo_world_measures_pass_rates_per_task_as_the_recipe_does(tmp_path, tiny_model_dir, monkeypatch):
    """Greedy replies cut as `temper grpo` cuts them, scored by the world reward, split by `task`; the
    GRPO settings passed always include the evaluation at step 0."""
    import json

    import temper.rewards.functions as functions
    from temper.data.chat import resolve_template
    from temper.data.prompts import read_prompts
    from temper.loading import load_for_inference
    from temper.train.rollout import sample_responses

    bench = _load("bench_grpo_world")
    prompts = tmp_path / "rl.jsonl"
    rows = [("What is 2 plus 3?", "5", "arithmetic"), ("Reverse the word 'cat'.", "tac", "string"),
            ("What is 4 plus 4?", "8", "arithmetic")]
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": a, "task": t}) + "\n"
                               for q, a, t in rows))
    seen = []

    def first_arithmetic_passes(completions, answer=None, **kw):  # the reward decides; the split must follow it
        seen.extend(completions)
        return [1.0 if a == "5" else 0.0 for a in answer]

    monkeypatch.setattr(functions, "world_answer_reward", first_arithmetic_passes)
    result = bench.pass_rates(tiny_model_dir, prompts, max_new_tokens=6)
    assert (result["all"], result["n"]) == (1 / 3, 3)
    assert (result["arithmetic"], result["n_arithmetic"], result["string"], result["n_string"]) == (0.5, 2, 0.0, 1)
    model, tokenizer = load_for_inference(str(tiny_model_dir))  # the same greedy replies as generation gives
    greedy = sample_responses(model, tokenizer, resolve_template(None, tokenizer), read_prompts(str(prompts)), 1,
                              temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0)
    assert [s.strip() for s in seen[:3]] == [r[0] for r in greedy]
    assert len(seen) == 6 and all(r[0].startswith(f) for f, r in zip(seen[3:], greedy))  # then first sentences
    assert bench.pass_rates(tiny_model_dir, prompts, max_new_tokens=6)["first_sentence"] == 1 / 3

    class Args:
        steps, lr, num_generations, batch_size, max_completion_length = 7, 3e-5, 4, 8, 16
        temperature, beta, seed, log_every, eval_every, eval_limit = 1.0, 0.0, 0, 1, 5, 0
        rewards, mask_truncated = "world,length:8", True

    settings = bench.grpo_settings(Args)
    assert {"max_steps=7", "optim.lr=3e-05", "num_generations=4", "batch_size=8", "max_completion_length=16",
            "logging.eval_at_start=true", "eval_limit=0", "logging.eval_every=5"} <= set(settings)
    from temper.cli import Commands

    cfg = Commands().config("grpo", [f"model={tiny_model_dir}", *settings])  # keys temper grpo takes, checked
    assert (cfg.max_steps, cfg.optim.lr, cfg.num_generations, cfg.logging.eval_at_start) == (7, 3e-5, 4, True)
    assert cfg.rewards == ["world", "length:8"] and cfg.mask_truncated_completions is True


def test_bench_ppo_world_passes_keys_temper_ppo_takes_and_reads_its_rows(tmp_path, tiny_model_dir):
    """One run per β with every other key the same, one logged row per PPO iteration; the timing runs
    differ only by LoRA on the policy and the value model; phase times per iteration and the watch's
    marks read from metrics rows."""
    import json

    from temper.cli import Commands

    bench = _load("bench_ppo_world")

    class Args:
        steps, lr, batch_size, max_completion_length, temperature, ppo_epochs = 8, 1e-4, 4, 6, 0.7, 2
        seed, eval_every, eval_limit, kl_coefs, timing_steps = 0, 4, 0, [0.0, 1.0], 6

    configs = [Commands().config("ppo", [f"model={tiny_model_dir}", f"reward_model={tiny_model_dir}",
                                         *bench.ppo_settings(Args, b)]) for b in Args.kl_coefs]
    assert [c.kl_coef for c in configs] == [0.0, 1.0]
    for cfg in configs:
        assert (cfg.max_steps, cfg.optim.lr, cfg.batch_size, cfg.max_completion_length) == (8, 1e-4, 4, 6)
        assert cfg.logging.every == cfg.num_ppo_epochs == 2 and cfg.logging.eval_at_start and cfg.eval_limit == 0
    assert set(bench.ppo_settings(Args, 0.0)) ^ set(bench.ppo_settings(Args, 1.0)) == {"kl_coef=0.0", "kl_coef=1.0"}
    full, lora = (Commands().config("ppo", [f"model={tiny_model_dir}", f"reward_model={tiny_model_dir}",
                                            *bench.timing_settings(Args, peft)]) for peft in (False, True))
    assert (full.peft.method, full.value_peft, lora.peft.method, lora.value_peft) == ("none", False, "lora", True)
    for cfg in (full, lora):
        assert cfg.max_steps == 6 and cfg.logging.eval_every == 0 and not cfg.logging.eval_at_start
        assert cfg.kl_coef == 0.0 and cfg.logging.every == 2

    rows = [{"step": 0, "eval_pass_rate": 0.4},
            {"step": 2, "time/train": 9.0, "time/rollout": 9.0, "time/score": 9.0, "memory_mb": 10.0, "hacking": ""},
            {"step": 4, "time/train": 1.0, "time/rollout": 2.0, "time/score": 0.5, "memory_mb": 12.0, "hacking": "kl"},
            {"step": 6, "time/train": 3.0, "time/rollout": 2.0, "memory_mb": 11.0, "hacking": "length,kl"}]
    t = bench.iteration_times(rows, 2)  # the first iteration (warm-up) left out; per-step means x 2 steps
    assert (t["train"], t["rollout"], t["score"], t["iterations"], t["memory_mb"]) == (4.0, 4.0, 0.5, 2, 12.0)
    assert t["total"] == 8.5
    assert bench.hacking_marks(rows) == [(4, "kl"), (6, "length,kl")]

    world = tmp_path / "world"  # --rm-reasons: the world's pairs of those reasons only, as data= and eval_data=
    (world / "preference").mkdir(parents=True)
    for split, reasons in (("train", ["wrong", "rude", "wrong"]), ("test", ["rambling", "wrong"])):
        (world / "preference" / f"{split}.jsonl").write_text("".join(json.dumps({"reason": r, "i": i}) + "\n"
                                                                     for i, r in enumerate(reasons)))
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "temper.json").write_text(json.dumps({"world_dir": str(world)}))
    keys = bench.reason_pairs(sft, "wrong", tmp_path / "pairs")
    assert keys == [f"data=[{tmp_path / 'pairs' / 'train.jsonl'}]", f"eval_data=[{tmp_path / 'pairs' / 'test.jsonl'}]"]
    kept = [[json.loads(line)["i"] for line in (tmp_path / "pairs" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "test")]
    assert kept == [[0, 2], [1]]
    with pytest.raises(SystemExit, match="no test pair"):
        bench.reason_pairs(sft, "rude", tmp_path / "pairs")

