"""Elementwise and reduction kernels of the training engine (numba), in the style of llm.c.

Each public function is a thin Python wrapper (shape checks, allocation, dtype of scalars) around
one or two ``@njit`` kernels.  Conventions:

* arrays are float32 or float64 (numba compiles one specialization per dtype); inputs are made
  C-contiguous, secondary arrays (weights, cos/sin, ...) are converted to the dtype of the main
  input, and outputs have that dtype;
* ``*_forward`` returns ``(out, cache)`` where backward needs something; ``*_backward(dout, ...)``
  returns the input gradients;
* every result is deterministic run to run: a ``prange`` iteration (or a work item of
  :func:`_split`) writes only its own output slots, and every sum has a fixed order;
* ``parallel=True`` only where it pays: the materialized attention's softmax, SwiGLU/GeGLU,
  cross-entropy and the output adapter's passes over the logits.  RMSNorm and RoPE are serial:
  they are memory-bound, take ~0.02-0.3 ms, waking numba's sleeping workers costs ~40 µs per
  call, and each parallel kernel adds ~0.5-2 s of first-run compilation per dtype;
* flash attention and the LoRA terms of the layers (their backward in fixed chunks of rows, their
  forward from :data:`LORA_PARALLEL_ROWS` rows on) run on several threads without
  ``parallel=True``: one serial ``nogil`` kernel per pass loops over a range of work items, and
  :func:`_split` runs equal ranges on ``numba.get_num_threads()`` threads (the split a ``prange``
  makes, the same arithmetic per item).  A ``prange`` over a per-item kernel's deep call tree cost
  twice the first-run compilation;
* the big products of the materialized attention are numpy batched matmuls (BLAS).

Shapes: N rows (tokens) of C channels, F = n_ff, B sequences of T tokens, Hq/Hkv query/KV heads
of size D (G = Hq // Hkv query heads share one KV head), V = n_vocab.

``kernels_ref.py`` holds slow, obviously-correct numpy versions with the same signatures;
``tests/test_engine_kernels.py`` checks one against the other and every backward against
finite differences.
"""

from __future__ import annotations

import queue
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

__all__ = [
    "rmsnorm_forward", "rmsnorm_backward",
    "rope_cache", "rope_forward", "rope_backward", "to_heads", "from_heads",
    "swiglu_forward", "swiglu_backward", "geglu_forward", "geglu_backward",
    "attention_forward", "attention_backward",
    "flash_attention_forward", "flash_attention_backward", "key_starts",
    "xent_forward_backward", "xent_forward",
    "embedding_scatter_add",
]

FLASH_BLOCK_Q = 32  # query rows per parallel work item of the flash forward
_DW_BLOCK = 64  # columns per pass of rmsnorm's weight gradient (float64 accumulators in cache)

_FLOATS = (np.float32, np.float64)


# -- helpers (Python) --------------------------------------------------------------------------

def _float_array(x, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    return x


def _like(a, dtype, shape, name: str) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype`` with exactly ``shape``."""
    a = np.ascontiguousarray(a, dtype=dtype)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")
    return a


def _out(out, shape, dtype, name: str = "out") -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array of shape {tuple(shape)}")
    return out


class _Helpers:
    """Threads that run ranges of :func:`_split`'s work items (started on first use, daemons, kept:
    starting threads on every call would cost more than the smaller kernels take)."""

    def __init__(self):
        self.lock = threading.Lock()  # one _split at a time uses the helpers (others run serially)
        self.todo: list = []  # one SimpleQueue per helper thread

    @staticmethod
    def _loop(todo) -> None:
        while True:
            kernel, args, done = todo.get()
            try:
                kernel(*args)
                done.put(None)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                done.put(e)

    def run(self, kernel, bounds: list[int], args: tuple) -> None:
        while len(self.todo) < len(bounds) - 2:
            q: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._loop, args=(q,), daemon=True, name="kernels").start()
            self.todo.append(q)
        done: queue.SimpleQueue = queue.SimpleQueue()  # this call's: an interrupted call leaves no stale result
        for i in range(1, len(bounds) - 1):
            self.todo[i - 1].put((kernel, (*args, bounds[i], bounds[i + 1]), done))
        err = None
        try:
            kernel(*args, bounds[0], bounds[1])
        finally:
            for _ in range(len(bounds) - 2):
                e = done.get()
                err = err or e
        if err is not None:
            raise err


_helpers = _Helpers()


def _split(kernel, n: int, *args) -> None:
    """``kernel(*args, i0, i1)`` over the work items 0..n-1 in ``numba.get_num_threads()`` equal
    contiguous ranges (numba's static prange schedule), the calling thread taking the first.

    For ``nogil`` kernels whose items write disjoint outputs: the same results as a ``prange`` over
    the items, without the compile cost of ``parallel=True`` (a parallel kernel optimizes everything
    it calls once more for its gufunc and again for its wrapper: ~40% of the flash kernels'
    first-run compilation, with their deep call trees).  Costs ~10-20 µs per call."""
    nt = max(1, min(int(numba.get_num_threads()), n))
    if nt == 1:
        kernel(*args, 0, n)
        return
    if not _helpers.lock.acquire(blocking=False):  # another thread's _split is running
        kernel(*args, 0, n)
        return
    try:
        _helpers.run(kernel, [n * i // nt for i in range(nt + 1)], args)
    finally:
        _helpers.lock.release()


# -- scalar helpers (compiled) ------------------------------------------------------------------

@intrinsic
def _pow2_biased(typingctx, v):
    """float32 v = 2^23 + 127 + n with integer n in [-126, 127] -> 2^n (float32).

    The low mantissa bits of v hold n + 127; shifting them into the exponent field builds 2^n
    with integer ops only (no float->int conversion, so a NaN v gives a number, not poison)."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        return builder.bitcast(builder.shl(bits, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(types.float32), codegen


_F = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _F(1.44269504088896341), _F(0.693359375), _F(-2.12194440e-4)
_EXP_LO, _EXP_HI = _F(-87.33654), _F(88.0)  # ln(FLT_MIN); 2^127 bound of the exponent trick
_BIAS = _F(8388608.0 + 127.0)
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
_ONE32, _HALF32, _ZERO32 = _F(1.0), _F(0.5), _F(0.0)


@njit(cache=True, fastmath=False)
def _expf32(x):  # pragma: no cover - compiled
    # float32 exp without a libm call, so loops over it vectorize (max error < 1 ulp measured
    # against float64 exp on [-87.3, 88]).  Cody-Waite reduction x = n·ln2 + r, Cephes' degree-6
    # polynomial for e^r, times 2^n.  Returns 0 below ln(FLT_MIN), e^88 above 88, NaN for NaN.
    xc = _EXP_LO if x < _EXP_LO else x
    xc = _EXP_HI if xc > _EXP_HI else xc
    n = np.floor(xc * _LOG2E + _HALF32)
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    y = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r + _ONE32
    y = y * _pow2_biased(n + _BIAS)
    return _ZERO32 if x < _EXP_LO else y


def _exp(x):
    """exp in the argument's precision: :func:`_expf32` for float32, libm exp for float64."""
    return np.exp(x)


@overload(_exp, jit_options={"cache": True})
def _exp_ol(x):
    if x == types.float32:
        return lambda x: _expf32(x)
    return lambda x: np.exp(x)


@njit(cache=True, fastmath=False)
def _max_n(x, n):  # pragma: no cover - compiled
    # max of x[:n] (n >= 1), four independent chains (max is exact, so order does not matter)
    m0 = m1 = m2 = m3 = x[0]
    n4 = n - n % 4
    for j in range(0, n4, 4):
        m0 = x[j] if x[j] > m0 else m0
        m1 = x[j + 1] if x[j + 1] > m1 else m1
        m2 = x[j + 2] if x[j + 2] > m2 else m2
        m3 = x[j + 3] if x[j + 3] > m3 else m3
    for j in range(n4, n):
        m0 = x[j] if x[j] > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    return m2 if m2 > m0 else m0


@njit(cache=True, fastmath=False)
def _exp_sub_sum(x, n, m):  # pragma: no cover - compiled
    # x[:n] := exp(x[:n] − m) in x's dtype; returns Σ in float64 (four partial sums in a fixed
    # order, so the result is deterministic)
    for j in range(n):
        x[j] = _exp(x[j] - m)
    s0 = s1 = s2 = s3 = 0.0
    n4 = n - n % 4
    for j in range(0, n4, 4):
        s0 += x[j]
        s1 += x[j + 1]
        s2 += x[j + 2]
        s3 += x[j + 3]
    for j in range(n4, n):
        s0 += x[j]
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, fastmath=False)
def _sum_exp_sub(x, n, m):  # pragma: no cover - compiled
    # Σ exp(x[:n] − m) without touching x: exps go through a small buffer in chunks of 512 so
    # the exp loop vectorizes; the four partial sums see every element in the same slot as in
    # _exp_sub_sum (512 % 4 == 0), so both return bitwise the same value.
    buf = np.empty(min(n, 512), dtype=x.dtype)
    s0 = s1 = s2 = s3 = 0.0
    for c0 in range(0, n, 512):
        c = min(512, n - c0)
        for j in range(c):
            buf[j] = _exp(x[c0 + j] - m)
        c4 = c - c % 4
        for j in range(0, c4, 4):
            s0 += buf[j]
            s1 += buf[j + 1]
            s2 += buf[j + 2]
            s3 += buf[j + 3]
        for j in range(c4, c):
            s0 += buf[j]
    return (s0 + s1) + (s2 + s3)


# == 1. RMSNorm ==================================================================================

@njit(cache=True, fastmath=False, inline="always")
def _sumsq64(xr, C):  # pragma: no cover - compiled
    # Σ_j xr[j]² (squares in the dtype) in float64, eight partial sums in a fixed order: the same
    # sum as one running total up to float64 rounding, and eight chains instead of one long one
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    C8 = C - C % 8
    for j in range(0, C8, 8):
        s0 += xr[j] * xr[j]
        s1 += xr[j + 1] * xr[j + 1]
        s2 += xr[j + 2] * xr[j + 2]
        s3 += xr[j + 3] * xr[j + 3]
        s4 += xr[j + 4] * xr[j + 4]
        s5 += xr[j + 5] * xr[j + 5]
        s6 += xr[j + 6] * xr[j + 6]
        s7 += xr[j + 7] * xr[j + 7]
    for j in range(C8, C):
        s0 += xr[j] * xr[j]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, fastmath=False, inline="always")
def _dot3_64(a, b, c, C):  # pragma: no cover - compiled
    # Σ_j a[j]·b[j]·c[j] in float64 (a promoted first), eight partial sums as in _sumsq64
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    C8 = C - C % 8
    for j in range(0, C8, 8):
        s0 += np.float64(a[j]) * b[j] * c[j]
        s1 += np.float64(a[j + 1]) * b[j + 1] * c[j + 1]
        s2 += np.float64(a[j + 2]) * b[j + 2] * c[j + 2]
        s3 += np.float64(a[j + 3]) * b[j + 3] * c[j + 3]
        s4 += np.float64(a[j + 4]) * b[j + 4] * c[j + 4]
        s5 += np.float64(a[j + 5]) * b[j + 5] * c[j + 5]
        s6 += np.float64(a[j + 6]) * b[j + 6] * c[j + 6]
        s7 += np.float64(a[j + 7]) * b[j + 7] * c[j + 7]
    for j in range(C8, C):
        s0 += np.float64(a[j]) * b[j] * c[j]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, fastmath=False)
def _rmsnorm_fwd(x, w, eps, one, out, rstd):  # pragma: no cover - compiled
    # x [N, C], w [C]; eps, one: scalars of x's dtype -> out [N, C], rstd [N]
    # As ggml_rms_norm: squares in the dtype, summed in float64, mean rounded to the dtype,
    # then rstd = 1/sqrt(mean + eps) and out = (x * rstd) * w, all in the dtype.
    N, C = x.shape
    for i in range(N):
        rstd[i] = _sumsq64(x[i], C) / C  # rounds the mean to the dtype
        r = one / np.sqrt(rstd[i] + eps)
        rstd[i] = r
        for j in range(C):
            out[i, j] = (x[i, j] * r) * w[j]


@njit(cache=True, fastmath=False)
def _rmsnorm_bwd_dx(dout, x, w, rstd, dx):  # pragma: no cover - compiled
    # dout, x [N, C], w [C], rstd [N] -> dx [N, C]
    # out = x·r·w with r = (mean(x²)+eps)^-1/2:  dx = r·w·dout − x·r³/C · Σ_k dout_k w_k x_k
    N, C = x.shape
    for i in range(N):
        r = np.float64(rstd[i])
        c = r * r * r * _dot3_64(dout[i], w, x[i], C) / C
        for j in range(C):
            dx[i, j] = r * w[j] * dout[i, j] - c * x[i, j]


@njit(cache=True, fastmath=False)
def _rmsnorm_bwd_dw(dout, x, rstd, bc, dw):  # pragma: no cover - compiled
    # dout, x [N, C], rstd [N] -> dw [C] = Σ_i dout[i]·x[i]·rstd[i]
    # blocks of bc columns (float64 accumulators stay in cache); rows summed in order.
    N, C = x.shape
    nb = (C + bc - 1) // bc
    for blk in range(nb):
        j0 = blk * bc
        j1 = min(C, j0 + bc)
        acc = np.zeros(j1 - j0, dtype=np.float64)
        for i in range(N):
            r = np.float64(rstd[i])
            for j in range(j0, j1):
                acc[j - j0] += np.float64(dout[i, j]) * (x[i, j] * r)
        for j in range(j0, j1):
            dw[j] = acc[j - j0]


def rmsnorm_forward(x, w, eps: float, out=None):
    """x [N, C], w [C] -> (out [N, C] = x·rstd·w, rstd [N] = 1/sqrt(mean(x²)+eps))."""
    x = _float_array(x, "x")
    N, C = x.shape
    w = _like(w, x.dtype, (C,), "w")
    out = _out(out, (N, C), x.dtype)
    rstd = np.empty(N, dtype=x.dtype)
    t = x.dtype.type
    _rmsnorm_fwd(x, w, t(eps), t(1), out, rstd)
    return out, rstd


def rmsnorm_backward(dout, x, w, rstd, need_dw: bool = True):
    """dout [N, C], x [N, C], w [C], rstd [N] -> (dx [N, C], dw [C]); dw is None when not
    ``need_dw`` (the norm weight is not adapted: its gradient is a reduction over all N rows)."""
    x = _float_array(x, "x")
    N, C = x.shape
    dout = _like(dout, x.dtype, (N, C), "dout")
    w = _like(w, x.dtype, (C,), "w")
    rstd = _like(rstd, x.dtype, (N,), "rstd")
    dx = np.empty_like(x)
    _rmsnorm_bwd_dx(dout, x, w, rstd, dx)
    if not need_dw:
        return dx, None
    dw = np.empty(C, dtype=x.dtype)
    _rmsnorm_bwd_dw(dout, x, rstd, _DW_BLOCK, dw)
    return dx, dw


# == 2. RoPE (normal: adjacent pairs; NeoX: pairs i, i + n_rot/2) and head-major transposes ======

@njit(cache=True, fastmath=False)
def _rope_tables(pos, half, theta_scale, freq_scale, ff, mscale, zero, cos, sin):  # pragma: no cover - compiled
    # pos [P] int; theta_scale, freq_scale, mscale: float32; ff [half] float32 frequency factors;
    # zero: 0 of the output dtype -> cos, sin [P, half].  As ggml_rope_cache_init with ext_factor 0:
    # theta starts at float(p) and is multiplied by theta_scale once per pair, in float32;
    # freq_scale·(theta / ff_i) (float32) goes into cos/sin, evaluated in the output dtype (libm
    # cosf/sinf for float32), then times mscale (the attention factor).
    P = pos.shape[0]
    for t in range(P):
        theta = np.float32(pos[t])
        for i in range(half):
            th = zero + freq_scale * (theta / ff[i])
            cos[t, i] = np.cos(th) * mscale
            sin[t, i] = np.sin(th) * mscale
            theta = theta * theta_scale


@njit(cache=True, fastmath=False)
def _powf(a, b):  # pragma: no cover - compiled; float32 in, libm powf
    return np.power(a, b)


def rope_cache(pos, n_rot: int, freq_base: float, freq_scale: float, dtype=np.float32, freq_factors=None,
               mscale: float = 1.0):
    """pos [T] (or [B, T]) int -> (cos, sin) [T, n_rot//2] (or [B, T, n_rot//2]) for ggml's rope with
    ext_factor 0.

    theta_i(p) = freq_scale · p · freq_base^(-2i/n_rot) / freq_factors[i], built as ggml does in
    float32 (theta_scale = powf(base, -2/n_rot), theta *= theta_scale); cos/sin in ``dtype``, times
    ``mscale``.  A table row per position, so rows of a batch may restart their positions (packing).
    """
    if n_rot <= 0 or n_rot % 2:
        raise ValueError(f"n_rot must be a positive even number, got {n_rot}")
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    if pos.ndim not in (1, 2):
        raise ValueError(f"pos must be 1-D or 2-D, got shape {pos.shape}")
    dtype = np.dtype(dtype)
    if dtype not in _FLOATS:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    f32 = np.float32
    theta_scale = f32(_powf(f32(freq_base), f32(-2.0) / f32(n_rot)))
    half = n_rot // 2
    ff = np.ones(half, np.float32) if freq_factors is None else np.ascontiguousarray(freq_factors, np.float32)
    if ff.shape != (half,):
        raise ValueError(f"freq_factors has shape {ff.shape}, expected ({half},)")
    flat = pos.reshape(-1)
    cos = np.empty((flat.shape[0], half), dtype=dtype)
    sin = np.empty((flat.shape[0], half), dtype=dtype)
    _rope_tables(flat, half, theta_scale, f32(freq_scale), ff, dtype.type(mscale), dtype.type(0), cos, sin)
    return cos.reshape(pos.shape + (half,)), sin.reshape(pos.shape + (half,))


@njit(cache=True, fastmath=False)
def _rope_fwd(x, cos, sin, n_rot, neox, out):  # pragma: no cover - compiled
    # x [B, T, H, D], cos/sin [Bc, T, n_rot/2] (Bc = 1: shared by the rows) -> out [B, H, T, D]
    # normal: (x0, x1) = (x[2i], x[2i+1]); NeoX: (x[i], x[i + n_rot/2]); each pair ->
    # (x0·c − x1·s, x0·s + x1·c); dims >= n_rot are copied
    B, T, H, D = x.shape
    half = n_rot // 2
    for b in range(B):
        cb = cos[b if cos.shape[0] > 1 else 0]
        sb = sin[b if sin.shape[0] > 1 else 0]
        for h in range(H):
            for t in range(T):
                if neox:
                    for i in range(half):
                        c = cb[t, i]
                        s = sb[t, i]
                        x0 = x[b, t, h, i]
                        x1 = x[b, t, h, i + half]
                        out[b, h, t, i] = x0 * c - x1 * s
                        out[b, h, t, i + half] = x0 * s + x1 * c
                else:
                    for i in range(half):
                        c = cb[t, i]
                        s = sb[t, i]
                        x0 = x[b, t, h, 2 * i]
                        x1 = x[b, t, h, 2 * i + 1]
                        out[b, h, t, 2 * i] = x0 * c - x1 * s
                        out[b, h, t, 2 * i + 1] = x0 * s + x1 * c
                for d in range(n_rot, D):
                    out[b, h, t, d] = x[b, t, h, d]


@njit(cache=True, fastmath=False)
def _rope_bwd(dout, cos, sin, n_rot, neox, dx):  # pragma: no cover - compiled
    # dout [B, H, T, D], cos/sin [Bc, T, n_rot/2] -> dx [B, T, H, D]: the inverse (transposed) rotation
    B, H, T, D = dout.shape
    half = n_rot // 2
    for b in range(B):
        cb = cos[b if cos.shape[0] > 1 else 0]
        sb = sin[b if sin.shape[0] > 1 else 0]
        for t in range(T):
            for h in range(H):
                if neox:
                    for i in range(half):
                        c = cb[t, i]
                        s = sb[t, i]
                        d0 = dout[b, h, t, i]
                        d1 = dout[b, h, t, i + half]
                        dx[b, t, h, i] = d0 * c + d1 * s
                        dx[b, t, h, i + half] = d1 * c - d0 * s
                else:
                    for i in range(half):
                        c = cb[t, i]
                        s = sb[t, i]
                        d0 = dout[b, h, t, 2 * i]
                        d1 = dout[b, h, t, 2 * i + 1]
                        dx[b, t, h, 2 * i] = d0 * c + d1 * s
                        dx[b, t, h, 2 * i + 1] = d1 * c - d0 * s
                for d in range(n_rot, D):
                    dx[b, t, h, d] = dout[b, h, t, d]


def _rope_args(x, cos, sin, n_rot, B, T):
    half = n_rot // 2
    if n_rot <= 0 or n_rot % 2 or n_rot > x.shape[3]:
        raise ValueError(f"n_rot must be even and in 1..{x.shape[3]}, got {n_rot}")
    cos, sin = np.asarray(cos), np.asarray(sin)
    rows = cos.shape[0] if cos.ndim == 3 else 1
    if rows not in (1, B):
        raise ValueError(f"cos has {rows} rows of positions, expected 1 or {B}")
    cos = _like(cos.reshape(rows, *cos.shape[-2:]), x.dtype, (rows, T, half), "cos")
    sin = _like(sin.reshape(rows, *sin.shape[-2:]), x.dtype, (rows, T, half), "sin")
    return cos, sin


def rope_forward(x, cos, sin, n_rot: int, out=None, neox: bool = False):
    """x [B, T, H, D] -> out [B, H, T, D]: rotate the first n_rot dims in pairs (adjacent, or
    (i, i + n_rot/2) with ``neox``), head-major.  cos/sin [T, n_rot/2], or [B, T, n_rot/2] with a
    table per row."""
    x = _float_array(x, "x")
    B, T, H, D = x.shape
    cos, sin = _rope_args(x, cos, sin, n_rot, B, T)
    out = _out(out, (B, H, T, D), x.dtype)
    _rope_fwd(x, cos, sin, n_rot, bool(neox), out)
    return out


def rope_backward(dout, cos, sin, n_rot: int, neox: bool = False):
    """dout [B, H, T, D] -> dx [B, T, H, D] (inverse rotation and transpose back)."""
    dout = _float_array(dout, "dout")
    B, H, T, D = dout.shape
    cos, sin = _rope_args(dout, cos, sin, n_rot, B, T)
    dx = np.empty((B, T, H, D), dtype=dout.dtype)
    _rope_bwd(dout, cos, sin, n_rot, bool(neox), dx)
    return dx


def to_heads(x, out=None):
    """x [B, T, H, D] -> contiguous [B, H, T, D] (numpy copy; memory-bound)."""
    x = _float_array(x, "x")
    B, T, H, D = x.shape
    out = _out(out, (B, H, T, D), x.dtype)
    np.copyto(out, x.transpose(0, 2, 1, 3))
    return out


def from_heads(x, out=None):
    """x [B, H, T, D] -> contiguous [B, T, H, D] (numpy copy; memory-bound)."""
    x = _float_array(x, "x")
    B, H, T, D = x.shape
    out = _out(out, (B, T, H, D), x.dtype)
    np.copyto(out, x.transpose(0, 2, 1, 3))
    return out


# == 2b. LoRA low-rank update =====================================================================

LORA_ADD_PARALLEL = 1 << 20  # lora_add uses both threads from this many elements of y (logit chunks)


@njit(cache=True, fastmath={"contract"}, inline="always")
def _lora_add_row(yr, us, n, s, bT):  # pragma: no cover - compiled
    # yr [n_out] += Σ_k s·us[n, k]·bT[k], four ranks per pass: one load and one store of y per
    # four products (the pass over y is the whole cost: y is the big operand, r a few columns)
    r = us.shape[1]
    m = yr.shape[0]
    k = 0
    while k + 4 <= r:
        c0, c1, c2, c3 = s * us[n, k], s * us[n, k + 1], s * us[n, k + 2], s * us[n, k + 3]
        b0, b1, b2, b3 = bT[k], bT[k + 1], bT[k + 2], bT[k + 3]
        for j in range(m):
            yr[j] += ((c0 * b0[j] + c1 * b1[j]) + c2 * b2[j]) + c3 * b3[j]
        k += 4
    while k < r:
        c0 = s * us[n, k]
        b0 = bT[k]
        for j in range(m):
            yr[j] += c0 * b0[j]
        k += 1


@njit(cache=True, fastmath={"contract"})
def _lora_add(y, us, bT):  # pragma: no cover - compiled
    # y [N, n_out] += us [N, r] · bT [r, n_out], one pass over y, on the calling thread
    one = y.dtype.type(1)
    for n in range(y.shape[0]):
        _lora_add_row(y[n], us, n, one, bT)


@njit(cache=True, parallel=True, fastmath={"contract"})
def _lora_add_par(y, us, bT):  # pragma: no cover - compiled
    # _lora_add with rows in parallel, for a y of millions of elements (the logits)
    one = y.dtype.type(1)
    for n in prange(y.shape[0]):
        _lora_add_row(y[n], us, n, one, bT)


@njit(cache=True, fastmath={"contract", "reassoc"}, inline="always")
def _lora_u_row(x, n, aT, u):  # pragma: no cover - compiled
    # u[n] = x[n]·a, four ranks per pass over x[n]: the same code wherever u is computed (forward,
    # or its recomputation), bit for bit
    xr = x[n]
    r = aT.shape[0]
    m = xr.shape[0]
    zero = x.dtype.type(0)
    k = 0
    while k + 4 <= r:
        a0, a1, a2, a3 = aT[k], aT[k + 1], aT[k + 2], aT[k + 3]
        s0 = s1 = s2 = s3 = zero
        for i in range(m):
            xi = xr[i]
            s0 += xi * a0[i]
            s1 += xi * a1[i]
            s2 += xi * a2[i]
            s3 += xi * a3[i]
        u[n, k], u[n, k + 1], u[n, k + 2], u[n, k + 3] = s0, s1, s2, s3
        k += 4
    while k < r:
        a0 = aT[k]
        s0 = zero
        for i in range(m):
            s0 += xr[i] * a0[i]
        u[n, k] = s0
        k += 1


LORA_PARALLEL_ROWS = 512  # lora_forward and lora_u split the rows among threads from this many on: a
# step of packed rows (0.3-0.7 ms a call, memory-bound); below, the hand-off costs about what it saves


@njit(cache=True, nogil=True, fastmath={"contract", "reassoc"})
def _lora_fwd(x, aT, bT, s, y, u, n0, n1):  # pragma: no cover - compiled
    # x [N, n_in], aT [r, n_in], bT [r, n_out]: rows n0..n1-1 of u = x·a [N, r] and y [N, n_out] +=
    # s·u·bᵀ.  Rows are independent, so both products run in one pass per row with no BLAS call and
    # no temporary, and a range of rows is a work item of _split (serial nogil: no parallel=True
    # compile), each row's arithmetic the same whatever the split.
    for n in range(n0, n1):
        _lora_u_row(x, n, aT, u)
        _lora_add_row(y[n], u, n, s, bT)


@njit(cache=True, nogil=True, fastmath={"contract", "reassoc"})
def _lora_u(x, aT, u, n0, n1):  # pragma: no cover - compiled
    for n in range(n0, n1):
        _lora_u_row(x, n, aT, u)


def _rows(kernel, N: int, *args) -> None:
    """``kernel(*args, n0, n1)`` over rows 0..N-1: split among threads from LORA_PARALLEL_ROWS rows."""
    if N >= LORA_PARALLEL_ROWS:
        _split(kernel, N, *args)
    else:
        kernel(*args, 0, N)


def lora_u(x, a):
    """u = x·a [N, r] exactly as :func:`lora_forward` computes it (x [N, n_in], a [n_in, r]): what the
    backward of an adapted linear needs when its output is not (recomputation under checkpointing)."""
    if x.ndim != 2 or a.ndim != 2 or a.shape[0] != x.shape[1] or a.dtype != x.dtype:
        raise ValueError(f"lora_u: x {x.shape} {x.dtype}, a {a.shape} {a.dtype} do not fit")
    u = np.empty((x.shape[0], a.shape[1]), dtype=x.dtype)
    _rows(_lora_u, x.shape[0], np.ascontiguousarray(x), np.ascontiguousarray(a.T), u)
    return u


def lora_forward(x, a, b, s: float, y):
    """The adapter's term of a linear: u = x·a ([N, r]) and y += s·u·bᵀ in place; returns u.

    x [N, n_in], a [n_in, r], b [n_out, r], y [N, n_out].  Also the backward's dx term:
    ``dyb = lora_forward(dy, b, a, s, dx)`` gives dy·b and adds s·(dy·b)·aᵀ to dx.
    """
    if x.ndim != 2 or a.shape[0] != x.shape[1] or b.shape[1] != a.shape[1] or y.shape != (x.shape[0], b.shape[0]):
        raise ValueError(f"lora_forward: x {x.shape}, a {a.shape}, b {b.shape}, y {y.shape} do not fit")
    if not (x.dtype == a.dtype == b.dtype == y.dtype):
        raise ValueError("lora_forward: x, a, b and y must have the same dtype")
    u = np.empty((x.shape[0], a.shape[1]), dtype=x.dtype)
    _rows(_lora_fwd, x.shape[0], np.ascontiguousarray(x), np.ascontiguousarray(a.T), np.ascontiguousarray(b.T),
          x.dtype.type(s), y, u)
    return u


LORA_ROWS = 64  # rows per work item of lora_backward: a fixed split, so sums do not depend on threads


@njit(cache=True, fastmath={"contract", "reassoc"}, inline="always")
def _outer_rows(acc, w, n, nb, X):  # pragma: no cover - compiled
    # acc [r, m] += Σ_{i < nb} w[n + i]ᵀ·X[n + i] (w [N, r], X [N, m], nb of 1..4 rows): four rows per
    # pass over acc, so each accumulator is loaded and stored once per four rows
    r = acc.shape[0]
    m = acc.shape[1]
    zero = acc.dtype.type(0)
    x0 = X[n]
    x1 = X[n + min(1, nb - 1)]  # rows past the last one repeat it with weight 0
    x2 = X[n + min(2, nb - 1)]
    x3 = X[n + min(3, nb - 1)]
    for k in range(r):
        w0 = w[n, k]
        w1 = w[n + 1, k] if nb > 1 else zero
        w2 = w[n + 2, k] if nb > 2 else zero
        w3 = w[n + 3, k] if nb > 3 else zero
        ak = acc[k]
        for j in range(m):
            ak[j] += w0 * x0[j] + w1 * x1[j] + w2 * x2[j] + w3 * x3[j]


@njit(cache=True, nogil=True, fastmath={"contract", "reassoc"})
def _lora_bwd(dy, x, u, aT, bT, s, with_dx, dx, dyb, dbp, dap, c0, c1):  # pragma: no cover - compiled
    # dy [N, n_out], x [N, n_in], u [N, r] (= x·a), aT [r, n_in], bT [r, n_out] ->
    #   dyb [N, r] = dy·b;  dx [N, n_in] += s·dyb·aᵀ (if with_dx);
    #   per chunk c of LORA_ROWS rows: dbp[c] [r, n_out] = Σ uᵀ·dy,  dap[c] [r, n_in] = Σ dybᵀ·x.
    # Chunks c0..c1-1: a range of chunks is a work item of _split.  Within a chunk, rows four at a
    # time: dy's rows are read from memory once (for dy·b, then again from cache for the b
    # gradient), x's and dx's once.
    N = dy.shape[0]
    for c in range(c0, c1):
        n0 = c * LORA_ROWS
        n1 = min(N, n0 + LORA_ROWS)
        db = dbp[c]
        da = dap[c]
        db[:, :] = 0
        da[:, :] = 0
        n = n0
        while n < n1:
            nb = min(4, n1 - n)
            for i in range(n, n + nb):
                _lora_u_row(dy, i, bT, dyb)
                if with_dx:
                    _lora_add_row(dx[i], dyb, i, s, aT)
            _outer_rows(db, u, n, nb, dy)
            _outer_rows(da, dyb, n, nb, x)
            n += nb


def lora_backward(dy, x, u, a, b, s: float, dx, da, db) -> None:
    """The adapter's backward of y = x·Wᵀ + s·(x·a)·bᵀ, fused: dx [N, n_in] += s·(dy·b)·aᵀ (dx None:
    not wanted), and the gradients da [n_in, r] += s·xᵀ·(dy·b), db [n_out, r] += s·dyᵀ·u, all in
    place (u = x·a [N, r]).

    As three numpy products these would read dy twice and write a temporary of dx's size, on one
    thread at r of a few columns; here they are one pass over dy, x and dx in fixed chunks of rows
    (:data:`LORA_ROWS`) on several threads (:func:`_split`), whose partial sums are then added in
    chunk order.
    """
    N, n_out = dy.shape
    n_in, r = a.shape
    with_dx = dx is not None
    if not with_dx:
        dx = np.empty((0, n_in), dtype=dy.dtype)
    if x.shape != (N, n_in) or u.shape != (N, r) or b.shape != (n_out, r) or dx.shape != (N if with_dx else 0, n_in) \
            or da.shape != a.shape or db.shape != b.shape:
        raise ValueError(f"lora_backward: dy {dy.shape}, x {x.shape}, u {u.shape}, a {a.shape}, b {b.shape}, "
                         f"dx {dx.shape} do not fit")
    if not (dy.dtype == x.dtype == u.dtype == a.dtype == b.dtype == dx.dtype):
        raise ValueError("lora_backward: dy, x, u, a, b and dx must have the same dtype")
    if not dx.flags.c_contiguous:
        raise ValueError("lora_backward: dx must be C-contiguous (it is updated in place)")
    n_chunks = max(1, -(-N // LORA_ROWS))
    dbp = np.empty((n_chunks, r, n_out), dtype=dy.dtype)
    dap = np.empty((n_chunks, r, n_in), dtype=dy.dtype)
    dyb = np.empty((N, r), dtype=dy.dtype)
    c = np.ascontiguousarray
    _split(_lora_bwd, n_chunks, c(dy), c(x), c(u), c(a.T), c(b.T), dy.dtype.type(s), with_dx, dx, dyb, dbp, dap)
    dbT = np.empty((r, n_out), dtype=dy.dtype)
    daT = np.empty((r, n_in), dtype=dy.dtype)
    _sum_parts(dbp, dbT)
    _sum_parts(dap, daT)
    db += s * dbT.T
    da += s * daT.T


def lora_add(y, us, b) -> None:
    """y [N, n_out] += us [N, r] · b [n_out, r]ᵀ in place (the adapter's term s·(x·a)·bᵀ, with us = s·x·a).

    numpy's ``y += us @ b.T`` writes a temporary of y's size and reads it back; with r of a few
    columns that memory traffic is the whole cost, ~4x more than this single pass.  ``y`` may be a
    strided view (a column chunk of the logits).
    """
    if y.ndim != 2 or us.shape != (y.shape[0], b.shape[1]) or b.shape[0] != y.shape[1]:
        raise ValueError(f"lora_add: y {y.shape}, us {us.shape}, b {b.shape} do not fit")
    if us.dtype != y.dtype or b.dtype != y.dtype:
        raise ValueError("lora_add: y, us and b must have the same dtype")
    kernel = _lora_add_par if y.size >= LORA_ADD_PARALLEL else _lora_add
    kernel(y, np.ascontiguousarray(us), np.ascontiguousarray(b.T))


LORA_COLS = 1024  # columns per work item of lora_wide_backward: a fixed split, so sums do not depend on threads


@njit(cache=True, parallel=True, fastmath={"contract", "reassoc"})
def _lora_wide_bwd(dy, u, bT, s, dbT, dyb_part):  # pragma: no cover - compiled
    # dy [N, n_out], u [N, r], bT [r, n_out] -> dbT [r, n_out] = s·uᵀ·dy; dyb_part[c] [N, r] = the
    # columns of chunk c of dy·b.  One read of dy, column chunks in parallel, rows four at a time
    # (each pass over a chunk's accumulators takes four rows of dy).
    N, n_out = dy.shape
    r = u.shape[1]
    zero = dy.dtype.type(0)
    for c in prange(dyb_part.shape[0]):
        j0 = c * LORA_COLS
        m = min(n_out, j0 + LORA_COLS) - j0
        acc = np.zeros((r, m), dtype=dy.dtype)  # [r, m] this chunk's uᵀ·dy (dbᵀ before the scale s)
        n = 0
        while n < N:
            nb = min(4, N - n)
            y0 = dy[n, j0:j0 + m]
            y1 = dy[n + min(1, nb - 1), j0:j0 + m]  # rows past the last one repeat it with weight 0
            y2 = dy[n + min(2, nb - 1), j0:j0 + m]
            y3 = dy[n + min(3, nb - 1), j0:j0 + m]
            for k in range(r):
                w0 = u[n, k]
                w1 = u[n + 1, k] if nb > 1 else zero
                w2 = u[n + 2, k] if nb > 2 else zero
                w3 = u[n + 3, k] if nb > 3 else zero
                ak = acc[k]
                bk = bT[k, j0:j0 + m]
                d0 = zero
                d1 = zero
                d2 = zero
                d3 = zero
                for j in range(m):
                    x0, x1, x2, x3 = y0[j], y1[j], y2[j], y3[j]
                    ak[j] += w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
                    bj = bk[j]
                    d0 += x0 * bj
                    d1 += x1 * bj
                    d2 += x2 * bj
                    d3 += x3 * bj
                dyb_part[c, n, k] = d0
                if nb > 1:
                    dyb_part[c, n + 1, k] = d1
                if nb > 2:
                    dyb_part[c, n + 2, k] = d2
                if nb > 3:
                    dyb_part[c, n + 3, k] = d3
            n += nb
        for k in range(r):
            for j in range(m):
                dbT[k, j0 + j] = s * acc[k, j]


@njit(cache=True)
def _sum_parts(parts, out):  # pragma: no cover - compiled
    # out [N, r] = Σ_c parts[c], chunks in order
    for n in range(out.shape[0]):
        for k in range(out.shape[1]):
            acc = parts[0, n, k]
            for c in range(1, parts.shape[0]):
                acc += parts[c, n, k]
            out[n, k] = acc


def lora_wide_backward(dy, u, b, s: float, db):
    """Part of the adapter's backward for a wide output (the vocabulary): db [n_out, r] += s·dyᵀ·u in
    place, and returns dy·b [N, r].  One pass over dy [N, n_out] (u [N, r] = x·a, b [n_out, r]).

    numpy's ``dy.T @ u`` reads the logits' gradient transposed (~17 ms on [256, 49152]), ``dy @ b``
    reads it again (~3 ms); this reads it once, in column chunks.
    """
    N, n_out = dy.shape
    r = u.shape[1]
    if u.shape[0] != N or b.shape != (n_out, r) or db.shape != (n_out, r):
        raise ValueError(f"lora_wide_backward: dy {dy.shape}, u {u.shape}, b {b.shape}, db {db.shape} do not fit")
    if not (dy.dtype == u.dtype == b.dtype == db.dtype):
        raise ValueError("lora_wide_backward: dy, u, b and db must have the same dtype")
    n_chunks = max(1, -(-n_out // LORA_COLS))
    dbT = np.empty((r, n_out), dtype=dy.dtype)
    parts = np.empty((n_chunks, N, r), dtype=dy.dtype)
    _lora_wide_bwd(np.ascontiguousarray(dy), np.ascontiguousarray(u), np.ascontiguousarray(b.T), dy.dtype.type(s),
                   dbT, parts)
    db += dbT.T
    dyb = np.empty((N, r), dtype=dy.dtype)
    _sum_parts(parts, dyb)
    return dyb


# == 3. SwiGLU ===================================================================================

@njit(cache=True, parallel=True, fastmath=False)
def _swiglu_fwd(g, u, one, h):  # pragma: no cover - compiled
    # g, u [N, F] -> h [N, F] = silu(g)·u, silu(g) = g/(1+exp(-g)) in the dtype (as ggml_silu_f32,
    # with the vectorizable _exp instead of libm expf for float32)
    N, F = g.shape
    for i in prange(N):
        for j in range(F):
            x = g[i, j]
            h[i, j] = (x / (one + _exp(-x))) * u[i, j]


@njit(cache=True, parallel=True, fastmath=False)
def _swiglu_bwd(dh, g, u, one, dg, du):  # pragma: no cover - compiled
    # dh, g, u [N, F] -> dg, du [N, F]
    # σ = 1/(1+e^-g): du = dh·g·σ, dg = dh·u·σ·(1 + g·(1−σ))
    N, F = g.shape
    for i in prange(N):
        for j in range(F):
            x = g[i, j]
            sg = one / (one + _exp(-x))
            d = dh[i, j]
            du[i, j] = d * (x * sg)
            dg[i, j] = d * u[i, j] * (sg * (one + x * (one - sg)))


def swiglu_forward(g, u, out=None):
    """g, u [N, F] -> h [N, F] = silu(g)·u."""
    g = _float_array(g, "g")
    u = _like(u, g.dtype, g.shape, "u")
    h = _out(out, g.shape, g.dtype)
    _swiglu_fwd(g.reshape(g.shape[0], -1), u.reshape(g.shape[0], -1), g.dtype.type(1), h.reshape(g.shape[0], -1))
    return h


def swiglu_backward(dh, g, u):
    """dh, g, u [N, F] -> (dg, du) [N, F]."""
    g = _float_array(g, "g")
    u = _like(u, g.dtype, g.shape, "u")
    dh = _like(dh, g.dtype, g.shape, "dh")
    dg = np.empty_like(g)
    du = np.empty_like(g)
    n = g.shape[0]
    _swiglu_bwd(dh.reshape(n, -1), g.reshape(n, -1), u.reshape(n, -1), g.dtype.type(1),
                dg.reshape(n, -1), du.reshape(n, -1))
    return dg, du


# == 3b. GeGLU (gelu_tanh(gate) · up, Gemma) =====================================================

_GELU_C = 0.7978845608028654  # sqrt(2/pi)
_GELU_A = 0.044715


@njit(cache=True, parallel=True, fastmath=False)
def _geglu_fwd(g, u, c, a, half, one, h):  # pragma: no cover - compiled
    # g, u [N, F] -> h [N, F] = gelu(g)·u, gelu(x) = ½x(1 + tanh(c·(x + a·x³))) in the dtype, with
    # tanh(z) = 1 − 2/(e^2z + 1) through the vectorizable _exp (libm tanhf does not vectorize)
    N, F = g.shape
    two = one + one
    for i in prange(N):
        for j in range(F):
            x = g[i, j]
            z = c * (x + a * x * x * x)
            t = one - two / (_exp(z + z) + one)
            h[i, j] = (half * x * (one + t)) * u[i, j]


@njit(cache=True, parallel=True, fastmath=False)
def _geglu_bwd(dh, g, u, c, a, a3, half, one, dg, du):  # pragma: no cover - compiled
    # dh, g, u [N, F] -> dg, du [N, F]; with t = tanh(c·(x + a·x³)):
    # gelu = ½x(1 + t), gelu' = ½(1 + t) + ½x(1 − t²)·c·(1 + a3·x²), a3 = 3a
    N, F = g.shape
    two = one + one
    for i in prange(N):
        for j in range(F):
            x = g[i, j]
            z = c * (x + a * x * x * x)
            t = one - two / (_exp(z + z) + one)  # tanh(z), as in _geglu_fwd
            d = dh[i, j]
            du[i, j] = d * (half * x * (one + t))
            dg[i, j] = d * u[i, j] * (half * (one + t) + half * x * (one - t * t) * c * (one + a3 * x * x))


def geglu_forward(g, u, out=None):
    """g, u [N, F] -> h [N, F] = gelu_tanh(g)·u (Gemma's feed-forward; llama.cpp's GELU is a float16
    table of the same function)."""
    g = _float_array(g, "g")
    u = _like(u, g.dtype, g.shape, "u")
    h = _out(out, g.shape, g.dtype)
    t = g.dtype.type
    n = g.shape[0]
    _geglu_fwd(g.reshape(n, -1), u.reshape(n, -1), t(_GELU_C), t(_GELU_A), t(0.5), t(1), h.reshape(n, -1))
    return h


def geglu_backward(dh, g, u):
    """dh, g, u [N, F] -> (dg, du) [N, F]."""
    g = _float_array(g, "g")
    u = _like(u, g.dtype, g.shape, "u")
    dh = _like(dh, g.dtype, g.shape, "dh")
    dg = np.empty_like(g)
    du = np.empty_like(g)
    t = g.dtype.type
    n = g.shape[0]
    _geglu_bwd(dh.reshape(n, -1), g.reshape(n, -1), u.reshape(n, -1), t(_GELU_C), t(_GELU_A), t(3 * _GELU_A),
               t(0.5), t(1), dg.reshape(n, -1), du.reshape(n, -1))
    return dg, du


# == 4. causal attention with GQA, head-major ======================================================

def _attn_shapes(q, k, v):
    q = _float_array(q, "q")
    B, Hq, T, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[2:] != (T, D) or k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"k has shape {k.shape}, expected [B={B}, Hkv dividing {Hq}, T={T}, D={D}]")
    Hkv = k.shape[1]
    k = _like(k, q.dtype, (B, Hkv, T, D), "k")
    v = _like(v, q.dtype, (B, Hkv, T, D), "v")
    return q, k, v, B, Hq, Hkv, T, D


@njit(cache=True, parallel=True, fastmath=False)
def _causal_softmax(s, T, rows_per_b, lo, scale):  # pragma: no cover - compiled
    # s [R, T] raw scores q·k; row r has query position t = r % T in batch row b = r // rows_per_b,
    # which sees keys lo[b, t]..t; scale of s's dtype -> in place: p_j = exp(scale·s_j − m) / Σ over
    # those keys (exp in the dtype, Σ in float64), 0 elsewhere
    R = s.shape[0]
    for r in prange(R):
        t = r % T
        j0 = lo[r // rows_per_b, t]
        n = t + 1
        row = s[r]
        for j in range(j0, n):
            row[j] = scale * row[j]
        seen = row[j0:n]
        tot = _exp_sub_sum(seen, n - j0, _max_n(seen, n - j0))
        inv = 1.0 / tot
        for j in range(j0, n):
            row[j] = row[j] * inv
        for j in range(j0):
            row[j] = 0
        for j in range(n, T):
            row[j] = 0


@njit(cache=True, parallel=True, fastmath=False)
def _causal_softmax_bwd(dp, p, T, rows_per_b, lo, scale):  # pragma: no cover - compiled
    # dp, p [R, T] -> in place dp := scale·P ⊙ (dP − rowsum(dP ⊙ P)) over the keys each row sees, 0 elsewhere
    R = p.shape[0]
    for r in prange(R):
        t = r % T
        j0 = lo[r // rows_per_b, t]
        n = t + 1
        tot = 0.0
        for j in range(j0, n):
            tot += np.float64(dp[r, j]) * p[r, j]
        for j in range(j0, n):
            dp[r, j] = scale * p[r, j] * (dp[r, j] - tot)
        for j in range(j0):
            dp[r, j] = 0
        for j in range(n, T):
            dp[r, j] = 0


def key_starts(B: int, T: int, window: int = 0, seg_start=None):
    """The lowest key each query may see, [B, T] int64: 0 (causal), the start of the query's record
    in a packed row (``seg_start`` [B, T]), and at most ``window`` keys back (sliding window:
    query t sees keys t - window + 1 .. t).  None when every query sees keys 0..t."""
    lo = None if seg_start is None else np.ascontiguousarray(seg_start, dtype=np.int64).reshape(B, T)
    if 0 < window < T:
        w = np.maximum(np.arange(T, dtype=np.int64) - (window - 1), 0)[None, :]
        lo = np.broadcast_to(w, (B, T)).copy() if lo is None else np.maximum(lo, w)
    return lo


def _key_starts(lo, B: int, T: int) -> np.ndarray:
    if lo is None:
        return np.zeros((B, T), dtype=np.int64)
    lo = np.ascontiguousarray(lo, dtype=np.int64)
    if lo.shape != (B, T):
        raise ValueError(f"lo has shape {lo.shape}, expected ({B}, {T})")
    t = np.arange(T)
    if lo.min(initial=0) < 0 or np.any(lo > t) or np.any(np.diff(lo, axis=1) < 0):
        raise ValueError("lo must be non-decreasing along each row with 0 <= lo[b, t] <= t")
    return lo


def _t(x):
    """Contiguous copy of x with its last two axes swapped (numpy's matmul only calls BLAS
    on stacks whose matrices have unit stride in the last axis; transposed views are ~15x slower)."""
    return np.ascontiguousarray(x.swapaxes(-1, -2))


def attention_forward(q, k, v, scale: float, lo=None):
    """q [B, Hq, T, D], k, v [B, Hkv, T, D] -> (out [B, Hq, T, D], probs [B, Hq, T, T]).

    Query head h reads KV head h // (Hq // Hkv); query t sees keys lo[b, t]..t (lo [B, T], see
    :func:`key_starts`; None: 0..t).  q viewed as [B, Hkv, G·T, D] makes the score and value
    products one batched matmul each.
    """
    q, k, v, B, Hq, Hkv, T, D = _attn_shapes(q, k, v)
    G = Hq // Hkv
    s = np.matmul(q.reshape(B, Hkv, G * T, D), _t(k))  # [B, Hkv, G*T, T]
    _causal_softmax(s.reshape(-1, T), T, Hq * T, _key_starts(lo, B, T), q.dtype.type(scale))
    out = np.matmul(s, v)  # [B, Hkv, G*T, D]
    return out.reshape(B, Hq, T, D), s.reshape(B, Hq, T, T)


def attention_backward(dout, q, k, v, probs, scale: float, lo=None):
    """dout [B, Hq, T, D], probs [B, Hq, T, T] -> (dq [B, Hq, T, D], dk, dv [B, Hkv, T, D]).

    dk and dv sum over the G query heads of each KV head through the folded G·T rows.
    """
    q, k, v, B, Hq, Hkv, T, D = _attn_shapes(q, k, v)
    G = Hq // Hkv
    dout = _like(dout, q.dtype, (B, Hq, T, D), "dout").reshape(B, Hkv, G * T, D)
    p = _like(probs, q.dtype, (B, Hq, T, T), "probs").reshape(B, Hkv, G * T, T)
    dv = _t(np.matmul(_t(dout), p))  # (doutᵀ·P)ᵀ = Pᵀ·dout  [B, Hkv, T, D]
    ds = np.matmul(dout, _t(v))  # dP [B, Hkv, G*T, T]
    _causal_softmax_bwd(ds.reshape(-1, T), p.reshape(-1, T), T, Hq * T, _key_starts(lo, B, T), float(scale))  # dS
    dq = np.matmul(ds, k)  # [B, Hkv, G*T, D]
    dk = _t(np.matmul(_t(q.reshape(B, Hkv, G * T, D)), ds))  # dSᵀ·q  [B, Hkv, T, D]
    return dq.reshape(B, Hq, T, D), dk, dv


@njit(cache=True, fastmath=False)
def _scores(q, i, kT, j0, n, s):  # pragma: no cover - compiled
    # s[:n] = q[i]·kT[:, j0:j0+n]  (q [T, D], kT [D, >=j0+n]); accumulated over d in order, four dims
    # per pass over s (same additions in the same order as one dim at a time; fewer stores)
    D = q.shape[1]
    for j in range(n):
        s[j] = 0
    d = 0
    while d + 4 <= D:
        q0, q1, q2, q3 = q[i, d], q[i, d + 1], q[i, d + 2], q[i, d + 3]
        k0, k1, k2, k3 = kT[d, j0:], kT[d + 1, j0:], kT[d + 2, j0:], kT[d + 3, j0:]
        for j in range(n):
            s[j] = (((s[j] + q0 * k0[j]) + q1 * k1[j]) + q2 * k2[j]) + q3 * k3[j]
        d += 4
    while d < D:
        q0 = q[i, d]
        k0 = kT[d, j0:]
        for j in range(n):
            s[j] += q0 * k0[j]
        d += 1


@njit(cache=True, fastmath=False)
def _scores4(q, i, kT, j0, n, S):  # pragma: no cover - compiled
    # S[r, :n] = q[i + r]·kT[:, j0:j0+n] for r = 0..3: the four rows share each load of kT, and each
    # row's sums are the same additions in the same order as _scores (bit for bit).
    D = q.shape[1]
    s0, s1, s2, s3 = S[0], S[1], S[2], S[3]
    for j in range(n):
        s0[j] = 0
        s1[j] = 0
        s2[j] = 0
        s3[j] = 0
    d = 0
    while d + 4 <= D:
        a0, a1, a2, a3 = q[i, d], q[i, d + 1], q[i, d + 2], q[i, d + 3]
        b0, b1, b2, b3 = q[i + 1, d], q[i + 1, d + 1], q[i + 1, d + 2], q[i + 1, d + 3]
        c0, c1, c2, c3 = q[i + 2, d], q[i + 2, d + 1], q[i + 2, d + 2], q[i + 2, d + 3]
        e0, e1, e2, e3 = q[i + 3, d], q[i + 3, d + 1], q[i + 3, d + 2], q[i + 3, d + 3]
        k0, k1, k2, k3 = kT[d, j0:], kT[d + 1, j0:], kT[d + 2, j0:], kT[d + 3, j0:]
        for j in range(n):
            x0, x1, x2, x3 = k0[j], k1[j], k2[j], k3[j]
            s0[j] = (((s0[j] + a0 * x0) + a1 * x1) + a2 * x2) + a3 * x3
            s1[j] = (((s1[j] + b0 * x0) + b1 * x1) + b2 * x2) + b3 * x3
            s2[j] = (((s2[j] + c0 * x0) + c1 * x1) + c2 * x2) + c3 * x3
            s3[j] = (((s3[j] + e0 * x0) + e1 * x1) + e2 * x2) + e3 * x3
        d += 4
    while d < D:
        a0, b0, c0, e0 = q[i, d], q[i + 1, d], q[i + 2, d], q[i + 3, d]
        k0 = kT[d, j0:]
        for j in range(n):
            x0 = k0[j]
            s0[j] += a0 * x0
            s1[j] += b0 * x0
            s2[j] += c0 * x0
            s3[j] += e0 * x0
        d += 1


@njit(cache=True, fastmath=False, inline="always")
def _acc_row(w, X, j, n, acc):  # pragma: no cover - compiled
    # acc [D] += Σ_{j <= k < n} w[k]·X[k] (X [>=n, D]), keys in order: four per pass while four
    # remain, then one at a time (j a multiple of 4, so the grouping is that of a start at 0).
    D = acc.shape[0]
    while j + 4 <= n:
        w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
        x0, x1, x2, x3 = X[j], X[j + 1], X[j + 2], X[j + 3]
        for d in range(D):
            acc[d] = (((acc[d] + w0 * x0[d]) + w1 * x1[d]) + w2 * x2[d]) + w3 * x3[d]
        j += 4
    while j < n:
        w0 = w[j]
        x0 = X[j]
        for d in range(D):
            acc[d] += w0 * x0[d]
        j += 1


@njit(cache=True, fastmath=False, inline="always")
def _acc_rows4(W, X, n4, ACC):  # pragma: no cover - compiled
    # ACC[r] += Σ_{j < n4} W[r, j]·X[j] for rows r = 0..3 (W [4, >=n4], X [>=n4, D], ACC [4, D],
    # n4 a multiple of 4): keys in order, four per pass, so each row gets the same additions in the
    # same order as one row at a time; the rows share each load of X.
    D = ACC.shape[1]
    A0, A1, A2, A3 = ACC[0], ACC[1], ACC[2], ACC[3]
    for j in range(0, n4, 4):
        x0r, x1r, x2r, x3r = X[j], X[j + 1], X[j + 2], X[j + 3]
        w00, w01, w02, w03 = W[0, j], W[0, j + 1], W[0, j + 2], W[0, j + 3]
        w10, w11, w12, w13 = W[1, j], W[1, j + 1], W[1, j + 2], W[1, j + 3]
        w20, w21, w22, w23 = W[2, j], W[2, j + 1], W[2, j + 2], W[2, j + 3]
        w30, w31, w32, w33 = W[3, j], W[3, j + 1], W[3, j + 2], W[3, j + 3]
        for d in range(D):
            x0, x1, x2, x3 = x0r[d], x1r[d], x2r[d], x3r[d]
            A0[d] = (((A0[d] + w00 * x0) + w01 * x1) + w02 * x2) + w03 * x3
            A1[d] = (((A1[d] + w10 * x0) + w11 * x1) + w12 * x2) + w13 * x3
            A2[d] = (((A2[d] + w20 * x0) + w21 * x1) + w22 * x2) + w23 * x3
            A3[d] = (((A3[d] + w30 * x0) + w31 * x1) + w32 * x2) + w33 * x3


@njit(cache=True, fastmath=False)
def _attend_rows4(q, i, kT, v, lo, scale, S, ACC, M, TOT):  # pragma: no cover - compiled
    # _attend_row for the four rows i..i+3 (row r sees keys lo[i+r]..i+r, lo non-decreasing; kT needs
    # i+4 columns), bit for bit: S [4, >=i+4-lo[i]] holds keys from j0 = lo[i] on, ACC [4, D] (not yet
    # divided), M, TOT [4] float64.  The rows share the loads of kT (scores) and of v (the weighted
    # sum over the key groups all four rows have); keys a row does not see weigh 0 there.
    j0 = lo[i]
    vs = v[j0:]
    _scores4(q, i, kT, j0, i + 4 - j0, S)
    for r in range(4):
        a = lo[i + r] - j0
        n = i + r + 1 - j0
        sr = S[r]
        for j in range(a, n):
            sr[j] = scale * sr[j]
        seen = sr[a:n]
        m = _max_n(seen, n - a)
        M[r] = m
        TOT[r] = _exp_sub_sum(seen, n - a, m)
        for j in range(a):
            sr[j] = 0
    ACC[:, :] = 0
    j = (i + 1 - j0) // 4 * 4  # key groups every row has (row 0 sees i + 1 - j0 keys)
    _acc_rows4(S, vs, j, ACC)
    for r in range(4):  # each row's remaining keys
        _acc_row(S[r], vs, j, i + r + 1 - j0, ACC[r])


@njit(cache=True, fastmath=False, inline="always")
def _attend_row(q, i, kT, v, j0, n, scale, s, acc):  # pragma: no cover - compiled
    # query row i of q [T, D] over keys j0..j0+n-1 (kT [D, >=j0+n], v [>=j0+n, D]), buffers s [>=n],
    # acc [D]: s := exp(scale·q_i·k_j − m), acc := Σ_j s_j v_j (not yet divided); returns (m, Σ_j s_j).
    # Shared by the flash forward and the decoder's cached attention (same arithmetic, bit for bit).
    D = acc.shape[0]
    _scores(q, i, kT, j0, n, s)
    for j in range(n):
        s[j] = scale * s[j]
    m = _max_n(s, n)
    tot = _exp_sub_sum(s, n, m)
    for d in range(D):
        acc[d] = 0
    _acc_row(s, v[j0:], 0, n, acc)  # acc += p_j v_j
    return m, tot


@njit(cache=True, nogil=True, fastmath=False)
def _flash_fwd(q4, kT4, v4, lo2, scale, bq, out4, lse4, item0, item1):  # pragma: no cover - compiled
    # q4 [B, Hq, T, D], kT4 [B, Hkv, D, T], v4 [B, Hkv, T, D], lo2 [B, T] -> out4 [B, Hq, T, D], lse4 [B, Hq, T]
    # Work items item0..item1-1 of (b, h, block of bq query rows); each item writes only its own rows
    # (_split runs ranges of items on several threads).  One kernel rather than a loop calling a
    # per-item kernel: numba optimizes a callee's code again in every caller (first-run compile).
    # An item is one head's query rows i0..i1-1: q, out [T, D], kT [D, T] (keys transposed), v [T, D],
    # lo [T] (the first key each row sees), lse [T].  A row's scores (<= T of them, in a [T] buffer)
    # come from kT (vectorizes over keys), are scaled (scale has q's dtype), then max / exp / Σ
    # (float64) and out = Σ_j p_j v_j / Σ_j p_j.  The whole row fits the buffer: no online rescaling.
    _, Hq, T, D = q4.shape
    G = Hq // kT4.shape[1]
    nqb = (T + bq - 1) // bq
    S = np.empty((4, T), dtype=q4.dtype)
    ACC = np.empty((4, D), dtype=q4.dtype)
    M = np.empty(4, dtype=np.float64)
    TOT = np.empty(4, dtype=np.float64)
    for item in range(item0, item1):
        qb = item % nqb
        h = (item // nqb) % Hq
        b = item // (nqb * Hq)
        i0 = qb * bq
        i1 = min(T, i0 + bq)
        q, kT, v, lo, out, lse = q4[b, h], kT4[b, h // G], v4[b, h // G], lo2[b], out4[b, h], lse4[b, h]
        i = i0
        while i + 4 <= i1:  # four rows at a time (same arithmetic per row as _attend_row)
            _attend_rows4(q, i, kT, v, lo, scale, S, ACC, M, TOT)
            for r in range(4):
                for d in range(D):
                    out[i + r, d] = ACC[r, d] / TOT[r]
                lse[i + r] = M[r] + np.log(TOT[r])
            i += 4
        while i < i1:
            m, tot = _attend_row(q, i, kT, v, lo[i], i + 1 - lo[i], scale, S[0], ACC[0])
            for d in range(D):
                out[i, d] = ACC[0, d] / tot
            lse[i] = m + np.log(tot)
            i += 1


@njit(cache=True, nogil=True, fastmath=False)
def _flash_bwd(dout4, q4, k4, v4, out4, lse4, lo2, scale, dq4, dkp, dvp, item0, item1):  # pragma: no cover - compiled
    # dout4, q4, out4 [B, Hq, T, D], k4, v4 [B, Hkv, T, D], lse4 [B, Hq, T], lo2 [B, T]
    # -> dq4 [B, Hq, T, D]; per-query-head partials dkp, dvp [B, Hq, T, D] (zeroed by the caller).
    # Work items item0..item1-1 of (b, h): each item writes only its own head's slots (_split runs
    # ranges of items on several threads; one kernel, no per-head callee, as in _flash_fwd).
    # An item is one query head: dout, q, out, dq [T, D], k, v [T, D] (its KV head), lse [T], lo [T]
    # (the first key each row sees, non-decreasing) -> dq; dk, dv [T, D] accumulate (+=) this head's
    # contribution.  For each query row i: recompute p_j = exp(scale·q_i·k_j − lse_i) and
    # dp_j = dout_i·v_j (lo_i <= j <= i), ds_j = scale·p_j·(dp_j − dout_i·out_i), then
    # dq_i = Σ_j ds_j k_j, dk_j += ds_j q_i, dv_j += p_j dout_i.  Rows go in blocks of 4 that share
    # each pass over the keys from the block's first row's lo (p and ds are 0 where a row sees no
    # key); every sum still adds rows in order i and keys in order j, so the result equals the
    # row-at-a-time loop.
    _, Hq, T, D = q4.shape
    G = Hq // k4.shape[1]
    kT = np.empty((D, T), dtype=q4.dtype)
    vT = np.empty((D, T), dtype=q4.dtype)
    P = np.zeros((4, T), dtype=q4.dtype)
    DS = np.zeros((4, T), dtype=q4.dtype)
    dqa = np.empty((4, D), dtype=q4.dtype)
    for bh in range(item0, item1):
        b = bh // Hq
        h = bh % Hq
        dout, q, k, v, out, lse = dout4[b, h], q4[b, h], k4[b, h // G], v4[b, h // G], out4[b, h], lse4[b, h]
        lo, dq, dk, dv = lo2[b], dq4[b, h], dkp[b, h], dvp[b, h]
        for j in range(T):
            for d in range(D):
                kT[d, j] = k[j, d]
                vT[d, j] = v[j, d]
        for i0 in range(0, T, 4):
            i1 = min(T, i0 + 4)
            j0 = lo[i0]
            nk = i1 - j0  # keys j0..i1-1, local index j - j0
            if i1 - i0 == 4:  # the four rows' scores and dout·v sums share each load of kT / vT
                _scores4(q, i0, kT, j0, nk, P)
                _scores4(dout, i0, vT, j0, nk, DS)
            for r in range(i1 - i0):
                i = i0 + r
                a = lo[i] - j0
                n = i + 1 - j0
                di = 0.0
                for d in range(D):
                    di += np.float64(dout[i, d]) * out[i, d]
                pr = P[r]
                dsr = DS[r]
                if i1 - i0 < 4:
                    _scores(q, i, kT, j0, n, pr)
                    _scores(dout, i, vT, j0, n, dsr)
                li = lse[i]
                for j in range(a, n):
                    pj = _exp(scale * pr[j] - li)
                    pr[j] = pj
                    dsr[j] = scale * pj * (dsr[j] - di)
                for j in range(a):
                    pr[j] = 0
                    dsr[j] = 0
                for j in range(n, nk):
                    pr[j] = 0
                    dsr[j] = 0
            for r in range(4):
                for d in range(D):
                    dqa[r, d] = 0
            if i1 - i0 == 4:
                q0, q1, q2, q3 = q[i0], q[i0 + 1], q[i0 + 2], q[i0 + 3]
                o0, o1, o2, o3 = dout[i0], dout[i0 + 1], dout[i0 + 2], dout[i0 + 3]
                for jj in range(nk):  # dk_j: the four rows' terms, in row order
                    s0, s1, s2, s3 = DS[0, jj], DS[1, jj], DS[2, jj], DS[3, jj]
                    dkj = dk[j0 + jj]
                    for d in range(D):
                        dkj[d] = (((dkj[d] + s0 * q0[d]) + s1 * q1[d]) + s2 * q2[d]) + s3 * q3[d]
                for jj in range(nk):  # dv_j likewise (a loop of its own: fewer live streams, ~1.3x)
                    p0, p1, p2, p3 = P[0, jj], P[1, jj], P[2, jj], P[3, jj]
                    dvj = dv[j0 + jj]
                    for d in range(D):
                        dvj[d] = (((dvj[d] + p0 * o0[d]) + p1 * o1[d]) + p2 * o2[d]) + p3 * o3[d]
                ks = k[j0:]
                n4 = nk // 4 * 4
                _acc_rows4(DS, ks, n4, dqa)  # dq rows: Σ_j ds_j k_j in key order
                for r in range(4):
                    _acc_row(DS[r], ks, n4, nk, dqa[r])
            else:
                for r in range(i1 - i0):
                    i = i0 + r
                    qi = q[i]
                    doi = dout[i]
                    ar = dqa[r]
                    for jj in range(lo[i] - j0, i + 1 - j0):
                        pj = P[r, jj]
                        dsj = DS[r, jj]
                        kj = k[j0 + jj]
                        dkj = dk[j0 + jj]
                        dvj = dv[j0 + jj]
                        for d in range(D):
                            ar[d] += dsj * kj[d]
                            dkj[d] += dsj * qi[d]
                            dvj[d] += pj * doi[d]
            for r in range(i1 - i0):
                for d in range(D):
                    dq[i0 + r, d] = dqa[r, d]


def flash_attention_forward(q, k, v, scale: float, block_q: int = FLASH_BLOCK_Q, lo=None):
    """q [B, Hq, T, D], k, v [B, Hkv, T, D] -> (out [B, Hq, T, D], lse [B, Hq, T]).

    Same result as :func:`attention_forward` (to rounding) with O(T) memory per row block; query t
    sees keys lo[b, t]..t (lo [B, T], see :func:`key_starts`; None: 0..t) and no work is done for the
    keys before them.  lse is the log-sum-exp of each row's scaled scores (what backward needs).
    """
    q, k, v, B, Hq, Hkv, T, D = _attn_shapes(q, k, v)
    out = np.empty_like(q)
    lse = np.empty((B, Hq, T), dtype=q.dtype)
    kT = np.ascontiguousarray(np.swapaxes(k, 2, 3))  # [B, Hkv, D, T], shared by all query blocks
    bq = max(1, int(block_q))
    _split(_flash_fwd, B * Hq * ((T + bq - 1) // bq), q, kT, v, _key_starts(lo, B, T), q.dtype.type(scale), bq, out,
           lse)
    return out, lse


def flash_attention_backward(dout, q, k, v, out, lse, scale: float, lo=None):
    """dout, q, out [B, Hq, T, D], k, v [B, Hkv, T, D], lse [B, Hq, T] -> (dq, dk, dv).

    Each query head accumulates its own dk/dv partial; the G partials of a KV head are then
    summed in head order, so the result does not depend on thread timing.
    """
    q, k, v, B, Hq, Hkv, T, D = _attn_shapes(q, k, v)
    dout = _like(dout, q.dtype, q.shape, "dout")
    out = _like(out, q.dtype, q.shape, "out")
    lse = _like(lse, q.dtype, (B, Hq, T), "lse")
    dq = np.empty_like(q)
    dkp = np.zeros_like(q)
    dvp = np.zeros_like(q)
    _split(_flash_bwd, B * Hq, dout, q, k, v, out, lse, _key_starts(lo, B, T), q.dtype.type(scale), dq, dkp, dvp)
    G = Hq // Hkv
    if G == 1:
        return dq, dkp, dvp
    # sum each KV head's G partials; numpy adds the g slices in order (deterministic)
    dk = dkp.reshape(B, Hkv, G, T, D).sum(axis=2)
    dv = dvp.reshape(B, Hkv, G, T, D).sum(axis=2)
    return dq, dk, dv


# == 5. fused softmax + cross-entropy ===============================================================

@njit(cache=True, parallel=True, fastmath=False)
def _xent_fwd_bwd(logits, targets, weights, inv_norm, nll):  # pragma: no cover - compiled
    # logits [N, V] (overwritten), targets [N] int, weights [N] float64 -> nll [N] float64
    # e_j = exp(l_j − max) in the dtype (vectorizable _exp), stored in place, summed in float64;
    # nll = log Σ + max − l_t;  dlogits = (e_j/Σ − [j == t])·w·inv_norm (0 when w == 0)
    N, V = logits.shape
    for i in prange(N):
        t = targets[i]
        row = logits[i]
        lt = np.float64(row[t])
        m = _max_n(row, V)
        tot = _exp_sub_sum(row, V, m)
        nll[i] = np.log(tot) + m - lt
        wn = weights[i] * inv_norm
        if wn == 0.0:
            for j in range(V):
                row[j] = 0
        else:
            c = wn / tot
            et = np.float64(row[t])
            for j in range(V):
                row[j] = row[j] * c
            row[t] = et * c - wn


@njit(cache=True, parallel=True, fastmath=False)
def _xent_fwd(logits, targets, nll):  # pragma: no cover - compiled
    # logits [N, V], targets [N] -> nll [N] float64 = log Σ_j exp(l_j − max) + max − l_t
    N, V = logits.shape
    for i in prange(N):
        row = logits[i]
        m = _max_n(row, V)
        nll[i] = np.log(_sum_exp_sub(row, V, m)) + m - np.float64(row[targets[i]])


@njit(cache=True, parallel=True, fastmath=False)
def _xent_stats(logits, r0, targets, m, tot, lt):  # pragma: no cover - compiled
    # logits [N, v]: the vocabulary's columns r0 : r0 + v.  Per row, the running max m [N] (the
    # logits' dtype, -inf before the first chunk) and Σ exp(l − m) tot [N] (float64) are brought
    # up to this chunk; lt [N] := the target's logit when the target lies in it.  logits untouched.
    N, v = logits.shape
    for i in prange(N):
        row = logits[i]
        mc = _max_n(row, v)
        if mc > m[i]:
            tot[i] *= np.exp(np.float64(m[i]) - np.float64(mc))
            m[i] = mc
        tot[i] += _sum_exp_sub(row, v, m[i])
        t = targets[i] - r0
        if 0 <= t < v:
            lt[i] = np.float64(row[t])


@njit(cache=True, parallel=True, fastmath=False)
def _xent_grad(logits, r0, targets, m, tot, weights, inv_norm):  # pragma: no cover - compiled
    # logits [N, v] (columns r0 : r0 + v, overwritten) -> (exp(l − m)/tot − [r0 + j == t])·w·inv_norm
    # with the whole row's m and tot from _xent_stats (the same arithmetic as _xent_fwd_bwd)
    N, v = logits.shape
    for i in prange(N):
        row = logits[i]
        wn = weights[i] * inv_norm
        if wn == 0.0:
            for j in range(v):
                row[j] = 0
            continue
        mi = m[i]
        for j in range(v):
            row[j] = _exp(row[j] - mi)
        c = wn / tot[i]
        t = targets[i] - r0
        et = np.float64(row[t]) if 0 <= t < v else 0.0
        for j in range(v):
            row[j] = row[j] * c
        if 0 <= t < v:
            row[t] = et * c - wn


def _xent_targets(targets, N: int, V: int) -> np.ndarray:
    t = np.ascontiguousarray(targets)
    if t.shape != (N,) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"targets must be an integer array of shape ({N},), got {t.dtype} {t.shape}")
    if N and (t.min() < 0 or t.max() >= V):
        raise ValueError(f"targets must lie in [0, {V}), got range [{t.min()}, {t.max()}]")
    return t.astype(np.int64, copy=False)


def xent_forward_backward(logits, targets, weights, inv_norm: float):
    """logits [N, V] (float32/64, C-contiguous, OVERWRITTEN), targets [N] int, weights [N] -> nll [N] float64.

    On return ``logits`` holds dlogits = (softmax(logits) − onehot(target))·weights[i]·inv_norm,
    the gradient of inv_norm·Σ_i weights[i]·nll[i]; nll is unweighted.
    """
    if not isinstance(logits, np.ndarray) or logits.dtype not in _FLOATS or logits.ndim != 2:
        raise ValueError("logits must be a 2-D float32 or float64 array")
    if not logits.flags.c_contiguous or not logits.flags.writeable:
        raise ValueError("logits must be C-contiguous and writeable (it is overwritten in place)")
    N, V = logits.shape
    t = _xent_targets(targets, N, V)
    w = _like(weights, np.float64, (N,), "weights")
    nll = np.empty(N, dtype=np.float64)
    if V:
        _xent_fwd_bwd(logits, t, w, float(inv_norm), nll)
    return nll


def xent_forward(logits, targets):
    """logits [N, V], targets [N] int -> nll [N] float64 (logits untouched, no [N, V] temporary)."""
    logits = _float_array(logits, "logits")
    N, V = logits.shape
    t = _xent_targets(targets, N, V)
    nll = np.empty(N, dtype=np.float64)
    if V:
        _xent_fwd(logits, t, nll)
    return nll


def xent_stats(logits, r0: int, targets, m, tot, lt) -> None:
    """One chunk of a cross-entropy computed over the vocabulary in column chunks (the output head
    streamed, see engine.backward): logits [N, v] are the columns r0 : r0 + v; m [N] (logits'
    dtype, start -inf), tot [N] (float64, start 0) and lt [N] (float64) are updated in place.
    After the last chunk nll = log(tot) + m − lt."""
    logits = _float_array(logits, "logits")
    N, v = logits.shape
    t = _xent_targets(targets, N, np.iinfo(np.int64).max)
    if not (isinstance(m, np.ndarray) and m.dtype == logits.dtype and m.shape == (N,)):
        raise ValueError(f"m must be a {logits.dtype} array of shape ({N},)")
    for name, x in (("tot", tot), ("lt", lt)):
        if not (isinstance(x, np.ndarray) and x.dtype == np.float64 and x.shape == (N,)):
            raise ValueError(f"{name} must be a float64 array of shape ({N},)")
    if v:
        _xent_stats(logits, int(r0), t, m, tot, lt)


def xent_grad(logits, r0: int, targets, m, tot, weights, inv_norm: float) -> None:
    """The columns r0 : r0 + v of dlogits, in place of logits [N, v], from the whole rows' m and tot
    (:func:`xent_stats`): (softmax − onehot(target))·weights[i]·inv_norm, as
    :func:`xent_forward_backward` computes it for whole rows."""
    if not isinstance(logits, np.ndarray) or logits.dtype not in _FLOATS or logits.ndim != 2:
        raise ValueError("logits must be a 2-D float32 or float64 array")
    if not logits.flags.c_contiguous or not logits.flags.writeable:
        raise ValueError("logits must be C-contiguous and writeable (it is overwritten in place)")
    N, v = logits.shape
    t = _xent_targets(targets, N, np.iinfo(np.int64).max)
    w = _like(weights, np.float64, (N,), "weights")
    if not (isinstance(m, np.ndarray) and m.dtype == logits.dtype and m.shape == (N,)):
        raise ValueError(f"m must be a {logits.dtype} array of shape ({N},)")
    if not (isinstance(tot, np.ndarray) and tot.dtype == np.float64 and tot.shape == (N,)):
        raise ValueError(f"tot must be a float64 array of shape ({N},)")
    if v:
        _xent_grad(logits, int(r0), t, m, tot, w, float(inv_norm))


# == 6. embeddings ==================================================================================

@njit(cache=True, fastmath=False)
def _scatter_add(dst, ids, src):  # pragma: no cover - compiled
    # dst [V, C] += src [N, C] rows at ids [N]; sequential over N (repeated ids add in order)
    N, C = src.shape
    for n in range(N):
        r = ids[n]
        for c in range(C):
            dst[r, c] += src[n, c]


def embedding_scatter_add(dst, ids, src) -> None:
    """dst [V, C] (modified in place) += src [N, C] scattered to rows ids [N]."""
    if not isinstance(dst, np.ndarray) or dst.dtype not in _FLOATS or dst.ndim != 2 or not dst.flags.writeable:
        raise ValueError("dst must be a writeable 2-D float32 or float64 array")
    V, C = dst.shape
    ids = np.ascontiguousarray(ids).reshape(-1)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    N = ids.shape[0]
    src = _like(src, dst.dtype, (N, C), "src")
    if N and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"ids must lie in [0, {V}), got range [{ids.min()}, {ids.max()}]")
    _scatter_add(dst, ids.astype(np.int64, copy=False), src)
