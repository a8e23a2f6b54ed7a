"""llama.cpp's own tokenizer, through llama-cpp-python (optional), for cross-checking ours.

``LlamaCppTokenizer(path)`` loads a GGUF vocabulary with ``vocab_only`` and exposes
``encode``/``detokenize_bytes`` with the same meaning as :class:`~.base.Tokenizer`'s, calling
``llama_tokenize``/``llama_detokenize`` directly.  ``random_text`` makes adversarial test strings
(digits, contractions, every kind of whitespace, scripts, marks, emoji, control and unassigned
code points, special-token look-alikes).  Nothing in the package needs llama-cpp-python.

Note: llama.cpp aborts the whole process (not an exception) on some malformed vocabularies, such
as repeated token texts; only give it files it accepts.
"""

from __future__ import annotations

import ctypes
import random

_quiet_cb = None


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


class LlamaCppTokenizer:
    def __init__(self, path: str):
        global _quiet_cb
        import llama_cpp  # optional: llama-cpp-python, for comparisons only

        self._ll = llama_cpp
        if _quiet_cb is None:
            llama_cpp.llama_backend_init()
            _quiet_cb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: None)
            llama_cpp.llama_log_set(_quiet_cb, None)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load the vocabulary of {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

    def close(self) -> None:
        if self._model:
            self._ll.llama_model_free(self._model)
            self._model = None

    def __del__(self):  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass

    def encode(self, text: str | bytes, add_special: bool = False, parse_special: bool = False) -> list[int]:
        ll = self._ll
        b = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        n = len(b) + 8
        buf = (ll.llama_token * n)()
        r = ll.llama_tokenize(self._vocab, b, len(b), buf, n, add_special, parse_special)
        if r < 0:
            n = -r
            buf = (ll.llama_token * n)()
            r = ll.llama_tokenize(self._vocab, b, len(b), buf, n, add_special, parse_special)
        return list(buf[:r])

    def token_attr(self, token_id: int) -> int:
        """llama_vocab_get_attr: the llama_token_attr bits after llama.cpp's load-time rules."""
        return int(self._ll.llama_vocab_get_attr(self._vocab, token_id))

    def is_eog(self, token_id: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token_id))

    def detokenize_bytes(self, ids: list[int], special: bool = False) -> bytes:
        ll = self._ll
        arr = (ll.llama_token * max(1, len(ids)))(*ids)
        n = 64 + 32 * len(ids)
        out = ctypes.create_string_buffer(n)
        r = ll.llama_detokenize(self._vocab, arr, len(ids), out, n, False, special)
        if r < 0:
            n = -r
            out = ctypes.create_string_buffer(n)
            r = ll.llama_detokenize(self._vocab, arr, len(ids), out, n, False, special)
        return out.raw[:r]


_ATOMS = [
    lambda r: "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(1, 9))),
    lambda r: r.choice(["The", "HELLO", "McDonald", "iPhone", "ABCdef", "F\u00fchrer", "na\u00efve", "\u00c9COLE"]),
    lambda r: "".join(r.choice("0123456789") for _ in range(r.randint(1, 8))),
    lambda r: " " * r.randint(1, 5),
    lambda r: r.choice(["\t", "\n", "\r\n", "\r", "\n\n", " \n", "\t\n ", "\v", "\f"]),
    lambda r: r.choice(list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")),
    lambda r: r.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'x", "''", "' "]),
    lambda r: r.choice(["\u00e9", "\u00df", "\u0416\u0438\u0437\u043d\u044c", "\u03ac\u03bb\u03c6\u03b1",
                        "\u0642\u0627\u0644", "\u4e2d\u6587\u5b57", "\u3072\u3089\u304c\u306a",
                        "\u30ab\u30bf\u30ab\u30ca", "\ud55c\uad6d\uc5b4", "\ufb01", "\u01c5", "\u02b0"]),
    lambda r: r.choice(["\u0663", "\u00bd", "\u2167", "\u00b2", "\u0969", "\U0001d7d9"]),
    lambda r: r.choice(["\u0301", "e\u0301", "\u0915\u094d", "\u20dd"]),
    lambda r: r.choice(["\U0001f999", "\U0001f636\u200d\U0001f32b\ufe0f", "\u2705", "\U0001f680", "\U0001f44d\U0001f3fd"]),
    lambda r: r.choice(["\u00a0", "\u3000", "\u2028", "\u0085", "\u2009", "\u202f", "\u1680"]),
    lambda r: r.choice(["\x00", "\x1c", "\x1f", "\x7f", "\x08", "\u200b", "\ufeff"]),
    lambda r: r.choice(["\u20ac", "\u00a9", "\u00b1", "\u2192", "\u2026", "\u3002", "\uff0c", "\u3001", "\u0964",
                        "\u06d4", "\u060c", "\u2018", "\u201c", "\uff01", "\uff5e", "\uff02"]),
    # unassigned, private use, and code points assigned only in recent Unicode versions
    lambda r: r.choice(["\u0378", "\U000e0080", "\U0001fae8", "\U00031350", "\u0cf3", "\U00011f00",
                        "\U0010fffd", "\ue000"]),
    lambda r: r.choice(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>", "<tool>",
                        "<|user|>", "<sentinel:12>", "IMGIMGABZ"]),
    lambda r: r.choice(["\u00b5", "\u2126", "\u212a", "\ufb00", "\uff21\uff42", "\U00010400"]),
]


def random_bytes(rng: random.Random, n_atoms: int | None = None) -> bytes:
    """:func:`random_text` as UTF-8 with broken sequences spliced in (stray, truncated, overlong,
    surrogate and 0xF8+ bytes; not above U+10FFFF, on which llama.cpp aborts)."""
    bad = [b"\x80", b"\xbf", b"\xc3", b"\xe2\x96", b"\xf0\x9f\x98", b"\xc0\x80", b"\xed\xa0\x80",
           b"\xf8", b"\xff", b"\xe2 ", b"\xe2\xe2\x96\x81"]
    parts = [random_text(rng, 1).encode("utf-8") for _ in range(rng.randint(0, 10) if n_atoms is None else n_atoms)]
    for _ in range(rng.randint(1, 3)):
        parts.insert(rng.randint(0, len(parts)), rng.choice(bad))
    return b"".join(parts)


def random_text(rng: random.Random, n_atoms: int | None = None) -> str:
    """A random string of ``n_atoms`` (default 0..14) pieces drawn from tricky categories."""
    n = rng.randint(0, 14) if n_atoms is None else n_atoms
    return "".join(rng.choice(_ATOMS)(rng) for _ in range(n))
