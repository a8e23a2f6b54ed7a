"""The package as a user gets it: ``python -m build`` makes a wheel and an sdist, and the wheel installed
into a fresh virtual environment has its entry points and trains the llama.cpp fixture's model.

Slow (builds, makes a venv and installs the dependencies into it, compiles the kernels cold).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def _sources(dst: Path) -> None:
    """The repository's tracked files (what a clone has), without tests/data (not packaged)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith("tests/data/"):
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)


def test_wheel_and_sdist_build_and_the_wheel_trains(tmp_path, testdata):
    pytest.importorskip("build", reason="optional: build not installed (pip install build)")
    src = tmp_path / "src"
    _sources(src)
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(out.glob("gguf_finetune-*.whl"))
    sdist = next(out.glob("gguf_finetune-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gguf_finetune/arch.py" in names and "gguf_finetune/engine/kernels.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    with tarfile.open(sdist) as t:
        assert any(n.endswith("src/gguf_finetune/api.py") for n in t.getnames())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    bin_ = venv / "bin"
    help_ = subprocess.run([str(bin_ / "finetune"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: finetune [options]")
    assert subprocess.run([str(bin_ / "export-lora"), "--help"], capture_output=True, text=True).returncode == 0
    run = tmp_path / "run"
    run.mkdir()
    fx = testdata / "fixtures" / "llamacpp-tiny"
    argv = [str(bin_ / "finetune"), "--model-base", str(fx / "tiny-llama-spm-q8_0.gguf"), "--train-data",
            str(fx / "train.txt"), "--sample-start", "\\n", "--escape", "--ctx", "32", "--batch", "2", "--threads", "2",
            "--adam-iter", "2", "--seed", "7", "--no-progress"]
    train = subprocess.run(argv, cwd=run, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (run / "checkpoint-LATEST.gguf").exists() and (run / "ggml-lora-LATEST-f32.gguf").exists()
    info = subprocess.run([str(bin_ / "gguf-finetune"), "inspect", str(run / "checkpoint-LATEST.gguf")],
                          capture_output=True, text=True)
    assert info.returncode == 0 and "iteration:" in info.stdout
