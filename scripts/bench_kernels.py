#!/usr/bin/env python
"""Micro-benchmark of gguf_finetune.engine.kernels at the SmolLM2-135M shape.

N = B·T tokens (default 1 x 256), C = 576, F = 1536, Hq = 9, Hkv = 3, D = 64, V = 49152.
Prints the best of ``--repeat`` runs (ms per call) after a warm-up that also compiles or loads
the numba cache.

    python scripts/bench_kernels.py [--batch 1] [--ctx 256] [--dtype float32] [--repeat 5] [--threads N]
                                    [--clock wall|cpu] [--record]

``--record`` appends one row per kernel to docs/results.jsonl (kind "kernels", scripts/benchlib.py).
Set NUMBA_THREADING_LAYER=workqueue|omp in the environment to compare numba's threading layers.
"""

from __future__ import annotations

import argparse
import time

import numba  # noqa: E402
import numpy as np  # noqa: E402

import benchlib
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
    ap.add_argument("--record", action="store_true",
                    help="append each row to docs/results.jsonl (kind \"kernels\"; $GGUF_FINETUNE_RESULTS: another file)")
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

    cases = [  # (kernel, shape, call)
        ("rmsnorm_forward", f"[{N}, {C}]", lambda: K.rmsnorm_forward(x, w, 1e-5)),
        ("rmsnorm_backward", f"[{N}, {C}]", lambda: K.rmsnorm_backward(dx, x, w, rstd)),
        ("rope_forward q", f"[{B}, {T}, {Hq}, {D}]", lambda: K.rope_forward(qt, cos, sin, D)),
        ("rope_backward q", f"[{B}, {Hq}, {T}, {D}]", lambda: K.rope_backward(dout, cos, sin, D)),
        ("to_heads q", f"[{B}, {T}, {Hq}, {D}]", lambda: K.to_heads(qt)),
        ("from_heads q", f"[{B}, {Hq}, {T}, {D}]", lambda: K.from_heads(dout)),
        ("swiglu_forward", f"[{N}, {F}]", lambda: K.swiglu_forward(g, u)),
        ("swiglu_backward", f"[{N}, {F}]", lambda: K.swiglu_backward(dh, g, u)),
        ("attention_forward", f"Hq={Hq} Hkv={Hkv} T={T}", lambda: K.attention_forward(q, k, v, scale)),
        ("attention_backward", f"Hq={Hq} Hkv={Hkv} T={T}",
         lambda: K.attention_backward(dout, q, k, v, probs, scale)),
        ("flash_attention_forward", f"Hq={Hq} Hkv={Hkv} T={T}", lambda: K.flash_attention_forward(q, k, v, scale)),
        ("flash_attention_backward", f"Hq={Hq} Hkv={Hkv} T={T}",
         lambda: K.flash_attention_backward(dout, q, k, v, fatt, lse, scale)),
        ("xent_forward", f"[{N}, {V}]", lambda: K.xent_forward(logits, targets)),
        ("xent_forward_backward (incl. copy)", f"[{N}, {V}]", xent_fb),
        ("copy of the logits alone", f"[{N}, {V}]", lambda: np.copyto(buf, logits)),
        ("embedding_scatter_add", f"[{N}, 16] into [{V}, 16]",
         lambda: K.embedding_scatter_add(np.zeros((V, 16), dt), targets, r(N, 16))),
    ]
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = [(name, shape, best_ms(fn, args.repeat, clock)) for name, shape, fn in cases]
    threads, layer = numba.get_num_threads(), numba.threading_layer()
    print(f"# {dt.name}, B={B} T={T}, numba threads={threads} layer={layer}, {args.clock} clock, best of {args.repeat}")
    for name, shape, ms in rows:
        print(f"{name + ' ' + shape:60s} {ms:9.3f} ms")
    if args.record:
        for name, shape, ms in rows:
            benchlib.record("kernels", {"kernel": name, "shape": shape, "dtype": dt.name, "batch": B, "ctx": T,
                                        "threads": threads, "layer": layer, "clock": args.clock,
                                        "repeat": args.repeat, "ms": float(f"{ms:.4g}")})


if __name__ == "__main__":
    main()
