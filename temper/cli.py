"""The `temper` command: `temper STAGE [--config FILE.yaml|NAME] [key=value ...]`.

Each stage is a module with a `Config` dataclass and a `run(config)` function. Stages are
imported only when used, so `temper --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import shutil
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from temper import __version__
from temper.config import check_given_once, config_help, from_dict, load_config, to_dict
from temper.configs import shipped_names, shipped_path
from temper.errors import TemperError, error_line
from temper.report.summary import show


@dataclass(frozen=True)
class Variants:
    """A command whose module depends on one key's value (`temper pretrain objective=mlm` runs the
    encoder recipe): `modules` maps values to modules; any other value (the default) runs the
    command's own module. Each module stays a leaf; the CLI alone chooses."""

    key: str
    default: str  # the value the command's own module runs
    modules: dict[str, str]


@dataclass(frozen=True)
class Command:
    module: str
    kind: Literal["train", "tool", "workflow"]  # train: a recipe on the shared loop; workflow: runs other commands
    description: str
    variants: Variants | None = None


ENCODER_OBJECTIVES = ("mlm", "nsp", "sop", "mlm+nsp", "mlm+sop", "electra", "contrastive")

COMMANDS: dict[str, Command] = {
    "world": Command("temper.stages.world", "tool", "write the built-in synthetic world (corpus, instructions, "
                                                    "preferences, RL prompts) as JSONL"),
    "curate": Command("temper.stages.curate", "tool", "clean raw text: normalise, exact + MinHash dedup, Gopher/C4/"
                                                      "FineWeb filters, PII masking, decontamination; a report"),
    "tokenizer": Command("temper.stages.tokenizer", "tool", "train a byte-level BPE tokenizer on text or JSONL files"),
    "pretrain": Command("temper.recipes.pretrain", "train", "pretrain a decoder (causal LM) or, with objective=mlm|"
                                                            "nsp|sop|mlm+nsp|mlm+sop|electra|contrastive, an encoder",
                        Variants("objective", "clm", dict.fromkeys(ENCODER_OBJECTIVES, "temper.recipes.encoder"))),
    "sft": Command("temper.recipes.sft", "train", "supervised fine-tuning / instruction tuning with chat templates"),
    "dpo": Command("temper.recipes.dpo", "train", "preference optimisation: DPO, IPO, SimPO, ORPO, KTO and kin, on "
                                                  "preference pairs"),
    "grpo": Command("temper.recipes.grpo", "train", "GRPO: G sampled completions per prompt, scored by reward "
                                                    "functions, a clipped group-relative objective (TRL's)"),
    "finetune-encoder": Command("temper.recipes.finetune_encoder", "train", "fine-tune an encoder for sequence "
                                                                          "(task=classify) or token (task=tokens) "
                                                                          "classification"),
    "reward": Command("temper.recipes.reward", "train", "reward model: a scalar head on an SFT model, trained on "
                                                        "preference pairs (Bradley-Terry)"),
    "ppo": Command("temper.recipes.ppo", "train", "PPO with a KL penalty: policy and value model against a reward "
                                                  "model, a frozen reference (TRL's PPOTrainer)"),
    "run": Command("temper.workflows.lifecycle", "workflow", "run a pipeline of commands from one YAML (world -> "
                                                             "tokenizer -> pretrain -> sft -> eval ...), skipping "
                                                             "stages whose config and inputs did not change"),
    "online-dpo": Command("temper.workflows.online_dpo", "workflow", "iterative DPO: the policy samples, a judge "
                                                                     "(or AI feedback) pairs, DPO trains; repeat"),
    "eval": Command("temper.stages.eval", "tool", "evaluate models on tasks, perplexity, judges and contamination; "
                                                  "write a table"),
    "eval contamination": Command("temper.stages.contamination", "tool", "n-gram overlap between training data and "
                                                                         "eval sets"),
    "reward score": Command("temper.stages.reward_score", "tool", "score prompt/response rows (or preference "
                                                                  "pairs) with a reward model; write JSONL"),
    "merge": Command("temper.stages.merge", "tool", "fold a LoRA/DoRA adapter into its base model (zero inference "
                                                    "overhead)"),
    "export": Command("temper.stages.export", "workflow", "export a model: one GGUF file for llama.cpp (f32/f16/"
                                                          "q8_0/q4_0), or safetensors with an adapter merged"),
    "quantize": Command("temper.stages.quantize", "tool", "quantise a model's weights (int8, int4, GPTQ, NF4) into "
                                                          "a directory generate, eval and serve load"),
    "generate": Command("temper.stages.generate", "tool", "generate text from a model directory (one prompt or a "
                                                          "JSONL file)"),
    "serve": Command("temper.stages.serve", "tool", "serve a model (and LoRA adapters by name) over an OpenAI-"
                                                    "compatible HTTP API with continuous batching"),
    "chat": Command("temper.stages.chat", "tool", "chat with a model directory in the terminal, using its chat "
                                                  "template"),
    "embed": Command("temper.stages.embed", "tool", "sentence embeddings of texts from an encoder directory "
                                                    "(JSONL or .npy), for retrieval"),
    "estimate": Command("temper.stages.estimate", "tool", "plan memory and compute: per-device training/inference "
                                                          "memory breakdown, Chinchilla tokens, FLOPs and time"),
    "plot": Command("temper.stages.plot", "tool", "plot logged metrics over steps (one or more runs) as a "
                                                  "self-contained SVG"),
    "report": Command("temper.stages.report", "tool", "(re)build a `temper run`'s report: one self-contained "
                                                      "HTML page (tables, plots, answers) and its PNGs"),
}


def training_commands() -> list[str]:
    """The commands that train on the shared loop (the recipes), in registry order."""
    return [name for name, c in COMMANDS.items() if c.kind == "train"]


class Commands:
    """What a workflow runs other commands with, in this process: a command's config from a mapping
    of its keys (checked as on the command line), its run, and its summary."""

    def config(self, name: str, settings: dict[str, Any] | list[str], *, source: str | None = None):
        """`name`'s config from a mapping of its keys, or from `key=value` strings as typed; `source`
        names where the settings came from in an error (default: the command)."""
        if isinstance(settings, list):
            return load_config(_stage_module(name, peek_variant(name, None, settings)).Config, None, settings)
        variants = COMMANDS[name].variants
        variant = settings.get(variants.key) if variants is not None else None
        return from_dict(_stage_module(name, variant).Config, settings, source=source or f"temper {name}")

    def run(self, name: str, config) -> Any:
        return _run_module(name, config, getattr(config, "objective", None))

    def show(self, name: str, config, result: Any) -> None:
        """`name`'s readable summary of `result` on stdout, as the command itself ends."""
        module = _stage_module(name, getattr(config, "objective", None))
        show(name, config, result, as_json=False, lines=getattr(module, "summary_lines", None))

    def names(self) -> list[str]:
        return list(COMMANDS)

    def has_key(self, name: str, key: str) -> bool:
        return any(f.name == key for f in dataclasses.fields(_stage_module(name).Config))

    def has_output_dir(self, name: str) -> bool:
        return self.has_key(name, "output_dir")


def run_argv(argv: list[str]) -> list[str]:
    """`temper run [PIPELINE.yaml] [--from S] [--only S] [--force] [--check] [STAGE.key=value ...]` as
    the workflow's own keys: pipeline=, from_stage=, only=, force=true, check=true, stages.STAGE.key=value."""
    own = {f.name for f in dataclasses.fields(_stage_module("run").Config)}
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag = next((f for f in ("--from", "--only") if arg == f or arg.startswith(f + "=")), None)
        if flag is not None:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise ValueError(f"{flag} needs a stage name")
            out.append(f"{'from_stage' if flag == '--from' else 'only'}={value}")
        elif arg in ("--force", "--check"):
            out.append(f"{arg[2:]}=true")
        elif "=" in arg and not arg.startswith("-"):
            key = arg.split("=", 1)[0].strip()
            out.append(arg if key.split(".")[0] in own else f"stages.{arg}")
        elif not arg.startswith("-") and "=" not in arg and not any(o.startswith("pipeline=") for o in out):
            out.append(f"pipeline={arg}")
        else:
            out.append(arg)  # --help, --print-config, --config; anything else is refused by parse_args
        i += 1
    return out


def _run_module(name: str, config, variant: str | None = None) -> Any:
    module = _stage_module(name, variant)
    if COMMANDS[name].kind == "workflow":
        return module.run(config, Commands())
    return module.run(config)


RANK_ERROR_GRACE_S = 3.0  # seconds a failing rank waits after its error line (see main)
USAGE = ("usage: temper STAGE [--config FILE.yaml|NAME] [key=value ...]   (temper STAGE --help for its options)\n"
         "       temper run [PIPELINE.yaml] [STAGE.key=value ...] [--from STAGE] [--only STAGE] [--force] [--check]\n"
         "A command ends with a few lines that say what it did; --json prints its whole result as JSON instead.")


def _stage_module(name: str, variant: str | None = None):
    command = COMMANDS[name]
    module = command.variants.modules.get(variant, command.module) if command.variants else command.module
    return importlib.import_module(module)


def peek_variant(name: str, config_path: str | None, overrides: list[str]) -> str | None:
    """The value of the command's variant key (say pretrain's `objective`), from the overrides or
    else the --config YAML, before any config is built: it chooses the module whose Config reads them."""
    variants = COMMANDS[name].variants
    if variants is None:
        return None
    value = None
    for item in overrides:
        key, _, given = item.partition("=")
        if key.strip() == variants.key:
            value = given.strip()
    if value is None and config_path is not None and os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return None  # load_config reads it again and names the problem
        if isinstance(data, dict) and isinstance(data.get(variants.key), str):
            value = data[variants.key]
    if value is not None and value != variants.default and value not in variants.modules:
        choices = [variants.default, *variants.modules]
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TemperError(f"{variants.key}={value} is not one of {', '.join(choices)}{hint}")
    return value


def print_main_help() -> None:
    print(f"temper {__version__}: the training lifecycle of a language model, one stage at a time.\n")
    print(USAGE + "\n")
    print("stages:")
    width = max(map(len, COMMANDS))
    for name, command in COMMANDS.items():
        print(f"  {name.ljust(width)}  {command.description}")
    print("\noptions:\n  --help, -h     show this help\n  --version      print the version")
    print("\nSet TEMPER_DEBUG=1 to see a traceback with an error.")


def help_rows(name: str, variant: str | None = None) -> list[tuple[str, str, str, str]]:
    """`config_help` rows of the config a run of `name` starts from (the variant's module, the variant
    key set as given): each default is the value `--print-config` resolves (tests/test_cli.py)."""
    module = _stage_module(name, variant)
    variants = COMMANDS[name].variants
    if variant is None or variants is None:
        return config_help(module.Config)
    return config_help(module.Config, values=dataclasses.replace(module.Config(), **{variants.key: variant}))


def print_stage_help(name: str, variant: str | None = None) -> None:
    module = _stage_module(name, variant)
    print(f"usage: temper {name} [--config FILE.yaml|NAME] [--print-config] [--json] [key=value ...]\n")
    doc = (module.__doc__ or COMMANDS[name].description).strip()
    print(textwrap.fill(" ".join(doc.split("\n\n")[0].split()), 88) + "\n")  # the first paragraph
    rows = help_rows(name, variant)
    given = COMMANDS[name].variants.key if variant is not None else None  # its row shows the value typed
    key_w = min(max(len(r[0]) for r in rows), 30)
    type_w = min(max(len(r[1]) for r in rows), 24)
    term = shutil.get_terminal_size((120, 24)).columns
    print("options (key=value; nested keys with dots):")
    for key, typ, default, help_text in rows:
        head = f"  {key.ljust(key_w)}  {typ.ljust(type_w)}  "
        body = f"{help_text} [{'given' if key == given else 'default'}: {default}]"
        wrapped = textwrap.wrap(body, max(40, term - len(head)), break_on_hyphens=False) or [""]
        print(head + wrapped[0])
        for line in wrapped[1:]:
            print(" " * len(head) + line)


def parse_args(argv: list[str]) -> tuple[str | None, list[str], dict]:
    flags = {"help": False, "config": None, "print_config": False, "json": False}
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            flags["help"] = True
        elif arg == "--print-config":
            flags["print_config"] = True
        elif arg == "--json":
            flags["json"] = True
        elif arg in ("--config", "-c") or arg.startswith("--config="):
            if arg.startswith("--config="):
                value = arg.split("=", 1)[1]
            elif i + 1 >= len(argv):
                raise ValueError("--config needs a file name")
            else:
                value = argv[i + 1]
                i += 1
            if flags["config"] is not None:  # one file: a second would silently replace the first
                raise ValueError(f"--config is given twice ({flags['config']} and {value}): give one file, and "
                                 "override its keys with key=value")
            flags["config"] = value
        elif arg.startswith("--") and "=" in arg:  # tolerate --key=value
            overrides.append(arg[2:])
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ValueError(f"unexpected argument {arg!r}; options are key=value")
        i += 1
    check_given_once(overrides)
    return None, overrides, flags


def config_file(spec: str | None) -> str | None:
    """`--config` value: a YAML file, else the name of a config shipped in the package (temper/configs)."""
    if spec is None or os.path.isfile(spec) or (os.path.exists(spec) and not os.path.isdir(spec)):
        return spec  # a FIFO or a device is named by load_yaml's refusal, not looked up as a shipped name
    shipped = shipped_path(spec)
    if shipped is None:
        raise TemperError(f"config file not found: {spec} (shipped configs: {', '.join(shipped_names())})")
    return str(shipped)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `temper ... | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep Python's exit flush quiet
        return 0


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning  # one plain line, not a source location
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_main_help()
        return 0
    if argv[0] == "--version":
        print(f"temper {__version__}")
        return 0
    stage = argv[0]
    if len(argv) > 1 and f"{stage} {argv[1]}" in COMMANDS:  # a sub-stage: `temper eval contamination`
        stage, argv = f"{stage} {argv[1]}", [f"{stage} {argv[1]}", *argv[2:]]
    if stage not in COMMANDS:
        close = difflib.get_close_matches(stage, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"temper: error: unknown stage '{stage}'{hint}; stages: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        _, overrides, flags = parse_args(run_argv(argv[1:]) if stage == "run" else argv[1:])
        path = config_file(flags["config"]) if flags["config"] is not None else None
        variant = peek_variant(stage, path, overrides)
        if flags["help"]:
            print_stage_help(stage, variant)
            return 0
        module = _stage_module(stage, variant)
        config = load_config(module.Config, path, overrides)
        if flags["print_config"]:
            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        result = _run_module(stage, config, variant)
        if int(os.environ.get("RANK", "0")) == 0:  # one summary, not one per rank
            show(stage, config, result, as_json=flags["json"], lines=getattr(module, "summary_lines", None))
        return 0
    except BrokenPipeError:  # the reader left (`| head`): main() ends quietly
        raise
    except (ValueError, OSError) as e:  # TemperError is a ValueError; a full disk or a read-only path is an OSError
        if os.environ.get("TEMPER_DEBUG"):
            raise
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f" (rank {os.environ['RANK']})" if ranks > 1 else ""
        print(f"temper {stage}: error{rank}: {error_line(e)}", file=sys.stderr, flush=True)
        if ranks > 1:  # torchrun stops every rank once one exits non-zero: give a slower peer time to say its own
            time.sleep(RANK_ERROR_GRACE_S)
        return 2
    except KeyboardInterrupt:
        print(f"temper {stage}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
