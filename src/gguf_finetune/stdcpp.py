"""Bit-exact Python ports of the libstdc++ pieces llama.cpp's finetune relies on.

* :class:`MT19937` — ``std::mt19937``: seeding, generation (vectorised twist for bulk draws), and the
  text form ``operator<<`` / ``operator>>`` write and read (624 state words, then the position, all
  decimal, space separated — e.g. ``"7 4097098180 ... 624"`` for a fresh ``std::mt19937(7)``).
* :func:`generate_canonical_float` / :class:`NormalDistributionF32` — ``std::generate_canonical<float,24>``
  and ``std::normal_distribution<float>`` (Marsaglia polar method, one value cached), which llama.cpp uses
  to initialise LoRA A matrices.
* :func:`hash_bytes` / :func:`hash_string` — libstdc++ ``std::hash<std::string>`` on 64-bit targets
  (``_Hash_bytes``: MurmurHash2-64 variant, seed 0xc70f6907); :func:`hash_combine` — llama.cpp's
  ``h1 ^ (h2 << 1)``.

Only libstdc++ (GCC, Linux) semantics are reproduced; libc++ (macOS) writes a different state string.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
from numba import njit

from .errors import UserError

N = 624
M = 397
_MATRIX_A = np.uint32(0x9908B0DF)
_UPPER = np.uint32(0x80000000)
_LOWER = np.uint32(0x7FFFFFFF)
MT19937_MAX = 0xFFFFFFFF

_MASK64 = (1 << 64) - 1


def _twist(x: np.ndarray) -> np.ndarray:
    """Regenerate all 624 words as libstdc++ ``_M_gen_rand`` does, in four vectorised chunks.

    Sequentially, word i reads x[i], x[i+1] (old) and x[(i+397) % 624] — old for i < 227, already
    regenerated for i >= 227.  The chunks below respect exactly those dependencies.
    """
    x = x.copy()

    def mix(cur, nxt, far):
        y = (cur & _UPPER) | (nxt & _LOWER)
        return far ^ (y >> np.uint32(1)) ^ np.where((y & np.uint32(1)) != 0, _MATRIX_A, np.uint32(0))

    # i in [0, 227): far = x[i+397], all old
    x[0:227] = mix(x[0:227], x[1:228], x[397:624])
    # i in [227, 454): far = x[i-227] in [0, 227) -> new values from chunk 1
    x[227:454] = mix(x[227:454], x[228:455], x[0:227])
    # i in [454, 623): far = x[i-227] in [227, 396) -> new values from chunk 2
    x[454:623] = mix(x[454:623], x[455:624], x[227:396])
    # i = 623: next word is the new x[0], far = new x[396]
    x[623:624] = mix(x[623:624], x[0:1], x[396:397])
    return x


def _temper(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> np.uint32(11))
    y = y ^ ((y << np.uint32(7)) & np.uint32(0x9D2C5680))
    y = y ^ ((y << np.uint32(15)) & np.uint32(0xEFC60000))
    y = y ^ (y >> np.uint32(18))
    return y


class MT19937:
    """``std::mt19937`` with libstdc++'s state layout (``_M_x[624]``, ``_M_p``)."""

    __slots__ = ("_x", "_p")

    def __init__(self, seed: int = 5489):
        self.seed(seed)

    def seed(self, seed: int) -> None:
        x = [0] * N
        x[0] = int(seed) & 0xFFFFFFFF
        for i in range(1, N):
            prev = x[i - 1]
            x[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
        self._x = np.array(x, dtype=np.uint32)
        self._p = N

    # -- generation ----------------------------------------------------------------------------
    def __call__(self) -> int:
        if self._p >= N:
            self._x = _twist(self._x)
            self._p = 0
        y = int(self._x[self._p])
        self._p += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y

    def generate(self, n: int) -> np.ndarray:
        """The next ``n`` outputs as uint32 [n] (same values as n calls, much faster)."""
        out = np.empty(int(n), dtype=np.uint32)
        filled = 0
        while filled < n:
            if self._p >= N:
                self._x = _twist(self._x)
                self._p = 0
            take = min(N - self._p, n - filled)
            out[filled:filled + take] = _temper(self._x[self._p:self._p + take])
            self._p += take
            filled += take
        return out

    def discard(self, n: int) -> None:
        self.generate(n)

    # -- text form ------------------------------------------------------------------------------
    def state_string(self) -> str:
        """What libstdc++ ``os << rng`` writes: 624 words then the position, space separated."""
        return " ".join(map(str, self._x.tolist())) + " " + str(self._p)

    @classmethod
    def from_state_string(cls, s: str, what: str = "mt19937 state") -> "MT19937":
        """Parse what ``state_string`` (or libstdc++ ``operator<<``) wrote, as ``is >> rng`` would."""
        parts = s.split()
        if len(parts) != N + 1:
            raise UserError(f"{what}: expected {N + 1} numbers, got {len(parts)}")
        try:
            vals = [int(p, 10) for p in parts]
        except ValueError:
            raise UserError(f"{what}: not a list of decimal integers") from None
        if any(v < 0 or v > 0xFFFFFFFF for v in vals[:N]):
            raise UserError(f"{what}: state word out of 32-bit range")
        if not 0 <= vals[N] <= N:
            raise UserError(f"{what}: position {vals[N]} out of range 0..{N}")
        rng = cls.__new__(cls)
        rng._x = np.array(vals[:N], dtype=np.uint32)
        rng._p = vals[N]
        return rng

    def copy(self) -> "MT19937":
        rng = MT19937.__new__(MT19937)
        rng._x = self._x.copy()
        rng._p = self._p
        return rng

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MT19937) and self._p == other._p and bool(np.array_equal(self._x, other._x))


def mt19937_seed_to_state(seed: int) -> str:
    """llama.cpp ``mt19937_seed_to_state``: the state string of a freshly seeded engine."""
    return MT19937(seed).state_string()


# -- distributions --------------------------------------------------------------------------------
_F32_BELOW_ONE = np.nextafter(np.float32(1.0), np.float32(0.0))


def canonical_float_from_u32(u: np.ndarray) -> np.ndarray:
    """``std::generate_canonical<float, 24>`` applied to mt19937 outputs ``u`` (uint32 [n]) → float32 [n].

    One draw per value (2^32 range covers 24 bits): float(u) / 2^32, and a result of exactly 1.0
    (u rounds up to 2^32) is replaced by nextafter(1, 0).
    """
    r = np.asarray(u, dtype=np.uint32).astype(np.float32) / np.float32(4294967296.0)
    return np.where(r >= np.float32(1.0), _F32_BELOW_ONE, r).astype(np.float32)


def generate_canonical_float(rng: MT19937) -> float:
    return float(canonical_float_from_u32(np.array([rng()], dtype=np.uint32))[0])


@njit(cache=True)
def _polar_mult_nb(r2):  # pragma: no cover - compiled
    out = np.empty_like(r2)
    for i in range(r2.shape[0]):
        r = r2[i]
        out[i] = np.sqrt(np.float32(-2.0) * np.log(r) / r)  # float32 throughout; np.log -> libm logf
    return out


def polar_mult(r2: np.ndarray) -> np.ndarray:
    """sqrtf(-2·logf(r2)/r2) for float32 r2 [n] (numba, which calls the C library's logf)."""
    return _polar_mult_nb(np.ascontiguousarray(r2, dtype=np.float32))


def polar_mult_ref(r2: np.ndarray) -> np.ndarray:
    """Slow reference of :func:`polar_mult`: the C library's logf through ctypes, one call per value.
    (numpy's float32 log and a rounded float64 log both differ from glibc's logf in ~1% of cases.)"""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.logf.restype = ctypes.c_float
    libm.logf.argtypes = [ctypes.c_float]
    out = np.empty(len(r2), dtype=np.float32)
    for i, r in enumerate(np.asarray(r2, dtype=np.float32)):
        out[i] = np.sqrt(np.float32(np.float32(-2.0) * np.float32(libm.logf(float(r)))) / r, dtype=np.float32)
    return out


class NormalDistributionF32:
    """libstdc++ ``std::normal_distribution<float>``: Marsaglia polar method on canonical floats.

    Each accepted pair (x, y) yields y*mult first and caches x*mult for the next call; the cache
    lives in the distribution object, so values are drawn across tensors in one stream.  Arithmetic
    is float32 as in the C++ (``2.0f*u - 1.0`` is computed in double and rounded to float; logf is the
    C library's, see :func:`polar_mult`).
    Caveat: a build that fuses ``x*x + y*y`` into an FMA (e.g. aarch64 with -ffp-contract=fast) can
    differ in the last bit and, very rarely, in the rejection decision.
    """

    def __init__(self, mean: float = 0.0, stddev: float = 1.0):
        self.mean = np.float32(mean)
        self.stddev = np.float32(stddev)
        self._saved: float | None = None

    def sample(self, rng: MT19937, n: int) -> np.ndarray:
        """The next ``n`` values as float32 [n], consuming ``rng`` exactly as n calls would."""
        out = np.empty(int(n), dtype=np.float32)
        k = 0
        if k < n and self._saved is not None:
            out[k] = self._saved
            self._saved = None
            k += 1
        while k < n:
            need = n - k
            pairs_needed = (need + 1) // 2
            # acceptance probability is pi/4; over-draw a little, then trim to what was consumed
            n_pairs = int(pairs_needed / 0.78) + 8
            u = canonical_float_from_u32(rng.copy().generate(2 * n_pairs))
            xs = ((np.float32(2.0) * u[0::2]).astype(np.float64) - 1.0).astype(np.float32)
            ys = ((np.float32(2.0) * u[1::2]).astype(np.float64) - 1.0).astype(np.float32)
            r2 = (xs * xs + ys * ys).astype(np.float32)
            ok = ~((r2 > np.float32(1.0)) | (r2 == np.float32(0.0)))
            acc = np.flatnonzero(ok)
            use = acc[:pairs_needed]
            # consume exactly the draws up to and including the last used pair
            consumed_pairs = (int(use[-1]) + 1) if len(use) == pairs_needed else n_pairs
            rng.discard(2 * consumed_pairs)
            if len(use) == 0:
                continue
            xa, ya, ra = xs[use], ys[use], r2[use]
            mult = polar_mult(ra)
            first = (ya * mult).astype(np.float32)   # returned
            second = (xa * mult).astype(np.float32)  # cached
            vals = np.empty(2 * len(use), dtype=np.float32)
            vals[0::2] = first
            vals[1::2] = second
            take = min(need, len(vals))
            out[k:k + take] = vals[:take]
            k += take
            if take < len(vals):  # odd count: the last pair's x*mult stays cached
                self._saved = float(vals[take])
        if self.mean == 0.0 and self.stddev == 1.0:
            return out
        return (out * self.stddev + self.mean).astype(np.float32)

    def __call__(self, rng: MT19937) -> float:
        return float(self.sample(rng, 1)[0])


# -- std::hash ------------------------------------------------------------------------------------
_HASH_SEED = 0xC70F6907
_MUL = (0xC6A4A793 << 32) + 0x5BD1E995


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


def hash_bytes(data: bytes, seed: int = _HASH_SEED) -> int:
    """libstdc++ 64-bit ``_Hash_bytes(ptr, len, seed)``."""
    n = len(data)
    h = (seed ^ ((n * _MUL) & _MASK64)) & _MASK64
    aligned = n & ~7
    for off in range(0, aligned, 8):
        d = int.from_bytes(data[off:off + 8], "little")
        d = (_shift_mix((d * _MUL) & _MASK64) * _MUL) & _MASK64
        h ^= d
        h = (h * _MUL) & _MASK64
    if n & 7:
        d = int.from_bytes(data[aligned:], "little")
        h ^= d
        h = (h * _MUL) & _MASK64
    h = (_shift_mix(h) * _MUL) & _MASK64
    return _shift_mix(h)


def hash_string(s: str | bytes) -> int:
    """``std::hash<std::string>{}(s)`` (str is taken as its UTF-8 bytes)."""
    return hash_bytes(s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s))


def hash_combine(h1: int, h2: int) -> int:
    """llama.cpp ``hash_combine``: ``h1 ^ (h2 << 1)`` on 64-bit size_t."""
    return (h1 ^ ((h2 << 1) & _MASK64)) & _MASK64


# -- llama.cpp's use of the above -----------------------------------------------------------------
def llamacpp_randomize_normal(seed: int, shapes: list[tuple[int, ...]], mean: float = 0.0, std: float = 1.0,
                              lo: float = -1.0, hi: float = 1.0) -> list[np.ndarray]:
    """finetune's ``randomize_lora`` for the A matrices: one ``std::mt19937(seed)`` and one
    ``std::normal_distribution<float>(mean, std)`` shared by all tensors in order; each value clamped to
    [lo, hi] and multiplied by 1/sqrtf(ne0 + ne1) (1/sqrtf(ne0) for 1-D tensors).

    ``shapes`` are ggml shapes (ne0 first); returns float32 arrays of numpy shape reversed(shape).
    """
    rng = MT19937(int(seed) & 0xFFFFFFFF)
    nd = NormalDistributionF32(mean, std)
    out = []
    for shp in shapes:
        ne = [int(x) for x in shp]
        n = int(np.prod(ne))
        dims = len(ne)
        while dims > 1 and ne[dims - 1] == 1:  # ggml_n_dims ignores trailing 1s
            dims -= 1
        denom = np.float32(ne[0]) if dims == 1 else np.float32(ne[0]) + np.float32(ne[1])
        scale = np.float32(1.0) / np.sqrt(denom, dtype=np.float32)
        vals = np.clip(nd.sample(rng, n), np.float32(lo), np.float32(hi)).astype(np.float32)
        out.append((scale * vals).astype(np.float32).reshape(tuple(reversed(ne))))
    return out
