#!/usr/bin/env python
"""Generation speed: tokens per second of incremental decoding (KV cache), as ``generate`` runs it.

Loads the model (default: the embedded SmolLM2-135M-Instruct Q4_1), prefills a short prompt (BLAS on
the float32 weight cache), then times ``--tokens`` decode steps of one token each (matvecs on the
file's quantized blocks, see engine/qmatvec.py; llama.cpp's default sampler chain included) after a few warm-up steps that also load the numba cache.  Prints the best and the
median of ``--repeat`` runs, with the load average of the machine (a shared machine's load
changes the numbers a lot).

    python scripts/bench_generate.py [-m MODEL] [--tokens 64] [--threads N] [--repeat 3] [--ctx 512] [--record]

``--record`` appends the run's row to docs/results.jsonl (kind "generate", scripts/benchlib.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import benchlib  # (imports neither numpy nor numba)
import gguf_finetune  # noqa: F401  (before numpy/numba start: the thread-waiting policy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--record", action="store_true",
                    help="append the row to docs/results.jsonl (kind \"generate\"; $GGUF_FINETUNE_RESULTS: another file)")
    a = ap.parse_args()

    from gguf_finetune.cli.common import set_threads

    used = set_threads(a.threads)  # before numpy is imported, so BLAS gets the count too
    from gguf_finetune.api import load_model
    from gguf_finetune.engine.generate import Decoder
    from gguf_finetune.sampling import Sampler, SamplerParams

    if not a.model:
        from gguf_finetune.demo import default_model_path

        a.model = str(default_model_path())
    t0 = time.perf_counter()
    model = load_model(a.model)
    t_load = time.perf_counter() - t0
    print(f"model {os.path.basename(a.model)}: loaded in {t_load:.1f} s, "
          f"{model.weights.cached_bytes / 2**20:.0f} MiB float32 cache, threads {used}")
    prompt = model.tokenize("Once upon a time, in a small village by the sea, there lived")
    sampler = Sampler(SamplerParams(seed=1))
    dec = Decoder.for_model(model, n_ctx=a.ctx)
    need = len(prompt) + 4 + a.tokens
    if need > a.ctx:
        raise SystemExit(f"--ctx {a.ctx} is too small for {need} tokens")

    rates, prompt_ms = [], []
    for _ in range(a.repeat):
        dec.reset()
        t0 = time.perf_counter()
        logits = dec.eval(prompt)[-1]
        t_prompt = time.perf_counter() - t0
        for _ in range(4):  # warm-up
            logits = dec.eval([sampler(logits)])[-1]
        t0 = time.perf_counter()
        for _ in range(a.tokens):
            logits = dec.eval([sampler(logits)])[-1]
        dt = time.perf_counter() - t0
        rates.append(a.tokens / dt)
        prompt_ms.append(t_prompt * 1e3)
        print(f"  prompt {len(prompt)} tokens {t_prompt * 1e3:.0f} ms; {a.tokens} tokens {dt:.2f} s "
              f"-> {rates[-1]:.1f} tokens/s")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"decode: best {max(rates):.1f} tokens/s, median {statistics.median(rates):.1f} tokens/s "
          f"(threads {used}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs)")
    if a.record:
        def sig(x: float) -> float:
            return float(f"{x:.4g}")

        benchlib.record("generate", {
            "model": os.path.basename(a.model), "threads": used, "ctx": a.ctx, "prompt_tokens": len(prompt),
            "tokens": a.tokens, "repeat": a.repeat, "load_s": sig(t_load),
            "cache_mib": round(model.weights.cached_bytes / 2**20), "prompt_ms": sig(min(prompt_ms)),
            "best_tokens_per_s": sig(max(rates)), "median_tokens_per_s": sig(statistics.median(rates))})


if __name__ == "__main__":
    main()
