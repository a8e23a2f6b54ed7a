"""What SPM and BPE tokenizers share: special-token partitioning, BOS/EOS, detokenization.

Mirrors llama.cpp's ``llama_vocab::impl::tokenize`` (``tokenizer_st_partition`` first, then the
model's tokenizer on each text fragment) and ``llama_vocab::impl::detokenize`` /
``token_to_piece``.  Subclasses implement ``_encode_fragment`` and ``_piece``.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from ..errors import UserError
from .vocab import ATTR_CONTROL, ATTR_LSTRIP, ATTR_RSTRIP, ATTR_UNKNOWN, Vocab

_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale

# llama.cpp's clean_up_tokenization_spaces passes (see Tokenizer._clean_spaces)
_CLEAN_PUNCT = re.compile(rb" (?=[?!.,])")
_CLEAN_QUOTE = re.compile(rb" ' ")
_CLEAN_CONTRACTION = re.compile(rb" (?='(?:s|m|re|ve))")


class Tokenizer:
    """A llama.cpp-compatible tokenizer built from GGUF metadata.

    ``kind`` is 'spm' or 'bpe'; ``warnings`` lists what llama.cpp would have logged while loading
    (and any fallback taken here), never printed.
    """

    kind: str = ""
    #: words/chunks remembered (text -> ids) before the cache is cleared; 0 disables caching
    cache_limit: int = 1 << 18

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.warnings: list[str] = list(vocab.warnings)
        self._texts = vocab.texts
        self._attrs = vocab.attrs.tolist()
        self._token_to_id = vocab.token_to_id
        # token pieces, filled on first use: [special=False, special=True]
        self._pieces: tuple[list, list] = ([None] * vocab.n_vocab, [None] * vocab.n_vocab)
        # special tokens searched in the text: with parse_special all of them, without it only the
        # user-defined ones (llama.cpp: "user-defined tokens are still pre-tokenized before everything else")
        order = vocab.special_order
        self._specials_all = [(i, self._texts[i], self._attrs[i]) for i in order]
        self._specials_user = [s for s in self._specials_all if not s[2] & (ATTR_CONTROL | ATTR_UNKNOWN)]
        self._cache: dict[str, tuple[int, ...]] = {}
        self._max_len: int | None = None

    # -- properties --------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.vocab.n_vocab

    @property
    def bos_id(self) -> int | None:
        return self.vocab.special["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.vocab.special["eos"]

    @property
    def eot_id(self) -> int | None:
        return self.vocab.special["eot"]

    @property
    def unk_id(self) -> int | None:
        return self.vocab.special["unk"]

    @property
    def pad_id(self) -> int | None:
        return self.vocab.special["pad"]

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self.vocab.add_eos

    @property
    def add_space_prefix(self) -> bool:
        return self.vocab.add_space_prefix

    @property
    def pre(self) -> str | None:
        return self.vocab.pre

    @property
    def eog_ids(self) -> frozenset[int]:
        return frozenset(self.vocab.eog_ids)

    @property
    def tokens(self) -> list[bytes]:
        """[n_vocab] token texts as stored in the GGUF (bytes)."""
        return self.vocab.raw

    @property
    def max_token_text_len(self) -> int:
        """Longest token text in bytes, measured as C's strlen (llama.cpp's train.cpp uses this)."""
        if self._max_len is None:
            self._max_len = max((len(t) if b"\0" not in t else t.index(b"\0")) for t in self.vocab.raw)
        return self._max_len

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[self._check_id(token_id)] & ATTR_CONTROL)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.vocab.eog_ids

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (e.g. '▁the', 'Ġthe', '<0x0A>')."""
        return self._texts[self._check_id(token_id)]

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab.n_vocab:
            raise ValueError(f"token id {token_id} is out of range (vocabulary has {self.vocab.n_vocab} tokens)")
        return token_id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} n_vocab={self.n_vocab} pre={self.pre!r}>"

    # -- tokenization --------------------------------------------------------------------------
    def partition(self, text: str | bytes, parse_special: bool) -> list:
        """Split ``text`` into plain-text fragments and special token ids (tokenizer_st_partition).

        Works on ``str`` or (for text that is not valid UTF-8) on ``bytes``; fragments have the
        input's type.
        """
        if isinstance(text, bytes):
            specials = self._specials_bytes(parse_special)
            kind, spaces = bytes, _C_SPACE.encode()
        else:
            specials = self._specials_all if parse_special else self._specials_user
            kind, spaces = str, _C_SPACE
        frags: list = [text] if text else []
        for tid, tok, attr in specials:
            if not any(type(f) is kind and tok in f for f in frags):
                continue
            new: list = []
            for f in frags:
                if type(f) is kind and tok in f:
                    _split_on(f, tok, tid, bool(attr & ATTR_LSTRIP), bool(attr & ATTR_RSTRIP), new, spaces)
                else:
                    new.append(f)
            frags = new
        return frags

    def _specials_bytes(self, parse_special: bool) -> list:
        raw = self.vocab.raw
        return [(i, raw[i], a) for i, _t, a in (self._specials_all if parse_special else self._specials_user)]

    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """``llama_tokenize(text, add_special, parse_special)``.

        ``add_special`` adds BOS/EOS as the GGUF says (``add_bos``/``add_eos``); ``parse_special``
        lets control tokens written in the text (``<|im_start|>``) become those tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__} (use encode_bytes for bytes)")
        return self._encode(text, add_special, parse_special, self._encode_fragment)

    def encode_bytes(self, data: bytes, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """:meth:`encode` for raw bytes, which need not be valid UTF-8 (llama.cpp tokenizes bytes).

        Valid UTF-8 takes the ``str`` path.  Otherwise the bytes are handled as llama.cpp does:
        SPM groups them by UTF-8 lead byte and emits invalid groups as byte tokens; BPE decodes
        invalid bytes to U+FFFD one by one.
        """
        data = bytes(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._encode(data, add_special, parse_special, self._encode_fragment_bytes)
        return self._encode(text, add_special, parse_special, self._encode_fragment)

    def _encode(self, text, add_special: bool, parse_special: bool, encode_fragment) -> list[int]:
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._need("bos"))
        prev_special = True
        for frag in self.partition(text, parse_special):
            if type(frag) is int:
                out.append(frag)
                prev_special = True
            else:
                encode_fragment(frag, out, prev_special)
                prev_special = False
        if add_special and self.add_eos:
            out.append(self._need("eos"))
        return out

    def tokenize(self, text: str, add_bos: bool = False, add_eos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; BOS/EOS only when asked; ``special`` = parse control tokens."""
        out = self.encode(text, add_special=False, parse_special=special)
        if add_bos:
            out.insert(0, self._need("bos"))
        if add_eos:
            out.append(self._need("eos"))
        return out

    def _need(self, name: str) -> int:
        i = self.vocab.special[name]
        if i is None:
            raise UserError(f"this vocabulary has no {name.upper()} token, but one was asked for")
        return i

    def tokenize_bytes(self, data: bytes, add_bos: bool = False, add_eos: bool = False,
                       special: bool = False) -> list[int]:
        """:meth:`tokenize` for raw bytes (see :meth:`encode_bytes`)."""
        out = self.encode_bytes(data, add_special=False, parse_special=special)
        if add_bos:
            out.insert(0, self._need("bos"))
        if add_eos:
            out.append(self._need("eos"))
        return out

    def _encode_fragment(self, text: str, out: list[int], after_special: bool) -> None:
        raise NotImplementedError

    def _encode_fragment_bytes(self, data: bytes, out: list[int], after_special: bool) -> None:
        """A fragment that is not valid UTF-8."""
        raise NotImplementedError

    def _remember(self, key: str, ids: tuple[int, ...]) -> None:
        if len(self._cache) >= self.cache_limit:
            self._cache.clear()
            if self.cache_limit <= 0:
                return
        self._cache[key] = ids

    # -- detokenization ----------------------------------------------------------------------
    def _piece(self, token_id: int) -> bytes:
        """The bytes of a token as llama.cpp caches them (token_to_piece with special=True)."""
        raise NotImplementedError

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """``llama_token_to_piece(id, lstrip=0, special)``: control/unknown tokens are empty unless special."""
        table = self._pieces[bool(special)]
        p = table[self._check_id(token_id)]
        return p if p is not None else self._fill_piece(token_id, bool(special))

    def _fill_piece(self, token_id: int, special: bool) -> bytes:
        if not special and self._attrs[token_id] & (ATTR_UNKNOWN | ATTR_CONTROL):
            p = b""
        else:
            p = self._pieces[1][token_id]
            if p is None:
                p = self._pieces[1][token_id] = self._piece(token_id)
        self._pieces[special][token_id] = p
        return p

    def detokenize_bytes(self, ids: Sequence[int] | Iterable[int], special: bool = False) -> bytes:
        """``llama_detokenize(ids, remove_special=False, unparse_special=special)`` as bytes."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab.n_vocab):
            bad = next(i for i in ids if not 0 <= i < self.vocab.n_vocab)
            self._check_id(bad)
        special = bool(special)
        table, fill = self._pieces[special], self._fill_piece
        pieces = [p if (p := table[i]) is not None else fill(i, special) for i in ids]
        if pieces and self.add_space_prefix and pieces[0][:1] == b" ":
            pieces[0] = pieces[0][1:]  # the space the tokenizer put in front of the text
        text = b"".join(pieces)
        if self.vocab.clean_spaces:
            text = self._clean_spaces(text)
        return text

    def detokenize(self, ids: Sequence[int] | Iterable[int], special: bool = False) -> str:
        """The text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.detokenize_bytes(ids, special).decode("utf-8", errors="replace")

    @staticmethod
    def _clean_spaces(text: bytes) -> bytes:
        """llama.cpp's three clean-up passes: ' ?'->'?' (also !.,), " ' "->"'", " 's"->"'s" (also 'm 're 've)."""
        if b" " not in text:
            return text
        text = _CLEAN_PUNCT.sub(b"", text)
        text = _CLEAN_QUOTE.sub(b"'", text)
        return _CLEAN_CONTRACTION.sub(b"", text)


def _split_on(s, tok, tid: int, lstrip: bool, rstrip: bool, out: list, spaces) -> None:
    """Append the pieces of ``s`` around every occurrence of ``tok`` (left to right) to ``out``.

    ``s``/``tok``/``spaces`` are all str or all bytes; ``spaces`` is C's isspace() set.
    """
    pos, end, n = 0, len(s), len(tok)
    while True:
        m = s.find(tok, pos)
        if m < 0:
            break
        if m > pos:
            left_end = m
            if lstrip:
                while left_end > pos and s[left_end - 1:left_end] in spaces:
                    left_end -= 1
            if left_end > pos:
                out.append(s[pos:left_end])
        out.append(tid)
        pos = m + n
        if rstrip:
            while pos < end and s[pos:pos + 1] in spaces:
                pos += 1
        if pos >= end:
            return
    out.append(s[pos:])


__all__ = ["Tokenizer"]
