"""A model directory as one GGUF file, the format llama.cpp (and Ollama, LM Studio) read.

    write_gguf(model, tokenizer, path, tensor_type="q8_0", chat_template=..., end_of_turn_id=...)

Through the `gguf` package (llama.cpp's own Python writer and reader; the optional extra
`export`), imported only here and only when a GGUF file is written. What a family contributes
(llama.cpp's names, permutations and hyper-parameter keys) is its `Family.gguf`
(`temper/models/<family>/gguf.py`); this module knows no family by name.

Tensors: a matrix goes out in the chosen type, F32, F16, Q8_0 or Q4_0 (ggml's blocks of 32
values of a row: Q8_0 one fp16 scale and 32 int8, Q4_0 one fp16 scale and 32 4-bit values
packed two a byte; packed by `gguf.quants`, ggml's reference rounding); vectors (norms,
biases, rope factors) stay F32, as llama.cpp's converter keeps them. A block never spans two
rows, so Q8_0 and Q4_0 need a row length that is a multiple of 32: another is refused in one
line naming the tensor.

Tokenizer: temper's byte-level BPE (GPT-2's pre-tokeniser) is llama.cpp's `gpt2` model with
the `gpt-2` pre-tokeniser: the tokens as the vocabulary spells them, the merges, a type per
token (special added tokens CONTROL, other added tokens USER_DEFINED, ids past the tokenizer's
vocabulary `[PADn]` UNUSED, as convert_hf_to_gguf.py pads), BOS/EOS/PAD and an end-of-turn id,
no BOS added (temper's `encode` adds none), and the chat template. Any other tokenizer is
refused in one line (llama.cpp would tokenise text differently).

The file is written beside its target and read back with `gguf.GGUFReader` before it is
moved into place: every key's type and value and every tensor's name, type, shape and bytes
must be what was written, or the export fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from temper.errors import TemperError
from temper.io import atomic_path
from temper.models import registry

TENSOR_TYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK_SIZE = 32  # values per Q8_0 / Q4_0 block (ggml's QK8_0 = QK4_0 = 32)
# llama.cpp's token types (llama_token_type / gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def import_gguf():
    """The `gguf` package, or one line saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise TemperError("format=gguf needs the `gguf` package: pip install 'temper[export]' (or pip install "
                          "gguf)") from None
    return gguf


def family_gguf(config, source: str):
    """The family's GGUF description, or one line naming the family without one."""
    fam = registry.family(config.family)
    if fam.gguf is None:
        raise TemperError(f"{source}: a {fam.description} model ({config.hf_architecture}) has no GGUF export in "
                          "temper (the Llama family has: Llama, Mistral, Qwen2); use format=safetensors")
    return fam.gguf


def tensor_type_for(name: str, tensor: torch.Tensor, wanted: str) -> str:
    """The GGUF type `name` goes out in: vectors F32, matrices `wanted` (a quantised type only
    on rows of whole blocks)."""
    if tensor.dim() < 2:
        return "f32"
    row = tensor.shape[-1]
    if wanted in ("q8_0", "q4_0") and row % BLOCK_SIZE:
        raise TemperError(f"{name}: rows of {row} values are not a multiple of {BLOCK_SIZE}, the block size of "
                          f"{wanted.upper()}; export with tensor_type=f16 or f32")
    return wanted


def pack(tensor: torch.Tensor, tensor_type: str, gguf) -> np.ndarray:
    """`tensor` in GGUF's layout for `tensor_type` (numpy; quantised types as bytes, one row of
    blocks per row)."""
    array = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType[tensor_type.upper()])


# ----------------------------------------------------------------------------- the tokenizer


def gguf_vocabulary(tokenizer, vocab_size: int, source: str) -> dict[str, Any]:
    """The tokenizer in llama.cpp's terms (see the module), for a model of `vocab_size` embeddings."""
    spec = json.loads(tokenizer.backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_level_bpe = (model.get("type") == "BPE" and not model.get("byte_fallback")
                      and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                      and (spec.get("decoder") or {}).get("type") == "ByteLevel" and spec.get("normalizer") is None)
    if not byte_level_bpe:
        kind = f"{model.get('type')} with a {pre.get('type')} pre-tokeniser"
        raise TemperError(f"{source}: the tokenizer is {kind}; GGUF export maps byte-level BPE with GPT-2's "
                          "pre-tokeniser (what `temper tokenizer` trains) to llama.cpp's, and no other")
    size = tokenizer.vocab_size
    if size > vocab_size:
        raise TemperError(f"{source}: the tokenizer has {size} tokens but the model only {vocab_size} embeddings")
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        piece = tokenizer.backend.id_to_token(i) if i < size else None
        if piece is None:  # the model's embeddings past the tokenizer (or a hole in its ids)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(piece)
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_tokenizer(writer, tokenizer, vocab_size: int, source: str, *, chat_template: str | None,
                    end_of_turn_id: int | None) -> None:
    vocab = gguf_vocabulary(tokenizer, vocab_size, source)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's split
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_pad_token_id, tokenizer.token_id(tokenizer.pad_token)),
                          (writer.add_eot_token_id, end_of_turn_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # temper's encode adds no BOS; llama.cpp then adds none either
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


# ----------------------------------------------------------------------------- the file


def write_gguf(model, tokenizer, path: str | Path, *, tensor_type: str = "f32", name: str = "",
               chat_template: str | None = None, end_of_turn_id: int | None = None, source: str = "model") -> dict:
    """Write `model` (a temper decoder of a family with GGUF support) and `tokenizer` as one GGUF
    file at `path`, read it back and check it (see the module). Returns what was written:
    {"tensors": {gguf name: type}, "bytes": file size, "architecture": ...}."""
    gguf = import_gguf()
    if tensor_type not in TENSOR_TYPES:
        raise TemperError(f"tensor_type must be one of {', '.join(TENSOR_TYPES)}; got {tensor_type!r}")
    config = model.config
    export = family_gguf(config, source)
    arch = export.architecture(config)
    packed: dict[str, tuple[str, np.ndarray, tuple[int, ...]]] = {}
    for gguf_name, tensor in export.tensors(model.state_dict(), config):  # every refusal before a write
        kind = tensor_type_for(gguf_name, tensor, tensor_type)
        packed[gguf_name] = (kind, pack(tensor, kind, gguf), tuple(tensor.shape))
    path = Path(path)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or path.stem)
        writer.add_file_type(int(file_types[tensor_type]))
        export.write_hparams(writer, config, gguf.RopeScalingType)
        write_tokenizer(writer, tokenizer, config.vocab_size, source, chat_template=chat_template,
                        end_of_turn_id=end_of_turn_id)
        for gguf_name, (kind, data, _) in packed.items():
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            writer.add_tensor(gguf_name, data, raw_dtype=qtype if kind.startswith("q") else None)
        fields = {key: value for key, value in writer.kv_data[0].items()}
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        check_gguf_file(tmp, fields, packed, gguf, shown=path)
    return {"architecture": arch, "tensors": {n: k for n, (k, _, _) in packed.items()},
            "bytes": os.path.getsize(path)}


def check_gguf_file(path: Path, fields: dict, packed: dict, gguf, *, shown: Path) -> None:
    """Read `path` back with gguf.GGUFReader: every key of `fields` (the writer's) with its type
    and value, and exactly the tensors of `packed` with their types, shapes and bytes."""
    reader = gguf.GGUFReader(str(path))

    def fail(what: str) -> None:
        raise TemperError(f"{shown}: the file read back differs from what was written: {what}")

    for key, value in fields.items():
        field = reader.get_field(key)
        if field is None:
            fail(f"key {key} is missing")
        if field.types[0] != value.type:
            fail(f"key {key} has type {field.types[0].name}, written {value.type.name}")
        got, want = field.contents(), value.value
        if value.type == gguf.GGUFValueType.FLOAT32:
            same = np.float32(got) == np.float32(want)
        elif value.type == gguf.GGUFValueType.ARRAY:
            same = list(got) == [w.decode() if isinstance(w, bytes) else w for w in want]
        else:
            same = got == want
        if not same:
            fail(f"key {key} reads {str(got)[:60]!r}, written {str(want)[:60]!r}")
    tensors = {t.name: t for t in reader.tensors}
    if set(tensors) != set(packed):
        fail(f"tensors {sorted(set(tensors) ^ set(packed))} differ")
    for name, (kind, data, shape) in packed.items():
        t = tensors[name]
        if t.tensor_type.name != kind.upper():
            fail(f"{name} is {t.tensor_type.name}, written {kind.upper()}")
        if tuple(int(d) for d in reversed(t.shape)) != shape:  # ggml lists the row length first
            fail(f"{name} has shape {tuple(reversed(t.shape))}, written {shape}")
        if not np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), data.view(np.uint8).reshape(-1)):
            fail(f"{name}'s bytes differ")
