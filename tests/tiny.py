"""The tiny synthetic model and training text that the trainer, CLI and fault tests share."""

from __future__ import annotations

from pathlib import Path

from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

TEXT = "".join(f"<s>the {w} sat on the mat and ate a {w} near the tree {i}\n"
               for i, w in enumerate(["cat", "dog", "rat", "hen", "fox", "owl", "ant", "bee"] * 6))
SPEC = SyntheticSpec(n_vocab=400, n_embd=32, n_ff=64, n_layer=2, n_head=4, n_head_kv=2, seed=1)


def make_run_dir(folder: Path) -> Path:
    """``folder`` with the model ``m.gguf`` and the samples ``train.txt`` (48 lines starting with <s>)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_synthetic_model(folder / "m.gguf", SPEC)
    (folder / "train.txt").write_text(TEXT)
    return folder
