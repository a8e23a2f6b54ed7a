"""A GGUF model's hyper-parameters and memory-mapped weights, for every family in arch.ARCHS.

``read_hparams`` reads the header for the family's graph, ``check_tensors`` checks every tensor it
needs (name, shape, type); tensor data stays memory-mapped.  Float32 base weights come from
:class:`Weights`: either a float32 cache of every layer (when it fits the memory budget) or
per-layer dequantization into reused scratch buffers.  Results are identical either way.
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
    ATTN_K_NORM,
    ATTN_NORM,
    ATTN_OUT,
    ATTN_POST_NORM,
    ATTN_Q,
    ATTN_Q_NORM,
    ATTN_QKV,
    ATTN_V,
    FFN_DOWN,
    FFN_GATE,
    FFN_NORM,
    FFN_POST_NORM,
    FFN_UP,
    OUTPUT,
    OUTPUT_NORM,
    SUPPORTED,
    TOKEN_EMBD,
    Arch,
    bias,
    weight,
)
from .errors import UserError
from .gguf_io import GGUFFile

MAX_DIM = 1 << 24  # no dimension in a header may exceed this (bounds every allocation it sizes)


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of a model (names follow llama.cpp's llama_hparams).

    head_dim      size of one attention head (``attention.key_length``; n_embd / n_head by default)
    n_rot         dimensions of a head that RoPE rotates (partial rotary when < head_dim)
    swa_window    sliding window of the local layers (0: none), see :meth:`is_local`
    swa_pattern   layer il is local when il % swa_pattern < swa_pattern - 1 (0: no local layer)
    rope_base_local, rope_scale_local  RoPE base and scale of the local layers
    attn_scale    multiplies q·k before the softmax
    softcap       final logit soft-capping c: logits = c·tanh(logits / c) (0: none)
    rope_factors  name of the tensor dividing RoPE's frequencies ('' : none)
    rope_mscale   multiplies RoPE's cos and sin (LongRoPE's attention factor; 1: none)
    """

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
    head_dim: int = 0  # 0: n_embd // n_head
    swa_window: int = 0
    swa_pattern: int = 0
    rope_base_local: float = 10000.0
    rope_scale_local: float = 1.0
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    softcap: float = 0.0
    rope_factors: str = ""
    rope_mscale: float = 1.0

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.head_dim))

    @property
    def spec(self) -> Arch:
        """The family's entry in arch.ARCHS."""
        return ARCHS[self.arch]

    @property
    def n_embd_q(self) -> int:
        return self.head_dim * self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    def is_local(self, il: int) -> bool:
        """Whether layer ``il`` attends only to the last ``swa_window`` positions (sliding window)."""
        p = self.swa_pattern
        return self.swa_window > 0 and p > 0 and il % p < p - 1

    def rope_of(self, il: int) -> tuple[float, float]:
        """(RoPE base, frequency scale) of layer ``il``."""
        if self.is_local(il):
            return self.rope_base_local, self.rope_scale_local
        return self.rope_freq_base, self.rope_freq_scale

    def lora_dims(self, base: str) -> tuple[int, int]:
        """(n_out, n_in) of a LoRA target's base tensor: norms are (1, n_embd), token_embd (n_vocab, n_embd)."""
        C, F, V, Cq, Ckv = self.n_embd, self.n_ff, self.n_vocab, self.n_embd_q, self.n_embd_kv
        return {
            TOKEN_EMBD: (V, C), OUTPUT: (V, C), OUTPUT_NORM: (1, C), ATTN_NORM: (1, C), FFN_NORM: (1, C),
            ATTN_Q: (Cq, C), ATTN_K: (Ckv, C), ATTN_V: (Ckv, C), ATTN_QKV: (Cq + 2 * Ckv, C), ATTN_OUT: (C, Cq),
            FFN_GATE: (F, C), FFN_UP: (2 * F if self.spec.fused_up else F, C), FFN_DOWN: (C, F),
        }[base]

    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        """Numpy shapes (rows = outputs) of one block's tensors, by name within the block
        ('attn_q', 'attn_q.bias', 'attn_q_norm', ...)."""
        C, D, Cq, Ckv = self.n_embd, self.head_dim, self.n_embd_q, self.n_embd_kv
        out: dict[str, tuple[int, ...]] = {}
        for base in self.spec.block:
            if base in (ATTN_Q_NORM, ATTN_K_NORM):
                out[base] = (D,)
            elif base in (ATTN_NORM, FFN_NORM, ATTN_POST_NORM, FFN_POST_NORM):
                out[base] = (C,)
            else:
                n_out, n_in = self.lora_dims(base)
                out[base] = (n_out, n_in)
        for base in self.spec.biases:
            out[base + ".bias"] = (self.lora_dims(base)[0],)
        assert (Cq, Ckv) == (self.lora_dims(ATTN_Q)[0], self.lora_dims(ATTN_K)[0])
        return out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected numpy shapes of every tensor of the graph, by full GGUF name."""
        C, V = self.n_embd, self.n_vocab
        s: dict[str, tuple[int, ...]] = {weight(TOKEN_EMBD): (V, C), weight(OUTPUT_NORM): (C,)}
        if not self.tied_embeddings:
            s[weight(OUTPUT)] = (V, C)
        if self.rope_factors:
            s[self.rope_factors + ".weight"] = (self.n_rot // 2,)
        block = self.block_shapes()
        for il in range(self.n_layer):
            for name, shape in block.items():
                s[block_tensor(name, il)] = shape
        return s


def block_tensor(name: str, il: int) -> str:
    """'attn_q', 3 -> 'blk.3.attn_q.weight'; 'attn_q.bias', 3 -> 'blk.3.attn_q.bias'."""
    return bias(name[:-5], il) if name.endswith(".bias") else weight(name, il)


@dataclass(frozen=True)
class HParamOverrides:
    """llama.cpp's --rope-freq-base / --rope-freq-scale / --norm-rms-eps (None = from the file)."""

    rope_freq_base: float | None = None
    rope_freq_scale: float | None = None
    rms_eps: float | None = None


def read_hparams(f: GGUFFile, overrides: HParamOverrides | None = None) -> HParams:
    """The model's hyper-parameters from its header, checked (one UserError naming the key)."""
    arch = f.get_str("general.architecture", "")
    if arch not in SUPPORTED:
        shown = arch or "(missing general.architecture)"
        raise UserError(f"{f.what} '{f.path}': unsupported architecture '{shown}' (supported: {', '.join(SUPPORTED)})")
    spec = ARCHS[arch]
    a = arch + "."
    where = f"{f.what} '{f.path}'"
    if weight(TOKEN_EMBD) not in f.tensors:
        raise UserError(f"{where}: missing tensor '{weight(TOKEN_EMBD)}'")
    emb_shape = f.tensor_shape(weight(TOKEN_EMBD))
    if len(emb_shape) != 2:
        raise UserError(f"{where}: tensor '{weight(TOKEN_EMBD)}' should be 2-D, has shape {emb_shape}")
    n_vocab = emb_shape[0]
    n_embd = f.get_int(a + "embedding_length")
    n_head = f.get_int(a + "attention.head_count")
    n_head_kv = f.get_int(a + "attention.head_count_kv", n_head)
    n_layer = f.get_int(a + "block_count")
    n_ff = f.get_int(a + "feed_forward_length")
    n_ctx = f.get_int(a + "context_length", 2048)
    dims = [("embedding_length", n_embd), ("attention.head_count", n_head), ("attention.head_count_kv", n_head_kv),
            ("block_count", n_layer), ("feed_forward_length", n_ff), ("context_length", n_ctx)]
    key_len = f.get_int(a + "attention.key_length", 0)
    val_len = f.get_int(a + "attention.value_length", key_len)
    if key_len or f.has(a + "attention.value_length"):
        dims += [("attention.key_length", key_len), ("attention.value_length", val_len)]
    for key, val in dims:
        if not 0 < val <= MAX_DIM:
            raise UserError(f"{where}: metadata '{a}{key}' = {val} is out of range")
    if key_len != val_len:
        raise UserError(f"{where}: attention.key_length {key_len} and value_length {val_len} differ (not supported)")
    if n_head % n_head_kv or (not key_len and n_embd % n_head):
        raise UserError(f"{where}: n_embd {n_embd}, n_head {n_head}, n_head_kv {n_head_kv} do not divide evenly")
    head_dim = key_len or n_embd // n_head
    n_rot = f.get_int(a + "rope.dimension_count", head_dim)
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise UserError(f"{where}: rope dimension count {n_rot} must be even and at most the head size {head_dim}")
    freq_base = f.get_float(a + "rope.freq_base", 10000.0)
    freq_scale = 1.0
    scaling_type = f.get_str(a + "rope.scaling.type", "")
    factor_key = a + ("rope.scale_linear" if scaling_type in ("", "none") else "rope.scaling.factor")  # older, newer
    if scaling_type in ("", "none", "linear"):
        factor = f.get_float(factor_key, 0.0)
        if not math.isfinite(factor):
            raise UserError(f"{where}: metadata '{factor_key}' = {factor} is not a finite number")
        if factor > 0:
            freq_scale = 1.0 / factor
    elif scaling_type != "longrope":
        raise UserError(f"{where}: rope scaling type '{scaling_type}' is not supported (supported: linear, longrope)")
    eps = f.get_float(a + "attention.layer_norm_rms_epsilon", 1e-5)
    softcap = f.get_float(a + "final_logit_softcapping", 0.0)
    mscale = f.get_float(a + "rope.scaling.attn_factor", 1.0)
    swa_base = f.get_float(a + "rope.freq_base_swa", spec.swa_rope_base or 0.0)
    # a NaN, infinite or non-positive value here makes every loss NaN: refuse it at load, naming it
    for key, val in (("attention.layer_norm_rms_epsilon", eps), ("rope.freq_base", freq_base),
                     ("rope.scaling.attn_factor", mscale), ("rope.freq_base_swa", swa_base or 1.0)):
        if not (math.isfinite(val) and val > 0):
            raise UserError(f"{where}: metadata '{a}{key}' = {val} is not a positive finite number")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise UserError(f"{where}: metadata '{a}final_logit_softcapping' = {softcap} is not a finite number >= 0")
    swa_window = f.get_int(a + "attention.sliding_window", 0) if spec.swa_used else 0
    swa_pattern = f.get_int(a + "attention.sliding_window_pattern", spec.swa_pattern) if swa_window else 0
    if not (0 <= swa_window <= MAX_DIM and 0 <= swa_pattern <= MAX_DIM):
        raise UserError(f"{where}: sliding window {swa_window} / pattern {swa_pattern} out of range")
    # LongRoPE (Phi-3 128k, Phi-4-mini): training contexts are short, so the short factors apply, as
    # llama.cpp chooses them while n_ctx <= the original context (arch table: the first one present)
    rope_factors = next((name for name in spec.rope_factors if weight(name) in f.tensors), "")
    hp = HParams(
        n_vocab=n_vocab, n_ctx_train=n_ctx, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer,
        n_head=n_head, n_head_kv=n_head_kv, n_rot=n_rot, rope_freq_base=freq_base,
        rope_freq_scale=freq_scale, rms_eps=eps, tied_embeddings=weight(OUTPUT) not in f.tensors,
        arch=arch, head_dim=head_dim, swa_window=swa_window, swa_pattern=swa_pattern,
        rope_base_local=swa_base or freq_base, rope_scale_local=1.0 if swa_base else freq_scale,
        attn_scale=spec.attn_scale(n_embd, n_head, head_dim, n_layer), softcap=softcap, rope_factors=rope_factors,
        rope_mscale=mscale,
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
    """Every tensor of the family's graph exists, has the expected shape and a supported type."""
    for name, shape in hp.shapes().items():
        got = f.tensor_shape(name)  # raises UserError when missing
        if got != shape:
            raise UserError(f"{f.what} '{f.path}': tensor '{name}' has shape {list(got)}, expected {list(shape)}")
        quants.check_supported(f.tensor_type(name), f"{f.what} '{f.path}': tensor '{name}'")


def first_nonfinite_tensor(f: GGUFFile, hp: HParams) -> str | None:
    """The first tensor of the graph holding a NaN or infinity (dequantized one at a time, so
    memory stays at one tensor), or None.  Used to explain a NaN loss, not at every load."""
    for name in hp.shapes():
        t = f.tensor(name)
        values = np.asarray(t.data) if int(t.tensor_type) == 0 else quants.dequantize(t.data, t.tensor_type)
        if not np.isfinite(values).all():
            return name
    return None


# One block's float weights: {'attn_q': [Cq, C], 'attn_q.bias': [Cq], 'attn_norm': [C], ...}, the keys
# of HParams.block_shapes(); matrices are [n_out, n_in].
LayerWeights = dict


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
    scratch set (the engine finishes with a block before it asks for the next).  The output head /
    tied embedding is kept as float32 when cached, else handled in row chunks by :meth:`head_chunks`.
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
        self._embd = f.tensor(weight(TOKEN_EMBD))
        self._out = self._embd if hp.tied_embeddings else f.tensor(weight(OUTPUT))
        self.output_norm = self._dequant(weight(OUTPUT_NORM))
        self.rope_factors = self._dequant(weight(hp.rope_factors)) if hp.rope_factors else None
        self._block = hp.block_shapes()
        layer_bytes = sum(int(np.prod(s)) for s in self._block.values()) * hp.n_layer * self.dtype.itemsize
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
        return {n: self._dequant(block_tensor(n, i), None if into is None else into[n]) for n in self._block}

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
