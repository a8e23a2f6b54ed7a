"""Read a GGUF file's metadata (key/value section) fast, without the tensor index.

``gguf.GGUFReader`` builds numpy views for every field and tensor, which takes about a second on
a model with a 49k vocabulary.  A tokenizer needs only the ``tokenizer.*`` keys (and
``general.name``), so this reader walks the header with ``struct`` on a memory map, keeps those
keys, and skips the rest.  It offers the same accessors the tokenizer uses on
:class:`gguf_finetune.gguf_io.GGUFFile` (``get``, ``get_array``, ``get_string_array_bytes``), so
either can be the source.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..gguf_io import check_readable_file

_MISSING = object()

# GGUF value types -> (struct code, numpy dtype)
_SCALAR = {
    0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16),
    4: ("I", np.uint32), 5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_),
    10: ("Q", np.uint64), 11: ("q", np.int64), 12: ("d", np.float64),
}
_STRING = 8
_ARRAY = 9


def wanted_key(key: str) -> bool:
    """Keys a tokenizer reads; everything else is skipped (not decoded)."""
    return (key.startswith("tokenizer.") and not key.startswith("tokenizer.chat_template")
            and key != "tokenizer.huggingface.json") or key == "general.name"


class GGUFMeta:
    """The tokenizer-relevant metadata of one GGUF file, read eagerly and then closed."""

    def __init__(self, path: str | os.PathLike, what: str = "model"):
        self.path = check_readable_file(path, what)
        self.what = what
        self._fields: dict[str, Any] = {}
        with open(self.path, "rb") as f:
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:
                raise UserError(f"{what} '{self.path}': cannot map file ({e})") from None
            try:
                self._parse(mm)
            except UserError:
                raise
            except (struct.error, IndexError, ValueError, OverflowError, MemoryError) as e:
                raise UserError(f"{what} '{self.path}': corrupt or truncated GGUF metadata ({e})") from None
            finally:
                mm.close()

    # -- parsing -----------------------------------------------------------------------------
    def _fail(self, msg: str):
        raise UserError(f"{self.what} '{self.path}': {msg}")

    def _parse(self, mm: mmap.mmap) -> None:
        size = len(mm)
        if size < 24 or mm[:4] != b"GGUF":
            self._fail(f"not a GGUF file (magic {bytes(mm[:4])!r}, expected b'GGUF')")
        (version,) = struct.unpack_from("<I", mm, 4)
        bo = "<"
        if version & 0xFFFF == 0 and version != 0:  # written big-endian
            bo = ">"
            (version,) = struct.unpack_from(">I", mm, 4)
        if version not in (2, 3):
            self._fail(f"unsupported GGUF version {version} (this reader handles 2 and 3)")
        _n_tensors, n_kv = struct.unpack_from(bo + "QQ", mm, 8)
        off = 24
        u64 = struct.Struct(bo + "Q")
        u32 = struct.Struct(bo + "I")

        def read_str(o: int) -> tuple[bytes, int]:
            (n,) = u64.unpack_from(mm, o)
            o += 8
            if o + n > size:
                raise ValueError(f"string of {n} bytes at offset {o} runs past the end of the file")
            return mm[o:o + n], o + n

        if n_kv > size:
            self._fail(f"corrupt GGUF header ({n_kv} metadata keys in a {size}-byte file)")
        for _ in range(n_kv):
            kb, off = read_str(off)
            key = kb.decode("utf-8", "replace")
            (vtype,) = u32.unpack_from(mm, off)
            off += 4
            keep = wanted_key(key)
            if vtype == _STRING:
                val, off = read_str(off)
                if keep:
                    self._fields[key] = val.decode("utf-8", "replace")
            elif vtype in _SCALAR:
                code, _dt = _SCALAR[vtype]
                (val,) = struct.unpack_from(bo + code, mm, off)
                off += struct.calcsize(code)
                if keep:
                    self._fields[key] = val
            elif vtype == _ARRAY:
                etype, count = struct.unpack_from(bo + "IQ", mm, off)
                off += 12
                if etype == _STRING:
                    if count > size:
                        raise ValueError(f"array of {count} strings in a {size}-byte file")
                    items = []
                    append = items.append
                    unpack = u64.unpack_from
                    # (one check after the loop: a length running past the end makes the next
                    # unpack fail or leaves off > size)
                    if keep:
                        for _i in range(count):
                            n = unpack(mm, off)[0] + 8
                            append(mm[off + 8:off + n])
                            off += n
                        self._fields[key] = items
                    else:
                        for _i in range(count):
                            off += unpack(mm, off)[0] + 8
                    if off > size:
                        raise ValueError("string runs past the end of the file")
                elif etype in _SCALAR:
                    _code, dt = _SCALAR[etype]
                    dt = np.dtype(dt).newbyteorder(bo)
                    end = off + dt.itemsize * count
                    if end > size:
                        raise ValueError(f"array of {count} values runs past the end of the file")
                    if keep:
                        self._fields[key] = np.frombuffer(mm[off:end], dtype=dt).astype(dt.newbyteorder("="))
                    off = end
                else:
                    self._fail(f"metadata key '{key}' is an array of unsupported type {etype}")
            else:
                self._fail(f"metadata key '{key}' has unknown value type {vtype}")

    # -- accessors (same names as GGUFFile) ----------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        v = self._fields.get(key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                self._fail(f"missing metadata key '{key}'")
            return default
        if isinstance(v, list):
            return [b.decode("utf-8", "replace") for b in v]
        if isinstance(v, np.ndarray):
            return v.tolist()
        return v

    def get_array(self, key: str, default: Any = _MISSING) -> np.ndarray | Any:
        v = self._fields.get(key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                self._fail(f"missing metadata key '{key}'")
            return default
        if not isinstance(v, np.ndarray):
            self._fail(f"metadata key '{key}' should be a numeric array")
        return v

    def get_string_array_bytes(self, key: str, default: Any = _MISSING) -> list[bytes] | Any:
        v = self._fields.get(key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                self._fail(f"missing metadata key '{key}'")
            return default
        if not isinstance(v, list):
            self._fail(f"metadata key '{key}' should be an array of strings")
        return v


def open_meta(src: Any, what: str = "model"):
    """``src`` as a metadata source: a GGUFFile/GGUFMeta is used as is, a path is read fast."""
    if isinstance(src, (str, os.PathLike, Path)):
        return GGUFMeta(src, what)
    if hasattr(src, "get") and hasattr(src, "get_string_array_bytes"):
        return src
    raise TypeError(f"expected a path or a GGUFFile, got {type(src).__name__}")
