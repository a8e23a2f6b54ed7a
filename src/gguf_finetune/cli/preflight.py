"""finetune's checks before training starts: ranks that fit the model, outputs that overwrite no
input (and not each other), and a memory estimate that names the flags responsible.

Each check raises a one-line :class:`UserError` (``UsageError`` for a flag value that cannot work
with this model) before anything is written and before the data is tokenized.
"""

from __future__ import annotations

import functools
import os
import resource
from dataclasses import dataclass, field
from typing import Iterator

from ..arch import weight
from ..errors import UsageError, UserError

# ------------------------------------------------------------------------------------------------
# ranks
# ------------------------------------------------------------------------------------------------


def check_ranks_fit(a, hp, ranks, model_path: str) -> None:
    """A rank above the adapted tensor's larger dimension only costs memory (the update cannot have
    a higher rank than that): refuse it, naming the flag it came from (exit 2)."""
    for t in hp.spec.targets():
        r = getattr(ranks, t.key)
        if r <= 0:
            continue
        n_out, n_in = hp.lora_dims(t.tensor)
        limit = max(n_out, n_in)
        if r > limit:
            flag = t.flag if t.key in a.lora.given_ranks() else "--lora-r"
            name = weight(t.tensor, 0 if t.per_layer else None)
            shape = f"{n_in}" if n_out == 1 else f"{n_out} x {n_in}"
            raise UsageError(f"{flag} {r}: larger than tensor '{name}' ({shape}) of the model '{model_path}'; "
                             f"a rank for it can be at most {limit}")


# ------------------------------------------------------------------------------------------------
# output names
# ------------------------------------------------------------------------------------------------
def output_name(pattern_path: str, pattern: str, value: str) -> str:
    """llama.cpp's get_train_filename: the first occurrence of ``pattern`` replaced by ``value``."""
    return pattern_path.replace(pattern, value, 1) if pattern else pattern_path


def best_name(path: str, pattern: str) -> str:
    """The --save-best file name: 'best' in place of the ITERATION pattern, or '-best' before the
    extension when the name has no pattern."""
    if pattern and pattern in path:
        return output_name(path, pattern, "best")
    root, ext = os.path.splitext(path)
    return f"{root}-best{ext}"


def check_output_dir(path: str, flag: str) -> None:
    """Fail before training, not at the first save, when an output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} '{path}': folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{path}': folder '{folder}' is not writable")
    if os.path.isdir(path):
        raise UserError(f"{flag} '{path}': is a directory, expected a file name")


# ------------------------------------------------------------------------------------------------
# outputs vs inputs
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _entry(path: str) -> str:
    """The directory entry a write to ``path`` replaces: the folder resolved, the name as given
    (an atomic write renames over a symlink, it does not write through it)."""
    ap = os.path.abspath(path)
    return os.path.join(_real_folder(os.path.dirname(ap)), os.path.basename(ap))


def _canonical_number(s: str) -> int | None:
    if s.isdigit() and s.isascii() and (s == "0" or not s.startswith("0")):
        return int(s)
    return None


@dataclass
class Output:
    """The files one output flag may write.

    ``path`` with its first ``pattern`` replaced by one of ``words`` or by an iteration number in
    (``lo``, ``hi``]; a path without the pattern is written as it is (when ``words`` or numbers say
    anything is written at all).  ``extra``: further fixed names (the --save-best name of a path
    without the pattern).  ``appends``: the file is appended to (which follows symlinks), not
    replaced.  ``replaceable_by``: input flags whose file may be replaced by this output's word or
    fixed names, not by a numbered one (the LATEST checkpoint a run resumes from is meant to be
    replaced by the next save).
    """

    flag: str
    path: str
    pattern: str = ""
    words: tuple[str, ...] = ()
    lo: int = 0
    hi: int = 0
    extra: tuple[str, ...] = ()
    appends: bool = False
    replaceable_by: frozenset = frozenset()

    def __post_init__(self):
        if not self.pattern or self.pattern not in self.path:
            self.pattern = ""

    def writes_anything(self) -> bool:
        return bool(self.words) or self.hi > self.lo

    def _name(self, value: str) -> str:
        return self.path.replace(self.pattern, value, 1)

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = os.path.realpath(name) if self.appends else _entry(name)
        return key

    @functools.cached_property
    def _keys(self) -> dict[str, str]:
        return {}

    def names(self, n_numbers: int = 200) -> Iterator[tuple[str, bool]]:
        """(name, numbered) for every fixed name and word, and the first ``n_numbers`` and the last
        iteration numbers."""
        for x in self.extra:
            yield x, False
        if not self.writes_anything():
            return
        if not self.pattern:
            yield self.path, False
            return
        for w in self.words:
            yield self._name(w), False
        if self.hi > self.lo:
            for k in range(self.lo + 1, min(self.hi, self.lo + n_numbers) + 1):
                yield self._name(str(k)), True
            if self.hi > self.lo + n_numbers:
                yield self._name(str(self.hi)), True

    def writes(self, target: str) -> tuple[str, bool] | None:
        """(name, numbered) if this output may replace the entry ``target`` (from :func:`_entry`
        or a resolved path), else None.  Numbers are matched by form, so a run of any length is
        checked without listing its names."""
        for x in self.extra:
            if self._key(x) == target:
                return x, False
        if not self.writes_anything():
            return None
        if not self.pattern:
            return (self.path, False) if self._key(self.path) == target else None
        head, _, tail = self.path.partition(self.pattern)
        if os.sep in tail or (os.altsep and os.altsep in tail):  # the pattern is in a folder name
            return next(((n, num) for n, num in self.names() if self._key(n) == target), None)
        probe = self._key(head + "x" + tail)  # the folder, resolved
        if os.path.dirname(target) != os.path.dirname(probe):
            return None
        base, bhead = os.path.basename(target), os.path.basename(head + "x")[:-1]
        if not (base.startswith(bhead) and base.endswith(tail) and len(base) >= len(bhead) + len(tail)):
            return None
        middle = base[len(bhead):len(base) - len(tail)]
        if middle in self.words:
            return self._name(middle), False
        k = _canonical_number(middle)
        if k is not None and self.lo < k <= self.hi:
            return self._name(middle), True
        return None


@dataclass
class Input:
    flag: str
    path: str
    what: str

    def keys(self) -> list[str]:
        # the entry itself, and the file it links to (replacing either loses what was read)
        return list(dict.fromkeys([_entry(self.path), os.path.realpath(self.path)]))


def check_outputs(outputs: list[Output], inputs: list[Input]) -> None:
    """Refuse an output that would replace (or append to) an input file or another output's file."""
    _real_folder.cache_clear()  # (folders may have changed since the last call)
    for inp in inputs:
        if not inp.path or not os.path.exists(inp.path):
            continue
        for out in outputs:
            for key in inp.keys():
                hit = out.writes(key)
                if hit is None:
                    continue
                name, numbered = hit
                if inp.flag in out.replaceable_by and not numbered:
                    continue
                written = f" (as '{name}')" if name not in (out.path, inp.path) else ""
                raise UserError(f"{out.flag} '{out.path}': would overwrite {inp.what} '{inp.path}' "
                                f"({inp.flag}){written}; give the output another name")
    for i, first in enumerate(outputs):
        for second in outputs[i + 1:]:
            # a name written by both is among the names of either; listing the output without the
            # pattern (few names) against the other is enough, two patterns are listed both ways
            if not first.pattern:
                clash = _clash(first, second)
            elif not second.pattern:
                clash = _clash(second, first)
            else:
                clash = _clash(first, second) or _clash(second, first)
            if clash:
                raise UserError(f"{second.flag} '{second.path}' and {first.flag} '{first.path}' would both write "
                                f"'{clash}'; give them different names")


def _clash(a: Output, b: Output) -> str | None:
    for name, _numbered in a.names():
        keys = {_entry(name), os.path.realpath(name)} if (a.appends or b.appends) else {_entry(name)}
        if any(b.writes(k) is not None for k in keys):
            return name
    return None


def finetune_outputs(a, first_iteration: int) -> list[Output]:
    """What a finetune run with these flags may write, starting at iteration ``first_iteration``."""
    o = a.out
    pattern = o.pattern_fn_it
    if o.only_write_lora:
        return [Output("--lora-out", o.lora_out, pattern, (str(first_iteration),))]
    n = a.train.adam.n_iter
    outs = []
    for flag, path in (("--checkpoint-out", o.checkpoint_out), ("--lora-out", o.lora_out)):
        patterned = bool(pattern) and pattern in path
        words: tuple[str, ...] = (o.fn_latest,) if n > 0 else ()
        extra: tuple[str, ...] = ()
        if a.val.save_best:
            if patterned:
                words += ("best",)
            else:
                extra = (best_name(path, pattern),)
        if not patterned and n > 0:
            words = ("",)  # the one name every save writes
        outs.append(Output(flag, path, pattern, words, first_iteration, first_iteration + n, extra))
    outs[0].replaceable_by = frozenset({"--checkpoint-in"})
    outs.append(Output("--metrics-out", o.metrics_path, "", ("",), appends=True))
    return outs


def finetune_inputs(a) -> list[Input]:
    ins = [Input("--model-base", a.model.model_base, "the base model")]
    if a.out.checkpoint_in:
        ins.append(Input("--checkpoint-in", a.out.checkpoint_in, "the checkpoint"))
    if not a.out.only_write_lora:
        ins.append(Input("--train-data", a.data.train_data, "the training data"))
        if a.val.val_data:
            ins.append(Input("--val-data", a.val.val_data, "the validation data"))
        if a.data.chat_template:
            ins.append(Input("--chat-template", a.data.chat_template, "the chat template"))
    return ins


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Bytes a training step needs beyond the loaded model, by cause."""

    parts: dict[str, int] = field(default_factory=dict)  # label -> bytes
    flags: dict[str, str] = field(default_factory=dict)  # label -> the flags to lower

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def gib(n: float) -> str:
    for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def estimate_training_memory(a, hp, lora_size: int, itemsize: int = 4) -> MemoryEstimate:
    """What a training step allocates beyond the loaded model, from engine/forward.py and
    backward.py, on the low side so that a run that fits is not refused (the measured growth of the
    peak RSS was 1.2x this on SmolLM2-135M at ctx 256 x batch 4, 1.25-1.8x on the tiny test model):

    - LoRA parameters, gradients, both Adam moments and the decay mask: 5 values per parameter;
    - activations, N = batch x ctx rows: a block's forward cache, N·(7·C + 2·C_kv + 3·F + 7·r)
      values (plus the [B, H, T, T] attention probabilities without flash attention), and its
      backward temporaries, N·(3·C + C_kv + 3·F); with gradient checkpointing one cache and one
      [N, C] input per block, without it every block's cache;
    - the output head: [N, C] hidden states and their gradient, and one chunk of logits (at most
      64 MB, forward.head_rows).
    """
    B, T = a.train.n_batch, a.train.n_ctx
    N = B * T
    C, F, Ckv, V, L = hp.n_embd, hp.n_ff, hp.n_embd_kv, hp.n_vocab, hp.n_layer
    r = max(a.lora.lora_r, 1)
    cache = N * (7 * C + 2 * Ckv + 3 * F + 7 * r)
    if not a.train.flash:
        cache += B * hp.n_head * T * T
    temps = N * (3 * C + Ckv + 3 * F)
    act = (L * N * C + cache + temps) if a.train.checkpointing else (L * cache + temps)
    head = 3 * N * C + min(N * V, (64 << 20) // itemsize)
    est = MemoryEstimate()
    label = f"activations for --ctx {T} x --batch {B}"
    est.parts[label] = (act + head) * itemsize
    est.flags[label] = "--ctx or --batch" + ("" if a.train.checkpointing else " (or drop --no-checkpointing)") \
        + ("" if a.train.flash else " (or drop --no-flash)")
    label = "LoRA weights and optimizer state"
    est.parts[label] = 5 * lora_size * itemsize
    est.flags[label] = " or ".join(["--lora-r"] + sorted(f for f in a.given if f.startswith("--rank-")))
    return est


def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_available() -> tuple[int, str]:
    """(bytes this process can still allocate, where the limit comes from)."""
    from ..model import available_memory  # lazy: model imports numba; --help stays fast

    avail, why = available_memory(), "available"
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        vm = _vm_size()
        if vm is not None and soft - vm < avail:
            avail, why = max(0, soft - vm), "left under the address-space limit (ulimit -v)"
    return avail, why


def check_memory(a, hp, lora_size: int, available: tuple[int, str] | None = None) -> MemoryEstimate:
    est = estimate_training_memory(a, hp, lora_size)
    avail, why = available if available is not None else memory_available()
    if est.total > avail:
        parts = sorted(est.parts.items(), key=lambda kv: -kv[1])
        detail = "; ".join(f"{label}: {gib(n)}" for label, n in parts)
        # name what to lower: the largest part, and any other part of at least a quarter of the total
        lower = [est.flags[label] for label, n in parts if n == parts[0][1] or 4 * n >= est.total]
        raise UserError(f"training needs about {gib(est.total)} of memory ({detail}), more than the "
                        f"{gib(avail)} {why}; lower {' / '.join(lower)}")
    return est


__all__ = ["Input", "MemoryEstimate", "Output", "check_memory", "check_outputs", "check_ranks_fit",
           "estimate_training_memory", "finetune_inputs", "finetune_outputs", "memory_available"]

