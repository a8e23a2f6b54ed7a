#!/usr/bin/env python3
"""Data parallel scaling: 1 rank x T threads against N ranks x T/N threads on this machine, and what
K machines would give.

    python scripts/bench_mpi.py                            # SmolLM2, raw text, ctx 256, global batch 2
    python scripts/bench_mpi.py --predict-model 7b.gguf --predict-rank 16 --record

Runs scripts/bench.py in one process (--threads T) and under ``mpiexec -n N`` (--threads T/N each),
alternated ``--runs`` times, and reports the medians of tokens/s and of the time a step spends in
the gradient Allreduce.  Then it predicts tokens/s for K machines (each running one process with
this machine's step): a step takes the measured step time plus a ring Allreduce of the LoRA
gradients, 2·(K−1)/K · bytes / bandwidth, at 1 and 10 Gbit/s — for the measured model and rank,
and for ``--predict-model`` at ``--predict-rank`` (its one-process step measured here).
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
sys.path.insert(0, str(REPO / "src"))


def bench(args, ranks: int, threads: int, model: str, rank: int, steps: int) -> dict:
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--model", model, "--threads", str(threads), "--steps",
           str(steps), "--batch", str(args.batch), "--ctx", str(args.ctx), "--lora-r", str(rank), "--json"]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(ranks), *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    return json.loads(next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("{")))


def grad_bytes(model: str, rank: int) -> int:
    """Bytes of the flat float32 gradient buffer the Allreduce sums (the ranks finetune uses)."""
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.lora import LoraLayout, LoraRanks, make_specs
    from gguf_finetune.model import read_hparams

    hp = read_hparams(open_gguf(model))
    ranks = LoraRanks.uniform(rank, **({"tok_embd": 0, "out": 0} if hp.tied_embeddings else {}))
    return 4 * LoraLayout(make_specs(hp, ranks)).size


def predict(step_s: float, positions: int, nbytes: int, machines=(1, 2, 4, 8, 16), gbits=(1, 10)) -> list[dict]:
    out = []
    for bw in gbits:
        for k in machines:
            t_ar = 2 * (k - 1) / k * nbytes * 8 / (bw * 1e9)
            out.append({"machines": k, "gbit_s": bw, "allreduce_ms": round(1000 * t_ar, 1),
                        "tokens_per_s": round(k * positions / (step_s + t_ar), 1),
                        "efficiency": round(step_s / (step_s + t_ar), 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the one-process run")
    ap.add_argument("--batch", type=int, default=2, help="global batch (divisible by --ranks)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--predict-model", default=None, help="another model to predict K machines for (e.g. 7B)")
    ap.add_argument("--predict-rank", type=int, default=16)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if args.model is None:
        from gguf_finetune.demo import default_model_path

        args.model = str(default_model_path())
    one, many = [], []
    for _ in range(args.runs):
        one.append(bench(args, 1, args.threads, args.model, args.lora_r, args.steps))
        many.append(bench(args, args.ranks, max(1, args.threads // args.ranks), args.model, args.lora_r, args.steps))
    rows = []
    for runs, layout in ((one, f"1 rank x {args.threads} threads"),
                         (many, f"{args.ranks} ranks x {max(1, args.threads // args.ranks)} threads")):
        row = {"layout": layout, "model": Path(args.model).name, "ctx": args.ctx, "batch": args.batch,
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
               "runs": [r["tokens_per_s"] for r in runs],
               "allreduce_ms_per_step": statistics.median(r["allreduce_ms_per_step"] for r in runs),
               "grad_mb": round(grad_bytes(args.model, args.lora_r) / 2**20, 2)}
        rows.append(row)
        print(f"{layout}: {row['tokens_per_s']} tokens/s (runs {row['runs']}), Allreduce "
              f"{row['allreduce_ms_per_step']} ms/step of {row['grad_mb']} MB", flush=True)
    targets = [(args.model, args.lora_r, one)]
    if args.predict_model:
        targets.append((args.predict_model, args.predict_rank,
                        [bench(args, 1, args.threads, args.predict_model, args.predict_rank, 1)]))
    predictions = []
    for model, rank, runs in targets:
        tok_s = statistics.median(r["tokens_per_s"] for r in runs)
        positions = args.batch * args.ctx
        step_s = positions / tok_s
        nbytes = grad_bytes(model, rank)
        for p in predict(step_s, positions, nbytes):
            p.update(model=Path(model).name, lora_r=rank, grad_mb=round(nbytes / 2**20, 1), step_s=round(step_s, 3))
            predictions.append(p)
        print(f"\n{Path(model).name}, rank {rank}: step {step_s:.2f} s for {positions} positions, gradients "
              f"{nbytes / 2**20:.1f} MB")
        for p in predictions[-10:]:
            print(f"  {p['machines']:>2} machines at {p['gbit_s']:>2} Gbit/s: Allreduce {p['allreduce_ms']:>7} ms, "
                  f"{p['tokens_per_s']:>8} tokens/s ({100 * p['efficiency']:.0f}% of linear)")
    if args.record:
        from benchlib import record

        for row in rows:
            record("mpi", row)
        for p in predictions:
            record("mpi-prediction", p)


if __name__ == "__main__":
    main()
