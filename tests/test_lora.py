"""LoRA / DoRA: the math, target selection, trainable share, PEFT parity both ways, merging,
several adapters and adapter/base mismatches."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import assert_reorder_close, decoder_lengths
from torch import nn

from temper.config import PeftConfig
from temper.errors import TemperError
from temper.models import build_model, load_model, preset
from temper.peft.io import load_adapter, save_adapter
from temper.peft.lora import (
    LoRALinear,
    adapter_names,
    disable_adapters,
    inject_lora,
    lora_modules,
    mark_trainable,
    merge_lora,
    set_adapter,
)


def assert_logits_close(actual, expected, model, rank: int = 4) -> None:
    """temper vs PEFT, merged vs unmerged: the same maths in another order, through the decoder's
    reductions and the adapter's over its rank (W x + B (A x) or (W + B A) x)."""
    assert_reorder_close(actual, expected, decoder_lengths(model, actual.shape[1]) + (rank,))


def lora_cfg(**kw) -> PeftConfig:
    return PeftConfig(**{"method": "lora", "r": 4, "alpha": 8.0, **kw})


def randomise(model: nn.Module, seed: int = 1, adapter: str | None = None) -> None:
    """Random A, B (B nonzero) and DoRA magnitudes, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            names = [adapter] if adapter else list(m.lora_A)
            for n in names:
                for p in (m.lora_A[n].weight, m.lora_B[n].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                if n in m.lora_magnitude:
                    p = m.lora_magnitude[n]
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def ids(vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset("llama-tiny", vocab_size=128))


# ----------------------------------------------------------------------------- the math


def test_lora_math_and_scaling():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x = torch.randn(3, 5, 16)
    m = LoRALinear(base)
    m.add_adapter("default", 4, 8.0)
    m.active = "default"
    torch.testing.assert_close(m(x), base(x), atol=0, rtol=0)  # B = 0 at init
    with torch.no_grad():
        m.lora_B["default"].weight.normal_()
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
    # x @ W, x @ A, @ B over 16, 16 and 4; the scaling and the sum round once each
    assert_reorder_close(m(x), base(x) + (8.0 / 4) * x @ A.T @ B.T, (16, 16, 4, 1, 1))
    m.add_adapter("rs", 4, 8.0, rslora=True)
    assert m.scaling["rs"] == pytest.approx(8.0 / math.sqrt(4))


def test_lora_gradients_match_the_formula():
    """The low-rank path (x A^T first, the scale and the base output folded into one addmm) has the
    gradients of base(x) + s x A^T B^T for x, A and B; the frozen base weight gets none. Under bf16
    autocast the output is bf16 and within bf16 rounding of the same formula."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12).requires_grad_(False)
    m = LoRALinear(base)
    m.add_adapter("default", 4, 6.0)
    m.active = "default"
    with torch.no_grad():
        m.lora_B["default"].weight.normal_()
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 12)
    got = torch.autograd.grad((m(x) * g).sum(), (x, A, B))
    want = torch.autograd.grad(((base(x) + 1.5 * (x @ A.T @ B.T)) * g).sum(), (x, A, B))
    for a, b in zip(got, want):  # sums over in 16, out 12, rank 4 and the 15 tokens
        assert_reorder_close(a, b, (16, 12, 4, 15))
    assert base.weight.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out, ref = m(x), base(x) + 1.5 * (x @ A.T @ B.T)
    assert out.dtype == torch.bfloat16
    # each bf16 rounding (inputs, products, the sum) is up to 2^-8 relative; a handful of them
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=8 * 2 ** -8 * float(ref.abs().max()))


def test_dora_math_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    m = LoRALinear(base)
    m.add_adapter("d", 4, 8.0, dora=True)
    m.active = "d"
    x = torch.randn(3, 16)
    torch.testing.assert_close(m.lora_magnitude["d"], base.weight.norm(dim=1))
    # x W^T over 16; k = m / ||W + s B A|| (a norm over 16, a division); W x + (k - 1) (W x - b): 3 roundings
    dora = (16, 16) + (1,) * 4
    assert_reorder_close(m(x), base(x), dora)
    with torch.no_grad():
        m.lora_B["d"].weight.normal_()
        m.lora_magnitude["d"].mul_(1.5)
    w = base.weight + 2.0 * m.lora_B["d"].weight @ m.lora_A["d"].weight
    w = m.lora_magnitude["d"][:, None] * w / w.norm(dim=1, keepdim=True)
    assert_reorder_close(m(x), x @ w.T + base.bias, dora + (16, 4, 1))  # and + k s B (A x): over 16, 4


# ----------------------------------------------------------------------------- targets


def test_target_modules_names_all_linear_and_regex():
    model = tiny_llama()
    names = inject_lora(model, lora_cfg(target_modules=["q_proj", "v_proj"]))
    assert names and all(n.endswith(("attn.q_proj", "attn.v_proj")) for n in names)
    assert len(names) == 2 * model.config.num_layers
    model = tiny_llama()
    names = inject_lora(model, lora_cfg(target_modules=["all-linear"]))
    assert len(names) == 7 * model.config.num_layers and "lm_head" not in names
    model = tiny_llama()
    assert inject_lora(model, lora_cfg(target_modules=["re:layers\\.0\\.mlp\\.(up|down)_proj"])) == [
        "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]


def test_target_errors():
    model = tiny_llama()
    with pytest.raises(TemperError, match=r"'q_porj' matches no module; linear modules here: q_proj, k_proj, "
                                          r"v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"):
        inject_lora(model, lora_cfg(target_modules=["q_porj"]))
    with pytest.raises(TemperError, match="matches no module"):
        inject_lora(model, lora_cfg(target_modules=["re:nothing.*"]))
    with pytest.raises(TemperError, match=r"r=0 .*layers\.0\.attn\.q_proj"):
        inject_lora(model, lora_cfg(r=0))
    with pytest.raises(TemperError, match=r"r=1000 .*q_proj of shape"):
        inject_lora(model, lora_cfg(r=1000))
    with pytest.raises(TemperError, match="modules_to_save entry 'lm_haed'"):
        inject_lora(model, lora_cfg(modules_to_save=["lm_haed"]))
    assert not list(lora_modules(model))  # nothing was wrapped by the failed calls


def test_trainable_share():
    model = tiny_llama()
    c = model.config
    inject_lora(model, lora_cfg(r=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = mark_trainable(model)
    q_out, v_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    assert trainable == c.num_layers * 8 * ((c.hidden_size + q_out) + (c.hidden_size + v_out))
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    assert not model.embed_tokens.weight.requires_grad and not model.layers[0].attn.q_proj.base.weight.requires_grad
    # modules_to_save are trained in full
    model = tiny_llama()
    inject_lora(model, lora_cfg(modules_to_save=["lm_head"]))
    trainable2, _ = mark_trainable(model)
    assert model.lm_head.weight.requires_grad
    assert trainable2 == model.lm_head.weight.numel() + sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------- PEFT parity


def _hf_and_temper(hf_model_dir, kind):
    path, _ = hf_model_dir(kind)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return path, hf, load_model(path).eval()


@pytest.mark.parametrize("kind,targets,method", [
    ("llama", ["q_proj", "v_proj"], "lora"),
    ("llama", ["all-linear"], "lora"),
    ("llama", ["re:layers\\.1\\.(attn\\.k_proj|mlp\\.gate_proj)"], "lora"),
    ("qwen2", ["q_proj", "v_proj", "down_proj"], "lora"),
    ("gpt2", ["c_attn"], "lora"),
    ("gpt2", ["c_attn", "c_proj", "c_fc"], "dora"),
    ("llama", ["q_proj", "v_proj", "o_proj"], "dora"),
])
def test_peft_loads_what_temper_saves(hf_model_dir, tmp_path, kind, targets, method):
    peft = pytest.importorskip("peft")
    path, hf, model = _hf_and_temper(hf_model_dir, kind)
    cfg = lora_cfg(target_modules=targets, method=method, rslora=kind == "qwen2")
    inject_lora(model, cfg)
    randomise(model)
    x = ids()
    with torch.no_grad():
        ours = model(x)
        base = hf(x).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    save_adapter(model, tmp_path, cfg, base_model_name_or_path=str(path))
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["use_dora"] == (method == "dora") and conf["fan_in_fan_out"] == (kind == "gpt2")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        assert_logits_close(peft_model(x).logits, ours, model)


def test_peft_modules_to_save_with_tied_embeddings(hf_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    path, hf, model = _hf_and_temper(hf_model_dir, "qwen2")  # tied embeddings
    cfg = lora_cfg(modules_to_save=["lm_head"])
    inject_lora(model, cfg)
    randomise(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # trains the shared embedding too
    save_adapter(model, tmp_path, cfg, base_model_name_or_path=str(path))
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["modules_to_save"] == ["lm_head", "embed_tokens"]
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    x = ids()
    with torch.no_grad():
        assert_logits_close(peft_model(x).logits, model(x), model)


@pytest.mark.parametrize("kind,targets,dora,to_save", [
    ("llama", ["q_proj", "v_proj"], False, None),
    ("llama", ["k_proj", "up_proj"], True, ["lm_head"]),
    ("qwen2", ["o_proj"], False, ["lm_head"]),  # tied: PEFT trains lm_head apart from the embedding
    ("gpt2", ["c_attn", "c_fc"], True, None),
])
def test_temper_loads_what_peft_saves(hf_model_dir, tmp_path, kind, targets, dora, to_save):
    peft = pytest.importorskip("peft")
    path, hf, model = _hf_and_temper(hf_model_dir, kind)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=dora,
                                                 modules_to_save=to_save))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path)
    pm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_adapter(model, tmp_path)
    assert cfg.r == 4 and cfg.alpha == 16 and cfg.method == ("dora" if dora else "lora")
    model.eval()
    x = ids()
    with torch.no_grad():
        assert_logits_close(model(x), pm(x).logits, model)
    # and back out again: what temper re-saves, PEFT reads to the same logits
    save_adapter(model, tmp_path / "again", cfg, base_model_name_or_path=str(path))
    import transformers

    hf2 = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    again = peft.PeftModel.from_pretrained(hf2, tmp_path / "again").eval()
    with torch.no_grad():
        assert_logits_close(again(x).logits, model(x), model)


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_matches_unmerged(method):
    model = tiny_llama().eval()
    inject_lora(model, lora_cfg(method=method, target_modules=["all-linear"]))
    randomise(model)
    x = ids()
    with torch.no_grad():
        before = model(x)
        merged = merge_lora(model)
        assert not list(lora_modules(merged))
        assert isinstance(merged.layers[0].attn.q_proj, nn.Linear)
        assert_logits_close(merged(x), before, model)


class Fake4bit(nn.Module):
    """Stands in for a 4-bit layer: a weight reachable only through dequantize()."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", linear.weight.detach().clone())
        self.bias = linear.bias

    def dequantize(self) -> torch.Tensor:
        return self.packed

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(), self.bias)


@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_quantised_base_inject_and_merge(method):
    model = tiny_llama().eval()
    for block in model.layers:
        block.attn.q_proj = Fake4bit(block.attn.q_proj)
        block.attn.v_proj = Fake4bit(block.attn.v_proj)
    inject_lora(model, lora_cfg(method=method))
    randomise(model)
    assert mark_trainable(model)[0] > 0
    x = ids()
    with torch.no_grad():
        before = model(x)
        with pytest.warns(UserWarning, match="dequantised"):
            merge_lora(model)
        assert isinstance(model.layers[1].attn.v_proj, nn.Linear)
        assert_logits_close(model(x), before, model)


def tiny_llama_like(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset("llama-tiny", vocab_size=128, tie_embeddings=tied))


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("tied", [True, False])
def test_lora_on_lm_head_scores_as_its_merged_model(method, tied):
    """The fused loss and the chunked log-probs take the output layer's weight, not the module: with
    LoRA on lm_head they take its effective weight (W + s B A, DoRA's rescaled), so the log-probs
    are the adapted model's (its forward and its merged copy), the gradients are those of the
    unfused logits, and with the adapter disabled they are the base's. Merging a tied lm_head
    unties it. (`output_weight` used to read `lm_head.weight`: an AttributeError.)"""
    import contextlib
    import copy

    import torch.nn.functional as F

    from temper.losses import IGNORE_INDEX, causal_lm_loss
    from temper.losses.logprobs import causal_lm_token_logprobs

    model = tiny_llama_like(tied)
    inject_lora(model, lora_cfg(method=method, target_modules=["lm_head", "q_proj"]))
    randomise(model)
    mark_trainable(model)
    x, targets = ids(), ids(seed=1)
    targets[0, :4] = IGNORE_INDEX
    scored = targets != IGNORE_INDEX

    def reference(m):  # from the full logits of the forward
        logps = F.log_softmax(m(x).float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return logps * scored

    lengths = decoder_lengths(model, x.shape[1]) + (4,)  # the forward's sums, and the adapter's rank
    with torch.no_grad():
        ours = causal_lm_token_logprobs(model, x, targets)
        assert_reorder_close(ours, reference(model), lengths)
        assert (ours - reference(tiny_llama_like(tied))).abs().max() > 1e-2  # the adapter matters here
        with pytest.warns(UserWarning, match="unties it") if tied else contextlib.nullcontext():
            merged = merge_lora(copy.deepcopy(model))
        assert merged.config.tie_embeddings is False and merged.lm_head.weight is not merged.input_embeddings.weight
        assert_reorder_close(causal_lm_token_logprobs(merged, x, targets), ours, lengths)
        with disable_adapters(model):
            assert_reorder_close(causal_lm_token_logprobs(model, x, targets), reference(tiny_llama_like(tied)),
                                 lengths)

    head = model.lm_head
    trained = [head.lora_A["default"].weight, head.lora_B["default"].weight, *head.lora_magnitude.values()]
    causal_lm_loss(model, x, targets)[0].backward()
    fused = [p.grad.clone() for p in trained]
    model.zero_grad()
    F.cross_entropy(model(x).flatten(0, 1), targets.flatten(), reduction="sum").backward()
    for a, b in zip(fused, [p.grad for p in trained]):  # a training step's sums, over the scored tokens too
        assert_reorder_close(a, b, decoder_lengths(model, x.shape[1], tokens=int(scored.sum())) + (4,))


def test_lora_dropout_on_lm_head_is_refused():
    from temper.peft import apply_peft

    with pytest.raises(TemperError, match=r"peft.dropout=0.1 cannot apply to lm_head.*peft.target_modules"):
        apply_peft(tiny_llama(), lora_cfg(target_modules=["lm_head"], dropout=0.1))
    apply_peft(tiny_llama(), lora_cfg(target_modules=["q_proj"], dropout=0.1))  # elsewhere it applies


# ----------------------------------------------------------------------------- several adapters


def test_multiple_adapters_and_disable():
    model = tiny_llama().eval()
    x = ids()
    with torch.no_grad():
        base = model(x)
    inject_lora(model, lora_cfg(), "a")
    inject_lora(model, lora_cfg(r=2, method="dora"), "b")
    randomise(model, 1, "a")
    randomise(model, 2, "b")
    assert adapter_names(model) == ["a", "b"]
    assert len({id(m) for _, m in lora_modules(model)}) == 2 * model.config.num_layers
    with torch.no_grad():
        out_a = model(x)  # the first adapter stays active
        set_adapter(model, "b")
        out_b = model(x)
        assert (out_a - out_b).abs().max() > 1e-3 and (out_a - base).abs().max() > 1e-3
        with disable_adapters(model):
            torch.testing.assert_close(model(x), base, atol=0, rtol=0)
        torch.testing.assert_close(model(x), out_b, atol=0, rtol=0)
        set_adapter(model, "a")
        torch.testing.assert_close(model(x), out_a, atol=0, rtol=0)
    mark_trainable(model)
    q = model.layers[0].attn.q_proj
    assert q.lora_A["a"].weight.requires_grad and not q.lora_A["b"].weight.requires_grad
    with pytest.raises(TemperError, match="no adapter named 'c'"):
        set_adapter(model, "c")
    with pytest.raises(TemperError, match="already injected"):
        inject_lora(model, lora_cfg(), "a")


def test_dora_gradients_reach_magnitude_and_lora():
    model = tiny_llama().train()
    inject_lora(model, lora_cfg(method="dora", dropout=0.1))
    randomise(model)
    mark_trainable(model)
    model(ids()).float().pow(2).mean().backward()
    q = model.layers[0].attn.q_proj
    assert q.lora_magnitude["default"].grad is not None and q.lora_A["default"].weight.grad is not None
    assert q.base.weight.grad is None


# ----------------------------------------------------------------------------- mismatches


def test_adapter_base_mismatch_errors(hf_model_dir, tmp_path):
    import transformers

    from tests.conftest import hf_tiny_config

    peft = pytest.importorskip("peft")
    path, _, model = _hf_and_temper(hf_model_dir, "llama")
    big_cfg = hf_tiny_config("llama")
    big_cfg.hidden_size, big_cfg.num_hidden_layers = 64, 6
    big = transformers.AutoModelForCausalLM.from_config(big_cfg)
    peft.get_peft_model(big, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "big")
    with pytest.raises(TemperError, match=r"targets model\.layers\.\d\.self_attn\.q_proj, which this model does not"):
        load_adapter(model, tmp_path / "big")
    conf = json.loads((tmp_path / "big" / "adapter_config.json").read_text())
    big_cfg.num_hidden_layers = 2
    big = transformers.AutoModelForCausalLM.from_config(big_cfg)
    peft.get_peft_model(big, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "wide")
    with pytest.raises(TemperError, match=r"lora_A\.weight' has shape \(4, 64\), but this model needs \(4, 32\)"):
        load_adapter(model, tmp_path / "wide")
    assert not list(lora_modules(model))  # a failed load leaves the model untouched
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text(json.dumps(conf))
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(TemperError, match="adapter_model.bin is a pickle; temper reads safetensors only"):
        load_adapter(model, tmp_path / "pickle")


def test_half_precision_base_gets_fp32_adapters():
    model = tiny_llama().to(torch.bfloat16).eval()
    inject_lora(model, lora_cfg(method="dora"))
    randomise(model)
    q = model.layers[0].attn.q_proj
    assert q.lora_A["default"].weight.dtype == torch.float32 and q.lora_magnitude["default"].dtype == torch.float32
    x = ids()
    with torch.no_grad():
        out = model(x)
        assert out.dtype == torch.bfloat16
        merge_lora(model)
        assert model.layers[0].attn.q_proj.weight.dtype == torch.bfloat16
        torch.testing.assert_close(model(x), out, atol=0.1, rtol=0.05)


def test_real_nf4_base_when_available():
    nf4 = pytest.importorskip("temper.quant.nf4")
    model = tiny_llama().eval()
    for block in model.layers:
        block.attn.q_proj = nf4.Linear4bit.from_linear(block.attn.q_proj)
    inject_lora(model, lora_cfg(method="dora", target_modules=["q_proj"]))
    randomise(model)
    x = ids()
    with torch.no_grad():
        before = model(x)
        with pytest.warns(UserWarning, match="dequantised"):
            merge_lora(model)
        assert_logits_close(model(x), before, model)


def test_lora_share_on_a_real_shape_counted_on_meta():
    """LoRA r=8 on q,v of Llama-3-8B: 32 x 8 x ((4096+4096) + (4096+1024)) = 3,407,872 = 0.042%."""
    from temper.config import PeftConfig
    from temper.models import build_model, preset
    from temper.peft.lora import inject_lora, mark_trainable

    model = build_model(preset("llama-3-8b"), device="meta")
    inject_lora(model, PeftConfig(method="lora", r=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = mark_trainable(model)
    assert trainable == 32 * 8 * ((4096 + 4096) + (4096 + 1024)) == 3_407_872
    assert 0.0004 < trainable / total < 0.0005
