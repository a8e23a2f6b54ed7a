"""Training checkpoints in llama.cpp finetune's GGUF layout (+ our keys under ``gguf_finetune.``).

llama.cpp's layout (examples/finetune/finetune.cpp + common/train.cpp, file_version 1):
``training.type = finetune_lora``, the model's ``llama.*`` hyper-parameters,
``training.lora.rank.<tensor>``, ``training.*`` counters and shuffle state, ``optimizer.*`` keys and
the Adam moments ``optimizer.adam.first_moments`` / ``second_moments`` (one flat f32 vector over
all LoRA tensors in graph-parameter order), and the LoRA tensors ``<tensor>.weight.lora_a`` (ggml
[r, n_in]) / ``.lora_b`` (ggml [r, n_out]), which is exactly our numpy a [n_in, r] / b [n_out, r].

llama.cpp's finetune trained without the alpha/r factor, so its checkpoints load with scale 1
(``scale_one``); ours record ``gguf_finetune.lora_alpha`` and train at alpha/r — except a run
resumed from a llama.cpp checkpoint, which keeps scale 1 (``gguf_finetune.scale_one``).  The Adam
moments are stored in ggml's graph order either way, so each tool can resume the other's files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from ..arch import SUPPORTED, TARGETS, get_arch
from ..errors import UserError
from ..gguf_io import GGUFFile, write_gguf_atomic
from ..lora import LoraLayout, LoraParams, LoraRanks, make_specs
from ..model import MAX_DIM, HParams
from ..optim import OptimizerState, llamacpp_param_order
from ..trainer import TrainState

OUR = "gguf_finetune."
FORMAT_VERSION = 1

RANK_KEY = "training.lora.rank.{}"  # llama.cpp's key per target, by base tensor name


@dataclass
class Checkpoint:
    hparams_kv: dict  # llama.* keys as stored (context_length = training ctx)
    ranks: LoraRanks
    lora: LoraParams
    opt: OptimizerState
    train: TrainState
    ours: dict  # gguf_finetune.* keys (empty for llama.cpp's checkpoints)

    @property
    def from_llamacpp(self) -> bool:
        return not self.ours


def ranks_from_kv(f: GGUFFile) -> LoraRanks:
    return LoraRanks(**{t.key: f.get_int(RANK_KEY.format(t.tensor), 0) for t in TARGETS})


def _hparams_for_layout(f: GGUFFile, hp: HParams | None) -> HParams:
    """Model dimensions for the LoRA layout: the given model's, or read from the checkpoint."""
    if hp is not None:
        return hp
    # a checkpoint has no token_embd.weight; n_vocab comes from the token_embd/output adapters
    n_vocab = 1
    for name in ("token_embd.weight.lora_b", "output.weight.lora_b"):
        if name in f.tensors:
            n_vocab = f.tensor_shape(name)[0]
    arch = f.get_str("general.architecture", "llama")
    if get_arch(arch) is None:
        raise UserError(f"checkpoint '{f.path}': architecture '{arch}' is not supported (supported: "
                        f"{', '.join(SUPPORTED)})")
    a = arch + "."
    dims = {key: f.get_int(a + key) for key in ("embedding_length", "attention.head_count",
                                                   "feed_forward_length", "block_count")}
    dims["attention.head_count_kv"] = f.get_int(a + "attention.head_count_kv", dims["attention.head_count"])
    head_dim = f.get_int(a + "attention.key_length", 0)
    if head_dim:
        dims["attention.key_length"] = head_dim
    for key, val in dims.items():
        if not 0 < val <= MAX_DIM:
            raise UserError(f"checkpoint '{f.path}': metadata '{a}{key}' = {val} is out of range")
    n_embd, n_head, n_head_kv = (dims[k] for k in ("embedding_length", "attention.head_count",
                                                   "attention.head_count_kv"))
    if n_head % n_head_kv or (not head_dim and n_embd % n_head):
        raise UserError(f"checkpoint '{f.path}': n_embd {n_embd}, n_head {n_head}, n_head_kv {n_head_kv} "
                        f"do not divide evenly")
    return HParams(
        n_vocab=n_vocab, n_ctx_train=f.get_int(f"{arch}.context_length", 0), n_embd=n_embd,
        n_ff=dims["feed_forward_length"], n_layer=dims["block_count"], n_head=n_head, n_head_kv=n_head_kv,
        n_rot=f.get_int(f"{arch}.rope.dimension_count", head_dim or n_embd // n_head), arch=arch, head_dim=head_dim,
    )


def _layout_for_file(f: GGUFFile, dims: HParams, ranks: LoraRanks) -> LoraLayout:
    """The LoRA layout the ranks and dimensions describe — refused before anything is allocated
    when the file cannot hold it (absurd ranks or block counts in a damaged header)."""
    n_global = sum(1 for t in TARGETS if not t.per_layer and getattr(ranks, t.key) > 0)
    n_per_layer = sum(1 for t in TARGETS if t.per_layer and getattr(ranks, t.key) > 0)
    n_lora = n_global + dims.n_layer * n_per_layer
    if 2 * n_lora > len(f.tensors):
        raise UserError(f"checkpoint '{f.path}': its ranks and block count call for {2 * n_lora} LoRA tensors, "
                        f"the file has {len(f.tensors)} tensors")
    layout = LoraLayout(make_specs(dims, ranks))
    size = f.path.stat().st_size
    if 4 * layout.size > size:
        raise UserError(f"checkpoint '{f.path}': its ranks and dimensions call for {layout.size} LoRA values, "
                        f"more than its {size} bytes can hold")
    return layout


def read_lora(f: GGUFFile, hp: HParams | None = None, dtype=np.float32) -> tuple[LoraRanks, LoraParams]:
    """The LoRA tensors of a checkpoint (ours or llama.cpp's), checked against ``hp`` if given."""
    if not f.has("training.type"):
        raise UserError(f"checkpoint '{f.path}': not a training checkpoint (no training.type key)")
    ttype = f.get_str("training.type")
    if ttype != "finetune_lora":
        raise UserError(f"checkpoint '{f.path}': training.type is '{ttype}', expected 'finetune_lora'")
    ranks = ranks_from_kv(f)
    dims = _hparams_for_layout(f, hp)
    layout = _layout_for_file(f, dims, ranks)
    ours = f.has(OUR + "lora_alpha")
    alpha = f.get_float(OUR + "lora_alpha") if ours else 1.0
    scale_one = bool(f.get(OUR + "scale_one", False)) if ours else True
    p = LoraParams.zeros(layout, alpha=alpha, dtype=dtype, scale_one=scale_one)
    for s in layout.specs:
        for suffix, view, shape in ((".lora_a", p.a[s.name], s.a_shape), (".lora_b", p.b[s.name], s.b_shape)):
            name = s.name + suffix
            t = f.tensor(name)
            got = f.tensor_shape(name)
            if int(np.prod(got)) != int(np.prod(shape)):
                raise UserError(f"checkpoint '{f.path}': tensor '{name}' has shape {list(got)}, "
                                f"expected {list(shape)} for this model")
            if int(t.tensor_type) != 0:
                raise UserError(f"checkpoint '{f.path}': tensor '{name}' has type {_type_name(t.tensor_type)}, "
                                f"expected F32 (LoRA tensors of a training checkpoint are F32)")
            view[...] = np.asarray(t.data, dtype=np.float32).reshape(shape)
    return ranks, p


def check_matches_model(f: GGUFFile, hp: HParams) -> None:
    """Refuse a checkpoint made for another model (architecture, sizes, vocabulary)."""
    arch = f.get_str("general.architecture", "")
    if arch != hp.arch:
        raise UserError(f"checkpoint '{f.path}': made for architecture '{arch}', the model is '{hp.arch}'")
    a = arch + "."
    for key, want in (("embedding_length", hp.n_embd), ("feed_forward_length", hp.n_ff),
                      ("block_count", hp.n_layer), ("attention.head_count", hp.n_head),
                      ("attention.head_count_kv", hp.n_head_kv), ("attention.key_length", hp.head_dim)):
        default = hp.n_embd // hp.n_head if key == "attention.key_length" else want  # (absent: n_embd / n_head)
        got = f.get_int(a + key, default)
        if got != want:
            raise UserError(f"checkpoint '{f.path}': made for another model ({a}{key} = {got}, the model has {want})")
    for name in ("token_embd.weight.lora_b", "output.weight.lora_b"):
        if name in f.tensors and f.tensor_shape(name)[0] != hp.n_vocab:
            raise UserError(f"checkpoint '{f.path}': made for a vocabulary of {f.tensor_shape(name)[0]} tokens, "
                            f"the model has {hp.n_vocab}")


def _type_name(t) -> str:
    try:
        return GGMLQuantizationType(int(t)).name
    except ValueError:
        return f"{int(t)} (unknown)"


def check_is_checkpoint(f: GGUFFile) -> None:
    """Refuse a GGUF file that is not a training checkpoint, saying what it seems to be."""
    if f.has("training.type"):
        return
    if f.get_str("general.type", "") == "adapter" or any(n.endswith(".lora_a") for n in f.tensors):
        raise UserError(f"checkpoint '{f.path}': not a training checkpoint but a LoRA adapter (no optimizer state "
                        f"to resume from); give a checkpoint (--checkpoint-out's file), or merge the adapter with "
                        f"export-lora")
    if "token_embd.weight" in f.tensors:
        raise UserError(f"checkpoint '{f.path}': not a training checkpoint but a model (no training.type key); "
                        f"a model is given with --model-base")
    raise UserError(f"checkpoint '{f.path}': not a training checkpoint (no training.type key)")


def read_checkpoint(path: str | os.PathLike, hp: HParams | None = None, dtype=np.float32) -> Checkpoint:
    f = GGUFFile(path, "checkpoint")
    check_is_checkpoint(f)
    if hp is not None:
        check_matches_model(f, hp)
    ranks, lora = read_lora(f, hp, dtype)
    n = lora.layout.size
    if f.get_int("optimizer.parameter_count", n) != n:
        raise UserError(f"checkpoint '{f.path}': optimizer.parameter_count {f.get_int('optimizer.parameter_count')} "
                        f"does not match its LoRA tensors ({n})")
    opt_type = f.get_str("optimizer.type", "adam")
    if opt_type != "adam":
        raise UserError(f"checkpoint '{f.path}': optimizer type '{opt_type}' is not supported (adam only)")

    def moments(name: str) -> np.ndarray:
        if name not in f.tensors:
            return np.zeros(n, np.float32)
        arr = np.asarray(f.tensors[name].data, dtype=np.float32).reshape(-1)
        if arr.size != n:
            raise UserError(f"checkpoint '{f.path}': '{name}' has {arr.size} values, expected {n}")
        out = np.empty(n, np.float32)
        out[perm] = arr
        return out

    perm = moments_permutation(lora.layout)
    past = f.get_int("optimizer.convergence_past_count", 0)
    plv = np.zeros(0, np.float32)
    if past > 0:  # llama.cpp reads (and requires) the tensor then
        t = f.tensors.get("optimizer.adam.past_loss_values")
        n_past = int(t.n_elements) if t is not None else 0
        if n_past != past or int(t.tensor_type) != 0:
            raise UserError(f"checkpoint '{f.path}': optimizer.convergence_past_count is {past}, but "
                            f"'optimizer.adam.past_loss_values' has {n_past} f32 values")
        plv = np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
    opt = OptimizerState(
        m=moments("optimizer.adam.first_moments"), v=moments("optimizer.adam.second_moments"),
        iteration=f.get_int("optimizer.iteration_count", 0),
        just_initialized=bool(f.get("optimizer.just_initialized", False)),
        best_loss=f.get_float("optimizer.adam.best_loss", 0.0),
        previous_loss=f.get_float("optimizer.adam.previous_loss", 0.0),
        no_improvement_count=f.get_int("optimizer.adam.no_improvement_count", 0),
        past_loss_values=plv,
    )
    train = TrainState(
        iteration=f.get_int("training.iteration_count", 0), sample_count=f.get_int("training.sample_count", 0),
        token_count=f.get_int("training.token_count", 0), epoch_count=f.get_int("training.epoch_count", 0),
        shuffle_samples_hash=f.get_int("training.shuffle.samples_hash", 0),
        shuffle_rng_state=f.get_str("training.shuffle.rng_state", ""),
        shuffle_sample_count=f.get_int("training.shuffle.sample_count", 0),
        shuffle_next_sample=f.get_int("training.shuffle.next_sample", 0),
    )
    arch = f.get_str("general.architecture", "llama")
    hkv = {k: f.get(k) for k in f.keys() if k.startswith(arch + ".")}
    ours = {k[len(OUR):]: f.get(k) for k in f.keys() if k.startswith(OUR)}
    return Checkpoint(hkv, ranks, lora, opt, train, ours)


def moments_permutation(layout: LoraLayout) -> np.ndarray:
    """Indices into our flat buffer in ggml's graph-parameter order (optim.llamacpp_param_order).

    llama.cpp stores the Adam moments flattened in the order its optimizer collects parameters;
    our buffer follows file order.  moments_in_graph_order = ours[perm]; ours[perm] = stored.
    """
    n_layer = 1 + max([int(s.name.split(".")[1]) for s in layout.specs if s.name.startswith("blk.")] or [-1])
    segs = []
    for name in llamacpp_param_order(n_layer, arch=None):  # the layout holds only what is adapted
        base, part = name.rsplit(".", 1)  # "<tensor>.weight", "lora_a"|"lora_b"
        spec = layout.by_name.get(base)
        if spec is None:
            continue
        oa, ob = layout.offsets[base]
        off, n = (oa, spec.n_in * spec.rank) if part == "lora_a" else (ob, spec.n_out * spec.rank)
        segs.append(np.arange(off, off + n, dtype=np.int64))
    perm = np.concatenate(segs) if segs else np.zeros(0, dtype=np.int64)
    if perm.size != layout.size:
        raise ValueError("moments permutation does not cover the LoRA layout")
    return perm


def write_checkpoint(path: str | os.PathLike, hp: HParams, n_ctx: int, ranks: LoraRanks, lora: LoraParams,
                     opt: OptimizerState, train: TrainState, ours: dict | None = None) -> None:
    """Write a checkpoint llama.cpp's finetune can also read (atomic)."""
    arch = hp.arch

    def fill(w):
        w.add_string("training.type", "finetune_lora")
        w.add_uint32("general.file_type", 0)
        w.add_uint32(f"{arch}.context_length", n_ctx)
        w.add_uint32(f"{arch}.embedding_length", hp.n_embd)
        w.add_uint32(f"{arch}.feed_forward_length", hp.n_ff)
        w.add_uint32(f"{arch}.attention.head_count", hp.n_head)
        w.add_uint32(f"{arch}.attention.head_count_kv", hp.n_head_kv)
        w.add_uint32(f"{arch}.block_count", hp.n_layer)
        w.add_uint32(f"{arch}.rope.dimension_count", hp.n_rot)
        if hp.head_dim * hp.n_head != hp.n_embd:  # (llama.cpp's own finetune never needed these)
            w.add_uint32(f"{arch}.attention.key_length", hp.head_dim)
            w.add_uint32(f"{arch}.attention.value_length", hp.head_dim)
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", hp.rms_eps)
        w.add_float32(f"{arch}.rope.freq_base", hp.rope_freq_base)
        w.add_float32(f"{arch}.rope.scale_linear", 1.0 / hp.rope_freq_scale)
        for t in get_arch(arch).targets():
            w.add_uint32(RANK_KEY.format(t.tensor), getattr(ranks, t.key))
        w.add_uint32("training.file_version", 1)
        w.add_uint64("training.iteration_count", train.iteration)
        w.add_uint64("training.sample_count", train.sample_count)
        w.add_uint64("training.token_count", train.token_count)
        w.add_uint64("training.epoch_count", train.epoch_count)
        w.add_uint64("training.shuffle.samples_hash", train.shuffle_samples_hash)
        w.add_string("training.shuffle.rng_state", train.shuffle_rng_state)
        w.add_uint64("training.shuffle.sample_count", train.shuffle_sample_count)
        w.add_uint64("training.shuffle.next_sample", train.shuffle_next_sample)
        w.add_uint32("optimizer.file_version", 0)
        w.add_uint32("optimizer.convergence_past_count", len(opt.past_loss_values))
        w.add_uint64("optimizer.parameter_count", lora.layout.size)
        w.add_uint32("optimizer.iteration_count", opt.iteration)
        w.add_bool("optimizer.just_initialized", opt.just_initialized)
        w.add_string("optimizer.type", "adam")
        w.add_float32("optimizer.adam.best_loss", opt.best_loss)
        w.add_float32("optimizer.adam.previous_loss", opt.previous_loss)
        w.add_uint32("optimizer.adam.no_improvement_count", opt.no_improvement_count)
        w.add_uint32(OUR + "format_version", FORMAT_VERSION)
        w.add_float32(OUR + "lora_alpha", float(lora.alpha))
        w.add_bool(OUR + "scale_one", bool(lora.scale_one))
        for k, v in (ours or {}).items():
            _add_any(w, OUR + k, v)
        perm = moments_permutation(lora.layout)
        w.add_tensor("optimizer.adam.first_moments", opt.m.astype(np.float32)[perm])
        w.add_tensor("optimizer.adam.second_moments", opt.v.astype(np.float32)[perm])
        if len(opt.past_loss_values):
            w.add_tensor("optimizer.adam.past_loss_values", opt.past_loss_values.astype(np.float32))
        for s in lora.layout.specs:
            w.add_tensor(s.name + ".lora_a", np.ascontiguousarray(lora.a[s.name], dtype=np.float32))
            b = np.ascontiguousarray(lora.b[s.name], dtype=np.float32)
            w.add_tensor(s.name + ".lora_b", b.reshape(-1) if s.n_out == 1 else b)

    write_gguf_atomic(fill, path, arch)


def _add_any(w, key: str, v) -> None:
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_int64(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    else:
        raise TypeError(f"unsupported checkpoint value for {key}: {type(v)}")

