"""BPE pre-tokenizers: ``tokenizer.ggml.pre`` -> regex list -> words, as llama.cpp splits them.

llama.cpp (src/llama-vocab.cpp ``llm_tokenizer_bpe``, src/unicode.cpp ``unicode_regex_split``)
applies a *list* of regexes one after the other: each one splits every piece left by the previous
one into its matches and the gaps between them.  How each regex is run decides the result, so it
is mirrored here, using Python's ``re`` (no ``\\p{..}`` support needed):

* the GPT-2 regex and the Llama-3 regex have hand-written splitters in llama.cpp (slightly different
  from the regexes on edge cases, e.g. a lone whitespace before a word is a piece of its own); they
  are reproduced by equivalent regexes (``_GPT2_SPLIT``/``_LLAMA3_SPLIT``) over the collapsed text;
* a regex that uses ``\\p{N}``/``\\p{L}``/``\\p{P}``/``\\p{M}``/``\\p{S}`` runs on the *collapsed*
  text (every non-ASCII code point replaced by one byte naming its category, see
  :mod:`.unicode_flags`) with each ``\\p{X}`` replaced by ``[<that byte><ASCII members>]``;
* any other regex runs on the text with non-ASCII whitespace replaced by U+000B.

All of them use ``re.ASCII`` so that ``\\s`` is C's ``isspace`` set, as in C++ ``std::regex``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from . import unicode_flags as uf

# -- the regexes, verbatim from llama.cpp (after C string unescaping) -------------------------

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
         r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5: letter runs also take combining marks (\p{M})
QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
          r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LATIN = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec"
    "\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
    "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787"
    "\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[" + _DEEPSEEK_LATIN + "]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
)
DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}")
FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]")
STARCODER = (r"\p{N}", GPT2)
CHAMELEON = (
    "<sentinel:[0-9]+>",
    "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    "([\\t\\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    GPT2,
)
DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")


@dataclass(frozen=True)
class PreTokenizerSpec:
    """What llama.cpp's vocab loader sets for one ``tokenizer.ggml.pre`` value."""

    type_name: str  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_* (lower case, without prefix)
    regexes: tuple[str, ...]
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool = False
    no_bos: bool = False  # the default BOS id becomes "none" (chatglm-bpe)


def _spec(t, r, **kw):
    return PreTokenizerSpec(t, tuple(r) if not isinstance(r, str) else (r,), **kw)


_NOCLEAN = {"clean_spaces": False}

# every ``tokenizer.ggml.pre`` string llama.cpp's vocab loader accepts for BPE vocabularies
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _spec("default", DEFAULT),
    **{k: _spec("llama3", LLAMA3, ignore_merges=True, add_bos=True)
       for k in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
    "deepseek-llm": _spec("deepseek_llm", DEEPSEEK_LLM, **_NOCLEAN),
    "deepseek-coder": _spec("deepseek_coder", DEEPSEEK_CODER, **_NOCLEAN),
    "deepseek-v3": _spec("deepseek3_llm", DEEPSEEK_V3, **_NOCLEAN),
    "falcon": _spec("falcon", FALCON),
    "mpt": _spec("mpt", (GPT2,)),
    "starcoder": _spec("starcoder", STARCODER),
    **{k: _spec("gpt2", (GPT2,)) for k in (
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es",
        "jina-v2-de", "jina-v2-code", "roberta-bpe")},
    "refact": _spec("refact", STARCODER),
    "command-r": _spec("command_r", STARCODER, **_NOCLEAN),
    # Qwen2, Qwen2.5, Qwen3 (and their distills) all write 'qwen2'
    **{k: _spec("qwen2", (QWEN2,), **_NOCLEAN) for k in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2")},
    "qwen35": _spec("qwen35", (QWEN35,), **_NOCLEAN),
    "megrez": _spec("qwen2", (QWEN2,)),
    "stablelm2": _spec("stablelm2", (QWEN2,)),
    "olmo": _spec("olmo", (GPT2,)),
    "dbrx": _spec("dbrx", LLAMA3),
    "smaug-bpe": _spec("smaug", LLAMA3),
    "poro-chat": _spec("poro", BLOOM, **_NOCLEAN),
    "chatglm-bpe": _spec("chatglm4", LLAMA3, no_bos=True),
    "viking": _spec("viking", (BLOOM, r"\p{N}"), **_NOCLEAN),
    "jais": _spec("jais", (GPT2,)),
    "tekken": _spec("tekken", TEKKEN, clean_spaces=False, ignore_merges=True, add_bos=True),
    "smollm": _spec("smollm", STARCODER, **_NOCLEAN),
    "codeshell": _spec("codeshell", STARCODER),
    "bloom": _spec("bloom", BLOOM),
    "gpt3-finnish": _spec("gpt3_finnish", BLOOM),
    "exaone": _spec("exaone", STARCODER),
    "chameleon": _spec("chameleon", CHAMELEON, clean_spaces=False, add_bos=True),
    "minerva-7b": _spec("minerva", STARCODER),
}


def resolve_pre(pre: str | None) -> tuple[str, PreTokenizerSpec, str | None]:
    """``(effective name, spec, warning or None)`` for a ``tokenizer.ggml.pre`` value.

    A missing value falls back to 'default' as llama.cpp does (it warns too); an unknown value,
    which llama.cpp refuses to load, also falls back to 'default', with a warning.
    """
    if pre is None or pre == "":
        return "default", PRE_TOKENIZERS["default"], (
            "tokenizer.ggml.pre is missing: using the 'default' pre-tokenizer (llama.cpp does the same; "
            "tokenization may not match the original model's)")
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        return "default", PRE_TOKENIZERS["default"], (
            f"unknown pre-tokenizer tokenizer.ggml.pre='{pre}' (llama.cpp would refuse this file): "
            "using 'default'; tokenization may not match the original model's")
    return pre, spec, None


# -- the splitters ----------------------------------------------------------------------------

# character classes over the collapsed text (ASCII kept, non-ASCII -> category byte, see unicode_flags)
_W = "\\t\\n\\x0b\\x0c\\r "  # llama.cpp is_whitespace, as it appears in the collapsed text
_L = uf.CLASS_MEMBERS[r"\p{L}"]
_N = uf.CLASS_MEMBERS[r"\p{N}"]
_M = uf.CLASS_MEMBERS[r"\p{M}"]

# llama.cpp's hand-written GPT-2 splitter (unicode_regex_split_custom_gpt2) as a regex: the GPT-2
# regex plus a final \s+ (a single whitespace before a non-space is a piece of its own).
_GPT2_SPLIT = (f"'s|'t|'re|'ve|'m|'ll|'d| ?[{_L}]+| ?[{_N}]+| ?[^{_W}{_L}{_N}]+"
               f"|[{_W}]+(?![^{_W}])|[{_W}]+")
# llama.cpp's hand-written Llama-3 splitter (unicode_regex_split_custom_llama3) as a regex.
_LLAMA3_SPLIT = (f"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\\r\\n{_L}{_N}]?[{_L}]+"
                 f"|[{_N}]{{1,3}}| ?[^{_W}{_L}{_N}]+[\\r\\n]*|[{_W}]*[\\r\\n]+|[{_W}]+(?![^{_W}])|[{_W}]+")

# llama.cpp's hand-written Qwen2 and Qwen3.5 splitters (unicode_regex_split_custom_qwen2/_qwen35):
# the Llama-3 one with single digits (and, for Qwen3.5, marks counted with letters).  These regexes
# are what the collapsed QWEN2/QWEN35 regexes become anyway; they are listed to mirror llama.cpp's
# dispatch (tests/test_tokenizer_qwen2.py checks them against a port of those splitters).
_QWEN2_SPLIT = (f"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\\r\\n{_L}{_N}]?[{_L}]+"
                f"|[{_N}]| ?[^{_W}{_L}{_N}]+[\\r\\n]*|[{_W}]*[\\r\\n]+|[{_W}]+(?![^{_W}])|[{_W}]+")
_QWEN35_SPLIT = (f"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\\r\\n{_L}{_N}]?[{_L}{_M}]+"
                 f"|[{_N}]| ?[^{_W}{_L}{_M}{_N}]+[\\r\\n]*|[{_W}]*[\\r\\n]+|[{_W}]+(?![^{_W}])|[{_W}]+")

_CUSTOM = {
    GPT2: _GPT2_SPLIT,
    LLAMA3: _LLAMA3_SPLIT,
    QWEN2: _QWEN2_SPLIT,
    QWEN35: _QWEN35_SPLIT,
    # llama.cpp also accepts the original (?i:...) spelling for its Llama-3 splitter
    LLAMA3.replace("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
                   "(?i:'s|'t|'re|'ve|'m|'ll|'d)"): _LLAMA3_SPLIT,
}
_UCATS = tuple(uf.CLASS_MEMBERS)


def uses_categories(expr: str) -> bool:
    return any(c in expr for c in _UCATS)


def collapse_regex(expr: str) -> str:
    """Rewrite ``\\p{X}`` into the collapsed alphabet, inside or outside ``[...]`` (as llama.cpp)."""
    if any(ord(c) >= 128 for c in expr):
        raise ValueError("regex mixes unicode categories and non-ASCII characters (llama.cpp refuses this too)")
    out = []
    inside = False
    i = 0
    n = len(expr)
    while i < n:
        c = expr[i]
        if c == "[" and (i == 0 or expr[i - 1] != "\\"):
            inside = True
            out.append(c)
        elif inside and c == "]" and expr[i - 1] != "\\":
            inside = False
            out.append(c)
        elif expr.startswith("\\p{", i) and expr[i:i + 5] in uf.CLASS_MEMBERS:
            members = uf.CLASS_MEMBERS[expr[i:i + 5]]
            out.append(members if inside else f"[{members}]")
            i += 5
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _ecma_to_python(expr: str) -> str:
    # '$' in ECMAScript (non-multiline) is only the end of input; in Python it also matches before
    # a final '\n'.  The only '$' in llama.cpp's lists is an anchor at the end of "\s+$".
    if expr.endswith("$") and not expr.endswith("\\$"):
        expr = expr[:-1] + r"\Z"
    return expr


@dataclass(frozen=True)
class _Stage:
    pattern: re.Pattern
    collapsed: bool  # run on the collapsed text (else on the widened text)


@functools.lru_cache(maxsize=None)
def _compile_stage(expr: str) -> _Stage:
    if expr in _CUSTOM:
        return _Stage(re.compile(_CUSTOM[expr], re.ASCII | re.DOTALL), True)
    if uses_categories(expr):
        return _Stage(re.compile(_ecma_to_python(collapse_regex(expr)), re.ASCII), True)
    return _Stage(re.compile(_ecma_to_python(expr), re.ASCII), False)


class RegexSplitter:
    """Split text into pre-tokenizer words with a llama.cpp regex list (applied in order)."""

    def __init__(self, regexes: tuple[str, ...] | list[str]):
        self.regexes = tuple(regexes)
        self._stages = [_compile_stage(r) for r in self.regexes]

    def split_offsets(self, text: str) -> list[int]:
        """Cut points ``[0, c1, ..., len(text)]`` (code point offsets) of the words of ``text``."""
        n = len(text)
        if n == 0:
            return [0]
        collapsed = widened = None
        cuts = [0, n]
        for st in self._stages:
            if st.collapsed:
                if collapsed is None:
                    collapsed = uf.collapse(text)
                s = collapsed
            else:
                if widened is None:
                    widened = uf.widen(text)
                s = widened
            finditer = st.pattern.finditer
            new = [0]
            append = new.append
            for k in range(len(cuts) - 1):
                a, b = cuts[k], cuts[k + 1]
                last = a
                for m in finditer(s, a, b):
                    ms, me = m.span()
                    if ms > last:
                        append(ms)
                    if me > ms:  # no llama.cpp regex matches empty; never emit an empty piece
                        append(me)
                        last = me
                if last < b:
                    append(b)
            cuts = new
        return cuts

    def split(self, text: str) -> list[str]:
        """The words of ``text`` (their concatenation is ``text``)."""
        cuts = self.split_offsets(text)
        return [text[a:b] for a, b in zip(cuts, cuts[1:])]
