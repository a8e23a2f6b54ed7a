"""What every adapter reader and writer shares: llama.cpp finetune's file order, a parameter set
from factors with arbitrary per-tensor scales, and the check that an adapter fits a model."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..arch import TARGET_BY_TENSOR, TARGETS, split_name
from ..errors import UserError
from ..lora import LoraLayout, LoraParams, LoraSpec
from ..model import HParams

GGLA_MAGIC = b"algg"  # u32 0x67676c61 ('ggla') written little-endian

_GLOBAL_ORDER = [t.tensor for t in TARGETS if not t.per_layer]  # token_embd, output_norm, output
_LAYER_ORDER = [t.tensor for t in TARGETS if t.per_layer]  # attn_norm, attn_q, ... ffn_up


def file_order(specs: Sequence[LoraSpec]) -> list[LoraSpec]:
    """Specs in llama.cpp finetune's file order: token_embd, output_norm, output, then layer by
    layer attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_down, ffn_up.
    Names llama.cpp never wrote keep their relative order after those."""

    def key(ix_s):
        ix, s = ix_s
        il, base = split_name(s.name)
        if il is None and base in _GLOBAL_ORDER:
            return (0, 0, _GLOBAL_ORDER.index(base), ix)
        if il is not None and base in _LAYER_ORDER:
            return (1, il, _LAYER_ORDER.index(base), ix)
        return (2, 0, 0, ix)

    return [s for _, s in sorted(enumerate(specs), key=key)]


def _close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=0.0)


def params_from_factors(entries: Sequence[tuple[LoraSpec, np.ndarray, np.ndarray, float]], dtype=np.float32,
                        alpha: float | None = None) -> LoraParams:
    """A parameter set holding ``(spec, a [n_in, r], b [n_out, r], scale)`` entries, order kept.

    The scale is represented the plainest way that reproduces every entry's ``scale``:
    one alpha with scale alpha/rank (``alpha`` if given and it fits), else scale 1 everywhere
    (``scale_one``), else per-tensor scales written into ``LoraParams.scales`` (e.g. a legacy
    .bin's global alpha/r applied to rank-1 norm adapters).  Such overrides live in the
    instance only: ``LoraParams.like()`` recomputes the default scales.
    """
    specs = [e[0] for e in entries]
    scales = [float(e[3]) for e in entries]
    alphas = [sc * s.rank for s, sc in zip(specs, scales)]
    layout = LoraLayout(specs)
    if alphas and all(_close(x, alphas[0]) for x in alphas):
        al = alpha if alpha is not None and _close(alpha, alphas[0]) else alphas[0]
        p = LoraParams.zeros(layout, alpha=al, dtype=dtype)
    elif all(sc == 1.0 for sc in scales):
        p = LoraParams.zeros(layout, alpha=alpha if alpha else 1.0, dtype=dtype, scale_one=True)
    else:
        p = LoraParams.zeros(layout, alpha=alpha if alpha else 1.0, dtype=dtype)
        p.scales.update({s.name: sc for s, sc in zip(specs, scales)})
    for s, a, b, _ in entries:
        p.a[s.name][...] = a
        p.b[s.name][...] = b
    return p


def check_shapes(p: LoraParams, hp: HParams, where: str) -> None:
    """Every adapted tensor exists in a model with ``hp`` and has its shape."""
    for s in p.layout.specs:
        il, base = split_name(s.name)
        t = TARGET_BY_TENSOR.get(base)
        if t is None or not hp.spec.has_target(t) or t.per_layer != (il is not None) or not s.name.endswith(".weight"):
            raise UserError(f"adapter '{where}': tensor '{s.name}' is not a tensor this model has")
        n_out, n_in = hp.lora_dims(base)
        if il is not None and il >= hp.n_layer:
            raise UserError(f"adapter '{where}': tensor '{s.name}' is beyond the model's {hp.n_layer} layers")
        if (s.n_out, s.n_in) != (n_out, n_in):
            raise UserError(f"adapter '{where}': tensor '{s.name}' is for shape {[s.n_out, s.n_in]}, "
                            f"the model has {[n_out, n_in]}")
