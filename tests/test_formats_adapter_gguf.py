"""GGUF adapters as today's llama.cpp loads them: round trip, the shapes its loader checks, dropped
tensors, storage types, and (marked interop) llama.cpp's own logits with our adapter."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from conftest import needs
from gguf_finetune.errors import UserError
from gguf_finetune.formats.adapter_gguf import dropped_message, read_adapter_gguf, write_adapter_gguf
from gguf_finetune.formats.load import describe_adapter, detect_kind, load_adapter
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.lora import LoraRanks, init_lora
from gguf_finetune.model import read_hparams
from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model


def _model(tmp_path, name="m.gguf", **kw):
    spec = SyntheticSpec(n_vocab=300, n_embd=32, n_ff=48, n_head=4, n_head_kv=2, **kw)
    path = write_synthetic_model(tmp_path / name, spec)
    return path, read_hparams(open_gguf(path))


def _random_lora(hp, alpha=8.0, seed=0, **rank_kw):
    ranks = LoraRanks.uniform(rank_kw.pop("r", 4), norm_rank=rank_kw.pop("norm_rank", 0), **rank_kw)
    lora = init_lora(hp, ranks, alpha=alpha, seed=seed)
    lora.flat[...] = np.random.default_rng(seed).normal(0, 0.05, lora.flat.size).astype(np.float32)
    return lora


def test_round_trip_f32(tmp_path):
    _, hp = _model(tmp_path)
    lora = _random_lora(hp, alpha=6.0, r=3, wk=2)
    dropped = write_adapter_gguf(tmp_path / "a.gguf", lora, hp)
    assert dropped == []
    assert detect_kind(tmp_path / "a.gguf") == "gguf-adapter"
    f = open_gguf(tmp_path / "a.gguf", "adapter")
    assert f.get("general.type") == "adapter" and f.get("adapter.type") == "lora"
    assert f.get("general.architecture") == "llama" and f.get("adapter.lora.alpha") == 6.0
    back = load_adapter(tmp_path / "a.gguf", hp)
    assert [(s.name, s.kind, s.n_in, s.n_out, s.rank) for s in back.layout.specs] == \
        [(s.name, s.kind, s.n_in, s.n_out, s.rank) for s in lora.layout.specs]
    np.testing.assert_array_equal(back.flat, lora.flat)
    assert back.scales == lora.scales and back.scales["blk.0.attn_k.weight"] == 3.0


def test_shapes_are_what_llamacpp_checks(tmp_path):
    """llama-adapter.cpp: W.ne0 == a.ne0, W.ne1 == b.ne1, a.ne1 == b.ne0; token_embd flipped:
    W.ne0 == b.ne1, W.ne1 == a.ne1.  (ggml ne = reversed numpy shape)"""
    mpath, hp = _model(tmp_path)
    lora = _random_lora(hp)
    write_adapter_gguf(tmp_path / "a.gguf", lora, hp)
    model, ad = open_gguf(mpath), open_gguf(tmp_path / "a.gguf", "adapter")
    names = sorted({n.rsplit(".", 1)[0] for n in ad.tensors})
    assert "token_embd.weight" in names and "output.weight" in names and len(names) == 2 + 7 * hp.n_layer
    for base in names:
        W = model.tensors[base].shape.tolist()  # ggml ne
        a = ad.tensors[base + ".lora_a"].shape.tolist()
        b = ad.tensors[base + ".lora_b"].shape.tolist()
        if base == "token_embd.weight":
            assert W[0] == b[1] and W[1] == a[1], base
            assert b[0] == a[0] == 4
        else:
            assert W[0] == a[0] and W[1] == b[1] and a[1] == b[0] == 4, base


def test_norms_and_tied_embeddings_are_dropped(tmp_path):
    _, hp = _model(tmp_path)
    lora = _random_lora(hp, norm_rank=1)
    dropped = write_adapter_gguf(tmp_path / "a.gguf", lora, hp)
    assert {s.name for s in dropped} == {"output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(hp.n_layer)
                                                                  for n in ("attn_norm", "ffn_norm")}
    assert "norm adapters" in dropped_message(dropped)
    assert not any("_norm" in n for n in open_gguf(tmp_path / "a.gguf", "adapter").tensors)

    _, hp_t = _model(tmp_path, "tied.gguf", tied=True)
    assert hp_t.tied_embeddings
    lora_t = _random_lora(hp_t)
    dropped = write_adapter_gguf(tmp_path / "t.gguf", lora_t, hp_t)
    assert {s.name for s in dropped} == {"token_embd.weight", "output.weight"}
    assert "ties its output head" in dropped_message(dropped, True)
    names = open_gguf(tmp_path / "t.gguf", "adapter").tensors
    assert not any(n.startswith(("token_embd", "output")) for n in names) and len(names) == 2 * 7 * hp_t.n_layer


@pytest.mark.parametrize("lora_type, qt, rtol", [("f16", QT.F16, 1e-3), ("bf16", QT.BF16, 8e-3)])
def test_f16_bf16(tmp_path, lora_type, qt, rtol):
    _, hp = _model(tmp_path)
    lora = _random_lora(hp)
    write_adapter_gguf(tmp_path / "a.gguf", lora, hp, lora_type=lora_type)
    f = open_gguf(tmp_path / "a.gguf", "adapter")
    assert {f.tensor_type(n) for n in f.tensors} == {qt}
    back = read_adapter_gguf(f)
    np.testing.assert_allclose(back.flat, lora.flat, rtol=rtol, atol=1e-6)
    assert not np.array_equal(back.flat, lora.flat)
    with pytest.raises(UserError, match="--lora-type"):
        write_adapter_gguf(tmp_path / "b.gguf", lora, hp, lora_type="q8_0")


def test_scale_one_checkpoint_is_folded(testdata, tmp_path):
    """llama.cpp finetune trained at scale 1: no alpha key, so llama.cpp applies the user scale only."""
    from gguf_finetune.formats.checkpoint import read_checkpoint

    fx = testdata / "fixtures" / "llamacpp-tiny"
    hp = read_hparams(open_gguf(fx / "tiny-llama-spm-q8_0.gguf"))
    c = read_checkpoint(fx / "chk-tiny-4.gguf", hp)
    write_adapter_gguf(tmp_path / "a.gguf", c.lora, hp)
    f = open_gguf(tmp_path / "a.gguf", "adapter")
    assert not f.has("adapter.lora.alpha")
    back = read_adapter_gguf(f)
    assert set(back.scales.values()) == {1.0}
    for s in back.layout.specs:
        np.testing.assert_array_equal(back.b[s.name], c.lora.b[s.name])
    # per-tensor scales (alpha/r from a .bin header applied to every rank) are folded into b
    from gguf_finetune.formats.ggla import read_ggla, write_ggla

    lora = _random_lora(hp, alpha=8.0, r=4, wq=2)
    write_ggla(tmp_path / "x.bin", lora)  # every tensor scale 8/4 = 2: wq's 4.0 folded
    p = read_ggla(tmp_path / "x.bin", hp)
    write_adapter_gguf(tmp_path / "b.gguf", p, hp)
    q = load_adapter(tmp_path / "b.gguf", hp)
    for s in lora.layout.specs:
        a, b, sc = lora.get(s.name)
        a2, b2, sc2 = q.get(s.name)
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_allclose(sc2 * b2, sc * b, rtol=1e-6)


def test_wrong_model_and_bad_files_are_refused(tmp_path):
    _, hp = _model(tmp_path)
    _, hp2 = _model(tmp_path, "other.gguf", n_layer=1)
    write_adapter_gguf(tmp_path / "a.gguf", _random_lora(hp), hp)
    with pytest.raises(UserError, match="beyond the model's 1 layers"):
        load_adapter(tmp_path / "a.gguf", hp2)
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "half.gguf"), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="missing one component"):
        load_adapter(tmp_path / "half.gguf", hp)


def test_describe(tmp_path):
    _, hp = _model(tmp_path)
    write_adapter_gguf(tmp_path / "a.gguf", _random_lora(hp, r=4, wq=8), hp, lora_type="f16")
    d = describe_adapter(tmp_path / "a.gguf")
    assert d["type"] == "gguf-adapter" and d["architecture"] == "llama" and d["alpha"] == 8.0
    assert d["ranks"]["attn_q"] == [8] and d["ranks"]["ffn_up"] == [4] and not d["norm_adapters"]
    assert d["dtype"] == ["F16"] and d["scale_mode"] == "alpha/r"


# -- llama.cpp itself ----------------------------------------------------------------------

def _llamacpp_logits(model_path, ids, lora_path=None):
    from llama_cpp import Llama

    # F32 KV cache: llama.cpp's default F16 cache alone moves logits by ~1e-3 relative
    llm = Llama(model_path=str(model_path), n_ctx=64, n_batch=64, logits_all=True, embedding=False, verbose=False,
                n_threads=2, lora_path=None if lora_path is None else str(lora_path), type_k=0, type_v=0,
                flash_attn=False)
    llm.eval(list(ids))
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


@pytest.mark.interop
@pytest.mark.parametrize("tied", [False, True])
def test_llamacpp_applies_our_adapter(tmp_path, tied):
    needs("llama_cpp")
    import gguf_finetune as gf

    path = write_synthetic_model(tmp_path / "m.gguf", SyntheticSpec(n_head=4, n_head_kv=2, tied=tied, seed=3))
    hp = read_hparams(open_gguf(path))
    lora = _random_lora(hp, alpha=8.0)  # every matrix, token_embd and output; a and b non-zero
    dropped = write_adapter_gguf(tmp_path / "a.gguf", lora, hp)
    assert len(dropped) == (2 if tied else 0)
    ids = [1, 300, 301, 302, 310, 400, 5, 77, 123, 260, 42, 17]
    ours_base = gf.load_model(path, with_tokenizer=False).logits(ids).astype(np.float64)
    ours = gf.load_model(path, adapters=[(tmp_path / "a.gguf", 1.0)], with_tokenizer=False).logits(ids).astype(np.float64)
    lc_base = _llamacpp_logits(path, ids)
    lc = _llamacpp_logits(path, ids, tmp_path / "a.gguf")
    d_ours, d_lc = ours - ours_base, lc - lc_base
    assert np.linalg.norm(d_lc) > 0.1 * np.linalg.norm(lc_base)  # the adapter matters
    rel = np.linalg.norm(d_ours - d_lc) / np.linalg.norm(d_lc)
    print(f"llama.cpp vs ours, relative L2 of the adapter delta (tied={tied}): {rel:.2e}")
    assert rel <= 1e-3, rel
