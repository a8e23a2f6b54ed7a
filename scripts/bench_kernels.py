#!/usr/bin/env python
"""Micro-benchmark of gguf_finetune.engine.kernels at the SmolLM2-135M shape.

N = B·T tokens (default 1 x 256), C = 576, F = 1536, Hq = 9, Hkv = 3, D = 64, V = 49152.
Prints the best of ``--repeat`` runs (ms per call) after a warm-up that also compiles or loads
the numba cache.

    python scripts/bench_kernels.py [--batch 1] [--ctx 256] [--dtype float32] [--repeat 5] [--threads N]
                                    [--clock wall|cpu]

Set NUMBA_THREADING_LAYER=workqueue|omp in the environment to compare numba's threading layers.
"""

from __future__ import annotations

import argparse
import time

import numba  # noqa: E402
import numpy as np  # noqa: E402

import gguf_finetune  # noqa: F401  (first: sets the thread-waiting policy before numpy/numba start)
from gguf_finetune.engine import kernels as K  # noqa: E402


def best_ms(fn, repeat: int, clock=time.perf_counter) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or CPU time of the process summed over its threads (less "
                         "sensitive to other load on the machine)")
    args = ap.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    dt = np.dtype(args.dtype)
    B, T = args.batch, args.ctx
    N, C, F, Hq, Hkv, D, V = B * T, 576, 1536, 9, 3, 64, 49152
    rng = np.random.default_rng(0)

    def r(*shape, s=1.0):
        return (rng.standard_normal(shape) * s).astype(dt)

    x, w, dx = r(N, C), r(C), r(N, C)
    g, u, dh = r(N, F), r(N, F), r(N, F)
    qt, kt, vt = r(B, T, Hq, D), r(B, T, Hkv, D), r(B, T, Hkv, D)
    cos, sin = K.rope_cache(np.arange(T), D, 10000.0, 1.0, dt)
    q, k, v = K.rope_forward(qt, cos, sin, D), K.rope_forward(kt, cos, sin, D), K.to_heads(vt)
    dout = r(B, Hq, T, D)
    scale = 1.0 / np.sqrt(D)
    logits = r(N, V, s=3.0)
    targets = rng.integers(0, V, N).astype(np.int32)
    weights = np.ones(N, dtype=dt)
    buf = np.empty_like(logits)
    _, rstd = K.rmsnorm_forward(x, w, 1e-5)
    att, probs = K.attention_forward(q, k, v, scale)
    fatt, lse = K.flash_attention_forward(q, k, v, scale)

    def xent_fb():
        np.copyto(buf, logits)
        K.xent_forward_backward(buf, targets, weights, 1.0 / N)

    cases = [
        (f"rmsnorm_forward     [{N}, {C}]", lambda: K.rmsnorm_forward(x, w, 1e-5)),
        (f"rmsnorm_backward    [{N}, {C}]", lambda: K.rmsnorm_backward(dx, x, w, rstd)),
        (f"rope_forward q      [{B}, {T}, {Hq}, {D}]", lambda: K.rope_forward(qt, cos, sin, D)),
        (f"rope_backward q     [{B}, {Hq}, {T}, {D}]", lambda: K.rope_backward(dout, cos, sin, D)),
        (f"to_heads q          [{B}, {T}, {Hq}, {D}]", lambda: K.to_heads(qt)),
        (f"from_heads q        [{B}, {Hq}, {T}, {D}]", lambda: K.from_heads(dout)),
        (f"swiglu_forward      [{N}, {F}]", lambda: K.swiglu_forward(g, u)),
        (f"swiglu_backward     [{N}, {F}]", lambda: K.swiglu_backward(dh, g, u)),
        (f"attention_forward   Hq={Hq} Hkv={Hkv} T={T}", lambda: K.attention_forward(q, k, v, scale)),
        ("attention_backward", lambda: K.attention_backward(dout, q, k, v, probs, scale)),
        ("flash_attention_forward", lambda: K.flash_attention_forward(q, k, v, scale)),
        ("flash_attention_backward", lambda: K.flash_attention_backward(dout, q, k, v, fatt, lse, scale)),
        (f"xent_forward        [{N}, {V}]", lambda: K.xent_forward(logits, targets)),
        (f"xent_forward_backward (incl. {N}x{V} copy)", xent_fb),
        (f"  (copy alone)      [{N}, {V}]", lambda: np.copyto(buf, logits)),
        (f"embedding_scatter_add [{N}, 16] into [{V}, 16]",
         lambda: K.embedding_scatter_add(np.zeros((V, 16), dt), targets, r(N, 16))),
    ]
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = [(name, best_ms(fn, args.repeat, clock)) for name, fn in cases]
    print(f"# {dt.name}, B={B} T={T}, numba threads={numba.get_num_threads()} "
          f"layer={numba.threading_layer()}, {args.clock} clock, best of {args.repeat}")
    for name, ms in rows:
        print(f"{name:48s} {ms:9.3f} ms")


if __name__ == "__main__":
    main()
