"""A small table-driven command-line parser: flags -> typed, frozen dataclasses; bad flags -> one-line
:class:`UsageError`.

It behaves like llama.cpp's parsers rather than argparse: a value is always the next argument,
verbatim (``--seed -1``, ``--sample-start '-- '``); ``_`` and ``-`` are the same in ``--long-names``
(llama.cpp rewrites ``_`` to ``-``); the last occurrence of a flag wins.  On top of that it accepts
``--flag=value`` and refuses a value that is itself one of the flags (``--lora-out --ctx 64`` is a
forgotten value, not a file named ``--ctx``).

A command describes its flags as :class:`Group` s of :class:`Opt` whose ``dest`` is a dotted path
into the dataclass it fills (``"train.adam.alpha"``).  Defaults come from that dataclass, and so does
a flag's help text when the field carries one (``config.setting``); the ``--help`` text follows.

Parsing never prints: ``-h/--help`` raises :class:`HelpRequested` carrying the text, which
``cli.common.run_main`` prints on stdout (exit 0).  Nothing here imports numpy or numba, so
``--help`` and usage errors are fast.
"""

from __future__ import annotations

import difflib
import math
import re
import shutil
import textwrap
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from ..config import help_of
from ..errors import UsageError

# Upper bounds of size-like flags, so that no number on the command line can ask for an absurd
# allocation (numpy's "maximum allowed dimension exceeded" or a late out-of-memory): a context of a
# million tokens, a million-sequence batch or a rank of a million are far beyond any CPU training
# run; what fits below them is checked against the model (ranks) and memory before training.
MAX_CTX = 1 << 20
MAX_BATCH = 1 << 20
MAX_RANK = 1 << 20
MAX_GRAD_ACC = 1 << 20
MAX_OPT_PAST = 1 << 20


class HelpRequested(Exception):
    """``-h``/``--help`` was given: ``text`` is the help to print on stdout (exit status 0)."""

    def __init__(self, text: str):
        super().__init__("help requested")
        self.text = text


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
    help: str | None  # None: the help of the dataclass field at ``dest``
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


def opt(names: str, dest: str, help: str | None, metavar: str = "",
        convert: Converter | Sequence[Converter] = str_value, **kw) -> Opt:
    """Shorthand: ``opt("-c --ctx", "train.n_ctx", None, "N", int_value(1))``; a flag has no metavar."""
    mv = tuple(metavar.split())
    conv = tuple(convert) if isinstance(convert, (tuple, list)) else (convert,) * len(mv)
    return Opt(tuple(names.split()), dest, help, mv, conv if mv else (), **kw)


def flag(names: str, dest: str, help: str | None, const: Any = True, **kw) -> Opt:
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


def norm_flag(name: str) -> str:
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
                key = norm_flag(n)
                if key in self.lookup or key in ("-h", "--help"):
                    raise ValueError(f"option {n} defined twice")  # a bug in the table
                self.lookup[key] = o

    @property
    def options(self) -> list[Opt]:
        return [o for g in self.groups for o in g.opts]

    def find(self, name: str) -> Opt:
        return self.lookup[norm_flag(name)]

    def default_of(self, o: Opt) -> Any:
        return get_path(self.defaults, o.dest)

    def help_of(self, o: Opt) -> str:
        if o.help is not None:
            return o.help
        parent, _, name = o.dest.rpartition(".")
        text = help_of(get_path(self.defaults, parent) if parent else self.defaults, name)
        if text is None:
            raise ValueError(f"option {o.flag}: no help text (neither in the table nor on its field)")  # a bug
        return text

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
            key = norm_flag(name)
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
                    nkey = norm_flag(nxt.partition("=")[0])
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
                text = self.help_of(o)
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
    """``defaults`` with ``values`` ({"field": v} or {"section.sub.field": v}) replaced in."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for dest, v in values.items():
        sec, dot, rest = dest.partition(".")
        if dot:
            sections.setdefault(sec, {})[rest] = v
        else:
            top[dest] = v
    for sec, kv in sections.items():
        top[sec] = build(getattr(defaults, sec), kv)
    return replace(defaults, **top)
