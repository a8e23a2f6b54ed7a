"""What the benchmark scripts share: the results file every run appends to, the host it ran on, and
the marked sections of docs/PERFORMANCE.md that scripts/bench_summary.py fills from the results.

Every benchmark run appends ONE JSON object per measured row to docs/results.jsonl::

    {"kind": "step", "time": "2026-12-07T20:01:02Z", "commit": "abc1234", "host": {...},
     "command": "python scripts/bench.py ...", ...the row's own fields...}

Runs are data, not prose: docs/PERFORMANCE.md shows only the newest row of each kind and key
(scripts/bench_summary.py), and the series of earlier runs stays in the results file.
GGUF_FINETUNE_RESULTS=PATH in the environment sends the rows to (and reads them from) another file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results.jsonl"
DOC = REPO / "docs" / "PERFORMANCE.md"
RESULTS_ENV = "GGUF_FINETUNE_RESULTS"  # another results file (tests: never docs/results.jsonl)


def results_path(results: Path | None = None) -> Path:
    """``results`` if given, else $GGUF_FINETUNE_RESULTS if set, else docs/results.jsonl."""
    if results is not None:
        return Path(results)
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else RESULTS


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict:
    """The machine a run measured: CPU, cores, flags that matter for the kernels, load at the start."""
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    simd = [f for f in ("avx512f", "avx2", "fma", "f16c") if f" {f}" in flags]
    import numpy as np  # (scripts only)

    try:
        import numba
        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "simd": simd, "machine": platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba_version,
            "load": round(os.getloadavg()[0], 2)}


def commit() -> str | None:
    """HEAD's short hash, with "+dirty" when tracked files differ from it (the results file itself,
    which a run with several rows appends to as it goes, does not count)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":(exclude){RESULTS.relative_to(REPO).as_posix()}"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def command() -> str:
    """The command line that is running, as a user would type it from the repository's root."""
    script = os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(shlex.quote(a) for a in ["python", script, *sys.argv[1:]])


def record(kind: str, row: dict, results: Path | None = None) -> dict:
    """Append one measured row to the results file (``results_path(results)``); returns it."""
    rec = {"kind": kind, "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "commit": commit(), "host": host(), "command": command(), **row}
    path = results_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return rec


def read_results(results: Path | None = None) -> list[dict]:
    path = results_path(results)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(name: str, body: str, doc: Path | None = None) -> None:
    """Replace the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in the document
    (docs/PERFORMANCE.md unless ``doc``); the prose outside the markers is kept as written."""
    path = doc or DOC
    begin, end = _markers(name)
    text = path.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: no section {name!r} (add the markers {begin} and {end} where it goes)")
    pre, rest = text.split(begin, 1)
    text = pre + f"{begin}\n{body.strip()}\n{end}" + rest.split(end, 1)[1]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
