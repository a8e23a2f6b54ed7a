"""Logits on the real SmolLM2-135M Q4_1 against llama.cpp's own outputs (../testdata/reference)."""

from __future__ import annotations

import numpy as np
import pytest

import gguf_finetune as gf


@pytest.fixture(scope="module")
def reference(testdata):
    z = np.load(testdata / "reference" / "smollm2-logits.npz")  # see tests/data/README.md
    return z["tokens"], (z["dequant_positions"], z["logits_dequant_f32"]), z["logits_llamacpp"].astype(np.float32)


@pytest.fixture(scope="module")
def model(smollm2):
    return gf.load_model(smollm2)


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logits_match_dequantized_float32_reference(model, reference):
    tokens, (positions, ref), _ = reference
    ours = model.logits(tokens)
    assert ours.shape == (len(tokens), ref.shape[1]) and ours.dtype == np.float32
    ours = ours[positions]
    err = np.abs(ours - ref)
    assert err.mean() <= 1e-3, err.mean()
    assert err.max() <= 2e-2, err.max()


def test_logits_agree_with_llamacpp(model, reference):
    tokens, _, ref = reference
    ours = model.logits(tokens)
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()  # KL(llama.cpp || ours)
    assert top1 >= 0.90, top1
    assert kl <= 0.02, kl


def test_streamed_weights_give_identical_logits(smollm2, reference):
    tokens, _, _ = reference
    cached = gf.load_model(smollm2)
    streamed = gf.load_model(smollm2, memory_budget=0)
    assert cached.weights.cache_layers and not streamed.weights.cache_layers
    np.testing.assert_array_equal(cached.logits(tokens[:16]), streamed.logits(tokens[:16]))
