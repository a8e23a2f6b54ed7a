"""Faults during training: a kill -9 at any moment, a disk that fills up during a save.

What must hold: every checkpoint and adapter on disk under its final name loads, and a run resumed
from the LATEST checkpoint continues; a failed save is one clear line, leaves the earlier files as
they were, and leaves no temporary file behind.  (NaN loss and SIGTERM/Ctrl-C are covered in
tests/test_trainer.py: test_nan_loss_stops_with_message_and_keeps_last_checkpoint and
test_sigterm_saves_latest_and_stops.)
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gguf_finetune.formats.checkpoint import read_checkpoint
from gguf_finetune.formats.load import load_adapter
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.model import read_hparams
from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

TEXT = "".join(f"<s>the {w} sat on the mat and ate a {w} near the tree {i}\n"
               for i, w in enumerate(["cat", "dog", "rat", "hen", "fox", "owl", "ant", "bee"] * 6))
SPEC = SyntheticSpec(n_vocab=400, n_embd=32, n_ff=64, n_layer=2, n_head=4, n_head_kv=2, seed=1)


def _args(iters: int, *extra: str) -> list[str]:
    return ["--model-base", "m.gguf", "--train-data", "train.txt", "--sample-start", "<s>", "--ctx", "16",
            "--batch", "2", "--seed", "3", "--adam-alpha", "0.01", "--warmup", "2", "--threads", "1",
            "--lora-r", "2", "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf", "--save-every", "1", "--no-progress", "--adam-iter", str(iters),
            *extra]


def _setup(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_synthetic_model(folder / "m.gguf", SPEC)
    (folder / "train.txt").write_text(TEXT)


def _finals(folder: Path, prefix: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"{prefix}-*.gguf"))


# ------------------------------------------------------------------------------------------------
# (a) kill -9 at a random moment, then everything left behind loads and a resumed run continues
# ------------------------------------------------------------------------------------------------
def _kill_run(folder: Path, delay: float) -> dict:
    """Start a training run, SIGKILL it ``delay`` s after it printed 'main: begin training' (a
    negative delay: that long after the start, during start-up), then check the files and resume."""
    _setup(folder)
    cmd = [sys.executable, "-m", "gguf_finetune", "finetune", *_args(1000)]
    started = threading.Event()
    with open(folder / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=log, text=True)

        def watch():
            for line in proc.stdout:
                if "main: begin training" in line:
                    started.set()
            started.set()

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        if delay < 0:
            time.sleep(-delay)
        else:
            assert started.wait(120), "the run did not start training"
            time.sleep(delay)
        finished_early = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        t.join(10)
    hp = read_hparams(open_gguf(folder / "m.gguf"))
    info = {"delay": delay, "finished_early": finished_early, "checkpoints": [], "adapters": []}
    for p in _finals(folder, "chk"):
        ck = read_checkpoint(p, hp)  # raises if a file under a final name is damaged
        info["checkpoints"].append((p.name, ck.train.iteration))
    for p in _finals(folder, "lora"):
        load_adapter(p, hp)
        info["adapters"].append(p.name)
    latest = folder / "chk-LATEST.gguf"
    before = read_checkpoint(latest, hp).train.iteration if latest.exists() else 0
    r = subprocess.run([sys.executable, "-m", "gguf_finetune", "finetune", *_args(2)], cwd=folder,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"resume after kill at {delay:.2f} s failed:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    after = read_checkpoint(latest, hp)
    assert after.train.iteration == before + 2, (before, after.train.iteration)
    load_adapter(folder / "lora-LATEST.gguf", hp)
    info["resumed_from"] = before
    info["stray_tmp"] = sorted(p.name for p in folder.glob(".*.tmp"))
    return info


def _kill_runs(tmp_path: Path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    # one kill during start-up, the rest while training and saving every iteration
    delays = [-1.5] + [rng.uniform(0.2, 2.0) for _ in range(n - 1)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda i: _kill_run(tmp_path / f"run{i}", delays[i]), range(n)))


def _check_kill_results(results: list[dict]) -> None:
    saved = [r for r in results if r["checkpoints"]]
    # most kills must land in the middle of training with saves behind them, or the test proves
    # little (a kill in the first iteration, before the first save, is allowed to happen)
    assert len(saved) >= (len(results) + 1) // 2, results
    assert not any(r["finished_early"] for r in results), results
    # the resumed run's first write removes the temporary file the kill left behind
    assert not any(r["stray_tmp"] for r in results), results
    for r in saved:
        names = dict(r["checkpoints"])
        numbered = [it for name, it in r["checkpoints"] if name != "chk-LATEST.gguf"]
        # chk-N is written before chk-LATEST: a kill between the two leaves LATEST one behind
        # (or not yet there, after chk-1)
        latest = names.get("chk-LATEST.gguf", 0)
        assert latest in (max(numbered) - 1, max(numbered)), r


def test_kill_9_three_runs_leave_loadable_files_and_resume(tmp_path):
    _check_kill_results(_kill_runs(tmp_path, 3, seed=11))


@pytest.mark.slow
def test_kill_9_twenty_runs_leave_loadable_files_and_resume(tmp_path):
    results = _kill_runs(tmp_path, 20, seed=12)
    _check_kill_results(results)
    print("\n".join(f"kill at {r['delay']:+.2f} s: {len(r['checkpoints'])} checkpoints, resumed from iteration "
                    f"{r['resumed_from']}, stray temp files {r['stray_tmp']}" for r in results))


# ------------------------------------------------------------------------------------------------
# (b) the disk fills up during a save
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A folder after a 2-iteration run with --save-every 1 (files for iterations 1 and 2)."""
    from gguf_finetune.cli.finetune import run

    _setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run(_args(2)) == 0
    return tmp_path


@pytest.mark.parametrize("failing_write, what", [(1, "checkpoint"), (3, "adapter")])
def test_disk_full_during_save(trained, monkeypatch, capsys, failing_write, what):
    import gguf

    from gguf_finetune.cli import finetune as cli

    hp = read_hparams(open_gguf(trained / "m.gguf"))
    before = {p.name: p.read_bytes() for p in trained.glob("*.gguf") if p.name != "m.gguf"}
    orig = gguf.GGUFWriter.write_tensors_to_file
    calls = {"n": 0}

    def write_tensors(self, *a, **kw):  # the n-th file written this run hits a full disk mid-way
        calls["n"] += 1
        if calls["n"] == failing_write:
            for fh in self.fout or []:
                fh.write(b"\0" * 100)  # part of the data made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(self, *a, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_tensors)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(_args(2))
    assert e.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    target = "chk-3.gguf" if what == "checkpoint" else "lora-3.gguf"
    assert len(err) == 1 and f"cannot write '{target}': no space left on the device" in err[0], err
    # nothing half-written under a final name, no temporary file left
    assert not list(trained.glob(".*.tmp")), list(trained.glob(".*"))
    assert not (trained / target).exists()
    # the earlier files are intact (the LATEST adapter still iteration 2) and load
    assert (trained / "lora-LATEST.gguf").read_bytes() == before["lora-LATEST.gguf"]
    if what == "checkpoint":
        assert (trained / "chk-LATEST.gguf").read_bytes() == before["chk-LATEST.gguf"]
    for p in trained.glob("*.gguf"):
        if p.name.startswith("chk-"):
            assert read_checkpoint(p, hp).train.iteration in (1, 2, 3)
        elif p.name.startswith("lora-"):
            load_adapter(p, hp)
    assert read_checkpoint(trained / "chk-2.gguf", hp).train.iteration == 2


def test_disk_full_in_any_writer_is_one_line(tmp_path, monkeypatch):
    """atomic_path turns an OSError inside any writer (here the legacy .bin one) into a UserError
    naming the file, and removes its temporary file."""
    from gguf_finetune.engine.lora import LoraRanks, init_lora
    from gguf_finetune.errors import UserError
    from gguf_finetune.formats import ggla

    write_synthetic_model(tmp_path / "m.gguf", SPEC)
    hp = read_hparams(open_gguf(tmp_path / "m.gguf"))
    lora = init_lora(hp, LoraRanks.uniform(2), 2.0, seed=1)
    (tmp_path / "old.bin").write_bytes(b"old")

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ggla, "_write_tensor", full)
    with pytest.raises(UserError, match=r"cannot write '.*old.bin': no space left on the device"):
        ggla.write_ggla(tmp_path / "old.bin", lora)
    assert (tmp_path / "old.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "old.bin"]


def test_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    """A kill -9 mid-write leaves `.NAME.PID.XXXXXXXX.tmp`; the next write in that folder removes
    it once PID is gone, and leaves live writers' temporaries and other files alone."""
    from gguf_finetune.gguf_io import atomic_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".chk-3.gguf.{dead.pid}.ab_cd123.tmp"
    live = tmp_path / f".chk-LATEST.gguf.{os.getpid()}.zz99yy88.tmp"
    other = [tmp_path / ".notes.tmp", tmp_path / f".x.{dead.pid}.short.tmp", tmp_path / "keep.gguf"]
    for p in [stale, live, *other]:
        p.write_bytes(b"x")
    with atomic_path(tmp_path / "chk-4.gguf") as tmp:
        assert tmp.name.startswith(f".chk-4.gguf.{os.getpid()}.")
        tmp.write_bytes(b"new")
    assert not stale.exists()
    assert live.exists() and all(p.exists() for p in other)
    assert (tmp_path / "chk-4.gguf").read_bytes() == b"new"
