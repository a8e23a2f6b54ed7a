"""The vocabulary part of a GGUF tokenizer, loaded with llama.cpp's rules (``llama_vocab::impl::load``).

Token texts, scores, types -> attributes; the special ids with llama.cpp's per-model defaults and
metadata overrides; the add-BOS/EOS and space-prefix flags; the "end of generation" heuristics that
turn tokens such as ``<|im_end|>`` into control tokens; and the order in which special tokens are
searched for in the text.  Nothing here tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .pretokenizers import PreTokenizerSpec, resolve_pre

# llama_token_type (GGUF tokenizer.ggml.token_type values)
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = range(7)

# llama_token_attr bits
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

_TYPE_TO_ATTR = np.zeros(256, dtype=np.int32)  # anything else -> UNDEFINED
_TYPE_TO_ATTR[[TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE]] = [
    ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE]

K = "tokenizer.ggml."

# texts llama.cpp uses to find special tokens that the metadata does not name (llama-vocab.cpp as
# of llama-cpp-python 0.3.36); a token found this way becomes a control token
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# "end of generation" texts.  Note '</s>': in Gemma 3 it is a user-defined token (HTML strike-through),
# which llama.cpp thereby turns into a control token too (not split out of plain text, printed only
# with special=True); only a vocabulary that also has '<|tool_response>' or '<|plamo:eos|>' keeps it
# normal (see load_vocab).
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[")
# gpt-oss: always rendered, so llama.cpp makes them user-defined whatever their type
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# metadata key -> special id name (later keys of the same name win, as in llama.cpp's list)
_SPECIAL_KEYS = (
    ("bos_token_id", "bos"), ("eos_token_id", "eos"), ("eot_token_id", "eot"), ("eom_token_id", "eom"),
    ("unknown_token_id", "unk"), ("seperator_token_id", "sep"), ("padding_token_id", "pad"),
    ("mask_token_id", "mask"), ("fim_pre_token_id", "fim_pre"), ("fim_suf_token_id", "fim_suf"),
    ("fim_mid_token_id", "fim_mid"), ("fim_pad_token_id", "fim_pad"), ("fim_rep_token_id", "fim_rep"),
    ("fim_sep_token_id", "fim_sep"), ("prefix_token_id", "fim_pre"), ("suffix_token_id", "fim_suf"),
    ("middle_token_id", "fim_mid"),
)


@dataclass
class Vocab:
    kind: str  # 'spm' | 'bpe'
    texts: list[str]  # [n_vocab] token text (UTF-8 decoded, invalid bytes kept as surrogates)
    raw: list[bytes]  # [n_vocab] token text as stored
    scores: np.ndarray  # [n_vocab] float32
    attrs: np.ndarray  # [n_vocab] int32 llama_token_attr bits
    token_to_id: dict[str, int]
    special: dict[str, int | None]  # bos, eos, eot, eom, unk, sep, pad, mask, fim_*
    eog_ids: set[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    clean_spaces: bool
    ignore_merges: bool
    pre: str | None  # effective pre-tokenizer name (BPE); 'default' for SPM
    pre_gguf: str | None  # the tokenizer.ggml.pre value as stored
    pre_spec: PreTokenizerSpec | None
    merges: list[bytes] | None  # BPE merges as stored
    special_order: list[int]  # control/user-defined/unknown ids, longest text first
    warnings: list[str] = field(default_factory=list)

    @property
    def n_vocab(self) -> int:
        return len(self.texts)


def _as_id(meta, key: str, n_vocab: int, default, warnings: list[str]):
    v = meta.get(K + key, None)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        warnings.append(f"{K}{key} = {v!r} is not an integer; using {default}")
        return default
    v = int(v)
    if not 0 <= v < n_vocab:
        warnings.append(f"bad special token: {K}{key} = {v} (vocab has {n_vocab} tokens); using {default}")
        return default
    return v


def _as_bool(meta, key: str, default: bool) -> bool:
    v = meta.get(K + key, None)
    return default if v is None else bool(v)


def load_vocab(meta, where: str = "model") -> Vocab:
    """Build a :class:`Vocab` from a metadata source (GGUFFile or GGUFMeta)."""
    warnings: list[str] = []
    model = meta.get(K + "model", None)
    if model is None:
        raise UserError(f"{where}: no tokenizer in this GGUF file (metadata key '{K}model' is missing)")
    pre_gguf = meta.get(K + "pre", None)
    if pre_gguf is not None and not isinstance(pre_gguf, str):
        raise UserError(f"{where}: metadata key '{K}pre' should be a string")

    merges = None
    pre = pre_spec = None
    if model == "llama":
        kind = "spm"
        special = dict(bos=1, eos=2, unk=0)
        add_space_prefix, clean_spaces, add_bos, add_eos, ignore_merges = True, False, True, False, False
        pre = "default"
    elif model == "gpt2":
        kind = "bpe"
        merges = meta.get_string_array_bytes(K + "merges", None)
        if merges is None:
            raise UserError(f"{where}: BPE ('gpt2') tokenizer without '{K}merges'")
        special = dict(bos=11, eos=11, unk=None)
        pre, pre_spec, warn = resolve_pre(pre_gguf)
        if warn:
            warnings.append(warn)
        add_space_prefix, clean_spaces = False, pre_spec.clean_spaces
        add_bos, add_eos, ignore_merges = pre_spec.add_bos, False, pre_spec.ignore_merges
        if pre_spec.no_bos:
            special["bos"] = None
    elif model in ("no_vocab", "none"):
        raise UserError(f"{where}: this GGUF file has no vocabulary ({K}model = '{model}')")
    elif model in ("bert", "t5", "rwkv"):
        raise UserError(f"{where}: tokenizer type '{model}' is not supported (only 'llama' SPM and 'gpt2' BPE)")
    else:
        raise UserError(f"{where}: unknown tokenizer type {K}model = '{model}'")
    for name in ("eot", "eom", "sep", "pad", "mask", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep"):
        special[name] = None
    add_space_prefix = _as_bool(meta, "add_space_prefix", add_space_prefix)

    raw = meta.get_string_array_bytes(K + "tokens", None)
    if raw is None:
        raise UserError(f"{where}: cannot find the token list '{K}tokens'")
    n = len(raw)
    if n == 0:
        raise UserError(f"{where}: the token list '{K}tokens' is empty")
    raw = list(raw)
    if not all(raw):
        for i in [i for i, t in enumerate(raw) if not t]:
            raw[i] = f"[EMPTY_{i}]".encode()
            warnings.append(f"empty token at index {i}")
    texts = [t.decode("utf-8", "surrogateescape") for t in raw]
    token_to_id = dict(zip(texts, range(n)))  # a repeated text maps to its last id
    if len(token_to_id) != n:
        warnings.append(f"{n - len(token_to_id)} repeated token texts (llama.cpp refuses such a vocabulary)")

    scores = meta.get_array(K + "scores", None)
    scores = np.zeros(n, np.float32) if scores is None else np.asarray(scores, dtype=np.float32)
    types = meta.get_array(K + "token_type", None)
    for name, arr in (("scores", scores), ("token_type", types)):
        if arr is not None and len(arr) != n:
            raise UserError(f"{where}: '{K}{name}' has {len(arr)} entries but there are {n} tokens")
    if types is None:
        attrs = np.full(n, ATTR_NORMAL, dtype=np.int32)
    else:
        t = np.asarray(types, dtype=np.int64)
        attrs = np.where((t >= 0) & (t < 256), _TYPE_TO_ATTR[np.clip(t, 0, 255)], ATTR_UNDEFINED).astype(np.int32)

    for key, name in _SPECIAL_KEYS:
        special[name] = _as_id(meta, key, n, special[name], warnings)
    add_bos = _as_bool(meta, "add_bos_token", add_bos)
    add_eos = _as_bool(meta, "add_eos_token", add_eos)

    # tokens found by their text; each becomes a control token (llama.cpp: "control-looking token")
    def find_first(names) -> int | None:
        ids = [token_to_id[s] for s in names if s in token_to_id]
        return min(ids) if ids else None  # llama.cpp takes whichever its hash map yields first

    def make_control(i: int) -> None:
        if not attrs[i] & ATTR_CONTROL:
            warnings.append(f"control-looking token {i} '{texts[i]}' was not control-type; treated as control")
            attrs[i] |= ATTR_CONTROL  # llama.cpp adds the bit: a user-defined token stays user-defined too

    for name, names in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), *_FIM_TEXTS.items()):
        if special[name] is None:
            i = find_first(names)
            if i is not None:
                special[name] = i
                make_control(i)
    # control tokens named "...unused..." are marked unused (no effect on tokenizing or printing)
    ctrl = np.nonzero(attrs & ATTR_CONTROL)[0].tolist()
    attrs[[i for i in ctrl if "unused" in texts[i]]] |= ATTR_UNUSED
    eog = {special[k] for k in ("fim_pad", "fim_rep", "fim_sep") if special[k] is not None}
    for s in _EOG_TEXTS:
        i = token_to_id.get(s)
        if i is not None:
            eog.add(i)
            make_control(i)
    for s in _ALWAYS_USER_DEFINED:
        if s in token_to_id:
            attrs[token_to_id[s]] = ATTR_USER_DEFINED
    for k in ("eos", "eot", "eom"):
        if special[k] is not None:
            eog.add(special[k])
    eog_texts = {texts[i]: i for i in sorted(eog)}
    # gpt-oss / solar-open: '<|end|>' ends a message, not the generation
    if "<|end|>" in eog_texts and (("<|return|>" in eog_texts and ("<|call|>" in eog_texts or "<|calls|>" in eog_texts))
                                   or (("<|call|>" in eog_texts or "<|calls|>" in eog_texts) and "<|flush|>" in eog_texts)):
        i = eog_texts["<|end|>"]
        eog.discard(i)
        attrs[i] = ATTR_USER_DEFINED
    # gemma4 / plamo: '</s>' is a normal token there
    if "</s>" in eog_texts and ("<|tool_response>" in eog_texts or "<|plamo:eos|>" in eog_texts):
        i = eog_texts["</s>"]
        eog.discard(i)
        attrs[i] = ATTR_NORMAL

    # per-model attributes llama.cpp sets by name
    if pre_gguf and any(s in pre_gguf for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")):
        if "<mask>" in token_to_id:
            attrs[token_to_id["<mask>"]] |= ATTR_LSTRIP
    else:
        name = str(meta.get("general.name", "") or "").lower()
        if "phi-3" in name or "phi3" in name:
            sp = np.nonzero(attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0]
            attrs[sp] |= ATTR_RSTRIP
            for s, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                if s in token_to_id:
                    i = token_to_id[s]
                    attrs[i] = (attrs[i] | ATTR_RSTRIP) if on else (attrs[i] & ~ATTR_RSTRIP)

    # llama.cpp sorts these by text length with an unstable sort; ties here go by id
    sp = np.nonzero(attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0].tolist()
    special_order = sorted(sp, key=lambda i: (-len(raw[i]), i))

    return Vocab(kind=kind, texts=texts, raw=raw, scores=scores, attrs=attrs, token_to_id=token_to_id,
                 special=special, eog_ids=eog, add_bos=add_bos, add_eos=add_eos,
                 add_space_prefix=add_space_prefix, clean_spaces=clean_spaces, ignore_merges=ignore_merges,
                 pre=pre, pre_gguf=pre_gguf, pre_spec=pre_spec, merges=merges,
                 special_order=special_order, warnings=warnings)
