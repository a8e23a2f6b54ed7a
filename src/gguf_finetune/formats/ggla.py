"""llama.cpp finetune's legacy LoRA adapter ``.bin`` ("ggla"), read and written byte for byte.

Layout (examples/finetune/finetune.cpp ``save_as_llama_lora``, July 2024; all little-endian)::

    u32 magic 0x67676c61, u32 version 1, u32 lora_r, u32 lora_alpha
    per tensor, in finetune's file order (token_embd, output_norm, output, then per layer
    attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_down, ffn_up; A then B):
        u32 n_dims (ggml_n_dims: trailing 1s dropped, at least 1), u32 name_len, u32 type (0 F32, 1 F16)
        u32 ne[n_dims] (ggml order, ne0 = rank), name bytes (``<tensor>.weight.loraA`` / ``.loraB``, no NUL)
        zero bytes up to the next multiple of 32 of the file offset
        data (ggml memory order = our numpy a [n_in, r] / b [n_out, r] in C order)

Scale.  llama.cpp applied a .bin adapter (``llama_apply_lora_from_file``, removed in July 2024)
as ``W += user_scale · (lora_alpha / lora_r) · B·Aᵀ`` with ``lora_r`` and ``lora_alpha`` from the
header, the same factor for every tensor whatever its own rank (the rank-1 norm adapters
included).  :func:`read_ggla` gives every tensor that scale.  (finetune itself trained at scale 1,
so a .bin written with ``--lora-alpha`` different from ``--lora-r`` means something else to
llama.cpp than to the run that produced it; the loader's reading is the one we keep.)
:func:`write_ggla` writes what a parameter set means under that rule: tensors whose scale is not
``lora_alpha / lora_r`` get the ratio folded into their B factor.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from ..arch import target_kind
from ..errors import UserError
from ..gguf_io import atomic_path, check_readable_file
from ..lora import LoraParams, LoraSpec
from ..model import HParams
from .common import GGLA_MAGIC, check_shapes, file_order, params_from_factors

VERSION = 1
ARCHS = ("llama",)  # the only family llama.cpp's finetune trained: its .bin adapters hold no architecture
ALIGN = 32
_TYPES = {0: ("F32", np.dtype("<f4")), 1: ("F16", np.dtype("<f2"))}
MAX_NAME = 64  # GGML_MAX_NAME


def ggml_n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: the number of dimensions without trailing 1s (at least 1)."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return n


def default_header(lora: LoraParams) -> tuple[int, int]:
    """(lora_r, lora_alpha) for a parameter set: the most common matrix rank, and an alpha that
    needs no folding when the set has one (integral) alpha; scale-1 sets get alpha = r."""
    mats = [s.rank for s in lora.layout.specs if s.kind != "norm"] or [s.rank for s in lora.layout.specs] or [1]
    r = Counter(mats).most_common(1)[0][0]
    if lora.scale_one:
        return r, r
    alpha = float(lora.alpha)
    return (r, int(alpha)) if alpha.is_integer() and alpha >= 1 else (r, r)


def _check_u32(value, flag: str) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{flag} must be a whole number for a .bin adapter (its header stores a u32), got {value}")
        value = int(value)
    if not 0 < int(value) < 1 << 32:
        raise UserError(f"{flag} must be a positive whole number for a .bin adapter, got {value}")
    return int(value)


def write_ggla(path: str | os.PathLike, lora: LoraParams, lora_r: int | None = None,
               lora_alpha: int | None = None) -> None:
    """Write ``lora`` as a legacy ``.bin`` adapter (atomic).

    ``lora_r``/``lora_alpha`` are the header fields (default: :func:`default_header`).  A tensor
    whose scale differs from lora_alpha/lora_r is written with B·(scale / (lora_alpha/lora_r)),
    so llama.cpp's loader applies exactly ``lora``'s ΔW.
    """
    d_r, d_alpha = default_header(lora)
    r = _check_u32(d_r if lora_r is None else lora_r, "--lora-r")
    alpha = _check_u32(d_alpha if lora_alpha is None else lora_alpha, "--lora-alpha")
    header_scale = alpha / r
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(np.array([0x67676C61, VERSION, r, alpha], dtype="<u4").tobytes())
        for s in file_order(lora.layout.specs):
            a = lora.a[s.name]  # [n_in, r]  = ggml [r, n_in]
            b = lora.b[s.name]  # [n_out, r] = ggml [r, n_out]
            ratio = lora.scales[s.name] / header_scale
            if ratio != 1.0:
                b = b.astype(np.float64) * ratio
            for suffix, arr in ((".loraA", a), (".loraB", b)):
                _write_tensor(fh, s.name + suffix, np.ascontiguousarray(arr, dtype="<f4"))


def _write_tensor(fh, name: str, arr: np.ndarray) -> None:
    """One tensor record; ``arr`` is numpy [n, r] = ggml ne [r, n]."""
    ne = tuple(reversed(arr.shape))
    nd = ggml_n_dims(ne)
    raw = name.encode()
    if len(raw) >= MAX_NAME:
        raise UserError(f"tensor name '{name}' is too long for a .bin adapter ({len(raw)} bytes, max {MAX_NAME - 1})")
    fh.write(np.array([nd, len(raw), 0, *ne[:nd]], dtype="<u4").tobytes())
    fh.write(raw)
    fh.write(b"\0" * (-fh.tell() % ALIGN))
    fh.write(arr.tobytes())


def _parse(path: str | os.PathLike):
    """(lora_r, lora_alpha, [(name, type_id, (ne0, ne1), data array ggml-ordered)]) — arrays are views
    into one read-only buffer."""
    p = check_readable_file(path, "adapter")
    buf = np.fromfile(p, dtype=np.uint8)
    size = buf.size

    def fail(why: str):
        raise UserError(f"adapter '{p}': corrupt or truncated .bin adapter ({why})")

    def u32s(off: int, n: int) -> np.ndarray:
        if off + 4 * n > size:
            fail(f"header at byte {off} runs past the end of the file")
        return buf[off:off + 4 * n].view("<u4")

    if size < 16 or buf[:4].tobytes() != GGLA_MAGIC:
        raise UserError(f"adapter '{p}': not a llama.cpp .bin adapter (magic {buf[:4].tobytes()!r})")
    _, version, r, alpha = (int(x) for x in u32s(0, 4))
    if version != VERSION:
        raise UserError(f"adapter '{p}': .bin adapter version {version} is not supported (only 1)")
    if r == 0:
        fail("lora_r is 0")
    off = 16
    tensors = []
    while off < size:
        n_dims, name_len, ttype = (int(x) for x in u32s(off, 3))
        off += 12
        if n_dims not in (1, 2):
            fail(f"tensor with {n_dims} dimensions at byte {off - 12}")
        if ttype not in _TYPES:
            fail(f"tensor type {ttype} (supported: 0 = F32, 1 = F16)")
        if not 0 < name_len < 256:
            fail(f"tensor name length {name_len}")
        ne = [int(x) for x in u32s(off, n_dims)] + [1] * (2 - n_dims)
        off += 4 * n_dims
        if off + name_len > size:
            fail("tensor name runs past the end of the file")
        try:
            name = buf[off:off + name_len].tobytes().decode()
        except UnicodeDecodeError:
            fail("tensor name is not UTF-8")
        off += name_len
        off += -off % ALIGN
        dt = _TYPES[ttype][1]
        nbytes = ne[0] * ne[1] * dt.itemsize
        if off + nbytes > size:
            fail(f"data of '{name}' runs past the end of the file")
        data = buf[off:off + nbytes].view(dt).reshape(ne[1], ne[0])  # numpy [ne1, ne0]
        off += nbytes
        tensors.append((name, ttype, (ne[0], ne[1]), data))
    return p, r, alpha, tensors


def read_ggla_header(path: str | os.PathLike) -> tuple[int, int, list[str]]:
    """(lora_r, lora_alpha, storage type names) of a .bin adapter."""
    _, r, alpha, tensors = _parse(path)
    return r, alpha, sorted({_TYPES[t[1]][0] for t in tensors})


def read_ggla(path: str | os.PathLike, hp: HParams | None = None, dtype=np.float32) -> LoraParams:
    """A legacy .bin adapter as a parameter set: ranks per tensor from the shapes, and every
    tensor's scale = lora_alpha / lora_r from the header (see the module docstring)."""
    p, r, alpha, tensors = _parse(path)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, _, _, data in tensors:
        if name.endswith(".loraA") or name.endswith(".loraB"):
            base, part = name[:-6], name[-1]
        else:
            raise UserError(f"adapter '{p}': tensor '{name}' is not a LoRA tensor (expected .loraA/.loraB)")
        slot = pairs.setdefault(base, {})
        if part in slot:
            raise UserError(f"adapter '{p}': tensor '{name}' appears twice")
        slot[part] = data
    scale = alpha / r
    entries = []
    for base, slot in pairs.items():
        if set(slot) != {"A", "B"}:
            raise UserError(f"adapter '{p}': tensor pair for '{base}' is missing one component")
        a, b = slot["A"], slot["B"]  # [n_in, r], [n_out, r]
        if a.shape[1] != b.shape[1]:
            raise UserError(f"adapter '{p}': '{base}' has mismatched ranks {a.shape[1]} and {b.shape[1]}")
        spec = LoraSpec(base, target_kind(base), a.shape[0], b.shape[0], a.shape[1])
        entries.append((spec, a, b, scale))
    if not entries:
        raise UserError(f"adapter '{p}': the .bin adapter holds no tensors")
    lora = params_from_factors(entries, dtype, alpha=float(alpha))
    if hp is not None:
        check_shapes(lora, hp, str(p))
    return lora
