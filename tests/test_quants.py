"""quants.py: every numba kernel is bit-identical to gguf.quants.dequantize (the numpy reference)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES

from gguf_finetune import quants
from gguf_finetune.errors import UserError

ALL = sorted(quants.SUPPORTED, key=int)
IDS = [t.name for t in ALL]


def bits(a: np.ndarray) -> np.ndarray:
    """float32 array -> its bit patterns, so equality is bitwise (NaN == NaN, -0.0 != 0.0)."""
    a = np.asarray(a)
    assert a.dtype == np.float32
    return a.view(np.uint32)


def cols_for(qtype, blocks: int) -> int:
    return GGML_QUANT_SIZES[qtype][0] * blocks if GGML_QUANT_SIZES[qtype][0] > 1 else 32 * blocks


def reference(raw: np.ndarray, qtype) -> np.ndarray:
    return np.asarray(gq.dequantize(raw, qtype), dtype=np.float32)


def test_supported_set():
    assert quants.SUPPORTED == {
        QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
        QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS,
    }


@pytest.mark.parametrize("qtype", ALL, ids=IDS)
def test_random_blocks_bit_identical(qtype):
    rng = np.random.default_rng(int(qtype))
    cols = cols_for(qtype, 5)  # multi-block rows
    raw = quants.random_raw(qtype, 7, cols, rng)
    ref = reference(raw, qtype)
    assert not np.isnan(ref).any()  # scale fields were made finite
    got = quants.dequantize(raw, qtype)
    assert got.shape == (7, cols) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(bits(got), bits(ref))

    # rows in chunks, and gathered
    np.testing.assert_array_equal(bits(quants.dequantize_rows(raw, qtype, 2, 5)), bits(ref[2:5]))
    assert quants.dequantize_rows(raw, qtype, 3, 3).shape == (0, cols)
    ids = np.array([6, 0, 3, 3])
    np.testing.assert_array_equal(bits(quants.dequantize_take(raw, qtype, ids)), bits(ref[ids]))

    # out= writes in place and returns the buffer
    out = np.full((7, cols), np.nan, np.float32)
    assert quants.dequantize(raw, qtype, out=out) is out
    np.testing.assert_array_equal(bits(out), bits(ref))
    chunk = np.full((2, cols), np.nan, np.float32)
    assert quants.dequantize_rows(raw, qtype, 5, 7, out=chunk) is chunk
    np.testing.assert_array_equal(bits(chunk), bits(ref[5:7]))


@pytest.mark.parametrize("qtype", ALL, ids=IDS)
def test_leading_dims_and_1d(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    cols = cols_for(qtype, 2)
    raw = quants.random_raw(qtype, 6, cols, rng)
    raw3 = raw.reshape(2, 3, -1)
    got = quants.dequantize(raw3, qtype)
    assert got.shape == (2, 3, cols)
    np.testing.assert_array_equal(bits(got), bits(reference(raw3, qtype)))
    one = quants.dequantize(raw[4], qtype)  # 1-D (a norm weight)
    assert one.shape == (cols,)
    np.testing.assert_array_equal(bits(one), bits(reference(raw, qtype)[4]))


def test_typed_inputs_like_gguf_reader():
    """GGUFReader gives F32/F16 tensors as typed arrays; BF16 as bytes.  All forms agree."""
    rng = np.random.default_rng(5)
    f32 = rng.standard_normal((4, 96), dtype=np.float32)
    got = quants.dequantize(f32, QT.F32)
    np.testing.assert_array_equal(bits(got), bits(f32))
    assert not np.shares_memory(got, f32)  # a copy the caller owns, never a view of the file
    np.testing.assert_array_equal(bits(quants.dequantize(f32.view(np.uint8), QT.F32)), bits(f32))

    f16 = rng.standard_normal((4, 96)).astype(np.float16)
    np.testing.assert_array_equal(bits(quants.dequantize(f16, QT.F16)), bits(f16.astype(np.float32)))
    np.testing.assert_array_equal(bits(quants.dequantize(f16.view(np.uint8), QT.F16)), bits(f16.astype(np.float32)))

    bf = quants.random_raw(QT.BF16, 4, 96, rng)
    np.testing.assert_array_equal(bits(quants.dequantize(bf.view(np.uint16), QT.BF16)), bits(reference(bf, QT.BF16)))

    # non-contiguous input is accepted (copied), read-only input too
    q = quants.random_raw(QT.Q8_0, 6, 64, rng)
    np.testing.assert_array_equal(bits(quants.dequantize(q[::2], QT.Q8_0)), bits(reference(q, QT.Q8_0)[::2]))
    q.flags.writeable = False
    np.testing.assert_array_equal(bits(quants.dequantize(q, QT.Q8_0)), bits(reference(q, QT.Q8_0)))


def test_f16_every_bit_pattern():
    """The f16 -> f32 conversion used for all scales: exact for all 65536 halves incl. subnormals, inf, nan."""
    h = np.arange(1 << 16, dtype=np.uint16)
    got = quants.dequantize(h.view(np.uint8), QT.F16)
    np.testing.assert_array_equal(bits(got), bits(h.view(np.float16).astype(np.float32)))


def test_scales_with_special_values():
    """Q4_0 blocks whose f16 scale is +-0, subnormal, max, inf or nan: still equal to the reference bitwise."""
    specials = np.array([0x0000, 0x8000, 0x0001, 0x83FF, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x7C01], np.uint16)
    raw = quants.random_raw(QT.Q4_0, 1, 32 * len(specials), np.random.default_rng(9)).reshape(len(specials), 18)
    raw[:, 0:2] = specials.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(1, -1)
    with np.errstate(invalid="ignore"):  # inf * 0 in the reference
        ref = reference(raw, QT.Q4_0)
    np.testing.assert_array_equal(bits(quants.dequantize(raw, QT.Q4_0)), bits(ref))


def test_quantized_by_gguf_round_trip():
    """Blocks made by gguf.quants.quantize from smooth data (the realistic case) also match."""
    x = np.random.default_rng(3).standard_normal((8, 512)).astype(np.float32) * 0.05
    for qtype in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.BF16):
        raw = gq.quantize(x, qtype)
        got = quants.dequantize(raw, qtype)
        np.testing.assert_array_equal(bits(got), bits(reference(raw, qtype)))
        assert np.abs(got - x).max() < 0.05  # and it is the data, not garbage


def test_unsupported_type_is_user_error():
    raw = np.zeros((2, 66), np.uint8)
    with pytest.raises(UserError, match=r"model 'm.gguf': tensor 'w': tensor type IQ2_XXS is not supported \(supported: F32, F16, Q4_0"):
        quants.check_supported(QT.IQ2_XXS, "model 'm.gguf': tensor 'w'")
    with pytest.raises(UserError, match="tensor type TQ1_0 is not supported"):
        quants.dequantize(raw, QT.TQ1_0)
    with pytest.raises(UserError, match="tensor type #999 is not supported"):
        quants.check_supported(999, "x")
    assert quants.check_supported(int(QT.Q4_1), "x") is QT.Q4_1


def test_bad_arguments():
    raw = quants.random_raw(QT.Q8_0, 3, 64)
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        quants.dequantize(raw, QT.Q8_0, out=np.empty((3, 64), np.float64))
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        quants.dequantize(raw, QT.Q8_0, out=np.empty((3, 32), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        quants.dequantize(raw, QT.Q8_0, out=np.empty((64, 3), np.float32).T)
    with pytest.raises(ValueError, match="not a multiple of the block size 34"):
        quants.dequantize(raw[:, :40], QT.Q8_0)
    with pytest.raises(IndexError):
        quants.dequantize_rows(raw, QT.Q8_0, 2, 4)
    with pytest.raises(IndexError):
        quants.dequantize_take(raw, QT.Q8_0, [0, 3])
    with pytest.raises(ValueError, match="cannot read float32"):
        quants.dequantize(np.zeros((2, 8), np.float32), QT.F16)


def test_real_smollm2_tensors(smollm2):
    from gguf_finetune.gguf_io import open_gguf

    f = open_gguf(smollm2)
    names = ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight",
             "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight", "output_norm.weight"]
    seen = set()
    for name in names:
        t = f.tensor(name)
        seen.add(QT(int(t.tensor_type)))
        got = quants.dequantize_tensor(t)
        assert got.shape == f.tensor_shape(name)
        np.testing.assert_array_equal(bits(got), bits(reference(t.data, t.tensor_type)), err_msg=name)
    assert seen == {QT.Q8_0, QT.F32, QT.Q4_1}

    # the 49152 x 576 embedding in chunks into one reused scratch buffer, and gathered rows
    emb = f.tensor("token_embd.weight")
    full = quants.dequantize_tensor(emb)
    scratch = np.empty((4096, 576), np.float32)
    for r0 in range(0, 49152, 4096 * 4):
        got = quants.dequantize_rows(emb.data, emb.tensor_type, r0, r0 + 4096, out=scratch)
        np.testing.assert_array_equal(bits(got), bits(full[r0:r0 + 4096]))
    ids = np.array([1, 49151, 200, 200])
    np.testing.assert_array_equal(bits(quants.dequantize_take(emb.data, emb.tensor_type, ids)), bits(full[ids]))


def test_portable_half_conversion_every_bit_pattern():
    """The integer f16 -> f32 path (used where the CPU has no half conversion) is exact too."""
    from numba import njit

    soft = quants._h2f_soft

    @njit
    def convert(h, out):
        for j in range(h.shape[0]):
            out[j] = soft(h[j])

    h = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(h.shape, np.float32)
    convert(h, out)
    np.testing.assert_array_equal(bits(out), bits(h.view(np.float16).astype(np.float32)))
