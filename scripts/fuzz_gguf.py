#!/usr/bin/env python
"""Fuzz every reader of untrusted files: mutate real GGUF files, load them, count the outcomes.

    python scripts/fuzz_gguf.py --iterations 2000 --seed 1

Seed files (built in a temporary folder, or read from tests/data): two tiny synthetic models (F32
untied; Q4_1 tied with GQA), llama.cpp's real tiny Q8_0 model with the llama-spm vocabulary, the
llama-spm vocabulary file itself, llama.cpp's finetune checkpoint, a checkpoint and a GGUF adapter
written by our own writers, and llama.cpp's legacy ``.bin`` adapter.

Each case takes one seed file and one mutation, chosen from the case's own random stream (so
``--case I`` replays case I of a seed exactly):

  flip      1-8 random bit flips (mostly in the header: key-values and tensor infos)
  truncate  cut the file inside the header, at a field boundary, or inside the tensor data
  length    rewrite a u64 length/count field (n_kv, n_tensors, string length, array count,
            dimension, tensor offset) with a huge, random, nearby or zero value
  type      rewrite a u32 type field (value type, array item type, tensor type, n_dims, version)
  value     rewrite a numeric metadata value (n_embd, block_count, token ids, alignment, ...) with
            an extreme one (0, -1, 2^31, NaN, inf, ...)
  shift     insert or delete 1-16 bytes inside the header
  dup       copy one tensor name or key over another of the same length (duplicates)

and then goes through every reader that would meet such a file: ``gguf_io.open_gguf``,
``model.load_model(with_tokenizer=True)`` (plus a tokenize/detokenize round), the tokenizer's
own fast metadata reader, ``formats.load.read_any`` with and without the model's hyper-parameters,
``formats.checkpoint.read_checkpoint``, and ``gguf-finetune inspect`` (text and ``--json``)
in-process.  Allowed outcomes: loads, or raises :class:`UserError` whose message names the file.
Anything else is a failure: another exception, a message without the file name, or a reader
running longer than ``--timeout`` seconds (a SIGALRM watchdog per reader).  The process runs
under an address-space limit (``--memory-limit``), so a header field that makes a reader
allocate far beyond the file's size shows up as a MemoryError instead of swapping the machine.

Prints a summary (per mutation and per seed file); exit status 1 when any case failed.
``--save-dir DIR`` keeps every failing file for replay.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "data" / "fixtures" / "llamacpp-tiny"
VOCAB = REPO / "tests" / "data" / "vocab" / "ggml-vocab-llama-spm.gguf"

STRATEGIES = ("flip", "truncate", "length", "type", "value", "shift", "dup")
HUGE = (2**32, 2**32 + 1, 2**40, 2**48, 2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1)


# ------------------------------------------------------------------------------------------------
# GGUF layout: where every length, count, type and value field of a (valid) file is
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    offset: int
    size: int  # 4 or 8 (or the byte length of a name for kind 'name')
    kind: str  # count | length | dim | offset | type | n_dims | version | value | name
    label: str
    vtype: int = -1  # GGUF value type of a 'value' slot


@dataclass
class Layout:
    slots: list[Slot] = field(default_factory=list)
    meta_end: int = 24  # end of the tensor infos
    data_start: int = 24  # first byte of tensor data (aligned)

    def of(self, *kinds: str) -> list[Slot]:
        return [s for s in self.slots if s.kind in kinds]


_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_layout(data: bytes) -> Layout:
    """Walk a well-formed little-endian GGUF file and list its fields (raises on a bad file)."""
    lay = Layout()
    add = lay.slots.append
    if data[:4] != b"GGUF":
        raise ValueError("not GGUF")
    add(Slot(4, 4, "version", "version"))
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    add(Slot(8, 8, "count", "n_tensors"))
    add(Slot(16, 8, "count", "n_kv"))
    off = 24
    alignment = 32

    def string(o: int, label: str) -> tuple[int, str]:
        (n,) = struct.unpack_from("<Q", data, o)
        add(Slot(o, 8, "length", label))
        add(Slot(o + 8, n, "name", label))
        return o + 8 + n, data[o + 8:o + 8 + n].decode("utf-8", "replace")

    for _ in range(n_kv):
        off, key = string(off, "key length")
        (vt,) = struct.unpack_from("<I", data, off)
        add(Slot(off, 4, "type", f"value type of {key}"))
        off += 4
        if vt == 8:
            off, _ = string(off, f"string length of {key}")
        elif vt == 9:
            et, count = struct.unpack_from("<IQ", data, off)
            add(Slot(off, 4, "type", f"item type of {key}"))
            add(Slot(off + 4, 8, "count", f"array count of {key}"))
            off += 12
            for i in range(count):
                if et == 8:
                    (n,) = struct.unpack_from("<Q", data, off)
                    if i < 4 or i == count - 1:  # a few are enough, a 32k vocabulary is not
                        add(Slot(off, 8, "length", f"length of {key}[{i}]"))
                    off += 8 + n
                else:
                    if i < 4 and et in (4, 5, 6):
                        add(Slot(off, _SCALAR_SIZE[et], "value", f"{key}[{i}]", et))
                    off += _SCALAR_SIZE[et]
        else:
            size = _SCALAR_SIZE[vt]
            if key == "general.alignment":
                (alignment,) = struct.unpack_from("<I", data, off)
            add(Slot(off, size, "value", key, vt))
            off += size
    for _ in range(n_tensors):
        off, name = string(off, "tensor name length")
        (nd,) = struct.unpack_from("<I", data, off)
        add(Slot(off, 4, "n_dims", f"n_dims of {name}"))
        off += 4
        for d in range(nd):
            add(Slot(off, 8, "dim", f"ne[{d}] of {name}"))
            off += 8
        add(Slot(off, 4, "type", f"tensor type of {name}"))
        add(Slot(off + 4, 8, "offset", f"data offset of {name}"))
        off += 12
    lay.meta_end = off
    lay.data_start = off + (-off % alignment)
    return lay


# ------------------------------------------------------------------------------------------------
# mutations: (rng, data, layout) -> (mutated bytes, description)
# ------------------------------------------------------------------------------------------------
def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _header_pos(rng, lay: Layout, n: int) -> int:
    end = max(1, min(n, lay.meta_end))
    return int(rng.integers(end)) if rng.random() < 0.75 else int(rng.integers(n))


def m_flip(rng, data: bytes, lay: Layout):
    b = bytearray(data)
    pos = []
    for _ in range(int(rng.integers(1, 9))):
        p = _header_pos(rng, lay, len(b))
        bit = int(rng.integers(8))
        b[p] ^= 1 << bit
        pos.append(f"{p}.{bit}")
    return bytes(b), "flip bits " + ",".join(pos)


def m_truncate(rng, data: bytes, lay: Layout):
    r = rng.random()
    if r < 0.4 or not lay.slots:
        cut = int(rng.integers(max(1, lay.meta_end)))
    elif r < 0.7:
        s = _pick(rng, lay.slots)
        cut = max(0, s.offset + int(rng.integers(-2, s.size + 2)))
    else:
        cut = int(rng.integers(lay.meta_end, max(lay.meta_end + 1, len(data))))
    cut = min(cut, len(data) - 1)
    return data[:cut], f"truncate at {cut} of {len(data)}"


def _u64_value(rng, old: int, n: int) -> tuple[int, str]:
    r = rng.random()
    if r < 0.35:
        v = _pick(rng, HUGE)
    elif r < 0.55:
        v = int(rng.integers(0, 2**63, dtype=np.int64)) * 2 + int(rng.integers(2))
    elif r < 0.75:
        v = int(rng.integers(0, 2 * n + 1))
    elif r < 0.95:
        v = max(0, old + int(rng.integers(-16, 17)))
    else:
        v = 0
    return v & (2**64 - 1), f"{old} -> {v}"


def m_length(rng, data: bytes, lay: Layout):
    slots = lay.of("count", "length", "dim", "offset")
    if not slots:
        return m_flip(rng, data, lay)
    s = _pick(rng, slots)
    (old,) = struct.unpack_from("<Q", data, s.offset)
    v, how = _u64_value(rng, old, len(data))
    b = bytearray(data)
    struct.pack_into("<Q", b, s.offset, v)
    return bytes(b), f"{s.label}: {how}"


def m_type(rng, data: bytes, lay: Layout):
    slots = lay.of("type", "n_dims", "version")
    if not slots:
        return m_flip(rng, data, lay)
    s = _pick(rng, slots)
    (old,) = struct.unpack_from("<I", data, s.offset)
    r = rng.random()
    v = int(rng.integers(0, 40)) if r < 0.7 else (int(rng.integers(0, 2**32, dtype=np.int64)) if r < 0.9 else
                                                   _pick(rng, (0xFFFFFFFF, 2**31, 2**16)))
    b = bytearray(data)
    struct.pack_into("<I", b, s.offset, v)
    return bytes(b), f"{s.label}: {old} -> {v}"


_EXTREME_INT = (0, 1, 2, 3, -1, -2, 7, 2**15, 2**16, 2**24, 2**24 + 1, 2**31 - 1, -2**31, 2**32 - 1, 2**40, -2**40)
_EXTREME_FLOAT = (0.0, -0.0, -1.0, 1e-45, 1e38, 3.4e38, float("inf"), float("-inf"), float("nan"), 1e-30)
_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}


def m_value(rng, data: bytes, lay: Layout):
    slots = lay.of("value")
    if not slots:
        return m_length(rng, data, lay)
    s = _pick(rng, slots)
    fmt = "<" + _FMT[s.vtype]
    (old,) = struct.unpack_from(fmt, data, s.offset)
    if s.vtype in (6, 12):
        v = _pick(rng, _EXTREME_FLOAT)
    else:
        bits = 8 * struct.calcsize(fmt)
        v = _pick(rng, _EXTREME_INT) if rng.random() < 0.8 else int(rng.integers(-2**31, 2**31))
        if s.vtype in (0, 2, 4, 7, 10):
            v &= (1 << bits) - 1
        else:
            v = ((v + (1 << (bits - 1))) & ((1 << bits) - 1)) - (1 << (bits - 1))
    b = bytearray(data)
    struct.pack_into(fmt, b, s.offset, v)
    return bytes(b), f"{s.label}: {old} -> {v}"


def m_shift(rng, data: bytes, lay: Layout):
    p = int(rng.integers(max(1, min(len(data), lay.meta_end))))
    k = int(rng.integers(1, 17))
    if rng.random() < 0.5:
        ins = bytes(rng.integers(0, 256, k, dtype=np.uint8))
        return data[:p] + ins + data[p:], f"insert {k} bytes at {p}"
    return data[:p] + data[p + k:], f"delete {k} bytes at {p}"


def m_dup(rng, data: bytes, lay: Layout):
    names = [s for s in lay.of("name") if s.size > 0]
    by_len: dict[int, list[Slot]] = defaultdict(list)
    for s in names:
        by_len[(s.size, s.label == "tensor name length")].append(s)
    groups = [g for g in by_len.values() if len(g) > 1]
    if not groups:
        return m_flip(rng, data, lay)
    g = _pick(rng, groups)
    i, j = rng.choice(len(g), 2, replace=False)
    src, dst = g[int(i)], g[int(j)]
    b = bytearray(data)
    b[dst.offset:dst.offset + dst.size] = data[src.offset:src.offset + src.size]
    what = data[src.offset:src.offset + src.size].decode("utf-8", "replace")
    return bytes(b), f"copy name '{what}' over the one at {dst.offset}"


MUTATORS: dict[str, Callable] = {"flip": m_flip, "truncate": m_truncate, "length": m_length, "type": m_type,
                                 "value": m_value, "shift": m_shift, "dup": m_dup}
RAW_STRATEGIES = ("flip", "truncate", "shift")  # for files without a GGUF layout (.bin)


# ------------------------------------------------------------------------------------------------
# seed files and the readers each goes through
# ------------------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    data: bytes
    suffix: str
    readers: list[tuple[str, Callable[[Path], object]]]
    layout: Layout | None = None


def _inspect(argv_extra: list[str]) -> Callable[[Path], object]:
    def run(p: Path):
        from gguf_finetune.cli import inspect

        with contextlib.redirect_stdout(io.StringIO()) as out:
            inspect.run([str(p), *argv_extra])
        return out.getvalue()

    return run


SAMPLE_TEXT = "Hello world, the cat sat.\n<s> caf\u00e9 \u2581x 12"


class BadTokens(Exception):
    """A loaded tokenizer produced ids a model with this vocabulary cannot embed (a failure)."""


def _round_trip(tok, n_vocab: int) -> None:
    for add_bos in (False, True):
        ids = list(tok.tokenize(SAMPLE_TEXT, add_bos=add_bos))
        bad = [i for i in ids if not 0 <= int(i) < n_vocab]
        if bad:
            raise BadTokens(f"token ids {bad[:5]} outside [0, {n_vocab})")
        tok.detokenize(ids)


def _load_model(p: Path):
    from gguf_finetune.api import load_model

    m = load_model(p, with_tokenizer=True)
    _round_trip(m.tokenizer, m.hparams.n_vocab)
    return m


def _tokenizer_fast_meta(p: Path):
    from gguf_finetune.tokenizer import load_tokenizer

    tok = load_tokenizer(p)
    _round_trip(tok, tok.n_vocab)


def _tokenizer_gguf_file(p: Path):
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.tokenizer import load_tokenizer

    tok = load_tokenizer(open_gguf(p))
    _round_trip(tok, tok.n_vocab)


def _open(p: Path):
    from gguf_finetune.gguf_io import open_gguf

    f = open_gguf(p)
    for k in f.keys():
        f.get(k)
    return f


def _read_any(hp) -> Callable[[Path], object]:
    def run(p: Path):
        from gguf_finetune.formats.load import read_any

        return read_any(p, hp)

    return run


def _read_checkpoint(hp) -> Callable[[Path], object]:
    def run(p: Path):
        from gguf_finetune.formats.checkpoint import read_checkpoint

        return read_checkpoint(p, hp)

    return run


def _describe_adapter(p: Path):
    from gguf_finetune.formats.load import describe_adapter

    return describe_adapter(p)


def build_targets(work: Path) -> list[Target]:
    from gguf_finetune.api import load_model
    from gguf_finetune.formats.adapter_gguf import write_adapter_gguf
    from gguf_finetune.formats.checkpoint import write_checkpoint
    from gguf_finetune.lora import LoraRanks, init_lora
    from gguf_finetune.optim import OptimizerState
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model
    from gguf_finetune.trainer import TrainState

    inspect_readers = [("inspect", _inspect([])), ("inspect --json", _inspect(["--json"]))]
    model_readers = [("open_gguf", _open), ("load_model", _load_model), ("tokenizer (fast meta)", _tokenizer_fast_meta),
                     *inspect_readers]
    write_synthetic_model(work / "synth-f32.gguf", SyntheticSpec(n_vocab=300, n_embd=32, n_ff=64, n_layer=2,
                                                                 n_head=4, n_head_kv=4, seed=1))
    write_synthetic_model(work / "synth-q41-tied.gguf", SyntheticSpec(n_vocab=320, n_embd=64, n_ff=96, n_layer=1,
                                                                      n_head=4, n_head_kv=2, tied=True,
                                                                      qtype="Q4_1", seed=2))
    synth = load_model(work / "synth-f32.gguf", with_tokenizer=False).hparams
    ranks = LoraRanks(tok_embd=2, out_norm=1, out=2, att_norm=1, wq=2, wk=1, wv=2, wo=1, ffn_norm=0,
                      ffn_gate=2, ffn_down=1, ffn_up=2)
    lora = init_lora(synth, ranks, 4.0, seed=5)
    lora.flat[:] = np.random.default_rng(5).standard_normal(lora.flat.size).astype(np.float32) * 0.01
    opt = OptimizerState.zeros(lora.layout.size, past=2)
    write_checkpoint(work / "our-checkpoint.gguf", synth, 32, ranks, lora, opt,
                     TrainState(iteration=3, shuffle_rng_state="5489"))
    write_adapter_gguf(work / "our-adapter.gguf", lora, synth)
    targets = [
        Target("synthetic model (f32)", (work / "synth-f32.gguf").read_bytes(), ".gguf", model_readers),
        Target("synthetic model (q4_1, tied)", (work / "synth-q41-tied.gguf").read_bytes(), ".gguf", model_readers),
        Target("our checkpoint", (work / "our-checkpoint.gguf").read_bytes(), ".gguf",
               [("read_any", _read_any(None)), ("read_any(hp)", _read_any(synth)),
                ("read_checkpoint(hp)", _read_checkpoint(synth)), *inspect_readers]),
        Target("our GGUF adapter", (work / "our-adapter.gguf").read_bytes(), ".gguf",
               [("read_any", _read_any(None)), ("read_any(hp)", _read_any(synth)),
                ("describe_adapter", _describe_adapter), *inspect_readers]),
    ]
    if FIXTURES.is_dir():
        tiny = load_model(FIXTURES / "tiny-llama-spm-q8_0.gguf", with_tokenizer=False).hparams
        targets += [
            Target("llama.cpp tiny model (q8_0, spm vocab)", (FIXTURES / "tiny-llama-spm-q8_0.gguf").read_bytes(),
                   ".gguf", model_readers),
            Target("llama.cpp checkpoint", (FIXTURES / "chk-tiny-4.gguf").read_bytes(), ".gguf",
                   [("read_any", _read_any(None)), ("read_any(hp)", _read_any(tiny)),
                    ("read_checkpoint(hp)", _read_checkpoint(tiny)), *inspect_readers]),
            Target("llama.cpp .bin adapter", (FIXTURES / "lora-tiny-4.bin").read_bytes(), ".bin",
                   [("read_any", _read_any(None)), ("read_any(hp)", _read_any(tiny)),
                    ("describe_adapter", _describe_adapter), *inspect_readers]),
        ]
    if VOCAB.is_file():
        targets.append(Target("llama-spm vocab", VOCAB.read_bytes(), ".gguf",
                              [("open_gguf", _open), ("tokenizer (fast meta)", _tokenizer_fast_meta),
                               ("tokenizer (GGUFFile)", _tokenizer_gguf_file), *inspect_readers]))
    for t in targets:
        if t.data[:4] == b"GGUF":
            t.layout = gguf_layout(t.data)
    return targets


# ------------------------------------------------------------------------------------------------
# running cases
# ------------------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the watchdog; a BaseException so that no ``except Exception`` swallows it."""


def _alarm(signum, frame):
    raise Hang()


@dataclass
class Result:
    case: int
    target: str
    strategy: str
    desc: str
    outcome: str  # ok | user_error | crash | hang | unnamed
    reader: str = ""
    detail: str = ""
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)


_RANK = {"ok": 0, "user_error": 1, "unnamed": 2, "crash": 3, "hang": 4}


def mutate(targets: list[Target], seed: int, case: int) -> tuple[Target, str, bytes, str]:
    rng = np.random.default_rng([seed, case])
    t = targets[int(rng.integers(len(targets)))]
    strategies = STRATEGIES if t.layout is not None else RAW_STRATEGIES
    strategy = _pick(rng, strategies)
    data, desc = MUTATORS[strategy](rng, t.data, t.layout or Layout(meta_end=min(len(t.data), 4096)))
    return t, strategy, data, desc


def run_case(targets: list[Target], seed: int, case: int, work: Path, timeout: float,
             verbose: bool = False) -> tuple[Result, bytes]:
    from gguf_finetune.errors import UserError

    t, strategy, data, desc = mutate(targets, seed, case)
    path = work / f"fuzz-case{t.suffix}"
    path.write_bytes(data)
    res = Result(case, t.name, strategy, desc, "ok")
    t0 = time.perf_counter()
    for rname, fn in t.readers:
        outcome, detail = "ok", ""
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            fn(path)
        except Hang:
            outcome, detail = "hang", f"still running after {timeout:g} s"
        except UserError as e:
            msg = str(e)
            res.messages.append(msg)
            outcome = "user_error" if (str(path) in msg or path.name in msg) else "unnamed"
            detail = msg
        except BaseException as e:  # noqa: BLE001 - everything else is what we are looking for
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome = "crash"
            tb = traceback.extract_tb(e.__traceback__)
            where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
            detail = f"{type(e).__name__} at {where}: {' '.join(str(e).split())[:200]}"
            if verbose:
                traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.perf_counter() - start
        if outcome != "hang" and elapsed > timeout:  # a C call the alarm could not interrupt
            outcome, detail = "hang", f"took {elapsed:.1f} s"
        if _RANK[outcome] > _RANK[res.outcome]:
            res.outcome, res.reader, res.detail = outcome, rname, detail
        if verbose:
            print(f"  {rname:<22} {outcome:<10} {elapsed * 1000:7.1f} ms  {detail[:150]}")
    res.seconds = time.perf_counter() - t0
    return res, data


def _warm_up(targets: list[Target], work: Path) -> None:
    """Compile every numba kernel a reader may meet (cached on disk), outside the watchdog."""
    from gguf.constants import GGML_QUANT_SIZES

    from gguf_finetune import quants

    for qt in quants.SUPPORTED:
        block, size = GGML_QUANT_SIZES[qt]
        raw = np.zeros((2, 256 // block * size), dtype=np.uint8)
        with contextlib.suppress(Exception):
            quants.dequantize(raw, qt)
            quants.dequantize_rows(raw, qt, 0, 1)
            quants.dequantize_take(raw, qt, np.array([1, 0]))
    for t in targets:
        p = work / f"warm{t.suffix}"
        p.write_bytes(t.data)
        for _name, fn in t.readers:
            fn(p)  # pristine files must load: a failure here is a bug in the seed set


def _shape(msg: str) -> str:
    """A message with paths and numbers blanked, to group similar messages."""
    msg = re.sub(r"'[^']*fuzz-case[^']*'", "FILE", msg)
    return re.sub(r"\d+", "N", msg)[:110]


@dataclass
class Summary:
    iterations: int
    seed: int
    seconds: float
    results: list[Result]

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.outcome in ("crash", "hang", "unnamed")]

    def counts(self) -> Counter:
        return Counter(r.outcome for r in self.results)

    def render(self) -> str:
        lines = [f"fuzz_gguf: {self.iterations} cases, seed {self.seed}, {self.seconds:.1f} s "
                 f"({1000 * self.seconds / max(1, self.iterations):.0f} ms/case)"]
        c = self.counts()
        lines.append("outcomes: " + ", ".join(f"{k} {c.get(k, 0)}" for k in _RANK))
        slowest = max(self.results, key=lambda r: r.seconds, default=None)
        if slowest is not None:
            lines.append(f"slowest case: {slowest.seconds:.2f} s (case {slowest.case}, {slowest.target}, "
                         f"{slowest.strategy})")
        for title, key in (("by mutation", lambda r: r.strategy), ("by seed file", lambda r: r.target)):
            lines.append(f"{title}:")
            groups: dict[str, Counter] = defaultdict(Counter)
            for r in self.results:
                groups[key(r)][r.outcome] += 1
            w = max(map(len, groups)) if groups else 0
            for g in sorted(groups):
                cc = groups[g]
                lines.append(f"  {g:<{w}}  " + "  ".join(f"{k} {cc.get(k, 0):>4}" for k in _RANK))
        shapes = Counter(_shape(m) for r in self.results for m in set(r.messages))
        lines.append(f"distinct error messages (numbers blanked): {len(shapes)}; most common:")
        lines += [f"  {n:>5}  {s}" for s, n in shapes.most_common(8)]
        if self.failures:
            lines.append(f"FAILURES ({len(self.failures)}):")
            for r in self.failures[:40]:
                lines.append(f"  case {r.case} [{r.target} / {r.strategy}: {r.desc}] {r.reader}: {r.outcome}: "
                             f"{r.detail}")
        return "\n".join(lines) + "\n"


def set_memory_limit(limit: int | None) -> None:
    if not limit:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def fuzz(iterations: int, seed: int, timeout: float = 5.0, save_dir: Path | None = None,
         cases: list[int] | None = None, verbose: bool = False, progress: bool = False) -> Summary:
    work = Path(tempfile.mkdtemp(prefix="fuzz-gguf-"))
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        targets = build_targets(work)
        _warm_up(targets, work)
        results = []
        todo = cases if cases is not None else range(iterations)
        t0 = time.perf_counter()
        for n, i in enumerate(todo):
            if verbose:
                t, strategy, _, desc = mutate(targets, seed, i)
                print(f"case {i}: {t.name} / {strategy}: {desc}")
            r, data = run_case(targets, seed, i, work, timeout, verbose)
            results.append(r)
            if save_dir is not None and r.outcome in ("crash", "hang", "unnamed"):
                save_dir.mkdir(parents=True, exist_ok=True)
                stem = f"seed{seed}-case{i}"
                suffix = next(t.suffix for t in targets if t.name == r.target)
                (save_dir / (stem + suffix)).write_bytes(data)
                (save_dir / (stem + ".txt")).write_text(f"{r}\n")
            if progress and (n + 1) % 100 == 0:
                bad = sum(1 for x in results if x.outcome in ("crash", "hang", "unnamed"))
                print(f"  {n + 1} cases, {time.perf_counter() - t0:.0f} s, {bad} failures", file=sys.stderr)
        return Summary(len(results), seed, time.perf_counter() - t0, results)
    finally:
        signal.signal(signal.SIGALRM, old)
        shutil.rmtree(work, ignore_errors=True)


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 3G, got {text!r}")
    return int(float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=2000, help="number of mutated files (default 2000)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds one reader may take (default 5)")
    ap.add_argument("--memory-limit", type=_size, default=_size("3G"),
                    help="address-space limit for this process (default 3G; 0 = none)")
    ap.add_argument("--case", type=int, action="append", help="replay only this case (repeatable), verbosely")
    ap.add_argument("--save-dir", type=Path, help="keep every failing file (and its description) here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case and reader")
    a = ap.parse_args(argv)
    set_memory_limit(a.memory_limit)
    summary = fuzz(a.iterations, a.seed, a.timeout, a.save_dir, a.case, a.verbose or bool(a.case),
                   progress=not a.case)
    sys.stdout.write(summary.render())
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
