"""gguf-finetune convert through the CLI: llama.cpp checkpoint -> GGUF adapter -> PEFT -> GGUF adapter."""

from __future__ import annotations

import numpy as np

from gguf_finetune.cli.convert import run
from gguf_finetune.formats.load import read_any


def test_convert_chain_keeps_the_adapter(testdata, tmp_path, capsys):
    fx = testdata / "fixtures" / "llamacpp-tiny"
    base = fx / "tiny-llama-spm-q8_0.gguf"
    a, p, b = tmp_path / "a.gguf", tmp_path / "peft", tmp_path / "b.gguf"
    assert run([str(fx / "chk-tiny-10.gguf"), str(a), "--base", str(base)]) == 0
    assert run([str(a), str(p), "--to", "peft"]) == 0
    assert run([str(p), str(b), "--base", str(base)]) == 0
    assert "norm adapters" in capsys.readouterr().err  # left out of the GGUF adapter, and said so
    _, ck = read_any(fx / "chk-tiny-10.gguf")
    _, back = read_any(b)
    for s in back.layout.specs:
        want = ck.scales[s.name] * ck.b[s.name] @ ck.a[s.name].T  # ΔW as llama.cpp trained it
        got = back.scales[s.name] * back.b[s.name] @ back.a[s.name].T
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert {s.name for s in back.layout.specs} == {s.name for s in ck.layout.specs if s.kind != "norm"}
