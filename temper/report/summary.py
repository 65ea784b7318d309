"""The end of every command: a few lines a person reads (what was trained or written, the number
the stage exists to move, before -> after, where the output went, what to run next), or with
`--json` the command's whole result as JSON for a script. The CLI calls `show` once a command
returns; nothing else prints a command's result.

A command supplies its lines with a module-level `summary_lines(config, result) -> list[str]`;
the training recipes share `training_lines` (their result is the shared loop's summary, the
same dict `summary.json` holds). A command whose product is its stdout (generated text, a
chat) returns None and gets no summary.

    show("pretrain", config, result, as_json=False)
    # pretrain: llama-3m (1.97M parameters) · 500 steps, 2.05M tokens in 3 min 30 s · 9,760 tok/s
    #   val ppl 2.87 (unigram 228.8) · 0.358 bits/byte · facts 77.5% of 240
    #   -> runs/pretrain (the model; summary.json, metrics.jsonl)
    #   next: temper sft model=runs/pretrain
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple


def duration(seconds: float) -> str:
    """'12.3 s' under a minute, else '3 min 05 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class Metric(NamedTuple):
    key: str  # the key in the result (and under `before`)
    label: str  # what a person reads
    share: bool = False  # a fraction of 1, shown as a percentage


# The numbers each training command exists to move, most important first (the first two that the
# run measured are shown); general_ppl is the drift monitor's forgetting measure.
HEADLINES: dict[str, tuple[Metric, ...]] = {
    "pretrain": (Metric("val_ppl", "val ppl"), Metric("val_bpb", "bits/byte"), Metric("fact_accuracy", "facts", True)),
    "sft": (Metric("answer_accuracy", "answers right", True), Metric("exact_match", "exact match", True),
            Metric("eval_loss", "eval loss"), Metric("general_ppl", "general-text ppl")),
    "dpo": (Metric("eval_rewards/accuracies", "preference accuracy", True),
            Metric("eval_rewards/margins", "reward margin"), Metric("eval_loss", "eval loss"),
            Metric("general_ppl", "general-text ppl")),
    "grpo": (Metric("eval_pass_rate", "pass rate", True), Metric("reward", "reward"),
             Metric("general_ppl", "general-text ppl")),
    "ppo": (Metric("eval_pass_rate", "pass rate", True), Metric("objective/scores", "reward-model score"),
            Metric("general_ppl", "general-text ppl")),
    "reward": (Metric("eval_accuracy", "pair accuracy", True), Metric("eval_solution_accuracy", "solutions right", True),
               Metric("eval_step_accuracy", "steps right", True), Metric("eval_loss", "eval loss")),
    "finetune-encoder": (Metric("eval_accuracy", "accuracy", True), Metric("eval_loss", "eval loss")),
    "encoder": (Metric("eval_mlm_accuracy", "masked-token accuracy", True),
                Metric("eval_sentence_accuracy", "sentence accuracy", True),
                Metric("eval_retrieval_accuracy", "retrieval accuracy", True),
                Metric("eval_disc_accuracy", "replaced-token accuracy", True),
                Metric("paraphrase_recall_at_1", "paraphrase recall@1", True), Metric("eval_loss", "eval loss")),
}
SHOWN = 3  # headline numbers per line at most
PEFT_NAMES = {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA", "adapter": "bottleneck adapters",
              "prefix": "prefix tuning", "prompt": "prompt tuning"}

# What a person runs next with a command's output directory (OUT).
NEXT: dict[str, str] = {
    "pretrain": "temper sft model={out}",
    "encoder": "temper finetune-encoder model={out}",
    "sft": "temper eval model={out} (or temper dpo model={out})",
    "dpo": "temper eval model={out} (or temper grpo model={out})",
    "grpo": "temper eval model={out}",
    "ppo": "temper eval model={out}",
    "reward": "temper ppo model=SFT_DIR reward_model={out}",
    "finetune-encoder": "temper eval model={out}",
}


def number(v: Any) -> str:
    """A measurement to the precision that means something: three significant digits, one decimal
    from 100 up (228.8), whole with separators from 10,000 up; integers whole ('-' for none)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def share(v: Any) -> str:
    """A fraction of 1 as a percentage with one decimal (0.8083 -> '80.8%')."""
    return f"{100 * v:.1f}%" if _measured(v) else "-"


def count(n: int | float) -> str:
    """A count a person reads at a glance: 2,048; 122.9K; 2.05M."""
    if abs(n) >= 1e6:
        return f"{n / 1e6:.3g}M"
    if abs(n) >= 1e5:
        return f"{n / 1e3:.4g}K"
    return f"{int(n):,}"


def _measured(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _value(metric: Metric, v: Any) -> str:
    return share(v) if metric.share else number(v)


def headline(command: str, result: dict) -> list[str]:
    """'label before -> after' (or 'label after') for the first SHOWN headline metrics the run measured."""
    before = result.get("before") if isinstance(result.get("before"), dict) else {}
    parts = []
    for metric in HEADLINES.get(command, ()):
        after = result.get(metric.key)
        if not _measured(after):
            continue
        was = before.get(metric.key)
        text = f"{metric.label} {_value(metric, was)} -> {_value(metric, after)}" if _measured(was) else \
            f"{metric.label} {_value(metric, after)}"
        if metric.key == "val_ppl" and _measured(result.get("unigram_val_ppl")):
            text += f" (unigram {number(result['unigram_val_ppl'])})"
        if metric.key == "fact_accuracy" and _measured(result.get("fact_probes")):
            text += f" of {result['fact_probes']:,}"
        parts.append(text)
        if len(parts) == SHOWN:
            break
    return [" · ".join(parts)] if parts else []


def _trained(command: str, config: Any, result: dict) -> str:
    """What was trained: the model, and for post-training how (full, or which adapter)."""
    model = getattr(config, "model", "") or "?"
    params = result.get("params") or result.get("total_parameters") or result.get("parameters")
    if command in ("pretrain", "encoder"):
        what = f"{model} ({count(params)} parameters)" if params else str(model)
        objective = result.get("objective")
        return f"{what}, {objective}" if command == "encoder" and objective else what
    peft = getattr(getattr(config, "peft", None), "method", "none")
    trainable, total = result.get("trainable_parameters"), result.get("total_parameters")
    size = f"{count(trainable)} trainable" if trainable else ""
    if size and total:
        size += f" of {count(total)}"
    if peft and peft != "none":
        rank = getattr(config.peft, "r", None) if peft in ("lora", "dora", "qlora") else None
        how = PEFT_NAMES.get(peft, peft) + (f" r {rank}" if rank else "")
        return f"{model} with {how}" + (f" ({size})" if size else "")
    return f"{model}, full fine-tuning" + (f" ({size})" if size else "")


def training_lines(command: str, config: Any, result: dict) -> list[str]:
    """A training command's summary: what was trained and for how long, the headline numbers,
    where the model went, what to run next."""
    steps, tokens, seconds = result.get("steps"), result.get("train_tokens"), result.get("train_seconds")
    kind = "encoder" if command == "pretrain" and result.get("objective", "clm") != "clm" else command
    head = f"{command}: {_trained(kind, config, result)}"
    if steps is not None:
        head += f" · {steps:,} steps"
        if tokens:
            head += f", {count(tokens)} tokens"
        if _measured(seconds):
            head += f" in {duration(seconds)}"
    if _measured(result.get("tokens_per_second")):
        head += f" · {round(result['tokens_per_second']):,} tok/s"
    if result.get("parallel"):
        head += f" · {result['parallel']}"
    lines = [head, *("  " + h for h in headline(kind, result))]
    if result.get("skipped_steps"):
        lines.append(f"  {result['skipped_steps']} steps skipped (a non-finite loss or gradient)")
    out = getattr(config, "output_dir", None)
    if out:
        peft = getattr(getattr(config, "peft", None), "method", "none")
        what = "the adapter" if peft not in (None, "none") else "the model"
        lines.append(f"  -> {out} ({what}; summary.json, metrics.jsonl)")
        if kind in NEXT:
            lines.append("  next: " + NEXT[kind].format(out=out))
    return lines


def show(command: str, config: Any, result: Any, *, as_json: bool,
         lines: Callable[[Any, Any], list[str]] | None = None) -> None:
    """Print the end of `command` on stdout: `result` as JSON (`as_json`), else `lines(config,
    result)` (a command's own `summary_lines`), else the training summary (every command has one
    of the two: tests/test_summary.py)."""
    if result is None:  # the command's product was its stdout
        return
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
        return
    text = lines(config, result) if lines is not None else training_lines(command, config, result)
    sys.stdout.write("\n".join(text) + "\n")
    sys.stdout.flush()
