"""Load any adapter-bearing file by its content, and describe it.

Kinds (``detect_kind``): ``gguf-adapter`` (today's llama.cpp LoRA GGUF), ``checkpoint`` (a
training checkpoint, ours or llama.cpp finetune's), ``ggla`` (llama.cpp finetune's legacy
``.bin``), ``peft`` (a Hugging Face PEFT folder, or its ``adapter_model.safetensors``).

Also the pieces every reader shares: which kind of target a base tensor name is
(:func:`target_kind`), llama.cpp finetune's file order (:func:`file_order`), and building a
:class:`LoraParams` from factors with arbitrary per-tensor scales (:func:`params_from_factors`).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..engine.lora import GLOBAL_TARGETS, LAYER_TARGETS, LoraLayout, LoraParams, LoraSpec, merge_for_inference
from ..errors import UserError
from ..gguf_io import GGUFFile, check_readable_file
from ..model import HParams

GGLA_MAGIC = b"algg"  # u32 0x67676c61 ('ggla') written little-endian

_KIND = {base: kind for base, kind in list(GLOBAL_TARGETS.values()) + list(LAYER_TARGETS.values())}
_GLOBAL_ORDER = [base for base, _ in GLOBAL_TARGETS.values()]  # token_embd, output_norm, output
_LAYER_ORDER = [base for base, _ in LAYER_TARGETS.values()]  # attn_norm, attn_q, ... ffn_up


def split_name(name: str) -> tuple[int | None, str]:
    """'blk.3.attn_q.weight' -> (3, 'attn_q'); 'output.weight' -> (None, 'output')."""
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, stem


def target_kind(name: str) -> str:
    """'mat' | 'embd' | 'norm' for a base tensor name (unknown matrices count as 'mat')."""
    _, base = split_name(name)
    if base in _KIND:
        return _KIND[base]
    return "norm" if base.endswith("_norm") else "mat"


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


# -- detection and loading -------------------------------------------------------------------

def _peft_dir(path: Path) -> Path | None:
    if path.is_dir():
        return path if (path / "adapter_model.safetensors").is_file() else None
    if path.name.endswith(".safetensors") or path.name == "adapter_config.json":
        return path.parent
    return None


def detect_kind(path: str | os.PathLike) -> str:
    """'gguf-adapter' | 'checkpoint' | 'ggla' | 'peft' by content, not by file name."""
    p = Path(path)
    if p.is_dir():
        if _peft_dir(p) is None:
            raise UserError(f"adapter '{p}': a folder without adapter_model.safetensors (not a PEFT adapter)")
        return "peft"
    p = check_readable_file(p, "adapter")
    with open(p, "rb") as fh:
        magic = fh.read(8)
    if magic[:4] == b"GGUF":
        f = GGUFFile(p, "adapter")
        if f.has("training.type"):
            return "checkpoint"
        if f.get_str("general.type", "") == "adapter":
            return "gguf-adapter"
        raise UserError(f"adapter '{p}': a GGUF file that is neither a LoRA adapter nor a training checkpoint")
    if magic[:4] == GGLA_MAGIC:
        return "ggla"
    if p.name.endswith(".safetensors") or p.name == "adapter_config.json":
        return "peft"
    raise UserError(f"adapter '{p}': not a GGUF adapter, checkpoint, llama.cpp .bin adapter or PEFT adapter "
                    f"(magic {magic[:4]!r})")


def read_any(path: str | os.PathLike, hp: HParams | None = None, dtype=np.float32) -> tuple[str, LoraParams]:
    """(kind, parameter set) of any adapter file; checked against ``hp`` when given."""
    kind = detect_kind(path)
    if kind == "checkpoint":
        from .checkpoint import read_checkpoint

        p = read_checkpoint(path, hp, dtype).lora
    elif kind == "gguf-adapter":
        from .adapter_gguf import read_adapter_gguf

        f = GGUFFile(path, "adapter")
        arch = f.get_str("general.architecture", "")
        if hp is not None and arch != hp.arch:
            raise UserError(f"adapter '{path}': made for architecture '{arch}', the model is '{hp.arch}'")
        p = read_adapter_gguf(f, dtype)
    elif kind == "ggla":
        from .ggla import read_ggla

        p = read_ggla(path, None, dtype)
    else:
        from .peft import read_peft

        p = read_peft(path, hp, dtype)
    if hp is not None:
        check_shapes(p, hp, str(path))
    return kind, p


def load_adapter(path: str | os.PathLike, hp: HParams, dtype=np.float32) -> LoraParams:
    """One adapter file as a parameter set checked against the model ``hp``."""
    return read_any(path, hp, dtype)[1]


def check_shapes(p: LoraParams, hp: HParams, where: str) -> None:
    """Every adapted tensor exists in a model with ``hp`` and has its shape."""
    from ..engine.lora import base_dims

    for s in p.layout.specs:
        il, base = split_name(s.name)
        try:
            n_out, n_in = base_dims(hp, base)
        except KeyError:
            raise UserError(f"adapter '{where}': tensor '{s.name}' is not a tensor this model has") from None
        if (il is None) != (base in _GLOBAL_ORDER) or not s.name.endswith(".weight"):
            raise UserError(f"adapter '{where}': tensor '{s.name}' is not a tensor this model has")
        if il is not None and il >= hp.n_layer:
            raise UserError(f"adapter '{where}': tensor '{s.name}' is beyond the model's {hp.n_layer} layers")
        if (s.n_out, s.n_in) != (n_out, n_in):
            raise UserError(f"adapter '{where}': tensor '{s.name}' is for shape {[s.n_out, s.n_in]}, "
                            f"the model has {[n_out, n_in]}")


def load_adapters(adapters: Sequence[tuple[str | os.PathLike, float]], hp: HParams, dtype=np.float32) -> LoraParams:
    """Several (path, user scale) adapters merged into one parameter set for inference."""
    loaded = [(load_adapter(path, hp, dtype), float(scale)) for path, scale in adapters]
    return merge_for_inference(loaded)


# -- inspect ---------------------------------------------------------------------------------

def describe_adapter(path: str | os.PathLike) -> dict:
    """What an adapter file holds, for ``gguf-finetune inspect``.

    Keys: ``path``, ``type`` (kind), ``origin`` ('gguf-finetune' | 'llama.cpp' | 'peft'),
    ``architecture`` (None when the format does not record it), ``alpha`` (None when the scale
    is not one alpha), ``scale_mode`` ('alpha/r' | 'one' | 'per-tensor'), ``ranks`` (target ->
    sorted distinct ranks), ``n_tensors`` (adapted base tensors), ``n_layers`` (blocks touched),
    ``n_params``, ``norm_adapters`` (bool), ``dtype`` (storage types), plus per-format extras
    (``lora_r`` for .bin, ``iteration`` for checkpoints, ``base_model`` for PEFT).
    """
    kind = detect_kind(path)
    info: dict = {"path": str(path), "type": kind}
    if kind == "gguf-adapter":
        from .adapter_gguf import read_adapter_gguf

        f = GGUFFile(path, "adapter")
        p = read_adapter_gguf(f)
        info["origin"] = "gguf-finetune" if any(k.startswith("gguf_finetune.") for k in f.keys()) else "llama.cpp"
        info["architecture"] = f.get_str("general.architecture", None)
        info["dtype"] = sorted({f.tensor_type(n).name for n in f.tensors})
        info["alpha_key"] = f.get_float("adapter.lora.alpha", None)
    elif kind == "checkpoint":
        from .checkpoint import read_checkpoint

        c = read_checkpoint(path)
        p = c.lora
        f = GGUFFile(path, "checkpoint")
        info["origin"] = "llama.cpp" if c.from_llamacpp else "gguf-finetune"
        info["architecture"] = f.get_str("general.architecture", None)
        info["dtype"] = ["F32"]
        info["iteration"] = c.train.iteration
    elif kind == "ggla":
        from .ggla import read_ggla, read_ggla_header

        p = read_ggla(path)
        r, alpha, types = read_ggla_header(path)
        info.update(origin="llama.cpp", architecture=None, lora_r=r, lora_alpha=alpha, dtype=types)
    else:
        from .peft import read_peft_config, read_peft

        p = read_peft(path, None, unpermute=False)
        cfg = read_peft_config(path)
        info.update(origin="peft", architecture=None, base_model=cfg.get("base_model_name_or_path"),
                    dtype=["safetensors"])
    ranks: dict[str, set] = {}
    layers = set()
    for s in p.layout.specs:
        il, base = split_name(s.name)
        ranks.setdefault(base, set()).add(s.rank)
        if il is not None:
            layers.add(il)
    alphas = {round(p.scales[s.name] * s.rank, 9) for s in p.layout.specs}
    if p.scale_one and not all(p.scales[s.name] == p.alpha / s.rank for s in p.layout.specs):
        mode, alpha = "one", None
    elif len(alphas) == 1:
        mode, alpha = "alpha/r", alphas.pop()
    else:
        mode, alpha = "per-tensor", None
    info.update(
        alpha=alpha, scale_mode=mode,
        ranks={k: sorted(v) for k, v in ranks.items()},
        n_tensors=len(p.layout.specs), n_layers=len(layers), n_params=int(p.n_params()),
        norm_adapters=any(s.kind == "norm" for s in p.layout.specs),
    )
    info["rank_counts"] = dict(Counter(s.rank for s in p.layout.specs))
    return info
