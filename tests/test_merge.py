"""export-lora merging: merged weights = W + Σ u·s·b·aᵀ, logits equal base+adapter, raw copies, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from conftest import needs
from gguf_finetune.errors import UserError
from gguf_finetune.formats.adapter_gguf import write_adapter_gguf
from gguf_finetune.formats.checkpoint import write_checkpoint
from gguf_finetune.formats.ggla import write_ggla
from gguf_finetune.formats.merge import merge_adapters, run_export_lora
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.lora import LoraRanks, init_lora
from gguf_finetune.model import read_hparams
from gguf_finetune.optim import OptimizerState
from gguf_finetune.quants import dequantize_tensor
from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model
from gguf_finetune.trainer import TrainState

IDS = [1, 300, 301, 302, 310, 400, 5, 77, 123, 260, 42, 17]


def _model(tmp_path, name="m.gguf", **kw):
    spec = dict(n_vocab=512, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, seed=5)
    spec.update(kw)
    path = write_synthetic_model(tmp_path / name, SyntheticSpec(**spec))
    return path, read_hparams(open_gguf(path))


def _lora(hp, seed=0, alpha=8.0, std=0.05, **kw):
    ranks = LoraRanks.uniform(kw.pop("r", 4), norm_rank=kw.pop("norm_rank", 0), **kw)
    lora = init_lora(hp, ranks, alpha=alpha, seed=seed)
    lora.flat[...] = np.random.default_rng(seed).normal(0, std, lora.flat.size).astype(np.float32)
    return ranks, lora


def _checkpoint(path, hp, ranks, lora):
    write_checkpoint(path, hp, 32, ranks, lora, OptimizerState.zeros(lora.layout.size), TrainState())
    return path


def _expected(base_f, name, adapters):
    """float64 W + Σ u·s·b·aᵀ straight from the formula."""
    W = dequantize_tensor(base_f.tensors[name]).astype(np.float64)
    for lora, u in adapters:
        g = lora.get(name)
        if g is not None:
            a, b, s = g
            W = W + (u * s * (b.astype(np.float64) @ a.T.astype(np.float64))).reshape(W.shape)
    return W


def test_merged_tensors_follow_the_formula_and_untouched_are_raw_copies(tmp_path):
    path, hp = _model(tmp_path)
    r1, l1 = _lora(hp, seed=1, r=4, wk=0, wo=0, ffn_gate=0, ffn_down=0, ffn_up=0, tok_embd=0, out=0, att_norm=1)
    r2, l2 = _lora(hp, seed=2, alpha=2.0, r=2, wk=0, wo=0, ffn_gate=0, ffn_down=0, ffn_up=0, tok_embd=0, out=0)
    write_adapter_gguf(tmp_path / "a1.gguf", l1, hp)  # drops the norm adapters...
    ck = _checkpoint(tmp_path / "c1.gguf", hp, r1, l1)  # ...a checkpoint keeps them
    write_ggla(tmp_path / "a2.bin", l2)
    res = merge_adapters(path, [(ck, 0.5), (tmp_path / "a2.bin", 2.0)], tmp_path / "out.gguf", outtype="f32")
    base, out = open_gguf(path), open_gguf(tmp_path / "out.gguf")
    adapted = {s.name for s in l1.layout.specs} | {s.name for s in l2.layout.specs}
    assert any("attn_norm" in n for n in adapted)
    assert res.n_merged == len(adapted) and res.n_tensors == len(base.tensors) and not res.untied
    assert list(out.tensors) == list(base.tensors)
    for name, t in base.tensors.items():
        o = out.tensors[name]
        if name in adapted:
            assert out.tensor_type(name) == QT.F32
            got = dequantize_tensor(o).astype(np.float64)
            want = _expected(base, name, [(l1, 0.5), (l2, 2.0)])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
            assert not np.allclose(got, dequantize_tensor(t), atol=1e-4)
        else:
            assert out.tensor_type(name) == base.tensor_type(name)
            assert np.asarray(o.data).tobytes() == np.asarray(t.data).tobytes(), name
    # every key/value copied (tokenizer included); only general.file_type is set
    for k in base.keys():
        if k != "general.file_type":
            assert out.get(k) == base.get(k), k
    assert out.get("general.file_type") == 0 and set(out.keys()) == set(base.keys()) | {"general.file_type"}


def test_merged_logits_equal_base_plus_adapter(tmp_path):
    import gguf_finetune as gf

    for tied in (False, True):
        path, hp = _model(tmp_path, f"m{tied}.gguf", tied=tied)
        ranks, lora = _lora(hp, seed=3, norm_rank=1)  # every target, norms, token_embd and output
        ck = _checkpoint(tmp_path / f"c{tied}.gguf", hp, ranks, lora)
        out = tmp_path / f"merged{tied}.gguf"
        res = run_export_lora(path, [(ck, 0.75)], out, "f32", threads=2, progress=False)
        assert res.untied == tied
        want = gf.load_model(path, adapters=[(ck, 0.75)], with_tokenizer=False).logits(IDS).astype(np.float64)
        merged = gf.load_model(out, with_tokenizer=False)
        assert not merged.hparams.tied_embeddings
        got = merged.logits(IDS).astype(np.float64)
        base = gf.load_model(path, with_tokenizer=False).logits(IDS).astype(np.float64)
        assert np.linalg.norm(want - base) > 0.1 * np.linalg.norm(base)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want - base)
        print(f"merged vs base+adapter logits (tied={tied}): relative L2 {rel:.2e}")
        assert rel < 1e-4, (tied, rel)


def test_quantized_base_and_outtypes(tmp_path):
    path, hp = _model(tmp_path, qtype="Q8_0")
    ranks, lora = _lora(hp, seed=4, tok_embd=0, out=0)
    write_adapter_gguf(tmp_path / "a.gguf", lora, hp)
    base = open_gguf(path)
    for outtype, qt, tol in (("q8_0", QT.Q8_0, 0.01), (None, QT.F16, 2e-3), ("bf16", QT.BF16, 8e-3),
                             ("q4_0", QT.Q4_0, 0.2)):
        merge_adapters(path, [(tmp_path / "a.gguf", 1.0)], tmp_path / "o.gguf", outtype=outtype)
        out = open_gguf(tmp_path / "o.gguf")
        name = "blk.1.ffn_down.weight"
        assert out.tensor_type(name) == qt and out.tensor_type("blk.1.ffn_norm.weight") == QT.F32
        want = _expected(base, name, [(lora, 1.0)])
        got = dequantize_tensor(out.tensors[name])
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < tol, (outtype, err)
        assert np.asarray(out.tensors["token_embd.weight"].data).tobytes() == \
            np.asarray(base.tensors["token_embd.weight"].data).tobytes()
        assert out.tensor_type("token_embd.weight") == QT.Q8_0
    # q8_0 of W + ΔW is exactly gguf.quants' quantization of the float result
    from gguf import quants as gq

    merge_adapters(path, [(tmp_path / "a.gguf", 1.0)], tmp_path / "o.gguf", outtype="q8_0")
    out = open_gguf(tmp_path / "o.gguf")
    name = "blk.0.attn_q.weight"
    w = dequantize_tensor(base.tensors[name])
    a, b, s = lora.get(name)
    w += (b * np.float32(s)) @ a.T
    assert np.asarray(out.tensors[name].data).tobytes() == gq.quantize(w, QT.Q8_0).tobytes()
    assert out.get("general.file_type") == 7


def test_refusals(tmp_path):
    path, hp = _model(tmp_path)
    other, hp2 = _model(tmp_path, "other.gguf", n_ff=128)
    _, lora2 = _lora(hp2)
    write_adapter_gguf(tmp_path / "bad.gguf", lora2, hp2)
    with pytest.raises(UserError, match="ffn_.*shape"):
        merge_adapters(path, [(tmp_path / "bad.gguf", 1.0)], tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
    _, lora = _lora(hp)
    write_adapter_gguf(tmp_path / "qwen.gguf", lora, "qwen2")
    with pytest.raises(UserError, match="architecture 'qwen2'"):
        merge_adapters(path, [(tmp_path / "qwen.gguf", 1.0)], tmp_path / "o.gguf")
    write_adapter_gguf(tmp_path / "a.gguf", lora, hp)
    with pytest.raises(UserError, match="--outtype"):
        merge_adapters(path, [(tmp_path / "a.gguf", 1.0)], tmp_path / "o.gguf", outtype="q4_k")
    with pytest.raises(UserError, match="base model file"):
        merge_adapters(path, [(tmp_path / "a.gguf", 1.0)], path)
    with pytest.raises(UserError, match="at least one adapter"):
        merge_adapters(path, [], tmp_path / "o.gguf")


def test_llamacpp_fixture_bin_with_norms(testdata, tmp_path):
    """llama.cpp's own .bin into llama.cpp's own Q8_0 model: norms merged too, F16 by default."""
    fx = testdata / "fixtures" / "llamacpp-tiny"
    from gguf_finetune.formats.ggla import read_ggla

    res = merge_adapters(fx / "tiny-llama-spm-q8_0.gguf", [(fx / "lora-tiny-4.bin", 1.0)], tmp_path / "o.gguf")
    base, out = open_gguf(fx / "tiny-llama-spm-q8_0.gguf"), open_gguf(tmp_path / "o.gguf")
    assert res.n_merged == len(base.tensors) == len(out.tensors)
    lora = read_ggla(fx / "lora-tiny-4.bin")
    assert out.tensor_type("blk.0.attn_q.weight") == QT.F16 and out.tensor_type("blk.0.attn_norm.weight") == QT.F32
    want = _expected(base, "blk.1.ffn_norm.weight", [(lora, 1.0)])
    np.testing.assert_allclose(dequantize_tensor(out.tensors["blk.1.ffn_norm.weight"]), want, rtol=1e-6)
    assert not np.allclose(want, dequantize_tensor(base.tensors["blk.1.ffn_norm.weight"]))
    assert out.get_string_array_bytes("tokenizer.ggml.tokens") == base.get_string_array_bytes("tokenizer.ggml.tokens")


@pytest.mark.interop
@pytest.mark.parametrize("tied", [False, True])
def test_llamacpp_runs_merged_model(tmp_path, tied):
    """llama.cpp loads our hand-written GGUF (an untied copy for a tied base) and its logits are ours
    with the adapter applied unmerged."""
    needs("llama_cpp")
    from llama_cpp import Llama

    import gguf_finetune as gf

    path, hp = _model(tmp_path, tied=tied)
    ranks, lora = _lora(hp, seed=6, norm_rank=1)
    ck = _checkpoint(tmp_path / "c.gguf", hp, ranks, lora)
    run_export_lora(path, [(ck, 1.0)], tmp_path / "merged.gguf", "f32", progress=False)
    llm = Llama(model_path=str(tmp_path / "merged.gguf"), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                n_threads=2, type_k=0, type_v=0, flash_attn=False)  # F32 KV cache
    llm.eval(IDS)
    lc = np.array(llm.scores[: len(IDS)], dtype=np.float64)
    llm.close()
    ours = gf.load_model(path, adapters=[(ck, 1.0)], with_tokenizer=False).logits(IDS).astype(np.float64)
    base = gf.load_model(path, with_tokenizer=False).logits(IDS).astype(np.float64)
    rel = np.linalg.norm(lc - ours) / np.linalg.norm(ours - base)
    print(f"llama.cpp on the merged model vs ours unmerged (tied={tied}): relative L2 {rel:.2e}")
    assert rel <= 1e-3, rel


def test_export_lora_command(tmp_path, capsys):
    from gguf_finetune.cli.export_lora import main

    path, hp = _model(tmp_path)
    _, lora = _lora(hp, seed=7, tok_embd=0, out=0)
    write_adapter_gguf(tmp_path / "a.gguf", lora, hp)
    with pytest.raises(SystemExit) as e:
        main(["-m", str(path), "--lora-scaled", str(tmp_path / "a.gguf"), "0.5", "-o", str(tmp_path / "o.gguf"),
              "-t", "2"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"merged {7 * hp.n_layer} tensors" in out and "done, output file is" in out
    o = open_gguf(tmp_path / "o.gguf")
    assert o.tensor_type("blk.0.attn_q.weight") == QT.F32  # llama.cpp: F32 bases stay F32 without --outtype
    want = _expected(open_gguf(path), "blk.0.attn_q.weight", [(lora, 0.5)])
    np.testing.assert_allclose(dequantize_tensor(o.tensors["blk.0.attn_q.weight"]), want, rtol=0, atol=1e-6)
    with pytest.raises(SystemExit) as e:
        main(["-m", str(path), "--lora", str(path), "-o", str(tmp_path / "p.gguf")])
    assert e.value.code == 1 and "neither a LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "p.gguf").exists()
