"""Next-token sampling as llama.cpp's default sampler chain does it, seeded and deterministic.

Order (llama.cpp ``common_sampler``): top-k -> top-p -> min-p -> temperature -> draw.  The draw is
llama.cpp's ``dist`` sampler: softmax of what is left, then ``std::discrete_distribution<int>``
with a ``std::mt19937`` seeded once (both ported bit for bit from libstdc++), so the same logits
and seed give the token llama.cpp would pick.  ``temp <= 0`` is greedy: the first highest logit,
no random number drawn.

The filters work on a candidate list (ids, logits) sorted by logit, descending; ties are broken by
the lower token id (llama.cpp's std::sort leaves their order unspecified).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .stdcpp import MT19937

SEED_RANDOM = -1  # llama.cpp: LLAMA_DEFAULT_SEED (0xFFFFFFFF) = a random seed


@dataclass(frozen=True)
class SamplerParams:
    """llama.cpp's defaults: temp 0.8, top-k 40, top-p 0.95, min-p 0.05."""

    temp: float = 0.8  # <= 0: greedy
    top_k: int = 40  # <= 0: whole vocabulary
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    seed: int = SEED_RANDOM  # -1: random
    min_keep: int = 0  # llama.cpp's common default


def resolve_seed(seed: int) -> int:
    """-1 (or llama.cpp's 0xFFFFFFFF) -> a fresh random 32-bit seed; anything else mod 2^32."""
    if seed == SEED_RANDOM or seed == 0xFFFFFFFF:
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    return int(seed) & 0xFFFFFFFF


# -- the filters, each on candidates sorted by logit (descending) ----------------------------------

def sort_candidates(logits: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """logits [V] -> (ids, logits) of the k best (all when k is None), descending, ties by id."""
    logits = np.asarray(logits, dtype=np.float32)
    V = logits.shape[0]
    if k is not None and k < V:
        part = np.argpartition(-logits, k - 1)[:k]  # the k largest, unordered
        # a tie at the k-th value must keep the lowest ids: take every id with logit > cutoff,
        # then fill with the lowest ids equal to it
        cut = logits[part].min()
        above = np.flatnonzero(logits > cut)
        equal = np.flatnonzero(logits == cut)[: k - above.size]
        ids = np.concatenate([above, equal])
    else:
        ids = np.arange(V)
    order = np.lexsort((ids, -logits[ids]))  # by logit descending, then id ascending
    ids = ids[order]
    return ids, logits[ids]


def softmax_sorted(logits: np.ndarray) -> np.ndarray:
    """llama.cpp's softmax of sorted candidates, in float32: expf(l - l[0]) / (sequential float sum)."""
    e = np.exp(logits - logits[0], dtype=np.float32)  # [n]
    total = np.cumsum(e, dtype=np.float32)[-1]  # left-to-right float32 sum, as the C loop
    return e / total


def top_p_cut(logits: np.ndarray, p: float, min_keep: int = 0) -> int:
    """How many sorted candidates top-p keeps: the first n whose probabilities add up to >= p."""
    if p >= 1.0:
        return logits.shape[0]
    cum = np.cumsum(softmax_sorted(logits), dtype=np.float32)  # float32 running sum, as llama.cpp
    ok = (cum >= np.float32(p)) & (np.arange(1, cum.shape[0] + 1) >= min_keep)
    hits = np.flatnonzero(ok)
    return int(hits[0]) + 1 if hits.size else logits.shape[0]


def min_p_cut(logits: np.ndarray, p: float, min_keep: int = 0) -> int:
    """How many sorted candidates min-p keeps: those with p_i >= p * p_max (logit >= max + log p)."""
    if p <= 0.0 or logits.shape[0] == 0:
        return logits.shape[0]
    min_logit = np.float32(logits[0] + np.log(np.float32(p), dtype=np.float32))
    n = int(np.count_nonzero(logits >= min_logit))  # sorted: a prefix
    return max(n, 1, min(min_keep, logits.shape[0]))  # the first candidate always stays


def discrete_distribution(probs: np.ndarray, rng: MT19937) -> int:
    """libstdc++ ``std::discrete_distribution<int>(probs)(rng)`` with ``std::mt19937``.

    Weights are normalized in double, accumulated (last = 1.0), and the index is the first
    cumulative value >= u, where u = ``generate_canonical<double, 53>`` (two 32-bit draws).
    A single weight returns 0 without drawing.
    """
    w = np.asarray(probs, dtype=np.float64)
    if w.shape[0] < 2:
        return 0
    total = 0.0
    for x in w.tolist():  # std::accumulate: left to right
        total += x
    cp = np.cumsum(w / total)  # std::partial_sum in double, left to right
    cp[-1] = 1.0
    u1, u2 = rng(), rng()
    u = (float(u1) + float(u2) * 4294967296.0) / 18446744073709551616.0
    if u >= 1.0:
        u = float(np.nextafter(1.0, 0.0))
    return int(np.searchsorted(cp, u, side="left"))


class Sampler:
    """``sample(logits [V]) -> token id`` with llama.cpp's chain; one mt19937 for the whole run."""

    def __init__(self, params: SamplerParams = SamplerParams()):
        self.params = params
        self.seed = resolve_seed(params.seed)
        self.rng = MT19937(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        return self.sample(logits)

    def sample(self, logits: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if p.temp <= 0.0:
            return int(np.argmax(logits))  # first of equal maxima
        V = logits.shape[0]
        k = p.top_k if 0 < p.top_k < V else None
        ids, cand = sort_candidates(logits, k)
        n = top_p_cut(cand, p.top_p, p.min_keep)
        n = min(n, min_p_cut(cand[:n], p.min_p, p.min_keep))
        ids, cand = ids[:n], cand[:n] / np.float32(p.temp)
        return int(ids[discrete_distribution(softmax_sorted(cand), self.rng)])


def sample_ref(logits: np.ndarray, params: SamplerParams, rng: MT19937) -> int:
    """Slow, step-by-step version of :meth:`Sampler.sample` (a list of (id, logit) pairs)."""
    if params.temp <= 0:
        best = 0
        for i, v in enumerate(logits.tolist()):
            if v > logits[best]:
                best = i
        return best
    cand = sorted(((float(np.float32(v)), i) for i, v in enumerate(np.asarray(logits, np.float32).tolist())),
                  key=lambda t: (-t[0], t[1]))
    if params.top_k > 0:
        cand = cand[: params.top_k]

    def probs(c):
        m = np.float32(c[0][0])
        e = [np.float32(np.exp(np.float32(v - m), dtype=np.float32)) for v, _ in c]
        s = np.float32(0)
        for x in e:
            s = np.float32(s + x)
        return [np.float32(x / s) for x in e]

    if params.top_p < 1.0:
        cum, keep = np.float32(0), len(cand)
        for i, pr in enumerate(probs(cand)):
            cum = np.float32(cum + pr)
            if cum >= np.float32(params.top_p) and i + 1 >= params.min_keep:
                keep = i + 1
                break
        cand = cand[:keep]
    if params.min_p > 0.0:
        lim = np.float32(cand[0][0] + np.log(np.float32(params.min_p), dtype=np.float32))
        i = 1
        while i < len(cand) and not (cand[i][0] < lim and i >= params.min_keep):
            i += 1
        cand = cand[:i]
    cand = [(float(np.float32(v) / np.float32(params.temp)), i) for v, i in cand]
    return cand[discrete_distribution(np.array(probs(cand)), rng)][1]
