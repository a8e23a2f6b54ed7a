"""export-lora: merge adapters into a base model, tensor by tensor, streaming.

For every adapted base tensor W (numpy [n_out, n_in]; norms g [n_embd] as [1, n_embd])::

    W' = W + Σ_i u_i · s_i · b_i · a_iᵀ        (u_i: the user's scale, s_i: the adapter's own)

computed in float32 in row chunks read straight from the base file (``os.pread``, never the whole
model), then stored as the output type.  Everything else is copied byte for byte: all metadata
key/values in their original encoding and order (tokenizer included; only ``general.file_type``
is updated) and every untouched tensor's raw data with its type (quantized data stays as is).
Peak memory is about one row chunk (≤ 16 MiB of float32) plus the adapters.

Output type of merged tensors (``outtype``): ``None`` follows llama.cpp's export-lora (F32 bases
stay F32, every other type becomes F16); or one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0,
q5_1 (gguf.quants).  1-D tensors (norms) are always F32; a matrix whose rows are not a whole
number of quantization blocks falls back to F16 with a warning.

Tied embeddings: a base without ``output.weight`` uses token_embd as its output head.  Our
token_embd adapters change the input embedding only and output adapters the head only, so when
either is present the merged model gets its own ``output.weight`` (token_embd as it was, plus the
output adapters), written right after ``token_embd.weight`` — the merged model is untied.

Adapters may be GGUF adapters, legacy .bin files, checkpoints or PEFT folders
(formats/load.py); each is checked against the base (architecture, layer count, shapes).
Unlike llama.cpp, adapters need not adapt the same tensors.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq
from tqdm import tqdm

from .. import quants
from ..errors import UserError
from ..gguf_io import GGUFFile, atomic_path, open_gguf
from ..lora import LoraParams, merge_for_inference
from ..model import read_hparams
from .load import load_adapter

OUTTYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0,
            "q4_1": QT.Q4_1, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1}
# llama_ftype of a model whose merged tensors are mostly of this type
FILE_TYPE = {QT.F32: 0, QT.F16: 1, QT.Q4_0: 2, QT.Q4_1: 3, QT.Q8_0: 7, QT.Q5_0: 8, QT.Q5_1: 9, QT.BF16: 32}
CHUNK_BYTES = 16 << 20  # float32 bytes per row chunk
COPY_BYTES = 64 << 20

_U8, _U32, _U64 = np.dtype("<u1"), np.dtype("<u4"), np.dtype("<u8")
GGUF_TYPE_UINT32 = 4


@dataclass
class MergeResult:
    n_tensors: int  # tensors written
    n_merged: int  # tensors with an adapter delta
    n_copied: int  # tensors copied byte for byte
    untied: bool  # an output.weight was added to a tied model
    out_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    name: str
    src: object  # gguf ReaderTensor providing the base data
    ne: tuple[int, ...]  # ggml order, as written
    qtype: QT  # output type
    merge: bool  # add the adapter delta (else copy raw)
    nbytes: int = 0
    offset: int = 0  # relative to the data section


def _nbytes(qtype: QT, ne: Sequence[int]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(ne, dtype=np.int64))
    return n // block * size


def _out_type(base_type: QT, ne: Sequence[int], outtype: str | None, warnings: list[str], name: str) -> QT:
    if all(x == 1 for x in ne[1:]):
        return QT.F32  # vectors (norms) stay F32
    if outtype is None:
        return QT.F32 if base_type == QT.F32 else QT.F16
    qt = OUTTYPES[outtype]
    block = GGML_QUANT_SIZES[qt][0]
    if ne[0] % block:
        warnings.append(f"warning: '{name}' has rows of {ne[0]} values, not a multiple of {block}: written as F16")
        return QT.F16
    return qt


def _gguf_str(s: str) -> bytes:
    raw = s.encode()
    return np.array([len(raw)], _U64).tobytes() + raw


def _kv_bytes(f: GGUFFile, file_type: int | None) -> tuple[bytes, int]:
    """All key/values of ``f`` in their original encoding and order, general.file_type set."""
    r = f.reader
    out, n = [], 0
    seen_ft = False
    for key, fld in r.fields.items():
        if key.startswith("GGUF."):
            continue
        n += 1
        if key == "general.file_type" and file_type is not None:
            seen_ft = True
            out.append(_gguf_str(key) + np.array([GGUF_TYPE_UINT32, file_type], _U32).tobytes())
            continue
        size = sum(int(p.nbytes) for p in fld.parts)
        out.append(r.data[fld.offset:fld.offset + size].tobytes())
    if file_type is not None and not seen_ft:
        n += 1
        out.append(_gguf_str("general.file_type") + np.array([GGUF_TYPE_UINT32, file_type], _U32).tobytes())
    return b"".join(out), n


def _tensor_info(p: _Plan) -> bytes:
    return (_gguf_str(p.name) + np.array([len(p.ne)], _U32).tobytes() + np.array(p.ne, _U64).tobytes()
            + np.array([int(p.qtype)], _U32).tobytes() + np.array([p.offset], _U64).tobytes())


def _pad(n: int, align: int) -> int:
    return -n % align


def _copy_range(fd_in: int, offset: int, n: int, fout) -> None:
    """Copy n bytes at ``offset`` of fd_in to the current position of ``fout`` (no big buffers)."""
    fout.flush()
    fd_out = fout.fileno()
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < n:
        want = min(COPY_BYTES, n - done)
        got = 0
        if use_cfr:
            try:
                got = os.copy_file_range(fd_in, fd_out, want, offset + done)
            except OSError:
                use_cfr = False
                got = 0
        if not use_cfr:
            data = os.pread(fd_in, want, offset + done)
            got = len(data)
            fout.write(data)
            fout.flush()
        if got <= 0:
            raise UserError(f"model '{_path_of(fd_in)}': the file is shorter than its header says")
        done += got
    fout.seek(0, os.SEEK_END)


def _path_of(fd: int) -> str:
    """The path of an open file (for a message), as the system knows it."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


def _encode(w: np.ndarray, qtype: QT) -> bytes:
    """Rows of float32 ``w`` [rows, cols] in ``qtype`` (ggml row layout)."""
    if qtype == QT.F32:
        return w.astype("<f4", copy=False).tobytes()
    if qtype == QT.F16:
        return w.astype("<f2").tobytes()
    return np.ascontiguousarray(gq.quantize(w, qtype)).tobytes()


def _merge_tensor(fd: int, p: _Plan, lora: LoraParams, delta_name: str | None, fout) -> None:
    """Stream W' = W + b·aᵀ of one tensor, row chunk by row chunk."""
    t = p.src
    base_type = QT(int(t.tensor_type))
    cols = int(p.ne[0])
    rows = int(np.prod(p.ne[1:], dtype=np.int64)) if len(p.ne) > 1 else 1
    row_bytes = int(t.n_bytes) // rows
    ab = lora.get(delta_name) if delta_name else None
    if ab is not None:
        a, b, s = ab
        bs = b * np.float32(s) if s != 1.0 else b  # [rows, R]
        aT = np.ascontiguousarray(a.T, dtype=np.float32)  # [R, cols]
    step = max(1, min(rows, CHUNK_BYTES // (4 * cols)))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = os.pread(fd, (r1 - r0) * row_bytes, int(t.data_offset) + r0 * row_bytes)
        if len(raw) != (r1 - r0) * row_bytes:
            raise UserError(f"model '{_path_of(fd)}': the file is truncated in tensor '{t.name}'")
        w = quants.dequantize(np.frombuffer(raw, np.uint8).reshape(r1 - r0, row_bytes), base_type)  # [n, cols]
        if ab is not None:
            w += bs[r0:r1] @ aT
        fout.write(_encode(w, p.qtype))


def _set_threads(threads: int | None) -> None:
    if not threads or threads <= 0:
        return
    try:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # numba not initialised with threads: keep its default
        pass


def merge_adapters(model: str | os.PathLike, adapters: Sequence[tuple[str | os.PathLike, float]],
                   output: str | os.PathLike, outtype: str | None = None, threads: int | None = None,
                   progress: bool | None = None) -> MergeResult:
    """Merge ``adapters`` ((path, user scale) pairs) into ``model`` and write ``output`` (atomic)."""
    t0 = time.perf_counter()
    if outtype is not None and outtype not in OUTTYPES:
        raise UserError(f"--outtype: unknown type '{outtype}' (choose from {', '.join(OUTTYPES)})")
    if not adapters:
        raise UserError("--lora: give at least one adapter (--lora FNAME or --lora-scaled FNAME S)")
    if Path(output).resolve() == Path(model).resolve():
        raise UserError(f"--output '{output}': is the base model file (-m); give the output another name")
    f = open_gguf(model, "model")
    if f.has("split.count") and f.get_int("split.count", 1) > 1:
        raise UserError(f"model '{f.path}': split models are not supported; merge the splits first (llama-gguf-split --merge)")
    if f.reader.byte_order != "I":
        raise UserError(f"model '{f.path}': big-endian GGUF files are not supported")
    hp = read_hparams(f)
    _set_threads(threads)
    loaded = []
    for path, scale in adapters:
        loaded.append((load_adapter(path, hp), float(scale)))
    lora = merge_for_inference(loaded)
    adapted = {s.name for s in lora.layout.specs}
    missing = [n for n in adapted if n not in f.tensors and not (n == "output.weight" and hp.tied_embeddings)]
    if missing:
        raise UserError(f"--lora: the adapters change tensors the model '{f.path}' does not have: "
                        f"{', '.join(sorted(missing))}")

    warnings: list[str] = []
    plans: list[tuple[_Plan, str | None]] = []  # (plan, adapter tensor whose delta is added)
    untie = hp.tied_embeddings and ("token_embd.weight" in adapted or "output.weight" in adapted)
    for name, t in f.tensors.items():
        ne = tuple(int(x) for x in t.shape)
        base_type = QT(int(t.tensor_type))
        if name in adapted:
            quants.check_supported(base_type, f"model '{f.path}': tensor '{name}'")
            qt = _out_type(base_type, ne, outtype, warnings, name)
            plans.append((_Plan(name, t, ne, qt, True), name))
        else:
            plans.append((_Plan(name, t, ne, base_type, False), None))
        if untie and name == "token_embd.weight":
            if "output.weight" in adapted:
                qt = _out_type(base_type, ne, outtype, warnings, "output.weight")
                plans.append((_Plan("output.weight", t, ne, qt, True), "output.weight"))
            else:  # the head stays the original embedding, byte for byte
                plans.append((_Plan("output.weight", t, ne, base_type, False), None))

    align = f.get_int("general.alignment", 32)
    if align <= 0 or align % 8:
        raise UserError(f"model '{f.path}': general.alignment {align} is not a positive multiple of 8")
    off = 0
    for p, _ in plans:
        p.nbytes = _nbytes(p.qtype, p.ne) if p.merge else int(p.src.n_bytes)
        p.offset = off
        off += p.nbytes + _pad(p.nbytes, align)
    if outtype is not None:
        file_type = FILE_TYPE[OUTTYPES[outtype]]
    else:  # llama.cpp writes MOSTLY_F16; say ALL_F32 when every matrix is F32
        mats = {p.qtype for p, _ in plans if len(p.ne) > 1 and any(x > 1 for x in p.ne[1:])}
        file_type = 0 if mats <= {QT.F32} else 1
    kv, n_kv = _kv_bytes(f, file_type)

    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(plans), desc="export-lora", unit="tensor", file=sys.stderr, disable=not show, leave=False)
    fd = os.open(f.path, os.O_RDONLY)
    try:
        with atomic_path(output) as tmp, open(tmp, "wb") as fout:
            fout.write(b"GGUF" + np.array([3], _U32).tobytes() + np.array([len(plans), n_kv], _U64).tobytes())
            fout.write(kv)
            for p, _ in plans:
                fout.write(_tensor_info(p))
            fout.write(b"\0" * _pad(fout.tell(), align))
            data_start = fout.tell()
            for p, delta in plans:
                bar.set_postfix_str(p.name, refresh=False)
                if fout.tell() - data_start != p.offset:
                    raise RuntimeError(f"export-lora: offset drift at '{p.name}'")
                if p.merge:
                    _merge_tensor(fd, p, lora, delta, fout)
                else:
                    _copy_range(fd, int(p.src.data_offset), p.nbytes, fout)
                fout.write(b"\0" * _pad(p.nbytes, align))
                bar.update(1)
            fout.flush()
            out_bytes = fout.tell()
    finally:
        os.close(fd)
        bar.close()
    n_merged = sum(1 for p, _ in plans if p.merge)
    return MergeResult(len(plans), n_merged, len(plans) - n_merged, untie, out_bytes,
                       time.perf_counter() - t0, warnings)


def run_export_lora(model: str | os.PathLike, adapters: Sequence[tuple[str | os.PathLike, float]],
                    output: str | os.PathLike, outtype: str | None = None, threads: int | None = None,
                    progress: bool | None = None) -> MergeResult:
    """The export-lora command's work (the CLI parses flags and prints the result)."""
    return merge_adapters(model, adapters, output, outtype, threads, progress)
