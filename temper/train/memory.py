"""The memory planner: what a training or inference run holds on each device, and what
compute-optimal training costs, worked out from the model's shape alone (no weights read, no tensor made).

Per device, in bytes:

- **weights**: every parameter in `dtype` (the compute copy; a 4-bit NF4 base for QLoRA,
  byte for byte as `temper/quant/nf4.py` stores it; LoRA adapters in fp32, as temper makes
  them) plus the rotary tables temper keeps as buffers.
- **gradients**: one per trainable parameter, in the weights' dtype (fp32 for adapters).
- **optimiser states**: AdamW's m and v (fp32 under mixed precision, else the weights'
  dtype), 8-bit AdamW's two bytes, SGD's momentum; under mixed precision also the fp32
  master weights. That is the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3.1):
  2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master weights, m and v) = 16 bytes per
  trained parameter. PyTorch autocast and FSDP2 keep fp32 weights (4) and fp32 gradients (4)
  instead, with m and v (8): also 16.
- **activations**: what autograd saves in the forward pass for the backward pass, counted
  tensor by tensor from what temper's models keep (`layer_activation_bytes`), checked against
  `torch.autograd.graph.saved_tensors_hooks` in tests/test_estimate.py.
- **temporaries**: what lives only for a moment at the peak: a chunk of fp32 logits in
  temper's fused cross-entropy (or the full fp32 logits of an unfused one), the gradients of
  one block's activations in the backward pass, a dequantised NF4 weight, the weights FSDP
  gathers for one unit and the gradients it has not yet reduce-scattered.

Sharding: ZeRO-1 divides optimiser states by `dp`, ZeRO-2 also gradients, ZeRO-3 (FSDP) also
weights. Tensor parallelism divides the linear and embedding weights (norms are replicated)
and, assuming sequence parallelism (Korthikanti et al. 2022), every activation, by `tp`.

The peak: temper drops gradients after each step (`set_to_none`), and the backward pass builds
them as it frees activations, so the peak is weights + optimiser states + the most of three
moments: at the loss (every activation + the loss's temporaries), in the backward pass of the
first or the last block differentiated (the activations left, the gradients made so far, one
block's working set: a straight line in between), and at the optimiser step (every gradient).
Where gradients outlive the step (gradient accumulation; DDP's buckets and ZeRO-1/2's
gradient partitions with dp > 1) they are counted at every moment. Checked against temper's
measured peaks by benchmarks/bench_estimate.py.

Compute: the Chinchilla compute-optimal point (Hoffmann et al. 2022) D = 20 N tokens,
C = 6 N D FLOPs, and the time this takes at a model-FLOPs utilisation on a number of GPUs.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from temper.errors import TemperError
from temper.models import registry
from temper.models.config import ModelConfig
from temper.models.family import BlockLayout
from temper.models.hf import config_from_hf, read_hf_config
from temper.models.registry import PRESETS

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets: tensor cores for bf16/fp16,
# the CUDA cores for fp32 (PyTorch does not use TF32 for matmuls unless told to).
PEAK_TFLOPS = {
    "h100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # H100 SXM
    "h200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # same compute as H100 SXM, more memory
    "a100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},  # A100 SXM
}


def _llama_shape(**kw) -> ModelConfig:
    return ModelConfig(family="llama", **kw)


# Published shapes (the models' config.json on the Hugging Face hub): hidden, layers, heads,
# KV heads, intermediate, vocabulary. Llama 2 uses multi-head attention up to 13B.
SHAPES: dict[str, ModelConfig] = {
    "llama2-7b": _llama_shape(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                              intermediate_size=11008, max_seq_len=4096, norm_eps=1e-5),
    "llama2-13b": _llama_shape(vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40,
                               intermediate_size=13824, max_seq_len=4096, norm_eps=1e-5),
    "llama2-70b": _llama_shape(vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                               intermediate_size=28672, max_seq_len=4096, norm_eps=1e-5),
    "llama3.1-8b": _llama_shape(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                intermediate_size=14336, max_seq_len=131072, rope_theta=500000.0),
    "llama3.1-70b": _llama_shape(vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                 intermediate_size=28672, max_seq_len=131072, rope_theta=500000.0),
    "llama3.1-405b": _llama_shape(vocab_size=128256, hidden_size=16384, num_layers=126, num_heads=128,
                                  num_kv_heads=8, intermediate_size=53248, max_seq_len=131072, rope_theta=500000.0),
}


# ----------------------------------------------------------------------------- the model's shape


def layout(c: ModelConfig) -> BlockLayout:
    """The block layout of `c`'s family (temper.models.family.BlockLayout): what this planner reads."""
    found = registry.family(c.family)
    if found.layout is None:
        raise TemperError(f"the memory planner has no block layout for the {c.family} family ({found.description})")
    return found.layout


def block_linears(c: ModelConfig) -> list[tuple[str, int, int, bool]]:
    """(name within a block, in_features, out_features, has bias) of every linear of one block."""
    return layout(c).block_linears(c)


@dataclass
class ParameterCounts:
    linear_weights: int  # the blocks' matrices (what QLoRA quantises and TP splits)
    linear_biases: int
    embeddings: int  # token embedding and an untied output layer (vocabulary-parallel under TP)
    replicated: int  # norms, learned positions: kept whole on every TP rank
    largest_linear: int  # elements of the largest block matrix
    per_block: int

    @property
    def total(self) -> int:
        return self.linear_weights + self.linear_biases + self.embeddings + self.replicated


def parameter_counts(c: ModelConfig) -> ParameterCounts:
    """Parameters of a temper model of shape `c`, by kind (tied embeddings counted once)."""
    linears = block_linears(c)
    weights = sum(i * o for _, i, o, _ in linears)
    biases = sum(o for _, _, o, b in linears if b)
    shape = layout(c)
    norm = 2 * c.hidden_size if shape.norm_bias else c.hidden_size  # LayerNorm has a bias
    vocab = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2)
    positions = c.max_seq_len * c.hidden_size if shape.positions == "learned" else 0
    norms = shape.norms_per_block
    return ParameterCounts(linear_weights=c.num_layers * weights, linear_biases=c.num_layers * biases,
                           embeddings=vocab,
                           replicated=(norms * c.num_layers + 1) * norm + positions + shape.extra_parameters(c),
                           largest_linear=max(i * o for _, i, o, _ in linears),
                           per_block=weights + biases + norms * norm)


def buffer_elements(c: ModelConfig) -> int:
    """Elements of the buffers temper keeps: the rotary cos and sin tables (max_seq_len x head_dim)."""
    return 2 * c.max_seq_len * c.head_dim if layout(c).positions == "rotary" else 0


def lora_targets(c: ModelConfig, targets: list[str]) -> list[tuple[str, int, int, bool]]:
    """The block linears LoRA wraps: `all-linear`, or names as temper's `target_modules` takes them
    (a leaf such as `q_proj`, or a dotted tail such as `mlp.c_proj`)."""
    linears = block_linears(c)
    if list(targets) == ["all-linear"]:
        return linears
    chosen = []
    for entry in targets:
        found = [lin for lin in linears if lin[0] == entry or lin[0].endswith("." + entry)]
        if not found:
            names = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n, *_ in linears))
            raise TemperError(f"lora_targets entry {entry!r} matches no linear of a {c.family} block; "
                              f"linears: {names}, or all-linear")
        chosen += [lin for lin in found if lin not in chosen]
    return chosen


def lora_parameters(c: ModelConfig, r: int, targets: list[str]) -> int:
    """r x (in + out) for every wrapped linear of every block."""
    return c.num_layers * sum(r * (i + o) for _, i, o, _ in lora_targets(c, targets))


def nf4_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes `temper.quant.nf4.quantize_nf4` stores for a weight of `numel` elements: two 4-bit
    codes per byte (padded to whole blocks), and one scale per block: fp32, or with double
    quantisation int8 plus one fp32 scale per 256 blocks and one fp32 mean."""
    blocks = -(-numel // block_size)
    packed = blocks * block_size // 2
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * -(-blocks // 256) + 4


# ----------------------------------------------------------------------------- models by name or size


def scaled_llama(n_params: float) -> ModelConfig:
    """A Llama-2-like shape of about `n_params` parameters, for a bare count (`7b`, `8e9`).

    The rule: head_dim 128; layers = hidden / 128 (Llama 2 7B and 13B); multi-head attention
    below hidden 8192 and 8 KV heads from there (as Llama 2 70B); vocabulary 32000, untied;
    4096 positions; hidden a multiple of 512 (1024 with GQA); the SwiGLU intermediate size, a
    multiple of 256, set so the count comes out at `n_params`; of the hidden sizes, the one
    whose intermediate size is nearest 8/3 x hidden (the SwiGLU convention).
    """
    best: tuple[float, ModelConfig] | None = None
    for hidden in range(512, 65537, 512):
        gqa = hidden >= 8192
        if gqa and hidden % 1024:
            continue
        heads, layers = hidden // 128, max(2, hidden // 128)
        kv = 8 if gqa else heads
        shape = dict(vocab_size=32000, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     max_seq_len=4096, norm_eps=1e-5)
        without_mlp = parameter_counts(_llama_shape(intermediate_size=1, **shape)).total - layers * 3 * hidden
        inter = 256 * round((n_params - without_mlp) / (3 * layers * hidden) / 256)
        if inter < 256:
            break
        score = abs(math.log(inter / hidden / (8 / 3)))
        if best is None or score < best[0]:
            best = (score, _llama_shape(intermediate_size=inter, **shape))
    if best is None or best[0] > math.log(1.5):  # nothing near a SwiGLU shape
        if n_params > 1e9:  # the rule fits every count from ~0.5B: past its widest shape, the count is too large
            hidden = 65536
            widest = _llama_shape(vocab_size=32000, hidden_size=hidden, num_layers=hidden // 128,
                                  num_heads=hidden // 128, num_kv_heads=8, max_seq_len=4096, norm_eps=1e-5,
                                  intermediate_size=256 * int(1.5 * 8 / 3 * hidden / 256))
            raise TemperError(f"model: {_count(n_params)} parameters is too large for the scaled Llama-like shapes "
                              f"(at most ~{_count(parameter_counts(widest).total)}: hidden {hidden}, {hidden // 128} "
                              "layers); name a preset (llama3.1-405b, ...) and widen it with model_config.*")
        raise TemperError(f"model: {_count(n_params)} parameters is too small for a Llama-like shape (the "
                          "embeddings would dominate; at least ~0.5B); name a preset such as llama-14m")
    return best[1]


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbt])\s*$", re.IGNORECASE)
_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(spec: str) -> float | None:
    """`7b` -> 7e9, `350m` -> 3.5e8, `8e9` -> 8e9; None if `spec` is not a count."""
    m = _COUNT.match(spec)
    if m:
        return float(m.group(1)) * _SCALE[m.group(2).lower()]
    try:
        value = float(spec)
    except ValueError:
        return None
    return value if value >= 1e6 and math.isfinite(value) else None


def resolve_model(spec: str, overrides: dict | None = None) -> tuple[ModelConfig, str]:
    """(shape, how it was found) for a planner preset, a temper preset, a model directory
    (its config.json only; no weights are read) or a bare parameter count."""
    overrides = dict(overrides or {})
    if spec in SHAPES:
        return SHAPES[spec].with_overrides(overrides), f"{spec} (published shape)"
    if spec in PRESETS:
        return PRESETS[spec].with_overrides(overrides), f"{spec} (temper preset)"
    if Path(spec).is_dir():
        if overrides:
            raise TemperError(f"model_config.* changes a preset's shape; model={spec} is a directory whose "
                              "config.json fixes it")
        return config_from_hf(read_hf_config(spec), str(Path(spec) / "config.json")), f"{spec} (config.json)"
    count = parse_count(spec)
    if count is not None:
        shape = scaled_llama(count).with_overrides(overrides)
        return shape, f"{spec} (scaled Llama-2-like shape)"
    names = [*SHAPES, *PRESETS]
    close = difflib.get_close_matches(spec, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise TemperError(f"model={spec!r} is not a preset{hint}, a model directory or a parameter count such as 7b "
                      f"or 8e9; presets: {', '.join(names)}")


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """One way to run a model; the fields mean what `temper estimate` documents for its keys."""

    method: str = "full"  # full | lora | qlora
    dtype: str = "bf16"  # the weights' (and compute) dtype
    mixed_precision: bool = True  # fp32 master weights and optimiser states beside bf16/fp16 weights
    optimizer: str = "adamw"  # adamw | adamw8bit | sgd
    zero: int = 0  # 0 (DDP) .. 3 (FSDP)
    dp: int = 1
    tp: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    activation_checkpointing: str = "none"  # none | full | selective
    cross_entropy: str = "fused"  # fused (temper, chunked) | full (fp32 logits of every token)
    loss_chunk: int = 1024
    packing: bool = False  # an explicit attention mask (temper SFT's packing): SDPA keeps it per layer
    lora_r: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    quant_block_size: int = 64
    double_quant: bool = True
    inference: bool = False
    batch: int = 1
    context: int = 2048

    @property
    def dt(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch (training) or of every cached sequence (inference)."""
        return self.batch * self.context if self.inference else self.micro_batch * self.seq_len


@dataclass
class Breakdown:
    """Bytes per device, with a line saying how each part was counted."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    kv_cache: int = 0
    peak: int = 0
    how: dict[str, str] = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer


def _mib(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < GiB else f"{n / GiB:,.2f} GiB"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


# ----------------------------------------------------------------------------- activations


# CUDA's fused dropout (native_dropout) keeps a bool mask, 1 byte per element; on the CPU, PyTorch
# multiplies by a noise tensor of the input's dtype and keeps that (dt bytes): tests pass `dt`.
DROPOUT_MASK_BYTES = 1
# the share of the tokens an encoder's MLM head reads (BERT's 15%): its loss sees only those
MLM_SHARE = 0.15


def layer_activation_bytes(c: ModelConfig, dt: int, trainable: list[str] | None, *, input_grad: bool = True,
                           lora_r: int = 0, dropout_mask: int = DROPOUT_MASK_BYTES) -> int:
    """Bytes one block saves for its backward pass, per token, with every tensor in the compute
    dtype `dt` as temper's models run (SDPA's flash kernel: no seq x seq matrix).

    `trainable`: None for full fine-tuning, else the block linears that carry a LoRA adapter
    (fp32 adapters, as temper makes them); `input_grad`: whether the block's input requires a
    gradient (not so for the first block when the embeddings are frozen).

    The family's BlockLayout says which: with RMSNorm (fp32 inside) and a SwiGLU MLP (Llama), per token:
      each norm: its input upcast to fp32 (4h) and 1/rms (4), the normalised x (dt h) when its
        scale is trained, its output (dt h) when a trained linear reads it;
      attention: rotated q and k, v, the output (dt (2q + 2kv)), logsumexp (4 per head);
      MLP: gate, silu(gate), up, their product (dt 4I);
      so with full fine-tuning 2(4 + 2dt)h + dt(2q + 2kv + 4I) + 4 heads + 8 (h=q: dt(6h + 2kv + 4I) + 8h).
    With LayerNorm and a GELU MLP (GPT-2), per token: each LayerNorm its input, mean and rstd (dt (h + 2)) and its output (dt h)
      when a trained linear reads it; c_attn's q, k, v and the attention output (dt (2q + 2kv)),
      logsumexp; c_fc's output (GELU's input) and GELU's output (dt 2I).
    A frozen linear keeps nothing for its weight; its LoRA adapter keeps its input in fp32 (one
    copy per adapter when dt is not fp32, as `LoRALinear` casts per module) and A's output.
    With `c.dropout` (BERT: post-LayerNorm, a GELU MLP, dropout 0.1): each residual branch's
    dropout (after the attention's output projection and after the MLP) keeps its mask,
    `dropout_mask` bytes per element (2 h per token); attention dropout keeps only its RNG state in
    the fused (memory-efficient) kernel, which runs with a padding mask and dropout, so no
    seq x seq matrix (the CPU's math fallback does keep one: tests measure with it off).
    """
    full = trainable is None
    wrapped = set() if full else set(trainable)
    h, inter, heads = c.hidden_size, c.intermediate_size, c.num_heads
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def site(dim: int, readers: list[str], kept: bool = False) -> int:
        """The input of `readers` (linears that share it), kept by whichever needs it."""
        if full:
            return 0 if kept else dt * dim
        n = sum(r in wrapped for r in readers)
        if n == 0 or (kept and dt == 4):
            return 0
        return 4 * dim if dt == 4 else n * 4 * dim

    adapters = 4 * lora_r * len(wrapped)  # each adapter's A output, kept by B
    shape = layout(c)
    norm = norm_saved_bytes(shape, dt, h, full)
    attention_in, mlp_in = set(shape.attention_in), set(shape.mlp_in)
    b = (norm if input_grad else 0) + site(h, list(shape.attention_in))
    attn_grad = input_grad or bool(wrapped & attention_in)
    b += dt * (2 * q + 2 * kv) + 4 * heads if attn_grad else 0
    b += site(q, [shape.attention_out], kept=attn_grad)
    mlp_grad = attn_grad or shape.attention_out in wrapped
    b += norm if mlp_grad else 0
    b += site(h, list(shape.mlp_in))
    kept = 3 if shape.gated_mlp else 1  # SwiGLU: gate, silu(gate), up; GELU: its input
    b += kept * dt * inter if mlp_grad or bool(wrapped & mlp_in) else 0
    b += 2 * dropout_mask * h if c.dropout and (mlp_grad or bool(wrapped & mlp_in)) else 0
    return b + site(inter, [shape.mlp_out]) + adapters


def norm_saved_bytes(shape: BlockLayout, dt: int, h: int, full: bool) -> int:
    """Per token, what one norm saves: LayerNorm its input, mean and rstd (dt (h + 2)); RMSNorm
    its input upcast to fp32 and 1/rms (4h + 4), and the normalised x when its scale trains."""
    if shape.norm == "layer":
        return dt * (h + 2)
    return 4 * h + 4 + (dt * h if full else 0)


def selective_layer_bytes(c: ModelConfig, dt: int) -> int:
    """Per token, what torchtitan's per-op selective checkpointing keeps of a Llama block: the
    block input, the output of every other matmul (q, v, gate and down projections) and the
    attention's output and logsumexp; the rest is recomputed."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return dt * (c.hidden_size + q + kv + c.intermediate_size + c.hidden_size + q) + 4 * c.num_heads


def outside_layers_bytes(c: ModelConfig, dt: int, full: bool, seq_len: int, batch: int,
                         dropout_mask: int = DROPOUT_MASK_BYTES) -> int:
    """What the model keeps outside its blocks for one micro-batch: token ids (when the embedding
    trains), the rotary tables (or learned positions' ids), the final norm's saved tensors. An
    encoder (BERT): the token-type ids (B, T) too, and its norm is the embeddings' (post-LN: the
    last block ends in its own), followed by the embeddings' dropout mask."""
    tokens = seq_len * batch
    ids = 8 * tokens if full else 0
    shape = layout(c)
    if shape.positions == "learned":
        positions = 8 * seq_len if full else 0  # the position ids the embedding's backward reads
    else:
        positions = 2 * seq_len * c.head_dim * dt  # cos, sin (1, 1, T, head_dim), shared by every block
    types = 8 * tokens if full and c.type_vocab_size else 0  # the token-type ids the recipes pass
    dropout = dropout_mask * (c.embedding_size or c.hidden_size) * tokens if c.dropout else 0
    return ids + positions + types + dropout + norm_saved_bytes(shape, dt, c.hidden_size, full) * tokens


def mlm_head_bytes(c: ModelConfig, dt: int, tokens: int) -> int:
    """What an encoder's MLM loss keeps: the [selected] mask (1 byte a token), and at the MLM_SHARE
    of the tokens it reads: the gathered hidden states, the transform's GELU input, its LayerNorm's
    input, mean and rstd, the decoder's input (dt (4 E + 2)), the fp32 log-probabilities (4 V) and the
    targets (8); E is the transform's width (ELECTRA's generator: its embedding size)."""
    n = math.ceil(MLM_SHARE * tokens)
    e = c.embedding_size or c.hidden_size
    return tokens + n * (dt * (3 * e + c.hidden_size + 2) + 4 * c.vocab_size + 8)


@dataclass
class Activations:
    """What one micro-batch keeps for the backward pass on one device, in bytes."""

    block: int  # kept by one block from the forward to the backward pass
    first: int  # kept by the first block (less when the embeddings are frozen)
    again: int  # recomputed for the block being differentiated (activation checkpointing)
    outside: int  # the final norm, token ids, rotary tables, a packing mask
    loss: int  # the loss's saved tensors (freed once its backward has run)
    layers: int
    how: str

    @property
    def kept(self) -> int:
        return self.first + (self.layers - 1) * self.block + self.outside + self.loss


def activation_bytes(c: ModelConfig, plan: Plan, *, dropout_mask: int = DROPOUT_MASK_BYTES) -> Activations:
    """The activations of one micro-batch on one device, block by block (`dropout_mask`: bytes per
    element of a dropout mask, `DROPOUT_MASK_BYTES`)."""
    dt, tokens, tp = plan.dt, plan.tokens, plan.tp
    trainable = None if plan.method == "full" else [n for n, *_ in lora_targets(c, plan.lora_targets)]
    r = 0 if trainable is None else plan.lora_r
    mask = dt * plan.seq_len * tokens if plan.packing else 0  # SDPA's additive copy of a (B, 1, T, T) mask
    if is_encoder(c):  # SDPA's additive copy of the (B, 1, 1, T) padding mask, per block
        mask = dt * tokens
    layer = layer_activation_bytes(c, dt, trainable, lora_r=r, dropout_mask=dropout_mask) * tokens + mask
    first = layer_activation_bytes(c, dt, trainable, input_grad=trainable is None, lora_r=r,
                                   dropout_mask=dropout_mask) * tokens + mask
    outside = outside_layers_bytes(c, dt, trainable is None, plan.seq_len, plan.micro_batch, dropout_mask)
    outside += plan.seq_len * tokens if plan.packing else 0  # the boolean mask itself
    if is_encoder(c):  # the MLM head at the selected positions; its decoder's gradient is made in the backward
        loss = mlm_head_bytes(c, dt, tokens)
    else:
        loss = dt * c.hidden_size * tokens  # fused: the gradient of the hidden states; unfused: the hidden states
    if plan.cross_entropy == "fused" and trainable is None and not is_encoder(c):
        loss += 4 * c.vocab_size * c.hidden_size  # the output layer's fp32 gradient, made in the forward pass
    L = c.num_layers
    if plan.activation_checkpointing == "full":
        block = first = dt * c.hidden_size * tokens
        again = layer
        how = f"{L} block inputs x {_mib(block)} + one block recomputed ({_mib(layer)})"
    elif plan.activation_checkpointing == "selective":
        block = first = selective_layer_bytes(c, dt) * tokens
        again = max(0, layer - block)
        how = f"{L} layers x {_mib(block)} (per-op selective) + the rest of one block recomputed ({_mib(again)})"
    else:
        block, again = layer, 0
        how = f"{L} layers x {_mib(layer)}"
    how += f" + {_mib(outside + loss)} outside them" + (f", / tp {tp}" if tp > 1 else "")
    return Activations(block // tp, first // tp, again // tp, outside // tp, loss // tp, L, how)


# ----------------------------------------------------------------------------- weights, states


def weight_bytes(c: ModelConfig, plan: Plan) -> tuple[int, str]:
    """Bytes of the weights as the run holds them (not yet divided by dp for ZeRO-3)."""
    dt, tp = plan.dt, plan.tp
    counts = parameter_counts(c)
    if plan.method == "qlora":
        linears = c.num_layers * sum(nf4_bytes(i * o, plan.quant_block_size, plan.double_quant)
                                     for _, i, o, _ in block_linears(c))
        how = f"NF4 blocks of {plan.quant_block_size}" + (" + double-quantised scales" if plan.double_quant else "")
    else:
        linears = dt * counts.linear_weights
        how = f"{plan.dtype}"
    total = (linears + dt * (counts.linear_biases + counts.embeddings)) // tp
    total += dt * (counts.replicated + buffer_elements(c))
    if plan.method in ("lora", "qlora"):
        total += 4 * lora_parameters(c, plan.lora_r, plan.lora_targets) // tp
        how += f" + fp32 LoRA adapters (r={plan.lora_r})"
    return total, how


def trainable_parameters(c: ModelConfig, plan: Plan) -> int:
    if plan.method == "full":
        return parameter_counts(c).total
    return lora_parameters(c, plan.lora_r, plan.lora_targets)


def optimizer_bytes_per_parameter(plan: Plan) -> tuple[float, str]:
    """Optimiser bytes per trained parameter (the fp32 master copy under mixed precision included)."""
    adapters = plan.method != "full"  # fp32 adapters: no master copy, fp32 states
    state = 4 if adapters or plan.mixed_precision or plan.dtype == "fp32" else plan.dt
    if plan.optimizer == "adamw":
        per, how = 2 * state, f"AdamW m, v ({2 * state} B)"
    elif plan.optimizer == "adamw8bit":
        per, how = 2 * (1 + 4 / 2048), "8-bit AdamW m, v (2 B + a fp32 scale per 2048)"
    else:
        per, how = state, f"SGD momentum ({state} B)"
    if plan.mixed_precision and not adapters:
        per, how = per + 4, how + " + fp32 master weights (4 B)"
    return per, how


# ----------------------------------------------------------------------------- the breakdowns


def training_memory(c: ModelConfig, plan: Plan) -> Breakdown:
    """Per-device bytes of one training step, and the peak (see the module docstring)."""
    dt, dp, tp = plan.dt, plan.dp, plan.tp
    out = Breakdown()
    counts = parameter_counts(c)
    trained = trainable_parameters(c, plan)
    adapters = plan.method != "full"
    grad_bytes = 4 if adapters else dt
    shard_w = dp if plan.zero >= 3 else 1
    shard_g = dp if plan.zero >= 2 else 1
    shard_s = dp if plan.zero >= 1 else 1

    weights, how = weight_bytes(c, plan)
    out.weights = weights // shard_w
    out.how["weights"] = how + (f", / dp {dp} (ZeRO-3)" if shard_w > 1 else "") + (f", / tp {tp}" if tp > 1 else "")
    out.gradients = grad_bytes * trained // tp // shard_g
    out.how["gradients"] = (f"{_count(trained)} trained x {grad_bytes} B" + (f", / dp {dp}" if shard_g > 1 else "")
                            + (f", / tp {tp}" if tp > 1 else ""))
    per, how = optimizer_bytes_per_parameter(plan)
    out.optimizer = int(per * trained) // tp // shard_s
    out.how["optimizer"] = f"{_count(trained)} x {per:g} B: {how}" + (f", / dp {dp}" if shard_s > 1 else "")
    acts = activation_bytes(c, plan)
    out.activations, out.how["activations"] = acts.kept + acts.again, acts.how

    # what else lives at the loss (the end of the forward pass) and in the backward pass
    tokens = plan.tokens // tp
    vocab = c.vocab_size // tp
    up = 0 if dt == 4 else 1  # a half-precision matmul result is cast to fp32 beside itself
    forward: list[tuple[int, str]] = []
    backward: list[tuple[int, str]] = []
    if is_encoder(c):  # the MLM head's cross-entropy over the selected tokens only (unfused)
        n = math.ceil(MLM_SHARE * tokens)
        forward.append((12 * n * vocab, f"MLM cross-entropy at {n} selected tokens ({MLM_SHARE:.0%}): fp32 "
                                        f"log-probs, their gradient and the logits' gradient, {n} x {vocab} x 12 B"))
    elif plan.cross_entropy == "fused":  # measured allocation by allocation in temper/losses/clm.py
        chunk = min(plan.loss_chunk, tokens)
        one = (4 + up * dt) * chunk * vocab  # fp32 logits of a chunk, and their gradient in dt
        grad_w = (dt + up * 4) * vocab * c.hidden_size if not adapters else 0
        two = (8 + up * 2 * dt) * chunk * vocab if tokens > chunk else 0  # the next chunk before the last goes
        what = (f"fused cross-entropy: fp32 logits of two {chunk} x {vocab} chunks" if two > one + grad_w else
                f"fused cross-entropy: fp32 logits of a {chunk} x {vocab} chunk"
                + (" and its output-layer gradient" if grad_w else ""))
        forward.append((max(one + grad_w, two), what))
    else:
        forward.append((12 * tokens * vocab, f"unfused cross-entropy: fp32 log-probs, their gradient and the "
                                             f"logits' gradient, {tokens} x {vocab} x 12 B"))
    # the MLP's backward: the gradients of its two (GPT-2: one) intermediate tensors beside the block's
    # activations, and the down projection's weight gradient
    widths = 2 if layout(c).gated_mlp else 1
    work = dt * widths * c.intermediate_size // tp * tokens
    work += 0 if adapters else grad_bytes * c.intermediate_size * c.hidden_size // tp // shard_g
    backward.append((work, "one block's activation gradients"))
    if plan.method == "qlora":
        backward.append(((8 + up * dt) * counts.largest_linear // tp, "one dequantised NF4 weight"))
    if plan.zero >= 3 and dp > 1:
        gathered = (counts.embeddings // tp + c.hidden_size + 2 * (counts.per_block // tp)) * dt
        unreduced = (counts.embeddings // tp + counts.per_block // tp) * grad_bytes if not adapters else 0
        forward.append((gathered, "FSDP: gathered weights of the root unit and 2 blocks"))
        backward.append((gathered + unreduced, "FSDP: gathered weights + unreduced gradients of the root and a block"))
    fwd, bwd = sum(b for b, _ in forward), sum(b for b, _ in backward)

    persistent = plan.grad_accum > 1 or (dp > 1 and plan.zero < 3)
    # Block j's backward pass (j = L-1 first, down to 0) holds the activations of blocks 0..j, block j's
    # recomputed rest, and the gradients of the output layer and of blocks j+1..L-1: a straight line in j,
    # so its highest point is the first or the last block differentiated.
    early = block_grads = 0
    if not persistent:  # otherwise the gradients are counted whole already
        early = 0 if adapters else grad_bytes * c.vocab_size * c.hidden_size // tp // shard_g
        per_block = counts.per_block if not adapters else trained // c.num_layers
        block_grads = grad_bytes * per_block // tp // shard_g
    blocks = acts.kept - acts.outside - acts.loss  # the loss's and the final norm's are freed before
    at_last_block = blocks + acts.again  # differentiated first: every block's activations still kept
    at_first_block = acts.first + acts.again + (c.num_layers - 1) * block_grads  # differentiated last
    at_loss, in_backward = acts.kept + fwd, max(at_last_block, at_first_block) + early + bwd
    chosen, out.temporaries = (forward, fwd) if at_loss >= in_backward else (backward, bwd)
    where = "at the loss" if chosen is forward else (
        "in the first block's backward pass" if at_first_block > at_last_block else "in the last block's backward pass")
    out.how["temporaries"] = where + ": " + "; ".join(w for _, w in chosen)
    if persistent:
        out.peak = out.model_states + max(at_loss, in_backward)
        out.how["peak"] = (f"weights + gradients + optimiser + activations + temporaries {where} (gradients outlive "
                           "the step)")
    else:
        out.peak = out.weights + out.optimizer + max(at_loss, in_backward, out.gradients)
        out.how["peak"] = ("weights + optimiser + all gradients (at the step)" if out.gradients > max(
            at_loss, in_backward) else f"weights + optimiser + what lives {where}" + (
            ": the activations left, the gradients made so far and the temporaries" if chosen is backward else
            ": activations + temporaries (gradients are made later, as activations are freed)"))
    return out


def kv_heads_per_device(c: ModelConfig, tp: int) -> int:
    """KV heads each TP rank holds: a share, or one replicated head when tp exceeds them."""
    kv = c.num_kv_heads
    return kv // tp if kv % tp == 0 else 1


def kv_cache_bytes(c: ModelConfig, batch: int, context: int, dt: int, tp: int = 1) -> int:
    """Keys and values of every layer: 2 x layers x kv_heads x head_dim x dt per token per sequence,
    as `DecoderBase.new_cache` preallocates them."""
    return 2 * c.num_layers * kv_heads_per_device(c, tp) * c.head_dim * dt * batch * context


def is_encoder(c: ModelConfig) -> bool:
    """A bidirectional encoder (BERT, ELECTRA): no generation, so no KV cache."""
    return not registry.family(c.family).causal_lm


def inference_memory(c: ModelConfig, plan: Plan) -> Breakdown:
    """Per-device bytes of generation with a KV cache of `batch` sequences of `context` tokens;
    for an encoder, of one forward pass over them (`encoder_inference_memory`)."""
    if is_encoder(c):
        return encoder_inference_memory(c, plan)
    dt, tp = plan.dt, plan.tp
    out = Breakdown()
    out.weights, how = weight_bytes(c, plan)
    out.how["weights"] = how + (f", / tp {tp}" if tp > 1 else "")
    out.kv_cache = kv_cache_bytes(c, plan.batch, plan.context, dt, tp)
    per_token = kv_cache_bytes(c, 1, 1, dt, tp)
    out.how["kv_cache"] = (f"{_mib(per_token)} per token = 2 x {c.num_layers} layers x {kv_heads_per_device(c, tp)} "
                           f"KV heads x {c.head_dim} x {dt} B; {_mib(per_token * plan.context)} per sequence")
    tokens = plan.tokens
    q, kv, h = c.num_heads * c.head_dim // tp, kv_heads_per_device(c, tp) * c.head_dim, c.hidden_size
    # prefill, one layer at a time: the block's input, the residual, the normed x and SwiGLU's three
    # (B, T, I) tensors (GELU's two); or q, k, v and the rotary products
    mlp = (3 * h + (3 if layout(c).gated_mlp else 2) * c.intermediate_size // tp) * dt * tokens
    attention = (2 * h + 5 * q + 2 * kv) * dt * tokens
    prefill = max(mlp, attention)
    # when a sequence ends, the cache's keys (then values) are copied for the rows that remain
    leave = out.kv_cache // 2 * (plan.batch - 1) // plan.batch
    dequant = (8 + (dt if dt != 4 else 0)) * parameter_counts(c).largest_linear // tp if plan.method == "qlora" else 0
    out.temporaries = max(prefill, leave) + dequant + (dt + 4) * plan.batch * c.vocab_size
    out.how["temporaries"] = (f"prefill of {plan.batch} x {plan.context} tokens, one layer's working set"
                              if prefill >= leave else "a finished sequence leaving the batch: the cache's keys "
                              "copied for the remaining rows") + (" + one dequantised NF4 weight" if dequant else "")
    out.peak = out.weights + out.kv_cache + out.temporaries
    out.how["peak"] = "weights + KV cache + temporaries"
    return out


def encoder_inference_memory(c: ModelConfig, plan: Plan) -> Breakdown:
    """Per-device bytes of an encoder's inference: ONE forward pass (no gradient) over `batch`
    sequences of `context` tokens, which every position attends in both directions, so nothing
    is cached between tokens (no KV cache): the weights, and at the peak one block's working set
    (its input, q, k, v, the attention's output and its contiguous copy, the residual; or the
    MLP's input, residual and GELU's two (B, T, I) tensors) beside the head's output, at most
    logits over the vocabulary at every position (an MLM head; a classifier's are smaller)."""
    dt, tp = plan.dt, plan.tp
    out = Breakdown()
    out.weights, how = weight_bytes(c, plan)
    out.how["weights"] = how + (f", / tp {tp}" if tp > 1 else "")
    out.how["kv_cache"] = "none: an encoder runs one forward pass over the whole sequence"
    tokens = plan.tokens
    q, kv, h = c.num_heads * c.head_dim // tp, kv_heads_per_device(c, tp) * c.head_dim, c.hidden_size
    mlp = (3 * h + (3 if layout(c).gated_mlp else 2) * c.intermediate_size // tp) * dt * tokens
    attention = (2 * h + 3 * q + 2 * kv) * dt * tokens
    head = (h + c.vocab_size) * dt * tokens  # the MLM transform's output and the logits
    dequant = (8 + (dt if dt != 4 else 0)) * parameter_counts(c).largest_linear // tp if plan.method == "qlora" else 0
    out.temporaries = max(mlp, attention, head) + dequant
    out.how["temporaries"] = (f"one forward pass of {plan.batch} x {plan.context} tokens: "
                              + ("the head's logits over the vocabulary" if head >= max(mlp, attention)
                                 else "one block's working set") + (" + one dequantised NF4 weight" if dequant else ""))
    out.peak = out.weights + out.temporaries
    out.how["peak"] = "weights + temporaries (no KV cache)"
    return out


# ----------------------------------------------------------------------------- compute


def chinchilla_tokens(n_params: float, tokens_per_param: float = 20.0) -> float:
    """Compute-optimal training tokens, D ~ 20 N (Hoffmann et al. 2022, table 3)."""
    return tokens_per_param * n_params


def training_flops(n_params: float, tokens: float) -> float:
    """C = 6 N D: 2 N per token forward, 4 N backward (Kaplan et al. 2020), attention left out."""
    return 6.0 * n_params * tokens


def training_seconds(flops: float, gpus: int, peak_tflops: float, mfu: float) -> float:
    return flops / (gpus * peak_tflops * 1e12 * mfu)
