"""Command-line flags -> typed, frozen dataclasses; bad flags -> one-line :class:`UsageError`.

``parse_finetune_args(argv)`` and ``parse_export_lora_args(argv)`` accept every flag of llama.cpp's
``finetune`` (July 2024) and ``export-lora`` with the same names, defaults and meaning, plus our
additions (grouped under their own heading in ``--help``).  Deliberate differences are stated in
the help text of the flag concerned.

The parser is a small table-driven one rather than argparse, so that it behaves like llama.cpp's:
a value is always the next argument, verbatim (``--seed -1``, ``--sample-start '-- '``); ``_`` and
``-`` are the same in ``--long-names`` (llama.cpp rewrites ``_`` to ``-``); the last occurrence of
a flag wins.  (llama.cpp's own ``--rank-ffn_gate/_down/_up`` never matched after that rewrite; here
they work, spelled either way.)  On top of that it accepts ``--flag=value`` and refuses a value that
is itself one of the flags (``--lora-out --ctx 64`` is a forgotten value, not a file named ``--ctx``).

Parsing never prints: ``-h/--help`` raises :class:`HelpRequested` carrying the text, which
``cli.common.run_main`` prints on stdout (exit 0).  Nothing here imports numpy or numba, so
``--help`` and usage errors are fast.

To add flags later (chat data, evaluation): add a frozen dataclass section with defaults, a field
for it on the top-level args class, and a :class:`Group` of :class:`Opt` whose ``dest`` is
``"section.field"``; the help text and defaults follow from the table.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import textwrap
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.lora import LoraRanks
    from ..optim import AdamWConfig


class HelpRequested(Exception):
    """``-h``/``--help`` was given: ``text`` is the help to print on stdout (exit status 0)."""

    def __init__(self, text: str):
        super().__init__("help requested")
        self.text = text


def process_escapes(text: str | bytes) -> bytes:
    """llama.cpp's ``string_process_escapes`` (``--escape``) on UTF-8 bytes.

    ``\\n \\r \\t \\' \\" \\\\`` and ``\\xNN`` are replaced; any other backslash sequence, and a
    trailing backslash, are kept as written.  The implementation lives with the text pipeline
    (:func:`gguf_finetune.data.text.process_escapes`); it is imported on first use.
    """
    from ..data.text import process_escapes as _process

    return _process(text)


# ------------------------------------------------------------------------------------------------
# Values: a converter turns the raw string into a value or raises _Expected("what was expected").
# ------------------------------------------------------------------------------------------------
class _Expected(ValueError):
    pass


Converter = Callable[[str], Any]

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _range_text(noun: str, lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    """'an integer', 'a positive integer', 'an integer >= 0', 'a number in [0, 1)' ..."""
    article = "an" if noun[0] in "aeiou" else "a"
    if hi is None and ((noun == "integer" and lo == 1) or (lo == 0 and lo_open)):
        return f"a positive {noun}"
    if lo is None and hi is None:
        return f"{article} {noun}"
    if hi is None:
        return f"{article} {noun} {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{article} {noun} {'<' if hi_open else '<='} {hi}"
    return f"{article} {noun} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def int_value(lo: int | None = None, hi: int | None = None) -> Converter:
    """Decimal integer in [lo, hi] (either bound optional)."""
    what = _range_text("integer", lo, hi)

    def conv(raw: str) -> int:
        s = raw.strip()
        if not _INT_RE.fullmatch(s):
            raise _Expected(what)
        v = int(s)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _Expected(what)
        return v

    return conv


def float_value(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False) -> Converter:
    """Finite decimal number within the bounds (open or closed at each end)."""
    what = _range_text("number", lo, hi, lo_open, hi_open)

    def conv(raw: str) -> float:
        s = raw.strip()
        if not _FLOAT_RE.fullmatch(s):
            raise _Expected(what)
        v = float(s)
        if not math.isfinite(v):
            raise _Expected(what)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise _Expected(what)
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise _Expected(what)
        return v

    return conv


def choice_value(*choices: str) -> Converter:
    what = "one of " + ", ".join(choices)

    def conv(raw: str) -> str:
        v = raw.strip().lower()
        if v not in choices:
            raise _Expected(what)
        return v

    return conv


def size_value(raw: str) -> int | None:
    """A byte count like 2G, 512M, 1.5GiB, 1000000; 'auto' -> None.  Units are powers of 1024."""
    s = raw.strip()
    if s.lower() == "auto":
        return None
    m = _SIZE_RE.fullmatch(s)
    if not m:
        raise _Expected("a size like 2G, 512M or 'auto'")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if n <= 0:
        raise _Expected("a size like 2G, 512M or 'auto'")
    return n


def str_value(raw: str) -> str:
    return raw


# ------------------------------------------------------------------------------------------------
# The option table and the parser
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opt:
    """One flag.

    names      spellings shown in the help, e.g. ("-c", "--ctx"); the first ``--`` name is the
               canonical one used in error messages and in ``given``
    dest       where the value goes: "field" or "section.field" of the args dataclass
    metavar    one entry per value the flag takes; () for a flag without value (stores ``const``)
    convert    one converter per metavar
    make       builds the stored value from the converted values (default: the single value,
               or the tuple of values)
    append     collect every occurrence into a tuple, in command-line order
    default    the help's default text; None = derived from the dataclass default
    aliases    other accepted spellings (older names), listed in the help as "also ..."
    """

    names: tuple[str, ...]
    dest: str
    help: str
    metavar: tuple[str, ...] = ()
    convert: tuple[Converter, ...] = ()
    const: Any = True
    make: Callable[..., Any] | None = None
    append: bool = False
    default: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return next((n for n in self.names if n.startswith("--")), self.names[0])

    @property
    def takes_value(self) -> bool:
        return bool(self.metavar)


def opt(names: str, dest: str, help: str, metavar: str = "", convert: Converter | Sequence[Converter] = str_value,
        **kw) -> Opt:
    """Shorthand: ``opt("-c --ctx", "run.n_ctx", "...", "N", int_value(1))``; a flag has no metavar."""
    mv = tuple(metavar.split())
    conv = tuple(convert) if isinstance(convert, (tuple, list)) else (convert,) * len(mv)
    return Opt(tuple(names.split()), dest, help, mv, conv if mv else (), **kw)


def flag(names: str, dest: str, help: str, const: Any = True, **kw) -> Opt:
    return Opt(tuple(names.split()), dest, help, (), (), const=const, **kw)


@dataclass(frozen=True)
class Group:
    title: str
    opts: tuple[Opt, ...]


@dataclass(frozen=True)
class Positional:
    name: str  # shown in usage, e.g. "FILE"
    dest: str
    help: str = ""
    required: bool = True


def _norm(name: str) -> str:
    """llama.cpp treats '_' in '--long_names' as '-'."""
    return name.replace("_", "-") if name.startswith("--") else name


def _looks_like_number(tok: str) -> bool:
    return bool(_FLOAT_RE.fullmatch(tok))


class Parser:
    """Parses argv against groups of :class:`Opt`; builds ``defaults`` (a dataclass) with the values."""

    def __init__(self, prog: str, description: str, groups: Sequence[Group], defaults: Any,
                 positionals: Sequence[Positional] = (), epilog: str = ""):
        self.prog = prog
        self.description = description
        self.groups = tuple(groups)
        self.defaults = defaults
        self.positionals = tuple(positionals)
        self.epilog = epilog
        self.lookup: dict[str, Opt] = {}
        for o in self.options:
            for n in o.names + o.aliases:
                key = _norm(n)
                if key in self.lookup or key in ("-h", "--help"):
                    raise ValueError(f"option {n} defined twice")  # a bug in the table
                self.lookup[key] = o

    @property
    def options(self) -> list[Opt]:
        return [o for g in self.groups for o in g.opts]

    def find(self, name: str) -> Opt:
        return self.lookup[_norm(name)]

    def default_of(self, o: Opt) -> Any:
        return get_path(self.defaults, o.dest)

    # -- parsing ---------------------------------------------------------------------------------
    def parse(self, argv: Sequence[str]) -> Any:
        values: dict[str, Any] = {}
        given: list[str] = []
        pos: list[str] = []
        argv = [str(a) for a in argv]
        i, n = 0, len(argv)
        prev: Opt | None = None  # the option just before, for a hint on stray values
        only_positional = False
        while i < n:
            tok = argv[i]
            i += 1
            if only_positional or not tok.startswith("-") or tok == "-" or _looks_like_number(tok):
                if len(pos) >= len(self.positionals):
                    hint = f" ({prev.flag} takes no value)" if prev is not None and not prev.takes_value else ""
                    raise UsageError(f"unexpected argument {tok!r}{hint}")
                pos.append(tok)
                prev = None
                continue
            if tok == "--" and self.positionals:
                only_positional = True
                continue
            name, eq, inline = tok.partition("=") if tok.startswith("--") else (tok, "", "")
            key = _norm(name)
            if key in ("-h", "--help"):
                raise HelpRequested(self.help())
            o = self.lookup.get(key)
            if o is None:
                raise UsageError(f"unknown option {name!r}{self._suggest(key)}; see {self.prog} --help")
            if not o.takes_value:
                if eq:
                    raise UsageError(f"{o.flag}: takes no value, got {tok!r}")
                value = o.const
            else:
                raw: list[str] = [inline] if eq else []
                while len(raw) < len(o.metavar):
                    if i >= n:
                        raise UsageError(f"{o.flag}: missing value {o.metavar[len(raw)]}")
                    nxt = argv[i]
                    nkey = _norm(nxt.partition("=")[0])
                    if nxt.startswith("-") and (nkey in self.lookup or nkey in ("-h", "--help")):
                        raise UsageError(f"{o.flag}: missing value {o.metavar[len(raw)]} (got option {nxt!r})")
                    raw.append(nxt)
                    i += 1
                conv = []
                for mv, c, r in zip(o.metavar, o.convert, raw):
                    try:
                        conv.append(c(r))
                    except _Expected as e:
                        what = f" for {mv}" if len(o.metavar) > 1 else ""
                        raise UsageError(f"{o.flag}: expected {e}{what}, got {r!r}") from None
                value = o.make(*conv) if o.make else (conv[0] if len(conv) == 1 else tuple(conv))
            if o.append:
                values[o.dest] = tuple(values.get(o.dest, get_path(self.defaults, o.dest))) + (value,)
            else:
                values[o.dest] = value
            given.append(o.flag)
            prev = o
        for p, tok in zip(self.positionals, pos):
            values[p.dest] = tok
        missing = [p.name for p in self.positionals[len(pos):] if p.required]
        if missing:
            raise UsageError(f"missing {missing[0]}; see {self.prog} --help")
        if hasattr(self.defaults, "given"):
            values["given"] = frozenset(given)
        return build(self.defaults, values)

    def _suggest(self, key: str) -> str:
        close = difflib.get_close_matches(key, list(self.lookup), n=1, cutoff=0.75)
        return f" (did you mean {self.lookup[close[0]].flag}?)" if close else ""

    # -- help ------------------------------------------------------------------------------------
    def default_text(self, o: Opt) -> str:
        if o.default is not None:
            return o.default
        d = self.default_of(o)
        if not o.takes_value:
            return "(default)" if d == o.const else ""
        if d is None or o.append:
            return ""
        if isinstance(d, bool):
            return f"(default {'on' if d else 'off'})"
        if isinstance(d, int):
            return f"(default {d})"
        if isinstance(d, float):
            return f"(default {d:f})"  # llama.cpp prints floats with %f
        return f"(default '{d}')"

    def help(self, width: int | None = None) -> str:
        if width is None:
            width = max(80, min(120, shutil.get_terminal_size((100, 24)).columns))
        col = 29
        usage = f"usage: {self.prog} [options]" + "".join(
            f" {p.name}" if p.required else f" [{p.name}]" for p in self.positionals)
        lines = [usage, ""]
        if self.description:
            lines += textwrap.wrap(self.description, width) + [""]
        for p in self.positionals:
            lines += _two_columns(f"  {p.name}", p.help, col, width)
        if self.positionals:
            lines.append("")
        for gi, g in enumerate(self.groups):
            lines.append(f"{g.title}:")
            if gi == 0:
                lines += _two_columns("  -h, --help", "show this help message and exit", col, width)
            for o in g.opts:
                mv = "".join(" " + m for m in o.metavar)
                names = ", ".join(n + mv for n in o.names)
                text = o.help
                if o.aliases:
                    text += " (also " + ", ".join(a + mv for a in o.aliases) + ")"
                dt = self.default_text(o)
                if dt:
                    text += " " + dt
                lines += _two_columns("  " + names, text, col, width)
            lines.append("")
        if self.epilog:
            for para in self.epilog.split("\n\n"):
                lines += textwrap.wrap(para, width) + [""]
        return "\n".join(lines).rstrip() + "\n"


def _two_columns(left: str, text: str, col: int, width: int) -> list[str]:
    body = textwrap.wrap(text, max(30, width - col), break_on_hyphens=False, break_long_words=False) or [""]
    if len(left) < col:
        first = [left.ljust(col) + body[0]]
    else:
        first = [left, " " * col + body[0]]
    return first + [" " * col + b for b in body[1:]]


def get_path(obj: Any, dest: str) -> Any:
    for part in dest.split("."):
        obj = getattr(obj, part)
    return obj


def build(defaults: Any, values: dict[str, Any]) -> Any:
    """``defaults`` with ``values`` ({"field": v} or {"section.field": v}) replaced in."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for dest, v in values.items():
        sec, dot, name = dest.partition(".")
        if dot:
            sections.setdefault(sec, {})[name] = v
        else:
            top[dest] = v
    for sec, kv in sections.items():
        top[sec] = replace(getattr(defaults, sec), **kv)
    return replace(defaults, **top)


# ------------------------------------------------------------------------------------------------
# finetune
# ------------------------------------------------------------------------------------------------
# LoraRanks field (engine/lora.py) -> its --rank-* flag; norm targets default to rank 0 here.
RANK_FLAGS: dict[str, str] = {
    "att_norm": "--rank-att-norm", "ffn_norm": "--rank-ffn-norm", "out_norm": "--rank-out-norm",
    "tok_embd": "--rank-tok-embd", "out": "--rank-out", "wq": "--rank-wq", "wk": "--rank-wk", "wv": "--rank-wv",
    "wo": "--rank-wo", "ffn_gate": "--rank-ffn_gate", "ffn_down": "--rank-ffn_down", "ffn_up": "--rank-ffn_up",
}
NORM_TARGETS = ("att_norm", "ffn_norm", "out_norm")
SEED_RANDOM = -1
# Upper bounds of size-like flags, so that no number on the command line can ask for an absurd
# allocation (numpy's "maximum allowed dimension exceeded" or a late out-of-memory): a context of a
# million tokens, a million-sequence batch or a rank of a million are far beyond any CPU training
# run; what fits below them is checked against the model (ranks) and memory before training.
MAX_CTX = 1 << 20
MAX_BATCH = 1 << 20
MAX_RANK = 1 << 20
MAX_GRAD_ACC = 1 << 20
MAX_OPT_PAST = 1 << 20


@dataclass(frozen=True)
class ModelArgs:
    model_base: str = ""  # --model-base
    norm_rms_eps: float | None = None  # --norm-rms-eps; None: the model's value
    rope_freq_base: float | None = None  # --rope-freq-base; None: the model's value
    rope_freq_scale: float | None = None  # --rope-freq-scale; None: the model's value


@dataclass(frozen=True)
class LoraArgs:
    """What to adapt.  ``None`` ranks mean "not given": --lora-r for matrices, 0 for norms."""

    lora_r: int = 4
    lora_alpha: float | None = None  # None: equal to lora_r (llama.cpp's rule)
    rank_tok_embd: int | None = None
    rank_out_norm: int | None = None
    rank_out: int | None = None
    rank_att_norm: int | None = None
    rank_wq: int | None = None
    rank_wk: int | None = None
    rank_wv: int | None = None
    rank_wo: int | None = None
    rank_ffn_norm: int | None = None
    rank_ffn_gate: int | None = None
    rank_ffn_down: int | None = None
    rank_ffn_up: int | None = None

    @property
    def alpha(self) -> float:
        return float(self.lora_r if self.lora_alpha is None else self.lora_alpha)

    def resolved_ranks(self) -> dict[str, int]:
        """Rank per target (LoraRanks field names), as llama.cpp resolves them but norms -> 0."""
        out = {}
        for key in RANK_FLAGS:
            v = getattr(self, "rank_" + key)
            out[key] = v if v is not None else (0 if key in NORM_TARGETS else self.lora_r)
        return out

    def ranks(self) -> "LoraRanks":
        from ..engine.lora import LoraRanks

        return LoraRanks(**self.resolved_ranks())


@dataclass(frozen=True)
class DataArgs:
    train_data: str = "shakespeare.txt"
    sample_start: str = ""  # as given; see sample_start_bytes
    escape: bool = False
    include_sample_start: bool = False
    overlapping_samples: bool = False
    fill_with_next_samples: bool = False
    separate_with_eos: bool = False
    separate_with_bos: bool = True
    sample_random_offsets: bool = False
    force_reshuffle: bool = False
    data_format: str = "auto"  # auto | text | jsonl (auto: .jsonl/.ndjson files are JSONL)
    chat_template: str | None = None  # built-in name or file; None: the model's tokenizer.chat_template
    train_on_prompt: bool = False  # JSONL: also train on prompt/system/user tokens

    @property
    def sample_start_bytes(self) -> bytes:
        """The pattern the data pipeline looks for: UTF-8, escapes processed if --escape."""
        if self.escape:
            return process_escapes(self.sample_start)
        return self.sample_start.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class OptArgs:
    """AdamW, schedule and stopping flags (names as the flags; see adamw_config)."""

    adam_iter: int = 256
    adam_alpha: float = 1e-3
    adam_min_alpha: float = 0.0
    adam_decay: float = 0.1
    adam_decay_min_ndim: int = 2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_gclip: float = 1.0
    adam_epsf: float = 0.0
    warmup: int = 100
    cos_decay_steps: int = 1000
    cos_decay_restart: float = 1.1
    cos_decay_min: float = 0.1
    enable_restart: bool = False
    opt_past: int = 0
    opt_delta: float = 1e-5
    opt_max_no_improvement: int = 0
    epochs: int = -1

    def adamw_config(self) -> "AdamWConfig":
        from ..optim import AdamWConfig

        return AdamWConfig(
            alpha=self.adam_alpha, min_alpha=self.adam_min_alpha, decay=self.adam_decay,
            decay_min_ndim=self.adam_decay_min_ndim, beta1=self.adam_beta1, beta2=self.adam_beta2,
            gclip=self.adam_gclip, eps_f=self.adam_epsf, n_iter=self.adam_iter, past=self.opt_past,
            delta=self.opt_delta, max_no_improvement=self.opt_max_no_improvement, warmup=self.warmup,
            cos_decay_steps=self.cos_decay_steps, cos_decay_restart=self.cos_decay_restart,
            cos_decay_min=self.cos_decay_min, enable_restart=self.enable_restart,
        )


@dataclass(frozen=True)
class OutputArgs:
    lora_out: str = "ggml-lora-ITERATION-f32.gguf"
    only_write_lora: bool = False
    checkpoint_in: str = "checkpoint.gguf"
    checkpoint_out: str = "checkpoint-ITERATION.gguf"
    pattern_fn_it: str = "ITERATION"
    fn_latest: str = "LATEST"
    save_every: int = 10
    lora_format: str = "gguf"  # gguf | ggla
    lora_type: str = "f32"  # f32 | f16 | bf16
    metrics_out: str | None = None  # None: metrics.jsonl next to checkpoint_out

    @property
    def metrics_path(self) -> str:
        if self.metrics_out is not None:
            return self.metrics_out
        return os.path.join(os.path.dirname(self.checkpoint_out), "metrics.jsonl")


@dataclass(frozen=True)
class ValArgs:
    """Validation during training."""

    val_data: str | None = None  # --val-data
    val_split: float = 0.0  # --val-split: fraction of the training samples held out (0: none)
    eval_every: int = 0  # --eval-every: 0 = only at the end
    save_best: bool = False  # --save-best


@dataclass(frozen=True)
class RunArgs:
    seed: int = SEED_RANDOM  # -1: random (llama.cpp uses time(NULL))
    n_threads: int = 6
    n_ctx: int = 128
    n_batch: int = 8
    grad_acc: int = 1
    use_flash: bool = True
    use_checkpointing: bool = True
    n_gpu_layers: int = 0  # accepted and ignored: CPU-only engine
    memory_budget: int | None = None  # bytes; None: automatic
    low_memory: bool = False
    progress: bool | None = None  # None: on when stderr is a terminal


@dataclass(frozen=True)
class FinetuneArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    opt: OptArgs = field(default_factory=OptArgs)
    out: OutputArgs = field(default_factory=OutputArgs)
    run: RunArgs = field(default_factory=RunArgs)
    val: ValArgs = field(default_factory=ValArgs)
    given: frozenset[str] = frozenset()  # canonical names of the flags on the command line

    def is_given(self, flag: str) -> bool:
        """Whether the flag (any spelling) was on the command line: llama.cpp's ``custom_*`` (e.g. --ctx
        overrides a resumed checkpoint's context only when given)."""
        return _FINETUNE_LOOKUP[_norm(flag)].flag in self.given


_RANK_NOTE = ("Default here 0 = not adapted (llama.cpp: 1), because today's llama.cpp ignores norm adapters in "
              "GGUF adapters; give 1 to adapt it as llama.cpp's finetune did.")
_MODEL_VALUE = "(default: the model's value)"

FINETUNE_GROUPS: tuple[Group, ...] = (
    Group("options (llama.cpp finetune)", (
        opt("--model-base", "model.model_base", "model path from which to load base model", "FNAME"),
        opt("--lora-out", "out.lora_out", "path to save llama lora (format: see --lora-format)", "FNAME"),
        flag("--only-write-lora", "out.only_write_lora",
             "only save llama lora, don't do any training.  use this if you only want to convert a checkpoint "
             "to a lora adapter."),
        opt("--norm-rms-eps", "model.norm_rms_eps", "RMS-Norm epsilon value", "F", float_value(0, lo_open=True),
            default=_MODEL_VALUE),
        opt("--rope-freq-base", "model.rope_freq_base", "Frequency base for ROPE", "F",
            float_value(0, lo_open=True), default=_MODEL_VALUE),
        opt("--rope-freq-scale", "model.rope_freq_scale", "Frequency scale for ROPE", "F",
            float_value(0, lo_open=True), default=_MODEL_VALUE),
        opt("--lora-alpha", "lora.lora_alpha",
            "LORA alpha : resulting LORA scaling is alpha/r. Unlike llama.cpp's finetune, the alpha/r scaling is "
            "also applied in training, so the adapter behaves at inference as it did during training.", "N",
            float_value(0, lo_open=True), default="(default: equal to --lora-r, 4)"),
        opt("--lora-r", "lora.lora_r",
            "LORA r: default rank. Also specifies resulting scaling together with lora-alpha.", "N",
            int_value(1, MAX_RANK)),
        opt("--rank-att-norm", "lora.rank_att_norm",
            "LORA rank for attention norm tensor, overrides default rank. " + _RANK_NOTE, "N",
            int_value(0, MAX_RANK)),
        opt("--rank-ffn-norm", "lora.rank_ffn_norm",
            "LORA rank for feed-forward norm tensor, overrides default rank. " + _RANK_NOTE, "N",
            int_value(0, MAX_RANK)),
        opt("--rank-out-norm", "lora.rank_out_norm",
            "LORA rank for output norm tensor, overrides default rank. " + _RANK_NOTE, "N",
            int_value(0, MAX_RANK)),
        *(opt(RANK_FLAGS[k], "lora.rank_" + k, f"LORA rank for {what} tensor, overrides default rank.", "N",
              int_value(0, MAX_RANK))
          for k, what in (("tok_embd", "token embeddings"), ("out", "output"), ("wq", "wq"), ("wk", "wk"),
                          ("wv", "wv"), ("wo", "wo"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
                          ("ffn_up", "ffn_up"))),
        opt("--train-data", "data.train_data", "path from which to load training data", "FNAME"),
        opt("--checkpoint-in", "out.checkpoint_in", "path from which to load training checkpoint", "FNAME"),
        opt("--checkpoint-out", "out.checkpoint_out", "path to save training checkpoint", "FNAME"),
        opt("--pattern-fn-it", "out.pattern_fn_it",
            "pattern in output filenames to be replaced by iteration number", "STR"),
        opt("--fn-latest", "out.fn_latest",
            "string to use instead of iteration number for saving latest output", "STR"),
        opt("--save-every", "out.save_every",
            "save checkpoint and lora every N iterations. Disabled when N = 0 (llama.cpp: <= 0; a "
            "negative N is refused here as a likely typo).", "N", int_value(0)),
        opt("-s --seed", "run.seed", "RNG seed", "SEED", int_value(-1, 2**32 - 1),
            default="(default: -1, use random seed for -1)"),
        opt("-c --ctx", "run.n_ctx", "Context size used during training", "N", int_value(1, MAX_CTX)),
        opt("-t --threads", "run.n_threads", "Number of threads", "N", int_value(1)),
        opt("-b --batch", "run.n_batch", "Parallel batch size", "N", int_value(1, MAX_BATCH)),
        opt("--grad-acc", "run.grad_acc",
            "Number of gradient accumulation steps (simulates larger batch size of batch*gradacc)", "N",
            int_value(1, MAX_GRAD_ACC)),
        opt("--sample-start", "data.sample_start",
            "Sets the starting point for samples after the specified pattern. If empty use every token position "
            "as sample start.", "STR"),
        flag("--include-sample-start", "data.include_sample_start",
             "Include the sample start in the samples.", default="(default off)"),
        flag("--escape", "data.escape",
             "process sample start escapes sequences (\\n, \\r, \\t, \\', \\\", \\\\, also \\xNN)"),
        flag("--overlapping-samples", "data.overlapping_samples",
             "Samples may overlap, will include sample-start of second and following samples. When off, samples "
             "will end at begin of next sample.", default="(default off)"),
        flag("--fill-with-next-samples", "data.fill_with_next_samples",
             "Samples shorter than context length will be followed by the next (shuffled) samples.",
             default="(default off)"),
        flag("--separate-with-eos", "data.separate_with_eos",
             "When fill-with-next-samples, insert end-of-sequence token between samples."),
        flag("--separate-with-bos", "data.separate_with_bos",
             "When fill-with-next-samples, insert begin-of-sequence token between samples."),
        flag("--no-separate-with-eos", "data.separate_with_eos",
             "When fill-with-next-samples, don't insert end-of-sequence token between samples.", const=False),
        flag("--no-separate-with-bos", "data.separate_with_bos",
             "When fill-with-next-samples, don't insert begin-of-sequence token between samples.", const=False),
        flag("--sample-random-offsets", "data.sample_random_offsets",
             "Use samples beginning at random offsets. Together with fill-with-next-samples this may help for "
             "training endless text generation."),
        flag("--force-reshuffle", "data.force_reshuffle",
             "Force a reshuffling of data at program start, otherwise the shuffling of loaded checkpoint is "
             "resumed."),
        flag("--no-flash", "run.use_flash", "Don't use flash attention", const=False),
        flag("--use-flash", "run.use_flash", "Use flash attention (same results, less memory)."),
        flag("--no-checkpointing", "run.use_checkpointing", "Don't use gradient checkpointing", const=False),
        flag("--use-checkpointing", "run.use_checkpointing", "Use gradient checkpointing"),
        opt("--warmup", "opt.warmup", "Only for Adam optimizer. Number of warmup steps", "N", int_value(0)),
        opt("--cos-decay-steps", "opt.cos_decay_steps", "Only for Adam optimizer. Number of cosine decay steps",
            "N", int_value(1)),
        opt("--cos-decay-restart", "opt.cos_decay_restart",
            "Only for Adam optimizer. Increase of cosine decay steps after restart", "N",
            float_value(0, lo_open=True)),
        opt("--cos-decay-min", "opt.cos_decay_min", "Only for Adam optimizer. Cosine decay minimum", "N",
            float_value(0, 1)),
        flag("--enable-restart", "opt.enable_restart",
             "Only for Adam optimizer. Enable restarts of cos-decay. Takes no value (llama.cpp's help showed an N "
             "its parser never read)."),
        flag("--disable-restart", "opt.enable_restart",
             "Only for Adam optimizer. Disable restarts of cos-decay. Takes no value.", const=False),
        opt("--opt-past", "opt.opt_past",
            "Number of optimization iterations to track for delta convergence test. Disabled when zero.", "N",
            int_value(0, MAX_OPT_PAST)),
        opt("--opt-delta", "opt.opt_delta", "Maximum delta for delta convergence test. Disabled when <= zero.", "N",
            float_value()),
        opt("--opt-max-no-improvement", "opt.opt_max_no_improvement",
            "Maximum number of optimization iterations with no improvement. Disabled when <= zero.", "N",
            int_value()),
        opt("--epochs", "opt.epochs", "Maximum number epochs to process. Disabled when <= zero.", "N", int_value()),
        opt("--adam-iter", "opt.adam_iter", "Maximum number of Adam optimization iterations for each batch", "N",
            int_value(0)),
        opt("--adam-alpha", "opt.adam_alpha", "Adam learning rate alpha", "N", float_value(0, lo_open=True)),
        opt("--adam-min-alpha", "opt.adam_min_alpha",
            "Adam minimum learning rate alpha - including warmup phase", "N", float_value(0)),
        opt("--adam-decay", "opt.adam_decay",
            "AdamW weight decay. Values greater zero enable AdamW instead of regular Adam.", "N", float_value(0)),
        opt("--adam-decay-min-ndim", "opt.adam_decay_min_ndim",
            "Minimum number of tensor dimensions to apply AdamW weight decay. Weight decay is not applied to "
            "tensors with less n_dims.", "N", int_value(0)),
        opt("--adam-beta1", "opt.adam_beta1",
            "AdamW beta1 in interval [0,1). How much to smooth the first moment of gradients.", "N",
            float_value(0, 1, hi_open=True)),
        opt("--adam-beta2", "opt.adam_beta2",
            "AdamW beta2 in interval [0,1). How much to smooth the second moment of gradients.", "N",
            float_value(0, 1, hi_open=True)),
        opt("--adam-gclip", "opt.adam_gclip", "AdamW gradient clipping. Disabled when zero.", "N", float_value(0)),
        opt("--adam-epsf", "opt.adam_epsf", "AdamW epsilon for convergence test. Disabled when <= zero.", "N",
            float_value()),
        opt("-ngl --n-gpu-layers", "run.n_gpu_layers",
            "Number of model layers to offload to GPU. Accepted and ignored: this engine runs on the CPU only.",
            "N", int_value()),
    )),
    Group("gguf-finetune additions", (
        opt("--lora-format", "out.lora_format",
            "adapter format written to --lora-out: gguf (what today's llama.cpp loads) or ggla (the legacy .bin "
            "format llama.cpp's finetune wrote, whatever the file name)", "gguf|ggla", choice_value("gguf", "ggla"),
            default="(default: ggla when --lora-out ends in .bin, else gguf)"),
        opt("--lora-type", "out.lora_type", "tensor type of the adapter written to --lora-out", "f32|f16|bf16",
            choice_value("f32", "f16", "bf16")),
        opt("--metrics-out", "out.metrics_out", "write one JSON line of training metrics per iteration to FNAME",
            "FNAME", default="(default: metrics.jsonl next to --checkpoint-out)"),
        opt("--memory-budget", "run.memory_budget",
            "memory for float32 copies of the base weights, like 2G or 512M; beyond it weights are dequantized "
            "layer by layer", "SIZE", size_value, default="(default: auto)"),
        flag("--low-memory", "run.low_memory",
             "use as little memory as possible: never cache dequantized weights (slower)"),
        flag("--progress", "run.progress", "show a progress bar on stderr (default: on when stderr is a terminal)"),
        flag("--no-progress", "run.progress", "no progress bar", const=False),
    )),
    Group("instruction and chat data, validation (gguf-finetune additions)", (
        opt("--data-format", "data.data_format",
            "format of --train-data and --val-data: text (llama.cpp's samples) or jsonl (one record per line: "
            "{\"messages\": [{\"role\", \"content\"}, ...]}, ShareGPT {\"conversations\": [{\"from\", \"value\"}]}, "
            "{\"prompt\", \"completion\"} or {\"text\"}; mixed files are fine)", "auto|text|jsonl",
            default="(default: jsonl for .jsonl/.ndjson files, else text)"),
        opt("--chat-template", "data.chat_template",
            "render chat records with this template instead of the model's tokenizer.chat_template: a built-in "
            "name (chatml, llama2, llama3, mistral, zephyr, gemma, phi3) or a Jinja file (or a "
            "tokenizer_config.json)", "NAME|FILE", default="(default: the model's own template)"),
        flag("--train-on-prompt", "data.train_on_prompt",
             "JSONL data: train on every token, not only the assistant turns / completions"),
        opt("--val-data", "val.val_data", "validation data (same formats as --train-data)", "FNAME"),
        opt("--val-split", "val.val_split",
            "hold out this fraction of the training samples for validation (chosen by --seed; with --seed -1 "
            "by seed 0, so that a resumed run holds out the same samples)", "F", float_value(0, 1, hi_open=True),
            default="(default 0: none)"),
        opt("--eval-every", "val.eval_every",
            "compute the validation loss every N iterations (and at the end); 0 = only at the end", "N",
            int_value(0)),
        flag("--save-best", "val.save_best",
             "also keep the checkpoint and adapter of the lowest validation loss, named with 'best' in place of "
             "ITERATION"),
    )),
)

FINETUNE_DESCRIPTION = ("Train a LoRA adapter for a GGUF model on the CPU. Flags, defaults and files as in "
                        "llama.cpp's finetune (checkpoints resume in either tool).")


def finetune_parser(prog: str = "finetune") -> Parser:
    return Parser(prog, FINETUNE_DESCRIPTION, FINETUNE_GROUPS, FinetuneArgs())


_FINETUNE_LOOKUP = finetune_parser().lookup


DATA_FORMATS = ("auto", "text", "jsonl")


def parse_finetune_args(argv: Sequence[str], prog: str = "finetune") -> FinetuneArgs:
    """llama.cpp finetune's command line -> :class:`FinetuneArgs` (raises UsageError / HelpRequested)."""
    args = finetune_parser(prog).parse(argv)
    fmt = args.data.data_format.strip().lower()
    if fmt not in DATA_FORMATS:
        raise UsageError(f"--data-format: expected one of {', '.join(DATA_FORMATS)}, got {args.data.data_format!r}")
    if fmt != args.data.data_format:
        args = replace(args, data=replace(args.data, data_format=fmt))
    return args


# ------------------------------------------------------------------------------------------------
# export-lora
# ------------------------------------------------------------------------------------------------
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


@dataclass(frozen=True)
class ExportLoraArgs:
    model: str = ""  # -m/--model (older: --model-base)
    adapters: tuple[tuple[str, float], ...] = ()  # (path, scale) in command-line order
    n_threads: int = 2
    output: str = "ggml-lora-merged-f16.gguf"  # -o/--output (older: --model-out)
    outtype: str = "f16"
    given: frozenset[str] = frozenset()


EXPORT_LORA_GROUPS: tuple[Group, ...] = (
    Group("options (llama.cpp export-lora)", (
        opt("-m --model", "model", "model path from which to load base model", "FNAME", aliases=("--model-base",),
            default="(required)"),
        opt("--lora", "adapters", "path to LoRA adapter (can be repeated to use multiple adapters)", "FNAME",
            make=lambda path: (path, 1.0), append=True, aliases=("-l",)),
        opt("--lora-scaled", "adapters",
            "path to LoRA adapter with user defined scaling S (can be repeated to use multiple adapters)",
            "FNAME S", (str_value, float_value()), make=lambda path, s: (path, s), append=True, aliases=("-s",)),
        opt("-t --threads", "n_threads", "number of threads to use during computation", "N", int_value(1),
            default="(default: 2)"),
        opt("-o --output", "output", "output file", "FNAME", default="(default: 'ggml-lora-merged-f16.gguf')",
            aliases=("--model-out", "--output-file")),
    )),
    Group("gguf-finetune additions", (
        opt("--outtype", "outtype", "tensor type of the weights the adapters change (1-D tensors stay f32; all "
            "other tensors are copied unchanged)",
            "|".join(OUTTYPES), choice_value(*OUTTYPES),
            default="(default as llama.cpp: f16, but f32 base tensors stay f32)"),
    )),
)

EXPORT_LORA_DESCRIPTION = ("Merge LoRA adapters (GGUF adapters, finetune checkpoints or legacy .bin) into a "
                           "GGUF model. Adapters are applied in the order given, each with its scale.")


def export_lora_parser(prog: str = "export-lora") -> Parser:
    return Parser(prog, EXPORT_LORA_DESCRIPTION, EXPORT_LORA_GROUPS, ExportLoraArgs(),
                  epilog="example usage:  " + prog + " -m base-model.gguf --lora lora-file.gguf "
                         "-o merged-model-f16.gguf")


def parse_export_lora_args(argv: Sequence[str], prog: str = "export-lora") -> ExportLoraArgs:
    """llama.cpp export-lora's command line (new and older spellings) -> :class:`ExportLoraArgs`."""
    args = export_lora_parser(prog).parse(argv)
    if not args.model:
        raise UsageError("--model: no base model given (-m FNAME)")
    if not args.adapters:
        raise UsageError("--lora: no adapter given (--lora FNAME or --lora-scaled FNAME S)")
    return args
