"""Incremental decoding (KV cache), sampling, and the generate command.

The decoder's logits, token by token, must equal the full forward pass (Model.logits) row by row:
on a synthetic GQA model with a LoRA whose b factors are nonzero (every target, norms included)
and on SmolLM2.  Sampling is checked against a step-by-step reference, for determinism, against
the distribution it should draw from, and (interop) against llama.cpp's own sampler chain.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import needs
from gguf_finetune.api import load_model
from gguf_finetune.engine.generate import Decoder, Generation, attend_cached, attend_cached_ref
from gguf_finetune.lora import LoraLayout, LoraParams, LoraRanks, make_specs
from gguf_finetune.sampling import (
    Sampler,
    SamplerParams,
    discrete_distribution,
    min_p_cut,
    sample_ref,
    sort_candidates,
    top_p_cut,
)
from gguf_finetune.stdcpp import MT19937
from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

# -- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gqa_path(tmp_path_factory):
    spec = SyntheticSpec(n_vocab=300, n_embd=32, n_ff=48, n_layer=2, n_head=4, n_head_kv=2, n_rot=6,
                         n_ctx_train=64, seed=5, std=0.3)
    return write_synthetic_model(tmp_path_factory.mktemp("gen") / "gqa.gguf", spec)


def random_lora(hp, dtype, norm_rank=1, seed=0) -> LoraParams:
    """Every target adapted (norms too), a and b random: the adapter changes every product."""
    layout = LoraLayout(make_specs(hp, LoraRanks.uniform(3, norm_rank=norm_rank)))
    rng = np.random.default_rng(seed)
    return LoraParams(layout, alpha=5.0, flat=(rng.standard_normal(layout.size) * 0.2).astype(dtype))


def model_with_lora(path, dtype, budget=None):
    m = load_model(path, dtype=dtype, memory_budget=budget)
    m.lora = random_lora(m.hparams, dtype)
    assert all(np.abs(b).max() > 0 for b in m.lora.b.values())
    return m


def decode_rows(model, ids, n_prefill, n_ctx=None, n_batch=512):
    """Logits of every position: prefill ids[:n_prefill] at once, then one token at a time."""
    dec = Decoder.for_model(model, n_ctx=n_ctx or len(ids), n_batch=n_batch)
    rows = [dec.eval(ids[:n_prefill], logits_from=0)]
    rows += [dec.eval([t]) for t in ids[n_prefill:]]
    assert dec.n_past == len(ids)
    return np.concatenate(rows)


# -- the attention kernel over the cache ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p0,T", [(0, 1), (0, 7), (5, 1), (9, 6)])
def test_attend_cached_matches_reference(dtype, p0, T):
    rng = np.random.default_rng(p0 * 10 + T)
    Hq, Hkv, D, T_max = 6, 2, 8, 20
    q = rng.standard_normal((Hq, T, D)).astype(dtype)
    kT = rng.standard_normal((Hkv, D, T_max)).astype(dtype)
    v = rng.standard_normal((Hkv, T_max, D)).astype(dtype)
    kT[:, :, p0 + T:] = np.nan  # positions after the last query must not be read
    v[:, p0 + T:] = np.nan
    got = attend_cached(q, kT, v, p0, 0.35)
    want = attend_cached_ref(q, kT, v, p0, 0.35)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    kT[:, :, :max(0, p0 - 1)] = np.nan  # a window of 3 keys never reads further back than p0 - 2
    v[:, :max(0, p0 - 1)] = np.nan
    np.testing.assert_allclose(attend_cached(q, kT, v, p0, 0.35, window=3),
                               attend_cached_ref(q, kT, v, p0, 0.35, window=3), rtol=tol, atol=tol)


# -- incremental decoding == the full forward pass --------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_incremental_logits_equal_full_forward_with_lora(gqa_path, dtype, tol):
    model = model_with_lora(gqa_path, dtype)
    ids = np.random.default_rng(1).integers(0, model.hparams.n_vocab, 23)
    full = model.logits(ids)  # [T, V]
    inc = decode_rows(model, ids, n_prefill=5, n_ctx=32)
    scale = max(1.0, float(np.abs(full).max()))
    assert np.abs(inc - full).max() <= tol * scale, np.abs(inc - full).max()
    # the adapter matters: without it the logits are different
    plain = load_model(gqa_path, dtype=dtype).logits(ids)
    assert np.abs(plain - full).max() > 100 * tol * scale


FAMILIES = {  # every family's graph pieces; gemma3 with local layers (window 4) and a soft-capped head
    "qwen2": dict(), "qwen3": dict(head_dim=6), "phi3": dict(n_rot=4, rope_factors=True),
    "gemma3": dict(n_layer=3, head_dim=8, tied=True, sliding_window=4, swa_pattern=2, softcap=3.0),
}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_incremental_logits_equal_full_forward_every_family(tmp_path, arch):
    base = dict(n_vocab=300, n_embd=32, n_ff=48, n_layer=2, n_head=4, n_head_kv=2, n_ctx_train=64, seed=5, std=0.3)
    spec = SyntheticSpec(**(base | FAMILIES[arch]), arch=arch)
    path = write_synthetic_model(tmp_path / f"{arch}.gguf", spec)
    model = model_with_lora(path, np.float64)
    ids = np.random.default_rng(1).integers(0, model.hparams.n_vocab, 13)
    full = model.logits(ids)
    np.testing.assert_allclose(decode_rows(model, ids, n_prefill=3, n_ctx=16), full, rtol=0, atol=1e-10)
    quant = load_model(path, dtype=np.float32)  # the quantized-block path on F32 weights, one token at a time
    quant.lora = random_lora(quant.hparams, np.float32)
    dec = Decoder.for_model(quant, n_ctx=16)
    assert dec.quantized
    inc = np.concatenate([dec.eval([t]) for t in ids])
    np.testing.assert_allclose(inc, full, rtol=0, atol=2e-4 * max(1.0, float(np.abs(full).max())))


def test_prefill_in_pieces_and_low_memory_weights_agree(gqa_path):
    model = model_with_lora(gqa_path, np.float64)
    ids = np.random.default_rng(2).integers(0, model.hparams.n_vocab, 19)
    full = model.logits(ids)
    dec = Decoder.for_model(model, n_ctx=19, n_batch=4)  # 5 passes through the cache
    pieces = dec.eval(ids, logits_from=3)
    np.testing.assert_allclose(pieces, full[3:], rtol=0, atol=1e-10)
    streamed = model_with_lora(gqa_path, np.float64, budget=0)  # weights dequantized per layer
    assert not streamed.weights.cache_layers
    np.testing.assert_allclose(decode_rows(streamed, ids, 4), full, rtol=0, atol=1e-10)


def test_prefill_at_zero_is_bitwise_the_forward_pass(gqa_path):
    model = model_with_lora(gqa_path, np.float32)
    ids = np.random.default_rng(3).integers(0, model.hparams.n_vocab, 17)
    dec = Decoder.for_model(model, n_ctx=17)
    np.testing.assert_array_equal(dec.eval(ids, logits_from=0), model.logits(ids))


def test_decoder_refuses_a_full_context(gqa_path):
    from gguf_finetune.errors import UserError

    model = load_model(gqa_path)
    dec = Decoder.for_model(model, n_ctx=4)
    dec.eval([1, 2, 3, 4])
    with pytest.raises(UserError, match="context is full"):
        dec.eval([5])
    dec.reset()
    assert dec.eval([5]).shape == (1, model.hparams.n_vocab)


@pytest.fixture(scope="module")
def smol(smollm2):
    return load_model(smollm2)


def test_incremental_logits_equal_full_forward_smollm2(smol):
    ids = smol.tokenize("The quick brown fox jumps over the lazy dog. Once upon a time")
    full = smol.logits(ids)
    assert Decoder.for_model(smol).quantized  # Q4_1 blocks and a Q8_0 head: decode reads them directly
    inc = decode_rows(smol, ids, n_prefill=4)
    err = np.abs(inc - full).max()
    assert err <= 5e-4, err  # measured 7e-5 (logits up to ~33): float32 summation order
    assert (inc.argmax(-1) == full.argmax(-1)).all()


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_0", "Q8_0"])  # types gguf-py can write
def test_quantized_decode_equals_float_decode_with_lora(tmp_path, qtype):
    """Decode steps from quantized blocks (+ the adapter) give the float path's logits."""
    spec = SyntheticSpec(n_vocab=300, n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=2, n_rot=64,
                         n_ctx_train=64, seed=7, std=0.1, qtype=qtype)
    path = write_synthetic_model(tmp_path / f"{qtype}.gguf", spec)
    model = model_with_lora(path, np.float32)
    ids = np.random.default_rng(4).integers(0, 300, 12)
    rows = {}
    for quantized in (True, False):
        dec = Decoder(model.weights, model.hparams, model.lora, n_ctx=16, quantized=quantized)
        assert dec.quantized == quantized
        rows[quantized] = np.concatenate([dec.eval(ids[:3], logits_from=0)] + [dec.eval([t]) for t in ids[3:]])
    scale = float(np.abs(rows[False]).max())
    assert np.abs(rows[True] - rows[False]).max() <= 2e-5 * scale
    streamed = model_with_lora(path, np.float32, budget=0)  # layers dequantized per use, one scratch set
    assert not streamed.weights.cache_layers
    dec = Decoder(streamed.weights, streamed.hparams, streamed.lora, n_ctx=16, quantized=True)
    got = np.concatenate([dec.eval(ids[:3], logits_from=0)] + [dec.eval([t]) for t in ids[3:]])
    assert np.abs(got - rows[True]).max() <= 2e-5 * scale
    plain = load_model(path).logits(ids)  # and the adapter is really applied on the quantized path
    assert np.abs(plain - rows[True]).max() > 1e-2 * scale


def test_quantized_decode_is_off_for_types_without_a_kernel(tmp_path):
    from gguf_finetune.errors import UserError

    spec = SyntheticSpec(n_vocab=300, n_embd=256, n_ff=512, n_layer=1, n_head=4, n_head_kv=2, n_rot=64,
                         n_ctx_train=64, seed=7, qtype="BF16")
    model = load_model(write_synthetic_model(tmp_path / "bf16.gguf", spec))
    assert not Decoder.for_model(model).quantized
    with pytest.raises(UserError, match="matvec kernel"):
        Decoder.for_model(model, quantized=True)


# -- the generation loop ---------------------------------------------------------------------------------

def test_generation_stops_at_eog_length_and_full_context(gqa_path):
    model = load_model(gqa_path)
    script = iter([7, 8, 9, 2, 10])

    def fake_sample(logits):
        assert logits.shape == (model.hparams.n_vocab,)
        return next(script)

    g = Generation(Decoder.for_model(model, n_ctx=16), [1, 5], fake_sample, 10, stop_ids={2})
    assert list(g) == [7, 8, 9] and g.stop_reason == "eog"
    g = Generation(Decoder.for_model(model, n_ctx=16), [1, 5], lambda l: 7, 4)
    assert list(g) == [7] * 4 and g.stop_reason == "length"
    g = Generation(Decoder.for_model(model, n_ctx=6), [1, 5], lambda l: 7, -1)
    # 4 tokens fill the cache; the 5th is sampled from the last position and not evaluated
    assert list(g) == [7] * 5 and g.stop_reason == "context" and g.decoder.n_past == 6


def test_greedy_generation_equals_argmax_of_full_forward(gqa_path):
    model = model_with_lora(gqa_path, np.float64)
    prompt = [1, 40, 41, 42]
    got = list(Generation(Decoder.for_model(model, n_ctx=32), prompt, Sampler(SamplerParams(temp=0)), 12))
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(model.logits(seq)[-1].argmax()))
    assert got == seq[len(prompt):]


# -- sampling --------------------------------------------------------------------------------------------

def test_sampler_matches_step_by_step_reference():
    rng = np.random.default_rng(0)
    for t in range(120):
        logits = (rng.standard_normal(400) * 3).astype(np.float32)
        p = SamplerParams(temp=float(rng.choice([0.0, 0.5, 1.0, 1.7])), top_k=int(rng.choice([0, 1, 5, 40, 1000])),
                          top_p=float(rng.choice([1.0, 0.9, 0.4])), min_p=float(rng.choice([0.0, 0.05, 0.3])),
                          seed=t)
        s, r = Sampler(p), MT19937(t)
        for _ in range(3):
            assert s.sample(logits) == sample_ref(logits, p, r), p


def test_sampler_is_deterministic_per_seed():
    logits = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    p = SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = [Sampler(p).sample(logits) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    s1, s2 = Sampler(p), Sampler(p)
    seq1 = [s1.sample(logits) for _ in range(50)]
    assert seq1 == [s2.sample(logits) for _ in range(50)]
    other = Sampler(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43))
    assert seq1 != [other.sample(logits) for _ in range(50)]
    assert len(set(seq1)) > 10  # it does sample


def test_sampler_draws_from_the_tempered_softmax():
    logits = np.log(np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32))
    s = Sampler(SamplerParams(temp=0.5, top_k=0, top_p=1.0, min_p=0.0, seed=7))
    counts = np.bincount([s.sample(logits) for _ in range(6000)], minlength=4) / 6000
    want = np.array([1, 4, 9, 16]) / 30  # p ∝ exp(l / 0.5) = x²
    assert np.abs(counts - want).max() < 0.02, counts


def test_greedy_and_filters():
    logits = np.array([0.5, 3.0, 3.0, -1.0, 2.0], dtype=np.float32)
    assert Sampler(SamplerParams(temp=0.0)).sample(logits) == 1  # first of equal maxima
    ids, cand = sort_candidates(logits, 2)
    assert ids.tolist() == [1, 2] and cand.tolist() == [3.0, 3.0]
    ids, cand = sort_candidates(logits)
    assert ids.tolist() == [1, 2, 4, 0, 3]
    # p = softmax([3, 3, 2, .5, -1]) = [.405, .405, .149, .033, .007]: cumulative .405, .81, .96, ...
    assert top_p_cut(cand, 0.5) == 2 and top_p_cut(cand, 0.85) == 3 and top_p_cut(cand, 1.0) == 5
    assert top_p_cut(cand, 0.5, min_keep=4) == 4
    # min-p 0.3: keeps p >= 0.3·p_max, i.e. logit >= 3 + ln 0.3 = 1.80
    assert min_p_cut(cand, 0.3) == 3 and min_p_cut(cand, 0.0) == 5 and min_p_cut(cand, 0.99) == 2


def test_discrete_distribution_is_libstdcpp():
    # a single weight: index 0 without drawing
    rng = MT19937(5)
    assert discrete_distribution(np.array([1.0]), rng) == 0 and rng == MT19937(5)
    # otherwise u = (u1 + u2·2^32) / 2^64 from two draws, index = first cumulative weight >= u
    for seed in range(20):
        rng, r = MT19937(seed), MT19937(seed)
        u1, u2 = r(), r()
        u = (u1 + u2 * 2.0**32) / 2.0**64
        idx = discrete_distribution(np.array([0.25, 0.25, 0.5], dtype=np.float32), rng)
        assert idx == (0 if u <= 0.25 else 1 if u <= 0.5 else 2)
        assert rng == r  # exactly two draws


@pytest.mark.interop
def test_sampler_picks_what_llamacpp_picks():
    """Same logits and seed -> the same token as llama.cpp's chain (top-k, top-p, min-p, temp, dist).

    Restricted to chains where llama.cpp versions agree: top-k > 0 (sorted candidates) and at least
    two candidates left (newer llama.cpp draws a random number even for a single candidate)."""
    L = needs("llama_cpp")
    import ctypes

    def chain(p):
        ch = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        for s in (L.llama_sampler_init_top_k(p.top_k), L.llama_sampler_init_top_p(p.top_p, p.min_keep),
                  L.llama_sampler_init_min_p(p.min_p, p.min_keep), L.llama_sampler_init_temp(p.temp),
                  L.llama_sampler_init_dist(p.seed)):
            L.llama_sampler_chain_add(ch, s)
        return ch

    def llama_sample(ch, logits):
        arr = (L.llama_token_data * logits.shape[0])()
        for i, v in enumerate(logits.tolist()):
            arr[i].id, arr[i].logit, arr[i].p = i, v, 0.0
        cur = L.llama_token_data_array(data=arr, size=logits.shape[0], selected=-1, sorted=False)
        L.llama_sampler_apply(ch, ctypes.byref(cur))
        return arr[cur.selected].id

    rng = np.random.default_rng(3)
    checked = 0
    for t in range(12):
        p = SamplerParams(temp=float(rng.choice([0.7, 1.0, 1.3])), top_k=int(rng.choice([5, 40, 300])),
                          top_p=float(rng.choice([1.0, 0.95, 0.8])), min_p=float(rng.choice([0.0, 0.05])),
                          seed=100 + t)
        ch, ours = chain(p), Sampler(p)
        try:
            for _ in range(6):
                logits = (rng.standard_normal(3000) * 1.5).astype(np.float32)
                _, cand = sort_candidates(logits, p.top_k)
                n = top_p_cut(cand, p.top_p)
                assert min(n, min_p_cut(cand[:n], p.min_p)) >= 2  # precondition (see docstring)
                assert ours.sample(logits) == llama_sample(ch, logits), p
                checked += 1
        finally:
            L.llama_sampler_free(ch)
    assert checked == 72


# -- the command ---------------------------------------------------------------------------------------

class _FakeTok:
    def __init__(self, pieces):
        self.pieces = pieces

    def token_to_piece(self, i, special=False):
        return self.pieces[i]


def test_text_stream_holds_back_incomplete_utf8():
    import io

    from gguf_finetune.cli.generate import TextStream

    out = io.StringIO()
    s = TextStream(_FakeTok([b"caf", b"\xc3", b"\xa9 ", b"\xe2\x82", b"\xac"]), out)
    s.add(0)
    s.add(1)
    assert out.getvalue() == "caf"  # half of 'é' is not printed
    s.add(2)
    s.add(3)
    assert out.getvalue() == "café "
    s.add(4)
    s.close()
    assert out.getvalue() == "café €\n"


def test_generate_command_applies_scaled_adapters(gqa_path, tmp_path, capsys):
    from gguf_finetune.cli.generate import run
    from gguf_finetune.formats.adapter_gguf import write_adapter_gguf

    base = load_model(gqa_path)
    lora = random_lora(base.hparams, np.float32, norm_rank=0, seed=4)
    adapter = tmp_path / "a.gguf"
    assert write_adapter_gguf(adapter, lora, base.hparams) == []
    prompt = "te"

    def greedy(model, n=6):
        seq = model.tokenizer.encode(prompt, add_special=True, parse_special=True)
        n0 = len(seq)
        for _ in range(n):
            nxt = int(model.logits(seq)[-1].argmax())
            if nxt in model.tokenizer.eog_ids:
                break
            seq.append(nxt)
        return model.tokenizer.detokenize_bytes(seq[n0:]).decode("utf-8", errors="replace")

    outs = []
    for extra, adapters in (([], []), (["--lora-scaled", str(adapter), "0.7"], [(adapter, 0.7)])):
        assert run(["-m", str(gqa_path), "-p", prompt, "-n", "6", "--temp", "0", "-t", "1", *extra]) == 0
        out = capsys.readouterr().out
        assert out == greedy(load_model(gqa_path, adapters=adapters)) + "\n"
        outs.append(out)
    assert outs[0] != outs[1]  # the adapter changes the text


@pytest.mark.slow
def test_generate_command_greedy_equals_full_forward(smollm2, smol, capsys):
    from gguf_finetune.cli.generate import run

    prompt = "The capital of France is"
    ids = smol.tokenizer.encode(prompt, add_special=True, parse_special=True)
    gen = Generation(Decoder.for_model(smol, n_ctx=64), ids, Sampler(SamplerParams(temp=0)), 10,
                     smol.tokenizer.eog_ids)
    got = list(gen)
    assert len(got) == 10 or gen.stop_reason == "eog"
    # teacher-forced: every generated token is the argmax of the full forward pass before it
    full = smol.logits(ids + got)
    assert full[len(ids) - 1:-1].argmax(-1).tolist() == got
    assert run(["-m", str(smollm2), "-p", prompt, "-n", "10", "--temp", "0", "-t", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == smol.tokenizer.detokenize_bytes(got).decode("utf-8", errors="replace") + "\n"
    assert re.search(r"generated \d+ tokens in [\d.]+ s \([\d.]+ tok/s\); stop: (length|eog)", err), err


@pytest.mark.slow
def test_generate_command_chat_stops_at_end_of_turn(smol, capsys):
    from gguf_finetune.cli.generate import prompt_ids, run

    ids = prompt_ids(smol, "Hi", chat=True, chat_template=None)
    text = smol.tokenizer.detokenize(ids, special=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert run(["-p", "What is the capital of France?", "--chat", "--temp", "0", "-n", "40"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and "<|im_end|>" not in out
    assert "stop: eog" in err  # the assistant's turn ended before 40 tokens


def test_generate_command_usage_errors(capsys):
    from gguf_finetune.cli.generate import run
    from gguf_finetune.errors import UsageError

    with pytest.raises(UsageError, match="--prompt"):
        run([])
    with pytest.raises(UsageError, match="--chat-template"):
        run(["-p", "x", "--chat-template", "chatml"])
    with pytest.raises(UsageError, match="--temp"):
        run(["-p", "x", "--temp", "-1"])


def test_decode_step_restores_the_thread_count(smol):
    import numba

    dec = Decoder.for_model(smol, n_ctx=16)
    before = numba.get_num_threads()
    dec.eval(smol.tokenize("Hello there"))
    dec.eval([5])  # a quantized single-token step runs on the calling thread, then restores
    assert numba.get_num_threads() == before
