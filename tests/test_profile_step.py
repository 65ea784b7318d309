"""benchmarks/profile_step.py's attribution: every op in exactly one family, the families sum to the
profiled op time, and backward ops reach the family of the forward op that made their node."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("profile_step", BENCHMARKS / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("profile_step", module)
    spec.loader.exec_module(module)
    return module


def _tiny_args(case: str, **kw) -> argparse.Namespace:
    return argparse.Namespace(preset="llama-tiny", batch=2, seq_len=16, past=4, peer=False, precision="fp32",
                              case=case, **kw)


def _tiny_model(ps, monkeypatch):
    """2 layers, width 32: the benchmark's own step functions on a tiny model."""
    from temper.models import build_model, preset

    def build(args):
        torch.manual_seed(0)
        return build_model(preset("llama-tiny", hidden_size=32, intermediate_size=64, vocab_size=128,
                                  num_heads=4, num_kv_heads=2, max_seq_len=128))
    monkeypatch.setattr(ps, "build_temper", build)


def _profile(ps, step, model, body):
    step()  # warm-up
    with ps.region_hooks(model, body), profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                                               with_flops=True, with_stack=True) as prof:
        with record_function(ps.STEP):
            step()
    events = list(prof.events())
    return events, ps.attribute(events)[0]


def test_pretrain_step_every_op_in_one_family_and_backward_mapped(monkeypatch):
    ps = _load()
    _tiny_model(ps, monkeypatch)
    step, model, body, _, _ = ps.pretrain_step(_tiny_args("pretrain"))
    events, r = _profile(ps, step, model, body)
    fam = r["families_us"]
    assert set(fam) <= set(ps.FAMILIES)
    # the op time, summed independently of the attribution, is what the families share out
    (step_event,) = [e for e in events if e.name == ps.STEP]
    ops = [e for e in events if ps.is_op(e) and step_event.time_range.start <= e.time_range.start
           <= step_event.time_range.end]
    total = sum(e.self_cpu_time_total for e in ops)
    assert abs(sum(fam.values()) - total) <= 1e-9 * total and abs(r["op_total_us"] - total) <= 1e-9 * total
    assert abs(sum(r["by_op_us"].values()) - total) <= 1e-9 * total
    for family in ("matmul", "attention", "norm", "rope", "activation", "cross_entropy", "optimiser"):
        assert fam.get(family, 0) > 0, family
    # backward ops found the forward op that created their autograd node
    for family in ("matmul", "attention", "norm", "rope", "activation", "cross_entropy"):
        assert r["backward_us"].get(family, 0) > 0, family
    assert not any(k.endswith("|unmapped") for k in r["by_region_us"])
    by_op = r["by_op_us"]
    assert any(k.startswith("aten::roll|rope|attn|bwd") for k in by_op)  # the rotation's backward
    assert any(k.startswith("aten::silu_backward|activation|mlp|bwd") for k in by_op)
    assert any(k.startswith("aten::_fused_adamw_|optimiser|") for k in by_op)
    assert not any(k.startswith(("aten::mm|", "aten::addmm|")) and "|matmul|" not in k for k in by_op)
    assert r["matmul_flops"] > 0


def test_decode_step_kv_cache_write_is_a_copy(monkeypatch):
    ps = _load()
    _tiny_model(ps, monkeypatch)
    step, model, body, tokens, _ = ps.decode_step(_tiny_args("generate"))
    assert tokens == 2
    _, r = _profile(ps, step, model, body)
    assert r["backward_us"] == {}
    assert any(k.startswith("aten::copy_|copies|attn|fwd") for k in r["by_op_us"])  # KVCache.update
    assert r["families_us"].get("attention", 0) > 0 and r["families_us"].get("matmul", 0) > 0


def test_family_rules():
    ps = _load()
    C = ps.Context
    assert ps.family_of("aten::_to_copy", C("loss", True, False, False)) == "copies"  # autocast's cast in a linear
    assert ps.family_of("aten::t", C("mlp", True, False, False)) == "matmul"
    assert ps.family_of("aten::bmm", C("attn", False, True, False)) == "attention"  # inside SDPA
    assert ps.family_of("aten::cat", C("attn", False, False, True)) == "rope"
    assert ps.family_of("aten::cat", C("attn", False, False, False)) == "copies"  # a cache appended by cat
    assert ps.family_of("aten::mul", C("norm", False, False, False)) == "norm"
    assert ps.family_of("aten::mul", C("mlp", False, False, False)) == "activation"
    assert ps.family_of("aten::exp_", C("loss", False, False, False)) == "cross_entropy"
    assert ps.family_of("aten::copy_", C("optim", False, False, False)) == "optimiser"
    assert ps.family_of("aten::view", C("norm", False, False, False)) == "other"
    assert ps.family_of("aten::add_", C("accumulate_grad", False, False, False)) == "other"
