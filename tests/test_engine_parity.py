"""Logits on the real SmolLM2-135M Q4_1 against llama.cpp's own outputs (../testdata/reference)."""

from __future__ import annotations

import numpy as np
import pytest

import gguf_finetune as gf
from conftest import REPO


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


# -- every family against llama.cpp (tests/data/arch; its README says how each file was made) --------

ARCH_DATA = REPO / "tests" / "data" / "arch"
FAMILIES = ["llama", "qwen2", "qwen3", "gemma3", "phi3"]


def _kl(ref, ours):
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("arch", FAMILIES)
def test_tiny_f32_family_matches_llamacpp(arch):
    z = np.load(ARCH_DATA / f"tiny-{arch}-f32.npz")
    model = gf.load_model(ARCH_DATA / f"tiny-{arch}-f32.gguf")
    assert model.hparams.arch == arch
    ours = model.logits(z["tokens"])
    ref = z["logits_llamacpp"]
    err = np.abs(ours - ref).max()
    print(f"{arch} f32 vs llama.cpp: max |d logit| {err:.2e}")
    # gemma3: llama.cpp's CPU GELU is a float16 table; the exact tanh-GELU lands ~2e-3 from it
    assert err <= (5e-3 if arch == "gemma3" else 1e-3), err
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("arch", FAMILIES)
def test_tiny_q8_0_family_matches_llamacpp(arch):
    """llama.cpp rounds activations to 8 bits on quantized weights: compared by KL, not top-1."""
    z = np.load(ARCH_DATA / f"tiny-{arch}-q8_0.npz")
    ours = gf.load_model(ARCH_DATA / f"tiny-{arch}-q8_0.gguf").logits(z["tokens"])
    kl = _kl(z["logits_llamacpp"], ours)
    print(f"{arch} q8_0 vs llama.cpp: mean KL {kl:.2e}")
    assert kl <= 0.02


@pytest.mark.slow
def test_gemma3_270m_matches_llamacpp(gemma3_270m):
    """The real Gemma 3 270M Q4_K_M against llama.cpp on an F32 copy of the same dequantized
    weights (f32deq_*: the tight target), and against llama.cpp's own Q4_K_M run, on the top-256
    logits and log-sum-exp stored for every position."""
    z = np.load(ARCH_DATA / "gemma3-270m-q4_k_m.npz")
    ours = gf.load_model(gemma3_270m).logits(z["tokens"]).astype(np.float64)
    m = ours.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(ours - m).sum(-1, keepdims=True)))[:, 0]
    for prefix, check in (("f32deq_", "tight"), ("", "kl")):
        ids = z[prefix + "topk_ids"].astype(np.int64)
        ref_lp = z[prefix + "topk_logits"].astype(np.float64) - z[prefix + "logsumexp"][:, None]
        our_lp = np.take_along_axis(ours, ids, axis=1) - lse[:, None]
        if check == "tight":
            top1 = (ours.argmax(-1) == z[prefix + "top1"]).mean()
            dlp = np.abs(ref_lp - our_lp).max()
            print(f"gemma3 270M vs llama.cpp f32: top-1 {top1:.3f}, max |d log p| {dlp:.4f}")
            assert top1 >= 0.98 and dlp <= 0.05
        else:
            kl = float((np.exp(ref_lp) * (ref_lp - our_lp)).sum(-1).mean())
            print(f"gemma3 270M vs llama.cpp Q4_K_M: mean KL over the top-256 {kl:.4f}")
            assert kl <= 0.02
