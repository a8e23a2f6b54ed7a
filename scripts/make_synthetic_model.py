#!/usr/bin/env python3
"""Write a random llama-shaped GGUF model of any size and tensor type.

    python scripts/make_synthetic_model.py out.gguf                       # tiny F32 model
    python scripts/make_synthetic_model.py 1b.gguf --shape 1b --qtype Q4_0
    python scripts/make_synthetic_model.py 7b.gguf --shape 7b --qtype Q4_0
    python scripts/make_synthetic_model.py m.gguf --n-embd 256 --n-layer 4 --n-head 8 --n-head-kv 2

Shapes: 1b = TinyLlama-1.1B (2048/5632/22 layers/32 heads/4 KV heads/32000 vocab),
7b = Llama-2-7B (4096/11008/32/32/32/32000).  Weights are random normal, so quantizing a 7B
model takes a few minutes (gguf.quants.quantize in numpy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

SHAPES = {
    "tiny": dict(n_vocab=512, n_embd=64, n_ff=160, n_layer=2, n_head=4, n_head_kv=4),
    "1b": dict(n_vocab=32000, n_embd=2048, n_ff=5632, n_layer=22, n_head=32, n_head_kv=4),
    "7b": dict(n_vocab=32000, n_embd=4096, n_ff=11008, n_layer=32, n_head=32, n_head_kv=32),
}


def main() -> None:
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--qtype", default="F32", help="type of the 2-D weights: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, ...")
    for k in ("n_vocab", "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_ctx_train"):
        ap.add_argument("--" + k.replace("_", "-"), type=int)
    ap.add_argument("--tied", action="store_true", help="no output.weight: the head is token_embd")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape])
    for k in ("n_vocab", "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_ctx_train"):
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    spec = SyntheticSpec(**shape, tied=args.tied, qtype=args.qtype.upper(), seed=args.seed,
                         std=0.02 if shape["n_embd"] >= 1024 else 0.1)
    write_synthetic_model(args.output, spec)
    print(f"wrote {args.output}: {spec}")


if __name__ == "__main__":
    main()
