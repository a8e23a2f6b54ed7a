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

def rope_cache(pos, n_rot: int, freq_base: float, freq_scale: float, dtype=np.float32, freq_factors=None,
               mscale: float = 1.0):
    """pos [T] or [B, T] -> (cos, sin) [..., n_rot//2]; theta_i = freq_scale·(p·ts^i / ff_i), p·ts^i built
    by repeated float32 products; cos/sin times mscale."""
    f32 = np.float32
    pos = np.asarray(pos)
    half = n_rot // 2
    ts = f32(freq_base) ** (f32(-2.0) / f32(n_rot))
    flat = pos.reshape(-1)
    steps = np.full((flat.shape[0], half), ts, dtype=f32)
    steps[:, 0] = flat.astype(f32)
    theta = np.cumprod(steps, axis=1, dtype=f32)  # p, p·ts, (p·ts)·ts, ...
    ff = np.ones(half, f32) if freq_factors is None else np.asarray(freq_factors, f32)
    th = (f32(freq_scale) * (theta / ff)).astype(dtype)
    m = np.dtype(dtype).type(mscale)
    return (np.cos(th) * m).reshape(pos.shape + (half,)), (np.sin(th) * m).reshape(pos.shape + (half,))


def _rotate(x, cos, sin, n_rot, neox=False):
    """x [B, T, H, D], cos/sin [T, n_rot/2] or [B, T, n_rot/2]: each pair (x[2i], x[2i+1]) — with
    ``neox`` (x[i], x[i + n_rot/2]) — -> (x0·c − x1·s, x0·s + x1·c) for i < n_rot/2."""
    c = cos[..., None, :] if cos.ndim == 3 else cos[None, :, None, :]
    s = sin[..., None, :] if sin.ndim == 3 else sin[None, :, None, :]
    half = n_rot // 2
    i0, i1 = (slice(0, half), slice(half, n_rot)) if neox else (slice(0, n_rot, 2), slice(1, n_rot, 2))
    x0, x1 = x[..., i0], x[..., i1]
    out = x.copy()
    out[..., i0] = x0 * c - x1 * s
    out[..., i1] = x0 * s + x1 * c
    return out


def rope_forward(x, cos, sin, n_rot: int, out=None, neox: bool = False):
    """x [B, T, H, D] -> [B, H, T, D]."""
    res = np.ascontiguousarray(_rotate(x, cos.astype(x.dtype), sin.astype(x.dtype), n_rot, neox).transpose(0, 2, 1, 3))
    if out is not None:
        out[...] = res
        res = out
    return res


def rope_backward(dout, cos, sin, n_rot: int, neox: bool = False):
    """dout [B, H, T, D] -> dx [B, T, H, D]: rotation by −theta."""
    d = dout.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(_rotate(d, cos.astype(d.dtype), -sin.astype(d.dtype), n_rot, neox))


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


def lora_backward(dy, x, u, a, b, s: float, dx, da, db) -> None:
    dyb = dy @ b
    if dx is not None:
        dx += s * (dyb @ a.T)
    da += s * (x.T @ dyb)
    db += s * (dy.T @ u)


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


_GELU_C, _GELU_A = np.sqrt(2.0 / np.pi), 0.044715


def geglu_forward(g, u, out=None):
    """h = ½g(1 + tanh(c·(g + a·g³)))·u, in float64."""
    g64 = g.astype(F64)
    res = (0.5 * g64 * (1.0 + np.tanh(_GELU_C * (g64 + _GELU_A * g64 ** 3))) * u).astype(g.dtype)
    if out is not None:
        out[...] = res
        res = out
    return res


def geglu_backward(dh, g, u):
    g64 = g.astype(F64)
    t = np.tanh(_GELU_C * (g64 + _GELU_A * g64 ** 3))
    gelu = 0.5 * g64 * (1.0 + t)
    dgelu = 0.5 * (1.0 + t) + 0.5 * g64 * (1.0 - t * t) * _GELU_C * (1.0 + 3 * _GELU_A * g64 ** 2)
    return (dh * u * dgelu).astype(g.dtype), (dh * gelu).astype(g.dtype)


# -- 4. attention -------------------------------------------------------------------------------

def _expand(q, k, v):
    G = q.shape[1] // k.shape[1]
    return np.repeat(k, G, axis=1).astype(F64), np.repeat(v, G, axis=1).astype(F64), G


def _scores(q, kr, scale, lo=None):
    """Scaled masked scores [B, Hq, T, T] in float64: −inf above the diagonal and, with lo [B, T],
    left of each query's first key."""
    B, _, T, _ = q.shape
    s = (q.astype(F64) @ kr.transpose(0, 1, 3, 2)) * scale
    j = np.arange(T)
    hidden = j[None, None, :] > j[None, :, None]  # [1, T, T]
    if lo is not None:
        hidden = hidden | (j[None, None, :] < np.asarray(lo)[:, :, None])  # [B, T, T]
    s[np.broadcast_to(hidden[:, None], s.shape)] = -np.inf
    return s


def _fold(x, G):
    """[B, Hq, T, D] -> sum over each KV head's G query heads -> [B, Hkv, T, D]."""
    B, Hq, T, D = x.shape
    return x.reshape(B, Hq // G, G, T, D).sum(axis=2)


def attention_forward(q, k, v, scale: float, lo=None):
    kr, vr, _ = _expand(q, k, v)
    s = _scores(q, kr, scale, lo)
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


def attention_backward(dout, q, k, v, probs, scale: float, lo=None):
    kr, vr, G = _expand(q, k, v)
    p = probs.astype(F64)
    dp = dout.astype(F64) @ vr.transpose(0, 1, 3, 2)
    corr = (dp * p).sum(axis=-1, keepdims=True)
    return _attn_grads(dout, q, kr, vr, p, corr, scale, G)


def flash_attention_forward(q, k, v, scale: float, block_q: int = 32, lo=None):
    kr, vr, _ = _expand(q, k, v)
    s = _scores(q, kr, scale, lo)
    m = s.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True))
    p = np.exp(s - lse)
    return (p @ vr).astype(q.dtype), lse[..., 0].astype(q.dtype)


def flash_attention_backward(dout, q, k, v, out, lse, scale: float, lo=None):
    kr, vr, G = _expand(q, k, v)
    p = np.exp(_scores(q, kr, scale, lo) - lse.astype(F64)[..., None])
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


def xent_stats(logits, r0: int, targets, m, tot, lt) -> None:
    l = logits.astype(F64)
    mc = l.max(axis=1)
    new_m = np.maximum(m.astype(F64), mc)
    tot *= np.exp(m.astype(F64) - new_m)
    tot += np.exp(l - new_m[:, None]).sum(axis=1)
    m[...] = new_m
    t = np.asarray(targets) - r0
    inside = (t >= 0) & (t < l.shape[1])
    lt[inside] = l[np.flatnonzero(inside), t[inside]]


def xent_grad(logits, r0: int, targets, m, tot, weights, inv_norm: float) -> None:
    l = logits.astype(F64)
    d = np.exp(l - m.astype(F64)[:, None]) / tot[:, None]
    t = np.asarray(targets) - r0
    inside = (t >= 0) & (t < l.shape[1])
    d[np.flatnonzero(inside), t[inside]] -= 1.0
    d *= (np.asarray(weights, dtype=F64) * inv_norm)[:, None]
    logits[...] = d


# -- 6. embeddings ------------------------------------------------------------------------------

def embedding_scatter_add(dst, ids, src) -> None:
    np.add.at(dst, np.asarray(ids).reshape(-1), src.astype(dst.dtype))
