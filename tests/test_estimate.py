"""The memory planner (`temper estimate`, temper/train/memory.py): bytes per parameter by hand,
sharding, weights and KV caches against temper's own tensors, activations against what autograd
really saves, Chinchilla arithmetic, and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from temper.cli import main
from temper.config import PeftConfig
from temper.models import build_model, preset
from temper.models.registry import PRESETS
from temper.train import memory
from temper.train.memory import SHAPES, Plan, parameter_counts, training_memory


def model_states(shape, **plan):
    result = training_memory(shape, Plan(**plan))
    return result.weights, result.gradients, result.optimizer


# ----------------------------------------------------------------------------- bytes per parameter


def test_mixed_precision_adamw_is_16_bytes_per_parameter():
    """ZeRO's accounting: 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master, m, v)."""
    shape = SHAPES["llama2-7b"]
    n = parameter_counts(shape).total
    buffers = 2 * memory.buffer_elements(shape)  # the rotary tables, in bf16
    weights, grads, states = model_states(shape, dtype="bf16", mixed_precision=True)
    assert (weights - buffers, grads, states) == (2 * n, 2 * n, 12 * n)
    assert (weights - buffers + grads + states) / n == 16


@pytest.mark.parametrize("dtype, mixed, optimizer, expected", [
    ("fp32", False, "adamw", (4, 4, 8)),  # temper on CPU
    ("bf16", False, "adamw", (2, 2, 4)),  # pure bf16: m and v in bf16 too
    ("bf16", True, "sgd", (2, 2, 8)),  # momentum (4) + master (4)
    ("bf16", True, "adamw8bit", (2, 2, 4 + 2 * (1 + 4 / 2048))),
])
def test_bytes_per_parameter_by_optimizer(dtype, mixed, optimizer, expected):
    shape = PRESETS["gpt2"]  # no buffers: the weights are the parameters
    n = parameter_counts(shape).total
    weights, grads, states = model_states(shape, dtype=dtype, mixed_precision=mixed, optimizer=optimizer)
    assert (weights, grads) == (expected[0] * n, expected[1] * n)
    assert states == int(expected[2] * n)


def test_zero_stages_divide_states_gradients_weights_by_dp_exactly():
    shape = SHAPES["llama3.1-8b"]
    assert parameter_counts(shape).total % 8 == 0 and memory.buffer_elements(shape) % 8 == 0
    w0, g0, s0 = model_states(shape, zero=0, dp=8)
    assert model_states(shape, zero=1, dp=8) == (w0, g0, s0 // 8)
    assert model_states(shape, zero=2, dp=8) == (w0, g0 // 8, s0 // 8)
    assert model_states(shape, zero=3, dp=8) == (w0 // 8, g0 // 8, s0 // 8)
    assert model_states(shape, zero=3, dp=1) == (w0, g0, s0)


def test_strategies_map_to_zero_stages():
    from temper.stages.estimate import Config, plan_from

    shape = SHAPES["llama2-7b"]
    assert plan_from(Config(model="7b", strategy="fsdp", dp=8), shape).zero == 3
    assert plan_from(Config(model="7b", strategy="fsdp", reshard_after_forward=False, dp=8), shape).zero == 2
    assert plan_from(Config(model="7b", strategy="ddp", dp=8), shape).zero == 0


def test_lora_trains_only_the_adapters():
    """Gradients and AdamW states for the adapters only, counted as temper's apply_peft counts them."""
    from temper.peft import apply_peft

    shape = preset("llama-tiny")
    model = build_model(shape)
    info = apply_peft(model, PeftConfig(method="lora", r=8, target_modules=["all-linear"]))
    # per layer: r x (in + out) for q (64, 64), k and v (64, 32), o (64, 64), gate and up (64, 128), down (128, 64)
    per_layer = 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert memory.lora_parameters(shape, 8, ["all-linear"]) == 2 * per_layer == info["trainable"]
    result = training_memory(shape, Plan(method="lora", dtype="bf16", lora_r=8))
    assert (result.gradients, result.optimizer) == (4 * info["trainable"], 8 * info["trainable"])
    model = build_model(shape)
    info = apply_peft(model, PeftConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]))
    assert memory.lora_parameters(shape, 4, ["q_proj", "v_proj"]) == info["trainable"]


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_weights_are_the_bytes_of_temper_quantised_model(double_quant):
    from temper.peft import apply_peft
    from temper.quant.nf4 import base_weight_bytes

    for name in ("llama-tiny", "gpt2-tiny"):
        shape = preset(name)
        model = build_model(shape, dtype="fp32")
        apply_peft(model, PeftConfig(method="qlora", r=4, target_modules=["all-linear"], double_quant=double_quant))
        plan = Plan(method="qlora", dtype="fp32", lora_r=4, double_quant=double_quant)
        assert memory.weight_bytes(shape, plan)[0] == base_weight_bytes(model), name


@pytest.mark.parametrize("shape, block, double_quant", [
    ((4096, 4096), 64, True), ((33, 7), 64, True), ((300, 301), 64, True), ((300, 301), 32, False), ((1, 70000), 64, True),
])
def test_nf4_bytes_match_quantize_nf4_storage(shape, block, double_quant):
    from temper.quant.nf4 import bits_per_parameter, quantize_nf4

    state = quantize_nf4(torch.randn(shape), block, double_quant)
    assert memory.nf4_bytes(state.numel, block, double_quant) == state.nbytes()
    if shape == (4096, 4096):  # ~0.5 byte per parameter: 4.127 bits
        assert memory.nf4_bytes(4096 * 4096) / 4096**2 == pytest.approx(bits_per_parameter(64, True) / 8, rel=1e-6)


# ----------------------------------------------------------------------------- against temper's own tensors


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "llama-14m", "qwen2-0.5b", "gpt2", "llama-3.2-1b",
                                  "llama3.1-8b", "llama2-70b"])
def test_weights_are_the_bytes_of_the_built_model(name):
    shape = SHAPES.get(name) or preset(name)
    model = build_model(shape, device="meta", dtype="bf16")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert parameter_counts(shape).total == model.num_parameters()
    assert memory.weight_bytes(shape, Plan(dtype="bf16"))[0] == params + buffers


@pytest.mark.parametrize("name, dtype", [("llama-tiny", "fp32"), ("llama-tiny", "bf16"), ("gpt2-tiny", "fp32")])
def test_kv_cache_is_the_bytes_of_new_cache(name, dtype):
    shape = preset(name)
    model = build_model(shape, dtype=dtype)
    cache = model.new_cache(3, 50)
    actual = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])
    assert memory.kv_cache_bytes(shape, 3, 50, memory.DTYPE_BYTES[dtype]) == actual


def saved_activation_bytes(model, ids, mask=None) -> int:
    """Bytes of the distinct storages autograd saves in one forward pass and the loss (weights excluded)."""
    from temper.losses import causal_lm_loss

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, ids, ids.roll(-1, 1), mask=mask)
    return sum(seen.values())


@pytest.mark.parametrize("name, dtype, method, targets", [
    ("llama-tiny", "fp32", "full", None),
    ("llama-tiny", "fp32", "packed", None),  # SFT packing: SDPA keeps an additive copy of the mask per layer
    ("llama-tiny", "bf16", "packed", None),
    ("llama-tiny", "bf16", "full", None),
    ("gpt2-tiny", "fp32", "full", None),
    ("gpt2-tiny", "bf16", "full", None),
    ("llama-tiny", "fp32", "lora", ["all-linear"]),
    ("llama-tiny", "bf16", "lora", ["all-linear"]),  # one fp32 copy of the input per adapter
    ("llama-tiny", "fp32", "lora", ["q_proj", "v_proj"]),
    ("llama-tiny", "fp32", "qlora", ["all-linear"]),
    ("gpt2-tiny", "fp32", "lora", ["c_attn", "c_fc"]),
])
def test_activations_are_what_autograd_saves(name, dtype, method, targets):
    from temper.peft import apply_peft

    torch.manual_seed(0)
    shape = preset(name, num_layers=3)
    model = build_model(shape, dtype="fp32")
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    packing = method == "packed"
    if method not in ("full", "packed"):
        apply_peft(model, PeftConfig(method=method, r=4, target_modules=targets))
    batch, seq = 2, 48
    mask = None
    if packing:
        from temper.models.common import build_attention_mask

        segments = torch.tensor([[0] * 20 + [1] * 28, [0] * 48])
        mask = build_attention_mask(None, seq, seq, segment_ids=segments)
    measured = saved_activation_bytes(model, torch.randint(0, shape.vocab_size, (batch, seq)), mask)
    if packing:
        measured += mask.numel()  # the boolean mask, alive beside them
    plan = Plan(method="full" if packing else method, dtype=dtype, micro_batch=batch, seq_len=seq, lora_r=4,
                lora_targets=targets or ["all-linear"], packing=packing)
    acts = memory.activation_bytes(shape, plan)
    assert acts.again == 0
    assert acts.kept == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("dtype, dropout", [("fp32", 0.1), ("bf16", 0.1), ("fp32", 0.0)])
def test_bert_activations_are_what_autograd_saves(dtype, dropout):
    """A post-LayerNorm encoder (BERT) with its MLM loss at 15% of the tokens, a padding mask and
    token types, as the encoder recipe trains it: every saved tensor counted. Hidden dropout keeps
    its mask (on the CPU a noise tensor of the compute dtype, so `dropout_mask=dt`; CUDA keeps
    bool masks); attention dropout stays off here: the CPU's SDPA falls back to the math kernel
    with it, keeping seq x seq matrices that the fused GPU kernel does not."""
    import math

    from temper.losses.encoder import masked_lm_loss
    from temper.models.bert import with_head

    torch.manual_seed(0)
    shape = with_head(preset("bert-tiny", vocab_size=500, num_layers=3, dropout=dropout, attention_dropout=0.0),
                      "BertForMaskedLM")
    model = build_model(shape, dtype="fp32").train()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    batch, seq = 2, 48
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, shape.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 40:] = 0
    types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    selected = torch.zeros(batch * seq, dtype=torch.bool)
    selected[torch.randperm(batch * seq, generator=g)[:math.ceil(memory.MLM_SHARE * batch * seq)]] = True
    selected = selected.view(batch, seq)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, attention_mask=mask, token_type_ids=types, selected=selected)
        masked_lm_loss(out.logits, ids[selected])
    dt = memory.DTYPE_BYTES[dtype]
    acts = memory.activation_bytes(shape, Plan(dtype=dtype, micro_batch=batch, seq_len=seq), dropout_mask=dt)
    assert acts.again == 0
    assert acts.kept == pytest.approx(sum(seen.values()), rel=0.01)
    if dropout:  # the masks are a real share: the formula without them would miss
        without = memory.activation_bytes(shape.replace(dropout=0.0), Plan(dtype=dtype, micro_batch=batch,
                                                                            seq_len=seq), dropout_mask=dt)
        assert without.kept < 0.9 * sum(seen.values())


def test_an_encoder_plans_one_forward_pass_not_a_kv_cache(capsys):
    """`temper estimate` of a BERT: inference=true is weights + one forward pass's working set
    (no KV cache line, no KV bytes); a decoder keeps its KV cache."""
    plan = Plan(inference=True, batch=8, context=512)
    bert = memory.inference_memory(preset("bert-base"), plan)
    assert bert.kv_cache == 0 and bert.peak == bert.weights + bert.temporaries
    assert memory.inference_memory(preset("llama-14m"), Plan(inference=True, batch=8, context=512)).kv_cache > 0
    assert main(["estimate", "model=bert-base", "inference=true", "batch=8", "context=512"]) == 0
    printed = capsys.readouterr().out
    assert "KV" not in printed.replace("no KV cache", "") and "one forward pass" in printed
    assert main(["estimate", "model=bert-base", "seq_len=512", "micro_batch=8"]) == 0
    printed = capsys.readouterr().out
    assert "KV" not in printed.replace("no KV cache", "") and "MLM cross-entropy" in printed
    assert main(["estimate", "model=bert-base", "inference=true", "format=json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["encoder"] and "kv_cache_per_token" not in report
    assert main(["estimate", "model=llama-14m", "inference=true"]) == 0
    assert "KV cache" in capsys.readouterr().out


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    shape = preset("llama-14m")
    plain = memory.activation_bytes(shape, Plan(dtype="fp32", micro_batch=4, seq_len=256))
    checkpointed = memory.activation_bytes(shape, Plan(dtype="fp32", micro_batch=4, seq_len=256,
                                                       activation_checkpointing="full"))
    tokens, layer = 4 * 256, memory.layer_activation_bytes(shape, 4, None) * 4 * 256
    outside = plain.kept - shape.num_layers * layer
    assert outside == plain.outside + plain.loss
    assert checkpointed.kept == shape.num_layers * 4 * shape.hidden_size * tokens + outside
    assert checkpointed.again == layer


# ----------------------------------------------------------------------------- model shapes


@pytest.mark.parametrize("count", [1e9, 7e9, 8e9, 13e9, 70e9, 175e9])
def test_a_bare_count_gets_a_llama_shape_of_that_size(count):
    shape = memory.scaled_llama(count)
    assert parameter_counts(shape).total == pytest.approx(count, rel=0.02)
    assert shape.hidden_size == 128 * shape.num_heads and shape.num_heads % shape.num_kv_heads == 0
    assert 2.0 < shape.intermediate_size / shape.hidden_size < 3.6  # Llama 2 uses 2.7, Llama 3 3.5


def test_published_shapes_have_their_published_sizes():
    sizes = {"llama2-7b": 6.738e9, "llama2-13b": 13.016e9, "llama2-70b": 68.977e9, "llama3.1-8b": 8.030e9,
             "llama3.1-70b": 70.554e9, "llama3.1-405b": 405.85e9}
    for name, size in sizes.items():
        assert parameter_counts(SHAPES[name]).total == pytest.approx(size, rel=1e-3), name


def test_model_spec_forms(tmp_path, tiny_model_dir):
    assert memory.parse_count("7b") == 7e9 and memory.parse_count("350M") == 3.5e8
    assert memory.parse_count("8e9") == 8e9 and memory.parse_count("llama-14m") is None
    shape, source = memory.resolve_model(str(tiny_model_dir))
    assert "config.json" in source and shape.vocab_size == 300
    assert memory.resolve_model("llama-14m", {"num_layers": 8})[0].num_layers == 8


# ----------------------------------------------------------------------------- compute


def test_chinchilla_arithmetic():
    assert memory.chinchilla_tokens(7e9) == 1.4e11  # 20 tokens per parameter
    assert memory.training_flops(7e9, 1.4e11) == 6 * 7e9 * 1.4e11 == 5.88e21
    seconds = memory.training_seconds(5.88e21, 8, 989.0, 0.4)
    assert seconds == pytest.approx(5.88e21 / (8 * 989e12 * 0.4))
    from temper.stages.estimate import Config, estimate

    report = estimate(Config(model="llama2-7b", dp=8, strategy="fsdp"))
    n = report["model"]["parameters"]
    assert report["compute"]["tokens"] == 20 * n and report["compute"]["flops"] == 6 * n * 20 * n
    assert report["compute"]["gpu_hours"] == pytest.approx(6 * n * 20 * n / (989e12 * 0.4) / 3600)


def test_the_course_examples():
    """7B full fine-tuning: 16 B/param = ~112 GB before activations; 70B: ~140 GB of bf16 weights for
    LoRA, ~35-40 GB of NF4 weights for QLoRA."""
    from temper.stages.estimate import Config, estimate

    full = estimate(Config(model="7b"))["per_device"]
    assert full["model_states"] == pytest.approx(112e9, rel=0.01)
    lora = estimate(Config(model="70b", method="lora"))["per_device"]
    assert lora["weights"] == pytest.approx(140e9, rel=0.01)
    qlora = estimate(Config(model="70b", method="qlora"))["per_device"]
    assert 35e9 < qlora["weights"] < 40e9


# ----------------------------------------------------------------------------- the command line


def test_cli_prints_the_table(capsys):
    assert main(["estimate", "model=llama-14m"]) == 0
    out = capsys.readouterr().out
    for part in ("per device", "weights", "gradients", "optimiser states", "activations", "temporaries",
                 "peak", "compute (Chinchilla)", "GPU-hours", "inference with the same weights"):
        assert part in out, part
    assert main(["estimate", "model=llama-14m", "inference=true", "batch=4", "context=512"]) == 0
    assert "KV cache" in capsys.readouterr().out


def test_cli_json(capsys):
    assert main(["estimate", "model=llama-14m", "format=json", "micro_batch=2", "seq_len=128", "dtype=fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    d = report["per_device"]
    assert d["peak"] == training_memory(preset("llama-14m"), Plan(dtype="fp32", mixed_precision=False, micro_batch=2,
                                                                  seq_len=128)).peak
    assert d["model_states"] == d["weights"] + d["gradients"] + d["optimizer"]


@pytest.mark.parametrize("args, key", [
    (["model=llama-15m"], "llama-15m"),
    (["model=llama-14m", "tp=4"], "tp=4"),
    (["model=llama-14m", "inference=true", "batch=-1"], "batch"),
    (["model=llama-14m", "micro_batch=0"], "micro_batch"),
    (["model=llama-14m", "dtype=fp32", "mixed_precision=true"], "mixed_precision"),
    (["model=llama-14m", "method=qlora", "mixed_precision=true"], "mixed_precision"),
    (["model=llama-14m", "reshard_after_forward=false"], "reshard_after_forward"),
    (["model=llama-14m", "lora_r=8"], "lora_r"),
    (["model=llama-14m", "inference=true", "micro_batch=4"], "micro_batch"),
    (["model=llama-14m", "context=512"], "context"),
    (["model=llama-14m", "zero=4"], "zero"),
    (["model=llama-14m", "strategy=fsdp", "zero=3"], "strategy=fsdp"),
    (["model=llama-14m", "activation_checkpointing=sometimes"], "activation_checkpointing"),
    (["model=llama-14m", "method=lora", "lora_targets=qkv"], "lora_targets"),
    (["model=llama-14m", "model_config.hiden_size=512"], "model_config.hiden_size"),
    (["model=llama-14m", "mfu=0"], "mfu"),
    ([], "model="),
])
def test_bad_input_is_one_line_naming_the_key(capsys, args, key):
    assert main(["estimate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("temper estimate: error: ") and key in err[0], err


def test_the_memory_page_is_current():
    """docs/memory.md is regenerated from its commands; an edit of the planner's output shows here."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "memory_examples.py"
    spec = importlib.util.spec_from_file_location("memory_examples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render_page() == (path.parent / "memory.md").read_text(encoding="utf-8"), \
        "docs/memory.md is stale: run python docs/memory_examples.py"


def test_compute_time_at_the_mfu_a_temper_run_measured(tmp_path, capsys):
    """mfu_from=RUN: the median MFU of the run's rows, against the run's peak_flops: time = 6ND /
    (devices x peak x MFU), computed here by hand."""
    import json

    from temper.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("device: cpu\nprecision: fp32\npeak_flops: 2.0e+12\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "val_loss": 3.0}, {"step": 1, "mfu": 0.5}, {"step": 2, "mfu": 0.7}, {"step": 3, "mfu": 0.6}]))
    assert main(["estimate", "model=llama-14m", "format=json", f"mfu_from={run}", "tokens=1e9"]) == 0
    compute = json.loads(capsys.readouterr().out)["compute"]
    assert compute["mfu"] == 0.6 and compute["peak_tflops"] == 2.0 and compute["measured"]["rows"] == 3
    assert compute["seconds"] == pytest.approx(6 * compute["parameters"] * 1e9 / (1 * 2e12 * 0.6))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert main(["estimate", "model=llama-14m", f"mfu_from={run}"]) == 2
    assert "logs no mfu" in capsys.readouterr().err


@pytest.mark.parametrize("args, key", [
    (["model=llama-14m", "model_config.num_layers=0"], "model_config.num_layers must be at least 1, got 0"),
    (["model=7b", "model_config.hidden_size=-4096"], "model_config.hidden_size must be at least 1, got -4096"),
    (["model=llama3.1-8b", "model_config.intermediate_size=-1"], "model_config.intermediate_size must be at least 1"),
    (["model=llama-14m", "model_config.vocab_size=0"], "model_config.vocab_size must be at least 1, got 0"),
    (["model=50t"], "50.00T parameters is too large for the scaled Llama-like shapes (at most ~30.86T"),
])
def test_shapes_that_cannot_be_are_refused_not_estimated(capsys, args, key):
    """Zero layers or negative widths once gave negative memory; a 50T count was called too small."""
    assert main(["estimate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
