"""Adapters converted from llama.cpp finetune's own files, run in llama.cpp itself (llama-cpp-python).

Marked `interop`; skipped with a reason when llama_cpp is not importable.
"""

from __future__ import annotations

import numpy as np
import pytest

import gguf_finetune as gf
from gguf_finetune.cli.convert import run as convert

pytestmark = pytest.mark.interop


def llamacpp_logits(model_path, ids, lora_path=None):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=128, n_batch=128, logits_all=True, embedding=False,
                          verbose=False, n_threads=2, lora_path=None if lora_path is None else str(lora_path),
                          type_k=0, type_v=0, flash_attn=False)
    llm.eval(list(ids))
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


def delta_error(model_path, adapter, ids) -> tuple[float, float]:
    """(relative L2 of llama.cpp's adapter effect vs ours, size of the effect vs the logits)."""
    ours_base = gf.load_model(model_path).logits(ids).astype(np.float64)
    ours = gf.load_model(model_path, adapters=[(adapter, 1.0)]).logits(ids).astype(np.float64)
    lc_base = llamacpp_logits(model_path, ids)
    lc = llamacpp_logits(model_path, ids, adapter)
    d_ours, d_lc = ours - ours_base, lc - lc_base
    return float(np.linalg.norm(d_ours - d_lc) / np.linalg.norm(d_ours)), float(np.linalg.norm(d_ours) / np.linalg.norm(ours_base))


def test_llamacpp_finetune_checkpoint_converted_runs_in_llamacpp(shared, tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    fx = shared / "fixtures" / "llamacpp-tiny"
    base = fx / "tiny-llama-spm-q8_0.gguf"
    for src in ("chk-tiny-10.gguf", "lora-tiny-10.bin"):
        out = tmp_path / (src + ".gguf")
        assert convert([str(fx / src), str(out), "--base", str(base)]) == 0
        model = gf.load_model(base)
        ids = model.tokenize("To be, or not to be, that is the question:", add_bos=True)
        rel, size = delta_error(base, out, ids)
        print(f"{src}: adapter effect {size:.3f} of the logits; llama.cpp vs ours relative L2 {rel:.2e}")
        assert size > 1e-2
        assert rel <= 0.05  # Q8_0 base: llama.cpp quantizes activations to 8 bits in its matmuls
