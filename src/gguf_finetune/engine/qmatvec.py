"""Matrix products straight from quantized weights, for decoding a few tokens at a time.

Shapes: x [T, K] float32 (T = tokens of one decode step, usually 1), W [N, K] stored as ggml
blocks (raw [N, bytes_per_row] uint8, as ``GGUFReader`` gives it) -> y [T, N] = x · Wᵀ.

Why: one decode step multiplies every weight once.  From the float32 cache that streams 4 bytes
per weight through memory (540 MB per token for SmolLM2-135M); from the file's own blocks it is
0.5–1.1 bytes, and the arithmetic is done while the block is in registers.  Training and prefill
(T in the hundreds) stay on BLAS over float32, where the matmul is compute-bound.

Each kernel runs ``prange`` over chunks of output rows and splits every block's contribution into
a part per element and a constant:

    Q4_1:  Σ_j (d·q_j + m)·x_j  =  Σ_j (d·q_j)·x_j + m·Σ_j x_j

with the block sums ``Σ_j x_j`` precomputed once per call.  That is the same number as
``x · dequantize(W)ᵀ`` up to float32 summation order (``fastmath`` lets LLVM reassociate the
sums into vector lanes); tests/test_engine_qmatvec.py checks every type against that product
computed in float64 from gguf's own dequantization.  Types without a kernel here (Q2_K, Q3_K,
IQ4_*, BF16) are left to the float32 path: :func:`supported` tells which.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES
from numba import njit, prange

from ..quants import _f16_at, _h2f, _k4_scale_min, _u8f

_FM = {"reassoc", "nsz", "contract"}  # let the per-block dot products vectorize
_F16 = np.float32(16.0)
_F32 = np.float32(32.0)
_F8 = np.float32(8.0)
_Z = np.float32(0.0)


# -- kernels ---------------------------------------------------------------------------------------
# Signature: (src [N, W] uint8 or typed, x [T, K] f32, xs [T, K/32] f32 block sums of x,
#             out [T, N] f32, nch = chunks of rows for prange).
# Per row, 32 float32 lane accumulators collect (scale·q_j)·x_j across all blocks and the
# per-block constant terms (min·Σx, or -8·d·Σx for the offset types) go into one scalar; the 32
# lanes are summed once per row.  Summing each block to a scalar instead costs a horizontal
# vector reduction per 32 weights, ~3x slower.  Each chunk owns its lane array (one allocation
# per chunk, not per row).

@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_f32(src, x, xs, out, nch):  # src [N, K] f32
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc = _Z
                for j in range(K):
                    acc += src[r, j] * x[t, j]
                out[t, r] = acc


@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_f16(src, x, xs, out, nch):  # src [N, K] uint16 (f16 bits)
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc = _Z
                for j in range(K):
                    acc += _h2f(src[r, j]) * x[t, j]
                out[t, r] = acc


@njit(cache=True, inline="always")
def _lanes_sum(acc, sm):
    tot = sm
    for j in range(32):
        tot += acc[j]
    return tot


@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_q8_0(src, x, xs, out, nch):  # 34 B: d | qs int8[32]
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        acc = np.empty(32, np.float32)
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc[:] = _Z
                for b in range(K // 32):
                    o = b * 34
                    e = b * 32
                    d = _f16_at(src, r, o)
                    for j in range(32):
                        acc[j] += (d * np.float32(np.int8(src[r, o + 2 + j]))) * x[t, e + j]
                out[t, r] = _lanes_sum(acc, _Z)


@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_q4_0(src, x, xs, out, nch):  # 18 B: d | qs[16]; d*(q-8)
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        acc = np.empty(32, np.float32)
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc[:] = _Z
                sm = _Z
                for b in range(K // 32):
                    o = b * 18
                    e = b * 32
                    d = _f16_at(src, r, o)
                    sm -= _F8 * d * xs[t, b]
                    for j in range(16):
                        q = src[r, o + 2 + j]
                        acc[j] += (d * _u8f(q & 15)) * x[t, e + j]
                        acc[16 + j] += (d * _u8f(q >> 4)) * x[t, e + 16 + j]
                out[t, r] = _lanes_sum(acc, sm)


@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_q4_1(src, x, xs, out, nch):  # 20 B: d | m | qs[16]; d*q + m
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        acc = np.empty(32, np.float32)
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc[:] = _Z
                sm = _Z
                for b in range(K // 32):
                    o = b * 20
                    e = b * 32
                    d = _f16_at(src, r, o)
                    sm += _f16_at(src, r, o + 2) * xs[t, b]
                    for j in range(16):
                        q = src[r, o + 4 + j]
                        acc[j] += (d * _u8f(q & 15)) * x[t, e + j]
                        acc[16 + j] += (d * _u8f(q >> 4)) * x[t, e + 16 + j]
                out[t, r] = _lanes_sum(acc, sm)


@njit(cache=True, inline="always")
def _qh_bit(src, r, o, j):
    """Bit j (0..31) of the little-endian u32 at src[r, o:o+4], as 0.0 or 16.0."""
    return _F16 if np.uint8(src[r, o + (j >> 3)] & np.uint8(1 << (j & 7))) != 0 else _Z


@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_q5_0(src, x, xs, out, nch):  # 22 B: d | qh u32 | qs[16]; d*(q-16)
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        acc = np.empty(32, np.float32)
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc[:] = _Z
                sm = _Z
                for b in range(K // 32):
                    o = b * 22
                    e = b * 32
                    d = _f16_at(src, r, o)
                    sm -= _F16 * d * xs[t, b]
                    for j in range(16):
                        q = src[r, o + 6 + j]
                        acc[j] += (d * (_u8f(q & 15) + _qh_bit(src, r, o + 2, j))) * x[t, e + j]
                        acc[16 + j] += (d * (_u8f(q >> 4) + _qh_bit(src, r, o + 2, j + 16))) * x[t, e + 16 + j]
                out[t, r] = _lanes_sum(acc, sm)


@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_q5_1(src, x, xs, out, nch):  # 24 B: d | m | qh u32 | qs[16]; d*q + m
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        acc = np.empty(32, np.float32)
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc[:] = _Z
                sm = _Z
                for b in range(K // 32):
                    o = b * 24
                    e = b * 32
                    d = _f16_at(src, r, o)
                    sm += _f16_at(src, r, o + 2) * xs[t, b]
                    for j in range(16):
                        q = src[r, o + 8 + j]
                        acc[j] += (d * (_u8f(q & 15) + _qh_bit(src, r, o + 4, j))) * x[t, e + j]
                        acc[16 + j] += (d * (_u8f(q >> 4) + _qh_bit(src, r, o + 4, j + 16))) * x[t, e + 16 + j]
                out[t, r] = _lanes_sum(acc, sm)


@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_q4_k(src, x, xs, out, nch):  # 144 B: d | dmin | scales[12] | qs[128]; (d*sc)*q - dmin*m
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        acc = np.empty(32, np.float32)
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc[:] = _Z
                sm = _Z
                for b in range(K // 256):
                    o = b * 144
                    d = _f16_at(src, r, o)
                    dmin = _f16_at(src, r, o + 2)
                    for g in range(4):  # 32 bytes -> sub-blocks 2g (lo nibbles) and 2g+1 (hi)
                        sc1, m1 = _k4_scale_min(src, r, o + 4, 2 * g)
                        sc2, m2 = _k4_scale_min(src, r, o + 4, 2 * g + 1)
                        d1 = d * np.float32(sc1)
                        d2 = d * np.float32(sc2)
                        xb = b * 8 + 2 * g
                        sm -= dmin * (np.float32(m1) * xs[t, xb] + np.float32(m2) * xs[t, xb + 1])
                        qo = o + 16 + g * 32
                        eo = b * 256 + g * 64
                        for l in range(32):
                            q = src[r, qo + l]
                            acc[l] += (d1 * _u8f(q & 15)) * x[t, eo + l] + (d2 * _u8f(q >> 4)) * x[t, eo + 32 + l]
                out[t, r] = _lanes_sum(acc, sm)


@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_q5_k(src, x, xs, out, nch):  # 176 B: d | dmin | scales[12] | qh[32] | qs[128]
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        acc = np.empty(32, np.float32)
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc[:] = _Z
                sm = _Z
                for b in range(K // 256):
                    o = b * 176
                    d = _f16_at(src, r, o)
                    dmin = _f16_at(src, r, o + 2)
                    for g in range(4):
                        sc1, m1 = _k4_scale_min(src, r, o + 4, 2 * g)
                        sc2, m2 = _k4_scale_min(src, r, o + 4, 2 * g + 1)
                        d1 = d * np.float32(sc1)
                        d2 = d * np.float32(sc2)
                        xb = b * 8 + 2 * g
                        sm -= dmin * (np.float32(m1) * xs[t, xb] + np.float32(m2) * xs[t, xb + 1])
                        hm1 = np.uint8(1 << (2 * g))
                        hm2 = np.uint8(2 << (2 * g))
                        qo = o + 48 + g * 32
                        eo = b * 256 + g * 64
                        for l in range(32):
                            q = src[r, qo + l]
                            h = src[r, o + 16 + l]
                            q1 = _u8f(q & 15) + (_F16 if np.uint8(h & hm1) != 0 else _Z)
                            q2 = _u8f(q >> 4) + (_F16 if np.uint8(h & hm2) != 0 else _Z)
                            acc[l] += (d1 * q1) * x[t, eo + l] + (d2 * q2) * x[t, eo + 32 + l]
                out[t, r] = _lanes_sum(acc, sm)


@njit(cache=True, parallel=True, fastmath=_FM)
def _mv_q6_k(src, x, xs, out, nch):  # 210 B: ql[128] | qh[64] | scales int8[16] | d; (d*sc)*(q-32)
    T, K = x.shape
    N = src.shape[0]
    for c in prange(nch):
        acc = np.empty(32, np.float32)
        for r in range(c * N // nch, (c + 1) * N // nch):
            for t in range(T):
                acc[:] = _Z
                for b in range(K // 256):
                    o = b * 210
                    d = _f16_at(src, r, o + 208)
                    for g in range(2):
                        for half in range(2):  # 16-element sub-blocks 8g + 2j + half, j = 0..3
                            k = o + 192 + g * 8 + half
                            dl0 = d * np.float32(np.int8(src[r, k]))
                            dl1 = d * np.float32(np.int8(src[r, k + 2]))
                            dl2 = d * np.float32(np.int8(src[r, k + 4]))
                            dl3 = d * np.float32(np.int8(src[r, k + 6]))
                            lo = o + g * 64 + half * 16
                            ho = o + 128 + g * 32 + half * 16
                            eo = b * 256 + g * 128 + half * 16
                            for l in range(16):
                                a = src[r, lo + l]
                                cc = src[r, lo + 32 + l]
                                h = src[r, ho + l]
                                acc[l] += (dl0 * (_u8f((a & 15) | ((h & 3) << 4)) - _F32)) * x[t, eo + l] \
                                    + (dl2 * (_u8f((a >> 4) | (h & 48)) - _F32)) * x[t, eo + 64 + l]
                                acc[16 + l] += (dl1 * (_u8f((cc & 15) | ((h & 12) << 2)) - _F32)) * x[t, eo + 32 + l] \
                                    + (dl3 * (_u8f((cc >> 4) | ((h >> 2) & 48)) - _F32)) * x[t, eo + 96 + l]
                out[t, r] = _lanes_sum(acc, _Z)


_KERNELS = {
    QT.F32: (_mv_f32, np.float32),
    QT.F16: (_mv_f16, np.uint16),
    QT.Q8_0: (_mv_q8_0, np.uint8),
    QT.Q4_0: (_mv_q4_0, np.uint8),
    QT.Q4_1: (_mv_q4_1, np.uint8),
    QT.Q5_0: (_mv_q5_0, np.uint8),
    QT.Q5_1: (_mv_q5_1, np.uint8),
    QT.Q4_K: (_mv_q4_k, np.uint8),
    QT.Q5_K: (_mv_q5_k, np.uint8),
    QT.Q6_K: (_mv_q6_k, np.uint8),
}
SUPPORTED: frozenset[QT] = frozenset(_KERNELS)


def supported(qtype) -> bool:
    try:
        return QT(int(qtype)) in _KERNELS
    except (ValueError, TypeError):
        return False


class QuantMatrix:
    """A weight W [N, K] kept in its file's block format, ready for :meth:`matmul`.

    ``raw`` is the tensor's data as the reader gives it (memory-mapped; nothing is copied).
    """

    __slots__ = ("src", "qtype", "shape", "_kernel")

    def __init__(self, raw: np.ndarray, qtype, shape: tuple[int, int]):
        qtype = QT(int(qtype))
        if qtype not in _KERNELS:
            raise ValueError(f"QuantMatrix: no matvec kernel for {qtype.name}")
        kernel, dt = _KERNELS[qtype]
        N, K = int(shape[0]), int(shape[1])
        block, type_size = GGML_QUANT_SIZES[qtype]
        if K % block:
            raise ValueError(f"QuantMatrix: {K} columns is not a multiple of {qtype.name}'s block of {block}")
        src = np.ascontiguousarray(raw).reshape(N, -1).view(dt)
        want = K if dt != np.uint8 else K // block * type_size
        if src.shape != (N, want):
            raise ValueError(f"QuantMatrix: data {src.shape} does not hold a {qtype.name} [{N}, {K}] matrix")
        src.flags.writeable = False
        self.src, self.qtype, self.shape, self._kernel = src, qtype, (N, K), kernel

    @classmethod
    def from_tensor(cls, t) -> "QuantMatrix":
        """From a gguf ``ReaderTensor`` (ggml shape [K, N] is numpy's [N, K])."""
        K, N = (int(v) for v in t.shape[:2])
        return cls(t.data, t.tensor_type, (N, K))

    def matmul(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x [T, K] -> x · Wᵀ [T, N] (float32)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        T, K = x.shape
        if K != self.shape[1]:
            raise ValueError(f"QuantMatrix.matmul: x has {K} columns, W has {self.shape[1]}")
        xs = x.reshape(T, K // 32, 32).sum(axis=2, dtype=np.float32) if K % 32 == 0 else np.zeros((T, 0), np.float32)
        if out is None:
            out = np.empty((T, self.shape[0]), np.float32)
        nch = max(1, min(self.shape[0], 4 * numba.get_num_threads()))
        self._kernel(self.src, x, np.ascontiguousarray(xs), out, nch)
        return out


def matmul_reference(raw: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    """Slow and obvious: x · dequantize(W)ᵀ in float64 with gguf's own numpy dequantization."""
    W = np.asarray(gq.dequantize(np.asarray(raw), QT(int(qtype))), dtype=np.float64)
    return np.asarray(x, np.float64) @ W.reshape(W.shape[0], -1).T
