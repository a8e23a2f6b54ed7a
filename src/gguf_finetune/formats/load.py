"""Load any adapter-bearing file by its content, and describe it.

Kinds (``detect_kind``): ``gguf-adapter`` (today's llama.cpp LoRA GGUF), ``checkpoint`` (a
training checkpoint, ours or llama.cpp finetune's), ``ggla`` (llama.cpp finetune's legacy
``.bin``), ``peft`` (a Hugging Face PEFT folder, or its ``adapter_model.safetensors``).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..arch import split_name
from ..errors import UserError
from ..gguf_io import GGUFFile, check_readable_file
from ..lora import LoraParams, merge_for_inference
from ..model import HParams
from .adapter_gguf import read_adapter_gguf
from .checkpoint import read_checkpoint
from .common import GGLA_MAGIC, check_shapes
from .ggla import read_ggla, read_ggla_header
from .peft import read_peft, read_peft_config

# -- detection and loading -------------------------------------------------------------------

def _peft_dir(path: Path) -> Path | None:
    if path.is_dir():
        return path if (path / "adapter_model.safetensors").is_file() else None
    if path.name.endswith(".safetensors") or path.name == "adapter_config.json":
        return path.parent
    return None


def detect_kind(path: str | os.PathLike) -> str:
    """'gguf-adapter' | 'checkpoint' | 'ggla' | 'peft' by content, not by file name."""
    p = Path(path)
    if p.is_dir():
        if _peft_dir(p) is None:
            raise UserError(f"adapter '{p}': a folder without adapter_model.safetensors (not a PEFT adapter)")
        return "peft"
    p = check_readable_file(p, "adapter")
    with open(p, "rb") as fh:
        magic = fh.read(8)
    if magic[:4] == b"GGUF":
        f = GGUFFile(p, "adapter")
        if f.has("training.type"):
            return "checkpoint"
        if f.get_str("general.type", "") == "adapter":
            return "gguf-adapter"
        raise UserError(f"adapter '{p}': a GGUF file that is neither a LoRA adapter nor a training checkpoint")
    if magic[:4] == GGLA_MAGIC:
        return "ggla"
    if p.name.endswith(".safetensors") or p.name == "adapter_config.json":
        return "peft"
    raise UserError(f"adapter '{p}': not a GGUF adapter, checkpoint, llama.cpp .bin adapter or PEFT adapter "
                    f"(magic {magic[:4]!r})")


def read_any(path: str | os.PathLike, hp: HParams | None = None, dtype=np.float32) -> tuple[str, LoraParams]:
    """(kind, parameter set) of any adapter file; checked against ``hp`` when given."""
    kind = detect_kind(path)
    if kind == "checkpoint":
        p = read_checkpoint(path, hp, dtype).lora
    elif kind == "gguf-adapter":
        f = GGUFFile(path, "adapter")
        arch = f.get_str("general.architecture", "")
        if hp is not None and arch != hp.arch:
            raise UserError(f"adapter '{path}': made for architecture '{arch}', the model is '{hp.arch}'")
        p = read_adapter_gguf(f, dtype)
    elif kind == "ggla":
        p = read_ggla(path, None, dtype)
    else:
        p = read_peft(path, hp, dtype)
    if hp is not None:
        check_shapes(p, hp, str(path))
    return kind, p


def load_adapter(path: str | os.PathLike, hp: HParams, dtype=np.float32) -> LoraParams:
    """One adapter file as a parameter set checked against the model ``hp``."""
    return read_any(path, hp, dtype)[1]


def load_adapters(adapters: Sequence[tuple[str | os.PathLike, float]], hp: HParams, dtype=np.float32) -> LoraParams:
    """Several (path, user scale) adapters merged into one parameter set for inference."""
    loaded = [(load_adapter(path, hp, dtype), float(scale)) for path, scale in adapters]
    return merge_for_inference(loaded)


# -- inspect ---------------------------------------------------------------------------------

def describe_adapter(path: str | os.PathLike) -> dict:
    """What an adapter file holds, for ``gguf-finetune inspect``.

    Keys: ``path``, ``type`` (kind), ``origin`` ('gguf-finetune' | 'llama.cpp' | 'peft'),
    ``architecture`` (None when the format does not record it), ``alpha`` (None when the scale
    is not one alpha), ``scale_mode`` ('alpha/r' | 'one' | 'per-tensor'), ``ranks`` (target ->
    sorted distinct ranks), ``n_tensors`` (adapted base tensors), ``n_layers`` (blocks touched),
    ``n_params``, ``norm_adapters`` (bool), ``dtype`` (storage types), plus per-format extras
    (``lora_r`` for .bin, ``iteration`` for checkpoints, ``base_model`` for PEFT).
    """
    kind = detect_kind(path)
    info: dict = {"path": str(path), "type": kind}
    if kind == "gguf-adapter":
        f = GGUFFile(path, "adapter")
        p = read_adapter_gguf(f)
        info["origin"] = "gguf-finetune" if any(k.startswith("gguf_finetune.") for k in f.keys()) else "llama.cpp"
        info["architecture"] = f.get_str("general.architecture", None)
        info["dtype"] = sorted({f.tensor_type(n).name for n in f.tensors})
        info["alpha_key"] = f.get_float("adapter.lora.alpha", None)
    elif kind == "checkpoint":
        c = read_checkpoint(path)
        p = c.lora
        f = GGUFFile(path, "checkpoint")
        info["origin"] = "llama.cpp" if c.from_llamacpp else "gguf-finetune"
        info["architecture"] = f.get_str("general.architecture", None)
        info["dtype"] = ["F32"]
        info["iteration"] = c.train.iteration
    elif kind == "ggla":
        p = read_ggla(path)
        r, alpha, types = read_ggla_header(path)
        info.update(origin="llama.cpp", architecture=None, lora_r=r, lora_alpha=alpha, dtype=types)
    else:
        p = read_peft(path, None, unpermute=False)
        cfg = read_peft_config(path)
        info.update(origin="peft", architecture=None, base_model=cfg.get("base_model_name_or_path"),
                    dtype=["safetensors"])
    ranks: dict[str, set] = {}
    layers = set()
    for s in p.layout.specs:
        il, base = split_name(s.name)
        ranks.setdefault(base, set()).add(s.rank)
        if il is not None:
            layers.add(il)
    alphas = {round(p.scales[s.name] * s.rank, 9) for s in p.layout.specs}
    if p.scale_one and not all(p.scales[s.name] == p.alpha / s.rank for s in p.layout.specs):
        mode, alpha = "one", None
    elif len(alphas) == 1:
        mode, alpha = "alpha/r", alphas.pop()
    else:
        mode, alpha = "per-tensor", None
    info.update(
        alpha=alpha, scale_mode=mode,
        ranks={k: sorted(v) for k, v in ranks.items()},
        n_tensors=len(p.layout.specs), n_layers=len(layers), n_params=int(p.n_params()),
        norm_adapters=any(s.kind == "norm" for s in p.layout.specs),
    )
    info["rank_counts"] = dict(Counter(s.rank for s in p.layout.specs))
    return info
