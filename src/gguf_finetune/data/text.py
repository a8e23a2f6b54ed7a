"""llama.cpp finetune's plain-text pipeline: samples from a text file and their batches.

Ported from ``common/train.cpp`` (llama.cpp, July 2024): ``tokenize_file`` and
``get_example_targets_batch``; the shuffle and epochs are :mod:`.batches`.  See
docs/LLAMACPP_FINETUNE.md for the exact semantics.

Nothing here prints: llama.cpp's console lines are handed to ``report(line)`` (a callable taking one
string without the trailing newline), or collected in ``TextDataset.messages``.

The tokenizer is duck-typed: ``tok.tokenize(text, add_bos=False, add_eos=False, special=False)``
returning a list/array of ids, plus ``tok.bos_id`` / ``tok.eos_id``.  For ``--overlapping-samples`` the
longest token text in bytes is needed: ``tok.max_token_text_len`` (int) or ``tok.tokens`` (sequence of
str/bytes), or pass ``max_token_text_len=`` explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import UserError
from ..gguf_io import read_file_bytes
from .batches import Report, Shuffled, ShuffledBatches, ShuffleState, _noop
from .jsonl import RecordDataset


# --------------------------------------------------------------------------------------------------
# --escape
# --------------------------------------------------------------------------------------------------
def _strtol_hex2(two: bytes) -> int | None:
    """C ``strtol(x, &end, 16)`` on a 2-char buffer: the value if it consumed both chars, else None
    (strtol skips leading whitespace and takes an optional sign)."""
    t = two.decode("latin-1")
    i = 0
    while i < len(t) and t[i] in " \t\n\v\f\r":
        i += 1
    sign = 1
    if i < len(t) and t[i] in "+-":
        sign = -1 if t[i] == "-" else 1
        i += 1
    digits = t[i:]
    if not digits or any(c not in "0123456789abcdefABCDEF" for c in digits):
        return None
    return sign * int(digits, 16)


def process_escapes(s: str | bytes) -> bytes:
    """llama.cpp ``string_process_escapes`` (``--escape``): \\n \\r \\t \\' \\" \\\\ and \\xNN; others kept."""
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)
    out = bytearray()
    i, n = 0, len(b)
    simple = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'", ord('"'): b'"', ord("\\"): b"\\"}
    while i < n:
        c = b[i]
        if c == 0x5C and i + 1 < n:  # backslash with something after it
            i += 1
            e = b[i]
            if e in simple:
                out += simple[e]
            elif e == ord("x") and i + 2 < n and (v := _strtol_hex2(b[i + 1:i + 3])) is not None:
                out.append(v & 0xFF)
                i += 2
            else:
                out.append(0x5C)
                out.append(e)
        else:
            out.append(c)
        i += 1
    return bytes(out)


# --------------------------------------------------------------------------------------------------
# tokenize_file
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextDataset:
    """A tokenized training text: all samples' tokens back to back, and where each sample is.

    tokens  int32 [n_tokens]   (concatenation of the tokenized samples)
    begins  int64 [n_samples]  offset of each sample in ``tokens``
    sizes   int64 [n_samples]  token count of each sample (may exceed n_ctx; may be 0)
    messages                   the ``tokenize_file:`` lines llama.cpp printed, in order
    """

    tokens: np.ndarray
    begins: np.ndarray
    sizes: np.ndarray
    messages: tuple[str, ...] = ()

    @property
    def n_samples(self) -> int:
        return int(self.begins.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def n_unique_tokens(self) -> int:
        return int(np.unique(self.tokens).shape[0])

    def as_records(self, bos: int):
        """The samples as records for packed rows (--pack): [BOS] + the sample's tokens, every token
        after BOS trained, as a one-sample row of llama.cpp's pipeline starts (BOS, then the sample)."""
        sizes = self.sizes + 1
        begins = np.zeros_like(sizes)
        if sizes.size:
            begins[1:] = np.cumsum(sizes)[:-1]
        tokens = np.empty(int(sizes.sum()), dtype=np.int32)
        trained = np.ones(tokens.shape[0], dtype=np.uint8)
        tokens[begins] = bos
        trained[begins] = 0
        body = np.ones(tokens.shape[0], dtype=bool)
        body[begins] = False
        if self.n_samples:
            tokens[body] = np.concatenate([self.tokens[b:b + n] for b, n in zip(self.begins, self.sizes)])
        return RecordDataset(tokens, trained, begins, sizes, np.arange(self.n_samples, dtype=np.int64), self.messages)


_UTF8_LEN = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4], dtype=np.int64)


@njit(cache=True)
def _mark_utf8_units_nb(data, lut, units, nunits):  # pragma: no cover - compiled
    n = data.shape[0]
    offs = 0
    while offs < n:
        ln = lut[data[offs] >> 4]
        for i in range(ln):
            if offs + i < n:
                units[offs + i] = i
                nunits[offs + i] = ln
        offs += ln


def mark_utf8_units_ref(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Slow reference of llama.cpp ``mark_utf8_units``: per byte, its index inside its UTF-8
    character and that character's length, walking lead bytes from the start (int8 [n] each)."""
    units = np.zeros(len(data), dtype=np.int8)
    nunits = np.zeros(len(data), dtype=np.int8)
    offs = 0
    while offs < len(data):
        ln = int(_UTF8_LEN[data[offs] >> 4])
        for i in range(ln):
            if offs + i < len(data):
                units[offs + i] = i
                nunits[offs + i] = ln
        offs += ln
    return units, nunits


def mark_utf8_units(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Fast :func:`mark_utf8_units_ref` (numba)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    units = np.zeros(len(data), dtype=np.int8)
    nunits = np.zeros(len(data), dtype=np.int8)
    if len(data):
        _mark_utf8_units_nb(arr, _UTF8_LEN, units, nunits)
    return units, nunits


def _tokenize_bytes(tok, raw: bytes) -> list[int]:
    """llama_tokenize(text, add_special=false, parse_special=false) on a byte string."""
    fn = getattr(tok, "tokenize_bytes", None)
    if fn is not None:
        return list(fn(raw, add_bos=False, add_eos=False, special=False))
    return list(tok.tokenize(raw.decode("utf-8", errors="replace"), add_bos=False, add_eos=False, special=False))


def _max_token_text_len(tok, explicit: int | None) -> int:
    if explicit is not None:
        return int(explicit)
    v = getattr(tok, "max_token_text_len", None)
    if v is not None:
        return int(v() if callable(v) else v)
    toks = getattr(tok, "tokens", None)
    if toks is not None:
        best = 0
        for t in toks:
            b = t.encode("utf-8", "surrogateescape") if isinstance(t, str) else bytes(t)
            nul = b.find(b"\0")  # strlen() stops at a NUL
            best = max(best, len(b) if nul < 0 else nul)
        return best
    raise TypeError("tokenizer exposes neither max_token_text_len nor tokens (needed for overlapping samples)")


def _pattern_for_message(p: bytes) -> str:
    return p.decode("utf-8", errors="replace")


def tokenize_text(
    data: bytes,
    tokenizer,
    sample_start: bytes | str,
    include_sample_start: bool,
    overlapping_samples: bool,
    n_ctx: int,
    *,
    max_token_text_len: int | None = None,
    report: Report | None = None,
) -> TextDataset:
    """llama.cpp ``tokenize_file`` on the file's bytes (see module doc).  ``sample_start`` is the
    pattern after ``--escape`` processing; empty means one sample per token position."""
    rep = report or _noop
    msgs: list[str] = []

    def say(line: str) -> None:
        msgs.append(line)
        rep(line)

    pat = sample_start.encode("utf-8", "surrogateescape") if isinstance(sample_start, str) else bytes(sample_start)
    n_ctx = int(n_ctx)

    if len(pat) == 0:
        toks = np.asarray(_tokenize_bytes(tokenizer, data), dtype=np.int32)
        n = int(toks.shape[0])
        end = n - n_ctx if n >= n_ctx else 0
        # sample 0 is min(n_ctx, n) long; then every start 1..end-1 (sic: the window at n-n_ctx is skipped)
        begins = np.concatenate([[0], np.arange(1, max(end, 1), dtype=np.int64)]).astype(np.int64)
        sizes = np.full(begins.shape[0], n_ctx, dtype=np.int64)
        sizes[0] = min(n_ctx, n)
        say(f"tokenize_file: total number of samples: {begins.shape[0]}")
        return TextDataset(toks, begins, sizes, tuple(msgs))

    # positions of the pattern, non-overlapping, left to right
    starts: list[int] = []
    pos = data.find(pat, 0)
    while pos != -1:
        starts.append(pos)
        pos = data.find(pat, pos + len(pat))
    if not starts:
        say(
            f"tokenize_file: warning: sample start pattern '{_pattern_for_message(pat)}' not found. "
            "inserting single sample at data begin"
        )
        starts.append(0)

    units, nunits = mark_utf8_units(data)
    begin_offset = 0 if include_sample_start else len(pat)
    context_byte_len = _max_token_text_len(tokenizer, max_token_text_len) * n_ctx if overlapping_samples else 0

    n_data = len(data)
    n_samples = len(starts)
    out_begins = np.zeros(n_samples, dtype=np.int64)
    out_sizes = np.zeros(n_samples, dtype=np.int64)
    chunks: list[np.ndarray] = []
    n_out = 0
    too_big = too_small = empty = 0
    min_size, max_size = None, 0
    for i, s in enumerate(starts):
        b = s + begin_offset
        if overlapping_samples:
            e = min(n_data, b + context_byte_len)
        else:
            e = starts[i + 1] if i + 1 < n_samples else n_data
        if e < n_data and units[e] > 0:  # end inside a UTF-8 character: move to the next one
            e += int(nunits[e]) - int(units[e])
        nbytes = e - b
        out_begins[i] = n_out
        if nbytes <= 0:
            # (a negative size only arises from llama.cpp's own corner cases; it, too, adds nothing)
            empty += nbytes == 0
            continue
        ids = np.asarray(_tokenize_bytes(tokenizer, data[b:e]), dtype=np.int32)
        k = int(ids.shape[0])
        if k > n_ctx:
            too_big += 1
        elif k < n_ctx:
            too_small += 1
        max_size = max(max_size, k)
        min_size = k if min_size is None else min(min_size, k)
        out_sizes[i] = k
        chunks.append(ids)
        n_out += k

    if too_big:
        say(
            f"tokenize_file: warning: found {too_big} samples (max length {max_size}) that exceed context "
            f"length of {n_ctx}. samples will be cut off."
        )
    if too_small:
        say(
            f"tokenize_file: warning: found {too_small} samples (min length {min_size}) that are shorter than "
            f"context length of {n_ctx}."
        )
    if empty:
        say(f"tokenize_file: warning: found {empty} empty samples.")
    say(f"tokenize_file: total number of samples: {n_samples}")
    tokens = np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, dtype=np.int32)
    return TextDataset(tokens, out_begins, out_sizes, tuple(msgs))


def check_text(data: bytes, path: str | os.PathLike, what: str = "train data") -> None:
    """Refuse training text that cannot be what the user meant: only whitespace, or not UTF-8.

    llama.cpp trained on such files (invalid bytes became U+FFFD); here the error says where the
    first bad byte is, which is usually a file saved in another encoding.
    """
    if not data.strip():
        raise UserError(f"{what} '{path}': the file contains only whitespace")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{what} '{path}': not valid UTF-8 at byte {e.start} (line {line}, column {col}: "
                        f"{data[e.start:e.start + 4]!r}); convert the file to UTF-8") from None


def tokenize_file(
    path: str | os.PathLike,
    tokenizer,
    sample_start: bytes | str,
    include_sample_start: bool,
    overlapping_samples: bool,
    n_ctx: int,
    *,
    max_token_text_len: int | None = None,
    report: Report | None = None,
) -> TextDataset:
    """Read ``path`` and run :func:`tokenize_text`.  A missing or empty file is a UserError
    (llama.cpp warned and then crashed on the empty sample list), and so is one that holds only
    whitespace or is not UTF-8 (:func:`check_text`)."""
    p = os.fspath(path)
    data = read_file_bytes(p, "train data")
    if not data:
        raise UserError(f"train data '{p}': file is empty")
    check_text(data, p)
    return tokenize_text(
        data, tokenizer, sample_start, include_sample_start, overlapping_samples, n_ctx,
        max_token_text_len=max_token_text_len, report=report,
    )


def load_train_text(
    fn_train_data: str,
    tokenizer,
    sample_start: bytes | str,
    include_sample_start: bool,
    overlapping_samples: bool,
    n_ctx: int,
    *,
    max_token_text_len: int | None = None,
    report: Report | None = None,
) -> TextDataset:
    """finetune's ``main`` around ``tokenize_file``: reports the ``main: tokenize training data ...``,
    ``sample-start``, ``include-sample-start`` lines, the tokenize_file lines, then ``number of training
    tokens`` and ``number of unique tokens``.  Raises UserError if no token came out."""
    rep = report or _noop
    pat = sample_start.encode("utf-8", "surrogateescape") if isinstance(sample_start, str) else bytes(sample_start)
    rep(f"main: tokenize training data from {fn_train_data}")
    rep(f"main: sample-start: {_pattern_for_message(pat)}")
    rep(f"main: include-sample-start: {'true' if include_sample_start else 'false'}")
    ds = tokenize_file(
        fn_train_data, tokenizer, pat, include_sample_start, overlapping_samples, n_ctx,
        max_token_text_len=max_token_text_len, report=rep,
    )
    rep(f"main: number of training tokens: {ds.n_tokens}")
    rep(f"main: number of unique tokens: {ds.n_unique_tokens()}")
    if ds.n_tokens == 0 or ds.n_samples == 0:
        raise UserError(f"train data '{fn_train_data}': no tokens in the training samples")
    return ds


# --------------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchConfig:
    n_batch: int
    n_ctx: int
    fill_with_next_samples: bool = False
    separate_with_eos: bool = False
    separate_with_bos: bool = True
    sample_random_offsets: bool = False


def example_targets_batch_ref(
    example_id: int, offs, begins, sizes, data, cfg: BatchConfig, bos: int, eos: int, n_vocab: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Slow, literal transcription of llama.cpp ``get_example_targets_batch`` (per-token loop)."""
    n_samples = len(begins)
    tokens = np.zeros((cfg.n_batch, cfg.n_ctx), dtype=np.int32)
    targets = np.zeros((cfg.n_batch, cfg.n_ctx), dtype=np.int32)
    used = 0
    for k in range(cfg.n_batch):
        idx = (example_id + used) % n_samples
        off = int(offs[idx]) if cfg.sample_random_offsets else 0
        beg, size = int(begins[idx]), int(sizes[idx])
        used += 1
        tokens[k, 0] = bos
        sep_eos = not cfg.separate_with_eos
        sep_bos = not cfg.separate_with_bos
        for i in range(cfg.n_ctx):
            tok = eos
            if off >= size and cfg.fill_with_next_samples:
                if not sep_eos:
                    sep_eos = True
                elif not sep_bos:
                    sep_bos = True
                    tok = bos
                else:
                    sep_eos = not cfg.separate_with_eos
                    sep_bos = not cfg.separate_with_bos
                    off = 0
                    idx = (example_id + used) % n_samples
                    beg, size = int(begins[idx]), int(sizes[idx])
                    used += 1
            if off < size:
                tok = min(max(int(data[beg + off]), 0), n_vocab - 1)
                off += 1
            targets[k, i] = tok
            if i + 1 < cfg.n_ctx:
                tokens[k, i + 1] = tok
    return tokens, targets, used


def example_targets_batch(
    example_id: int, offs, begins, sizes, data, cfg: BatchConfig, bos: int, eos: int, n_vocab: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """llama.cpp ``get_example_targets_batch`` built segment by segment (same result as the _ref).

    Row k's target stream is: sample[off:] then, with fill_with_next_samples, [eos]? [bos]? and the
    next sample (an empty next sample contributes one eos), repeated; without it, eos padding.
    targets[k] = stream[:n_ctx]; tokens[k] = [bos] + stream[:n_ctx-1].
    Returns tokens int32 [n_batch, n_ctx], targets int32 [n_batch, n_ctx], samples used.
    """
    n_samples = len(begins)
    n_ctx = cfg.n_ctx
    tokens = np.empty((cfg.n_batch, n_ctx), dtype=np.int32)
    targets = np.empty((cfg.n_batch, n_ctx), dtype=np.int32)
    sep = ([eos] if cfg.separate_with_eos else []) + ([bos] if cfg.separate_with_bos else [])
    used = 0
    for k in range(cfg.n_batch):
        idx = (example_id + used) % n_samples
        off = int(offs[idx]) if cfg.sample_random_offsets else 0
        beg, size = int(begins[idx]), int(sizes[idx])
        used += 1
        row = targets[k]
        filled = 0
        while filled < n_ctx:
            if off < size:
                take = min(size - off, n_ctx - filled)
                row[filled:filled + take] = data[beg + off:beg + off + take]
                filled += take
                off += take
                continue
            if not cfg.fill_with_next_samples:
                row[filled:] = eos
                break
            take = min(len(sep), n_ctx - filled)
            row[filled:filled + take] = sep[:take]
            filled += take
            if filled >= n_ctx:
                break
            idx = (example_id + used) % n_samples
            beg, size = int(begins[idx]), int(sizes[idx])
            off = 0
            used += 1
            if size == 0:  # the load step itself emits the default eos
                row[filled] = eos
                filled += 1
        np.clip(row, 0, n_vocab - 1, out=row)
        tokens[k, 0] = bos
        tokens[k, 1:] = row[:-1]
    return tokens, targets, used


class BatchIterator(ShuffledBatches):
    """llama.cpp's text batches (:func:`example_targets_batch`) in shuffled order, resumable."""

    def __init__(self, dataset: TextDataset, state: ShuffleState, cfg: BatchConfig, bos_id: int, eos_id: int,
                 n_vocab: int, report: Report | None = None):
        super().__init__(dataset, state, report)
        self.cfg = cfg
        self.bos_id, self.eos_id, self.n_vocab = int(bos_id), int(eos_id), int(n_vocab)

    def make_batch(self, first: int, sh: Shuffled):
        tokens, targets, used = example_targets_batch(first, sh.offs, sh.begins, sh.sizes, self.dataset.tokens,
                                                      self.cfg, self.bos_id, self.eos_id, self.n_vocab)
        return tokens, targets, np.ones(targets.shape, dtype=np.float32), used


__all__ = [
    "BatchConfig",
    "BatchIterator",
    "TextDataset",
    "example_targets_batch",
    "example_targets_batch_ref",
    "load_train_text",
    "mark_utf8_units",
    "mark_utf8_units_ref",
    "process_escapes",
    "tokenize_file",
    "tokenize_text",
]
