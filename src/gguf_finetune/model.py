"""A GGUF model's hyper-parameters and memory-mapped weights.

``read_hparams`` reads the header for the family's graph (arch.py), ``check_tensors`` checks every
tensor it needs (name, shape, type); tensor data stays memory-mapped.  Float32 base weights come from :class:`Weights`:
either a float32 cache of every layer (when it fits the memory budget) or per-layer
dequantization into two reused scratch sets.  Results are identical either way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np

from . import quants
from .arch import (
    ARCHS,
    ATTN_K,
    ATTN_NORM,
    ATTN_OUT,
    ATTN_Q,
    ATTN_V,
    FFN_DOWN,
    FFN_GATE,
    FFN_NORM,
    FFN_UP,
    OUTPUT,
    OUTPUT_NORM,
    SUPPORTED,
    TOKEN_EMBD,
    Arch,
)
from .errors import UserError
from .gguf_io import GGUFFile

# per-layer weight names, in the order they are used
LAYER_MATS = (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT, FFN_GATE, FFN_UP, FFN_DOWN)
LAYER_NORMS = (ATTN_NORM, FFN_NORM)


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of a llama-architecture model (names follow llama.cpp)."""

    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_rot: int
    rope_freq_base: float = 10000.0
    rope_freq_scale: float = 1.0
    rms_eps: float = 1e-5
    tied_embeddings: bool = False
    arch: str = "llama"

    @property
    def spec(self) -> Arch:
        """The family's entry in arch.ARCHS."""
        return ARCHS[self.arch]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    def lora_dims(self, base: str) -> tuple[int, int]:
        """(n_out, n_in) of a LoRA target's base tensor: norms are (1, n_embd), token_embd (n_vocab, n_embd)."""
        C, F, V, Ckv = self.n_embd, self.n_ff, self.n_vocab, self.n_embd_kv
        return {
            TOKEN_EMBD: (V, C), OUTPUT: (V, C), OUTPUT_NORM: (1, C), ATTN_NORM: (1, C),
            FFN_NORM: (1, C), ATTN_Q: (C, C), ATTN_K: (Ckv, C), ATTN_V: (Ckv, C),
            ATTN_OUT: (C, C), FFN_GATE: (F, C), FFN_UP: (F, C), FFN_DOWN: (C, F),
        }[base]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected numpy shapes (rows = outputs) of every tensor of the llama graph."""
        C, F, V, Ckv = self.n_embd, self.n_ff, self.n_vocab, self.n_embd_kv
        s: dict[str, tuple[int, ...]] = {"token_embd.weight": (V, C), "output_norm.weight": (C,)}
        if not self.tied_embeddings:
            s["output.weight"] = (V, C)
        for i in range(self.n_layer):
            p = f"blk.{i}."
            s[p + "attn_norm.weight"] = (C,)
            s[p + "attn_q.weight"] = (C, C)
            s[p + "attn_k.weight"] = (Ckv, C)
            s[p + "attn_v.weight"] = (Ckv, C)
            s[p + "attn_output.weight"] = (C, C)
            s[p + "ffn_norm.weight"] = (C,)
            s[p + "ffn_gate.weight"] = (F, C)
            s[p + "ffn_up.weight"] = (F, C)
            s[p + "ffn_down.weight"] = (C, F)
        return s


@dataclass(frozen=True)
class HParamOverrides:
    """llama.cpp's --rope-freq-base / --rope-freq-scale / --norm-rms-eps (None = from the file)."""

    rope_freq_base: float | None = None
    rope_freq_scale: float | None = None
    rms_eps: float | None = None


def read_hparams(f: GGUFFile, overrides: HParamOverrides | None = None) -> HParams:
    arch = f.get_str("general.architecture", "")
    if arch not in SUPPORTED:
        shown = arch or "(missing general.architecture)"
        raise UserError(f"{f.what} '{f.path}': unsupported architecture '{shown}' (supported: {', '.join(SUPPORTED)})")
    a = arch + "."
    if "token_embd.weight" not in f.tensors:
        raise UserError(f"{f.what} '{f.path}': missing tensor 'token_embd.weight'")
    emb_shape = f.tensor_shape("token_embd.weight")
    if len(emb_shape) != 2:
        raise UserError(f"{f.what} '{f.path}': tensor 'token_embd.weight' should be 2-D, has shape {emb_shape}")
    n_vocab = emb_shape[0]
    n_embd = f.get_int(a + "embedding_length")
    n_head = f.get_int(a + "attention.head_count")
    n_head_kv = f.get_int(a + "attention.head_count_kv", n_head)
    n_layer = f.get_int(a + "block_count")
    n_ff = f.get_int(a + "feed_forward_length")
    n_ctx = f.get_int(a + "context_length", 2048)
    for key, val in (("embedding_length", n_embd), ("attention.head_count", n_head),
                     ("attention.head_count_kv", n_head_kv), ("block_count", n_layer),
                     ("feed_forward_length", n_ff), ("context_length", n_ctx)):
        if not 0 < val <= 1 << 24:
            raise UserError(f"{f.what} '{f.path}': metadata '{a}{key}' = {val} is out of range")
    if n_embd % n_head or n_head % n_head_kv:
        raise UserError(f"{f.what} '{f.path}': n_embd {n_embd}, n_head {n_head}, n_head_kv {n_head_kv} do not divide evenly")
    head_dim = n_embd // n_head
    n_rot = f.get_int(a + "rope.dimension_count", head_dim)
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise UserError(f"{f.what} '{f.path}': rope dimension count {n_rot} must be even and at most the head size {head_dim}")
    freq_base = f.get_float(a + "rope.freq_base", 10000.0)
    freq_scale = 1.0
    scaling_type = f.get_str(a + "rope.scaling.type", "")
    factor_key = a + ("rope.scale_linear" if scaling_type in ("", "none") else "rope.scaling.factor")  # older, newer
    if scaling_type in ("", "none", "linear"):
        factor = f.get_float(factor_key, 0.0)
        if not math.isfinite(factor):
            raise UserError(f"{f.what} '{f.path}': metadata '{factor_key}' = {factor} is not a finite number")
        if factor > 0:
            freq_scale = 1.0 / factor
    else:
        raise UserError(f"{f.what} '{f.path}': rope scaling type '{scaling_type}' is not supported (supported: linear)")
    eps = f.get_float(a + "attention.layer_norm_rms_epsilon", 1e-5)
    # a NaN, infinite or non-positive value here makes every loss NaN: refuse it at load, naming it
    for key, val in (("attention.layer_norm_rms_epsilon", eps), ("rope.freq_base", freq_base)):
        if not (math.isfinite(val) and val > 0):
            raise UserError(f"{f.what} '{f.path}': metadata '{a}{key}' = {val} is not a positive finite number")
    hp = HParams(
        n_vocab=n_vocab, n_ctx_train=n_ctx, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer,
        n_head=n_head, n_head_kv=n_head_kv, n_rot=n_rot, rope_freq_base=freq_base,
        rope_freq_scale=freq_scale, rms_eps=eps, tied_embeddings="output.weight" not in f.tensors,
        arch=arch,
    )
    if overrides is not None:
        hp = replace(
            hp,
            rope_freq_base=hp.rope_freq_base if overrides.rope_freq_base is None else overrides.rope_freq_base,
            rope_freq_scale=hp.rope_freq_scale if overrides.rope_freq_scale is None else overrides.rope_freq_scale,
            rms_eps=hp.rms_eps if overrides.rms_eps is None else overrides.rms_eps,
        )
    return hp


def check_tensors(f: GGUFFile, hp: HParams) -> None:
    """Every tensor of the llama graph exists, has the expected shape and a supported type."""
    for name, shape in hp.shapes().items():
        got = f.tensor_shape(name)  # raises UserError when missing
        if got != shape:
            raise UserError(f"{f.what} '{f.path}': tensor '{name}' has shape {list(got)}, expected {list(shape)}")
        quants.check_supported(f.tensor_type(name), f"{f.what} '{f.path}': tensor '{name}'")


def first_nonfinite_tensor(f: GGUFFile, hp: HParams) -> str | None:
    """The first tensor of the llama graph holding a NaN or infinity (dequantized one at a time, so
    memory stays at one tensor), or None.  Used to explain a NaN loss, not at every load."""
    for name in hp.shapes():
        t = f.tensor(name)
        values = np.asarray(t.data) if int(t.tensor_type) == 0 else quants.dequantize(t.data, t.tensor_type)
        if not np.isfinite(values).all():
            return name
    return None


@dataclass
class LayerWeights:
    """Float32 (or float64) base weights of one block; matrices are [n_out, n_in]."""

    attn_norm: np.ndarray  # [C]
    attn_q: np.ndarray  # [C, C]
    attn_k: np.ndarray  # [Ckv, C]
    attn_v: np.ndarray  # [Ckv, C]
    attn_output: np.ndarray  # [C, C]
    ffn_norm: np.ndarray  # [C]
    ffn_gate: np.ndarray  # [F, C]
    ffn_up: np.ndarray  # [F, C]
    ffn_down: np.ndarray  # [C, F]


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5g', '1000000' -> bytes."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" and t else t
    return int(float(num) * mult)


def available_memory() -> int:
    """Bytes of memory available to this process (MemAvailable, cgroup limit), best effort."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for cg in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = open(cg).read().strip()
            if v.isdigit():
                avail = min(avail or int(v), int(v))
        except OSError:
            pass
    return avail if avail else 4 << 30


class Weights:
    """Base weights as float arrays, from a float32 cache or dequantized per layer on demand.

    ``cache_layers``: dequantize every layer once and keep it (fast) — chosen when the float
    cache fits ``budget`` bytes; otherwise each ``layer(i)`` call dequantizes into one reused
    scratch set (the engine finishes with a block before it asks for the next).  The output head / tied embedding is kept as float32 when cached, else handled
    in row chunks by :meth:`head_chunks`.
    """

    HEAD_CHUNK_ROWS = 4096  # vocabulary rows per head chunk, cached or not (same arithmetic); 9 MB as float32 for C = 576

    def __init__(self, f: GGUFFile, hp: HParams, budget: int | None = None, dtype=np.float32,
                 cache_head: bool | None = None):
        self.f = f
        self.hp = hp
        self.dtype = np.dtype(dtype)
        self._layers: list[LayerWeights] | None = None
        self._scratch: LayerWeights | None = None  # one reused set when streaming
        self._scratch_layer = -1
        self._embd = f.tensor("token_embd.weight")
        self._out = self._embd if hp.tied_embeddings else f.tensor("output.weight")
        self.output_norm = self._dequant("output_norm.weight")
        layer_bytes = sum(int(np.prod(s)) for n, s in hp.shapes().items() if n.startswith("blk.")) * self.dtype.itemsize
        head_bytes = hp.n_vocab * hp.n_embd * self.dtype.itemsize
        if budget is None:
            budget = default_budget()
        self.cache_layers = layer_bytes <= budget
        fits = self.cache_layers and layer_bytes + head_bytes <= budget
        self.cache_head = fits if cache_head is None else (bool(cache_head) and fits)
        self._head: np.ndarray | None = self._dequant_tensor(self._out) if self.cache_head else None
        self._head_buf: np.ndarray | None = None  # reused chunk buffer when the head is not cached
        if self.cache_layers:
            self._layers = [self._load_layer(i) for i in range(hp.n_layer)]
        self.cached_bytes = (layer_bytes if self.cache_layers else 0) + (head_bytes if self.cache_head else 0)

    # -- dequantization --------------------------------------------------------------------
    def _dequant_tensor(self, t, out: np.ndarray | None = None) -> np.ndarray:
        if self.dtype == np.float32:
            res = quants.dequantize(t.data, t.tensor_type, out=out)
        else:
            res = quants.dequantize(t.data, t.tensor_type).astype(self.dtype)
            if out is not None:
                out[...] = res
                res = out
        self.f.release_pages(t)  # the float copy is what we use now
        return res

    def _dequant(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        return self._dequant_tensor(self.f.tensor(name), out)

    def _load_layer(self, i: int, into: LayerWeights | None = None) -> LayerWeights:
        p = f"blk.{i}."
        names = LAYER_NORMS + LAYER_MATS
        arrays = {n: self._dequant(p + n + ".weight", None if into is None else getattr(into, n)) for n in names}
        return LayerWeights(**arrays)

    def layer(self, i: int) -> LayerWeights:
        """Base weights of block ``i``; when streaming, valid until the next ``layer()`` call."""
        if self._layers is not None:
            return self._layers[i]
        if self._scratch is None:
            self._scratch = self._load_layer(i)
        elif self._scratch_layer != i:
            self._load_layer(i, into=self._scratch)
        self._scratch_layer = i
        return self._scratch

    # -- embeddings and head ---------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the token embedding: [N] int -> [N, C]."""
        ids = np.asarray(ids).ravel()
        if self.hp.tied_embeddings and self._head is not None:
            return self._head[ids]
        t = self._embd
        out = quants.dequantize_take(t.data, t.tensor_type, ids)  # only the rows asked for
        return out if self.dtype == np.float32 else out.astype(self.dtype)

    def head_chunks(self):
        """Yield (row0, row1, W_out[row0:row1] as float [rows, C]) covering the vocabulary."""
        V = self.hp.n_vocab
        step = self.HEAD_CHUNK_ROWS
        for r0 in range(0, V, step):  # same chunks cached or not: same arithmetic
            r1 = min(V, r0 + step)
            if self._head is not None:
                yield r0, r1, self._head[r0:r1]
                continue
            if self._head_buf is None or self._head_buf.shape[0] < r1 - r0:
                self._head_buf = np.empty((min(V, step), self.hp.n_embd), np.float32)
            chunk = quants.dequantize_rows(self._out.data, self._out.tensor_type, r0, r1,
                                           out=self._head_buf[: r1 - r0])
            yield r0, r1, chunk if self.dtype == np.float32 else chunk.astype(self.dtype)
        if self._head is None:
            self.f.release_pages(self._out)


def default_budget() -> int:
    env = os.environ.get("GGUF_FINETUNE_MEMORY_BUDGET")
    if env:
        return parse_size(env)
    return int(available_memory() * 0.5)
