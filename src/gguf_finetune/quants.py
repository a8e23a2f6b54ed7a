"""Dequantization of ggml tensor types to float32: numba kernels, one block row at a time.

Every kernel reproduces ``gguf.quants.dequantize`` (the slow, obviously-correct numpy reference,
exposed here as :func:`dequantize_reference`) bit for bit: the f16 scales are widened to f32 first,
then the same f32 products/sums are formed in the same order (e.g. Q4_K computes ``d*sc`` and
``dmin*m`` in f32 and then ``(d*sc)*q - dmin*m``; Q4_1 computes ``d*q + m`` with no fused
multiply-add).  ``tests/test_quants.py`` checks every type against the reference bitwise.

Data layout: a tensor is a stack of rows ``[rows, bytes_per_row]`` (what ``GGUFReader`` gives as
``tensor.data`` for quantized types); each row is ``cols / block_size`` blocks of ``type_size``
bytes.  F32/F16 arrive from the reader as typed ``[rows, cols]`` arrays; raw uint8 is accepted too.
Kernels run ``prange`` over rows (``parallel=True``); the caller sets the thread count with
``numba.set_num_threads``.  Measured speed: docs/PERFORMANCE.md (scripts/bench_dequant.py).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .errors import UserError

__all__ = [
    "SUPPORTED",
    "check_supported",
    "dequantize",
    "dequantize_rows",
    "dequantize_take",
    "dequantize_tensor",
    "dequantize_reference",
    "random_raw",
]


# -- scalar helpers ------------------------------------------------------------------------

@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret a uint32 as float32 (no conversion)."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_to_bits(typingctx, x):
    """Reinterpret a float32 as uint32 (no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _half_bits_to_f32(typingctx, h):
    """uint16 holding IEEE half bits -> float32 with LLVM's ``fpext`` (one F16C instruction on x86)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


_TWO_M24 = np.float32(2.0**-24)  # value of the f16 subnormal unit


@njit(cache=True, inline="always")
def _h2f_soft(h):
    """IEEE half bits (integer 0..65535) -> float32 in integer arithmetic, exact for every pattern.

    Normals: rebias the exponent (+112) in the bits.  Inf/nan: exponent 255, payload kept as is
    (numpy's ``astype(np.float32)`` does not quiet signalling NaNs either).  Subnormals: mantissa
    * 2**-24 in f32, exact and never touching an f32 subnormal (slow on some CPUs).  Branch-free,
    so loops over it vectorize.
    """
    u = np.uint32(h)
    mag = np.uint32(u & np.uint32(0x7FFF))
    exp = np.uint32(mag & np.uint32(0x7C00))
    bits = np.uint32(np.uint32(mag << np.uint32(13)) + np.uint32(0x38000000))
    bits = np.uint32(np.uint32(mag << np.uint32(13)) | np.uint32(0x7F800000)) if exp == np.uint32(0x7C00) else bits
    sub = _f32_to_bits(np.float32(np.int32(mag)) * _TWO_M24)
    bits = sub if exp == np.uint32(0) else bits
    return _bits_to_f32(np.uint32(bits | np.uint32((u & np.uint32(0x8000)) << np.uint32(16))))


@njit(cache=True, inline="always")
def _h2f_hw(h):
    """Same result as :func:`_h2f_soft` via the CPU's half->float conversion (~2x faster).

    The hardware sets the quiet bit of signalling NaNs; numpy keeps it clear, so clear it again.
    """
    u = np.uint16(h)
    b = _f32_to_bits(_half_bits_to_f32(u))
    snan = np.uint16(u & np.uint16(0x7E00)) == np.uint16(0x7C00) and np.uint16(u & np.uint16(0x01FF)) != 0
    return _bits_to_f32(np.uint32(b & np.uint32(0xFFBFFFFF)) if snan else b)


def _native_half_conversion() -> bool:
    """True when LLVM turns ``fpext half`` into one instruction here (x86 F16C, any aarch64).

    Elsewhere it would become a call into a runtime library the JIT may not have, so the integer
    version is used instead.
    """

    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:  # portable/generic builds
        return False
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False)) and machine in ("x86_64", "amd64")
    except Exception:
        return False


_h2f = _h2f_hw if _native_half_conversion() else _h2f_soft


@njit(cache=True, inline="always")
def _f16_at(src, r, o):
    """The little-endian f16 at byte ``o`` of row ``r``, as float32."""
    return _h2f(np.int32(src[r, o]) | (np.int32(src[r, o + 1]) << 8))


@njit(cache=True, inline="always")
def _f(x):
    """A small integer (scale fields, outside the hot loops) -> float32."""
    return np.float32(np.int32(x))


@njit(cache=True, inline="always")
def _u8f(x):
    """A bit field that fits a byte -> float32.

    numba widens integer arithmetic to 64 bits; truncating to uint8 right before the conversion
    lets LLVM do the whole expression on byte/int32 vector lanes (int64 -> float does not
    vectorize on AVX2).  Offsets such as ``- 32`` are then applied in f32: every intermediate is a
    small integer, so the float equals gguf's ``float(q - 32)`` exactly.
    """
    return np.float32(np.uint8(x))


_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_BIT16 = np.array([1 << j for j in range(16)], dtype=np.int32)  # bit masks: no per-lane variable shifts
_F0 = np.float32(0.0)
_F4 = np.float32(4.0)
_F8 = np.float32(8.0)
_F16 = np.float32(16.0)
_F32 = np.float32(32.0)


# -- kernels -------------------------------------------------------------------------------
# Signature: (src [R, W] read-only, rows [N] int64, out [N, cols] f32, one == 1).
# Row i of ``out`` is row ``rows[i]`` of ``src`` dequantized.  The reference for each is the
# ``dequantize_blocks`` of the same type in gguf/quants.py (see dequantize_reference); the float
# operations are the same ones in the same order.
#
# Performance notes (numba keeps LLVM's SLP vectorizer off, so only the loop vectorizer helps):
# - the fixed-size loops inside a block run to ``16 * one`` / ``32 * one`` with ``one`` a run-time
#   1, so LLVM does not fully unroll them before the loop vectorizer sees them;
# - arrays are indexed 2-D (no row views), so the parfor body gets ``noalias`` arguments and the
#   vector loops need no run-time overlap checks;
# - bit fields go through ``_u8f`` and bit tests through ``np.uint8(h & mask) != 0`` / ``_BIT16``
#   (never a per-lane variable shift), keeping the lanes 8/32-bit;
# - each byte of packed 2-bit fields is read once and yields all four of its elements.
# Each of these is worth ~1.5-2x; a 4M-element tensor then costs about as much as writing the
# 16 MB of float32 output.

@njit(cache=True, parallel=True)
def _k_f32(src, rows, out, one):  # src [R, cols] f32
    for i in prange(rows.shape[0]):
        r = rows[i]
        for j in range(out.shape[1]):
            out[i, j] = src[r, j]


@njit(cache=True, parallel=True)
def _k_f16(src, rows, out, one):  # src [R, cols] uint16 (f16 bits)
    for i in prange(rows.shape[0]):
        r = rows[i]
        for j in range(out.shape[1]):
            out[i, j] = _h2f(src[r, j])


@njit(cache=True, parallel=True)
def _k_bf16(src, rows, out_bits, one):  # src [R, cols] uint16; out_bits = out.view(uint32)
    for i in prange(rows.shape[0]):
        r = rows[i]
        for j in range(out_bits.shape[1]):
            out_bits[i, j] = np.uint32(src[r, j]) << np.uint32(16)


@njit(cache=True, parallel=True)
def _k_q4_0(src, rows, out, one):  # 18 B: d | qs[16] (lo nibbles -> 0..15, hi -> 16..31); d*(q-8)
    nb = out.shape[1] // 32
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 18
            e = b * 32
            d = _f16_at(src, r, o)
            for j in range(16 * one):
                q = src[r, o + 2 + j]
                out[i, e + j] = d * (_u8f(q & 15) - _F8)
                out[i, e + 16 + j] = d * (_u8f(q >> 4) - _F8)


@njit(cache=True, parallel=True)
def _k_q4_1(src, rows, out, one):  # 20 B: d | m | qs[16]; d*q + m
    nb = out.shape[1] // 32
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 20
            e = b * 32
            d = _f16_at(src, r, o)
            m = _f16_at(src, r, o + 2)
            for j in range(16 * one):
                q = src[r, o + 4 + j]
                out[i, e + j] = d * _u8f(q & 15) + m
                out[i, e + 16 + j] = d * _u8f(q >> 4) + m


@njit(cache=True, parallel=True)
def _k_q5_0(src, rows, out, one):  # 22 B: d | qh u32 (bit j = bit 4 of elem j) | qs[16]; d*(q-16)
    nb = out.shape[1] // 32
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 22
            e = b * 32
            d = _f16_at(src, r, o)
            qh_lo = np.int32(src[r, o + 2]) | (np.int32(src[r, o + 3]) << 8)  # bits of elems 0..15
            qh_hi = np.int32(src[r, o + 4]) | (np.int32(src[r, o + 5]) << 8)  # elems 16..31
            for j in range(16 * one):
                q = src[r, o + 6 + j]
                lo = _u8f(q & 15) - (_F0 if (qh_lo & _BIT16[j]) != 0 else _F16)
                hi = _u8f(q >> 4) - (_F0 if (qh_hi & _BIT16[j]) != 0 else _F16)
                out[i, e + j] = d * lo
                out[i, e + 16 + j] = d * hi


@njit(cache=True, parallel=True)
def _k_q5_1(src, rows, out, one):  # 24 B: d | m | qh u32 | qs[16]; d*q + m
    nb = out.shape[1] // 32
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 24
            e = b * 32
            d = _f16_at(src, r, o)
            m = _f16_at(src, r, o + 2)
            qh_lo = np.int32(src[r, o + 4]) | (np.int32(src[r, o + 5]) << 8)
            qh_hi = np.int32(src[r, o + 6]) | (np.int32(src[r, o + 7]) << 8)
            for j in range(16 * one):
                q = src[r, o + 8 + j]
                lo = _u8f(q & 15) + (_F16 if (qh_lo & _BIT16[j]) != 0 else _F0)
                hi = _u8f(q >> 4) + (_F16 if (qh_hi & _BIT16[j]) != 0 else _F0)
                out[i, e + j] = d * lo + m
                out[i, e + 16 + j] = d * hi + m


@njit(cache=True, parallel=True)
def _k_q8_0(src, rows, out, one):  # 34 B: d | qs int8[32]; q*d
    # the row's scales first (a loop of its own: ~15% faster than decoding each next to its block)
    nb = out.shape[1] // 32
    for i in prange(rows.shape[0]):
        r = rows[i]
        ds = np.empty(nb, np.float32)
        for b in range(nb):
            ds[b] = _f16_at(src, r, b * 34)
        for b in range(nb):
            o = b * 34
            e = b * 32
            d = ds[b]
            for j in range(32 * one):
                out[i, e + j] = np.float32(np.int8(src[r, o + 2 + j])) * d


@njit(cache=True, parallel=True)
def _k_q2_k(src, rows, out, one):  # 84 B: scales[16] (lo4 scale, hi4 min) | qs[64] | d | dmin
    nb = out.shape[1] // 256
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 84
            e0 = b * 256
            d = _f16_at(src, r, o + 80)
            dmin = _f16_at(src, r, o + 82)
            for g in range(2):  # 32 bytes of qs -> 128 elements: 2-bit field j of byte l -> elem 32j+l
                for half in range(2):  # 16-element sub-blocks k = 8g + 2j + half; (d*sc)*q - dmin*m
                    k = o + g * 8 + half
                    dl0 = d * _f(src[r, k] & 15)
                    ml0 = dmin * _f(src[r, k] >> 4)
                    dl1 = d * _f(src[r, k + 2] & 15)
                    ml1 = dmin * _f(src[r, k + 2] >> 4)
                    dl2 = d * _f(src[r, k + 4] & 15)
                    ml2 = dmin * _f(src[r, k + 4] >> 4)
                    dl3 = d * _f(src[r, k + 6] & 15)
                    ml3 = dmin * _f(src[r, k + 6] >> 4)
                    qo = o + 16 + g * 32 + half * 16
                    eo = e0 + g * 128 + half * 16
                    for l in range(16 * one):
                        q = src[r, qo + l]
                        out[i, eo + l] = dl0 * _u8f(q & 3) - ml0
                        out[i, eo + 32 + l] = dl1 * _u8f((q >> 2) & 3) - ml1
                        out[i, eo + 64 + l] = dl2 * _u8f((q >> 4) & 3) - ml2
                        out[i, eo + 96 + l] = dl3 * _u8f(q >> 6) - ml3


@njit(cache=True, inline="always")
def _q3_scale(src, r, o, k):
    """Signed 6-bit scale of 16-element sub-block ``k`` (0..15) from the 12 bytes at ``src[r, o:]``."""
    if k < 8:
        lo = np.int32(src[r, o + k]) & 15
    else:
        lo = np.int32(src[r, o + k - 8]) >> 4
    hi = (np.int32(src[r, o + 8 + (k & 3)]) >> (2 * (k >> 2))) & 3
    return (lo | (hi << 4)) - 32


@njit(cache=True, parallel=True)
def _k_q3_k(src, rows, out, one):  # 110 B: hmask[32] | qs[64] | scales[12] (6-bit packed) | d
    nb = out.shape[1] // 256
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 110
            e0 = b * 256
            d = _f16_at(src, r, o + 108)
            for g in range(2):  # like Q2_K; q = 2-bit field - 4 unless bit 4g+j of hmask[l] is set
                m0 = np.uint8(1 << (4 * g))
                m1 = np.uint8(2 << (4 * g))
                m2 = np.uint8(4 << (4 * g))
                m3 = np.uint8(8 << (4 * g))
                for half in range(2):
                    k = g * 8 + half
                    dl0 = d * _f(_q3_scale(src, r, o + 96, k))
                    dl1 = d * _f(_q3_scale(src, r, o + 96, k + 2))
                    dl2 = d * _f(_q3_scale(src, r, o + 96, k + 4))
                    dl3 = d * _f(_q3_scale(src, r, o + 96, k + 6))
                    qo = o + 32 + g * 32 + half * 16
                    ho = o + half * 16
                    eo = e0 + g * 128 + half * 16
                    for l in range(16 * one):
                        q = src[r, qo + l]
                        h = src[r, ho + l]
                        out[i, eo + l] = dl0 * (_u8f(q & 3) - (_F0 if np.uint8(h & m0) != 0 else _F4))
                        out[i, eo + 32 + l] = dl1 * (_u8f((q >> 2) & 3) - (_F0 if np.uint8(h & m1) != 0 else _F4))
                        out[i, eo + 64 + l] = dl2 * (_u8f((q >> 4) & 3) - (_F0 if np.uint8(h & m2) != 0 else _F4))
                        out[i, eo + 96 + l] = dl3 * (_u8f(q >> 6) - (_F0 if np.uint8(h & m3) != 0 else _F4))


@njit(cache=True, inline="always")
def _k4_scale_min(src, r, o, j):
    """6-bit scale and min of sub-block ``j`` (0..7) from the 12 packed bytes at ``src[r, o:o+12]``."""
    if j < 4:
        sc = np.int32(src[r, o + j]) & 63
        mn = np.int32(src[r, o + 4 + j]) & 63
    else:
        sc = (np.int32(src[r, o + 4 + j]) & 15) | ((np.int32(src[r, o + j - 4]) >> 2) & 48)
        mn = (np.int32(src[r, o + 4 + j]) >> 4) | ((np.int32(src[r, o + j]) >> 2) & 48)
    return sc, mn


@njit(cache=True, parallel=True)
def _k_q4_k(src, rows, out, one):  # 144 B: d | dmin | scales[12] | qs[128]; (d*sc)*q - dmin*m
    nb = out.shape[1] // 256
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 144
            e0 = b * 256
            d = _f16_at(src, r, o)
            dmin = _f16_at(src, r, o + 2)
            for g in range(4):  # 32 bytes -> 64 elements (lo nibbles, then hi nibbles)
                sc1, m1 = _k4_scale_min(src, r, o + 4, 2 * g)
                sc2, m2 = _k4_scale_min(src, r, o + 4, 2 * g + 1)
                d1 = d * _f(sc1)
                dm1 = dmin * _f(m1)
                d2 = d * _f(sc2)
                dm2 = dmin * _f(m2)
                qo = o + 16 + g * 32
                eo = e0 + g * 64
                for l in range(32 * one):
                    q = src[r, qo + l]
                    out[i, eo + l] = d1 * _u8f(q & 15) - dm1
                    out[i, eo + 32 + l] = d2 * _u8f(q >> 4) - dm2


@njit(cache=True, parallel=True)
def _k_q5_k(src, rows, out, one):  # 176 B: d | dmin | scales[12] | qh[32] | qs[128]
    nb = out.shape[1] // 256
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 176
            e0 = b * 256
            d = _f16_at(src, r, o)
            dmin = _f16_at(src, r, o + 2)
            for g in range(4):
                sc1, m1 = _k4_scale_min(src, r, o + 4, 2 * g)
                sc2, m2 = _k4_scale_min(src, r, o + 4, 2 * g + 1)
                d1 = d * _f(sc1)
                dm1 = dmin * _f(m1)
                d2 = d * _f(sc2)
                dm2 = dmin * _f(m2)
                hm1 = np.uint8(1 << (2 * g))  # qh bit plane of sub-block 2g; 2g+1 next
                hm2 = np.uint8(2 << (2 * g))
                qo = o + 48 + g * 32
                eo = e0 + g * 64
                for l in range(32 * one):
                    q = src[r, qo + l]
                    h = src[r, o + 16 + l]
                    q1 = _u8f(q & 15) + (_F16 if np.uint8(h & hm1) != 0 else _F0)
                    q2 = _u8f(q >> 4) + (_F16 if np.uint8(h & hm2) != 0 else _F0)
                    out[i, eo + l] = d1 * q1 - dm1
                    out[i, eo + 32 + l] = d2 * q2 - dm2


@njit(cache=True, parallel=True)
def _k_q6_k(src, rows, out, one):  # 210 B: ql[128] | qh[64] | scales int8[16] | d; (d*sc)*(q-32)
    nb = out.shape[1] // 256
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 210
            e0 = b * 256
            d = _f16_at(src, r, o + 208)
            for g in range(2):  # 128 elements from ql[64g:64g+64] (nibbles) and qh[32g:32g+32]
                # scales of the 16-element sub-blocks 8g + 2j + (l >= 16), j = 0..3
                k = o + 192 + g * 8
                s0a = d * np.float32(np.int8(src[r, k]))
                s0b = d * np.float32(np.int8(src[r, k + 1]))
                s1a = d * np.float32(np.int8(src[r, k + 2]))
                s1b = d * np.float32(np.int8(src[r, k + 3]))
                s2a = d * np.float32(np.int8(src[r, k + 4]))
                s2b = d * np.float32(np.int8(src[r, k + 5]))
                s3a = d * np.float32(np.int8(src[r, k + 6]))
                s3b = d * np.float32(np.int8(src[r, k + 7]))
                lo = o + g * 64
                ho = o + 128 + g * 32
                eo = e0 + g * 128
                # one loop of 32 with the sub-block's scale picked by a select: int32 lanes,
                # vectorizes ~1.5x better than two loops of 16 on uint8 fields
                for l in range(32 * one):
                    a = np.int32(src[r, lo + l])
                    c = np.int32(src[r, lo + 32 + l])
                    h = np.int32(src[r, ho + l])
                    first = l < 16
                    out[i, eo + l] = (s0a if first else s0b) * np.float32(((a & 15) | ((h & 3) << 4)) - 32)
                    out[i, eo + 32 + l] = (s1a if first else s1b) * np.float32(((c & 15) | ((h & 12) << 2)) - 32)
                    out[i, eo + 64 + l] = (s2a if first else s2b) * np.float32(((a >> 4) | (h & 48)) - 32)
                    out[i, eo + 96 + l] = (s3a if first else s3b) * np.float32(((c >> 4) | ((h >> 2) & 48)) - 32)


@njit(cache=True, parallel=True)
def _k_iq4_nl(src, rows, out, one):  # 18 B: d | qs[16]; d * kvalues[nibble]
    nb = out.shape[1] // 32
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 18
            e = b * 32
            d = _f16_at(src, r, o)
            for j in range(16 * one):
                q = src[r, o + 2 + j]
                out[i, e + j] = d * np.float32(_KVALUES[q & 15])
                out[i, e + 16 + j] = d * np.float32(_KVALUES[q >> 4])


@njit(cache=True, parallel=True)
def _k_iq4_xs(src, rows, out, one):  # 136 B: d | scales_h u16 | scales_l[4] | qs[128]
    nb = out.shape[1] // 256
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            o = b * 136
            e0 = b * 256
            d = _f16_at(src, r, o)
            sh = np.int32(src[r, o + 2]) | (np.int32(src[r, o + 3]) << 8)
            for k in range(8):  # 32-element sub-blocks: 16 bytes, lo nibbles then hi nibbles
                lo = (np.int32(src[r, o + 4 + (k >> 1)]) >> (4 * (k & 1))) & 15
                hi = (sh >> (2 * k)) & 3
                dl = d * _f((lo | (hi << 4)) - 32)
                qo = o + 8 + k * 16
                eo = e0 + k * 32
                for m in range(16 * one):
                    q = src[r, qo + m]
                    out[i, eo + m] = dl * np.float32(_KVALUES[q & 15])
                    out[i, eo + 16 + m] = dl * np.float32(_KVALUES[q >> 4])


# -- dispatch ------------------------------------------------------------------------------

# qtype -> (kernel, dtype the kernel reads the rows as)
_KERNELS = {
    QT.F32: (_k_f32, np.float32),
    QT.F16: (_k_f16, np.uint16),
    QT.BF16: (_k_bf16, np.uint16),
    QT.Q4_0: (_k_q4_0, np.uint8),
    QT.Q4_1: (_k_q4_1, np.uint8),
    QT.Q5_0: (_k_q5_0, np.uint8),
    QT.Q5_1: (_k_q5_1, np.uint8),
    QT.Q8_0: (_k_q8_0, np.uint8),
    QT.Q2_K: (_k_q2_k, np.uint8),
    QT.Q3_K: (_k_q3_k, np.uint8),
    QT.Q4_K: (_k_q4_k, np.uint8),
    QT.Q5_K: (_k_q5_k, np.uint8),
    QT.Q6_K: (_k_q6_k, np.uint8),
    QT.IQ4_NL: (_k_iq4_nl, np.uint8),
    QT.IQ4_XS: (_k_iq4_xs, np.uint8),
}

SUPPORTED: frozenset[QT] = frozenset(_KERNELS)


def _type_name(qtype) -> str:
    try:
        return QT(int(qtype)).name
    except (ValueError, TypeError):
        return f"#{qtype}"


def check_supported(qtype, where: str) -> QT:
    """Return ``qtype`` as a GGMLQuantizationType, or raise UserError naming ``where``."""
    try:
        t = QT(int(qtype))
    except (ValueError, TypeError):
        t = None
    if t not in SUPPORTED:
        names = ", ".join(x.name for x in sorted(SUPPORTED, key=int))
        raise UserError(f"{where}: tensor type {_type_name(qtype)} is not supported (supported: {names})")
    return t


def _rows_view(raw: np.ndarray, qtype: QT):
    """Normalize ``raw`` to a read-only C-contiguous 2-D array the kernel reads.

    Returns ``(src [R, W], lead_shape, cols)``; the dequantized tensor has shape
    ``lead_shape + (cols,)``.  Read-only so every call hits the same compiled specialization.
    """
    kernel_dtype = np.dtype(_KERNELS[qtype][1])
    a = np.asarray(raw)
    if a.ndim == 0:
        raise ValueError(f"dequantize {qtype.name}: expected an array with at least one dimension")
    if a.dtype.itemsize != kernel_dtype.itemsize and a.dtype.itemsize != 1:
        raise ValueError(f"dequantize {qtype.name}: cannot read {a.dtype} data (give bytes or {kernel_dtype})")
    a = np.ascontiguousarray(a)
    if a.dtype.itemsize == 1 and a.shape[-1] % kernel_dtype.itemsize:
        raise ValueError(f"dequantize {qtype.name}: {a.shape[-1]} bytes per row is not a multiple of {kernel_dtype.itemsize}")
    a = a.view(kernel_dtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    width = a.shape[-1]
    if kernel_dtype == np.uint8:
        if width % type_size:
            raise ValueError(f"dequantize {qtype.name}: {width} bytes per row is not a multiple of the block size {type_size}")
        cols = width // type_size * block_size
    else:
        cols = width
    src = a.reshape(int(np.prod(a.shape[:-1], dtype=np.int64)), width).view()  # (-1 fails when width is 0)
    src.flags.writeable = False
    return src, a.shape[:-1], cols


def _check_out(out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or tuple(out.shape) != tuple(shape):
        got = f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}"
        raise ValueError(f"dequantize: out must be float32 of shape {tuple(shape)}, got {got}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("dequantize: out must be C-contiguous and writeable")
    return out


def _run(qtype: QT, src: np.ndarray, rows: np.ndarray, out2d: np.ndarray) -> None:
    kernel = _KERNELS[qtype][0]
    kernel(src, rows, out2d.view(np.uint32) if qtype == QT.BF16 else out2d, 1)


def dequantize(raw: np.ndarray, qtype, out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize a whole tensor: raw ``[..., bytes_per_row]`` (or typed ``[..., cols]``) -> f32 ``[..., cols]``.

    1-D input gives a 1-D result.  With ``out`` (C-contiguous float32 of the result shape) the
    result is written there and ``out`` is returned.  Always returns memory it owns or ``out``
    (F32 data is copied, never returned as a view of the file).
    """
    qtype = check_supported(qtype, "dequantize")
    src, lead, cols = _rows_view(raw, qtype)
    shape = (*lead, cols)
    out = np.empty(shape, np.float32) if out is None else _check_out(out, shape)
    _run(qtype, src, np.arange(src.shape[0], dtype=np.int64), out.reshape(src.shape[0], cols))
    return out


def dequantize_rows(raw: np.ndarray, qtype, row0: int, row1: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``row0:row1`` of the tensor (leading dims flattened into rows) -> f32 ``[row1-row0, cols]``."""
    qtype = check_supported(qtype, "dequantize_rows")
    src, _, cols = _rows_view(raw, qtype)
    n = src.shape[0]
    row0, row1 = int(row0), int(row1)
    if not 0 <= row0 <= row1 <= n:
        raise IndexError(f"dequantize_rows: rows {row0}:{row1} out of range for a tensor with {n} rows")
    shape = (row1 - row0, cols)
    out = np.empty(shape, np.float32) if out is None else _check_out(out, shape)
    _run(qtype, src, np.arange(row0, row1, dtype=np.int64), out)
    return out


def dequantize_take(raw: np.ndarray, qtype, ids, out: np.ndarray | None = None) -> np.ndarray:
    """Gather rows ``ids`` (e.g. token ids into an embedding) -> f32 ``[len(ids), cols]``."""
    qtype = check_supported(qtype, "dequantize_take")
    src, _, cols = _rows_view(raw, qtype)
    rows = np.ascontiguousarray(np.asarray(ids).ravel(), dtype=np.int64)
    n = src.shape[0]
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"dequantize_take: row ids must be in [0, {n}), got {rows.min()}..{rows.max()}")
    shape = (rows.shape[0], cols)
    out = np.empty(shape, np.float32) if out is None else _check_out(out, shape)
    _run(qtype, src, rows, out)
    return out


def dequantize_tensor(t, out: np.ndarray | None = None) -> np.ndarray:
    """A gguf ``ReaderTensor`` -> float32 in numpy order (ggml's [ne0, ne1] is numpy's (ne1, ne0))."""
    res = dequantize(t.data, t.tensor_type, out=out)
    want = tuple(int(x) for x in reversed(np.asarray(t.shape).tolist()))
    if res.shape != want:  # the reader derives data's shape from the header, so this is a bug
        raise ValueError(f"dequantize_tensor '{t.name}': got shape {res.shape}, header says {want}")
    return res


def dequantize_reference(raw: np.ndarray, qtype) -> np.ndarray:
    """The slow numpy reference: ``gguf.quants.dequantize`` on the same input, as float32."""
    qtype = check_supported(qtype, "dequantize_reference")
    src, lead, cols = _rows_view(raw, qtype)
    if qtype == QT.F32:
        res = np.asarray(gq.dequantize(src, qtype))
    else:
        res = gq.dequantize(src.view(np.uint8), qtype)
    return np.asarray(res, dtype=np.float32).reshape(*lead, cols)


# -- test/benchmark data -------------------------------------------------------------------

# byte offsets of the f16 fields inside one block
_F16_FIELDS = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
    QT.IQ4_NL: (0,), QT.IQ4_XS: (0,),
}


def _finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random finite f16 bit patterns (any sign, exponent 0..30 incl. subnormals, any mantissa)."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    exp = rng.integers(0, 31, size=n, dtype=np.uint16)
    return (bits & np.uint16(0x83FF)) | (exp << np.uint16(10))


def random_raw(qtype, rows: int, cols: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Random valid data of shape ``[rows, cols]`` as raw uint8 ``[rows, bytes_per_row]``.

    Quantized types: random bytes with every f16 scale field finite (so nothing dequantizes to
    NaN).  F16: finite random halves.  F32/BF16: random finite values.
    """
    qtype = check_supported(qtype, "random_raw")
    rng = np.random.default_rng(0) if rng is None else rng
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block_size:
        raise ValueError(f"random_raw {qtype.name}: cols {cols} is not a multiple of {block_size}")
    if qtype == QT.F32:
        return rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8)
    if qtype == QT.F16:
        return _finite_f16_bits(rng, rows * cols).reshape(rows, cols).view(np.uint8)
    if qtype == QT.BF16:
        return (rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    nblk = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(nblk, type_size), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        blocks[:, off:off + 2] = _finite_f16_bits(rng, nblk).view(np.uint8).reshape(nblk, 2)
    return blocks.reshape(rows, cols // block_size * type_size)
