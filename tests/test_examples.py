"""The README's commands and the examples folder do what the README says.

The commands are read from README.md itself, so a README edit that breaks them fails here.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """Shell commands of a code block: comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_csv_to_sft_rebuilds_the_sft_example_as_the_readme_says():
    """The README's csv_to_sft.py command, run as written (output captured instead of redirected),
    reproduces examples/sft/train.txt byte for byte."""
    flat = " ".join(readme_text().split())
    m = re.search(r"`(python examples/csv_to_sft\.py [^`>]*)> ([^`]+)`", flat)
    assert m, "README does not show how examples/sft/train.txt is made with examples/csv_to_sft.py"
    argv = shlex.split(m.group(1))
    assert argv[0] == "python"
    out = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    target = REPO / m.group(2).strip()
    assert target == REPO / "examples" / "sft" / "train.txt"
    assert out == target.read_bytes()
    assert out.count(b"<SFT>Question: ") == len((REPO / "examples" / "sft" / "faq.csv").read_text().splitlines()) - 1


def _shell(cmd: str, cwd) -> subprocess.CompletedProcess:
    """Run a README command in bash, its `finetune` and `gguf-finetune` being this checkout's, under
    this interpreter."""
    py = shlex.quote(sys.executable)
    prelude = (f'finetune() {{ {py} -c "from gguf_finetune.cli.finetune import main; main()" "$@"; }}; '
               f'gguf-finetune() {{ {py} -m gguf_finetune "$@"; }}; set -e; ')
    p = subprocess.run(["bash", "-c", prelude + cmd], cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_readme_quick_start_resume_and_extract(smollm2, tmp_path):
    """The quick start's finetune command (with --adam-iter 2), then the 'Using it' section's resume and
    --only-write-lora commands on its files, as written in the README."""
    from gguf_finetune.formats.checkpoint import read_checkpoint
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.model import read_hparams

    text = readme_text()
    quick = code_blocks(text)[0]
    first = next(c for c in commands(quick) if "finetune --model-base" in c)
    start = first[first.index("finetune --model-base"):]  # the last command of an `a && b && finetune ...` line
    using = code_blocks(text[text.index("## Using it"):])[0]
    ft = [c for c in commands(using) if c.startswith("finetune ")]
    resume = next(c for c in ft if "--checkpoint-in" in c and "--only-write-lora" not in c)
    extract = next(c for c in ft if "--only-write-lora" in c)

    def short(cmd: str) -> str:
        assert len(re.findall(r"--adam-iter \d+", cmd)) == 1, cmd
        return re.sub(r"--adam-iter \d+", "--adam-iter 2", cmd)

    (tmp_path / "examples" / "sft").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "sft" / "train.txt", tmp_path / "examples" / "sft" / "train.txt")
    hp = read_hparams(open_gguf(smollm2))

    _shell(short(start), tmp_path)
    assert read_checkpoint(tmp_path / "checkpoint-LATEST.gguf", hp).train.iteration == 2
    assert (tmp_path / "checkpoint-2.gguf").exists() and (tmp_path / "ggml-lora-2-f32.gguf").exists()

    p = _shell(short(resume), tmp_path)
    assert "main: total train_iterations 2" in p.stdout  # resumed, not started again
    ck = read_checkpoint(tmp_path / "checkpoint-LATEST.gguf", hp)
    assert ck.train.iteration == 4 and (tmp_path / "checkpoint-4.gguf").exists()

    p = _shell(extract, tmp_path)
    assert "train_opt_callback" not in p.stdout
    extracted = open_gguf(tmp_path / "lora-4.gguf", "adapter")
    trained = open_gguf(tmp_path / "ggml-lora-LATEST-f32.gguf", "adapter")
    assert extracted.get_str("general.type") == "adapter"
    assert set(extracted.tensors) == set(trained.tensors) and extracted.tensors
    for name, t in trained.tensors.items():
        np.testing.assert_array_equal(np.asarray(extracted.tensors[name].data), np.asarray(t.data))
