"""gguf_finetune.data.batches: llama.cpp's samples hash and shuffle (the iterator is exercised through
the text and JSONL pipelines in test_data_text.py and test_data_jsonl.py)."""

from __future__ import annotations

import numpy as np

from gguf_finetune.data.batches import compute_samples_hash, shuffle_samples
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
