"""Chat templates as data: the built-in templates, what ends a turn in each, and the one reader
of a model directory's template (`chat_template.jinja` or tokenizer_config.json, with
transformers' precedence). The tokenizer (which saves a template with itself) and the chat
module (which renders templates) both read from here; rendering lives in `temper.data.chat`.
"""

from __future__ import annotations

import json
from pathlib import Path

from temper.errors import TemperError

# ChatML, the default template of a temper-trained tokenizer.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Llama-3 instruct, in the form of Meta's tokenizer_config.json (Llama 3.0: no date or tools
# preamble). The first message carries the BOS token; each turn is a header, the content
# (trimmed) and <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# A plain instruction format (Alpaca-like) for models with no special chat tokens: an
# optional system paragraph, then "### Instruction:" / "### Response:" blocks; a response
# ends with the EOS token.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif %}"
    "{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] }}{{ eos_token }}{{ '\n\n' }}"
    "{% else %}"
    "{{ raise_exception('the plain template has no ' + message['role'] + ' role') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "plain": PLAIN_TEMPLATE,
}

# What ends an assistant turn in each built-in ("plain" ends with EOS, which stops anyway).
BUILTIN_END_OF_TURN: dict[str, list[str]] = {
    CHATML_TEMPLATE: ["<|im_end|>"],
    LLAMA3_TEMPLATE: ["<|eot_id|>"],
    PLAIN_TEMPLATE: [],
}

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.43 saves the template here
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # ... and named extra templates here
TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".txt")


def _templates_from_config(cfg: dict, where: Path) -> dict[str, str]:
    """tokenizer_config.json's `chat_template`: a string, or a list of {"name", "template"}."""
    template = cfg.get("chat_template")
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template):
        return {t["name"]: t["template"] for t in template}
    raise TemperError(f"{where}: 'chat_template' must be a string or a list of "
                      '{"name": ..., "template": ...} objects')


def read_chat_template(model_dir: str | Path) -> str | None:
    """The chat template saved in a model/tokenizer directory, as transformers reads it; None if none.

    transformers >= 4.43 saves it as `chat_template.jinja` (named extras in
    `additional_chat_templates/NAME.jinja`); older versions as `chat_template` in
    tokenizer_config.json (a string, or a list of named templates). As in transformers, the
    files, when there are any, replace the config's entry, and the template used is the one
    named "default". Every command that reads a directory's template comes through here.
    """
    path = Path(model_dir)
    templates: dict[str, str] = {}
    jinja_file = path / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    extra_dir = path / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if templates:
        return templates.get("default") or None
    cfg_file = path / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TemperError(f"{cfg_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise TemperError(f"{cfg_file}: expected a JSON object")
    return _templates_from_config(cfg, cfg_file).get("default") or None
