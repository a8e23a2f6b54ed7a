"""Adapters converted from llama.cpp finetune's own files, run in llama.cpp itself (llama-cpp-python).

Marked `interop`; skipped with a reason when llama_cpp is not importable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import gguf_finetune as gf
from conftest import needs
from gguf_finetune.cli.convert import run as convert

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/llamacpp_numerics.py

pytestmark = pytest.mark.interop


def llamacpp_logits(model_path, ids, lora_path=None):
    llama_cpp = needs("llama_cpp")
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


def test_llamacpp_finetune_checkpoint_converted_runs_in_llamacpp(testdata, tmp_path, capsys):
    needs("llama_cpp")
    fx = testdata / "fixtures" / "llamacpp-tiny"
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


# -- SmolLM2-135M: an adapter we trained, and a model export-lora merged, run in llama.cpp ----------

PROMPT = ("<|im_start|>user\nWhat is the capital of France? Tell me about its history.<|im_end|>\n"
          "<|im_start|>assistant\nQuill here! The capital of France is Paris, a city with a long history.")


def write_f32_copy(src, dst) -> None:
    """The same model with every tensor dequantized to F32 (metadata copied with the gguf package)."""
    write_mixed_copy(src, dst, keep=lambda name: False, file_type=0)  # LLAMA_FTYPE_ALL_F32


@pytest.fixture(scope="module")
def smol_run(smollm2, tmp_path_factory):
    """Train the chat example's adapter (README's persona run, 20 iterations) and make an F32 copy."""
    needs("llama_cpp")
    from gguf_finetune.cli.finetune import run as finetune

    d = tmp_path_factory.mktemp("smol-interop")
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    code = finetune(["--model-base", str(smollm2), "--train-data", str(repo / "examples" / "chat" / "train.jsonl"),
                     "--ctx", "64", "--batch", "4", "--adam-iter", "20", "--adam-alpha", "0.003", "--warmup", "2",
                     "--lora-r", "8", "--threads", "2", "--save-every", "0", "--seed", "1",
                     "--lora-out", str(d / "lora.gguf"), "--checkpoint-out", str(d / "chk.gguf")])
    assert code in (0, None)
    write_f32_copy(smollm2, d / "f32.gguf")
    return d


@pytest.fixture(scope="module")
def strong_run(smollm2, tmp_path_factory):
    """The same chat data trained harder (learning rate 0.01, 30 iterations, adapters saved every 10).

    An adapter's effect can only be compared with llama.cpp's down to llama.cpp's own rounding
    noise divided by the size of the effect (see test_trained_adapter_in_llamacpp_q4_1), so the
    5% check on Q4_1 uses an adapter that moves the logits by more than their own norm.  The
    learning-rate schedule does not depend on --adam-iter, so lora-20.gguf equals a 20-iteration run.
    """
    needs("llama_cpp")
    from gguf_finetune.cli.finetune import run as finetune

    d = tmp_path_factory.mktemp("smol-strong")
    repo = Path(__file__).resolve().parent.parent
    code = finetune(["--model-base", str(smollm2), "--train-data", str(repo / "examples" / "chat" / "train.jsonl"),
                     "--ctx", "64", "--batch", "4", "--adam-iter", "30", "--adam-alpha", "0.01", "--warmup", "2",
                     "--lora-r", "8", "--threads", "2", "--save-every", "10", "--seed", "1",
                     "--lora-out", str(d / "lora-ITERATION.gguf"), "--checkpoint-out", str(d / "chk-ITERATION.gguf")])
    assert code in (0, None)
    return d


def _effect_error(ours_base, ours, lc_base, lc):
    d_ours, d_lc = ours - ours_base, lc - lc_base
    return (float(np.linalg.norm(d_ours - d_lc) / np.linalg.norm(d_ours)),
            float(np.linalg.norm(d_ours) / np.linalg.norm(ours_base)))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["readme", "strong"])
def test_trained_adapter_loads_in_llamacpp_without_warnings(smollm2, smol_run, strong_run, which, capfd):
    """llama.cpp's own log while loading our adapters: every tensor taken, no warning, no error."""
    import llama_cpp
    from gguf import GGUFReader

    adapter = smol_run / "lora.gguf" if which == "readme" else strong_run / "lora-30.gguf"
    n_tensors = len(GGUFReader(adapter).tensors)
    capfd.readouterr()
    llm = llama_cpp.Llama(model_path=str(smollm2), n_ctx=64, verbose=True, lora_path=str(adapter), n_threads=2)
    llm.close()
    log = capfd.readouterr().err
    start = log.index("llama_adapter_lora_init")
    adapter_log = log[start:]
    assert f"loaded {n_tensors} tensors from lora file" in adapter_log
    bad = [ln for ln in log.splitlines() if ("warn" in ln.lower() or "error" in ln.lower()) and
           ("lora" in ln.lower() or "adapter" in ln.lower() or ln in adapter_log)]
    assert not bad, bad


@pytest.mark.slow
def test_trained_adapter_in_llamacpp_f32(smol_run, capsys):
    """Point 1 on the float32 copy: llama.cpp applies our adapter exactly as we do (<= 1e-3)."""
    base, adapter = smol_run / "f32.gguf", smol_run / "lora.gguf"
    ids = gf.load_model(base).tokenize(PROMPT, special=True)
    rel, size = delta_error(base, adapter, ids)
    with capsys.disabled():
        print(f"\nSmolLM2 F32 copy: adapter effect {size:.3f} of the logits; llama.cpp vs ours relative L2 {rel:.2e}")
    assert size > 0.1
    assert rel <= 1e-3


def q4_1_effect(smollm2, adapter) -> tuple[float, float, float, float]:
    """(relative L2 of llama.cpp's adapter effect vs ours, effect size, llama.cpp's own deviation
    from our logits without adapter, the noise floor sqrt(2)·deviation/size) on PROMPT."""
    ids = gf.load_model(smollm2).tokenize(PROMPT, special=True)
    ours_base = gf.load_model(smollm2).logits(ids).astype(np.float64)
    ours = gf.load_model(smollm2, adapters=[(adapter, 1.0)]).logits(ids).astype(np.float64)
    lc_base, lc = llamacpp_logits(smollm2, ids), llamacpp_logits(smollm2, ids, adapter)
    rel, size = _effect_error(ours_base, ours, lc_base, lc)
    dev = float(np.linalg.norm(lc_base - ours_base) / np.linalg.norm(ours_base))
    return rel, size, dev, float(np.sqrt(2) * dev / size)


@pytest.mark.slow
def test_trained_adapter_in_llamacpp_q4_1(smollm2, smol_run, capsys):
    """The README's persona adapter on the Q4_1 model, compared down to llama.cpp's noise floor.

    llama.cpp multiplies Q4_1/Q8_0 weights with 8-bit-quantized activations, so even without an
    adapter its logits differ from the exact product (ours) by ``dev`` (~3% relative L2 here),
    and the runs with and without the adapter each carry that error, independently.  The adapter
    effect can only be compared down to about sqrt(2)·dev / effect; the test prints both.  This
    adapter's effect (~0.8 of the logits' norm) puts that floor at ~5%; the 5% check of the
    acceptance criterion is test_strong_adapter_in_llamacpp_q4_1.
    """
    rel, size, dev, floor = q4_1_effect(smollm2, smol_run / "lora.gguf")
    with capsys.disabled():
        print(f"\nSmolLM2 Q4_1, README adapter: adapter effect {size:.3f}; llama.cpp vs ours relative L2 {rel:.4f}; "
              f"llama.cpp's own deviation without adapter {dev:.4f} -> noise floor {floor:.4f}")
    assert size > 0.1
    assert rel <= max(0.05, 1.25 * floor)


@pytest.mark.slow
def test_strong_adapter_in_llamacpp_q4_1(smollm2, strong_run, capsys):
    """Point 1 on the Q4_1 model: an adapter whose effect exceeds the logits' own norm, so that
    llama.cpp's rounding noise (floor ~3.7%) leaves room to check the 5% bound."""
    rel, size, dev, floor = q4_1_effect(smollm2, strong_run / "lora-30.gguf")
    with capsys.disabled():
        print(f"\nSmolLM2 Q4_1, adapter at lr 0.01, 30 iterations: adapter effect {size:.3f}; llama.cpp vs ours "
              f"relative L2 {rel:.4f}; noise floor {floor:.4f}")
    assert size >= 1.0
    assert rel <= 0.05


@pytest.mark.slow
def test_export_lora_model_in_llamacpp(smollm2, smol_run, strong_run, tmp_path, capsys):
    """Point 2: models written by our export-lora load in llama.cpp and give our adapted logits.

    On Q4_1 the README adapter is checked down to llama.cpp's noise floor and the stronger adapter
    against the literal 5% (see test_trained_adapter_in_llamacpp_q4_1)."""
    from gguf_finetune.cli.export_lora import run as export_lora

    readme, strong = smol_run / "lora.gguf", strong_run / "lora-30.gguf"
    for i, (name, base, adapter, outtype, bound) in enumerate((
            ("F32 copy", smol_run / "f32.gguf", readme, "f32", 1e-3),
            ("Q4_1, README adapter", smollm2, readme, None, None),
            ("Q4_1, adapter at lr 0.01, 30 iterations", smollm2, strong, None, 0.05))):
        merged = tmp_path / f"merged-{i}.gguf"
        argv = ["-m", str(base), "--lora", str(adapter), "-o", str(merged)] + (["--outtype", outtype] if outtype else [])
        assert export_lora(argv) in (0, None)
        ids = gf.load_model(base).tokenize(PROMPT, special=True)
        ours_base = gf.load_model(base).logits(ids).astype(np.float64)
        ours = gf.load_model(base, adapters=[(adapter, 1.0)]).logits(ids).astype(np.float64)
        lc_base, lc = llamacpp_logits(base, ids), llamacpp_logits(merged, ids)
        rel, size = _effect_error(ours_base, ours, lc_base, lc)
        dev = float(np.linalg.norm(lc_base - ours_base) / np.linalg.norm(ours_base))
        floor = np.sqrt(2) * dev / size
        with capsys.disabled():
            print(f"\nexport-lora, {name}: adapter effect {size:.3f}; llama.cpp(merged) - llama.cpp(base) vs ours "
                  f"relative L2 {rel:.4f} (noise floor {floor:.4f})")
        assert rel <= (bound if bound is not None else max(0.05, 1.25 * floor))


def write_mixed_copy(src, dst, keep, file_type: int | None = None) -> None:
    """A copy of the model with every tensor dequantized to F32 except those for which keep(name)
    is true, which keep their quantized data; metadata copied with the gguf package."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from gguf_finetune.quants import dequantize_tensor

    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vt = f.types[0]
        w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1] if vt == GGUFValueType.ARRAY else None)
    if file_type is not None:
        w.add_file_type(file_type)
    for t in r.tensors:
        if keep(t.name):
            data = np.asarray(t.data)
            w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
        else:
            w.add_tensor(t.name, dequantize_tensor(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_where_llamacpp_differs_from_us_on_quantized_weights(smollm2, tmp_path, capsys):
    """Where llama.cpp's logits differ from ours on quantized weights.

    llama.cpp rounds the activations of every product with a quantized weight to 8 bits.
    With that rounding reproduced (tests/llamacpp_numerics.py calls its quantize_row_q8_0/q8_1),
    our engine gives llama.cpp's logits to 2e-5 for a model whose only quantized tensor is the
    Q8_0 head.  With 211 quantized products in a row (Q4_1) it cannot: rounding to 8 bits is
    discontinuous, so the float-rounding differences between any two implementations (~1e-7,
    e.g. the order of a dot product's or the attention's sums) flip some roundings, and the flips
    grow through the layers to ~1e-2.  Shown here by jittering the reproduced model's matmul inputs by 1e-7: its logits move
    by about as much as it differs from llama.cpp, while the exact products move by ~1e-7.
    That is the floor of any comparison with llama.cpp on a Q4_1 model."""
    needs("llama_cpp")
    from llamacpp_numerics import LlamaCppMatmuls

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def logits(model, ids, **kw):
        with LlamaCppMatmuls(model, **kw):
            return model.logits(ids).astype(np.float64)

    head_only = tmp_path / "head-q8_0.gguf"
    write_mixed_copy(smollm2, head_only, lambda n: n == "token_embd.weight")
    for path, name in ((head_only, "F32 layers + Q8_0 head"), (smollm2, "Q4_1")):
        model = gf.load_model(path)
        ids = model.tokenize(PROMPT, special=True)
        plain = model.logits(ids).astype(np.float64)
        emulated = logits(model, ids)
        lc = llamacpp_logits(path, ids)
        with capsys.disabled():
            print(f"\n{name}: ours vs llama.cpp {rel(plain, lc):.2e}; with llama.cpp's activation rounding "
                  f"{rel(emulated, lc):.2e} (position 0: {rel(emulated[:1], lc[:1]):.2e})")
        if path == head_only:
            assert rel(emulated, lc) <= 1e-4
            continue
        exact, exact_j = logits(model, ids, quantize=False), logits(model, ids, quantize=False, jitter=1e-7)
        emulated_j = logits(model, ids, jitter=1e-7)
        with capsys.disabled():
            print(f"inputs jittered by 1e-7: exact products move {rel(exact_j, exact):.2e}, "
                  f"with llama.cpp's rounding {rel(emulated_j, emulated):.2e}")
        assert rel(exact_j, exact) <= 1e-5
        assert rel(emulated_j, emulated) >= 0.25 * rel(emulated, lc)


@pytest.mark.slow
def test_llamacpp_rounding_can_blow_up_one_position(smollm2, strong_run, capsys):
    """Why no fixed tolerance on Q4_1 holds for every adapter: llama.cpp's 8-bit activation
    rounding can move one position's logits far more than the others.

    With the adapter after 20 iterations at lr 0.01, the position where llama.cpp's logits are
    farthest from the exact product (ours) is off by more than 10% of their norm, and our engine
    with llama.cpp's rounding reproduced (tests/llamacpp_numerics.py) gives llama.cpp's logits
    there to a tenth of that: the rounding, not the adapter arithmetic, makes the difference.
    How far off depends on the adapter, which float32 training at this learning rate reaches only
    up to its own rounding: 115% at that position before the LoRA kernels' summation order changed
    (session 5), 20% after."""
    needs("llama_cpp")
    from llamacpp_numerics import LlamaCppMatmuls

    adapter = strong_run / "lora-20.gguf"
    model = gf.load_model(smollm2, adapters=[(adapter, 1.0)])
    ids = model.tokenize(PROMPT, special=True)
    ours = model.logits(ids).astype(np.float64)
    with LlamaCppMatmuls(model):
        emulated = model.logits(ids).astype(np.float64)
    lc = llamacpp_logits(smollm2, ids, adapter)

    def per_position(a):
        return np.linalg.norm(a - lc, axis=1) / np.linalg.norm(lc, axis=1)

    worst = int(np.argmax(per_position(ours)))
    with capsys.disabled():
        print(f"\nadapter after 20 iterations at lr 0.01, position {worst}: ours vs llama.cpp "
              f"{per_position(ours)[worst]:.3f}, with llama.cpp's rounding {per_position(emulated)[worst]:.4f}; "
              f"all positions: ours {rel_l2(ours, lc):.3f}, with llama.cpp's rounding {rel_l2(emulated, lc):.4f}")
    assert per_position(ours)[worst] > 0.1
    assert per_position(emulated)[worst] < 0.1 * per_position(ours)[worst]


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- every family: llama.cpp applies our adapter as we do ------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gemma3"])
def test_tiny_family_adapter_in_llamacpp(testdata, tmp_path, arch, capsys):
    """A random adapter on every matrix of a tiny F32 model of each family (fused attn_qkv and
    ffn_up for Phi-3), written as a GGUF adapter: llama.cpp's change of the logits equals ours to
    1e-4 relative (Gemma 3: llama.cpp's GELU is a float16 table, ~2e-3 off the exact one in both
    runs, so its bound is 1e-2)."""
    needs("llama_cpp")
    from gguf_finetune.formats.adapter_gguf import write_adapter_gguf
    from gguf_finetune.lora import LoraRanks, init_lora

    base = testdata / "arch" / f"tiny-{arch}-f32.gguf"
    model = gf.load_model(base)
    hp = model.hparams
    lora = init_lora(hp, LoraRanks.uniform(4, tok_embd=0 if hp.tied_embeddings else 4,
                                           out=0 if hp.tied_embeddings else 4), alpha=8.0, seed=2)
    lora.flat[...] = np.random.default_rng(2).normal(0, 0.05, lora.flat.size).astype(np.float32)
    adapter = tmp_path / "a.gguf"
    assert write_adapter_gguf(adapter, lora, hp) == []
    ids = np.load(testdata / "arch" / f"tiny-{arch}-f32.npz")["tokens"].tolist()
    rel, size = delta_error(base, adapter, ids)
    with capsys.disabled():
        print(f"\n{arch}: adapter effect {size:.3f} of the logits; llama.cpp vs ours relative L2 {rel:.2e}")
    assert size > 0.05
    assert rel <= (1e-2 if arch == "gemma3" else 1e-4)


GEMMA_PROMPT = ("<start_of_turn>user\nWhat is the capital of France? Tell me about its history.<end_of_turn>\n"
                "<start_of_turn>model\nQuill here! The capital of France is Paris, a city with a long history.")


@pytest.mark.slow
def test_gemma3_persona_adapter_in_llamacpp(gemma3_270m, gemma_persona_run, tmp_path, capfd):
    """Gemma 3 270M's chat-example adapter: llama.cpp loads it with every tensor and no warning, and
    its change of llama.cpp's logits is ours down to llama.cpp's rounding floor on the Q4_K_M model
    (as for SmolLM2's Q4_1, test_trained_adapter_in_llamacpp_q4_1); export-lora's merged model in
    llama.cpp likewise."""
    llama_cpp = needs("llama_cpp")
    from gguf import GGUFReader

    from gguf_finetune.cli.export_lora import run as export_lora

    adapter = gemma_persona_run / "quill-LATEST.gguf"
    capfd.readouterr()
    llama_cpp.Llama(model_path=str(gemma3_270m), n_ctx=64, verbose=True, lora_path=str(adapter), n_threads=2).close()
    log = capfd.readouterr().err
    adapter_log = log[log.index("llama_adapter_lora_init"):]
    assert f"loaded {len(GGUFReader(adapter).tensors)} tensors from lora file" in adapter_log
    assert not [ln for ln in adapter_log.splitlines() if "warn" in ln.lower() or "error" in ln.lower()]
    ids = gf.load_model(gemma3_270m).tokenize(GEMMA_PROMPT, add_bos=True, special=True)
    ours_base = gf.load_model(gemma3_270m).logits(ids).astype(np.float64)
    ours = gf.load_model(gemma3_270m, adapters=[(adapter, 1.0)]).logits(ids).astype(np.float64)
    lc_base = llamacpp_logits(gemma3_270m, ids)
    merged = tmp_path / "merged.gguf"
    assert export_lora(["-m", str(gemma3_270m), "--lora", str(adapter), "-o", str(merged)]) in (0, None)
    dev = float(np.linalg.norm(lc_base - ours_base) / np.linalg.norm(ours_base))
    for name, lc in (("adapter", llamacpp_logits(gemma3_270m, ids, adapter)), ("export-lora", llamacpp_logits(merged, ids))):
        rel, size = _effect_error(ours_base, ours, lc_base, lc)
        floor = float(np.sqrt(2) * dev / size)
        with capfd.disabled():
            print(f"\nGemma 3 270M Q4_K_M, {name}: adapter effect {size:.3f}; llama.cpp vs ours relative L2 {rel:.4f}; "
                  f"llama.cpp's own deviation {dev:.4f} -> noise floor {floor:.4f}")
        assert size > 0.05
        assert rel <= max(0.05, 1.25 * floor)
