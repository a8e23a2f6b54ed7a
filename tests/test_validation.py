"""Validation: the split, the evaluator, the trainer hook (no effect on training), --save-best, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gguf_finetune.data.validation import split_indices, subset_text, text_windows
from gguf_finetune.errors import UserError

WORDS = ["cat", "dog", "rat", "hen", "fox", "owl", "ant", "bee"]


def write_mixed(path) -> None:
    """16 records: chat, prompt/completion and text in turn."""
    with open(path, "w") as f:
        for i, w in enumerate(WORDS * 2):
            rec = [{"messages": [{"role": "user", "content": f"the {w}"},
                                 {"role": "assistant", "content": f"sat on the mat {i}"}]},
                   {"prompt": f"the {w} ate", "completion": f" a {w} near the tree"},
                   {"text": f"the {w} sat on the mat and ate"}][i % 3]
            f.write(json.dumps(rec) + "\n")


def test_split_is_deterministic_disjoint_and_seeded():
    tr, va = split_indices(20, 0.25, 7)
    assert len(va) == 5 and len(tr) == 15
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(20))
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
    tr2, va2 = split_indices(20, 0.25, 7)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert any(not np.array_equal(va, split_indices(20, 0.25, s)[1]) for s in range(8, 12))
    assert len(split_indices(3, 0.01, 0)[1]) == 1  # at least one
    with pytest.raises(UserError, match="too few"):
        split_indices(1, 0.5, 0)


def test_text_subsets_and_windows():
    from gguf_finetune.data.text import TextDataset

    ds = TextDataset(np.arange(10, dtype=np.int32), np.array([0, 3, 7]), np.array([3, 4, 3]))
    sub = subset_text(ds, np.array([2, 0]))
    assert sub.begins.tolist() == [7, 0] and sub.sizes.tolist() == [3, 3] and sub.tokens is ds.tokens
    w = text_windows(ds, 4)
    assert w.begins.tolist() == [0, 4, 8] and w.sizes.tolist() == [4, 4, 2]


# ------------------------------------------------------------------------------------------------
# the evaluator
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gguf_finetune.api import load_model
    from gguf_finetune.lora import LoraRanks, init_lora
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

    p = write_synthetic_model(tmp_path_factory.mktemp("m") / "m.gguf",
                              SyntheticSpec(n_vocab=300, n_embd=32, n_ff=64, n_layer=2, n_head=4, n_head_kv=2))
    model = load_model(p)
    lora = init_lora(model.hparams, LoraRanks(tok_embd=2, out=2, wq=2, wk=2, wv=2, wo=2, ffn_gate=2, ffn_down=2,
                                              ffn_up=2), 2.0, 5)
    lora.flat[:] = np.random.default_rng(1).standard_normal(lora.flat.shape).astype(np.float32) * 0.1  # b != 0
    return model, lora


def test_evaluator_is_the_weighted_mean_nll(tiny):
    from gguf_finetune.engine.forward import forward_logits
    from gguf_finetune.evaluate import Evaluator

    model, lora = tiny
    rng = np.random.default_rng(0)
    batches = []
    for B in (3, 1):
        x = rng.integers(3, 300, (B, 8)).astype(np.int32)
        y = rng.integers(3, 300, (B, 8)).astype(np.int32)
        w = (rng.random((B, 8)) < 0.5).astype(np.float32)
        batches.append((x, y, w))
    got = Evaluator(model.weights, model.hparams, batches)(lora)
    num = den = 0.0
    for x, y, w in batches:  # reference: float64 log-softmax of the engine's logits
        logits = forward_logits(model.weights, model.hparams, x, lora).astype(np.float64)  # [B, T, V]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
        num += float((nll * w).sum())
        den += float(w.sum())
    assert got == pytest.approx(num / den, rel=1e-5)
    with pytest.raises(UserError, match="no trained token"):
        Evaluator(model.weights, model.hparams, [(x, y, np.zeros_like(w))])


# ------------------------------------------------------------------------------------------------
# through finetune
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def work(tmp_path, monkeypatch):
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

    write_synthetic_model(tmp_path / "m.gguf", SyntheticSpec(n_vocab=400, n_embd=32, n_ff=64, n_layer=2,
                                                             n_head=4, n_head_kv=2, seed=1))
    write_mixed(tmp_path / "train.jsonl")
    with open(tmp_path / "val.jsonl", "w") as f:
        for w in WORDS[:3]:
            f.write(json.dumps({"prompt": f"the {w} sat", "completion": f" on the mat near the {w}"}) + "\n")
    (tmp_path / "train.txt").write_text("".join(f"<s>the {w} sat on the mat {i}\n" for i, w in enumerate(WORDS * 2)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def finetune(*extra: str, iters: int, data: str = "train.jsonl", capsys=None) -> str:
    from gguf_finetune.cli.finetune import run

    argv = ["--model-base", "m.gguf", "--train-data", data, "--chat-template", "chatml", "--ctx", "20",
            "--batch", "2", "--seed", "3", "--adam-alpha", "0.02", "--warmup", "1", "--threads", "1",
            "--lora-r", "2", "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf", "--save-every", "100", "--adam-iter", str(iters), *extra]
    assert run(argv) == 0
    return capsys.readouterr().out if capsys else ""


def read_ck(path):
    from gguf_finetune.formats.checkpoint import read_checkpoint
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.model import read_hparams

    return read_checkpoint(path, read_hparams(open_gguf("m.gguf")))


def metrics(work) -> list[dict]:
    return [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]


def test_evaluation_does_not_change_training(work, capsys):
    finetune(iters=4)
    plain = read_ck("chk-LATEST.gguf")
    for f in work.glob("*-LATEST.gguf"):
        os.remove(f)
    os.remove("metrics.jsonl")
    out = finetune("--val-data", "val.jsonl", "--eval-every", "1", "--save-best", iters=4, capsys=capsys)
    ev = read_ck("chk-LATEST.gguf")
    np.testing.assert_array_equal(plain.lora.flat, ev.lora.flat)
    np.testing.assert_array_equal(plain.opt.v, ev.opt.v)
    assert plain.train == ev.train  # also with the best files written (and the counters synced) on the way
    assert "saving to chk-best.gguf" in out
    vals = [r for r in metrics(work) if "val_loss" in r]
    assert [r["iter"] for r in vals] == [0, 1, 2, 3, 4]
    for r in vals:
        assert f"main: iter={r['iter']} val_loss={r['val_loss']:f}" in out
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]  # training on the same kind of text helps
    assert "main: validation: 3 samples" in out


def test_eval_every_and_end(work, capsys):
    out = finetune("--val-data", "val.jsonl", "--eval-every", "2", iters=5, capsys=capsys)
    assert [r["iter"] for r in metrics(work) if "val_loss" in r] == [0, 2, 4, 5]
    assert out.index("main: iter=5 val_loss=") < out.index("main: total training time")
    # resumed: no repeat of the first point's evaluation, the cadence is by absolute iteration
    finetune("--val-data", "val.jsonl", "--eval-every", "2", iters=3)
    assert [r["iter"] for r in metrics(work) if "val_loss" in r] == [0, 2, 4, 5, 6, 8]
    os.remove("metrics.jsonl")
    finetune("--val-data", "val.jsonl", iters=1)  # default: only at the end
    assert [r["iter"] for r in metrics(work) if "val_loss" in r] == [9]


def test_resume_stays_exact_with_validation(work):
    finetune("--val-split", "0.2", "--eval-every", "1", iters=6)
    whole = read_ck("chk-LATEST.gguf")
    os.rename("chk-LATEST.gguf", "whole.gguf")
    finetune("--val-split", "0.2", "--eval-every", "1", iters=3)
    finetune("--val-split", "0.2", "--eval-every", "1", iters=3)
    resumed = read_ck("chk-LATEST.gguf")
    np.testing.assert_array_equal(resumed.lora.flat, whole.lora.flat)
    assert resumed.train == whole.train


def test_val_split_holds_out_samples(work, capsys):
    out = finetune("--val-split", "0.25", iters=1, capsys=capsys)
    assert "main: validation: holding out 4 of 16 samples (--val-split 0.25, seed 3)" in out
    ck = read_ck("chk-LATEST.gguf")
    assert ck.train.shuffle_sample_count == 12


def test_save_best_keeps_the_lowest_validation_loss(work, capsys):
    # a large step size makes the validation loss go up again after a while
    out = finetune("--val-data", "val.jsonl", "--eval-every", "1", "--save-best", "--adam-alpha", "0.3",
                   iters=8, capsys=capsys)
    vals = [r for r in metrics(work) if "val_loss" in r]
    best = min(vals, key=lambda r: r["val_loss"])
    ck = read_ck("chk-best.gguf")
    assert ck.train.iteration == best["iter"]
    assert (work / "lora-best.gguf").exists()
    assert out.count("saving to chk-best.gguf") == sum(
        1 for i, r in enumerate(vals) if all(r["val_loss"] < p["val_loss"] for p in vals[:i]))
    # a resumed run starts from the earlier best's loss: no new best file unless it improves
    out = finetune("--val-data", "val.jsonl", "--save-best", "--adam-alpha", "0.3", iters=1, capsys=capsys)
    assert f"main: best so far: chk-best.gguf (iteration {best['iter']}) val_loss={best['val_loss']:f}" in out
    last = [r for r in metrics(work) if "val_loss" in r][-1]
    assert ("saving to chk-best.gguf" in out) == (last["val_loss"] < best["val_loss"])


def test_text_validation_data(work, capsys):
    (work / "val.txt").write_text("<s>the cat sat on the mat\n<s>the dog sat\n")
    out = finetune("--val-data", "val.txt", "--sample-start", "<s>", iters=1, data="train.txt", capsys=capsys)
    assert "main: validation: 2 samples, 40 trained positions" in out  # text rows weigh every position
    assert "main: iter=1 val_loss=" in out
    out = finetune("--val-split", "0.25", "--sample-start", "<s>", iters=1, data="train.txt", capsys=capsys)
    assert "holding out 4 of 16 samples" in out


@pytest.mark.parametrize("extra, needle", [
    (("--eval-every", "2"), "--eval-every needs validation data"),
    (("--save-best",), "--save-best needs validation data"),
    (("--val-data", "val.jsonl", "--val-split", "0.1"), "give one of them"),
    (("--val-data", "nope.jsonl"), "--val-data 'nope.jsonl': file not found"),
    (("--val-split", "0.5", "--data-format", "text"), "--val-split on plain text needs"),
])
def test_validation_errors(work, capsys, extra, needle):
    from gguf_finetune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model-base", "m.gguf", "--train-data", "train.jsonl", "--chat-template", "chatml",
              "--adam-iter", "1", "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf",
              *extra])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert needle in err.splitlines()[-1] and "Traceback" not in err
