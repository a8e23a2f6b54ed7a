"""How llama.cpp reads bytes that are not valid UTF-8 (src/unicode.cpp, src/llama-vocab.cpp).

* :func:`lead_byte_groups` - the SPM tokenizer's initial symbols: each symbol is as many bytes as
  its first byte announces (``unicode_len_utf8``: 0xC_/0xD_ -> 2, 0xE_ -> 3, 0xF_ -> 4, else 1),
  whatever those bytes are, cut at the end of the text.
* :func:`decode` - ``unicode_cpts_from_utf8``, used before BPE pre-tokenization: a sequence whose
  continuation bytes are present decodes to its value (no check for overlong forms or surrogates);
  any other byte becomes U+FFFD on its own and decoding resumes at the next byte.

Valid UTF-8 never reaches these (the ``str`` path is used); they run only on broken input.
"""

from __future__ import annotations

_LEN = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)


def lead_byte_groups(data: bytes) -> list[bytes]:
    out = []
    i, n = 0, len(data)
    while i < n:
        k = min(_LEN[data[i] >> 4], n - i)
        out.append(data[i:i + k])
        i += k
    return out


def _cont(b: int) -> bool:
    return b & 0xC0 == 0x80


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8", "surrogatepass")  # same result where Python accepts the bytes
    except UnicodeDecodeError:
        pass
    out = []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        cp = None
        if b < 0x80:
            cp, k = b, 1
        elif b & 0x40 == 0:
            k = 1  # stray continuation byte
        elif b & 0x20 == 0:
            k = 2
            if i + 1 < n and _cont(data[i + 1]):
                cp = ((b & 0x1F) << 6) | (data[i + 1] & 0x3F)
        elif b & 0x10 == 0:
            k = 3
            if i + 2 < n and _cont(data[i + 1]) and _cont(data[i + 2]):
                cp = ((b & 0x0F) << 12) | ((data[i + 1] & 0x3F) << 6) | (data[i + 2] & 0x3F)
        elif b & 0x08 == 0:
            k = 4
            if i + 3 < n and _cont(data[i + 1]) and _cont(data[i + 2]) and _cont(data[i + 3]):
                cp = (((b & 0x07) << 18) | ((data[i + 1] & 0x3F) << 12) | ((data[i + 2] & 0x3F) << 6)
                      | (data[i + 3] & 0x3F))
        else:
            k = 1
        if cp is None:
            out.append("\ufffd")
            i += 1
        else:
            # beyond U+10FFFF llama.cpp fails later (it cannot re-encode it); use U+FFFD instead
            out.append(chr(cp) if cp <= 0x10FFFF else "\ufffd")
            i += k
    return "".join(out)
