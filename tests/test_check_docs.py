"""docs/check_docs.py: the docs' option names, defaults, preset sizes and versions agree with the code,
and each kind of wrong claim is caught, one line each."""

from __future__ import annotations

import importlib.util
import runpy
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "docs" / "check_docs.py"


@pytest.fixture(scope="module")
def check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_hold_no_wrong_claim(capsys, monkeypatch):
    """`python docs/check_docs.py` on README.md, BENCHMARKS.md and docs/*.md: exit 0, nothing printed."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 0, out


RIGHT = """\
Run `temper sft model=x peft.method=lora peft.r=16` or, in a block:

```bash
temper pretrain objective=mlm mlm_probability=0.2 whole_word_mask=true   # the encoder's keys
temper pretrain --config pretrain-shakespeare data=$DATA/tinyshakespeare.txt
temper run lifecycle sft.max_steps=50 --from sft
temper run my.yaml reward.logging.every=5
temper online-dpo model=runs/sft dpo.beta=0.2 dpo.peft.method=lora   # a free-form mapping
temper eval models=[A,B] tasks=world_qa,world_facts_mc,tasks/mine.yaml
temper STAGE key=value
```

`padding_free=true` (the default) and default `on_nonfinite=stop`.
Presets: `llama-tiny` (0.2M), `llama-3m` (2.4M), `llama-3m` (1.97M parameters, a 2,048-token
BPE), llama-14m: 12.6M parameters, llama-14m: 9.44M parameters in the blocks.
We measured with torch 2.13.0+cpu and transformers 5.25.0. A later run used transformers 5.25.
An older transformers 5.23.0 gave the same.
"""

WRONG = """\
Run `temper sft model=x lora_rank=8` then:

```bash
temper pretrain objective=mlm lr=3
temper run lifecycle sft.nope=1
temper run lifecycle nostage.max_steps=1
temper run no-such-pipeline
temper pretrain --config pretrain-shakespear
temper eval model=x tasks=world_qa,world_nope
temper evaluate model=x
```

With `padding_free=false` (the default), and default `no_such_key=1`.
`llama-tiny` (0.3M) is the test model.
Its peers: transformers 5.25.0.
The other table: transformers 5.23.0.
"""


def test_right_claims_pass(check_docs):
    assert check_docs.check({"right.md": RIGHT}) == []


def test_each_kind_of_wrong_claim_is_one_line(check_docs, tmp_path, capsys):
    path = tmp_path / "wrong.md"
    path.write_text(WRONG)
    assert check_docs.main([str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    expected = [
        (1, "no key 'lora_rank'"),
        (4, "`temper pretrain objective=mlm lr=3`: no key 'lr'"),
        (5, "`temper sft` has no key 'nope'"),
        (6, "'nostage' is neither a stage of a shipped pipeline nor a command"),
        (7, "temper run no-such-pipeline: no shipped pipeline"),
        (8, "--config pretrain-shakespear: no shipped config"),
        (9, "tasks= world_nope: no shipped task"),
        (10, "`temper evaluate` is not a command"),
        (13, "`padding_free=false` is called the default; the default is true"),
        (13, "no command has 'no_such_key'"),
        (14, "llama-tiny is said to have 0.3M parameters; it has 205,120"),
        (16, "transformers 5.23.0, elsewhere transformers 5.25.0"),
    ]
    assert len(lines) == len(expected), "\n".join(lines)
    for (line, words), printed in zip(expected, sorted(lines, key=lambda p: int(p.split(":")[1]))):
        assert printed.startswith(f"{path}:{line}: ") and words in printed, printed


def test_a_preset_size_is_the_built_model_s_count(check_docs):
    """The count behind the preset claims is the model's own (tied embeddings once), on the meta device."""
    from temper.models import build_model, registry

    model = build_model(registry.preset("llama-tiny"), device="meta")
    assert check_docs.preset_counts("llama-tiny")[2048] == model.num_parameters() == 205_120
    wide = build_model(registry.preset("llama-3m", vocab_size=1984), device="meta").num_parameters()
    assert check_docs.preset_counts("llama-3m")[1984] == wide  # the linear extrapolation over the vocabulary
