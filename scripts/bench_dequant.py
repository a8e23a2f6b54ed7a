#!/usr/bin/env python
"""Benchmark gguf_finetune.quants against gguf.quants.dequantize on one thread.

For every supported type: a [rows, cols] tensor (~4M elements) of random valid blocks; after a
warm-up, the best of ``--repeat`` runs of each; prints a markdown table.  ``--record`` also
appends one row per type and size to docs/results.jsonl (kind "dequant", scripts/benchlib.py).

    python scripts/bench_dequant.py [--rows 1024 64] [--cols 4096] [--repeat 3] [--record]

One table per ``--rows`` value: the default 1024 x 4096 (4M elements, a 16 MB result) is bound by
memory bandwidth on small machines; 64 x 4096 (a 1 MB result that stays in cache) shows the
kernels' own speed.  Each table ends with the time numpy needs just to fill the result buffer.
"""

from __future__ import annotations

import argparse
import sys
import time

import numba
import numpy as np
from gguf import quants as gq

import benchlib
from gguf_finetune import quants


def best_ms(fn, repeat: int) -> float:
    fn()  # warm-up (and numba compile / cache load)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def bench(rows: int, cols: int, repeat: int) -> tuple[list[dict], float]:
    rng = np.random.default_rng(0)
    results = []
    floor_buf = np.empty((rows, cols), np.float32)
    t_floor = best_ms(lambda: floor_buf.fill(1.0), repeat)
    for qtype in sorted(quants.SUPPORTED, key=int):
        raw = quants.random_raw(qtype, rows, cols, rng)
        scratch = np.empty((rows, cols), np.float32)
        ref = np.asarray(gq.dequantize(raw, qtype), dtype=np.float32)
        mine = quants.dequantize(raw, qtype)
        if not np.array_equal(mine.view(np.uint32), ref.view(np.uint32)):
            raise SystemExit(f"{qtype.name}: result differs from gguf.quants")
        t_ref = best_ms(lambda: gq.dequantize(raw, qtype), repeat)
        t_new = best_ms(lambda: quants.dequantize(raw, qtype), repeat)
        t_out = best_ms(lambda: quants.dequantize(raw, qtype, out=scratch), repeat)
        results.append(dict(type=qtype.name, n=rows * cols, ref=t_ref, new=t_new, out=t_out))
        print(f"  {qtype.name:7s} gguf {t_ref:8.2f} ms  ours {t_new:7.2f} ms  ours(out=) {t_out:7.2f} ms", file=sys.stderr)
    return results, t_floor


def table(results: list[dict], rows: int, cols: int, t_floor: float) -> str:
    lines = [
        f"[{rows}, {cols}] = {rows * cols:,} elements per tensor.  Writing a float32 result of that size "
        f"(numpy `fill` of a reused buffer) alone takes {t_floor:.2f} ms; the last column, gguf.quants ms "
        "divided by that, is the most any dequantizer that writes its result could gain here.",
        "",
        "| type | elements | gguf.quants ms | ours ms | speed-up | ours, out= ms | speed-up, out= | bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['type']} | {r['n']:,} | {r['ref']:.2f} | {r['new']:.2f} | {r['ref'] / r['new']:.1f}x "
            f"| {r['out']:.2f} | {r['ref'] / r['out']:.1f}x | {r['ref'] / t_floor:.1f}x |"
        )
    return "\n".join(lines)


def row(r: dict, rows: int, cols: int, t_floor: float, repeat: int) -> dict:
    """The results-file row of one type at one size: the table's numbers (ms, ratios) and the settings."""
    def sig(x: float) -> float:  # 4 significant digits: timings of a few µs keep theirs
        return float(f"{x:.4g}")

    return {"type": r["type"], "rows": rows, "cols": cols, "repeat": repeat, "threads": 1,
            "gguf_ms": sig(r["ref"]), "ours_ms": sig(r["new"]), "speedup": sig(r["ref"] / r["new"]),
            "ours_out_ms": sig(r["out"]), "speedup_out": sig(r["ref"] / r["out"]),
            "fill_ms": sig(t_floor), "bound": sig(r["ref"] / t_floor)}


def below_note(all_results) -> str:
    """One sentence per table: which types are under 10x here, with their floor-bound."""
    parts = []
    for rows, results, t_floor in all_results:
        low = [f"{r['type']} {r['ref'] / r['new']:.1f}x (bound {r['ref'] / t_floor:.1f}x)"
               for r in results if r["ref"] / r["new"] < 10]
        parts.append(f"Under 10x at {rows} rows: {', '.join(low) if low else 'none'}.")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1024, 64], help="one table per value")
    ap.add_argument("--cols", type=int, default=4096, help="multiple of 256")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per case; the best counts")
    ap.add_argument("--record", action="store_true",
                    help="append each row to docs/results.jsonl (kind \"dequant\"; $GGUF_FINETUNE_RESULTS: another file)")
    args = ap.parse_args(argv)
    if args.cols % 256:
        ap.error("--cols must be a multiple of 256")

    numba.set_num_threads(1)
    all_results = []
    for rows in args.rows:
        results, t_floor = bench(rows, args.cols, args.repeat)
        all_results.append((rows, results, t_floor))
        print(table(results, rows, args.cols, t_floor) + "\n")
        if args.record:
            for r in results:
                benchlib.record("dequant", row(r, rows, args.cols, t_floor, args.repeat))
    print(below_note(all_results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
