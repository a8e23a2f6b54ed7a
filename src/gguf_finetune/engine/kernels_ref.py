"""Slow, obviously-correct numpy references for ``kernels.py`` (same names, signatures, shapes).

Used only by the tests.  Written for clarity: whole-array numpy, the math in float64 where the
fast kernel's exact float32 rounding does not matter, and ggml's float32 steps where it does
(rmsnorm's mean and rstd, RoPE's theta).  Attention repeats the KV heads to Hq heads and builds
the full [T, T] masked score matrix.
"""

from __future__ import annotations

import numpy as np

F64 = np.float64


# -- 1. RMSNorm ---------------------------------------------------------------------------------

def rmsnorm_forward(x, w, eps: float, out=None):
    """x [N, C], w [C] -> (out [N, C], rstd [N]); ggml's order: float64 sum, mean and rstd in the dtype."""
    dt = x.dtype.type
    sq = (x * x).astype(F64)  # squares in the dtype, summed in float64
    mean = (sq.sum(axis=1) / x.shape[1]).astype(x.dtype)
    rstd = dt(1) / np.sqrt(mean + dt(eps))
    res = (x * rstd[:, None]) * w.astype(x.dtype)
    if out is not None:
        out[...] = res
        res = out
    return res, rstd


def rmsnorm_backward(dout, x, w, rstd):
    """-> (dx [N, C], dw [C]); dx = r·(dout·w − x̂·mean(dout·w·x̂)), x̂ = x·r."""
    r = rstd.astype(F64)[:, None]
    xhat = x.astype(F64) * r
    dxhat = dout.astype(F64) * w.astype(F64)
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(axis=1, keepdims=True))
    dw = (dout.astype(F64) * xhat).sum(axis=0)
    return dx.astype(x.dtype), dw.astype(x.dtype)


# -- 2. RoPE ------------------------------------------------------------------------------------

def rope_cache(pos, n_rot: int, freq_base: float, freq_scale: float, dtype=np.float32):
    """pos [T] -> (cos, sin) [T, n_rot//2]; theta_i = freq_scale·p·ts^i built by repeated float32 products."""
    f32 = np.float32
    pos = np.asarray(pos)
    half = n_rot // 2
    ts = f32(freq_base) ** (f32(-2.0) / f32(n_rot))
    steps = np.full((pos.shape[0], half), ts, dtype=f32)
    steps[:, 0] = pos.astype(f32)
    theta = np.cumprod(steps, axis=1, dtype=f32)  # p, p·ts, (p·ts)·ts, ...
    th = (f32(freq_scale) * theta).astype(dtype)
    return np.cos(th), np.sin(th)


def _rotate(x, cos, sin, n_rot):
    """x [B, T, H, D]: (x[2i], x[2i+1]) -> (x0·c − x1·s, x0·s + x1·c) for i < n_rot/2."""
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    x0 = x[..., 0:n_rot:2]
    x1 = x[..., 1:n_rot:2]
    out = x.copy()
    out[..., 0:n_rot:2] = x0 * c - x1 * s
    out[..., 1:n_rot:2] = x0 * s + x1 * c
    return out


def rope_forward(x, cos, sin, n_rot: int, out=None):
    """x [B, T, H, D] -> [B, H, T, D]."""
    res = np.ascontiguousarray(_rotate(x, cos.astype(x.dtype), sin.astype(x.dtype), n_rot).transpose(0, 2, 1, 3))
    if out is not None:
        out[...] = res
        res = out
    return res


def rope_backward(dout, cos, sin, n_rot: int):
    """dout [B, H, T, D] -> dx [B, T, H, D]: rotation by −theta."""
    d = dout.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(_rotate(d, cos.astype(d.dtype), -sin.astype(d.dtype), n_rot))


def to_heads(x, out=None):
    res = np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    if out is not None:
        out[...] = res
        res = out
    return res


def from_heads(x, out=None):
    return to_heads(x, out)


# -- 3. SwiGLU ----------------------------------------------------------------------------------

def lora_forward(x, a, b, s: float, y):
    u = x @ a
    y += (s * u) @ b.T
    return u


def lora_add(y, us, b) -> None:
    y += us @ b.T


def lora_wide_backward(dy, u, b, s: float, db):
    db += s * (dy.T @ u)
    return dy @ b


def swiglu_forward(g, u, out=None):
    """h = g/(1+exp(-g))·u in the dtype."""
    with np.errstate(over="ignore"):
        res = (g / (1 + np.exp(-g))) * u
    if out is not None:
        out[...] = res
        res = out
    return res


def swiglu_backward(dh, g, u):
    g64 = g.astype(F64)
    with np.errstate(over="ignore"):
        sg = 1.0 / (1.0 + np.exp(-g64))
    du = dh * (g64 * sg)
    dg = dh * u * sg * (1.0 + g64 * (1.0 - sg))
    return dg.astype(g.dtype), du.astype(g.dtype)


# -- 4. attention -------------------------------------------------------------------------------

def _expand(q, k, v):
    G = q.shape[1] // k.shape[1]
    return np.repeat(k, G, axis=1).astype(F64), np.repeat(v, G, axis=1).astype(F64), G


def _scores(q, kr, scale):
    """Scaled masked scores [B, Hq, T, T] in float64 (−inf above the diagonal)."""
    T = q.shape[2]
    s = (q.astype(F64) @ kr.transpose(0, 1, 3, 2)) * scale
    s[..., np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
    return s


def _fold(x, G):
    """[B, Hq, T, D] -> sum over each KV head's G query heads -> [B, Hkv, T, D]."""
    B, Hq, T, D = x.shape
    return x.reshape(B, Hq // G, G, T, D).sum(axis=2)


def attention_forward(q, k, v, scale: float):
    kr, vr, _ = _expand(q, k, v)
    s = _scores(q, kr, scale)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ vr).astype(q.dtype), p.astype(q.dtype)


def _attn_grads(dout, q, kr, vr, p, dp_correction, scale, G):
    do = dout.astype(F64)
    dp = do @ vr.transpose(0, 1, 3, 2)
    ds = p * (dp - dp_correction) * scale
    dq = ds @ kr
    dk = _fold(ds.transpose(0, 1, 3, 2) @ q.astype(F64), G)
    dv = _fold(p.transpose(0, 1, 3, 2) @ do, G)
    return dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)


def attention_backward(dout, q, k, v, probs, scale: float):
    kr, vr, G = _expand(q, k, v)
    p = probs.astype(F64)
    dp = dout.astype(F64) @ vr.transpose(0, 1, 3, 2)
    corr = (dp * p).sum(axis=-1, keepdims=True)
    return _attn_grads(dout, q, kr, vr, p, corr, scale, G)


def flash_attention_forward(q, k, v, scale: float, block_q: int = 32):
    kr, vr, _ = _expand(q, k, v)
    s = _scores(q, kr, scale)
    m = s.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True))
    p = np.exp(s - lse)
    return (p @ vr).astype(q.dtype), lse[..., 0].astype(q.dtype)


def flash_attention_backward(dout, q, k, v, out, lse, scale: float):
    kr, vr, G = _expand(q, k, v)
    p = np.exp(_scores(q, kr, scale) - lse.astype(F64)[..., None])
    corr = (dout.astype(F64) * out.astype(F64)).sum(axis=-1)[..., None]
    return _attn_grads(dout, q, kr, vr, p, corr, scale, G)


# -- 5. cross-entropy ---------------------------------------------------------------------------

def _logsumexp(l):
    m = l.max(axis=1, keepdims=True)
    return m + np.log(np.exp(l - m).sum(axis=1, keepdims=True))


def xent_forward(logits, targets):
    l = logits.astype(F64)
    rows = np.arange(l.shape[0])
    return _logsumexp(l)[:, 0] - l[rows, targets]


def xent_forward_backward(logits, targets, weights, inv_norm: float):
    l = logits.astype(F64)
    rows = np.arange(l.shape[0])
    lse = _logsumexp(l)
    nll = lse[:, 0] - l[rows, targets]
    d = np.exp(l - lse)
    d[rows, targets] -= 1.0
    d *= (np.asarray(weights, dtype=F64) * inv_norm)[:, None]
    logits[...] = d
    return nll


# -- 6. embeddings ------------------------------------------------------------------------------

def embedding_scatter_add(dst, ids, src) -> None:
    np.add.at(dst, np.asarray(ids).reshape(-1), src.astype(dst.dtype))
