"""A slow, float64, plain-numpy forward pass for the GGUF families we support, as llama.cpp computes them.

This is the specification the engine is tested against, not an implementation to make fast: every
op is written out the way llama.cpp's graph builds it (src/models/<arch>.cpp), driven only by the
GGUF's metadata and tensors, with every weight dequantized by gguf-py (``gguf.quants``).

    logits = forward64("model.gguf", tokens)          # [T, n_vocab] float64

Families (``general.architecture``): ``llama``, ``qwen2``, ``qwen3``, ``gemma3``, ``phi3``.
One function per layer type (:func:`layer_llama`, :func:`layer_qwen2`, :func:`layer_qwen3`,
:func:`layer_gemma3`, :func:`layer_phi3`) built from the shared ops above them; :func:`read_hparams`
is where every metadata key is read and every llama.cpp default is applied.

Conventions: activations are [T, n] row vectors; a GGUF matrix of ggml shape [n_in, n_out] is held
as numpy [n_out, n_in] and applied as ``x @ W.T``; positions are 0..T-1 (one sequence, one batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")

# RoPE flavour per architecture (llama.cpp's llama_model_rope_type): NORM rotates the pairs
# (2i, 2i+1), NEOX rotates the pairs (i, i + n_rot/2).
ROPE_TYPE = {"llama": "normal", "qwen2": "neox", "qwen3": "neox", "gemma3": "neox", "phi3": "neox"}


# ----------------------------------------------------------------------------------------------
# Reading the GGUF
# ----------------------------------------------------------------------------------------------

def _meta(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


@dataclass
class HParams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int          # n_embd_head_k: <arch>.attention.key_length, default n_embd / n_head
    head_dim_v: int        # n_embd_head_v: <arch>.attention.value_length, default n_embd / n_head
    n_rot: int             # <arch>.rope.dimension_count, default head_dim
    n_ff: int
    rms_eps: float
    rope_type: str         # "normal" | "neox"
    rope_base: float       # <arch>.rope.freq_base, default 10000
    rope_freq_scale: float  # 1 / <arch>.rope.scaling.factor (linear scaling), default 1
    rope_attn_factor: float  # <arch>.rope.scaling.attn_factor: multiplies cos and sin, default 1
    n_ctx_orig: int        # <arch>.rope.scaling.original_context_length, default context_length
    attn_scale: float      # the softmax scale applied to q·k
    # sliding-window attention (gemma3 only; phi3 writes the key but llama.cpp disables it)
    n_swa: int = 0
    swa_layers: list = field(default_factory=list)  # per layer: True = sliding-window layer
    rope_base_swa: float = 10000.0
    rope_freq_scale_swa: float = 1.0
    # gemma3
    embd_scale: float = 1.0             # x = token_embd[tok] * embd_scale
    final_logit_softcap: float = 0.0    # 0 = none; else logits = c * tanh(logits / c)

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and bool(self.swa_layers[il])


def read_hparams(reader: GGUFReader) -> HParams:
    """Every metadata key the forward pass uses, with llama.cpp's defaults (llama_model::load_hparams)."""
    arch = _meta(reader, "general.architecture")
    if arch not in ARCHS:
        raise NotImplementedError(f"architecture {arch!r} (supported: {', '.join(ARCHS)})")

    def key(name, default=None):
        return _meta(reader, f"{arch}.{name}", default)

    n_embd = int(key("embedding_length"))
    n_layer = int(key("block_count"))
    n_head = key("attention.head_count")
    n_head_kv = key("attention.head_count_kv", n_head)
    n_ff = key("feed_forward_length")
    for name, v in (("head_count", n_head), ("head_count_kv", n_head_kv), ("feed_forward_length", n_ff)):
        if isinstance(v, list) and len(set(v)) != 1:
            raise NotImplementedError(f"per-layer {name} {v}")
    n_head = int(n_head[0] if isinstance(n_head, list) else n_head)
    n_head_kv = int(n_head_kv[0] if isinstance(n_head_kv, list) else n_head_kv)
    n_ff = int(n_ff[0] if isinstance(n_ff, list) else n_ff)
    head_dim = int(key("attention.key_length", n_embd // n_head))
    head_dim_v = int(key("attention.value_length", n_embd // n_head))
    n_rot = int(key("rope.dimension_count", head_dim))
    n_vocab = int(_tensor(reader, "token_embd.weight").data.shape[0])

    # RoPE scaling: llama.cpp's default type is "linear"; freq_scale = 1/factor; "none" forces 1.
    scaling_type = key("rope.scaling.type", "linear")
    factor = key("rope.scaling.factor", None)
    if factor is None:
        factor = key("rope.scale_linear", 0.0)
    freq_scale = 1.0 / float(factor) if factor else 1.0
    if scaling_type == "none":
        freq_scale = 1.0
    elif scaling_type == "yarn":
        raise NotImplementedError("YaRN rope scaling (ext_factor != 0) is not in the reference")
    n_ctx_train = int(key("context_length", 0))

    hp = HParams(
        arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, head_dim_v=head_dim_v, n_rot=n_rot, n_ff=n_ff,
        rms_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_type=ROPE_TYPE[arch],
        rope_base=float(key("rope.freq_base", 10000.0)),
        rope_freq_scale=freq_scale,
        rope_attn_factor=float(key("rope.scaling.attn_factor", 1.0)),
        n_ctx_orig=int(key("rope.scaling.original_context_length", n_ctx_train)),
        attn_scale=1.0 / math.sqrt(head_dim),
    )

    if arch == "gemma3":
        hp.embd_scale = math.sqrt(n_embd)
        # llama.cpp: f_attention_scale = 1/sqrt(n_embd/n_head) for the 27B (n_layer == 62, HF's
        # query_pre_attn_scalar = 168), 1/sqrt(head_dim) for every other size.
        if n_layer == 62:
            hp.attn_scale = 1.0 / math.sqrt(n_embd // n_head)
        n_swa = int(key("attention.sliding_window", 0))
        if n_swa > 0:
            hp.n_swa = n_swa
            # swa_period defaults to 6 (5 local : 1 global); newer llama.cpp lets
            # <arch>.attention.sliding_window_pattern override it (older builds hard-code 6).
            pattern = key("attention.sliding_window_pattern", 6)
            if isinstance(pattern, list):
                hp.swa_layers = [bool(v) for v in pattern]
            else:
                p = int(pattern)  # llama_hparams::set_swa_pattern(p, dense_first=false)
                hp.swa_layers = [p == 0 or il % p < p - 1 for il in range(n_layer)]
            # Local layers: rope base rope_freq_base_train_swa (10000 unless <arch>.rope.freq_base_swa)
            # and no rope scaling; global layers: rope.freq_base and the file's rope scaling.
            hp.rope_base_swa = float(key("rope.freq_base_swa", 10000.0))
            hp.rope_freq_scale_swa = 1.0
        hp.final_logit_softcap = float(key("final_logit_softcapping", 0.0) or 0.0)
    if arch == "phi3" and head_dim * n_head != n_embd:
        raise NotImplementedError("phi3 with n_head * head_dim != n_embd")
    return hp


def _tensor(reader: GGUFReader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    return None


class Weights:
    """Dequantized float64 tensors by GGUF name, [n_out, n_in] for matrices (read on first use)."""

    def __init__(self, reader: GGUFReader):
        self.reader = reader
        self.by_name = {t.name: t for t in reader.tensors}
        self.cache: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return name in self.by_name

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = self.rows(name, slice(None))
        return self.cache[name]

    def opt(self, name: str):
        return self(name) if self.has(name) else None

    def rows(self, name: str, index) -> np.ndarray:
        """Rows ``index`` (a slice or an index array) of a matrix, dequantized to float64."""
        t = self.by_name[name]
        raw = np.asarray(t.data)        # F32/F16: [n_out, n_in] floats; others: [n_out, bytes] uint8
        part = raw[index] if raw.ndim > 1 else raw
        if raw.dtype == np.uint8:
            part = dequantize(part, t.tensor_type)
        return np.array(part, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Ops (each the float64 version of one ggml op or llama.cpp graph helper)
# ----------------------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, b: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp build_norm(LLM_NORM_RMS): x / sqrt(mean(x²) + eps) · w (+ b), over the last axis.

    Gemma's GGUF norm weights already hold HF's (1 + weight): the converter adds the 1."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w
    return y if b is None else y + b


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T
    return y if b is None else y + b


def rope(x: np.ndarray, pos: np.ndarray, n_rot: int, base: float, kind: str, *, freq_scale: float = 1.0,
         freq_factors: np.ndarray | None = None, attn_factor: float = 1.0) -> np.ndarray:
    """ggml_rope_ext on x [T, H, D] (ext_factor 0, i.e. no YaRN).

    Pair i (0 <= i < n_rot/2) is rotated by θ = freq_scale · pos · base^(-2i/n_rot) / freq_factors[i];
    cos and sin are multiplied by attn_factor. kind "normal": the pair is (2i, 2i+1); kind "neox": the
    pair is (i, i + n_rot/2). Dims n_rot..D-1 pass through unchanged (partial rotary)."""
    half = n_rot // 2
    inv = base ** (-2.0 * np.arange(half) / n_rot)
    if freq_factors is not None:
        inv = inv / freq_factors[:half]
    theta = freq_scale * pos[:, None].astype(np.float64) * inv[None, :]        # [T, half]
    cos = (np.cos(theta) * attn_factor)[:, None, :]
    sin = (np.sin(theta) * attn_factor)[:, None, :]
    out = x.copy()
    if kind == "normal":
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    elif kind == "neox":
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half:n_rot] = a * sin + b * cos
    else:
        raise ValueError(kind)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, n_swa: int = 0) -> np.ndarray:
    """Causal softmax attention with GQA: q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv] -> [T, H·Dv].

    Query head h reads kv head h // (H / Hkv) (ggml's broadcast). Key j is visible to query i iff
    j <= i, and, when n_swa > 0 (a sliding-window layer, LLAMA_SWA_TYPE_STANDARD), also i - j < n_swa
    (llama_hparams::is_masked_swa masks p1 - p0 >= n_swa)."""
    T, H, _ = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    visible = j <= i
    if n_swa > 0:
        visible &= (i - j) < n_swa
    out = np.empty((T, H, v.shape[2]))
    for h in range(H):
        g = h // group
        s = (q[:, h, :] @ k[:, g, :].T) * scale
        s = np.where(visible, s, -np.inf)
        s = s - s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        out[:, h, :] = p @ v[:, g, :]
    return out.reshape(T, H * v.shape[2])


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


_GELU_C = math.sqrt(2.0 / math.pi)  # SQRT_2_OVER_PI
_GELU_A = 0.044715                  # GELU_COEF_A


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU (HF's gelu_pytorch_tanh, ggml_gelu_f32), exact in float64."""
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * x * (1.0 + _GELU_A * x * x)))


@lru_cache(maxsize=1)
def _ggml_gelu_table() -> np.ndarray:
    """ggml_table_gelu_f16: for every f16 bit pattern, f16(gelu computed in f32 at that f16 value)."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        c, a, half, one = np.float32(_GELU_C), np.float32(_GELU_A), np.float32(0.5), np.float32(1.0)
        y = half * x * (one + np.tanh(c * x * (one + a * x * x)))
    return y.astype(np.float16).astype(np.float64)


def gelu_ggml_f16(x: np.ndarray) -> np.ndarray:
    """GELU as ggml's CPU backend computes it (GGML_GELU_FP16, ggml_vec_gelu_f32 / ggml_vec_geglu_f32).

    x <= -10 -> 0; x >= 10 -> x; otherwise x is rounded to f16 and looked up in a 65536-entry f16
    table. The input is first rounded to f32, the type ggml holds it in."""
    x32 = np.asarray(x, dtype=np.float32)
    idx = x32.astype(np.float16).view(np.uint16)
    y = _ggml_gelu_table()[idx]
    return np.where(x32 <= -10.0, 0.0, np.where(x32 >= 10.0, x, y))


GELU = {"tanh": gelu_tanh, "ggml": gelu_ggml_f16}


# ----------------------------------------------------------------------------------------------
# Layers, one per family
# ----------------------------------------------------------------------------------------------

def _qkv(W: Weights, il: int, x: np.ndarray, hp: HParams):
    """q, k, v as [T, heads, dim] from attn_q/attn_k/attn_v (+ optional .bias), or from a fused
    attn_qkv whose rows are [q (H·D) | k (Hkv·D) | v (Hkv·Dv)] (llama.cpp build_qkv)."""
    T = x.shape[0]
    p = f"blk.{il}."
    nq, nk = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    if W.has(p + "attn_qkv.weight"):
        qkv = linear(x, W(p + "attn_qkv.weight"), W.opt(p + "attn_qkv.bias"))
        q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
    else:
        q = linear(x, W(p + "attn_q.weight"), W.opt(p + "attn_q.bias"))
        k = linear(x, W(p + "attn_k.weight"), W.opt(p + "attn_k.bias"))
        v = linear(x, W(p + "attn_v.weight"), W.opt(p + "attn_v.bias"))
    return (q.reshape(T, hp.n_head, hp.head_dim), k.reshape(T, hp.n_head_kv, hp.head_dim),
            v.reshape(T, hp.n_head_kv, hp.head_dim_v))


def _rope_factors(W: Weights, hp: HParams, n_ctx: int | None):
    """llama_model::get_rope_factors: rope_freqs.weight if present (Llama 3.1+), else Phi-3's
    rope_factors_long.weight when the context n_ctx > original_context_length, else
    rope_factors_short.weight, else none."""
    if W.has("rope_freqs.weight"):
        return W("rope_freqs.weight")
    if W.has("rope_factors_long.weight") and n_ctx is not None and n_ctx > hp.n_ctx_orig:
        return W("rope_factors_long.weight")
    if W.has("rope_factors_short.weight"):
        return W("rope_factors_short.weight")
    return None


def swiglu_ffn(W: Weights, il: int, x: np.ndarray) -> np.ndarray:
    """down(silu(gate(x)) · up(x)) (LLM_FFN_SILU, LLM_FFN_PAR)."""
    p = f"blk.{il}."
    return linear(silu(linear(x, W(p + "ffn_gate.weight"))) * linear(x, W(p + "ffn_up.weight")),
                  W(p + "ffn_down.weight"))


def layer_llama(W: Weights, il: int, x: np.ndarray, pos: np.ndarray, hp: HParams, ctx: dict) -> np.ndarray:
    """llama: pre-norm, q/k/v (optional biases), RoPE normal (rope_freqs if present), attention,
    attn_output, residual; ffn_norm, SwiGLU, residual."""
    p = f"blk.{il}."
    h = rms_norm(x, W(p + "attn_norm.weight"), hp.rms_eps)
    q, k, v = _qkv(W, il, h, hp)
    ff = ctx["rope_factors"]
    q = rope(q, pos, hp.n_rot, hp.rope_base, "normal", freq_scale=hp.rope_freq_scale, freq_factors=ff,
             attn_factor=hp.rope_attn_factor)
    k = rope(k, pos, hp.n_rot, hp.rope_base, "normal", freq_scale=hp.rope_freq_scale, freq_factors=ff,
             attn_factor=hp.rope_attn_factor)
    a = attention(q, k, v, hp.attn_scale)
    x = x + linear(a, W(p + "attn_output.weight"), W.opt(p + "attn_output.bias"))
    return x + swiglu_ffn(W, il, rms_norm(x, W(p + "ffn_norm.weight"), hp.rms_eps))


def layer_qwen2(W: Weights, il: int, x: np.ndarray, pos: np.ndarray, hp: HParams, ctx: dict) -> np.ndarray:
    """qwen2: as llama, with q/k/v biases added right after the projections and RoPE NeoX."""
    p = f"blk.{il}."
    h = rms_norm(x, W(p + "attn_norm.weight"), hp.rms_eps)
    q, k, v = _qkv(W, il, h, hp)                                  # biases: attn_{q,k,v}.bias
    q = rope(q, pos, hp.n_rot, hp.rope_base, "neox", freq_scale=hp.rope_freq_scale,
             attn_factor=hp.rope_attn_factor)
    k = rope(k, pos, hp.n_rot, hp.rope_base, "neox", freq_scale=hp.rope_freq_scale,
             attn_factor=hp.rope_attn_factor)
    a = attention(q, k, v, hp.attn_scale)
    x = x + linear(a, W(p + "attn_output.weight"), W.opt(p + "attn_output.bias"))
    return x + swiglu_ffn(W, il, rms_norm(x, W(p + "ffn_norm.weight"), hp.rms_eps))


def layer_qwen3(W: Weights, il: int, x: np.ndarray, pos: np.ndarray, hp: HParams, ctx: dict) -> np.ndarray:
    """qwen3: as qwen2 without biases, plus a per-head RMSNorm of q and of k (attn_q_norm /
    attn_k_norm, [head_dim]) before RoPE; q_dim = n_head·head_dim may differ from n_embd."""
    p = f"blk.{il}."
    h = rms_norm(x, W(p + "attn_norm.weight"), hp.rms_eps)
    q, k, v = _qkv(W, il, h, hp)
    q = rms_norm(q, W(p + "attn_q_norm.weight"), hp.rms_eps)
    k = rms_norm(k, W(p + "attn_k_norm.weight"), hp.rms_eps)
    q = rope(q, pos, hp.n_rot, hp.rope_base, "neox", freq_scale=hp.rope_freq_scale,
             attn_factor=hp.rope_attn_factor)
    k = rope(k, pos, hp.n_rot, hp.rope_base, "neox", freq_scale=hp.rope_freq_scale,
             attn_factor=hp.rope_attn_factor)
    a = attention(q, k, v, hp.attn_scale)
    x = x + linear(a, W(p + "attn_output.weight"), W.opt(p + "attn_output.bias"))
    return x + swiglu_ffn(W, il, rms_norm(x, W(p + "ffn_norm.weight"), hp.rms_eps))


def layer_gemma3(W: Weights, il: int, x: np.ndarray, pos: np.ndarray, hp: HParams, ctx: dict) -> np.ndarray:
    """gemma3: pre-norm; q/k/v (no biases); per-head q/k RMSNorm; RoPE NeoX with the local base (10000,
    no scaling) on sliding-window layers and rope.freq_base (+ the file's linear scaling) on global
    layers; q scaled by attn_scale; attention (window on sliding layers); attn_output;
    post_attention_norm; residual. ffn_norm; down(gelu_tanh(gate) · up); post_ffw_norm; residual."""
    p = f"blk.{il}."
    swa = hp.is_swa(il)
    base = hp.rope_base_swa if swa else hp.rope_base
    fscale = hp.rope_freq_scale_swa if swa else hp.rope_freq_scale
    h = rms_norm(x, W(p + "attn_norm.weight"), hp.rms_eps)
    T = x.shape[0]
    q = linear(h, W(p + "attn_q.weight")).reshape(T, hp.n_head, hp.head_dim)
    k = linear(h, W(p + "attn_k.weight")).reshape(T, hp.n_head_kv, hp.head_dim)
    v = linear(h, W(p + "attn_v.weight")).reshape(T, hp.n_head_kv, hp.head_dim_v)
    q = rms_norm(q, W(p + "attn_q_norm.weight"), hp.rms_eps)
    k = rms_norm(k, W(p + "attn_k_norm.weight"), hp.rms_eps)
    q = rope(q, pos, hp.n_rot, base, "neox", freq_scale=fscale, attn_factor=hp.rope_attn_factor)
    k = rope(k, pos, hp.n_rot, base, "neox", freq_scale=fscale, attn_factor=hp.rope_attn_factor)
    q = q * hp.attn_scale                                         # then build_attn with kq_scale 1
    a = attention(q, k, v, 1.0, n_swa=hp.n_swa if swa else 0)
    a = linear(a, W(p + "attn_output.weight"))
    x = x + rms_norm(a, W(p + "post_attention_norm.weight"), hp.rms_eps)
    h = rms_norm(x, W(p + "ffn_norm.weight"), hp.rms_eps)
    f = ctx["gelu"](linear(h, W(p + "ffn_gate.weight"))) * linear(h, W(p + "ffn_up.weight"))
    f = linear(f, W(p + "ffn_down.weight"))
    return x + rms_norm(f, W(p + "post_ffw_norm.weight"), hp.rms_eps)


def layer_phi3(W: Weights, il: int, x: np.ndarray, pos: np.ndarray, hp: HParams, ctx: dict) -> np.ndarray:
    """phi3: pre-norm (optional norm bias); fused attn_qkv [q|k|v] (or separate q/k/v); RoPE NeoX over
    the first n_rot dims only (partial rotary), with rope_factors_short/long and rope.scaling.attn_factor
    when present; q scaled by 1/sqrt(head_dim); full causal attention (llama.cpp disables Phi's SWA);
    attn_output; residual. ffn_norm; fused ffn_up [gate rows (n_ff) | up rows (n_ff)]:
    down(silu(gate) · up); residual."""
    p = f"blk.{il}."
    h = rms_norm(x, W(p + "attn_norm.weight"), hp.rms_eps, W.opt(p + "attn_norm.bias"))
    q, k, v = _qkv(W, il, h, hp)
    ff = ctx["rope_factors"]
    q = rope(q, pos, hp.n_rot, hp.rope_base, "neox", freq_scale=hp.rope_freq_scale, freq_factors=ff,
             attn_factor=hp.rope_attn_factor)
    k = rope(k, pos, hp.n_rot, hp.rope_base, "neox", freq_scale=hp.rope_freq_scale, freq_factors=ff,
             attn_factor=hp.rope_attn_factor)
    q = q * (1.0 / math.sqrt(hp.head_dim))                        # then build_attn with kq_scale 1
    a = attention(q, k, v, 1.0)
    x = x + linear(a, W(p + "attn_output.weight"), W.opt(p + "attn_output.bias"))
    h = rms_norm(x, W(p + "ffn_norm.weight"), hp.rms_eps, W.opt(p + "ffn_norm.bias"))
    up = linear(h, W(p + "ffn_up.weight"))                       # [T, 2·n_ff]
    return x + linear(silu(up[:, :hp.n_ff]) * up[:, hp.n_ff:], W(p + "ffn_down.weight"))


LAYER = {"llama": layer_llama, "qwen2": layer_qwen2, "qwen3": layer_qwen3, "gemma3": layer_gemma3,
         "phi3": layer_phi3}


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

def forward64(path_or_reader, tokens, *, gelu: str = "tanh", n_ctx: int | None = None,
              vocab_chunk: int = 16384) -> np.ndarray:
    """Logits [T, n_vocab] float64 for ``tokens`` at positions 0..T-1.

    gelu: "tanh" (exact tanh-GELU), "ggml" (ggml CPU's f16 lookup table) or a function; only gemma3
    uses GELU.
    n_ctx: the context size llama.cpp would run with; only picks Phi-3's long vs short rope factors
    (long iff n_ctx > rope.scaling.original_context_length); None = short.
    The output matrix (output.weight, or token_embd.weight when tied) is dequantized in chunks of
    ``vocab_chunk`` rows so a 262k-vocabulary model stays within memory."""
    reader = path_or_reader if isinstance(path_or_reader, GGUFReader) else GGUFReader(Path(path_or_reader))
    hp = read_hparams(reader)
    W = Weights(reader)
    tokens = np.asarray(tokens, dtype=np.int64)
    pos = np.arange(len(tokens))
    ctx = {"gelu": gelu if callable(gelu) else GELU[gelu], "rope_factors": _rope_factors(W, hp, n_ctx)}

    x = W.rows("token_embd.weight", tokens) * hp.embd_scale
    for il in range(hp.n_layer):
        x = LAYER[hp.arch](W, il, x, pos, hp, ctx)
        W.cache.clear()                              # one layer's float64 weights at a time
    x = rms_norm(x, W("output_norm.weight"), hp.rms_eps, W.opt("output_norm.bias"))

    out_name = "output.weight" if W.has("output.weight") else "token_embd.weight"   # tied if absent
    logits = np.empty((len(tokens), hp.n_vocab))
    for r0 in range(0, hp.n_vocab, vocab_chunk):
        r1 = min(r0 + vocab_chunk, hp.n_vocab)
        logits[:, r0:r1] = x @ W.rows(out_name, slice(r0, r1)).T
    if W.has("output.bias"):
        logits += W("output.bias")
    if hp.final_logit_softcap:
        c = hp.final_logit_softcap
        logits = c * np.tanh(logits / c)
    return logits
