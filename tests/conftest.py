"""Shared fixtures: tiny models built with transformers, a tiny tokenizer, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
