"""Quantized matrix products (engine/qmatvec.py) against x · dequantize(W)ᵀ in float64."""

import numpy as np
import pytest

from gguf_finetune import quants
from gguf_finetune.engine import qmatvec

TYPES = sorted(qmatvec.SUPPORTED, key=int)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
@pytest.mark.parametrize("T", [1, 3])
def test_matches_dequantized_product(qtype, T):
    rng = np.random.default_rng(int(qtype) * 10 + T)
    rows, cols = 37, 512
    raw = quants.random_raw(qtype, rows, cols, rng)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    W = qmatvec.QuantMatrix(raw, qtype, (rows, cols))
    got = W.matmul(x)
    ref = qmatvec.matmul_reference(raw, qtype, x)
    assert got.shape == (T, rows) and got.dtype == np.float32
    # float32 sums of 512 products in another order: error ~ sqrt(K)·eps·Σ|w x|
    bound = 1e-5 * (np.abs(np.asarray(quants.dequantize(raw, qtype), np.float64)) @ np.abs(x.astype(np.float64)).T).T
    assert np.all(np.abs(got - ref) <= bound + 1e-30), np.max(np.abs(got - ref) / bound)


def test_rejects_bad_shapes():
    rng = np.random.default_rng(0)
    raw = quants.random_raw(quants.QT.Q4_1, 4, 64, rng)
    with pytest.raises(ValueError):
        qmatvec.QuantMatrix(raw, quants.QT.Q4_1, (4, 96))
    W = qmatvec.QuantMatrix(raw, quants.QT.Q4_1, (4, 64))
    with pytest.raises(ValueError):
        W.matmul(np.zeros((1, 32), np.float32))
    assert not qmatvec.supported(quants.QT.IQ4_XS)


def test_real_model_head_and_layer(smollm2):
    """On SmolLM2's own tensors (Q8_0 embedding, Q4_1 FFN): the same numbers as the float32 path."""
    from gguf import GGUFReader

    r = GGUFReader(smollm2)
    t = {x.name: x for x in r.tensors}
    rng = np.random.default_rng(1)
    for name in ("token_embd.weight", "blk.3.ffn_down.weight", "blk.3.attn_k.weight"):
        W = qmatvec.QuantMatrix.from_tensor(t[name])
        x = rng.standard_normal((1, W.shape[1])).astype(np.float32)
        ref = x.astype(np.float64) @ quants.dequantize_tensor(t[name]).astype(np.float64).T
        got = W.matmul(x)
        assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref)) + 1e-6, name
