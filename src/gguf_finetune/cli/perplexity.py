"""``gguf-finetune perplexity -f TEXT [-c CTX]``: llama-perplexity's number for a model (+ adapters).

stdout gets llama.cpp's lines: the running estimate after each chunk (``[1]8.1234,[2]...``) and
``Final estimate: PPL = X +/- Y`` (llama.cpp writes that last line to its log, stderr); what
llama.cpp logs about the run (token count, chunks, seconds per pass) goes to stderr.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from .generate import load, model_options
from .parser import MAX_CTX, Group, Parser, int_value, opt


@dataclass(frozen=True)
class PerplexityArgs:
    model: str = ""
    adapters: tuple[tuple[str, float], ...] = ()
    n_threads: int = 0
    file: str = ""
    n_ctx: int = 512
    n_batch: int = 2048
    n_chunks: int = -1


def perplexity_parser(prog: str) -> Parser:
    return Parser(prog, "Perplexity of a text file, computed as llama.cpp's llama-perplexity does: the text is "
                        "tokenized with BOS (when the vocabulary adds it), cut into chunks of --ctx tokens, each "
                        "evaluated on its own, scoring the second half of each chunk.", (
        Group("options", (
            *model_options(),
            opt("-f --file", "file", "the text (a trailing newline is dropped, as llama.cpp does)", "FNAME",
                default="(required)"),
            opt("-c --ctx", "n_ctx", "tokens per chunk (0 = the model's training context; llama.cpp's default is "
                "4096, its published numbers use 512)", "N", int_value(0, MAX_CTX)),
            opt("-b --batch", "n_batch", "tokens per forward pass; smaller than --ctx feeds a chunk in pieces "
                "through the KV cache (same result)", "N", int_value(1, MAX_CTX)),
            opt("--chunks", "n_chunks", "max number of chunks to process (-1 = all)", "N", int_value(-1)),
        )),), PerplexityArgs())


def run(argv: list[str], prog: str = "gguf-finetune perplexity") -> int:
    args = perplexity_parser(prog).parse(argv)
    if not args.file:
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..errors import UsageError

        raise UsageError("--file: no text given (-f FNAME)")
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..perplexity import n_chunks_for, perplexity, read_text_file, tokenize_text

    text = read_text_file(args.file)
    model = load(args)
    n_ctx = args.n_ctx or model.hparams.n_ctx_train
    t0 = time.perf_counter()
    tokens = tokenize_text(model.tokenizer, text)
    _log(f"perplexity: tokenizing the input .. {len(tokens)} tokens in {time.perf_counter() - t0:.2f} s")
    n_chunk = n_chunks_for(len(tokens), n_ctx, args.n_chunks)
    _log(f"perplexity: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={args.n_batch}")
    t_start = time.perf_counter()

    def on_chunk(i: int, ppl: float) -> None:
        if i == 1:
            per_pass = time.perf_counter() - t_start
            _log(f"perplexity: {per_pass:.2f} seconds per pass - ETA {per_pass * n_chunk / 60:.2f} minutes")
        sys.stdout.write(f"[{i}]{ppl:.4f},")
        sys.stdout.flush()

    res = perplexity(model, tokens, n_ctx, n_batch=args.n_batch, max_chunks=args.n_chunks, on_chunk=on_chunk)
    sys.stdout.write("\n")
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_error:.5f}")
    return 0


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
