"""Checkpoints: llama.cpp's fixture checkpoints load; ours round-trip bit for bit."""

from __future__ import annotations

import contextlib
import io
import shlex
import shutil

import numpy as np
import pytest

from gguf_finetune.formats.checkpoint import read_checkpoint, write_checkpoint
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.lora import LoraRanks, init_lora
from gguf_finetune.model import read_hparams
from gguf_finetune.optim import OptimizerState
from gguf_finetune.trainer import TrainState


def test_llamacpp_checkpoint_loads_with_scale_one(testdata):
    fx = testdata / "fixtures" / "llamacpp-tiny"
    hp = read_hparams(open_gguf(fx / "tiny-llama-spm-q8_0.gguf"))
    c = read_checkpoint(fx / "chk-tiny-4.gguf", hp)
    assert c.from_llamacpp
    assert c.ranks.wq == 4 and c.ranks.att_norm == 1
    assert set(c.lora.scales.values()) == {1.0}
    assert c.train.iteration == 4 and c.opt.iteration == 4
    assert c.opt.m.shape == c.lora.flat.shape == (266309,)
    f = open_gguf(fx / "chk-tiny-4.gguf", "checkpoint")
    raw = np.asarray(f.tensors["blk.1.ffn_down.weight.lora_a"].data).reshape(160, 4)
    np.testing.assert_array_equal(c.lora.a["blk.1.ffn_down.weight"], raw)
    assert np.any(c.lora.b["blk.1.ffn_down.weight"] != 0)


def test_our_checkpoint_round_trips(tmp_path, testdata):
    fx = testdata / "fixtures" / "llamacpp-tiny"
    hp = read_hparams(open_gguf(fx / "tiny-llama-spm-q8_0.gguf"))
    ranks = LoraRanks.uniform(3, norm_rank=1)
    lora = init_lora(hp, ranks, alpha=6.0, seed=5)
    lora.b[lora.layout.specs[0].name][...] = 0.25
    rng = np.random.default_rng(0)
    opt = OptimizerState(rng.random(lora.layout.size, dtype=np.float32), rng.random(lora.layout.size, dtype=np.float32),
                         iteration=17, just_initialized=False, best_loss=1.5, previous_loss=1.75, no_improvement_count=2)
    train = TrainState(iteration=17, sample_count=34, token_count=1088, epoch_count=1, shuffle_samples_hash=2**63 + 5,
                       shuffle_rng_state="1 2 3", shuffle_sample_count=488, shuffle_next_sample=9)
    path = tmp_path / "chk.gguf"
    write_checkpoint(path, hp, 32, ranks, lora, opt, train, ours={"note": "x"})
    c = read_checkpoint(path, hp)
    assert not c.from_llamacpp and c.ours["note"] == "x"
    assert c.lora.alpha == 6.0 and c.lora.scales["blk.0.attn_q.weight"] == 2.0
    np.testing.assert_array_equal(c.lora.flat, lora.flat)
    np.testing.assert_array_equal(c.opt.m, opt.m)
    np.testing.assert_array_equal(c.opt.v, opt.v)
    assert c.train == train
    assert (c.opt.iteration, c.opt.best_loss, c.opt.previous_loss, c.opt.no_improvement_count) == (17, 1.5, 1.75, 2)


def test_llamacpp_moments_map_to_our_layout(testdata):
    """ggml stores moments in graph order; mapped to our layout, only token_embd's b is sparse
    (rows of tokens never seen have no gradient) and its non-zero rows are the seen tokens."""
    fx = testdata / "fixtures" / "llamacpp-tiny"
    hp = read_hparams(open_gguf(fx / "tiny-llama-spm-q8_0.gguf"))
    c = read_checkpoint(fx / "chk-tiny-4.gguf", hp)
    m = c.opt.v
    for s in c.lora.layout.specs:
        oa, ob = c.lora.layout.offsets[s.name]
        b = m[ob:ob + s.n_out * s.rank].reshape(s.n_out, s.rank)
        a = m[oa:oa + s.n_in * s.rank]
        assert np.count_nonzero(a) == a.size, s.name
        zero_rows = np.count_nonzero(~b.any(axis=1))
        if s.name == "token_embd.weight":
            assert 0.5 * s.n_out < zero_rows < s.n_out  # only a few hundred tokens seen in 4 iterations
        else:
            assert zero_rows == 0, s.name


def test_our_checkpoint_has_llamacpps_layout(testdata, tmp_path, monkeypatch):
    """A checkpoint our finetune writes for the fixture's model and ranks (the fixture's first command,
    one iteration, norm ranks 1 as llama.cpp had them) has exactly chk-tiny-4.gguf's keys with the same
    value types, plus keys under our own prefix only, and the same tensors (names, shapes, types)."""
    from gguf_finetune.cli.finetune import run

    fx = testdata / "fixtures" / "llamacpp-tiny"
    for name in ("tiny-llama-spm-q8_0.gguf", "train.txt"):
        shutil.copy(fx / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    argv = shlex.split((fx / "commands.txt").read_text().splitlines()[0])[1:]
    argv[argv.index("--adam-iter") + 1] = "1"
    argv += ["--rank-att-norm", "1", "--rank-ffn-norm", "1", "--rank-out-norm", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert run(argv) == 0
    ours = open_gguf(tmp_path / "chk-tiny-1.gguf", "checkpoint")
    theirs = open_gguf(fx / "chk-tiny-4.gguf", "checkpoint")
    kv_ours = {k for k in ours.keys() if not k.startswith("GGUF.")}
    kv_theirs = {k for k in theirs.keys() if not k.startswith("GGUF.")}
    extra = kv_ours - kv_theirs
    assert kv_theirs <= kv_ours, sorted(kv_theirs - kv_ours)
    assert extra and all(k.startswith("gguf_finetune.") for k in extra), sorted(extra)
    for k in sorted(kv_theirs):
        assert ours.reader.fields[k].types == theirs.reader.fields[k].types, k
    # what does not depend on the iteration is equal too (same model, flags, data and seed)
    changing = {"training.iteration_count", "training.sample_count", "training.token_count",
                "training.shuffle.next_sample", "optimizer.iteration_count", "optimizer.adam.best_loss",
                "optimizer.adam.previous_loss"}
    for k in sorted(kv_theirs - changing):
        assert ours.get(k) == theirs.get(k), k

    def tensors(f):
        return {n: (tuple(int(x) for x in t.shape), int(t.tensor_type)) for n, t in f.tensors.items()}

    assert tensors(ours) == tensors(theirs)


@pytest.mark.parametrize("arch,extra", [("qwen2", {}), ("qwen3", {"head_dim": 6}), ("phi3", {"n_rot": 2}),
                                        ("gemma3", {"head_dim": 8, "tied": True, "sliding_window": 4})])
def test_every_family_round_trips_with_and_without_the_model(tmp_path, arch, extra):
    """A checkpoint of any family reads back the same, also without the model (its layout comes from
    the checkpoint's own keys: head_dim, fused tensors)."""
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

    spec = SyntheticSpec(n_vocab=300, n_embd=16, n_ff=24, n_head=4, n_head_kv=2, arch=arch, **extra)
    hp = read_hparams(open_gguf(write_synthetic_model(tmp_path / "m.gguf", spec)))
    ranks = LoraRanks.uniform(2, norm_rank=1)
    lora = init_lora(hp, ranks, alpha=4.0, seed=1)
    lora.flat[...] = np.random.default_rng(1).standard_normal(lora.flat.size).astype(np.float32)
    path = tmp_path / "chk.gguf"
    write_checkpoint(path, hp, 16, ranks, lora, OptimizerState.zeros(lora.layout.size), TrainState())
    for model_hp in (hp, None):
        c = read_checkpoint(path, model_hp)
        assert c.lora.layout.same_as(lora.layout)
        np.testing.assert_array_equal(c.lora.flat, lora.flat)
    names = {s.name for s in lora.layout.specs}
    assert ("blk.0.attn_qkv.weight" in names) == (arch == "phi3")
    assert lora.layout.by_name["blk.0.attn_q.weight" if arch != "phi3" else "blk.0.attn_qkv.weight"].n_out == \
        hp.lora_dims("attn_q" if arch != "phi3" else "attn_qkv")[0]
