"""Score rows with a reward model: `temper reward score model=RM data=ROWS.jsonl [output=FILE]`.

    temper reward score model=runs/reward data=responses.jsonl output=scored.jsonl
    temper reward score model=runs/reward data=pairs.jsonl          # JSONL to stdout, summary to stderr

Rows (any file `temper.data.readers` reads): `prompt` + `response` (or `completion`, TRL's
prompt-completion form) get a `score`; preference pairs (`prompt` + `chosen` + `rejected`, or
the implicit-prompt `chosen` + `rejected`) get `chosen_score` and `rejected_score`, and the
summary counts the pairs ranked right (accuracy: a tie is a miss, as in training). Each row is
written as read, plus its scores. Strings or message lists, encoded exactly as `temper reward`
trained on them (`temper.data.preference`'s encoder, with the model's chat template for
messages; strings used as they are, EOS appended), cut to `seq_len` tokens (0: the model's
context) as training cut them. Bad rows are skipped, counted and named by `file:line`, as the
training data's are. The output file appears whole when every row is scored, or not at all.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from temper.config import OnlyWith, check_range, opt
from temper.data.chat import model_chat_template, resolve_template
from temper.data.preference import (
    PreferenceEncoder,
    check_columns,
    detect_preference_format,
    row_to_pair,
    row_to_unpaired,
)
from temper.data.readers import iter_records
from temper.data.rows import DEFAULT_MAX_BAD_ROW_FRACTION, BadRow, BadRows
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError
from temper.io import atomic_writer, claim_output_file
from temper.losses.reward import pearson_correlation
from temper.models.reward import check_reward_model_dir, load_reward_model
from temper.report.summary import number, share
from temper.runtime import resolve_device


@dataclass
class Config:
    model: str = opt("", "the reward model directory (a *ForSequenceClassification with one label)")
    data: list[str] = opt([], "rows to score: prompt+response (or completion) rows, or preference pairs")
    output: str | None = opt(None, "the JSONL file to write (default: stdout)")
    overwrite: bool = opt(False, "replace an existing output file")
    seq_len: int = opt(0, "cut each sequence to this many tokens, as training did (0: the model's context)")
    batch_size: int = opt(16, "sequences scored together")
    columns: dict = opt({}, "rename columns to temper's, e.g. columns.prompt=question (response: columns.completion)")
    template: str | None = opt(None, "chat template for message rows: chatml, llama3, plain, a .jinja file "
                                     "(default: the model's)")
    implicit_prompt: Literal["turn", "common_prefix"] = opt("turn", "implicit prompts end at the last shared '\\n\\nAssistant:' (turn) or are "
                                       "TRL's common prefix")
    skip_bad_rows: bool = opt(True, "skip bad rows, count them and name the first of each reason (false: stop at "
                                    "the first)")
    max_bad_row_fraction: float = opt(DEFAULT_MAX_BAD_ROW_FRACTION, "stop when more than this share of the rows is "
                                                                    "bad")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16")

    only_with: ClassVar = (OnlyWith(("overwrite",), "output=", lambda c: c.output is not None),)

    def validate(self) -> None:
        if not self.model:
            raise TemperError("model= is required: a reward model directory")
        if not self.data:
            raise TemperError("data= is required: a file of prompt+response rows or preference pairs")
        check_range("batch_size", self.batch_size, low=1)
        check_range("seq_len", self.seq_len, low=0)
        check_range("max_bad_row_fraction", self.max_bad_row_fraction, low=0.0, high=1.0)
        check_columns(self.columns)


def run(cfg: Config) -> dict | None:
    if not Path(cfg.model).is_dir():
        raise TemperError(f"model={cfg.model}: no such reward model directory")
    check_reward_model_dir(cfg.model)  # a causal LM, several labels or no score.weight: one line, before any work
    if cfg.output is None:
        return score(cfg, None)
    with claim_output_file(cfg.output, key="output", inputs={"data": cfg.data, "model": cfg.model},
                           overwrite=cfg.overwrite) as target:
        return score(cfg, target)


def read_items(cfg: Config, encoder: PreferenceEncoder, bad: BadRows) -> tuple[list[dict], list[dict], int]:
    """(rows as read, each with its sequences' token ids under `_ids`, ...) and the rows read."""
    kept: list[dict] = []
    rows = 0
    for rec in iter_records(cfg.data):
        rows += 1
        try:
            if not isinstance(rec.data, dict):
                raise BadRow("bad_type", "a row is a JSON object")
            kind = detect_preference_format({**rec.data, **{ours: rec.data.get(theirs) for ours, theirs in
                                                              cfg.columns.items() if theirs in rec.data}})
            if kind in ("explicit", "implicit"):
                pair = row_to_pair(rec.data, rec.source, cfg.columns, implicit_prompt=cfg.implicit_prompt)
                prompt, answers, names = pair.prompt, [pair.chosen, pair.rejected], ["chosen", "rejected"]
            else:
                row = dict(rec.data)
                if "response" in row and "completion" not in row and "completion" not in cfg.columns:
                    row["completion"] = row["response"]
                if not ("prompt" in row or "prompt" in cfg.columns) or "completion" not in row and \
                        "completion" not in cfg.columns:
                    keys = ", ".join(map(str, rec.data)) or "none"
                    raise BadRow("no_columns", f"no columns to score (keys: {keys}); expected prompt+response, "
                                               "prompt+completion or prompt+chosen+rejected")
                example = row_to_unpaired({**row, "label": True}, rec.source, cfg.columns,
                                          implicit_prompt=cfg.implicit_prompt)[0]
                prompt, answers, names = example.prompt, [example.completion], ["response"]
            text, tokens = encoder.prompt(prompt, rec.source)
            ids = [encoder.answer(prompt, text, tokens, a, name, rec.source) for a, name in zip(answers, names)]
            prompt_ids, ids, _, _ = encoder.fit(encoder.prompt_ids(prompt, tokens), ids)
        except BadRow as e:
            bad.add(e, rec.source)
            continue
        kept.append({"row": rec.data, "ids": [prompt_ids + a for a in ids], "answer_tokens": [len(a) for a in ids]})
    bad.check(rows)
    if not kept:
        raise TemperError(f"{', '.join(cfg.data)}: no rows to score ({rows} read)")
    return kept, rows


@torch.no_grad()
def score_sequences(model, sequences: list[tuple[int, ...]], pad_id: int, batch_size: int,
                    device: torch.device) -> dict[tuple[int, ...], float]:
    """The reward of each distinct sequence, scored in batches of similar lengths."""
    order = sorted(set(sequences), key=len)
    rewards: dict[tuple[int, ...], float] = {}
    for start in range(0, len(order), batch_size):
        seqs = order[start:start + batch_size]
        lengths = torch.tensor([len(s) for s in seqs])
        ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
        values = model(ids.to(device), lengths.to(device)).float().tolist()
        rewards.update(zip(seqs, values))
    return rewards


def score(cfg: Config, output: Path | None) -> dict:
    device = resolve_device(cfg.device)
    model = load_reward_model(cfg.model, device=device, dtype=None if cfg.dtype == "auto" else cfg.dtype)
    tokenizer = Tokenizer.from_dir(cfg.model)
    context = model.config.max_seq_len
    if cfg.seq_len > context:
        raise TemperError(f"seq_len {cfg.seq_len} is larger than the context of model={cfg.model} ({context} "
                          "positions): lower seq_len")
    template = resolve_template(cfg.template, tokenizer) if cfg.template else model_chat_template(cfg.model,
                                                                                                   tokenizer)
    encoder = PreferenceEncoder(tokenizer, template, max_len=(cfg.seq_len or context) - 1)
    bad = BadRows("rows to score").set_rule(cfg.skip_bad_rows, cfg.max_bad_row_fraction)
    items, rows = read_items(cfg, encoder, bad)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rewards = score_sequences(model, [tuple(s) for it in items for s in it["ids"]], pad_id, cfg.batch_size,
                              device)

    scores, lengths, pairs, right = [], [], 0, 0
    with atomic_writer(output) if output is not None else contextlib.nullcontext(sys.stdout) as out:
        for it in items:
            values = [rewards[tuple(s)] for s in it["ids"]]
            scores += values
            lengths += it["answer_tokens"]
            if len(values) == 2:
                pairs, right = pairs + 1, right + (values[0] > values[1])
                extra: dict[str, Any] = {"chosen_score": values[0], "rejected_score": values[1]}
            else:
                extra = {"score": values[0]}
            out.write(json.dumps({**it["row"], **extra}, ensure_ascii=False) + "\n")
    values = torch.tensor(scores)
    summary: dict[str, Any] = {"rows_read": rows, "rows_scored": len(items), "skipped_rows": dict(bad.skipped),
                               "sequences": len(scores), "reward_min": float(values.min()),
                               "reward_mean": float(values.mean()), "reward_max": float(values.max()),
                               "length_correlation": pearson_correlation(values, torch.tensor(lengths))}
    if pairs:
        summary.update(pairs=pairs, accuracy=right / pairs)
    if output is None:  # the rows were the stdout: the summary goes to stderr, and the CLI adds nothing
        print("\n".join(summary_lines(cfg, summary)), file=sys.stderr)
        return None
    return summary


def summary_lines(cfg: Config, summary: dict) -> list[str]:
    skipped = sum(summary["skipped_rows"].values())
    head = (f"reward score: {summary['rows_scored']:,} of {summary['rows_read']:,} rows scored"
            + (f" ({skipped:,} skipped: {', '.join(f'{k} {v}' for k, v in summary['skipped_rows'].items())})"
               if skipped else "") + (f" -> {cfg.output}" if cfg.output else ""))
    lines = [head, f"  reward min {number(summary['reward_min'])} · mean {number(summary['reward_mean'])} · max "
                   f"{number(summary['reward_max'])} · correlation with length {number(summary['length_correlation'])}"]
    if "accuracy" in summary:
        lines.append(f"  pairs ranked right: {share(summary['accuracy'])} of {summary['pairs']:,}")
    return lines
