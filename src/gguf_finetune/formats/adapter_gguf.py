"""GGUF LoRA adapters in the format today's llama.cpp loads (src/llama-adapter.cpp).

Keys: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (f32),
``general.architecture`` (must equal the model's).  Tensors, for a base tensor W (numpy
[n_out, n_in], ggml ne [n_in, n_out]):

- matrices: ``W.lora_a`` numpy [r, n_in] (= our aᵀ), ``W.lora_b`` numpy [n_out, r] (= our b).
  llama.cpp checks ``W.ne0 == a.ne0``, ``W.ne1 == b.ne1``, ``a.ne1 == b.ne0`` and computes
  ``y += scale · B·(A·x)``.
- ``token_embd.weight``: A and B are flipped (llm_build_inp_embd gathers rows of A by token):
  ``lora_a`` numpy [n_vocab, r] (= our b), ``lora_b`` numpy [n_embd, r] (= our a); checked as
  ``W.ne0 == b.ne1``, ``W.ne1 == a.ne1``.
- norm adapters cannot be expressed: llama.cpp skips ``*_norm.weight`` tensors.  They are left
  out and returned as dropped.

Scale: llama.cpp uses ``user_scale · alpha / r`` per tensor with r = ``b.ne0`` (the tensor's own
rank) when ``adapter.lora.alpha`` is present and non-zero, else ``user_scale``.  A parameter set
whose tensors do not share one alpha (llama.cpp finetune checkpoints trained at scale 1, per-
tensor scales from a .bin or PEFT) is written with each scale folded into B and no alpha key.

Tied embeddings (no ``output.weight``; llama.cpp then uses ``token_embd.weight`` as the output
head under the same tensor name): llama.cpp looks adapters up by tensor name, so a
``token_embd.weight`` adapter would also be applied to the output head — with the flipped
token_embd layout, where ``ggml_mul_mat(A, x)`` needs ``r == n_embd`` and otherwise aborts on a
shape assertion (and silently adds a wrong term when r == n_embd).  An ``output.weight`` adapter
is refused because the model has no tensor of that name.  Neither of our token_embd (input only)
nor output (head only) adapters can be expressed, so for a tied model both are left out and
returned as dropped (the caller warns).  ``gguf-finetune export-lora`` can still merge them (it
unties the head).
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from ..arch import target_kind
from ..errors import UserError
from ..gguf_io import GGUFFile, write_gguf_atomic
from ..lora import LoraParams, LoraSpec
from ..model import HParams
from ..quants import check_supported, dequantize_tensor
from .common import params_from_factors

LORA_TYPES = ("f32", "f16", "bf16")
OUR = "gguf_finetune."


def _to_dtype(arr: np.ndarray, lora_type: str):
    """(data for GGUFWriter.add_tensor, raw_dtype or None) for ``arr`` stored as ``lora_type``."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if lora_type == "f32":
        return arr, None
    if lora_type == "f16":
        return arr.astype(np.float16), None
    if lora_type == "bf16":
        return gguf_quants.quantize(arr, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    raise UserError(f"--lora-type: unsupported type '{lora_type}' (supported: {', '.join(LORA_TYPES)})")


def exportable(lora: LoraParams, tied_embeddings: bool = False) -> tuple[list[LoraSpec], list[LoraSpec]]:
    """(specs a GGUF adapter can hold, specs it leaves out: norms, and token_embd/output when tied)."""
    keep, dropped = [], []
    for s in lora.layout.specs:
        bad = s.kind == "norm" or (tied_embeddings and s.name in ("token_embd.weight", "output.weight"))
        (dropped if bad else keep).append(s)
    return keep, dropped


def dropped_message(dropped: list[LoraSpec], tied_embeddings: bool = False) -> str | None:
    """One warning line naming what a GGUF adapter had to leave out (None when nothing)."""
    if not dropped:
        return None
    norms = [s.name for s in dropped if s.kind == "norm"]
    embd = [s.name for s in dropped if s.kind != "norm"]
    parts = []
    if norms:
        parts.append(f"{len(norms)} norm adapters (llama.cpp ignores *_norm.weight LoRA tensors)")
    if embd:
        why = "the model ties its output head to token_embd.weight" if tied_embeddings else "not expressible"
        parts.append(f"{', '.join(embd)} ({why}; merge with export-lora instead)")
    return "warning: the GGUF adapter leaves out " + "; ".join(parts)


def _add_kv(w, key: str, v) -> None:
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_int64(key, v) if v < 0 or v >= 1 << 32 else w.add_uint32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    else:
        raise TypeError(f"unsupported metadata value for {key}: {type(v)}")


def write_adapter_gguf(path: str | os.PathLike, lora: LoraParams, arch: str | HParams, lora_type: str = "f32",
                       extra_kv: dict | None = None, tied_embeddings: bool | None = None) -> list[LoraSpec]:
    """Write ``lora`` as a llama.cpp GGUF adapter (atomic); returns the specs left out.

    ``arch``: the model's HParams (preferred: gives the architecture, whether the embeddings are
    tied, and the head counts PEFT conversion needs later) or just the architecture name, in
    which case ``tied_embeddings`` says whether the model has no ``output.weight``.
    """
    hp = arch if isinstance(arch, HParams) else None
    arch_name = hp.arch if hp is not None else str(arch)
    if tied_embeddings is None:
        tied_embeddings = bool(hp.tied_embeddings) if hp is not None else False
    if lora_type not in LORA_TYPES:
        raise UserError(f"--lora-type: unsupported type '{lora_type}' (supported: {', '.join(LORA_TYPES)})")
    keep, dropped = exportable(lora, tied_embeddings)
    if not keep:
        raise UserError(f"adapter '{path}': nothing to write — every adapted tensor would be left out "
                        f"({', '.join(s.name for s in dropped)})")
    uniform = all(lora.scales[s.name] == float(lora.alpha) / s.rank for s in keep)
    alpha = float(lora.alpha) if uniform else None  # else: fold each scale into b, no alpha key

    def fill(w):
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        if alpha is not None:
            w.add_float32("adapter.lora.alpha", alpha)
        if hp is not None:
            w.add_uint32(OUR + "n_head", hp.n_head)
            w.add_uint32(OUR + "n_head_kv", hp.n_head_kv)
        for k, v in (extra_kv or {}).items():
            _add_kv(w, k, v)
        for s in keep:
            a, b = lora.a[s.name], lora.b[s.name]  # [n_in, r], [n_out, r]
            if alpha is None:
                b = b * lora.scales[s.name]  # llama.cpp applies no alpha/r without the key
            if s.kind == "embd":
                ta, tb = b, a  # flipped: lora_a [n_vocab, r], lora_b [n_embd, r]
            else:
                ta, tb = a.T, b  # lora_a [r, n_in], lora_b [n_out, r]
            for suffix, arr in ((".lora_a", ta), (".lora_b", tb)):
                data, raw = _to_dtype(arr, lora_type)
                w.add_tensor(s.name + suffix, data, raw_dtype=raw)

    write_gguf_atomic(fill, path, arch_name)
    return dropped


def read_adapter_gguf(f: GGUFFile, dtype=np.float32) -> LoraParams:
    """A llama.cpp GGUF adapter as a parameter set (scales as llama.cpp applies them).

    Tensor order is the file's.  Tensors named ``*_norm.weight`` are skipped (as llama.cpp
    does); any other name without a ``.lora_a``/``.lora_b`` suffix is refused.
    """
    if f.get_str("general.type", "") != "adapter" or f.get_str("adapter.type", "") != "lora":
        raise UserError(f"adapter '{f.path}': not a LoRA adapter (general.type/adapter.type)")
    alpha = f.get_float("adapter.lora.alpha", 0.0)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, t in f.tensors.items():
        for suffix in (".lora_a", ".lora_b"):
            if name.endswith(suffix):
                check_supported(t.tensor_type, f"adapter '{f.path}': tensor '{name}'")
                pairs.setdefault(name[: -len(suffix)], {})[suffix] = dequantize_tensor(t)
                break
        else:
            if not name.endswith("_norm.weight"):
                raise UserError(f"adapter '{f.path}': tensor '{name}' has an unexpected suffix "
                                f"(expected .lora_a or .lora_b)")
    entries = []
    for base, d in pairs.items():
        if set(d) != {".lora_a", ".lora_b"}:
            raise UserError(f"adapter '{f.path}': tensor pair for '{base}' is missing one component")
        ta, tb = d[".lora_a"], d[".lora_b"]
        if ta.ndim != 2 or tb.ndim != 2:
            raise UserError(f"adapter '{f.path}': '{base}' factors must be 2-D")
        if ta.size == 0 or tb.size == 0:
            raise UserError(f"adapter '{f.path}': '{base}' has an empty factor (shapes {list(ta.shape)}, "
                            f"{list(tb.shape)})")
        kind = target_kind(base)
        if kind == "embd":
            b, a = ta, tb  # [n_vocab, r], [n_embd, r]
        else:
            a, b = ta.T, tb  # [n_in, r], [n_out, r]
        if a.shape[1] != b.shape[1]:
            what = "lora_a is not transposed (an adapter from llama.cpp's old finetune?)" if kind != "embd" else \
                f"mismatched ranks {a.shape[1]} and {b.shape[1]}"
            raise UserError(f"adapter '{f.path}': '{base}': {what}")
        r = a.shape[1]
        entries.append((LoraSpec(base, kind, a.shape[0], b.shape[0], r), a, b, alpha / r if alpha else 1.0))
    if not entries:
        raise UserError(f"adapter '{f.path}': the adapter holds no LoRA tensors")
    return params_from_factors(entries, dtype, alpha=alpha if alpha else None)
