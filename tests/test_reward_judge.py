"""Reward models (temper.models.reward) and the reward judge: parity with transformers'
*ForSequenceClassification on right-padded batches, the save round trip, refusals, the judge's
scores against the model's own rewards, and judge=reward:DIR in online DPO and temper eval."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import approx_reordered, assert_reorder_close, decoder_lengths

from temper.cli import main
from temper.errors import TemperError
from temper.models.reward import build_reward_model, load_reward_model, save_reward_model
from temper.rewards.judges import Prompt, RewardJudge, make_judge

transformers = pytest.importorskip("transformers")

PAD = 3  # not 0, so a batch padded with 0 still has to be read within each row's length


def hf_reward_model(kind: str, vocab_size: int = 128, pad_token_id: int | None = PAD, num_labels: int = 1):
    """A tiny random transformers sequence-classification model, its head scaled so that rewards are O(1)."""
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, num_labels=num_labels,
                                          pad_token_id=pad_token_id)
    else:
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         num_labels=num_labels, pad_token_id=pad_token_id, bos_token_id=1,
                                         eos_token_id=2)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    return model


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_tokenizer):
    """A transformers-written Llama reward model with temper's tiny tokenizer (ChatML template)."""
    model = hf_reward_model("llama", vocab_size=tiny_tokenizer.vocab_size, pad_token_id=tiny_tokenizer.pad_id)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save(path)
    return path


def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of different lengths (padded with PAD); row 0 ends with a PAD id of its own."""
    torch.manual_seed(1)
    lengths = torch.tensor([7, 4, 9, 1])
    ids = torch.randint(4, vocab_size, (4, 9))
    ids[0, 6] = PAD  # transformers reads past it: the reward is that of position 5
    mask = torch.arange(9)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, PAD), lengths


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rewards_match_transformers_on_a_right_padded_batch(tmp_path, kind):
    hf = hf_reward_model(kind)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    rm = load_reward_model(tmp_path)
    ids, lengths = padded_batch(128)
    mask = torch.arange(9)[None, :] < lengths[:, None]
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long()).logits.squeeze(-1)
        rewards = rm(ids, lengths)
        # whatever the padding value: each row is read within its length
        from_mask = rm(ids.masked_fill(~mask, 0), attention_mask=mask)
    assert expected.abs().max() > 0.1  # rewards big enough for the comparison to mean something
    forward = decoder_lengths(rm, ids.shape[1])  # transformers' kernels: the same sums in another order
    assert_reorder_close(rewards, expected, forward)
    assert_reorder_close(from_mask, expected, forward)
    with pytest.raises(TemperError, match="attention_mask row 1 is not right-padded"):
        rm(ids, attention_mask=torch.tensor([[1] * 9, [0] + [1] * 8, [1] * 9, [1] * 9]))


def test_without_a_pad_id_the_last_token_of_each_row_is_read(tmp_path):
    hf = hf_reward_model("llama", pad_token_id=None)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    rm = load_reward_model(tmp_path)
    ids, lengths = padded_batch(128)
    with torch.no_grad():
        rewards = rm(ids, lengths)
        one_by_one = torch.cat([hf(input_ids=ids[i:i + 1, :n]).logits[:, 0] for i, n in enumerate(lengths)])
    assert_reorder_close(rewards, one_by_one, decoder_lengths(rm, ids.shape[1]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_round_trip_through_transformers(tmp_path, tiny_tokenizer, kind):
    """temper saves -> AutoModelForSequenceClassification loads it whole -> the same rewards; and back."""
    hf = hf_reward_model(kind)
    hf.save_pretrained(tmp_path / "in", safe_serialization=True)
    rm = load_reward_model(tmp_path / "in")
    save_reward_model(rm, tmp_path / "out")
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out",
                                                                                   output_loading_info=True)
    assert type(loaded).__name__ == type(hf).__name__ and loaded.config.num_labels == 1
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    ids, lengths = padded_batch(128)
    mask = torch.arange(9)[None, :] < lengths[:, None]
    with torch.no_grad():
        expected = rm(ids, lengths)
        assert_reorder_close(loaded.eval()(input_ids=ids, attention_mask=mask.long()).logits.squeeze(-1),
                             expected, decoder_lengths(rm, ids.shape[1]))
        torch.testing.assert_close(load_reward_model(tmp_path / "out")(ids, lengths), expected, rtol=0, atol=0)
    # a fresh model (what a reward-model trainer starts from) saved with a tokenizer: its pad id is written
    from temper.models import preset

    fresh = build_reward_model(preset("gpt2-tiny" if kind == "gpt2" else "llama-tiny", vocab_size=300,
                                      num_layers=1, max_seq_len=64))
    save_reward_model(fresh, tmp_path / "fresh", tokenizer=tiny_tokenizer)
    config = json.loads((tmp_path / "fresh" / "config.json").read_text())
    assert config["pad_token_id"] == tiny_tokenizer.pad_id and config["id2label"] == {"0": "LABEL_0"}
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "fresh").eval()
    ids = ids.masked_fill(~mask, tiny_tokenizer.pad_id)  # padded as transformers now expects
    with torch.no_grad():
        expected = again(input_ids=ids, attention_mask=mask.long()).logits.squeeze(-1)
        forward = decoder_lengths(fresh, ids.shape[1])
        assert_reorder_close(load_reward_model(tmp_path / "fresh")(ids, lengths), expected, forward)
        assert_reorder_close(fresh(ids, lengths), expected, forward)


def test_what_is_not_a_one_label_reward_model_is_refused_in_one_line(tmp_path, hf_model_dir):
    causal_dir, _ = hf_model_dir("llama")
    with pytest.raises(TemperError, match=r"config.json: architectures is \['LlamaForCausalLM'\] \(a causal language "
                                          r"model\); .*expected one of LlamaForSequenceClassification"):
        load_reward_model(causal_dir)
    hf_reward_model("llama", num_labels=2).save_pretrained(tmp_path / "two", safe_serialization=True)
    # transformers writes no id2label for its default of 2 labels
    with pytest.raises(TemperError, match=r"two/config.json: no id2label or num_labels \(transformers then reads 2 "
                                          r"labels\); .*expected num_labels 1"):
        load_reward_model(tmp_path / "two")
    hf_reward_model("llama").save_pretrained(tmp_path / "rm", safe_serialization=True)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b", "2": "c"}}))
    with pytest.raises(TemperError, match=r"rm/config.json: id2label has 3 labels; .*expected num_labels 1"):
        load_reward_model(tmp_path / "rm")
    del config["id2label"], config["label2id"]
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**config, "num_labels": 1}))
    load_reward_model(tmp_path / "rm")  # num_labels: 1 alone is one label
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "rm" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "score.weight"}, tmp_path / "rm" / "model.safetensors")
    with pytest.raises(TemperError, match=r"rm: tensor 'score.weight' missing from the safetensors files"):
        load_reward_model(tmp_path / "rm")
    save_file({**weights, "score.weight": weights["score.weight"].repeat(2, 1)}, tmp_path / "rm" / "model.safetensors")
    with pytest.raises(TemperError, match=r"tensor 'score.weight' has shape \(2, 32\), expected \(1, 32\)"):
        load_reward_model(tmp_path / "rm")
    with pytest.raises(TemperError, match=r"judge=reward:/no/such/dir: no such model directory"):
        make_judge("reward:/no/such/dir")


# ----------------------------------------------------------------------------- the judge


PROMPTS = [Prompt.from_text("Where does Alice live?", source="p.jsonl:1"),
           Prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 and 4?"}],
                  "p.jsonl:2")]
RESPONSES = [["Alice lives in Paris.", "Paris", "I do not know, sorry about that."],
             ["7", "The sum of 3 and 4 is 7.", "7"]]


def flat(scores: list[list[float | None]]) -> list[float | None]:
    return [s for ss in scores for s in ss]


def judge_lengths(judge: RewardJudge, prompts=PROMPTS, responses=RESPONSES) -> tuple[int, ...]:
    """A padded batch vs each sequence alone: the reward model's sums in another order."""
    longest = max(len(judge.encode(p, r)) for p, rs in zip(prompts, responses) for r in rs)
    return decoder_lengths(judge.model, longest)


def direct_rewards(judge: RewardJudge) -> list[list[float]]:
    """Each sequence alone (no padding) through the model: what the batched judge must give."""
    with torch.no_grad():
        return [[judge.model(torch.tensor([judge.encode(p, r)])).item() for r in rs]
                for p, rs in zip(PROMPTS, RESPONSES)]


def test_reward_judge_scores_are_the_models_rewards_with_its_chat_template(rm_dir, tiny_tokenizer):
    from temper.data.chat import render

    judge = make_judge(f"reward:{rm_dir}")
    assert isinstance(judge, RewardJudge) and judge.template == tiny_tokenizer.chat_template
    judge.batch_size = 2  # sequences of different lengths share a padded batch
    scores = judge.rank(PROMPTS, RESPONSES)
    expected = direct_rewards(judge)
    assert flat(scores) == approx_reordered(flat(expected), judge_lengths(judge)) and judge.stats.judged == 6
    assert scores[1][0] == scores[1][2]  # "7" twice: one sequence, scored once, whatever its rows and batches
    assert len({round(s, 4) for s in scores[0]}) == 3
    # the text: the whole conversation in the reward model's template, ending with its end-of-turn marker
    text = render(tiny_tokenizer.chat_template, [*PROMPTS[1].messages, {"role": "assistant", "content": "7"}])
    assert judge.encode(PROMPTS[1], "7") == tiny_tokenizer.encode(text) and text.endswith("<|im_end|>\n")
    with torch.no_grad():  # the scores follow the head: flipped, they rank the other way round
        judge.model.score.weight.neg_()
    assert flat(judge.rank(PROMPTS, RESPONSES)) == approx_reordered([-s for s in flat(scores)], judge_lengths(judge))


def test_reward_judge_without_a_template_reads_question_newline_response_eos(tmp_path, rm_dir, tiny_tokenizer):
    import shutil

    from temper.data.tokenizer import Tokenizer

    for name in ("config.json", "model.safetensors"):
        shutil.copy(rm_dir / name, tmp_path / name)
    Tokenizer(tiny_tokenizer.backend, bos_token=tiny_tokenizer.bos_token, eos_token=tiny_tokenizer.eos_token,
              pad_token=tiny_tokenizer.pad_token).save(tmp_path)
    judge = make_judge(f"reward:{tmp_path}")
    assert judge.template is None
    assert judge.encode(PROMPTS[1], "7") == tiny_tokenizer.encode("What is 3 and 4?\n7") + [tiny_tokenizer.eos_id]
    assert flat(judge.rank(PROMPTS, RESPONSES)) == approx_reordered(flat(direct_rewards(judge)), judge_lengths(judge))


def test_non_finite_rewards_take_the_bad_judgement_path(rm_dir):
    judge = make_judge(f"reward:{rm_dir}")
    with torch.no_grad():
        judge.model.score.weight.fill_(math.nan)
    with pytest.warns(UserWarning, match=r"judge reward:.*6 samples skipped \(6 not_finite\)"):
        assert judge.rank(PROMPTS, RESPONSES) == [[None] * 3, [None] * 3]
    assert judge.stats.bad == {"not_finite": 6} and judge.stats.judged == 0
    strict = make_judge(f"reward:{rm_dir}", skip_bad=False)
    with torch.no_grad():
        strict.model.score.weight.fill_(math.inf)
    with pytest.raises(TemperError, match=r"p.jsonl:1 sample 0: judge reward:.* returned (nan|inf|-inf); set "
                                          "skip_bad_judgements=true"):
        strict.rank(PROMPTS, RESPONSES)


# ----------------------------------------------------------------------------- through the commands


def test_online_dpo_round_with_a_reward_judge(tmp_path, tiny_model_dir, rm_dir):
    from temper.cli import Commands

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Where does person {i} live?"}) + "\n" for i in range(3)))
    commands = Commands()
    cfg = commands.config("online-dpo", [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'online'}", "rounds=1",
                                         f"judge=reward:{rm_dir}", f"prompts={prompts}", "prompts_per_round=0",
                                         "samples_per_prompt=2", "max_new_tokens=8", "dpo.batch_size=2",
                                         "dpo.seq_len=64", "dpo.max_steps=1", "dpo.eval_fraction=0.0",
                                         "dpo.logging.progress=false"])
    report, = commands.run("online-dpo", cfg)["rounds"]
    assert report["pairs"] >= 1 and report["bad_judgements"] == {f"reward:{rm_dir}": {}}
    samples = [json.loads(line) for line in (tmp_path / "online" / "round_1" / "samples.jsonl").read_text().splitlines()]
    judge = make_judge(f"reward:{rm_dir}")  # the scores written are the reward model's
    prompt_rows = [Prompt.from_text(s["question"]) for s in samples]
    rescored = judge.rank(prompt_rows, [s["responses"] for s in samples])
    lengths = judge_lengths(judge, prompt_rows, [s["responses"] for s in samples])
    assert flat([s["scores"] for s in samples]) == approx_reordered(flat(rescored), lengths)
    assert report["judge_score_before"] is not None and report["judge_score_after"] is not None


def test_temper_eval_takes_a_reward_judge_and_refuses_a_causal_lm_first(tmp_path, tiny_model_dir, rm_dir, capsys):
    tasks = tmp_path / "qa.yaml"
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"question": f"Where does person {i} live?", "answer": "Paris"}) + "\n"
                            for i in range(3)))
    tasks.write_text(f"name: qa\ntype: generation\ndata: {rows}\nprompt: 'Question: {{question}}\\nAnswer:'\n"
                     "target: answer\ngeneration: {max_new_tokens: 6}\n")
    out = tmp_path / "eval"
    code = main(["eval", f"models=[{tiny_model_dir},{tiny_model_dir}]", f"tasks={tasks}", f"judge=reward:{rm_dir}",
                 f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    judged = json.loads((out / "results.json").read_text())["judge"]["qa"]
    assert judged["n"] == 3 and judged["ties"] == 3 and judged["bad_judgements"] == {}  # a model against itself
    assert main(["eval", f"models=[{tiny_model_dir},{tiny_model_dir}]", f"tasks={tasks}",
                 f"judge=reward:{tiny_model_dir}", f"output_dir={tmp_path / 'eval2'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(a causal language model)" in err[0] and f"judge=reward:{tiny_model_dir}" in err[0]
    assert not (tmp_path / "eval2").exists()
