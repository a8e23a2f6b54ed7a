"""Legacy .bin adapters: llama.cpp's lora-tiny-4.bin reads, matches its checkpoint, writes back byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from gguf_finetune.errors import UserError
from gguf_finetune.formats.checkpoint import read_checkpoint
from gguf_finetune.formats.ggla import ggml_n_dims, read_ggla, read_ggla_header, write_ggla
from gguf_finetune.formats.load import describe_adapter, detect_kind, load_adapter
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.lora import LoraRanks, init_lora
from gguf_finetune.model import read_hparams


@pytest.fixture(scope="module")
def fx(testdata):
    return testdata / "fixtures" / "llamacpp-tiny"


@pytest.fixture(scope="module")
def hp(fx):
    return read_hparams(open_gguf(fx / "tiny-llama-spm-q8_0.gguf"))


def test_ggml_n_dims():
    assert ggml_n_dims((4, 64)) == 2
    assert ggml_n_dims((1, 1)) == 1
    assert ggml_n_dims((2, 1)) == 1
    assert ggml_n_dims((1, 64)) == 2


def test_fixture_bin_equals_its_checkpoint(fx, hp):
    assert detect_kind(fx / "lora-tiny-4.bin") == "ggla"
    assert read_ggla_header(fx / "lora-tiny-4.bin") == (4, 4, ["F32"])
    p = read_ggla(fx / "lora-tiny-4.bin", hp)
    c = read_checkpoint(fx / "chk-tiny-4.gguf", hp)
    assert [(s.name, s.kind, s.n_in, s.n_out, s.rank) for s in p.layout.specs] == \
        [(s.name, s.kind, s.n_in, s.n_out, s.rank) for s in c.lora.layout.specs]
    np.testing.assert_array_equal(p.flat, c.lora.flat)
    # header alpha/r = 4/4 applies to every tensor, the rank-1 norms included
    assert set(p.scales.values()) == {1.0}
    assert p.get("blk.0.attn_norm.weight")[0].shape == (64, 1)


def test_write_back_is_byte_identical(fx, tmp_path):
    want = (fx / "lora-tiny-4.bin").read_bytes()
    p = read_ggla(fx / "lora-tiny-4.bin")
    write_ggla(tmp_path / "a.bin", p)
    assert (tmp_path / "a.bin").read_bytes() == want
    c = read_checkpoint(fx / "chk-tiny-4.gguf")
    write_ggla(tmp_path / "b.bin", c.lora, lora_r=4, lora_alpha=4)
    assert (tmp_path / "b.bin").read_bytes() == want
    # a different checkpoint gives different bytes (the comparison can fail)
    c10 = read_checkpoint(fx / "chk-tiny-10.gguf")
    write_ggla(tmp_path / "c.bin", c10.lora, lora_r=4, lora_alpha=4)
    assert (tmp_path / "c.bin").read_bytes() == (fx / "lora-tiny-10.bin").read_bytes() != want


def test_header_scale_is_global_and_folding_keeps_meaning(hp, tmp_path):
    """Our alpha/rank_t scales survive a .bin whose header says alpha/r for every tensor."""
    lora = init_lora(hp, LoraRanks.uniform(4, norm_rank=1, wq=2), alpha=8.0, seed=3)
    rng = np.random.default_rng(1)
    lora.flat[...] = rng.standard_normal(lora.flat.size).astype(np.float32)
    write_ggla(tmp_path / "x.bin", lora)  # header r=4, alpha=8 -> 2 for every tensor
    assert read_ggla_header(tmp_path / "x.bin")[:2] == (4, 8)
    back = read_ggla(tmp_path / "x.bin", hp)
    for s in lora.layout.specs:
        a, b, sc = lora.get(s.name)
        a2, b2, sc2 = back.get(s.name)
        assert sc2 == 2.0
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_allclose(sc2 * b2, sc * b, rtol=1e-6)  # rank-2 wq and rank-1 norms are folded
    wq = "blk.0.attn_q.weight"
    assert not np.array_equal(back.b[wq], lora.b[wq])  # folding happened where it had to
    np.testing.assert_array_equal(back.b["blk.0.attn_k.weight"], lora.b["blk.0.attn_k.weight"])


def test_load_and_describe(fx, hp):
    p = load_adapter(fx / "lora-tiny-4.bin", hp)
    assert p.n_params() == 266309
    d = describe_adapter(fx / "lora-tiny-4.bin")
    assert d["type"] == "ggla" and d["lora_r"] == 4 and d["lora_alpha"] == 4
    assert d["norm_adapters"] and d["ranks"]["attn_q"] == [4] and d["ranks"]["attn_norm"] == [1]
    assert d["n_params"] == 266309 and d["n_layers"] == 2


def test_corrupt_files_are_user_errors(fx, tmp_path):
    data = (fx / "lora-tiny-4.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:5000])
    with pytest.raises(UserError, match="truncated"):
        read_ggla(tmp_path / "short.bin")
    bad = bytearray(data)
    bad[4] = 2  # version
    (tmp_path / "v2.bin").write_bytes(bytes(bad))
    with pytest.raises(UserError, match="version 2"):
        read_ggla(tmp_path / "v2.bin")
    with pytest.raises(UserError, match="whole number"):
        write_ggla(tmp_path / "y.bin", read_ggla(fx / "lora-tiny-4.bin"), lora_alpha=2.5)
    assert not (tmp_path / "y.bin").exists()


def test_wrong_model_is_refused(fx, tmp_path):
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

    m = write_synthetic_model(tmp_path / "m.gguf", SyntheticSpec(n_embd=32, n_head=4, n_head_kv=4))
    with pytest.raises(UserError, match="shape"):
        load_adapter(fx / "lora-tiny-4.bin", read_hparams(open_gguf(m)))


def test_describe_checkpoints(fx, hp, tmp_path):
    d = describe_adapter(fx / "chk-tiny-4.gguf")
    assert d["type"] == "checkpoint" and d["origin"] == "llama.cpp" and d["iteration"] == 4
    assert d["scale_mode"] == "one" and d["alpha"] is None and d["n_params"] == 266309
    from gguf_finetune.formats.checkpoint import write_checkpoint
    from gguf_finetune.optim import OptimizerState
    from gguf_finetune.trainer import TrainState

    ranks = LoraRanks.uniform(4, wq=8)
    lora = init_lora(hp, ranks, alpha=16.0, seed=1)
    write_checkpoint(tmp_path / "c.gguf", hp, 32, ranks, lora, OptimizerState.zeros(lora.layout.size), TrainState())
    d = describe_adapter(tmp_path / "c.gguf")
    assert d["origin"] == "gguf-finetune" and d["scale_mode"] == "alpha/r" and d["alpha"] == 16.0
    assert d["ranks"]["attn_q"] == [8] and not d["norm_adapters"]
