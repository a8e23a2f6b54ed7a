"""The benchmark scripts' own logic: their --record rows (run on a tiny model, into a temporary
results file), bench_summary.py on a synthetic results file, and the step profiler.

(Their timings are benchmarks, never asserted here.)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import make_run_dir

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
DATA = REPO / "tests" / "data"
META = {"kind", "time", "commit", "host", "command"}  # what benchlib.record adds to every row


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
                       check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("no checkpointing, ctx 16, batch 1:")
    parts = {ln.split("  ")[1].strip() for ln in lines[1:] if ln.startswith("  ")}
    # the instrumented step went through the products, the head and the flash kernels
    assert {"layer products, forward", "layer products, backward",
            "head: products and adapter (kernels apart)", "kernel flash_attention_forward",
            "kernel flash_attention_backward", "LoRA terms, forward"} <= parts


def _run_recording(script: str, args: list[str], results: Path) -> subprocess.CompletedProcess:
    """Run scripts/SCRIPT --record with its rows sent to ``results``; docs/results.jsonl stays as it was."""
    real = REPO / "docs" / "results.jsonl"
    before = real.read_bytes() if real.exists() else None
    env = {**os.environ, "GGUF_FINETUNE_RESULTS": str(results),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run([sys.executable, str(SCRIPTS / script), *args, "--record"], env=env, cwd=REPO,
                       check=False, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert (real.read_bytes() if real.exists() else None) == before
    return r


def _rows(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]


def test_bench_dequant_records_a_row_per_type(tmp_path):
    from gguf_finetune import quants

    results = tmp_path / "results.jsonl"
    r = _run_recording("bench_dequant.py", ["--rows", "1", "--cols", "256", "--repeat", "1"], results)
    assert "| type | elements | gguf.quants ms |" in r.stdout
    rows = _rows(results)
    assert sorted(row["type"] for row in rows) == sorted(t.name for t in quants.SUPPORTED)
    for row in rows:
        assert row["kind"] == "dequant" and row["command"].startswith("python scripts/bench_dequant.py --rows 1")
        assert set(row) == META | {"type", "rows", "cols", "repeat", "threads", "gguf_ms", "ours_ms", "speedup",
                                   "ours_out_ms", "speedup_out", "fill_ms", "bound"}
        assert (row["rows"], row["cols"], row["repeat"], row["threads"]) == (1, 256, 1, 1)


def test_bench_tokenizer_records_a_row_per_vocabulary(tmp_path):
    run = make_run_dir(tmp_path / "run")
    results = tmp_path / "results.jsonl"
    r = _run_recording("bench_tokenizer.py", ["--spm", str(DATA / "vocab" / "ggml-vocab-llama-spm.gguf"),
                                              "--bpe", str(run / "m.gguf"), "--chars", "500", "--repeat", "1"],
                       results)
    assert "| vocabulary | kind |" in r.stdout
    rows = _rows(results)
    assert [row["vocab"] for row in rows] == ["ggml-vocab-llama-spm.gguf", "m.gguf"]
    for row in rows:
        assert row["kind"] == "tokenizer" and row["tokenizer"] == "spm"  # (the tiny model's vocabulary is SPM)
        assert set(row) == META | {"vocab", "tokenizer", "pre", "n_vocab", "text", "chars", "tokens", "repeat",
                                   "pinned", "load_s", "encode_cold_s", "encode_warm_s", "encode_nocache_s",
                                   "decode_s", "cold_mb_per_s"}
        assert (row["text"], row["chars"], row["repeat"], row["pinned"]) == ("shakespeare.txt", 500, 1, False)
    assert rows[1]["n_vocab"] == 400


def test_bench_generate_records_its_row(tmp_path):
    run = make_run_dir(tmp_path / "run")
    results = tmp_path / "results.jsonl"
    r = _run_recording("bench_generate.py", ["-m", str(run / "m.gguf"), "--tokens", "2", "--repeat", "1",
                                             "--ctx", "64", "--threads", "1"], results)
    assert "decode: best" in r.stdout
    (row,) = _rows(results)
    assert row["kind"] == "generate"
    assert set(row) == META | {"model", "threads", "ctx", "prompt_tokens", "tokens", "repeat", "load_s", "cache_mib",
                               "prompt_ms", "best_tokens_per_s", "median_tokens_per_s"}
    assert (row["model"], row["threads"], row["ctx"], row["tokens"]) == ("m.gguf", 1, 64, 2)
    assert row["best_tokens_per_s"] >= row["median_tokens_per_s"] > 0


def test_bench_kernels_records_a_row_per_kernel(tmp_path):
    results = tmp_path / "results.jsonl"
    r = _run_recording("bench_kernels.py", ["--ctx", "8", "--repeat", "1", "--threads", "1"], results)
    assert "flash_attention_backward" in r.stdout
    rows = _rows(results)
    assert len(rows) == 16 and len({row["kernel"] for row in rows}) == 16
    for row in rows:
        assert row["kind"] == "kernels"
        assert set(row) == META | {"kernel", "shape", "dtype", "batch", "ctx", "threads", "layer", "clock",
                                   "repeat", "ms"}
        assert (row["dtype"], row["batch"], row["ctx"], row["threads"], row["clock"]) == ("float32", 1, 8, 1, "wall")
    assert {"rmsnorm_forward", "flash_attention_backward", "xent_forward"} <= {row["kernel"] for row in rows}


HOST = {"cpu": "Test CPU", "cores": 2, "simd": ["avx2", "fma"], "load": 0.5}


def _result(kind: str, time: str, command: str, commit: str = "abc1234", **fields) -> dict:
    return {"kind": kind, "time": time, "commit": commit, "host": HOST, "command": command, **fields}


STEP = "python scripts/bench.py --record"
SYNTHETIC_RESULTS = [
    _result("step", "2026-12-01T10:00:00Z", STEP, commit="old0000", model="SmolLM2", mode="checkpointing",
            ctx=256, batch=1, threads=2, tokens_per_s=140.0, peak_rss_mb=770, matmul_gflops=90.0,
            sgemm_gflops=200.0, bound=0.5),
    _result("step", "2026-12-02T10:00:00Z", STEP, model="SmolLM2", mode="checkpointing", ctx=256, batch=1,
            threads=2, tokens_per_s=160.0, peak_rss_mb=771, matmul_gflops=91.0, sgemm_gflops=201.0, bound=0.625),
    _result("step", "2026-12-02T10:05:00Z", STEP, model="SmolLM2", mode="no-checkpointing", ctx=256, batch=1,
            threads=2, tokens_per_s=220.0, trained_tokens_per_s=210.0, peak_rss_mb=1079, matmul_gflops=95.0,
            sgemm_gflops=202.0, bound=0.7),
    # an older row later in the file loses to the newer one
    _result("step", "2026-11-30T10:00:00Z", STEP, commit="older00", model="SmolLM2", mode="checkpointing",
            ctx=256, batch=1, threads=2, tokens_per_s=100.0, peak_rss_mb=700, matmul_gflops=80.0,
            sgemm_gflops=190.0, bound=0.4),
    _result("mpi", "2026-12-02T11:00:00Z", "mpiexec -n 2 python scripts/bench_mpi.py --record", layout="2x1",
            tokens_per_s=300.0, allreduce_ms_per_step=12.5),
    _result("widget", "2026-12-02T12:00:00Z", "python scripts/widget.py --record", name="a", value=1.5),
    _result("widget", "2026-12-02T12:01:00Z", "python scripts/widget.py --record", name="a", value=2.5),
]


@pytest.fixture
def summary_results(tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in SYNTHETIC_RESULTS), encoding="utf-8")
    monkeypatch.setenv("GGUF_FINETUNE_RESULTS", str(results))
    return results


def test_bench_summary_shows_the_newest_row_per_key(summary_results, capsys):
    summary = _script("bench_summary")
    assert summary.main([]) == 0
    out = capsys.readouterr().out
    step = out.split("## step\n")[1].split("## mpi\n")[0]
    assert "| 160.0 |" in step and "| 220.0 | 210.0 |" in step
    assert "| 140.0 |" not in step and "| 100.0 |" not in step
    assert step.count("| SmolLM2 |") == 2
    # one run (commit and command): one line says so; "bound" is a fraction, shown in percent
    assert ("Measured 2026-12-02 10:00–10:05 UTC on Test CPU (2 cores, avx2 fma), commit abc1234; "
            "command: `python scripts/bench.py --record`.") in step
    assert "| 62% |" in step and "| 70% |" in step
    assert "| layout | tokens/s | Allreduce ms/step |" in out and "| 2x1 | 300.0 | 12.5 |" in out
    # a kind the script does not know: all fields, keyed on its text fields
    widget = out.split("## widget\n")[1]
    assert "| name | value |" in widget and "| a | 2.50 |" in widget and "| a | 1.50 |" not in widget


def test_bench_summary_puts_differing_commits_in_the_rows(tmp_path, capsys):
    summary = _script("bench_summary")
    results = tmp_path / "results.jsonl"
    rows = [SYNTHETIC_RESULTS[0], {**SYNTHETIC_RESULTS[2], "command": "python scripts/bench.py -x | tee"}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert summary.main(["--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "Measured 2026-12-01 10:00 – 2026-12-02 10:05 UTC on Test CPU (2 cores, avx2 fma); " \
           "commit, command per row." in out
    assert "| commit | measured | command |" in out
    assert "| old0000 | 2026-12-01 10:00 | `python scripts/bench.py --record` |" in out
    assert "`python scripts/bench.py -x \\| tee` |" in out  # a | in a cell is escaped


def test_bench_summary_series_gives_every_row_and_the_medians(summary_results, capsys):
    summary = _script("bench_summary")
    assert summary.main(["--series", "step"]) == 0
    out = capsys.readouterr().out
    listing, medians = out.split("Median per key:")
    lines = [ln for ln in listing.splitlines() if ln.startswith("| SmolLM2")]
    assert [ln.split(" | ")[5] for ln in lines] == ["100.0", "140.0", "160.0", "220.0"]  # in time order
    assert "| SmolLM2 | – | checkpointing | 256 | 1 | – | 3 | 140.0 |" in medians  # key: model … ranks
    assert "| SmolLM2 | – | no-checkpointing | 256 | 1 | – | 1 | 220.0 | 210.0 |" in medians
    assert summary.main(["--series", "nothing"]) == 1


def test_bench_summary_write_docs_fills_the_sections_it_finds(summary_results, tmp_path, capsys):
    summary = _script("bench_summary")
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nprose before\n<!-- step:begin -->\nold table\n<!-- step:end -->\n"
                   "prose after\n<!-- mpi:begin --><!-- mpi:end -->\n", encoding="utf-8")
    assert summary.main(["--write-docs", "--doc", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert "old table" not in text
    assert text.startswith("# Performance\n\nprose before\n<!-- step:begin -->\nMeasured 2026-12-02 10:00–10:05")
    step = text.split("<!-- step:begin -->")[1].split("<!-- step:end -->")[0]
    assert "| 160.0 |" in step and "| 220.0 |" in step and "| 140.0 |" not in step
    assert "\n<!-- step:end -->\nprose after\n<!-- mpi:begin -->\nMeasured 2026-12-02 11:00 UTC" in text
    assert "| 2x1 | 300.0 | 12.5 |\n<!-- mpi:end -->\n" in text
    err = capsys.readouterr().err
    assert "no section 'widget'" in err and "skipped" in err


STARTUP_STUB = '''
import os, sys, time
if sys.argv[1:] == ["demo-model"]:
    print("/nowhere/demo.gguf")
    sys.exit(0)
cache = os.environ["NUMBA_CACHE_DIR"]
if not os.listdir(cache):  # a cold cache: compile (a little sleep) and fill it
    print("compiling kernels (once per install)…", flush=True)
    time.sleep(0.2)
    open(os.path.join(cache, "kernel.nbi"), "w").close()
print("main: begin training", flush=True)
print("train_opt_callback: iter=     0 sample=1/31", flush=True)
time.sleep(0.05)
print("train_opt_callback: iter=     1 sample=5/31 sched=0.5 loss=3.2", flush=True)
'''


def test_bench_startup_records_the_medians_of_cold_and_warm_runs(tmp_path):
    """A stand-in gguf_finetune (--src) that prints the lines the script times: cold, then warm,
    per run, on one fresh cache folder; one recorded row per cache state, naming the --src."""
    pkg = tmp_path / "stub" / "gguf_finetune"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(STARTUP_STUB)
    results = tmp_path / "results.jsonl"
    r = _run_recording("bench_startup.py", ["--runs", "2", "--src", str(pkg.parent)], results)
    runs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(x["cache"], x["run"]) for x in runs] == [("cold", 0), ("warm", 0), ("cold", 1), ("warm", 1)]
    for x in runs:
        assert x["begin_training_s"] <= x["first_iteration_s"] <= x["total_s"] and "exit" not in x
        assert (x["notice_s"] is not None) == (x["cache"] == "cold")
    cold, warm = _rows(results)
    assert (cold["cache"], warm["cache"]) == ("cold", "warm")
    for row in (cold, warm):
        assert row["kind"] == "startup" and row["src"] == str(pkg.parent) and row["runs"] == 2
        assert set(row) == META | {"cache", "seconds_to_first_iteration", "begin_training_s", "notice_s", "total_s",
                                   "cpu_s", "peak_rss_mb", "load", "runs", "threads", "ctx", "batch", "model", "src"}
        assert (row["threads"], row["ctx"], row["batch"], row["model"]) == (2, 64, 4, "demo.gguf")
    assert cold["seconds_to_first_iteration"] > warm["seconds_to_first_iteration"] and warm["notice_s"] is None
