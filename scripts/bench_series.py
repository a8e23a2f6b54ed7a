#!/usr/bin/env python3
"""A series of scripts/bench.py runs: each mode in its own process, the modes interleaved.

    python scripts/bench_series.py                       # 5 runs of each mode, 4 steps per run
    python scripts/bench_series.py --runs 3 --modes no-checkpointing
    python scripts/bench_series.py --write-docs          # also add the series to docs/PERFORMANCE.md
    python scripts/bench_series.py --by-host             # no runs: the recorded runs grouped by host rate

The host of a small VM drifts by tens of percent over minutes, so one process says little: this
runs `bench.py --steps S [flag]` for run 1 of every mode, then run 2 of every mode, and so on (a
slow moment hits every mode alike), and prints each run's tokens/s, the median per mode and the
peak RSS range.  Peak RSS is per process, which is why every run is a process of its own.  Each run's
host rates go in the table too, as bench.py measured them around its steps: the sgemm peak (2048³,
from cache) and the rate of step-shaped products whose weights come from memory (which is what
slows down in the host's slow periods, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {  # name -> bench.py flags
    "checkpointing": [],
    "no-checkpointing": ["--no-checkpointing"],
    "low-memory": ["--low-memory"],
}


def run_once(flags: list[str], steps: int, model: str | None) -> dict:
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--steps", str(steps), "--json", *flags]
    if model:
        cmd += ["--model", model]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="processes per mode (default 5)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process (default 4)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--model", default=None)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--by-host", action="store_true",
                    help="run nothing; group the runs recorded in docs/PERFORMANCE.md by their streamed-product rate")
    args = ap.parse_args()
    if args.by_host:
        text = by_host()
        print(text)
        if args.write_docs:
            write_by_host(text)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes or args.runs < 1 or args.steps < 1:
        ap.error(f"--modes: unknown {', '.join(unknown)}" if unknown else "--runs, --steps and --modes must be positive/non-empty")

    start = datetime.datetime.now(datetime.timezone.utc)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(args.runs):
        for m in modes:
            r = run_once(MODES[m], args.steps, args.model)
            results[m].append(r)
            print(f"run {i + 1}/{args.runs} {m}: {r['tokens_per_s']:.1f} tokens/s, peak RSS {r['peak_rss_mb']} MB, "
                  f"sgemm peak {r['sgemm_peak_gflops']} GFLOP/s, streamed products {r['streamed_gemm_gflops']} GFLOP/s",
                  flush=True)
    end = datetime.datetime.now(datetime.timezone.utc)
    when = f"{start:%Y-%m-%d %H:%M}-{end:%H:%M} UTC"
    lines = []
    for m in modes:
        toks = [r["tokens_per_s"] for r in results[m]]
        rss = [r["peak_rss_mb"] for r in results[m]]
        gf = [f"{r['sgemm_peak_gflops']}/{r['streamed_gemm_gflops']}" for r in results[m]]
        label = m if not args.model else f"{m}, {results[m][0]['model']}"
        lines.append(f"| {when} | {label} | {', '.join(f'{t:.1f}' for t in toks)} | **{statistics.median(toks):.1f}** | "
                     f"{min(rss)}-{max(rss)} | {', '.join(gf)} |")
    print(f"\n{args.runs} runs per mode, bench.py --steps {args.steps}, {when}:")
    for ln in lines:
        print(ln)
    if args.write_docs:
        command = "python scripts/bench_series.py " + " ".join(sys.argv[1:])
        update_docs(lines, command.strip())
        write_by_host(by_host())  # the grouping by host rate, now with this series


TARGETS = {"checkpointing": 150.0, "no-checkpointing": 220.0}  # tokens/s asked for (issue #3)
RATE_BINS = ((0, 160), (160, 170), (170, 175), (175, 10_000))  # streamed-product GFLOP/s


def recorded_runs() -> list[tuple[str, float, int]]:
    """(mode, tokens/s, streamed GFLOP/s) of every recorded run that has a streamed rate."""
    from perf_doc import read_section, table_rows

    runs = []
    for row in table_rows(read_section("series"), "| when"):
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) != 6 or cells[1] not in MODES:
            continue
        toks = [float(t) for t in cells[2].split(",")]
        rates = [r.strip().split("/") for r in cells[5].split(",")]
        for t, r in zip(toks, rates):
            if len(r) == 2 and r[1].isdigit():
                runs.append((cells[1], t, int(r[1])))
    return runs


def by_host() -> str:
    """Per mode with a target, the recorded runs grouped by the host's streamed-product rate (markdown)."""
    runs = recorded_runs()
    out = []
    for mode, target in TARGETS.items():
        out += [f"{mode}, target {target:.0f} tokens/s; runs grouped by the streamed-product rate measured "
                "around each run's steps:", "",
                "| streamed products, GFLOP/s | runs | median tokens/s (min-max) | runs ≥ target |",
                "|---|---|---|---|"]
        for lo, hi in RATE_BINS:
            sel = [t for m, t, r in runs if m == mode and lo <= r < hi]
            if not sel:
                continue
            label = f"< {hi}" if lo == 0 else (f"≥ {lo}" if hi >= 10_000 else f"{lo}-{hi}")
            out.append(f"| {label} | {len(sel)} | {statistics.median(sel):.1f} ({min(sel):.1f}-{max(sel):.1f}) | "
                       f"{sum(t >= target for t in sel)} |")
        out.append("")
    return "\n".join(out).strip() + "\n"


def write_by_host(text: str) -> None:
    """Replace the by-host section of docs/PERFORMANCE.md (it must exist: it sits in hand-written prose)."""
    from perf_doc import read_section, write_section

    if read_section("by-host"):
        write_section("by-host", "Command: `python scripts/bench_series.py --by-host --write-docs`\n\n" + text)


def update_docs(lines: list[str], command: str) -> None:
    """Append this series' rows to the series table in docs/PERFORMANCE.md."""
    from perf_doc import read_section, table_rows, write_section

    header = ("| when | mode | tokens/s, one process each | median | peak RSS MB "
              "| host GFLOP/s, same runs: sgemm peak / streamed products |\n"
              "|---|---|---|---|---|---|\n")
    old = table_rows(read_section("series"), "| when")
    stamp = (f"On {platform.machine()}, {os.cpu_count()} cores; SmolLM2-135M-Instruct Q4_1, ctx 256, batch 1 unless "
             f"the mode names a model; last command: `{command}`\n\n")
    write_section("series", stamp + header + "\n".join(old + lines), heading="Series (scripts/bench_series.py)")


if __name__ == "__main__":
    main()
