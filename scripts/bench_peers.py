#!/usr/bin/env python3
"""Our training step next to transformers + PEFT on the same GGUF, on this machine, in one run.

    python scripts/bench_peers.py                         # SmolLM2: raw text (checkpointing on, off), chat
    python scripts/bench_peers.py --model gemma.gguf --chat-template gemma --record
    python scripts/bench_peers.py --peers-python /path/to/venv-with-torch/bin/python

Each workload runs ours (scripts/bench.py) and the peer (scripts/peers_torch.py: transformers loads
the GGUF dequantized to float32, PEFT LoRA rank 4 on q, k, v, o, gate, up, down, AdamW) in child
processes, alternated ``--runs`` times (a slow moment of the host hits both alike), and compares
the medians:

- raw text, ctx 256, batch 1, checkpointing on and off: tokens/s;
- chat records (examples/chat/train.jsonl), both without gradient checkpointing: trained tokens/s —
  ours packed at ctx 256, batch 4; the peer padded to the longest record of each batch of 8, as its
  data collator does; and ours with one record per row, as finetune computed chat data before
  packing (every row padded to ctx 256 and through the output head: bench.py --pad-to-ctx) and as
  --no-pack does now (rows cut to the batch's longest record, the head only on trained positions).

The peer needs torch, transformers and peft (the ``peers`` extra, or any Python that has them:
``--peers-python``); without them only our side runs, saying so.  Threads: ``--threads`` for both
(torch.set_num_threads; OMP_WAIT_POLICY=PASSIVE for both, as gguf-finetune sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
CHAT = REPO / "examples" / "chat" / "train.jsonl"


def default_model() -> str:
    sys.path.insert(0, str(REPO / "src"))
    from gguf_finetune.demo import default_model_path

    return str(default_model_path())


def _json_line(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def ours(args, *flags: str) -> dict:
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--model", args.model, "--threads", str(args.threads),
           "--steps", str(args.steps), "--json", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench.py failed: {r.stderr[-2000:]}")
    return _json_line(r.stdout)


def peer(args, *flags: str) -> dict | None:
    if args.peers_python is None:
        return None
    cmd = [args.peers_python, str(REPO / "scripts" / "peers_torch.py"), "--model", args.model, "--threads",
           str(args.threads), "--steps", str(args.steps), "--warmup", "2", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    row = _json_line(r.stdout) if r.stdout.strip() else {"error": r.stderr[-500:]}
    if "error" in row:
        print(f"peer failed: {row['error']}", file=sys.stderr)
        return None
    return row


def has_torch(python: str) -> bool:
    code = "import torch, transformers, peft"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--chat-template", default=None, help="for a model without one (Gemma 3 270M: gemma)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3, help="alternated runs of each side per workload")
    ap.add_argument("--peers-python", default=os.environ.get("GGUF_FINETUNE_PEERS_PYTHON", sys.executable),
                    help="a Python with torch, transformers and peft (default: this one)")
    ap.add_argument("--workloads", default="text-ckpt,text,chat", help="comma list of text-ckpt, text, chat")
    ap.add_argument("--record", action="store_true", help="append the rows to docs/results.jsonl")
    args = ap.parse_args()
    args.model = args.model or default_model()
    if not has_torch(args.peers_python):
        print(f"{args.peers_python}: no torch/transformers/peft (pip install 'gguf-finetune[peers]'): our side only",
              file=sys.stderr)
        args.peers_python = None
    tpl = ["--chat-template", args.chat_template] if args.chat_template else []
    workloads = {  # name -> (ours' flags, peer's flags, the rate compared, its unit)
        "text-ckpt": (["--ctx", "256", "--batch", "1"], ["--mode", "text", "--ctx", "256", "--checkpointing"],
                      "tokens_per_s", "tokens/s"),
        "text": (["--ctx", "256", "--batch", "1", "--no-checkpointing"], ["--mode", "text", "--ctx", "256"],
                 "tokens_per_s", "tokens/s"),
        "chat": (["--data", str(CHAT), "--ctx", "256", "--batch", "4", "--no-checkpointing", *tpl],
                 ["--mode", "chat", "--data", str(CHAT), "--batch", "8", "--ctx", "256", *tpl],
                 "trained_tokens_per_s", "trained tokens/s"),
    }
    names = {"text-ckpt": "raw text, ctx 256, batch 1, checkpointing",
             "text": "raw text, ctx 256, batch 1, no checkpointing",
             "chat": "chat records, no checkpointing: ours packed (ctx 256, batch 4), peer padded (batch 8)"}
    rows = []
    for w in args.workloads.split(","):
        mine, theirs, key, unit = workloads[w]
        a, b, c, d = [], [], [], []
        for _ in range(args.runs):
            a.append(ours(args, *mine))
            if w == "chat":  # one record per row: before packing, and --no-pack now
                c.append(ours(args, *mine, "--no-pack", "--pad-to-ctx"))
                d.append(ours(args, *mine, "--no-pack"))
            p = peer(args, *theirs)
            if p is not None:
                b.append(p)
        med = statistics.median(r[key] for r in a)
        row = {"workload": names[w], "model": Path(args.model).name, "unit": unit, "threads": args.threads,
               "ours": round(med, 1), "ours_runs": [r[key] for r in a],
               "ours_bound": statistics.median(r["bound"] for r in a),
               "ours_peak_rss_mb": max(r["peak_rss_mb"] for r in a)}
        if b:
            pk = "trained_tokens_per_s" if w == "chat" else "tokens_per_s"
            row.update(peers=round(statistics.median(r[pk] for r in b), 1), peers_runs=[r[pk] for r in b],
                       peers_peak_rss_mb=max(r["peak_rss_mb"] for r in b))
            row["ratio"] = round(row["ours"] / row["peers"], 2)
        if c:
            row["ours_one_record_per_row"] = round(statistics.median(r[key] for r in c), 1)
            row["packing_gain"] = round(row["ours"] / row["ours_one_record_per_row"], 2)
            row["ours_no_pack"] = round(statistics.median(r[key] for r in d), 1)
        rows.append(row)
        extra = (f"; {row['packing_gain']}x one record per row of ctx 256 ({row['ours_one_record_per_row']}); "
                 f"--no-pack {row['ours_no_pack']}" if c else "")
        vs = f"transformers + PEFT {row['peers']} -> {row['ratio']}x" if b else "no peer"
        print(f"{names[w]}: ours {row['ours']} {unit} ({100 * row['ours_bound']:.0f}% of the products' bound), "
              f"{vs}{extra}", flush=True)
        if args.record:
            from benchlib import record

            record("peers", row)


if __name__ == "__main__":
    main()
