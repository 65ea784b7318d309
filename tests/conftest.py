"""Shared fixtures: tiny models built with transformers, a tiny tokenizer, the shared data."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))
# precision=auto measures the CPU (bf16 where its bf16 matmuls are faster): the suite pins fp32, here
# and in every command it starts, so its results do not depend on the CPU; test_precision_auto.py
# tests the measurement itself
os.environ["TEMPER_AUTO_PRECISION"] = "fp32"


SLOW_TESTS = os.environ.get("TEMPER_SLOW_TESTS") == "1"  # opt-in: the multi-process tests marked slow


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a multi-process test (tens of seconds) whose property a faster "
                                       "test also checks; runs with TEMPER_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if SLOW_TESTS:
        return
    skip = pytest.mark.skip(reason="opt-in: TEMPER_SLOW_TESTS=1 runs it (keeps the suite under 10 minutes)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test where it is absent (a user's fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def hf_tiny_config(kind: str):
    transformers = pytest.importorskip("transformers")
    if kind == "llama":
        return transformers.LlamaConfig(**TINY, rope_theta=5000.0, max_position_embeddings=256)
    if kind == "llama3":
        return transformers.LlamaConfig(
            **TINY, tie_word_embeddings=True, max_position_embeddings=256,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
        )
    if kind == "qwen2":
        return transformers.Qwen2Config(**TINY, max_position_embeddings=256, tie_word_embeddings=True)
    if kind == "mistral":
        return transformers.MistralConfig(**TINY, sliding_window=8, max_position_embeddings=256)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                       bos_token_id=0, eos_token_id=0)
    raise AssertionError(kind)


HF_KINDS = ["llama", "llama3", "qwen2", "mistral", "gpt2"]


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """Build (once per kind) a tiny random transformers model and save it; returns (dir, hf_model)."""
    transformers = pytest.importorskip("transformers")
    cache: dict[str, tuple[Path, object]] = {}

    def make(kind: str):
        if kind not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(hf_tiny_config(kind)).eval()
            path = tmp_path_factory.mktemp(f"hf_{kind}")
            model.save_pretrained(path)
            cache[kind] = (path, model)
        return cache[kind]

    return make


SAMPLE_TEXT = (
    "Alice lives in Paris. Alice has a cat named Tom. Bob lives in Rome; his dog is Rex.\n\n"
    "The sum of 3 and 4 is 7. The sum of 10 and 5 is 15. Twelve minus two is ten.\n\n"
    "Hello, world! Ünïcödé and émojis 😀 must survive. Tabs\tand  spaces too.\n"
) * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from temper.data.tokenizer import train_tokenizer

    return train_tokenizer(SAMPLE_TEXT.split("\n\n"), vocab_size=300, min_frequency=2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A temper-written model directory with a tokenizer: random llama-tiny weights."""
    from temper.models import build_model, preset, save_model

    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size))
    path = tmp_path_factory.mktemp("tiny_model")
    save_model(model, path, tokenizer=tiny_tokenizer)
    return path


# ----------------------------------------------------------------------------- float tolerances

FP32_EPS = torch.finfo(torch.float32).eps  # 2**-23 ~ 1.19e-7: the gap between 1.0 and the next fp32


def reorder_tol(scale: float, *lengths: int, eps: float = FP32_EPS) -> float:
    """How far apart two fp32 evaluations of the same maths may land when their sums run in a
    different order: padded vs packed rows, accumulated vs one batch, chunked vs whole, several
    processes vs one, temper's kernels vs transformers', or another CPU's vector width.

    Each addition rounds its partial sum by at most eps/2 of its size. Reordering a sum of n
    terms of size m changes n roundings: up to n * eps * m if all of them went one way, about
    sqrt(n) * eps * m as they do, unbiased and independent. A result comes out of a chain of
    such sums (a norm and a matmul over the hidden size, a softmax over the keys, a logsumexp
    over the vocabulary, a gradient over the tokens) and each link passes its relative error on,
    so the bound adds one sqrt(n) per reduction in `lengths`:

        tol = eps * scale * sum(sqrt(n) for n in lengths)

    `scale` is the magnitude of the values (the largest |element| of the compared tensor, or a
    norm for a normwise check): an element that cancels to ~0 still carries the rounding of terms
    of that size, so its own value is the wrong yardstick. For the tiny test decoders this is
    2e-5 of the scale for a forward pass, 5e-5 for a training step, 2e-4 after four steps: 5 to 50
    times below a bug of 1e-3 relative, and 10 to 1000 times above what AVX-512, AVX2 and
    unvectorised kernels were seen to differ by.
    """
    return eps * scale * sum(math.sqrt(n) for n in lengths)


def decoder_lengths(config, seq_len: int, *, tokens: int = 0) -> tuple[int, ...]:
    """The reductions that one output of a decoder goes through, for `reorder_tol`.

    `config` is a temper ModelConfig or model. Per block: the norm and the q/k/v projections
    over the hidden size, the scores over the head size, the softmax and the weighted sum over
    `seq_len` keys, the output projection, the second norm, the MLP's input (hidden size) and
    output (intermediate size); then the final norm, the output layer and the logsumexp over
    the vocabulary. With `tokens`, a training step: the same chain run backwards too, and a
    weight gradient's sum over the `tokens` positions of the batch.
    """
    c = getattr(config, "config", config)
    H = c.hidden_size
    block = (H, H, c.head_dim, seq_len, seq_len, H, H, H, c.intermediate_size)
    forward = block * c.num_layers + (H, H, c.vocab_size)
    return forward * 2 + (tokens,) if tokens else forward


def assert_reorder_close(actual, expected, lengths, *, msg=None) -> None:
    """`torch.testing.assert_close` within `reorder_tol(max |expected|, *lengths)`, elementwise."""
    scale = float(torch.as_tensor(expected).detach().abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=reorder_tol(scale, *lengths), msg=msg)


def approx_reordered(expected, lengths):
    """`pytest.approx(expected)` within `reorder_tol(max |expected|, *lengths)`."""
    scale = max(abs(v) for v in expected) if isinstance(expected, (list, tuple)) else abs(expected)
    return pytest.approx(expected, rel=0, abs=reorder_tol(scale, *lengths))


# AdamW steps by lr * m / (sqrt(v) + eps). With the default eps of 1e-8, a gradient entry that is
# zero up to rounding (1e-10 one way, 1e-10 the other) becomes a step of up to +-lr: weights after
# AdamW then depend on the CPU's summation order, however exact the gradients. Tests that claim
# two trainings are the same maths run with this eps, which makes the step Lipschitz in the
# gradient (`adamw_drift`) while the loss still falls every step.
ADAMW_EPS = 1e-2


def adamw_drift(lrs, grad_norms, step_lengths, *, grad_clip: float = 1.0, eps: float = ADAMW_EPS,
                betas=(0.9, 0.95)) -> float:
    """How far apart (2-norm over all weights) two AdamW trainings of the same maths may end,
    when only the order of their sums differs, after the steps with learning rates `lrs` and
    logged gradient norms `grad_norms`; `step_lengths` are one step's reductions
    (`decoder_lengths(..., tokens=...)`).

    Step t's gradients differ by at most g_t = reorder_tol(min(norm_t, clip), *step_lengths * t)
    in norm (t chained steps); clipping by clip/norm, itself off by as much, doubles that. m and
    sqrt(v) are a weighted mean and a weighted 2-norm of the gradients so far, each moved by at
    most that much, and |m| <= c * sqrt(v) with c = sqrt(sum a_s^2 / b_s) over their weights
    (Cauchy-Schwarz; 1 at the first step): the step m / (sqrt(v) + eps) moves by at most
    (1 + c) / eps times it. Decoupled weight decay only shrinks a difference.
    """
    beta1, beta2 = betas
    drift = 0.0
    for t, (lr, norm) in enumerate(zip(lrs, grad_norms), start=1):
        a = [(1 - beta1) * beta1 ** (t - s) / (1 - beta1 ** t) for s in range(1, t + 1)]
        b = [(1 - beta2) * beta2 ** (t - s) / (1 - beta2 ** t) for s in range(1, t + 1)]
        c = math.sqrt(sum(x * x / y for x, y in zip(a, b)))
        clipped = min(norm, grad_clip) if grad_clip > 0 else norm
        drift += lr * (1 + c) / eps * 2 * reorder_tol(clipped, *step_lengths * t)
    return drift


def assert_weights_close(actual: dict, expected: dict, drift: float, steps: int) -> None:
    """Every tensor within `drift` (`adamw_drift`) in 2-norm, plus one fp32 rounding of each
    weight per step (steps * eps * its norm)."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        gap = float((actual[name].double() - value.double()).norm())
        tol = drift + steps * FP32_EPS * float(value.double().norm())
        assert gap <= tol, f"{name}: |a - b| = {gap:.3g} > {tol:.3g}"


def trained_pair():
    """A llama-tiny and its AdamW after one step: state worth checkpointing."""
    import torch

    from temper.config import OptimConfig
    from temper.losses import causal_lm_loss
    from temper.models import build_model, preset
    from temper.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64))
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    x = torch.randint(0, 64, (2, 8))
    causal_lm_loss(model, x, x)[0].backward()
    opt.step()
    return model, opt


def eos_only_sampler(eos: int):
    """A stand-in for `sample_groups` whose every completion is the EOS alone (an all-empty rollout),
    for the online recipes' "the policy answers nothing" stop."""
    from temper.train.rollout import Rollout

    def sample(model, prompts, k, *args, **kwargs):
        n = len(prompts) * k
        return Rollout(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.bool),
                       torch.full((n, 1), eos), torch.ones(n, 1, dtype=torch.bool), torch.ones(n, dtype=torch.bool), k)

    return sample


def context_sensitive_model(vocab_size: int = 64, seed: int = 0):
    """llama-tiny with weights of unit scale (not the small init), so that attention is sharp and every
    earlier token moves the next-token logits: a padding slot seen, a position off by one or a key
    out of place changes the tokens (with the small init, such bugs hide behind near-uniform attention)."""
    from temper.models import build_model, preset

    torch.manual_seed(seed)
    model = build_model(preset("llama-tiny", vocab_size=vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
    return model
