"""Reproduce a real llama.cpp finetune run (../testdata/fixtures/llamacpp-tiny).

Resume llama.cpp's own checkpoint chk-tiny-4.gguf with the second command of commands.txt, run
by our `finetune` with the same flags: per-iteration losses must be within 2e-3 of run2.log for
iterations 5-10, and the LoRA tensors at iteration 10 within 1e-3 relative (Frobenius) of
llama.cpp's chk-tiny-10.gguf.  This checks tokenizer, sample splitting, shuffle, batching,
forward, backward, AdamW and schedule together.
"""

from __future__ import annotations

import re
import shlex
import shutil

import numpy as np
import pytest

from gguf_finetune.formats.checkpoint import read_checkpoint
from gguf_finetune.formats.ggla import read_ggla, read_ggla_header
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.model import read_hparams

LINE = re.compile(r"train_opt_callback: iter=\s*(\d+) sample=\d+/\d+ sched=([0-9.]+) loss=([0-9.]+)")


def losses(text: str) -> dict[int, tuple[float, float]]:
    return {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in LINE.finditer(text)}


@pytest.fixture
def run_dir(testdata, tmp_path):
    fx = testdata / "fixtures" / "llamacpp-tiny"
    for name in ("tiny-llama-spm-q8_0.gguf", "train.txt"):
        shutil.copy(fx / name, tmp_path / name)
    shutil.copy(fx / "chk-tiny-4.gguf", tmp_path / "chk-tiny-LATEST.gguf")  # as run 1 left it
    return fx, tmp_path


def test_resume_llamacpp_checkpoint_reproduces_run2(run_dir, monkeypatch, capsys):
    from gguf_finetune.cli.finetune import run

    fx, work = run_dir
    cmd = (fx / "commands.txt").read_text().strip().splitlines()[1]
    argv = shlex.split(cmd)[1:]
    monkeypatch.chdir(work)
    assert run(argv) == 0
    out = capsys.readouterr().out
    ours = losses(out)
    ref = losses((fx / "run2.log").read_text())
    assert sorted(ref) == list(range(4, 11))
    for it in range(5, 11):
        assert it in ours, f"no line for iteration {it} in:\n{out}"
        assert ours[it][0] == pytest.approx(ref[it][0], abs=1e-6), f"sched at {it}"
        assert abs(ours[it][1] - ref[it][1]) <= 2e-3, f"iteration {it}: ours {ours[it][1]} llama.cpp {ref[it][1]}"
    print(f"\nlosses 5-10: max |ours - llama.cpp| = {max(abs(ours[i][1] - ref[i][1]) for i in range(5, 11)):.2e}")
    # the files llama.cpp's run wrote, under the same names
    for name in ("chk-tiny-6.gguf", "chk-tiny-8.gguf", "chk-tiny-10.gguf", "chk-tiny-LATEST.gguf",
                 "lora-tiny-10.bin", "lora-tiny-LATEST.bin"):
        assert (work / name).exists(), name
    hp = read_hparams(open_gguf(work / "tiny-llama-spm-q8_0.gguf"))
    mine = read_checkpoint(work / "chk-tiny-10.gguf", hp)
    theirs = read_checkpoint(fx / "chk-tiny-10.gguf", hp)
    assert mine.train.iteration == theirs.train.iteration == 10
    assert mine.train.shuffle_next_sample == theirs.train.shuffle_next_sample
    assert mine.train.shuffle_rng_state == theirs.train.shuffle_rng_state
    worst = 0.0
    for s in theirs.lora.layout.specs:
        for ours_t, ref_t in ((mine.lora.a[s.name], theirs.lora.a[s.name]), (mine.lora.b[s.name], theirs.lora.b[s.name])):
            rel = np.linalg.norm(ours_t - ref_t) / np.linalg.norm(ref_t)
            assert rel <= 1e-3, f"{s.name}: relative difference {rel:.2e}"
            worst = max(worst, rel)
    print(f"LoRA tensors at iteration 10: worst relative (Frobenius) difference {worst:.2e}")
    for ours_m, ref_m in ((mine.opt.m, theirs.opt.m), (mine.opt.v, theirs.opt.v)):
        assert np.linalg.norm(ours_m - ref_m) <= 1e-3 * np.linalg.norm(ref_m)
    # the legacy .bin adapter: llama.cpp's header, layout and size, the same values to rounding
    bin_ours, bin_theirs = work / "lora-tiny-10.bin", fx / "lora-tiny-10.bin"
    assert read_ggla_header(bin_ours) == read_ggla_header(bin_theirs)
    assert bin_ours.stat().st_size == bin_theirs.stat().st_size
    g_ours, g_theirs = read_ggla(bin_ours, hp), read_ggla(bin_theirs, hp)
    assert [s.name for s in g_ours.layout.specs] == [s.name for s in g_theirs.layout.specs]
    assert np.linalg.norm(g_ours.flat - g_theirs.flat) <= 1e-3 * np.linalg.norm(g_theirs.flat)


def test_only_write_lora_of_llamacpp_checkpoint_is_its_bin(testdata, tmp_path, monkeypatch, capsys):
    """--only-write-lora on llama.cpp's own checkpoint writes llama.cpp's own adapter, byte for byte,
    named with the checkpoint's iteration, and nothing else (no checkpoint, no metrics)."""
    from gguf_finetune.cli.finetune import run

    fx = testdata / "fixtures" / "llamacpp-tiny"
    shutil.copy(fx / "tiny-llama-spm-q8_0.gguf", tmp_path / "tiny-llama-spm-q8_0.gguf")
    monkeypatch.chdir(tmp_path)
    before = set(p.name for p in tmp_path.iterdir())
    assert run(["--model-base", "tiny-llama-spm-q8_0.gguf", "--only-write-lora", "--checkpoint-in",
                str(fx / "chk-tiny-10.gguf"), "--lora-out", "x-ITERATION.bin"]) == 0
    out = capsys.readouterr().out
    assert "save_as_llama_lora: saving to x-10.bin" in out
    assert "save_checkpoint_lora_file" not in out and "train_opt_callback" not in out
    assert set(p.name for p in tmp_path.iterdir()) - before == {"x-10.bin"}
    assert (tmp_path / "x-10.bin").read_bytes() == (fx / "lora-tiny-10.bin").read_bytes()
