"""The benchmark scripts' own logic: reading recorded series, and the step profiler on a tiny model.

(Their timings are benchmarks, never asserted here.)
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from tiny import make_run_dir

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


SERIES_DOC = """# Performance

<!-- series:begin -->
| when | mode | tokens/s, one process each | median | peak RSS MB | host GFLOP/s, same runs: sgemm peak / streamed products |
|---|---|---|---|---|---|
| 2026-01-01 10:00-10:04 UTC | no-checkpointing | 200.0, 230.0 | **215.0** | 1079-1080 | 197/–, 202/– |
| 2026-01-01 11:00-11:04 UTC | no-checkpointing | 210.0, 225.0, 240.0 | **225.0** | 1079-1080 | 200/150, 201/172, 205/180 |
| 2026-01-01 11:00-11:04 UTC | checkpointing | 140.0, 160.0, 170.0 | **160.0** | 770-780 | 200/150, 201/165, 205/180 |
| 2026-01-01 11:00-11:04 UTC | low-memory | 130.0 | **130.0** | 336-345 | 200/150 |
<!-- series:end -->
"""


def test_recorded_runs_and_by_host(tmp_path, monkeypatch):
    perf_doc = _script("perf_doc")
    series = _script("bench_series")
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(SERIES_DOC, encoding="utf-8")
    monkeypatch.setattr(perf_doc, "DOC", doc)
    runs = series.recorded_runs()
    # runs without a streamed rate ("–") are left out; every other run keeps its own rate
    assert sorted(runs) == sorted([
        ("no-checkpointing", 210.0, 150), ("no-checkpointing", 225.0, 172), ("no-checkpointing", 240.0, 180),
        ("checkpointing", 140.0, 150), ("checkpointing", 160.0, 165), ("checkpointing", 170.0, 180),
        ("low-memory", 130.0, 150)])
    out = series.by_host()
    no_ckpt = out.split("no-checkpointing, target 220")[1]
    assert "| < 160 | 1 | 210.0 (210.0-210.0) | 0 |" in no_ckpt
    assert "| 170-175 | 1 | 225.0 (225.0-225.0) | 1 |" in no_ckpt
    assert "| ≥ 175 | 1 | 240.0 (240.0-240.0) | 1 |" in no_ckpt
    ckpt = out.split("no-checkpointing, target 220")[0]
    assert "| < 160 | 1 | 140.0 (140.0-140.0) | 0 |" in ckpt
    assert "| 160-170 | 1 | 160.0 (160.0-160.0) | 1 |" in ckpt
    # --write-docs fills only a section that the prose already has; the text around it is kept
    series.write_by_host(out)
    assert doc.read_text(encoding="utf-8") == SERIES_DOC
    doc.write_text(SERIES_DOC + "\nprose before\n<!-- by-host:begin -->\nold\n<!-- by-host:end -->\nprose after\n",
                   encoding="utf-8")
    series.write_by_host(out)
    text = doc.read_text(encoding="utf-8")
    assert "\nold\n" not in text and "| ≥ 175 | 1 | 240.0 (240.0-240.0) | 1 |" in text
    assert text.startswith(SERIES_DOC + "\nprose before\n<!-- by-host:begin -->") and text.endswith("prose after\n")


def test_profile_step_runs_on_a_tiny_model(tmp_path):
    run = make_run_dir(tmp_path / "run")
    r = subprocess.run([sys.executable, str(SCRIPTS / "profile_step.py"), "--model", str(run / "m.gguf"),
                        "--ctx", "16", "--steps", "1", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("no checkpointing, ctx 16:")
    parts = {ln.split("  ")[1].strip() for ln in lines[1:] if ln.startswith("  ")}
    # the instrumented step went through the products, the head and the flash kernels
    assert {"layer products, forward", "layer products, backward",
            "head: products and adapter (kernels apart)", "kernel flash_attention_forward",
            "kernel flash_attention_backward", "LoRA terms, forward"} <= parts
