"""``gguf-finetune inspect FILE [--json]``: what a GGUF model, adapter or checkpoint is.

Everything comes from metadata and tensor headers (gguf_io); no tensor data is read or
dequantized.  :func:`describe` returns one JSON-ready dict; the text output is rendered from it.
Legacy llama.cpp LoRA adapters (``ggla`` .bin files, what llama.cpp's finetune wrote) are
described from their tensor headers.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from ..arch import SUPPORTED
from ..errors import UserError
from ..gguf_io import GGUFFile, check_readable_file, open_gguf
from .parser import Group, Parser, Positional, flag

WHAT = "file"
GGLA_MAGIC = b"algg"  # 0x67676c61 'ggla' written little-endian


@dataclass(frozen=True)
class InspectArgs:
    file: str = ""
    json: bool = False


def inspect_parser(prog: str) -> Parser:
    return Parser(
        prog, "Describe a GGUF model, LoRA adapter or training checkpoint (or a legacy llama.cpp .bin "
              "adapter) from its metadata, without loading its weights.",
        (Group("options", (flag("--json", "json", "print one JSON object instead of text"),)),),
        InspectArgs(), positionals=(Positional("FILE", "file", "the file to describe"),))


def run(argv: list[str], prog: str = "gguf-finetune inspect") -> int:
    args = inspect_parser(prog).parse(argv)
    info = describe(args.file)
    if args.json:
        sys.stdout.write(json.dumps(info, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(render(info))
    return 0


# ------------------------------------------------------------------------------------------------
# describe: file -> dict
# ------------------------------------------------------------------------------------------------
def describe(path: str | os.PathLike) -> dict[str, Any]:
    p = check_readable_file(path, WHAT)
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == GGLA_MAGIC:
        return _describe_ggla(p)
    f = open_gguf(p, WHAT)
    if f.has("training.type"):
        return _describe_checkpoint(f)
    if f.get_str("general.type", "") == "adapter":
        return _describe_adapter(f)
    return _describe_model(f)


def _common(f: GGUFFile, kind: str) -> dict[str, Any]:
    return {
        "path": str(f.path),
        "kind": kind,
        "file_size": f.path.stat().st_size,
        "architecture": f.get_str("general.architecture", None),
        "name": f.get_str("general.name", None),
        "n_tensors": len(f.tensors),
    }


def _scalar(f: GGUFFile, key: str, default: Any = None) -> Any:
    """A small metadata value (number, string, bool, or short list); default if missing."""
    if not f.has(key):
        return default
    v = f.get(key)
    return v if not isinstance(v, list) or len(v) <= 64 else default


def _tensor_types(f: GGUFFile, names) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for n in names:
        t = int(f.tensors[n].tensor_type)
        try:
            counts[GGMLQuantizationType(t).name.lower()] += 1
        except ValueError:
            counts[f"type {t}"] += 1
    return dict(counts.most_common())


def _unsupported_types(f: GGUFFile) -> list[str]:
    """Tensor types in the file that the engine cannot compute with (names as in tensor_types)."""
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..quants import SUPPORTED

    out = set()
    for t in f.tensors.values():
        raw = int(t.tensor_type)
        try:
            qt = GGMLQuantizationType(raw)
        except ValueError:
            out.add(f"type {raw}")
            continue
        if qt not in SUPPORTED:
            out.add(qt.name.lower())
    return sorted(out)


def _n_elements(f: GGUFFile, names) -> int:
    return sum(int(f.tensors[n].n_elements) for n in names)


def _hparams(f: GGUFFile, arch: str, checkpoint: bool) -> dict[str, Any]:
    """Model hyper-parameters; a checkpoint stores the training context (and no vocabulary)."""
    a = arch + "."
    n_embd = _scalar(f, a + "embedding_length")
    n_head = _scalar(f, a + "attention.head_count")
    hp: dict[str, Any] = {}
    if not checkpoint:
        hp["n_vocab"] = _n_vocab(f, arch)
    hp.update({
        ("n_ctx" if checkpoint else "n_ctx_train"): _scalar(f, a + "context_length"),
        "n_embd": n_embd,
        "n_ff": _scalar(f, a + "feed_forward_length"),
        "n_layer": _scalar(f, a + "block_count"),
        "n_head": n_head,
        "n_head_kv": _scalar(f, a + "attention.head_count_kv", n_head),
    })
    n_rot = _scalar(f, a + "rope.dimension_count", _scalar(f, a + "attention.key_length"))
    if n_rot is None and isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0:
        n_rot = n_embd // n_head
    hp["n_rot"] = n_rot
    for key, name in (("attention.key_length", "head_dim"), ("attention.sliding_window", "sliding_window"),
                      ("final_logit_softcapping", "final_logit_softcapping")):
        v = _scalar(f, a + key)
        if v is not None:
            hp[name] = v
    hp["rope_freq_base"] = _scalar(f, a + "rope.freq_base", 10000.0)
    factor = _scalar(f, a + "rope.scaling.factor") or _scalar(f, a + "rope.scale_linear")
    hp["rope_freq_scale"] = 1.0 / factor if isinstance(factor, (int, float)) and factor > 0 else 1.0
    scaling = _scalar(f, a + "rope.scaling.type")
    if scaling not in (None, "none"):
        hp["rope_scaling_type"] = scaling
    hp["rms_eps"] = _scalar(f, a + "attention.layer_norm_rms_epsilon")
    return hp


def _n_vocab(f: GGUFFile, arch: str) -> int | None:
    v = _scalar(f, arch + ".vocab_size")
    if isinstance(v, int):
        return v
    if f.has("tokenizer.ggml.tokens"):
        return len(f.get_string_array_bytes("tokenizer.ggml.tokens"))
    if "token_embd.weight" in f.tensors:
        return f.tensor_shape("token_embd.weight")[0]
    return None


def _why_not_trainable(f: GGUFFile, arch: str, unsupported_types: list[str]) -> str | None:
    """None when finetune can train this model, else the reason in a few words: a family that is not
    in the table, or what the family needs that the file lacks (headers only; nothing is read)."""
    if arch not in SUPPORTED:
        return f"the architecture '{arch or '?'}' is not supported (supported: {', '.join(SUPPORTED)})"
    if unsupported_types:
        return f"tensor types {', '.join(unsupported_types)} are not supported"
    from ..model import check_tensors, read_hparams  # lazy: model loads numba, not needed for the rest

    try:
        check_tensors(f, read_hparams(f))
    except UserError as e:
        return str(e).split("': ", 1)[-1]
    return None


def _describe_model(f: GGUFFile) -> dict[str, Any]:
    info = _common(f, "model")
    arch = info["architecture"] or ""
    info["unsupported_tensor_types"] = _unsupported_types(f)
    info["why_not_trainable"] = _why_not_trainable(f, arch, info["unsupported_tensor_types"])
    info["trainable"] = info["why_not_trainable"] is None
    info["parameters"] = _n_elements(f, f.tensors)
    info["hparams"] = _hparams(f, arch, checkpoint=False)
    info["tied_embeddings"] = "token_embd.weight" in f.tensors and "output.weight" not in f.tensors
    info["file_type"] = _scalar(f, "general.file_type")
    info["tensor_types"] = _tensor_types(f, f.tensors)
    tok = None
    if f.has("tokenizer.ggml.model"):
        tok = {
            "model": f.get_str("tokenizer.ggml.model"),
            "pre": _scalar(f, "tokenizer.ggml.pre"),
            "n_tokens": len(f.get_string_array_bytes("tokenizer.ggml.tokens", [])),
            "bos_id": _scalar(f, "tokenizer.ggml.bos_token_id"),
            "eos_id": _scalar(f, "tokenizer.ggml.eos_token_id"),
            "add_bos": _scalar(f, "tokenizer.ggml.add_bos_token"),
        }
    info["tokenizer"] = tok
    template = _scalar(f, "tokenizer.chat_template")
    info["chat_template"] = isinstance(template, str) and bool(template)
    return info


def _target_of(base: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q'; 'token_embd.weight' -> 'token_embd'."""
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        parts = parts[2:]
    if parts[-1] == "weight":
        parts = parts[:-1]
    return ".".join(parts)


def _rank_summary(ranks_by_target: dict[str, set[int]]) -> dict[str, Any]:
    """{target: rank} or {target: [ranks...]} when layers differ."""
    return {k: (next(iter(v)) if len(v) == 1 else sorted(v)) for k, v in ranks_by_target.items()}


def _describe_adapter(f: GGUFFile) -> dict[str, Any]:
    info = _common(f, "adapter")
    info["adapter_type"] = _scalar(f, "adapter.type")
    info["alpha"] = _scalar(f, "adapter.lora.alpha")
    lora = [n for n in f.tensors if n.endswith((".lora_a", ".lora_b"))]
    ranks: dict[str, set[int]] = {}
    layers = set()
    for n in lora:
        if n.endswith(".lora_b"):
            base = n[: -len(".lora_b")]
            shape = f.tensor_shape(n)  # numpy [n_out, r] (token_embd: [n_embd, r])
            ranks.setdefault(_target_of(base), set()).add(int(shape[-1]) if shape else 0)
            if base.startswith("blk."):
                layers.add(base.split(".")[1])
    info["ranks"] = _rank_summary(ranks)
    info["n_adapted_tensors"] = sum(1 for n in lora if n.endswith(".lora_b"))
    info["n_layers_adapted"] = len(layers)
    info["parameters"] = _n_elements(f, lora)
    info["iteration"] = _scalar(f, "training.iteration_count")
    info["tensor_types"] = _tensor_types(f, f.tensors)
    return info


def _describe_checkpoint(f: GGUFFile) -> dict[str, Any]:
    info = _common(f, "checkpoint")
    info["training_type"] = f.get_str("training.type")
    ours = any(k.startswith("gguf_finetune.") for k in f.keys())
    info["made_by"] = "gguf-finetune" if ours else "llama.cpp finetune"
    arch = info["architecture"] or "llama"
    info["hparams"] = _hparams(f, arch, checkpoint=True)
    info["iteration"] = _scalar(f, "training.iteration_count")
    info["samples"] = _scalar(f, "training.sample_count")
    info["tokens"] = _scalar(f, "training.token_count")
    info["epochs"] = _scalar(f, "training.epoch_count")
    info["optimizer"] = {
        "type": _scalar(f, "optimizer.type"),
        "iteration": _scalar(f, "optimizer.iteration_count"),
        "best_loss": _scalar(f, "optimizer.adam.best_loss"),
        "previous_loss": _scalar(f, "optimizer.adam.previous_loss"),
    }
    prefix = "training.lora.rank."
    info["ranks"] = {k[len(prefix):]: f.get(k) for k in f.keys() if k.startswith(prefix)}
    # llama.cpp's finetune trained at scale 1 whatever --lora-alpha said, and did not store alpha
    info["alpha"] = _scalar(f, "gguf_finetune.lora_alpha")
    info["scale_one"] = bool(_scalar(f, "gguf_finetune.scale_one", not ours))
    lora = [n for n in f.tensors if n.endswith((".lora_a", ".lora_b"))]
    info["n_adapted_tensors"] = sum(1 for n in lora if n.endswith(".lora_b"))
    info["parameters"] = _n_elements(f, lora)
    info["tensor_types"] = _tensor_types(f, f.tensors)
    return info


def _describe_ggla(p: Path) -> dict[str, Any]:
    """Legacy llama.cpp adapter: u32 magic, version, r, alpha; then per tensor: u32 n_dims, name_len,
    type, ne[n_dims], name, padding to 32 bytes, data (f32 or f16).  Rank = ne[0] of each factor."""
    size = p.stat().st_size
    ranks: dict[str, set[int]] = {}
    types: Counter[str] = Counter()
    n_params = n_tensors = 0
    elsize = {0: ("f32", 4), 1: ("f16", 2)}
    with open(p, "rb") as fh:
        head = fh.read(16)
        if len(head) < 16:
            raise UserError(f"{WHAT} '{p}': truncated legacy adapter header")
        _, version, r, alpha = struct.unpack("<4I", head)
        off = 16
        while off < size:
            fh.seek(off)
            hdr = fh.read(12)
            if len(hdr) < 12:
                raise UserError(f"{WHAT} '{p}': truncated tensor header at offset {off}")
            n_dims, name_len, ttype = struct.unpack("<3I", hdr)
            if not 1 <= n_dims <= 4 or not 0 < name_len <= 256 or ttype not in elsize:
                raise UserError(f"{WHAT} '{p}': corrupt tensor header at offset {off}")
            ne = struct.unpack(f"<{n_dims}I", fh.read(4 * n_dims))
            name = fh.read(name_len).decode("utf-8", "replace")
            off += 12 + 4 * n_dims + name_len
            off += (-off) & 31
            count = 1
            for d in ne:
                count *= d
            off += count * elsize[ttype][1]
            if off > size:
                raise UserError(f"{WHAT} '{p}': truncated: tensor '{name}' runs past the end of the file")
            n_tensors += 1
            n_params += count
            types[elsize[ttype][0]] += 1
            if name.endswith(".loraB"):
                ranks.setdefault(_target_of(name[: -len(".loraB")]), set()).add(int(ne[0]))
    return {
        "path": str(p), "kind": "ggla-adapter", "file_size": size, "architecture": None, "name": None,
        "n_tensors": n_tensors, "version": version, "lora_r": r, "alpha": alpha,
        "ranks": _rank_summary(ranks), "n_adapted_tensors": n_tensors // 2, "parameters": n_params,
        "tensor_types": dict(types.most_common()),
    }


# ------------------------------------------------------------------------------------------------
# render: dict -> text
# ------------------------------------------------------------------------------------------------
KIND_TEXT = {
    "model": "model",
    "adapter": "LoRA adapter (GGUF)",
    "checkpoint": "training checkpoint",
    "ggla-adapter": "LoRA adapter (legacy llama.cpp .bin, 'ggla')",
}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix} ({n:,})"
    return str(n)


def _num(v: Any) -> str:
    if v is None:
        return "?"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _ranks_text(ranks: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v if not isinstance(v, list) else '/'.join(map(str, v))}" for k, v in ranks.items())


def render(info: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("file", f"{info['path']} ({_size(info['file_size'])})"),
        ("kind", KIND_TEXT.get(info["kind"], info["kind"])),
    ]
    if info.get("architecture") is not None:
        rows.append(("architecture", info["architecture"]))
    if info["kind"] == "model":
        why = info.get("why_not_trainable")
        rows.append(("trainable here", "yes" if why is None else f"no: {why}"))
    if info.get("name"):
        rows.append(("name", info["name"]))
    kind = info["kind"]
    if kind == "checkpoint":
        rows.append(("made by", info["made_by"]))
        rows.append(("iteration", _num(info["iteration"])))
        rows.append(("seen", f"{_num(info['samples'])} samples, {_num(info['tokens'])} tokens, "
                             f"{_num(info['epochs'])} epochs"))
        opt = info["optimizer"]
        rows.append(("optimizer", f"{_num(opt['type'])}, iteration {_num(opt['iteration'])}, "
                                  f"best loss {_num(opt['best_loss'])}"))
    if kind in ("adapter", "ggla-adapter") and info.get("iteration") is not None:
        rows.append(("iteration", _num(info["iteration"])))
    if kind in ("adapter", "checkpoint", "ggla-adapter"):
        rows.append(("ranks", _ranks_text(info["ranks"]) or "(none)"))
        if kind == "checkpoint" and info["alpha"] is None:
            rows.append(("alpha", "not stored (llama.cpp's finetune trained at scale 1, without alpha/r)"))
        else:
            rows.append(("alpha", _num(info["alpha"])))
        rows.append(("adapted tensors", str(info["n_adapted_tensors"])))
    rows.append(("parameters", _count(info["parameters"])))
    hp = info.get("hparams")
    if hp:
        label = "hyper-parameters" if kind == "model" else "base model"
        rows.append((label, ""))
        rows += [(f"  {k}", _num(v)) for k, v in hp.items()]
    if kind == "model":
        rows.append(("tied embeddings", "yes (no output.weight: the output head is token_embd)"
                     if info["tied_embeddings"] else "no"))
    types = ", ".join(f"{k} {v}" for k, v in info["tensor_types"].items())
    if info.get("unsupported_tensor_types"):
        types += f" ({', '.join(info['unsupported_tensor_types'])}: not supported for training here)"
    rows.append(("tensor types", types))
    if kind == "model":
        tok = info["tokenizer"]
        if tok is None:
            rows.append(("tokenizer", "none"))
        else:
            pre = f" (pre: {tok['pre']})" if tok["pre"] else ""
            rows.append(("tokenizer", f"{tok['model']}{pre}, {tok['n_tokens']} tokens, bos {_num(tok['bos_id'])}, "
                                      f"eos {_num(tok['eos_id'])}"))
        rows.append(("chat template", "yes" if info["chat_template"] else "no"))
    labels = [k if k.startswith(" ") else k + ":" for k, _ in rows]  # indented rows belong to a heading
    width = max(map(len, labels)) + 1
    return "".join(f"{label:<{width}} {v}".rstrip() + "\n" for label, (_, v) in zip(labels, rows))
