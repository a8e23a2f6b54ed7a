"""gguf_finetune.data.batches: llama.cpp's samples hash and shuffle (the iterator is exercised through
the text and JSONL pipelines in test_data_text.py and test_data_jsonl.py)."""

from __future__ import annotations

import types

import numpy as np

from gguf_finetune.data.batches import compute_samples_hash, pack_records, packing_efficiency, shuffle_samples
from gguf_finetune.stdcpp import hash_combine, hash_string, mt19937_seed_to_state


def test_samples_hash_is_the_sequential_fold():
    b = np.array([0, 5, 17, 2**40], dtype=np.int64)
    s = np.array([5, 12, 3, 9], dtype=np.int64)
    h = hash_string("data/train.txt")
    h = hash_combine(h, 4)
    for x, y in zip(b, s):
        h = hash_combine(hash_combine(h, int(x)), int(y))
    assert compute_samples_hash("data/train.txt", b, s) == h


def test_shuffle_is_a_seeded_permutation_with_offsets_in_range():
    sizes = np.array([5, 1, 0, 9, 3, 7] * 50, dtype=np.int64)
    begins = np.cumsum(np.concatenate([[0], sizes[:-1]]))
    a = shuffle_samples(mt19937_seed_to_state(3), begins, sizes)
    b = shuffle_samples(mt19937_seed_to_state(3), begins, sizes)
    c = shuffle_samples(mt19937_seed_to_state(4), begins, sizes)
    assert np.array_equal(a.begins, b.begins) and a.rng_state_next == b.rng_state_next
    assert not np.array_equal(a.begins, c.begins)
    assert sorted(a.begins.tolist()) == sorted(begins.tolist())
    assert np.all((a.offs >= 0) & ((a.offs < a.sizes) | (a.sizes == 0)))
    assert a.offs.max() > 0


# -- packed rows ----------------------------------------------------------------------------------

def _records(sizes, seed=0):
    """Records of these sizes with random trained masks, each ending on a trained token (so that all
    its s - 1 positions run: engine.forward.compact_rows)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    begins = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 100, int(sizes.sum())).astype(np.int32)
    trained = (rng.random(tokens.size) < 0.6).astype(np.uint8)
    trained[begins + sizes - 1] = 1
    return begins, sizes, tokens, trained


def test_pack_records_first_fit_prefix_and_segments():
    begins, sizes, tokens, trained = _records([5, 9, 4, 3, 8, 2])  # positions taken: 4 8 3 2 7 1
    p = pack_records(0, begins, sizes, tokens, trained, n_batch=2, n_ctx=10, pad=0)
    # row 0: records 0 (4) + 2 (3) + 3 (2) = 9; row 1: record 1 (8) + 5? no: record 4 (7) fits nowhere -> stop
    assert [[r[0] for r in row] for row in p.rows] == [[0, 2, 3], [1]]
    assert p.used == 4 and p.tokens.shape == (2, 9)  # cut to the longest row
    for k, row in enumerate(p.rows):
        for idx, off, q in row:
            b = begins[idx]
            assert np.array_equal(p.tokens[k, off:off + q], tokens[b:b + q])
            assert np.array_equal(p.targets[k, off:off + q], tokens[b + 1:b + q + 1])
            assert np.array_equal(p.weights[k, off:off + q], trained[b + 1:b + q + 1])
            assert np.array_equal(p.pos[k, off:off + q], np.arange(q)) and (p.seg_start[k, off:off + q] == off).all()
    assert (p.weights[1, 8:] == 0).all() and p.seg_start[1, 8] == 8  # padding: weight 0, sees only itself
    nxt = pack_records(p.used, begins, sizes, tokens, trained, n_batch=2, n_ctx=10, pad=0)
    assert nxt.rows[0][0][0] == 4  # the record that did not fit starts the next batch


def test_pack_records_cuts_long_records_and_wraps():
    begins, sizes, tokens, trained = _records([30, 3])
    p = pack_records(1, begins, sizes, tokens, trained, n_batch=2, n_ctx=8, pad=0)
    assert [[r[0] for r in row] for row in p.rows] == [[1], [0]] and p.used == 2  # each record once per batch
    assert p.rows[1][0][2] == 8  # cut to the context, as a one-record row is


def test_packing_efficiency_counts_real_and_trained_positions():
    begins, sizes, tokens, trained = _records([5, 9, 4, 3, 8, 2])
    ds = types.SimpleNamespace(begins=begins, sizes=sizes, tokens=tokens, trained=trained, n_samples=6)
    packed = packing_efficiency(ds, 2, 10, True, compact=False)
    alone = packing_efficiency(ds, 2, 10, False, compact=False)
    assert packed.real == alone.real == 4 + 8 + 3 + 2 + 7 + 1
    assert packed.trained == alone.trained
    assert packed.positions < alone.positions
    assert "real tokens / computed positions" in packed.text()
    # with flash attention each record runs up to its last trained target: only real positions
    for p in (packing_efficiency(ds, 2, 10, True), packing_efficiency(ds, 2, 10, False)):
        assert p.positions == p.real == 25 and p.trained == packed.trained
    trained[begins[1] + 5:begins[1] + 9] = 0  # record 1 ends on 4 positions without a loss
    assert packing_efficiency(ds, 2, 10, False).positions == 21 == packing_efficiency(ds, 2, 10, True).positions
