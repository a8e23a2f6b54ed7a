"""Random GGUF models of any family in arch.ARCHS, any size and tensor type (tests, benchmarks).

The tensors a block has come from the family's table (model.HParams.block_shapes), so every
family's graph options appear: biases, q/k norms, post norms, fused tensors.  The vocabulary is a
small SentencePiece-style one (control tokens, 256 byte tokens, then pieces from a fixed alphabet)
so the file is a complete model that every command accepts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

from .arch import ARCHS, OUTPUT, OUTPUT_NORM, TOKEN_EMBD, weight
from .gguf_io import atomic_path
from .model import HParams, block_tensor


@dataclass(frozen=True)
class SyntheticSpec:
    n_vocab: int = 512
    n_embd: int = 64
    n_ff: int = 160
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_rot: int | None = None  # default: head size
    n_ctx_train: int = 512
    tied: bool = False
    qtype: str = "F32"  # type of the 2-D weights (norms stay F32)
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0
    std: float = 0.1  # weight scale
    arch: str = "llama"
    head_dim: int | None = None  # attention.key_length/value_length (default n_embd / n_head, not written)
    sliding_window: int = 0  # attention.sliding_window (families whose table has sliding-window layers)
    swa_pattern: int | None = None  # attention.sliding_window_pattern (None: not written, the family's)
    softcap: float = 0.0  # final_logit_softcapping (0: not written)
    rope_factors: bool = False  # write a frequency-factor tensor (rope_freqs / rope_factors_short)


def _vocab(n_vocab: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    tokens = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    alphabet = "\u2581etaoinshrdlucmfwypvbgkqjxz"
    pieces: list[str] = list(alphabet)
    i = 0
    while len(tokens) + len(pieces) < n_vocab and i < len(pieces):
        for ch in alphabet:
            if len(tokens) + len(pieces) >= n_vocab:
                break
            pieces.append(pieces[i] + ch)
        i += 1
    for p in pieces[: max(0, n_vocab - len(tokens))]:
        tokens.append(p.encode())
        types.append(1)
    tokens = tokens[:n_vocab]
    types = types[:n_vocab]
    scores = np.array([0.0] * min(259, n_vocab) + [-float(i) for i in range(max(0, n_vocab - 259))], dtype=np.float32)
    return tokens, scores, np.array(types, dtype=np.int32)


def spec_hparams(spec: SyntheticSpec) -> HParams:
    """The hyper-parameters a model written from ``spec`` has."""
    return HParams(n_vocab=spec.n_vocab, n_ctx_train=spec.n_ctx_train, n_embd=spec.n_embd, n_ff=spec.n_ff,
                   n_layer=spec.n_layer, n_head=spec.n_head, n_head_kv=spec.n_head_kv,
                   n_rot=spec.n_rot or spec.head_dim or spec.n_embd // spec.n_head, arch=spec.arch,
                   head_dim=spec.head_dim or 0, tied_embeddings=spec.tied)


def write_synthetic_model(path: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> str:
    """Write a random model of ``spec.arch`` to ``path`` (atomically) and return the path."""
    if spec.n_vocab < 262:
        raise ValueError("n_vocab must be at least 262 (control + byte tokens)")
    if spec.arch not in ARCHS:
        raise ValueError(f"unknown architecture {spec.arch!r}")
    rng = np.random.default_rng(spec.seed)
    hp = spec_hparams(spec)
    C, V = spec.n_embd, spec.n_vocab
    qt = GGMLQuantizationType[spec.qtype]
    tokens, scores, types = _vocab(V)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * spec.std).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def add(w: GGUFWriter, name: str, arr: np.ndarray, qtype=None) -> None:
        qtype = qt if qtype is None else qtype
        if arr.ndim == 1 or qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(arr, qtype), raw_dtype=qtype)

    with atomic_path(path) as tmp:
        w = GGUFWriter(str(tmp), spec.arch)
        w.add_name(f"synthetic-{spec.arch}")
        w.add_context_length(spec.n_ctx_train)
        w.add_embedding_length(C)
        w.add_feed_forward_length(spec.n_ff)
        w.add_block_count(spec.n_layer)
        w.add_head_count(spec.n_head)
        w.add_head_count_kv(spec.n_head_kv)
        if spec.head_dim:
            w.add_key_length(spec.head_dim)
            w.add_value_length(spec.head_dim)
        w.add_rope_dimension_count(hp.n_rot)
        w.add_rope_freq_base(spec.rope_freq_base)
        w.add_layer_norm_rms_eps(spec.rms_eps)
        if spec.sliding_window:
            w.add_sliding_window(spec.sliding_window)
        if spec.swa_pattern is not None:
            w.add_uint32(f"{spec.arch}.attention.sliding_window_pattern", spec.swa_pattern)
        if spec.softcap:
            w.add_float32(f"{spec.arch}.final_logit_softcapping", spec.softcap)
        w.add_vocab_size(V)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores.tolist())
        w.add_token_types(types.tolist())
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        add(w, weight(TOKEN_EMBD), mat(V, C))
        add(w, weight(OUTPUT_NORM), norm(C))
        if not spec.tied:
            add(w, weight(OUTPUT), mat(V, C))
        for il in range(spec.n_layer):
            for name, shape in hp.block_shapes().items():
                if name.endswith(".bias"):
                    arr = (rng.standard_normal(shape) * spec.std).astype(np.float32)
                else:
                    arr = norm(shape[0]) if len(shape) == 1 else mat(*shape)
                add(w, block_tensor(name, il), arr)
        if spec.rope_factors:
            for name in ARCHS[spec.arch].rope_factors:
                add(w, weight(name), rng.uniform(1.0, 4.0, hp.n_rot // 2).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return str(path)
