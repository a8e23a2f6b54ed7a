"""SentencePiece-style tokenizer (``tokenizer.ggml.model = "llama"``), as llama.cpp's llm_tokenizer_spm.

Per text fragment: prefix a space if the fragment starts the text or follows a special token (and
``add_space_prefix``), replace every ' ' by '▁', then merge adjacent symbols (UTF-8 characters at
first) greedily by the score of the token their concatenation forms (highest first, leftmost on
ties).  A final symbol that is no token is emitted as its UTF-8 bytes (``<0xXX>`` tokens).

llama.cpp runs that merge over the whole fragment.  Doing so in Python is slow, so the fragment is
cut into chunks at places no merge can cross, and each chunk is merged once and cached:

    A merge only ever produces a vocabulary token, so two adjacent characters ``a``, ``b`` end up
    in different tokens whenever no token text contains ``ab``.  Merges on either side of such a
    boundary never interact: each side's queue order (score, then position) is the same as if it
    were alone.  So tokenizing the chunks separately and concatenating is exactly the same.

The cut points used: before each '▁' whose left neighbour never precedes '▁' inside a token, and
around '\\n', '\\r', '\\t' when no multi-character token contains them (all checked on the vocabulary
at load time; for Llama's vocabulary that is: every word with its leading '▁'s, and newlines; for
Gemma 3's 262k-token vocabulary only '>' glues to a following '▁', and its newline, tab and
multi-space runs never reach the merge: they are user-defined tokens, cut out beforehand).
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import UserError
from .base import Tokenizer
from .merge import merge_concat
from .utf8 import lead_byte_groups
from .vocab import ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_USER_DEFINED, Vocab

SPACE = "\u2581"  # '▁'
SPACE_BYTES = SPACE.encode()


def _is_char(g: bytes) -> bool:
    try:
        return len(g.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


class SPMTokenizer(Tokenizer):
    kind = "spm"

    def __init__(self, vocab: Vocab):
        super().__init__(vocab)
        tok = self._token_to_id
        # score of the token a text forms (the last id with that text, as llama.cpp's map)
        self._neg_score = dict(zip(vocab.texts, (-vocab.scores.astype(np.float64)).tolist()))
        self._byte_ids: list[int | None] = []
        for b in range(256):
            i = tok.get(f"<0x{b:02X}>")
            if i is None:  # llama.cpp then tries the byte itself as a token
                i = tok.get(bytes([b]).decode("utf-8", "surrogateescape"))
            self._byte_ids.append(i)
        self._chunk_re = _chunk_regex(vocab.texts)
        self._utf8: bool | None = None  # every token text valid UTF-8? (computed when first needed)
        self._tok_b: dict[bytes, int] | None = None
        self._score_b: dict[bytes, float] | None = None

    # -- merging -----------------------------------------------------------------------------
    def _byte_id(self, b: int) -> int:
        i = self._byte_ids[b]
        if i is None:
            # llama.cpp aborts here (std::out_of_range); fall back to the unknown token if there is one
            if self.unk_id is None:
                raise UserError(f"SPM vocabulary has no byte token <0x{b:02X}> and no unknown token")
            return self.unk_id
        return i

    def tokenize_chunk(self, chunk: str) -> tuple[int, ...]:
        """Token ids of an already escaped ('▁' for spaces) piece of text, merged as one unit."""
        tok = self._token_to_id
        out: list[int] = []
        for sym in merge_concat(list(chunk), self._neg_score):
            i = tok.get(sym)
            if i is not None:
                out.append(i)
            else:
                out.extend(self._byte_id(b) for b in sym.encode("utf-8", "surrogatepass"))
        return tuple(out)

    def _encode_fragment(self, text: str, out: list[int], after_special: bool) -> None:
        if self.add_space_prefix and after_special:
            text = " " + text
        self._encode_escaped(text.replace(" ", SPACE), out)

    def _encode_escaped(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for chunk in self._chunk_re.findall(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = self.tokenize_chunk(chunk)
                self._remember(chunk, ids)
            out.extend(ids)

    def _encode_fragment_bytes(self, data: bytes, out: list[int], after_special: bool) -> None:
        """A fragment that is not valid UTF-8: llama.cpp's symbols are lead-byte groups of bytes."""
        if self.add_space_prefix and after_special:
            data = b" " + data
        groups = lead_byte_groups(data.replace(b" ", SPACE_BYTES))
        if not self._vocab_is_utf8():
            # exotic vocabulary with non-UTF-8 token texts: merge the byte symbols directly
            tok = self._bytes_token_to_id()
            for sym in merge_concat(groups, self._bytes_neg_score()):
                i = tok.get(sym)
                out.extend((i,) if i is not None else (self._byte_id(b) for b in sym))
            return
        # A group that is not one valid character is in no (valid UTF-8) token, so nothing merges
        # with it: the valid runs between such groups are tokenized on their own, exactly.
        run: list[bytes] = []
        for g in groups:
            if _is_char(g):
                run.append(g)
                continue
            if run:
                self._encode_escaped(b"".join(run).decode("utf-8"), out)
                run = []
            out.extend(self._byte_id(b) for b in g)
        if run:
            self._encode_escaped(b"".join(run).decode("utf-8"), out)

    def _vocab_is_utf8(self) -> bool:
        if self._utf8 is None:
            self._utf8 = all(not any("\udc80" <= c <= "\udcff" for c in t) for t in self._texts if not t.isascii())
        return self._utf8

    def _bytes_token_to_id(self) -> dict[bytes, int]:
        if self._tok_b is None:
            self._tok_b = {t: i for i, t in enumerate(self.vocab.raw)}
        return self._tok_b

    def _bytes_neg_score(self) -> dict[bytes, float]:
        if self._score_b is None:
            scores = self.vocab.scores.tolist()
            self._score_b = {t: -scores[i] for t, i in self._bytes_token_to_id().items()}
        return self._score_b

    def encode_unchunked(self, text: str, after_special: bool = True) -> list[int]:
        """The same as one fragment of :meth:`encode`, merging the whole text at once (slow; for tests)."""
        if not text:
            return []
        if self.add_space_prefix and after_special:
            text = " " + text
        return list(self.tokenize_chunk(text.replace(" ", SPACE)))

    # -- pieces --------------------------------------------------------------------------------
    def _piece(self, token_id: int) -> bytes:
        attr = self._attrs[token_id]
        raw = self.vocab.raw[token_id]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return raw
        if attr & ATTR_NORMAL:
            return raw.replace(SPACE.encode(), b" ")
        if attr & ATTR_BYTE:
            return bytes([_hex_byte(raw[3:5])])
        return b""  # unused / undefined tokens print nothing


def _hex_byte(s: bytes) -> int:
    """strtol(s, 16) of the two characters after '<0x' (0 if they are not hex), as a byte."""
    v = 0
    for c in s:
        d = int(chr(c), 16) if chr(c) in "0123456789abcdefABCDEF" else None
        if d is None:
            break
        v = v * 16 + d
    return v & 0xFF


def _chunk_regex(texts: list[str]) -> re.Pattern:
    """A regex whose ``findall`` cuts escaped text into independently mergeable chunks."""
    # Work on all multi-character token texts joined by a separator no token contains (one pass in
    # C instead of a Python loop over 262k Gemma tokens).
    long = [t for t in texts if len(t) > 1]
    sep = "\x00"
    joined = sep.join(long)
    k = 0
    while joined.count(sep) != max(len(long) - 1, 0):
        k += 1
        sep = chr(0xF0000 + k)  # private use; only if some token really contains NUL
        joined = sep.join(long)
    # characters that precede '▁' inside some token (the separator precedes a token's leading '▁')
    before_space = set(re.findall(f"(.)(?={SPACE})", joined, re.DOTALL))
    before_space.discard(sep)
    # '\n', '\r', '\t' that occur in no token of 2+ characters are chunks of their own
    isolated = "".join(c for c in "\n\r\t" if c not in joined)
    iso = re.escape(isolated)
    glue = "".join(re.escape(c) for c in sorted(before_space))
    body = f"[^{SPACE}{iso}]"
    if glue:
        body = f"(?:{body}|(?<=[{glue}]){SPACE})"
    first = f"[^{iso}]" if iso else "."
    pat = f"{first}{body}*"
    if iso:
        pat = f"[{iso}]|{pat}"
    return re.compile(pat, re.DOTALL)
