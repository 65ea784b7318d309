"""Export a model for other runtimes: one GGUF file for llama.cpp, or an HF safetensors
directory with an adapter merged in.

    temper export model=runs/sft format=gguf tensor_type=q8_0 output_dir=runs/gguf   # runs/gguf/model-q8_0.gguf
    temper export model=runs/sft-lora format=safetensors output_dir=runs/merged       # = temper merge

format=gguf (Llama family: Llama, Mistral, Qwen2; needs `pip install 'temper[export]'`): the
weights in F32, F16, Q8_0 or Q4_0 (vectors stay F32), the q/k rows permuted for llama.cpp's
rotation, the hyper-parameters, the tokenizer (byte-level BPE as llama.cpp's `gpt2` model, its
special tokens and chat template). The file is read back with gguf's reader and checked
before it is moved into place. An adapter directory is refused: merge it first (format=
safetensors, or `temper merge`) and export the merged model. See docs/export.md.

format=safetensors: `model=` is an adapter directory; this runs `temper merge` on it (its base
from `base=`, else the adapter's base_model_name_or_path), so the output is exactly merge's.
A model directory is already HF safetensors: it is refused, with that said.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from temper.config import OnlyWith, opt
from temper.data.chat import model_chat_template, stop_settings
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError, TemperFileNotFoundError
from temper.export.gguf import family_gguf, import_gguf, write_gguf
from temper.io import owned_output_dir
from temper.models import load_model
from temper.models.hf import config_from_hf, read_hf_config


@dataclass
class Config:
    model: str = opt("", "the model directory (format=gguf), or the adapter directory to merge (format=safetensors)")
    format: Literal["gguf", "safetensors"] = opt("gguf", "gguf: one file for llama.cpp; safetensors: an HF "
                                                         "directory with the adapter merged (as temper merge)")
    output_dir: str = opt("runs/export", "where the export is written (gguf: OUTPUT_DIR/model-TYPE.gguf)")
    tensor_type: Literal["f32", "f16", "q8_0", "q4_0"] = opt(
        "f16", "GGUF type of the matrices (vectors stay f32): f32, f16, or ggml's 32-value blocks q8_0 / q4_0")
    base: str = opt("", "the adapter's base model directory (default: its base_model_name_or_path)")
    overwrite: bool = opt(False, "replace an earlier export of the same file, or a model that another command "
                                 "wrote in output_dir (format=safetensors)")

    only_with: ClassVar = (
        OnlyWith(("tensor_type",), "format=gguf", lambda c: c.format == "gguf"),
        OnlyWith(("base",), "format=safetensors", lambda c: c.format == "safetensors"),
    )

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: a model directory (gguf) or an adapter directory (safetensors)")


def run(cfg: Config, commands) -> dict:
    """Write the export; returns what was written (the GGUF file, or the merged model's directory)."""
    model_dir = Path(cfg.model).expanduser()
    if not model_dir.is_dir():
        raise TemperFileNotFoundError(f"model= directory not found: {model_dir}")
    if cfg.format == "safetensors":
        return merged_safetensors(cfg, model_dir, commands)
    return export_gguf(cfg, model_dir)


def summary_lines(cfg: Config, result: dict) -> list[str]:
    if result["format"] == "safetensors":
        return [f"export: {result['adapter']} merged into {result['model']} as safetensors -> {result['output_dir']} "
                "(transformers loads it)"]
    return [f"export: {result['model']} -> {result['path']} (llama.cpp architecture {result['architecture']}, "
            f"{result['tensors']} tensors, {result['tensor_type']}, {result['bytes'] / 2**20:.1f} MiB; read back and "
            "checked)", f"  next: llama-cli -m {result['path']} (llama.cpp)"]


def merged_safetensors(cfg: Config, adapter: Path, commands) -> dict:
    """`temper merge` of the adapter directory `adapter`: the same command, the same output."""
    if not (adapter / "adapter_config.json").is_file():
        raise TemperError(f"{adapter}: a model directory, already in HF safetensors (transformers loads it as it "
                          "is); format=safetensors merges an adapter directory into its base")
    settings = {"adapter": str(adapter), "output_dir": cfg.output_dir, "overwrite": cfg.overwrite}
    if cfg.base:
        settings["model"] = cfg.base
    merged = commands.run("merge", commands.config("merge", settings, source="temper export"))
    return {"format": "safetensors", **merged}


def export_gguf(cfg: Config, model_dir: Path) -> dict:
    source = str(model_dir)
    config = config_from_hf(read_hf_config(model_dir), str(model_dir / "config.json"))  # an adapter: merge first
    family_gguf(config, source)  # a family without GGUF support, before anything is loaded
    import_gguf()
    tokenizer = Tokenizer.from_dir(model_dir)
    out = Path(cfg.output_dir).expanduser()
    path = out / f"model-{cfg.tensor_type}.gguf"

    def earlier(folder: Path) -> list[str]:
        return [path.name] if (folder / path.name).exists() else []

    with owned_output_dir(out, command="export", inputs={"model": model_dir}, overwrite=cfg.overwrite,
                          earlier=earlier):
        model = load_model(model_dir, dtype="float32").eval()
        template = model_chat_template(model_dir, tokenizer)
        end_of_turn = None
        if template:  # llama.cpp stops on it (ChatML's <|im_end|>, Llama-3's <|eot_id|>)
            ends = [i for i in stop_settings(tokenizer, template)[1] if i != tokenizer.eos_id]
            end_of_turn = ends[0] if ends else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = write_gguf(model, tokenizer, path, tensor_type=cfg.tensor_type, name=model_dir.name,
                                 chat_template=template, end_of_turn_id=end_of_turn, source=source)
        for w in caught:
            print(f"note: {w.message}", file=sys.stderr)
    return {"format": "gguf", "model": str(model_dir), "path": str(path), "architecture": summary["architecture"],
            "tensors": len(summary["tensors"]), "tensor_type": cfg.tensor_type, "bytes": summary["bytes"]}
