"""Forward pass of the llama graph with LoRA, layer by layer, keeping what backward needs.

Shapes: B sequences of T tokens, N = B·T rows; C = n_embd, F = n_ff, Hq/Hkv query/KV heads of
size D, V = n_vocab.  Activations are [N, C] row-major; attention runs head-major [B, H, T, D].
Every matmul is BLAS through numpy on contiguous arrays; everything else is a numba kernel.
Base weights W are never modified and never merged with the adapter: y = x·Wᵀ + s·(x·a)·bᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..lora import LoraParams
from ..model import HParams, LayerWeights
from . import kernels as K

# -- linear with LoRA ------------------------------------------------------------------------

def linear_forward(x: np.ndarray, W: np.ndarray, lora):
    """x [N, n_in] · W [n_out, n_in]ᵀ (+ s·(x·a)·bᵀ) -> (y [N, n_out], u [N, r] or None)."""
    y = x @ W.T  # [N, n_out]
    if lora is None:
        return y, None
    a, b, s = lora
    u = K.lora_forward(x, a, b, s, y)  # u = x·a [N, r]; y += s·u·bᵀ
    return y, u


def norm_weight(g: np.ndarray, lora) -> np.ndarray:
    """Effective norm weight g + s·a·b[0]  ([C])."""
    if lora is None:
        return g
    a, b, s = lora
    return g + s * (a @ b[0])


# -- one transformer block ---------------------------------------------------------------------

@dataclass
class LayerCache:
    """Everything a block's backward needs from its forward."""

    x: np.ndarray  # [N, C] block input
    g_att: np.ndarray  # [C] effective attention norm weight
    h1: np.ndarray  # [N, C] normed input
    rstd1: np.ndarray  # [N]
    u_q: np.ndarray | None  # [N, r] LoRA intermediates x·a
    u_k: np.ndarray | None
    u_v: np.ndarray | None
    qh: np.ndarray  # [B, Hq, T, D] after RoPE
    kh: np.ndarray  # [B, Hkv, T, D] after RoPE
    vh: np.ndarray  # [B, Hkv, T, D]
    att: np.ndarray  # [B, Hq, T, D] attention output
    att_cache: np.ndarray  # probs [B, Hq, T, T] or logsumexp [B, Hq, T] (flash)
    a: np.ndarray  # [N, C] attention output, token-major
    u_o: np.ndarray | None
    x2: np.ndarray  # [N, C] residual after attention
    g_ffn: np.ndarray  # [C]
    h2: np.ndarray  # [N, C]
    rstd2: np.ndarray  # [N]
    g: np.ndarray  # [N, F] gate pre-activation
    u: np.ndarray  # [N, F] up projection
    u_g: np.ndarray | None
    u_u: np.ndarray | None
    hf: np.ndarray  # [N, F] swiglu output
    u_d: np.ndarray | None


@dataclass(frozen=True)
class Rope:
    """cos/sin tables for positions 0..T-1 ([T, n_rot/2])."""

    cos: np.ndarray
    sin: np.ndarray
    n_rot: int

    @classmethod
    def make(cls, hp: HParams, T: int, dtype) -> "Rope":
        cos, sin = K.rope_cache(np.arange(T, dtype=np.int64), hp.n_rot, hp.rope_freq_base, hp.rope_freq_scale, dtype)
        return cls(cos, sin, hp.n_rot)


def _lora(lora: LoraParams | None, name: str):
    return None if lora is None else lora.get(name)


def layer_forward(x: np.ndarray, lw: LayerWeights, il: int, hp: HParams, B: int, T: int, rope: Rope,
                  lora: LoraParams | None, flash: bool, keep_cache: bool, need_out: bool = True):
    """One block: x [N, C] -> (out [N, C], LayerCache or None).

    ``need_out=False`` (recomputing a block for its backward under checkpointing, with keep_cache):
    out is None and the down projection is skipped — its backward needs only its input and the
    adapter's x·a, which are in the cache."""
    Hq, Hkv, D, eps = hp.n_head, hp.n_head_kv, hp.head_dim, hp.rms_eps
    p = f"blk.{il}."
    g_att = norm_weight(lw.attn_norm, _lora(lora, p + "attn_norm.weight"))
    h1, rstd1 = K.rmsnorm_forward(x, g_att, eps)  # [N, C], [N]
    q, u_q = linear_forward(h1, lw.attn_q, _lora(lora, p + "attn_q.weight"))  # [N, Hq*D]
    k, u_k = linear_forward(h1, lw.attn_k, _lora(lora, p + "attn_k.weight"))  # [N, Hkv*D]
    v, u_v = linear_forward(h1, lw.attn_v, _lora(lora, p + "attn_v.weight"))  # [N, Hkv*D]
    qh = K.rope_forward(q.reshape(B, T, Hq, D), rope.cos, rope.sin, rope.n_rot)  # [B, Hq, T, D]
    kh = K.rope_forward(k.reshape(B, T, Hkv, D), rope.cos, rope.sin, rope.n_rot)  # [B, Hkv, T, D]
    vh = K.to_heads(v.reshape(B, T, Hkv, D))  # [B, Hkv, T, D]
    scale = 1.0 / np.sqrt(D)
    if flash:
        att, att_cache = K.flash_attention_forward(qh, kh, vh, scale)  # [B, Hq, T, D], [B, Hq, T]
    else:
        att, att_cache = K.attention_forward(qh, kh, vh, scale)  # [B, Hq, T, D], [B, Hq, T, T]
    a = K.from_heads(att).reshape(B * T, Hq * D)  # [N, C]
    o, u_o = linear_forward(a, lw.attn_output, _lora(lora, p + "attn_output.weight"))  # [N, C]
    x2 = x + o  # [N, C]
    g_ffn = norm_weight(lw.ffn_norm, _lora(lora, p + "ffn_norm.weight"))
    h2, rstd2 = K.rmsnorm_forward(x2, g_ffn, eps)  # [N, C]
    g, u_g = linear_forward(h2, lw.ffn_gate, _lora(lora, p + "ffn_gate.weight"))  # [N, F]
    u, u_u = linear_forward(h2, lw.ffn_up, _lora(lora, p + "ffn_up.weight"))  # [N, F]
    hf = K.swiglu_forward(g, u)  # [N, F]
    l_d = _lora(lora, p + "ffn_down.weight")
    if keep_cache and not need_out:
        out = None
        u_d = None if l_d is None else K.lora_u(hf, l_d[0])  # [N, r], as linear_forward computes it
    else:
        d, u_d = linear_forward(hf, lw.ffn_down, l_d)  # [N, C]
        out = x2 + d  # [N, C]
    if not keep_cache:
        return out, None
    return out, LayerCache(x, g_att, h1, rstd1, u_q, u_k, u_v, qh, kh, vh, att, att_cache, a, u_o,
                           x2, g_ffn, h2, rstd2, g, u, u_g, u_u, hf, u_d)


# -- embeddings and head ---------------------------------------------------------------------

def embed_forward(weights, tokens: np.ndarray, lora: LoraParams | None) -> np.ndarray:
    """tokens [B, T] -> x [N, C] (+ s·b[tok]·aᵀ when token_embd is adapted)."""
    ids = tokens.reshape(-1)
    x = np.ascontiguousarray(weights.embed(ids))  # [N, C]
    la = _lora(lora, "token_embd.weight")
    if la is not None:
        a, b, s = la
        K.lora_add(x, b[ids] * s, a)  # x += s·b[tok]·aᵀ  ([N, r]·[r, C])
    return x


def head_rows(weights, n_rows: int, itemsize: int) -> int:
    """Rows per chunk so that one chunk of logits [rows, V] stays under the weights' limit
    (64 MB: 256 rows of a 49152-token vocabulary in one chunk, so each head chunk is dequantized
    once for the forward and once for the backward; 8 MB when streaming weights in low-memory mode)."""
    max_bytes = (64 << 20) if weights.cache_layers else (8 << 20)
    return max(1, min(n_rows, max_bytes // max(1, weights.hp.n_vocab * itemsize)))


def head_logits(weights, hn: np.ndarray, lora: LoraParams | None) -> tuple[np.ndarray, np.ndarray | None]:
    """hn [n, C] (already normed) -> (logits [n, V], u = hn·a_out or None)."""
    V = weights.hp.n_vocab
    la = _lora(lora, "output.weight")
    logits = np.empty((hn.shape[0], V), dtype=hn.dtype)  # [n, V]
    u = us = None
    if la is not None:
        a, b, s = la
        u = hn @ a  # [n, r]
        us = u * s
    for r0, r1, Wc in weights.head_chunks():
        out = logits[:, r0:r1]  # [n, rows of this chunk]
        np.matmul(hn, Wc.T, out=out)
        if us is not None:
            K.lora_add(out, us, b[r0:r1])  # LoRA per chunk, in place
    return logits, u


def forward_hidden(weights, hp: HParams, tokens: np.ndarray, lora: LoraParams | None = None,
                   flash: bool = True) -> np.ndarray:
    """tokens [B, T] -> the normed final hidden states [B·T, C] that the head multiplies."""
    B, T = tokens.shape
    rope = Rope.make(hp, T, weights.dtype)
    x = embed_forward(weights, tokens, lora)
    for il in range(hp.n_layer):
        x, _ = layer_forward(x, weights.layer(il), il, hp, B, T, rope, lora, flash, keep_cache=False)
    g_out = norm_weight(weights.output_norm, _lora(lora, "output_norm.weight"))
    hn, _ = K.rmsnorm_forward(x, g_out, hp.rms_eps)
    return hn


def forward_logits(weights, hp: HParams, tokens: np.ndarray, lora: LoraParams | None = None,
                   flash: bool = True) -> np.ndarray:
    """Inference: tokens [B, T] -> logits [B, T, V] (float32 unless weights are float64)."""
    B, T = tokens.shape
    logits, _ = head_logits(weights, forward_hidden(weights, hp, tokens, lora, flash), lora)
    return logits.reshape(B, T, hp.n_vocab)
