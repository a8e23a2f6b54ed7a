"""Chat templates: built-ins render as the models' HF templates do; the sandbox; errors; sources."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

import pytest

from gguf_finetune.data.chat_template import (
    BUILTIN_TEMPLATES,
    GGUF_KEY,
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
    template_source,
)
from gguf_finetune.errors import UserError

SYS_CHAT = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]

# (template, bos, eos) -> rendering of SYS_CHAT, as the models' Hugging Face templates produce it
EXPECTED = {
    "chatml": ("", "", "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                       "<|im_start|>assistant\nHello!<|im_end|>\n"),
    "llama2": ("<s>", "</s>", "<s>[INST] <<SYS>>\nBe nice.\n<</SYS>>\n\nHi [/INST] Hello! </s>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>",
               "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe nice.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"),
    "mistral": ("<s>", "</s>", "<s>[INST] Be nice.\n\nHi [/INST]Hello!</s>"),
    "zephyr": ("<s>", "</s>", "<|system|>\nBe nice.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"),
    "gemma": ("<bos>", "<eos>", "<bos><start_of_turn>user\nBe nice.\n\nHi<end_of_turn>\n"
                                "<start_of_turn>model\nHello!<end_of_turn>\n"),
    "phi3": ("<s>", "<|endoftext|>", "<|system|>\nBe nice.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
                                     "<|endoftext|>"),
}

GEN_PROMPT_END = {"chatml": "<|im_start|>assistant\n", "llama2": "Hi [/INST]", "mistral": "Hi [/INST]",
                  "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "zephyr": "<|assistant|>\n",
                  "gemma": "<start_of_turn>model\n", "phi3": "<|assistant|>\n"}


def test_every_builtin_is_tested():
    assert set(EXPECTED) == set(BUILTIN_TEMPLATES) == set(GEN_PROMPT_END)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_renderings(name):
    bos, eos, want = EXPECTED[name]
    t = ChatTemplate(BUILTIN_TEMPLATES[name], name, bos, eos)
    assert t.render(SYS_CHAT) == want
    prompt = t.render(SYS_CHAT[:2], add_generation_prompt=True)
    assert prompt.endswith(GEN_PROMPT_END[name])
    assert want.startswith(prompt)  # the prompt is a prefix of the conversation: the mask's premise


@pytest.mark.parametrize("name", ["llama2", "mistral", "gemma"])
def test_alternation_is_enforced(name):
    t = ChatTemplate(BUILTIN_TEMPLATES[name], name, "<s>", "</s>")
    with pytest.raises(ChatTemplateError, match="alternate"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_smollm2_gguf_template(smollm2):
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2)
    t = load_chat_template(None, open_gguf(smollm2).get(GGUF_KEY), tok)
    assert t.name == "the model's tokenizer.chat_template"
    assert (t.bos_token, t.eos_token) == ("<|im_start|>", "<|im_end|>")
    got = t.render(SYS_CHAT[1:2], add_generation_prompt=True)
    assert got == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert t.render(SYS_CHAT) == EXPECTED["chatml"][2]


# ------------------------------------------------------------------------------------------------
# what templates get
# ------------------------------------------------------------------------------------------------
def test_context_helpers():
    src = ("{{ strftime_now('%Y-%m-%d') }}|{{ {'a': '<b>&\u00e9'} | tojson }}|{{ messages | tojson(indent=None) }}|"
           "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
           "{% generation %}{{ bos_token }}{% endgeneration %}|{{ eos_token }}|{{ add_generation_prompt }}|"
           "{{ undefined_thing is defined }}")
    t = ChatTemplate(src, "t", "B", "E", now=datetime(2025, 3, 4, tzinfo=timezone.utc))
    got = t.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], True)
    assert got == ('2025-03-04|{"a": "<b>&\u00e9"}|[{"role": "user", "content": "x"}, {"role": "assistant", '
                   '"content": "y"}]|user|B|E|True|False')


def test_trim_and_lstrip_blocks_as_hf():
    src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert ChatTemplate(src, "t").render([{"role": "user", "content": "a"}]) == "[a]\n"


# ------------------------------------------------------------------------------------------------
# the sandbox
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",  # plain jinja would print nothing here; we refuse
    "{% if ''.__class__ %}x{% endif %}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append(1) }}",  # immutable: no mutation of the data
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_sandbox_refuses_escapes(src):
    t = ChatTemplate(src, "evil")
    with pytest.raises(ChatTemplateError) as e:
        t.render([{"role": "user", "content": "x"}])
    assert "refused by the sandbox" in str(e.value) and "\n" not in str(e.value)


def test_template_errors_are_one_line():
    with pytest.raises(ChatTemplateError, match=r"chat template \(t\): line 2: "):
        ChatTemplate("ok\n{% for %}", "t")
    with pytest.raises(ChatTemplateError, match=r"chat template \(t\): only user roles"):
        ChatTemplate("{{ raise_exception('only user roles') }}", "t").render([])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ChatTemplate("{{ messages[0].content + 1 }}", "t").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="list object has no element 5"):
        ChatTemplate("{{ messages[5].content.x.y }}", "t").render([])


def test_jinja2_missing_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(UserError, match="pip install jinja2"):
        ChatTemplate(BUILTIN_TEMPLATES["chatml"], "chatml")


# ------------------------------------------------------------------------------------------------
# where the template comes from
# ------------------------------------------------------------------------------------------------
def test_template_sources(tmp_path):
    assert template_source("gemma", "GGUF") == (BUILTIN_TEMPLATES["gemma"], "built-in 'gemma'")
    assert template_source(None, "GGUF") == ("GGUF", "the model's tokenizer.chat_template")
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0].content }}\n")
    assert template_source(str(f), "GGUF") == ("{{ messages[0].content }}\n", f"file '{f}'")
    j = tmp_path / "tokenizer_config.json"
    j.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                               {"name": "default", "template": "D"}]}))
    assert template_source(str(j), None)[0] == "D"
    j.write_text(json.dumps({"chat_template": "S"}))
    assert template_source(str(j), None)[0] == "S"
    j.write_text(json.dumps({"bos_token": "x"}))
    with pytest.raises(UserError, match="no 'chat_template'"):
        template_source(str(j), None)
    with pytest.raises(UserError, match="neither a built-in template"):
        template_source("nosuch", "GGUF")
    with pytest.raises(UserError, match="no tokenizer.chat_template.*--chat-template"):
        template_source(None, None)
