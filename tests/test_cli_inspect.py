"""``gguf-finetune inspect`` (models, adapters, checkpoints, legacy .bin, bad files) and ``tokenize``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gguf_finetune.cli.inspect import render
from gguf_finetune.cli.main import main
from gguf_finetune.gguf_io import open_gguf

TINY = "fixtures/llamacpp-tiny"


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def inspect_json(path, capsys) -> dict:
    code, out, err = run(["inspect", str(path), "--json"], capsys)
    assert code == 0 and err == "", err
    assert out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


# -- models ---------------------------------------------------------------------------------------
def test_inspect_smollm2(smollm2, capsys):
    info = inspect_json(smollm2, capsys)
    assert info["kind"] == "model" and info["architecture"] == "llama" and info["trainable"]
    hp = info["hparams"]
    assert (hp["n_vocab"], hp["n_embd"], hp["n_layer"], hp["n_head"], hp["n_head_kv"]) == (49152, 576, 30, 9, 3)
    assert hp["n_rot"] == 576 // 9 and hp["n_ff"] > hp["n_embd"] and hp["n_ctx_train"] > 0
    assert info["tied_embeddings"] is True
    assert info["tokenizer"]["model"] == "gpt2" and info["tokenizer"]["pre"] == "smollm"
    assert info["tokenizer"]["n_tokens"] == 49152 and info["chat_template"] is True
    # llama parameter count from the shapes (tied: no output.weight)
    V, C, F, L = hp["n_vocab"], hp["n_embd"], hp["n_ff"], hp["n_layer"]
    ckv = C // hp["n_head"] * hp["n_head_kv"]
    assert info["parameters"] == V * C + C + L * (2 * C + 2 * C * C + 2 * C * ckv + 3 * C * F)
    assert sum(info["tensor_types"].values()) == info["n_tensors"] == 2 + 9 * L
    assert "q4_1" in info["tensor_types"] and info["file_size"] == smollm2.stat().st_size

    out = render(info)
    for label in ("kind:", "architecture:", "n_layer", "n_head_kv", "rope_freq_base", "rms_eps",
                  "tied embeddings:", "tensor types:", "tokenizer:", "chat template:"):
        assert label in out, label
    assert "gpt2 (pre: smollm), 49152 tokens" in out and "134.52M" in out


def test_inspect_untied_spm_model(testdata, capsys):
    info = inspect_json(testdata / TINY / "tiny-llama-spm-q8_0.gguf", capsys)
    assert info["tied_embeddings"] is False and info["tokenizer"]["model"] == "llama"
    assert info["chat_template"] is False and info["hparams"]["n_layer"] == 2


# -- checkpoints and adapters -----------------------------------------------------------------------
def test_inspect_llamacpp_checkpoint(testdata, capsys):
    path = testdata / TINY / "chk-tiny-4.gguf"
    info = inspect_json(path, capsys)
    f = open_gguf(path)
    assert info["kind"] == "checkpoint" and info["made_by"] == "llama.cpp finetune"
    assert info["iteration"] == 4 == f.get_int("training.iteration_count")
    assert info["ranks"]["attn_q"] == 4 and info["ranks"]["attn_norm"] == 1 and info["ranks"]["token_embd"] == 4
    assert info["alpha"] is None and info["scale_one"] is True
    assert info["parameters"] == f.get_int("optimizer.parameter_count")
    assert info["n_adapted_tensors"] == 3 + 9 * info["hparams"]["n_layer"]
    assert info["hparams"]["n_ctx"] == 32 and info["architecture"] == "llama"

    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0 and "training checkpoint" in out and "not stored" in out


def test_inspect_legacy_bin_adapter_matches_its_checkpoint(testdata, capsys):
    """llama.cpp's run wrote lora-tiny-4.bin from the same LoRA as chk-tiny-4.gguf."""
    ggla = inspect_json(testdata / TINY / "lora-tiny-4.bin", capsys)
    chk = inspect_json(testdata / TINY / "chk-tiny-4.gguf", capsys)
    assert ggla["kind"] == "ggla-adapter" and ggla["lora_r"] == 4 and ggla["alpha"] == 4
    assert ggla["ranks"] == chk["ranks"] and ggla["parameters"] == chk["parameters"]


def test_inspect_our_checkpoint(tmp_path, capsys):
    from gguf_finetune.formats.checkpoint import write_checkpoint
    from gguf_finetune.lora import LoraLayout, LoraParams, LoraRanks, make_specs
    from gguf_finetune.model import HParams
    from gguf_finetune.optim import OptimizerState
    from gguf_finetune.trainer import TrainState

    hp = HParams(n_vocab=32, n_ctx_train=64, n_embd=16, n_ff=24, n_layer=2, n_head=2, n_head_kv=1, n_rot=8)
    ranks = LoraRanks.uniform(2)
    lora = LoraParams.zeros(LoraLayout(make_specs(hp, ranks)), alpha=6.0)
    path = tmp_path / "chk.gguf"
    write_checkpoint(path, hp, 16, ranks, lora, OptimizerState.zeros(lora.layout.size), TrainState(iteration=7))
    info = inspect_json(path, capsys)
    assert info["made_by"] == "gguf-finetune" and info["alpha"] == 6.0 and info["iteration"] == 7
    assert info["parameters"] == lora.layout.size and info["ranks"]["attn_norm"] == 0


def write_adapter(path, alpha=8.0):
    """A GGUF LoRA adapter in llama.cpp's layout: attn_q of two layers with ranks 2 and 3, token_embd rank 2."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    z = np.zeros
    w.add_tensor("token_embd.weight.lora_a", z((10, 2), np.float32))  # [n_vocab, r]
    w.add_tensor("token_embd.weight.lora_b", z((8, 2), np.float32))  # [n_embd, r]
    w.add_tensor("blk.0.attn_q.weight.lora_a", z((2, 8), np.float16))  # [r, n_in]
    w.add_tensor("blk.0.attn_q.weight.lora_b", z((8, 2), np.float16))  # [n_out, r]
    w.add_tensor("blk.1.attn_q.weight.lora_a", z((3, 8), np.float16))
    w.add_tensor("blk.1.attn_q.weight.lora_b", z((8, 3), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_inspect_gguf_adapter(tmp_path, capsys):
    path = tmp_path / "adapter.gguf"
    write_adapter(path)
    info = inspect_json(path, capsys)
    assert info["kind"] == "adapter" and info["alpha"] == 8.0 and info["architecture"] == "llama"
    assert info["ranks"] == {"token_embd": 2, "attn_q": [2, 3]}
    assert info["parameters"] == 20 + 16 + 16 + 16 + 24 + 24
    assert info["n_adapted_tensors"] == 3 and info["n_layers_adapted"] == 2
    assert info["tensor_types"] == {"f16": 4, "f32": 2}
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0 and "LoRA adapter (GGUF)" in out and "attn_q 2/3" in out


# -- bad input ---------------------------------------------------------------------------------------
def _bad_files(tmp_path, testdata):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes((testdata / TINY / "chk-tiny-4.gguf").read_bytes()[:300])
    bad_ggla = tmp_path / "bad.bin"
    bad_ggla.write_bytes((testdata / TINY / "lora-tiny-4.bin").read_bytes()[:5000])
    return {"missing": (tmp_path / "nope.gguf", "not found"), "directory": (tmp_path, "directory"),
            "empty": (empty, "empty"), "not gguf": (text, "not a GGUF file"),
            "truncated": (trunc, "truncated"), "truncated ggla": (bad_ggla, "truncated")}


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "not gguf", "truncated", "truncated ggla"])
def test_inspect_bad_files(case, tmp_path, testdata, capsys):
    path, needle = _bad_files(tmp_path, testdata)[case]
    code, out, err = run(["inspect", str(path)], capsys)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gguf-finetune inspect: ")
    assert str(path) in lines[0] and needle in lines[0], lines[0]


def test_inspect_bad_file_via_console(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gguf_finetune", "inspect", str(tmp_path / "nope.gguf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"gguf-finetune inspect: file '{tmp_path / 'nope.gguf'}': file not found"]


def test_inspect_usage_errors(capsys):
    for argv, needle in ((["inspect"], "missing FILE"), (["inspect", "a", "b"], "unexpected argument 'b'"),
                         (["inspect", "--jsn", "a"], "did you mean --json")):
        code, out, err = run(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


# -- tokenize ----------------------------------------------------------------------------------------
def test_tokenize_matches_llamacpp(smollm2, testdata, tmp_path, capsys):
    """llama.cpp's ids for a text with special tokens (parse_special=true), read from a file, BOS added."""
    case = json.loads((testdata / "reference" / "smollm2-tokenizer-special.json").read_text())["cases"][0]
    text = tmp_path / "t.txt"
    text.write_text(case["text"], encoding="utf-8")
    code, out, err = run(["tokenize", "-m", str(smollm2), "-f", str(text), "--special", "--add-bos"], capsys)
    bos = 1  # SmolLM2's tokenizer.ggml.bos_token_id (as `inspect` shows)
    assert code == 0 and err == ""
    assert out == " ".join(map(str, [bos] + case["tokens"])) + "\n"


def test_tokenize_errors(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    for argv, code, needle in ((["tokenize"], 2, "-p TEXT or -f FNAME"),
                               (["tokenize", "-p", "a", "-f", "b"], 2, "one of them"),
                               (["tokenize", "-f", str(bad)], 1, "not valid UTF-8"),
                               (["tokenize", "-m", str(tmp_path / "no.gguf"), "-p", "x"], 1, "not found")):
        got, out, err = run(argv, capsys)
        assert got == code and len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3", "phi3"])
def test_inspect_shows_the_family_and_whether_it_trains(arch, testdata, capsys):
    info = inspect_json(testdata / "arch" / f"tiny-{arch}-q8_0.gguf", capsys)
    assert info["architecture"] == arch and info["trainable"] and info["why_not_trainable"] is None
    code, out, _ = run(["inspect", str(testdata / "arch" / f"tiny-{arch}-q8_0.gguf")], capsys)
    assert code == 0 and f"architecture:      {arch}\n" in out and "trainable here:    yes\n" in out


def test_inspect_says_what_a_family_lacks(tmp_path, testdata, capsys):
    data = (testdata / "arch" / "tiny-qwen3-q8_0.gguf").read_bytes()
    (tmp_path / "q.gguf").write_bytes(data.replace(b"blk.1.attn_q_norm.weight", b"blk.1.attn_x_norm.weight"))
    info = inspect_json(tmp_path / "q.gguf", capsys)
    assert not info["trainable"] and info["why_not_trainable"] == "missing tensor 'blk.1.attn_q_norm.weight'"
