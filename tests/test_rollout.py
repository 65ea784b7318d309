"""The rollout source (temper/train/rollout.py): a generation batch every
steps_per_generation x num_iterations steps, served in slices, resumable mid-buffer; grouped
sampling with one shared prefill per prompt, finished rows leaving the batch, and the old-policy
log-probs of a generation batch in one no-grad forward."""

import pytest
import torch
from conftest import assert_reorder_close, decoder_lengths

from temper.errors import TemperError
from temper.models import build_model, preset
from temper.models.generate import SamplingConfig, generate
from temper.train.rollout import RolloutSource, rollout_logprobs, sample_groups


def make(shuffle, calls, steps=3, iterations=2, rows=6, made_before=0):
    def generate():  # rows 100.., then 200.., ...: which generation batch a row came from
        calls.append(None)
        base = 100 * (made_before + len(calls))
        return {"row": torch.arange(base, base + rows), "text": [f"t{base + i}" for i in range(rows)]}

    return RolloutSource(generate, steps_per_generation=steps, num_iterations=iterations, shuffle=shuffle, seed=0)


def served(source, n):
    return [source.next()["row"].tolist() for _ in range(n)]


@pytest.mark.parametrize("shuffle", ["none", "generation", "pass"])
def test_each_pass_serves_every_row_once_and_generation_waits_for_the_buffer(shuffle):
    calls = []
    source = make(shuffle, calls)
    slices = served(source, 12)
    assert len(calls) == 2 and source.generations == 2  # steps 0 and 6
    for start in (0, 3, 6, 9):  # a pass: 3 slices of 2 rows covering the buffer
        rows = [r for s in slices[start:start + 3] for r in s]
        assert sorted(rows) == list(range(100 * (start // 6 + 1), 100 * (start // 6 + 1) + 6))
    first, second = slices[0:3], slices[3:6]
    if shuffle == "none":
        assert slices[0] == [100, 101] and first == second
    elif shuffle == "generation":  # TRL's GRPO: one order per generation batch, the same slices each pass
        assert first == second and first != [[100, 101], [102, 103], [104, 105]]
    else:  # a new order each pass
        assert first != second


def test_a_slice_keeps_lists_aligned_with_tensors():
    source = make("pass", [])
    batch = source.next()
    assert batch["text"] == [f"t{r}" for r in batch["row"].tolist()]


def test_resume_mid_buffer_serves_the_same_slices_without_generating():
    straight_calls, resumed_calls = [], []
    straight = make("pass", straight_calls)
    expected = served(straight, 10)
    first = make("pass", [])
    served(first, 5)  # mid-buffer, in the second pass
    state = first.state_dict()
    resumed = make("pass", resumed_calls, made_before=state["generations"])  # the generator's own state
    resumed.load_state_dict(state)
    assert served(resumed, 5) == expected[5:]
    assert len(resumed_calls) == 1  # only the next generation (step 6), not the restored buffer's


def test_mistakes_are_named():
    with pytest.raises(TemperError, match="does not split into steps_per_generation=4"):
        make("none", [], steps=4).next()
    with pytest.raises(TemperError, match="shuffle must be one of"):
        make("sometimes", [])
    source = RolloutSource(lambda: {"a": torch.zeros(4), "b": torch.zeros(3)}, steps_per_generation=1)
    with pytest.raises(TemperError, match="different numbers of rows"):
        source.next()
    other = make("none", [], steps=2)
    with pytest.raises(TemperError, match="this run asks for"):
        other.load_state_dict(make("none", []).state_dict())


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3, 4, 5, 6, 7, 8, 9, 30, 31]]  # ragged: left padding
G = 4


def tiny_model(name="llama-tiny"):
    torch.manual_seed(0)
    return build_model(preset(name, vocab_size=64)).float().eval()


def record_batches(model):
    """(list of (rows, tokens, inference mode) per forward call, the hook's handle): a forward
    pre-hook, so the model's forward itself is untouched."""
    calls = []

    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        calls.append((ids.shape[0], ids.shape[1], torch.is_inference_mode_enabled()))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_shared_prefill_samples_exactly_what_duplicated_prompts_sample():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, repetition_penalty=1.2,
                         eos_token_ids=[7, 9, 11], seed=3)
    calls, handle = record_batches(model)
    shared = generate(model, PROMPTS, cfg, num_return_sequences=G)
    prefill = calls[0]
    duplicated = generate(model, [p for p in PROMPTS for _ in range(G)], cfg)
    handle.remove()
    # fp32, same seed, the same (rows, vocab) draws each step: the same tokens, row for row
    assert shared == duplicated
    assert prefill[:2] == (len(PROMPTS), max(map(len, PROMPTS)))  # each prompt prefilled once, not G times
    assert calls[len(calls) // 2][0] == len(PROMPTS) * G  # the duplicated run prefills P x G rows
    assert len({tuple(shared[i]) for i in range(G)}) > 1  # the copies of a prompt sample apart
    assert any(len(c) < 16 for c in shared) and any(len(c) == 16 for c in shared)  # some finished early


def test_finished_rows_leave_the_batch_and_the_others_are_unchanged():
    model = tiny_model()
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12), num_return_sequences=2)
    eos = free[0][3]  # greedy: a token the first prompt produces at step 4
    calls, handle = record_batches(model)
    stopped = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, eos_token_ids=[eos]), num_return_sequences=2)
    handle.remove()
    ended = [full.index(eos) + 1 if eos in full[:-1] else len(full) for full in free]
    assert min(ended) < 12 and max(ended) == 12  # some rows end early, some run to the limit
    for full, cut, end in zip(free, stopped, ended):
        assert cut == full[:end]  # dropping the finished rows changes nothing for the others
    # decode call k (after the prefill) runs on the rows still going: those with more than k+1 tokens
    decode_rows = [rows for rows, tokens, _ in calls[1:]]
    assert decode_rows == [sum(end > k + 1 for end in ended) for k in range(len(decode_rows))]
    assert sum(decode_rows) < len(free) * 11


class CharTokenizer:  # decodes ids as letters: enough for stop strings
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_sample_groups_layout_and_finished_or_truncated():
    model = tiny_model()
    max_new = 10
    cfg = SamplingConfig(max_new_tokens=max_new, temperature=1.0, eos_token_ids=[7, 9], stop=("q",), seed=1)
    rollout = sample_groups(model, PROMPTS, G, cfg, pad_id=0, tokenizer=CharTokenizer())
    N = len(PROMPTS) * G
    assert rollout.prompt_ids.shape == (N, 9) and rollout.completion_ids.shape[0] == N
    lengths = rollout.completion_mask.sum(-1)
    for row in range(N):
        prompt = PROMPTS[row // G]
        assert rollout.prompt_ids[row, 9 - len(prompt):].tolist() == prompt
        assert rollout.prompt_mask[row].tolist() == [False] * (9 - len(prompt)) + [True] * len(prompt)
        n = int(lengths[row])
        assert rollout.completion_mask[row, :n].all() and not rollout.completion_mask[row, n:].any()
        assert (rollout.completion_ids[row, n:] == 0).all()
        tokens = rollout.completion_ids[row, :n].tolist()
        ends = tokens[-1] in (7, 9) or "q" in CharTokenizer().decode(tokens)
        assert bool(rollout.finished[row]) == ends
        if not ends:
            assert n == max_new  # only the limit cuts a row that did not end
    assert rollout.finished.any() and rollout.truncated.any()
    assert torch.equal(rollout.truncated, ~rollout.finished)
    stopped_by_string = [r for r in range(N) if rollout.finished[r] and
                         rollout.completion_ids[r, lengths[r] - 1] not in (7, 9)]
    assert stopped_by_string  # the stop string ended some row, flagged finished too


def test_sampling_is_seeded_and_builds_no_autograd_graph():
    model = tiny_model()
    assert all(p.requires_grad for p in model.parameters())
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, eos_token_ids=[7], seed=4)
    calls, handle = record_batches(model)
    a = sample_groups(model, PROMPTS, G, cfg)
    handle.remove()
    assert calls and all(inference for _, _, inference in calls)  # decoding ran in inference mode
    b = sample_groups(model, PROMPTS, G, cfg)
    c = sample_groups(model, PROMPTS, G, SamplingConfig(**{**cfg.__dict__, "seed": 5}))
    assert all(torch.equal(x, y) for x, y in zip(a.as_batch().values(), b.as_batch().values()))
    assert a.completion_ids.tolist() != c.completion_ids.tolist()  # the seed matters
    model.train()
    logp, entropy = rollout_logprobs(model, a, with_entropy=True)
    assert model.training  # sampling put it back too
    for t in (*a.as_batch().values(), logp, entropy):
        # ordinary tensors (not inference ones: the loss may save them for backward), no graph
        assert not t.requires_grad and t.grad_fn is None and not t.is_inference()


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])  # gpt2: learned positions see a shift that rotary hides
def test_old_logprobs_equal_a_fresh_forward_of_each_completion(name):
    model = tiny_model(name)
    temperature = 0.7
    cfg = SamplingConfig(max_new_tokens=10, temperature=temperature, eos_token_ids=[7, 9], seed=2)
    rollout = sample_groups(model, PROMPTS, 2, cfg)
    logp, entropy = rollout_logprobs(model, rollout, temperature=temperature, with_entropy=True)
    in_batches, _ = rollout_logprobs(model, rollout, temperature=temperature, batch_size=4)
    N, T = rollout.completion_ids.shape
    assert logp.shape == entropy.shape == (N, T)
    for row in range(N):  # each sequence alone: no padding, no mask, the plain log-softmax
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row]]
        completion = rollout.completion_ids[row][rollout.completion_mask[row]]
        n = len(completion)
        with torch.no_grad():
            logits = model(torch.cat([prompt, completion])[None])[0, len(prompt) - 1:-1].float() / temperature
        expected = logits.log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1)
        expected_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        lengths = decoder_lengths(model, len(prompt) + n)
        assert_reorder_close(logp[row, :n], expected, lengths)
        assert_reorder_close(entropy[row, :n], expected_entropy, lengths)
        assert (logp[row, n:] == 0).all() and (entropy[row, n:] == 0).all()
    assert_reorder_close(in_batches, logp, decoder_lengths(model, 9 + T))


# ----------------------------------------------------------------------------- what GRPO and PPO share


def test_generation_prompts_split_one_processs_stream_into_rank_blocks():
    from temper.train.rollout import generation_prompts, prompt_order

    one = [generation_prompts(10, g, 4, seed=3) for g in range(4)]
    assert one[0] == [prompt_order(10, k, 3) for k in range(4)]
    two = [generation_prompts(10, g, 2, world=2, rank=r, seed=3) for g in range(4) for r in range(2)]
    assert sum(two[:2], []) == one[0] and sum(two[2:4], []) == one[1]
    first_epoch = [prompt_order(10, k, 3) for k in range(10)]
    assert sorted(first_epoch) == list(range(10))  # every prompt once per epoch


def test_pad_rows_prompt_limit_and_completion_texts(tiny_tokenizer):
    from temper.train.rollout import TextSettings, pad_rows, prompt_limit

    ids, mask = pad_rows([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]] and mask.sum(1).tolist() == [3, 1, 0]
    assert prompt_limit(0, 6, 64) == 58 and prompt_limit(20, 6, 64) == 20
    with pytest.raises(TemperError, match=r"max_prompt_length \(60\) \+ max_completion_length \(6\) do not fit"):
        prompt_limit(60, 6, 64)
    raw = TextSettings.of(tiny_tokenizer, "none")
    assert raw.template is None and raw.eos_ids == [tiny_tokenizer.eos_id] and raw.pad_id == tiny_tokenizer.pad_id
    hello = tiny_tokenizer.encode("Hello")
    assert raw.texts(tiny_tokenizer, [hello + [tiny_tokenizer.eos_id], hello]) == ["Hello", "Hello"]
    chat = TextSettings.of(tiny_tokenizer, "chatml")
    assert chat.stops and chat.texts(tiny_tokenizer, [tiny_tokenizer.encode("Hi<|im_end|> more")]) == ["Hi"]


def test_empty_rollouts_warn_then_stop_and_a_non_empty_batch_resets_the_count():
    from temper.train.rollout import EmptyRollouts

    guard = EmptyRollouts(2)
    with pytest.warns(UserWarning, match="generation batch 1: every one of the 3 completions is empty"):
        guard.check(torch.ones(3, dtype=torch.bool), 1)
    guard.check(torch.tensor([True, False, True]), 2)
    assert guard.in_a_row == 0
    with pytest.warns(UserWarning), pytest.raises(TemperError, match="2 generation batches in a row"):
        guard.check(torch.ones(3, dtype=torch.bool), 3)
        guard.check(torch.ones(3, dtype=torch.bool), 4)


def test_generation_means_restart_with_each_generation_batch_and_resume():
    from temper.train.rollout import GenerationMeans

    means = GenerationMeans()
    assert means.add(1, {"loss": 2.0}, 2) == {"loss": 1.0}
    assert means.add(1, {"loss": 4.0}, 2) == {"loss": 1.5}
    again = GenerationMeans()
    again.load_state_dict(means.state_dict())
    assert again.add(1, {"loss": 0.0}, 4) == {"loss": 0.75}
    assert again.add(2, {"loss": 3.0}, 1) == {"loss": 3.0}  # a new generation batch starts over
