"""Training loop: exact resume, saving, --only-write-lora, interruption, divergence."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from gguf_finetune.cli.finetune import run
from gguf_finetune.formats.checkpoint import read_checkpoint
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.model import read_hparams
from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

TEXT = "".join(f"<s>the {w} sat on the mat and ate a {w} near the tree {i}\n"
               for i, w in enumerate(["cat", "dog", "rat", "hen", "fox", "owl", "ant", "bee"] * 6))


@pytest.fixture
def work(tmp_path, monkeypatch):
    write_synthetic_model(tmp_path / "m.gguf", SyntheticSpec(n_vocab=400, n_embd=32, n_ff=64, n_layer=2,
                                                             n_head=4, n_head_kv=2, seed=1))
    (tmp_path / "train.txt").write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def finetune(*extra: str, iters: int, capsys=None) -> str:
    argv = ["--model-base", "m.gguf", "--train-data", "train.txt", "--sample-start", "<s>", "--ctx", "16",
            "--batch", "2", "--seed", "3", "--adam-alpha", "0.01", "--warmup", "2", "--threads", "1",
            "--lora-r", "2", "--rank-att-norm", "1", "--checkpoint-in", "chk-LATEST.gguf",
            "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf",
            "--adam-iter", str(iters), *extra]
    assert run(argv) == 0
    return capsys.readouterr().out if capsys else ""


def lora_of(path):
    hp = read_hparams(open_gguf("m.gguf"))
    return read_checkpoint(path, hp)


def test_resume_equals_uninterrupted_bit_for_bit(work, capsys):
    N = 3
    finetune("--save-every", "100", iters=2 * N)
    whole = lora_of("chk-LATEST.gguf")
    for f in work.glob("chk-*.gguf"):
        f.rename(work / ("whole-" + f.name))
    finetune("--save-every", "100", iters=N)
    first = lora_of("chk-LATEST.gguf")
    assert first.train.iteration == N
    finetune("--save-every", "100", iters=N)
    resumed = lora_of("chk-LATEST.gguf")
    assert resumed.train.iteration == 2 * N
    assert np.array_equal(resumed.lora.flat, whole.lora.flat)
    assert np.array_equal(resumed.opt.m, whole.opt.m) and np.array_equal(resumed.opt.v, whole.opt.v)
    assert resumed.train == whole.train
    assert not np.array_equal(first.lora.flat, whole.lora.flat)  # training did move the adapter


def test_files_every_save_and_metrics(work, capsys):
    out = finetune("--save-every", "2", iters=5, capsys=capsys)
    for it in (2, 4, 5):
        assert (work / f"chk-{it}.gguf").exists() and (work / f"lora-{it}.gguf").exists()
    assert (work / "chk-LATEST.gguf").exists() and (work / "lora-LATEST.gguf").exists()
    assert not (work / "chk-3.gguf").exists()
    assert "save_checkpoint_lora_file: saving to chk-4.gguf" in out
    assert "main: total training time" in out
    recs = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and r["lr"] >= 0 for r in recs)


def test_only_write_lora_from_checkpoint(work, capsys):
    finetune("--save-every", "0", iters=2)
    os.remove("lora-LATEST.gguf")
    assert run(["--model-base", "m.gguf", "--checkpoint-in", "chk-2.gguf", "--only-write-lora",
                "--lora-out", "extracted-ITERATION.gguf"]) == 0
    f = open_gguf(work / "extracted-2.gguf", "adapter")
    assert f.get_str("general.type") == "adapter"
    ck = lora_of("chk-2.gguf")
    name = "blk.0.attn_q.weight"
    np.testing.assert_array_equal(np.asarray(f.tensors[name + ".lora_b"].data), ck.lora.b[name])


def test_sigterm_saves_latest_and_stops(work, capsys, monkeypatch):
    from gguf_finetune import trainer as trainer_mod

    orig = trainer_mod.Trainer.evaluate
    calls = {"n": 0}

    def evaluate(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step still completes
        return orig(self)

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", evaluate)
    argv = ["--model-base", "m.gguf", "--train-data", "train.txt", "--sample-start", "<s>", "--ctx", "16",
            "--batch", "2", "--threads", "1", "--save-every", "0", "--adam-iter", "50",
            "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf"]
    assert run(argv) == 130
    ck = lora_of("chk-LATEST.gguf")
    assert ck.train.iteration == 3
    assert "interrupted" in capsys.readouterr().err


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(work, capsys, monkeypatch):
    from gguf_finetune import trainer as trainer_mod
    from gguf_finetune.errors import UserError

    finetune("--save-every", "1", iters=2)
    before = (work / "chk-LATEST.gguf").read_bytes()
    orig = trainer_mod.Trainer.evaluate

    def evaluate(self):
        loss, n, lim = orig(self)
        return float("nan"), n, lim

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", evaluate)
    with pytest.raises(UserError, match="adam-alpha"):
        finetune("--save-every", "1", iters=2)
    assert (work / "chk-LATEST.gguf").read_bytes() == before
