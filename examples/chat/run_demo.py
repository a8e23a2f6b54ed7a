#!/usr/bin/env python3
"""Train the "Quill here!" persona into SmolLM2-135M-Instruct, then answer held-out prompts with
and without the adapter, so the difference is visible.

    python examples/chat/run_demo.py [--iters 30] [--out quill-demo]

Uses only the installed commands: `finetune` (JSONL chat data, loss on the assistant turns) and
`gguf-finetune generate --chat` (greedy decoding with and without --lora).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sh(*cmd: str) -> str:
    print("+", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default="quill-demo")
    ap.add_argument("--threads", default="2")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    model = sh("gguf-finetune", "demo-model").strip()
    log = sh("finetune", "--model-base", model, "--train-data", str(HERE / "train.jsonl"), "--ctx", "64",
             "--batch", "4", "--adam-iter", str(args.iters), "--adam-alpha", "0.003", "--warmup", "3",
             "--lora-r", "8", "--seed", "1", "--threads", args.threads, "--save-every", "0",
             "--checkpoint-out", str(out / "chk-ITERATION.gguf"), "--lora-out", str(out / "quill-ITERATION.gguf"))
    print("\n".join(line for line in log.splitlines() if line.startswith("train_opt_callback")))
    adapter = str(out / "quill-LATEST.gguf")
    for line in (HERE / "heldout.jsonl").read_text().splitlines()[:4]:
        q = json.loads(line)["messages"][-1]["content"]
        base = sh("gguf-finetune", "generate", "-m", model, "--chat", "-p", q, "-n", "24", "--temp", "0")
        tuned = sh("gguf-finetune", "generate", "-m", model, "--lora", adapter, "--chat", "-p", q, "-n", "24",
                   "--temp", "0")
        print(f"\nQ: {q}\n  base:    {base.strip()}\n  adapter: {tuned.strip()}")


if __name__ == "__main__":
    sys.exit(main())
