"""The chat example works: a short finetune on examples/chat/train.jsonl makes SmolLM2 open its
answers with "Quill here!" on held-out prompts of kinds it never saw in training.

Slow (trains the real 135M model for a few dozen iterations): run with `pytest -m slow`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf_finetune as gf
from gguf_finetune.data.chat_template import load_chat_template

pytestmark = pytest.mark.slow

ITERS = 30


def log_prob_of_greeting(model, template, prompts) -> np.ndarray:
    """log P("Quill here!" as the assistant's first words | prompt), per held-out prompt."""
    out = []
    for msgs in prompts:
        prefix = template.render(msgs, add_generation_prompt=True)
        ids = model.tokenize(prefix, special=True)
        target = model.tokenize("Quill here!", special=False)
        logits = model.logits(ids + target)  # [n, V]
        lp = logits.astype(np.float64)
        lp -= lp.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        n = len(ids)
        out.append(sum(lp[n - 1 + j, t] for j, t in enumerate(target)))
    return np.array(out)


def test_persona_adapter_raises_the_taught_greeting(smollm2, tmp_path, monkeypatch):
    from gguf_finetune.cli.finetune import run

    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    argv = ["--model-base", str(smollm2), "--train-data", str(repo / "examples/chat/train.jsonl"),
            "--ctx", "64", "--batch", "4", "--adam-iter", str(ITERS), "--adam-alpha", "0.003", "--warmup", "3",
            "--lora-r", "8", "--seed", "1", "--threads", "2", "--save-every", "0",
            "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "quill-ITERATION.gguf"]
    assert run(argv) == 0
    prompts = [json.loads(line)["messages"] for line in (repo / "examples/chat/heldout.jsonl").read_text().splitlines()]
    base = gf.load_model(smollm2)
    tuned = gf.load_model(smollm2, adapters=[("quill-LATEST.gguf", 1.0)])
    template = load_chat_template(None, base.gguf.get_str("tokenizer.chat_template"), base.tokenizer)
    lp_base = log_prob_of_greeting(base, template, prompts)
    lp_tuned = log_prob_of_greeting(tuned, template, prompts)
    print("base", np.round(lp_base, 2), "tuned", np.round(lp_tuned, 2))
    assert np.exp(lp_base).max() < 0.01  # the base model never opens like this
    assert np.median(np.exp(lp_tuned)) > 0.3  # the adapter does, on question kinds it never saw
    assert (lp_tuned - lp_base).min() > np.log(20)  # at least 20x more likely on every held-out prompt
