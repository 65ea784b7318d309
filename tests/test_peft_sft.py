"""PEFT through the SFT recipe: every method trains, saves only what it trained, resumes
exactly; LoRA adapters merge with `temper merge` and load in `peft`."""

import json

import pytest
import torch
from conftest import assert_reorder_close, decoder_lengths

from temper.errors import TemperError
from temper.train.rundir import read_metrics


@pytest.fixture()
def sft_rows(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i + 1}"}], "answer": str(i + 1)} for i in range(24)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_sft(tmp_path, model_dir, data, *extra, out="run"):
    from temper.config import load_config
    from temper.recipes import sft

    cfg = load_config(sft.Config, None, [f"model={model_dir}", f"data={data}", f"output_dir={tmp_path / out}",
                                         "batch_size=4", "logging.progress=false", "eval_samples=4",
                                         "eval_max_new_tokens=3", "logging.eval_every=0", *extra])
    return sft.run(cfg)


@pytest.mark.parametrize("method,extra", [
    ("lora", ["peft.target_modules=all-linear"]), ("dora", []), ("qlora", []),
    ("adapter", ["peft.adapter_dim=8"]), ("prefix", ["peft.num_virtual_tokens=4"]),
    ("prompt", ["peft.num_virtual_tokens=4", "peft.prompt_init_text=What is"]),
])
def test_every_method_trains_and_saves_only_what_it_trained(tmp_path, tiny_model_dir, sft_rows, method, extra):
    from safetensors.torch import load_file

    summary = run_sft(tmp_path, tiny_model_dir, sft_rows, f"peft.method={method}", "max_steps=6", "optim.lr=1e-2",
                      "logging.every=1", *extra)
    out = tmp_path / "run"
    assert 0 < summary["trainable_parameters"] < 0.5 * summary["total_parameters"]
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert 0 < sum(t.numel() for t in saved.values()) <= summary["trainable_parameters"] * 1.01
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "temper_peft.json").read_text())["method"] == method


def test_lora_run_resumes_bitwise(tmp_path, tiny_model_dir, sft_rows, monkeypatch):
    from temper.data.sft import SFTLoader

    common = ["peft.method=lora", "max_steps=6", "logging.every=1", "checkpoint.every=3", "optim.lr=5e-3"]
    run_sft(tmp_path, tiny_model_dir, sft_rows, *common, out="straight")
    real = SFTLoader.next_batch
    calls = {"n": 0}

    def crash(self):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(SFTLoader, "next_batch", crash)
    with pytest.raises(KeyboardInterrupt):
        run_sft(tmp_path, tiny_model_dir, sft_rows, *common, out="resumed")
    monkeypatch.setattr(SFTLoader, "next_batch", real)
    run_sft(tmp_path, tiny_model_dir, sft_rows, *common, "resume=auto", out="resumed")
    rows = lambda p: [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(p / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")


def test_merge_and_peft_library_agree(tmp_path, tiny_model_dir, sft_rows, capsys):
    peft = pytest.importorskip("peft")
    import transformers

    from temper.cli import main
    from temper.models import load_model
    from temper.peft import load_peft

    run_sft(tmp_path, tiny_model_dir, sft_rows, "peft.method=lora", "max_steps=4", "optim.lr=1e-2", out="lora")
    x = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        ours = load_model(tiny_model_dir).eval()
        load_peft(ours, tmp_path / "lora")
        expected = ours(x)
        assert main(["merge", f"model={tiny_model_dir}", f"adapter={tmp_path / 'lora'}",
                     f"output_dir={tmp_path / 'merged'}"]) == 0
        merged = load_model(tmp_path / "merged").eval()
        # (W + B A) x vs W x + B (A x), and transformers' kernels: the same sums in another order,
        # the adapter's over its rank (8)
        lengths = decoder_lengths(ours, x.shape[1]) + (8,)
        assert_reorder_close(merged(x), expected, lengths)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "lora").eval()
        assert_reorder_close(with_adapter(x).logits, expected, lengths)


def test_lora_on_a_tied_lm_head_trains_and_merges_untied(tmp_path, tiny_model_dir, sft_rows, capsys):
    """peft.target_modules=[lm_head] (was a traceback: the fused loss read lm_head.weight of a LoRA
    wrapper): the loss goes through the adapted output layer, and `temper merge` unties the tied
    output layer, or the adapter's effect on it would be lost."""
    from temper.cli import main
    from temper.models import load_model
    from temper.peft import load_peft

    run_sft(tmp_path, tiny_model_dir, sft_rows, "peft.method=lora", "peft.target_modules=[lm_head]", "max_steps=2",
            "optim.lr=1e-2", out="lora")
    x = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        adapted = load_model(tiny_model_dir).eval()
        load_peft(adapted, tmp_path / "lora")
        expected = adapted(x)
        assert (expected - load_model(tiny_model_dir).eval()(x)).abs().max() > 1e-3  # the adapter trained
        capsys.readouterr()
        assert main(["merge", f"model={tiny_model_dir}", f"adapter={tmp_path / 'lora'}",
                     f"output_dir={tmp_path / 'merged'}"]) == 0
        assert "unties it from the input embedding" in capsys.readouterr().err
        merged = load_model(tmp_path / "merged").eval()
        assert not merged.config.tie_embeddings
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)


def test_qlora_merge_says_it_dequantises(tmp_path, tiny_model_dir, sft_rows, capsys):
    from temper.cli import main

    run_sft(tmp_path, tiny_model_dir, sft_rows, "peft.method=qlora", "max_steps=2", out="q")
    capsys.readouterr()
    assert main(["merge", f"model={tiny_model_dir}", f"adapter={tmp_path / 'q'}", f"output_dir={tmp_path / 'm'}"]) == 0
    assert "dequantis" in capsys.readouterr().err.lower()
    # the merged chat model stops at its end of turn in transformers too, as a fully fine-tuned one does
    import json

    from temper.data.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tmp_path / "m")
    eos = json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [tok.eos_id, tok.token_id("<|im_end|>")]


def test_prefix_adapter_cannot_merge(tmp_path, tiny_model_dir, sft_rows, capsys):
    from temper.cli import main

    run_sft(tmp_path, tiny_model_dir, sft_rows, "peft.method=prefix", "peft.num_virtual_tokens=2", "max_steps=1", out="p")
    assert main(["merge", f"model={tiny_model_dir}", f"adapter={tmp_path / 'p'}", f"output_dir={tmp_path / 'm'}"]) == 2
    assert "cannot be merged" in capsys.readouterr().err


def test_generate_from_an_adapter_directory(tmp_path, tiny_model_dir, sft_rows, capsys, monkeypatch):
    import json as _json

    import temper.stages.generate as generate_stage
    from temper.cli import main
    from temper.loading import load_model_or_adapter
    from temper.peft.lora import LoRALinear

    run_sft(tmp_path, tiny_model_dir, sft_rows, "peft.method=lora", "max_steps=2", out="lora")
    seen = {}
    real = generate_stage.generate_text

    def spy(model, *args, **kwargs):
        seen["lora"] = sum(isinstance(m, LoRALinear) for m in model.modules())
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generate_stage, "generate_text", spy)
    code = main(["generate", f"model={tmp_path / 'lora'}", "chat=true", "prompt=What is 3 plus 1?",
                 "max_new_tokens=4", "temperature=0"])
    assert code == 0 and seen["lora"] == 2 * 2  # q_proj and v_proj of both layers carry the adapter
    cfg = _json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (tmp_path / "lora" / "adapter_config.json").write_text(_json.dumps(cfg))
    with pytest.raises(TemperError, match="not a directory here"):
        load_model_or_adapter(tmp_path / "lora")


def test_two_adapters_loaded_at_once_switch_by_name(tmp_path, tiny_model_dir, sft_rows):
    from temper.models import load_model
    from temper.peft import load_peft
    from temper.peft.lora import disable_adapters, set_adapter

    run_sft(tmp_path, tiny_model_dir, sft_rows, "peft.method=lora", "max_steps=3", "optim.lr=2e-2", "seed=1", out="a")
    run_sft(tmp_path, tiny_model_dir, sft_rows, "peft.method=lora", "max_steps=3", "optim.lr=2e-2", "seed=2", out="b")
    x = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        base = load_model(tiny_model_dir).eval()
        expected_base = base(x)
        singles = {}
        for name in ("a", "b"):
            alone = load_model(tiny_model_dir).eval()
            load_peft(alone, tmp_path / name)
            singles[name] = alone(x)
        both = load_model(tiny_model_dir).eval()
        load_peft(both, tmp_path / "a", adapter_name="a")
        load_peft(both, tmp_path / "b", adapter_name="b")
        for name in ("a", "b"):
            set_adapter(both, name)
            torch.testing.assert_close(both(x), singles[name], atol=0, rtol=0)  # the same code: bitwise
        assert not torch.allclose(singles["a"], singles["b"])
        with disable_adapters(both):
            torch.testing.assert_close(both(x), expected_base, atol=0, rtol=0)
