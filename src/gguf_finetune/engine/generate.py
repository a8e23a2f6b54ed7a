"""Incremental decoding with a KV cache: prefill a prompt in one pass, then one token at a time.

Shapes: C = n_embd, F = n_ff, Hq/Hkv query/KV heads of size D (G = Hq // Hkv), V = n_vocab,
L = n_layer, T_max = the context the cache holds, T = tokens of one :meth:`Decoder.eval` pass.

The cache keeps, per layer, the keys after RoPE at their absolute positions and the values:

    k: [L, Hkv, D, T_max]   (transposed, so a query's scores read contiguous rows of keys)
    v: [L, Hkv, T_max, D]

A pass over T new tokens at positions p0..p0+T-1 runs the same pieces as
:func:`~gguf_finetune.engine.forward.layer_forward` (RMSNorm, factored LoRA linears, RoPE, SwiGLU
— the same kernels), writes its keys and values into the cache, and lets query i attend to cache
positions 0..p0+i.  The attention kernel repeats the flash forward's arithmetic step for step, so
a prompt prefilled at p0 = 0 gives the same attention output as the training forward pass; the
only differences from :meth:`Model.logits` come from BLAS rounding of matrix products of other
shapes (one row instead of T).

Per generated token the Python work is one loop over layers (a dozen kernel calls each).  Passes
of up to ``QUANT_MAX_T`` tokens (every decode step) multiply the weights in the file's own
quantized blocks (:mod:`.qmatvec`: 0.5-1 byte per weight read instead of 4, the step's real cost);
longer passes (prefill) use BLAS on :class:`~gguf_finetune.model.Weights`' float arrays.  The
adapter is applied the same way on both paths: y = x·Wᵀ + s·(x·a)·bᵀ.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numba
import numpy as np
from numba import njit, prange

from ..arch import (
    ATTN_K_NORM,
    ATTN_NORM,
    ATTN_OUT,
    ATTN_POST_NORM,
    ATTN_Q_NORM,
    FFN_DOWN,
    FFN_NORM,
    FFN_POST_NORM,
    OUTPUT,
    OUTPUT_NORM,
    ROPE_NEOX,
    TOKEN_EMBD,
    weight,
)
from ..errors import UserError
from ..lora import LoraParams
from ..model import HParams, block_tensor
from . import kernels as K
from .forward import (
    embed_forward,
    gate_up_forward,
    gated_act,
    head_logits,
    head_norm,
    linear_forward,
    norm_weight,
    qkv_forward,
)
from .qmatvec import QuantMatrix
from .qmatvec import supported as qmv_supported

DEFAULT_BATCH = 512  # tokens per prefill pass (longer prompts are prefilled in several passes)
# passes of up to this many tokens multiply the file's quantized blocks directly (the kernels
# decode a block once per token, so longer passes are faster on BLAS)
QUANT_MAX_T = 2
# A decode step is ~10 small kernel calls per layer.  Waking numba's sleeping worker threads costs
# ~45 us per parallel call here, more than splitting a small kernel saves, so short passes run
# on the calling thread; only matrices of at least this many weights use every thread.
PARALLEL_MIN_WEIGHTS = 4 << 20


@contextlib.contextmanager
def _numba_threads(n: int):
    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(prev)


# -- attention of new queries over the cache ------------------------------------------------------

@njit(cache=True, parallel=True, fastmath=False)
def _attend_cached(q, kT, v, p0, window, scale, out):  # pragma: no cover - compiled
    # q [Hq, T, D] (query i at position p0 + i), kT [Hkv, D, T_max], v [Hkv, T_max, D]
    # -> out [Hq, T, D]; query i sees keys j0..p0+i (j0 = 0, or the last ``window`` keys when > 0),
    # through kernels._attend_row (the flash forward's row): scores accumulated over d in order,
    # scaled, max, exp and Σ (float64), Σ_j p_j v_j four keys per pass, divided by Σ.  prange over
    # (head, row): each item writes only its own row.
    Hq, T, D = q.shape
    G = Hq // kT.shape[0]
    for item in prange(Hq * T):
        h = item // T
        i = item % T
        j0 = max(0, p0 + i + 1 - window) if window > 0 else 0
        n = p0 + i + 1 - j0
        kh = kT[h // G]
        vh = v[h // G]
        s = np.empty(n, dtype=q.dtype)
        acc = np.empty(D, dtype=q.dtype)
        _, tot = K._attend_row(q[h], i, kh, vh, j0, n, scale, s, acc)
        for d in range(D):
            out[h, i, d] = acc[d] / tot


def attend_cached(q: np.ndarray, kT: np.ndarray, v: np.ndarray, p0: int, scale: float,
                  window: int = 0) -> np.ndarray:
    """q [Hq, T, D] at positions p0.., kT [Hkv, D, T_max], v [Hkv, T_max, D] -> out [Hq, T, D].

    Causal attention of T new queries over the cached keys/values 0..p0+T-1 (GQA: query head h
    reads KV head h // (Hq // Hkv)); with ``window`` > 0 a query sees only the last ``window`` keys.
    """
    q = np.ascontiguousarray(q)
    Hq, T, D = q.shape
    Hkv, _, T_max = kT.shape
    if kT.shape[1] != D or v.shape != (Hkv, T_max, D) or Hq % Hkv or p0 < 0 or p0 + T > T_max:
        raise ValueError(f"attend_cached: q {q.shape}, kT {kT.shape}, v {v.shape}, p0 {p0} do not fit")
    if kT.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError("attend_cached: q, kT and v must have the same dtype")
    out = np.empty_like(q)
    _attend_cached(q, kT, v, int(p0), int(window), q.dtype.type(scale), out)
    return out


def attend_cached_ref(q, kT, v, p0: int, scale: float, window: int = 0) -> np.ndarray:
    """Slow, obviously-correct numpy version of :func:`attend_cached` (float64 softmax)."""
    Hq, T, _ = q.shape
    G = Hq // kT.shape[0]
    out = np.empty_like(q)
    for h in range(Hq):
        for i in range(T):
            n = p0 + i + 1
            j0 = max(0, n - window) if window > 0 else 0
            s = (q[h, i].astype(np.float64) @ kT[h // G][:, j0:n].astype(np.float64)) * scale
            p = np.exp(s - s.max())
            out[h, i] = (p @ v[h // G][j0:n].astype(np.float64)) / p.sum()
    return out


# -- the decoder -----------------------------------------------------------------------------------

@dataclass
class KVCache:
    """Keys (after RoPE, transposed) and values of every layer for positions 0..n_past-1."""

    k: np.ndarray  # [L, Hkv, D, T_max]
    v: np.ndarray  # [L, Hkv, T_max, D]
    n_past: int = 0

    @classmethod
    def empty(cls, hp: HParams, n_ctx: int, dtype) -> "KVCache":
        L, Hkv, D = hp.n_layer, hp.n_head_kv, hp.head_dim
        # np.zeros: pages are only touched when written, so an unused context costs no memory
        return cls(np.zeros((L, Hkv, D, n_ctx), dtype=dtype), np.zeros((L, Hkv, n_ctx, D), dtype=dtype))

    @property
    def n_ctx(self) -> int:
        return self.k.shape[-1]


def _lora(lora: LoraParams | None, name: str):
    return None if lora is None else lora.get(name)


class Decoder:
    """One sequence of a model with a KV cache: ``eval(ids)`` appends tokens and returns logits.

        dec = Decoder(model.weights, model.hparams, model.lora, n_ctx=2048)
        last = dec.eval(prompt_ids)[-1]      # prefill: logits of the last prompt token [V]
        nxt = dec.eval([token])[-1]          # one more token
        dec.reset()                          # forget the sequence (keeps the buffers)
    """

    def __init__(self, weights, hp: HParams, lora: LoraParams | None = None, n_ctx: int | None = None,
                 n_batch: int = DEFAULT_BATCH, quantized: bool | None = None):
        n_ctx = hp.n_ctx_train if n_ctx is None else int(n_ctx)
        if n_ctx < 1:
            raise UserError(f"context size must be positive, got {n_ctx}")
        if n_batch < 1:
            raise UserError(f"batch size must be positive, got {n_batch}")
        self.weights, self.hp, self.lora = weights, hp, lora
        self.dtype = weights.dtype
        self.n_batch = int(n_batch)
        self.cache = KVCache.empty(hp, n_ctx, self.dtype)
        # RoPE tables [n_ctx, n_rot/2] per (base, scale) the layers use
        self._ropes = {}
        for il in range(hp.n_layer):
            key = hp.rope_of(il)
            if key not in self._ropes:
                self._ropes[key] = K.rope_cache(np.arange(n_ctx, dtype=np.int64), hp.n_rot, key[0], key[1], self.dtype,
                                                weights.rope_factors, hp.rope_mscale)
        self._neox = hp.spec.rope == ROPE_NEOX
        # effective norm weights (with norm adapters folded in) do not change between tokens
        self._g_att = [norm_weight(weights.layer(i)[ATTN_NORM], _lora(lora, weight(ATTN_NORM, i)))
                       for i in range(hp.n_layer)] if weights.cache_layers else None
        self._g_ffn = [norm_weight(weights.layer(i)[FFN_NORM], _lora(lora, weight(FFN_NORM, i)))
                       for i in range(hp.n_layer)] if weights.cache_layers else None
        self._g_out = norm_weight(weights.output_norm, _lora(lora, weight(OUTPUT_NORM)))
        # quantized decode: every matrix (and the head) must have a kernel; None = automatic
        self._qmats, self._qhead = None, None
        self._threads = 1  # the caller's numba thread count, for big matrices in short passes
        if quantized is not False and self.dtype == np.float32:
            found = _quant_matrices(weights, hp)
            if found is None and quantized:
                raise UserError("quantized decoding needs every weight matrix in a type with a matvec kernel")
            if found is not None:
                self._qmats, self._qhead = found

    @classmethod
    def for_model(cls, model, n_ctx: int | None = None, n_batch: int = DEFAULT_BATCH,
                  quantized: bool | None = None) -> "Decoder":
        return cls(model.weights, model.hparams, model.lora, n_ctx, n_batch, quantized)

    @property
    def quantized(self) -> bool:
        """True when short passes multiply quantized blocks directly."""
        return self._qmats is not None

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    def reset(self) -> None:
        self.cache.n_past = 0

    def eval(self, ids: Sequence[int] | np.ndarray, logits_from: int | None = None) -> np.ndarray:
        """Append ``ids`` [T] at positions n_past.. and return logits [T - logits_from, V].

        ``logits_from`` (an index into ``ids``; default T-1: only the last token's logits) skips
        the output head for earlier rows.  Prompts longer than ``n_batch`` run in several passes.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T = ids.shape[0]
        if T == 0:
            raise ValueError("eval: no tokens")
        if ids.min() < 0 or ids.max() >= self.hp.n_vocab:
            raise UserError(f"token id out of range [0, {self.hp.n_vocab})")
        if self.n_past + T > self.n_ctx:
            raise UserError(f"context is full: {self.n_past} + {T} tokens do not fit a context of {self.n_ctx} "
                            f"(give a larger --ctx)")
        first = T - 1 if logits_from is None else int(logits_from)
        if not 0 <= first < T:
            raise ValueError(f"logits_from {logits_from} is outside [0, {T})")
        out = np.empty((T - first, self.hp.n_vocab), dtype=self.dtype)
        if self._qmats is not None and T <= QUANT_MAX_T:
            self._threads = numba.get_num_threads()
            with _numba_threads(1):
                return self._eval(ids, first, out)
        return self._eval(ids, first, out)

    def _eval(self, ids: np.ndarray, first: int, out: np.ndarray) -> np.ndarray:
        T = ids.shape[0]
        for b0 in range(0, T, self.n_batch):
            b1 = min(T, b0 + self.n_batch)
            x = self._layers(ids[b0:b1])  # [b1-b0, C]
            r0 = max(first, b0)
            if r0 < b1:
                hn, _ = K.rmsnorm_forward(x[r0 - b0:], self._g_out, self.hp.rms_eps)
                if self._qhead is not None and hn.shape[0] <= QUANT_MAX_T:
                    y = linear_forward(hn, _Threaded(self._qhead, self._threads), _lora(self.lora, weight(OUTPUT)))[0]
                    if self.hp.softcap:
                        y = self.hp.softcap * np.tanh(y / self.hp.softcap)
                    out[r0 - first:b1 - first] = y
                else:
                    out[r0 - first:b1 - first], _ = head_logits(self.weights, hn, self.lora)
        return out

    def _layers(self, ids: np.ndarray) -> np.ndarray:
        """Run the blocks over ids [T] at positions n_past..; fills the cache; -> x [T, C]."""
        hp, lora = self.hp, self.lora
        p0, T = self.cache.n_past, ids.shape[0]
        x = embed_forward(self.weights, ids[None, :], lora)  # [T, C]
        quant = self._qmats is not None and T <= QUANT_MAX_T
        for il in range(hp.n_layer):
            if quant:
                lw = {n: _Threaded(w, self._threads) if isinstance(w, QuantMatrix) else w
                      for n, w in self._qmats[il].items()}
            else:
                lw = self.weights.layer(il)
            x = self._block(x, lw, il, p0)
        self.cache.n_past = p0 + T
        return x

    def _block(self, x: np.ndarray, lw, il: int, p0: int) -> np.ndarray:
        """One transformer block over x [T, C] at positions p0..p0+T-1 -> [T, C]: the training
        forward's steps (engine/forward.py) with attention over the cache.

        ``lw``: the block's float weights, or its matrices as quantized blocks (anything with
        ``matmul``) next to float norms and biases.
        """
        hp, lora, spec = self.hp, self.lora, self.hp.spec
        T, (Hq, Hkv, D, eps) = x.shape[0], (hp.n_head, hp.n_head_kv, hp.head_dim, hp.rms_eps)
        us: dict = {}
        g_att = self._g_att[il] if self._g_att is not None else \
            norm_weight(lw[ATTN_NORM], _lora(lora, weight(ATTN_NORM, il)))
        h1, _ = K.rmsnorm_forward(x, g_att, eps)  # [T, C]
        q, k, v = qkv_forward(h1, lw, il, hp, lora, us)  # [T, Cq], [T, Ckv], [T, Ckv]
        if spec.qk_norm:
            q = head_norm(q, lw[ATTN_Q_NORM], eps)[0]
            k = head_norm(k, lw[ATTN_K_NORM], eps)[0]
        cos, sin = self._ropes[hp.rope_of(il)]
        cos, sin = cos[p0:p0 + T], sin[p0:p0 + T]
        qh = K.rope_forward(q.reshape(1, T, Hq, D), cos, sin, hp.n_rot, neox=self._neox)[0]  # [Hq, T, D]
        kh = K.rope_forward(k.reshape(1, T, Hkv, D), cos, sin, hp.n_rot, neox=self._neox)[0]  # [Hkv, T, D]
        kc, vc = self.cache.k[il], self.cache.v[il]  # [Hkv, D, T_max], [Hkv, T_max, D]
        kc[:, :, p0:p0 + T] = kh.transpose(0, 2, 1)
        vc[:, p0:p0 + T] = v.reshape(T, Hkv, D).transpose(1, 0, 2)
        window = hp.swa_window if hp.is_local(il) else 0
        att = attend_cached(qh, kc, vc, p0, hp.attn_scale, window)  # [Hq, T, D]
        a = np.ascontiguousarray(att.transpose(1, 0, 2)).reshape(T, Hq * D)  # [T, Cq]
        o = linear_forward(a, lw[ATTN_OUT], _lora(lora, weight(ATTN_OUT, il)), lw.get(ATTN_OUT + ".bias"))[0]
        if spec.post_norms:
            o, _ = K.rmsnorm_forward(o, lw[ATTN_POST_NORM], eps)
        x2 = x + o
        g_ffn = self._g_ffn[il] if self._g_ffn is not None else \
            norm_weight(lw[FFN_NORM], _lora(lora, weight(FFN_NORM, il)))
        h2, _ = K.rmsnorm_forward(x2, g_ffn, eps)  # [T, C]
        g, u = gate_up_forward(h2, lw, il, hp, lora, us)  # [T, F] each
        hf = gated_act(hp, g, u)  # [T, F]
        d = linear_forward(hf, lw[FFN_DOWN], _lora(lora, weight(FFN_DOWN, il)))[0]  # [T, C]
        if spec.post_norms:
            d, _ = K.rmsnorm_forward(d, lw[FFN_POST_NORM], eps)
        x2 += d
        return x2


class _Threaded:
    """A quantized matrix whose products use every thread when it is big (``PARALLEL_MIN_WEIGHTS``),
    else the calling thread (a decode step's small products cost less than waking the workers)."""

    def __init__(self, W: QuantMatrix, threads: int):
        self.W, self.threads = W, threads

    def matmul(self, x: np.ndarray) -> np.ndarray:
        if self.threads > 1 and self.W.shape[0] * self.W.shape[1] >= PARALLEL_MIN_WEIGHTS:
            with _numba_threads(self.threads):
                return self.W.matmul(x)
        return self.W.matmul(x)


def _quant_matrices(weights, hp: HParams):
    """Per layer {name: QuantMatrix for the matrices, float copies of norms and biases} and the
    head, or None when a matrix's type has no matvec kernel (then decoding uses the float path)."""
    f = weights.f
    head = f.tensor(weight(TOKEN_EMBD) if hp.tied_embeddings else weight(OUTPUT))
    if not qmv_supported(head.tensor_type):
        return None
    shapes = hp.block_shapes()
    layers = []
    for il in range(hp.n_layer):
        ts = {n: f.tensor(block_tensor(n, il)) for n, shape in shapes.items() if len(shape) == 2}
        if not all(qmv_supported(t.tensor_type) for t in ts.values()):
            return None
        lw = weights.layer(il)
        keep = (lambda arr: arr) if weights.cache_layers else np.array  # streamed layers share one scratch
        d = {n: QuantMatrix.from_tensor(t) for n, t in ts.items()}
        d.update({n: keep(lw[n]) for n, shape in shapes.items() if len(shape) == 1})
        layers.append(d)
    return layers, QuantMatrix.from_tensor(head)


# -- the generation loop ---------------------------------------------------------------------------

class Generation:
    """Iterate to get generated token ids; ``stop_reason`` tells why it ended.

    ``stop_reason``: "eog" (an end-of-generation token was sampled; it is not yielded),
    "length" (n_predict tokens), "context" (the cache is full), None while running.
    """

    def __init__(self, decoder: Decoder, prompt_ids: Sequence[int], sample: Callable[[np.ndarray], int],
                 n_predict: int, stop_ids: frozenset[int] | set[int] = frozenset()):
        if len(prompt_ids) == 0:
            raise UserError("the prompt is empty (no tokens to start from)")
        self.decoder, self.prompt_ids = decoder, list(prompt_ids)
        self.sample, self.n_predict, self.stop_ids = sample, int(n_predict), frozenset(stop_ids)
        self.stop_reason: str | None = None
        self.n_generated = 0
        self.prompt_seconds = 0.0  # wall time of the prefill

    def __iter__(self) -> Iterator[int]:
        dec = self.decoder
        if self.n_predict == 0:
            self.stop_reason = "length"
            return
        t0 = time.perf_counter()
        logits = dec.eval(self.prompt_ids)[-1]  # [V]
        self.prompt_seconds = time.perf_counter() - t0
        while True:
            tok = int(self.sample(logits))
            if tok in self.stop_ids:
                self.stop_reason = "eog"
                return
            self.n_generated += 1
            yield tok
            if 0 < self.n_predict <= self.n_generated:
                self.stop_reason = "length"
                return
            if dec.n_past >= dec.n_ctx:
                self.stop_reason = "context"
                return
            logits = dec.eval([tok])[-1]
