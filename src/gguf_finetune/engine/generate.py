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

from ..errors import UserError
from ..lora import LoraParams
from ..model import LAYER_MATS, HParams
from . import kernels as K
from .forward import embed_forward, head_logits, linear_forward, norm_weight
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
def _attend_cached(q, kT, v, p0, scale, out):  # pragma: no cover - compiled
    # q [Hq, T, D] (query i at position p0 + i), kT [Hkv, D, T_max], v [Hkv, T_max, D]
    # -> out [Hq, T, D]; query i sees keys 0..p0+i, through kernels._attend_row (the flash forward's row):
    # scores accumulated over d in order, scaled, max, exp and Σ (float64), Σ_j p_j v_j four keys
    # per pass, divided by Σ.  prange over (head, row): each item writes only its own row.
    Hq, T, D = q.shape
    G = Hq // kT.shape[0]
    for item in prange(Hq * T):
        h = item // T
        i = item % T
        n = p0 + i + 1
        kh = kT[h // G]
        vh = v[h // G]
        s = np.empty(n, dtype=q.dtype)
        acc = np.empty(D, dtype=q.dtype)
        _, tot = K._attend_row(q[h], i, kh, vh, n, scale, s, acc)
        for d in range(D):
            out[h, i, d] = acc[d] / tot


def attend_cached(q: np.ndarray, kT: np.ndarray, v: np.ndarray, p0: int, scale: float) -> np.ndarray:
    """q [Hq, T, D] at positions p0.., kT [Hkv, D, T_max], v [Hkv, T_max, D] -> out [Hq, T, D].

    Causal attention of T new queries over the cached keys/values 0..p0+T-1 (GQA: query head h
    reads KV head h // (Hq // Hkv)).
    """
    q = np.ascontiguousarray(q)
    Hq, T, D = q.shape
    Hkv, _, T_max = kT.shape
    if kT.shape[1] != D or v.shape != (Hkv, T_max, D) or Hq % Hkv or p0 < 0 or p0 + T > T_max:
        raise ValueError(f"attend_cached: q {q.shape}, kT {kT.shape}, v {v.shape}, p0 {p0} do not fit")
    if kT.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError("attend_cached: q, kT and v must have the same dtype")
    out = np.empty_like(q)
    _attend_cached(q, kT, v, int(p0), q.dtype.type(scale), out)
    return out


def attend_cached_ref(q, kT, v, p0: int, scale: float) -> np.ndarray:
    """Slow, obviously-correct numpy version of :func:`attend_cached` (float64 softmax)."""
    Hq, T, _ = q.shape
    G = Hq // kT.shape[0]
    out = np.empty_like(q)
    for h in range(Hq):
        for i in range(T):
            n = p0 + i + 1
            s = (q[h, i].astype(np.float64) @ kT[h // G][:, :n].astype(np.float64)) * scale
            p = np.exp(s - s.max())
            out[h, i] = (p @ v[h // G][:n].astype(np.float64)) / p.sum()
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
        self.cos, self.sin = K.rope_cache(np.arange(n_ctx, dtype=np.int64), hp.n_rot, hp.rope_freq_base,
                                          hp.rope_freq_scale, self.dtype)  # [T_max, n_rot/2]
        self.scale = 1.0 / np.sqrt(hp.head_dim)
        # effective norm weights (with norm adapters folded in) do not change between tokens
        self._g_att = [norm_weight(weights.layer(i).attn_norm, _lora(lora, f"blk.{i}.attn_norm.weight"))
                       for i in range(hp.n_layer)] if weights.cache_layers else None
        self._g_ffn = [norm_weight(weights.layer(i).ffn_norm, _lora(lora, f"blk.{i}.ffn_norm.weight"))
                       for i in range(hp.n_layer)] if weights.cache_layers else None
        self._g_out = norm_weight(weights.output_norm, _lora(lora, "output_norm.weight"))
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

    def _linear_q(self, x: np.ndarray, W: QuantMatrix, lora) -> np.ndarray:
        return _linear_q(x, W, lora, self._threads)

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
                    out[r0 - first:b1 - first] = self._linear_q(hn, self._qhead, _lora(self.lora, "output.weight"))
                else:
                    out[r0 - first:b1 - first], _ = head_logits(self.weights, hn, self.lora)
        return out

    def _layers(self, ids: np.ndarray) -> np.ndarray:
        """Run the blocks over ids [T] at positions n_past..; fills the cache; -> x [T, C]."""
        hp, lora = self.hp, self.lora
        p0, T = self.cache.n_past, ids.shape[0]
        cos, sin = self.cos[p0:p0 + T], self.sin[p0:p0 + T]
        x = embed_forward(self.weights, ids[None, :], lora)  # [T, C]
        quant = self._qmats is not None and T <= QUANT_MAX_T
        for il in range(hp.n_layer):
            lw = self._qmats[il] if quant else self.weights.layer(il)
            x = self._block(x, lw, il, p0, cos, sin)
        self.cache.n_past = p0 + T
        return x

    def _block(self, x: np.ndarray, lw, il: int, p0: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """One transformer block over x [T, C] at positions p0..p0+T-1 -> [T, C].

        ``lw``: the block's float :class:`LayerWeights`, or its quantized matrices (a dict of
        :class:`QuantMatrix` plus the two norm weights).
        """
        hp, lora = self.hp, self.lora
        T, (Hq, Hkv, D, eps) = x.shape[0], (hp.n_head, hp.n_head_kv, hp.head_dim, hp.rms_eps)
        p = f"blk.{il}."
        if isinstance(lw, dict):
            def lin(h, name):
                return self._linear_q(h, lw[name], _lora(lora, p + name + ".weight"))
            attn_norm, ffn_norm = lw["attn_norm"], lw["ffn_norm"]
        else:
            def lin(h, name):
                return linear_forward(h, getattr(lw, name), _lora(lora, p + name + ".weight"))[0]
            attn_norm, ffn_norm = lw.attn_norm, lw.ffn_norm
        g_att = self._g_att[il] if self._g_att is not None else norm_weight(attn_norm, _lora(lora, p + "attn_norm.weight"))
        h1, _ = K.rmsnorm_forward(x, g_att, eps)  # [T, C]
        q = lin(h1, "attn_q")  # [T, Hq*D]
        k = lin(h1, "attn_k")  # [T, Hkv*D]
        v = lin(h1, "attn_v")  # [T, Hkv*D]
        qh = K.rope_forward(q.reshape(1, T, Hq, D), cos, sin, hp.n_rot)[0]  # [Hq, T, D]
        kh = K.rope_forward(k.reshape(1, T, Hkv, D), cos, sin, hp.n_rot)[0]  # [Hkv, T, D]
        kc, vc = self.cache.k[il], self.cache.v[il]  # [Hkv, D, T_max], [Hkv, T_max, D]
        kc[:, :, p0:p0 + T] = kh.transpose(0, 2, 1)
        vc[:, p0:p0 + T] = v.reshape(T, Hkv, D).transpose(1, 0, 2)
        att = attend_cached(qh, kc, vc, p0, self.scale)  # [Hq, T, D]
        a = np.ascontiguousarray(att.transpose(1, 0, 2)).reshape(T, Hq * D)  # [T, C]
        o = lin(a, "attn_output")  # [T, C]
        x2 = x + o
        g_ffn = self._g_ffn[il] if self._g_ffn is not None else norm_weight(ffn_norm, _lora(lora, p + "ffn_norm.weight"))
        h2, _ = K.rmsnorm_forward(x2, g_ffn, eps)  # [T, C]
        g = lin(h2, "ffn_gate")  # [T, F]
        u = lin(h2, "ffn_up")  # [T, F]
        hf = K.swiglu_forward(g, u)  # [T, F]
        d = lin(hf, "ffn_down")  # [T, C]
        x2 += d
        return x2


def _linear_q(x: np.ndarray, W: QuantMatrix, lora, threads: int = 1) -> np.ndarray:
    """x [T, n_in] · W [n_out, n_in]ᵀ from quantized blocks (+ s·(x·a)·bᵀ) -> [T, n_out].

    Runs on the calling thread unless W has at least ``PARALLEL_MIN_WEIGHTS`` weights.
    """
    if threads > 1 and W.shape[0] * W.shape[1] >= PARALLEL_MIN_WEIGHTS:
        with _numba_threads(threads):
            y = W.matmul(x)
    else:
        y = W.matmul(x)
    if lora is not None:
        a, b, s = lora
        K.lora_forward(x, a, b, s, y)
    return y


def _quant_matrices(weights, hp: HParams):
    """Per layer {name: QuantMatrix, attn_norm, ffn_norm} and the head, or None when a matrix's
    type has no matvec kernel (then decoding uses the float path throughout)."""
    f = weights.f
    head = f.tensor("token_embd.weight" if hp.tied_embeddings else "output.weight")
    if not qmv_supported(head.tensor_type):
        return None
    layers = []
    for il in range(hp.n_layer):
        ts = {n: f.tensor(f"blk.{il}.{n}.weight") for n in LAYER_MATS}
        if not all(qmv_supported(t.tensor_type) for t in ts.values()):
            return None
        lw = weights.layer(il)
        keep = (lambda arr: arr) if weights.cache_layers else np.array  # streamed layers share one scratch
        d = {n: QuantMatrix.from_tensor(t) for n, t in ts.items()}
        d["attn_norm"], d["ffn_norm"] = keep(lw.attn_norm), keep(lw.ffn_norm)
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
