#!/usr/bin/env python3
"""One full training step (forward, backward, optimizer) on a real or synthetic model.

    python scripts/bench.py                              # SmolLM2-135M Q4_1, ctx 256, batch 1
    python scripts/bench.py --no-checkpointing
    python scripts/bench.py --low-memory
    python scripts/bench.py --model 1b.gguf --steps 2
    python scripts/bench.py --write-docs                 # also update docs/PERFORMANCE.md

Prints tokens/s, peak RSS, matmul FLOP/s and MFU (matmul FLOP/s ÷ sgemm peak measured in the
same run).  Each configuration should run in its own process (peak RSS is per process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

import gguf_finetune  # noqa: E402,F401  (before numpy: sets the thread wait policy for numba and OpenBLAS)


def default_model() -> str:
    from gguf_finetune.demo import default_model_path

    return str(default_model_path())


def sgemm_peak(n: int = 2048, reps: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def streamed_gemm_rate(n_mats: int = 48, passes: int = 3) -> float:
    """FLOP/s of step-shaped products whose weights come from memory, not cache: [256, 576] ·
    [576, 1536] with 48 different weight matrices (170 MB, several times any L3), best of 3 passes.
    The step's products stream their float32 weights like this; the 2048³ peak runs from cache, so
    it misses the slow periods of the host's memory that slow the step (docs/PERFORMANCE.md)."""
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal((1536, 576), dtype=np.float32) for _ in range(n_mats)]
    x = rng.standard_normal((256, 576), dtype=np.float32)
    y = np.empty((256, 1536), dtype=np.float32)
    best = 1e9
    for _ in range(passes):
        t = time.perf_counter()
        for w in ws:
            np.matmul(x, w.T, out=y)
        best = min(best, time.perf_counter() - t)
    return 2 * 256 * 576 * 1536 * n_mats / best


def host_rates(threads: int) -> tuple[float, float]:
    """(sgemm peak, streamed_gemm_rate) measured in a child process, so that their buffers do not
    count in this process's peak RSS."""
    out = subprocess.run([sys.executable, __file__, "--host-rates-only", "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def step_matmul_flops(hp, lora, B: int, T: int, checkpointing: bool) -> float:
    """Matmul FLOPs of one training step (base weights need dx only; LoRA needs dx, da, db)."""
    N = B * T
    C, F, Ckv, V = hp.n_embd, hp.n_ff, hp.n_embd_kv, hp.n_vocab
    layer = 2 * N * (C * C * 2 + C * Ckv * 2 + 3 * C * F)  # projections, one pass
    attn = 2 * 2 * B * hp.n_head * T * T * hp.head_dim / 2  # causal QK^T and PV, half the square
    head = 2 * N * C * V
    fwd = hp.n_layer * (layer + attn) + head
    bwd = hp.n_layer * (layer + 2 * attn) + head  # dx of projections; attention dq,dk,dv ~ 2x
    # recomputed: every block but the last, without its down projection
    recompute = (hp.n_layer - 1) * (layer - 2 * N * C * F + attn) if checkpointing else 0
    lora_flops = 0
    for s in lora.layout.specs:
        if s.kind == "norm":
            continue
        lora_flops += 2 * N * s.rank * (s.n_in + s.n_out) * 3  # fwd + dx + grads, roughly
    return fwd + bwd + recompute + lora_flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lora-r", type=int, default=4)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--no-flash", action="store_true")
    ap.add_argument("--low-memory", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--host-rates-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line (scripts/bench_series.py)")
    args = ap.parse_args()

    from gguf_finetune.api import load_model
    from gguf_finetune.cli.common import keep_freed_memory, set_threads
    from gguf_finetune.engine.backward import loss_and_grad
    from gguf_finetune.lora import LoraRanks, init_lora
    from gguf_finetune.optim import AdamWConfig, adamw_step

    set_threads(args.threads)
    if args.host_rates_only:
        print(sgemm_peak(), streamed_gemm_rate())
        return
    # the host's rates in a child process before the steps and in another after them (their buffers
    # would count in this process's peak RSS): the better sgemm peak, since the host's speed drifts,
    # and the mean streamed rate
    peak_before, stream_before = host_rates(args.threads)
    keep_freed_memory()  # as finetune does
    path = args.model or default_model()
    t0 = time.perf_counter()
    model = load_model(path, memory_budget=0 if args.low_memory else None, with_tokenizer=True,
                       cache_head=args.no_checkpointing)  # as finetune chooses
    t_load = time.perf_counter() - t0
    hp = model.hparams
    lora = init_lora(hp, LoraRanks.uniform(args.lora_r), alpha=args.lora_r, seed=1)
    grads = lora.like()
    m = np.zeros_like(lora.flat)
    v = np.zeros_like(lora.flat)
    adam, decay = AdamWConfig(alpha=1e-4), np.ones(lora.flat.shape, dtype=bool)  # decay on every element
    rng = np.random.default_rng(0)
    B, T = args.batch, args.ctx
    tokens = rng.integers(0, hp.n_vocab, size=(B, T))
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones((B, T), dtype=np.float32)
    ckpt, flash = not args.no_checkpointing, not args.no_flash

    def step(it: int) -> float:
        grads.flat[:] = 0
        loss = loss_and_grad(model.weights, hp, lora, grads, tokens, targets, mask, 1.0 / mask.sum(),
                             checkpointing=ckpt, flash=flash)
        adamw_step(lora.flat, grads.flat, m, v, it, 1.0, adam, decay)  # the trainer's optimizer step
        return loss

    t0 = time.perf_counter()
    step(1)  # warm-up: numba compilation or cache load
    t_warm = time.perf_counter() - t0
    step(2)  # second warm-up: first-touch page faults of buffers the first step freed
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for it in range(3, args.steps + 3):
        t0 = time.perf_counter()
        loss = step(it)
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / len(times)
    dt = float(np.median(times))
    tok_s = B * T / dt
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: KiB)
    flops = step_matmul_flops(hp, lora, B, T, ckpt)
    peak_after, stream_after = host_rates(args.threads)
    peak = max(peak_before, peak_after)
    stream = (stream_before + stream_after) / 2
    mode = ("checkpointing" if ckpt else "no checkpointing") + (", low-memory" if args.low_memory else "") + \
        ("" if flash else ", no flash")
    row = (f"| {Path(path).name} | {mode} | {T} | {B} | {args.threads} | {tok_s:.1f} | {rss:.0f} | "
           f"{flops / dt / 1e9:.1f} | {peak / 1e9:.0f} | {100 * flops / dt / peak:.0f}% |")
    print(f"model {Path(path).name}: load {t_load:.2f}s, first step {t_warm:.2f}s, loss {loss:.4f}")
    print(f"steps {', '.join(f'{t * 1000:.0f}' for t in times)} ms: best {B * T / min(times):.1f} tokens/s, "
          f"worst {B * T / max(times):.1f}; {faults:.0f} minor page faults per step")
    print(f"step {dt * 1000:.0f} ms (median of {len(times)}), {tok_s:.1f} tokens/s, peak RSS {rss:.0f} MB, "
          f"matmul {flops / dt / 1e9:.1f} GFLOP/s of sgemm peak {peak / 1e9:.0f} GFLOP/s "
          f"(MFU {100 * flops / dt / peak:.0f}%), f32 weight cache {model.weights.cached_bytes / 2**20:.0f} MB")
    print(f"host: step-shaped products with weights from memory {stream_before / 1e9:.0f} GFLOP/s before the steps, "
          f"{stream_after / 1e9:.0f} after")
    print(row)
    if args.json:
        print(json.dumps({"model": Path(path).name, "mode": mode, "ctx": T, "batch": B, "threads": args.threads,
                          "tokens_per_s": round(tok_s, 1), "step_ms": [round(t * 1000, 1) for t in times],
                          "peak_rss_mb": round(rss), "matmul_gflops": round(flops / dt / 1e9, 1),
                          "sgemm_peak_gflops": round(peak / 1e9), "streamed_gemm_gflops": round(stream / 1e9),
                          "loss": loss}))
    if args.write_docs:
        update_docs(row, " ".join(shlex.quote(a) for a in ["python", "scripts/bench.py"] + sys.argv[1:]))


def update_docs(row: str, command: str) -> None:
    """Add ``row`` to the table in docs/PERFORMANCE.md, replacing the row of the same model/mode/ctx/batch."""
    from perf_doc import read_section, table_rows, write_section

    header = ("| model | mode | ctx | batch | threads | tokens/s | peak RSS MB | matmul GFLOP/s | sgemm peak | MFU |\n"
              "|---|---|---|---|---|---|---|---|---|---|\n")
    key = row.split("|")[1:5]
    lines = [ln for ln in table_rows(read_section("bench"), "| model") if ln.split("|")[1:5] != key] + [row]
    stamp = f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} cores; last command: `{command}`\n\n"
    write_section("bench", stamp + header + "\n".join(lines), heading="Training step (scripts/bench.py)")


if __name__ == "__main__":
    main()
