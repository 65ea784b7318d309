"""Chat templates (parity with transformers, assistant spans, checks), `temper chat`, chat prompts in `generate`."""

from __future__ import annotations

import io
import json
import shutil
import warnings

import pytest

from temper.cli import main
from temper.data.chat import (
    BUILTIN_TEMPLATES,
    assistant_spans,
    check_messages,
    end_of_turn_strings,
    render,
    resolve_template,
)
from temper.data.tokenizer import CHATML_TEMPLATE, Tokenizer
from temper.errors import TemperError

# Zephyr's template, as in HuggingFaceH4/zephyr-7b-beta's tokenizer_config.json: one
# statement per line, so it depends on trim_blocks / lstrip_blocks like the real one.
ZEPHYR_TEMPLATE = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# Mistral-instruct-like: BOS once, [INST] blocks, the system prompt folded into the first
# user turn, raise_exception on roles that do not alternate.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Jinja features real templates use: namespace, tojson, whitespace control, loop controls,
# the `{% generation %}` tag, and a `tools` variable that is defined but None.
FEATURES_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{%- if tools is not none -%}TOOLS{%- endif -%}
{%- for message in messages -%}
    {%- set ns.n = ns.n + 1 -%}
    {%- if message['role'] == 'tool' -%}{% continue %}{%- endif -%}
    <{{ message['role'] }} n={{ ns.n }} meta={{ {'len': message['content'] | length, 'q': '"<&>'} | tojson }}>
    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}</s>{% endgeneration %}
    {% else %}{{ message['content'] }}
    {% endif %}
{%- endfor -%}
{%- if add_generation_prompt %}<assistant>{% endif -%}"""

HAND_TEMPLATES = {"zephyr": ZEPHYR_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "features": FEATURES_TEMPLATE}

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "Where does Alice live?"}],
    "answered": [{"role": "user", "content": "Where does Alice live?"},
                 {"role": "assistant", "content": "Alice lives in Paris."}],
    "with_system": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "What is 3 + 4?"},
                    {"role": "assistant", "content": "7"}],
    "multi_turn": [{"role": "system", "content": "Answer briefly.\nUse facts."},
                   {"role": "user", "content": "Who has a cat?"},
                   {"role": "assistant", "content": "Alice. Her cat is Tom."},
                   {"role": "user", "content": "And Bob?"},
                   {"role": "assistant", "content": "Bob has a dog, Rex."},
                   {"role": "user", "content": "  spaces  around  "}],
    "unicode": [{"role": "user", "content": "Ünïcödé, émojis 😀 and 中文?"},
                {"role": "assistant", "content": "Ça marche: 😀 → ✓ {{ not jinja }}"}],
}


def _hf_tokenizer(tmp_path, tiny_tokenizer, template: str):
    """transformers' view of a temper-saved tokenizer directory with this chat template."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(tiny_tokenizer.backend, bos_token=tiny_tokenizer.bos_token, eos_token=tiny_tokenizer.eos_token,
                    pad_token=tiny_tokenizer.pad_token, chat_template=template)
    tok.save(tmp_path)
    return transformers.AutoTokenizer.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- rendering parity


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, *HAND_TEMPLATES])
def test_render_matches_transformers_apply_chat_template(tmp_path, tiny_tokenizer, name):
    template = BUILTIN_TEMPLATES.get(name) or HAND_TEMPLATES[name]
    hf = _hf_tokenizer(tmp_path, tiny_tokenizer, template)
    assert hf.bos_token == "<|bos|>" and hf.eos_token == "<|eos|>"
    for conv_name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (False, True):
            ours = render(template, messages, add_generation_prompt=add_generation_prompt,
                          bos_token=hf.bos_token, eos_token=hf.eos_token)
            theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours == theirs, (name, conv_name, add_generation_prompt)
            assert messages[-1]["content"].strip() in ours


def test_render_builtins_give_the_documented_text():
    msgs = CONVERSATIONS["with_system"]
    assert render(BUILTIN_TEMPLATES["chatml"], msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n7<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(BUILTIN_TEMPLATES["llama3"], msgs[:2], add_generation_prompt=True, bos_token="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 3 + 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render(BUILTIN_TEMPLATES["plain"], msgs, add_generation_prompt=False, eos_token="</s>") == (
        "You are terse.\n\n### Instruction:\nWhat is 3 + 4?\n\n### Response:\n7</s>\n\n"
    )
    assert render(BUILTIN_TEMPLATES["plain"], msgs[1:2], add_generation_prompt=True) == (
        "### Instruction:\nWhat is 3 + 4?\n\n### Response:\n"
    )
    assert BUILTIN_TEMPLATES["chatml"] is CHATML_TEMPLATE


def test_template_errors_are_temper_errors_like_transformers(tmp_path, tiny_tokenizer):
    hf = _hf_tokenizer(tmp_path, tiny_tokenizer, MISTRAL_TEMPLATE)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(TemperError, match="^chat template failed to render: Conversation roles must alternate"):
        render(MISTRAL_TEMPLATE, bad)
    with pytest.raises(TemperError, match="failed to render"):  # llama3 with no BOS token defined
        render(BUILTIN_TEMPLATES["llama3"], bad[:1], bos_token=None)
    with pytest.raises(TemperError, match="not valid Jinja: line 1"):
        render("{% for m in messages %}{{ m }}", bad)


def test_compiled_once_per_template():
    from temper.data.chat import _compile

    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}<!-- cache probe -->"
    render(template, [{"role": "user", "content": "a"}])
    misses = _compile.cache_info().misses
    assert render(template, [{"role": "user", "content": "b"}]) == "[b]<!-- cache probe -->"
    assert _compile.cache_info().misses == misses


def test_render_passes_extra_variables_and_drops_none_keys():
    template = "{{ greeting }}{% for m in messages %}{{ m.get('name', '-') }}{% endfor %}"
    assert render(template, [{"role": "user", "content": "x", "name": None}], greeting="hi ") == "hi -"


# ----------------------------------------------------------------------------- assistant spans


def test_chatml_spans_are_the_reply_and_its_end_marker():
    msgs = CONVERSATIONS["multi_turn"][:-1]
    text, spans = assistant_spans(BUILTIN_TEMPLATES["chatml"], msgs)
    assert text == render(BUILTIN_TEMPLATES["chatml"], msgs)
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(spans) == len(replies) == 2
    assert [text[s:e] for s, e in spans] == [r + "<|im_end|>\n" for r in replies]
    outside = "".join(text[a:b] for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)]))
    for m in msgs:
        if m["role"] != "assistant":
            assert m["content"] in outside
        else:
            assert m["content"] not in outside
    assert "<|im_start|>assistant\n" in outside  # the header is the prompt, not a target


def test_spans_of_llama3_and_plain_and_a_trailing_user_turn():
    msgs = CONVERSATIONS["multi_turn"]  # ends with a user message: no span for it
    text, spans = assistant_spans(BUILTIN_TEMPLATES["llama3"], msgs, bos_token="<|begin_of_text|>")
    assert [text[s:e] for s, e in spans] == ["Alice. Her cat is Tom.<|eot_id|>", "Bob has a dog, Rex.<|eot_id|>"]
    text, spans = assistant_spans(BUILTIN_TEMPLATES["plain"], msgs, eos_token="</s>")
    assert [text[s:e] for s, e in spans] == ["Alice. Her cat is Tom.</s>\n\n", "Bob has a dog, Rex.</s>\n\n"]
    assert text.endswith("### Instruction:\n  spaces  around  \n\n")


def test_spans_of_a_template_without_generation_prompt():
    text, spans = assistant_spans(MISTRAL_TEMPLATE, CONVERSATIONS["with_system"], bos_token="<s>", eos_token="</s>")
    assert text == "<s>[INST] You are terse.\n\nWhat is 3 + 4? [/INST] 7</s>"
    assert [text[s:e] for s, e in spans] == [" 7</s>"]


def test_a_template_that_is_not_prefix_stable_is_refused():
    unstable = "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(TemperError, match="not prefix-stable"):
        assistant_spans(unstable, CONVERSATIONS["answered"])


# ----------------------------------------------------------------------------- checks


GOOD = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("messages, expected", [
    ("hello", "non-empty list of messages"),
    ([], "non-empty list of messages"),
    (["hi"], "message 0: expected an object"),
    ([{"content": "x"}], "message 0: 'role' must be a string"),
    ([{"role": "user", "content": 3}], "message 0: 'content' must be a string"),
    ([{"role": "human", "content": "x"}], "unknown role 'human'"),
    ([{"role": "user", "content": "u"}, {"role": "system", "content": "s"}], "message 1: a system message may only be the first"),
    ([{"role": "assistant", "content": "a"}], "message 0: the first message must be from the user"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "message 1: the first message after the system message must be from the user"),
    ([{"role": "user", "content": "u"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
     "message 1: user and assistant must alternate"),
    (GOOD + [{"role": "assistant", "content": "again"}], "message 3: user and assistant must alternate"),
    ([{"role": "user", "content": "u"}], "no assistant message"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "  "}], "message 1: the assistant's content is empty"),
])
def test_check_messages_errors_name_the_source(messages, expected):
    with pytest.raises(TemperError) as info:
        check_messages(messages, "data.jsonl:7")
    assert str(info.value).startswith("data.jsonl:7: ")
    assert expected in str(info.value)


def test_check_messages_accepts_good_conversations_and_prompts():
    check_messages(GOOD, "x")
    check_messages(CONVERSATIONS["multi_turn"], "x")
    check_messages([{"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": "", "tool_calls": [{"name": "weather"}]},
                    {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}], "x")
    check_messages(GOOD[:2], "x", prompt=True)
    with pytest.raises(TemperError, match="x: a prompt must end with a user message"):
        check_messages(GOOD, "x", prompt=True)
    with pytest.raises(TemperError, match="message 1: user and assistant must alternate"):
        check_messages([{"role": "user", "content": "u"}, {"role": "tool", "content": "t"}], "x")


# ----------------------------------------------------------------------------- resolving, end of turn


def test_resolve_template(tmp_path, tiny_tokenizer):
    assert resolve_template(None, tiny_tokenizer) == CHATML_TEMPLATE
    assert resolve_template("", None) is None
    for name, source in BUILTIN_TEMPLATES.items():
        assert resolve_template(name) == source
    (tmp_path / "t.jinja").write_text(ZEPHYR_TEMPLATE, encoding="utf-8")
    assert resolve_template(str(tmp_path / "t.jinja")) == ZEPHYR_TEMPLATE
    tok_dir = tmp_path / "tok"
    Tokenizer(tiny_tokenizer.backend, chat_template=MISTRAL_TEMPLATE).save(tok_dir)
    assert resolve_template(str(tok_dir)) == MISTRAL_TEMPLATE
    hf_dir = tmp_path / "hf"  # transformers >= 4.43 saves the template beside the config
    hf_dir.mkdir()
    (hf_dir / "chat_template.jinja").write_text(ZEPHYR_TEMPLATE, encoding="utf-8")
    assert resolve_template(str(hf_dir)) == ZEPHYR_TEMPLATE
    assert resolve_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"

    with pytest.raises(TemperError, match="unknown chat template 'chatml2': expected one of chatml, llama3, plain"):
        resolve_template("chatml2")
    with pytest.raises(FileNotFoundError, match="chat template file not found"):
        resolve_template(str(tmp_path / "missing.jinja"))
    empty = tmp_path / "empty"
    Tokenizer(tiny_tokenizer.backend).save(empty)
    with pytest.raises(TemperError, match="no chat_template"):
        resolve_template(str(empty))


def _hf_saved(tmp_path, tiny_tokenizer, name: str, template, **save_kwargs):
    """A tokenizer directory written by transformers' own `save_pretrained`."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend, bos_token="<|bos|>",
                                              eos_token="<|eos|>", pad_token="<|pad|>", chat_template=template)
    out = tmp_path / name
    hf.save_pretrained(out, **save_kwargs)
    return out, transformers.AutoTokenizer.from_pretrained(out)


def test_read_chat_template_reads_every_layout_transformers_writes(tmp_path, tiny_tokenizer):
    from temper.data.chat import read_chat_template

    # one template: transformers 5.x writes chat_template.jinja and leaves it out of the config
    single, hf = _hf_saved(tmp_path, tiny_tokenizer, "single", ZEPHYR_TEMPLATE)
    assert (single / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((single / "tokenizer_config.json").read_text())
    assert read_chat_template(single) == hf.get_chat_template() == ZEPHYR_TEMPLATE
    assert Tokenizer.from_dir(single).chat_template == ZEPHYR_TEMPLATE
    # named templates: "default" in chat_template.jinja, the others in additional_chat_templates/
    named = {"default": MISTRAL_TEMPLATE, "tool_use": ZEPHYR_TEMPLATE}
    several, hf = _hf_saved(tmp_path, tiny_tokenizer, "several", named)
    assert (several / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert read_chat_template(several) == hf.get_chat_template() == MISTRAL_TEMPLATE
    # the legacy layout: a list of named templates inside tokenizer_config.json
    legacy, hf = _hf_saved(tmp_path, tiny_tokenizer, "legacy", named, save_jinja_files=False)
    assert not (legacy / "chat_template.jinja").exists()
    assert isinstance(json.loads((legacy / "tokenizer_config.json").read_text())["chat_template"], list)
    assert read_chat_template(legacy) == hf.get_chat_template() == MISTRAL_TEMPLATE
    assert Tokenizer.from_dir(legacy).chat_template == MISTRAL_TEMPLATE
    # both places filled: the file wins, as in transformers
    cfg = json.loads((single / "tokenizer_config.json").read_text())
    (single / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML_TEMPLATE}))
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(single)
    assert read_chat_template(single) == hf.get_chat_template() == ZEPHYR_TEMPLATE
    assert Tokenizer.from_dir(single).chat_template == ZEPHYR_TEMPLATE
    # a bad entry is named
    (legacy / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(TemperError, match="tokenizer_config.json: 'chat_template' must be a string"):
        read_chat_template(legacy)


def test_saving_over_a_stale_chat_template_file(tmp_path, tiny_tokenizer):
    """A chat_template.jinja left in the output directory would shadow the saved template."""
    from temper.data.chat import read_chat_template

    (tmp_path / "chat_template.jinja").write_text(ZEPHYR_TEMPLATE, encoding="utf-8")
    Tokenizer(tiny_tokenizer.backend, chat_template=MISTRAL_TEMPLATE).save(tmp_path)
    assert read_chat_template(tmp_path) == MISTRAL_TEMPLATE
    Tokenizer(tiny_tokenizer.backend).save(tmp_path)
    assert read_chat_template(tmp_path) is None and not (tmp_path / "chat_template.jinja").exists()


def test_end_of_turn_strings():
    assert end_of_turn_strings(BUILTIN_TEMPLATES["chatml"]) == ["<|im_end|>"]
    assert end_of_turn_strings(BUILTIN_TEMPLATES["llama3"]) == ["<|eot_id|>"]
    assert end_of_turn_strings(BUILTIN_TEMPLATES["plain"]) == []
    assert end_of_turn_strings(ZEPHYR_TEMPLATE) == []  # ends with eos_token: EOS stops it
    # found by probing a template that is not a built-in
    chatml_copy = CHATML_TEMPLATE.replace("{% endfor %}", "{% endfor %}{# a copy #}")
    assert end_of_turn_strings(chatml_copy) == ["<|im_end|>"]
    gemma_like = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    assert end_of_turn_strings(gemma_like) == ["<end_of_turn>"]


# ----------------------------------------------------------------------------- streaming without stop strings


def test_stop_writer_holds_back_a_possible_stop_string():
    from temper.data.chat import StopWriter

    out: list[str] = []
    w = StopWriter(["<|im_end|>"], out.append)
    for piece in ["Hel", "lo <|im", "_end|> more"]:
        w(0, piece)
    w.finish("Hello ")
    assert "".join(out) == "Hello "
    out.clear()
    w = StopWriter(["<|im_end|>"], out.append)
    w(0, "a <|i")
    assert "".join(out) == "a "  # "<|i" may start the stop string
    w(0, "x")
    assert "".join(out) == "a <|ix"
    w.finish("a <|ix!")
    assert "".join(out) == "a <|ix!"


# ----------------------------------------------------------------------------- temper chat


def _spy_generate_text(monkeypatch, stages=("chat", "generate")):
    """Record every (prompt, sampling) the `stages` give generate_text; the real generation still runs."""
    import importlib

    import temper.models.generate as gen

    calls: list[tuple[str, object]] = []
    real = gen.generate_text

    def spy(model, tokenizer, prompts, cfg, **kwargs):
        calls.extend((p, cfg) for p in prompts)
        return real(model, tokenizer, prompts, cfg, **kwargs)

    for stage in stages:  # the stage modules call the name they imported; the CLI finds them in sys.modules
        monkeypatch.setattr(importlib.import_module(f"temper.stages.{stage}"), "generate_text", spy)
    return calls


def test_chat_cli_conversation_from_piped_stdin(monkeypatch, capsys, tiny_model_dir, tiny_tokenizer):
    calls = _spy_generate_text(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/system be brief\nhi again\nmore\n/exit\nnever read\n"))
    code = main(["chat", f"model={tiny_model_dir}", "max_new_tokens=5", "temperature=0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("model> ") == 3 and out.count("you> ") == 5  # /exit stops before "never read"
    prompts = [p for p, _ in calls]
    assert prompts[0] == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    # /system set the system prompt and cleared the first exchange
    assert prompts[1] == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi again<|im_end|>\n"
                          "<|im_start|>assistant\n")
    # the conversation is kept: the third prompt holds the second exchange and its reply
    assert prompts[2].startswith(prompts[1]) and prompts[2].endswith(
        "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    sampling = calls[0][1]
    assert "<|im_end|>" in sampling.stop
    assert set(sampling.eos_token_ids) == {tiny_tokenizer.eos_id, tiny_tokenizer.token_id("<|im_end|>")}
    for line in out.split("model> ")[1:]:
        assert "<|im_end|>" not in line


def test_chat_cli_reset_and_eof(monkeypatch, capsys, tiny_model_dir):
    calls = _spy_generate_text(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\n/reset\ntwo\n"))  # ends without /exit
    code = main(["chat", f"model={tiny_model_dir}", "system=S", "max_new_tokens=3", "temperature=0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("model> ") == 2
    assert calls[1][0] == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n"


def test_chat_cli_without_a_chat_template(monkeypatch, capsys, tmp_path, tiny_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg_file = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["chat_template"]
    cfg_file.write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code = main(["chat", f"model={model_dir}", "max_new_tokens=2"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1
    assert "has no chat template" in err and "template=chatml|llama3|plain" in err

    calls = _spy_generate_text(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code = main(["chat", f"model={model_dir}", "template=plain", "max_new_tokens=2", "temperature=0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert calls[0][0] == "### Instruction:\nhello\n\n### Response:\n"
    assert calls[0][1].stop == ()


# ----------------------------------------------------------------------------- chat prompts in generate


def test_generate_chat_renders_the_prompt_with_the_template(monkeypatch, capsys, tiny_model_dir, tiny_tokenizer):
    calls = _spy_generate_text(monkeypatch)
    code = main(["generate", f"model={tiny_model_dir}", "prompt=Where does Alice live?", "chat=true",
                 "system=Be brief.", "max_new_tokens=4", "temperature=0", "stream=false"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (prompt, sampling), = calls
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere does Alice live?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert "<|im_end|>" in sampling.stop and tiny_tokenizer.token_id("<|im_end|>") in sampling.eos_token_ids
    assert "<|im_end|>" not in out

    calls.clear()
    code = main(["generate", f"model={tiny_model_dir}", "prompt=hi", "chat=true", "template=llama3",
                 "stop=[END]", "max_new_tokens=2", "temperature=0", "stream=false"])
    assert code == 0
    assert calls[0][0] == ("<|bos|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert list(calls[0][1].stop) == ["END", "<|eot_id|>"]

    calls.clear()  # without chat=true the prompt is untouched
    assert main(["generate", f"model={tiny_model_dir}", "prompt=hi", "max_new_tokens=2", "stream=false"]) == 0
    assert calls[0][0] == "hi" and list(calls[0][1].stop) == []


def test_generate_and_chat_use_a_template_saved_as_jinja_without_the_chat_stage(
        monkeypatch, capsys, tmp_path, tiny_model_dir, tiny_tokenizer):
    """Both commands read the directory's template through data/chat.py; generate needs no terminal-UI code."""
    import sys

    transformers = pytest.importorskip("transformers")
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "tokenizer_config.json").unlink()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer.backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        chat_template=ZEPHYR_TEMPLATE).save_pretrained(model_dir)
    assert (model_dir / "chat_template.jinja").is_file()
    expected = render(ZEPHYR_TEMPLATE, [{"role": "user", "content": "hi"}], add_generation_prompt=True,
                      bos_token="<|bos|>", eos_token="<|eos|>")
    monkeypatch.delitem(sys.modules, "temper.stages.chat", raising=False)
    calls = _spy_generate_text(monkeypatch, stages=("generate",))
    code = main(["generate", f"model={model_dir}", "prompt=hi", "chat=true", "max_new_tokens=2",
                 "temperature=0", "stream=false"])
    assert code == 0, capsys.readouterr().err
    assert calls[0][0] == expected
    assert "temper.stages.chat" not in sys.modules
    calls = _spy_generate_text(monkeypatch, stages=("chat",))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", f"model={model_dir}", "max_new_tokens=2", "temperature=0"]) == 0
    assert calls[0][0] == expected


def test_generate_prompts_file_with_conversations(monkeypatch, capsys, tmp_path, tiny_model_dir):
    rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "first"},
                      {"role": "assistant", "content": "a reply the model writes again"}]},  # a whole chat row
        {"prompt": [{"role": "user", "content": "second"}]},  # TRL's conversational prompt
        {"prompt": "third"},  # a string row is wrapped as a user message too
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_file = tmp_path / "out.jsonl"
    calls = _spy_generate_text(monkeypatch)
    code = main(["generate", f"model={tiny_model_dir}", f"prompts_file={prompts}", f"output_file={out_file}",
                 "batch_size=2", "max_new_tokens=3", "temperature=0"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert [p for p, _ in calls] == [
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nfirst<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nthird<|im_end|>\n<|im_start|>assistant\n",
    ]
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in results] == [rows[0]["messages"][:2], rows[1]["prompt"], "third"]
    assert all(isinstance(r["completion"], str) for r in results)


def test_generate_chat_errors(capsys, tmp_path, tiny_model_dir):
    def one_line_error(*args):
        code = main(["generate", f"model={tiny_model_dir}", *args])
        _, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1, err
        return err

    assert "add chat=true" in one_line_error("prompt=hi", "template=chatml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    assert f"{bad}:2: a prompt must end with a user message" in one_line_error(f"prompts_file={bad}")
    assert "unknown chat template 'chatm'" in one_line_error("prompt=hi", "chat=true", "template=chatm")


# ----------------------------------------------------------------------------- bad text in, one line out


def test_non_utf8_prompt_is_one_line(capsys, tiny_model_dir):
    code = main(["generate", f"model={tiny_model_dir}", "prompt=caf\udce9 au lait"])  # argv's surrogateescape
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["temper generate: error: prompt= is not valid UTF-8 (byte 0xe9 at character 3); "
                                 "give the text in UTF-8"]


def test_non_utf8_chat_line_is_skipped_with_one_line(monkeypatch, capsys, tiny_model_dir):
    calls = _spy_generate_text(monkeypatch)
    raw = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nhello\n/exit\n"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", raw)
    code = main(["chat", f"model={tiny_model_dir}", "max_new_tokens=3", "temperature=0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "(this line is not valid UTF-8 (byte 0xe9 at character 3); give the text in UTF-8; skipped)" in err
    assert len(calls) == 1 and "hello" in calls[0][0]  # the conversation went on


def test_generate_output_file_is_whole_or_untouched(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import temper.stages.generate as generate_stage

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(4)))
    out = tmp_path / "out.jsonl"
    out.write_text("the previous results\n")
    real = generate_stage.generate_text
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C during the second batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_stage, "generate_text", interrupted)
    args = ["generate", f"model={tiny_model_dir}", f"prompts_file={prompts}", f"output_file={out}", "batch_size=2",
            "max_new_tokens=2", "temperature=0", "overwrite=true"]  # an existing file is replaced only when asked
    assert main(args) == 130
    assert out.read_text() == "the previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "p.jsonl"]  # no temporary file left
    monkeypatch.setattr(generate_stage, "generate_text", real)
    assert main(args) == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["p0", "p1", "p2", "p3"]


def test_a_prompt_past_the_context_warns_or_is_refused():
    import torch

    from temper.models import build_model, preset
    from temper.models.generate import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    llama = build_model(preset("llama-tiny", vocab_size=64, max_seq_len=16)).eval()
    with pytest.warns(UserWarning, match="exceeds the model's 16 positions; tokens beyond them are positions"):
        generate(llama, [list(range(12))], sampling)
    gpt2 = build_model(preset("gpt2-tiny", vocab_size=64, max_seq_len=16)).eval()
    with pytest.raises(ValueError, match=r"prompt \(12 tokens\) \+ max_new_tokens \(6\) exceeds the model's 16"):
        generate(gpt2, [list(range(12))], sampling)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context: no warning
        generate(llama, [list(range(8))], sampling)
