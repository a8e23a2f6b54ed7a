"""Model architectures: every tensor name, LoRA target and graph option, written once.

In the spirit of gguf-py's ``constants.py`` (``TENSOR_NAMES``, ``MODEL_TENSORS``): tensor base
names are constants here, each family is one :class:`Arch` entry saying which tensors a block has
(required and optional) and which graph options the engine switches on, and the LoRA targets —
their ``--rank-*`` flags, checkpoint keys, llama.cpp log labels and PEFT module names — are one
table (:data:`TARGETS`).  Everything else (model loading, the engine, checkpoints, adapters, PEFT
export, the command line) reads these tables.

Names: a global tensor is ``<base>.weight`` (``token_embd.weight``); a block tensor is
``blk.<i>.<base>.weight`` or ``blk.<i>.<base>.bias``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# -- tensor base names (llama.cpp's LLM_TENSOR_NAMES) -----------------------------------------------
TOKEN_EMBD = "token_embd"
OUTPUT_NORM = "output_norm"
OUTPUT = "output"
ROPE_FREQS = "rope_freqs"  # llama 3.1+: frequency factors of every layer's RoPE
ROPE_FACTORS_LONG = "rope_factors_long"  # Phi-3 LongRoPE, for contexts past the original one
ROPE_FACTORS_SHORT = "rope_factors_short"

ATTN_NORM = "attn_norm"
ATTN_Q = "attn_q"
ATTN_K = "attn_k"
ATTN_V = "attn_v"
ATTN_QKV = "attn_qkv"
ATTN_OUT = "attn_output"
ATTN_Q_NORM = "attn_q_norm"
ATTN_K_NORM = "attn_k_norm"
ATTN_POST_NORM = "post_attention_norm"
FFN_NORM = "ffn_norm"
FFN_GATE = "ffn_gate"
FFN_UP = "ffn_up"
FFN_DOWN = "ffn_down"
FFN_POST_NORM = "post_ffw_norm"

ROPE_NORM = "norm"  # GGML_ROPE_TYPE_NORM: rotate adjacent pairs (2i, 2i+1)
ROPE_NEOX = "neox"  # GGML_ROPE_TYPE_NEOX: rotate pairs (i, i + n_rot/2)


def weight(base: str, il: int | None = None) -> str:
    """'attn_q', 3 -> 'blk.3.attn_q.weight'; 'output' -> 'output.weight'."""
    return f"{base}.weight" if il is None else f"blk.{il}.{base}.weight"


def bias(base: str, il: int) -> str:
    return f"blk.{il}.{base}.bias"


def split_name(name: str) -> tuple[int | None, str]:
    """'blk.3.attn_q.weight' -> (3, 'attn_q'); 'output.weight' -> (None, 'output')."""
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, stem


# -- LoRA targets ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One tensor that can carry an adapter.

    key     the rank's name: field of ``LoraRanks``, suffix of the ``--rank-*`` flag
    tensor  base tensor name
    kind    'mat' (y = x·Wᵀ), 'embd' (rows gathered by token) or 'norm' (a [n_embd] weight)
    flag    the command-line flag (llama.cpp's spelling)
    label   llama.cpp's ``print_lora_params`` label
    what    help text: "LORA rank for <what> tensor"
    peft    the Hugging Face module (relative to ``model.layers.<i>.`` for block targets, to the
            causal LM otherwise); None: no PEFT form (norms).  Families may rename it (Arch.peft).
    """

    key: str
    tensor: str
    kind: str
    flag: str
    label: str
    what: str
    peft: str | None

    @property
    def per_layer(self) -> bool:
        return self.tensor not in (TOKEN_EMBD, OUTPUT_NORM, OUTPUT)

    @property
    def is_norm(self) -> bool:
        return self.kind == "norm"


# llama.cpp finetune's file order: globals, then per block (attn_qkv, which it never trained, sits
# where attn_q/k/v are)
TARGETS: tuple[Target, ...] = (
    Target("tok_embd", TOKEN_EMBD, "embd", "--rank-tok-embd", "tok_embeddings", "token embeddings",
           "model.embed_tokens"),
    Target("out_norm", OUTPUT_NORM, "norm", "--rank-out-norm", "norm", "output norm", None),
    Target("out", OUTPUT, "mat", "--rank-out", "output", "output", "lm_head"),
    Target("att_norm", ATTN_NORM, "norm", "--rank-att-norm", "attention_norm", "attention norm", None),
    Target("wq", ATTN_Q, "mat", "--rank-wq", "wq", "wq", "self_attn.q_proj"),
    Target("wk", ATTN_K, "mat", "--rank-wk", "wk", "wk", "self_attn.k_proj"),
    Target("wv", ATTN_V, "mat", "--rank-wv", "wv", "wv", "self_attn.v_proj"),
    Target("wqkv", ATTN_QKV, "mat", "--rank-wqkv", "wqkv", "fused wq/wk/wv (attn_qkv)", "self_attn.qkv_proj"),
    Target("wo", ATTN_OUT, "mat", "--rank-wo", "wo", "wo", "self_attn.o_proj"),
    Target("ffn_norm", FFN_NORM, "norm", "--rank-ffn-norm", "ffn_norm", "feed-forward norm", None),
    Target("ffn_gate", FFN_GATE, "mat", "--rank-ffn_gate", "ffn_gate", "ffn_gate", "mlp.gate_proj"),
    Target("ffn_down", FFN_DOWN, "mat", "--rank-ffn_down", "ffn_down", "ffn_down", "mlp.down_proj"),
    Target("ffn_up", FFN_UP, "mat", "--rank-ffn_up", "ffn_up", "ffn_up", "mlp.up_proj"),
)
TARGET_BY_KEY = {t.key: t for t in TARGETS}
TARGET_BY_TENSOR = {t.tensor: t for t in TARGETS}
# llama.cpp finetune prints the ranks in this order (print_lora_params)
PRINT_ORDER = ("att_norm", "wq", "wk", "wv", "wqkv", "wo", "ffn_norm", "ffn_gate", "ffn_down", "ffn_up",
               "tok_embd", "out_norm", "out")


def target_kind(name: str) -> str:
    """'mat' | 'embd' | 'norm' for a base tensor name (unknown matrices count as 'mat')."""
    _, base = split_name(name)
    t = TARGET_BY_TENSOR.get(base)
    if t is not None:
        return t.kind
    return "norm" if base.endswith("_norm") else "mat"


# -- families --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """One model family: its block's tensors and the graph options the engine switches on.

    block           per-layer tensors (base names of ``.weight`` tensors), in order of use
    biases          per-layer ``.bias`` tensors added after their projection (Qwen2: q, k, v)
    rope            ROPE_NORM or ROPE_NEOX (as llama.cpp's llama_model_rope_type for the family)
    act             gated activation of the feed-forward: 'silu' or 'gelu_tanh'
    embd_scale      multiply the token embeddings by sqrt(n_embd) (Gemma)
    swa_pattern     sliding-window layers: layer il is local when il % swa_pattern < swa_pattern - 1
                    (0: none; the file's ``<arch>.attention.sliding_window_pattern`` wins when present)
    swa_rope_base   RoPE base of the local layers, which also drop the file's RoPE scaling
                    (None: local layers use the file's; ``<arch>.rope.freq_base_swa`` wins when present)
    swa_used        whether llama.cpp applies the file's sliding window at all (Phi-3: ignored)
    scale_embd_at   the block count of the one size whose attention scale is 1/sqrt(n_embd/n_head)
                    instead of 1/sqrt(head_dim) (Gemma 3 27B: 62, llama.cpp's rule; 0: none)
    fused_up        ``ffn_up`` holds [gate | up] stacked (2·n_ff rows) and there is no ffn_gate
    rope_factors    tensors that may hold RoPE frequency factors, the one used first (llama 3.1+:
                    rope_freqs; Phi-3 LongRoPE: the short factors, for contexts within the original one)
    permute_qk      convert_hf_to_gguf permuted attn_q/attn_k rows for RoPE (llama only): PEFT
                    export undoes it
    peft            PEFT module names that differ from the targets' defaults (target key -> module)
    chat_template   built-in chat template (data/chat_template.py) for files that carry none
    """

    name: str
    block: tuple[str, ...]
    biases: tuple[str, ...] = ()
    rope: str = ROPE_NORM
    act: str = "silu"
    embd_scale: bool = False
    swa_pattern: int = 0
    swa_rope_base: float | None = None
    swa_used: bool = True
    scale_embd_at: int = 0
    fused_up: bool = False
    rope_factors: tuple[str, ...] = ()
    permute_qk: bool = False
    peft: tuple[tuple[str, str], ...] = ()
    chat_template: str | None = None

    @property
    def qk_norm(self) -> bool:
        return ATTN_Q_NORM in self.block

    @property
    def post_norms(self) -> bool:
        return ATTN_POST_NORM in self.block

    @property
    def fused_qkv(self) -> bool:
        return ATTN_QKV in self.block

    def has_target(self, t: Target) -> bool:
        return not t.per_layer or t.tensor in self.block

    def targets(self) -> tuple[Target, ...]:
        """The LoRA targets a model of this family has."""
        return tuple(t for t in TARGETS if self.has_target(t))

    def peft_module(self, t: Target) -> str | None:
        return dict(self.peft).get(t.key, t.peft)

    def attn_scale(self, n_embd: int, n_head: int, head_dim: int, n_layer: int) -> float:
        """What multiplies q·k before the softmax."""
        d = n_embd // n_head if self.scale_embd_at and n_layer == self.scale_embd_at else head_dim
        return 1.0 / math.sqrt(d)


_ATTN = (ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V)
_FFN = (FFN_NORM, FFN_GATE, FFN_UP, FFN_DOWN)

ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("llama", _ATTN + (ATTN_OUT,) + _FFN, rope_factors=(ROPE_FREQS,), permute_qk=True),
    Arch("qwen2", _ATTN + (ATTN_OUT,) + _FFN, biases=(ATTN_Q, ATTN_K, ATTN_V), rope=ROPE_NEOX,
         chat_template="chatml"),
    Arch("qwen3", _ATTN + (ATTN_Q_NORM, ATTN_K_NORM, ATTN_OUT) + _FFN, rope=ROPE_NEOX, chat_template="chatml"),
    Arch("gemma3", _ATTN + (ATTN_Q_NORM, ATTN_K_NORM, ATTN_OUT, ATTN_POST_NORM) + _FFN + (FFN_POST_NORM,),
         rope=ROPE_NEOX, act="gelu_tanh", embd_scale=True, swa_pattern=6, swa_rope_base=10000.0, scale_embd_at=62,
         chat_template="gemma"),
    Arch("phi3", (ATTN_NORM, ATTN_QKV, ATTN_OUT, FFN_NORM, FFN_UP, FFN_DOWN), rope=ROPE_NEOX, swa_used=False,
         fused_up=True, rope_factors=(ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG), peft=(("wqkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")),
         chat_template="phi3"),
)}

SUPPORTED = tuple(ARCHS)


def get_arch(name: str) -> Arch | None:
    return ARCHS.get(name)
