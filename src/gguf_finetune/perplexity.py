"""Perplexity of a text, chunked exactly as llama.cpp's ``llama-perplexity``.

    tokens = tokenize_text(tokenizer, text)         # whole text, with BOS when the vocab adds one
    res = perplexity(model, tokens, n_ctx=512)      # res.ppl, res.ppl_error, res.running

llama.cpp's procedure (examples/perplexity/perplexity.cpp, ``perplexity``):

* the text needs at least 2·n_ctx tokens; it is cut into n_chunk = n_tokens // n_ctx chunks of
  n_ctx tokens (the tail is dropped), ``--chunks N`` keeps the first N;
* each chunk is evaluated on its own (an empty KV cache), its first token replaced by BOS when
  the vocabulary adds BOS;
* only the second half is scored: positions first = n_ctx/2 .. n_ctx-2 predict the next token,
  n_ctx - first - 1 tokens per chunk;
* nll = Σ -log softmax(logits)[next], nll2 = Σ nll², the running estimate after each chunk is
  exp(nll / count); the final line is ``PPL = exp(mean) +/- stderr·PPL`` with
  stderr = sqrt((mean(nll²) - mean²) / (count - 1)).

``n_batch`` only changes how a chunk is fed (in pieces of n_batch tokens through the KV cache
when smaller than n_ctx); in exact arithmetic the result does not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .engine import kernels as K
from .engine.generate import Decoder
from .errors import UserError
from .gguf_io import check_readable_file


@dataclass
class PerplexityResult:
    ppl: float  # exp(mean nll)
    ppl_error: float  # the "+/-" of llama.cpp's final estimate (nan when undefined)
    n_chunks: int
    n_ctx: int
    count: int  # tokens scored
    nll: float  # mean negative log-likelihood (nats)
    running: list[float] = field(default_factory=list)  # estimate after each chunk


def tokenize_text(tokenizer, text: str | bytes) -> list[int]:
    """llama.cpp's ``common_tokenize(ctx, text, add_special=true, parse_special=false)``."""
    if isinstance(text, bytes):
        return tokenizer.encode_bytes(text, add_special=True, parse_special=False)
    return tokenizer.encode(text, add_special=True, parse_special=False)


def read_text_file(path: str) -> bytes:
    """The file's bytes as llama.cpp's ``-f`` reads them: one trailing newline removed."""
    data = check_readable_file(path, "text file").read_bytes()
    return data[:-1] if data.endswith(b"\n") else data


def n_chunks_for(n_tokens: int, n_ctx: int, max_chunks: int = -1) -> int:
    """How many chunks llama.cpp evaluates; raises UserError when the text is too short."""
    if n_ctx < 2:
        raise UserError(f"perplexity needs a context of at least 2 tokens, got {n_ctx}")
    if n_tokens < 2 * n_ctx:
        raise UserError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of {n_ctx}; "
                        f"the text tokenizes to only {n_tokens} tokens")
    n = n_tokens // n_ctx
    return n if max_chunks < 0 else min(max_chunks, n)


def chunk_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits [n, V], targets [n] -> -log softmax(logits)[target] per row, float64 [n]."""
    return K.xent_forward(logits, np.asarray(targets, dtype=np.int64))


def perplexity(model, tokens: Sequence[int], n_ctx: int, n_batch: int = 2048, max_chunks: int = -1,
               on_chunk: Callable[[int, float], None] | None = None, bos_id: int | None = None,
               add_bos: bool | None = None) -> PerplexityResult:
    """llama.cpp's perplexity of ``tokens`` (already tokenized, see :func:`tokenize_text`).

    ``on_chunk(i, running_ppl)`` is called after chunk i (1-based) — the ``[i]x.xxxx,`` output.
    ``add_bos``/``bos_id`` default to the model's vocabulary.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n_chunk = n_chunks_for(tokens.shape[0], n_ctx, max_chunks)
    tok = model.tokenizer
    if add_bos is None:
        add_bos = bool(tok is not None and tok.add_bos)
    if add_bos and bos_id is None:
        bos_id = tok.bos_id
        if bos_id is None:
            raise UserError("the vocabulary asks for a BOS token but has none")
    first = n_ctx // 2
    dec = Decoder.for_model(model, n_ctx=n_ctx, n_batch=max(1, min(n_batch, n_ctx)))
    nll_sum = nll2_sum = 0.0
    count = 0
    running: list[float] = []
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()  # [n_ctx]
        if add_bos:
            chunk[0] = bos_id
        dec.reset()
        logits = dec.eval(chunk, logits_from=first)  # rows first..n_ctx-1 [n_ctx - first, V]
        nll = chunk_nll(logits[:-1], chunk[first + 1:])  # predictions of positions first+1..n_ctx-1
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += nll.shape[0]
        running.append(math.exp(nll_sum / count))
        if on_chunk is not None:
            on_chunk(i + 1, running[-1])
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else float("nan")
    return PerplexityResult(ppl, err, n_chunk, n_ctx, count, mean, running)


def perplexity_ref(model, tokens: Sequence[int], n_ctx: int, max_chunks: int = -1) -> PerplexityResult:
    """Slow reference: ``model.logits`` of each whole chunk and a float64 log-softmax in numpy."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n_chunk = n_chunks_for(tokens.shape[0], n_ctx, max_chunks)
    tok = model.tokenizer
    first = n_ctx // 2
    nlls, running = [], []
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if tok is not None and tok.add_bos:
            chunk[0] = tok.bos_id
        lg = model.logits(chunk).astype(np.float64)[first:-1]  # [n_ctx - first - 1, V]
        m = lg.max(-1, keepdims=True)
        lse = np.log(np.exp(lg - m).sum(-1)) + m[:, 0]
        nlls.append(lse - lg[np.arange(lg.shape[0]), chunk[first + 1:]])
        running.append(math.exp(np.concatenate(nlls).mean()))
    nll = np.concatenate(nlls)
    mean = float(nll.mean())
    var = float((nll * nll).mean() - mean * mean)
    ppl = math.exp(mean)
    return PerplexityResult(ppl, math.sqrt(var / (nll.size - 1)) * ppl, n_chunk, n_ctx, nll.size, mean, running)
