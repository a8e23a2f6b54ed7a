"""Forward pass of every family's graph with LoRA, layer by layer, keeping what backward needs.

Shapes: B sequences of T tokens, N = B·T rows; C = n_embd, F = n_ff, Hq/Hkv query/KV heads of
size D (Cq = Hq·D, Ckv = Hkv·D), V = n_vocab.  Activations are [N, C] row-major; attention runs
head-major [B, H, T, D].  Every matmul is BLAS through numpy on contiguous arrays; everything else
is a numba kernel.  Base weights W are never modified and never merged with the adapter:
y = x·Wᵀ (+ bias) + s·(x·a)·bᵀ.

One block, with the family's options (arch.Arch) in brackets:

    h1 = rmsnorm(x, attn_norm)
    q, k, v = h1·Wq, h1·Wk, h1·Wv  [+ biases]  | [fused: h1·Wqkv split]
    q, k = rmsnorm per head (q_norm, k_norm)   [qk_norm]
    q, k = rope(q), rope(k)                    (normal or NeoX pairs, partial rotary, base per layer)
    a = attention(q, k, v)                     (causal; [sliding window on local layers]; packed rows)
    o = a·Wo  [-> rmsnorm(o, post_attention_norm)]
    x2 = x + o
    h2 = rmsnorm(x2, ffn_norm)
    hf = act(h2·Wgate) ⊙ (h2·Wup)              (act silu or gelu_tanh; [fused: h2·Wup split gate|up])
    d = hf·Wdown  [-> rmsnorm(d, post_ffw_norm)]
    out = x2 + d
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..arch import (
    ATTN_K,
    ATTN_K_NORM,
    ATTN_NORM,
    ATTN_OUT,
    ATTN_POST_NORM,
    ATTN_Q,
    ATTN_Q_NORM,
    ATTN_QKV,
    ATTN_V,
    FFN_DOWN,
    FFN_GATE,
    FFN_NORM,
    FFN_POST_NORM,
    FFN_UP,
    OUTPUT,
    OUTPUT_NORM,
    ROPE_NEOX,
    TOKEN_EMBD,
    weight,
)
from ..lora import LoraParams
from ..model import HParams, LayerWeights
from . import kernels as K

# -- linear with LoRA ------------------------------------------------------------------------


def linear_forward(x: np.ndarray, W, lora, bias: np.ndarray | None = None):
    """x [N, n_in] · W [n_out, n_in]ᵀ (+ bias) (+ s·(x·a)·bᵀ) -> (y [N, n_out], u [N, r] or None).

    W is a float array, or anything with ``matmul(x)`` giving x·Wᵀ (the decoder's quantized blocks)."""
    y = x @ W.T if isinstance(W, np.ndarray) else W.matmul(x)  # [N, n_out]
    if bias is not None:
        y += bias
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


def _lora(lora: LoraParams | None, name: str):
    return None if lora is None else lora.get(name)


# -- positions: RoPE tables and which keys each query sees --------------------------------------

@dataclass(frozen=True)
class Rope:
    """cos/sin tables [Bc, T, n_rot/2] (Bc = 1: every row at positions 0..T-1, else a table per row)."""

    cos: np.ndarray
    sin: np.ndarray
    n_rot: int
    neox: bool

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x [B, T, H, D] -> rotated, head-major [B, H, T, D]."""
        return K.rope_forward(x, self.cos, self.sin, self.n_rot, neox=self.neox)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dout [B, H, T, D] -> dx [B, T, H, D]."""
        return K.rope_backward(dout, self.cos, self.sin, self.n_rot, neox=self.neox)


@dataclass(frozen=True)
class Positions:
    """Everything a batch's layers need about positions: a RoPE table per (base, scale) the layers
    use, and the first key each query sees — on global and on sliding-window layers.

    ``pos`` [B, T] (None: 0..T-1 in every row) and ``seg_start`` [B, T] (None: one sequence per row)
    describe packed rows: each record's positions restart at 0 and its queries see only its keys.
    """

    B: int
    T: int
    ropes: dict
    lo_global: np.ndarray | None
    lo_local: np.ndarray | None

    @classmethod
    def make(cls, hp: HParams, weights, B: int, T: int, pos: np.ndarray | None = None,
             seg_start: np.ndarray | None = None) -> "Positions":
        p = np.arange(T, dtype=np.int64) if pos is None else np.ascontiguousarray(pos, dtype=np.int64)
        ropes = {}
        for il in range(hp.n_layer):
            key = hp.rope_of(il)
            if key not in ropes:
                cos, sin = K.rope_cache(p, hp.n_rot, key[0], key[1], weights.dtype, weights.rope_factors,
                                        hp.rope_mscale)
                if cos.ndim == 2:
                    cos, sin = cos[None], sin[None]
                ropes[key] = Rope(cos, sin, hp.n_rot, hp.spec.rope == ROPE_NEOX)
        lo_global = K.key_starts(B, T, 0, seg_start)
        lo_local = K.key_starts(B, T, hp.swa_window, seg_start) if hp.swa_window else lo_global
        return cls(B, T, ropes, lo_global, lo_local)

    def rope(self, hp: HParams, il: int) -> Rope:
        return self.ropes[hp.rope_of(il)]

    def lo(self, hp: HParams, il: int) -> np.ndarray | None:
        return self.lo_local if hp.is_local(il) else self.lo_global


def compact_rows(tokens: np.ndarray, targets: np.ndarray, mask: np.ndarray, pos: np.ndarray | None,
                 seg_start: np.ndarray | None):
    """The batch without the positions that no loss depends on: those after the last position with
    a loss weight in their record (``seg_start``; None: each row is one record) — a chat record's
    closing newline, the padding of packed rows and of rows cut to the batch's longest record.
    Attention is causal within a record, so no query with a loss sees them.  What remains is laid
    end to end as one row [1, N'] of the same records (``pos``, ``seg_start``).  Returns (tokens,
    targets, mask, pos, seg_start), or None when every position is needed (the text pipeline's
    rows: a loss on every position)."""
    B, T = tokens.shape
    n = B * T
    w = np.asarray(mask).reshape(n) != 0
    if seg_start is None:
        seg_start = np.zeros((B, T), dtype=np.int64)
    rec = (np.asarray(seg_start, dtype=np.int64).reshape(B, T) + (np.arange(B) * T)[:, None]).reshape(n)  # [n]
    last = np.full(n, -1, dtype=np.int64)  # by record (its first flat position): its last position with a loss
    np.maximum.at(last, rec, np.where(w, np.arange(n), -1))
    need = np.arange(n) <= last[rec]  # [n]
    if need.all():
        return None
    idx = np.flatnonzero(need)  # [N'] into the flat batch
    new = np.cumsum(need) - 1  # [n] each kept position's index in the new row
    if pos is None:
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))

    def flat(a):
        return np.ascontiguousarray(np.asarray(a).reshape(n)[idx][None])

    # (a record's first position is kept whenever any of it is)
    return flat(tokens), flat(targets), flat(mask), flat(pos), np.ascontiguousarray(new[rec[idx]][None])


# -- one transformer block ---------------------------------------------------------------------

@dataclass
class LayerCache:
    """Everything a block's backward needs from its forward (None where the family has no such step)."""

    x: np.ndarray  # [N, C] block input
    g_att: np.ndarray  # [C] effective attention norm weight
    h1: np.ndarray  # [N, C] normed input
    rstd1: np.ndarray  # [N]
    us: dict  # LoRA intermediates x·a [N, r] by base tensor name
    q_raw: np.ndarray | None  # [N·Hq, D] q before its per-head norm (qk_norm)
    k_raw: np.ndarray | None  # [N·Hkv, D]
    rstd_q: np.ndarray | None  # [N·Hq]
    rstd_k: np.ndarray | None  # [N·Hkv]
    qh: np.ndarray  # [B, Hq, T, D] after RoPE
    kh: np.ndarray  # [B, Hkv, T, D] after RoPE
    vh: np.ndarray  # [B, Hkv, T, D]
    att: np.ndarray  # [B, Hq, T, D] attention output
    att_cache: np.ndarray  # probs [B, Hq, T, T] or logsumexp [B, Hq, T] (flash)
    a: np.ndarray  # [N, Cq] attention output, token-major
    o: np.ndarray | None  # [N, C] output projection before post_attention_norm (post_norms)
    rstd_o: np.ndarray | None  # [N]
    x2: np.ndarray  # [N, C] residual after attention
    g_ffn: np.ndarray  # [C]
    h2: np.ndarray  # [N, C]
    rstd2: np.ndarray  # [N]
    g: np.ndarray  # [N, F] gate pre-activation
    u: np.ndarray  # [N, F] up projection
    hf: np.ndarray  # [N, F] gated activation
    d: np.ndarray | None  # [N, C] down projection before post_ffw_norm (post_norms)
    rstd_d: np.ndarray | None  # [N]


def qkv_forward(h1: np.ndarray, lw: LayerWeights, il: int, hp: HParams, lora: LoraParams | None, us: dict):
    """h1 [N, C] -> q [N, Cq], k [N, Ckv], v [N, Ckv] (biases added); the adapters' x·a go into ``us``."""
    Cq, Ckv = hp.n_embd_q, hp.n_embd_kv
    if hp.spec.fused_qkv:
        qkv, us[ATTN_QKV] = linear_forward(h1, lw[ATTN_QKV], _lora(lora, weight(ATTN_QKV, il)),
                                           lw.get(ATTN_QKV + ".bias"))  # [N, Cq + 2·Ckv]
        return qkv[:, :Cq], qkv[:, Cq:Cq + Ckv], qkv[:, Cq + Ckv:]
    out = []
    for name in (ATTN_Q, ATTN_K, ATTN_V):
        y, us[name] = linear_forward(h1, lw[name], _lora(lora, weight(name, il)), lw.get(name + ".bias"))
        out.append(y)
    return out


def gate_up_forward(h2: np.ndarray, lw: LayerWeights, il: int, hp: HParams, lora: LoraParams | None, us: dict):
    """h2 [N, C] -> (gate, up) [N, F] each, from ffn_gate and ffn_up or the fused ffn_up [gate | up]."""
    if hp.spec.fused_up:
        gu, us[FFN_UP] = linear_forward(h2, lw[FFN_UP], _lora(lora, weight(FFN_UP, il)))  # [N, 2F]
        return np.ascontiguousarray(gu[:, :hp.n_ff]), np.ascontiguousarray(gu[:, hp.n_ff:])
    g, us[FFN_GATE] = linear_forward(h2, lw[FFN_GATE], _lora(lora, weight(FFN_GATE, il)))
    u, us[FFN_UP] = linear_forward(h2, lw[FFN_UP], _lora(lora, weight(FFN_UP, il)))
    return g, u


def gated_act(hp: HParams, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """act(g)·u: SiLU (llama, Qwen, Phi-3) or GELU-tanh (Gemma)."""
    return K.geglu_forward(g, u) if hp.spec.act == "gelu_tanh" else K.swiglu_forward(g, u)


def head_norm(x: np.ndarray, w: np.ndarray, eps: float):
    """Per-head RMSNorm: x [N, H·D] as [N·H, D] -> (normed [N, H·D], x as [N·H, D], rstd [N·H])."""
    D = w.shape[0]
    xr = np.ascontiguousarray(x).reshape(-1, D)
    y, rstd = K.rmsnorm_forward(xr, w, eps)
    return y.reshape(x.shape), xr, rstd


def layer_forward(x: np.ndarray, lw: LayerWeights, il: int, hp: HParams, ps: Positions, lora: LoraParams | None,
                  flash: bool, keep_cache: bool, need_out: bool = True):
    """One block: x [N, C] -> (out [N, C], LayerCache or None).

    ``need_out=False`` (recomputing a block for its backward under checkpointing, with keep_cache):
    out is None and the down projection is skipped — its backward needs only its input and the
    adapter's x·a (and, with a post-FFN norm, its output: then it is computed)."""
    spec = hp.spec
    B, T = ps.B, ps.T
    Hq, Hkv, D, eps = hp.n_head, hp.n_head_kv, hp.head_dim, hp.rms_eps
    us: dict = {}
    g_att = norm_weight(lw[ATTN_NORM], _lora(lora, weight(ATTN_NORM, il)))
    h1, rstd1 = K.rmsnorm_forward(x, g_att, eps)  # [N, C], [N]
    q, k, v = qkv_forward(h1, lw, il, hp, lora, us)  # [N, Cq], [N, Ckv], [N, Ckv]
    q_raw = k_raw = rstd_q = rstd_k = None
    if spec.qk_norm:
        q, q_raw, rstd_q = head_norm(q, lw[ATTN_Q_NORM], eps)
        k, k_raw, rstd_k = head_norm(k, lw[ATTN_K_NORM], eps)
    rope = ps.rope(hp, il)
    qh = rope.forward(q.reshape(B, T, Hq, D))  # [B, Hq, T, D]
    kh = rope.forward(k.reshape(B, T, Hkv, D))  # [B, Hkv, T, D]
    vh = K.to_heads(v.reshape(B, T, Hkv, D))  # [B, Hkv, T, D]
    lo = ps.lo(hp, il)
    if flash:
        att, att_cache = K.flash_attention_forward(qh, kh, vh, hp.attn_scale, lo=lo)  # [B, Hq, T, D], [B, Hq, T]
    else:
        att, att_cache = K.attention_forward(qh, kh, vh, hp.attn_scale, lo=lo)  # [B, Hq, T, D], [B, Hq, T, T]
    a = K.from_heads(att).reshape(B * T, Hq * D)  # [N, Cq]
    o, us[ATTN_OUT] = linear_forward(a, lw[ATTN_OUT], _lora(lora, weight(ATTN_OUT, il)), lw.get(ATTN_OUT + ".bias"))
    o_raw = rstd_o = None
    if spec.post_norms:
        o_raw = o
        o, rstd_o = K.rmsnorm_forward(o_raw, lw[ATTN_POST_NORM], eps)
    x2 = x + o  # [N, C]
    g_ffn = norm_weight(lw[FFN_NORM], _lora(lora, weight(FFN_NORM, il)))
    h2, rstd2 = K.rmsnorm_forward(x2, g_ffn, eps)  # [N, C]
    g, u = gate_up_forward(h2, lw, il, hp, lora, us)  # [N, F] each
    hf = gated_act(hp, g, u)  # [N, F]
    l_d = _lora(lora, weight(FFN_DOWN, il))
    out = d_raw = rstd_d = None
    if keep_cache and not need_out and not spec.post_norms:
        us[FFN_DOWN] = None if l_d is None else K.lora_u(hf, l_d[0])  # [N, r], as linear_forward computes it
    else:
        d, us[FFN_DOWN] = linear_forward(hf, lw[FFN_DOWN], l_d)  # [N, C]
        if spec.post_norms:
            d_raw = d
            d, rstd_d = K.rmsnorm_forward(d_raw, lw[FFN_POST_NORM], eps)
        out = x2 + d  # [N, C]
    if not keep_cache:
        return out, None
    return out, LayerCache(x, g_att, h1, rstd1, us, q_raw, k_raw, rstd_q, rstd_k, qh, kh, vh, att, att_cache, a,
                           o_raw, rstd_o, x2, g_ffn, h2, rstd2, g, u, hf, d_raw, rstd_d)


# -- embeddings and head ---------------------------------------------------------------------

def embed_scale(hp: HParams, dtype) -> float | None:
    """sqrt(n_embd) in the dtype when the family scales its embeddings (Gemma), else None."""
    return np.dtype(dtype).type(math.sqrt(hp.n_embd)) if hp.spec.embd_scale else None


def embed_forward(weights, tokens: np.ndarray, lora: LoraParams | None) -> np.ndarray:
    """tokens [B, T] -> x [N, C] = (W[tok] + s·b[tok]·aᵀ) (· sqrt(C) for Gemma)."""
    ids = tokens.reshape(-1)
    x = np.ascontiguousarray(weights.embed(ids))  # [N, C]
    la = _lora(lora, weight(TOKEN_EMBD))
    if la is not None:
        a, b, s = la
        K.lora_add(x, b[ids] * s, a)  # x += s·b[tok]·aᵀ  ([N, r]·[r, C])
    scale = embed_scale(weights.hp, x.dtype)
    if scale is not None:
        x *= scale
    return x


def logits_bytes(weights) -> int:
    """The most bytes of logits the head holds at once: 64 MB (256 rows of a 49152-token vocabulary),
    8 MB when streaming weights in low-memory mode."""
    return (64 << 20) if weights.cache_layers else (8 << 20)


def head_rows(weights, n_rows: int, itemsize: int) -> int:
    """Rows per chunk so that one chunk of logits [rows, V] stays under :func:`logits_bytes` (for
    SmolLM2 at ctx 256 one chunk, so each head chunk is dequantized once for the forward and once
    for the backward)."""
    return max(1, min(n_rows, logits_bytes(weights) // max(1, weights.hp.n_vocab * itemsize)))


def head_logits(weights, hn: np.ndarray, lora: LoraParams | None) -> tuple[np.ndarray, np.ndarray | None]:
    """hn [n, C] (already normed) -> (logits [n, V], u = hn·a_out or None).  With soft-capping
    (hparams.softcap = c) the logits are c·tanh(logits / c)."""
    V = weights.hp.n_vocab
    la = _lora(lora, weight(OUTPUT))
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
    c = weights.hp.softcap
    if c:
        logits /= c
        np.tanh(logits, out=logits)
        logits *= c
    return logits, u


def forward_hidden(weights, hp: HParams, tokens: np.ndarray, lora: LoraParams | None = None,
                   flash: bool = True, pos: np.ndarray | None = None, seg_start: np.ndarray | None = None
                   ) -> np.ndarray:
    """tokens [B, T] -> the normed final hidden states [B·T, C] that the head multiplies (packed rows:
    ``pos`` and ``seg_start`` [B, T], see Positions)."""
    B, T = tokens.shape
    ps = Positions.make(hp, weights, B, T, pos, seg_start)
    x = embed_forward(weights, tokens, lora)
    for il in range(hp.n_layer):
        x, _ = layer_forward(x, weights.layer(il), il, hp, ps, lora, flash, keep_cache=False)
    g_out = norm_weight(weights.output_norm, _lora(lora, weight(OUTPUT_NORM)))
    hn, _ = K.rmsnorm_forward(x, g_out, hp.rms_eps)
    return hn


def forward_logits(weights, hp: HParams, tokens: np.ndarray, lora: LoraParams | None = None,
                   flash: bool = True) -> np.ndarray:
    """Inference: tokens [B, T] -> logits [B, T, V] (float32 unless weights are float64)."""
    B, T = tokens.shape
    logits, _ = head_logits(weights, forward_hidden(weights, hp, tokens, lora, flash), lora)
    return logits.reshape(B, T, hp.n_vocab)
