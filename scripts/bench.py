#!/usr/bin/env python3
"""Training steps (forward, backward, optimizer) on a real or synthetic model, timed.

    python scripts/bench.py                                  # SmolLM2-135M Q4_1, raw text, ctx 256, batch 1
    python scripts/bench.py --no-checkpointing
    python scripts/bench.py --low-memory
    python scripts/bench.py --data examples/chat/train.jsonl --batch 4     # chat records, packed
    python scripts/bench.py --data examples/chat/train.jsonl --batch 4 --no-pack
    python scripts/bench.py --data examples/chat/train.jsonl --batch 4 --no-pack --pad-to-ctx   # before packing
    python scripts/bench.py --model gemma.gguf --record       # append the row to docs/results.jsonl
    mpiexec -n 2 python scripts/bench.py --threads 1 --batch 2   # 2 ranks: rows rank::2 of every batch

Raw text: batches of random token ids, every position trained (llama.cpp's text pipeline).  Chat
(--data): the file's records through finetune's own pipeline (chat template, packing), batches in
the shuffled order; the rate that matters there is trained tokens/s.  Prints tokens/s, peak RSS, the
matmul FLOP/s and the fraction of the products' bound reached: the step's matmul FLOPs at the sgemm
rate measured in the same run (in a child process, so its buffers do not count in this one's RSS),
divided by the step's time.  Each configuration should run in its own process (peak RSS is per
process); scripts/bench_peers.py runs them next to transformers + PEFT.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402

import gguf_finetune  # noqa: E402,F401  (before numpy's threads start: sets the thread wait policy)


def default_model() -> str:
    from gguf_finetune.demo import default_model_path

    return str(default_model_path())


def sgemm_peak(n: int = 2048, reps: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def host_sgemm(threads: int) -> float:
    """The sgemm peak (2048³) measured in a child process with the step's thread count."""
    out = subprocess.run([sys.executable, __file__, "--sgemm-only", "--threads", str(threads)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[0])


def step_matmul_flops(hp, lora, tokens: np.ndarray, weights: np.ndarray, lo: np.ndarray | None,
                      checkpointing: bool, head_twice: bool = False) -> float:
    """Matmul FLOPs of one training step on this batch (rows of this rank): the block's projections
    (forward, dx backward, the recomputation under checkpointing), attention over the keys each query
    sees, the output head on the positions with a loss weight (its logits computed a second time when
    the head is streamed, ``head_twice``: engine.backward.head_streamed), and the LoRA terms.  The
    first block's q, k, v products into dx are not run when nothing below them is trained."""
    from gguf_finetune.arch import ATTN_K, ATTN_NORM, ATTN_Q, ATTN_QKV, ATTN_V, TOKEN_EMBD, weight  # (after sys.path)

    B, T = tokens.shape
    N = B * T
    C, D, Hq = hp.n_embd, hp.head_dim, hp.n_head
    mats = [shape for name, shape in hp.block_shapes().items() if len(shape) == 2]
    proj = sum(2 * N * n_out * n_in for n_out, n_in in mats)
    down = 2 * N * C * hp.n_ff
    keys = (np.arange(T)[None, :] - (0 if lo is None else lo) + 1).sum() * (B if lo is None else 1)
    attn = 2 * 2 * Hq * D * float(keys)  # q·k and p·v
    n_loss = int(np.count_nonzero(weights))
    head = 2 * n_loss * C * hp.n_vocab
    fwd = hp.n_layer * (proj + attn) + head
    bwd = hp.n_layer * (proj + 2 * attn) + head
    names = {sp.name for sp in lora.layout.specs}
    if not names & {weight(TOKEN_EMBD), weight(ATTN_NORM, 0)}:  # engine.backward.loss_and_grad's need_dx
        shapes = hp.block_shapes()
        bwd -= sum(2 * N * shapes[t][0] * shapes[t][1] for t in (ATTN_Q, ATTN_K, ATTN_V, ATTN_QKV) if t in shapes)
    recompute = (hp.n_layer - 1) * (proj - down + attn) if checkpointing else 0
    recompute += head if head_twice else 0
    lora_flops = sum(2 * N * s.rank * (s.n_in + s.n_out) * 3 for s in lora.layout.specs if s.kind != "norm")
    return fwd + bwd + recompute + lora_flops


def batches_from_data(args, model, B: int, T: int):
    """finetune's pipeline on a JSONL file: packed rows (or one record per row with --no-pack)."""
    from gguf_finetune.data.batches import PackedBatches, resume_shuffle
    from gguf_finetune.data.chat_template import GGUF_KEY, load_chat_template
    from gguf_finetune.data.jsonl import RecordBatchConfig, RecordBatchIterator, load_jsonl_dataset

    hp, tok = model.hparams, model.tokenizer
    tpl = lambda: load_chat_template(args.chat_template, model.gguf.get(GGUF_KEY, None), tok,  # noqa: E731
                                     family=(hp.arch, hp.spec.chat_template))
    ds = load_jsonl_dataset(args.data, tok, T, template_for=tpl)
    state = resume_shuffle(None, ds, args.data, 1)
    if args.no_pack:
        return RecordBatchIterator(ds, state, RecordBatchConfig(B, T), tok.eos_id, hp.n_vocab)
    return PackedBatches(ds, state, B, T, tok.eos_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF model (default: the embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--data", default=None, help="a JSONL file of chat records (default: raw text)")
    ap.add_argument("--chat-template", default=None)
    ap.add_argument("--no-pack", action="store_true", help="--data: one record per row")
    ap.add_argument("--pad-to-ctx", action="store_true",
                    help="--data --no-pack: every row padded to --ctx and every position through the output head, "
                         "as finetune computed chat data before packing (the trained tokens are the records')")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lora-r", type=int, default=4)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--no-flash", action="store_true")
    ap.add_argument("--low-memory", action="store_true")
    ap.add_argument("--record", action="store_true", help="append the row to docs/results.jsonl")
    ap.add_argument("--json", action="store_true", help="print the row as one JSON line")
    ap.add_argument("--sgemm-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pad_to_ctx and not (args.data and args.no_pack):
        ap.error("--pad-to-ctx needs --data and --no-pack")

    from gguf_finetune import dist
    from gguf_finetune.api import load_model
    from gguf_finetune.cli.common import keep_freed_memory, set_threads
    from gguf_finetune.config import AdamWConfig
    from gguf_finetune.engine.backward import head_streamed, loss_and_grad
    from gguf_finetune.engine.forward import compact_rows
    from gguf_finetune.engine.kernels import key_starts
    from gguf_finetune.lora import LoraRanks, init_lora
    from gguf_finetune.optim import adamw_step

    set_threads(args.threads)
    if args.sgemm_only:
        print(sgemm_peak())
        return
    world = dist.world()
    if args.batch % world.size:
        raise SystemExit(f"--batch {args.batch} is not divisible by the {world.size} ranks")
    peak_before = host_sgemm(args.threads) if world.is_root else 0.0
    keep_freed_memory()  # as finetune does
    path = args.model or default_model()
    t0 = time.perf_counter()
    model = load_model(path, memory_budget=0 if args.low_memory else None, with_tokenizer=True,
                       cache_head=args.no_checkpointing)  # as finetune chooses
    t_load = time.perf_counter() - t0
    hp = model.hparams
    ranks = LoraRanks.uniform(args.lora_r, **({"tok_embd": 0, "out": 0} if hp.tied_embeddings else {}))
    lora = init_lora(hp, ranks, alpha=args.lora_r, seed=1)
    grads = lora.like()
    m = np.zeros_like(lora.flat)
    v = np.zeros_like(lora.flat)
    adam, decay = AdamWConfig(alpha=1e-4), np.ones(lora.flat.shape, dtype=bool)  # decay on every element
    B, T = args.batch, args.ctx
    ckpt, flash = not args.no_checkpointing, not args.no_flash
    source = batches_from_data(args, model, B, T) if args.data else None
    rng = np.random.default_rng(0)

    def next_batch():
        if source is None:
            tokens = rng.integers(0, hp.n_vocab, size=(B, T))
            return tokens, np.roll(tokens, -1, axis=1), np.ones((B, T), np.float32), None, None
        b = source.next_batch()
        if args.pad_to_ctx:  # full rows of --ctx; the records' own weights say what is trained
            pad = ((0, 0), (0, T - b.tokens.shape[1]))
            return np.pad(b.tokens, pad), np.pad(b.targets, pad), np.pad(b.weights, pad), None, None
        return b.tokens, b.targets, b.weights, b.pos, b.seg_start

    stats = {"flops": 0.0, "positions": 0, "trained": 0, "allreduce": 0.0}

    def step(it: int) -> float:
        x, y, w, pos, seg = next_batch()
        grads.flat[:] = 0
        inv = 1.0 / max(float(w.sum()), 1.0)
        rows = world.rows
        # before packing the output head ran on every position, whatever its loss weight
        wp = np.ones_like(w) if args.pad_to_ctx else w
        loss = loss_and_grad(model.weights, hp, lora, grads, rows(x), rows(y), rows(wp), inv, checkpointing=ckpt,
                             flash=flash, pos=None if pos is None else rows(pos),
                             seg_start=None if seg is None else rows(seg))
        t_ar = world.allreduce_seconds
        world.allreduce(grads.flat)
        stats["allreduce"] += world.allreduce_seconds - t_ar
        adamw_step(lora.flat, grads.flat, m, v, it, 1.0, adam, decay)  # the trainer's optimizer step
        xr, wr, sr = rows(x), rows(wp), None if seg is None else rows(seg)
        packed = compact_rows(xr, xr, wr, None if pos is None else rows(pos), sr) if flash else None
        if packed is not None:  # the positions the engine runs (engine.forward.compact_rows)
            xr, _, wr, _, sr = packed
        lo = key_starts(*xr.shape, 0, sr)
        n_loss = int(np.count_nonzero(wr))
        stats["flops"] += step_matmul_flops(hp, lora, xr, wr, lo, ckpt,
                                            head_streamed(model.weights, n_loss, model.weights.dtype.itemsize))
        stats["positions"] += x.size
        stats["trained"] += int(np.count_nonzero(w))
        return loss

    t0 = time.perf_counter()
    step(1)  # warm-up: numba compilation or cache load
    t_warm = time.perf_counter() - t0
    step(2)  # second warm-up: first-touch page faults of buffers the first step freed
    stats.update(flops=0.0, positions=0, trained=0, allreduce=0.0)
    times = []
    for it in range(3, args.steps + 3):
        t0 = time.perf_counter()
        loss = step(it)
        times.append(time.perf_counter() - t0)
    n = len(times)
    dt = float(np.median(times))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: KiB)
    flops = world.sum(stats["flops"])[0] / n  # every rank's products of a step
    if not world.is_root:
        return
    # the sgemm rate of one rank's threads, times the ranks (each rank on its own cores of this machine)
    peak = max(peak_before, host_sgemm(args.threads)) * world.size
    mode = ("checkpointing" if ckpt else "no checkpointing") + (", low-memory" if args.low_memory else "") + \
        ("" if flash else ", no flash") + (f", {world.size} ranks" if world.size > 1 else "")
    workload = "raw text" if source is None else ("chat, packed" if not args.no_pack else
                                                  "chat, one record per row" + (" of --ctx" if args.pad_to_ctx else ""))
    row = {"model": Path(path).name, "arch": hp.arch, "workload": workload, "mode": mode, "ctx": T, "batch": B,
           "threads": args.threads, "ranks": world.size, "steps": n, "step_ms": [round(t * 1000, 1) for t in times],
           "tokens_per_s": round(stats["positions"] / n / dt, 1),
           "trained_tokens_per_s": round(stats["trained"] / n / dt, 1),
           "peak_rss_mb": round(rss), "matmul_gflops": round(flops / dt / 1e9, 1),
           "sgemm_gflops": round(peak / 1e9, 1), "bound": round(flops / peak / dt, 3),
           "allreduce_ms_per_step": round(1000 * stats["allreduce"] / n, 2), "loss": round(float(loss), 4)}
    print(f"model {row['model']} ({hp.arch}): load {t_load:.2f}s, first step {t_warm:.2f}s, loss {loss:.4f}")
    print(f"{workload}, {mode}: step {dt * 1000:.0f} ms (median of {n}), {row['tokens_per_s']} positions/s, "
          f"{row['trained_tokens_per_s']} trained tokens/s, peak RSS {row['peak_rss_mb']} MB, matmul "
          f"{row['matmul_gflops']} GFLOP/s = {100 * row['bound']:.0f}% of the products' bound at the sgemm rate "
          f"{row['sgemm_gflops']} GFLOP/s" + (f", Allreduce {row['allreduce_ms_per_step']} ms/step"
                                              if world.size > 1 else ""))
    if args.json:
        print(json.dumps(row))
    if args.record:
        from benchlib import record

        record("step", row)


if __name__ == "__main__":
    main()
