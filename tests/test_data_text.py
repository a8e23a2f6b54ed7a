"""gguf_finetune.data.text: llama.cpp's sample pipeline, with a fake tokenizer and on the llama.cpp fixture."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from gguf_finetune.data.batches import ShuffleState, compute_samples_hash, resume_shuffle
from gguf_finetune.data.text import (
    BatchConfig,
    BatchIterator,
    example_targets_batch,
    example_targets_batch_ref,
    load_train_text,
    mark_utf8_units,
    mark_utf8_units_ref,
    process_escapes,
    tokenize_file,
    tokenize_text,
)
from gguf_finetune.errors import UserError
from gguf_finetune.stdcpp import mt19937_seed_to_state

FIXTURE = "fixtures/llamacpp-tiny"
BOS, EOS, NV = 1, 2, 300


class CharTok:
    """One token per character (id = codepoint % 290 + 3); 'tokens' are 1..3 bytes long."""

    bos_id, eos_id = BOS, EOS
    max_token_text_len = 3

    def tokenize(self, text, add_bos=False, add_eos=False, special=False):
        assert not add_bos and not add_eos and not special
        return [ord(c) % 290 + 3 for c in text]


TOK = CharTok()


def ids(s: str) -> list[int]:
    return TOK.tokenize(s)


# -- escapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src,want",
    [
        (r"\n", b"\n"), (r"a\tb\\c", b"a\tb\\c"), (r"\'\"\r", b"'\"\r"), (r"\x41\x4a", b"AJ"),
        (r"\q", b"\\q"), ("end\\", b"end\\"), (r"\x4", b"\\x4"), (r"\x4g", b"\\x4g"), (r"\x 1", b"\x01"),
        ("<s>\\n", b"<s>\n"),
    ],
)
def test_process_escapes(src, want):
    assert process_escapes(src) == want


# -- tokenize_file ----------------------------------------------------------------------------------


def test_sample_start_splits_and_drops_text_before_first_match():
    data = b"title\nab\ncde\n\nf"
    ds = tokenize_text(data, TOK, b"\n", False, False, 3)
    # samples: 'ab', 'cde', '' (between the two \n), 'f'; 'title' is not a sample
    assert ds.sizes.tolist() == [2, 3, 0, 1]
    assert ds.begins.tolist() == [0, 2, 5, 5]
    assert ds.tokens.tolist() == ids("ab") + ids("cde") + ids("f")
    assert ds.messages == (
        "tokenize_file: warning: found 2 samples (min length 1) that are shorter than context length of 3.",
        "tokenize_file: warning: found 1 empty samples.",
        "tokenize_file: total number of samples: 4",
    )


def test_include_sample_start_and_too_long_samples():
    ds = tokenize_text(b"xx<s>abcdef<s>ab", TOK, b"<s>", True, False, 4)
    assert ds.sizes.tolist() == [9, 5]
    assert ds.tokens.tolist() == ids("<s>abcdef") + ids("<s>ab")
    assert ds.messages[0] == (
        "tokenize_file: warning: found 2 samples (max length 9) that exceed context length of 4. "
        "samples will be cut off."
    )


def test_pattern_not_found_inserts_one_sample_at_begin():
    ds = tokenize_text(b"hello world", TOK, b"@@", False, False, 4)
    # llama.cpp then still skips len(pattern) bytes when the start is not included
    assert ds.tokens.tolist() == ids("llo world")
    assert ds.messages[0] == (
        "tokenize_file: warning: sample start pattern '@@' not found. inserting single sample at data begin"
    )


def test_empty_sample_start_means_every_token_position():
    ds = tokenize_text(b"abcdefghij", TOK, b"", False, False, 4)
    assert ds.tokens.tolist() == ids("abcdefghij")
    # first sample min(n_ctx, n); then starts 1 .. n-n_ctx-1 (llama.cpp stops one short)
    assert ds.begins.tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.sizes.tolist() == [4] * 6
    short = tokenize_text(b"ab", TOK, b"", False, False, 4)
    assert short.begins.tolist() == [0] and short.sizes.tolist() == [2]
    assert short.messages == ("tokenize_file: total number of samples: 1",)


def test_overlapping_samples_use_byte_budget_and_utf8_boundaries():
    text = "\nab\ncd\né" * 2
    ds = tokenize_text(text.encode(), TOK, b"\n", False, True, 2)  # budget 3 bytes * 2 = 6
    assert ds.n_samples == 6
    # sample 0 = bytes [1, 7) = 'ab\ncd\n'; sample 2 = 'é\nab' cut at byte budget 6 ('é' is 2 bytes)
    assert ds.tokens[ds.begins[0]:ds.begins[0] + ds.sizes[0]].tolist() == ids("ab\ncd\n")
    assert ds.tokens[ds.begins[2]:ds.begins[2] + ds.sizes[2]].tolist() == ids("é\nab\n")
    cut = tokenize_text("\nxé".encode(), TOK, b"\n", False, True, 1)  # budget 3: 'xé' needs 3 bytes
    assert cut.tokens.tolist() == ids("xé")
    mid = tokenize_text("\néé".encode(), TOK, b"\n", False, True, 1)  # 3 bytes end inside 2nd 'é': extend
    assert mid.tokens.tolist() == ids("éé")


def test_max_token_text_len_from_tokens_list():
    class T(CharTok):
        max_token_text_len = None
        tokens = [b"a", "\u2581t", b"ab\0cdef"]  # UTF-8 bytes, strlen stops at NUL: 1, 4, 2

    ds = tokenize_text(b"\nabcdefghijkl", T(), b"\n", False, True, 2)
    assert ds.sizes.tolist() == [8]


def test_utf8_marks_fast_equals_reference():
    r = np.random.default_rng(1)
    data = bytes(r.integers(0, 256, 3000, dtype=np.uint8)) + "héllo €𝄞".encode()
    for d in (data, b"", b"\xf0", "ab€".encode()):
        a, b = mark_utf8_units(d), mark_utf8_units_ref(d)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_tokenize_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        tokenize_file(tmp_path / "nope.txt", TOK, b"\n", False, False, 8)
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        tokenize_file(tmp_path / "e.txt", TOK, b"\n", False, False, 8)
    with pytest.raises(UserError, match="directory"):
        tokenize_file(tmp_path, TOK, b"\n", False, False, 8)


def test_load_train_text_reports_main_lines(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"\naa\nab\n")
    lines = []
    ds = load_train_text(str(p), TOK, b"\n", True, False, 8, report=lines.append)
    assert lines[:3] == [f"main: tokenize training data from {p}", "main: sample-start: \n",
                         "main: include-sample-start: true"]
    assert lines[-2:] == ["main: number of training tokens: 7", "main: number of unique tokens: 3"]
    assert ds.n_samples == 3


# -- batches ------------------------------------------------------------------------------------------


def _toy(n_samples=9, seed=0, max_size=13):
    r = np.random.default_rng(seed)
    sizes = r.integers(0, max_size, n_samples).astype(np.int64)
    begins = np.cumsum(np.concatenate([[0], sizes[:-1]])).astype(np.int64)
    data = r.integers(3, NV + 20, int(sizes.sum())).astype(np.int32)  # some ids >= n_vocab: clamped
    offs = np.array([r.integers(0, max(s, 1)) for s in sizes], dtype=np.int64)
    return offs, begins, sizes, data


@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("seos,sbos", [(False, True), (True, True), (True, False), (False, False)])
@pytest.mark.parametrize("rand_offs", [False, True])
def test_batch_fast_equals_reference(fill, seos, sbos, rand_offs):
    for seed in range(4):
        offs, begins, sizes, data = _toy(seed=seed)
        cfg = BatchConfig(3, 16, fill, seos, sbos, rand_offs)
        for ex in (0, 5, 8):  # 8: wraps around the sample list
            got = example_targets_batch(ex, offs, begins, sizes, data, cfg, BOS, EOS, NV)
            want = example_targets_batch_ref(ex, offs, begins, sizes, data, cfg, BOS, EOS, NV)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_batch_semantics_by_hand():
    data = np.array([10, 11, 12, 20, 21], dtype=np.int32)
    begins, sizes, offs = np.array([0, 3]), np.array([3, 2]), np.array([1, 0])
    tok, tgt, used = example_targets_batch(0, offs, begins, sizes, data, BatchConfig(1, 6), BOS, EOS, NV)
    assert tok.tolist() == [[BOS, 10, 11, 12, EOS, EOS]] and tgt.tolist() == [[10, 11, 12, EOS, EOS, EOS]]
    assert used == 1
    cfg = BatchConfig(1, 8, fill_with_next_samples=True, separate_with_eos=True, separate_with_bos=True,
                      sample_random_offsets=True)
    tok, tgt, used = example_targets_batch(0, offs, begins, sizes, data, cfg, BOS, EOS, NV)
    assert tgt.tolist() == [[11, 12, EOS, BOS, 20, 21, EOS, BOS]] and used == 2
    assert tok[0, 0] == BOS and tok[0, 1:].tolist() == tgt[0, :-1].tolist()


# three samples A = [10, 11, 12], B = [20, 21], C = [30]; two rows of 6; no random offsets
_ABC = (np.array([10, 11, 12, 20, 21, 30], dtype=np.int32), np.array([0, 3, 5]), np.array([3, 2, 1]),
        np.array([2, 1, 0]))


@pytest.mark.parametrize("seos,sbos,rows,used,from_offset", [
    # --fill-with-next-samples --separate-with-eos --no-separate-with-bos: EOS between samples
    (True, False, [[10, 11, 12, EOS, 20, 21], [30, EOS, 10, 11, 12, EOS]], 4, [12, EOS, 20, 21, EOS, 30]),
    # --fill-with-next-samples alone (BOS separation is on by default): BOS between samples
    (False, True, [[10, 11, 12, BOS, 20, 21], [30, BOS, 10, 11, 12, BOS]], 4, [12, BOS, 20, 21, BOS, 30]),
    # --fill-with-next-samples --no-separate-with-bos: samples back to back
    (False, False, [[10, 11, 12, 20, 21, 30], [10, 11, 12, 20, 21, 30]], 6, [12, 20, 21, 30, 10, 11]),
])
def test_fill_and_separator_semantics_by_hand(seos, sbos, rows, used, from_offset):
    """get_example_targets_batch, worked by hand: a row starts with the next unused sample, takes its
    tokens, then (with fill) the separators and the following samples, wrapping around the sample list;
    the second row starts after the last sample the first row touched (B is cut in row 0 and not
    continued); tokens are the targets shifted right behind a BOS."""
    data, begins, sizes, offs = _ABC
    cfg = BatchConfig(2, 6, fill_with_next_samples=True, separate_with_eos=seos, separate_with_bos=sbos)
    for fn in (example_targets_batch, example_targets_batch_ref):
        tok, tgt, n = fn(0, offs, begins, sizes, data, cfg, BOS, EOS, NV)
        assert tgt.tolist() == rows and n == used
        assert tok.tolist() == [[BOS] + r[:-1] for r in rows]
    # the separators only matter when filling: without fill a row is one sample, then EOS padding
    plain = BatchConfig(2, 6, fill_with_next_samples=False, separate_with_eos=seos, separate_with_bos=sbos)
    tok, tgt, n = example_targets_batch(0, offs, begins, sizes, data, plain, BOS, EOS, NV)
    assert tgt.tolist() == [[10, 11, 12, EOS, EOS, EOS], [20, 21, EOS, EOS, EOS, EOS]] and n == 2
    # --sample-random-offsets moves only the start of a row's first sample (A from offset 2; B, C whole)
    rnd = BatchConfig(1, 6, fill_with_next_samples=True, separate_with_eos=seos, separate_with_bos=sbos,
                      sample_random_offsets=True)
    _, tgt, _ = example_targets_batch(0, offs, begins, sizes, data, rnd, BOS, EOS, NV)
    assert tgt[0].tolist() == from_offset


def _dataset(n=7):
    from gguf_finetune.data.text import TextDataset

    _, begins, sizes, data = _toy(n_samples=n, seed=5)
    return TextDataset(np.clip(data, 0, NV - 1), begins, sizes)


def test_iterator_epochs_and_reshuffle_message():
    ds = _dataset(7)
    lines = []
    st = resume_shuffle(None, ds, "t.txt", 42, report=lines.append)
    assert lines == ["main: train data seems to have changed. restarting shuffled epoch."]
    it = BatchIterator(ds, st, BatchConfig(3, 8), BOS, EOS, NV, report=lines.append)
    first_order = it.shuffled.begins.copy()
    positions = []
    for _ in range(3):
        positions.append(it.sample_position())
        b = it.next_batch()
        assert b.tokens.shape == b.targets.shape == b.weights.shape == (3, 8)
        assert b.tokens.dtype == b.targets.dtype == np.int32 and b.weights.dtype == np.float32
        assert np.all(b.weights == 1)
    assert positions == [(1, 7), (4, 7), (7, 7)]
    # the third batch used samples 6, 0, 1 of the first shuffle, completing the epoch
    assert b.epoch_completed and lines[-1] == "train_opt_callback: reshuffle samples. completed epochs: 1"
    s = it.state
    assert (s.epochs, s.next_sample, s.samples_seen) == (1, 0, 9)
    assert s.rng_state != st.rng_state and not np.array_equal(it.shuffled.begins, first_order)


def test_iterator_resume_from_state_continues_identically():
    ds = _dataset(11)
    st = resume_shuffle(None, ds, "t.txt", 1)
    cfg = BatchConfig(2, 6, fill_with_next_samples=True, sample_random_offsets=True)
    a = BatchIterator(ds, st, cfg, BOS, EOS, NV)
    for _ in range(7):
        a.next_batch()
    saved = a.state
    resumed = resume_shuffle(saved, ds, "t.txt", 1)
    assert resumed == saved  # same data: the checkpoint's shuffle is kept
    b = BatchIterator(ds, resumed, cfg, BOS, EOS, NV)
    for _ in range(9):
        x, y = a.next_batch(), b.next_batch()
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.targets, y.targets)
    assert a.state == b.state


def test_resume_shuffle_restarts_on_change_or_force():
    ds = _dataset(7)
    saved = ShuffleState(samples_hash=compute_samples_hash("t.txt", ds.begins, ds.sizes),
                         rng_state="1 " * 624 + "624", sample_count=7, next_sample=4, epochs=3, samples_seen=25)
    lines = []
    assert resume_shuffle(saved, ds, "t.txt", 9, report=lines.append) == saved and lines == []
    forced = resume_shuffle(saved, ds, "t.txt", 9, force_reshuffle=True, report=lines.append)
    assert lines == ["main: forced reshuffling of data. restarting with newly shuffled epoch."]
    assert forced.rng_state == mt19937_seed_to_state(9) and forced.next_sample == 0
    assert (forced.epochs, forced.samples_seen) == (3, 25)
    lines.clear()
    moved = resume_shuffle(saved, ds, "other.txt", 9, report=lines.append)  # the name is part of the hash
    assert lines == ["main: train data seems to have changed. restarting shuffled epoch."]
    assert moved.next_sample == 0 and moved.samples_hash != saved.samples_hash


# -- the llama.cpp fixture (needs the project's tokenizer) ------------------------------------------


@pytest.fixture(scope="module")
def fixture_run(testdata):
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.tokenizer import load_tokenizer

    d = testdata / FIXTURE
    model = open_gguf(d / "tiny-llama-spm-q8_0.gguf", "model")  # parsed once (32000-entry vocab: slow)
    tok = load_tokenizer(model)
    lines = []
    cwd = os.getcwd()
    os.chdir(d)  # llama.cpp was run in that folder with --train-data train.txt
    try:
        ds = load_train_text("train.txt", tok, process_escapes(r"\n"), True, False, 32, report=lines.append)
    finally:
        os.chdir(cwd)
    return d, tok, ds, lines, model


def test_fixture_tokenize_summary_matches_run1_log(fixture_run):
    d, _, _, lines, _ = fixture_run
    log = (d / "run1.log").read_text().splitlines()
    start = log.index("main: tokenize training data from train.txt")
    # the log's sample-start line holds a real newline, so it spans two log lines
    want = log[start:start + 2] + log[start + 3:start + 8]
    got = "\n".join(lines).splitlines()
    assert got[:2] == [want[0], "main: sample-start: "] and got[3:] == want[2:]
    assert "main: number of training tokens: 6270" in lines and "main: number of unique tokens: 1427" in lines


def test_fixture_samples_hash_and_positions(fixture_run):
    from gguf_finetune.gguf_io import open_gguf

    d, tok, ds, _, _ = fixture_run
    for name in ("chk-tiny-4.gguf", "chk-tiny-10.gguf"):
        f = open_gguf(d / name, "checkpoint")
        assert compute_samples_hash("train.txt", ds.begins, ds.sizes) == f.get_int("training.shuffle.samples_hash")
    st = resume_shuffle(None, ds, "train.txt", 7)
    it = BatchIterator(ds, st, BatchConfig(2, 32), tok.bos_id, tok.eos_id, 32000)
    rows = [ln for ln in (d / "run1.log").read_text().splitlines() if ln.startswith("train_opt_callback: iter=")]
    for ln in rows:
        a, b = it.sample_position()
        assert f" sample={a}/{b} " in ln
        it.next_batch()
    f4 = open_gguf(d / "chk-tiny-4.gguf", "checkpoint")
    # run 1 drew one more batch after saving at iter 4; the checkpoint holds the state before it
    assert f4.get_int("training.shuffle.next_sample") == it.state.next_sample - 2


def _ref_llama_logits(W, tokens):
    """float64 numpy llama forward of the fixture model (W: dequantized tensors), tokens [B, T] -> [B, T, V]."""
    C, H, L, eps = 64, 4, 2, 1e-5
    D = C // H

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x, T):  # x [T, H, D]; ggml rope mode 0 rotates adjacent pairs
        th = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, D, 2) / D)
        c, s = np.cos(th)[:, None, :], np.sin(th)[:, None, :]
        o = np.empty_like(x)
        o[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        o[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return o

    out = []
    for seq in tokens:
        T = len(seq)
        x = W["token_embd.weight"][seq]
        for il in range(L):
            p = f"blk.{il}."
            h = rms(x, W[p + "attn_norm.weight"])
            q = rope((h @ W[p + "attn_q.weight"].T).reshape(T, H, D), T)
            k = rope((h @ W[p + "attn_k.weight"].T).reshape(T, H, D), T)
            v = (h @ W[p + "attn_v.weight"].T).reshape(T, H, D)
            a = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            x = x + np.einsum("hts,shd->thd", a, v).reshape(T, C) @ W[p + "attn_output.weight"].T
            h = rms(x, W[p + "ffn_norm.weight"])
            g = h @ W[p + "ffn_gate.weight"].T
            x = x + (g / (1 + np.exp(-g)) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
        out.append(rms(x, W["output_norm.weight"]) @ W["output.weight"].T)
    return np.stack(out)


def test_fixture_first_losses_reproduced(fixture_run):
    """The first two printed losses are the base model's (LoRA B = 0; the first update has sched 0) on
    batches 0 and 1: mean over ALL n_batch*n_ctx positions of -log((1-1e-9)·p + 1e-9)."""
    d, tok, ds, _, model = fixture_run
    it = BatchIterator(ds, resume_shuffle(None, ds, "train.txt", 7), BatchConfig(2, 32), tok.bos_id, tok.eos_id,
                       32000)
    from gguf import GGMLQuantizationType

    def deq(t):  # F32 or Q8_0 (blocks of f16 scale + 32 int8)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        if t.tensor_type == GGMLQuantizationType.F32:
            return np.asarray(t.data, dtype=np.float64).reshape(shape)
        assert t.tensor_type == GGMLQuantizationType.Q8_0
        blk = np.asarray(t.data, dtype=np.uint8).reshape(-1, 34)
        scale = blk[:, :2].copy().view(np.float16).astype(np.float64)
        return (blk[:, 2:].view(np.int8) * scale).reshape(shape)

    W = {name: deq(t) for name, t in model.tensors.items()}
    logged = [float(re.search(r"loss=([0-9.]+)", ln).group(1)) for ln in (d / "run1.log").read_text().splitlines()
              if ln.startswith("train_opt_callback: iter=")]
    for want in logged[1:3]:
        b = it.next_batch()
        lg = _ref_llama_logits(W, b.tokens)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        pt = np.take_along_axis(p, b.targets[..., None].astype(np.int64), -1)[..., 0]
        loss = float((-np.log(pt * (1 - 1e-9) + 1e-9) * b.weights).sum() / b.weights.size)
        assert loss == pytest.approx(want, abs=3e-6)  # measured |diff| <= 1.1e-6
