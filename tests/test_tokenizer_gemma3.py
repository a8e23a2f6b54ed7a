"""Gemma 3's SentencePiece vocabulary (262,144 tokens, byte fallback, no space prefix, user-defined
whitespace/HTML tokens): the real gemma-3-270m GGUF against llama.cpp's recorded ids
(tests/data/arch/gemma3-270m-tokenizer.json, from llama-cpp-python 0.3.36), llama.cpp's special-token
rules, exactness of the chunked merge, and, when llama-cpp-python is installed, randomized
comparisons with llama.cpp itself.  The model is an optional package."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import OPTIONAL
from gguf_finetune.tokenizer import SPMTokenizer, load_tokenizer
from gguf_finetune.tokenizer import reference as ref
from gguf_finetune.tokenizer.vocab import ATTR_CONTROL, ATTR_UNUSED, ATTR_USER_DEFINED

DATA = Path(__file__).resolve().parent / "data" / "arch"
LLAMACPP_SKIP = OPTIONAL["llama_cpp"]


@pytest.fixture(scope="module")
def gemma_path(gemma3_270m) -> Path:
    return gemma3_270m


@pytest.fixture(scope="module")
def gemma(gemma_path) -> SPMTokenizer:
    return load_tokenizer(gemma_path)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((DATA / "gemma3-270m-tokenizer.json").read_text(encoding="utf-8"))


def test_reference_file(reference):
    assert reference["model"] == "gemma-3-270m-q4_k_m.gguf" and len(reference["cases"]) == 3


# -- llama.cpp's recorded ids ----------------------------------------------------------------------

@pytest.mark.parametrize("case", range(3))
def test_recorded_ids(gemma, reference, case):
    c = reference["cases"][case]
    text = c["text"]
    assert gemma.tokenize(text) == c["tokens_plain"]
    assert gemma.tokenize(text, special=True) == c["tokens_special"]
    assert gemma.tokenize(text, add_bos=True, special=True) == c["tokens_bos_special"]
    # the same through llama_tokenize's flags: the GGUF says add_bos_token = true, add_eos_token = false
    assert gemma.encode(text, add_special=False, parse_special=False) == c["tokens_plain"]
    assert gemma.encode(text, add_special=True, parse_special=True) == c["tokens_bos_special"]


@pytest.mark.parametrize("case", range(3))
def test_recorded_ids_round_trip(gemma, reference, case):
    c = reference["cases"][case]
    text = c["text"]
    assert gemma.detokenize(c["tokens_plain"]) == text
    assert gemma.detokenize(c["tokens_special"], special=True) == text
    assert gemma.detokenize(c["tokens_bos_special"], special=True) == "<bos>" + text
    # control tokens print nothing unless asked for
    plain = text.replace("<start_of_turn>", "").replace("<end_of_turn>", "")
    assert gemma.detokenize(c["tokens_bos_special"]) == plain


def test_properties(gemma):
    assert (gemma.kind, gemma.pre, gemma.n_vocab) == ("spm", "default", 262144)
    assert (gemma.bos_id, gemma.eos_id, gemma.unk_id, gemma.pad_id, gemma.eot_id) == (2, 1, 3, 0, 106)
    assert (gemma.add_bos, gemma.add_eos, gemma.add_space_prefix) == (True, False, False)
    assert [gemma.token_text(i) for i in (105, 106, 107, 108, 138, 212)] == \
        ["<start_of_turn>", "<end_of_turn>", "\n", "\n\n", "  ", "</s>"]
    assert gemma.is_control(105) and gemma.is_control(106) and not gemma.is_control(107)
    # end of generation: <eos>, <end_of_turn> and (llama.cpp's list) '</s>', see below
    assert gemma.eog_ids == {1, 106, 212}
    attrs = gemma.vocab.attrs
    assert attrs[6] == ATTR_CONTROL | ATTR_UNUSED  # '<unused0>': control tokens named "unused"
    assert (attrs & ATTR_UNUSED).astype(bool).sum() == 6242


# -- llama.cpp's rules, on Gemma's vocabulary ------------------------------------------------------

def ids_of(tok, *texts: str) -> list[int]:
    return [tok.vocab.token_to_id[t] for t in texts]


def test_user_defined_tokens_split_without_parse_special(gemma):
    # runs of newlines, spaces, tabs and HTML tags are user-defined tokens: llama.cpp cuts them out of
    # the text before the SPM merge, longest first, with or without parse_special
    text = "x\n\n\n  y<b>z</b>\t\tw"
    expected = ids_of(gemma, "x", "\n\n\n", "  ", "y", "<b>", "z", "</b>", "\t\t", "w")
    assert gemma.tokenize(text) == expected
    assert gemma.tokenize(text, special=True) == expected
    assert gemma.detokenize(expected) == text
    # a single space is no user-defined token: it becomes '▁' glued to the next word
    assert gemma.tokenize("a b") == ids_of(gemma, "a", "\u2581b")


def test_no_space_prefix(gemma):
    # add_space_prefix = false: no '▁' in front of the text, nor after a special token
    assert gemma.tokenize("Hello world") == ids_of(gemma, "Hello", "\u2581world")
    assert gemma.tokenize(" Hello") == ids_of(gemma, "\u2581Hello")
    assert gemma.tokenize("<start_of_turn>user", special=True) == ids_of(gemma, "<start_of_turn>", "user")
    assert gemma.detokenize(gemma.tokenize(" Hello")) == " Hello"


def test_control_tokens_only_with_parse_special(gemma):
    turn = "<start_of_turn>model\nHi<end_of_turn>\n"
    plain = gemma.tokenize(turn)
    assert 105 not in plain and 106 not in plain
    assert plain[:7] == ids_of(gemma, "<", "start", "_", "of", "_", "turn", ">")
    assert gemma.tokenize(turn, special=True) == [105] + ids_of(gemma, "model", "\n", "Hi") + [106, 107]
    assert gemma.token_to_piece(105) == b"" and gemma.token_to_piece(105, special=True) == b"<start_of_turn>"
    # unused control tokens too
    assert gemma.tokenize("<unused0>", special=True) == [6]
    assert gemma.tokenize("<unused0>") == ids_of(gemma, "<", "unused", "0", ">")


def test_end_tag_s_is_made_control(gemma):
    """'</s>' is a user-defined token in Gemma 3 (HTML strike-through), but llama.cpp lists '</s>' among
    its end-of-generation texts (for paddleocr) and so makes it a control token: it is no longer
    split out of plain text, only parsed with parse_special, and prints only with special=True."""
    assert gemma.vocab.attrs[212] == ATTR_USER_DEFINED | ATTR_CONTROL
    assert any("'</s>'" in w for w in gemma.warnings)
    assert gemma.tokenize("a</s>b") == ids_of(gemma, "a", "</", "s", ">", "b")
    assert gemma.tokenize("a</s>b", special=True) == ids_of(gemma, "a", "</s>", "b")
    assert gemma.detokenize(ids_of(gemma, "a", "</s>", "b")) == "ab"
    assert gemma.detokenize(ids_of(gemma, "a", "</s>", "b"), special=True) == "a</s>b"
    assert gemma.tokenize("<s>") == ids_of(gemma, "<s>")  # the opening tag stays user-defined


def test_byte_fallback(gemma):
    for ch in ("\U000f0000", "\u0378", "\U0001fae8", "\x00"):
        assert ch not in gemma.vocab.token_to_id
        ids = gemma.tokenize("a" + ch + "b")
        assert ids == ids_of(gemma, "a", *(f"<0x{b:02X}>" for b in ch.encode()), "b")
        assert gemma.detokenize(ids) == "a" + ch + "b"
    assert gemma.token_to_piece(gemma.vocab.token_to_id["<0xF3>"]) == b"\xf3"
    assert gemma.detokenize(gemma.tokenize("\U000f0000")[:2]) == "\ufffd"  # a cut-off character
    # invalid UTF-8 input: lead-byte groups that are no character become byte tokens
    assert gemma.tokenize_bytes(b"a\xffb") == ids_of(gemma, "a", "<0xFF>", "<0x62>")


def test_chunked_equals_whole_text_merge(gemma, reference):
    """The per-chunk cache (fast) gives what one merge over each whole fragment gives (llama.cpp)."""
    rng = random.Random(3)
    texts = [c["text"] for c in reference["cases"]]
    texts += [ref.random_text(rng, rng.randint(0, 30)) for _ in range(150)]
    texts += ["a  b   c\n\n d\t\te " * 3, "\u2581\u2581x \u2581 y", "    Hello\n    Hello", "<b> x </b> > \u2581y"]
    for t in texts:
        expected: list[int] = []
        for frag in gemma.partition(t, parse_special=False):
            expected += [frag] if type(frag) is int else gemma.encode_unchunked(frag)
        assert gemma.encode(t) == expected, repr(t)


def test_round_trip_random(gemma):
    rng = random.Random(4)
    for _ in range(200):
        t = ref.random_text(rng, rng.randint(0, 30))
        assert gemma.detokenize(gemma.tokenize(t)) == t, repr(t)


def test_cache_does_not_change_results(gemma_path, gemma):
    fresh = load_tokenizer(gemma_path)
    fresh.cache_limit = 0
    rng = random.Random(6)
    for _ in range(100):
        t = ref.random_text(rng, 20)
        assert fresh.encode(t, True, True) == gemma.encode(t, True, True)
    assert fresh._cache == {}


# -- against llama.cpp itself ------------------------------------------------------------------------

@pytest.mark.interop
@pytest.mark.skipif(not ref.available(), reason=LLAMACPP_SKIP)
def test_matches_llamacpp(gemma_path, gemma, reference):
    theirs = ref.LlamaCppTokenizer(str(gemma_path))
    try:
        # every token's attributes and end-of-generation flag after llama.cpp's load-time rules
        attrs = gemma.vocab.attrs.tolist()
        assert [i for i in range(gemma.n_vocab) if attrs[i] != theirs.token_attr(i)] == []
        assert {i for i in range(gemma.n_vocab) if theirs.is_eog(i)} == gemma.eog_ids
        rng = random.Random(8)
        texts = [c["text"] for c in reference["cases"]]
        texts += ["<start_of_turn>user\n<b>hi</b> </s> <s>\n\n\n  x\t\t<unused0><eos><mask>[multimodal]<end_of_turn>\n"]
        texts += [ref.random_text(rng, rng.randint(0, 25)) for _ in range(300)]
        for text in texts:
            for parse_special in (False, True):
                ids = theirs.encode(text, True, parse_special)
                assert gemma.encode(text, True, parse_special) == ids, repr(text)
                assert gemma.encode(text, False, parse_special) == theirs.encode(text, False, parse_special), repr(text)
                for special in (False, True):
                    assert gemma.detokenize_bytes(ids, special) == theirs.detokenize_bytes(ids, special), repr(text)
        for _ in range(200):
            data = ref.random_bytes(rng)  # not valid UTF-8
            for parse_special in (False, True):
                assert gemma.encode_bytes(data, True, parse_special) == theirs.encode(data, True, parse_special), data
        for c in reference["cases"]:  # the recorded ids are still what this llama.cpp gives
            assert theirs.encode(c["text"], False, False) == c["tokens_plain"]
            assert theirs.encode(c["text"], True, True) == c["tokens_bos_special"]
    finally:
        theirs.close()
