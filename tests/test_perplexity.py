"""Perplexity chunked as llama.cpp's llama-perplexity: against a slow reference, the command's
output format, and (interop) against llama.cpp's own logits through llama-cpp-python."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from conftest import needs
from gguf_finetune.api import load_model
from gguf_finetune.errors import UserError
from gguf_finetune.perplexity import n_chunks_for, perplexity, perplexity_ref, read_text_file, tokenize_text
from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = SyntheticSpec(n_vocab=300, n_embd=32, n_ff=48, n_layer=2, n_head=4, n_head_kv=2, n_ctx_train=64,
                         seed=11, std=0.3)
    path = write_synthetic_model(tmp_path_factory.mktemp("ppl") / "tiny.gguf", spec)
    return path, load_model(path, dtype=np.float64)


def test_chunk_count_and_short_text():
    assert n_chunks_for(100, 16) == 6
    assert n_chunks_for(100, 16, max_chunks=2) == 2
    assert n_chunks_for(100, 16, max_chunks=50) == 6
    assert n_chunks_for(32, 16) == 2
    with pytest.raises(UserError, match="at least 32 tokens"):
        n_chunks_for(31, 16)


@pytest.mark.parametrize("n_batch", [2048, 16, 5])
def test_perplexity_matches_reference(tiny, n_batch):
    _, model = tiny
    assert model.tokenizer.add_bos  # so each chunk's first token is replaced by BOS
    tokens = np.random.default_rng(0).integers(3, model.hparams.n_vocab, 90)
    seen = []
    res = perplexity(model, tokens, 16, n_batch=n_batch, max_chunks=4, on_chunk=lambda i, p: seen.append((i, p)))
    ref = perplexity_ref(model, tokens, 16, max_chunks=4)
    assert res.n_chunks == 4 and res.count == ref.count == 4 * (16 - 8 - 1)
    assert abs(res.ppl - ref.ppl) <= 1e-9 * ref.ppl
    assert abs(res.ppl_error - ref.ppl_error) <= 1e-6 * ref.ppl_error
    np.testing.assert_allclose(res.running, ref.running, rtol=1e-9)
    assert seen == list(enumerate(res.running, 1))


def test_only_second_half_is_scored_and_bos_replaces_first_token(tiny):
    _, model = tiny
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, model.hparams.n_vocab, 64)
    base = perplexity(model, tokens, 16, max_chunks=2).ppl
    # the first half of a chunk is context only: changing a token there changes the score a little...
    t2 = tokens.copy()
    t2[0] = (t2[0] + 1) % model.hparams.n_vocab  # ...but the first token is replaced by BOS anyway
    assert perplexity(model, t2, 16, max_chunks=2).ppl == base
    # the last token of the chunk is predicted (scored): changing it changes the result
    t3 = tokens.copy()
    t3[15] = 3 + (t3[15] - 2) % (model.hparams.n_vocab - 3)
    assert perplexity(model, t3, 16, max_chunks=2).ppl != base
    # tokens past the evaluated chunks do not matter
    t4 = tokens.copy()
    t4[40:] = 5
    assert perplexity(model, t4, 16, max_chunks=2).ppl == base


def test_command_output(tiny, tmp_path, capsys):
    from gguf_finetune.cli.perplexity import run

    path, _ = tiny
    text = "the rain in spain stays mainly in the plain. " * 12
    f = tmp_path / "text.txt"
    f.write_text(text + "\n")
    assert read_text_file(str(f)) == text.encode()  # one trailing newline dropped, as llama.cpp's -f
    assert run(["-m", str(path), "-f", str(f), "-c", "32", "--chunks", "3", "-t", "1"]) == 0
    out, err = capsys.readouterr()
    m = re.fullmatch(r"((?:\[\d+\]\d+\.\d{4},)+)\nFinal estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})\n", out)
    assert m, out
    running = [float(x) for x in re.findall(r"\]([\d.]+),", m.group(1))]
    model = load_model(path)
    res = perplexity(model, tokenize_text(model.tokenizer, text.encode()), 32, max_chunks=3)
    assert running == [round(p, 4) for p in res.running]
    assert float(m.group(2)) == round(res.ppl, 4) and float(m.group(3)) == round(res.ppl_error, 5)
    assert "calculating perplexity over 3 chunks, n_ctx=32" in err
    with pytest.raises(UserError, match="at least 2000 tokens"):
        run(["-m", str(path), "-f", str(f), "-c", "1000"])


@pytest.mark.interop
@pytest.mark.slow
def test_perplexity_agrees_with_llamacpp(smollm2, testdata, capsys):
    """SmolLM2 Q4_1 on the first chunks of shakespeare.txt: our perplexity within 1% of llama.cpp's,
    computed with llama-cpp-python's logits and the same chunking."""
    llama_cpp = needs("llama_cpp")
    n_ctx, n_chunks = 128, 3
    text = read_text_file(str(testdata / "text" / "shakespeare.txt"))
    llm = llama_cpp.Llama(str(smollm2), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          verbose=False, n_threads=2)
    theirs_tokens = llm.tokenize(text, add_bos=True, special=False)  # add_special: BOS as the vocab says
    model = load_model(smollm2)
    tokens = tokenize_text(model.tokenizer, text)
    assert tokens == theirs_tokens
    first, nll, count = n_ctx // 2, 0.0, 0
    for i in range(n_chunks):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if model.tokenizer.add_bos:
            chunk[0] = model.tokenizer.bos_id
        llm.reset()
        llm.eval(chunk)
        lg = np.asarray(llm.scores[first:n_ctx - 1], dtype=np.float64)
        m = lg.max(-1)
        lse = np.log(np.exp(lg - m[:, None]).sum(-1)) + m
        nll += float((lse - lg[np.arange(lg.shape[0]), chunk[first + 1:]]).sum())
        count += lg.shape[0]
    theirs = math.exp(nll / count)
    ours = perplexity(model, tokens, n_ctx, max_chunks=n_chunks)
    assert ours.count == count
    with capsys.disabled():
        print(f"\nperplexity SmolLM2 Q4_1, shakespeare.txt, ctx {n_ctx}, {n_chunks} chunks: ours {ours.ppl:.2f}, "
              f"llama.cpp {theirs:.2f} ({100 * abs(ours.ppl - theirs) / theirs:.2f}%)")
    assert abs(ours.ppl - theirs) <= 0.01 * theirs, (ours.ppl, theirs)
