"""Evaluation tasks defined in YAML: multiple choice (log-likelihood) and generation.

```yaml
name: world_facts_mc
type: multiple_choice            # or: generation, preference
data: "{world}/eval/facts_mc.jsonl"  # relative to the YAML file, absolute, or under {world}
prompt: "Question: {question}\\nAnswer:"   # Python format fields of the row
choices: choices                 # row field with the list of choices (multiple_choice)
gold: gold                       # row field with the gold index (multiple_choice)
target: answer                   # row field with the reference (generation), or a format string over the row
chosen: chosen                   # preference: the row fields of the preferred and the dispreferred reply
rejected: rejected
chat: false                      # true: the prompt as a user message through the model's chat template;
                                 # auto: so when the model's lineage says it was instruction-tuned
chat_prompt: null                # the user message in chat form (default: prompt)
metrics: [acc, acc_norm]         # generation: exact_match, answer_accuracy, f1, bleu, chrf, rouge
few_shot: 0                      # examples from few_shot_data, or the first rows of data (not scored)
answer_pattern: null             # generation: regex extracting the answer (group 1 if any)
generation: {max_new_tokens: 32, stop: ["\\n"]}
```

A preference task scores pairs: a pair counts as right when the model gives the chosen reply
a higher log-probability after the prompt than the rejected one (`acc`, summed; `acc_norm`,
divided by the reply's characters), through the multiple-choice scorer with two choices (the
rejected one listed first, so an exact tie counts as wrong).

Every mistake is a `TemperError` naming the task (and the row): a missing or unknown key,
a row without a field, a gold index out of range, an empty data file.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from temper.config import from_dict, load_yaml, opt
from temper.configs import shipped_names, shipped_path
from temper.data.chat import end_of_turn_strings, render
from temper.data.readers import iter_records
from temper.errors import TemperError, TemperFileNotFoundError, require_file
from temper.eval import metrics
from temper.eval.generation import contains_answer, normalize
from temper.eval.kl import reply_kl
from temper.eval.multiple_choice import evaluate_multiple_choice
from temper.models.generate import SamplingConfig, generate_text

MC_METRICS = ("acc", "acc_norm")  # multiple_choice and preference
GEN_METRICS = ("exact_match", "answer_accuracy", "f1", "bleu", "chrf", "rouge")
REQUIRED = ("name", "type", "data", "prompt")


@dataclass
class TaskGeneration:
    max_new_tokens: int = opt(32, "greedy tokens generated per example")
    stop: list[str] = opt(["\n"], "stop strings: the reply is cut at the first")


@dataclass
class TaskConfig:
    name: str = opt(help="task name (in metrics and errors)")
    type: Literal["multiple_choice", "generation", "preference"] = opt(help="how the task is scored")
    data: str = opt(help="JSONL/JSON/parquet rows: relative to the YAML file, absolute, or '{world}/...'")
    prompt: str = opt(help="Python format string over the row's fields (e.g. {question}, {messages[0][content]})")
    choices: str = opt("choices", "multiple_choice: the row field holding the list of choices")
    gold: str = opt("gold", "multiple_choice: the row field with the gold choice's index")
    target: str = opt("answer", "generation: the row field with the reference answer, or a format string over "
                                "the row's fields ({messages[1][content]})")
    chosen: str = opt("chosen", "preference: the row field with the preferred reply (a string or assistant messages)")
    rejected: str = opt("rejected", "preference: the row field with the dispreferred reply")
    answer_template: str = opt(" {answer}", "how a choice / few-shot answer follows the prompt")
    metrics: list[str] = opt([], "metrics to report (empty: acc, acc_norm / exact_match, answer_accuracy)")
    few_shot: int = opt(0, "few-shot examples put before every prompt")
    few_shot_data: str | None = opt(None, "rows for the few-shot examples (null: the first rows of data)")
    few_shot_separator: str = opt("\n\n", "between the few-shot examples and before the prompt")
    answer_pattern: str | None = opt(None, "generation: regex that extracts the answer (group 1 if present)")
    limit: int | None = opt(None, "score at most this many rows")
    chat: bool | Literal["auto"] = opt(False, "generation, preference: send the prompt as a user message through the "
                                              "model's chat template; auto: when the model's lineage says it was "
                                              "instruction-tuned (else the plain prompt)")
    chat_prompt: str | None = opt(None, "the user message when the chat template is used (default: prompt)")
    conversation: str | None = opt(None, "generation: the row field holding a conversation (messages); the model "
                                         "answers its last assistant turn: through the chat template it reads every "
                                         "turn before it (system turns too), and prompt / target may use {question} "
                                         "(the last user turn) and {reply} (that assistant turn)")
    generation: TaskGeneration = opt(TaskGeneration(), "generation settings")
    base_dir: str | None = field(default=None, init=False, repr=False)  # the YAML's folder

    def validate(self) -> None:
        scored = self.type in ("multiple_choice", "preference")  # by log-likelihood
        allowed = MC_METRICS if scored else GEN_METRICS
        if not self.metrics:
            self.metrics = list(MC_METRICS if scored else ("exact_match", "answer_accuracy"))
        for m in self.metrics:
            if m not in allowed:
                raise TemperError(f"task {self.name}: metric {m!r} is not available for {self.type} "
                                  f"(choose from {', '.join(allowed)})")
        if self.few_shot < 0:
            raise TemperError(f"task {self.name}: few_shot must be >= 0, got {self.few_shot}")
        if self.limit is not None and self.limit < 1:
            raise TemperError(f"task {self.name}: limit must be >= 1, got {self.limit}")
        if self.conversation is not None and (self.type != "generation" or self.few_shot):
            raise TemperError(f"task {self.name}: conversation= is for generation tasks without few_shot")
        if self.type == "preference" and self.few_shot:
            raise TemperError(f"task {self.name}: few_shot is not available for preference tasks")
        for key in ("prompt", "chat_prompt", "answer_template", "few_shot_separator"):
            if getattr(self, key) is None:
                continue
            fields = _format_fields(self.name, key, getattr(self, key))
            if any(f == "" or f.isdigit() for f in fields):
                raise TemperError(f"task {self.name}: {key} has a positional field ({{}} or {{0}}); name the row's "
                                  "field, e.g. {question} (write {{ and }} for literal braces)")
            if key not in ("prompt", "chat_prompt") and not fields <= ({"answer"} if key == "answer_template" else set()):
                allowed = "{answer}" if key == "answer_template" else "no fields"
                raise TemperError(f"task {self.name}: {key} uses {', '.join('{' + f + '}' for f in sorted(fields))}; "
                                  f"it takes {allowed} (write {{{{ and }}}} for literal braces)")
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except re.error as e:
                raise TemperError(f"task {self.name}: answer_pattern is not a valid regex ({e})") from None


def resolve_task(spec: str) -> Path:
    """A task YAML file, or the name of one shipped in the package (temper/configs/tasks/NAME.yaml)."""
    path = Path(spec)
    if path.is_file() or (path.exists() and not path.is_dir()):  # a FIFO or a device: load_task names it
        return path
    shipped = shipped_path(spec, "tasks")
    if shipped is not None:
        return shipped
    names = ", ".join(shipped_names("tasks")) or "none found"
    raise TemperError(f"task {spec!r}: no such file, and not a shipped task ({names})")


def _format_fields(task: str, key: str, template: str) -> set[str]:
    """The top-level field names of a Python format string; a malformed one is named here, at load,
    instead of failing on the first row after the model is loaded."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemperError(f"task {task}: {key} {template!r} is not a valid format string ({e}; write {{{{ and }}}} "
                          "for literal braces)") from None
    return {re.split(r"[.\[]", name, maxsplit=1)[0] for _, name, _, _ in parsed if name is not None}


def load_task(path: str | Path) -> TaskConfig:
    """A task from its YAML file; every key is checked (unknown keys get a suggestion)."""
    p = require_file(path, "task file")
    data = load_yaml(p)
    return task_from_dict(data, base_dir=p.parent, source=str(p))


def task_from_dict(data: dict, *, base_dir: str | Path | None = None, source: str | None = None) -> TaskConfig:
    name = data.get("name") or (Path(source).stem if source else "?")
    where = f" ({source})" if source else ""
    for key in REQUIRED:
        if key not in data or data[key] is None:
            raise TemperError(f"task {name}: missing key '{key}'{where}")
    task = from_dict(TaskConfig, data, source=f"task {name}{where}")
    task.base_dir = str(base_dir) if base_dir is not None else None
    return task


def resolve_data(task: TaskConfig, spec: str, world_dir: str | Path | None = None, key: str = "data") -> Path:
    """The file of a task's `data` (or `few_shot_data`): '{world}' is the world directory (relative to
    the working directory, as every path the user types), another relative path is relative to the
    task's YAML. The world's multiple-choice questions, when the world has no eval/facts_mc.jsonl, are
    derived from its facts.json when read (checked here): nothing is written into the world."""
    if "{world}" in spec:
        if world_dir is None:
            raise TemperError(f"task {task.name}: {key} {spec!r} needs the built-in world: give world=DIR (or a model "
                              "whose temper.json records its world)")
        spec = spec.replace("{world}", str(Path(world_dir).expanduser().absolute()))
    p = Path(spec).expanduser()
    if not p.is_absolute() and task.base_dir is not None:
        p = Path(task.base_dir) / p
    if _derived_world_mc(p, world_dir):
        world_mc_rows(world_dir)
        return p
    if not p.exists():
        raise TemperFileNotFoundError(f"task {task.name}: {key} not found: {p}")
    return p


def _derived_world_mc(path: Path, world_dir: str | Path | None) -> bool:
    """Whether `path` is the world's eval/facts_mc.jsonl that the world lacks (derived when read)."""
    return (world_dir is not None and path == Path(world_dir).expanduser().absolute() / "eval" / "facts_mc.jsonl"
            and not path.exists())


@dataclass
class TaskRow:
    index: int  # 1-based row number in its data file
    context: str  # the formatted prompt (without few-shot examples)
    choices: list[str] | None = None
    gold: int | None = None
    target: str | None = None
    row: dict = field(default_factory=dict)
    message: str = ""  # the user message when the chat template is used (the task's chat_prompt, else context)
    turns: list[dict] | None = None  # conversation tasks: the turns before the one answered (message is the last)


def _format_row(where: str, key: str, template: str, row: dict) -> str:
    try:
        return template.format(**row)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        keys = ", ".join(row) or "none"
        raise TemperError(f"{where}: the {key} needs field {e.args[0]!r}, which the row lacks (keys: {keys})") from None


def _reply_text(where: str, row: dict, key: str, what: str) -> str:
    """A preference row's reply: a string, or assistant messages (their contents joined)."""
    if key not in row:
        raise TemperError(f"{where}: missing field '{key}' (the {what} reply)")
    value = row[key]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in value):
        return "".join(m["content"] for m in value)
    if isinstance(value, str) and value:
        return value
    raise TemperError(f"{where}: field '{key}' must be a non-empty string or a list of messages with 'content'")


def _conversation(where: str, row: dict, key: str) -> tuple[list[dict], dict]:
    """The turns before a conversation's last assistant turn, and the row's fields with {question}
    (the last user turn) and {reply} (that assistant turn)."""
    messages = row.get(key)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise TemperError(f"{where}: field '{key}' must be a list of messages with 'role' and 'content'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    users = [m for m in messages[:last or 0] if m["role"] == "user"]
    if last is None or not users:
        raise TemperError(f"{where}: field '{key}' needs a user turn followed by an assistant turn")
    turns = [dict(m) for m in messages[:last]]
    return turns, {**row, "question": users[-1]["content"], "reply": messages[last]["content"]}


def _prepare(task: TaskConfig, index: int, row: dict) -> TaskRow:
    where = f"task {task.name} row {index}"
    turns = None
    if task.conversation is not None:
        turns, row = _conversation(where, row, task.conversation)
    context = _format_row(where, "prompt", task.prompt, row)
    message = _format_row(where, "chat_prompt", task.chat_prompt, row) if task.chat_prompt is not None else context
    if task.type == "preference":  # the rejected reply first: an exact tie counts as wrong
        choices = [_reply_text(where, row, task.rejected, "rejected"), _reply_text(where, row, task.chosen, "chosen")]
        return TaskRow(index, context, choices=choices, gold=1, row=row, message=message)
    if task.type == "multiple_choice":
        if task.choices not in row:
            raise TemperError(f"{where}: missing field '{task.choices}' (the choices)")
        choices = row[task.choices]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, (str, int, float)) for c in choices):
            raise TemperError(f"{where}: field '{task.choices}' must be a non-empty list of strings")
        if task.gold not in row:
            raise TemperError(f"{where}: missing field '{task.gold}' (the gold index)")
        gold = row[task.gold]
        if isinstance(gold, bool) or not isinstance(gold, int):
            raise TemperError(f"{where}: gold index must be an integer, got {gold!r}")
        if not 0 <= gold < len(choices):
            raise TemperError(f"{where}: gold index {gold} is out of range for {len(choices)} choices")
        return TaskRow(index, context, choices=[str(c) for c in choices], gold=gold, row=row, message=message)
    if "{" in task.target:  # a format string over the row (a reply inside its messages)
        target = _format_row(where, "target", task.target, row)
    elif task.target not in row or row[task.target] is None:
        raise TemperError(f"{where}: missing field '{task.target}' (the reference)")
    else:
        target = str(row[task.target])
    if turns is not None:  # the chat template reads the whole conversation; the last user turn is the message
        last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
        turns[last_user]["content"] = message
    return TaskRow(index, context, target=target, row=row, message=message, turns=turns)


def _read_rows(task: TaskConfig, path: Path, world_dir: str | Path | None = None) -> Iterator[TaskRow]:
    rows = world_mc_rows(world_dir) if _derived_world_mc(path, world_dir) else (rec.data for rec in iter_records(path))
    empty = True
    for i, row in enumerate(rows, 1):
        empty = False
        yield _prepare(task, i, row)
    if empty:
        raise TemperError(f"task {task.name}: the data file {path} holds no rows")


def _answer_text(task: TaskConfig, r: TaskRow) -> str:
    return r.choices[r.gold] if task.type in ("multiple_choice", "preference") else r.target


def few_shot_prefix(task: TaskConfig, rows: list[TaskRow]) -> str:
    """The few-shot examples (prompt + answer), each followed by the separator."""
    return "".join(r.context + task.answer_template.format(answer=_answer_text(task, r)) + task.few_shot_separator
                   for r in rows)


def iter_task_rows(task: TaskConfig, *, world_dir: str | Path | None = None) -> Iterator[TaskRow]:
    """The scored rows (validated; few-shot rows taken from the data are left out; `limit` applies)."""
    rows = _read_rows(task, resolve_data(task, task.data, world_dir), world_dir)
    if task.few_shot and task.few_shot_data is None:
        for _ in range(task.few_shot):
            next(rows, None)
    n = 0
    for r in rows:
        if task.limit is not None and n >= task.limit:
            return
        n += 1
        yield r
    if n == 0:
        raise TemperError(f"task {task.name}: no rows left to score after {task.few_shot} few-shot examples")


def task_few_shot(task: TaskConfig, *, world_dir: str | Path | None = None) -> str:
    if not task.few_shot:
        return ""
    spec = task.few_shot_data or task.data
    shots = []
    key = "few_shot_data" if task.few_shot_data else "data"
    for r in _read_rows(task, resolve_data(task, spec, world_dir, key), world_dir):
        shots.append(r)
        if len(shots) == task.few_shot:
            break
    if len(shots) < task.few_shot:
        raise TemperError(f"task {task.name}: few_shot is {task.few_shot} but {spec} holds only {len(shots)} rows")
    return few_shot_prefix(task, shots)


def extract_answer(task: TaskConfig, text: str) -> str:
    if task.answer_pattern is None:
        return text.strip()
    m = re.search(task.answer_pattern, text)
    if m is None:
        return ""
    return (m.group(1) if m.groups() else m.group(0)).strip()


def _external_metrics(task: TaskConfig, name: str, predictions: list[str], references: list[str]) -> dict:
    """f1 / bleu / chrf / rouge from temper.eval.metrics (sacrebleu and rouge-score are imported
    there, only when asked for).

    f1: mean SQuAD token F1 (0-1); bleu, chrf: sacrebleu corpus scores (0-100) plus their
    signature; rouge: ROUGE-L F (0-1) plus rouge1/rouge2/rougeL."""
    if name == "f1":
        return {"f1": sum(metrics.token_f1(p, r) for p, r in zip(predictions, references)) / len(predictions)}
    fn = getattr(metrics, name, None)
    if fn is None:
        raise TemperError(f"task {task.name}: metric {name!r} is not provided by temper.eval.metrics")
    value = fn(predictions, references)
    if isinstance(value, dict):
        return {name: float(value.get("rougeL", next(iter(value.values())))), **{k: float(v) for k, v in value.items()}}
    if isinstance(value, tuple):
        return {name: float(value[0]), f"{name}_signature": value[1]}
    return {name: float(value)}


def uses_chat(task: TaskConfig, instruction_tuned: bool) -> bool:
    """Whether `task`'s prompts go through the model's chat template: `chat: true`, or `chat: auto` and a
    model whose lineage says it was instruction-tuned."""
    return task.chat is True or (task.chat == "auto" and instruction_tuned)


def _chat_prompt(task: TaskConfig, tokenizer, message: str, turns: list[dict] | None = None) -> str:
    """The chat template's prompt: the one user `message`, or a conversation task's `turns`."""
    if not tokenizer.chat_template:
        raise TemperError(f"task {task.name}: chat=true but the model has no chat template")
    return render(tokenizer.chat_template, turns or [{"role": "user", "content": message}], add_generation_prompt=True,
                  bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")


def run_task(model, tokenizer, task: TaskConfig, *, world_dir: str | Path | None = None,
             batch_size: int = 16, use_cache: bool = True, instruction_tuned: bool = False,
             reference=None) -> dict:
    """Score `task`; returns its metrics plus examples and examples_per_second.

    `instruction_tuned`: the model was chat-tuned (its lineage says so), which `chat: auto` follows.
    A generation task also returns `tokens_per_second` (new tokens generated, stop strings' overshoot
    and EOS included, over the wall seconds of generation), `outputs` (each with `correct`: the row
    met the task's answer_accuracy, else its exact_match) and, given a `reference` model (same
    tokenizer), `kl_to_reference`: temper.eval.kl.reply_kl over the greedy replies."""
    chat = uses_chat(task, instruction_tuned)
    prefix = task_few_shot(task, world_dir=world_dir)
    rows = list(iter_task_rows(task, world_dir=world_dir))
    if task.type in ("multiple_choice", "preference"):
        if chat:  # the replies follow the template's generation prompt as they are
            items = [{"context": _chat_prompt(task, tokenizer, prefix + r.message), "gold": r.gold,
                      "choices": list(r.choices), "answers": list(r.choices)} for r in rows]
        else:
            items = [{"context": prefix + r.context, "gold": r.gold,
                      "choices": [task.answer_template.format(answer=c) for c in r.choices],
                      "answers": [str(c) for c in r.choices]} for r in rows]  # acc_norm counts the bare answer
        result = evaluate_multiple_choice(model, tokenizer, items, use_cache=use_cache)
        out = {m: result[m] for m in task.metrics}
        out.update(examples=result["examples"], examples_per_second=result["examples_per_second"], chat=chat)
        return out

    cfg = SamplingConfig(max_new_tokens=task.generation.max_new_tokens, stop=tuple(task.generation.stop))
    was_training = model.training
    model.eval()
    new_tokens: list[int] = []
    start = time.perf_counter()
    try:
        if chat:  # an instruction-tuned model reads its own template (a mismatch looks like a broken model)
            prompts = [_chat_prompt(task, tokenizer, prefix + r.message, r.turns) for r in rows]
            cfg = SamplingConfig(**{**cfg.__dict__, "stop": tuple(cfg.stop) + tuple(end_of_turn_strings(tokenizer.chat_template))})
        else:
            prompts = [prefix + r.context for r in rows]
        replies = generate_text(model, tokenizer, prompts, cfg, batch_size=batch_size, new_token_counts=new_tokens)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    predictions = [extract_answer(task, t) for t in replies]
    references = [r.target for r in rows]
    out: dict = {}
    em = [normalize(p) == normalize(t) for p, t in zip(predictions, references)]
    contains = [contains_answer(p, t) for p, t in zip(predictions, references)]
    for m in task.metrics:
        if m == "exact_match":
            out[m] = sum(em) / len(rows)
        elif m == "answer_accuracy":
            out[m] = sum(contains) / len(rows)
        else:
            out.update(_external_metrics(task, m, predictions, references))
    correct = contains if "answer_accuracy" in task.metrics else em
    out.update(examples=len(rows), examples_per_second=len(rows) / seconds if seconds > 0 else float("inf"),
               tokens_per_second=sum(new_tokens) / seconds if seconds > 0 else float("inf"), chat=chat)
    if reference is not None:
        out["kl_to_reference"] = reply_kl(model, reference, tokenizer, prompts, replies)
    out["outputs"] = [{"context": r.message if chat else r.context, "prediction": p, "reference": t, "correct": c}
                      for r, p, t, c in zip(rows, predictions, references, correct)]  # for judges and inspection
    return out


# ----------------------------------------------------------------------------- the built-in world

MC_FACTS = {"job": "What is {name}'s job?", "town": "In which town does {name} live?",
            "colour": "What is {name}'s favourite colour?"}


def world_mc_rows(world_dir: str | Path, *, seed: int = 0, num_choices: int = 4) -> list[dict]:
    """The world's multiple-choice questions, from facts.json: one per person and fact (job, town,
    colour) with the right value and `num_choices - 1` other values of that fact seen in the world;
    the gold position is random but seeded."""
    world_dir = Path(world_dir)
    facts_file = world_dir / "facts.json"
    if not facts_file.is_file():
        raise TemperFileNotFoundError(f"{facts_file} not found (write a world with `temper world` first)")
    try:
        facts = json.loads(facts_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TemperError(f"{facts_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    people = facts.get("people") if isinstance(facts, dict) else None
    if not isinstance(people, list) or not all(isinstance(p, dict) for p in people):
        raise TemperError(f"{facts_file}: expected {{\"people\": [{{...}}, ...]}} as `temper world` writes it")
    for i, p in enumerate(people):
        lacking = [k for k in ("name", *MC_FACTS) if k not in p]
        if lacking:
            raise TemperError(f"{facts_file}: person {i} has no {lacking[0]!r} (expected name, {', '.join(MC_FACTS)})")
    rng = random.Random(seed)
    rows = []
    for key, question in MC_FACTS.items():
        values = sorted({str(p[key]) for p in people})
        if len(values) < num_choices:
            raise TemperError(f"{facts_file}: only {len(values)} distinct values of {key!r}; need {num_choices}")
        for p in people:
            right = str(p[key])
            wrong = rng.sample([v for v in values if v != right], num_choices - 1)
            gold = rng.randrange(num_choices)
            choices = wrong[:gold] + [right] + wrong[gold:]
            rows.append({"question": question.format(name=p["name"]), "choices": choices, "gold": gold,
                         "answer": right, "meta": {"person": p["name"], "key": key}})
    rng.shuffle(rows)
    return rows


def build_world_mc(world_dir: str | Path, *, seed: int = 0, num_choices: int = 4) -> Path:
    """Write `world_mc_rows` to `world_dir/eval/facts_mc.jsonl` (a world's owner may keep them there; the
    world_facts_mc task derives them when read, without writing). Returns the file's path."""
    rows = world_mc_rows(world_dir, seed=seed, num_choices=num_choices)
    out = Path(world_dir) / "eval" / "facts_mc.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["TaskConfig", "TaskRow", "load_task", "task_from_dict", "iter_task_rows", "run_task", "uses_chat",
           "build_world_mc", "world_mc_rows", "extract_answer", "few_shot_prefix"]
