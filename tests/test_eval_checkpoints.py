"""The checkpoint table's metrics in `temper eval`: KL to a reference (against a float64 hand
computation), preference accuracy, instruction exact match with `chat: auto`, each output marked
right or wrong, tokens per second, reward-model scores, and the model facts (size, parameters,
quantisation, stage) for a full and a quantised directory."""

import json

import pytest
import torch
import torch.nn.functional as F

from temper.cli import main
from temper.data.chat import render
from temper.data.tokenizer import Tokenizer
from temper.eval.generation import contains_answer
from temper.eval.kl import reply_kl
from temper.eval.tasks import load_task, resolve_task, run_task
from temper.lineage import read_lineage, write_lineage
from temper.models import build_model, load_model, preset, save_model
from temper.models.generate import SamplingConfig, generate, generate_text

FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from temper.data.world import WorldConfig, build_world, write_world

    out = tmp_path_factory.mktemp("world")
    write_world(build_world(WorldConfig(num_people=12, num_rl_test=6, num_sft_test=6, num_pref_test=6)), out)
    return out


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_tokenizer):
    """A second random llama-tiny on the same tokenizer (a 'fine-tuned' model to compare with the reference)."""
    torch.manual_seed(7)
    model = build_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size))
    for p in model.parameters():  # unit-scale weights: distributions far enough apart for a KL well above rounding
        p.data.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("other_model")
    save_model(model, path, tokenizer=tiny_tokenizer)
    return path


def kl_float64(model, reference, tokenizer, prompts, replies) -> float:
    """The definition, in float64: sum_v p (log p - log q) at each reply position, pooled over the replies."""
    model, reference = model.double(), reference.double()
    total, count = 0.0, 0
    for prompt, reply in zip(prompts, replies):
        ctx, ans = tokenizer.encode(prompt), tokenizer.encode(reply)
        ids = torch.tensor([ctx + ans])
        with torch.no_grad():
            lp = F.log_softmax(model(ids)[0].double(), -1)
            lq = F.log_softmax(reference(ids)[0].double(), -1)
        for j in range(len(ans)):  # position len(ctx) - 1 + j predicts reply token j
            pos = len(ctx) - 1 + j
            total += float((lp[pos].exp() * (lp[pos] - lq[pos])).sum())
            count += 1
    return total / count


def test_reply_kl_matches_a_float64_hand_computation_and_is_zero_for_the_reference(tiny_model_dir, other_model_dir):
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    prompts = ["Question: What is two plus two?\nAnswer:", "Hello"]
    replies = [" four, I think", " world and more words"]
    model, reference = load_model(other_model_dir), load_model(tiny_model_dir)
    got = reply_kl(model, reference, tokenizer, prompts, replies)
    expected = kl_float64(load_model(other_model_dir), load_model(tiny_model_dir), tokenizer, prompts, replies)
    assert expected > 0.01  # two different models: a KL well above rounding
    # fp32 log-softmax over V entries of logits of size ~|z|: each term off by ~|z| * eps, summed over V
    vocab = tokenizer.vocab_size
    assert got == pytest.approx(expected, rel=0, abs=vocab * FP32_EPS * 64)
    assert reply_kl(reference, load_model(tiny_model_dir), tokenizer, prompts, replies) == 0.0
    assert reply_kl(model, reference, tokenizer, ["Hello"], [""]) is None  # no reply token: nothing averaged


def test_new_token_counts_are_what_generate_produced(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), Tokenizer.from_dir(tiny_model_dir)
    prompts = ["Hello", "Question: why?\nAnswer:"]
    cfg = SamplingConfig(max_new_tokens=7, stop=("\n",))
    counts: list[int] = []
    generate_text(model, tokenizer, prompts, cfg, new_token_counts=counts)
    direct = generate(model, [tokenizer.encode(p) for p in prompts],
                      SamplingConfig(max_new_tokens=7, eos_token_ids=[tokenizer.eos_id]), pad_id=tokenizer.pad_id or 0,
                      should_stop=lambda row, new: "\n" in tokenizer.decode(new[-64:]))
    assert counts == [len(t) for t in direct] and all(1 <= c <= 7 for c in counts)


def chat_tuned_copy(tmp_path, model_dir):
    """`model_dir`'s weights under a lineage that says it was chat-tuned (what `chat: auto` reads)."""
    path = tmp_path / "chat_model"
    save_model(load_model(model_dir), path, tokenizer=Tokenizer.from_dir(model_dir))
    tokenizer = Tokenizer.from_dir(path)
    assert tokenizer.chat_template
    write_lineage(path, {"stage": "sft", "chat_template_trained": tokenizer.chat_template})
    return path


def test_preference_task_counts_pairs_whose_chosen_reply_the_model_prefers(tmp_path, tiny_model_dir, small_world):
    task = load_task(resolve_task("world_preference"))
    rows = [json.loads(line) for line in (small_world / "preference" / "test.jsonl").read_text().splitlines()]
    model, tokenizer = load_model(tiny_model_dir), Tokenizer.from_dir(tiny_model_dir)

    def logp(context: str, reply: str) -> float:  # the whole sequence at once, no cache
        ctx, ans = tokenizer.encode(context), tokenizer.encode(reply)
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor([ctx + ans]))[0].double(), -1)
        return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(ans))

    for chat in (False, True):
        got = run_task(model, tokenizer, task, world_dir=small_world, instruction_tuned=chat)
        hits = hits_norm = 0
        for row in rows:
            question, chosen, rejected = (row["prompt"][0]["content"], row["chosen"][0]["content"],
                                          row["rejected"][0]["content"])
            if chat:
                context = render(tokenizer.chat_template, [{"role": "user", "content": question}],
                                 add_generation_prompt=True, bos_token=tokenizer.bos_token or "",
                                 eos_token=tokenizer.eos_token or "")
                c, r = logp(context, chosen), logp(context, rejected)
            else:
                context = f"Question: {question}\nAnswer:"
                c, r = logp(context, " " + chosen), logp(context, " " + rejected)
            hits += c > r
            hits_norm += c / len(chosen) > r / len(rejected)
        assert got["chat"] is chat
        assert got["acc"] == hits / len(rows) and got["acc_norm"] == hits_norm / len(rows)


def test_eval_stage_writes_the_checkpoint_table_metrics(tmp_path, tiny_model_dir, small_world, capsys):
    from temper.data.prompts import Prompt
    from temper.models.reward import reward_model_from_causal, save_reward_model
    from temper.rewards.judges import make_judge

    chat_model = chat_tuned_copy(tmp_path, tiny_model_dir)
    int8 = tmp_path / "int8"
    assert main(["quantize", f"model={tiny_model_dir}", "method=int8", f"output_dir={int8}"]) == 0
    rm = tmp_path / "rm"
    torch.manual_seed(1)
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    save_reward_model(reward_model_from_causal(load_model(tiny_model_dir), tokenizer=tokenizer, head_std=1.0), rm,
                      tokenizer=tokenizer)
    out = tmp_path / "eval"
    models = [str(tiny_model_dir), str(chat_model), str(int8)]
    code = main(["eval", f"models=[{','.join(models)}]", "tasks=world_instruct,world_preference,world_chat_qa",
                 f"world={small_world}", f"reward_model={rm}", f"reference={tiny_model_dir}", f"output_dir={out}"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["reward_model"] == str(rm) and results["reference"] == str(tiny_model_dir)
    base, chat, quant = (results["per_model"][m] for m in models)

    # chat: auto follows the lineage: the base model gets the plain prompt, the chat-tuned ones the template
    assert base["world_instruct"]["chat"] is False and chat["world_instruct"]["chat"] is True
    assert quant["world_chat_qa"]["chat"] is False  # the int8 copy of the base model
    assert chat["world_instruct"]["outputs"][0]["context"] == json.loads(
        (small_world / "sft" / "test.jsonl").read_text().splitlines()[0])["messages"][0]["content"]

    for scores in (base, chat, quant):
        for task in ("world_instruct", "world_chat_qa"):
            rep = scores[task]
            assert rep["tokens_per_second"] > 0
            for o in rep["outputs"]:  # both tasks: right when the reply states the answer
                assert o["correct"] is contains_answer(o["prediction"], o["reference"])
            assert sum(o["correct"] for o in rep["outputs"]) / len(rep["outputs"]) == rep["answer_accuracy"]
        assert 0 <= scores["world_preference"]["acc"] <= 1

    # KL to the reference: exactly 0 for the reference itself, above 0 for its int8 copy
    assert base["world_instruct"]["kl_to_reference"] == 0.0 and base["world_chat_qa"]["kl_to_reference"] == 0.0
    assert quant["world_chat_qa"]["kl_to_reference"] > 0

    # the reward model's mean score of each model's replies, as the reward judge scores them
    judge = make_judge(f"reward:{rm}")
    outs = base["world_chat_qa"]["outputs"]
    scores = judge.rank([Prompt.from_text(o["context"]) for o in outs], [[o["prediction"]] for o in outs])
    assert base["world_chat_qa"]["reward_model_score"] == pytest.approx(sum(s[0] for s in scores) / len(scores),
                                                                      rel=1e-6)

    # model facts: weights on disk, logical parameters, quantisation, lineage stage
    full_bytes = sum(f.stat().st_size for f in chat_model.glob("*.safetensors"))
    assert chat["model"] == {"size_bytes": full_bytes, "parameters": sum(p.numel() for p in load_model(chat_model)
                                                                         .parameters()),
                             "quantized": None, "stage": "sft"}
    assert quant["model"]["quantized"] == "int8" and quant["model"]["stage"] == "quantize"
    assert quant["model"]["parameters"] == chat["model"]["parameters"]  # the same base, its linears packed
    assert quant["model"]["size_bytes"] == sum(f.stat().st_size for f in int8.glob("*.safetensors")) < full_bytes
    assert base["model"]["stage"] is None and read_lineage(tiny_model_dir) == {}


def test_reward_model_and_reference_need_a_generation_task(tmp_path, tiny_model_dir, small_world, capsys):
    code = main(["eval", f"model={tiny_model_dir}", "tasks=world_preference", f"world={small_world}",
                 f"reference={tiny_model_dir}", f"output_dir={tmp_path / 'e'}"])
    assert code == 2
    assert "reference= scores generated replies, but no task in tasks= is a generation task" in capsys.readouterr().err
