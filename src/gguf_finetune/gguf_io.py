"""GGUF files in and out.

Reading wraps :class:`gguf.GGUFReader` (memory-mapped) with typed metadata access and turns every
way a file can be wrong into a one-line :class:`UserError` that names the file.  Writing goes
through :class:`gguf.GGUFWriter` into a temporary file in the destination folder, then fsync and
rename, so an interrupted write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from .errors import UserError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # gguf-py's reader (version 1 files predate GGUF v2's 64-bit counts)
_MISSING = object()


class _Reader(GGUFReader):
    """GGUFReader with bounds-checked, faster field reads.

    gguf-py slices its ``np.memmap`` once per value; every slice of a memmap subclass pays for
    ``__array_finalize__``, which makes a 49k-token vocabulary take seconds.  Reading through a
    plain ndarray view of the same map is several times faster and still zero-copy.  A read
    that would run past the end of the file raises instead of returning a short array.

    Counts and sizes in the header are checked against the bytes left in the file *before* any
    loop or view is built, so no header field can make the reader loop or allocate beyond the
    file's size: the key-value and tensor counts, array lengths (a numeric array becomes one view,
    not one view per element), and every tensor's type, shape and data range.  Nested arrays,
    which llama.cpp refuses, are refused too.
    """

    # smallest possible encodings: a key-value (key length, empty key, type, 1-byte value) and a
    # tensor info (name length, empty name, n_dims, type, offset)
    _MIN_KV_BYTES = 8 + 4 + 1
    _MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
    MAX_DIMS = 4  # GGML_MAX_DIMS

    @property
    def data(self):
        return self._plain

    @data.setter
    def data(self, mm):
        self._mm = mm
        self._plain = mm.view(np.ndarray)

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        dt = np.dtype(dtype)
        end = offset + dt.itemsize * count
        if count < 0 or end > self._plain.shape[0]:
            raise ValueError(f"truncated: {count} values of {dt} at offset {offset} run past the end of the file")
        arr = self._plain[offset:end].view(dt)
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(dt.newbyteorder(order))

    def _left(self, offs: int) -> int:
        return int(self._plain.shape[0]) - int(offs)

    def _get_str(self, offset):
        slen = self._get(offset, np.uint64)
        n = int(slen[0])
        if n > self._left(offset + 8):
            raise ValueError(f"truncated: string of {n} bytes at offset {offset + 8} runs past the end of the file")
        return slen, self._get(offset + 8, np.uint8, n)

    def _build_fields(self, offs, count):
        count = int(count)
        if count * self._MIN_KV_BYTES > self._left(offs):
            raise ValueError(f"the header declares {count} key-value pairs, more than the {self._left(offs)} "
                             f"bytes after it can hold")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs, count):
        count = int(count)
        if count * self._MIN_TENSOR_INFO_BYTES > self._left(offs):
            raise ValueError(f"the header declares {count} tensors, more than the {self._left(offs)} bytes "
                             f"after it can hold")
        return super()._build_tensor_info(offs, count)

    def _get_field_parts(self, orig_offs, raw_type):
        gtype = GGUFValueType(int(raw_type))  # ValueError for an unknown type
        if gtype != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        offs = orig_offs + 12
        try:
            itype = GGUFValueType(int(raw_itype[0]))
        except ValueError:
            raise ValueError(f"array of unknown type {int(raw_itype[0])} at offset {orig_offs}") from None
        if itype == GGUFValueType.ARRAY:
            raise ValueError(f"nested array at offset {orig_offs} (not allowed in GGUF)")
        count = int(alen[0])
        nptype = self.gguf_scalar_to_np.get(itype)
        min_item = np.dtype(nptype).itemsize if nptype is not None else 8  # a string: its u64 length
        if count * min_item > self._left(offs):
            raise ValueError(f"array of {count} {itype.name.lower()} values at offset {orig_offs} cannot fit in "
                             f"the {self._left(offs)} bytes left in the file")
        if nptype is None:
            return self._string_array(orig_offs, raw_itype, alen, count)
        values = self._get(offs, nptype, count)  # one view for the whole array
        return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [gtype, itype]

    def _string_array(self, orig_offs, raw_itype, alen, count):
        """An array of strings as gguf-py lays it out (a length view and a bytes view per string),
        with the lengths read as plain integers: a 50k vocabulary in a fraction of a second."""
        buf = self._plain
        size = int(buf.shape[0])
        mv = memoryview(buf)
        order = "little" if (sys.byteorder == "little") == (self.byte_order == "I") else "big"
        u64 = np.dtype(np.uint64) if self.byte_order == "I" else np.dtype(np.uint64).newbyteorder("S")
        parts: list = [raw_itype, alen]
        idxs: list[int] = []
        o = orig_offs + 12
        for _ in range(count):
            if o + 8 > size:
                raise ValueError(f"truncated: string length at offset {o} runs past the end of the file")
            n = int.from_bytes(mv[o:o + 8], order)
            end = o + 8 + n
            if end > size:
                raise ValueError(f"truncated: string of {n} bytes at offset {o + 8} runs past the end of the file")
            parts.append(buf[o:o + 8].view(u64))
            parts.append(buf[o + 8:end])
            idxs.append(len(parts) - 1)
            o = end
        return o - orig_offs, parts, idxs, [GGUFValueType.ARRAY, GGUFValueType.STRING]

    def _build_tensors(self, start_offs, fields):
        """Check every tensor's type, shape and data range (exact integers) before gguf-py views it."""
        size = int(self._plain.shape[0])
        for field in fields:
            _name_len, name_data, n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = field.name
            nd = int(n_dims[0])
            if nd > self.MAX_DIMS:
                raise ValueError(f"tensor '{name}' has {nd} dimensions (at most {self.MAX_DIMS})")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise ValueError(f"tensor '{name}' has unknown type {int(raw_dtype[0])}") from None
            ne = [int(d) for d in dims.tolist()]
            n_elems = 1
            for d in ne:
                n_elems *= d
            block, type_size = GGML_QUANT_SIZES[qtype]
            if (ne[0] if ne else 1) % block:
                raise ValueError(f"tensor '{name}' ({qtype.name}) has rows of {ne[0] if ne else 1} values, "
                                 f"not a multiple of its block size {block}")
            n_bytes = n_elems // block * type_size
            begin = int(start_offs) + int(offset_tensor[0])
            if begin + n_bytes > size:
                raise ValueError(f"tensor '{name}' (shape {ne}, {qtype.name}) has its data at offset {begin} + "
                                 f"{n_bytes} bytes, past the end of the file ({size} bytes)")
        return super()._build_tensors(start_offs, fields)


NOT_REGULAR = "not a regular file (a device, FIFO or socket cannot be read as a file)"


def check_regular_file(path: str | os.PathLike, what: str) -> None:
    """Raise a UserError naming ``what`` unless ``path`` is a regular file (not missing, a folder, a
    FIFO or a device: a FIFO would block a reader, /dev/zero would never end)."""
    if not os.path.exists(path):
        raise UserError(f"{what} '{os.fspath(path)}': file not found")
    if os.path.isdir(path):
        raise UserError(f"{what} '{os.fspath(path)}': is a directory, expected a file")
    if not os.path.isfile(path):
        raise UserError(f"{what} '{os.fspath(path)}': {NOT_REGULAR}")


def check_readable_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path if it is a readable, non-empty regular file, else raise UserError."""
    p = Path(path)
    check_regular_file(p, what)
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} '{p}': permission denied")
    if p.stat().st_size == 0:
        raise UserError(f"{what} '{p}': file is empty")
    return p


def read_file_bytes(path: str | os.PathLike, what: str) -> bytes:
    """The whole file at ``path``; a missing path, a directory or a read error is a UserError
    naming ``what`` (an empty file is the caller's to judge)."""
    p = os.fspath(path)
    check_regular_file(p, what)
    try:
        with open(p, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{what} '{p}': cannot read ({e.strerror})") from None


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped.

    ``get(key)`` returns plain Python values (str, int, float, bool, list); ``tensors`` maps
    tensor names to gguf ``ReaderTensor`` objects whose ``data`` is a numpy view into the map.
    """

    def __init__(self, path: str | os.PathLike, what: str = "model"):
        p = check_readable_file(path, what)
        self.path = p
        self.what = what
        with open(p, "rb") as f:
            head = f.read(8)
        magic = head[:4]
        if magic != GGUF_MAGIC:
            raise UserError(f"{what} '{p}': not a GGUF file (magic {magic!r}, expected b'GGUF')")
        if len(head) < 8:
            raise UserError(f"{what} '{p}': truncated GGUF file ({len(head)} bytes)")
        version = int.from_bytes(head[4:], "little")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            version = int.from_bytes(head[4:], "big")
        if version not in SUPPORTED_VERSIONS:
            raise UserError(f"{what} '{p}': unsupported GGUF version {version} "
                            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        try:
            self.reader = _Reader(str(p), "r")
        except UserError:
            raise
        except MemoryError:
            raise UserError(f"{what} '{p}': corrupt GGUF header (a size field is absurdly large)")
        except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad files
            raise UserError(f"{what} '{p}': corrupt or truncated GGUF file ({_short(e)})") from None
        self.tensors: dict[str, Any] = {}
        for t in self.reader.tensors:
            if t.name in self.tensors:
                raise UserError(f"{what} '{p}': duplicate tensor name '{t.name}'")
            self.tensors[t.name] = t

    # -- metadata ----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise UserError(f"{self.what} '{self.path}': missing metadata key '{key}'")
            return default
        try:
            return field.contents()
        except Exception as e:
            raise UserError(f"{self.what} '{self.path}': bad value for metadata key '{key}' ({_short(e)})") from None

    def get_int(self, key: str, default: Any = _MISSING) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            if v is default and default is not _MISSING:
                return v
            raise UserError(f"{self.what} '{self.path}': metadata key '{key}' should be an integer, got {v!r}")
        return int(v)

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            if v is default and default is not _MISSING:
                return v
            raise UserError(f"{self.what} '{self.path}': metadata key '{key}' should be a number, got {v!r}")
        return float(v)

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        v = self.get(key, default)
        if not isinstance(v, str):
            if v is default and default is not _MISSING:
                return v
            raise UserError(f"{self.what} '{self.path}': metadata key '{key}' should be a string")
        return v

    def get_array(self, key: str, default: Any = _MISSING) -> np.ndarray | Any:
        """A numeric array field as one numpy array (no per-element Python objects)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise UserError(f"{self.what} '{self.path}': missing metadata key '{key}'")
            return default
        if not field.types or field.types[0] != GGUFValueType.ARRAY or field.types[-1] == GGUFValueType.STRING:
            raise UserError(f"{self.what} '{self.path}': metadata key '{key}' should be a numeric array")
        if len(field.data) == 0:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([field.parts[i] for i in field.data])

    def get_string_array_bytes(self, key: str, default: Any = _MISSING) -> list[bytes] | Any:
        """A string array as raw bytes (tokenizer vocabularies need not be valid UTF-8)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise UserError(f"{self.what} '{self.path}': missing metadata key '{key}'")
            return default
        if not field.types or field.types[0] != GGUFValueType.ARRAY or field.types[-1] != GGUFValueType.STRING:
            raise UserError(f"{self.what} '{self.path}': metadata key '{key}' should be an array of strings")
        return [field.parts[i].tobytes() for i in field.data]

    def release_pages(self, tensor) -> None:
        """Drop a tensor's file pages from this process's resident set (MADV_DONTNEED).

        The data stays in the kernel's page cache, so reading it again costs a page-table walk,
        not disk I/O; what this saves is resident memory once the tensor has been dequantized.
        """
        mm = getattr(self.reader._mm, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-int(tensor.data_offset) // page) * page  # whole pages inside the tensor only
        end = (int(tensor.data_offset) + int(tensor.n_bytes)) // page * page
        if end > start:
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass

    def drop_field(self, key: str) -> None:
        """Forget a parsed metadata field (e.g. a 50k-entry vocabulary once the tokenizer holds it)."""
        self.reader.fields.pop(key, None)

    def keys(self) -> list[str]:
        return [k for k in self.reader.fields if not k.startswith("GGUF.")]

    # -- tensors -----------------------------------------------------------------------------
    def tensor(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise UserError(f"{self.what} '{self.path}': missing tensor '{name}'")
        return t

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in numpy order (rows first): ggml's [ne0, ne1] is numpy's (ne1, ne0)."""
        return tuple(int(x) for x in reversed(self.tensor(name).shape.tolist()))

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(int(self.tensor(name).tensor_type))


def open_gguf(path: str | os.PathLike, what: str = "model") -> GGUFFile:
    return GGUFFile(path, what)


def _short(e: Exception) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s[:160]


# -- writing --------------------------------------------------------------------------------

@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s folder; on success fsync it and rename onto ``dest``.

    On any exception the temporary file is removed and ``dest`` is left as it was.  An OSError
    (folder missing or not writable, disk full, ``dest`` a directory) becomes a one-line
    :class:`UserError` naming ``dest``.  The file gets the usual permissions (0666 minus the
    umask), not mkstemp's 0600.
    """
    dest = Path(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    if dest.is_dir():
        raise UserError(f"cannot write '{dest}': it is a directory")
    remove_stale_temporaries(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise UserError(f"cannot write '{dest}': {_os_reason(e, folder)}") from None
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        try:
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException as e:
        try:
            tmp_path.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UserError(f"cannot write '{dest}': {_os_reason(e, folder)}") from None
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM), or cannot tell: leave its file alone
        return True
    return True


_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporaries in ``folder`` left by writers that died (kill -9, power loss).

    :func:`atomic_path` names them ``.<name>.<pid>.<8 random>.tmp``; one whose process no longer
    exists can never be renamed into place.  Files of live processes (another run writing in the
    same folder) and anything not matching that exact pattern are left alone.
    """
    removed = []
    try:
        candidates = [p for p in Path(folder).glob(".*.tmp") if _TMP_NAME.match(p.name)]
    except OSError:
        return removed
    for p in candidates:
        if _pid_alive(int(_TMP_NAME.match(p.name).group("pid"))):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _os_reason(e: OSError, folder: Path) -> str:
    if e.errno == errno.ENOENT and not folder.is_dir():
        return f"folder '{folder}' does not exist"
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or str(e)


def write_gguf_atomic(writer_fill, dest: str | os.PathLike, arch: str) -> None:
    """Create a GGUFWriter on a temporary file, let ``writer_fill(w)`` add keys/tensors, write, rename.

    ``writer_fill`` must only call ``add_*`` methods; this function writes header, kv data and
    tensors.
    """
    with atomic_path(dest) as tmp:
        w = GGUFWriter(str(tmp), arch)
        writer_fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
