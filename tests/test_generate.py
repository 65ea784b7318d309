import pytest
import torch
from conftest import context_sensitive_model

from temper.models import build_model, load_model, preset
from temper.models.generate import SamplingConfig, generate, generate_text, process_logits

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3, 4, 5, 6, 7, 8, 9]]  # ragged: left padding


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
def test_cached_equals_uncached(kind, hf_model_dir):
    path, _ = hf_model_dir(kind)
    model = load_model(path).eval()
    cfg = SamplingConfig(max_new_tokens=16)
    assert generate(model, PROMPTS, cfg) == generate(model, PROMPTS, cfg, use_cache=False)
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=5)
    assert generate(model, PROMPTS, sampled) == generate(model, PROMPTS, sampled, use_cache=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_greedy_equals_transformers_generate(kind, hf_model_dir):
    path, hf_model = hf_model_dir(kind)
    model = load_model(path).eval()
    ours = generate(model, PROMPTS, SamplingConfig(max_new_tokens=20), pad_id=0)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = hf_model.generate(input_ids=ids, attention_mask=attention, do_sample=False, max_new_tokens=20,
                            min_new_tokens=20, pad_token_id=0, eos_token_id=None)
    assert ours == [row[width:].tolist() for row in out]
    # one prompt, no padding at all
    single = generate(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=20))
    out = hf_model.generate(input_ids=torch.tensor([PROMPTS[0]]), do_sample=False, max_new_tokens=20,
                            min_new_tokens=20, pad_token_id=0, eos_token_id=None)
    assert single == [out[0, len(PROMPTS[0]):].tolist()]


def test_batched_equals_one_by_one():
    """Ragged prompts (left padding) batched give each prompt's own tokens, on a model whose every
    earlier token moves the logits (a padding slot attended or a position off by one shows)."""
    model = context_sensitive_model()
    cfg = SamplingConfig(max_new_tokens=10)
    batched = generate(model, PROMPTS, cfg)
    assert batched == [generate(model, [p], cfg)[0] for p in PROMPTS]


def test_seeded_sampling_is_reproducible_and_seed_matters():
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64)).eval()
    cfg = dict(max_new_tokens=24, temperature=1.5, top_k=40, top_p=0.95, repetition_penalty=1.2)
    a = generate(model, PROMPTS, SamplingConfig(**cfg, seed=1))
    b = generate(model, PROMPTS, SamplingConfig(**cfg, seed=1))
    c = generate(model, PROMPTS, SamplingConfig(**cfg, seed=2))
    assert a == b and a != c


def test_seeded_rows_sample_the_same_however_the_batch_is_split():
    """Each row draws from its own stream (seed, row index): split into calls that name their first
    row (`first_row`, as ranks do), the batch samples the same tokens; a row's stream is not
    another's, and removing finished rows does not shift the streams of the others."""
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64)).eval()
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=7)
    whole = generate(model, PROMPTS, cfg)
    assert [generate(model, [p], cfg, first_row=i)[0] for i, p in enumerate(PROMPTS)] == whole
    assert generate(model, PROMPTS[1:], cfg, first_row=1) == whole[1:]
    assert generate(model, PROMPTS[1:], cfg) != whole[1:]  # row 0's stream is another
    # groups: row b*G + g of num_return_sequences=G is row b*G + g of the prompts repeated
    grouped = generate(model, PROMPTS[:2], cfg, num_return_sequences=3)
    assert grouped == generate(model, [p for p in PROMPTS[:2] for _ in range(3)], cfg)
    assert len({tuple(r) for r in grouped[:3]}) > 1  # the copies of a prompt differ
    eos = whole[0][2]  # row 0 ends early with this EOS; the rows after it keep their draws
    ended = generate(model, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=7, eos_token_ids=[eos]))
    for full, cut in zip(whole, ended):
        assert cut == full[:full.index(eos) + 1] if eos in full else cut == full


def test_seeded_draws_follow_the_softmax():
    """The per-row exponential race samples the softmax: 4,000 rows' draws from fixed logits land
    within 5 standard deviations of each token's probability (deterministic seeds: no flakiness)."""
    from temper.models.generate import choose_next, row_streams

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 4000
    logits = probs.log().expand(n, -1)
    tokens = choose_next(logits, SamplingConfig(temperature=1.0), row_streams(3, range(n), torch.device("cpu")))
    counts = torch.bincount(tokens, minlength=5).double()
    assert counts[4] == 0  # probability 0 is never drawn
    sd = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * sd + 1e-9).all(), counts


def test_top_k_one_is_greedy():
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64)).eval()
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10))
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=1, seed=3)) == greedy


def test_eos_ends_each_row_separately():
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64)).eval()
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12))
    eos = free[0][3]  # a token the first row produces at step 4
    stopped = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, eos_token_ids=[eos]))
    for full, cut in zip(free, stopped):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert cut == full[:end]


def test_repetition_penalty_formula_on_hand_tensor():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(logits, SamplingConfig(repetition_penalty=2.0), seen)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))


def test_seen_tokens_count_a_prompt_pad_id_whatever_the_padding_writes():
    """A scatter_ of the valid flags let a padding slot's False overwrite the prompt's True."""
    from temper.models.generate import seen_tokens

    pad = 0
    ids = torch.tensor([[pad, 3, pad, pad], [pad, pad, 3, 4]])
    valid = torch.tensor([[True, True, False, False], [False, False, True, True]])
    seen = seen_tokens(ids, valid, vocab_size=6)
    assert seen.tolist() == [[True, False, False, True, False, False], [False, False, False, True, True, False]]


def test_repetition_penalty_reaches_a_prompt_token_equal_to_pad(monkeypatch):
    import temper.models.generate as gen

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64)).eval()
    pad, penalty = 0, 1.7
    prompts = [[pad, 7, 9], [5, 6, 7, 8, 9, 10], [3, 4]]  # row 0 holds the pad id and is left-padded
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = gen.process_logits

    def spy(logits, cfg, seen):
        out = real(logits, cfg, seen)
        calls.append((logits.clone(), out.clone()))
        return out

    monkeypatch.setattr(gen, "process_logits", spy)
    generate(model, prompts, SamplingConfig(max_new_tokens=1, repetition_penalty=penalty), pad_id=pad)
    logits, out = calls[0]
    for row, prompt in enumerate(prompts):
        expected = logits[row].clone()  # by hand: divide a seen positive logit, multiply a seen negative one
        for token in set(prompt):
            value = logits[row, token]
            expected[token] = value / penalty if value > 0 else value * penalty
        torch.testing.assert_close(out[row], expected, rtol=0, atol=0)
        hf = transformers.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt]), logits[row:row + 1].clone())
        torch.testing.assert_close(out[row], hf[0], rtol=0, atol=0)
    assert out[0, pad] != logits[0, pad]  # the prompt's pad id is penalised ...
    assert out[2, pad] == logits[2, pad]  # ... and padding is not


def test_top_p_and_top_k_masks_on_hand_tensor():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = process_logits(logits, SamplingConfig(temperature=1.0, top_p=0.8), None).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = process_logits(logits, SamplingConfig(temperature=1.0, top_p=0.81), None).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    kept = process_logits(logits, SamplingConfig(temperature=1.0, top_k=3), None).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    scaled = process_logits(logits, SamplingConfig(temperature=0.5), None)
    torch.testing.assert_close(scaled, logits / 0.5)


def test_stop_strings_and_streaming(tiny_model_dir, tiny_tokenizer):
    model = load_model(tiny_model_dir).eval()
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.0, seed=0)
    free = generate_text(model, tiny_tokenizer, ["Alice lives in"], cfg)[0]
    assert len(free) > 4
    stop = free[2:4]
    cut = generate_text(model, tiny_tokenizer, ["Alice lives in"], SamplingConfig(**{**cfg.__dict__, "stop": (stop,)}))[0]
    assert cut == free[: free.find(stop)]
    pieces: list[str] = []
    streamed = generate_text(model, tiny_tokenizer, ["Alice lives in"], cfg, on_text=lambda r, t: pieces.append(t))
    assert "".join(pieces) == streamed[0] == free


def test_bad_sampling_settings():
    model = build_model(preset("llama-tiny", vocab_size=64)).eval()
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, PROMPTS, SamplingConfig(top_p=0.0))
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(model, [[1], []], SamplingConfig())
