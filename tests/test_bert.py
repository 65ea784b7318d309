"""The BERT family (BERT and ELECTRA encoders and their heads) against transformers, both ways,
through the production converter (load_model / save_model), and kept out of decoder-only paths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reorder_tol

from temper.cli import main
from temper.errors import TemperError
from temper.models import build_model, load_model, preset, save_model
from temper.models.bert import HEADS, with_head
from temper.models.generate import SamplingConfig, generate
from temper.train import engine, memory

transformers = pytest.importorskip("transformers")

VOCAB, T = 97, 12
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64)


def hf_config(arch: str):
    if arch.startswith("Electra"):  # embeddings narrower than the hidden size: the projection is exercised
        return transformers.ElectraConfig(**SIZES, embedding_size=16)
    return transformers.BertConfig(**SIZES, num_labels=3)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight moved off its initial value (zero biases, unit LayerNorms would hide a misnamed tensor)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def batch(seed: int = 1):
    """Two rows, the second padded after 7 tokens; two segments."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, T), generator=generator)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 7:] = 0
    segments = torch.zeros(2, T, dtype=torch.long)
    segments[:, 5:] = 1
    return ids, mask, segments


def hf_logits(out) -> list[torch.Tensor]:
    if hasattr(out, "prediction_logits"):  # BertForPreTraining
        return [out.prediction_logits, out.seq_relationship_logits]
    if hasattr(out, "last_hidden_state"):  # BertModel, ElectraModel: no head
        return [out.last_hidden_state] + ([out.pooler_output] if getattr(out, "pooler_output", None) is not None
                                          else [])
    return [out.logits]


def temper_logits(out) -> list[torch.Tensor]:
    if out.logits is None:
        return [out.hidden] + ([out.pooled] if out.pooled is not None else [])
    return [out.logits] + ([out.sentence_logits] if out.sentence_logits is not None else [])


def close(ours: list[torch.Tensor], theirs: list[torch.Tensor], mask: torch.Tensor) -> None:
    """Equal within fp32 reordering: sums over the hidden and intermediate widths and the keys."""
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        if a.dim() >= 2 and a.shape[:2] == mask.shape:  # token outputs: padding positions are not compared
            a, b = a[mask.bool()], b[mask.bool()]
        tol = reorder_tol(float(b.abs().max()), SIZES["hidden_size"], SIZES["intermediate_size"], T)
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    cache = {}

    def make(arch: str):
        if arch not in cache:
            torch.manual_seed(0)
            model = perturbed(getattr(transformers, arch)(hf_config(arch))).eval()
            path = tmp_path_factory.mktemp(arch)
            model.save_pretrained(path, safe_serialization=True)
            cache[arch] = (path, model)
        return cache[arch]

    return make


@pytest.mark.parametrize("arch", list(HEADS))
def test_logits_equal_transformers_both_ways(arch, hf_dirs, tmp_path):
    path, hf = hf_dirs(arch)
    model = load_model(path).eval()
    assert model.config.family == "bert" and model.config.hf_architecture == arch
    ids, mask, segments = batch()
    with torch.no_grad():
        theirs = hf_logits(hf(input_ids=ids, attention_mask=mask, token_type_ids=segments))
        ours = temper_logits(model(ids, attention_mask=mask, token_type_ids=segments))
    close(ours, theirs, mask)

    save_model(model, tmp_path)  # temper -> transformers
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    back, info = getattr(transformers, arch).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        again = hf_logits(back.eval()(input_ids=ids, attention_mask=mask, token_type_ids=segments))
    close(ours, again, mask)


def test_padding_is_masked_in_both_directions(hf_dirs):
    model = load_model(hf_dirs("BertForMaskedLM")[0]).eval()
    ids, mask, segments = batch()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, token_type_ids=segments).hidden[1, :7]
        alone = model(ids[1:, :7], token_type_ids=segments[1:, :7]).hidden[0]
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % VOCAB
        first = model(ids[:1]).hidden[0, 0]
        first_changed = model(changed[:1]).hidden[0, 0]
    tol = reorder_tol(float(alone.abs().max()), SIZES["hidden_size"], SIZES["intermediate_size"], T)
    torch.testing.assert_close(padded, alone, rtol=0, atol=tol)  # padding keys are invisible
    assert (first - first_changed).abs().max() > 100 * tol  # the last token reaches the first: bidirectional


def test_selected_positions_give_the_same_token_logits(hf_dirs):
    model = load_model(hf_dirs("BertForPreTraining")[0]).eval()
    ids, mask, segments = batch()
    selected = torch.zeros_like(mask, dtype=torch.bool)
    selected[0, [1, 4]] = selected[1, 6] = True
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, token_type_ids=segments)
        some = model(ids, attention_mask=mask, token_type_ids=segments, selected=selected)
    assert some.logits.shape == (3, VOCAB)
    expected = whole.logits[selected]  # a matmul over 3 rows may block its sums unlike one over 24
    tol = reorder_tol(float(expected.abs().max()), SIZES["hidden_size"], SIZES["hidden_size"])
    torch.testing.assert_close(some.logits, expected, rtol=0, atol=tol)
    torch.testing.assert_close(some.sentence_logits, whole.sentence_logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(HEADS))
def test_planner_counts_every_head_exactly(arch):
    config = with_head(preset("bert-tiny" if arch.startswith("Bert") else "electra-tiny"), arch, num_labels=5)
    if arch.startswith("Electra"):
        config = config.replace(embedding_size=32)
    model = build_model(config, device="meta")
    assert memory.parameter_counts(config).total == model.num_parameters()
    assert memory.training_memory(config, memory.Plan(seq_len=128)).peak > 0
    attention = engine.flops_per_token(model, 128) - engine.flops_per_token(model, 64)
    assert attention == 12 * config.num_layers * config.hidden_size * 64  # bidirectional: PaLM's term, unhalved


def test_real_shapes_count_like_transformers():
    for name, hf in (("bert-base", transformers.BertConfig()),
                     ("electra-small", transformers.ElectraConfig(hidden_size=256, intermediate_size=1024,
                                                                  num_attention_heads=4))):
        ours = preset(name)
        arch = ours.hf_architecture
        with torch.device("meta"):
            theirs = getattr(transformers, arch)(hf)
        unique = {id(p): p.numel() for p in theirs.parameters()}
        assert build_model(ours, device="meta").num_parameters() == sum(unique.values()), name


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = preset("bert-tiny", vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0)
    plain = build_model(config)
    checkpointed = build_model(config)
    checkpointed.load_state_dict(plain.state_dict())
    assert engine.apply_activation_checkpointing(checkpointed) == config.num_layers
    ids, mask, segments = batch()
    for model in (plain, checkpointed):
        model(ids, attention_mask=mask, token_type_ids=segments).logits.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_dropout_is_on_in_training_only():
    torch.manual_seed(0)
    model = build_model(preset("bert-tiny", vocab_size=VOCAB))
    ids = torch.randint(0, VOCAB, (2, T))
    model.train()
    assert not torch.equal(model(ids).hidden, model(ids).hidden)  # two dropout masks (SimCSE relies on it)
    model.eval()
    assert torch.equal(model(ids).hidden, model(ids).hidden)


def test_an_encoder_does_not_generate(tmp_path, tiny_tokenizer, capsys):
    model = build_model(preset("bert-tiny", vocab_size=tiny_tokenizer.vocab_size)).eval()
    with pytest.raises(TemperError, match=r"is an encoder: .* does not generate"):
        generate(model, [[1, 2]], SamplingConfig(max_new_tokens=2))
    save_model(model, tmp_path, tokenizer=tiny_tokenizer)
    assert not (tmp_path / "generation_config.json").exists()
    assert main(["generate", f"model={tmp_path}", "prompt=The river"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BERT, ELECTRA model (BertForMaskedLM) is an encoder" in err[0]


def test_decoders_refuse_dropout():
    with pytest.raises(TemperError, match="llama family's model has no dropout"):
        build_model(preset("llama-tiny", dropout=0.1))


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_act", "relu", "hidden_act 'relu' is not supported"),
    ("position_embedding_type", "relative_key", "position_embedding_type 'relative_key' is not supported"),
    ("type_vocab_size", 0, "type_vocab_size is 0"),
    ("is_decoder", True, "is_decoder"),
    ("num_hidden_layers", "two", "num_hidden_layers is 'two'"),
])
def test_bad_config_is_one_line_naming_the_file_and_key(hf_dirs, tmp_path, key, value, expected):
    source = hf_dirs("BertForMaskedLM")[0]
    config = json.loads((source / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    with pytest.raises(TemperError, match=rf"{tmp_path / 'config.json'}: .*{expected}") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)


def test_a_head_missing_from_the_weights_is_named(hf_dirs, tmp_path):
    source = hf_dirs("BertForMaskedLM")[0]
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["BertForPreTraining"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    with pytest.raises(TemperError, match=r"tensor 'bert.pooler.dense.weight' \(and 3 more\) missing"):
        load_model(tmp_path)


def test_lora_adapter_on_an_encoder_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from temper.config import PeftConfig
    from temper.peft import apply_peft, save_peft

    torch.manual_seed(0)
    config = preset("bert-tiny", vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0)
    model = build_model(config).eval()
    save_model(model, tmp_path / "base")
    lora = PeftConfig(method="lora", target_modules=["query", "value"], r=4)
    apply_peft(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero: an untrained adapter would change nothing
    save_peft(model, tmp_path / "adapter", lora, base_model=str(tmp_path / "base"))
    hf = peft.PeftModel.from_pretrained(transformers.BertForMaskedLM.from_pretrained(tmp_path / "base"),
                                        tmp_path / "adapter").eval()
    ids, mask, segments = batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=segments).logits
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=segments).logits
    close([ours], [theirs], mask)


def test_causal_lm_recipes_refuse_an_encoder_before_preparing_data(tmp_path, capsys):
    assert main(["pretrain", "model=bert-tiny", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model=bert-tiny is a BERT, ELECTRA encoder" in err[0]
    assert not (tmp_path / "run").exists()
