"""The LoRA parameter set: one contiguous float buffer with named views.

Every adapted tensor W has two factors stored in llama.cpp finetune's orientation (numpy order),
so checkpoints and optimizer moments map one to one:

    a: [n_in, r]     b: [n_out, r]     ΔW = s · b · aᵀ   ([n_out, n_in]),   s = alpha / r

- matrices (attn_q … ffn_up, output): y = x·Wᵀ + s·(x·a)·bᵀ
- token_embd (W [n_vocab, n_embd]): n_in = n_embd, n_out = n_vocab: e = W[tok] + s·b[tok]·aᵀ
- norms (g [n_embd]): n_in = n_embd, n_out = 1: g' = g + s·a·b[0]

Gradients, Adam moments and the parameters share one layout (:class:`LoraLayout`), so clipping,
AdamW and checkpoint I/O are single vector operations over flat arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

import numpy as np

from .arch import SUPPORTED, TARGETS, Target, get_arch, weight
from .config import DEFAULT_RANK
from .errors import UserError
from .model import HParams
from .stdcpp import llamacpp_randomize_normal


def _default_rank(t: Target) -> int:
    """Matrices: --lora-r; norms: 0 = not adapted (llama.cpp: 1; today's llama.cpp ignores norm adapters)."""
    return 0 if t.is_norm else DEFAULT_RANK


def _uniform(cls, r: int, norm_rank: int = 0, **overrides) -> "LoraRanks":
    """Rank ``r`` for every matrix, ``norm_rank`` for every norm, then ``overrides`` (None: ignored)."""
    vals = {t.key: norm_rank if t.is_norm else r for t in TARGETS}
    vals.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**vals)


# Rank per target (0 = not adapted): one int field per entry of arch.TARGETS, e.g. ranks.wq.
LoraRanks = make_dataclass(
    "LoraRanks", [(t.key, int, field(default=_default_rank(t))) for t in TARGETS], frozen=True,
    namespace={"uniform": classmethod(_uniform), "__module__": __name__,
               "__doc__": "Rank per LoRA target (arch.TARGETS keys; 0 = not adapted)."})


@dataclass(frozen=True)
class LoraSpec:
    """One adapted base tensor: a [n_in, rank], b [n_out, rank]."""

    name: str  # base tensor name, e.g. "blk.0.attn_q.weight"
    kind: str  # "mat" | "embd" | "norm"
    n_in: int
    n_out: int
    rank: int

    @property
    def a_shape(self) -> tuple[int, int]:
        return (self.n_in, self.rank)

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.n_out, self.rank)


def make_specs(hp: HParams, ranks: LoraRanks) -> list[LoraSpec]:
    """The adapted tensors, in llama.cpp finetune's order (globals, then layer by layer)."""
    arch = get_arch(hp.arch)
    if arch is None:
        raise UserError(f"architecture '{hp.arch}' is not supported (supported: {', '.join(SUPPORTED)})")
    targets = [t for t in arch.targets() if getattr(ranks, t.key) > 0]
    specs = []
    for il in [None] + list(range(hp.n_layer)):
        for t in targets:
            if t.per_layer == (il is not None):
                n_out, n_in = hp.lora_dims(t.tensor)
                specs.append(LoraSpec(weight(t.tensor, il), t.kind, n_in, n_out, getattr(ranks, t.key)))
    return specs


class LoraLayout:
    """Offsets of every a/b factor inside one flat buffer (order: spec order, a then b)."""

    def __init__(self, specs: list[LoraSpec]):
        self.specs = list(specs)
        self.by_name = {s.name: s for s in self.specs}
        if len(self.by_name) != len(self.specs):
            raise ValueError("duplicate LoRA target")
        self.offsets: dict[str, tuple[int, int]] = {}  # name -> (offset of a, offset of b)
        off = 0
        for s in self.specs:
            oa = off
            off += s.n_in * s.rank
            ob = off
            off += s.n_out * s.rank
            self.offsets[s.name] = (oa, ob)
        self.size = off

    def views(self, flat: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Named views (a, b) into ``flat`` — writing a view writes the buffer."""
        a, b = {}, {}
        for s in self.specs:
            oa, ob = self.offsets[s.name]
            a[s.name] = flat[oa:oa + s.n_in * s.rank].reshape(s.a_shape)
            b[s.name] = flat[ob:ob + s.n_out * s.rank].reshape(s.b_shape)
        return a, b

    def decay_mask(self, min_ndim: int) -> np.ndarray:
        """Per-element bool mask: weight decay only for tensors with ggml n_dims >= ``min_ndim``.

        ggml counts dimensions without trailing 1s: a factor stored as ggml [r, n] has 2 dims
        when n > 1 and 1 when n == 1 (the norm adapters' b [r, 1]).
        """
        mask = np.zeros(self.size, dtype=bool)
        for s in self.specs:
            oa, ob = self.offsets[s.name]
            for off, n in ((oa, s.n_in), (ob, s.n_out)):
                if (2 if n > 1 else 1) >= min_ndim:
                    mask[off:off + n * s.rank] = True
        return mask

    def same_as(self, other: "LoraLayout") -> bool:
        return self.specs == other.specs


@dataclass
class LoraParams:
    """LoRA tensors as views into one flat buffer, with a per-tensor scale (alpha / rank)."""

    layout: LoraLayout
    alpha: float
    flat: np.ndarray
    scale_one: bool = False  # llama.cpp finetune checkpoints: trained without alpha/r
    a: dict[str, np.ndarray] = field(init=False)
    b: dict[str, np.ndarray] = field(init=False)
    scales: dict[str, float] = field(init=False)

    def __post_init__(self):
        if self.flat.shape != (self.layout.size,):
            raise ValueError("flat buffer does not match the layout")
        self.a, self.b = self.layout.views(self.flat)
        self.scales = {
            s.name: 1.0 if self.scale_one else float(self.alpha) / s.rank for s in self.layout.specs
        }

    @classmethod
    def zeros(cls, layout: LoraLayout, alpha: float, dtype=np.float32, scale_one: bool = False) -> "LoraParams":
        return cls(layout, alpha, np.zeros(layout.size, dtype=dtype), scale_one)

    def like(self, flat: np.ndarray | None = None) -> "LoraParams":
        """Same layout and scales over another buffer (zeros by default) — e.g. the gradients."""
        if flat is None:
            flat = np.zeros_like(self.flat)
        return LoraParams(self.layout, self.alpha, flat, self.scale_one)

    def get(self, name: str):
        """(a, b, scale) for a base tensor, or None when it is not adapted."""
        a = self.a.get(name)
        if a is None:
            return None
        return a, self.b[name], self.scales[name]

    def n_params(self) -> int:
        return self.layout.size


def init_lora(hp: HParams, ranks: LoraRanks, alpha: float, seed: int, dtype=np.float32) -> LoraParams:
    """New adapter, initialised as llama.cpp's finetune does: every ``b`` zero, every ``a`` drawn
    from one std::mt19937(seed) normal stream, clamped to [-1, 1] and scaled by 1/sqrt(r + n_in)
    (stdcpp.llamacpp_randomize_normal), tensor by tensor in file order."""
    if alpha <= 0:
        raise UserError(f"--lora-alpha must be positive, got {alpha}")
    layout = LoraLayout(make_specs(hp, ranks))
    p = LoraParams.zeros(layout, alpha, dtype)
    ggml_shapes = [(s.rank, s.n_in) for s in layout.specs]  # a is ggml [r, n_in]
    for s, arr in zip(layout.specs, llamacpp_randomize_normal(seed, ggml_shapes)):
        p.a[s.name][...] = arr
    return p


def merge_for_inference(adapters: list[tuple[LoraParams, float]]) -> LoraParams:
    """Several adapters with user scales as ONE parameter set (ranks concatenated, scale 1).

    Σ_i u_i·s_i·b_i·a_iᵀ = [u_1 s_1 b_1 | u_2 s_2 b_2 | …] · [a_1 | a_2 | …]ᵀ, so inference
    runs one low-rank product per tensor whatever the number of adapters.
    """
    names: dict[str, LoraSpec] = {}
    for p, _ in adapters:
        for s in p.layout.specs:
            prev = names.get(s.name)
            if prev is None:
                names[s.name] = s
            elif (prev.n_in, prev.n_out, prev.kind) != (s.n_in, s.n_out, s.kind):
                raise UserError(f"adapters disagree on the shape of '{s.name}'")
            else:
                names[s.name] = LoraSpec(s.name, s.kind, s.n_in, s.n_out, prev.rank + s.rank)
    dtype = adapters[0][0].flat.dtype if adapters else np.float32
    layout = LoraLayout(list(names.values()))
    out = LoraParams.zeros(layout, alpha=1.0, dtype=dtype, scale_one=True)
    col = {n: 0 for n in names}
    for p, user_scale in adapters:
        for s in p.layout.specs:
            c = col[s.name]
            out.a[s.name][:, c:c + s.rank] = p.a[s.name]
            out.b[s.name][:, c:c + s.rank] = p.b[s.name] * (user_scale * p.scales[s.name])
            col[s.name] = c + s.rank
    return out
