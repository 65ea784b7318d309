"""Iterative (online) DPO: the policy answers, a judge ranks, DPO trains, and again. A workflow:
each round runs the `temper dpo` command (and, with LoRA, `temper merge`) through the command
runner the CLI hands it; nothing here imports a recipe.

    temper online-dpo model=runs/sft rounds=2                           # judge=rule:world, the world's rl prompts
    temper online-dpo model=runs/sft judge=regex:'^[A-Z][^.]*\\.$'
    temper online-dpo model=runs/sft judge=callable:my_judges:score prompts=prompts.jsonl
    temper online-dpo model=runs/sft judge=llm:runs/judge
    temper online-dpo model=runs/sft judge=reward:runs/rm                # a reward model (temper.models.reward)
    temper online-dpo model=runs/sft judge=constitution:runs/sft         # AI feedback (temper.rewards.feedback)
    temper online-dpo model=runs/sft dpo.beta=0.2 dpo.max_steps=50 dpo.peft.method=lora   # each round's DPO

Round k (1..rounds), starting from the policy `model` (round 1) or round k-1's model:

1. take the next `prompts_per_round` prompts of a seeded shuffle of `prompts` (rows
   with `prompt` (text or messages) or `messages`, and `answer` where the judge needs one;
   default: the built-in world's rl/train.jsonl);
2. sample `samples_per_prompt` responses to each with the policy (temper's batched
   generation, the policy's chat template, its stop strings, `temperature`, `top_p`);
3. make pairs. A scoring judge (`temper.rewards.judges`) scores every response; the pair is
   the best-scored response over the worst-scored one. A prompt makes no pair (counted) when
   fewer than two responses have a score (`unscored`: the judge failed on them), or when the
   best and worst scores are equal (`tie`, all its responses alike to the judge); among
   equal best (or worst) scores the first sampled is taken. A constitution judge instead
   revises each response: (revised > original), skipped when the revision fails, is empty,
   is the original, or repeats the critique word for word (the judge followed neither
   request). Empty responses never take part (counted in `empty_responses`);
4. write them to `output_dir/round_k/pairs.jsonl` and train one DPO round on them with the
   `temper dpo` command (every `dpo.*` setting as given), into
   `output_dir/round_k`. The reference is the round's starting policy (the on-policy
   choice of iterative DPO, e.g. Xu et al. 2023 "Some things are more CRINGE than others",
   Yuan et al. 2024 "Self-Rewarding Language Models"), unless `dpo.ref_model=` pins one for all
   rounds. Held-out pairs: eval_data=, else the world's preference/test.jsonl (so held-out
   preference accuracy is comparable between rounds), else a share of the round's pairs;
5. report: the monitor judge's mean score of the policy's samples before the round (the
   samples just judged) and after it (the trained policy sampled on the same prompts with
   the same seed), pairs made, skipped by reason, bad judgements, and the DPO summary's
   held-out accuracy and drift perplexity before and after. `output_dir/rounds.jsonl` gets
   one line per round, `output_dir/summary.json` all of them.

`resume=auto` keeps the rounds that finished (their `round.json`) and resumes the one that did
not from its pairs and checkpoints. One process only (no torchrun). With `dpo.peft.method=lora`
(dora, qlora) each round trains an adapter on the round's policy, whose reference is that
policy with the adapter disabled (no second copy), and the adapter is merged into
`round_k/merged`, the next round's policy (`temper merge`; a QLoRA round merges into
the dequantised NF4 base it trained against, and the next round quantises again).
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from temper.config import OnlyWith, check_range, opt
from temper.data.chat import chat_template_for
from temper.data.prompts import Prompt, read_prompts
from temper.errors import TemperError
from temper.io import atomic_write_text
from temper.lineage import read_lineage
from temper.loading import load_for_inference
from temper.rewards.feedback import make_reviser, read_constitution, same_text
from temper.rewards.judges import DEFAULT_TIMEOUT, Judge, check_timeout, make_judge, split_spec
from temper.runtime import resolve_device
from temper.train.distributed import launched_world
from temper.train.loop import Diverged
from temper.train.rollout import sample_responses
from temper.train.rundir import RunDir

# `dpo.*` keys the workflow sets for every round itself
ROUND_KEYS = ("model", "data", "eval_data", "output_dir", "resume", "overwrite", "seed", "device", "template",
              "columns", "skip_bad_rows", "max_bad_row_fraction")
MERGEABLE = ("none", "lora", "dora", "qlora")


@dataclass
class Config:
    model: str = opt("runs/sft", "the starting policy: a model directory (usually SFT's)")
    output_dir: str = opt("runs/online-dpo", "where round_1/, round_2/, ..., rounds.jsonl and summary.json go")
    rounds: int = opt(1, "rounds: sample from the policy, judge, pair, train a DPO round, repeat")
    judge: str = opt("rule:world", "what makes a round's pairs: rule:world, regex:PATTERN, callable:MODULE:FUNC, "
                                   "llm:MODEL_DIR, reward:MODEL_DIR (a reward model), or constitution:MODEL_DIR "
                                   "(AI feedback)")
    constitution: str = opt("", "principles for judge=constitution:... (default: the shipped constitutions/default.md)")
    prompts: list[str] = opt([], "prompt rows for the rounds (default: the built-in world's rl/train.jsonl)")
    prompts_per_round: int = opt(64, "prompts answered each round: the next ones of a seeded shuffle (0: all)")
    samples_per_prompt: int = opt(4, "responses sampled per prompt each round")
    temperature: float = opt(1.0, "sampling temperature of the policy's responses")
    top_p: float = opt(1.0, "nucleus sampling of the policy's responses (1: off)")
    max_new_tokens: int = opt(48, "longest sampled response (and critique, and revision)")
    skip_bad_judgements: bool = opt(True, "skip and count responses the judge fails on (false: stop at the first)")
    judge_timeout: float = opt(DEFAULT_TIMEOUT, "seconds one call of a callable: judge (or reviser) may take; a call "
                                                "still running then stops the run, naming the sample (0: no limit)")
    monitor_judge: str = opt("", "a scoring judge reported before and after each round (default: judge, if it scores)")
    eval_data: list[str] = opt([], "held-out preference pairs scored by every round (default: the built-in world's "
                                    "preference/test.jsonl, else a share of the round's pairs)")
    template: str | None = opt(None, "chat template the policy answers with (default: the model's)")
    dpo: dict = opt({}, "each round's `temper dpo` settings, e.g. dpo.beta=0.2 dpo.max_steps=50 dpo.peft.method=lora "
                        "(any key of temper dpo --help but the ones the rounds set: " + ", ".join(ROUND_KEYS) + ")")
    seed: int = opt(0, "seed for the prompts' order, sampling and each round's training")
    resume: str = opt("", "'auto' keeps the finished rounds and resumes the unfinished one from its checkpoints")
    overwrite: bool = opt(False, "start over in an output_dir that holds earlier rounds")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")

    only_with: ClassVar = (
        OnlyWith(("constitution",), "judge=constitution:MODEL_DIR", lambda c: split_spec(c.judge)[0] == "constitution"),
    )

    def validate(self) -> None:
        check_range("rounds", self.rounds, low=1)
        check_range("samples_per_prompt", self.samples_per_prompt, low=1)
        check_range("prompts_per_round", self.prompts_per_round, low=0)
        check_range("temperature", self.temperature, low=0.0)
        check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_range("max_new_tokens", self.max_new_tokens, low=1)
        check_timeout(self.judge_timeout)
        kind, _ = split_spec(self.judge)
        if kind != "constitution" and self.samples_per_prompt < 2:
            raise TemperError(f"judge={self.judge} pairs the best and worst of several responses: samples_per_prompt "
                              f"must be at least 2, got {self.samples_per_prompt}")
        if kind != "constitution" and self.temperature == 0:
            raise TemperError(f"temperature=0 (greedy) samples the same response {self.samples_per_prompt} times: "
                              f"judge={self.judge} needs different responses to rank (temperature > 0)")
        if self.monitor_judge and split_spec(self.monitor_judge, "monitor_judge=")[0] == "constitution":
            raise TemperError("monitor_judge= reports scores: use rule:world, regex:, callable:, llm: or reward:, "
                              "not constitution:")
        for key in ROUND_KEYS:
            if key in self.dpo:
                raise TemperError(f"dpo.{key}: the rounds set it (the round's policy, its pairs, its directory); "
                                  + ("use the workflow's own key" if key in ("eval_data", "seed", "device", "template",
                                                                             "resume", "overwrite") else "drop it"))
        if self.peft_method not in MERGEABLE:
            raise TemperError(f"dpo.peft.method={self.peft_method}: each round's adapter is merged into the next round's policy, "
                              "and only lora, dora and qlora merge into weights")
        if self.resume not in ("", "auto"):
            raise TemperError(f"resume={self.resume}: resume=auto continues the rounds (each round resumes from its "
                              "own checkpoints)")
        if self.resume and self.overwrite:
            raise TemperError("resume= and overwrite=true contradict each other: continue the rounds, or start over")
        if str(self.dpo.get("strategy", "none")) in ("ddp", "fsdp") or launched_world()[1] > 1:
            raise TemperError("online rounds run in one process for now: drop dpo.strategy and run without torchrun")

    @property
    def peft_method(self) -> str:
        peft = self.dpo.get("peft")
        return str(peft.get("method", "none")) if isinstance(peft, dict) else "none"


# ----------------------------------------------------------------------------- prompts


def round_prompts(prompts: list[Prompt], per_round: int, round_index: int, seed: int) -> list[Prompt]:
    """Round k's share: the next `per_round` prompts of one seeded shuffle, wrapping around (0: all)."""
    if not per_round or per_round >= len(prompts):
        return list(prompts)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    start = (round_index - 1) * per_round
    return [prompts[order[(start + i) % len(order)]] for i in range(per_round)]


# ----------------------------------------------------------------------------- pairs


def _pair_row(prompt: Prompt, chosen: str, rejected: str, **meta) -> dict:
    row = {"prompt": prompt.messages, "chosen": [{"role": "assistant", "content": chosen}],
           "rejected": [{"role": "assistant", "content": rejected}], "source": prompt.source, **meta}
    if prompt.answer is not None:
        row["answer"] = prompt.answer
    return row


def best_vs_worst(prompts: list[Prompt], responses: list[list[str]], scores: list[list[float | None]]
                  ) -> tuple[list[dict], Counter]:
    """One pair per prompt: its best-scored response over its worst (empty responses never take
    part); the prompts that make none, counted by reason (`unscored`, `tie`)."""
    pairs, skipped = [], Counter()
    for prompt, rs, ss in zip(prompts, responses, scores, strict=True):
        scored = [(s, i) for i, (r, s) in enumerate(zip(rs, ss)) if r and s is not None]
        if len(scored) < 2:
            skipped["unscored"] += 1
            continue
        best = max(scored, key=lambda t: (t[0], -t[1]))  # the first sampled among equal best
        worst = min(scored, key=lambda t: (t[0], t[1]))
        if best[0] == worst[0]:
            skipped["tie"] += 1
            continue
        pairs.append(_pair_row(prompt, rs[best[1]], rs[worst[1]], chosen_score=best[0], rejected_score=worst[0]))
    return pairs, skipped


def revision_pairs(prompts: list[Prompt], responses: list[list[str]], reviser, principles: list[str],
                   round_index: int) -> tuple[list[dict], Counter, dict]:
    """(revised > original) for every non-empty response; the responses that make none, counted by
    reason, and the first of each reason."""
    items = [(p, r, (i * len(rs) + j + round_index - 1) % len(principles))
             for i, (p, rs) in enumerate(zip(prompts, responses)) for j, r in enumerate(rs)]
    skipped, first = Counter(), {}
    todo = [(p, r, principle) for p, r, principle in items if r]
    revisions = reviser.revise_all([p for p, _, _ in todo], [r for _, r, _ in todo],
                                   [principles[x] for _, _, x in todo])
    pairs = []
    for (p, r, principle), rev in zip(todo, revisions, strict=True):
        reason = rev.failure
        if reason is None and not rev.revision.strip():
            reason, rev.message = "empty_revision", "the revision is empty"
        elif reason is None and same_text(rev.revision, r):
            reason, rev.message = "identical", "the revision is the original"
        elif reason is None and rev.critique is not None and same_text(rev.revision, rev.critique):
            reason, rev.message = "revision_is_critique", f"the revision repeats the critique {rev.critique!r:.60}"
        if reason is not None:
            skipped[reason] += 1
            first.setdefault(reason, f"{p.source}: {rev.message}")
            continue
        pairs.append(_pair_row(p, rev.revision.strip(), r, principle=principles[principle], critique=rev.critique))
    return pairs, skipped, first


# ----------------------------------------------------------------------------- the rounds


def _mean(scores: list[list[float | None]]) -> float | None:
    flat = [s for ss in scores for s in ss if s is not None]
    return sum(flat) / len(flat) if flat else None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _earlier_rounds(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("round_*") if p.is_dir()) + (
        ["summary.json"] if (out / "summary.json").is_file() else [])


def round_settings(cfg: Config, *, policy: str, pairs: Path, eval_spec: list[str], round_dir: Path) -> dict:
    """Round k's `temper dpo` settings: the `dpo.*` section plus what the round sets."""
    settings: dict[str, Any] = {**cfg.dpo, "model": policy, "data": [str(pairs)], "eval_data": list(eval_spec),
                                "output_dir": str(round_dir), "resume": "auto" if cfg.resume else "",
                                "overwrite": False, "skip_bad_rows": True, "max_bad_row_fraction": 1.0,  # its own pairs:
                                "seed": cfg.seed, "device": cfg.device}                                 # all counted
    if cfg.template is not None:
        settings["template"] = cfg.template
    return settings


def run(cfg: Config, commands) -> dict:
    """The rounds. `commands` (given by the CLI) runs other temper commands in this process:
    `commands.config(name, settings)` builds and checks a command's config from a mapping of its
    keys, `commands.run(name, config)` runs it and returns its summary."""
    device = resolve_device(cfg.device)
    lineage = read_lineage(cfg.model)
    world = lineage.get("world_dir")
    prompt_spec = cfg.prompts or ([str(Path(world) / "rl" / "train.jsonl")] if world else [])
    if not prompt_spec:
        raise TemperError("prompts= is required: the model records no built-in world to take prompts from")
    eval_spec = cfg.eval_data or ([str(Path(world) / "preference" / "test.jsonl")] if world else [])
    kind, _ = split_spec(cfg.judge)
    # every round's DPO settings are checked now, before anything is sampled
    commands.config("dpo", round_settings(cfg, policy=cfg.model, pairs=Path("pairs.jsonl"), eval_spec=eval_spec,
                                          round_dir=Path(cfg.output_dir) / "round_1"), source="dpo.* (temper dpo)")

    with RunDir.owned(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, earlier=_earlier_rounds,
                      command="online-dpo", inputs={"model": cfg.model}) as run_dir:
        out = run_dir.path
        earlier = _earlier_rounds(out)
        # the judges: one that makes pairs, one that reports scores (the same when it scores)
        judge = reviser = None
        if kind == "constitution":
            principles = read_constitution(cfg.constitution or None)
            reviser = make_reviser(cfg.judge, device=device, max_new_tokens=cfg.max_new_tokens,
                                   timeout=cfg.judge_timeout)
        else:
            judge = make_judge(cfg.judge, device=device, skip_bad=cfg.skip_bad_judgements, timeout=cfg.judge_timeout)
        monitor: Judge | None = judge
        if cfg.monitor_judge:
            monitor = make_judge(cfg.monitor_judge, device=device, skip_bad=cfg.skip_bad_judgements,
                                 option="monitor_judge=", timeout=cfg.judge_timeout)
        prompts = read_prompts(prompt_spec)
        for j in (judge, monitor):
            if j is not None:
                j.check_prompts(prompts)
        # only now: a run refused above leaves the earlier one as it was
        run_dir.begin(cfg, start_over=cfg.overwrite, names=[*earlier, "rounds.jsonl"])

        reports, policy = [], cfg.model
        for k in range(1, cfg.rounds + 1):
            round_dir = out / f"round_{k}"
            done = round_dir / "round.json"
            if cfg.resume and done.is_file():
                reports.append(json.loads(done.read_text(encoding="utf-8")))
                policy = reports[-1]["model"]
                print(f"round {k}: finished earlier, kept ({round_dir})", file=sys.stderr)
                continue
            round_dir.mkdir(parents=True, exist_ok=True)
            chosen_prompts = round_prompts(prompts, cfg.prompts_per_round, k, cfg.seed)
            sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed * 1000 + k)
            template = None

            # 1-3: sample, judge, pair (kept in judged.json, so a resumed round trains on the same pairs)
            judged, pairs_path = round_dir / "judged.json", round_dir / "pairs.jsonl"
            if cfg.resume and judged.is_file() and pairs_path.is_file():
                report = json.loads(judged.read_text(encoding="utf-8"))
            else:
                report = {"round": k, "policy": policy, "judge": cfg.judge, "prompts": len(chosen_prompts),
                          "samples_per_prompt": cfg.samples_per_prompt}
                model, tokenizer = load_for_inference(policy, device=device)
                template = chat_template_for(policy, tokenizer, cfg.template)
                responses = sample_responses(model, tokenizer, template, chosen_prompts, cfg.samples_per_prompt,
                                             **sampling)
                del model
                report["empty_responses"] = sum(1 for rs in responses for r in rs if not r)
                bad_before = {id(j): Counter(j.stats.bad) for j in (judge, monitor) if j is not None}
                scores = None
                if judge is not None:
                    scores = judge.rank(chosen_prompts, responses)
                    pairs, skipped = best_vs_worst(chosen_prompts, responses, scores)
                    report["skipped_prompts"] = dict(skipped)
                else:
                    pairs, skipped, first = revision_pairs(chosen_prompts, responses, reviser, principles, k)
                    report.update(skipped_responses=dict(skipped), first_skipped=first)
                if monitor is not None and monitor is not judge:
                    scores = monitor.rank(chosen_prompts, responses)
                report["judge_score_before"] = _mean(scores) if monitor is not None else None
                report["bad_judgements"] = {j.name: dict(j.stats.bad - bad_before[id(j)])
                                            for j in (judge, monitor) if j is not None}
                report["pairs"] = len(pairs)
                _write_jsonl(round_dir / "samples.jsonl", [
                    {"source": p.source, "question": p.question, "answer": p.answer, "responses": rs,
                     **({"scores": ss} if ss is not None else {})}
                    for p, rs, ss in zip(chosen_prompts, responses, scores or [None] * len(responses))])
                _write_jsonl(pairs_path, pairs)
                atomic_write_text(judged, json.dumps(report, indent=2) + "\n")
            skipped = report.get("skipped_prompts", report.get("skipped_responses", {}))
            print(f"round {k}: {len(chosen_prompts)} prompts x {cfg.samples_per_prompt} samples from {policy}; "
                  f"{report['pairs']} pairs; skipped: {_counts(skipped)}; {report['empty_responses']} empty responses"
                  + (f"; {monitor.name} score of the samples {report['judge_score_before']:.3f}"
                     if report["judge_score_before"] is not None else ""), file=sys.stderr)
            if not report["pairs"]:
                failed = "".join(f"; judge {name}: {sum(bad.values())} bad judgements ({_counts(bad)})"
                                 for name, bad in report.get("bad_judgements", {}).items() if bad)
                raise TemperError(f"round {k}: the judge made no pairs (skipped: {_counts(skipped)}{failed}); sample "
                                  "more (samples_per_prompt, prompts_per_round, temperature) or use another judge")

            # 4: one DPO round on the pairs, from this round's policy (the reference: the same, or dpo.ref_model)
            settings = round_settings(cfg, policy=policy, pairs=pairs_path, eval_spec=eval_spec, round_dir=round_dir)
            try:
                summary = commands.run("dpo", commands.config("dpo", settings))
            except Diverged as e:  # which round's training
                raise Diverged(f"round {k}: dpo {e}") from None
            report["dpo"] = _dpo_report(summary)
            trained = round_dir
            if cfg.peft_method != "none":  # the adapter folded into its base: the next round's policy, a full model
                trained = round_dir / "merged"
                commands.run("merge", commands.config("merge", {"model": policy, "adapter": str(round_dir),
                                                                "output_dir": str(trained), "overwrite": True}))

            # 5: the trained policy on the same prompts, with the same seed
            if monitor is not None:
                model, tokenizer = load_for_inference(trained, device=device)
                template = template or chat_template_for(policy, tokenizer, cfg.template)
                after = sample_responses(model, tokenizer, template, chosen_prompts, cfg.samples_per_prompt,
                                         **sampling)
                del model
                report["judge_score_after"] = _mean(monitor.rank(chosen_prompts, after))
            report["model"] = str(trained)
            atomic_write_text(done, json.dumps(report, indent=2) + "\n")
            with open(out / "rounds.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(report) + "\n")
            reports.append(report)
            policy = str(trained)

        for j in {id(x): x for x in (judge, monitor, reviser) if x is not None}.values():
            j.close()
        result = {"rounds": reports, "final_model": policy, "judge": cfg.judge,
                  "monitor_judge": cfg.monitor_judge or (cfg.judge if judge is not None else None)}
        run_dir.write_summary(result)
        return result


def summary_lines(cfg: Config, result: dict) -> list[str]:
    final = result["final_model"]
    return [f"online-dpo: {len(result['rounds'])} round(s), judged by {result['judge']} -> {final}",
            round_table(result["rounds"]), f"  next: temper eval model={final}"]


def _dpo_report(summary: dict) -> dict:
    keys = ("eval_rewards/accuracies", "eval_rewards/margins", "eval_loss", "general_ppl")
    before = summary.get("before") or {}
    return {**{f"{k}_before": before.get(k) for k in keys}, **{f"{k}_after": summary.get(k) for k in keys},
            "pairs": summary.get("pairs"), "held_out_pairs": summary.get("held_out_pairs"),
            "skipped_rows": summary.get("skipped_rows")}


def _counts(counter: Counter | dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counter.items())) or "none"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def round_table(reports: list[dict]) -> str:
    """Markdown: one row per round."""
    lines = ["| round | pairs | skipped | judge score before -> after | held-out acc before -> after | "
             "drift ppl before -> after |", "|---|---|---|---|---|---|"]
    for r in reports:
        d = r.get("dpo", {})
        skipped = r.get("skipped_prompts", r.get("skipped_responses", {}))
        lines.append(f"| {r['round']} | {r['pairs']} | {_counts(skipped)} | "
                     f"{_fmt(r.get('judge_score_before'))} -> {_fmt(r.get('judge_score_after'))} | "
                     f"{_fmt(d.get('eval_rewards/accuracies_before'))} -> {_fmt(d.get('eval_rewards/accuracies_after'))} | "
                     f"{_fmt(d.get('general_ppl_before'))} -> {_fmt(d.get('general_ppl_after'))} |")
    return "\n".join(lines)
