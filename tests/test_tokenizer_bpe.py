"""BPE tokenizer ('gpt2' vocabularies): SmolLM2 against llama.cpp's recorded ids, every pre-tokenizer,
synthetic vocabularies, detokenization clean-up, speed; cross-checked against llama.cpp itself when
llama-cpp-python is installed."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import OPTIONAL
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.tokenizer import BPETokenizer, load_tokenizer, utf8
from gguf_finetune.tokenizer import reference as ref
from gguf_finetune.tokenizer import unicode_flags as uf
from gguf_finetune.tokenizer.base import Tokenizer
from gguf_finetune.tokenizer.bpe import BYTE_TO_CHAR, to_byte_chars
from gguf_finetune.tokenizer.gguf_meta import GGUFMeta
from gguf_finetune.tokenizer.merge import SMALL, merge, merge_pairs, merge_reference
from gguf_finetune.tokenizer.pretokenizers import PRE_TOKENIZERS, RegexSplitter
from gguf_finetune.tokenizer.vocab import ATTR_USER_DEFINED


@pytest.fixture(scope="module")
def smol(smollm2) -> BPETokenizer:
    return load_tokenizer(smollm2)


def load_cases(testdata: Path, name: str):
    return json.loads((testdata / "reference" / name).read_text(encoding="utf-8"))["cases"]


# -- SmolLM2 against llama.cpp's recorded ids ------------------------------------------------------

def test_smollm2_reference_ids(smol, testdata):
    cases = load_cases(testdata, "smollm2-tokenizer.json")
    assert len(cases) == 55
    bad = [(c["text"], smol.encode(c["text"], False, False), c["tokens"])
           for c in cases if smol.encode(c["text"], False, False) != c["tokens"]]
    assert not bad


def test_smollm2_reference_ids_parse_special(smol, testdata):
    cases = load_cases(testdata, "smollm2-tokenizer-special.json")
    for c in cases:
        assert smol.encode(c["text"], False, True) == c["tokens"]
        assert smol.detokenize(c["tokens"], special=True) == c["text"]
    # without parse_special the same text is plain text
    assert 1 not in smol.encode(cases[0]["text"])


def test_smollm2_roundtrip(smol, testdata):
    for c in load_cases(testdata, "smollm2-tokenizer.json"):
        assert smol.detokenize(c["tokens"]) == c["text"]


def test_smollm2_properties(smol):
    assert (smol.kind, smol.pre, smol.n_vocab, smol.n_merges) == ("bpe", "smollm", 49152, 48900)
    assert (smol.bos_id, smol.eos_id, smol.unk_id, smol.pad_id) == (1, 2, 0, 2)
    assert (smol.add_bos, smol.add_eos, smol.add_space_prefix) == (False, False, False)
    assert smol.is_control(0) and smol.is_control(2) and not smol.is_control(100)
    assert smol.eot_id == 0 and {0, 2} <= smol.eog_ids
    assert smol.encode("Hi", add_special=True) == smol.encode("Hi")  # add_bos_token is false in the file
    assert smol.tokenize("Hi", add_bos=True, add_eos=True) == [1] + smol.encode("Hi") + [2]
    assert smol.token_to_piece(216) == b" " and smol.token_text(216) == "\u0120"
    assert smol.token_to_piece(2) == b"" and smol.token_to_piece(2, special=True) == b"<|im_end|>"
    assert smol.warnings == []


def test_bytes_input(smol):
    text = "Hello, y'all! \u00e9t\u00e9 <|im_end|>"
    assert smol.encode_bytes(text.encode(), False, True) == smol.encode(text, False, True)
    # llama.cpp decodes each invalid byte to U+FFFD before pre-tokenizing
    assert smol.tokenize_bytes(b"a\xffb\xe2\x82") == smol.encode("a\ufffdb\ufffd\ufffd")
    # its decoder takes overlong forms and surrogates at face value
    assert utf8.decode(b"\xc0\x80|\xed\xa0\x80|\xf4\x90\x80\x80|\xe2\x82a|\xf8") == \
        "\x00|\ud800|\ufffd|\ufffd\ufffda|\ufffd"


def test_fast_reader_equals_gguffile(smol, smollm2):
    g = open_gguf(smollm2)
    m = GGUFMeta(smollm2)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert m.get_string_array_bytes(key) == g.get_string_array_bytes(key)
    np.testing.assert_array_equal(m.get_array("tokenizer.ggml.token_type"), g.get_array("tokenizer.ggml.token_type"))
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.padding_token_id", "general.name"):
        assert m.get(key) == g.get(key)
    tok = load_tokenizer(g)
    text = "Hello, y'all! 1234 \u00e9t\u00e9 \U0001f999<|im_end|>"
    assert tok.encode(text, True, True) == smol.encode(text, True, True)


def test_smollm2_megabyte_round_trip(smollm2, megabyte_text):
    """A megabyte of English round-trips.  Its speed (spec: <= 1 s to load, <= 5 s per MB) is a
    benchmark, not a test: scripts/bench_tokenizer.py, numbers in docs/PERFORMANCE.md."""
    tok = load_tokenizer(smollm2)
    assert tok.detokenize(tok.encode(megabyte_text)) == megabyte_text


# -- pre-tokenizers ----------------------------------------------------------------------------------

SAMPLE = "I'm 12345 HELLO'S  x\n\ny"
EXPECTED_WORDS = {
    # GPT-2: case-sensitive contractions, digit runs stay whole, one space left before a word
    "gpt-2": ["I", "'m", " 12345", " HELLO", "'", "S", " ", " x", "\n", "\n", "y"],
    # Llama 3: \p{N}{1,3}, case-insensitive contractions, newline runs together
    "llama3": ["I", "'m", " ", "123", "45", " HELLO", "'S", " ", " x", "\n\n", "y"],
    "qwen2": ["I", "'m", " ", "1", "2", "3", "4", "5", " HELLO", "'S", " ", " x", "\n\n", "y"],
    # StarCoder/SmolLM: single digits split off first, then GPT-2
    "smollm": ["I", "'m", " ", "1", "2", "3", "4", "5", " HELLO", "'", "S", " ", " x", "\n", "\n", "y"],
    # default: punctuation runs first, GPT-2, digit runs, then groups of three ASCII digits
    "default": ["I", "'", "m", " ", "123", "45", " HELLO", "'", "S", " ", " x", "\n", "\n", "y"],
}


@pytest.mark.parametrize("pre", sorted(EXPECTED_WORDS))
def test_pretokenizer_words(pre):
    assert RegexSplitter(PRE_TOKENIZERS[pre].regexes).split(SAMPLE) == EXPECTED_WORDS[pre]


def test_pretokenizer_unicode_classes():
    llama3 = RegexSplitter(PRE_TOKENIZERS["llama3"].regexes)
    # U+0CF3 is a mark only since Unicode 15 (Python 3.11's unicodedata says unassigned): it must
    # not join the letters, exactly as in llama.cpp
    assert uf.category_table()[0x0CF3] == uf.ACCENT_MARK
    assert llama3.split("ab\u0cf3cd") == ["ab", "\u0cf3cd"]
    # non-ASCII whitespace is whitespace; \u00bd is a number; Cyrillic is letters
    assert llama3.split("a\u3000\u3000b \u00bd\u0416\u0416") == ["a", "\u3000", "\u3000b", " ", "\u00bd", "\u0416\u0416"]
    assert RegexSplitter(PRE_TOKENIZERS["gpt-2"].regexes).split("x \u00bd7") == ["x", " \u00bd7"]
    # '~' is an ASCII member of \p{S} for llama.cpp's collapsed regexes (DeepSeek-V3: [\p{P}\p{S}]+)
    assert RegexSplitter(PRE_TOKENIZERS["deepseek-v3"].regexes).split("x ~= y~!") == ["x", " ~=", " y", "~!"]


def test_every_pretokenizer_compiles_and_covers_text():
    rng = random.Random(3)
    texts = [ref.random_text(rng) for _ in range(150)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "possible nested set" from re
        for pre, spec in PRE_TOKENIZERS.items():
            sp = RegexSplitter(spec.regexes)
            for t in texts:
                words = sp.split(t)
                assert "".join(words) == t and all(words), (pre, t)


def test_unicode_table():
    cat = uf.category_table()
    assert cat.shape == (uf.MAX_CODEPOINTS,)
    assert cat[ord("A")] == uf.LETTER and cat[ord("7")] == uf.NUMBER and cat[ord(" ")] == uf.SEPARATOR
    assert cat[ord("~")] == uf.SYMBOL and cat[0x0378] == uf.UNDEFINED and cat[0x1F999] == uf.SYMBOL
    assert uf.whitespace_table()[[0x09, 0x20, 0x85, 0xA0, 0x3000]].all() and not uf.whitespace_table()[0x1C]
    s = "a\u00e9 7\u0663\u3000\U0001f999\u0301."
    c = uf.collapse(s)
    assert len(c) == len(s) and c == "a\xd2 7\xd1\x0b\xd5\xd4."


# -- synthetic vocabularies ----------------------------------------------------------------------

SPECIALS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 1), ("<tool>", 4)]


def write_bpe_vocab(path: Path, pre: str | None, merges: list[str], extra: tuple[str, ...] = (),
                    drop: tuple[str, ...] = (), **flags) -> Path:
    """A vocab-only 'gpt2' GGUF: SPECIALS, the 256 byte characters, every merge result (minus ``drop``),
    ``extra`` tokens.  ('<|im_end|>' is typed normal on purpose: llama.cpp makes it a control token.)"""
    toks = list(SPECIALS) + [(c, 1) for c in BYTE_TO_CHAR]
    seen = {t for t, _ in toks}
    for m in merges:
        t = m.replace(" ", "")
        if t not in seen and t not in drop:
            toks.append((t, 1))
            seen.add(t)
    toks += [(t, 1) for t in extra if t not in seen]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-bpe")
    # hyper-parameters only so that llama.cpp itself can load the file for the cross-check
    w.add_block_count(1); w.add_context_length(64); w.add_embedding_length(8); w.add_feed_forward_length(16)
    w.add_head_count(1); w.add_head_count_kv(1); w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(len(toks))
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in toks])
    w.add_token_types([k for _, k in toks])
    w.add_token_merges(merges)
    w.add_bos_token_id(1); w.add_eos_token_id(0)
    for key, val in flags.items():
        getattr(w, f"add_{key}")(val)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


DIGIT_MERGES = ["1 2", "12 3", "123 4", "1234 5", "4 5", "\u0120 a", "h e", "l l", "he ll", "hell o"]


def texts_of(tok, ids):
    return [tok.token_text(i) for i in ids]


@pytest.mark.parametrize("pre,expected", [
    ("llama3", ["123", "45"]),  # \p{N}{1,3}
    ("gpt-2", ["12345"]),
    ("qwen2", ["1", "2", "3", "4", "5"]),
    ("smollm", ["1", "2", "3", "4", "5"]),
    ("default", ["123", "45"]),  # its last regex, [0-9][0-9][0-9], splits the digit run
    ("deepseek-v3", ["123", "45"]),
    ("falcon", ["123", "45"]),
])
def test_synthetic_digit_grouping(tmp_path, pre, expected):
    tok = load_tokenizer(write_bpe_vocab(tmp_path / "v.gguf", pre, DIGIT_MERGES))
    assert tok.pre == pre and not [w for w in tok.warnings if "pre" in w]
    assert texts_of(tok, tok.encode("12345")) == expected
    assert tok.detokenize(tok.encode("12345")) == "12345"


def test_synthetic_ignore_merges(tmp_path):
    # 'world' is a token but no merges build it: Llama 3 (ignore_merges) still emits it whole
    for pre, expected in (("llama3", ["world"]), ("gpt-2", ["w", "o", "r", "l", "d"])):
        tok = load_tokenizer(write_bpe_vocab(tmp_path / f"{pre}.gguf", pre, DIGIT_MERGES, extra=("world",)))
        assert texts_of(tok, tok.encode("world")) == expected
        assert texts_of(tok, tok.encode("hello")) == ["hello"]  # built by merges either way


def test_synthetic_merge_without_token(tmp_path):
    # the merge 'Ġ a' exists but 'Ġa' is no token: llama.cpp then looks up each UTF-8 byte of the
    # symbol as a token, which drops 'Ġ' (two bytes, neither a token) and keeps 'a'
    tok = load_tokenizer(write_bpe_vocab(tmp_path / "v.gguf", "gpt-2", DIGIT_MERGES, drop=("\u0120a",)))
    assert texts_of(tok, tok.encode(" a")) == ["a"]


def test_synthetic_special_tokens(tmp_path):
    tok = load_tokenizer(write_bpe_vocab(tmp_path / "v.gguf", "gpt-2", DIGIT_MERGES))
    im_end = tok.vocab.token_to_id["<|im_end|>"]
    assert tok.is_control(im_end) and any("control-looking" in w for w in tok.warnings)
    text = "a<|im_start|>b<tool>c<|im_end|>"
    plain = texts_of(tok, tok.encode(text))
    assert "<|im_start|>" not in plain and "<|im_end|>" not in plain
    assert "<tool>" in plain  # user-defined tokens are split off even without parse_special
    parsed = texts_of(tok, tok.encode(text, parse_special=True))
    assert parsed == ["a", "<|im_start|>", "b", "<tool>", "c", "<|im_end|>"]
    assert tok.detokenize(tok.encode(text, parse_special=True)) == "ab<tool>c"  # control tokens print nothing
    assert tok.detokenize(tok.encode(text, parse_special=True), special=True) == text


# texts llama.cpp treats specially when it loads a vocabulary, typed normal here on purpose
GPT_OSS = ("<|end|>", "<|return|>", "<|call|>", "<|channel|>", "<|message|>")
GEMMA4_LIKE = ("</s>", "<|tool_response>")


def test_special_texts_rules(tmp_path):
    tok = load_tokenizer(write_bpe_vocab(tmp_path / "o.gguf", "gpt-2", DIGIT_MERGES, extra=GPT_OSS))
    tid = tok.vocab.token_to_id
    # end-of-generation texts become control tokens; with <|return|> and <|call|> present, '<|end|>'
    # only ends a message (user-defined, not EOG); gpt-oss's channel markers are always user-defined
    assert tok.is_control(tid["<|return|>"]) and tok.is_eog(tid["<|return|>"]) and tok.is_eog(tid["<|call|>"])
    assert not tok.is_eog(tid["<|end|>"])
    assert [tok.vocab.attrs[tid[t]] for t in ("<|end|>", "<|channel|>", "<|message|>")] == [ATTR_USER_DEFINED] * 3
    text = "a<|end|>b<|return|>c<|channel|>"
    assert "<|end|>" in texts_of(tok, tok.encode(text)) and "<|return|>" not in texts_of(tok, tok.encode(text))
    # '</s>' ends generation (and becomes control) unless the vocabulary also has '<|tool_response>'
    for extra, eog in ((GEMMA4_LIKE[:1], True), (GEMMA4_LIKE, False)):
        tok = load_tokenizer(write_bpe_vocab(tmp_path / f"s{eog}.gguf", "gpt-2", DIGIT_MERGES, extra=extra))
        s = tok.vocab.token_to_id["</s>"]
        assert (tok.is_eog(s), tok.is_control(s)) == (eog, eog)


@pytest.mark.interop
@pytest.mark.skipif(not ref.available(), reason=OPTIONAL["llama_cpp"])
@pytest.mark.parametrize("extra", [GPT_OSS, GEMMA4_LIKE[:1], GEMMA4_LIKE])
def test_special_texts_rules_match_llamacpp(extra, tmp_path):
    path = write_bpe_vocab(tmp_path / "v.gguf", "gpt-2", DIGIT_MERGES, extra=extra)
    ours, theirs = load_tokenizer(path), ref.LlamaCppTokenizer(str(path))
    for i in range(ours.n_vocab):
        assert (int(ours.vocab.attrs[i]), ours.is_eog(i)) == (theirs.token_attr(i), theirs.is_eog(i)), ours.token_text(i)
    text = "".join(f"x{t}" for t in extra + tuple(t for t, _ in SPECIALS)) + " 12"
    for ps in (False, True):
        ids = theirs.encode(text, True, ps)
        assert ours.encode(text, True, ps) == ids
        for special in (False, True):
            assert ours.detokenize_bytes(ids, special) == theirs.detokenize_bytes(ids, special)


def test_unknown_and_missing_pre(tmp_path):
    tok = load_tokenizer(write_bpe_vocab(tmp_path / "u.gguf", "no-such-pre", DIGIT_MERGES))
    assert tok.pre == "default" and tok.vocab.pre_gguf == "no-such-pre"
    assert any("no-such-pre" in w for w in tok.warnings)
    assert texts_of(tok, tok.encode("12345")) == ["123", "45"]
    tok = load_tokenizer(write_bpe_vocab(tmp_path / "m.gguf", None, DIGIT_MERGES))
    assert tok.pre == "default" and any("missing" in w for w in tok.warnings)


def test_bos_flags_follow_llamacpp_defaults(tmp_path):
    # llama3 / tekken / chameleon add BOS unless the file says otherwise; others do not
    assert load_tokenizer(write_bpe_vocab(tmp_path / "a.gguf", "llama-bpe", DIGIT_MERGES)).add_bos is True
    assert load_tokenizer(write_bpe_vocab(tmp_path / "b.gguf", "gpt-2", DIGIT_MERGES)).add_bos is False
    tok = load_tokenizer(write_bpe_vocab(tmp_path / "c.gguf", "llama-bpe", DIGIT_MERGES, add_bos_token=False))
    assert tok.add_bos is False
    tok = load_tokenizer(write_bpe_vocab(tmp_path / "d.gguf", "gpt-2", DIGIT_MERGES, add_bos_token=True))
    assert tok.encode("1", add_special=True) == [1] + tok.encode("1")


# -- detokenization clean-up ---------------------------------------------------------------------

def clean_spaces_reference(text: bytes) -> bytes:
    """llama.cpp's three in-place passes over the buffer, transcribed loop for loop (the slow spec)."""
    t = bytearray(text)
    total = len(t)
    # pass 1: ' ?', ' !', ' .', ' ,' lose the space
    n1, total = total, (1 if total else 0)
    for i in range(1, n1):
        x = t[i]
        if t[i - 1] == 32 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # pass 2: a lone apostrophe between spaces loses both spaces (the second becomes NUL in the buffer)
    n2, total = total, (1 if total else 0)
    i = 1
    while i < n2:
        x = t[i]
        if x == 39 and i + 1 < n2 and t[i - 1] == 32 and t[i + 1] == 32:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # pass 3: " 's", " 'm", " 're", " 've" lose the space
    n3, total = total, (1 if total else 0)
    for i in range(1, n3):
        x = t[i]
        if t[i - 1] == 32 and x == 39 and i + 1 < n3:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < n3 and (x1, t[i + 2]) in ((114, 101), (118, 101)):
                total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total])


def test_clean_spaces_equals_reference():
    rng = random.Random(11)
    for _ in range(3000):
        s = "".join(rng.choice(" '?!.,smtdlrvea x") for _ in range(rng.randint(0, 20))).encode()
        assert Tokenizer._clean_spaces(s) == clean_spaces_reference(s), s
    assert Tokenizer._clean_spaces(b"Hello , world ' s it 's") == b"Hello, world's it's"


def test_gpt2_detokenize_cleans_spaces(tmp_path):
    tok = load_tokenizer(write_bpe_vocab(tmp_path / "v.gguf", "gpt-2", DIGIT_MERGES))
    assert tok.vocab.clean_spaces is True
    assert tok.detokenize(tok.encode("Hello , world ' s it 's")) == "Hello, world's it's"


def test_merge_heap_equals_rescan_with_ranks():
    rng = random.Random(2)
    for _ in range(300):
        ranks = {}
        for r in range(40):
            a = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 2)))
            b = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 2)))
            ranks.setdefault((a, b), r)
        syms = list("".join(rng.choice("xyz") for _ in range(rng.randint(0, 2 * SMALL))))

        def prio(a, b):
            return ranks.get((a, b))

        expected = merge_reference(syms, prio)
        assert merge(syms, prio) == expected
        assert merge_pairs(syms, ranks) == expected


def test_cache_does_not_change_results(smol):
    rng = random.Random(5)
    texts = [ref.random_text(rng, 20) for _ in range(100)]
    fresh = BPETokenizer(smol.vocab)
    fresh.cache_limit = 0  # every word merged from scratch
    for t in texts:
        assert fresh.encode(t, False, True) == smol.encode(t, False, True)
    assert fresh._cache == {}
    assert to_byte_chars(" \n\u00e9") == "\u0120\u010a\u00c3\u00a9"


# -- against llama.cpp itself --------------------------------------------------------------------

needs_llamacpp = pytest.mark.skipif(not ref.available(), reason=OPTIONAL["llama_cpp"])


def compare_with_llamacpp(path: Path, n: int, seed: int) -> None:
    ours, theirs = load_tokenizer(path), ref.LlamaCppTokenizer(str(path))
    rng = random.Random(seed)
    for _ in range(n):
        text = ref.random_text(rng)
        for parse_special in (False, True):
            for add_special in (False, True):
                assert ours.encode(text, add_special, parse_special) == theirs.encode(text, add_special, parse_special), \
                    (ours.pre, text, add_special, parse_special)
            ids = theirs.encode(text, False, parse_special)
            for special in (False, True):
                assert ours.detokenize_bytes(ids, special) == theirs.detokenize_bytes(ids, special), (ours.pre, text)


@pytest.mark.interop
@needs_llamacpp
def test_smollm2_matches_llamacpp(smollm2):
    compare_with_llamacpp(smollm2, 300, 1)
    ours, theirs = load_tokenizer(smollm2), ref.LlamaCppTokenizer(str(smollm2))
    rng = random.Random(2)
    for _ in range(300):
        data = ref.random_bytes(rng)  # not valid UTF-8
        assert ours.encode_bytes(data, False, True) == theirs.encode(data, False, True), data


@pytest.fixture(scope="module")
def small_real_merges(smollm2) -> list[str]:
    """SmolLM2's first 3000 merges: a real, self-consistent small BPE vocabulary."""
    return [m.decode("utf-8") for m in load_tokenizer(smollm2).vocab.merges[:3000]]


@pytest.mark.interop
@pytest.mark.slow
@needs_llamacpp
@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pretokenizer_matches_llamacpp(pre, small_real_merges, tmp_path):
    compare_with_llamacpp(write_bpe_vocab(tmp_path / "v.gguf", pre, small_real_merges), 150, 17)


@pytest.mark.interop
@needs_llamacpp
def test_synthetic_quirks_match_llamacpp(tmp_path):
    path = write_bpe_vocab(tmp_path / "v.gguf", "llama3", DIGIT_MERGES, extra=("world",), drop=("\u0120a",))
    ours, theirs = load_tokenizer(path), ref.LlamaCppTokenizer(str(path))
    for text in ("world 12345 hello a <tool> <|im_end|>", " a", "12345", "hello world"):
        for ps in (False, True):
            assert ours.encode(text, True, ps) == theirs.encode(text, True, ps), text


@pytest.mark.interop
@needs_llamacpp
def test_symbol_class_matches_llamacpp(small_real_merges, tmp_path):
    # '~' is in llama.cpp's \p{S}: ' ~=' is one DeepSeek-V3 word, so the merge 'Ġ ~' applies to it
    path = write_bpe_vocab(tmp_path / "v.gguf", "deepseek-v3", small_real_merges + ["\u0120 ~"])
    ours, theirs = load_tokenizer(path), ref.LlamaCppTokenizer(str(path))
    assert "\u0120~" in texts_of(ours, ours.encode("x ~= y"))
    for text in ("x ~= y", "a ~~ b~!", "~\u00e9 ~", "1~2 ~"):
        assert ours.encode(text) == theirs.encode(text), text
