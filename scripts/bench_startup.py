#!/usr/bin/env python3
"""Time from start to the first training iteration with a cold and with a warm numba cache.

    python scripts/bench_startup.py                         # README quick start, 3 x (cold, warm)
    python scripts/bench_startup.py --runs 5 --threads 1
    python scripts/bench_startup.py --src /tmp/old/src --src src   # two checkouts, runs interleaved
    python scripts/bench_startup.py --record                # + one row per cache state (kind "startup")

Each run is a child process running ``python -m gguf_finetune finetune`` (the README's quick-start
flags, ``--adam-iter 1``) in a scratch folder, with the package from ``--src`` (default: this
checkout) first on PYTHONPATH.  A run with a fresh, empty ``NUMBA_CACHE_DIR`` ("cold": a new
install) is followed by one reusing that folder ("warm"); with several ``--src`` the pairs
alternate between them.  One JSON line per run:

    first_iteration_s  start -> the "iter=     1" line (the first step done)
    begin_training_s   start -> "main: begin training" (model and data loaded, kernels being ready)
    notice_s           start -> the "compiling kernels" line (null when none was printed)
    total_s, cpu_s     wall time; CPU time of the run and its children (the compiling child included)
    peak_rss_mb        largest resident set of the run or of a child it waited for
    load               1-minute load average when the run started (other work on the host)

``--record`` appends, per cache state, the medians over the runs to docs/results.jsonl
(scripts/benchlib.py; $GGUF_FINETUNE_RESULTS: another file) as kind "startup" with
``seconds_to_first_iteration``; with one ``--src`` other than this checkout's, the row names it.

The machine's other work moves these numbers: compare variants run back to back (``--src``), and
read ``cpu_s`` and ``load`` next to the times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib  # (imports neither numpy nor numba)

REPO = Path(__file__).resolve().parent.parent
MARKS = {"notice_s": "compiling kernels", "begin_training_s": "main: begin training",
         "first_iteration_s": "iter=     1"}


def default_model(src: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "gguf_finetune", "demo-model"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(src)), check=True)
    return out.stdout.strip()


def one_run(args, src: Path, model: str, cache: Path, mode: str, i: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p),
               NUMBA_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "gguf_finetune", "finetune", "--model-base", model,
           "--train-data", str(args.train_data), "--sample-start", args.sample_start, "--ctx", str(args.ctx),
           "--batch", str(args.batch), "--adam-iter", "1", "--adam-alpha", "0.003", "--warmup", "2",
           "--threads", str(args.threads), "--save-every", "0", "--no-progress"]
    load = os.getloadavg()[0]
    marks: dict[str, float | None] = {k: None for k in MARKS}
    tail: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)

    def read() -> None:  # the time each marker line arrives
        buf = b""
        while chunk := proc.stdout.read1(65536):
            buf += chunk
            *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
            now = time.perf_counter() - t0
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                tail[:] = (tail + [line])[-5:]
                for key, pat in MARKS.items():
                    if marks[key] is None and pat in line:
                        marks[key] = round(now, 2)

    reader = threading.Thread(target=read)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - t0
    reader.join()
    shutil.rmtree(work, ignore_errors=True)
    code = os.waitstatus_to_exitcode(status)
    res = {"cache": mode, "run": i, **marks, "total_s": round(total, 2),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": usage.ru_maxrss >> 10,
           "load": round(load, 2), "threads": args.threads, "src": str(src)}
    if code != 0:
        res["exit"] = code
        res["tail"] = tail
    return res


def summary_row(args, model: str, runs: list[dict]) -> dict:
    """The medians of one cache state's runs, as recorded (peak RSS: the largest)."""
    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return round(statistics.median(vals), 2) if vals else None

    return {"cache": runs[0]["cache"], "seconds_to_first_iteration": med("first_iteration_s"),
            "begin_training_s": med("begin_training_s"), "notice_s": med("notice_s"), "total_s": med("total_s"),
            "cpu_s": med("cpu_s"), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "load": med("load"),
            "runs": len(runs), "threads": args.threads, "ctx": args.ctx, "batch": args.batch,
            "model": os.path.basename(model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="cold/warm pairs per --src (default 3)")
    ap.add_argument("--model", default=None, help="GGUF model (default: the embedded demo model)")
    ap.add_argument("--train-data", default=str(REPO / "examples" / "sft" / "train.txt"))
    ap.add_argument("--sample-start", default="<SFT>")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--src", type=Path, action="append", default=None,
                    help="folder holding the gguf_finetune package (default: this checkout's src); repeat to "
                         "compare checkouts")
    ap.add_argument("--record", action="store_true",
                    help="append the medians to docs/results.jsonl (kind \"startup\"; $GGUF_FINETUNE_RESULTS: "
                         "another file)")
    args = ap.parse_args()
    srcs = [s.resolve() for s in (args.src or [REPO / "src"])]
    if args.record and len(srcs) > 1:
        ap.error("--record: give one --src (or none: this checkout)")
    args.train_data = Path(args.train_data).resolve()
    model = args.model or default_model(srcs[0])
    results: dict[tuple[Path, str], list[dict]] = {}
    for i in range(args.runs):
        for src in srcs:
            cache = Path(tempfile.mkdtemp(prefix="bench-startup-numba-"))
            try:
                for mode in ("cold", "warm"):
                    res = one_run(args, src, model, cache, mode, i)
                    print(json.dumps(res), flush=True)
                    if "exit" in res:
                        sys.exit(f"bench_startup: the {mode} run failed (exit {res['exit']}): {res['tail'][-1:]}")
                    results.setdefault((src, mode), []).append(res)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    for (src, mode), runs in results.items():
        row = summary_row(args, model, runs)
        print(f"{mode}: {row['seconds_to_first_iteration']} s to the first iteration (median of {len(runs)}; "
              f"cpu {row['cpu_s']} s, load {row['load']}){'' if len(srcs) == 1 else f'  [{src}]'}")
        if args.record:
            benchlib.record("startup", row if src == (REPO / "src").resolve() else {**row, "src": str(src)})


if __name__ == "__main__":
    main()
