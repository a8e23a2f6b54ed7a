"""The user-facing model: a GGUF model with its tokenizer and adapters, ready for inference.

``load_model`` assembles what the layers below provide — hyper-parameters and memory-mapped
weights (model), the tokenizer, the inference forward pass (engine) and adapter files (formats) —
as mlx-lm's ``utils.load`` sits above its ``models/`` and ``tuner/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .engine.forward import forward_logits
from .errors import UserError
from .formats.load import load_adapters
from .gguf_io import GGUFFile, open_gguf
from .model import HParamOverrides, HParams, Weights, check_tensors, read_hparams
from .tokenizer import load_tokenizer


class Model:
    """A loaded model: ``hparams``, ``weights``, ``tokenizer``; ``logits(ids)`` runs the forward pass."""

    def __init__(self, path: str | os.PathLike, f: GGUFFile, hp: HParams, weights: Weights, tokenizer):
        self.path = Path(path)
        self.gguf = f
        self.hparams = hp
        self.weights = weights
        self.tokenizer = tokenizer
        self.lora = None  # lora.LoraParams applied at inference (adapters=...)

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.detokenize(ids)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position: [len(ids)] -> [len(ids), n_vocab] float32."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise UserError("logits: expected a non-empty 1-D sequence of token ids")
        if ids.min() < 0 or ids.max() >= self.hparams.n_vocab:
            raise UserError(f"logits: token id out of range [0, {self.hparams.n_vocab})")
        return forward_logits(self.weights, self.hparams, ids[None, :], self.lora)[0]


def load_model(
    path: str | os.PathLike,
    adapters: Sequence[tuple[str | os.PathLike, float]] = (),
    overrides: HParamOverrides | None = None,
    memory_budget: int | None = None,
    dtype=np.float32,
    with_tokenizer: bool = True,
    cache_head: bool | None = None,
) -> Model:
    """Open a GGUF model memory-mapped, check its tensors, build its tokenizer, apply adapters."""
    f = open_gguf(path, "model")
    hp = read_hparams(f, overrides)
    check_tensors(f, hp)
    tok = None
    if with_tokenizer:
        tok = load_tokenizer(f)
        if tok.n_vocab != hp.n_vocab:  # llama.cpp refuses such a model too (token_embd has the wrong shape)
            raise UserError(f"model '{f.path}': the vocabulary has {tok.n_vocab} tokens, but 'token_embd.weight' "
                            f"has {hp.n_vocab} rows")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.merges"):
            f.drop_field(key)  # the tokenizer holds its own copy; the parsed fields cost tens of MB
    weights = Weights(f, hp, budget=memory_budget, dtype=dtype, cache_head=cache_head)
    model = Model(path, f, hp, weights, tok)
    if adapters:
        model.lora = load_adapters(adapters, hp, dtype=dtype)
    return model
