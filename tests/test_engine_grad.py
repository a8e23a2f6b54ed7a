"""Exact LoRA gradients: analytic backward against central finite differences in float64.

Every combination of GQA/MHA, tied/untied output, checkpointing on/off, flash on/off and norm
adapters on/off, with batch 2 and a per-token loss weight that includes zeros; and every family
with its own graph pieces switched on (biases, q/k norms, post norms, GELU, embedding scale,
soft-capping, sliding window, partial rotary with frequency factors, fused qkv and gate+up).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gguf_finetune.engine import backward
from gguf_finetune.engine.backward import loss_and_grad
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.lora import LoraLayout, LoraParams, LoraRanks, make_specs
from gguf_finetune.model import Weights, read_hparams
from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model


def tiny(tmp_path_factory, gqa: bool, tied: bool, dtype=np.float64, budget=None):
    spec = SyntheticSpec(n_vocab=300, n_embd=16, n_ff=24, n_layer=2, n_head=4, n_head_kv=2 if gqa else 4,
                         n_rot=2, tied=tied, seed=3, std=0.3)
    path = tmp_path_factory.mktemp("tiny") / f"tiny-{gqa}-{tied}.gguf"
    write_synthetic_model(path, spec)
    f = open_gguf(path)
    hp = read_hparams(f)
    return hp, Weights(f, hp, budget=budget, dtype=dtype)


def family(tmp_path_factory, arch: str, dtype=np.float64, budget=None):
    """A tiny model of ``arch`` with every option the family has switched on."""
    base = dict(n_vocab=300, n_embd=16, n_ff=24, n_layer=2, n_head=4, n_head_kv=2, seed=5, std=0.3, arch=arch)
    spec = SyntheticSpec(**(base | FAMILY_SPECS[arch]))
    path = tmp_path_factory.mktemp("fam") / f"{arch}.gguf"
    write_synthetic_model(path, spec)
    f = open_gguf(path)
    hp = read_hparams(f)
    return hp, Weights(f, hp, budget=budget, dtype=dtype)


FAMILY_SPECS = {
    "llama": dict(rope_factors=True),  # llama 3.1's rope_freqs
    "qwen2": dict(tied=True),  # q/k/v biases, NeoX
    "qwen3": dict(head_dim=6, tied=True),  # q/k norms, Cq = 24 != n_embd
    # 3 layers, pattern 2: local, global, local; window 3 < T; soft-capped logits; embedding scale; GELU
    "gemma3": dict(n_layer=3, head_dim=8, tied=True, sliding_window=3, swa_pattern=2, softcap=2.0),
    "phi3": dict(n_rot=2, rope_factors=True),  # fused qkv and gate+up, partial rotary, LongRoPE factors
}


def random_lora(hp, norm_rank: int, dtype, seed=0) -> LoraParams:
    ranks = LoraRanks.uniform(2, norm_rank=norm_rank)
    layout = LoraLayout(make_specs(hp, ranks))
    rng = np.random.default_rng(seed)
    p = LoraParams(layout, alpha=3.0, flat=(rng.standard_normal(layout.size) * 0.2).astype(dtype))
    return p


def batch(hp, B=2, T=5, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, hp.n_vocab, size=(B, T))
    targets = rng.integers(0, hp.n_vocab, size=(B, T))
    mask = rng.uniform(0.5, 1.5, size=(B, T))
    mask[0, 1] = 0.0
    mask[1, -1] = 0.0
    return tokens, targets, mask


COMBOS = list(itertools.product([True, False], [True, False], [True, False], [True, False], [1, 0]))


@pytest.mark.parametrize("gqa,tied,ckpt,flash,norm_rank", COMBOS)
def test_gradients_match_finite_differences(tmp_path_factory, gqa, tied, ckpt, flash, norm_rank):
    hp, w = tiny(tmp_path_factory, gqa, tied)
    check_gradients(hp, w, random_lora(hp, norm_rank, np.float64), batch(hp), ckpt, flash)


@pytest.mark.parametrize("ckpt,flash", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("arch", sorted(FAMILY_SPECS))
def test_family_gradients_match_finite_differences(tmp_path_factory, arch, ckpt, flash):
    hp, w = family(tmp_path_factory, arch)
    assert hp.arch == arch
    if arch == "gemma3":
        assert [hp.is_local(il) for il in range(hp.n_layer)] == [True, False, True] and hp.softcap == 2.0
    check_gradients(hp, w, random_lora(hp, 1, np.float64), batch(hp), ckpt, flash)


def check_gradients(hp, w, lora, data, ckpt: bool, flash: bool) -> None:
    tokens, targets, mask = data
    inv_norm = 1.0 / mask.sum()

    def loss(flat):
        return loss_and_grad(w, hp, lora.like(flat), None, tokens, targets, mask, inv_norm,
                             checkpointing=ckpt, flash=flash)

    grads = lora.like()
    loss0 = loss_and_grad(w, hp, lora, grads, tokens, targets, mask, inv_norm, checkpointing=ckpt, flash=flash)
    assert np.isfinite(loss0)
    assert abs(loss0 - loss(lora.flat.copy())) < 1e-12
    rng = np.random.default_rng(7)
    eps = 1e-5
    for s in lora.layout.specs:
        oa, ob = lora.layout.offsets[s.name]
        idx = np.concatenate([rng.integers(oa, oa + s.n_in * s.rank, 3), rng.integers(ob, ob + s.n_out * s.rank, 3)])
        if s.kind == "embd":  # only rows of tokens in the batch have a gradient in b
            rows = np.unique(tokens)[:3]
            idx = np.concatenate([idx[:3], ob + rows * s.rank])
        fd = np.empty(len(idx))
        for j, i in enumerate(idx):
            plus = lora.flat.copy()
            plus[i] += eps
            minus = lora.flat.copy()
            minus[i] -= eps
            fd[j] = (loss(plus) - loss(minus)) / (2 * eps)
        an = grads.flat[idx]
        rel = np.linalg.norm(an - fd) / max(np.linalg.norm(fd), 1e-12)
        assert np.linalg.norm(fd) > 1e-8, f"{s.name}: finite differences vanish, test would be vacuous"
        assert rel <= 1e-4, f"{s.name}: relative error {rel:.2e}\nanalytic {an}\nfd {fd}"


@pytest.mark.parametrize("gqa,tied", [(True, True), (False, False)])
def test_checkpointing_flash_and_weight_cache_do_not_change_gradients(tmp_path_factory, gqa, tied):
    hp, w_cached = tiny(tmp_path_factory, gqa, tied, dtype=np.float32)
    _, w_streamed = tiny(tmp_path_factory, gqa, tied, dtype=np.float32, budget=0)
    assert w_cached.cache_layers and not w_streamed.cache_layers
    lora = random_lora(hp, 1, np.float32)
    tokens, targets, mask = batch(hp, B=3, T=7)
    inv = 1.0 / mask.sum()
    results = {}
    for key, w, ckpt, flash in [("ref", w_cached, False, False), ("ckpt", w_cached, True, False),
                                ("flash", w_cached, True, True), ("stream", w_streamed, True, True)]:
        g = lora.like()
        loss = loss_and_grad(w, hp, lora, g, tokens, targets, mask, inv, checkpointing=ckpt, flash=flash)
        results[key] = (loss, g.flat.copy())
    ref_loss, ref_g = results["ref"]
    assert np.array_equal(results["ckpt"][1], ref_g)  # recomputation is the same arithmetic
    assert results["ckpt"][0] == ref_loss
    for key in ("flash", "stream"):
        loss, g = results[key]
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
        assert np.linalg.norm(g - ref_g) <= 1e-5 * np.linalg.norm(ref_g), key
    assert np.array_equal(results["stream"][1], results["flash"][1])  # cache or stream: identical


# -- packed rows: each record alone in its own row gives the same loss and gradients -------------

def packed_and_alone(hp, seed=3):
    """Records of 5, 3, 6, 2 and 4 tokens packed into 2 rows of 10 positions (first-fit, one padding
    position left), and the same records one per row (padded); random trained masks."""
    from gguf_finetune.data.batches import pack_records

    rng = np.random.default_rng(seed)
    sizes = np.array([6, 4, 7, 3, 5], dtype=np.int64)  # a record of s tokens takes s - 1 positions
    begins = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    tokens = rng.integers(0, hp.n_vocab, int(sizes.sum())).astype(np.int32)
    trained = (rng.random(tokens.size) < 0.7).astype(np.uint8)
    p = pack_records(0, begins, sizes, tokens, trained, n_batch=2, n_ctx=10, pad=0)
    assert p.used == 5 and p.tokens.shape == (2, 10) and (p.weights[:, -1] == 0).any()
    T = int(sizes.max()) - 1
    X = np.zeros((5, T), np.int32)
    Y = np.zeros((5, T), np.int32)
    W = np.zeros((5, T), np.float64)
    for i, (b, s) in enumerate(zip(begins, sizes)):
        X[i, :s - 1], Y[i, :s - 1], W[i, :s - 1] = tokens[b:b + s - 1], tokens[b + 1:b + s], trained[b + 1:b + s]
    return p, (X, Y, W)


@pytest.mark.parametrize("ckpt,flash", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("arch", ["llama-mha", "llama-gqa"] + sorted(set(FAMILY_SPECS) - {"llama"}))
def test_packed_rows_equal_records_alone(tmp_path_factory, arch, ckpt, flash):
    if arch.startswith("llama"):
        hp, w = tiny(tmp_path_factory, gqa=arch == "llama-gqa", tied=False)
    else:
        hp, w = family(tmp_path_factory, arch)
    lora = random_lora(hp, 1, np.float64)
    p, (X, Y, W) = packed_and_alone(hp)
    inv = 1.0 / W.sum()
    assert W.sum() == p.weights.sum()
    g_packed, g_alone = lora.like(), lora.like()
    loss_p = loss_and_grad(w, hp, lora, g_packed, p.tokens, p.targets, p.weights.astype(np.float64), inv,
                           checkpointing=ckpt, flash=flash, pos=p.pos, seg_start=p.seg_start)
    loss_a = loss_and_grad(w, hp, lora, g_alone, X, Y, W, inv, checkpointing=ckpt, flash=flash)
    assert abs(loss_p - loss_a) <= 1e-6 * abs(loss_a)
    assert np.linalg.norm(g_packed.flat - g_alone.flat) <= 1e-6 * np.linalg.norm(g_alone.flat)
    assert abs(loss_and_grad(w, hp, lora, None, p.tokens, p.targets, p.weights.astype(np.float64), inv, flash=flash,
                             pos=p.pos, seg_start=p.seg_start) - loss_a) <= 1e-6 * abs(loss_a)


@pytest.mark.parametrize("ckpt", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # untied adapted head; tied soft-capped head
def test_streamed_head_equals_row_chunks(tmp_path_factory, monkeypatch, arch, ckpt):
    """A head that is not cached and whose logits take several row chunks is streamed over the
    vocabulary instead (backward._head_loss_streamed): the same loss and gradients, in training
    and in validation, with the output adapter and soft-capping."""
    hp, w = family(tmp_path_factory, arch)
    w = Weights(w.f, hp, dtype=np.float64, cache_head=False)
    assert not w.cache_head
    monkeypatch.setattr(Weights, "HEAD_CHUNK_ROWS", 64)  # 300 tokens: 5 chunks of the vocabulary
    lora = random_lora(hp, 0, np.float64)
    assert "output.weight" in {s.name for s in lora.layout.specs}
    tokens, targets, mask = batch(hp)
    inv = 1.0 / mask.sum()
    g_rows, g_streamed = lora.like(), lora.like()
    loss_rows = loss_and_grad(w, hp, lora, g_rows, tokens, targets, mask, inv, checkpointing=ckpt)
    val_rows = loss_and_grad(w, hp, lora, None, tokens, targets, mask, inv)
    calls = []
    monkeypatch.setattr(backward, "head_rows", lambda weights, n, itemsize: 3)  # 8 loss rows > 3: streamed
    monkeypatch.setattr(backward, "logits_bytes", lambda weights: 3 * 64 * 8)  # blocks of 3 rows
    real = backward._streamed_logits
    monkeypatch.setattr(backward, "_streamed_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss_s = loss_and_grad(w, hp, lora, g_streamed, tokens, targets, mask, inv, checkpointing=ckpt)
    assert len(calls) == 2  # the vocabulary streamed twice: statistics, then gradients
    val_s = loss_and_grad(w, hp, lora, None, tokens, targets, mask, inv)
    assert len(calls) == 3
    assert abs(loss_s - loss_rows) <= 1e-12 * abs(loss_rows) and abs(val_s - val_rows) <= 1e-12 * abs(val_rows)
    assert np.linalg.norm(g_streamed.flat - g_rows.flat) <= 1e-12 * np.linalg.norm(g_rows.flat)
    bad = targets.copy()
    bad[0, 0] = hp.n_vocab
    with pytest.raises(ValueError, match="targets"):
        loss_and_grad(w, hp, lora, lora.like(), tokens, bad, mask, inv)


def test_compact_rows_lays_the_needed_positions_end_to_end():
    from gguf_finetune.engine.forward import compact_rows

    tokens = np.arange(12).reshape(2, 6)
    mask = np.array([[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    assert compact_rows(tokens, tokens, np.ones_like(mask), None, None) is None  # every row ends on a loss
    x, y, m, pos, seg = compact_rows(tokens, tokens + 1, mask, None, None)
    assert x.tolist() == [[0, 1, 2, 6, 7, 8, 9, 10, 11]] and y.tolist() == [[1, 2, 3, 7, 8, 9, 10, 11, 12]]
    assert m.tolist() == [[0, 1, 1, 1, 1, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5]] and seg.tolist() == [[0, 0, 0, 3, 3, 3, 3, 3, 3]]
    # packed rows keep their records; a record's positions after its last loss go, inside a row too
    # (row 0: record 2's second position), and so does a record without a loss (row 0: record 5)
    packed_seg = np.array([[0, 0, 2, 2, 4, 5], [0, 0, 0, 3, 3, 3]])
    packed_pos = np.arange(6)[None, :] - packed_seg
    mask[0, 4] = 1
    x, _, m, pos, seg = compact_rows(tokens, tokens, mask, packed_pos, packed_seg)
    assert x.tolist() == [[0, 1, 2, 4, 6, 7, 8, 9, 10, 11]] and m.tolist() == [[0] + [1] * 9]
    assert seg.tolist() == [[0, 0, 2, 3, 4, 4, 4, 7, 7, 7]] and pos.tolist() == [[0, 1, 0, 0, 0, 1, 2, 0, 1, 2]]
    x, *_ = compact_rows(tokens, tokens, np.zeros_like(mask), None, None)
    assert x.size == 0  # nothing with a loss: nothing to run


@pytest.mark.parametrize("ckpt", [True, False])
@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3"])  # gemma3: sliding-window layers
def test_positions_after_the_last_loss_change_nothing(tmp_path_factory, monkeypatch, arch, ckpt):
    """Rows whose last positions have no loss weight (padding, a record's untrained tail) run as one
    row of what remains (forward.compact_rows): the same loss and gradients as the whole batch, in
    training and in validation, with one record per row and with packed rows."""
    hp, w = tiny(tmp_path_factory, gqa=True, tied=False) if arch == "llama-gqa" else family(tmp_path_factory, arch)
    lora = random_lora(hp, 1, np.float64)
    p, (X, Y, W) = packed_and_alone(hp)
    for args in [(X, Y, W, None, None), (p.tokens, p.targets, p.weights.astype(np.float64), p.pos, p.seg_start)]:
        tokens, targets, mask, pos, seg = args
        assert (mask[:, -1] == 0).any()  # something to drop
        inv = 1.0 / mask.sum()
        g_compact, g_whole = lora.like(), lora.like()
        run = dict(checkpointing=ckpt, flash=True, pos=pos, seg_start=seg)
        loss_c = loss_and_grad(w, hp, lora, g_compact, tokens, targets, mask, inv, **run)
        eval_c = loss_and_grad(w, hp, lora, None, tokens, targets, mask, inv, **run)
        with monkeypatch.context() as mp:
            mp.setattr(backward, "compact_rows", lambda *a: None)
            loss_w = loss_and_grad(w, hp, lora, g_whole, tokens, targets, mask, inv, **run)
            eval_w = loss_and_grad(w, hp, lora, None, tokens, targets, mask, inv, **run)
        assert abs(loss_c - loss_w) <= 1e-10 * abs(loss_w) and abs(eval_c - eval_w) <= 1e-10 * abs(eval_w)
        assert np.linalg.norm(g_compact.flat - g_whole.flat) <= 1e-10 * np.linalg.norm(g_whole.flat)


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # phi3: fused q, k, v
@pytest.mark.parametrize("norm_rank", [0, 1])
def test_first_block_without_dx_gives_the_same_gradients(tmp_path_factory, monkeypatch, arch, norm_rank):
    """With no adapter on the token embedding nothing below the first block is trained: its q, k, v
    products into dx are skipped (the attention norm's adapter still needs them)."""
    hp, w = family(tmp_path_factory, arch)
    ranks = LoraRanks.uniform(2, norm_rank=norm_rank, tok_embd=0)
    layout = LoraLayout(make_specs(hp, ranks))
    lora = LoraParams(layout, alpha=3.0, flat=np.random.default_rng(2).standard_normal(layout.size) * 0.2)
    assert "token_embd.weight" not in {s.name for s in layout.specs}
    tokens, targets, mask = batch(hp)
    g_skip, g_full = lora.like(), lora.like()
    calls = []
    whole = backward.layer_backward

    def spy(*a, **kw):
        calls.append(a[-1])
        return whole(*a, **kw)

    monkeypatch.setattr(backward, "layer_backward", spy)
    loss = loss_and_grad(w, hp, lora, g_skip, tokens, targets, mask, 0.1)
    assert calls[-1] is False and all(calls[:-1])  # the first block (last called) alone
    monkeypatch.setattr(backward, "layer_backward", lambda *a: whole(*a[:-1], True))
    assert loss_and_grad(w, hp, lora, g_full, tokens, targets, mask, 0.1) == loss
    assert np.linalg.norm(g_skip.flat - g_full.flat) <= 1e-12 * np.linalg.norm(g_full.flat)
