"""SPM tokenizer ('llama' vocabularies): llama.cpp's own test vectors, chunked == unchunked merging,
special tokens, byte fallback, detokenization, speed; cross-checked against llama.cpp when
llama-cpp-python is installed."""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import pytest

from conftest import OPTIONAL
from gguf_finetune.errors import UserError
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.tokenizer import SPMTokenizer, load_tokenizer
from gguf_finetune.tokenizer import reference as ref
from gguf_finetune.tokenizer.merge import SMALL, merge, merge_concat, merge_reference
from gguf_finetune.tokenizer.utf8 import lead_byte_groups

SEP = "\n__ggml_vocab_test__\n"


def read_vocab_tests(vocab: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs from ``<vocab>.inp``/``.out``, read as llama.cpp's tests/test-tokenizer-0 does.

    Inputs are separated by SEP; a trailing SEP ends the list (no empty last input); each output
    line is stripped and split on spaces.
    """
    raw = vocab.with_name(vocab.name + ".inp").read_bytes().decode("utf-8")
    outs = vocab.with_name(vocab.name + ".out").read_text(encoding="utf-8").split("\n")
    if outs and outs[-1] == "":
        outs.pop()  # getline() yields no line after a final newline
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    assert len(inputs) == len(outs), "input and output files have different numbers of tests"
    return [(s, [int(t) for t in o.strip().split(" ") if t]) for s, o in zip(inputs, outs)]


@pytest.fixture(scope="module")
def spm_path(testdata) -> Path:
    return testdata / "vocab" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="module")
def spm(spm_path) -> SPMTokenizer:
    return load_tokenizer(spm_path)


@pytest.fixture(scope="module")
def cases(spm_path):
    return read_vocab_tests(spm_path)


# -- llama.cpp's test vectors --------------------------------------------------------------------

def test_vector_file_shape(cases):
    assert len(cases) == 46
    assert cases[0] == ("ied 4 \u00bd months", [474, 287, 29871, 29946, 29871, 30226, 7378])
    assert ("", []) in cases


def test_llamacpp_vectors(spm, cases):
    bad = [(s, spm.encode(s, False, False), ids) for s, ids in cases if spm.encode(s, False, False) != ids]
    assert not bad


def test_vectors_roundtrip(spm, cases):
    # llama.cpp's detokenize removes the space the tokenizer prefixed, so every vector round-trips
    for s, ids in cases:
        assert spm.detokenize(ids) == s


def test_chunked_equals_whole_text_merge(spm, cases):
    """The per-chunk cache (fast) gives exactly what one merge over the whole fragment (slow) gives."""
    rng = random.Random(0)
    texts = [s for s, _ in cases] + [ref.random_text(rng, rng.randint(0, 40)) for _ in range(200)]
    texts += ["a  b   c\n\n d\t\te " * 3, "\u2581\u2581x \u2581 y", "    Hello\n    Hello"]
    for t in texts:
        assert spm.encode(t) == spm.encode_unchunked(t), repr(t)


def test_merge_heap_equals_rescan():
    rng = random.Random(1)
    for _ in range(300):
        alphabet = "abcd"
        vocab = {"".join(rng.choice(alphabet) for _ in range(rng.randint(2, 4))): rng.choice([-1.0, -2.0, -3.0, -0.5])
                 for _ in range(25)}
        syms = list("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 2 * SMALL))))
        prio = vocab.get  # ties are frequent: the leftmost pair must win in all

        def p(a, b):
            return prio(a + b)

        expected = merge_reference(syms, p)
        assert merge(syms, p) == expected
        assert merge_concat(syms, vocab) == expected  # the rescan below SMALL symbols, the heap above


# -- API semantics -------------------------------------------------------------------------------

def test_properties(spm):
    assert (spm.kind, spm.n_vocab, spm.pre) == ("spm", 32000, "default")
    assert (spm.bos_id, spm.eos_id, spm.unk_id, spm.pad_id) == (1, 2, 0, None)
    assert (spm.add_bos, spm.add_eos, spm.add_space_prefix) == (True, False, True)
    assert spm.is_control(1) and spm.is_control(2) and not spm.is_control(0) and not spm.is_control(15043)
    assert spm.warnings == []


def test_add_special_and_tokenize_flags(spm):
    hello = spm.encode("Hello world")
    assert hello == [15043, 3186]
    assert spm.encode("Hello world", add_special=True) == [1] + hello  # add_bos_token true, add_eos false
    assert spm.tokenize("Hello world") == hello
    assert spm.tokenize("Hello world", add_bos=True, add_eos=True) == [1] + hello + [2]
    assert spm.encode("", add_special=True) == [1]
    assert spm.encode("") == []


def test_control_tokens_only_with_parse_special(spm):
    plain = spm.encode("<s>Hello")
    assert 1 not in plain and spm.detokenize(plain) == "<s>Hello"
    parsed = spm.encode("<s>Hello", parse_special=True)
    # after a special token the next text gets the space prefix again
    assert parsed == [1] + spm.encode("Hello")
    assert spm.tokenize("</s>", special=True) == [2]


def test_byte_fallback_and_pieces(spm):
    ids = spm.encode("\U0001f999")  # no token for the llama emoji: its 4 UTF-8 bytes
    assert ids == [29871, 243, 162, 169, 156]
    assert [spm.token_text(i) for i in ids[1:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert spm.token_to_piece(243) == b"\xf0"
    assert spm.detokenize(ids) == "\U0001f999"
    assert spm.detokenize(ids[:3]) == "\ufffd"  # a cut-off sequence is replaced ...
    assert spm.detokenize_bytes(ids[:3]) == b"\xf0\x9f"  # ... but the bytes are there
    assert spm.token_to_piece(29871) == b" "
    assert spm.token_to_piece(13) == b"\n"
    assert spm.token_to_piece(1) == b"" and spm.token_to_piece(1, special=True) == b"<s>"
    # llama.cpp strips the prefix space from the first piece only, even when that piece is an
    # (invisible) BOS: so a leading BOS keeps the space
    assert spm.detokenize([15043]) == "Hello"
    assert spm.detokenize([1, 15043]) == " Hello" and spm.detokenize([1, 15043], special=True) == "<s> Hello"
    with pytest.raises(ValueError):
        spm.token_to_piece(32000)
    with pytest.raises(ValueError):
        spm.detokenize([-1])


def test_bytes_input(spm):
    """Raw bytes as llama.cpp sees them: valid UTF-8 as text; otherwise lead-byte groups."""
    assert spm.encode_bytes("h\u00e9llo w\u00f6rld <s>".encode(), True, True) == spm.encode("h\u00e9llo w\u00f6rld <s>", True, True)
    assert lead_byte_groups(b"a\xe2\x96\x81\xffbc") == [b"a", b"\xe2\x96\x81", b"\xffbc"]
    byte = spm.vocab.token_to_id
    # 0xFF announces a 4-byte character, so it swallows the 'b' that follows; both become byte tokens
    assert spm.tokenize_bytes(b"a\xffb") == spm.encode("a") + [byte["<0xFF>"], byte["<0x62>"]]
    assert spm.tokenize_bytes(b"a \xc3", add_bos=True) == [1] + spm.encode("a ") + [byte["<0xC3>"]]
    assert spm.detokenize_bytes(spm.tokenize_bytes(b"x\x80y z\xff")) == b"x\x80y z\xff"
    with pytest.raises(TypeError):
        spm.encode(b"bytes")


def test_load_from_gguffile_equals_path(spm, spm_path, cases):
    tok = load_tokenizer(open_gguf(spm_path, "vocab"))
    assert tok.n_vocab == spm.n_vocab and tok.bos_id == spm.bos_id and tok.add_bos == spm.add_bos
    for s, ids in cases:
        assert tok.encode(s) == ids


def test_not_a_vocabulary(tmp_path, spm_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(UserError, match="not a GGUF"):
        load_tokenizer(junk)
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "novocab.gguf"), "llama")
    w.add_name("x")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path / "novocab.gguf")
    for n in (30, 5000, 300_000):  # cut inside the header, the token list, the scores
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(spm_path.read_bytes()[:n])
        with pytest.raises(UserError, match="cut"):
            load_tokenizer(cut)


# -- a small synthetic vocabulary -----------------------------------------------------------------

def write_spm_vocab(path: Path, normal: dict[str, float], user: tuple[str, ...] = (), **flags) -> Path:
    """A vocab-only 'llama' GGUF: <unk> <s> </s>, 256 byte tokens, ``normal`` (text -> score), ``user``."""
    toks = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    toks += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    toks += [(t, s, 1) for t, s in normal.items()] + [(t, 0.0, 4) for t in user]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-spm")
    # hyper-parameters only so that llama.cpp itself can load the file for the cross-check
    w.add_block_count(1); w.add_context_length(64); w.add_embedding_length(8); w.add_feed_forward_length(16)
    w.add_head_count(1); w.add_head_count_kv(1); w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(len(toks))
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _, _ in toks])
    w.add_token_scores([s for _, s, _ in toks])
    w.add_token_types([k for _, _, k in toks])
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    for key, val in flags.items():
        getattr(w, f"add_{key}")(val)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


TINY = {"\u2581": -4.0, "a": -3.0, "b": -3.0, "\u2581a": -1.0, "ab": -0.5, "\u2581ab": -0.1, "\u2581b": -2.0,
        "a\u2581": -0.3, "\u2581\u2581": -1.5}


@pytest.fixture()
def tiny(tmp_path):
    return load_tokenizer(write_spm_vocab(tmp_path / "tiny.gguf", TINY, user=("<tool>",)))


def test_tiny_scores_decide_merges(tiny):
    t = tiny.token_text
    # '▁ab': 'ab' (-0.5) merges before '▁a' (-1.0), then '▁'+'ab' forms '▁ab'
    assert [t(i) for i in tiny.encode("ab")] == ["\u2581ab"]
    assert [t(i) for i in tiny.encode("ba")] == ["\u2581b", "a"]
    # 'a▁' (-0.3) beats '▁a'/'▁b'... and glues across the space: the chunker must not cut there
    assert [t(i) for i in tiny.encode("a b")] == ["\u2581", "a\u2581", "b"]
    assert tiny.encode("a b a b") == tiny.encode_unchunked("a b a b")
    # unknown characters fall back to their bytes
    assert [t(i) for i in tiny.encode("z\u00e9")] == ["\u2581", "<0x7A>", "<0xC3>", "<0xA9>"]
    assert tiny.detokenize(tiny.encode("z\u00e9 ab")) == "z\u00e9 ab"


def test_tiny_user_defined_tokens_always_split(tiny):
    t = tiny.token_text
    # user-defined tokens are cut out even without parse_special; text after them gets the space prefix
    assert [t(i) for i in tiny.encode("a<tool>b")] == ["\u2581a", "<tool>", "\u2581b"]
    assert tiny.encode("a<tool>b", parse_special=True) == tiny.encode("a<tool>b")
    assert tiny.detokenize(tiny.encode("a<tool>b")) == "a<tool> b"  # as llama.cpp: the prefix space stays


def test_tiny_without_space_prefix(tmp_path):
    tok = load_tokenizer(write_spm_vocab(tmp_path / "nosp.gguf", TINY, add_space_prefix=False, add_eos_token=True))
    assert tok.add_space_prefix is False and tok.add_eos is True
    assert [tok.token_text(i) for i in tok.encode("ab")] == ["ab"]
    assert tok.encode("ab", add_special=True) == [1] + tok.encode("ab") + [2]
    assert tok.detokenize(tok.encode(" ab")) == " ab"


# -- speed ---------------------------------------------------------------------------------------

def test_megabyte_round_trip(spm_path, megabyte_text):
    """A megabyte of English round-trips.  Its speed (spec: <= 1 s to load, <= 5 s per MB) is a
    benchmark, not a test: scripts/bench_tokenizer.py, numbers in docs/PERFORMANCE.md."""
    tok = load_tokenizer(spm_path)
    assert tok.detokenize(tok.encode(megabyte_text)) == megabyte_text


# -- against llama.cpp itself --------------------------------------------------------------------

@pytest.mark.interop
@pytest.mark.skipif(not ref.available(), reason=OPTIONAL["llama_cpp"])
@pytest.mark.parametrize("which", ["llama-spm", "tiny", "tiny-nospace"])
def test_matches_llamacpp(which, spm_path, tmp_path):
    if which == "llama-spm":
        path = spm_path
    else:
        extra = {"add_space_prefix": False} if which == "tiny-nospace" else {}
        path = write_spm_vocab(tmp_path / "t.gguf", TINY, user=("<tool>",), **extra)
    ours, theirs = load_tokenizer(path), ref.LlamaCppTokenizer(str(path))
    rng = random.Random(7)
    for _ in range(300):
        text = ref.random_text(rng, rng.randint(0, 25))
        data = ref.random_bytes(rng)  # not valid UTF-8
        for parse_special in (False, True):
            ids = theirs.encode(text, True, parse_special)
            assert ours.encode(text, True, parse_special) == ids, repr(text)
            for special in (False, True):
                assert ours.detokenize_bytes(ids, special) == theirs.detokenize_bytes(ids, special), repr(text)
            assert ours.encode_bytes(data, True, parse_special) == theirs.encode(data, True, parse_special), data
