"""Bad input through the real command line: one clear line, the right exit code, nothing lost.

Every case runs ``python -m gguf_finetune ...`` (or the ``finetune`` / ``export-lora`` /
``gguf-finetune`` console scripts) as a subprocess in a folder of its own that already holds
outputs of an earlier run, and checks:

- exit status 1 (2 for a bad flag) and exactly one non-empty line on stderr, which names the file
  or flag and says what is wrong; no ``Traceback``;
- every file in the folder is byte for byte what it was (nothing overwritten, no temp files, no new
  files) — and training never started;
- the process ran under an address-space limit (RLIMIT_AS 3 GB), so a header field cannot make it
  allocate its way out, and within a timeout.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures" / "llamacpp-tiny"
AS_LIMIT = 3 << 30
TIMEOUT = 180
IS_ROOT = os.geteuid() == 0
ROOT_REASON = "runs as root: permission bits do not apply, so the unreadable/unwritable cases cannot fail"


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_gguf", REPO / "scripts" / "fuzz_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_gguf", mod)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_fuzz()

TEXT = "".join(f"<s>the {w} sat on the mat and ate a {w} near the tree {i}\n"
               for i, w in enumerate(["cat", "dog", "rat", "hen", "fox", "owl", "ant", "bee"] * 6))


# ------------------------------------------------------------------------------------------------
# the shared folder: a model, data, a valid checkpoint/adapter, and files made for other models
# ------------------------------------------------------------------------------------------------
def _spec(**kw):
    from gguf_finetune.synthetic import SyntheticSpec

    base = dict(n_vocab=400, n_embd=32, n_ff=64, n_layer=2, n_head=4, n_head_kv=2, n_ctx_train=512, seed=1)
    base.update(kw)
    return SyntheticSpec(**base)


def _lora_files(folder: Path, model: str, stem: str, arch: str | None = None) -> None:
    """A checkpoint and a GGUF adapter (non-zero b) for ``model``, optionally claiming another arch."""
    from gguf_finetune.engine.lora import LoraRanks, init_lora
    from gguf_finetune.formats.adapter_gguf import write_adapter_gguf
    from gguf_finetune.formats.checkpoint import OptimizerState, TrainState, write_checkpoint
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.model import read_hparams

    hp = read_hparams(open_gguf(folder / model))
    if arch is not None:
        hp = replace(hp, arch=arch)
    ranks = LoraRanks.uniform(2)
    lora = init_lora(hp, ranks, 2.0, seed=3)
    lora.flat[:] = np.random.default_rng(3).standard_normal(lora.flat.size).astype(np.float32) * 0.01
    write_checkpoint(folder / f"{stem}.ckpt.gguf", hp, 16, ranks, lora, OptimizerState.zeros(lora.layout.size),
                     TrainState(iteration=1, shuffle_rng_state="5489"))
    write_adapter_gguf(folder / f"{stem}.adapter.gguf", lora, hp)


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
    _lora_files(d, "m.gguf", "falcon", arch="falcon")
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
    root_only_skip: bool = False
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


def _build_cases() -> list[Case]:
    cases: list[Case] = []
    # -- a damaged model, through all three commands ----------------------------------------------
    defects = dict(MODEL_DEFECTS)
    defects["unreadable"] = ("unreadable", r"permission denied")
    for i, (name, (how, pattern)) in enumerate(defects.items()):
        setup = (lambda how: lambda d: _make_defect(d, "bad.gguf", how, d / "m.gguf"))(how)
        root_skip = name == "unreadable"
        quick = i % 3  # each defect through one command quickly, all three in the slow run
        cases += [
            Case(f"model-{name}-finetune", ft(model_base="bad.gguf"), 1, pattern, "bad.gguf", setup,
                 root_only_skip=root_skip, slow=quick != 0 and not root_skip),
            Case(f"model-{name}-export", export(model="bad.gguf"), 1, pattern, "bad.gguf", setup,
                 prog="export-lora", root_only_skip=root_skip, slow=quick != 1),
        ]
        if name not in ("unsupported-architecture", "unsupported-tensor-type"):
            # (inspect describes such a model — "not supported for training here" — and exits 0)
            cases.append(Case(f"model-{name}-inspect", ("inspect", "bad.gguf"), 1, pattern, "bad.gguf", setup,
                              prog="gguf-finetune", root_only_skip=root_skip, slow=quick != 2))
    # -- a damaged checkpoint (--checkpoint-in) or adapter (export-lora --lora) --------------------
    for name in ("missing", "directory", "empty", "not-gguf", "truncated-tensor-data", "kv-count-2^60",
                 "tensor-offset-outside"):
        how, pattern = MODEL_DEFECTS[name]
        if name == "missing":
            # finetune starts a new adapter (llama.cpp's behaviour); --only-write-lora needs the file
            cases.append(Case("checkpoint-missing-only-write-lora", ft("--only-write-lora", checkpoint_in="bad.gguf"),
                              1, r"file not found \(needed by --only-write-lora\)", "bad.gguf"))
            cases.append(Case("adapter-missing-export", export(lora="bad.gguf"), 1, pattern, "bad.gguf",
                              prog="export-lora"))
            continue
        for kind, src in (("checkpoint", "good.ckpt.gguf"), ("adapter", "good.adapter.gguf")):
            setup = (lambda how, src: lambda d: _make_defect(d, "bad.gguf", how, d / src))(how, src)
            if kind == "checkpoint":
                cases.append(Case(f"checkpoint-{name}-finetune", ft(checkpoint_in="bad.gguf"), 1,
                                  pattern if name != "directory" else r"is a directory", "bad.gguf", setup,
                                  slow=name in ("empty", "not-gguf", "tensor-offset-outside", "directory",
                                                "kv-count-2^60")))
            cases.append(Case(f"{kind}-{name}-export", export(lora="bad.gguf"), 1,
                              pattern if name not in ("directory",) else r"folder without adapter_model|directory",
                              "bad.gguf", setup, slow=kind == "checkpoint" or name in (
                                  "empty", "kv-count-2^60", "directory", "tensor-offset-outside")))
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
    # -- made for another model: refused before training starts -----------------------------------
    cases += [
        Case("checkpoint-other-architecture", ft(checkpoint_in="falcon.ckpt.gguf"), 1,
             r"made for architecture 'falcon', the model is 'llama'", "falcon.ckpt.gguf"),
        Case("checkpoint-other-shapes", ft(checkpoint_in="wide.ckpt.gguf"), 1,
             r"made for another model \(llama.embedding_length = 64, the model has 32\)", "wide.ckpt.gguf"),
        Case("checkpoint-other-vocabulary", ft(checkpoint_in="bigvocab.ckpt.gguf"), 1,
             r"made for a vocabulary of 450 tokens, the model has 400", "bigvocab.ckpt.gguf"),
        Case("checkpoint-other-rank-flag", ft("--rank-wq", "3", checkpoint_in="good.ckpt.gguf"), 1,
             r"--rank-wq 3 does not match the checkpoint's rank 2", "good.ckpt.gguf", slow=True),
        Case("adapter-other-architecture", export(lora="falcon.adapter.gguf"), 1,
             r"made for architecture 'falcon', the model is 'llama'", "falcon.adapter.gguf", prog="export-lora",
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
             lambda d: (_writer("d.txt", TEXT)(d), (d / "d.txt").chmod(0)), root_only_skip=True),
    ]
    # -- numbers: bad flags are usage errors (exit 2) ---------------------------------------------
    for flag, value in (("--ctx", "0"), ("--ctx", "-5"), ("--batch", "0"), ("--threads", "0"), ("--threads", "-1"),
                        ("--adam-iter", "-1"), ("--lora-r", "0"), ("--lora-r", "-2"), ("--rank-wq", "-1"),
                        ("--rank-att-norm", "-1"), ("--adam-alpha", "0"), ("--adam-alpha", "-0.001"),
                        ("--lora-alpha", "0"), ("--grad-acc", "0"), ("--save-every", "x"),
                        ("--save-every", "-1")):
        quick = f"{flag}={value}" in ("--ctx=0", "--adam-iter=-1", "--adam-alpha=-0.001")
        cases.append(Case(f"flag{flag}={value}", ft(**{flag[2:].replace("-", "_"): value}), 2,
                          r"expected (a|an) .*, got", flag, prog="finetune" if flag == "--ctx" else
                          "python -m gguf_finetune", slow=not quick))
    cases.append(Case("export-flag-threads=0", (*export(), "-t", "0"), 2, r"expected a positive integer", "--threads",
                      prog="export-lora", slow=True))
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
             "--checkpoint-out", lambda d: ((d / "ro").mkdir(), (d / "ro").chmod(0o555)), root_only_skip=True),
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


def _snapshot(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_dir():
            out[rel + "/"] = "dir"
        elif os.access(p, os.R_OK) or IS_ROOT:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = f"unreadable {p.stat().st_size}"
    return out


@dataclass
class Outcome:
    case: Case
    code: int | None
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    error: str = ""


def _run_case(c: Case, base: Path, root: Path) -> Outcome:
    d = root / re.sub(r"[^\w.=-]", "_", c.id)
    shutil.copytree(base, d)
    if c.setup is not None:
        c.setup(d)
    before = _snapshot(d)
    env = dict(os.environ, GGUF_FINETUNE_MEMORY_BUDGET="256M", COLUMNS="100")
    try:
        r = subprocess.run(_command(c.prog, c.argv), cwd=d, capture_output=True, text=True, timeout=TIMEOUT,
                           preexec_fn=_limit_memory, env=env)
        out = Outcome(c, r.returncode, r.stdout, r.stderr, before, _snapshot(d))
    except subprocess.TimeoutExpired as e:
        out = Outcome(c, None, str(e.stdout), str(e.stderr), before, _snapshot(d), f"timed out after {TIMEOUT} s")
    for p in d.rglob("*"):  # let the temp folder be removed
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    return out


def _run_all(cases: list[Case], base: Path, root: Path) -> dict[str, Outcome]:
    todo = [c for c in cases if not (c.root_only_skip and IS_ROOT)]
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


def _check(case: Case, o: Outcome) -> None:
    if case.root_only_skip and IS_ROOT:
        pytest.skip(ROOT_REASON)
    assert not o.error, o.error
    assert "Traceback" not in o.stderr, o.stderr
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
    assert "main: begin training" not in o.stdout
    assert o.after == o.before, "files changed: " + ", ".join(
        sorted(k for k in set(o.before) | set(o.after) if o.before.get(k) != o.after.get(k)))


@pytest.mark.parametrize("case", QUICK, ids=[c.id for c in QUICK])
def test_bad_input_gives_one_clear_line(case: Case, outcomes):
    _check(case, outcomes.get(case.id) or pytest.skip(ROOT_REASON))


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[c.id for c in SLOW])
def test_bad_input_gives_one_clear_line_all_commands(case: Case, slow_outcomes):
    _check(case, slow_outcomes.get(case.id) or pytest.skip(ROOT_REASON))


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
                 "lora-out-missing-folder", "checkpoint-out-not-writable"):
        assert must in ids, must


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
