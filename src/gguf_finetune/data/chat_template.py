"""Chat templates: the model's own ``tokenizer.chat_template`` (or a built-in one) rendered safely.

Templates are Jinja2, as Hugging Face ``apply_chat_template`` and llama.cpp run them.  A template
comes from a downloaded model, so it is untrusted code: it is compiled in jinja2's
``ImmutableSandboxedEnvironment`` (no access to Python internals, no mutation of the messages), and
any attempt to reach an unsafe attribute is an error even where plain jinja would print nothing.

What a template gets (HF's and llama.cpp's context): ``messages`` (list of dicts),
``add_generation_prompt``, ``bos_token``, ``eos_token`` (the tokens' texts), ``raise_exception(msg)``,
``strftime_now(fmt)``, the ``tojson`` filter with HF's semantics (no HTML escaping), the
``loopcontrols`` extension (break/continue), a ``{% generation %}`` block that just renders its body,
and ``trim_blocks``/``lstrip_blocks`` on, as HF sets them.

``strftime_now`` formats a fixed time given by the caller (the training data file's modification
time), not the clock, so the same data renders to the same tokens on every run — resuming a day
later must not change the samples.

jinja2 is an optional dependency (``pip install jinja2``); it is imported only when a chat record
is rendered.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any, Sequence

from ..errors import UserError

# --------------------------------------------------------------------------------------------------
# built-in templates (written after the models' Hugging Face templates)
# --------------------------------------------------------------------------------------------------
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral Instruct v0.1's template; a leading system message is put before the first user message.
MISTRAL = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message %}"
    "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only system, user and assistant roles are supported') }}{% endif %}"
    "{% endfor %}"
)

# Zephyr's template is written on several lines: trim_blocks/lstrip_blocks decide its newlines.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# Gemma's template; a leading system message goes into the first user turn (as Gemma 3 does).
GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim "
    "+ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama2": LLAMA2,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "zephyr": ZEPHYR,
    "gemma": GEMMA,
    "phi3": PHI3,
}

GGUF_KEY = "tokenizer.chat_template"


class ChatTemplateError(UserError):
    """A template that does not compile or fails while rendering (one line)."""


def _jinja():
    try:
        import jinja2  # noqa: F401
        from jinja2 import ext, nodes, sandbox
    except ImportError:
        raise UserError("chat records are rendered with the model's chat template, which needs jinja2: "
                        "pip install jinja2") from None
    return jinja2, ext, nodes, sandbox


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """HF's tojson: json.dumps without jinja's HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_environment():
    jinja2, ext, nodes, sandbox = _jinja()

    class GenerationBlock(ext.Extension):
        """HF's ``{% generation %}...{% endgeneration %}`` marks assistant text; here it renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class SandboxUndefined(jinja2.Undefined):
        """Undefined, except that a value refused by the sandbox fails whenever it is used (printing
        included), instead of silently rendering as ''."""

        __slots__ = ()

        def _refused(self) -> bool:
            return self._undefined_exception is jinja2.exceptions.SecurityError

        def __str__(self) -> str:
            if self._refused():
                self._fail_with_undefined_error()
            return super().__str__()

        def __bool__(self) -> bool:
            if self._refused():
                self._fail_with_undefined_error()
            return super().__bool__()

        def __iter__(self):
            if self._refused():
                self._fail_with_undefined_error()
            return super().__iter__()

    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, ext.loopcontrols],
        undefined=SandboxUndefined)
    env.filters["tojson"] = _tojson
    return env, jinja2


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


class ChatTemplate:
    """A compiled chat template.

    source       the Jinja text
    name         where it came from, for messages ("the model's tokenizer.chat_template", ...)
    bos_token, eos_token   the texts the template may insert
    now          the time strftime_now formats (default: 2024-01-01 UTC; pass the data file's mtime)
    """

    def __init__(self, source: str, name: str, bos_token: str = "", eos_token: str = "",
                 now: datetime | None = None):
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.now = now or datetime(2024, 1, 1, tzinfo=timezone.utc)
        env, jinja2 = _make_environment()
        self._jinja2 = jinja2
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template ({name}): line {e.lineno}: {_one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - any compile failure of an untrusted template
            raise ChatTemplateError(f"chat template ({name}): {_one_line(e)}") from None

    def _globals(self) -> dict[str, Any]:
        jinja2 = self._jinja2
        now = self.now

        def raise_exception(message: str = "") -> None:
            raise jinja2.exceptions.TemplateError(message)

        def strftime_now(fmt: str) -> str:
            return now.strftime(str(fmt))

        return {"raise_exception": raise_exception, "strftime_now": strftime_now}

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The template applied to ``messages``; any failure is a one-line :class:`ChatTemplateError`."""
        jinja2 = self._jinja2
        ctx = dict(self._globals(), messages=[dict(m) for m in messages],
                   add_generation_prompt=bool(add_generation_prompt),
                   bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            return self._template.render(**ctx)
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"chat template ({self.name}) refused by the sandbox: {_one_line(e)}") from None
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template ({self.name}): {_one_line(e)}") from None
        except RecursionError:
            raise ChatTemplateError(f"chat template ({self.name}): recursion too deep") from None
        except MemoryError:
            raise ChatTemplateError(f"chat template ({self.name}): out of memory while rendering") from None
        except Exception as e:  # noqa: BLE001 - a template can fail in any Python operation it triggers
            raise ChatTemplateError(f"chat template ({self.name}): {type(e).__name__}: {_one_line(e)}") from None


def read_template_file(path: str) -> str:
    """A template from a file: the Jinja text itself, or a tokenizer_config.json's ``chat_template``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"--chat-template '{path}': cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"--chat-template '{path}': not valid UTF-8 (byte {e.start})") from None
    if path.lower().endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--chat-template '{path}': not valid JSON (line {e.lineno}: {e.msg})") from None
        tpl = obj.get("chat_template") if isinstance(obj, dict) else None
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default", next(iter(named.values()), None))
        if not isinstance(tpl, str):
            raise UserError(f"--chat-template '{path}': no 'chat_template' string in this JSON file")
        return tpl
    if not text.strip():
        raise UserError(f"--chat-template '{path}': file is empty")
    return text


def template_source(spec: str | None, gguf_template: str | None, family: tuple[str, str | None] | None = None
                    ) -> tuple[str, str]:
    """(source, description) for ``--chat-template`` ``spec`` (a built-in name or a file) or, without
    it, the model's own template, or when the model has none its family's built-in one (``family``:
    (architecture, built-in name or None))."""
    if spec:
        if spec in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[spec], f"built-in '{spec}'"
        if os.path.isfile(spec):
            return read_template_file(spec), f"file '{spec}'"
        raise UserError(f"--chat-template '{spec}': neither a built-in template "
                        f"({', '.join(BUILTIN_TEMPLATES)}) nor an existing file")
    if gguf_template:
        return gguf_template, f"the model's {GGUF_KEY}"
    if family is not None and family[1] in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[family[1]], f"built-in '{family[1]}' ({family[0]}'s format; the model has no {GGUF_KEY})"
    raise UserError(f"the model has no {GGUF_KEY}, so its chat records cannot be rendered: give "
                    f"--chat-template NAME ({', '.join(BUILTIN_TEMPLATES)}) or --chat-template FILE")


def special_token_text(tok, token_id: int | None) -> str:
    """What llama.cpp gives a template as bos_token/eos_token: the token's piece (special=True)."""
    if token_id is None:
        return ""
    return tok.token_to_piece(int(token_id), special=True).decode("utf-8", errors="replace")


def load_chat_template(spec: str | None, gguf_template: str | None, tok, now: datetime | None = None,
                       family: tuple[str, str | None] | None = None) -> ChatTemplate:
    """Resolve and compile the template (see :func:`template_source`) with the tokenizer's BOS/EOS texts."""
    source, name = template_source(spec, gguf_template, family)
    return ChatTemplate(source, name, special_token_text(tok, tok.bos_id), special_token_text(tok, tok.eos_id), now)


def file_time(path: str | os.PathLike) -> datetime:
    """A file's modification time (UTC), the fixed 'now' of strftime_now."""
    try:
        return datetime.fromtimestamp(os.stat(path).st_mtime, tz=timezone.utc)
    except OSError:
        return datetime(2024, 1, 1, tzinfo=timezone.utc)


__all__ = ["BUILTIN_TEMPLATES", "ChatTemplate", "ChatTemplateError", "GGUF_KEY", "file_time",
           "load_chat_template", "read_template_file", "special_token_text", "template_source"]
