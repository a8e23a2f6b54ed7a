"""Qwen2 / Qwen2.5 / Qwen3 BPE pre-tokenizer (``tokenizer.ggml.pre = "qwen2"``) and Qwen3.5's ('qwen35').

llama.cpp does not run these regexes through a regex engine: ``unicode_regex_split`` dispatches
them to hand-written splitters (``unicode_regex_split_custom_qwen2`` / ``_qwen35`` in
src/unicode.cpp).  ``llama_split`` below is an independent Python port of that state machine; our
regex-based splitter must cut every text exactly where it does.  With llama-cpp-python installed,
SmolLM2's vocabulary relabelled 'qwen2'/'qwen35' is also compared with llama.cpp itself.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import gguf
import pytest

from conftest import OPTIONAL
from gguf_finetune.tokenizer import load_tokenizer
from gguf_finetune.tokenizer import reference as ref
from gguf_finetune.tokenizer import unicode_flags as uf
from gguf_finetune.tokenizer.gguf_meta import GGUFMeta
from gguf_finetune.tokenizer.pretokenizers import (
    PRE_TOKENIZERS,
    QWEN2,
    QWEN35,
    RegexSplitter,
    collapse_regex,
    resolve_pre,
)

LLAMACPP_SKIP = OPTIONAL["llama_cpp"]
needs_llamacpp = pytest.mark.skipif(not ref.available(), reason=LLAMACPP_SKIP)


# -- a port of llama.cpp's hand-written splitters ------------------------------------------------

def llama_split(text: str, marks: bool = False) -> list[str]:
    """llama.cpp's unicode_regex_split_custom_qwen2 (``marks=False``) / _qwen35 (``marks=True``).

    The regex is "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|
    ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+" (Qwen3.5: \\p{L} -> [\\p{L}\\p{M}]),
    but the words come from this scan over code points with llama.cpp's category flags; outside
    the text every flag is false.
    """
    cat, ws = uf.category_table(), uf.whitespace_table()
    n = len(text)

    def flags(i: int) -> tuple[bool, bool, bool, bool]:
        """(in range, letter-like, number, whitespace); letter-like includes marks for Qwen3.5."""
        if not 0 <= i < n:
            return False, False, False, False
        c = ord(text[i])
        f = int(cat[c])
        letter = f == uf.LETTER or (marks and f == uf.ACCENT_MARK)
        return True, letter, f == uf.NUMBER, bool(ws[c])

    def lower(i: int) -> str:
        c = text[i] if i < n else ""
        lc = c.lower()
        return lc if len(lc) == 1 else c

    words: list[str] = []
    start = pos = 0

    def emit(end: int) -> None:
        nonlocal start
        if end > start:
            words.append(text[start:end])
        start = end

    while pos < n:
        c = text[pos]
        here, letter, number, _space = flags(pos)
        # (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if c == "'" and pos + 1 < n:
            if lower(pos + 1) in ("s", "t", "m", "d"):
                pos += 2
                emit(pos)
                continue
            if pos + 2 < n and lower(pos + 1) + lower(pos + 2) in ("re", "ve", "ll"):
                pos += 3
                emit(pos)
                continue
        # [^\r\n\p{L}\p{N}]?\p{L}+
        if not (c in "\r\n" or number) and (letter or flags(pos + 1)[1]):
            pos += 1
            while flags(pos)[1]:
                pos += 1
            emit(pos)
            continue
        # \p{N}: one at a time
        if number:
            pos += 1
            emit(pos)
            continue
        # <space>?[^\s\p{L}\p{N}]+[\r\n]*
        f2 = flags(pos + 1) if c == " " else (here, letter, number, _space)
        if here and not (f2[3] or f2[1] or f2[2]):
            pos += c == " "
            while f2[0] and not (f2[3] or f2[1] or f2[2]):
                pos += 1
                f2 = flags(pos)
            while pos < n and text[pos] in "\r\n":
                pos += 1
            emit(pos)
            continue
        k, last_rn = 0, 0
        while flags(pos + k)[3]:
            if text[pos + k] in "\r\n":
                last_rn = pos + k + 1
            k += 1
        if last_rn:  # \s*[\r\n]+
            pos = last_rn
        elif k > 1 and pos + k < n:  # \s+(?!\S): all but the last whitespace before a non-space
            pos += k - 1
        elif k:  # \s+
            pos += k
        else:
            pos += 1
        emit(pos)
    return words


def tricky_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    extra = ["'S", "'LL", "'Re", "'ve", "'", "''s", " '", "\r\n\r\n", " \r\n ", "\t\r", "   \n  x", "1\u00bd\u0663",
             "\u0301", " \u0301x", "a\u0301\u0302b", "\u0915\u094d\u0937", "!!", " !!\n\n", " ?", "\u3000\u3000x",
             "\u00a0x", "x\u2028y", "\U0001f999\U0001f999", "  ", " 12", "x1y22z333"]
    out = [ref.random_text(rng) for _ in range(n)]
    out += ["".join(rng.choice(extra) for _ in range(rng.randint(1, 8))) for _ in range(n)]
    return out


@pytest.mark.parametrize("pre,regex,marks", [("qwen2", QWEN2, False), ("qwen35", QWEN35, True)])
def test_splitter_equals_llamacpp_port(pre, regex, marks):
    ours = RegexSplitter(PRE_TOKENIZERS[pre].regexes)
    assert PRE_TOKENIZERS[pre].regexes == (regex,)
    # the regex as written, run on llama.cpp's collapsed text (our generic path), agrees too
    plain = re.compile(collapse_regex(regex), re.ASCII)
    for t in tricky_texts(31, 1500):
        expected = llama_split(t, marks)
        assert "".join(expected) == t
        assert ours.split(t) == expected, repr(t)
        c = uf.collapse(t)
        assert [t[m.start():m.end()] for m in plain.finditer(c)] == expected, repr(t)


QWEN2_WORDS = [
    # digits one at a time; contractions case-insensitive; a letter run takes one leading non-letter
    ("I'm 12345 HELLO'S  x\n\ny", ["I", "'m", " ", "1", "2", "3", "4", "5", " HELLO", "'S", " ", " x", "\n\n", "y"]),
    ("x1y22", ["x", "1", "y", "2", "2"]),
    # punctuation keeps one leading space and swallows following newlines; a space run leaves its
    # last space to the next word; whitespace runs up to their last newline
    ("a ?!\r\n\r\n  b", ["a", " ?!\r\n\r\n", " ", " b"]),
    ("a  \n \n  b", ["a", "  \n \n", " ", " b"]),
    ("$x_y", ["$x", "_y"]),
    ("'x", ["'x"]),
    ("don't", ["don", "'t"]),
    # non-ASCII whitespace is whitespace, \u00bd a number, CJK letters
    ("\u3000\u3000\u4f60\u597d \u00bd", ["\u3000", "\u3000\u4f60\u597d", " ", "\u00bd"]),
]


@pytest.mark.parametrize("text,words", QWEN2_WORDS)
def test_qwen2_words(text, words):
    assert RegexSplitter(PRE_TOKENIZERS["qwen2"].regexes).split(text) == words
    assert llama_split(text) == words


def test_qwen35_takes_marks_with_letters():
    q2, q35 = RegexSplitter(PRE_TOKENIZERS["qwen2"].regexes), RegexSplitter(PRE_TOKENIZERS["qwen35"].regexes)
    text = "na\u0308ive \u0915\u094d\u0937 \u0301x"
    # Qwen2: a mark is no letter, so it can only be the one non-letter in front of a letter run
    assert q2.split(text) == ["na", "\u0308ive", " \u0915", "\u094d\u0937", " \u0301", "x"]
    assert q35.split(text) == ["na\u0308ive", " \u0915\u094d\u0937", " \u0301x"]


def test_names_llamacpp_maps_to_qwen2():
    for name in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2"):
        pre, spec, warn = resolve_pre(name)
        assert (pre, spec.type_name, spec.regexes, warn) == (name, "qwen2", (QWEN2,), None)
        assert (spec.clean_spaces, spec.ignore_merges, spec.add_bos, spec.no_bos) == (False, False, False, False)
    # same regex, but llama.cpp keeps its default clean-up for these
    assert PRE_TOKENIZERS["megrez"].regexes == PRE_TOKENIZERS["stablelm2"].regexes == (QWEN2,)
    assert PRE_TOKENIZERS["megrez"].clean_spaces and PRE_TOKENIZERS["stablelm2"].clean_spaces
    assert PRE_TOKENIZERS["qwen35"].clean_spaces is False


# -- a real vocabulary relabelled 'qwen2' --------------------------------------------------------

def write_relabelled(src: Path, dst: Path, pre: str) -> Path:
    """A vocab-only copy of ``src``'s BPE vocabulary with ``tokenizer.ggml.pre`` set to ``pre``.

    (SmolLM2's: same chat tokens as Qwen's, <|im_start|> <|im_end|> <|endoftext|>; no real Qwen
    model is needed to exercise the pre-tokenizer.)"""
    m = GGUFMeta(src)
    toks = m.get_string_array_bytes("tokenizer.ggml.tokens")
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_name("qwen2-relabelled")
    # hyper-parameters only so that llama.cpp itself can load the file
    w.add_block_count(1); w.add_context_length(64); w.add_embedding_length(8); w.add_feed_forward_length(16)
    w.add_head_count(1); w.add_head_count_kv(1); w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(len(toks))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(toks)
    w.add_token_types(m.get_array("tokenizer.ggml.token_type").tolist())
    w.add_token_merges(m.get_string_array_bytes("tokenizer.ggml.merges"))
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unknown_token_id", w.add_unk_token_id), ("padding_token_id", w.add_pad_token_id)):
        v = m.get("tokenizer.ggml." + key, None)
        if v is not None:
            add(v)
    w.add_add_bos_token(False)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return dst


@pytest.fixture(scope="module")
def qwen2_vocab(smollm2, tmp_path_factory) -> Path:
    return write_relabelled(smollm2, tmp_path_factory.mktemp("qwen2") / "qwen2-vocab.gguf", "qwen2")


def test_relabelled_vocabulary(qwen2_vocab, smollm2):
    tok = load_tokenizer(qwen2_vocab)
    assert (tok.kind, tok.pre, tok.vocab.pre_gguf, tok.warnings) == ("bpe", "qwen2", "qwen2", [])
    assert tok.vocab.clean_spaces is False and tok.add_bos is False
    text = "<|im_start|>user\nWhat's 12+345?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, parse_special=True)
    texts = [tok.token_text(i) for i in ids]
    assert texts[0] == "<|im_start|>" and texts.count("<|im_end|>") == 1
    assert texts[texts.index("'s") - 1:texts.index("'s") + 8] == ["What", "'s", "\u0120", "1", "2", "+", "3", "4", "5"]
    assert tok.detokenize(ids, special=True) == text
    assert tok.detokenize(tok.encode("Hello , world ' s")) == "Hello , world ' s"  # no clean-up
    # the same vocabulary as SmolLM2 ('smollm': \p{N} then GPT-2's regex) differs only in the splitting
    smol = load_tokenizer(smollm2)
    assert smol.encode("What's up") == tok.encode("What's up")
    # GPT-2's regex leaves the last newline to the next word, Qwen2's keeps the run whole
    assert smol.encode("a\n\nb") != tok.encode("a\n\nb")
    assert [tok.token_text(i) for i in tok.encode("a\n\nb")] == ["a", "\u010a\u010a", "b"]


@pytest.mark.interop
@needs_llamacpp
@pytest.mark.parametrize("pre", ["qwen2", "qwen35"])
def test_relabelled_vocabulary_matches_llamacpp(pre, smollm2, tmp_path):
    path = write_relabelled(smollm2, tmp_path / f"{pre}.gguf", pre)
    ours, theirs = load_tokenizer(path), ref.LlamaCppTokenizer(str(path))
    try:
        for text in tricky_texts(5, 150) + [t for t, _ in QWEN2_WORDS]:
            for parse_special in (False, True):
                for add_special in (False, True):
                    assert ours.encode(text, add_special, parse_special) == theirs.encode(text, add_special, parse_special), \
                        (pre, text, add_special, parse_special)
                ids = theirs.encode(text, False, parse_special)
                for special in (False, True):
                    assert ours.detokenize_bytes(ids, special) == theirs.detokenize_bytes(ids, special), (pre, text)
        rng = random.Random(9)
        for _ in range(100):
            data = ref.random_bytes(rng)  # not valid UTF-8
            assert ours.encode_bytes(data, False, True) == theirs.encode(data, False, True), data
    finally:
        theirs.close()
