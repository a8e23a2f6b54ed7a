"""A short run of scripts/fuzz_gguf.py (the long one's figures are in docs/RELIABILITY.md), and
checks that the fuzzer itself can see a crash, a hang and an unnamed message."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "fuzz_gguf.py"


def _load():
    spec = importlib.util.spec_from_file_location("fuzz_gguf", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_gguf", mod)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load()


def test_short_fuzz_run_has_no_crash_or_hang():
    """150 mutated files through every reader: only UserErrors naming the file (own process, under
    the script's address-space limit)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(SCRIPT), "--iterations", "150", "--seed", "20240501"],
                       capture_output=True, text=True, timeout=600)
    summary = r.stdout
    assert r.returncode == 0, summary + r.stderr[-3000:]
    m = re.search(r"outcomes: ok (\d+), user_error (\d+), unnamed (\d+), crash (\d+), hang (\d+)", summary)
    assert m, summary
    ok, user_error, unnamed, crash, hang = map(int, m.groups())
    assert ok + user_error + unnamed + crash + hang == 150
    assert (unnamed, crash, hang) == (0, 0, 0), summary
    assert user_error > 100, summary  # the mutations do reach the error paths
    print(summary, f"({time.perf_counter() - t0:.1f} s with start-up)")


def test_layout_finds_every_field_of_a_model(tmp_path):
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

    p = write_synthetic_model(tmp_path / "m.gguf", SyntheticSpec(n_vocab=300, n_embd=32, n_ff=64, n_layer=1,
                                                                    n_head=4, n_head_kv=4))
    data = Path(p).read_bytes()
    lay = fuzz.gguf_layout(data)
    f = open_gguf(p)
    names = [s.label for s in lay.slots if s.kind == "offset"]
    assert names == [f"data offset of {n}" for n in f.tensors]
    assert len([s for s in lay.slots if s.label == "key length" and s.kind == "length"]) == len(f.keys())
    assert lay.data_start == f.reader.data_offset
    n_kv = next(s for s in lay.slots if s.label == "n_kv")
    assert int.from_bytes(data[n_kv.offset:n_kv.offset + 8], "little") == len(f.keys())


def test_mutations_replay_exactly(tmp_path, testdata):
    targets = [fuzz.Target("t", (testdata / "vocab" / "ggml-vocab-llama-spm.gguf").read_bytes(), ".gguf", [])]
    targets[0].layout = fuzz.gguf_layout(targets[0].data)
    seen, changed = set(), 0
    for case in range(40):
        a = fuzz.mutate(targets, 5, case)
        b = fuzz.mutate(targets, 5, case)
        assert a[1:] == b[1:]  # same strategy, bytes and description
        changed += a[2] != targets[0].data  # (a value may be rewritten with the one it had)
        seen.add(a[1])
    assert seen == set(fuzz.STRATEGIES)
    assert changed >= 35


def test_the_harness_reports_crash_hang_and_unnamed_messages(tmp_path):
    import signal

    from gguf_finetune.errors import UserError

    def crash(p):
        raise KeyError("boom")

    def hang(p):
        time.sleep(30)

    def unnamed(p):
        raise UserError("something is wrong")

    def named(p):
        raise UserError(f"model '{p}': something is wrong")

    old = signal.signal(signal.SIGALRM, fuzz._alarm)
    try:
        for fn, want in ((crash, "crash"), (hang, "hang"), (unnamed, "unnamed"), (named, "user_error"),
                         (lambda p: None, "ok")):
            t = fuzz.Target("t", b"GGUF" + bytes(100), ".gguf", [("reader", fn)], fuzz.Layout(meta_end=50))
            t0 = time.perf_counter()
            res, _ = fuzz.run_case([t], 1, 0, tmp_path, timeout=0.5)
            assert res.outcome == want, (want, res)
            assert time.perf_counter() - t0 < 5
    finally:
        signal.signal(signal.SIGALRM, old)
