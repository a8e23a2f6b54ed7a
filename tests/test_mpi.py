"""Data parallel training over MPI (src/gguf_finetune/dist.py): ``mpiexec -n 2 finetune ...`` on this
machine against one process, checkpoints across rank counts, and faults.

Needs the ``mpi`` extra (mpi4py and an MPI runtime from PyPI, which puts ``mpiexec`` beside the
interpreter); skipped with that reason without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import OPTIONAL, needs

from gguf_finetune.formats.checkpoint import read_checkpoint

FIXTURE_ARGS = ["--ctx", "32", "--batch", "2", "--adam-alpha", "0.02", "--warmup", "2", "--lora-r", "4", "--lora-alpha",
                "4", "--seed", "7", "--sample-start", "\\n", "--escape", "--include-sample-start", "--no-progress",
                "--save-every", "0"]


def mpiexec() -> str:
    needs("mpi4py")
    path = Path(sys.executable).parent / "mpiexec"
    found = str(path) if path.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip(OPTIONAL["mpi4py"])
    return found


@pytest.fixture
def fixture_dir(tmp_path, testdata) -> Path:
    for name in ("tiny-llama-spm-q8_0.gguf", "train.txt"):
        shutil.copy(testdata / "fixtures" / "llamacpp-tiny" / name, tmp_path / name)
    return tmp_path


def finetune_argv(tag: str, iters: int, *extra: str, model: str = "tiny-llama-spm-q8_0.gguf",
                  data: str = "train.txt") -> list[str]:
    return ["finetune", "--model-base", model, "--train-data", data, *FIXTURE_ARGS, "--adam-iter", str(iters),
            "--checkpoint-in", f"{tag}-chk-LATEST.gguf", "--checkpoint-out", f"{tag}-chk-ITERATION.gguf",
            "--lora-out", f"{tag}-lora-ITERATION.gguf", "--metrics-out", f"{tag}.jsonl", *extra]


def run(cwd: Path, argv: list[str], ranks: int = 1, threads: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gguf_finetune", *argv, "--threads", str(threads)]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def losses(path: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in path.read_text().splitlines() if "loss" in line])


def lora_flat(path: Path) -> np.ndarray:
    return read_checkpoint(path).lora.flat.astype(np.float64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("extra", [(), ("--grad-acc", "2")])
def test_two_ranks_give_the_single_process_run(fixture_dir, extra):
    """The llama.cpp fixture's data, 10 iterations: every iteration's loss and the final LoRA tensors
    of 2 ranks x 1 thread equal one process's to 1e-5 relative (only summation order differs)."""
    mpiexec()
    one = run(fixture_dir, finetune_argv("one", 10, *extra))
    two = run(fixture_dir, finetune_argv("two", 10, *extra), ranks=2, threads=1)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "main: MPI: 2 ranks" in two.stdout and two.stdout.count("main: begin training") == 1  # rank 0 alone
    l1, l2 = losses(fixture_dir / "one.jsonl"), losses(fixture_dir / "two.jsonl")
    assert len(l1) == len(l2) == 10
    assert np.all(np.abs(l2 - l1) <= 1e-5 * np.abs(l1)), (l1, l2)
    assert rel(lora_flat(fixture_dir / "two-chk-LATEST.gguf"), lora_flat(fixture_dir / "one-chk-LATEST.gguf")) <= 1e-5


@pytest.mark.slow
def test_two_ranks_give_the_single_process_run_on_smollm2(smollm2, testdata, tmp_path):
    """SmolLM2 on text data, 10 iterations: 2 ranks x 1 thread give one process's losses and LoRA
    tensors to 1e-5 relative."""
    mpiexec()
    shutil.copy(testdata / "text" / "shakespeare.txt", tmp_path / "train.txt")
    flags = ["--ctx", "64", "--batch", "2", "--adam-alpha", "0.003", "--warmup", "2", "--seed", "3",
             "--no-progress", "--save-every", "0"]
    out = {}
    for tag, ranks in (("one", 1), ("two", 2)):
        argv = ["finetune", "--model-base", str(smollm2), "--train-data", "train.txt", *flags, "--adam-iter", "10",
                "--checkpoint-out", f"{tag}-chk-ITERATION.gguf", "--lora-out", f"{tag}-lora-ITERATION.gguf",
                "--metrics-out", f"{tag}.jsonl"]
        r = run(tmp_path, argv, ranks=ranks, threads=2 // ranks)
        assert r.returncode == 0, r.stderr
        out[tag] = losses(tmp_path / f"{tag}.jsonl"), lora_flat(tmp_path / f"{tag}-chk-LATEST.gguf")
    (l1, w1), (l2, w2) = out["one"], out["two"]
    assert len(l1) == len(l2) == 10
    assert np.all(np.abs(l2 - l1) <= 1e-5 * np.abs(l1)), (l1, l2)
    assert rel(w2, w1) <= 1e-5


def test_checkpoints_resume_across_rank_counts(fixture_dir):
    """5 iterations on 2 ranks resumed in one process, and the reverse, continue the 10-iteration run."""
    mpiexec()
    assert run(fixture_dir, finetune_argv("whole", 10)).returncode == 0
    whole = lora_flat(fixture_dir / "whole-chk-LATEST.gguf")
    for tag, first, second in (("a", 2, 1), ("b", 1, 2)):
        r1 = run(fixture_dir, finetune_argv(tag, 5), ranks=first, threads=1 if first > 1 else 2)
        assert r1.returncode == 0, r1.stderr
        r2 = run(fixture_dir, finetune_argv(tag, 5), ranks=second, threads=1 if second > 1 else 2)
        assert r2.returncode == 0, r2.stderr
        ck = read_checkpoint(fixture_dir / f"{tag}-chk-LATEST.gguf")
        assert ck.train.iteration == 10
        assert rel(ck.lora.flat.astype(np.float64), whole) <= 1e-5, tag
        l_whole, l_tag = losses(fixture_dir / "whole.jsonl"), losses(fixture_dir / f"{tag}.jsonl")
        assert np.all(np.abs(l_tag - l_whole) <= 1e-5 * np.abs(l_whole))


def test_batch_not_divisible_by_the_ranks_is_one_usage_line(fixture_dir):
    mpiexec()
    r = run(fixture_dir, finetune_argv("x", 2, "--batch", "3"), ranks=2, threads=1)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        "finetune: --batch 3: not divisible by the 2 ranks mpiexec started (each rank computes --batch / ranks rows of "
        "every batch)"), lines
    assert not list(fixture_dir.glob("x-*"))


def test_unreadable_data_is_one_line_from_rank_0(fixture_dir):
    mpiexec()
    (fixture_dir / "data").mkdir()
    r = run(fixture_dir, finetune_argv("x", 2, data="data"), ranks=2, threads=1)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "finetune: --train-data 'data'" in lines[0] and "Traceback" not in r.stderr, lines


def _rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the Python processes under ``parent`` (mpiexec), from their environment."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"gguf_finetune" not in cmd or b"mpiexec" in cmd.split(b"\0")[0]:
            continue
        rank = next((int(v.split(b"=")[1]) for v in env if v.startswith(b"PMI_RANK=")), None)
        if rank is not None:
            out[rank] = int(d.name)
    return out


def test_a_killed_rank_ends_the_job_and_latest_resumes(fixture_dir):
    """kill -9 of rank 1 mid-run: every process is gone within 60 s with a non-zero exit, no hang;
    the LATEST checkpoint loads and a single process resumes from it."""
    exe = mpiexec()
    argv = finetune_argv("k", 100000, "--save-every", "1")
    proc = subprocess.Popen([exe, "-n", "2", sys.executable, "-m", "gguf_finetune", *argv, "--threads", "1"],
                            cwd=fixture_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = fixture_dir / "k-chk-LATEST.gguf"
    deadline = time.monotonic() + 300
    while not (latest.exists() and read_checkpoint(latest).train.iteration >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended or never saved"
        time.sleep(0.2)
    pids = _rank_pids(proc.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0 and time.monotonic() - t0 < 60
    assert not any(os.path.exists(f"/proc/{p}") and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
                   for p in pids.values())
    ck = read_checkpoint(latest)
    assert ck.train.iteration >= 3
    r = run(fixture_dir, finetune_argv("k", 1))  # resumes from k-chk-LATEST.gguf in one process
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(latest).train.iteration == ck.train.iteration + 1
