"""Packing does not cost quality: on the README's chat example (its data, learning rate, rank, seed and
held-out split) at --ctx 256, where a row holds about five of its records, the packed run's validation
loss after as many trained tokens as the one-record-per-row run trained is within 2% of that run's.

The runs take as many records per step (packed: one row of --ctx 256; one record per row: --batch 5), so
they differ only in how the records are laid out; attention leaking across records in a packed row, or
positions not restarting at 0, would show here as a different loss.

Slow (two real runs of SmolLM2 with validation passes): `pytest -m slow`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

ITERS, EVERY = 12, 4
# the README's chat example (its flags) at ctx 256
README_CHAT = ["--ctx", "256", "--adam-iter", str(ITERS), "--adam-alpha", "0.003", "--warmup", "2", "--lora-r", "8",
               "--threads", "2", "--save-every", "0", "--val-split", "0.1", "--eval-every", str(EVERY), "--seed", "1"]


def run_chat(smollm2, folder, *extra) -> tuple[np.ndarray, np.ndarray]:
    """-> (trained tokens so far, validation loss) at the run's validation points."""
    from gguf_finetune.cli.finetune import run

    folder.mkdir()
    argv = ["--model-base", str(smollm2), "--train-data", str(REPO / "examples/chat/train.jsonl"), *README_CHAT,
            "--checkpoint-out", str(folder / "chk-ITERATION.gguf"), "--lora-out", str(folder / "lora-ITERATION.gguf"),
            "--metrics-out", str(folder / "metrics.jsonl"), *extra]
    assert run(argv) == 0
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = {0: 0} | {r["iter"]: r["trained_tokens"] for r in recs if "trained_tokens" in r}
    val = {r["iter"]: r["val_loss"] for r in recs if "val_loss" in r}
    its = sorted(val)
    assert its == list(range(0, ITERS + 1, EVERY))
    return np.array([trained[i] for i in its], dtype=np.float64), np.array([val[i] for i in its])


def test_packed_validation_loss_matches_unpacked_at_equal_trained_tokens(smollm2, tmp_path, capsys):
    tok_u, val_u = run_chat(smollm2, tmp_path / "unpacked", "--batch", "5", "--no-pack")
    tok_p, val_p = run_chat(smollm2, tmp_path / "packed", "--batch", "1")
    assert val_p[0] == pytest.approx(val_u[0], rel=1e-5)  # one model, one held-out set, packed or not
    at = min(tok_u[-1], tok_p[-1])  # the trained tokens both runs reached; each run's loss there
    unpacked_at, packed_at = float(np.interp(at, tok_u, val_u)), float(np.interp(at, tok_p, val_p))
    rel = abs(packed_at - unpacked_at) / unpacked_at
    with capsys.disabled():
        print(f"\nchat example, ctx 256: validation loss {val_u[0]:.4f} before; after {int(at)} trained tokens "
              f"one record per row (batch 5) {unpacked_at:.4f}, packed (batch 1) {packed_at:.4f}; "
              f"relative difference {rel:.2%}")
    assert unpacked_at < 0.5 * val_u[0]  # the runs learn
    assert rel <= 0.02
