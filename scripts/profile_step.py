#!/usr/bin/env python3
"""Where a training step's time goes: a timer around every product and kernel, for a few steps.

    python scripts/profile_step.py                       # no checkpointing, flash, SmolLM2 Q4_1 ctx 256
    python scripts/profile_step.py --checkpointing --steps 3
    python scripts/profile_step.py --data examples/chat/train.jsonl --batch 4    # packed chat rows

This wraps the engine's kernels (``engine.kernels``) and its linear forward/backward in
``time.perf_counter`` calls, in this process only, and runs the same step as scripts/bench.py
(rank 4 on every target but a tied embedding; random tokens, or the file's first packed batch).
It prints per part: ms per step, calls per step, µs per call, and for the products the GFLOP/s
they reached. The timers cost a few ms per step. (AdamW,
which bench.py's step includes, is not run here: 3 ms per step.)
The products split into the layers' forward and backward and the head's two products, so they can
be compared with docs/PERFORMANCE.md's figures.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

import gguf_finetune  # noqa: E402,F401  (before numpy: thread wait policy)


class Timers:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}
        self.flops: dict[str, float] = {}

    def add(self, key: str, dt: float, flops: float = 0.0) -> None:
        self.t[key] = self.t.get(key, 0.0) + dt
        self.n[key] = self.n.get(key, 0) + 1
        self.flops[key] = self.flops.get(key, 0.0) + flops

    def clear(self) -> None:
        self.t.clear()
        self.n.clear()
        self.flops.clear()


def instrument(timers: Timers):
    """Replace the engine's kernels and linears by timed wrappers (this process only).

    The linears are written out again here, so that the product, the adapter's kernel and its
    da/db products can be timed apart; main() checks that the instrumented step still gives the
    engine's loss and gradients bit for bit, so a change to the engine cannot go unnoticed."""
    from gguf_finetune.engine import backward as BW
    from gguf_finetune.engine import forward as FW
    from gguf_finetune.engine import kernels as K

    def timed(name, f):
        def w(*a, **kw):
            t0 = time.perf_counter()
            r = f(*a, **kw)
            timers.add("kernel " + name, time.perf_counter() - t0)
            return r
        return w

    wrapped = types.SimpleNamespace(**{n: timed(n, getattr(K, n)) if callable(getattr(K, n)) and not n.startswith("_")
                                       else getattr(K, n) for n in dir(K) if not n.startswith("__")})
    FW.K = wrapped
    BW.K = wrapped

    def linear_forward(x, W, lora, bias=None):
        t0 = time.perf_counter()
        y = x @ W.T
        if bias is not None:
            y += bias
        t1 = time.perf_counter()
        timers.add("layer products, forward", t1 - t0, 2.0 * x.shape[0] * W.shape[0] * W.shape[1])
        if lora is None:
            return y, None
        a, b, s = lora
        u = K.lora_forward(x, a, b, s, y)
        timers.add("LoRA terms, forward", time.perf_counter() - t1)
        return y, u

    def linear_backward(dy, x, W, lora, u, grads, name, need_dx=True):
        t0 = time.perf_counter()
        dx = dy @ W if need_dx else None
        t1 = time.perf_counter()
        if need_dx:
            timers.add("layer products, backward", t1 - t0, 2.0 * dy.shape[0] * W.shape[0] * W.shape[1])
        if lora is None:
            return dx
        a, b, s = lora
        K.lora_backward(dy, x, u, a, b, s, dx, grads.a[name], grads.b[name])
        timers.add("LoRA terms, backward (dx, da, db)", time.perf_counter() - t1)
        return dx

    head = BW.head_loss_backward

    def head_loss_backward(weights, hn, *a, **kw):
        kernels_before = sum(v for k, v in timers.t.items() if k.startswith("kernel "))
        t0 = time.perf_counter()
        r = head(weights, hn, *a, **kw)
        dt = time.perf_counter() - t0
        inner = sum(v for k, v in timers.t.items() if k.startswith("kernel ")) - kernels_before
        hp = weights.hp
        timers.add("head: products and adapter (kernels apart)", dt - inner, 4.0 * hn.shape[0] * hp.n_vocab * hp.n_embd)
        return r

    FW.linear_forward = linear_forward
    BW.linear_backward = linear_backward
    BW.head_loss_backward = head_loss_backward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="profile the checkpointed step (default: without)")
    ap.add_argument("--no-flash", action="store_true")
    ap.add_argument("--data", default=None, help="a JSONL file of chat records: packed rows as finetune makes them")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chat-template", default=None)
    ap.add_argument("--no-pack", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from gguf_finetune.api import load_model
    from gguf_finetune.cli.common import keep_freed_memory, set_threads
    from gguf_finetune.demo import default_model_path
    from gguf_finetune.engine import backward as BW
    from gguf_finetune.lora import LoraRanks, init_lora

    set_threads(args.threads)
    keep_freed_memory()
    ck = args.checkpointing
    model = load_model(args.model or str(default_model_path()), cache_head=not ck, with_tokenizer=bool(args.data))
    hp = model.hparams
    ranks = LoraRanks.uniform(4, **({"tok_embd": 0, "out": 0} if hp.tied_embeddings else {}))  # as bench.py
    lora = init_lora(hp, ranks, alpha=4, seed=1)
    rng = np.random.default_rng(0)
    # every factor non-zero (a fresh adapter has b = 0, so da = 0 whatever the code does): the check
    # below then covers every term; the timings do not depend on the values
    lora.flat[:] = rng.standard_normal(lora.flat.size).astype(lora.flat.dtype) * 0.02
    grads = lora.like()
    pos = seg = None
    if args.data:  # the first packed batch of the file, as bench.py --data makes it
        from bench import batches_from_data

        b = batches_from_data(args, model, args.batch, args.ctx).next_batch()
        tokens, targets, mask, pos, seg = b.tokens, b.targets, b.weights, b.pos, b.seg_start
    else:
        tokens = rng.integers(0, hp.n_vocab, size=(args.batch, args.ctx))
        targets = np.roll(tokens, -1, axis=1)
        mask = np.ones((args.batch, args.ctx), dtype=np.float32)
    inv = 1.0 / max(float(mask.sum()), 1.0)

    def step() -> float:
        grads.flat[:] = 0
        return BW.loss_and_grad(model.weights, hp, lora, grads, tokens, targets, mask, inv,
                                checkpointing=ck, flash=not args.no_flash, pos=pos, seg_start=seg)

    loss = step()  # the engine as it is (also: compilation or cache load)
    expected = grads.flat.copy()
    timers = Timers()
    instrument(timers)
    if step() != loss or not np.array_equal(grads.flat, expected):
        sys.exit("profile_step.py: the instrumented step no longer computes what the engine does; "
                 "update instrument() to match engine/forward.py and engine/backward.py")
    timers.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step = (time.perf_counter() - t0) / args.steps
    n = args.steps
    print(f"{'checkpointing' if ck else 'no checkpointing'}, ctx {tokens.shape[1]}, batch {tokens.shape[0]}: "
          f"{per_step * 1e3:.1f} ms per step "
          f"({tokens.size / per_step:.1f} positions/s, {np.count_nonzero(mask) / per_step:.1f} trained tokens/s, "
          f"timers included), mean of {n}")
    accounted = 0.0
    for key, t in sorted(timers.t.items(), key=lambda kv: -kv[1]):
        accounted += t
        rate = f"  {timers.flops[key] / t / 1e9:6.1f} GFLOP/s" if timers.flops[key] else ""
        print(f"  {key:45s} {t / n * 1e3:8.1f} ms  {timers.n[key] // n:5d} calls  "
              f"{t / timers.n[key] * 1e6:9.1f} µs/call{rate}")
    print(f"  {'the rest (Python, numpy adds)':45s} {(per_step - accounted / n) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
