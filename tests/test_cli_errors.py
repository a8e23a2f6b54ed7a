"""Bad input through the real command line: one clear line, the right exit code, nothing lost.

Every case runs ``python -m gguf_finetune ...`` (or the ``finetune`` / ``export-lora`` /
``gguf-finetune`` console scripts) as a subprocess in a folder of its own that already holds
outputs of an earlier run, and checks:

- exit status 1 (2 for a bad flag) and exactly one non-empty line on stderr, which names the file
  or flag and says what is wrong; no ``Traceback``;
- every file in the folder is byte for byte what it was (nothing overwritten, no temp files, no new
  files) — and training never started (except for ``trains=True`` cases: a NaN in the model's
  weights shows only in the first step's loss; they still write nothing);
- the process ran under an address-space limit (RLIMIT_AS 3 GB), so a header field cannot make it
  allocate its way out, within a timeout, and its peak resident memory (``os.wait4``'s
  ``ru_maxrss``) stayed under ``RSS_LIMIT``.

Cases about permission bits (unreadable files, a folder that is not writable) also run as root:
the child process then drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its capability
bounding set before it starts (``_drop_file_capabilities``), so root is held to the permission
bits like any other user.

Corrupt GGUF files are made from the tiny synthetic model and llama.cpp's fixture checkpoint by
byte surgery at the offsets ``scripts/fuzz_gguf.gguf_layout`` finds.  All cases run concurrently
in one module fixture (each is a separate process); the tests then check the recorded results.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tiny import TEXT

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "data" / "fixtures" / "llamacpp-tiny"
AS_LIMIT = 3 << 30
# Peak RSS of any case.  Measured (test_peak_memory_is_measured_and_bounded prints it): 85 MB for
# inspect, ~100 MB for export-lora, ~165 MB for finetune with numba and the tiny model loaded, 177 MB
# for the cases that begin a training step.  A header field or flag that made a reader allocate
# (and touch) a few hundred MB would cross this.
RSS_LIMIT = 400 << 20
TIMEOUT = 180
IS_ROOT = os.geteuid() == 0


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_gguf", REPO / "scripts" / "fuzz_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_gguf", mod)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_fuzz()


# ------------------------------------------------------------------------------------------------
# the test data: a model, data, a valid checkpoint/adapter, and files made for other models
# ------------------------------------------------------------------------------------------------
def _spec(**kw):
    from gguf_finetune.synthetic import SyntheticSpec

    base = dict(n_vocab=400, n_embd=32, n_ff=64, n_layer=2, n_head=4, n_head_kv=2, n_ctx_train=512, seed=1)
    base.update(kw)
    return SyntheticSpec(**base)


def _lora_files(folder: Path, model: str, stem: str, arch: str | None = None) -> None:
    """A checkpoint and a GGUF adapter (non-zero b) for ``model``, optionally claiming another arch (a
    five-letter name written over 'llama' in the files: their layout stays the llama one)."""
    from gguf_finetune.formats.adapter_gguf import write_adapter_gguf
    from gguf_finetune.formats.checkpoint import write_checkpoint
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.lora import LoraRanks, init_lora
    from gguf_finetune.model import read_hparams
    from gguf_finetune.optim import OptimizerState
    from gguf_finetune.trainer import TrainState

    hp = read_hparams(open_gguf(folder / model))
    ranks = LoraRanks.uniform(2)
    lora = init_lora(hp, ranks, 2.0, seed=3)
    lora.flat[:] = np.random.default_rng(3).standard_normal(lora.flat.size).astype(np.float32) * 0.01
    write_checkpoint(folder / f"{stem}.ckpt.gguf", hp, 16, ranks, lora, OptimizerState.zeros(lora.layout.size),
                     TrainState(iteration=1, shuffle_rng_state="5489"))
    write_adapter_gguf(folder / f"{stem}.adapter.gguf", lora, hp)
    if arch is not None:
        assert len(arch) == len("llama")
        for kind in ("ckpt", "adapter"):
            p = folder / f"{stem}.{kind}.gguf"
            p.write_bytes(p.read_bytes().replace(b"llama", arch.encode()))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from gguf_finetune.synthetic import write_synthetic_model

    d = tmp_path_factory.mktemp("cli-errors-base")
    write_synthetic_model(d / "m.gguf", _spec())
    write_synthetic_model(d / "wide.gguf", _spec(n_embd=64, n_ff=96, seed=2))  # other shapes
    write_synthetic_model(d / "bigvocab.gguf", _spec(n_vocab=450, seed=3))  # other vocabulary size
    (d / "train.txt").write_text(TEXT)
    _lora_files(d, "m.gguf", "good")
    _lora_files(d, "wide.gguf", "wide")
    _lora_files(d, "bigvocab.gguf", "bigvocab")
    _lora_files(d, "m.gguf", "mamba", arch="mamba")
    write_synthetic_model(d / "phi3.gguf", _spec(arch="phi3"))  # fused q/k/v: no attn_q
    write_synthetic_model(d / "qwen3.gguf", _spec(arch="qwen3"))
    # outputs of an "earlier run" that no failing command may touch
    (d / "out").mkdir()
    for name in ("chk-1.gguf", "chk-LATEST.gguf"):
        shutil.copy(d / "good.ckpt.gguf", d / "out" / name)
    for name in ("lora-1.gguf", "lora-LATEST.gguf"):
        shutil.copy(d / "good.adapter.gguf", d / "out" / name)
    (d / "out" / "metrics.jsonl").write_text('{"iter": 1, "loss": 6.0}\n')
    shutil.copy(d / "m.gguf", d / "merged.gguf")  # an earlier export-lora output
    return d


# ------------------------------------------------------------------------------------------------
# byte surgery
# ------------------------------------------------------------------------------------------------
def _slot(data: bytes, label: str, nth: int = 0):
    slots = [s for s in fuzz.gguf_layout(data).slots if s.label == label]
    assert len(slots) > nth, f"no field '{label}'"
    return slots[nth]


def _u64(data: bytes, label: str, value: int, nth: int = 0) -> bytes:
    b = bytearray(data)
    struct.pack_into("<Q", b, _slot(data, label, nth).offset, value)
    return bytes(b)


def _u32(data: bytes, label: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<I", b, _slot(data, label).offset, value)
    return bytes(b)


def _string_value(data: bytes, key: str, new: bytes) -> bytes:
    """Overwrite the string value of ``key`` with ``new`` of the same length."""
    s = _slot(data, f"string length of {key}")
    n = struct.unpack_from("<Q", data, s.offset)[0]
    assert len(new) == n
    return data[:s.offset + 8] + new + data[s.offset + 8 + n:]


def _tensor_name_over(data: bytes, src: str, dst: str) -> bytes:
    names = [s for s in fuzz.gguf_layout(data).slots if s.kind == "name" and s.label == "tensor name length"]
    by = {data[s.offset:s.offset + s.size].decode(): s for s in names}
    a, b = by[src], by[dst]
    assert a.size == b.size
    out = bytearray(data)
    out[b.offset:b.offset + b.size] = data[a.offset:a.offset + a.size]
    return bytes(out)


def _rename_tensor(data: bytes, name: str, new: str) -> bytes:
    """The tensor ``name`` renamed to ``new`` (same length): the file lacks a tensor called ``name``."""
    slot = next(s for s in fuzz.gguf_layout(data).slots if s.kind == "name" and s.label == "tensor name length"
                and data[s.offset:s.offset + s.size].decode() == name)
    assert len(new) == slot.size
    return data[:slot.offset] + new.encode() + data[slot.offset + slot.size:]


def _last_offset(data: bytes, value: int) -> bytes:
    """The data offset of the last tensor set to ``value``."""
    s = [x for x in fuzz.gguf_layout(data).slots if x.kind == "offset"][-1]
    b = bytearray(data)
    struct.pack_into("<Q", b, s.offset, value)
    return bytes(b)


def _cut_in(data: bytes, where: str) -> bytes:
    lay = fuzz.gguf_layout(data)
    if where == "header":
        return data[:20]
    if where == "key-values":
        return data[:_slot(data, "array count of tokenizer.ggml.tokens").offset + 40]
    if where == "tensor infos":
        first = next(s for s in lay.slots if s.label == "tensor name length")
        return data[:first.offset + 30]
    if where == "tensor data":
        return data[:lay.data_start + (len(data) - lay.data_start) // 2]
    raise ValueError(where)


Mutation = Callable[[bytes], bytes]
# name -> (how to make the file from m.gguf's bytes; None = special setup, what the error says)
MODEL_DEFECTS: dict[str, tuple[Mutation | str, str]] = {
    "missing": ("missing", r"file not found"),
    "directory": ("directory", r"is a directory"),
    "empty": (lambda d: b"", r"file is empty"),
    "not-gguf": (lambda d: b"hello, I am a text file\n" * 10, r"not a GGUF (file|adapter)"),
    "wrong-magic": (lambda d: b"GGUX" + d[4:], r"not a GGUF file \(magic b'GGUX'"),
    "wrong-version": (lambda d: d[:4] + struct.pack("<I", 7) + d[8:], r"unsupported GGUF version 7"),
    "truncated-header": (lambda d: _cut_in(d, "header"), r"truncated|past the end"),
    "truncated-key-values": (lambda d: _cut_in(d, "key-values"), r"truncated|past the end|cannot fit"),
    "truncated-tensor-infos": (lambda d: _cut_in(d, "tensor infos"), r"truncated|past the end|more than"),
    "truncated-tensor-data": (lambda d: _cut_in(d, "tensor data"), r"past the end of the file"),
    "kv-count-2^60": (lambda d: _u64(d, "n_kv", 2**60), r"declares 1152921504606846976 key-value pairs"),
    "tensor-count-2^50": (lambda d: _u64(d, "n_tensors", 2**50), r"declares 1125899906842624 tensors"),
    "string-length-2^62": (lambda d: _u64(d, "key length", 2**62), r"string of 4611686018427387904 bytes"),
    "array-count-2^40": (lambda d: _u64(d, "array count of tokenizer.ggml.tokens", 2**40),
                         r"array of 1099511627776 string values .* cannot fit"),
    "scores-count-2^40": (lambda d: _u64(d, "array count of tokenizer.ggml.scores", 2**40),
                          r"array of 1099511627776 float32 values .* cannot fit"),
    "tensor-offset-outside": (lambda d: _last_offset(d, len(d)), r"past the end of the file"),
    "tensor-dims-huge": (lambda d: _u64(d, "ne[1] of blk.0.ffn_up.weight", 2**40), r"past the end of the file"),
    "duplicate-tensor-names": (lambda d: _tensor_name_over(d, "blk.0.attn_q.weight", "blk.0.attn_k.weight"),
                               r"duplicate"),
    "unsupported-architecture": (lambda d: _string_value(d, "general.architecture", b"gemma"),
                                 r"unsupported architecture 'gemma'"),
    "unsupported-tensor-type": (lambda d: _u32(d, "tensor type of blk.0.attn_q.weight", 26),  # F32 -> I32
                                r"tensor 'blk.0.attn_q.weight': tensor type I32 is not supported"),
    "unknown-tensor-type": (lambda d: _u32(d, "tensor type of blk.1.attn_v.weight", 1000),
                            r"tensor 'blk.1.attn_v.weight' has unknown type 1000"),
}


def _generic_cut_in_kv(data: bytes) -> bytes:
    """Cut in the middle of the key-values of any GGUF file."""
    keys = [s for s in fuzz.gguf_layout(data).slots if s.label == "key length"]
    return data[:keys[len(keys) // 2].offset + 10]


def _generic_duplicate_name(data: bytes) -> bytes:
    """The second of two tensor names of the same length renamed to the first."""
    names = [s for s in fuzz.gguf_layout(data).slots if s.kind == "name" and s.label == "tensor name length"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a.size == b.size:
                return _tensor_name_over(data, data[a.offset:a.offset + a.size].decode(),
                                         data[b.offset:b.offset + b.size].decode())
    raise AssertionError("no two tensor names of the same length")


def _generic_slot(data: bytes, prefix: str, suffix: str = "") -> str:
    """The label of the first field whose label starts with ``prefix`` (and ends with ``suffix``)."""
    return next(s.label for s in fuzz.gguf_layout(data).slots if s.label.startswith(prefix)
                and s.label.endswith(suffix))


# Defects of any GGUF file, for checkpoints (--checkpoint-in, and export-lora --lora) and adapters
# (export-lora --lora); the pattern may differ by kind ({"checkpoint": ..., "adapter": ..., "*": ...}).
FILE_DEFECTS: dict[str, tuple] = {
    **{k: MODEL_DEFECTS[k] for k in ("missing", "directory", "empty", "not-gguf")},
    "wrong-magic": (MODEL_DEFECTS["wrong-magic"][0], r"not a GGUF .*\(magic b'GGUX'"),  # (or .bin or PEFT adapter)
    **{k: MODEL_DEFECTS[k] for k in ("wrong-version", "truncated-header")},
    "truncated-key-values": (_generic_cut_in_kv, r"truncated|past the end|cannot fit"),
    **{k: MODEL_DEFECTS[k] for k in ("truncated-tensor-infos", "truncated-tensor-data", "kv-count-2^60",
                                     "tensor-count-2^50", "string-length-2^62", "tensor-offset-outside")},
    "tensor-dims-huge": (lambda d: _u64(d, _generic_slot(d, "ne[1] of "), 2**40), r"past the end of the file"),
    "duplicate-tensor-names": (_generic_duplicate_name, r"duplicate"),
    "unsupported-tensor-type": (lambda d: _u32(d, _generic_slot(d, "tensor type of ", ".lora_b"), 26),  # F32 -> I32
                                {"checkpoint": r"tensor '.*\.lora_b' has type I32, expected F32", "*": r"I32"}),
    "unknown-tensor-type": (lambda d: _u32(d, _generic_slot(d, "tensor type of "), 1000), r"has unknown type 1000"),
}


def _f32(data: bytes, key: str, value: float) -> bytes:
    b = bytearray(data)
    struct.pack_into("<f", b, _slot(data, key).offset, value)
    return bytes(b)


def _tensor_value(data: bytes, name: str, index: int, value: float) -> bytes:
    """Element ``index`` of F32 tensor ``name`` set to ``value``."""
    lay = fuzz.gguf_layout(data)
    off = lay.data_start + struct.unpack_from("<Q", data, _slot(data, f"data offset of {name}").offset)[0]
    b = bytearray(data)
    struct.pack_into("<f", b, off + 4 * index, value)
    return bytes(b)


def _make_defect(folder: Path, name: str, how, source: Path) -> None:
    target = folder / name
    if how == "missing":
        return
    if how == "directory":
        target.mkdir()
        return
    if how == "unreadable":
        shutil.copy(source, target)
        target.chmod(0)
        return
    target.write_bytes(how(source.read_bytes()))


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after the program
    code: int
    pattern: str  # regex the one stderr line must match (besides naming the file or flag)
    names: str  # the file or flag the line must name
    setup: Callable[[Path], None] | None = None
    prog: str = "python -m gguf_finetune"  # or a console script: finetune, export-lora, gguf-finetune
    ok_warning: bool = False  # succeeds (exit 0) with this warning on stderr
    permissions: bool = False  # about permission bits: as root, run without the capabilities that bypass them
    trains: bool = False  # refused after 'main: begin training' (a NaN from the first step): still nothing written
    slow: bool = False  # the same kind of defect is already covered by a quick case


FT = ("--model-base", "m.gguf", "--train-data", "train.txt", "--sample-start", "<s>", "--ctx", "16", "--batch", "2",
      "--threads", "1", "--lora-r", "2", "--adam-iter", "1", "--seed", "1", "--checkpoint-in", "resume.gguf",
      "--checkpoint-out", "out/chk-ITERATION.gguf", "--lora-out", "out/lora-ITERATION.gguf", "--no-progress")


def ft(*extra: str, **flags: str) -> tuple[str, ...]:
    """finetune argv: FT with ``--flag value`` replaced (flags given as flag_name='value') plus extra."""
    argv = list(FT)
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = v
        else:
            argv += [flag, v]
    return ("finetune", *argv, *extra)


def export(model: str = "m.gguf", lora: str = "good.adapter.gguf", out: str = "merged.gguf"):
    return ("export-lora", "-m", model, "--lora", lora, "-o", out)


def _writer(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(d: Path):
        p = d / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def _copy(src: str, dst: str, mutate: Mutation | None = None) -> Callable[[Path], None]:
    def setup(d: Path):
        s = Path(src) if os.path.isabs(src) else d / src
        data = s.read_bytes()
        (d / dst).write_bytes(mutate(data) if mutate else data)

    return setup


HUGE = "99999999999999999999"


def _build_cases() -> list[Case]:
    cases: list[Case] = []
    # -- a damaged model, through all three commands ----------------------------------------------
    defects = dict(MODEL_DEFECTS)
    defects["unreadable"] = ("unreadable", r"permission denied")
    for i, (name, (how, pattern)) in enumerate(defects.items()):
        setup = (lambda how: lambda d: _make_defect(d, "bad.gguf", how, d / "m.gguf"))(how)
        perm = name == "unreadable"
        quick = i % 3  # each defect through one command quickly, all three in the slow run
        cases += [
            Case(f"model-{name}-finetune", ft(model_base="bad.gguf"), 1, pattern, "bad.gguf", setup,
                 permissions=perm, slow=quick != 0 and not perm),
            Case(f"model-{name}-export", export(model="bad.gguf"), 1, pattern, "bad.gguf", setup,
                 prog="export-lora", permissions=perm, slow=quick != 1),
        ]
        if name not in ("unsupported-architecture", "unsupported-tensor-type"):
            # (inspect describes such a model — "not supported for training here" — and exits 0:
            # test_inspect_marks_what_cannot_be_trained)
            cases.append(Case(f"model-{name}-inspect", ("inspect", "bad.gguf"), 1, pattern, "bad.gguf", setup,
                              prog="gguf-finetune", permissions=perm, slow=quick != 2))
    # -- non-finite hyper-parameters or weights -------------------------------------------------
    cases += [
        Case("model-rms-epsilon-nan-finetune", ft(model_base="bad.gguf"), 1,
             r"metadata 'llama.attention.layer_norm_rms_epsilon' = nan is not a positive finite number", "bad.gguf",
             _copy("m.gguf", "bad.gguf", lambda d: _f32(d, "llama.attention.layer_norm_rms_epsilon", float("nan")))),
        Case("model-rms-epsilon-nan-export", export(model="bad.gguf"), 1,
             r"'llama.attention.layer_norm_rms_epsilon' = nan", "bad.gguf",
             _copy("m.gguf", "bad.gguf", lambda d: _f32(d, "llama.attention.layer_norm_rms_epsilon", float("nan"))),
             prog="export-lora", slow=True),
        Case("model-rope-freq-base-inf-finetune", ft(model_base="bad.gguf"), 1,
             r"metadata 'llama.rope.freq_base' = inf is not a positive finite number", "bad.gguf",
             _copy("m.gguf", "bad.gguf", lambda d: _f32(d, "llama.rope.freq_base", float("inf"))), slow=True),
        # the loss is NaN from the first step: the model is named, not --adam-alpha, and no
        # checkpoint is claimed (there is none); numpy's RuntimeWarnings stay silent (one line)
        Case("model-nan-weights-finetune", ft(model_base="bad.gguf"), 1,
             r"tensor 'blk.0.attn_q.weight' holds non-finite values \(NaN or inf\), so the loss is nan from the "
             r"first iteration; no checkpoint was saved$", "bad.gguf",
             _copy("m.gguf", "bad.gguf", lambda d: _tensor_value(d, "blk.0.attn_q.weight", 5, float("nan"))),
             trains=True, slow=True),
        Case("model-inf-weights-resumed", ft(model_base="bad.gguf", checkpoint_in="out/chk-LATEST.gguf"), 1,
             r"tensor 'blk.1.ffn_down.weight' holds non-finite values .* the checkpoint 'out/chk-LATEST.gguf' "
             r"\(iteration 1\) is kept", "bad.gguf",
             _copy("m.gguf", "bad.gguf", lambda d: _tensor_value(d, "blk.1.ffn_down.weight", 0, float("inf"))),
             trains=True, slow=True),
    ]
    # -- a damaged checkpoint (--checkpoint-in) or adapter (export-lora --lora): every file defect -----
    for name, (how, pattern) in FILE_DEFECTS.items():
        if name == "missing":
            # finetune starts a new adapter (llama.cpp's behaviour); --only-write-lora needs the file
            cases.append(Case("checkpoint-missing-only-write-lora", ft("--only-write-lora", checkpoint_in="bad.gguf"),
                              1, r"file not found \(needed by --only-write-lora\)", "bad.gguf"))
            cases.append(Case("adapter-missing-export", export(lora="bad.gguf"), 1, pattern, "bad.gguf",
                              prog="export-lora"))
            continue
        for kind, src in (("checkpoint", "good.ckpt.gguf"), ("adapter", "good.adapter.gguf")):
            setup = (lambda how, src: lambda d: _make_defect(d, "bad.gguf", how, d / src))(how, src)
            pat = pattern.get(kind, pattern["*"]) if isinstance(pattern, dict) else pattern
            if kind == "checkpoint":
                cases.append(Case(f"checkpoint-{name}-finetune", ft(checkpoint_in="bad.gguf"), 1,
                                  pat if name != "directory" else r"is a directory", "bad.gguf", setup,
                                  slow=name != "truncated-tensor-data"))
            cases.append(Case(f"{kind}-{name}-export", export(lora="bad.gguf"), 1,
                              pat if name not in ("directory",) else r"folder without adapter_model|directory",
                              "bad.gguf", setup,
                              slow=kind == "checkpoint" or name not in ("not-gguf", "truncated-tensor-data")))
    fixture_ck = FIXTURES / "chk-tiny-4.gguf"
    if fixture_ck.is_file():
        cases += [
            Case("fixture-checkpoint-truncated", ft(checkpoint_in="bad.gguf"), 1, r"past the end of the file",
                 "bad.gguf", _copy(str(fixture_ck), "bad.gguf", lambda d: _cut_in(d, "tensor data")), slow=True),
            Case("fixture-checkpoint-rank-2^32", ft(checkpoint_in="bad.gguf",
                                                    model_base=str(FIXTURES / "tiny-llama-spm-q8_0.gguf")), 1,
                 r"call for \d+ LoRA values, more than its \d+ bytes can hold", "bad.gguf",
                 _copy(str(fixture_ck), "bad.gguf", lambda d: _set_value(d, "training.lora.rank.attn_q", 2**32 - 1))),
            Case("fixture-checkpoint-other-model", ft(checkpoint_in="fix.gguf"), 1,
                 r"made for another model \(llama.embedding_length = 64, the model has 32\)", "fix.gguf",
                 _copy(str(fixture_ck), "fix.gguf"), slow=True),
        ]
    # -- model families: what a family has and needs ------------------------------------------------
    cases += [
        Case("rank-flag-of-another-family", ft("--rank-wq", "2", model_base="phi3.gguf"), 2,
             r"--rank-wq: a phi3 model has no 'attn_q' tensor \(its matrices take .*--rank-wqkv", "--rank-wq"),
        Case("legacy-bin-for-another-family", ft(model_base="qwen3.gguf", lora_format="ggla"), 2,
             r"--lora-format ggla: llama.cpp's legacy .bin adapters are for llama models, this one is 'qwen3'",
             "--lora-format"),
        Case("model-lacks-a-tensor-of-its-family", ft(model_base="bad.gguf"), 1,
             r"missing tensor 'blk.1.attn_q_norm.weight'", "bad.gguf",
             _copy("qwen3.gguf", "bad.gguf",
                   lambda d: _rename_tensor(d, "blk.1.attn_q_norm.weight", "blk.1.attn_x_norm.weight"))),
    ]
    # -- packed rows hold whole records: the text pipeline's ways of filling rows contradict them ----
    cases += [Case(f"pack-with-{other[2:]}", ft("--pack", other), 2,
                   rf"--pack and {other}: give one of them \(packed rows hold whole records", "--pack")
              for other in ("--fill-with-next-samples", "--sample-random-offsets")]
    # -- made for another model: refused before training starts -----------------------------------
    cases += [
        Case("checkpoint-other-architecture", ft(checkpoint_in="mamba.ckpt.gguf"), 1,
             r"made for architecture 'mamba', the model is 'llama'", "mamba.ckpt.gguf"),
        Case("checkpoint-other-shapes", ft(checkpoint_in="wide.ckpt.gguf"), 1,
             r"made for another model \(llama.embedding_length = 64, the model has 32\)", "wide.ckpt.gguf"),
        Case("checkpoint-other-vocabulary", ft(checkpoint_in="bigvocab.ckpt.gguf"), 1,
             r"made for a vocabulary of 450 tokens, the model has 400", "bigvocab.ckpt.gguf"),
        Case("checkpoint-other-rank-flag", ft("--rank-wq", "3", checkpoint_in="good.ckpt.gguf"), 1,
             r"--rank-wq 3 does not match the checkpoint's rank 2", "good.ckpt.gguf", slow=True),
        Case("adapter-other-architecture", export(lora="mamba.adapter.gguf"), 1,
             r"made for architecture 'mamba', the model is 'llama'", "mamba.adapter.gguf", prog="export-lora",
             slow=True),
        Case("adapter-other-shapes", export(lora="wide.adapter.gguf"), 1, r"is for shape \[\d+, 64\]",
             "wide.adapter.gguf", prog="export-lora"),
        Case("adapter-other-vocabulary", export(lora="bigvocab.adapter.gguf"), 1,
             r"'token_embd.weight' is for shape \[450, 32\], the model has \[400, 32\]", "bigvocab.adapter.gguf"),
        # found by scripts/fuzz_gguf.py (seed 1, case 2219): a zero-sized dimension reached the dequantizer
        Case("adapter-zero-sized-factor", export(lora="bad.gguf"), 1,
             r"'blk.1.ffn_gate.weight' has an empty factor", "bad.gguf", prog="export-lora",
             setup=_copy("good.adapter.gguf", "bad.gguf", lambda d: _u64(d, "ne[0] of blk.1.ffn_gate.weight.lora_b", 0))),
        Case("checkpoint-as-adapter-other-model", export(lora="wide.ckpt.gguf"), 1,
             r"made for another model", "wide.ckpt.gguf", prog="export-lora", slow=True),
        Case("model-vocabulary-vs-embedding", ft(model_base="bad.gguf"), 1,
             r"the vocabulary has 399 tokens, but 'token_embd.weight' has 400 rows", "bad.gguf",
             _copy("m.gguf", "bad.gguf", _rewrite_vocab)),
    ]
    # -- not a checkpoint, or not usable as one: said as such -------------------------------------
    cases += [
        Case("checkpoint-is-an-adapter", ft(checkpoint_in="good.adapter.gguf"), 1,
             r"not a training checkpoint but a LoRA adapter", "good.adapter.gguf"),
        Case("checkpoint-is-a-model", ft(checkpoint_in="m.gguf"), 1, r"not a training checkpoint but a model",
             "m.gguf", slow=True),
        Case("checkpoint-i32-lora-tensor", ft(checkpoint_in="bad.gguf"), 1,
             r"tensor 'blk.0.attn_q.weight.lora_b' has type I32, expected F32", "bad.gguf",
             _copy("good.ckpt.gguf", "bad.gguf", lambda d: _u32(d, "tensor type of blk.0.attn_q.weight.lora_b", 26)),
             slow=True),
    ]
    # -- training data ----------------------------------------------------------------------------
    cases += [
        Case("data-missing", ft(train_data="nope.txt"), 1, r"file not found", "nope.txt", prog="finetune"),
        Case("data-directory", ft(train_data="out"), 1, r"is a directory", "out", slow=True),
        Case("data-empty", ft(train_data="d.txt"), 1, r"file is empty", "d.txt", _writer("d.txt", b""), slow=True),
        Case("data-whitespace", ft(train_data="d.txt"), 1, r"only whitespace", "d.txt",
             _writer("d.txt", " \n\t\n   \r\n")),
        Case("data-invalid-utf8", ft(train_data="d.txt"), 1,
             r"not valid UTF-8 at byte 41 \(line 2, column 5: b'\\xe9t\\xe9 '\)", "d.txt",
             _writer("d.txt", "<s>the cat sat on the mat in the sun\n<s>l".encode() + b"\xe9t\xe9 chaud\n")),
        Case("data-all-samples-empty", ft(train_data="d.txt"), 1, r"no tokens in the training samples", "d.txt",
             _writer("d.txt", "<s><s><s>")),
        Case("data-unreadable", ft(train_data="d.txt"), 1, r"permission denied|cannot read", "d.txt",
             lambda d: (_writer("d.txt", TEXT)(d), (d / "d.txt").chmod(0)), permissions=True),
        Case("data-fifo", ft(train_data="fifo.txt"), 1, r"not a regular file", "fifo.txt",
             lambda d: os.mkfifo(d / "fifo.txt"), slow=True),  # (opening it would block)
        Case("data-dev-zero", ft(train_data="/dev/zero"), 1, r"not a regular file", "/dev/zero", slow=True),
        Case("val-data-fifo", ft(val_data="fifo.txt"), 1, r"not a regular file", "--val-data",
             lambda d: os.mkfifo(d / "fifo.txt"), slow=True),
        Case("model-fifo", ft(model_base="fifo.gguf"), 1, r"not a regular file", "fifo.gguf",
             lambda d: os.mkfifo(d / "fifo.gguf"), slow=True),
        # JSONL (also tested in-process in tests/test_data_jsonl.py)
        Case("data-jsonl-all-records-empty", ft(train_data="d.jsonl"), 1,
             r"all 3 records are empty .* nothing to train on", "d.jsonl", _writer("d.jsonl", '{"text": ""}\n' * 3)),
        Case("data-jsonl-broken-line", ft(train_data="d.jsonl"), 1, r"line 2, column \d+: not valid JSON", "d.jsonl",
             _writer("d.jsonl", '{"text": "the cat"}\n{"text": "the dog",}\n'), slow=True),
        Case("data-jsonl-chat-without-assistant", ft("--chat-template", "chatml", train_data="d.jsonl"), 1,
             r"line 2: the conversation has no assistant turn \(nothing to train on\)", "d.jsonl",
             _writer("d.jsonl", '{"text": "the cat"}\n{"messages": [{"role": "user", "content": "hi"}]}\n'),
             slow=True),
        Case("data-jsonl-invalid-utf8", ft(train_data="d.jsonl"), 1, r"line 1: invalid UTF-8 at byte 11", "d.jsonl",
             _writer("d.jsonl", b'{"text": "\xff"}\n'), slow=True),
    ]
    # -- numbers: bad flags are usage errors (exit 2) ---------------------------------------------
    for flag, value in (("--ctx", "0"), ("--ctx", "-5"), ("--batch", "0"), ("--threads", "0"), ("--threads", "-1"),
                        ("--adam-iter", "-1"), ("--lora-r", "0"), ("--lora-r", "-2"), ("--rank-wq", "-1"),
                        ("--rank-att-norm", "-1"), ("--adam-alpha", "0"), ("--adam-alpha", "-0.001"),
                        ("--lora-alpha", "0"), ("--grad-acc", "0"), ("--save-every", "x"),
                        ("--save-every", "-1"),
                        # absurdly large (would be an allocation numpy refuses, after training began)
                        ("--ctx", HUGE), ("--batch", HUGE), ("--lora-r", HUGE), ("--rank-wq", HUGE),
                        ("--grad-acc", HUGE), ("--opt-past", HUGE), ("--ctx", "2000000"), ("--lora-r", "1000000000")):
        quick = f"{flag}={value}" in ("--ctx=0", "--adam-iter=-1", "--adam-alpha=-0.001", f"--ctx={HUGE}")
        cases.append(Case(f"flag{flag}={value}", ft(**{flag[2:].replace("-", "_"): value}), 2,
                          r"expected (a|an) .*, got", flag, prog="finetune" if flag == "--ctx" else
                          "python -m gguf_finetune", slow=not quick))
    cases.append(Case("export-flag-threads=0", (*export(), "-t", "0"), 2, r"expected a positive integer", "--threads",
                      prog="export-lora", slow=True))
    # -- sizes that fit the parser but not the model or the memory ---------------------------------
    cases += [
        Case("rank-above-model-dimension", ft(lora_r="64"), 2,
             r"--lora-r 64: larger than tensor 'blk.0.attn_q.weight' \(32 x 32\) of the model 'm.gguf'; a rank for "
             r"it can be at most 32", "--lora-r"),
        Case("rank-wq-above-model-dimension", ft(rank_wq="33"), 2, r"larger than tensor 'blk.0.attn_q.weight'",
             "--rank-wq", slow=True),
        Case("rank-norm-above-model-dimension", ft(rank_att_norm="33"), 2, r"larger than tensor "
             r"'blk.0.attn_norm.weight' \(32\)", "--rank-att-norm", slow=True),
        # 2^20 x 64 tokens: hundreds of GiB of activations, more than the 3 GB address space (or any machine)
        Case("memory-ctx-times-batch", ft(ctx="1048576", batch="64"), 1,
             r"training needs about [\d.]+ [GT]iB of memory \(activations for --ctx 1048576 x --batch 64: .*\), more "
             r"than the [\d.]+ [GMK]iB .*; lower --ctx or --batch$", "--ctx"),
        Case("memory-ctx-no-checkpointing", ft("--no-checkpointing", "--no-flash", ctx="262144", batch="4"), 1,
             r"training needs about .* lower --ctx or --batch \(or drop --no-checkpointing\) \(or drop --no-flash\)",
             "--ctx", slow=True),
    ]
    # -- outputs that would overwrite an input or each other: refused before anything is written ----
    cases += [
        Case("lora-out-is-the-model", ft(lora_out="m.gguf"), 1,
             r"--lora-out 'm.gguf': would overwrite the base model 'm.gguf' \(--model-base\)", "--lora-out"),
        Case("checkpoint-out-is-the-model", ft(checkpoint_out="m.gguf"), 1, r"would overwrite the base model",
             "--checkpoint-out", slow=True),
        Case("checkpoint-out-pattern-is-the-model", ft(checkpoint_out="m.ITERATION", fn_latest="gguf"), 1,
             r"--checkpoint-out 'm.ITERATION': would overwrite the base model 'm.gguf' \(--model-base\);",
             "--checkpoint-out",
             slow=True),
        Case("lora-out-is-the-train-data", ft(lora_out="train.txt"), 1,
             r"would overwrite the training data 'train.txt' \(--train-data\)", "--lora-out", slow=True),
        Case("lora-out-is-the-val-data", ft(lora_out="val.txt", val_data="val.txt"), 1,
             r"would overwrite the validation data 'val.txt' \(--val-data\)", "--lora-out", _writer("val.txt", TEXT),
             slow=True),
        Case("metrics-out-is-the-model", ft(metrics_out="m.gguf"), 1, r"would overwrite the base model",
             "--metrics-out", slow=True),
        Case("lora-out-through-folder-link-is-the-model", ft(lora_out="here/m.gguf"), 1,
             r"would overwrite the base model 'm.gguf'", "--lora-out", lambda d: os.symlink(".", d / "here"),
             slow=True),
        Case("lora-out-same-as-checkpoint-out", ft(lora_out="out/chk-ITERATION.gguf"), 1,
             r"--lora-out 'out/chk-ITERATION.gguf' and --checkpoint-out 'out/chk-ITERATION.gguf' would both write "
             r"'out/chk-LATEST.gguf'", "--lora-out"),
        Case("lora-out-is-the-checkpoint-in", ft("--only-write-lora", checkpoint_in="good.ckpt.gguf",
                                                 lora_out="good.ckpt.gguf"), 1,
             r"would overwrite the checkpoint 'good.ckpt.gguf' \(--checkpoint-in\)", "--lora-out", slow=True),
        # resuming from chk-LATEST into chk-ITERATION replaces LATEST (the normal workflow), but a
        # numbered file is the record of its iteration: chk-2.gguf holding iteration 1 is not replaced
        Case("checkpoint-out-numbered-is-the-checkpoint-in", ft(checkpoint_in="out/chk-2.gguf"), 1,
             r"--checkpoint-out 'out/chk-ITERATION.gguf': would overwrite the checkpoint 'out/chk-2.gguf' "
             r"\(--checkpoint-in\); give the output another name", "--checkpoint-out",
             _copy("good.ckpt.gguf", "out/chk-2.gguf"), slow=True),
        Case("export-out-is-the-model", export(out="m.gguf"), 1,
             r"^export-lora: --output 'm.gguf': would overwrite the base model 'm.gguf' \(-m\)", "--output",
             prog="export-lora", slow=True),
        Case("export-out-is-the-adapter", export(out="good.adapter.gguf"), 1,
             r"would overwrite the adapter 'good.adapter.gguf' \(--lora\)", "--output", prog="export-lora",
             slow=True),
    ]
    # -- outputs that cannot be written: refused before training (and before merging) -------------
    cases += [
        Case("lora-out-missing-folder", ft(lora_out="nodir/lora-ITERATION.gguf"), 1, r"folder .* does not exist",
             "--lora-out"),
        Case("checkpoint-out-missing-folder", ft(checkpoint_out="nodir/chk-ITERATION.gguf"), 1,
             r"folder .* does not exist", "--checkpoint-out", slow=True),
        Case("metrics-out-missing-folder", ft(metrics_out="nodir/metrics.jsonl"), 1, r"folder .* does not exist",
             "--metrics-out"),
        Case("lora-out-is-a-directory", ft(lora_out="out"), 1, r"is a directory", "--lora-out"),
        Case("checkpoint-out-not-writable", ft(checkpoint_out="ro/chk-ITERATION.gguf"), 1, r"is not writable",
             "--checkpoint-out", lambda d: ((d / "ro").mkdir(), (d / "ro").chmod(0o555)), permissions=True),
        Case("export-out-missing-folder", export(out="nodir/merged.gguf"), 1, r"folder .* does not exist",
             "--output", prog="export-lora"),
        Case("export-out-is-a-directory", export(out="out"), 1, r"is a directory", "--output", prog="export-lora",
             slow=True),
    ]
    # -- warnings, not errors (exit 0; --adam-iter 0 runs no step, as in llama.cpp) ---------------
    cases += [
        Case("ctx-above-training-context", ft(ctx="600", adam_iter="0", save_every="0"), 0,
             r"warning: --ctx 600 is above the model's training context 512", "--ctx", ok_warning=True),
        Case("sample-start-not-found", ft(sample_start="@@@", adam_iter="0", save_every="0"), 0,
             r"warning: --sample-start '@@@' does not occur in 'train.txt': training on the whole file as one sample",
             "--sample-start", ok_warning=True),
    ]
    return cases


def _set_value(data: bytes, key: str, value: int) -> bytes:
    s = _slot(data, key)
    fmt = {4: "<I", 8: "<Q"}[s.size]
    b = bytearray(data)
    struct.pack_into(fmt, b, s.offset, value)
    return bytes(b)


def _rewrite_vocab(data: bytes) -> bytes:
    """The model with its three vocabulary arrays one element shorter (re-encoded with gguf-py)."""
    import tempfile

    from gguf import GGUFReader, GGUFWriter

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.gguf"
        src.write_bytes(data)
        r = GGUFReader(src)
        w = GGUFWriter(str(Path(tmp) / "dst.gguf"), "llama")
        for key, fld in r.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            val = fld.contents()
            vt = fld.types[0]
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                val = val[:-1]
            if vt.name == "ARRAY":
                w.add_key_value(key, val, vt, sub_type=fld.types[-1])
            else:
                w.add_key_value(key, val, vt)
        for t in r.tensors:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return (Path(tmp) / "dst.gguf").read_bytes()


CASES = _build_cases()


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


_CONSOLE = {"finetune": "gguf_finetune.cli.finetune", "export-lora": "gguf_finetune.cli.export_lora",
            "gguf-finetune": "gguf_finetune.cli.main"}


def _command(prog: str, argv: tuple[str, ...]) -> list[str]:
    if prog == "python -m gguf_finetune":
        return [sys.executable, "-m", "gguf_finetune", *argv]
    args = list(argv)
    if prog in ("finetune", "export-lora"):
        args = args[1:]  # the program is the command
    exe = shutil.which(prog, path=str(Path(sys.executable).parent)) or shutil.which(prog)
    if exe:
        return [exe, *args]
    # console script not installed: the same entry point through the interpreter
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {prog!r}; from {_CONSOLE[prog]} import main; main()",
            *args]


def _walk(d: Path) -> list[Path]:
    """Everything under ``d``, not following symlinks (a case may link a folder to itself)."""
    found = []
    for top, dirs, files in os.walk(d):
        found += [Path(top) / n for n in dirs + files]
    return sorted(found)


def _snapshot(d: Path) -> dict[str, str]:
    out = {}
    for p in _walk(d):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "link to " + os.readlink(p)
        elif p.is_dir():
            out[rel + "/"] = "dir"
        elif not p.is_file():
            out[rel] = "special"  # a FIFO: reading it would block
        elif os.access(p, os.R_OK) or IS_ROOT:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = f"unreadable {p.stat().st_size}"
    return out


# -- root and permission bits -------------------------------------------------------------------
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2  # <linux/capability.h>
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4  # <linux/prctl.h>


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


_LIBC = _libc() if sys.platform.startswith("linux") else None  # loaded here, not in a forked child


def _drop_file_capabilities() -> None:
    """In the child, before exec: drop the capabilities that let root ignore permission bits from
    the bounding set (and clear the ambient set), so that exec does not give them back.  Root is
    then held to a file's mode bits like its owner: chmod 000 cannot be read, 0555 not written."""
    import ctypes

    if _LIBC is None:
        raise OSError("no prctl on this system")
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if _LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
    _LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


_PERMISSION_PROBE: list[str] = []  # cached: "" = root can be held to permission bits, else why not


def permission_bits_unenforceable() -> str:
    """Why the permission cases cannot be made to fail in this process ("" when they can)."""
    if not IS_ROOT:
        return ""
    if not _PERMISSION_PROBE:
        import tempfile

        why = ""
        with tempfile.TemporaryDirectory() as tmp:
            secret = Path(tmp) / "secret"
            secret.write_text("x")
            secret.chmod(0)
            try:
                r = subprocess.run([sys.executable, "-c", "open(__import__('sys').argv[1]).read()", str(secret)],
                                   preexec_fn=_drop_file_capabilities, capture_output=True, text=True, timeout=60)
                if r.returncode == 0:
                    why = "FAILED: root could still read a chmod-000 file after dropping CAP_DAC_OVERRIDE"
            except subprocess.SubprocessError as e:  # (an OSError in preexec_fn arrives as SubprocessError)
                why = f"cannot drop root's file capabilities here (no CAP_SETPCAP?): {e}"
        _PERMISSION_PROBE.append(why)
    return _PERMISSION_PROBE[0]


@dataclass
class Outcome:
    case: Case
    code: int | None
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    error: str = ""
    max_rss: int = 0  # bytes, the child's peak resident set (getrusage of the reaped child)


def _spawn(cmd: list[str], cwd: Path, env: dict, preexec) -> tuple[int | None, str, str, int]:
    """Run ``cmd``; (exit status or None on timeout, stdout, stderr, peak RSS in bytes).  The child is
    reaped with os.wait4, whose rusage is that child's alone (the cases run concurrently)."""
    import tempfile
    import threading

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=preexec)
        timed_out = threading.Event()

        def kill():
            if proc.returncode is None:
                timed_out.set()
                proc.kill()

        timer = threading.Timer(TIMEOUT, kill)
        timer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        code = None if timed_out.is_set() else proc.returncode
        return (code, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
                usage.ru_maxrss * 1024)


def _run_case(c: Case, base: Path, root: Path) -> Outcome:
    d = root / re.sub(r"[^\w.=-]", "_", c.id)
    shutil.copytree(base, d, symlinks=True)
    if c.setup is not None:
        c.setup(d)
    before = _snapshot(d)
    env = dict(os.environ, GGUF_FINETUNE_MEMORY_BUDGET="256M", COLUMNS="100")
    drop = c.permissions and IS_ROOT

    def preexec():
        _limit_memory()
        if drop:
            _drop_file_capabilities()

    code, stdout, stderr, rss = _spawn(_command(c.prog, c.argv), d, env, preexec)
    out = Outcome(c, code, stdout, stderr, before, _snapshot(d), "" if code is not None else
                  f"timed out after {TIMEOUT} s", rss)
    for p in _walk(d):  # let the temp folder be removed
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    return out


def _run_all(cases: list[Case], base: Path, root: Path) -> dict[str, Outcome]:
    todo = [c for c in cases if not (c.permissions and permission_bits_unenforceable())]
    with ThreadPoolExecutor(max_workers=max(2, min(4, 2 * (os.cpu_count() or 1)))) as pool:
        results = list(pool.map(lambda c: _run_case(c, base, root), todo))
    return {o.case.id: o for o in results}


QUICK = [c for c in CASES if not c.slow]
SLOW = [c for c in CASES if c.slow]


@pytest.fixture(scope="module")
def outcomes(base, tmp_path_factory) -> dict[str, Outcome]:
    return _run_all(QUICK, base, tmp_path_factory.mktemp("cli-errors"))


@pytest.fixture(scope="module")
def slow_outcomes(base, tmp_path_factory) -> dict[str, Outcome]:
    return _run_all(SLOW, base, tmp_path_factory.mktemp("cli-errors-slow"))


def _check(case: Case, o: Outcome | None) -> None:
    if o is None:
        assert case.permissions, case.id
        pytest.skip(permission_bits_unenforceable())
    assert not o.error, o.error
    assert "Traceback" not in o.stderr, o.stderr
    assert 0 < o.max_rss < RSS_LIMIT, f"peak RSS {o.max_rss >> 20} MB (limit {RSS_LIMIT >> 20} MB)"
    lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
    assert o.code == case.code, f"exit {o.code}, expected {case.code}; stderr: {o.stderr}"
    if case.ok_warning:
        assert any(re.search(case.pattern, ln) for ln in lines), o.stderr
        # the run did not rewrite the earlier outputs (no step, no save)
        changed = {k for k in o.before if o.after.get(k) != o.before[k] and not k.endswith("metrics.jsonl")}
        assert not changed, changed
        return
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{o.stderr}"
    line = lines[0]
    assert case.names in line, f"the message does not name {case.names!r}: {line}"
    assert re.search(case.pattern, line), f"{line!r} does not match {case.pattern!r}"
    assert ("main: begin training" in o.stdout) == case.trains, "training began" if not case.trains else o.stdout
    assert o.after == o.before, "files changed: " + ", ".join(
        sorted(k for k in set(o.before) | set(o.after) if o.before.get(k) != o.after.get(k)))


@pytest.mark.parametrize("case", QUICK, ids=[c.id for c in QUICK])
def test_bad_input_gives_one_clear_line(case: Case, outcomes):
    _check(case, outcomes.get(case.id))


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[c.id for c in SLOW])
def test_bad_input_gives_one_clear_line_all_commands(case: Case, slow_outcomes):
    _check(case, slow_outcomes.get(case.id))


def test_peak_memory_is_measured_and_bounded(outcomes):
    """The RSS bound above is about this harness's children: the measurement sees a child that
    allocates (so a clean result means something), and the quick cases' peaks, printed with -s,
    are the figures RSS_LIMIT was chosen from."""
    code, _out, _err, rss = _spawn([sys.executable, "-c", "b = bytearray(450 << 20)"], REPO, dict(os.environ),
                                   _limit_memory)
    assert code == 0 and rss > RSS_LIMIT, rss
    peaks = sorted((o.max_rss, o.case.id) for o in outcomes.values())
    print(f"\npeak RSS of the quick cases: min {peaks[0][0] >> 20} MB ({peaks[0][1]}), "
          f"max {peaks[-1][0] >> 20} MB ({peaks[-1][1]})")
    assert peaks[-1][0] < RSS_LIMIT


def test_root_is_held_to_permission_bits():
    """As root, the permission cases run in a child without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH:
    this checks that such a child is really refused a chmod-000 file (so those cases can fail)."""
    if not IS_ROOT:
        pytest.skip("not root: permission bits apply anyway")
    why = permission_bits_unenforceable()
    if why and not why.startswith("FAILED"):
        pytest.skip(why)
    assert not why, why


def test_every_case_kind_is_covered():
    """The table holds what the issue lists (so that a refactor cannot silently drop a kind)."""
    ids = {c.id for c in CASES}
    for must in ("model-missing-finetune", "model-unreadable-finetune", "model-directory-inspect",
                 "model-empty-export", "model-not-gguf-finetune", "model-wrong-magic-inspect",
                 "model-wrong-version-finetune", "model-truncated-header-finetune",
                 "model-truncated-key-values-finetune", "model-truncated-tensor-infos-finetune",
                 "model-truncated-tensor-data-finetune", "model-kv-count-2^60-finetune",
                 "model-string-length-2^62-finetune", "model-array-count-2^40-finetune",
                 "model-tensor-offset-outside-finetune", "model-tensor-dims-huge-finetune",
                 "model-duplicate-tensor-names-finetune", "model-unsupported-architecture-finetune",
                 "model-unsupported-tensor-type-finetune", "checkpoint-other-architecture",
                 "checkpoint-other-shapes", "checkpoint-other-vocabulary", "adapter-other-shapes",
                 "data-missing", "data-empty", "data-whitespace", "data-invalid-utf8", "data-all-samples-empty",
                 "sample-start-not-found", "ctx-above-training-context", "flag--ctx=0", "flag--batch=0",
                 "flag--adam-iter=-1", "flag--threads=0", "flag--lora-r=0", "flag--adam-alpha=0",
                 "lora-out-missing-folder", "checkpoint-out-not-writable",
                 # issue #7
                 f"flag--ctx={HUGE}", f"flag--batch={HUGE}", f"flag--lora-r={HUGE}", "flag--ctx=2000000",
                 "flag--lora-r=1000000000", "rank-above-model-dimension", "memory-ctx-times-batch",
                 "lora-out-is-the-model", "checkpoint-out-is-the-model", "lora-out-is-the-train-data",
                 "lora-out-same-as-checkpoint-out", "export-out-is-the-model", "checkpoint-i32-lora-tensor",
                 "checkpoint-is-an-adapter", "model-rms-epsilon-nan-finetune", "model-nan-weights-finetune",
                 "data-jsonl-all-records-empty", "data-jsonl-broken-line", "data-jsonl-chat-without-assistant",
                 "data-dev-zero", "data-fifo", "model-unreadable-export", "data-unreadable"):
        assert must in ids, must
    for defect in FILE_DEFECTS:  # every file defect also for checkpoints and adapters
        if defect != "missing":
            assert f"checkpoint-{defect}-finetune" in ids and f"adapter-{defect}-export" in ids, defect


def test_output_collisions_allowed_and_refused(tmp_path, monkeypatch):
    """Which names a run may write (ITERATION numbers in range, LATEST, best) against its inputs: the
    LATEST checkpoint it resumes from may be replaced, nothing else."""
    from gguf_finetune.cli.finetune_args import parse_finetune_args
    from gguf_finetune.cli.preflight import check_outputs, finetune_inputs, finetune_outputs
    from gguf_finetune.errors import UserError

    monkeypatch.chdir(tmp_path)
    for name in ("m.gguf", "t.txt", "chk-LATEST.gguf", "chk-best.gguf", "chk-7.gguf", "chk-12.gguf", "v.txt"):
        Path(name).write_bytes(b"x")

    def check(*argv: str, first: int = 0) -> str:
        a = parse_finetune_args(["--model-base", "m.gguf", "--train-data", "t.txt", "--adam-iter", "5", *argv])
        try:
            check_outputs(finetune_outputs(a, first), finetune_inputs(a))
        except UserError as e:
            return str(e)
        return ""

    ok = ["--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
          "--lora-out", "lora-ITERATION.gguf"]
    assert check(*ok, first=7) == ""  # the normal resume: chk-LATEST is replaced, chk-8..12 are new
    assert check(*ok, "--save-best", "--val-split", "0.2", first=7) == ""
    assert check("--checkpoint-in", "chk-best.gguf", "--checkpoint-out", "chk-ITERATION.gguf", "--save-best",
                 "--val-split", "0.2", first=7) == ""
    assert check("--checkpoint-in", "chk.gguf", "--checkpoint-out", "chk.gguf") == ""  # one name, no pattern
    assert check(*ok, first=6) == ""  # chk-7..11: chk-7.gguf exists but is not an input
    assert "would overwrite the checkpoint 'chk-7.gguf'" in check(
        "--checkpoint-in", "chk-7.gguf", "--checkpoint-out", "chk-ITERATION.gguf", first=6)
    assert check("--checkpoint-in", "chk-12.gguf", "--checkpoint-out", "chk-ITERATION.gguf", first=7) != ""
    assert check("--checkpoint-in", "chk-12.gguf", "--checkpoint-out", "chk-ITERATION.gguf", first=12) == ""
    assert check("--checkpoint-in", "chk-7.gguf", "--checkpoint-out", "chk-0ITERATION.gguf", first=6) == ""
    assert "(--checkpoint-in)" in check("--checkpoint-in", "chk-LATEST.gguf", "--lora-out", "chk-LATEST.gguf")
    assert "'ITERATION.gguf': would overwrite the base model 'm.gguf' (--model-base);" in check(
        "--lora-out", "ITERATION.gguf", "--fn-latest", "m")
    assert "(--model-base) (as './m.gguf')" in check("--lora-out", "./ITERATION.gguf", "--fn-latest", "m")
    assert "(--val-data)" in check("--val-data", "v.txt", "--checkpoint-out", "v.ITERATION", "--fn-latest", "txt")
    assert "would both write 'x-LATEST.gguf'" in check("--lora-out", "x-ITERATION.gguf", "--checkpoint-out",
                                                       "x-ITERATION.gguf")
    assert "would both write 'x-3.gguf'" in check("--lora-out", "x-3.gguf", "--checkpoint-out", "x-ITERATION.gguf")
    assert check("--lora-out", "x-9.gguf", "--checkpoint-out", "x-ITERATION.gguf") == ""  # only 1..5 are written
    assert "--metrics-out" in check("--metrics-out", "t.txt")
    os.symlink("m.gguf", "link.gguf")
    # writing 'link.gguf' replaces the link, not the model; appending to it would write into the model
    assert check("--lora-out", "link.gguf") == ""
    assert "would overwrite the base model" in check("--metrics-out", "link.gguf")
    assert check("--adam-iter", "0", "--lora-out", "m.gguf", "--checkpoint-out", "m.gguf") == ""  # writes nothing
    assert "(--checkpoint-in)" in check("--only-write-lora", "--checkpoint-in", "chk-7.gguf", "--lora-out",
                                        "chk-ITERATION.gguf", first=7)


def test_memory_estimate_names_the_flags_responsible(base):
    """The estimate grows with --ctx x --batch (and the ranks); a run whose estimate exceeds what is
    available is refused naming the flags of the largest part; a small run passes."""
    from gguf_finetune.cli.finetune_args import parse_finetune_args
    from gguf_finetune.cli.preflight import check_memory, estimate_training_memory
    from gguf_finetune.errors import UserError
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.model import read_hparams

    hp = read_hparams(open_gguf(base / "m.gguf"))

    def est(*argv: str, size: int = 1000):
        return estimate_training_memory(parse_finetune_args(list(argv)), hp, size).total

    assert est("--ctx", "16", "--batch", "2") < 2 << 20
    assert est("--ctx", "64", "--batch", "8") > 10 * est("--ctx", "16", "--batch", "2") / 2
    assert est("--ctx", "512", "--no-flash") > est("--ctx", "512")  # the [B, H, T, T] probabilities
    assert est("--ctx", "512", "--no-checkpointing") > est("--ctx", "512")
    assert est(size=10**8) - est(size=0) == 5 * 4 * 10**8  # parameters, gradients, 2 moments, decay mask
    a = parse_finetune_args(["--ctx", "4096", "--batch", "64"])
    assert check_memory(a, hp, 1000, (64 << 30, "available")).total < 64 << 30
    with pytest.raises(UserError, match=r"\(activations for --ctx 4096 x --batch 64: .*\), more than the 256.0 MiB "
                                        r"available; lower --ctx or --batch$"):
        check_memory(a, hp, 1000, (256 << 20, "available"))
    a = parse_finetune_args(["--ctx", "8", "--batch", "1", "--rank-wq", "30"])
    with pytest.raises(UserError, match=r"lower --lora-r or --rank-wq$"):
        check_memory(a, hp, 10**8, (1 << 30, "available"))


def test_inspect_marks_what_cannot_be_trained(base, tmp_path, capsys):
    """inspect describes a model with an unsupported tensor type (exit 0), marking it as
    RELIABILITY.md says; finetune refuses the same file (model-unsupported-tensor-type-finetune)."""
    from gguf_finetune.cli.inspect import describe, render

    bad = tmp_path / "i32.gguf"
    bad.write_bytes(MODEL_DEFECTS["unsupported-tensor-type"][0]((base / "m.gguf").read_bytes()))
    info = describe(bad)
    assert info["trainable"] is False and info["unsupported_tensor_types"] == ["i32"]
    assert "tensor types:      f32 20, i32 1 (i32: not supported for training here)" in render(info)
    good = describe(base / "m.gguf")
    assert good["trainable"] and good["unsupported_tensor_types"] == []
    assert "not supported" not in render(good)


# ------------------------------------------------------------------------------------------------
# untrusted content
# ------------------------------------------------------------------------------------------------
# file (relative to the repository) -> why a finding there is legitimate; empty: none is
ALLOWED: dict[str, str] = {}
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "cloudpickle"}
UNSAFE_ATTRS = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("torch", "load"),
                ("joblib", "load"), ("jinja2", "Environment"), ("jinja2", "Template"),
                ("jinja2", "NativeEnvironment"), ("np", "load"), ("numpy", "load")}
JINJA_UNSANDBOXED = {"Environment", "Template", "NativeEnvironment"}


def scan_source(text: str) -> list[tuple[int, str]]:
    """Risky constructs in Python source, found on its tokens (strings and comments do not count):
    eval/exec calls, pickle-like modules, yaml.load, torch.load, np.load (pickle unless
    allow_pickle=False, the default, is kept), allow_pickle=True, unsandboxed jinja2 classes."""
    import io
    import tokenize

    toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)]
    found = []
    for i, t in enumerate(toks):
        prev = toks[i - 1].string if i else ""
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        if t.type != tokenize.NAME:
            continue
        if t.string in ("eval", "exec") and nxt == "(" and prev not in (".", "def"):
            found.append((t.start[0], f"{t.string}() runs code"))
        elif t.string in UNSAFE_MODULES and prev not in (".",):
            found.append((t.start[0], f"{t.string}: deserializing runs code"))
        elif t.string == "allow_pickle" and nxt == "=" and i + 2 < len(toks) and toks[i + 2].string == "True":
            found.append((t.start[0], "allow_pickle=True unpickles object arrays"))
        elif prev == "." and i >= 2 and (toks[i - 2].string, t.string) in UNSAFE_ATTRS:
            if (toks[i - 2].string, t.string) in (("np", "load"), ("numpy", "load")):
                continue  # safe by default (allow_pickle=False); allow_pickle=True is caught above
            found.append((t.start[0], f"{toks[i - 2].string}.{t.string} constructs arbitrary objects / is unsandboxed"))
        elif t.string in JINJA_UNSANDBOXED:
            line = text.splitlines()[t.start[0] - 1]
            if re.match(r"\s*from\s+jinja2(\.\w+)?\s+import\b", line):
                found.append((t.start[0], f"jinja2 {t.string} is not sandboxed"))
    return found


def test_no_unsafe_deserialization_in_source():
    """Model files, adapters, tokenizer configs and chat templates are untrusted: nothing in the
    package (or its scripts) may unpickle, eval, exec, yaml.load, or render Jinja outside jinja2's
    sandbox.  An allowed use must be listed in ALLOWED with its reason."""
    offenders = []
    files = sorted((REPO / "src" / "gguf_finetune").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    for path in files:
        rel = str(path.relative_to(REPO))
        if rel in ALLOWED:
            continue
        for lineno, why in scan_source(path.read_text(encoding="utf-8")):
            offenders.append(f"{rel}:{lineno}: {why}")
    assert not offenders, "\n".join(offenders)


def test_the_scanner_finds_what_it_looks_for():
    """scan_source catches each construct (so the test above can fail) and ignores look-alikes."""
    bad = ["import pickle", "obj = pickle.loads(b)", "from dill import loads", "x = eval(s)", "exec(code)",
           "np.load(f, allow_pickle=True)", "yaml.load(fh)", "env = jinja2.Environment()",
           "from jinja2 import Environment", "from jinja2 import Template as T", "torch.load(p)"]
    for s in bad:
        assert scan_source(s + "\n"), s
    good = ["env = sandbox.ImmutableSandboxedEnvironment()", "self.evaluate(x)", "ast.literal_eval(x)",
            "model.eval()", "def eval(self, ids):\n    pass", "s = 'eval(x) and pickle'  # exec(y)",
            "np.load(f)", "from jinja2 import sandbox", "obj.exec(y)"]
    for s in good:
        assert not scan_source(s + "\n"), s


def test_output_names_are_only_the_iteration_substitution():
    from gguf_finetune.cli.finetune import output_name

    assert output_name("../up/lora-ITERATION.gguf", "ITERATION", "7") == "../up/lora-7.gguf"
    assert output_name("ITERATION/x-ITERATION.gguf", "ITERATION", "LATEST") == "LATEST/x-ITERATION.gguf"  # first only
    assert output_name("/abs/chk.gguf", "ITERATION", "3") == "/abs/chk.gguf"
    assert output_name("a-{it}-%s-$HOME-~.gguf", "ITERATION", "3") == "a-{it}-%s-$HOME-~.gguf"  # nothing expanded
    assert output_name("x-ITERATION.gguf", "", "3") == "x-ITERATION.gguf"


def test_output_path_with_dotdot_is_used_literally(base, tmp_path, monkeypatch):
    """--lora-out is the user's own path: '../' in it is followed as given, no sanitising, and the
    file name comes from the flag only (not from anything in the model or checkpoint)."""
    from gguf_finetune.cli.finetune import run

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    for f in ("m.gguf", "good.ckpt.gguf"):
        shutil.copy(base / f, work / f)
    monkeypatch.chdir(work)
    assert run(["--model-base", "m.gguf", "--checkpoint-in", "good.ckpt.gguf", "--only-write-lora",
                "--lora-out", "../../$HOME-ITERATION-%d.gguf"]) == 0
    assert (tmp_path / "$HOME-1-%d.gguf").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["good.ckpt.gguf", "m.gguf"]
