"""Evaluate one model, or several side by side, and write a JSON result and a table.

    temper eval model=runs/sft tasks=world_facts_mc,world_qa
    temper eval models=[runs/pretrain,runs/sft] tasks=world_facts_mc,world_qa data=valid.txt
    temper eval models=[runs/sft,runs/sft-lora] tasks=world_qa judge=rule        # or judge=JUDGE_DIR
    temper eval models=[runs/sft,runs/dpo] tasks=world_chat_qa judge=rule:world  # any scoring judge of temper.rewards.judges
    temper eval models=[runs/sft,runs/dpo] tasks=world_chat_qa judge=reward:runs/rm  # a reward model
    temper eval contamination train=corpus.jsonl eval=test.jsonl                  # n-gram overlap
    temper eval models=[runs/pretrain,runs/sft,runs/dpo] tasks=world_instruct,world_preference,world_chat_qa \
        reward_model=runs/reward reference=runs/sft data=val.jsonl                # a lifecycle's checkpoint table

Tasks are YAML files, or the names of the ones shipped in the package (temper/configs/tasks;
`temper eval --help` lists them). `data=` adds rolling-window perplexity (token, word,
bits per byte) on text, every token scored, as lm-evaluation-harness's loglikelihood_rolling
(see temper.eval.sliding); `text_mode=file` scores each .txt file as one text (wikitext's usual
protocol).
`contamination=` checks every task's rows against training data (13-grams).

Every model's entry also holds `model`: its weights' bytes on disk (every *.safetensors in its
directory), its parameter count (a quantised linear counts its logical in x out weights), its
quantisation and the stage that wrote it (temper.json). A task with `chat: auto` uses the chat
template for a model whose lineage records a chat-tuned template (`chat_template_trained`) and the
plain prompt for the others, so a base model and its SFT descendant are both asked in the form
they can answer. `reward_model=DIR` (a `temper reward` model) adds each generation task's
`reward_model_score`: the mean score of the model's replies, through the same judge as
`judge=reward:DIR`. `reference=DIR` adds `kl_to_reference`: the mean per-token KL(model ||
reference) over the model's greedy reply tokens (temper.eval.kl).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from temper.config import OnlyWith, opt
from temper.configs import shipped_names
from temper.data.prompts import Prompt
from temper.data.readers import SUPPORTED_SUFFIXES, expand_paths, iter_texts
from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError, TemperFileNotFoundError
from temper.eval.contamination import contamination_report
from temper.eval.judge import pairwise, rule_pairwise, summarize
from temper.eval.sliding import sliding_window_perplexity
from temper.eval.tasks import iter_task_rows, load_task, resolve_data, resolve_task, run_task
from temper.io import atomic_write_text, owned_output_dir, weights_bytes
from temper.lineage import read_lineage
from temper.loading import load_for_inference
from temper.models.hf import config_from_hf, read_hf_config, weight_files
from temper.models.reward import check_reward_model_dir
from temper.peft import read_adapter_config
from temper.rewards.judges import DEFAULT_TIMEOUT, KINDS, check_timeout, make_judge, split_spec
from temper.runtime import resolve_device


@dataclass
class Config:
    model: str = opt("", "the model directory to evaluate")
    models: list[str] = opt([], "several model directories, compared side by side")
    tasks: list[str] = opt([], f"task YAML files, or shipped task names ({', '.join(shipped_names('tasks'))})")
    data: list[str] = opt([], f"text for sliding-window perplexity ({'/'.join(SUPPORTED_SUFFIXES)} files, dirs, globs)")
    text_field: str = opt("text", "the JSONL field that holds the text for perplexity")
    text_mode: Literal["paragraph", "line", "file"] = opt(
        "paragraph", "how .txt files in data= split into texts (each scored with its own context): "
        "blank-line paragraphs, lines, or one text per file (wikitext's usual protocol)")
    window: int = opt(256, "perplexity window: tokens fed to the model per pass (lm-eval's max_length)")
    stride: int = opt(128, "new tokens scored per window after the first (= window: lm-eval's rolling windows)")
    world: str | None = opt(None, "the built-in world directory for {world} tasks (default: the model's lineage)")
    judge: str | None = opt(None, "with two models: 'rule' (checkable answers), a judge model directory, or a "
                                  "scoring judge: rule:world, regex:PATTERN, callable:MODULE:FUNC, llm:MODEL_DIR, "
                                  "reward:MODEL_DIR")
    judge_timeout: float = opt(DEFAULT_TIMEOUT, "seconds one call of a callable: judge may take; a call still "
                                                "running then stops the command, naming the sample (0: no limit)")
    reward_model: str | None = opt(None, "a reward model directory (temper reward): each generation task's "
                                         "reward_model_score, the mean score of the model's replies")
    reference: str | None = opt(None, "a reference model directory (e.g. the SFT model): each generation task's "
                                      "kl_to_reference, the mean per-token KL(model || reference) on its replies")
    contamination: list[str] = opt([], "training data whose 13-gram overlap with each task is reported")
    ngram: int = opt(13, "n-gram length for the contamination check")
    output_dir: str = opt("runs/eval", "where results.json and results.md are written")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto, float32, bfloat16 or float16")

    only_with: ClassVar = (
        OnlyWith(("text_field", "text_mode", "window", "stride"), "data= (perplexity)", lambda c: bool(c.data)),
        OnlyWith(("ngram",), "contamination=", lambda c: bool(c.contamination)),
    )

    def validate(self) -> None:
        if not self.model and not self.models:
            raise TemperError("model= or models=[...] is required")
        if self.model and self.models:
            raise TemperError("give model= or models=[...], not both")
        if not self.tasks and not self.data:
            raise TemperError("nothing to evaluate: give tasks=... and/or data=...")
        check_timeout(self.judge_timeout)


def run(cfg: Config) -> dict:
    # everything the run will need is checked before the first model is evaluated
    model_dirs = cfg.models or [cfg.model]
    for model_dir in model_dirs:
        check_model_dir(model_dir, "models=" if cfg.models else "model=")
    tasks = [load_task(resolve_task(t)) for t in cfg.tasks]
    texts = read_eval_texts(cfg) if cfg.data else []
    if cfg.judge:
        check_judge(cfg, model_dirs, tasks)
    if cfg.reward_model:
        try:
            check_reward_model_dir(cfg.reward_model)
        except TemperError as e:
            raise TemperError(f"reward_model={cfg.reward_model}: {str(e).removeprefix(f'{cfg.reward_model}: ')} "
                              "(reward_model= takes a `temper reward` model directory)") from None
    if cfg.reference:
        check_model_dir(cfg.reference, "reference=")
    if (cfg.reward_model or cfg.reference) and not any(t.type == "generation" for t in tasks):
        key = "reward_model=" if cfg.reward_model else "reference="
        raise TemperError(f"{key} scores generated replies, but no task in tasks= is a generation task")
    if cfg.world and not Path(cfg.world).expanduser().is_dir():
        raise TemperFileNotFoundError(f"world= directory not found: {cfg.world}")
    for model_dir in model_dirs:  # every task's rows are found (and a {world} resolved) for every model
        world = cfg.world or read_lineage(model_dir).get("world_dir")
        for task in tasks:
            resolve_data(task, task.data, world)
            if task.few_shot and task.few_shot_data:
                resolve_data(task, task.few_shot_data, world, "few_shot_data")
    if cfg.contamination:
        expand_paths(cfg.contamination, "contamination")
    device = resolve_device(cfg.device)
    with owned_output_dir(cfg.output_dir, command="eval", inputs={"model": model_dirs, "world": cfg.world}) as out:
        return _evaluate(cfg, out, model_dirs, tasks, texts, device)


def _evaluate(cfg: Config, out: Path, model_dirs: list[str], tasks, texts: list[str], device) -> dict:
    results: dict = {"models": model_dirs, "tasks": [t.name for t in tasks], "per_model": {},
                     "reward_model": cfg.reward_model, "reference": cfg.reference}
    reference = load_for_inference(cfg.reference, device=device, dtype=cfg.dtype)[0] if cfg.reference else None
    for model_dir in model_dirs:
        model, tokenizer = load_for_inference(model_dir, device=device, dtype=cfg.dtype)
        lineage = read_lineage(model_dir)
        world = cfg.world or lineage.get("world_dir")
        scores: dict = {"model": model_facts(model_dir, model, lineage)}
        for task in tasks:
            print(f"{model_dir}: {task.name} ...", file=sys.stderr)
            scores[task.name] = run_task(model, tokenizer, task, world_dir=world, reference=reference,
                                         instruction_tuned=bool(lineage.get("chat_template_trained")))
        if texts:
            scores["perplexity"] = sliding_window_perplexity(model, tokenizer, texts, window=cfg.window,
                                                             stride=cfg.stride, device=device)
        results["per_model"][model_dir] = scores
        del model
    del reference
    if cfg.reward_model:
        add_reward_model_scores(cfg, model_dirs, tasks, results, device)
    if cfg.judge:
        results["judge"] = judge_models(cfg, model_dirs, tasks, results, device)
    if cfg.contamination:
        world = cfg.world or read_lineage(model_dirs[0]).get("world_dir")
        eval_sets = {t.name: [f"{r.context} {r.target or ''}".strip() for r in iter_task_rows(t, world_dir=world)]
                     for t in tasks}
        results["contamination_n"] = cfg.ngram
        results["contamination"] = contamination_report(iter_texts(cfg.contamination, field=cfg.text_field),
                                                        eval_sets, n=cfg.ngram)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    table = results_table(results)
    atomic_write_text(out / "results.md", table + "\n")
    failed = [(task, rep["failed"]) for task, rep in (results.get("judge") or {}).items() if rep.get("failed")]
    if failed:  # the models' scores are kept; the command still fails, as no comparison was made
        task, why = failed[0]
        raise TemperError(f"{task}: {why}; no win rate written (the models' scores are in {out / 'results.md'})")
    return results


def model_facts(model_dir: str, model, lineage: dict) -> dict:
    """What the checkpoint table shows beside the scores: bytes of weights on disk (every *.safetensors in
    the directory: an adapter directory counts its adapter), parameters (a quantised linear's logical
    out x in weights, not its packed storage), quantisation and the stage that wrote it (temper.json)."""
    size = weights_bytes(model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) and hasattr(module, "in_features") \
                and hasattr(module, "out_features"):  # packed quantised weights live in buffers
            parameters += module.in_features * module.out_features
    return {"size_bytes": size, "parameters": parameters, "quantized": lineage.get("quantization"),
            "stage": lineage.get("stage")}


def add_reward_model_scores(cfg: Config, model_dirs: list[str], tasks, results: dict, device) -> None:
    """Each generation task's `reward_model_score`: the reward model's mean score of the model's replies
    (the prompt as the user message, through `judge=reward:DIR`'s judge, the RM's own chat template)."""
    judge = make_judge(f"reward:{cfg.reward_model}", device=device, timeout=cfg.judge_timeout)
    try:
        for task in (t for t in tasks if t.type == "generation"):
            for model_dir in model_dirs:
                report = results["per_model"][model_dir][task.name]
                prompts = [Prompt.from_text(o["context"], source=f"{task.name} row {i + 1}")
                           for i, o in enumerate(report["outputs"])]
                scores = judge.rank(prompts, [[o["prediction"]] for o in report["outputs"]])
                values = [s[0] for s in scores if s[0] is not None]
                for o, s in zip(report["outputs"], scores):
                    o["reward_model_score"] = s[0]
                report["reward_model_score"] = sum(values) / len(values) if values else None
    finally:
        judge.close()


def read_eval_texts(cfg: Config) -> list[str]:
    """The texts of `data=`; a file with no text in it is an error naming it (not an empty table)."""
    texts: list[str] = []
    for path in expand_paths(cfg.data):
        found = [t for t in iter_texts(path, field=cfg.text_field, text_mode=cfg.text_mode) if t.strip()]
        if not found:
            raise TemperError(f"{path}: no text to evaluate (the file is empty or only whitespace); "
                              "remove it from data=")
        texts.extend(found)
    return texts


def check_model_dir(path: str, option: str) -> None:
    """Cheap checks that `path` will load (config, weight files, tokenizer), so a typo in the last
    of several models is found before the first is evaluated. Weights are read later."""
    p = Path(path).expanduser()
    try:
        if not p.exists():
            raise TemperError(f"{p}: no such directory")
        if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
            base = read_adapter_config(p).get("base_model_name_or_path")
            if not base or not Path(base).is_dir():
                raise TemperError(f"{p}: the adapter's base model {base!r} is not a directory here")
            p_model = Path(base)
        else:
            p_model = p
        config_from_hf(read_hf_config(p_model), str(p_model / "config.json"))
        weight_files(p_model)
        Tokenizer.from_dir(p)
    except TemperError as e:
        what = "'rule' or a model directory" if option == "judge=" else "a model or adapter directory"
        raise TemperError(f"{option}{path}: {str(e).removeprefix(f'{p}: ')} ({option} takes {what})") from None


def check_judge(cfg: Config, model_dirs: list[str], tasks) -> None:
    """judge= is checked before any model is evaluated: two models, a task with answers to judge, and
    'rule' or a model directory that will load."""
    if len(model_dirs) != 2:
        raise TemperError(f"judge= compares exactly two models (models=[A,B]); got {len(model_dirs)}")
    if not any(t.type == "generation" for t in tasks):
        raise TemperError("judge= compares generated answers, but no task in tasks= is a generation task")
    if scoring_judge(cfg.judge):
        kind, arg = split_spec(cfg.judge)
        if kind == "constitution":
            raise TemperError(f"judge={cfg.judge}: temper eval compares answers with rule:world, regex:, callable:, "
                              "llm: or reward: judges")
        if kind == "llm":
            check_model_dir(arg, "judge=")
        elif kind == "reward":  # its config, weight files and tokenizer, before any model is evaluated
            try:
                check_reward_model_dir(arg)
            except TemperError as e:
                raise TemperError(f"judge={cfg.judge}: {e}") from None
        else:  # a bad pattern, module or function is found before any model is evaluated
            make_judge(cfg.judge)
    elif cfg.judge != "rule":
        check_model_dir(cfg.judge, "judge=")


def scoring_judge(spec: str) -> bool:
    """A `KIND:ARGUMENT` judge of temper.rewards.judges (a directory path has no such prefix)."""
    return spec.partition(":")[0] in KINDS and ":" in spec


def judge_models(cfg: Config, model_dirs: list[str], tasks, results: dict, device) -> dict:
    check_judge(cfg, model_dirs, tasks)
    judge = None  # (model, tokenizer), loaded once for every task
    reports = {}
    for task in tasks:
        outs = [results["per_model"][m][task.name].get("outputs") for m in model_dirs]
        if outs[0] is None:
            continue  # multiple choice: nothing generated to judge
        questions = [o["context"] for o in outs[0]]
        answers = [[o["prediction"] for o in out] for out in outs]
        if cfg.judge == "rule":
            reports[task.name] = rule_pairwise([o["reference"] for o in outs[0]], answers[0], answers[1])
        elif scoring_judge(cfg.judge) and not cfg.judge.startswith("llm:"):
            reports[task.name] = scored_pairwise(cfg.judge, task.name, questions, [o["reference"] for o in outs[0]],
                                                 answers[0], answers[1], device, timeout=cfg.judge_timeout)
        else:
            if judge is None:
                judge = load_for_inference(cfg.judge.removeprefix("llm:"), device=device)
            reports[task.name] = pairwise(*judge, questions, answers[0], answers[1])
        reports[task.name].pop("verdicts", None)
    return reports


def scored_pairwise(spec: str, task: str, questions, references, answers_1, answers_2, device, *,
                    timeout: float = DEFAULT_TIMEOUT) -> dict:
    """`pairwise`'s report from a scoring judge: a system wins a question when its answer scores higher.

    A question the judge fails on for either answer (counted, warned) is left out: `n` counts the
    questions judged, `unjudged` the others. Counting them as ties would pull the win rate towards
    0.5 with an interval that looks measured; a judge that fails on every question gives no win
    rate at all (`win_rate_1` None, and `failed` says why)."""
    judge = make_judge(spec, device=device, timeout=timeout)
    prompts = [Prompt.from_text(q, answer=None if r is None else str(r), source=f"{task} row {i + 1}")
               for i, (q, r) in enumerate(zip(questions, references))]
    judge.check_prompts(prompts)
    scores = judge.rank(prompts, [[a1, a2] for a1, a2 in zip(answers_1, answers_2)])
    judge.close()
    judged = [(i, s1, s2) for i, (s1, s2) in enumerate(scores) if s1 is not None and s2 is not None]
    outcomes = ["tie" if s1 == s2 else "1" if s1 > s2 else "2" for _, s1, s2 in judged]
    report = summarize(outcomes, [{"row": i + 1, "score_1": s1, "score_2": s2} for i, s1, s2 in judged])
    report["unjudged"] = len(scores) - len(judged)
    report["bad_judgements"] = dict(judge.stats.bad)
    if not judged:
        firsts = "; ".join(judge.stats.first_bad[r] for r in sorted(judge.stats.first_bad))
        report.update(win_rate_1=None, ci_95=None,
                      failed=f"judge {judge.name} failed on every answer of {len(scores)} questions "
                             f"({', '.join(f'{n} {r}' for r, n in sorted(judge.stats.bad.items()))}; first: {firsts})")
    return report


def summary_lines(cfg: Config, results: dict) -> list[str]:
    out = Path(cfg.output_dir)
    return [results_table(results), f"  -> {out / 'results.md'}, {out / 'results.json'} (in full)"]


def results_table(results: dict) -> str:
    """Markdown: one row per model, one column per task metric."""
    columns: list[tuple[str, str]] = []
    for scores in results["per_model"].values():
        for task, metrics in scores.items():
            for name, value in metrics.items():
                if isinstance(value, float) and name != "examples_per_second" and (task, name) not in columns:
                    columns.append((task, name))
    head = "| model | " + " | ".join(f"{t}: {m}" for t, m in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for model, scores in results["per_model"].items():
        values = [scores.get(t, {}).get(m, float("nan")) for t, m in columns]
        cells = ["-" if v is None else f"{v:.4g}" for v in values]  # None: nothing to average (no reply token)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    for task, rep in (results.get("judge") or {}).items():
        if rep.get("win_rate_1") is None:
            lines.append(f"\njudge on {task}: no win rate: {rep.get('failed', 'no question was judged')}")
            continue
        lo, hi = rep["ci_95"]
        unjudged = f"; {rep['unjudged']} questions left out (the judge failed on them)" if rep.get("unjudged") else ""
        lines.append(f"\njudge on {task}: model 1 win rate {rep['win_rate_1']:.3f} (95% CI {lo:.3f}-{hi:.3f}); "
                     f"wins {rep['wins_1']} / {rep['wins_2']}, ties {rep['ties']}{unjudged}")
    for task, rep in (results.get("contamination") or {}).items():
        lines.append(f"\ncontamination of {task}: {rep['contaminated']}/{rep['checked']} rows share a "
                     f"{results.get('contamination_n', 13)}-gram with the training data ({rep['fraction']:.1%})")
    return "\n".join(lines)
