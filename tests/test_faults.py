"""Faults during training: a kill -9 at any moment, a disk that fills up during a save.

What must hold: every checkpoint and adapter on disk under its final name loads, and a run resumed
from the LATEST checkpoint continues; a failed save is one clear line, leaves the earlier files as
they were, and leaves no temporary file behind.  A NaN or infinite loss stops the run with one
line (through the CLI's main) and leaves the LATEST files of the last good save; Ctrl-C on a real
``finetune`` process saves LATEST, exits 130, and the run resumes from it.  (The training loop's own
tests of both are in tests/test_trainer.py.)
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
from gguf_finetune.synthetic import write_synthetic_model
from tiny import SPEC, make_run_dir


def _args(iters: int, *extra: str) -> list[str]:
    return ["--model-base", "m.gguf", "--train-data", "train.txt", "--sample-start", "<s>", "--ctx", "16",
            "--batch", "2", "--seed", "3", "--adam-alpha", "0.01", "--warmup", "2", "--threads", "1",
            "--lora-r", "2", "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf", "--save-every", "1", "--no-progress", "--adam-iter", str(iters),
            *extra]


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run finetune's main, expecting exit status 1 and exactly one non-empty stderr line; return it."""
    from gguf_finetune.cli import finetune as cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def _setup(folder: Path) -> None:
    make_run_dir(folder)


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
    line = _one_error_line(capsys, _args(2))
    target = "chk-3.gguf" if what == "checkpoint" else "lora-3.gguf"
    assert f"cannot write '{target}': no space left on the device" in line, line
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
    from gguf_finetune.errors import UserError
    from gguf_finetune.formats import ggla
    from gguf_finetune.lora import LoraRanks, init_lora

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


# ------------------------------------------------------------------------------------------------
# (c) a NaN or infinite loss, through the command line's main()
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, when", [("nan", "first"), ("nan", "later"), ("inf", "first"), ("inf", "later")])
def test_nonfinite_loss_stops_with_one_line_and_keeps_latest(trained, monkeypatch, capsys, value, when):
    """A run resumed at iteration 2 (--save-every 1) gets a non-finite loss from its first batch
    ("first": nothing saved in this run) or its third ("later": iterations 3 and 4 saved).  Exit 1,
    one stderr line that names --adam-alpha and the data (no numpy warnings), the LATEST checkpoint
    and adapter are those of the last good save, and nothing is written for the diverged iteration."""
    from gguf_finetune import trainer as trainer_mod

    bad_call = 1 if when == "first" else 3
    last_good = 2 if when == "first" else 4
    latest_before = {n: (trained / n).read_bytes() for n in ("chk-LATEST.gguf", "lora-LATEST.gguf")}
    orig = trainer_mod.Trainer.evaluate
    calls = {"n": 0}

    def evaluate(self):
        loss, *rest = orig(self)
        calls["n"] += 1
        return ((float(value) if calls["n"] == bad_call else loss), *rest)

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", evaluate)
    line = _one_error_line(capsys, _args(10))
    assert f"loss is {value} at iteration {last_good + 1}" in line, line
    assert "--adam-alpha" in line and "the training data 'train.txt'" in line, line
    assert "Traceback" not in line and "RuntimeWarning" not in line
    hp = read_hparams(open_gguf(trained / "m.gguf"))
    if when == "first":
        assert f"the checkpoint 'chk-LATEST.gguf' (iteration {last_good}) is kept" in line, line
        for name, data in latest_before.items():
            assert (trained / name).read_bytes() == data, name
    else:
        assert f"last good checkpoint kept: iteration {last_good} ('chk-LATEST.gguf')" in line, line
        assert (trained / "chk-LATEST.gguf").read_bytes() == (trained / f"chk-{last_good}.gguf").read_bytes()
        assert (trained / "lora-LATEST.gguf").read_bytes() == (trained / f"lora-{last_good}.gguf").read_bytes()
    assert read_checkpoint(trained / "chk-LATEST.gguf", hp).train.iteration == last_good
    load_adapter(trained / "lora-LATEST.gguf", hp)
    # nothing for the diverged iteration (or later), and no temporary file
    for it in range(last_good + 1, 13):
        assert not (trained / f"chk-{it}.gguf").exists() and not (trained / f"lora-{it}.gguf").exists(), it
    assert not list(trained.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------
# (d) Ctrl-C on a real finetune process
# ------------------------------------------------------------------------------------------------
def test_ctrl_c_saves_latest_exits_130_and_resumes(tmp_path):
    """SIGINT to ``python -m gguf_finetune finetune`` once it has done a few iterations (no periodic
    saves): it finishes the step, saves chk-N/lora-N and the LATEST files, says so in one stderr
    line, exits 130; the files load and a resumed run continues from iteration N."""
    import re

    _setup(tmp_path)
    cmd = [sys.executable, "-m", "gguf_finetune", "finetune", *_args(100000, "--save-every", "0")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    going = threading.Event()

    def watch():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"iter=\s*(\d+)", line)
            if m and int(m.group(1)) >= 2:
                going.set()
        going.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        assert going.wait(300), "the run did not get to iteration 2"
        assert proc.poll() is None, "the run ended before it was interrupted"
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t.join(10)
    out = "".join(lines)
    assert proc.returncode == 130, (proc.returncode, err)
    err_lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(err_lines) == 1, err
    m = re.search(r"finetune: interrupted: saved iteration (\d+) \(chk-LATEST.gguf\)$", err_lines[0])
    assert m, err_lines
    n = int(m.group(1))
    assert n >= 3 and f"main: SIGINT received: saving and stopping after iteration {n}" in out
    hp = read_hparams(open_gguf(tmp_path / "m.gguf"))
    latest = read_checkpoint(tmp_path / "chk-LATEST.gguf", hp)
    assert latest.train.iteration == latest.opt.iteration == n
    assert read_checkpoint(tmp_path / f"chk-{n}.gguf", hp).train.iteration == n
    load_adapter(tmp_path / "lora-LATEST.gguf", hp)
    load_adapter(tmp_path / f"lora-{n}.gguf", hp)
    assert not list(tmp_path.glob(".*.tmp"))
    r = subprocess.run([sys.executable, "-m", "gguf_finetune", "finetune", *_args(2)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"main: total train_iterations {n}" in r.stdout
    assert read_checkpoint(tmp_path / "chk-LATEST.gguf", hp).train.iteration == n + 2
