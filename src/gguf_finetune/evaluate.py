"""Validation loss: the mean next-token loss over the weighted positions of fixed batches.

    ev = Evaluator(weights, hp, batches)        # batches: [(tokens, targets, weights) [B, T] each]
    val_loss = ev(lora)                         # Σ w·nll / Σ w over all batches, forward only

Forward passes only (engine.backward.eval_loss); no randomness, no state: calling it between
training steps changes nothing in the training run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .dist import World
from .engine.backward import eval_loss
from .errors import UserError


class Evaluator:
    """A callable ``lora -> validation loss`` over fixed batches (see module doc)."""

    def __init__(self, weights, hp, batches: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 flash: bool = True, world: World | None = None):
        self.weights, self.hp, self.flash, self.world = weights, hp, flash, world or World()
        self.batches = [(np.ascontiguousarray(x, dtype=np.int32), np.ascontiguousarray(y, dtype=np.int32),
                         np.ascontiguousarray(w, dtype=np.float32)) for x, y, w in batches]
        self.total_weight = float(sum(float(w.sum(dtype=np.float64)) for _, _, w in self.batches))
        if self.total_weight <= 0:
            raise UserError("validation data: no trained token to take the loss on (every record's trained part "
                            "is empty or beyond the context)")

    @property
    def n_rows(self) -> int:
        return sum(x.shape[0] for x, _, _ in self.batches)

    def __call__(self, lora) -> float:
        total = 0.0
        rows = self.world.rows  # this rank's rows of each batch; the sums meet in one Allreduce
        for x, y, w in self.batches:
            w = rows(w)
            if not w.any():
                continue
            total += eval_loss(self.weights, self.hp, lora, rows(x), rows(y), w, 1.0, self.flash)
        return self.world.sum(total)[0] / self.total_weight


__all__ = ["Evaluator"]
