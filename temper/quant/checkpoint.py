"""A quantised model directory: `config.json` with a `quantization_config` section, one
`model.safetensors`, the tokenizer files.

A quantised linear's tensors are stored under its HF module name with their own suffixes
(`model.layers.0.self_attn.q_proj.qweight`, `.scales`, `.zeros`, `.perm`; NF4's `.packed`,
`.absmax`, `.scale2`, `.offset`); everything else under its usual HF name. `load_quantized`
builds the model on the meta device, swaps the recorded linears for empty quantised modules,
and assigns the file's tensors, each checked for name, dtype, shape and range: no
full-precision copy of the quantised weights is ever made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from temper.errors import TemperError
from temper.io import atomic_write_text, write_safetensors
from temper.models import _finish_meta_load, registry, resolve_dtype
from temper.models.hf import (
    check_weight,
    config_from_hf,
    config_to_hf,
    open_weights,
    read_hf_config,
    tied_names,
    weight_files,
    write_generation_config,
)
from temper.quant.model import QUANT_BUFFERS, QuantSpec, _replace, empty_module
from temper.quant.weight_only import INT4_MAX

SECTION = "quantization_config"


def is_quantized(hf_config: dict) -> bool:
    return isinstance(hf_config, dict) and SECTION in hf_config and hf_config[SECTION] is not None


def read_spec(model_dir: str | Path) -> QuantSpec | None:
    """The directory's QuantSpec, or None for a full-precision model."""
    hf = read_hf_config(model_dir)
    if not is_quantized(hf):
        return None
    return QuantSpec.from_json(hf[SECTION], str(Path(model_dir) / "config.json"))


def _hf_module_name(adapter, module: str) -> str:
    return adapter.to_hf(f"{module}.weight").removesuffix(".weight")


def save_quantized(model: nn.Module, spec: QuantSpec, out_dir: str | Path, eos_ids: list[int] | None = None) -> None:
    """Write `model` (quantised by `quantize_decoder`) to `out_dir`: weights, then config.json last."""
    out = Path(out_dir)
    config = model.config
    adapter = registry.family(config.family).adapter_for(config)
    tied = tied_names(model)
    quantized = set(spec.modules)
    tensors: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf in QUANT_BUFFERS:
            hf_name = f"{_hf_module_name(adapter, module)}.{leaf}"
        else:
            hf_name = adapter.to_hf(name)
            if adapter.is_transposed(name):
                tensor = tensor.t()
        tensors[hf_name] = tensor.detach().contiguous().cpu()
    write_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if registry.family(config.family).causal_lm:
        write_generation_config(config, out, eos_ids)
    hf = config_to_hf(config)
    dtypes = {t.dtype for n, t in model.state_dict().items() if t.is_floating_point() and n.rpartition(".")[2]
              not in QUANT_BUFFERS}
    if len(dtypes) == 1:
        hf["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    hf[SECTION] = spec.to_json()
    atomic_write_text(out / "config.json", json.dumps(hf, indent=2) + "\n")


def load_quantized(model_dir: str | Path, *, device: torch.device | str = "cpu",
                   dtype: str | torch.dtype | None = None) -> nn.Module:
    """A quantised directory as a model whose recorded linears are quantised modules.

    `dtype` applies to the full-precision tensors (embeddings, norms, biases, output layer) and
    is the compute dtype; codes and scales keep their stored dtypes."""
    model_dir = Path(model_dir)
    hf = read_hf_config(model_dir)
    source = str(model_dir / "config.json")
    spec = QuantSpec.from_json(hf[SECTION], source)
    config = config_from_hf(hf, source)
    target = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = registry.family(config.family).model(config)
        modules = dict(model.named_modules())
        for name in spec.modules:
            if not isinstance(modules.get(name), nn.Linear):
                raise TemperError(f"{source}: quantization_config names module {name!r}, which is not a linear "
                                  f"layer of this {config.hf_architecture}")
            _replace(model, name, empty_module(modules[name], spec, target))
    adapter = registry.family(config.family).adapter_for(config)
    tied = tied_names(model)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in tied}
    by_hf = {}
    for name in expected:
        module, _, leaf = name.rpartition(".")
        if module in spec.modules and leaf in QUANT_BUFFERS:
            by_hf[f"{_hf_module_name(adapter, module)}.{leaf}"] = name
        else:
            by_hf[adapter.to_hf(name)] = name
    state: dict[str, Tensor] = {}
    for path in weight_files(model_dir):
        with open_weights(path) as f:
            for hf_name in f.keys():
                name = by_hf.get(hf_name)
                if name is None:
                    if adapter.from_hf(hf_name) == "":
                        continue
                    raise TemperError(f"{path}: unexpected tensor '{hf_name}' for this quantised "
                                      f"{config.hf_architecture} ({spec.method})")
                tensor = f.get_tensor(hf_name)
                want = expected[name]
                module, _, leaf = name.rpartition(".")
                quant_buffer = module in spec.modules and leaf in QUANT_BUFFERS
                if not quant_buffer and adapter.is_transposed(name):
                    tensor = tensor.t().contiguous()
                if tuple(tensor.shape) != tuple(want.shape):
                    raise TemperError(f"{path}: tensor '{hf_name}' has shape {tuple(tensor.shape)}, expected "
                                      f"{tuple(want.shape)} from config.json")
                if quant_buffer:
                    _check_quant_tensor(path, hf_name, tensor, want)
                else:
                    check_weight(path, hf_name, tensor)
                    tensor = tensor.to(target)
                state[name] = tensor.to(device)
    missing = [hf_name for hf_name, name in by_hf.items() if name not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TemperError(f"{model_dir}: tensor '{missing[0]}'{more} missing from the safetensors files")
    model.load_state_dict(state, strict=not tied, assign=True)
    _finish_meta_load(model, device)
    return model


def _check_quant_tensor(path: Path, hf_name: str, tensor: Tensor, want: Tensor) -> None:
    """dtype as the format says; scales finite and positive; codes and zeros in range; perm a permutation."""
    if tensor.dtype != want.dtype:
        raise TemperError(f"{path}: tensor '{hf_name}' has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                          f"expected {str(want.dtype).removeprefix('torch.')} for this quantisation format")
    leaf = hf_name.rpartition(".")[2]
    if tensor.is_floating_point():
        check_weight(path, hf_name, tensor)
        if leaf in ("scales",) and not bool((tensor > 0).all()):
            raise TemperError(f"{path}: tensor '{hf_name}' holds scales <= 0 (expected positive scales)")
    if leaf == "zeros" and int(tensor.max()) > INT4_MAX:
        raise TemperError(f"{path}: tensor '{hf_name}' holds zero-points above {INT4_MAX} (4-bit codes)")
    if leaf == "qweight" and tensor.dtype == torch.int8 and int(tensor.min()) < -127:
        raise TemperError(f"{path}: tensor '{hf_name}' holds -128 (int8 codes are in [-127, 127])")
    if leaf == "perm" and not torch.equal(torch.sort(tensor).values, torch.arange(tensor.numel())):
        raise TemperError(f"{path}: tensor '{hf_name}' is not a permutation of 0..{tensor.numel() - 1}")
