"""``gguf-finetune convert IN OUT [--to gguf|ggla|peft] [--base MODEL]``: adapters between formats.

Inputs (detected by content): our checkpoints, llama.cpp finetune checkpoints, legacy ``.bin``
(ggla), GGUF adapters, PEFT folders.  Outputs: a GGUF adapter (``gguf``, what today's llama.cpp
loads), a legacy ``.bin`` (``ggla``), a PEFT folder (``peft``).  Without ``--to`` the output kind
follows OUT: ``.gguf`` -> gguf, ``.bin`` -> ggla, anything else (a folder) -> peft.

The parameter set keeps its meaning: every tensor's effective scale survives the conversion
(folded into B where the target format cannot state it).  What a format cannot hold is left
out and reported in ``ConvertResult.warnings``: norm adapters (GGUF adapters, PEFT), and
token_embd/output adapters in a GGUF adapter for a model with tied embeddings (see
formats/adapter_gguf.py).  ``--base`` supplies what some conversions need: the head counts for
PEFT's RoPE row order, whether the embeddings are tied, and a shape check of the adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..gguf_io import GGUFFile, open_gguf
from ..model import HParams, read_hparams
from .adapter_gguf import dropped_message, write_adapter_gguf
from .ggla import write_ggla
from .load import detect_kind, read_any
from .peft import write_peft

TARGETS = ("gguf", "ggla", "peft")


@dataclass
class ConvertResult:
    kind_in: str
    kind_out: str
    n_tensors: int  # adapted tensors written
    n_params: int  # parameters written
    dropped: list[str] = field(default_factory=list)  # base tensor names left out
    warnings: list[str] = field(default_factory=list)  # one line each, for stderr


def output_kind(dst: str | os.PathLike, to: str | None) -> str:
    if to is not None:
        if to not in TARGETS:
            raise UserError(f"--to: unknown format '{to}' (choose from {', '.join(TARGETS)})")
        return to
    name = str(dst).lower()
    if name.endswith(".gguf"):
        return "gguf"
    if name.endswith(".bin"):
        return "ggla"
    return "peft"


def base_model_name(f: GGUFFile) -> str | None:
    """What PEFT's ``base_model_name_or_path`` should say, from a model's metadata."""
    for key in ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url",
                "general.name"):
        v = f.get(key, None)
        if isinstance(v, str) and v:
            return v.removeprefix("https://huggingface.co/")
    return None


def _source_meta(src: str | os.PathLike, kind: str) -> dict:
    """Architecture and head counts a source file records about its model (may be empty)."""
    if kind not in ("checkpoint", "gguf-adapter"):
        return {}
    f = GGUFFile(src, "adapter")
    arch = f.get_str("general.architecture", "llama")
    out = {"arch": arch}
    n_head = f.get(f"{arch}.attention.head_count", None) if kind == "checkpoint" else f.get("gguf_finetune.n_head", None)
    n_head_kv = (f.get(f"{arch}.attention.head_count_kv", n_head) if kind == "checkpoint"
                 else f.get("gguf_finetune.n_head_kv", None))
    if isinstance(n_head, int):
        out["n_head"] = n_head
    if isinstance(n_head_kv, int):
        out["n_head_kv"] = n_head_kv
    out["from_llamacpp"] = kind == "checkpoint" and not any(k.startswith("gguf_finetune.") for k in f.keys())
    return out


def run_convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None,
                base: str | os.PathLike | None = None, lora_type: str = "f32", lora_r: int | None = None,
                lora_alpha: int | None = None, base_model: str | None = None) -> ConvertResult:
    """Convert the adapter in ``src`` to ``dst`` (see the module docstring)."""
    kind_out = output_kind(dst, to)
    if Path(src).resolve() == Path(dst).resolve():
        raise UserError(f"convert: the output '{dst}' is the input file")
    kind_in = detect_kind(src)
    hp: HParams | None = None
    if base is not None:
        fb = open_gguf(base, "model")
        hp = read_hparams(fb)
        if base_model is None:
            base_model = base_model_name(fb)
    _, lora = read_any(src, hp, np.float32)
    meta = _source_meta(src, kind_in)
    res = ConvertResult(kind_in, kind_out, 0, 0)

    if kind_out == "gguf":
        if hp is not None:
            tied = hp.tied_embeddings
        elif kind_in == "ggla" or meta.get("from_llamacpp"):
            tied = False  # llama.cpp's finetune needed an output.weight: its adapters are for untied models
        elif any(s.name in ("token_embd.weight", "output.weight") for s in lora.layout.specs):
            raise UserError("convert: token_embd/output adapters can only go into a GGUF adapter when the model's "
                            "embeddings are untied (llama.cpp applies token_embd adapters to a tied head): "
                            "give --base MODEL")
        else:
            tied = False
        target = hp if hp is not None else meta.get("arch", "llama")
        dropped = write_adapter_gguf(dst, lora, target, lora_type=lora_type, tied_embeddings=tied)
        msg = dropped_message(dropped, tied)
    elif kind_out == "ggla":
        write_ggla(dst, lora, lora_r, lora_alpha)
        dropped, msg = [], None
    else:
        n_head = hp.n_head if hp is not None else meta.get("n_head")
        n_head_kv = hp.n_head_kv if hp is not None else meta.get("n_head_kv")
        arch = hp.arch if hp is not None else meta.get("arch", "llama")
        dropped = write_peft(dst, lora, n_head, n_head_kv, base_model=base_model, arch=arch)
        msg = (f"warning: the PEFT adapter leaves out {len(dropped)} tensors PEFT cannot adapt "
               f"({', '.join(s.name for s in dropped[:3])}{', …' if len(dropped) > 3 else ''})") if dropped else None
    kept = [s for s in lora.layout.specs if s not in dropped]
    res.n_tensors = len(kept)
    res.n_params = sum((s.n_in + s.n_out) * s.rank for s in kept)
    res.dropped = [s.name for s in dropped]
    if msg:
        res.warnings.append(msg)
    return res
