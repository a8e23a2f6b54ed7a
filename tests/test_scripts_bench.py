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
