"""temper export: GGUF for llama.cpp (read back with gguf's own reader and quants, and run by
llama.cpp itself where llama-cpp-python is installed) and safetensors with an adapter merged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FP32_EPS, SAMPLE_TEXT, decoder_lengths, reorder_tol
from test_bad_input import _lora_adapter, one_line_error

from temper.cli import main

gguf = pytest.importorskip("gguf")

# a model with more embeddings than the tokenizer has tokens: the GGUF vocabulary is padded
EXTRA_EMBEDDINGS = 12


@pytest.fixture(scope="module")
def chat_tokenizer():
    from temper.data.tokenizer import train_tokenizer

    return train_tokenizer(SAMPLE_TEXT.split("\n\n"), vocab_size=300, min_frequency=2)


def _model_dir(path: Path, tokenizer, **shape) -> Path:
    from temper.models import build_model, preset, save_model

    torch.manual_seed(0)
    config = preset("llama-tiny", vocab_size=tokenizer.vocab_size + EXTRA_EMBEDDINGS, **shape)
    model = build_model(config)
    with torch.no_grad():  # norms and biases away from their initial 1 and 0, so a mix-up shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    save_model(model, path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory, chat_tokenizer):
    """llama-tiny: 4 query heads over 2 key/value heads (GQA), tied embeddings."""
    return _model_dir(tmp_path_factory.mktemp("gqa"), chat_tokenizer)


@pytest.fixture(scope="module")
def untied_bias_dir(tmp_path_factory, chat_tokenizer):
    """Untied output layer and attention biases (q and k biases are permuted like their weights)."""
    return _model_dir(tmp_path_factory.mktemp("untied"), chat_tokenizer, tie_embeddings=False, qkv_bias=True,
                      attn_out_bias=True)


def _export(model_dir: Path, out: Path, tensor_type: str) -> Path:
    assert main(["export", f"model={model_dir}", f"tensor_type={tensor_type}", f"output_dir={out}"]) == 0
    path = out / f"model-{tensor_type}.gguf"
    assert path.is_file()
    return path


def _field(reader, key):
    field = reader.get_field(key)
    assert field is not None, f"{key} missing"
    return field.contents()


def _hf_order(heads: int, head_dim: int) -> list[int]:
    """For each row of a llama.cpp q/k head (adjacent rotary pairs), the HF row (rotate-half)
    it holds: pair j of a head is HF's features j and j + head_dim/2."""
    half = head_dim // 2
    within = [s * half + j for j in range(half) for s in (0, 1)]
    return [h * head_dim + r for h in range(heads) for r in within]


@pytest.mark.parametrize("which", ["gqa", "untied_bias"])
def test_gguf_f32_holds_every_weight_key_and_token(which, request, tmp_path, chat_tokenizer):
    from temper.models import load_model

    model_dir = request.getfixturevalue(f"{which}_dir")
    path = _export(model_dir, tmp_path / "out", "f32")
    reader = gguf.GGUFReader(str(path))
    model = load_model(model_dir)
    c = model.config
    expect = {"general.architecture": "llama", "llama.context_length": c.max_seq_len,
              "llama.embedding_length": c.hidden_size, "llama.block_count": c.num_layers,
              "llama.feed_forward_length": c.intermediate_size, "llama.attention.head_count": c.num_heads,
              "llama.attention.head_count_kv": c.num_kv_heads, "llama.rope.dimension_count": c.head_dim,
              "llama.vocab_size": c.vocab_size, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
              "tokenizer.ggml.bos_token_id": chat_tokenizer.bos_id,
              "tokenizer.ggml.eos_token_id": chat_tokenizer.eos_id,
              "tokenizer.ggml.padding_token_id": chat_tokenizer.pad_id,
              "tokenizer.ggml.eot_token_id": chat_tokenizer.token_id("<|im_end|>"),
              "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": chat_tokenizer.chat_template}
    assert c.num_kv_heads < c.num_heads
    for key, value in expect.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_theta, rel=FP32_EPS)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps, rel=FP32_EPS)
    n = chat_tokenizer.vocab_size
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [chat_tokenizer.backend.id_to_token(i) for i in range(n)] + [
        f"[PAD{i}]" for i in range(n, c.vocab_size)]
    types = _field(reader, "tokenizer.ggml.token_type")
    specials = set(chat_tokenizer.special_ids)
    assert types == [3 if i in specials else 1 for i in range(n)] + [5] * EXTRA_EMBEDDINGS
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    assert _field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m)
                                                       for m in spec["model"]["merges"]]

    state = model.state_dict()
    tensors = {t.name: t for t in reader.tensors}
    names = {"token_embd.weight", "output_norm.weight", *(["output.weight"] if not c.tie_embeddings else [])}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]
    names |= {f"blk.{i}.{p}.weight" for i in range(c.num_layers) for p in per_block}
    if c.qkv_bias:
        names |= {f"blk.{i}.attn_{p}.bias" for i in range(c.num_layers) for p in ("q", "k", "v", "output")}
    assert set(tensors) == names
    source = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
    parts = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
             "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for name, t in tensors.items():
        if name.startswith("blk."):
            _, i, part, kind = name.split(".")
            source[name] = f"layers.{i}.{parts[part]}.{kind}"
        want = state[source[name]]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(want.shape)
        if ".attn_q." in name or ".attn_k." in name:  # rows in llama.cpp's rotary order
            heads = c.num_heads if ".attn_q." in name else c.num_kv_heads
            want = want[_hf_order(heads, c.head_dim)]
        assert torch.equal(got, want), name


def _interleaved_rope(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `llama` rotation (ggml's normal rope): features 2i and 2i + 1 turn together by
    position x inv_freq[i]. x: (heads, head_dim)."""
    angle = position * inv_freq.double()
    cos, sin = torch.cos(angle), torch.sin(angle)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _half_rope(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Hugging Face's (and temper's) rotation: feature i turns with feature i + head_dim/2."""
    angle = position * inv_freq.double()
    cos, sin = torch.cos(angle).repeat(2), torch.sin(angle).repeat(2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _scores(wq, wk, x_q, x_k, positions, heads, kv_heads, head_dim, inv_freq, rope):
    """q . k of every query head with its key/value group's key, tokens at `positions`."""
    q = rope((wq @ x_q).view(heads, head_dim), positions[0], inv_freq)
    k = rope((wk @ x_k).view(kv_heads, head_dim), positions[1], inv_freq)
    group = heads // kv_heads
    return torch.stack([q[h] @ k[h // group] for h in range(heads)])


def test_gguf_q_and_k_give_hf_attention_scores_under_ggml_rotation(gqa_dir, tmp_path):
    """The permutation is right when llama.cpp's rotation of the exported q/k gives the scores
    HF's rotation gives of the original ones; K has num_kv_heads heads (GQA). Permuting K with
    num_heads (the classic bug) must fail this test: checked at the end."""
    from temper.models import load_model
    from temper.models.common import rope_inverse_frequencies
    from temper.models.llama.gguf import rotary_permute

    path = _export(gqa_dir, tmp_path / "out", "f32")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    model = load_model(gqa_dir)
    c = model.config
    assert c.num_kv_heads < c.num_heads
    inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta)
    gen = torch.Generator().manual_seed(1)
    x_q, x_k = torch.randn(c.hidden_size, generator=gen).double(), torch.randn(c.hidden_size, generator=gen).double()
    shape = (c.num_heads, c.num_kv_heads, c.head_dim, inv_freq)
    for layer in range(c.num_layers):
        attn = model.layers[layer].attn
        wq, wk = attn.q_proj.weight.detach().double(), attn.k_proj.weight.detach().double()
        gq, gk = (torch.from_numpy(tensors[f"blk.{layer}.attn_{p}.weight"].data.copy()).double() for p in "qk")
        for positions in [(0, 0), (3, 1), (7, 5), (30, 2)]:
            hf = _scores(wq, wk, x_q, x_k, positions, *shape, _half_rope)
            ours = _scores(gq, gk, x_q, x_k, positions, *shape, _interleaved_rope)
            # float64 throughout, the weights the same fp32 numbers in another order: the two differ by
            # float64 roundings of sums over the hidden size, a head and a rotation (2 terms), each
            # partial sum at most |Wq x| |Wk x| (Cauchy-Schwarz; a rotation keeps norms)
            scale = float((wq @ x_q).norm() * (wk @ x_k).norm())
            tol = reorder_tol(scale, c.hidden_size, c.hidden_size, c.head_dim, 2, 2, eps=2 ** -52)
            torch.testing.assert_close(ours, hf, rtol=0, atol=tol)
    # the classic GQA bug: K permuted as if it had num_heads heads
    wrong_k = rotary_permute(attn.k_proj.weight.detach(), c.num_heads).double()
    wrong = _scores(gq, wrong_k, x_q, x_k, (7, 5), *shape, _interleaved_rope)
    assert not torch.allclose(wrong, _scores(wq, wk, x_q, x_k, (7, 5), *shape, _half_rope), atol=1e-3)


@pytest.mark.parametrize("tensor_type", ["q8_0", "q4_0", "f16"])
def test_gguf_quantised_tensors_dequantise_within_the_block_bound(tensor_type, untied_bias_dir, tmp_path):
    """gguf's own dequantize of every Q8_0 / Q4_0 (F16) matrix lands within the block format's
    rounding of the source weight; vectors stay exact F32; the bytes are ggml's block sizes."""
    from temper.models import load_model
    from temper.models.registry import family

    path = _export(untied_bias_dir, tmp_path / "out", tensor_type)
    model = load_model(untied_bias_dir)
    source = dict(family("llama").gguf.tensors(model.state_dict(), model.config))
    reader = gguf.GGUFReader(str(path))
    assert {t.name for t in reader.tensors} == set(source)
    f16_rel = 2 ** -11  # fp16's unit roundoff: the blocks' scales are stored in fp16
    qtype = gguf.GGMLQuantizationType[tensor_type.upper()]
    for t in reader.tensors:
        want = source[t.name].double()
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).double().reshape(want.shape)
        if want.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(got, want), t.name
            continue
        assert t.tensor_type == qtype, t.name
        if tensor_type == "f16":
            assert torch.all((got - want).abs() <= want.abs() * f16_rel + 2 ** -24), t.name
            continue
        blocks, errors = want.reshape(-1, 32), (got - want).reshape(-1, 32)
        amax = blocks.abs().amax(dim=1, keepdim=True)
        if tensor_type == "q8_0":  # x = d q, d = amax / 127, |q| <= 127: half a step, and q x d's fp16 rounding
            step = amax / 127
            bound = step * (0.5 + 127 * f16_rel) + 4 * FP32_EPS * amax
            assert t.data.nbytes == want.numel() // 32 * 34, t.name  # fp16 scale + 32 int8 per block
        else:  # x = d (q - 8), d = max / -8, q in 0..15: half a step, a whole one where q clips at 15
            step = amax / 8
            bound = step * (1 + 8 * f16_rel) + 4 * FP32_EPS * amax
            inner = blocks.abs() < 7 * step  # nowhere near the clipped end: within half a step
            assert torch.all(errors.abs()[inner] <= (step * (0.5 + 8 * f16_rel) + 4 * FP32_EPS * amax)
                             .expand_as(errors)[inner]), t.name
            assert t.data.nbytes == want.numel() // 32 * 18, t.name  # fp16 scale + 16 bytes of 4-bit values
        assert torch.all(errors.abs() <= bound), f"{t.name}: {float((errors.abs() / bound).max()):.3g} x the bound"
        assert float(errors.abs().max()) > 0, t.name  # it really was quantised


def test_the_read_back_check_finds_a_wrong_key_a_wrong_tensor_and_a_missing_one(gqa_dir, tmp_path):
    """What write_gguf checks before the rename: a file that differs from what was written in one
    key's value, one tensor's bytes, or a tensor too few is refused with the difference named."""
    from temper.errors import TemperError
    from temper.export.gguf import check_gguf_file

    path = _export(gqa_dir, tmp_path / "out", "q8_0")
    reader = gguf.GGUFReader(str(path))
    packed = {t.name: (t.tensor_type.name.lower(), np.array(t.data), tuple(int(d) for d in reversed(t.shape)))
              for t in reader.tensors}
    heads = gguf.GGUFValue(4, gguf.GGUFValueType.UINT32)
    check_gguf_file(path, {"llama.attention.head_count": heads}, packed, gguf, shown=path)  # as written: fine
    with pytest.raises(TemperError, match="key llama.attention.head_count reads '4', written '5'"):
        check_gguf_file(path, {"llama.attention.head_count": gguf.GGUFValue(5, gguf.GGUFValueType.UINT32)}, packed,
                        gguf, shown=path)
    changed = dict(packed)
    kind, data, shape = changed["blk.1.attn_k.weight"]
    data = data.copy()
    data.reshape(-1)[7] ^= 1
    changed["blk.1.attn_k.weight"] = (kind, data, shape)
    with pytest.raises(TemperError, match="blk.1.attn_k.weight's bytes differ"):
        check_gguf_file(path, {}, changed, gguf, shown=path)
    with pytest.raises(TemperError, match=r"tensors \['extra.weight'\] differ"):
        check_gguf_file(path, {}, {**packed, "extra.weight": packed["output_norm.weight"]}, gguf, shown=path)


def test_export_bad_input_is_one_line(tmp_path, tiny_model_dir, capsys, chat_tokenizer):
    from temper.models import build_model, preset, save_model

    out = tmp_path / "out"
    assert main(["export", f"model={tiny_model_dir}", "format=onnx", f"output_dir={out}"]) == 2
    assert "format" in one_line_error(capsys, "export") and not out.exists()
    assert main(["export", f"model={tiny_model_dir}", "format=safetensors", "tensor_type=q4_0",
                 f"output_dir={out}"]) == 2
    assert "format=gguf" in one_line_error(capsys, "export")
    gpt2 = tmp_path / "gpt2"
    save_model(build_model(preset("gpt2-tiny", vocab_size=chat_tokenizer.vocab_size)), gpt2, tokenizer=chat_tokenizer)
    assert main(["export", f"model={gpt2}", f"output_dir={out}"]) == 2
    line = one_line_error(capsys, "export")
    assert "GPT-2" in line and "no GGUF export" in line and not out.exists()
    adapter = _lora_adapter(tmp_path / "lora", tiny_model_dir)
    assert main(["export", f"model={adapter}", f"output_dir={out}"]) == 2
    assert "temper merge" in one_line_error(capsys, "export") and not out.exists()
    # Q4_0 on rows of 48 values (hidden 48): not whole blocks of 32
    narrow = _model_dir(tmp_path / "narrow", chat_tokenizer, hidden_size=48, num_heads=4, num_kv_heads=2)
    assert main(["export", f"model={narrow}", "tensor_type=q4_0", f"output_dir={out}"]) == 2
    line = one_line_error(capsys, "export")
    assert "token_embd.weight: rows of 48 values are not a multiple of 32" in line and "Q4_0" in line
    assert not out.exists()
    assert main(["export", f"model={narrow}", "tensor_type=f16", f"output_dir={out}"]) == 0
    assert main(["export", f"model={narrow}", "tensor_type=f16", f"output_dir={out}"]) == 2  # an earlier export
    assert "overwrite=true" in one_line_error(capsys, "export")
    assert main(["export", f"model={tiny_model_dir}", "format=safetensors", f"output_dir={tmp_path / 's'}"]) == 2
    assert "already in HF safetensors" in one_line_error(capsys, "export")


def test_export_safetensors_of_an_adapter_is_temper_merge(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    adapter = _lora_adapter(tmp_path / "lora", tiny_model_dir)
    assert main(["merge", f"adapter={adapter}", f"output_dir={tmp_path / 'merged'}"]) == 0
    assert main(["export", f"model={adapter}", "format=safetensors", f"output_dir={tmp_path / 'exported'}"]) == 0
    merged, exported = tmp_path / "merged", tmp_path / "exported"
    a, b = load_file(merged / "model.safetensors"), load_file(exported / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (merged / name).read_text() == (exported / name).read_text(), name


# ----------------------------------------------------------------------------- llama.cpp itself


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama_cpp is not importable ({e}); pip install llama-cpp-python builds llama.cpp (minutes)")
    return llama_cpp


def test_llama_cpp_runs_the_exported_file_as_temper_does(gqa_dir, tmp_path, chat_tokenizer):
    """llama.cpp loads the F32 file: its logits for the same token ids are temper's (all in fp32:
    F32 weights and an F32 KV cache), its greedy tokens are temper's, and it tokenises text as
    temper's tokenizer does."""
    llama_cpp = _llama_cpp()
    from temper.models import load_model
    from temper.models.generate import SamplingConfig, generate

    path = _export(gqa_dir, tmp_path / "out", "f32")
    model = load_model(gqa_dir).eval()
    c = model.config
    text = "Alice lives in Paris. The sum of 3 and 4 is 7. Ünïcödé 😀!"
    prompt = chat_tokenizer.encode(text)
    steps = 12
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, seed=0,
                          verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == prompt
    assert llm.detokenize(prompt).decode() == text

    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=steps, temperature=0.0))[0]
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(steps):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        theirs.append(token)
        llm.eval([token])
    with torch.no_grad():
        sequence = torch.tensor([prompt + theirs])
        logits = model(sequence)[0]
    cpp = torch.from_numpy(llm.scores[: sequence.shape[1]].copy())
    llm.close()
    tol = reorder_tol(float(logits.abs().max()), *decoder_lengths(c, sequence.shape[1]))
    gap = float((cpp - logits).abs().max())
    assert gap <= tol, f"llama.cpp's logits differ by {gap:.3g} > {tol:.3g}"
    assert theirs == ours
    assert math.isfinite(gap)


FAMILY_SHAPES = {
    "qwen2": dict(hf_architecture="Qwen2ForCausalLM", qkv_bias=True),  # llama.cpp's qwen2: no permutation
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),  # rope_freqs.weight
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "head-dim": dict(head_dim=32),  # key/value length apart from hidden / heads
    "untied-bias": dict(tie_embeddings=False, qkv_bias=True, attn_out_bias=True),
    "mistral-window": dict(hf_architecture="MistralForCausalLM", sliding_window=8),
}


@pytest.mark.parametrize("kind", sorted(FAMILY_SHAPES))
def test_llama_cpp_logits_across_the_family(kind, tmp_path, chat_tokenizer, capsys):
    """Qwen2, Llama-3 and linear rope scaling, a head size apart from hidden / heads, biases and an
    untied output layer: llama.cpp's logits for 48 tokens are temper's within fp32 reordering.
    Mistral's sliding window is not in a llama-architecture file (llama.cpp attends to the whole
    context): the export says so, and the logits agree while the window covers the context."""
    llama_cpp = _llama_cpp()
    from temper.models import load_model

    model_dir = _model_dir(tmp_path / "model", chat_tokenizer, **FAMILY_SHAPES[kind])
    path = _export(model_dir, tmp_path / "out", "f32")
    model = load_model(model_dir).eval()
    ids = chat_tokenizer.encode(SAMPLE_TEXT)[:48]
    if model.config.sliding_window:
        assert f"sliding window of {model.config.sliding_window} tokens is not in the file" in capsys.readouterr().err
        ids = ids[: model.config.sliding_window]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    cpp = torch.from_numpy(llm.scores[: len(ids)].copy())
    llm.close()
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    tol = reorder_tol(float(logits.abs().max()), *decoder_lengths(model.config, len(ids)))
    gap = float((cpp - logits).abs().max())
    assert gap <= tol, f"llama.cpp's logits differ by {gap:.3g} > {tol:.3g}"
