"""Unicode code point classes exactly as llama.cpp's tokenizer sees them.

llama.cpp (src/unicode.cpp) pre-tokenizes BPE text with regexes over \\p{L}, \\p{N}, \\p{P},
\\p{S}, \\p{M} and \\s.  It does not use a Unicode regex engine: it replaces every non-ASCII
code point by one byte that names its category ("collapsing") and runs an ASCII regex on that.
The categories come from a table generated from UnicodeData.txt (Unicode 15.1), which is newer than
the ``unicodedata`` of most Pythons, so the table is embedded here (``_RANGES``: zlib+base64 of
little-endian uint32 range starts followed by one uint8 category flag per range, as in llama.cpp's
``unicode_ranges_flags``).  Regenerate with::

    python -m gguf_finetune.tokenizer.unicode_flags path/to/llama.cpp/src/unicode-data.cpp

Everything here is vectorized with numpy: ``collapse(text)`` is one table lookup per code point.
"""

from __future__ import annotations

import base64
import functools
import re
import sys
import textwrap
import zlib

import numpy as np

MAX_CODEPOINTS = 0x110000

# category flags (llama.cpp unicode_cpt_flags)
UNDEFINED = 0x01
NUMBER = 0x02  # \\p{N}
LETTER = 0x04  # \\p{L}
SEPARATOR = 0x08  # \\p{Z}
ACCENT_MARK = 0x10  # \\p{M}
PUNCTUATION = 0x20  # \\p{P}
SYMBOL = 0x40  # \\p{S}
CONTROL = 0x80  # \\p{C}

# Unicode White_Space, as hard-coded in llama.cpp's generator (not derived from categories).
WHITESPACE = (
    list(range(0x09, 0x0E)) + list(range(0x2000, 0x200B))
    + [0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)

# The byte llama.cpp writes into the collapsed text for a non-ASCII code point of each category;
# non-ASCII whitespace becomes 0x0B (vertical tab, which ASCII \\s matches), anything else 0xD0.
COLLAPSED_CHAR = {NUMBER: 0xD1, LETTER: 0xD2, PUNCTUATION: 0xD3, ACCENT_MARK: 0xD4, SYMBOL: 0xD5}
COLLAPSED_OTHER = 0xD0
COLLAPSED_SPACE = 0x0B

# What each \\p{X} becomes inside a character class of a collapsed regex: the collapsed byte plus
# the ASCII members of the category as llama.cpp lists them ('~' is a symbol in the llama.cpp of
# llama-cpp-python 0.3.36; older llama.cpp had it in neither P nor S).
CLASS_MEMBERS = {
    "\\p{N}": chr(0xD1) + "0-9",
    "\\p{L}": chr(0xD2) + "A-Za-z",
    "\\p{P}": chr(0xD3) + "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}",
    "\\p{M}": chr(0xD4),
    "\\p{S}": chr(0xD5) + "\\$\\+<->\\^`\\|~",
}

_RANGES = (
    "eNqd2gl0FFW6AODqJgiKSgOKO7ajDosLwUFAAqRRdkZsXDFskUF0dMCggDo+pBVQQZSIHh0XNO6CIwZcB1mCyiKOEBWFh6hx"
    "w3FwiawStvdVdTLiqO/Neaf4ujtVt27d+9//3q5KCIIgSHIMx3E8J3AiubSnA/l0pj+DGEwhF3Ed/8VYrmccJTzMIzzJU8zk"
    "af7KM8xiDs/zAi/yMn9jLq8wj4WUsZo1bOMHXo0HwRLeoYIv+Jpv+JbvCGoFQRGjGcM1/JnrGUeGCdzEzdzCrUzhNm7nER5l"
    "K9u4MScIxjOZ3NpB0IoLuJACCpnErdxGMXewgIWUsYjXeJ0lLGUZ5WzgOzaxhWAf/9iXeuzPgSQ4giM5iiS9KeQyRlDESFbx"
    "Hu/zIR/xMV/wJV/xT76lkip2sYegjutRnwQNaEguvTmTJ5jNHMpYzgY2s5VtVLGDXewmqBsEjTmcIziO42lGc04ml3xSXMgA"
    "BjGYQi6niFuYxFSKmcZfKGE5n/IZOfvKaTrSiTR96ccQhjKMIkZyAxOYyG1M5Q7uZAYzmc0cnuNF5jKP+SxgMUt5gzdZwUpW"
    "s4Z1fMTHfMrnrKeSjWymip3sYjd7iO2nP9SmHvVpQCOa04JWnEJrTqUt7WhPBzrSiTPoTk9604e+nM2FDGQQgxlGEVcymjFc"
    "zQ1MYCK3M5Vp3MkMZjKbOTzPC8xlHvNZwBKWspw3WUE5b1PBp3zOeir5no1sp4qgnriQQ20OoD4NaERzWtCKU2jNqbSnAx3p"
    "RFe605Pe9OE8+jGAQQxmCEMZRhEjuZJruJHxTGAit3I7dzCNu7mX+3mA6TxICY/yOE/xNLOYywJeYwlvsJwVlPM2q1nDejax"
    "g2B/seAADqQBDWlOC9rTgY50oivd6Ekv+nAeF9CP/gxkEIUMYSjDKOJqrmEcGW5gAhO5jdu5g2nMYCbP8wJzmcd8FrCYJbzB"
    "clbwHqv5kI+p4FM+Zz2VfM8mNhMcIB84gANpQEPy6EgnutKNnvSiD2eR5lwuoB+DGcJQhnEtfybDDUxgIvdwH3N4jnnMZwFl"
    "LGU5b7KS93if1ayhgvVUspHNbCF2oNzlFFqTRz4punMWaQoYwA2MZwITuYlbmcJjPM4TPMls5vA881lAGYtZwlKWsZJy1rKO"
    "CoL62kYOjTiIgzmUw0nSmlNpQ1vacRrt6USKHvRkOCOZyE3cwm38hXuZzwKWsJS3WEE57/HffECQcD9DPil6keZ8ChjERQzh"
    "Yi5hBCMZzY3czlSKuY8HKWEJS1nGW6ygnB3spGdD16MPaS6gHxdSwCAKmcRkbqeY2czhRV5mIWUs4lWWsIzVrKFBI/lMYw6l"
    "PwMp5I+MJUMx91HCVn5gN8FBxo7hjfWdK8hwA/cznRI28C3fs53gENelMUdzCqfSlhRncy6FDGcEI7mSUWR4nlWsZg0fsI4P"
    "+YgK/kklVQSHWuI5kPokOJwk15JhIjczg5k8TSlbCQ7TVpKcSC4dSNGZLnQjzQiKGE2Gv1LKcsr5gI8IDhcKjqQJSc5jMIWM"
    "ZRwZJlPMfZTwJE8xi1JWEhxhvaY1XTmTNAVcxOWMYizjyDCeh5lFKXNZz2Z2Ehzp/op25JGiF2eSpoDryTCJYl5hPmUso5x3"
    "WcVXfMO3bGYL26hiB8FRziNoIj+ONmw0IUk3etCHNP24kAL6M4CBDGIw15PhBV5kPgtYyKssZglvUc4q3mcdH1LBN1SykS1s"
    "ZRd7js4+ANUjQTNa0JJcutCVszmHwRRyMcMoYiRXMoo/M5ZxZJjMbUylmOmUsIhyvq9++IpTizrUZT8O4mAacxhNOI7j+S1N"
    "aUZzWnAyLWlPB1J0pRd9OIs045nIZKZQHF7zWLcJNOcEmnoYTNGbQh7gn9UPiJc2dc/HXSxmKeupZHxz6zNrWMdOdjPKQ+UY"
    "7uae6gfML9jAd2xkM9vZxe7wAfQk/aQpzTiJk8nlUq6giJGMI8M9lPAkT/EspbzEyyykjKUsYyXlrGYNH1NBcLJYkkuasxlE"
    "hvu4n80ELeUalS2zD8wxcqhNHerSkINIcgwtyKUVbWhHHh3pRIrO3MO93M90SniYHewMH85buQ65tGIqxUzjbkoo43O+o5Lg"
    "FOsfSVrQgzR9KSTDZGZTRtDa+5ne+8jjx9TPUsrZTfC4+6onzB2StOBEUlzBVYziesbxICWsp5KN/PBE9pcEh5DkN0ziVt6k"
    "nHd4l1W8x1o2En/KvGEf6lCP/TmWZpzISeTShvakGMU1ZLiR51nCCspZSwUb+YEd7GQXe8JfZswwR/ktJ5NLd85lMIWMJcME"
    "nmMRK1hJOWv5iAq+YD2VVLFnRvYXJs1pS4oz6MLv6UOaAgZQyNX8meu4nlJmM4cXeIm/sYAyFvEqr/EBH1HBBirZyBa2EXta"
    "fNmX+jTgEJI0pRktyaU/A7iMP1HEZ2zga76lkqrqXwY9tlpbWcqb7Kz5Rc9238FVzmctwQ5toBGHchRNOJrmtKAt7ehIJ/JJ"
    "cTpn0JVuzOE13g3L7VKGNMVMYxkrKaeSnQS75TmHkySXcziXIfyBoVzCpfyRy/gTRYxmDLvYQ7BHXMmhNvXYnwSHcyRHcwx5"
    "dCKfFJ3pzwAGMojBDGMhr7KM5ZTzDmtYy4dU8CX/4Du2s5PdaJVHxpjHpljQlGbk0YFO5NOHNIPIsIMgFgtqUYfWtCXFtUxm"
    "ClMpZjolPEw5u9hNJu4YJbxNBZ+wE5UHSY7jJDpzOr3oTZoxXEeGB3mIEl5nGeW8zfsEOcpQwkxKWcUadhLU1ndyGcoVFHEd"
    "/8WtTOFO7uJu7uERHmUOzzGXV5hPsI+41BEXzqeQS8lwEzczmzm8QlA3FuxDXfZlP9rQltPoQEfyOZ8L6EchV3MtGR7iSUqp"
    "YBOb2coOgn1jQWOO5GiStCefFBleZh4LKKOcdwj2iwUxcqhNHfYnwUEczKEcRhvakUc+KXqS5kIKGcs4MkynhDKW8QZf8CUb"
    "qGQbQT11cxopzqcfhVzFNWSYxr1MZwalBPtrAxmeo4xNVBEcIN9oRi7tKTxQ+8gwk6d5hlmUModdBPVjwVE0pRm5dKMv51FA"
    "ETdyE5MpZTF/p4JtBAnzinZ0pw9nU8RIrmI0YxjHeEp5hfks4FVe4y1WUM5XVFJF0MA1aMqptCFFF7rSnR6kuYpRjOFqMozn"
    "ORaxmDd4ixWUs5YPWMeHVPAJWwgaxoKGNOJE2tGJfDpzOhlu5hYmMZnbmcqDPMQMZlLKx2ygkiqCRvKT2hxAfRrQiOa0oBWn"
    "0JpTaU8eHelEV7rTk970IU1fLqAfAxnCUIYxnCJGExykXrrTmzQFDGAggxjMEDKU8jpLWMoyylkbHj84FjzLi7zMItawjo8I"
    "Gss3OtOFrqQpoJDhZHial/kbcyljOcEhseAIjuJEculAPim6ExzqGHl0oIQKNrGHOodZs9iP/TmIgzmEQ8mlDW05jTzySdGZ"
    "0+lCd9IUUMJTzORt1rCWT/iUz/icLwgOty5Rj9/Rnjzy6U4P0vRlAJO5j+k8yKOUsp3gCP0gOFKf2I+WtKUdKTrTjTTDKeJK"
    "ipnGU8zgJYKjxIe67Ec9WtGW9uTRgU7k043u9CBNAYUM4xL+yGVMZirFTONO/sK9lDCTiibGiG1sJzg6FsSpRQ4NaEhr8ujE"
    "GaQpoJTZlPEeG9lDkBS/Y70f57uSIkaTocvx2tQyFnzPJoJc499a3OhMd84n6OJzN++XyonLHGcwhVzGCIpYSBnLKedbKtnC"
    "VoLL1U9bOpCiC13pRpoC+jOEP3ANYykOy4/Qbu7hfoIrzFnOIk1fbmEqd1JCBZ/yGZ/zBZVsJCiKBT/c7P0W9x5TvN8mj6h8"
    "1vcwW9jJLvYQlMaCY2dbj/gdac7hPM5nKJdSxM45ys+LBZdTxFgyTKKY+3iA6TxECY8RrIwFJ5NLd9K8jhuyYCvB274PaM7F"
    "XMZwruI6xjORKcxkFhsI3jF36Uo3ylhFBZsJ3rVeUsi1BKv0i/OZzoOU8AiP8jhPMoNnmMVcXmEe83mdxezznnlFPQ7gYBpz"
    "FE1oTx75pOhKN7rTi76czRPvm68s4lU+YB072MnBq9XLqbThLNJcQRGTmMwMZvIar/N3VhCsYa38JI/hjGYME5jIzUzhfkp4"
    "mFKCj92jcTwnEFToM3U5jCP4DcdyPL/lBHIZwVSKCT5xH00ubelEil704SzSFH8q5jxLGV9TSRV7CD4zBz+3n0qqqPjSPRr/"
    "4Gu+4Tsq2UPwD+PFUspZTfCVOUpvfk+aAgZRyMivY8FfeYZSZvMCsW/kMS3pRPCtdYzaJDmGYzmO42lKM5rzO1rTjtNoTx4d"
    "OJ0z6E4PetKL3vyeM0nTl3M4l/O4gH5cSAH9GcBABjGYQi7iDwzlYi7hcv7EVYziGq5lLNczjgyTuZUHeJjHeJyZPM08KtlI"
    "UOl7mlzuooRnmU0ZiyjnbbYSfG/uMIv11NroXp4OpOhJmrMpZBjBJt/FW80RvqGSXQTb3CNyHWup4Gsq+Z7gB/cGJOhBmgIK"
    "uYViZlHKHILt4lzlOCMoYiwZJlHMAhayhBWso4KvqGQ7wQ7rNnfxJpVUEQTxoOKJeBA8GQ/avxQPUjR5OR4keWRFPCjlkw3x"
    "oJJB4X8y+cHxqux/NOndqJb7wVpB6bG1PA0fqKYDgyQZwj/cVcayfyjbvSf7h6ndexLeG3g+S6ZscXLCT9FLdqePmVQ8fIvn"
    "KJCT2ntLeInlJHNiqfAl2qK9sWhvMpaKJZLVW7Qrlgkvk0okM8mchMoSSiUyTkgQd64SdiqsjrgX7YklUuGuaHcyln0JLxPL"
    "xOzKJGoOho1LxHL22sIzbD6EPyZUGHUkEftpsfB4zRb+FA8ri/1iVdX1JFOxnMSvlKgpk8qJxxI5sZ9vNYXCMj+W+MnpUQWx"
    "pDoSyV+/QtSGbOnqjobNimcv/pPW1ZynRcls6VQUr73bFcawunA8CnA0UAKWCLdkdDB8C+uxJxYeD8+KRnGvLZ5IVdeY/KXe"
    "/yQSSVdKRR+T4UjXNfxyLOpdTtTS6gaFYZCJYcuExZjH/63FmhSLTswOYNi9WDIblOiUnGQUnzCpwk4lo8/x6kJhK+LVrU1m"
    "+1hd9y+OX5T5UQKGaR81PxWrm0nWrZ5EdTOxjKbEdSgehiicBLFUzq9uccWiaHp1lnPi0U/Jmn1hKS0J87umCclfSq0oSOGc"
    "izaNyQnncypufzh3w5YmwnlaXU04F6LKo4tmt7BXqWjq5kTDYOKGgTIWqepu/5gs0aQNczhqTRTGRHRmmIJRXKOUFYFwABI5"
    "NeOaze2c1E/SJrxm4t/mbxTccOWIV+/J7HX91N4FY2F2RJG2+IRDGItCF2VoeF7sF1a3vbIzjFcm9W/RTIZpFMYkG87qVAxT"
    "JcyWeDY5w0rC9PlXE7O7/qMtGS5HNWfGoyBFS1v4MV6zclWndzw8YvzD+RItQNkLxaN/yX9dPV49RXKieR6rjnlYOjsM1QMS"
    "jyIefsyIbiZqfjQsyWzWZwcuJ1y149Eynp1u0eTfKwWji/3aMpmI1XxMhF8bsWR2PiVzqtetZHaOhz9Gy0j2ItHamvNjc2uG"
    "u3r2JmqaEmVaojoPk9kPYUOzEcwej7Js7xW1upaaaFVHOB5drXq+Z5ekMKlrWhZ1NPNjz+PZI9kIJ6Jcqg55TjhCNTHIJvTP"
    "vmh+voXfhdULWDbPUpa3aM2NVtmw6tRe2fV/bL+0wMSql/DsuhdL/OwbLxJ1KpWdoeElcxJ7XzRe/Y0c5lo4KcLX/7RN/1vn"
    "f7LFU7H///ZLzcmEtwjRa/A/95dR7A=="
)


@functools.lru_cache(maxsize=1)
def category_table() -> np.ndarray:
    """uint8 [MAX_CODEPOINTS]: the category flag of every code point (llama.cpp's table)."""
    raw = zlib.decompress(base64.b64decode(_RANGES))
    n = len(raw) // 5
    starts = np.frombuffer(raw[: 4 * n], dtype="<u4").astype(np.int64)
    flags = np.frombuffer(raw[4 * n :], dtype=np.uint8)
    if starts[0] != 0 or starts[-1] != MAX_CODEPOINTS:
        raise RuntimeError("corrupt embedded unicode table")
    return np.repeat(flags[:-1], np.diff(starts))


@functools.lru_cache(maxsize=1)
def whitespace_table() -> np.ndarray:
    """bool [MAX_CODEPOINTS]: llama.cpp's is_whitespace flag."""
    t = np.zeros(MAX_CODEPOINTS, dtype=bool)
    t[WHITESPACE] = True
    return t


@functools.lru_cache(maxsize=1)
def _collapse_table() -> np.ndarray:
    """uint32 [MAX_CODEPOINTS]: the code point each code point becomes in the collapsed text."""
    cat = category_table()
    out = np.full(MAX_CODEPOINTS, COLLAPSED_OTHER, dtype=np.uint32)
    for flag, byte in COLLAPSED_CHAR.items():
        out[cat == flag] = byte
    out[whitespace_table()] = COLLAPSED_SPACE
    out[:128] = np.arange(128, dtype=np.uint32)
    return out


@functools.lru_cache(maxsize=1)
def _widen_table() -> np.ndarray:
    """uint32 [MAX_CODEPOINTS]: identity, except non-ASCII whitespace becomes 0x0B."""
    out = np.arange(MAX_CODEPOINTS, dtype=np.uint32)
    ws = whitespace_table().copy()
    ws[:128] = False
    out[ws] = COLLAPSED_SPACE
    return out


def _codepoints(text: str) -> np.ndarray:
    # surrogatepass: a lone surrogate in a Python str is kept as one code point (llama.cpp would
    # see its 3-byte encoding and decode it to the same code point).
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _map(text: str, table: np.ndarray) -> str:
    cps = _codepoints(text)
    return table[cps].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")


def collapse(text: str) -> str:
    """The text llama.cpp's regexes run on: ASCII kept, every other code point -> one class char.

    Same length as ``text`` (one char per code point), so match offsets index ``text`` directly.
    """
    if text.isascii():
        return text
    return _map(text, _collapse_table())


def widen(text: str) -> str:
    """The text llama.cpp's wide-char regexes run on: non-ASCII whitespace -> 0x0B, rest kept."""
    if text.isascii():
        return text
    return _map(text, _widen_table())


def _regenerate(path: str) -> str:
    """Return a new ``_RANGES`` literal from llama.cpp's src/unicode-data.cpp."""
    s = open(path, encoding="utf-8").read()
    a = s.index("unicode_ranges_flags")
    b = s.index("};", a)
    pairs = re.findall(r"\{0x([0-9A-Fa-f]+), 0x([0-9A-Fa-f]+)\}", s[a:b])
    starts = np.array([int(x, 16) for x, _ in pairs], dtype="<u4")
    flags = np.array([int(y, 16) for _, y in pairs], dtype=np.uint8)
    blob = base64.b64encode(zlib.compress(starts.tobytes() + flags.tobytes(), 9)).decode()
    lines = "\n".join(f'    "{line}"' for line in textwrap.wrap(blob, 96))
    return f"_RANGES = (\n{lines}\n)\n"


if __name__ == "__main__":  # pragma: no cover - maintenance tool
    if len(sys.argv) != 2:
        sys.exit("usage: python -m gguf_finetune.tokenizer.unicode_flags path/to/unicode-data.cpp")
    sys.stdout.write(_regenerate(sys.argv[1]))
