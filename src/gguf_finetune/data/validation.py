"""Validation data: a deterministic train/validation split, and the fixed batches the loss is taken on.

The split and the batches never touch the training shuffle's random state: the validation loss can
be computed at any callback point without changing the batch stream (exact resume stays exact).

Both dataset kinds work: :class:`~.text.TextDataset` (llama.cpp samples) and
:class:`~.jsonl.RecordDataset` (records); a subset shares the token array of the whole.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import UserError
from .text import BatchConfig, TextDataset, example_targets_batch

EvalBatch = tuple  # (tokens int32 [B, T], targets int32 [B, T], weights float32 [B, T])


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sample indices, each ascending: round(fraction·n) samples (at least 1) drawn
    by ``numpy.random.default_rng(seed)``; the same n, fraction and seed give the same split."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--val-split {fraction}: expected a fraction between 0 and 1")
    n_val = max(1, int(round(fraction * n)))
    if n_val >= n:
        raise UserError(f"--val-split {fraction}: {n} samples are too few to keep {n_val} for validation and "
                        f"still train on some")
    perm = np.random.default_rng(int(seed)).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def subset_text(ds: TextDataset, idx: np.ndarray) -> TextDataset:
    """The samples ``idx`` of a text dataset (sharing its tokens)."""
    idx = np.asarray(idx, dtype=np.int64)
    return replace(ds, begins=ds.begins[idx], sizes=ds.sizes[idx])


def text_windows(ds: TextDataset, n_ctx: int) -> TextDataset:
    """Non-overlapping windows of n_ctx tokens over all of ``ds.tokens`` (for validation on a text
    read without --sample-start, where llama.cpp makes a sample at every token)."""
    n = ds.n_tokens
    begins = np.arange(0, max(n, 1), n_ctx, dtype=np.int64)
    sizes = np.minimum(n_ctx, n - begins).astype(np.int64)
    keep = sizes > 0
    return replace(ds, begins=begins[keep], sizes=sizes[keep])


def text_eval_batches(ds: TextDataset, n_batch: int, n_ctx: int, bos: int, eos: int, n_vocab: int
                      ) -> list[EvalBatch]:
    """Every sample once, in order, one per row, as the training batches build rows (BOS first, EOS
    padding, every position weighted as in training so the losses compare)."""
    out = []
    offs = np.zeros(ds.n_samples, dtype=np.int64)
    for i in range(0, ds.n_samples, n_batch):
        nb = min(n_batch, ds.n_samples - i)
        x, y, _ = example_targets_batch(i, offs, ds.begins, ds.sizes, ds.tokens, BatchConfig(nb, n_ctx), bos, eos,
                                        n_vocab)
        out.append((x, y, np.ones(x.shape, dtype=np.float32)))
    return out


__all__ = ["EvalBatch", "split_indices", "subset_text", "text_eval_batches", "text_windows"]
