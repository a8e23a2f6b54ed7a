"""Shuffled, resumable batches over any dataset of samples (llama.cpp finetune's epoch logic).

A dataset here is anything with ``begins``/``sizes`` (one entry per sample) and ``n_samples``:
plain-text samples (:mod:`.text`) and JSONL records (:mod:`.jsonl`).  :class:`ShuffledBatches`
keeps the resumable :class:`ShuffleState` and the epoch bookkeeping; a subclass says how one batch
is built from the samples in shuffled order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..errors import UserError
from ..stdcpp import MT19937, hash_string, mt19937_seed_to_state

Report = Callable[[str], None]


def _noop(_line: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# samples hash and shuffle
# --------------------------------------------------------------------------------------------------
_M64 = (1 << 64) - 1
MT19937_MAX_MINUS_1 = 0xFFFFFFFF - 1  # llama.cpp divides by (rng.max() - 1), so r can slightly exceed 1


def compute_samples_hash(fn_train_data: str | bytes, begins: np.ndarray, sizes: np.ndarray) -> int:
    """llama.cpp ``compute_samples_hash``: std::hash of the train-data argument string, folded with
    hash_combine over the sample count and every (begin, size).  hash_combine is ``h ^ (x << 1)``, so
    the fold is an XOR reduction."""
    h = hash_string(fn_train_data)
    n = int(len(begins))
    h ^= (n << 1) & _M64
    b = np.asarray(begins, dtype=np.uint64) << np.uint64(1)
    s = np.asarray(sizes, dtype=np.uint64) << np.uint64(1)
    if n:
        h ^= int(np.bitwise_xor.reduce(b)) ^ int(np.bitwise_xor.reduce(s))
    return h & _M64


@dataclass(frozen=True)
class Shuffled:
    """One epoch's sample order: offs/begins/sizes int64 [n_samples], and the rng state after drawing it."""

    offs: np.ndarray
    begins: np.ndarray
    sizes: np.ndarray
    rng_state_next: str


def shuffle_samples(rng_state: str, begins: np.ndarray, sizes: np.ndarray) -> Shuffled:
    """llama.cpp ``shuffle_samples``: n draws sort the indices (ties by index), n more draws give each
    shuffled sample a random start offset in [0, size-1]."""
    begins = np.asarray(begins, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(begins.shape[0])
    if n == 0:
        return Shuffled(np.zeros(0, np.int64), begins.copy(), sizes.copy(), rng_state)
    rng = MT19937.from_state_string(rng_state, "training.shuffle.rng_state")
    rnd = rng.generate(n)
    idx = np.argsort(rnd, kind="stable")  # == sort by (rnd, index)
    r2 = rng.generate(n).astype(np.float64) / float(MT19937_MAX_MINUS_1)
    sz = sizes[idx]
    # (size_t)((size - 1) * r); size 0 wraps in C++ to a huge number: any offset >= size behaves the same
    offs = np.where(sz > 0, np.floor((sz - 1).astype(np.float64) * r2), 0).astype(np.int64)
    return Shuffled(offs, begins[idx], sz, rng.state_string())


@dataclass(frozen=True)
class Batch:
    """tokens/targets int32 [B, T]; weights float32 [B, T] (1 = position counts in the loss; llama.cpp
    counts every position, padding included).  Packed rows (:func:`pack_records`) also give each
    position's RoPE position ``pos`` and the start of its record ``seg_start`` (int64 [B, T]): a
    record sees only itself.  T may be less than the context when no row needs more."""

    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    used_samples: int
    epoch_completed: bool
    pos: np.ndarray | None = None
    seg_start: np.ndarray | None = None


@dataclass(frozen=True)
class Packed:
    """One batch of packed rows (see :func:`pack_records`); ``rows[k]`` lists row k's records as
    (index into the shuffled order, offset in the row, positions taken)."""

    tokens: np.ndarray  # int32 [B, T]
    targets: np.ndarray  # int32 [B, T]
    weights: np.ndarray  # float32 [B, T]
    pos: np.ndarray  # int64 [B, T]
    seg_start: np.ndarray  # int64 [B, T]
    used: int
    rows: tuple[tuple[tuple[int, int, int], ...], ...]


def pack_records(first: int, begins, sizes, tokens, trained, n_batch: int, n_ctx: int, pad: int) -> Packed:
    """Rows of ``n_ctx`` positions filled with whole records, starting at shuffled record ``first``.

    Records are taken in order (indices wrap around, each at most once per batch) and placed first-fit:
    a record of s tokens takes p = min(s, n_ctx + 1) - 1 positions (inputs tokens[:p], targets
    tokens[1:p+1]: a record longer than the context is cut as in one-record rows) in the first row
    with p free positions.  The first record that fits no row ends the batch; it starts the next one,
    so a batch consumes a prefix of the shuffled order and resuming is exact.  Positions restart at
    0 in each record; ``seg_start`` is where its record begins (padding: the position itself).
    Weights are the records' trained masks on the targets (a record's first token is never a
    target); padding has weight 0.  T is cut to the longest row.
    """
    n = len(begins)
    B, T = n_batch, n_ctx
    X = np.full((B, T), pad, dtype=np.int32)
    Y = np.full((B, T), pad, dtype=np.int32)
    W = np.zeros((B, T), dtype=np.float32)
    pos = np.zeros((B, T), dtype=np.int64)
    seg = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
    filled = [0] * B
    rows: list[list[tuple[int, int, int]]] = [[] for _ in range(B)]
    used = 0
    while used < n:
        idx = (first + used) % n
        b, s = int(begins[idx]), int(sizes[idx])
        p = max(0, min(s, T + 1) - 1)
        k = next((k for k in range(B) if T - filled[k] >= p), -1)
        if k < 0:
            break
        used += 1
        if p == 0:  # nothing to predict in it
            continue
        o = filled[k]
        X[k, o:o + p] = tokens[b:b + p]
        Y[k, o:o + p] = tokens[b + 1:b + p + 1]
        W[k, o:o + p] = trained[b + 1:b + p + 1]
        pos[k, o:o + p] = np.arange(p)
        seg[k, o:o + p] = o
        rows[k].append((idx, o, p))
        filled[k] = o + p
    used = max(used, 1)  # a record longer than the context always fits an empty row: never 0 in practice
    t = max(1, max(filled))
    return Packed(X[:, :t].copy(), Y[:, :t].copy(), W[:, :t].copy(), pos[:, :t].copy(), seg[:, :t].copy(), used,
                  tuple(tuple(r) for r in rows))


@dataclass(frozen=True)
class ShuffleState:
    """Everything the checkpoint must keep to resume the data stream (llama.cpp keys in brackets).

    samples_hash  [training.shuffle.samples_hash]  hash of the sample layout (see compute_samples_hash)
    rng_state     [training.shuffle.rng_state]     mt19937 text state the current epoch's shuffle is drawn from
    sample_count  [training.shuffle.sample_count]
    next_sample   [training.shuffle.next_sample]   index into the shuffled order of the next batch's first sample
    epochs        [training.epoch_count]           completed epochs
    samples_seen  [training.sample_count]          samples consumed by batches so far (see doc for the save-time caveat)
    """

    samples_hash: int = 0
    rng_state: str = ""
    sample_count: int = 0
    next_sample: int = 0
    epochs: int = 0
    samples_seen: int = 0


def resume_shuffle(
    saved: ShuffleState | None,
    dataset,
    fn_train_data: str,
    seed: int,
    force_reshuffle: bool = False,
    report: Report | None = None,
) -> ShuffleState:
    """finetune's start-up decision: keep the checkpoint's shuffle, or restart the epoch from ``seed``.

    Restarts (rng_state = mt19937(seed), next_sample = 0) when there is no saved shuffle, the samples
    hash or count changed (reported as "train data seems to have changed"; always the case for a
    fresh run), or ``force_reshuffle``.  ``epochs`` and ``samples_seen`` carry over either way.
    """
    rep = report or _noop
    st = saved or ShuffleState()
    h = compute_samples_hash(fn_train_data, dataset.begins, dataset.sizes)
    changed = h != st.samples_hash or st.sample_count != dataset.n_samples
    if changed:
        rep("main: train data seems to have changed. restarting shuffled epoch.")
    if force_reshuffle:
        rep("main: forced reshuffling of data. restarting with newly shuffled epoch.")
    if st.rng_state == "" or changed or force_reshuffle:
        st = replace(
            st, rng_state=mt19937_seed_to_state(seed), sample_count=dataset.n_samples, next_sample=0,
            samples_hash=h,
        )
    return st


class ShuffledBatches:
    """Draws batches in shuffled order and keeps the resumable :class:`ShuffleState`.

    ``next_batch()`` mirrors the batch part of llama.cpp's ``train_opt_callback``: build the batch
    starting at ``next_sample`` of the current shuffle (:meth:`make_batch`), advance, and when the
    epoch is used up report ``train_opt_callback: reshuffle samples. completed epochs: N`` and
    reshuffle from the next state.
    """

    def __init__(self, dataset, state: ShuffleState, report: Report | None = None):
        if dataset.n_samples == 0:
            raise UserError("train data: no samples")
        if state.rng_state == "":
            raise ValueError("ShuffleState has no rng_state: call resume_shuffle first")
        self.dataset = dataset
        self._report = report or _noop
        self._state = state
        self._shuffled = shuffle_samples(state.rng_state, dataset.begins, dataset.sizes)

    @property
    def state(self) -> ShuffleState:
        return self._state

    @property
    def shuffled(self) -> Shuffled:
        return self._shuffled

    def sample_position(self) -> tuple[int, int]:
        """The ``sample=A/B`` pair llama.cpp prints before drawing the next batch."""
        st = self._state
        return min(1 + st.next_sample, st.sample_count), st.sample_count

    def make_batch(self, first: int, sh: Shuffled) -> tuple:
        """(tokens, targets, weights, samples used[, pos, seg_start]) of the batch starting at shuffled
        sample ``first``."""
        raise NotImplementedError

    def next_batch(self) -> Batch:
        st = self._state
        sh = self._shuffled
        tokens, targets, weights, used, *packed = self.make_batch(st.next_sample, sh)
        nxt = st.next_sample + used
        st = replace(st, samples_seen=st.samples_seen + used, next_sample=nxt)
        completed = nxt >= st.sample_count
        if completed:
            st = replace(st, epochs=st.epochs + 1)
            self._report(f"train_opt_callback: reshuffle samples. completed epochs: {st.epochs}")
            # "we may have used some samples from the current shuffling more than once"
            new_current = sh.rng_state_next
            self._shuffled = shuffle_samples(new_current, self.dataset.begins, self.dataset.sizes)
            st = replace(st, rng_state=new_current, next_sample=0)
        self._state = st
        return Batch(tokens, targets, weights, used, completed, *packed)


class PackedBatches(ShuffledBatches):
    """Packed rows (:func:`pack_records`) over a dataset of records: ``tokens``/``trained`` arrays with
    ``begins``/``sizes`` per record (JSONL records, or plain-text samples with their BOS)."""

    def __init__(self, dataset, state: ShuffleState, n_batch: int, n_ctx: int, pad_id: int,
                 report: Report | None = None):
        super().__init__(dataset, state, report)
        self.n_batch, self.n_ctx, self.pad_id = int(n_batch), int(n_ctx), int(pad_id)

    def make_batch(self, first: int, sh: Shuffled):
        ds = self.dataset
        p = pack_records(first, sh.begins, sh.sizes, ds.tokens, ds.trained, self.n_batch, self.n_ctx, self.pad_id)
        return p.tokens, p.targets, p.weights, p.used, p.pos, p.seg_start


@dataclass(frozen=True)
class Efficiency:
    """What a pass over the data computes: positions in the batches, real tokens (not padding) and
    trained tokens (weight > 0) among them."""

    positions: int
    real: int
    trained: int

    def text(self) -> str:
        if not self.positions:
            return "no positions"
        return (f"real tokens / computed positions {100 * self.real / self.positions:.1f}%, "
                f"trained tokens / computed positions {100 * self.trained / self.positions:.1f}%")


def _loss_extent(trained, b: int, p: int) -> int:
    """Positions of a record (first token at ``b``, ``p`` positions) up to its last trained target:
    those that run with flash attention (engine.forward.compact_rows)."""
    w = np.flatnonzero(np.asarray(trained[b + 1:b + p + 1]) > 0)
    return int(w[-1]) + 1 if w.size else 0


def packing_efficiency(dataset, n_batch: int, n_ctx: int, packed: bool, compact: bool = True) -> Efficiency:
    """One epoch of batches in the dataset's own order (what a shuffled one gives, to a few percent):
    packed rows, or one record per row cut to the longest row of its batch.  With ``compact`` (flash
    attention: engine.forward.compact_rows) only each record's positions up to its last trained
    target run; otherwise every row is as long as the batch's longest."""
    n = dataset.n_samples
    positions = real = trained = 0
    first = 0
    while first < n:
        if packed:
            p = pack_records(0, dataset.begins[first:], dataset.sizes[first:], dataset.tokens, dataset.trained, n_batch,
                             n_ctx, 0)  # (the epoch's remaining records: no wrap-around)
            used, width = p.used, p.tokens.shape[1]
            records = [(int(dataset.begins[first + i]), q) for r in p.rows for i, _, q in r]
            trained += int((p.weights > 0).sum())
        else:
            used = min(n_batch, n - first)
            records = [(int(dataset.begins[i]), max(0, min(int(dataset.sizes[i]), n_ctx + 1) - 1))
                       for i in range(first, first + used)]
            width = max(1, max(q for _, q in records))
            trained += sum(int((np.asarray(dataset.trained[b + 1:b + q + 1]) > 0).sum()) for b, q in records)
        if compact:  # (every position that runs is a record's)
            ran = sum(_loss_extent(dataset.trained, b, q) for b, q in records)
            positions += ran
            real += ran
        else:
            positions += n_batch * width
            real += sum(q for _, q in records)
        first += used
    return Efficiency(positions, real, trained)
