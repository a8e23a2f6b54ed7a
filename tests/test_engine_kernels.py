"""Engine kernels: numba (kernels.py) against numpy references (kernels_ref.py), every backward
against central finite differences in float64, ggml's float32 RoPE tables against a libm loop,
flash attention against the materialized one, and bitwise run-to-run determinism."""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import pytest

from gguf_finetune.engine import kernels as K
from gguf_finetune.engine import kernels_ref as R

DTYPES = [np.float32, np.float64]
# max |fast − ref| <= TOL · max(1, max |ref|)
TOL = {np.float32: 4e-6, np.float64: 1e-13}


def rnd(rng, *shape, dtype=np.float64, s=1.0):
    return (rng.standard_normal(shape) * s).astype(dtype)


def close(a, b, dtype, tol=None):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    err = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))) if a.size else 0.0
    lim = (TOL[dtype] if tol is None else tol) * max(1.0, float(np.max(np.abs(b)))) if b.size else 0.0
    assert err <= lim, f"max abs error {err:.3g} > {lim:.3g}"


def fd_check(loss, arrays, grads, h=1e-5, tol=1e-6):
    """Central differences of loss() w.r.t. every element of each array (perturbed in place)."""
    for x, g in zip(arrays, grads):
        assert x.dtype == np.float64 and g.shape == x.shape
        num = np.empty_like(x)
        flat, nflat = x.reshape(-1), num.reshape(-1)
        for i in range(flat.size):
            v = flat[i]
            flat[i] = v + h
            lp = loss()
            flat[i] = v - h
            lm = loss()
            flat[i] = v
            nflat[i] = (lp - lm) / (2 * h)
        err = np.max(np.abs(num - g)) / max(np.max(np.abs(g)), 1e-12)
        assert err <= tol, f"finite-difference relative error {err:.3g}"


# -- the float32 exp used by softmax, cross-entropy and SiLU -------------------------------------

def test_expf32_within_one_ulp():
    rng = np.random.default_rng(13)
    x = np.concatenate([np.linspace(-87.3, 88.0, 20001), rng.uniform(-30.0, 2.0, 20000)]).astype(np.float32)
    got = np.array([K._expf32(v) for v in x], dtype=np.float32)
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(got - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.0, ulps.max()
    assert K._expf32(np.float32(0.0)) == 1.0
    assert K._expf32(np.float32(-np.inf)) == 0.0 and K._expf32(np.float32(-100.0)) == 0.0
    assert np.isnan(K._expf32(np.float32(np.nan)))


# -- RMSNorm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_matches_reference(dtype):
    rng = np.random.default_rng(0)
    x, w, d = rnd(rng, 37, 70, dtype=dtype), rnd(rng, 70, dtype=dtype), rnd(rng, 37, 70, dtype=dtype)
    out, rstd = K.rmsnorm_forward(x, w, 1e-5)
    out_r, rstd_r = R.rmsnorm_forward(x, w, 1e-5)
    close(rstd, rstd_r, dtype, tol=TOL[dtype] / 4)
    close(out, out_r, dtype)
    for a, b in zip(K.rmsnorm_backward(d, x, w, rstd), R.rmsnorm_backward(d, x, w, rstd)):
        close(a, b, dtype)
    dx_only, none = K.rmsnorm_backward(d, x, w, rstd, need_dw=False)  # dw skipped, dx the same
    assert none is None and np.array_equal(dx_only, K.rmsnorm_backward(d, x, w, rstd)[0])
    buf = np.empty_like(x)
    assert K.rmsnorm_forward(x, w, 1e-5, out=buf)[0] is buf


def test_rmsnorm_gradients_finite_differences():
    rng = np.random.default_rng(1)
    x, w, R_ = rnd(rng, 3, 7), rnd(rng, 7), rnd(rng, 3, 7)
    out, rstd = K.rmsnorm_forward(x, w, 1e-3)
    dx, dw = K.rmsnorm_backward(R_, x, w, rstd)
    fd_check(lambda: np.sum(K.rmsnorm_forward(x, w, 1e-3)[0] * R_), [x, w], [dx, dw])


# -- RoPE ---------------------------------------------------------------------------------------

def test_rope_cache_matches_ggml_float32_loop():
    """theta built as ggml_rope_cache_init does (float32 products), cos/sin from libm: bitwise."""
    name = ctypes.util.find_library("m")
    if name is None:
        pytest.skip("libm not found")
    libm = ctypes.CDLL(name)
    for fn, nargs in (("cosf", 1), ("sinf", 1), ("powf", 2)):
        getattr(libm, fn).restype = ctypes.c_float
        getattr(libm, fn).argtypes = [ctypes.c_float] * nargs
    f32 = np.float32
    pos = np.array([0, 1, 2, 7, 100, 511, 4095])
    for n_rot, base, fscale in ((64, 10000.0, 1.0), (10, 500000.0, 0.25)):
        cos, sin = K.rope_cache(pos, n_rot, base, fscale, np.float32)
        ts = f32(libm.powf(base, f32(-2.0) / f32(n_rot)))
        for t, p in enumerate(pos):
            theta = f32(p)
            for i in range(n_rot // 2):
                th = f32(f32(fscale) * theta)
                assert cos[t, i] == f32(libm.cosf(th)) and sin[t, i] == f32(libm.sinf(th)), (p, i)
                theta = f32(theta * ts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_cache_matches_reference(dtype):
    pos = np.arange(50)
    for a, b in zip(K.rope_cache(pos, 12, 10000.0, 0.5, dtype), R.rope_cache(pos, 12, 10000.0, 0.5, dtype)):
        close(a, b, dtype, tol=1.2e-7 if dtype == np.float32 else 0.0)


def test_rope_rotates_adjacent_pairs_by_position():
    """n_rot = 2: the first pair turns by angle p·freq_scale, the other dims pass through."""
    pos = np.arange(5)
    cos, sin = K.rope_cache(pos, 2, 10000.0, 0.5, np.float64)
    x = np.zeros((1, 5, 1, 4))
    x[..., 0], x[..., 2], x[..., 3] = 1.0, 3.0, -2.0
    out = K.rope_forward(x, cos, sin, 2)[0, 0]  # [T, D]
    np.testing.assert_allclose(out[:, 0], np.cos(0.5 * pos), atol=1e-15)
    np.testing.assert_allclose(out[:, 1], np.sin(0.5 * pos), atol=1e-15)
    assert np.all(out[:, 2] == 3.0) and np.all(out[:, 3] == -2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_transposes_match_reference(dtype):
    rng = np.random.default_rng(2)
    B, T, H, D, n_rot = 2, 11, 3, 10, 6
    cos, sin = K.rope_cache(np.arange(T), n_rot, 10000.0, 1.0, dtype)
    x, d = rnd(rng, B, T, H, D, dtype=dtype), rnd(rng, B, H, T, D, dtype=dtype)
    out = K.rope_forward(x, cos, sin, n_rot)
    close(out, R.rope_forward(x, cos, sin, n_rot), dtype)
    close(K.rope_backward(d, cos, sin, n_rot), R.rope_backward(d, cos, sin, n_rot), dtype)
    close(K.rope_backward(out, cos, sin, n_rot), x, dtype)  # inverse rotation
    assert np.array_equal(K.to_heads(x), x.transpose(0, 2, 1, 3))
    assert np.array_equal(K.from_heads(d), d.transpose(0, 2, 1, 3))
    assert K.to_heads(x).flags.c_contiguous and K.from_heads(d).flags.c_contiguous


def test_rope_gradient_finite_differences():
    rng = np.random.default_rng(3)
    B, T, H, D, n_rot = 2, 5, 2, 6, 4
    cos, sin = K.rope_cache(np.arange(T), n_rot, 100.0, 1.0, np.float64)
    x, R_ = rnd(rng, B, T, H, D), rnd(rng, B, H, T, D)
    dx = K.rope_backward(R_, cos, sin, n_rot)
    fd_check(lambda: np.sum(K.rope_forward(x, cos, sin, n_rot) * R_), [x], [dx])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [False, True])
def test_rope_neox_partial_rows_and_factors_match_reference(dtype, neox):
    """NeoX pairs (i, i + n_rot/2), partial rotary (n_rot < D), a table per batch row (packed rows
    restart their positions), frequency factors and an attention factor."""
    rng = np.random.default_rng(12)
    B, T, H, D, n_rot = 2, 9, 3, 10, 6
    pos = np.stack([np.arange(T), np.r_[np.arange(4), np.arange(T - 4)]])  # row 1: two records
    ff = rng.uniform(1.0, 3.0, n_rot // 2)
    cos, sin = K.rope_cache(pos, n_rot, 500.0, 0.5, dtype, freq_factors=ff, mscale=1.2)
    cos_r, sin_r = R.rope_cache(pos, n_rot, 500.0, 0.5, dtype, freq_factors=ff, mscale=1.2)
    assert cos.shape == (B, T, n_rot // 2)
    close(cos, cos_r, dtype)
    close(sin, sin_r, dtype)
    x, d = rnd(rng, B, T, H, D, dtype=dtype), rnd(rng, B, H, T, D, dtype=dtype)
    out = K.rope_forward(x, cos, sin, n_rot, neox=neox)
    close(out, R.rope_forward(x, cos, sin, n_rot, neox=neox), dtype)
    close(K.rope_backward(d, cos, sin, n_rot, neox=neox), R.rope_backward(d, cos, sin, n_rot, neox=neox), dtype)
    assert np.array_equal(out[..., n_rot:], x.transpose(0, 2, 1, 3)[..., n_rot:])  # the rest is copied
    assert np.array_equal(out[1, :, 4], K.rope_forward(x, cos, sin, n_rot, neox=neox)[1, :, 4])
    # a row restarted at position 0 is rotated like position 0 of the first row
    close(out[1, :, 4], K.rope_forward(x[1:, 4:5], cos[:1, :1], sin[:1, :1], n_rot, neox=neox)[0, :, 0], dtype)


def test_rope_neox_gradient_finite_differences():
    rng = np.random.default_rng(13)
    B, T, H, D, n_rot = 2, 5, 2, 6, 4
    cos, sin = K.rope_cache(np.arange(T), n_rot, 100.0, 1.0, np.float64, freq_factors=[1.0, 2.5], mscale=0.9)
    x, R_ = rnd(rng, B, T, H, D), rnd(rng, B, H, T, D)
    dx = K.rope_backward(R_, cos, sin, n_rot, neox=True)
    fd_check(lambda: np.sum(K.rope_forward(x, cos, sin, n_rot, neox=True) * R_), [x], [dx])


# -- LoRA update -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 3, 4, 9])  # ranks go four per pass, then one at a time
def test_lora_add_matches_reference(dtype, r, monkeypatch):
    rng = np.random.default_rng(40)
    y, us, b = rnd(rng, 7, 45, dtype=dtype), rnd(rng, 7, r, dtype=dtype), rnd(rng, 45, r, dtype=dtype)
    want = y.copy()
    R.lora_add(want, us, b)
    serial = y.copy()
    K.lora_add(serial, us, b)
    close(serial, want, dtype)
    big = rnd(rng, 7, 90, dtype=dtype)  # a strided column chunk, as the head uses it
    want = big.copy()
    R.lora_add(want[:, 30:75], us, b)
    K.lora_add(big[:, 30:75], us, b)
    close(big, want, dtype)
    monkeypatch.setattr(K, "LORA_ADD_PARALLEL", 1)  # the rows-in-parallel variant (the logits'): same rows, same sums
    par = y.copy()
    K.lora_add(par, us, b)
    assert np.array_equal(par, serial)
    with pytest.raises(ValueError):
        K.lora_add(y, us, rnd(rng, 45, r + 1, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 4, 6, 9])
def test_lora_forward_matches_reference(dtype, r):
    rng = np.random.default_rng(41)
    x, a, b = rnd(rng, 9, 37, dtype=dtype), rnd(rng, 37, r, dtype=dtype), rnd(rng, 21, r, dtype=dtype)
    y = rnd(rng, 9, 21, dtype=dtype)
    want = y.copy()
    u_ref = R.lora_forward(x, a, b, 0.7, want)
    u = K.lora_forward(x, a, b, 0.7, y)
    close(u, u_ref, dtype)
    close(y, want, dtype)
    assert np.array_equal(K.lora_u(x, a), u)  # the recomputation's u is the forward's, bit for bit
    with pytest.raises(ValueError):
        K.lora_forward(x, a, rnd(rng, 21, r + 1, dtype=dtype), 0.7, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 4, 6])
def test_lora_forward_in_parallel_is_the_serial_kernel(dtype, r, monkeypatch):
    rng = np.random.default_rng(43)
    x, a, b = rnd(rng, 70, 37, dtype=dtype), rnd(rng, 37, r, dtype=dtype), rnd(rng, 21, r, dtype=dtype)
    y = rnd(rng, 70, 21, dtype=dtype)
    serial = y.copy()
    u = K.lora_forward(x, a, b, 0.7, serial)
    monkeypatch.setattr(K, "LORA_PARALLEL_ROWS", 1)  # rows in parallel: each row's arithmetic unchanged
    par = y.copy()
    assert np.array_equal(K.lora_forward(x, a, b, 0.7, par), u) and np.array_equal(par, serial)
    assert np.array_equal(K.lora_u(x, a), u)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,r", [(1, 1), (5, 4), (64, 3), (130, 4), (200, 9)])
@pytest.mark.parametrize("with_dx", [True, False])
def test_lora_backward_matches_reference(dtype, N, r, with_dx):
    rng = np.random.default_rng(44)
    n_in, n_out = 37, 23
    dy, x = rnd(rng, N, n_out, dtype=dtype), rnd(rng, N, n_in, dtype=dtype)
    a, b = rnd(rng, n_in, r, dtype=dtype), rnd(rng, n_out, r, dtype=dtype)
    u = x @ a
    dx = rnd(rng, N, n_in, dtype=dtype) if with_dx else None
    flat = np.zeros(a.size + b.size + 3, dtype=dtype)  # the gradients as views into a flat buffer
    da, db = flat[3:3 + a.size].reshape(a.shape), flat[3 + a.size:].reshape(b.shape)
    da[...], db[...] = rnd(rng, n_in, r, dtype=dtype), rnd(rng, n_out, r, dtype=dtype)
    want = [None if dx is None else dx.copy(), da.copy(), db.copy()]
    R.lora_backward(dy, x, u, a, b, 0.7, *want)
    got_dx = None if dx is None else dx.copy()
    K.lora_backward(dy, x, u, a, b, 0.7, got_dx, da, db)
    if with_dx:
        close(got_dx, want[0], dtype)
    close(da, want[1], dtype)
    close(db, want[2], dtype)
    # the sums go over fixed chunks of rows: the same bits with one thread
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        da1, db1 = want[1] * 0, want[2] * 0
        K.lora_backward(dy, x, u, a, b, 0.7, None, da1, db1)
    finally:
        numba.set_num_threads(before)
    da2, db2 = da1 * 0, db1 * 0
    K.lora_backward(dy, x, u, a, b, 0.7, None, da2, db2)
    assert np.array_equal(da1, da2) and np.array_equal(db1, db2)
    with pytest.raises(ValueError):
        K.lora_backward(dy, x, u, a, rnd(rng, n_out, r + 1, dtype=dtype), 0.7, None, da, db)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,n_out", [(5, 7), (1, 1024), (7, 2500), (8, 1030)])
def test_lora_wide_backward_matches_reference(dtype, N, n_out):
    rng = np.random.default_rng(42)
    dy, u, b = rnd(rng, N, n_out, dtype=dtype), rnd(rng, N, 3, dtype=dtype), rnd(rng, n_out, 3, dtype=dtype)
    db = rnd(rng, n_out, 3, dtype=dtype)
    flat = np.zeros(db.size + 4, dtype=dtype)  # the gradient as a view into a flat buffer
    db_v = flat[4:].reshape(db.shape)
    db_v[...] = db
    want_dyb = R.lora_wide_backward(dy, u, b, 0.7, db)
    dyb = K.lora_wide_backward(dy, u, b, 0.7, db_v)
    close(dyb, want_dyb, dtype, tol=TOL[dtype] * 50)  # sums over up to 2500 columns
    close(db_v, db, dtype)
    assert not flat[:4].any()
    with pytest.raises(ValueError):
        K.lora_wide_backward(dy, u, b[:, :2], 0.7, db)


# -- SwiGLU -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(dtype):
    rng = np.random.default_rng(4)
    g, u, dh = rnd(rng, 9, 33, dtype=dtype, s=4.0), rnd(rng, 9, 33, dtype=dtype), rnd(rng, 9, 33, dtype=dtype)
    g[0, :3] = [-200.0, 200.0, 0.0]  # exp overflow / saturation
    close(K.swiglu_forward(g, u), R.swiglu_forward(g, u), dtype)
    for a, b in zip(K.swiglu_backward(dh, g, u), R.swiglu_backward(dh, g, u)):
        close(a, b, dtype)


def test_swiglu_gradients_finite_differences():
    rng = np.random.default_rng(5)
    g, u, R_ = rnd(rng, 3, 8, s=3.0), rnd(rng, 3, 8), rnd(rng, 3, 8)
    dg, du = K.swiglu_backward(R_, g, u)
    fd_check(lambda: np.sum(K.swiglu_forward(g, u) * R_), [g, u], [dg, du])


# -- attention ----------------------------------------------------------------------------------

def qkv(rng, B, Hq, Hkv, T, D, dtype):
    return (rnd(rng, B, Hq, T, D, dtype=dtype), rnd(rng, B, Hkv, T, D, dtype=dtype),
            rnd(rng, B, Hkv, T, D, dtype=dtype), rnd(rng, B, Hq, T, D, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_matches_reference(dtype):
    rng = np.random.default_rng(14)
    g, u, dh = (rnd(rng, 7, 13, dtype=dtype, s=3.0) for _ in range(3))
    close(K.geglu_forward(g, u), R.geglu_forward(g, u), dtype)
    for a, b in zip(K.geglu_backward(dh, g, u), R.geglu_backward(dh, g, u)):
        close(a, b, dtype)


def test_geglu_gradients_finite_differences():
    rng = np.random.default_rng(15)
    g, u, R_ = rnd(rng, 4, 5, s=2.0), rnd(rng, 4, 5), rnd(rng, 4, 5)
    dg, du = K.geglu_backward(R_, g, u)
    fd_check(lambda: np.sum(K.geglu_forward(g, u) * R_), [g, u], [dg, du])


def starts(B: int, T: int):
    """lo [B, T]: row 0 a sliding window of 3, row 1 three packed records (the last also windowed)."""
    seg = np.zeros((B, T), dtype=np.int64)
    seg[1, 5:] = 5
    seg[1, 12:] = 12
    lo = K.key_starts(B, T, 3, seg)
    lo[1, :12] = seg[1, :12]  # records 1 and 2 without the window
    return lo


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (4, 4)])
def test_attention_with_key_starts_matches_reference(dtype, Hq, Hkv):
    """Query t sees keys lo[b, t]..t (sliding window, packed records): flash and materialized
    against the reference, and each packed record equal to the record alone in its own row."""
    rng = np.random.default_rng(16)
    B, T, D = 2, 17, 8
    q, k, v, do = qkv(rng, B, Hq, Hkv, T, D, dtype)
    lo = starts(B, T)
    scale = 1.0 / np.sqrt(D)
    out, probs = K.attention_forward(q, k, v, scale, lo=lo)
    out_r, probs_r = R.attention_forward(q, k, v, scale, lo=lo)
    close(out, out_r, dtype)
    close(probs, probs_r, dtype)
    for a, b in zip(K.attention_backward(do, q, k, v, probs, scale, lo=lo),
                    R.attention_backward(do, q, k, v, probs, scale, lo=lo)):
        close(a, b, dtype)
    fout, lse = K.flash_attention_forward(q, k, v, scale, lo=lo)
    close(fout, out_r, dtype)
    close(lse, R.flash_attention_forward(q, k, v, scale, lo=lo)[1], dtype)
    for a, b in zip(K.flash_attention_backward(do, q, k, v, fout, lse, scale, lo=lo),
                    R.flash_attention_backward(do, q, k, v, fout, lse, scale, lo=lo)):
        close(a, b, dtype)
    # packed record 5..11 of row 1 == the same record alone (positions as given: RoPE is outside)
    sl = slice(5, 12)
    alone, _ = K.flash_attention_forward(q[1:, :, sl], k[1:, :, sl], v[1:, :, sl], scale)
    close(fout[1:, :, sl], alone, dtype)
    assert np.array_equal(K.flash_attention_forward(q, k, v, scale, lo=lo, block_q=1)[0], fout)


@pytest.mark.parametrize("flash", [False, True])
def test_attention_with_key_starts_gradients_finite_differences(flash):
    rng = np.random.default_rng(17)
    B, T, D = 2, 17, 3
    q, k, v, R_ = qkv(rng, B, 4, 2, T, D, np.float64)
    lo = starts(B, T)
    if flash:
        out, lse = K.flash_attention_forward(q, k, v, 0.7, block_q=2, lo=lo)
        grads = K.flash_attention_backward(R_, q, k, v, out, lse, 0.7, lo=lo)
        fwd = lambda: K.flash_attention_forward(q, k, v, 0.7, block_q=2, lo=lo)[0]  # noqa: E731
    else:
        out, probs = K.attention_forward(q, k, v, 0.7, lo=lo)
        grads = K.attention_backward(R_, q, k, v, probs, 0.7, lo=lo)
        fwd = lambda: K.attention_forward(q, k, v, 0.7, lo=lo)[0]  # noqa: E731
    fd_check(lambda: np.sum(fwd() * R_), [q, k, v], grads)


def test_key_starts_rejects_keys_a_query_cannot_have():
    q, k, v, _ = qkv(np.random.default_rng(1), 1, 2, 2, 4, 3, np.float64)
    for bad in ([[0, 2, 1, 1]], [[0, 0, 3, 3]], [[-1, 0, 0, 0]]):  # decreasing; past the diagonal; negative
        with pytest.raises(ValueError, match="lo must be"):
            K.flash_attention_forward(q, k, v, 1.0, lo=np.array(bad))
    assert K.key_starts(2, 4) is None
    assert K.key_starts(1, 4, window=2).tolist() == [[0, 0, 1, 2]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (4, 4)])
def test_attention_matches_reference(dtype, Hq, Hkv):
    rng = np.random.default_rng(6)
    B, T, D = 2, 37, 8  # T is not a multiple of the flash block (32)
    q, k, v, do = qkv(rng, B, Hq, Hkv, T, D, dtype)
    scale = 1.0 / np.sqrt(D)
    out, probs = K.attention_forward(q, k, v, scale)
    out_r, probs_r = R.attention_forward(q, k, v, scale)
    close(out, out_r, dtype)
    close(probs, probs_r, dtype)
    for a, b in zip(K.attention_backward(do, q, k, v, probs, scale), R.attention_backward(do, q, k, v, probs, scale)):
        close(a, b, dtype)
    fout, lse = K.flash_attention_forward(q, k, v, scale)
    fout_r, lse_r = R.flash_attention_forward(q, k, v, scale)
    close(fout, fout_r, dtype)
    close(lse, lse_r, dtype)
    close(fout, out, dtype)  # flash == materialized
    fgrads = K.flash_attention_backward(do, q, k, v, fout, lse, scale)
    for a, b, c in zip(fgrads, R.flash_attention_backward(do, q, k, v, fout, lse, scale),
                       K.attention_backward(do, q, k, v, probs, scale)):
        close(a, b, dtype)
        close(a, c, dtype)
    for bq in (1, 5, 64):  # other query blocks: identical rows
        assert np.array_equal(K.flash_attention_forward(q, k, v, scale, block_q=bq)[0], fout)


@pytest.mark.parametrize("D", [6, 64])
def test_flash_four_row_blocks_equal_single_rows(D):
    """The flash kernels take query rows four at a time (shared loads); a block of one row runs
    the single-row code (the decoder's), and every result is bit for bit the same, also for a
    head size that is not a multiple of 4."""
    rng = np.random.default_rng(9)
    q, k, v, do = qkv(rng, 1, 4, 2, 23, D, np.float32)
    scale = 1.0 / np.sqrt(D)
    out, lse = K.flash_attention_forward(q, k, v, scale)
    out1, lse1 = K.flash_attention_forward(q, k, v, scale, block_q=1)
    assert np.array_equal(out, out1) and np.array_equal(lse, lse1)
    for a, b in zip(K.flash_attention_backward(do, q, k, v, out, lse, scale),
                    R.flash_attention_backward(do, q, k, v, out, lse, scale)):
        close(a, b, np.float32)


@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (3, 3)])
@pytest.mark.parametrize("flash", [False, True])
def test_attention_gradients_finite_differences(Hq, Hkv, flash):
    rng = np.random.default_rng(7)
    B, T, D = 2, 5, 3
    q, k, v, R_ = qkv(rng, B, Hq, Hkv, T, D, np.float64)
    scale = 0.7
    if flash:
        out, lse = K.flash_attention_forward(q, k, v, scale, block_q=2)
        grads = K.flash_attention_backward(R_, q, k, v, out, lse, scale)
        fwd = lambda: K.flash_attention_forward(q, k, v, scale, block_q=2)[0]  # noqa: E731
    else:
        out, probs = K.attention_forward(q, k, v, scale)
        grads = K.attention_backward(R_, q, k, v, probs, scale)
        fwd = lambda: K.attention_forward(q, k, v, scale)[0]  # noqa: E731
    fd_check(lambda: np.sum(fwd() * R_), [q, k, v], grads)


def test_attention_is_causal_and_grouped():
    """Output row t ignores keys after t; query head h reads KV head h // G."""
    rng = np.random.default_rng(8)
    q, k, v, _ = qkv(rng, 1, 4, 2, 6, 3, np.float64)
    out, lse = K.flash_attention_forward(q, k, v, 0.5)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 4:], v2[:, :, 4:] = 9.0, -9.0  # change the future of rows 0..3
    k2[:, 1], v2[:, 1] = 5.0, 5.0  # change KV head 1 (read by query heads 2, 3)
    out2, _ = K.flash_attention_forward(q, k2, v2, 0.5)
    assert np.array_equal(out[:, :2, :4], out2[:, :2, :4])
    assert not np.allclose(out[:, :2, 4:], out2[:, :2, 4:]) and not np.allclose(out[:, 2:], out2[:, 2:])


# -- cross-entropy ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_xent_matches_reference(dtype):
    rng = np.random.default_rng(9)
    N, V = 13, 301
    logits = rnd(rng, N, V, dtype=dtype, s=4.0)
    logits[3] += 1000.0  # large offsets must not overflow
    targets = rng.integers(0, V, N).astype(np.int32)
    weights = rng.uniform(0.5, 2.0, N)
    weights[[0, 5]] = 0.0
    nll = K.xent_forward(logits, targets)
    assert nll.dtype == np.float64
    close(nll, R.xent_forward(logits, targets), np.float64, tol=1e-5 if dtype == np.float32 else 1e-13)
    a, b = logits.copy(), logits.copy()
    nll_a = K.xent_forward_backward(a, targets, weights, 0.1)
    nll_b = R.xent_forward_backward(b, targets, weights, 0.1)
    assert np.array_equal(nll_a, nll)  # same forward arithmetic
    close(nll_a, nll_b, np.float64, tol=1e-5 if dtype == np.float32 else 1e-13)
    close(a, b, dtype)
    assert np.all(a[[0, 5]] == 0.0)


def test_xent_gradient_finite_differences():
    rng = np.random.default_rng(10)
    N, V = 4, 7
    logits = rnd(rng, N, V, s=2.0)
    targets = rng.integers(0, V, N)
    weights = np.array([1.0, 0.0, 0.5, 2.0])
    inv_norm = 1.0 / 3.5
    d = logits.copy()
    K.xent_forward_backward(d, targets, weights, inv_norm)
    fd_check(lambda: float(np.dot(K.xent_forward(logits, targets), weights)) * inv_norm, [logits], [d])


def _xent_in_chunks(mod, logits, targets, weights, inv_norm, cols):
    """xent_stats over column chunks of ``cols``, then xent_grad per chunk: (nll, dlogits)."""
    N, V = logits.shape
    m = np.full(N, -np.inf, dtype=logits.dtype)
    tot, lt = np.zeros(N), np.zeros(N)
    for r0 in range(0, V, cols):
        mod.xent_stats(np.ascontiguousarray(logits[:, r0:r0 + cols]), r0, targets, m, tot, lt)
    d = np.empty_like(logits)
    for r0 in range(0, V, cols):
        chunk = logits[:, r0:r0 + cols].copy()  # (overwritten)
        mod.xent_grad(chunk, r0, targets, m, tot, weights, inv_norm)
        d[:, r0:r0 + cols] = chunk
    return np.log(tot) + m - lt, d


@pytest.mark.parametrize("dtype", DTYPES)
def test_xent_in_column_chunks_matches_whole_rows(dtype):
    """The streamed head's cross-entropy (running max and sum over chunks of the vocabulary, then
    each chunk's gradient) gives the whole rows' nll and gradient; numba as the numpy reference."""
    rng = np.random.default_rng(11)
    N, V = 13, 301
    logits = rnd(rng, N, V, dtype=dtype, s=4.0)
    logits[3] += 1000.0
    logits[4, 200:] += 30.0  # the row's max arrives in a late chunk: the sum is rescaled
    targets = rng.integers(0, V, N).astype(np.int32)
    weights = rng.uniform(0.5, 2.0, N)
    weights[[0, 5]] = 0.0
    whole = logits.copy()
    nll = K.xent_forward_backward(whole, targets, weights, 0.1)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for cols in (64, 301, 7):
        nll_k, d_k = _xent_in_chunks(K, logits, targets, weights, 0.1, cols)
        nll_r, d_r = _xent_in_chunks(R, logits, targets, weights, 0.1, cols)
        close(nll_k, nll, np.float64, tol=tol)
        close(nll_k, nll_r, np.float64, tol=tol)
        close(d_k, whole, dtype)
        close(d_k, d_r, dtype)
        assert np.all(d_k[[0, 5]] == 0.0)


def test_xent_rejects_bad_targets():
    with pytest.raises(ValueError, match="targets"):
        K.xent_forward(np.zeros((2, 5), np.float32), np.array([0, 5]))


# -- embeddings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_scatter_add(dtype):
    rng = np.random.default_rng(11)
    ids = np.array([3, 0, 3, 9, 3, 1])
    src = rnd(rng, 6, 5, dtype=dtype)
    a = rnd(rng, 10, 5, dtype=dtype)
    b = a.copy()
    K.embedding_scatter_add(a, ids, src)
    R.embedding_scatter_add(b, ids, src)
    close(a, b, dtype, tol=TOL[dtype] / 4)
    with pytest.raises(ValueError, match="ids"):
        K.embedding_scatter_add(a, np.array([0, 0, 0, 0, 0, 10]), src)


# -- determinism --------------------------------------------------------------------------------

def test_bitwise_deterministic_across_runs():
    rng = np.random.default_rng(12)
    dt = np.float32
    x, w = rnd(rng, 300, 200, dtype=dt), rnd(rng, 200, dtype=dt)
    q, k, v, do = qkv(rng, 2, 6, 2, 70, 16, dt)
    cos, sin = K.rope_cache(np.arange(70), 12, 10000.0, 1.0, dt)
    logits = rnd(rng, 40, 999, dtype=dt)
    targets = rng.integers(0, 999, 40)

    def run():
        res = []
        out, rstd = K.rmsnorm_forward(x, w, 1e-5)
        res += [out, rstd, *K.rmsnorm_backward(x, x, w, rstd)]
        res += [K.rope_forward(q.transpose(0, 2, 1, 3), cos, sin, 12), K.rope_backward(do, cos, sin, 12)]
        res += [K.swiglu_forward(x, x), *K.swiglu_backward(x, x, x)]
        o, p = K.attention_forward(q, k, v, 0.25)
        res += [o, p, *K.attention_backward(do, q, k, v, p, 0.25)]
        o, lse = K.flash_attention_forward(q, k, v, 0.25)
        res += [o, lse, *K.flash_attention_backward(do, q, k, v, o, lse, 0.25)]
        lg = logits.copy()
        res += [K.xent_forward_backward(lg, targets, np.ones(40), 0.5), lg]
        return [r.tobytes() for r in res]

    assert run() == run()


def test_flash_attention_does_not_depend_on_the_thread_count():
    """_split runs the flash kernels' work items on numba's thread count; every item writes its own
    slots with the same arithmetic, so one thread and all of them give the same bits."""
    import numba

    rng = np.random.default_rng(14)
    q, k, v, do = qkv(rng, 2, 6, 2, 45, 16, np.float32)
    lo = K.key_starts(2, 45, 9, np.repeat([[0] * 20 + [20] * 25], 2, axis=0))

    def run():
        o, lse = K.flash_attention_forward(q, k, v, 0.25, lo=lo)
        return [r.tobytes() for r in (o, lse, *K.flash_attention_backward(do, q, k, v, o, lse, 0.25, lo=lo))]

    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        assert run() == one
    finally:
        numba.set_num_threads(prev)


def test_split_covers_each_item_once_and_raises_a_helpers_error(monkeypatch):
    import threading

    import numba

    monkeypatch.setattr(numba, "get_num_threads", lambda: 3)
    seen, lock = [], threading.Lock()

    def kernel(tag, i0, i1):
        with lock:
            seen.extend(range(i0, i1))
        if tag == "fail" and i0 > 0:  # a helper thread's range
            raise ZeroDivisionError("in a helper")

    K._split(kernel, 10, "ok")
    assert sorted(seen) == list(range(10))
    seen.clear()
    K._split(kernel, 2, "ok")  # fewer items than threads: one per thread
    assert sorted(seen) == [0, 1]
    with pytest.raises(ZeroDivisionError, match="in a helper"):
        K._split(kernel, 10, "fail")
    seen.clear()
    K._split(kernel, 7, "ok")  # the helpers still work after an error
    assert sorted(seen) == list(range(7))
