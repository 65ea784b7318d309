"""A model family is one folder: the registry lists the families, and everything else asks it.

A made-up family (an existing model class under a new name, architecture and presets) is
registered here and must work through build_model, config.json read and write, the HF
weight names, the memory planner, FLOPs, tensor parallelism's check and generation, with no
other file edited. A branch on a family's name anywhere in temper (`if c.family == "gpt2"`)
would treat the made-up family wrongly and fail these tests.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from conftest import reorder_tol

from temper.errors import TemperError
from temper.models import FAMILIES, build_model, load_model, preset, registry, save_model
from temper.models.generate import SamplingConfig, generate
from temper.models.hf import ADAPTERS, config_from_hf, config_to_hf
from temper.models.reward import (
    REWARD_ARCHITECTURES,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)
from temper.train import engine, memory
from temper.train.tensor_parallel import check_tensor_parallel

ROOT = Path(__file__).resolve().parents[1]


def made_up(base_name: str) -> registry.Family:
    """`base_name`'s family as a new one, 'toy-<base>': its own name, architectures and presets."""
    base = registry.family(base_name)
    name = f"toy{base_name}"
    arch, reward_arch = f"Toy{base_name.title()}ForCausalLM", f"Toy{base_name.title()}ForSequenceClassification"
    base_arch = next(iter(base.architectures))

    def read(hf, architecture, source):
        return base.config_from_hf({**hf, "architectures": [base_arch]}, base_arch, source).replace(
            family=name, hf_architecture=architecture)

    def write(config):
        return {**base.config_to_hf(config.replace(family=base_name)), "architectures": [arch], "model_type": name}

    tiny = next(c for n, c in base.presets.items() if n.endswith("-tiny"))
    return dataclasses.replace(
        base, name=name, description=f"a made-up copy of {base.description}", architectures={arch: name},
        reward_architectures={reward_arch: arch}, config_from_hf=read, config_to_hf=write,
        presets={f"{name}-tiny": tiny.replace(family=name, hf_architecture=arch, vocab_size=97)})


@pytest.fixture(params=["llama", "gpt2"])
def toy(request):
    family = registry.register(made_up(request.param))
    try:
        yield family, request.param
    finally:
        registry.unregister(family.name)


def test_every_table_is_a_view_of_the_registry(toy):
    family, _ = toy
    names = [f.name for f in registry.families()]
    assert list(FAMILIES) == list(ADAPTERS) == names and family.name in names
    assert FAMILIES[family.name] is family.model and ADAPTERS[family.name] is family.adapter
    assert REWARD_ARCHITECTURES == {k: v for f in registry.families() for k, v in f.reward_architectures.items()}
    assert f"{family.name}-tiny" in registry.PRESETS
    for f in registry.families():
        assert all(c.family == f.name for c in f.presets.values())


def test_made_up_family_builds_saves_and_loads(toy, tmp_path):
    family, _ = toy
    torch.manual_seed(0)
    model = build_model(preset(f"{family.name}-tiny")).eval()
    assert type(model) is family.model and model.config.family == family.name
    save_model(model, tmp_path)
    hf = config_to_hf(model.config)
    assert hf["architectures"] == [next(iter(family.architectures))]
    assert config_from_hf(hf).family == family.name
    loaded = load_model(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 9))
    assert torch.equal(model(ids), loaded(ids))  # the same weights, read back by the family's names
    out = generate(loaded, [[1, 2, 3]], SamplingConfig(max_new_tokens=3, temperature=0.0))
    assert len(out[0]) == 3


def test_made_up_family_reward_model_round_trip(toy, tmp_path):
    family, _ = toy
    torch.manual_seed(0)
    rm = build_reward_model(preset(f"{family.name}-tiny")).eval()
    save_reward_model(rm, tmp_path)
    again = load_reward_model(tmp_path)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        expected, got = rm(ids), again(ids)
    # the same weights; a meta-device load's rebuilt rotary tables may round differently in the last bit
    tol = reorder_tol(float(expected.abs().max()), rm.config.hidden_size, 7)
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_memory_planner_and_flops_read_the_family_not_its_name(toy):
    family, base = toy
    config = preset(f"{family.name}-tiny")
    as_base = config.replace(family=base)
    model = build_model(config, device="meta")
    assert memory.parameter_counts(config).total == model.num_parameters()
    assert memory.buffer_elements(config) == sum(b.numel() for b in model.buffers())
    plan = memory.Plan(dtype="fp32", mixed_precision=False, seq_len=64)
    assert memory.training_memory(config, plan).peak == memory.training_memory(as_base, plan).peak
    lora = memory.Plan(method="lora", seq_len=64)
    assert memory.training_memory(config, lora).peak == memory.training_memory(as_base, lora).peak
    inference = memory.Plan(inference=True, batch=2, context=64)
    assert memory.inference_memory(config, inference).peak == memory.inference_memory(as_base, inference).peak
    assert engine.flops_per_token(model, 64) == engine.flops_per_token(build_model(as_base, device="meta"), 64)


def test_tensor_parallel_asks_the_family(toy):
    family, base = toy
    config = preset(f"{family.name}-tiny")
    if base == "llama":
        check_tensor_parallel(config, 2)  # the plan came with the family
    else:
        with pytest.raises(TemperError, match=rf"parallel.tp=2: .* not {family.name} \(its fused c_attn"):
            check_tensor_parallel(config, 2)


def test_unknown_family_is_one_line_naming_the_families():
    with pytest.raises(TemperError, match=r"unknown model family 'lama' \(did you mean 'llama'\?\); expected one of "
                                          r"llama, gpt2"):
        build_model(preset("llama-tiny").replace(family="lama"))


def test_a_family_registered_twice_or_clashing_is_refused():
    with pytest.raises(TemperError, match="registered already"):
        registry.register(registry.family("gpt2"))
    clash = dataclasses.replace(made_up("gpt2"), architectures={"GPT2LMHeadModel": "gpt2"})
    with pytest.raises(TemperError, match="GPT2LMHeadModel belongs to family 'gpt2'"):
        registry.register(clash)


def test_no_module_outside_a_family_folder_names_a_family():
    """The registry is the one place: no `family == "..."` test and no list of family names elsewhere."""
    folders = {f"temper/models/{f.name}/" for f in registry.families()}
    pattern = re.compile(r"""family\s*(==|!=|not in|in)\s*[("'\[]|FAMILIES\s*=\s*\{|ADAPTERS\s*=\s*\{""")
    offenders = []
    for path in sorted((ROOT / "temper").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(folder) for folder in folders):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
