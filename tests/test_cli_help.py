"""``finetune --help``: the deliberate differences from llama.cpp are stated where the flag is."""

from __future__ import annotations

import re

import pytest


def _help_entry(text: str, flag: str) -> str:
    """The help entry of ``flag``, whitespace collapsed (the text is wrapped to the terminal width)."""
    flat = " ".join(text.split())
    m = re.search(rf"(?:^| ){re.escape(flag)} \S+ (.*?)(?= --?[a-z][\w-]* |$)", flat)
    assert m, f"no entry for {flag}"
    return m.group(1)


def test_help_says_lora_alpha_scaling_is_applied_in_training(capsys):
    from gguf_finetune.cli.common import run_main
    from gguf_finetune.cli.finetune import run

    with pytest.raises(SystemExit) as e:
        run_main(run, ["--help"], "finetune")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: finetune [options]")
    entry = _help_entry(out, "--lora-alpha")
    assert "resulting LORA scaling is alpha/r" in entry
    assert "Unlike llama.cpp's finetune, the alpha/r scaling is also applied in training" in entry
    assert "(default: equal to --lora-r, 4)" in entry
    # the entry is the flag's own, not the next one's
    assert "--lora-r" not in entry.replace("equal to --lora-r", "")
