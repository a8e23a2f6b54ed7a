"""PEFT export/import and `convert`: names, shapes, RoPE row order, scales, round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import needs
from gguf_finetune.errors import UserError
from gguf_finetune.formats.adapter_gguf import write_adapter_gguf
from gguf_finetune.formats.convert import run_convert
from gguf_finetune.formats.load import describe_adapter, detect_kind, load_adapter
from gguf_finetune.formats.peft import permute_rows, read_peft, read_safetensors, unpermute_rows, write_peft
from gguf_finetune.gguf_io import open_gguf
from gguf_finetune.lora import LoraRanks, init_lora
from gguf_finetune.model import read_hparams
from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

needs("safetensors")


@pytest.fixture
def model(tmp_path):
    path = write_synthetic_model(tmp_path / "m.gguf", SyntheticSpec(n_vocab=300, n_embd=48, n_ff=64, n_head=6,
                                                                     n_head_kv=2))
    return path, read_hparams(open_gguf(path))


def _lora(hp, seed=0, alpha=8.0, **kw):
    lora = init_lora(hp, LoraRanks.uniform(kw.pop("r", 4), **kw), alpha=alpha, seed=seed)
    lora.flat[...] = np.random.default_rng(seed).normal(0, 0.1, lora.flat.size).astype(np.float32)
    return lora


def test_permutation_pair():
    x = np.arange(8)[:, None]
    # head size 4: HF rows (halves: 0 1 | 2 3) -> GGUF interleaved pairs (0 2 1 3)
    assert permute_rows(x, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = np.random.default_rng(0).standard_normal((48, 5))
    for heads in (1, 2, 6):
        p = permute_rows(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_rows(p, heads), w)
        np.testing.assert_array_equal(permute_rows(unpermute_rows(w, heads), heads), w)
    with pytest.raises(UserError, match="heads of even size"):
        permute_rows(w, 5)


def test_peft_layout_names_and_delta(model, tmp_path):
    path, hp = model
    lora = _lora(hp, norm_rank=1, wv=2)
    dropped = write_peft(tmp_path / "peft", lora, hp.n_head, hp.n_head_kv, base_model="org/base")
    assert len(dropped) == 1 + 2 * hp.n_layer and all(s.kind == "norm" for s in dropped)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == "org/base" and cfg["alpha_pattern"] == {}
    assert cfg["rank_pattern"] == {f"layers.{i}.self_attn.v_proj": 2 for i in range(hp.n_layer)}
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj", "embed_tokens", "lm_head"])
    t, _ = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    P = "base_model.model."
    C, V, Ckv = hp.n_embd, hp.n_vocab, hp.n_embd_kv
    assert t[P + "model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, C)
    assert t[P + "model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (Ckv, 4)
    assert t[P + "model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, hp.n_ff)
    assert t[P + "model.embed_tokens.lora_embedding_A"].shape == (4, V)
    assert t[P + "model.embed_tokens.lora_embedding_B"].shape == (C, 4)
    assert t[P + "lm_head.lora_B.weight"].shape == (V, 4)
    assert len(t) == 2 * (2 + 7 * hp.n_layer)
    # PEFT's ΔW = s·B·A in HF row order, permuted the way convert_hf_to_gguf.py permutes q/k, is ours
    for name, heads in (("q_proj", hp.n_head), ("k_proj", hp.n_head_kv)):
        A = t[P + f"model.layers.1.self_attn.{name}.lora_A.weight"]
        B = t[P + f"model.layers.1.self_attn.{name}.lora_B.weight"]
        a, b, s = lora.get(f"blk.1.attn_{name[0]}.weight")
        np.testing.assert_allclose(permute_rows(2.0 * B @ A, heads), s * b @ a.T, rtol=1e-6, atol=1e-7)
    E = (2.0 * t[P + "model.embed_tokens.lora_embedding_B"] @ t[P + "model.embed_tokens.lora_embedding_A"]).T
    a, b, s = lora.get("token_embd.weight")
    np.testing.assert_allclose(E, s * b @ a.T, rtol=1e-6, atol=1e-7)


def test_gguf_peft_gguf_round_trip_is_exact(model, tmp_path):
    path, hp = model
    lora = _lora(hp, alpha=6.0, r=4, wq=8)
    write_adapter_gguf(tmp_path / "a.gguf", lora, hp)
    r1 = run_convert(tmp_path / "a.gguf", tmp_path / "peft")  # head counts from our adapter's metadata
    assert (r1.kind_in, r1.kind_out, r1.dropped) == ("gguf-adapter", "peft", [])
    assert detect_kind(tmp_path / "peft") == "peft"
    r2 = run_convert(tmp_path / "peft", tmp_path / "b.gguf", base=path)
    assert r2.kind_in == "peft" and r2.n_params == lora.n_params()
    back = load_adapter(tmp_path / "b.gguf", hp)
    assert [s.name for s in back.layout.specs] == [s.name for s in lora.layout.specs]
    np.testing.assert_array_equal(back.flat, lora.flat)
    assert back.scales == lora.scales
    # and the PEFT folder itself loads as an adapter
    direct = load_adapter(tmp_path / "peft", hp)
    np.testing.assert_array_equal(direct.flat, lora.flat)


def test_llamacpp_checkpoint_to_peft_keeps_scales(testdata, tmp_path):
    """Scale-1 checkpoint: alpha = r per module (rank-1 norms are dropped)."""
    fx = testdata / "fixtures" / "llamacpp-tiny"
    hp = read_hparams(open_gguf(fx / "tiny-llama-spm-q8_0.gguf"))
    res = run_convert(fx / "chk-tiny-4.gguf", tmp_path / "peft")  # head counts from the checkpoint's keys
    assert len(res.dropped) == 5 and res.warnings and "PEFT cannot adapt" in res.warnings[0]
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4
    p = load_adapter(tmp_path / "peft", hp)
    from gguf_finetune.formats.checkpoint import read_checkpoint

    c = read_checkpoint(fx / "chk-tiny-4.gguf", hp)
    assert set(p.scales.values()) == {1.0}
    for s in p.layout.specs:
        np.testing.assert_array_equal(p.a[s.name], c.lora.a[s.name])
        np.testing.assert_array_equal(p.b[s.name], c.lora.b[s.name])


def test_rank_and_alpha_patterns_are_read(model, tmp_path):
    path, hp = model
    lora = _lora(hp, alpha=8.0, r=4)
    write_peft(tmp_path / "peft", lora, hp.n_head, hp.n_head_kv)
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["alpha_pattern"] = {"layers.1.mlp.up_proj": 2}
    cfg["use_rslora"] = False
    cfg_path.write_text(json.dumps(cfg))
    p = read_peft(tmp_path / "peft", hp)
    assert p.scales["blk.1.ffn_up.weight"] == 0.5 and p.scales["blk.0.ffn_up.weight"] == 2.0
    cfg["use_rslora"] = True
    cfg_path.write_text(json.dumps(cfg))
    assert read_peft(tmp_path / "peft", hp).scales["blk.0.ffn_up.weight"] == 4.0  # 8/√4
    d = describe_adapter(tmp_path / "peft")
    assert d["type"] == "peft" and d["ranks"]["attn_q"] == [4]


def test_refusals(model, tmp_path):
    path, hp = model
    lora = _lora(hp)
    write_adapter_gguf(tmp_path / "a.gguf", lora, "llama")  # no HParams: no head counts recorded
    with pytest.raises(UserError, match="--base"):
        run_convert(tmp_path / "a.gguf", tmp_path / "peft")
    only_v = _lora(hp, r=4, wq=0, wk=0)
    write_peft(tmp_path / "p2", only_v)  # no q/k: no head counts needed
    assert read_peft(tmp_path / "p2").n_params() == only_v.n_params()
    cfg = json.loads((tmp_path / "p2" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "p2" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="DoRA"):
        read_peft(tmp_path / "p2")
    with pytest.raises(UserError, match="--to"):
        run_convert(tmp_path / "a.gguf", tmp_path / "x", to="onnx")


def test_bin_and_checkpoint_convert(testdata, tmp_path):
    fx = testdata / "fixtures" / "llamacpp-tiny"
    hp = read_hparams(open_gguf(fx / "tiny-llama-spm-q8_0.gguf"))
    res = run_convert(fx / "lora-tiny-4.bin", tmp_path / "a.gguf")
    assert res.kind_out == "gguf" and len(res.dropped) == 5 and "norm adapters" in res.warnings[0]
    res = run_convert(tmp_path / "a.gguf", tmp_path / "b.bin", lora_r=4, lora_alpha=4)
    assert res.kind_out == "ggla"
    a = load_adapter(tmp_path / "b.bin", hp)
    ref = load_adapter(fx / "lora-tiny-4.bin", hp)
    for s in a.layout.specs:
        np.testing.assert_array_equal(a.b[s.name], ref.b[s.name])
    res = run_convert(fx / "chk-tiny-4.gguf", tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == (fx / "lora-tiny-4.bin").read_bytes()


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "phi3"])
def test_families_use_their_module_names_and_keep_hf_row_order(tmp_path, arch):
    """NeoX families keep HF's q/k row order (no permutation, no head counts needed); Phi-3's fused
    tensors are PEFT's qkv_proj and gate_up_proj; reading the folder back gives the adapter."""
    spec = SyntheticSpec(n_vocab=300, n_embd=48, n_ff=64, n_head=6, n_head_kv=2, arch=arch,
                         **({"head_dim": 8} if arch == "gemma3" else {}))
    path = write_synthetic_model(tmp_path / "m.gguf", spec)
    hp = read_hparams(open_gguf(path))
    lora = _lora(hp)
    dropped = write_peft(tmp_path / "peft", lora, arch=arch)  # no head counts: nothing is permuted
    assert dropped == []
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    want = {"phi3": ["down_proj", "embed_tokens", "gate_up_proj", "lm_head", "o_proj", "qkv_proj"],
            "qwen2": ["down_proj", "embed_tokens", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj",
                      "v_proj"]}
    want["gemma3"] = want["qwen2"]
    assert cfg["target_modules"] == want[arch]
    tensors, meta = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert meta["gguf_finetune.arch"] == arch
    q = "self_attn.qkv_proj" if arch == "phi3" else "self_attn.q_proj"
    name = "blk.0.attn_qkv.weight" if arch == "phi3" else "blk.0.attn_q.weight"
    np.testing.assert_array_equal(tensors[f"base_model.model.model.layers.0.{q}.lora_B.weight"], lora.b[name])
    back = read_peft(tmp_path / "peft", hp)
    for s in lora.layout.specs:
        np.testing.assert_allclose(back.b[s.name] * back.scales[s.name], lora.b[s.name] * lora.scales[s.name])
        np.testing.assert_array_equal(back.a[s.name], lora.a[s.name])
