"""Hugging Face PEFT LoRA adapters (a folder with ``adapter_model.safetensors`` + ``adapter_config.json``).

Module names come from the table of architectures (arch.TARGETS and each family's renames: Phi-3's
fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``).  Names (llama; keys as PEFT saves them,
adapter name removed)::

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, n_in]
    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_B.weight   [n_out, r]
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
    base_model.model.lm_head.lora_{A,B}.weight                                  [r, n_embd] / [n_vocab, r]
    base_model.model.model.embed_tokens.lora_embedding_A                        [r, n_vocab]
    base_model.model.model.embed_tokens.lora_embedding_B                        [n_embd, r]

Linear: ΔW = s·B·A, so our a = Aᵀ, b = B.  Embedding: ΔE = s·(B·A)ᵀ, so our b = Aᵀ [n_vocab, r],
a = B [n_embd, r].  Scale s = alpha/r per module (``alpha_pattern``/``rank_pattern`` override
``lora_alpha``/``r``; ``use_rslora``: alpha/√r).  Norm adapters have no PEFT form: left out.

RoPE row order: for llama, convert_hf_to_gguf.py stores Q and K rows permuted (``permute``:
reshape(n_head, 2, head_dim/2, …).swapaxes(1, 2)), n_head for Q and n_head_kv for K (the NeoX
families keep HF's order: Arch.permute_qk).  The row permutation moves with B: writing PEFT
applies the inverse to B of attn_q/attn_k, reading applies the permutation.  Head counts and the
family come from the caller (``--base``), or from our own ``gguf_finetune.n_head``/``n_head_kv``/
``arch`` entries in the safetensors metadata.

Writing needs the ``safetensors`` package (imported lazily); reading parses the file directly
(F32, F16 and BF16 tensors), so it works without it.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ..arch import ARCHS, ATTN_K, ATTN_Q, TARGET_BY_TENSOR, split_name, target_kind, weight
from ..errors import UserError
from ..gguf_io import atomic_path
from ..lora import LoraParams, LoraSpec
from ..model import HParams
from .common import check_shapes, file_order, params_from_factors

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."

# HF module (relative to the causal LM) -> GGUF base name, over every family's names
_FROM_MODULE: dict[str, str] = {}
for _a in ARCHS.values():
    for _t in _a.targets():
        _m = _a.peft_module(_t)
        if _m is not None:
            _FROM_MODULE[_m if not _t.per_layer else "layer." + _m] = _t.tensor
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)$")


# -- RoPE row permutation ---------------------------------------------------------------------

def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order (convert_hf_to_gguf.py ``permute``): rows [n_head·D, …]."""
    rows = w.shape[0]
    _check_heads(rows, n_head)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF -> HF row order: the inverse of :func:`permute_rows`."""
    rows = w.shape[0]
    _check_heads(rows, n_head)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_heads(rows: int, n_head: int) -> None:
    if n_head <= 0 or rows % (2 * n_head):
        raise UserError(f"cannot apply the RoPE row permutation: {rows} rows are not {n_head} heads of even size")


def _heads_for(base: str, n_head: int | None, n_head_kv: int | None) -> int | None:
    return n_head if base == ATTN_Q else n_head_kv if base == ATTN_K else None


# -- names ------------------------------------------------------------------------------------

def hf_module(name: str, arch: str = "llama") -> str | None:
    """GGUF base tensor name -> the family's HF module name (None for norms and unknown tensors)."""
    il, base = split_name(name)
    t = TARGET_BY_TENSOR.get(base)
    spec = ARCHS[arch]
    if t is None or not spec.has_target(t) or t.per_layer != (il is not None):
        return None
    m = spec.peft_module(t)
    return m if m is None or il is None else f"model.layers.{il}.{m}"


def gguf_name(module: str) -> str | None:
    """HF module name -> GGUF base tensor name (None when no family has it as a LoRA target)."""
    if module in _FROM_MODULE:
        return weight(_FROM_MODULE[module])
    m = _LAYER_RE.match(module)
    if m and "layer." + m.group(2) in _FROM_MODULE:
        return weight(_FROM_MODULE["layer." + m.group(2)], int(m.group(1)))
    return None


def _pattern_key(module: str) -> str:
    """Key for rank_pattern/alpha_pattern that old (``.*\\.key$``) and new PEFT both match."""
    return module[len("model."):] if module.startswith("model.") else module


# -- writing ------------------------------------------------------------------------------------

def write_peft(folder: str | os.PathLike, lora: LoraParams, n_head: int | None = None, n_head_kv: int | None = None,
               base_model: str | None = None, arch: str = "llama") -> list:
    """Write ``lora`` as a PEFT adapter folder (each file atomically); returns the specs left out (norms).

    ``arch`` names the modules; ``n_head``/``n_head_kv`` are needed when attn_q/attn_k of a llama
    model are adapted (RoPE row order).
    """
    try:
        from safetensors.numpy import save_file  # optional: safetensors (the [peft] extra)
    except ImportError:
        raise UserError("writing a PEFT adapter needs the 'safetensors' package (pip install safetensors)") from None
    keep = [s for s in file_order(lora.layout.specs) if hf_module(s.name, arch) is not None]
    dropped = [s for s in lora.layout.specs if hf_module(s.name, arch) is None]
    if not keep:
        raise UserError(f"PEFT adapter '{folder}': nothing to write — no adapted tensor has a PEFT form "
                        f"({', '.join(s.name for s in dropped)})")
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for s in keep:
        module = hf_module(s.name, arch)
        a, b = lora.a[s.name], lora.b[s.name]  # [n_in, r], [n_out, r]
        _, base = split_name(s.name)
        heads = _heads_for(base, n_head, n_head_kv)
        if ARCHS[arch].permute_qk and base in (ATTN_Q, ATTN_K):
            if heads is None:
                raise UserError(f"converting '{s.name}' to PEFT needs the model's head counts: give --base MODEL")
            b = unpermute_rows(b, heads)
        key = PREFIX + module
        if s.kind == "embd":
            tensors[key + ".lora_embedding_A"] = np.ascontiguousarray(b.T, dtype=np.float32)  # [r, n_vocab]
            tensors[key + ".lora_embedding_B"] = np.ascontiguousarray(a, dtype=np.float32)  # [n_embd, r]
        else:
            tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.T, dtype=np.float32)  # [r, n_in]
            tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)  # [n_out, r]
        ranks[module] = s.rank
        alphas[module] = lora.scales[s.name] * s.rank  # PEFT's alpha/r reproduces our scale
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    alpha_out = int(alpha) if float(alpha).is_integer() else alpha
    config = {
        "alpha_pattern": {_pattern_key(m): v for m, v in alphas.items() if v != alpha},
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha_out,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {_pattern_key(m): v for m, v in ranks.items() if v != r},
        "revision": None,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    meta = {"format": "pt", "gguf_finetune.arch": arch}
    if n_head:
        meta["gguf_finetune.n_head"] = str(n_head)
    if n_head_kv:
        meta["gguf_finetune.n_head_kv"] = str(n_head_kv)
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise UserError(f"PEFT adapter '{out}': exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    with atomic_path(out / CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dropped


# -- reading ----------------------------------------------------------------------------------

def _folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        p = p.parent
    if not (p / WEIGHTS).is_file():
        raise UserError(f"PEFT adapter '{p}': no {WEIGHTS} in the folder")
    return p


def read_peft_config(path: str | os.PathLike) -> dict:
    p = _folder(path) / CONFIG
    if not p.is_file():
        raise UserError(f"PEFT adapter '{p.parent}': no {CONFIG} in the folder")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"PEFT adapter '{p}': cannot read the config ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"PEFT adapter '{p}': the config is not a JSON object")
    return cfg


_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> float32 array, metadata) from a safetensors file (F32/F16/BF16/F64)."""
    p = Path(path)
    buf = np.fromfile(p, dtype=np.uint8)

    def fail(why):
        raise UserError(f"PEFT adapter '{p}': corrupt safetensors file ({why})")

    if buf.size < 8:
        fail("too short")
    n = int(buf[:8].view("<u8")[0])
    if 8 + n > buf.size:
        fail("header runs past the end of the file")
    try:
        header = json.loads(buf[8:8 + n].tobytes())
    except ValueError:
        fail("header is not JSON")
    meta = header.pop("__metadata__", None) or {}
    data = buf[8 + n:]
    out = {}
    for name, info in header.items():
        dt = _ST_DTYPES.get(info.get("dtype"))
        if dt is None:
            raise UserError(f"PEFT adapter '{p}': tensor '{name}' has type {info.get('dtype')} (supported: F32, F16, BF16)")
        lo, hi = (int(x) for x in info["data_offsets"])
        shape = tuple(int(x) for x in info["shape"])
        if not 0 <= lo <= hi <= data.size or hi - lo != int(np.prod(shape)) * dt.itemsize:
            fail(f"bad data offsets for '{name}'")
        arr = data[lo:hi].view(dt).reshape(shape)
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.asarray(arr, dtype=np.float32)
    return out, meta


def _match_pattern(patterns: dict, module: str):
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return None


def read_peft(path: str | os.PathLike, hp: HParams | None = None, dtype=np.float32, unpermute: bool = True) -> LoraParams:
    """A PEFT LoRA adapter as a parameter set (GGUF names and row order).

    Head counts for the RoPE permutation: ``hp``, else the file's ``gguf_finetune.n_head*``
    metadata; without either, adapted q_proj/k_proj are refused (``unpermute=False`` skips the
    permutation, for inspecting shapes only).
    """
    folder = _folder(path)
    cfg = read_peft_config(folder)
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise UserError(f"PEFT adapter '{folder}': peft_type {ptype} is not supported (LORA only)")
    for key, bad, why in (("use_dora", True, "DoRA"), ("fan_in_fan_out", True, "fan_in_fan_out")):
        if cfg.get(key) == bad:
            raise UserError(f"PEFT adapter '{folder}': {why} adapters are not supported")
    if cfg.get("bias", "none") not in ("none", None):
        raise UserError(f"PEFT adapter '{folder}': LoRA biases (bias = {cfg.get('bias')!r}) are not supported")
    if cfg.get("modules_to_save"):
        raise UserError(f"PEFT adapter '{folder}': fully trained modules (modules_to_save = {cfg['modules_to_save']}) "
                        f"cannot be expressed as LoRA")
    tensors, meta = read_safetensors(folder / WEIGHTS)
    arch = hp.arch if hp is not None else meta.get("gguf_finetune.arch", "llama")
    permute = ARCHS[arch].permute_qk if arch in ARCHS else True
    n_head = hp.n_head if hp is not None else _int_or_none(meta.get("gguf_finetune.n_head"))
    n_head_kv = hp.n_head_kv if hp is not None else _int_or_none(meta.get("gguf_finetune.n_head_kv"))
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        k = key.replace(".default", "")
        k = k[len(PREFIX):] if k.startswith(PREFIX) else k
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                             (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB")):
            if k.endswith(suffix):
                module = k[: -len(suffix)]
                factors.setdefault(module, {})[part] = arr
                break
        else:
            raise UserError(f"PEFT adapter '{folder}': tensor '{key}' is not a LoRA factor")
    r0 = int(cfg.get("r", 8))
    alpha0 = float(cfg.get("lora_alpha", r0))
    rslora = bool(cfg.get("use_rslora", False))
    entries = []
    for module, parts in factors.items():
        name = gguf_name(module)
        if name is None:
            raise UserError(f"PEFT adapter '{folder}': module '{module}' has no GGUF counterpart in any supported family")
        if set(parts) == {"A", "B"}:
            a, b = parts["A"].T, parts["B"]  # [n_in, r], [n_out, r]
        elif set(parts) == {"eA", "eB"}:
            a, b = parts["eB"], parts["eA"].T  # [n_embd, r], [n_vocab, r]
        else:
            raise UserError(f"PEFT adapter '{folder}': module '{module}' is missing one LoRA factor")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise UserError(f"PEFT adapter '{folder}': module '{module}' has mismatched factor shapes")
        r = a.shape[1]
        alpha = _match_pattern(cfg.get("alpha_pattern") or {}, module)
        alpha = alpha0 if alpha is None else float(alpha)
        scale = alpha / np.sqrt(r) if rslora else alpha / r
        _, base = split_name(name)
        if unpermute and permute and base in (ATTN_Q, ATTN_K):
            heads = _heads_for(base, n_head, n_head_kv)
            if heads is None:
                raise UserError(f"PEFT adapter '{folder}': reading '{module}' needs the model's head counts: give --base MODEL")
            b = permute_rows(b, heads)
        kind = target_kind(name)
        entries.append((LoraSpec(name, kind, a.shape[0], b.shape[0], r), a, b, float(scale)))
    if not entries:
        raise UserError(f"PEFT adapter '{folder}': no LoRA tensors")
    order = {s.name: i for i, s in enumerate(file_order([e[0] for e in entries]))}
    entries.sort(key=lambda e: order[e[0].name])
    lora = params_from_factors(entries, dtype, alpha=alpha0 if not rslora else None)
    if hp is not None:
        check_shapes(lora, hp, str(folder))
    return lora


def _int_or_none(v) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None
