"""Training loop: exact resume, saving, --only-write-lora, interruption, divergence."""

from __future__ import annotations

import io
import json
import os
import re
import signal
from contextlib import redirect_stdout

import numpy as np
import pytest

from gguf_finetune.cli.finetune import run
from gguf_finetune.formats.checkpoint import read_checkpoint
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.model import read_hparams
from tiny import TEXT


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_latest_and_stops(work, capsys, monkeypatch, sig):
    """SIGTERM and Ctrl-C (SIGINT) finish the step under way, save the LATEST checkpoint and adapter
    at that iteration, say so, and exit with 130."""
    from gguf_finetune import trainer as trainer_mod

    orig = trainer_mod.Trainer.evaluate
    calls = {"n": 0}

    def evaluate(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), sig)  # arrives mid-step: the step still completes
        return orig(self)

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", evaluate)
    argv = ["--model-base", "m.gguf", "--train-data", "train.txt", "--sample-start", "<s>", "--ctx", "16",
            "--batch", "2", "--threads", "1", "--save-every", "0", "--adam-iter", "50",
            "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf"]
    assert run(argv) == 130
    captured = capsys.readouterr()
    # evaluation 3 is the one after update 2; update 3 still happens, then the loop stops
    ck = lora_of("chk-LATEST.gguf")
    assert ck.train.iteration == 3 and ck.opt.iteration == 3
    assert (work / "chk-3.gguf").exists() and not (work / "chk-4.gguf").exists()
    name = signal.Signals(sig).name
    assert f"main: {name} received: saving and stopping after iteration 3" in captured.out
    assert "save_as_llama_lora: saving to lora-LATEST.gguf" in captured.out
    assert "finetune: interrupted: saved iteration 3 (chk-LATEST.gguf)" in captured.err
    for adapter in ("lora-LATEST.gguf", "lora-3.gguf"):
        f = open_gguf(work / adapter, "adapter")
        for s in ck.lora.layout.specs:
            if s.kind == "mat":  # (token_embd is stored transposed in GGUF adapters, norms not at all)
                np.testing.assert_array_equal(np.asarray(f.tensors[s.name + ".lora_b"].data), ck.lora.b[s.name])
    assert np.any(ck.lora.b["blk.0.attn_q.weight"] != 0)  # the adapter is the trained one, not the init


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(work, capsys, monkeypatch):
    from gguf_finetune import trainer as trainer_mod
    from gguf_finetune.errors import UserError

    finetune("--save-every", "1", iters=2)
    before = (work / "chk-LATEST.gguf").read_bytes()
    orig = trainer_mod.Trainer.evaluate

    def evaluate(self):
        loss, *rest = orig(self)
        return (float("nan"), *rest)

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", evaluate)
    with pytest.raises(UserError, match="adam-alpha"):
        finetune("--save-every", "1", iters=2)
    assert (work / "chk-LATEST.gguf").read_bytes() == before


# -- --epochs, --grad-acc, resume across epochs --------------------------------------------------------

SIX_SAMPLES = "".join(TEXT.splitlines(keepends=True)[:6])


def test_epochs_stops_when_one_epoch_is_done(work, capsys):
    """--epochs 1 with 6 samples and --batch 2: the 3rd batch (drawn for update 3) completes the epoch;
    llama.cpp lets that update happen and cancels at the next callback, before --adam-iter is reached.
    The end-of-run save follows."""
    (work / "train.txt").write_text(SIX_SAMPLES)
    out = finetune("--save-every", "0", "--epochs", "1", iters=50, capsys=capsys)
    assert "train_opt_callback: reshuffle samples. completed epochs: 1" in out
    assert "main: completed 1 epoch (--epochs 1): stopping after iteration 3" in out
    assert re.search(r"iter=\s+3 ", out) and not re.search(r"iter=\s+4 ", out)
    assert (work / "chk-3.gguf").exists() and (work / "lora-3.gguf").exists()
    assert not (work / "chk-4.gguf").exists()
    ck = lora_of("chk-LATEST.gguf")
    assert ck.train.iteration == ck.opt.iteration == 3
    assert ck.train.epoch_count == 1
    # every sample once; the next shuffle starts at its beginning (llama.cpp also counts a batch it
    # draws and discards when it cancels; here that batch is kept for a resumed run)
    assert ck.train.sample_count == 6 and ck.train.shuffle_next_sample == 0
    assert ck.train.token_count == 3 * 2 * 16
    # the limit counts epochs of this run: resuming with --epochs 1 trains one more epoch
    out = finetune("--save-every", "0", "--epochs", "1", iters=50, capsys=capsys)
    ck = lora_of("chk-LATEST.gguf")
    assert ck.train.epoch_count == 2 and ck.train.iteration == 6


def _counters_and_lora(work, *extra):
    for f in work.glob("chk-*.gguf"):
        f.unlink()
    out = io.StringIO()
    with redirect_stdout(out):
        finetune("--save-every", "0", "--adam-gclip", "0", *extra, iters=4)
    losses = re.findall(r"loss=([0-9.]+)", out.getvalue())
    return lora_of("chk-LATEST.gguf"), losses


def test_grad_acc_equals_the_larger_batch(work):
    """--batch 1 --grad-acc 2 sees the rows --batch 2 sees (without --fill-with-next-samples every row
    is one sample, in the same order) and averages the two gradients as one batch of 2 does.

    The two differ only in summation order (a batch's gradient is one matmul over all its rows; here
    two matmuls are added), ~1e-7 relative in the gradient.  Adam then scales every element's step to
    about alpha·sched whatever the gradient's size, so the parameters agree to an absolute tolerance
    that is a small fraction of alpha (elementwise rtol is meaningless for B, which starts at 0);
    measured max |diff| 1e-7 = 1e-5·alpha after 4 updates.  The moments are not renormalised: they
    agree to ~1e-6 relative (gradient clipping is off, so a wrongly scaled gradient shows in them).
    """
    big, loss_big = _counters_and_lora(work, "--batch", "2", "--grad-acc", "1")
    acc, loss_acc = _counters_and_lora(work, "--batch", "1", "--grad-acc", "2")
    assert loss_acc == loss_big and len(loss_big) == 5  # the same per-iteration losses (to %f)
    alpha = 0.01
    assert np.abs(acc.lora.flat - big.lora.flat).max() <= 1e-3 * alpha
    for x, y in ((acc.opt.m, big.opt.m), (acc.opt.v, big.opt.v)):
        assert np.linalg.norm(x - y) <= 1e-5 * np.linalg.norm(y)
    # counters: per update grad_acc·batch samples and grad_acc·batch·ctx tokens
    for ck in (big, acc):
        assert (ck.train.iteration, ck.train.sample_count, ck.train.token_count) == (4, 4 * 2, 4 * 2 * 16)
        assert ck.train.shuffle_next_sample == 8
    both, _ = _counters_and_lora(work, "--batch", "2", "--grad-acc", "2")
    assert (both.train.sample_count, both.train.token_count) == (4 * 4, 4 * 4 * 16)
    assert np.abs(both.lora.flat - big.lora.flat).max() > 1e-3 * alpha  # other data: another result


def test_resume_across_epoch_boundary_bit_for_bit(work):
    """Few samples, --grad-acc 2, random offsets, rows filled with the next samples: epochs end inside
    batches and inside accumulation steps, and the data is reshuffled between N and 2N; N + N still
    equals 2N bit for bit."""
    (work / "train.txt").write_text("".join(TEXT.splitlines(keepends=True)[:5]))
    flags = ("--save-every", "100", "--grad-acc", "2", "--sample-random-offsets", "--fill-with-next-samples")
    N = 3
    finetune(*flags, iters=2 * N)
    whole = lora_of("chk-LATEST.gguf")
    for f in work.glob("chk-*.gguf"):
        f.rename(work / ("whole-" + f.name))
    finetune(*flags, iters=N)
    first = lora_of("chk-LATEST.gguf")
    finetune(*flags, iters=N)
    resumed = lora_of("chk-LATEST.gguf")
    assert first.train.iteration == N and resumed.train.iteration == 2 * N
    assert 0 < first.train.epoch_count < whole.train.epoch_count  # reshuffled before and after N
    assert first.train.shuffle_rng_state != whole.train.shuffle_rng_state
    assert np.array_equal(resumed.lora.flat, whole.lora.flat)
    assert np.array_equal(resumed.opt.m, whole.opt.m) and np.array_equal(resumed.opt.v, whole.opt.v)
    assert resumed.train == whole.train
    # (best_loss differs on purpose: ggml restarts it at every run's first loss)
    assert (resumed.opt.iteration, resumed.opt.previous_loss) == (whole.opt.iteration, whole.opt.previous_loss)


@pytest.mark.parametrize("data", ["text", "jsonl"])
def test_resume_with_packed_rows_bit_for_bit(work, data, capsys):
    """Packed rows (--pack on text; JSONL packs by default) across epochs, with --grad-acc 2: N + N still
    equals 2N bit for bit, and a batch holds several records."""
    if data == "jsonl":
        rows = [{"messages": [{"role": "user", "content": f"the {w} sat"},
                              {"role": "assistant", "content": f"on the mat {i}"}]} for i, w in enumerate(TEXT.split()[:24])]
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        flags = ("--train-data", "train.jsonl", "--chat-template", "chatml")
    else:
        (work / "train.txt").write_text("".join(TEXT.splitlines(keepends=True)[:9]))
        flags = ("--pack",)
    flags += ("--save-every", "100", "--grad-acc", "2", "--ctx", "256")
    N = 3
    out = finetune(*flags, iters=2 * N, capsys=capsys)
    assert "main: packed rows: real tokens / computed positions" in out
    whole = lora_of("chk-LATEST.gguf")
    assert whole.train.sample_count > 2 * N * 2 * 2  # more records than rows were trained on
    for f in work.glob("chk-*.gguf"):
        f.rename(work / ("whole-" + f.name))
    finetune(*flags, iters=N)
    finetune(*flags, iters=N)
    resumed = lora_of("chk-LATEST.gguf")
    assert resumed.train.iteration == 2 * N and resumed.train.epoch_count >= 1
    assert np.array_equal(resumed.lora.flat, whole.lora.flat)
    assert np.array_equal(resumed.opt.m, whole.opt.m) and np.array_equal(resumed.opt.v, whole.opt.v)
    assert resumed.train == whole.train


# -- start, names, metrics -------------------------------------------------------------------------------


def test_missing_checkpoint_in_starts_fresh_with_notice(work, capsys):
    finetune("--save-every", "0", iters=2)  # chk-LATEST.gguf exists, but another file is asked for
    out = finetune("--save-every", "0", "--checkpoint-in", "nothere.gguf", iters=1, capsys=capsys)
    assert "main: checkpoint 'nothere.gguf' not found: starting a new adapter" in out
    assert "main: total train_iterations 0" in out and "main: opt iter 0" in out
    assert "main: train data seems to have changed. restarting shuffled epoch." in out
    ck = lora_of("chk-LATEST.gguf")
    assert ck.train.iteration == 1 and ck.train.sample_count == 2


def _libstdcpp_normal(seed: int):
    """std::normal_distribution<float> on std::mt19937(seed), transcribed from libstdc++ without the
    project's code: the engine is Python's own MT19937 (the same generator) given std::mt19937's seeding;
    generate_canonical<float, 24> is float(u) / 2^32; the polar method computes in float (logf from libm)."""
    import ctypes
    import ctypes.util
    import random

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.logf.restype, libm.logf.argtypes = ctypes.c_float, [ctypes.c_float]
    mt = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
    rng = random.Random()
    rng.setstate((3, tuple(mt + [624]), None))
    f32 = np.float32

    def canonical():
        r = f32(rng.getrandbits(32)) / f32(4294967296.0)
        return r if r < 1 else np.nextafter(f32(1), f32(0))

    saved = None
    while True:
        if saved is not None:
            out, saved = saved, None
            yield out
            continue
        while True:
            x = f32(2.0 * float(canonical()) - 1.0)
            y = f32(2.0 * float(canonical()) - 1.0)
            r2 = x * x + y * y
            if not (r2 > 1.0 or r2 == 0.0):
                break
        mult = np.sqrt(f32(f32(-2) * f32(libm.logf(float(r2)))) / r2)
        saved = x * mult
        yield y * mult


def test_fresh_adapter_is_llamacpp_init(work):
    """What the CLI writes for a new adapter: every lora_b zero, every lora_a llama.cpp's randomize_lora
    (one mt19937(--seed) normal stream, clamped to [-1, 1], times 1/sqrtf(r + n_in), tensor by tensor
    in llama.cpp's order).  With --warmup > 0 the first update has sched 0 and moves nothing, so the
    checkpoint of iteration 1 holds the initial adapter exactly."""
    finetune("--save-every", "0", "--rank-ffn-norm", "1", "--rank-out-norm", "1", iters=1)
    f = open_gguf(work / "chk-1.gguf", "checkpoint")
    assert f.get_int("training.iteration_count") == 1
    order = ["token_embd", "output_norm", "output"] + [
        f"blk.{i}.{t}" for i in range(2) for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_norm", "ffn_gate", "ffn_down", "ffn_up")]
    normal = _libstdcpp_normal(3)  # --seed 3
    f32 = np.float32
    for base in order:
        a = np.asarray(f.tensors[base + ".weight.lora_a"].data)
        n_in, r = a.shape  # ggml ne = [r, n_in]
        scale = f32(1) / np.sqrt(f32(r) + f32(n_in))
        want = np.array([scale * min(max(next(normal), f32(-1)), f32(1)) for _ in range(a.size)], dtype=f32)
        assert np.array_equal(a.reshape(-1), want), base
        b = np.asarray(f.tensors[base + ".weight.lora_b"].data)
        assert b.size and not np.any(b), base
    assert np.all(np.asarray(f.tensors["optimizer.adam.second_moments"].data) >= 0)


def test_metrics_next_to_checkpoint_with_speed_and_time(work):
    (work / "runs").mkdir()
    finetune("--save-every", "0", "--checkpoint-out", "runs/chk-ITERATION.gguf", iters=3)
    assert (work / "runs" / "chk-3.gguf").exists()
    assert (work / "runs" / "metrics.jsonl").exists() and not (work / "metrics.jsonl").exists()
    recs = [json.loads(line) for line in (work / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["tokens_per_s"] > 0 and r["elapsed"] > 0
        # at the line of iteration k, k batches of 2 x 16 tokens have been processed
        assert r["tokens_per_s"] * r["elapsed"] == pytest.approx(r["iter"] * 2 * 16, rel=1e-3)
        assert r["trained_tokens"] == r["iter"] * 2 * 16  # text: every position carries loss
    assert [r["elapsed"] for r in recs] == sorted(r["elapsed"] for r in recs)


def test_custom_iteration_pattern_and_latest_name(work, capsys):
    out = finetune("--save-every", "2", "--pattern-fn-it", "XX", "--fn-latest", "LAST",
                   "--checkpoint-out", "ck-XX-XX.gguf", "--lora-out", "ad-XX.gguf", iters=3, capsys=capsys)
    names = sorted(p.name for p in work.iterdir() if p.name.startswith(("ck-", "ad-")))
    # llama.cpp replaces the first occurrence of the pattern only
    assert names == ["ad-2.gguf", "ad-3.gguf", "ad-LAST.gguf",
                     "ck-2-XX.gguf", "ck-3-XX.gguf", "ck-LAST-XX.gguf"]
    assert "save_checkpoint_lora_file: saving to ck-LAST-XX.gguf" in out
    assert lora_of("ck-LAST-XX.gguf").train.iteration == 3


# -- early stops -----------------------------------------------------------------------------------------


def test_opt_delta_convergence_stops_run_with_reason(work, capsys):
    """--opt-past 2: ggml compares from loop index t = past on, i.e. after update past + 1; a huge
    --opt-delta makes that first comparison stop the run."""
    out = finetune("--save-every", "0", "--opt-past", "2", "--opt-delta", "1e6", iters=20, capsys=capsys)
    assert ("main: converged at iteration 3: the loss changed by less than --opt-delta 1e+06 (relative) "
            "over --opt-past 2 iterations") in out
    assert re.search(r"iter=\s+3 ", out) and not re.search(r"iter=\s+4 ", out)
    ck = lora_of("chk-LATEST.gguf")
    assert ck.train.iteration == 3 and (work / "chk-3.gguf").exists()
    assert ck.opt.past_loss_values.shape == (2,)


def test_max_no_improvement_stops_run_with_reason(work, capsys):
    """--opt-max-no-improvement 1 stops at the first loss that does not beat the best so far; with a
    tiny learning rate the losses are those of the batches, and one soon fails to improve."""
    out = finetune("--save-every", "0", "--adam-alpha", "1e-7", "--opt-max-no-improvement", "1", iters=40,
                   capsys=capsys)
    m = re.search(r"main: converged at iteration (\d+): no improvement on the best loss for 1 iteration "
                  r"\(--opt-max-no-improvement 1\)", out)
    assert m, out
    stop = int(m.group(1))
    assert 1 <= stop < 40
    losses = [float(x) for x in re.findall(r"iter=\s*\d+ sample=\S+ sched=\S+ loss=([0-9.]+)", out)][1:]
    assert len(losses) == stop  # the losses before each update; the one that did not improve is not printed
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # every printed loss improved on the best
    ck = lora_of("chk-LATEST.gguf")
    assert ck.train.iteration == stop
    assert ck.opt.no_improvement_count == 1
    assert ck.opt.best_loss == pytest.approx(losses[-1], abs=1e-6)
