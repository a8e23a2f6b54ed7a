"""Byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``), as llama.cpp's llm_tokenizer_bpe.

Per text fragment: split into words with the pre-tokenizer's regexes (:mod:`.pretokenizers`),
map each word's UTF-8 bytes to GPT-2's printable "byte characters", then merge adjacent symbols
by merge rank (lowest first, leftmost on ties).  Words are independent, so each distinct word is
tokenized once and cached.  With ``ignore_merges`` (Llama-3, Tekken) a word that is itself a token
is emitted as that token without merging.
"""

from __future__ import annotations

from . import utf8
from .base import Tokenizer
from .merge import merge_pairs
from .pretokenizers import RegexSplitter
from .vocab import ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_USER_DEFINED, Vocab


def byte_to_char_table() -> list[str]:
    """GPT-2's byte -> printable character map: printable Latin-1 stays, the rest -> U+0100.."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


BYTE_TO_CHAR = byte_to_char_table()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# str.translate table from a Latin-1 decoded byte string to byte characters
_LATIN1_TO_BYTECHARS = {b: c for b, c in enumerate(BYTE_TO_CHAR)}


def to_byte_chars(text: str) -> str:
    """``text``'s UTF-8 bytes as GPT-2 byte characters ('Ġ' for a space, ...)."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1").translate(_LATIN1_TO_BYTECHARS)


def decode_byte_chars(text: bytes) -> bytes:
    """llama.cpp's llama_decode_text: byte characters back to bytes ([UNK_BYTE_0x..] for others)."""
    out = bytearray()
    for ch in text.decode("utf-8", "replace"):
        b = CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text + b"]"
    return bytes(out)


def parse_merges(merges: list[bytes]) -> dict[tuple[str, str], int]:
    """``{(left, right): rank}``; an entry splits at its first space after position 0; first one wins."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, m in enumerate(merges):
        pos = m.find(b" ", 1)
        if pos < 0:
            key = ("", "")
        else:
            key = (m[:pos].decode("utf-8", "surrogateescape"), m[pos + 1:].decode("utf-8", "surrogateescape"))
        if key not in ranks:
            ranks[key] = rank
    return ranks


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, vocab: Vocab):
        super().__init__(vocab)
        self._ranks = parse_merges(vocab.merges or [])
        self.splitter = RegexSplitter(vocab.pre_spec.regexes)
        self._ignore_merges = vocab.ignore_merges

    @property
    def n_merges(self) -> int:
        return len(self._ranks)

    def tokenize_word(self, word: str) -> tuple[int, ...]:
        """Token ids of one pre-tokenizer word (plain text)."""
        tok = self._token_to_id
        chars = to_byte_chars(word)
        if self._ignore_merges:
            i = tok.get(chars)
            if i is not None:
                return (i,)
        out: list[int] = []
        for sym in merge_pairs(list(chars), self._ranks):
            i = tok.get(sym)
            if i is not None:
                out.append(i)
            else:  # llama.cpp then looks up each UTF-8 byte of the symbol as a token; misses are dropped
                for b in sym.encode("utf-8"):
                    j = tok.get(bytes([b]).decode("utf-8", "surrogateescape"))
                    if j is not None:
                        out.append(j)
        return tuple(out)

    def words(self, text: str) -> list[str]:
        """The pre-tokenizer words of a plain-text fragment."""
        return self.splitter.split(text)

    def _encode_fragment(self, text: str, out: list[int], after_special: bool) -> None:
        cache = self._cache
        for w in self.splitter.split(text):
            ids = cache.get(w)
            if ids is None:
                ids = self.tokenize_word(w)
                self._remember(w, ids)
            out.extend(ids)

    def _encode_fragment_bytes(self, data: bytes, out: list[int], after_special: bool) -> None:
        # llama.cpp decodes before splitting: each invalid byte becomes U+FFFD
        self._encode_fragment(utf8.decode(data), out, after_special)

    def _piece(self, token_id: int) -> bytes:
        attr = self._attrs[token_id]
        raw = self.vocab.raw[token_id]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return raw
        if attr & ATTR_NORMAL:
            return decode_byte_chars(raw)
        return b""  # byte / unused / undefined tokens print nothing in a BPE vocabulary
