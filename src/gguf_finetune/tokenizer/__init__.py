"""Tokenizers built from GGUF metadata alone, token-for-token equal to llama.cpp's.

    tok = load_tokenizer("model.gguf")          # or a GGUFFile; vocab-only files work
    ids = tok.encode(text, add_special=True, parse_special=False)   # = llama_tokenize
    tok.tokenize(text, add_bos=True)            # BOS/EOS only when asked
    tok.tokenize_bytes(raw)                     # bytes that need not be valid UTF-8
    tok.detokenize(ids)                         # = llama_detokenize(remove_special=False)
    tok.detokenize_bytes(ids)                   # the same, undecoded

Supported: ``tokenizer.ggml.model`` 'llama' (SentencePiece, :mod:`.spm`) and 'gpt2' (byte-level
BPE with llama.cpp's pre-tokenizers, :mod:`.bpe`, :mod:`.pretokenizers`).  Checked against llama.cpp
(llama-cpp-python 0.3.36): Llama's SPM, Gemma 3's SPM (262k tokens, byte fallback, user-defined
tokens), SmolLM2's BPE, Qwen2/2.5/3's 'qwen2' and Qwen3.5's 'qwen35' pre-tokenizers.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .base import Tokenizer
from .bpe import BPETokenizer
from .gguf_meta import GGUFMeta, open_meta
from .pretokenizers import PRE_TOKENIZERS
from .spm import SPMTokenizer
from .vocab import Vocab, load_vocab

__all__ = ["load_tokenizer", "Tokenizer", "SPMTokenizer", "BPETokenizer", "Vocab", "PRE_TOKENIZERS",
           "GGUFMeta"]


def load_tokenizer(src: Any, what: str = "model") -> Tokenizer:
    """The tokenizer of a GGUF file (path) or of an opened :class:`~gguf_finetune.gguf_io.GGUFFile`.

    Raises :class:`UserError` when the file has no usable vocabulary.  A path is read with a
    metadata-only reader (fast; tensors are not indexed).
    """
    meta = open_meta(src, what)
    where = f"{what} '{getattr(meta, 'path', src)}'"
    vocab = load_vocab(meta, where)
    if vocab.kind == "spm":
        return SPMTokenizer(vocab)
    if vocab.kind == "bpe":
        return BPETokenizer(vocab)
    raise UserError(f"{where}: unsupported tokenizer kind '{vocab.kind}'")  # pragma: no cover
