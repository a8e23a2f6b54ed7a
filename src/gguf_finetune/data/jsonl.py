"""JSONL instruction/chat data: records -> token sequences with a per-token "trained" mask -> batches.

Each record is one sample (see :mod:`.records` for the accepted shapes):

* chat records are rendered with the chat template (:mod:`.chat_template`); the trained tokens are
  each assistant turn: its content and whatever the template closes the turn with (``<|im_end|>``,
  ``</s>``, ``<|eot_id|>``), without trailing whitespace tokens.  Turns are found by rendering the
  conversation prefix by prefix and comparing token sequences (:func:`chat_mask`).
* ``{"prompt", "completion"}`` is the text prompt + completion with the completion's tokens trained
  (a token straddling the seam counts as completion), then EOS (trained); ``{"text"}`` is the text,
  all trained, then EOS.
* ``train_on_prompt`` trains every token.

The full rendered text is tokenized once with ``special=True`` (the template's control tokens become
those tokens; so do control-token texts inside the data, as with HF tokenizers and llama.cpp's chat
path); BOS goes in front when the model adds one and the text does not already start with it.  The
sequence trained on is therefore exactly the tokenization of the rendered text.

Batches: a row is a record's tokens cut at n_ctx+1 — tokens = row[:n_ctx], targets = row[1:n_ctx+1],
weights = trained[1:n_ctx+1]; padding (EOS) has weight 0, and a record's first token is never a
target.  With ``fill_with_next_samples`` the following (shuffled) records are packed behind it.  The
shuffle, epochs and resume state are the text pipeline's (:mod:`.batches`), so exact resume works the
same.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from .batches import Report, Shuffled, ShuffledBatches, ShuffleState, _noop
from .chat_template import ChatTemplate, ChatTemplateError
from .records import Record, count_kinds, read_jsonl

JSONL_EXTENSIONS = (".jsonl", ".ndjson", ".jsonlines")
_WS = b" \t\n\r\v\f"


def detect_format(path: str, data_format: str = "auto") -> str:
    """'jsonl' or 'text': ``data_format`` if given, else by the file name's extension."""
    if data_format in ("text", "jsonl"):
        return data_format
    return "jsonl" if os.fspath(path).lower().endswith(JSONL_EXTENSIONS) else "text"


# --------------------------------------------------------------------------------------------------
# records -> tokens and trained flags
# --------------------------------------------------------------------------------------------------
def _n_common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences."""
    n = min(len(a), len(b))
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _tokenize(tok, text: str) -> list[int]:
    return list(tok.tokenize(text, add_bos=False, add_eos=False, special=True))


def _is_space_token(tok, t: int) -> bool:
    piece = tok.token_to_piece(int(t), special=True)
    return bool(piece) and not piece.strip(_WS)


def _pieces_text(tok, ids: Sequence[int]) -> str:
    return b"".join(tok.token_to_piece(int(t), special=True) for t in ids).decode("utf-8", errors="replace")


_PIECES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _piece_table(tok) -> list[bytes]:
    """Every token's piece (special=True), built once per tokenizer."""
    table = _PIECES.get(tok)
    if table is None:
        table = [tok.token_to_piece(i, special=True) for i in range(tok.n_vocab)]
        _PIECES[tok] = table
    return table


def token_byte_offsets(tok, ids: Sequence[int], data: bytes) -> np.ndarray | None:
    """int64 [n, 2]: the [start, end) byte range in ``data`` of each token of ``ids`` = tokenize(data),
    found by aligning the tokens' pieces with the text; None if they do not align.

    When the pieces spell the text exactly (byte-level BPE) the ranges are their cumulative lengths.
    Otherwise they are aligned one by one, allowing the space SentencePiece puts in front of a text
    fragment (a piece starting with a space the text lacks) and whitespace that a special token with
    lstrip/rstrip swallowed.
    """
    table = _piece_table(tok) if hasattr(tok, "n_vocab") else None
    pieces = [table[t] for t in ids] if table is not None else \
        [tok.token_to_piece(int(t), special=True) for t in ids]
    out = np.zeros((len(ids), 2), dtype=np.int64)
    if b"".join(pieces) == data:
        ends = np.cumsum(np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces)))
        out[:, 1] = ends
        out[1:, 0] = ends[:-1]
        return out
    n = len(data)
    pos = 0
    for i, piece in enumerate(pieces):
        q = pos
        while True:
            if data.startswith(piece, q):
                break
            if piece[:1] == b" " and data.startswith(piece[1:], q):  # SentencePiece's inserted space
                piece = piece[1:]
                break
            if q < n and data[q] in _WS:  # whitespace a special token stripped
                q += 1
                continue
            return None
        out[i] = q, q + len(piece)
        pos = q + len(piece)
    if data[pos:].strip(_WS):
        return None
    return out


def _token_at(offsets: np.ndarray, byte_pos: int) -> int:
    """Index of the token holding byte ``byte_pos`` (or the first token after it)."""
    return int(np.searchsorted(offsets[:, 1], byte_pos, side="right"))


def _tokens_before(offsets: np.ndarray, byte_pos: int) -> int:
    """Number of tokens that start before byte ``byte_pos`` (the end of a span ending there)."""
    return int(np.searchsorted(offsets[:, 0], byte_pos, side="left"))


def _whole_tokens_before(offsets: np.ndarray, byte_pos: int) -> int:
    """Number of leading tokens that end at or before byte ``byte_pos``."""
    return int(np.searchsorted(offsets[:, 1], byte_pos, side="right"))


class _Text:
    """A rendered text with its tokens; maps character positions to tokens."""

    def __init__(self, tok, text: str, ids: Sequence[int]):
        self.tok, self.text, self.ids = tok, text, ids
        self.offsets = token_byte_offsets(tok, ids, text.encode("utf-8"))

    def byte(self, char_pos: int) -> int:
        return len(self.text[:char_pos].encode("utf-8"))

    def start_token(self, char_pos: int) -> int:
        """First token of a span starting at ``char_pos`` (a token straddling it belongs to the span)."""
        if char_pos <= 0:
            return 0
        if self.offsets is not None:
            return _token_at(self.offsets, self.byte(char_pos))
        return _n_common(_tokenize(self.tok, self.text[:char_pos]), self.ids)

    def end_token(self, char_pos: int) -> int:
        """One past the last token of a span ending at ``char_pos`` (straddling tokens included)."""
        if self.offsets is not None:
            return _tokens_before(self.offsets, self.byte(char_pos))
        pb = _tokenize(self.tok, self.text[:char_pos])
        k = _n_common(pb, self.ids)
        return k + 1 if k < len(pb) else k

    def whole_end_token(self, char_pos: int) -> int:
        """One past the last token lying entirely before ``char_pos``."""
        if self.offsets is not None:
            return _whole_tokens_before(self.offsets, self.byte(char_pos))
        return _n_common(_tokenize(self.tok, self.text[:char_pos]), self.ids)


def mask_by_prefixes(tok, text: str, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """uint8 [n] trained flags for ``ids`` = tokenize(text, special=True) from character spans, the token
    boundaries found by tokenizing the text up to each span boundary (slow; no offsets needed): a span
    [a, b) covers the tokens from the one holding character a to the one holding character b-1."""
    m = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        ka = _n_common(_tokenize(tok, text[:a]), ids) if a > 0 else 0
        pb = _tokenize(tok, text[:b])
        kb = _n_common(pb, ids)
        if kb < len(pb):  # token kb straddles b: it holds character b-1
            kb += 1
        m[ka:max(kb, ka)] = 1
    return m


def chat_mask(template: ChatTemplate, tok, messages: Sequence[dict], full: str, ids: Sequence[int],
              train_from: int = 0) -> np.ndarray:
    """uint8 [n] flags of the tokens of the trained assistant turns (index >= train_from) in ``ids`` =
    tokenize(full), ``full`` = the rendering of the whole conversation.

    Turn i starts where render(messages[:i], add_generation_prompt=True) ends in the full text and
    ends where render(messages[:i+1]) stops agreeing with it (so what a template adds only at the very
    end of a conversation is left out), minus trailing whitespace tokens.  With token offsets the start
    is a character position mapped to a token (one straddling it belongs to the turn) and so is the
    end when render(messages[:i+1]) is a prefix of the text (only whole tokens count); otherwise the
    renderings are tokenized and compared with ``ids`` token by token, which keeps markers whole
    even when the next turn begins with the same characters.  When the generation prompt is not a prefix of
    the conversation, or the span does not hold the message's content (a template that renders a turn
    differently in context), the turn is the content as found in the text plus the template's end of
    turn as far as it agrees.  ChatTemplateError if the content is not in the text.
    """
    m = np.zeros(len(ids), dtype=np.uint8)
    where = _Text(tok, full, ids)
    prev = 0  # token index where the previous trained turn ended
    search_from = 0  # character position for the content search
    for i, msg in enumerate(messages):
        if i < train_from or msg.get("role") != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[:i + 1], add_generation_prompt=False)
        content = str(msg.get("content", "")).strip()
        s = None
        if where.offsets is not None:
            if full.startswith(prompt):
                s = where.start_token(len(prompt))
            agree = _common_prefix_len(upto, full)
            if agree == len(upto):  # the usual case: the conversation goes on after this turn's text
                e = where.whole_end_token(agree)
            else:  # what agrees may be part of a marker (phi3: "<|" of "</s>" vs "<|user|>"): compare tokens
                e = _n_common(_tokenize(tok, upto), ids)
        else:
            p_ids = _tokenize(tok, prompt)
            if _n_common(p_ids, ids) == len(p_ids):
                s = len(p_ids)
            e = _n_common(_tokenize(tok, upto), ids)
        if s is not None:
            te = e
            while te > s and _is_space_token(tok, ids[te - 1]):
                te -= 1
            if s >= prev and te > s and content in _pieces_text(tok, ids[s:te]):
                m[s:te] = 1
                prev = te
                search_from = max(search_from, len(prompt))
                continue
        # the content as found in the text, plus the template's end of turn as far as the text agrees
        if not content:
            continue  # an empty reply the template renders as nothing: nothing to train
        search_from = max(search_from, _common_prefix_len(prompt, full))
        pos = full.find(content, search_from)
        if pos < 0:
            raise ChatTemplateError(f"chat template ({template.name}): cannot find assistant message {i} in the "
                                    f"rendered conversation (the template changes its text)")
        cend = pos + len(content)
        ts, te = where.start_token(pos), where.end_token(cend)
        if e >= te:
            te = e  # rendering messages[:i+1] agrees with the full text past the content: its end of turn
        else:
            k = upto.rfind(content)
            if k >= 0:  # the end of turn in whole tokens
                agree = _common_prefix_len(upto[k + len(content):], full[cend:])
                te = max(te, where.whole_end_token(cend + agree))
        while te > ts and _is_space_token(tok, ids[te - 1]):
            te -= 1
        m[ts:te] = 1
        prev = max(prev, te)
        search_from = cend
    return m


@dataclass(frozen=True)
class EncodedRecord:
    """A record as the model sees it: ids int32 [n], trained uint8 [n] (1 = predicting this token is
    trained; the first token never is), the rendered text and its source line."""

    text: str
    ids: np.ndarray
    trained: np.ndarray
    line: int
    kind: str


def encode_record(rec: Record, tok, template: ChatTemplate | None, train_on_prompt: bool = False
                  ) -> EncodedRecord:
    """Render the record, tokenize the text once (special=True), mark the trained tokens; BOS in front
    when the model adds one and the text does not start with it; a trained EOS after prompt/completion
    and text records."""
    add_eos = rec.kind != "chat"
    if rec.kind == "chat":
        if template is None:
            raise ValueError("chat records need a chat template")
        text = template.render(rec.messages, add_generation_prompt=False)
        ids = _tokenize(tok, text)
        if train_on_prompt:
            trained = np.ones(len(ids), dtype=np.uint8)
        else:
            trained = chat_mask(template, tok, rec.messages, text, ids, rec.train_from)
    elif rec.kind == "prompt_completion":
        text = rec.prompt + rec.completion
        ids = _tokenize(tok, text)
        trained = np.zeros(len(ids), dtype=np.uint8)
        start = 0 if train_on_prompt else _Text(tok, text, ids).start_token(len(rec.prompt))
        trained[start:] = 1
    else:
        text = rec.text
        ids = _tokenize(tok, text)
        trained = np.ones(len(ids), dtype=np.uint8)
    bos, eos = tok.bos_id, tok.eos_id
    if getattr(tok, "add_bos", False) and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, int(bos))
        trained = np.concatenate([[0], trained])
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(int(eos))
        trained = np.concatenate([trained, [1]])
    trained = np.asarray(trained, dtype=np.uint8)
    if trained.shape[0]:
        trained[0] = 0
    return EncodedRecord(text, np.asarray(ids, dtype=np.int32), trained, rec.line, rec.kind)


# --------------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordDataset:
    """Tokenized records back to back (the shape of :class:`~.text.TextDataset`, plus the mask).

    tokens   int32 [n_tokens]    all records' tokens
    trained  uint8 [n_tokens]    1 = this token is a trained target
    begins   int64 [n_samples]   offset of each record in ``tokens``
    sizes    int64 [n_samples]   token count of each record
    lines    int64 [n_samples]   the record's line in the file
    """

    tokens: np.ndarray
    trained: np.ndarray
    begins: np.ndarray
    sizes: np.ndarray
    lines: np.ndarray
    messages: tuple[str, ...] = ()

    @property
    def n_samples(self) -> int:
        return int(self.begins.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.sizes.sum())

    def n_unique_tokens(self) -> int:
        return int(np.unique(np.concatenate([self.tokens[b:b + s] for b, s in zip(self.begins, self.sizes)]
                                            or [np.zeros(0, np.int32)])).shape[0])

    def n_trained(self) -> int:
        """Trained tokens over all records (first token of each excluded, no truncation applied)."""
        return int(sum(int(self.trained[b:b + s].sum()) for b, s in zip(self.begins, self.sizes)))

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        b, s = int(self.begins[i]), int(self.sizes[i])
        return self.tokens[b:b + s], self.trained[b:b + s]

    def subset(self, idx: np.ndarray) -> "RecordDataset":
        """The records ``idx`` (in that order), sharing the token arrays."""
        idx = np.asarray(idx, dtype=np.int64)
        return RecordDataset(self.tokens, self.trained, self.begins[idx], self.sizes[idx], self.lines[idx],
                             self.messages)

    def n_longer_than(self, n_ctx: int) -> int:
        """Records cut off by a context of n_ctx (a row holds n_ctx + 1 tokens)."""
        return int((self.sizes > n_ctx + 1).sum())


def build_dataset(encoded: Sequence[EncodedRecord], messages: tuple[str, ...] = ()) -> RecordDataset:
    sizes = np.array([e.ids.shape[0] for e in encoded], dtype=np.int64)
    begins = np.zeros(len(encoded), dtype=np.int64)
    if len(encoded):
        begins[1:] = np.cumsum(sizes)[:-1]
    tokens = np.concatenate([e.ids for e in encoded]).astype(np.int32) if encoded else np.zeros(0, np.int32)
    trained = np.concatenate([e.trained for e in encoded]).astype(np.uint8) if encoded else np.zeros(0, np.uint8)
    lines = np.array([e.line for e in encoded], dtype=np.int64)
    return RecordDataset(tokens, trained, begins, sizes, lines, messages)


def encode_records(records: Sequence[Record], tok, template: ChatTemplate | None, train_on_prompt: bool,
                   path: str, what: str = "train data") -> list[EncodedRecord]:
    """:func:`encode_record` for each record; template errors name the file and line."""
    out = []
    for rec in records:
        try:
            out.append(encode_record(rec, tok, template, train_on_prompt))
        except ChatTemplateError as e:
            raise UserError(f"{what} '{path}': line {rec.line}: {e}") from None
    return out


def needs_template(records: Sequence[Record]) -> bool:
    return any(r.kind == "chat" for r in records)


def load_jsonl_dataset(
    path: str,
    tok,
    n_ctx: int,
    *,
    template_for: Callable[[], ChatTemplate] | None = None,
    train_on_prompt: bool = False,
    what: str = "train data",
    report: Report | None = None,
) -> RecordDataset:
    """Read, render, tokenize and mask a JSONL file; report what was found.

    ``template_for()`` is called (once) only if the file has chat records, so a file without any
    needs neither a template nor jinja2.
    """
    rep = report or _noop
    msgs: list[str] = []

    def say(line: str) -> None:
        msgs.append(line)
        rep(line)

    records = read_jsonl(path, what)
    kinds = count_kinds(records)
    template = None
    if needs_template(records):
        if template_for is None:
            raise UserError(f"{what} '{path}': has chat records but no chat template was given")
        template = template_for()
        say(f"load_jsonl: chat template: {template.name}")
    say(f"load_jsonl: {len(records)} records (chat: {kinds['chat']}, prompt/completion: "
        f"{kinds['prompt_completion']}, text: {kinds['text']})")
    ds = build_dataset(encode_records(records, tok, template, train_on_prompt, path, what))
    n_cut = ds.n_longer_than(n_ctx)
    if n_cut:
        say(f"load_jsonl: warning: found {n_cut} records (max length {int(ds.sizes.max())} tokens) longer than "
            f"the context of {n_ctx} (+1) tokens. they will be cut off.")
    no_train = int(sum(1 for b, s in zip(ds.begins, ds.sizes) if not ds.trained[b:b + min(s, n_ctx + 1)].any()))
    if no_train:
        say(f"load_jsonl: warning: {no_train} records have no trained token within the context of {n_ctx}.")
    say(f"load_jsonl: total number of samples: {ds.n_samples}")
    return replace(ds, messages=tuple(msgs))


# --------------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordBatchConfig:
    n_batch: int
    n_ctx: int
    fill_with_next_samples: bool = False


def record_batch_ref(example_id: int, begins, sizes, tokens, trained, cfg: RecordBatchConfig, pad: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Slow per-token reference of :func:`record_batch`."""
    n = len(begins)
    T = cfg.n_ctx
    X = np.zeros((cfg.n_batch, T), np.int32)
    Y = np.zeros((cfg.n_batch, T), np.int32)
    W = np.zeros((cfg.n_batch, T), np.float32)
    used = 0
    for k in range(cfg.n_batch):
        stream: list[tuple[int, int]] = []
        zero_run = 0
        while True:
            idx = (example_id + used) % n
            used += 1
            b, s = int(begins[idx]), int(sizes[idx])
            for j in range(s):
                if len(stream) < T + 1:
                    stream.append((int(tokens[b + j]), int(trained[b + j]) if j > 0 else 0))
            zero_run = zero_run + 1 if s == 0 else 0
            if not cfg.fill_with_next_samples or len(stream) >= T + 1 or zero_run >= n:
                break
        for i in range(T):
            X[k, i] = stream[i][0] if i < len(stream) else pad
            if i + 1 < len(stream):
                Y[k, i] = stream[i + 1][0]
                W[k, i] = stream[i + 1][1]
            else:
                Y[k, i] = pad
    return X, Y, W, used


def record_batch(example_id: int, begins, sizes, tokens, trained, cfg: RecordBatchConfig, pad: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rows of records starting at shuffled index ``example_id`` (indices wrap around).

    Row k's stream is a record's tokens (with ``fill_with_next_samples``: followed by the next
    records' until n_ctx+1 tokens), cut at n_ctx+1 and padded with ``pad``; a record's first token
    carries weight 0.  tokens = stream[:n_ctx], targets = stream[1:], weights = trained(stream)[1:].
    Returns tokens int32 [B, T], targets int32 [B, T], weights float32 [B, T], records used.
    """
    n = len(begins)
    B, T = cfg.n_batch, cfg.n_ctx
    stream = np.full((B, T + 1), pad, dtype=np.int32)
    flags = np.zeros((B, T + 1), dtype=np.float32)
    used = 0
    for k in range(B):
        filled = 0
        zero_run = 0
        while True:
            idx = (example_id + used) % n
            used += 1
            b, s = int(begins[idx]), int(sizes[idx])
            take = min(s, T + 1 - filled)
            if take > 0:
                stream[k, filled:filled + take] = tokens[b:b + take]
                flags[k, filled:filled + take] = trained[b:b + take]
                flags[k, filled] = 0.0  # a record's first token is not predicted from it
                filled += take
            zero_run = zero_run + 1 if s == 0 else 0
            if not cfg.fill_with_next_samples or filled >= T + 1 or zero_run >= n:
                break
    return stream[:, :T].copy(), stream[:, 1:].copy(), flags[:, 1:].copy(), used


class RecordBatchIterator(ShuffledBatches):
    """Batches of JSONL records (:func:`record_batch`) in shuffled order; weights are the records'
    trained masks."""

    def __init__(self, dataset: RecordDataset, state: ShuffleState, cfg: RecordBatchConfig, eos_id: int,
                 n_vocab: int, report: Report | None = None):
        super().__init__(dataset, state, report)
        self.cfg = cfg
        self.pad_id = int(eos_id)

    def make_batch(self, first: int, sh: Shuffled):
        ds = self.dataset
        x, y, w, used = record_batch(first, sh.begins, sh.sizes, ds.tokens, ds.trained, self.cfg, self.pad_id)
        t = row_width(first, sh.sizes, self.cfg)
        return x[:, :t].copy(), y[:, :t].copy(), w[:, :t].copy(), used


def row_width(first: int, sizes, cfg: RecordBatchConfig) -> int:
    """Positions a batch of one record per row needs: its longest record's (at most n_ctx; the
    padding after it would compute nothing any loss depends on).  n_ctx with fill_with_next_samples."""
    if cfg.fill_with_next_samples:
        return cfg.n_ctx
    n = len(sizes)
    longest = max(int(sizes[(first + k) % n]) for k in range(cfg.n_batch))
    return max(1, min(cfg.n_ctx, longest - 1))


def record_eval_batches(ds: RecordDataset, n_batch: int, n_ctx: int, pad: int
                        ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every record once, in order, one per row (no packing): [(tokens, targets, weights)], the last
    batch possibly smaller."""
    out = []
    for i in range(0, ds.n_samples, n_batch):
        nb = min(n_batch, ds.n_samples - i)
        cfg = RecordBatchConfig(nb, n_ctx)
        x, y, w, _ = record_batch(i, ds.begins, ds.sizes, ds.tokens, ds.trained, cfg, pad)
        t = row_width(i, ds.sizes, cfg)
        out.append((x[:, :t].copy(), y[:, :t].copy(), w[:, :t].copy()))
    return out


__all__ = [
    "EncodedRecord", "JSONL_EXTENSIONS", "RecordBatchConfig", "RecordBatchIterator", "RecordDataset",
    "build_dataset", "chat_mask", "detect_format", "encode_record", "encode_records", "load_jsonl_dataset",
    "mask_by_prefixes", "needs_template", "record_batch", "record_batch_ref", "record_eval_batches",
    "token_byte_offsets",
]
