"""Random llama-shaped GGUF models of any size and tensor type (tests, benchmarks).

The vocabulary is a small SentencePiece-style one (control tokens, 256 byte tokens, then
pieces from a fixed alphabet) so the file is a complete model that every command accepts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

from .gguf_io import atomic_path


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


def write_synthetic_model(path: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> str:
    """Write a random llama GGUF model to ``path`` (atomically) and return the path."""
    if spec.n_vocab < 262:
        raise ValueError("n_vocab must be at least 262 (control + byte tokens)")
    rng = np.random.default_rng(spec.seed)
    C, F, V = spec.n_embd, spec.n_ff, spec.n_vocab
    D = C // spec.n_head
    Ckv = D * spec.n_head_kv
    qt = GGMLQuantizationType[spec.qtype]
    tokens, scores, types = _vocab(V)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * spec.std).astype(np.float32)

    def add(w: GGUFWriter, name: str, arr: np.ndarray, qtype=None) -> None:
        qtype = qt if qtype is None else qtype
        if arr.ndim == 1 or qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(arr, qtype), raw_dtype=qtype)

    with atomic_path(path) as tmp:
        w = GGUFWriter(str(tmp), "llama")
        w.add_name("synthetic-llama")
        w.add_context_length(spec.n_ctx_train)
        w.add_embedding_length(C)
        w.add_feed_forward_length(F)
        w.add_block_count(spec.n_layer)
        w.add_head_count(spec.n_head)
        w.add_head_count_kv(spec.n_head_kv)
        w.add_rope_dimension_count(spec.n_rot or D)
        w.add_rope_freq_base(spec.rope_freq_base)
        w.add_layer_norm_rms_eps(spec.rms_eps)
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
        add(w, "token_embd.weight", mat(V, C))
        add(w, "output_norm.weight", (1.0 + 0.1 * rng.standard_normal(C)).astype(np.float32))
        if not spec.tied:
            add(w, "output.weight", mat(V, C))
        for i in range(spec.n_layer):
            p = f"blk.{i}."
            add(w, p + "attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(C)).astype(np.float32))
            add(w, p + "attn_q.weight", mat(C, C))
            add(w, p + "attn_k.weight", mat(Ckv, C))
            add(w, p + "attn_v.weight", mat(Ckv, C))
            add(w, p + "attn_output.weight", mat(C, C))
            add(w, p + "ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(C)).astype(np.float32))
            add(w, p + "ffn_gate.weight", mat(F, C))
            add(w, p + "ffn_up.weight", mat(F, C))
            add(w, p + "ffn_down.weight", mat(C, F))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return str(path)
