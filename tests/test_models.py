"""Model families against transformers, through the production converter, both ways."""

import json

import pytest
import torch
from conftest import HF_KINDS, assert_reorder_close, decoder_lengths, hf_tiny_config

from temper.errors import TemperError
from temper.models import PRESETS, build_model, load_model, preset, save_model
from temper.models.hf import config_from_hf

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", HF_KINDS)
def test_logits_match_transformers_both_ways(kind, hf_model_dir, tmp_path):
    path, hf_model = hf_model_dir(kind)
    model = load_model(path).eval()
    assert model.config.hf_architecture == hf_model.config.architectures[0]
    x = torch.randint(0, 128, (2, 24))  # longer than Mistral's window of 8
    with torch.no_grad():
        expected = hf_model(x).logits
        got = model(x)
    forward = decoder_lengths(model, x.shape[1])  # transformers' kernels sum in their own order
    assert_reorder_close(got, expected, forward)

    save_model(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(hf_model)
    with torch.no_grad():
        assert_reorder_close(reloaded(x).logits, got, forward)


def test_temper_model_exported_then_reloaded_is_identical(tmp_path):
    torch.manual_seed(1)
    model = build_model(preset("gpt2-tiny", vocab_size=100)).eval()
    save_model(model, tmp_path)
    again = load_model(tmp_path).eval()
    x = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_reorder_close(hf(x).logits, model(x), decoder_lengths(model, x.shape[1]))
    assert again.lm_head.weight is again.wte.weight  # tying survives the load


def test_sharded_save_and_load(tmp_path):
    torch.manual_seed(2)
    model = build_model(preset("llama-tiny", vocab_size=200)).eval()
    save_model(model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    x = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(x), model(x), atol=0, rtol=0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert_reorder_close(hf(x).logits, model(x), decoder_lengths(model, x.shape[1]))


def test_gpt2_checkpoint_without_transformer_prefix(hf_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, hf_model = hf_model_dir("gpt2")
    tensors = load_file(str(path / "model.safetensors"))
    stripped = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(stripped, str(tmp_path / "model.safetensors"))
    x = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        model = load_model(tmp_path)
        assert_reorder_close(model(x), hf_model(x).logits, decoder_lengths(model, x.shape[1]))


# Known parameter counts of the real families (as published for each model).
REAL_COUNTS = {
    "gpt2": 124_439_808,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2-0.5b": 494_032_768,
}


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_presets_count_on_meta_device(name):
    model = build_model(preset(name), device="meta")
    assert model.num_parameters() == REAL_COUNTS[name]


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2-0.5b", "gpt2", "llama-125m"])
def test_preset_counts_equal_transformers_on_meta(name):
    from temper.models.hf import config_to_hf

    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config_to_hf(PRESETS[name]).items()
                                                   if k != "architectures"})
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert build_model(preset(name), device="meta").num_parameters() == hf_count


def test_tiny_preset_is_small():
    assert 100_000 < build_model(preset("llama-tiny"), device="meta").num_parameters() < 1_000_000


# ----------------------------------------------------------------------------- bad input


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="model directory not found: /no/such/dir"):
        load_model("/no/such/dir")


def test_unknown_preset_suggests():
    with pytest.raises(TemperError, match="did you mean the preset 'llama-tiny'"):
        load_model("llama-tiyn")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"],
                                                      "model_type": "t5"}))
    with pytest.raises(TemperError, match=r"config.json: architecture 'T5ForConditionalGeneration' is not supported"):
        load_model(tmp_path)


def test_shape_mismatch_names_tensor(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(TemperError, match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' "
                                          r"has shape \(\d+, \d+\), expected \(\d+, \d+\) from config.json"):
        load_model(tmp_path)


def test_missing_and_unexpected_tensors(hf_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = hf_model_dir("llama")
    tensors = load_file(str(path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    partial = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(TemperError, match=r"tensor 'model.norm.weight' missing"):
        load_model(tmp_path)
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TemperError, match=r"unexpected tensor 'model.extra.weight'"):
        load_model(tmp_path)


def test_pickled_weights_are_refused(tmp_path, hf_model_dir):
    path, _ = hf_model_dir("llama")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(TemperError, match="temper reads safetensors only"):
        load_model(tmp_path)


def test_unsupported_rope_type():
    cfg = hf_tiny_config("llama").to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(TemperError, match="rope type 'yarn' is not supported"):
        config_from_hf(cfg)


def test_bf16_forward_runs_and_is_close():
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny")).eval()
    x = torch.randint(0, 2048, (1, 12))
    with torch.no_grad():
        full = model(x)
        half = model.to(torch.bfloat16)(x).float()
    assert half.dtype == torch.float32 and (half - full).abs().max() < 0.1


def test_a_missing_model_directory_says_not_found_first(tmp_path):
    from temper.errors import TemperError
    from temper.models import load_model

    with pytest.raises(TemperError, match=r"model directory not found: nowhere \(nor is it a preset name; presets: "):
        load_model("nowhere")
    with pytest.raises(TemperError, match=r"model directory not found: llama-tiyn .*did you mean the preset 'llama-tiny'"):
        load_model("llama-tiyn")


def test_preset_overrides_keep_derived_head_dim_and_kv_heads_in_step():
    """model_config.hidden_size / num_heads on a preset: head_dim (and num_kv_heads without GQA)
    follow, as they would for a config written out in full; explicit values and GQA stay."""
    from temper.models import preset
    from temper.models.bert.hf import config_to_hf

    bert = preset("bert-tiny")
    wide = bert.with_overrides({"hidden_size": 128, "num_heads": 4, "intermediate_size": 512})
    assert (wide.head_dim, wide.num_kv_heads) == (32, 4)
    assert config_to_hf(wide)["hidden_size"] == 128  # exports (the old head_dim made this fail)
    more_heads = bert.with_overrides({"num_heads": 8})
    assert (more_heads.head_dim, more_heads.num_kv_heads) == (8, 8)
    assert bert.with_overrides({"hidden_size": 128, "head_dim": 16}).head_dim == 16
    gqa = preset("llama-tiny")
    assert gqa.num_kv_heads < gqa.num_heads
    assert gqa.with_overrides({"num_heads": gqa.num_heads * 2}).num_kv_heads == gqa.num_kv_heads
