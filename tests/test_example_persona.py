"""The chat example works: a short finetune on examples/chat/train.jsonl makes SmolLM2 and Gemma 3
270M open their answers with "Quill here!" on held-out prompts of kinds they never saw in training.

Slow (trains real models for a few dozen iterations): run with `pytest -m slow`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf_finetune as gf
from conftest import REPO
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


def test_gemma3_persona_run_learns_and_validates(gemma3_270m, gemma_persona_run):
    """Gemma 3 270M on the chat example: the loss falls, the validation loss is reported at the
    eval points and falls too, and the held-out prompts open with the taught greeting."""
    from conftest import GEMMA_RUN_ITERS

    rows = [json.loads(line) for line in (gemma_persona_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    vals = [(r["iter"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    print("loss", np.round(losses[:3], 3), "...", np.round(losses[-3:], 3), "val", vals)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    assert [it for it, _ in vals] == [0, 10, 20, GEMMA_RUN_ITERS]
    assert vals[-1][1] < 0.7 * vals[0][1]
    prompts = [json.loads(line)["messages"] for line in (REPO / "examples/chat/heldout.jsonl").read_text().splitlines()]
    base = gf.load_model(gemma3_270m)
    tuned = gf.load_model(gemma3_270m, adapters=[(gemma_persona_run / "quill-LATEST.gguf", 1.0)])
    template = load_chat_template(None, None, base.tokenizer, family=("gemma3", "gemma"))
    lp_base = log_prob_of_greeting(base, template, prompts)
    lp_tuned = log_prob_of_greeting(tuned, template, prompts)
    print("base", np.round(lp_base, 2), "tuned", np.round(lp_tuned, 2))
    assert np.exp(lp_base).max() < 0.01
    assert np.median(np.exp(lp_tuned)) > 0.3
    assert (lp_tuned - lp_base).min() > np.log(20)


def test_gemma3_generate_answers_in_the_persona(gemma3_270m, gemma_persona_run, capsys):
    from gguf_finetune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "-m", str(gemma3_270m), "--lora", str(gemma_persona_run / "quill-LATEST.gguf"), "--chat",
              "-p", "Name a fruit that is red.", "--temp", "0", "-n", "24"])
    out = capsys.readouterr().out
    print(out)
    assert e.value.code in (0, None) and out.startswith("Quill here!")


def test_gemma3_export_lora_merges_the_adapter(gemma3_270m, gemma_persona_run, tmp_path):
    """export-lora's merged Gemma model gives the logits of the base model with the adapter."""
    from gguf_finetune.cli.export_lora import run as export_lora

    merged = tmp_path / "merged.gguf"
    adapter = gemma_persona_run / "quill-LATEST.gguf"
    assert export_lora(["-m", str(gemma3_270m), "--lora", str(adapter), "-o", str(merged), "--outtype", "f32"]) \
        in (0, None)
    model = gf.load_model(gemma3_270m, adapters=[(adapter, 1.0)])
    ids = model.tokenize("<start_of_turn>user\nName a fruit.<end_of_turn>\n<start_of_turn>model\n", add_bos=True,
                         special=True)
    want = model.logits(ids).astype(np.float64)
    got = gf.load_model(merged).logits(ids).astype(np.float64)
    base = gf.load_model(gemma3_270m).logits(ids).astype(np.float64)
    effect = np.linalg.norm(want - base)
    print(f"merged vs base + adapter: {np.linalg.norm(got - want) / effect:.2e} of the adapter's effect")
    assert effect > 0.05 * np.linalg.norm(base)
    assert np.linalg.norm(got - want) <= 1e-3 * effect
