"""tests/reference_forward.py (the float64 spec of each family's forward pass) against llama.cpp's logits.

Data: tests/data/arch/, copied from the shared llama.cpp reference set (its README and manifest.json
tell how each file was made): random tiny models of every family, F32 and Q8_0, with llama.cpp's
logits on 48 tokens (one batch, flash attention off, F32 KV cache), and llama.cpp's top-256 / LSE on
64 tokens of the real Gemma 3 270M.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

import reference_forward as R

DATA = Path(__file__).resolve().parent / "data" / "arch"


def tiny(arch: str, q: str):
    z = np.load(DATA / f"tiny-{arch}-{q}.npz")
    return GGUFReader(DATA / f"tiny-{arch}-{q}.gguf"), z["tokens"], z["logits_llamacpp"].astype(np.float64)


def log_softmax(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=-1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis=-1, keepdims=True))


def mean_kl(ref: np.ndarray, ours: np.ndarray) -> float:
    """Mean over positions of KL(llama.cpp ‖ ours)."""
    lp, lq = log_softmax(ref), log_softmax(ours)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


# -- metadata --------------------------------------------------------------------------------------

def test_hparams_follow_llamacpp_rules():
    g = R.read_hparams(tiny("gemma3", "f32")[0])
    assert (g.head_dim, g.n_rot, g.rope_type) == (32, 32, "neox")              # key_length, not E/H
    assert g.attn_scale == 1 / math.sqrt(32)                                   # not the 27B rule
    assert g.embd_scale == 8.0 and g.final_logit_softcap == 0.0
    assert g.n_swa == 16 and g.swa_layers == [True] * 5 + [False]              # swa_period 6
    assert (g.rope_base_swa, g.rope_base) == (10000.0, 1e6)
    p = R.read_hparams(tiny("phi3", "f32")[0])
    assert (p.head_dim, p.n_rot, p.n_swa, p.swa_layers) == (16, 12, 0, [])     # SWA disabled
    assert R.read_hparams(tiny("qwen3", "f32")[0]).head_dim * 4 == 128         # q_dim != n_embd
    assert R.read_hparams(tiny("llama", "f32")[0]).rope_type == "normal"


def rewrite(src: GGUFReader, dst: Path, **extra_keys) -> GGUFReader:
    """A copy of an F32 GGUF with <arch>.* metadata added or replaced (tensors and other keys unchanged)."""
    from gguf import GGUFValueType, GGUFWriter

    arch = src.fields["general.architecture"].contents()
    extra = {f"{arch}.{name.replace('__', '.')}": v for name, v in extra_keys.items()}
    w = GGUFWriter(str(dst), arch)
    for name, f in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in extra:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    for key, v in extra.items():
        if isinstance(v, float):
            w.add_float32(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)
        else:
            w.add_uint32(key, v)
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFReader(dst)


def test_gemma3_optional_keys(tmp_path):
    """Keys the tiny model does not carry: sliding_window_pattern (period), rope.freq_base_swa, linear
    rope scaling (global layers only: the local layers keep scale 1), final_logit_softcapping."""
    src, tokens, _ = tiny("gemma3", "f32")
    r = rewrite(src, tmp_path / "g.gguf", attention__sliding_window_pattern=3, rope__freq_base_swa=20000.0,
                rope__scaling__type="linear", rope__scaling__factor=8.0, final_logit_softcapping=0.5)
    hp = R.read_hparams(r)
    assert hp.swa_layers == [True, True, False] * 2
    assert (hp.rope_base_swa, hp.rope_freq_scale_swa, hp.rope_freq_scale) == (20000.0, 1.0, 0.125)
    logits = R.forward64(r, tokens[:20])
    assert np.abs(logits).max() < 0.5
    r = rewrite(src, tmp_path / "g0.gguf", attention__sliding_window=0)
    assert R.read_hparams(r).swa_layers == []


# -- F32 models: float32 noise only ----------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_tiny_f32_matches_llamacpp(arch):
    reader, tokens, ref = tiny(arch, "f32")
    logits = R.forward64(reader, tokens)
    assert logits.shape == ref.shape
    assert np.abs(logits - ref).max() < 5e-6          # measured: 1.7e-6 / 8e-7 / 2.4e-6 / 1.1e-6


def test_tiny_gemma3_f32_matches_llamacpp():
    """ggml's CPU GELU rounds its input to f16 and reads an f16 table: "ggml" reproduces that, "tanh"
    is the exact function. What is left with the table is not a graph difference: the table is a step
    function, and llama.cpp's float32 gate values land on the other side of an f16 rounding midpoint
    now and then (float32-sized noise on our gate values moves the logits by up to 4.6e-4)."""
    reader, tokens, ref = tiny("gemma3", "f32")
    table = np.abs(R.forward64(reader, tokens, gelu="ggml") - ref).max()
    exact = np.abs(R.forward64(reader, tokens, gelu="tanh") - ref).max()
    assert table < 1e-3                                # measured 6.8e-4
    assert exact < 3e-3                                # measured 1.9e-3
    assert table < exact / 2


# -- Q8_0 models: llama.cpp also rounds the activations to 8 bits, the reference does not ----------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "phi3"])
def test_tiny_q8_0_matches_llamacpp(arch):
    reader, tokens, ref = tiny(arch, "q8_0")
    logits = R.forward64(reader, tokens)
    assert mean_kl(ref, logits) <= 0.02                # measured 4e-5 .. 1.7e-4
    assert np.abs(logits - ref).max() < 0.3            # measured 0.05 .. 0.13


# -- the real Gemma 3 270M (Q4_K_M) against llama.cpp on an F32 copy of its dequantized weights -----

@pytest.mark.slow
@pytest.mark.parametrize("gelu", ["ggml", "tanh"])
def test_gemma3_270m_matches_llamacpp_f32_dequantized(gelu, gemma3_270m):
    z = np.load(DATA / "gemma3-270m-q4_k_m.npz")
    logits = R.forward64(gemma3_270m, z["tokens"], gelu=gelu)
    assert logits.shape == (64, 262144)
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    ids = z["f32deq_topk_ids"]
    ours = np.take_along_axis(logits, ids, axis=1) - lse[:, None]
    theirs = z["f32deq_topk_logits"].astype(np.float64) - z["f32deq_logsumexp"].astype(np.float64)[:, None]
    assert np.mean(logits.argmax(axis=1) == z["f32deq_top1"]) >= 63 / 64      # measured 64/64
    assert np.abs(ours - theirs).max() < 0.02          # measured 0.0051 (ggml) / 0.0071 (tanh)
