"""Reproduce how llama.cpp's CPU backend rounds the products with quantized weights (test helper).

llama.cpp does not multiply Q4_1/Q8_0 weights with float activations: it first quantizes each
32-value block of the activations with its own ``quantize_row_q8_1`` / ``quantize_row_q8_0`` (an
f16 scale d and int8 values q; Q8_1 also keeps s = f16(d·Σq)) and then sums per block

    Q8_0 weights:  d_w·d_x·Σ q_w q_x                 = Σ w_j · (d_x q_x,j)
    Q4_1 weights:  d_w·d_x·Σ q_w q_x + m_w·s_x       = Σ w_j · (d_x q_x,j) + m_w·(s_x − d_x·Σq_x)

(w_j = d_w q_w,j + m_w, the dequantized weight).  :class:`LlamaCppMatmuls` makes our engine's base
matmuls do exactly that, calling the quantize functions of the libggml-cpu that llama-cpp-python
ships, so the remaining difference to llama.cpp is float summation order.  Our engine itself
never rounds activations; this only exists to show where llama.cpp's logits differ from ours.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
from gguf import GGMLQuantizationType as QT

from gguf_finetune.engine import forward as F
from gguf_finetune.model import block_tensor
from gguf_finetune.quants import dequantize_tensor

_lib = None


def ggml_cpu():
    """libggml-cpu from llama-cpp-python, initialised (its f16 tables)."""
    global _lib
    if _lib is None:
        import llama_cpp

        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
        lib.ggml_cpu_init()
        for name in ("quantize_row_q8_0", "quantize_row_q8_1"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        _lib = lib
    return _lib


def quantize_activations(x: np.ndarray, kind: str):
    """x [N, K] float32 -> (x rounded as ggml's q8 blocks [N, K], correction [N, K/32] or None).

    ``kind`` "q8_0" or "q8_1"; for q8_1 the correction is s_x − d_x·Σq_x per block (what the
    f16 rounding of s adds to Q4_1's m-term).
    """
    lib = ggml_cpu()
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, K = x.shape
    nb = K // 32
    size = 34 if kind == "q8_0" else 36
    buf = np.zeros((N, nb * size), np.uint8)
    fn = lib.quantize_row_q8_0 if kind == "q8_0" else lib.quantize_row_q8_1
    for n in range(N):
        fn(x[n].ctypes.data, buf[n].ctypes.data, K)
    blk = buf.reshape(N, nb, size)
    d = blk[:, :, 0:2].copy().view(np.float16).astype(np.float64)[..., 0]  # [N, nb]
    off = 2 if kind == "q8_0" else 4
    q = blk[:, :, off:].copy().view(np.int8).astype(np.float64)  # [N, nb, 32]
    xq = (q * d[..., None]).reshape(N, K)
    if kind == "q8_0":
        return xq, None
    s = blk[:, :, 2:4].copy().view(np.float16).astype(np.float64)[..., 0]
    return xq, s - d * q.sum(axis=2)


class _Quantized:
    def __init__(self, t):
        self.qtype = QT(int(t.tensor_type))
        self.w = dequantize_tensor(t).astype(np.float64)  # [n_out, K]
        self.m = None
        if self.qtype == QT.Q4_1:  # block minimum m: the f16 at bytes 2..3 of each 20-byte block
            raw = np.ascontiguousarray(t.data)
            self.m = raw.reshape(raw.shape[0], -1, 20)[:, :, 2:4].copy().view(np.float16).astype(np.float64)[..., 0]
        elif self.qtype not in (QT.Q8_0, QT.F32):
            raise NotImplementedError(f"llama.cpp rounding of {self.qtype.name} is not reproduced here")

    def matmul(self, x: np.ndarray, quantize: bool = True) -> np.ndarray:
        if self.qtype == QT.F32 or not quantize:
            return (x.astype(np.float64) @ self.w.T).astype(np.float32)
        xq, corr = quantize_activations(x, "q8_1" if self.qtype == QT.Q4_1 else "q8_0")
        y = xq @ self.w.T
        if corr is not None:
            y += corr @ self.m.T
        return y.astype(np.float32)


class LlamaCppMatmuls:
    """``with LlamaCppMatmuls(model): model.logits(ids)`` — base products rounded as llama.cpp does.

    The adapter's products stay float32, as llama.cpp keeps F32 adapters in F32.
    """

    def __init__(self, model, jitter: float = 0.0, quantize: bool = True, seed: int = 0):
        """``jitter``: multiply every matmul input by (1 + jitter·N(0, 1)) first — a stand-in for
        the float-rounding differences (summation order) between two implementations.
        ``quantize=False`` keeps the exact products (our engine's arithmetic, in float64)."""
        self.jitter, self.quantize, self.rng = float(jitter), quantize, np.random.default_rng(seed)
        w, hp, f = model.weights, model.hparams, model.weights.f
        if not w.cache_layers:
            raise ValueError("LlamaCppMatmuls needs the float32 layer cache")
        self.by_id = {}
        mats = [n for n, shape in hp.block_shapes().items() if len(shape) == 2]
        for il in range(hp.n_layer):
            lw = w.layer(il)
            for n in mats:
                self.by_id[id(lw[n])] = _Quantized(f.tensor(block_tensor(n, il)))
        self.head = _Quantized(f.tensor("token_embd.weight" if hp.tied_embeddings else "output.weight"))

    def _jittered(self, x):
        if not self.jitter:
            return x
        return (x * (1 + self.jitter * self.rng.standard_normal(x.shape))).astype(x.dtype)

    def _linear(self, x, W, lora, bias=None):
        y = self.by_id[id(W)].matmul(self._jittered(x), self.quantize)
        if bias is not None:
            y += bias
        if lora is None:
            return y, None
        a, b, s = lora
        u = x @ a
        y += (u * s) @ b.T
        return y, u

    def _head(self, weights, hn, lora):
        logits = self.head.matmul(self._jittered(hn), self.quantize)
        la = F._lora(lora, "output.weight")
        u = None
        if la is not None:
            a, b, s = la
            u = hn @ a
            logits += (u * s) @ b.T
        return logits, u

    def __enter__(self):
        self._saved = F.linear_forward, F.head_logits
        F.linear_forward, F.head_logits = self._linear, self._head
        return self

    def __exit__(self, *exc):
        F.linear_forward, F.head_logits = self._saved
        return False
