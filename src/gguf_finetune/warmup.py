"""First-run compilation: the numba kernels of a training step, compiled while the model loads.

numba compiles a kernel on its first call and keeps the machine code in its on-disk cache
(``cache=True``); later runs load it in milliseconds.  With a cold cache (a fresh install, edited
sources, another numba) the first step of a run used to wait ~25 s for the compiler.

:func:`start` looks at the cache and, when the step's kernels are missing from it, starts one child
process that compiles them while this process loads the model and the data.  A *job* calls kernels
through the engine's wrappers on tiny arrays of the step's dtype, so it compiles exactly the
specializations the step uses.  :meth:`Warmup.finish` then runs here the jobs the child has not
claimed, from the other end of the list (the short ones: the long flash kernels and the helpers
they share stay in one process), and the jobs only the loaded model tells (its activation, its
adapters, validation: see :class:`Plan`), compiles the dequantizers of its tensor types, and waits
for the child.  The first step then loads everything from the cache.

A job is claimed by creating a file (O_EXCL) in a folder both processes know, so each runs once.
A helper two jobs share (exp, max, the attention scores) may still be compiled in both processes,
with the same signature: numba numbers a function's new cache files by the index it read, so two
*different* new entries written at once could collide, two identical ones cannot matter.

Nothing here prints: the caller passes ``say`` for the one notice line (:data:`NOTICE`).  The cache
check reads numba's cache index through private attributes; if that fails, nothing is started and
the kernels compile on first use, as without this module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numba
import numpy as np
from numba.core import event

from . import optim, quants
from .arch import FFN_DOWN, OUTPUT, TOKEN_EMBD, weight
from .config import AdamWConfig
from .engine import kernels as K
from .engine.backward import head_streamed
from .engine.forward import head_rows, logits_bytes

NOTICE = "compiling kernels (once per install)…"


# -- what a step compiles ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What a training step compiles: the run's switches (known before the model is read), then
    what the loaded model adds (its family's activation, its adapters, the size of a step, and
    whether validation runs).  See :func:`plan_for`."""

    flash: bool = True
    checkpointing: bool = True
    dtype: str = "float32"
    # -- from the loaded model (the defaults: nothing beyond the jobs every step runs)
    act: str = ""  # the gated activation: "silu" (SwiGLU), "gelu_tanh" (GeGLU, Gemma); "": not known yet
    lora_u: bool = False  # checkpointing recomputes an adapted ffn_down's x·a alone (no post-FFN norm)
    norm_adapters: bool = False  # norm weights adapted: rmsnorm's weight gradient
    embd_adapter: bool = False  # token_embd adapted: s·b[tok]·aᵀ added to the rows, db scattered
    out_adapter: bool = False  # output head adapted: added per head chunk, wide backward
    rows: int = 0  # positions of one step in this process
    head_rows: int = 0  # most rows of a head chunk (engine.forward.head_rows)
    n_embd: int = 0
    n_vocab: int = 0
    head_chunk: int = 4096  # vocabulary columns per head chunk (model.Weights.HEAD_CHUNK_ROWS)
    evaluate: bool = False  # validation: forward and cross-entropy without gradient
    head_streamed: bool = False  # the head is not cached and its logits may take several row chunks
    stream_rows: int = 0  # most rows of a block of a streamed head's logits (engine.backward._streamed_logits)

    def lora_add_variants(self) -> set[tuple[bool, bool]]:
        """(parallel, strided) kernels of kernels.lora_add the step can call: the embedding's rows
        [rows, C]; the head's gradient [n, C] and logits chunks [n, columns of a chunk] (views of the
        whole logits when there are several chunks), n up to ``head_rows``; the parallel kernel from
        kernels.LORA_ADD_PARALLEL elements on."""
        lim = K.LORA_ADD_PARALLEL
        out = set()
        if self.embd_adapter:
            out.add((self.rows * self.n_embd >= lim, False))
        if self.out_adapter and self.head_streamed:  # contiguous blocks [n, columns of a chunk]
            V, chunk = self.n_vocab, self.head_chunk
            widths = {min(V, chunk)} | ({V % chunk} if V > chunk and V % chunk else set())
            out.add((False, False))
            if self.rows * self.n_embd >= lim or any(self.stream_rows * w >= lim for w in widths):
                out.add((True, False))
        elif self.out_adapter:
            n, V, chunk = max(1, self.head_rows), self.n_vocab, self.head_chunk
            out.add((False, False))  # the gradient of few rows (and a chunk of one row: contiguous)
            if n * self.n_embd >= lim:
                out.add((True, False))
            widths = {min(V, chunk)} | ({V % chunk} if V > chunk and V % chunk else set())
            strided = V > chunk and n > 1
            out.add((False, strided))
            if any(n * w >= lim for w in widths):
                out.add((True, strided))
        return out


def plan_for(weights, hp, lora, flash: bool, checkpointing: bool, rows: int, evaluate: bool) -> Plan:
    """The :class:`Plan` of a training step on ``weights`` (model.Weights) of ``hp`` with the LoRA
    set ``lora`` (lora.LoraParams), ``rows`` positions per step in this process."""
    specs = lora.layout.specs
    names = {s.name for s in specs}
    dt = np.dtype(weights.dtype)
    downs = any(weight(FFN_DOWN, il) in names for il in range(hp.n_layer - 1))  # (the last block is kept)
    return Plan(flash=bool(flash), checkpointing=bool(checkpointing), dtype=dt.name,
                act=hp.spec.act, lora_u=bool(checkpointing) and downs and not hp.spec.post_norms,
                norm_adapters=any(s.kind == "norm" for s in specs), embd_adapter=weight(TOKEN_EMBD) in names,
                out_adapter=weight(OUTPUT) in names, rows=int(rows),
                head_rows=head_rows(weights, max(1, int(rows)), dt.itemsize), n_embd=hp.n_embd,
                n_vocab=hp.n_vocab, head_chunk=weights.HEAD_CHUNK_ROWS, evaluate=bool(evaluate),
                head_streamed=head_streamed(weights, max(1, int(rows)), dt.itemsize),
                stream_rows=max(1, min(int(rows), logits_bytes(weights) // (weights.HEAD_CHUNK_ROWS * dt.itemsize))))


@dataclass(frozen=True)
class Job:
    name: str
    kernels: tuple  # the numba dispatchers it compiles (what the cache check looks at)
    run: Callable[[], None]


def jobs(plan: Plan) -> list[Job]:
    """The jobs of ``plan``'s step: first those every step runs (longest first: what the child
    takes), then those of the model's options."""
    dt = np.dtype(plan.dtype)
    B, T, Hq, Hkv, D, C, F, R, V = 1, 5, 2, 1, 4, 8, 8, 2, 16
    N = B * T

    def a(*shape, dtype=dt):
        return np.linspace(-1.0, 1.0, int(np.prod(shape))).astype(dtype).reshape(shape)

    x, w, g = a(N, C), a(C), a(N, F)
    q, k, v, dout = a(B, Hq, T, D), a(B, Hkv, T, D), a(B, Hkv, T, D), a(B, Hq, T, D)

    def attention() -> None:
        K.attention_backward(dout, q, k, v, K.attention_forward(q, k, v, 0.5)[1], 0.5)

    def rope() -> None:
        cos, sin = K.rope_cache(np.arange(T), D, 10000.0, 1.0, dt)
        K.rope_backward(K.rope_forward(a(B, T, Hq, D), cos[None], sin[None], D), cos[None], sin[None], D)

    def adamw() -> None:
        p = np.zeros(16, np.float32)
        optim.adamw_step(p, p.copy(), p.copy(), p.copy(), 1, 1.0, AdamWConfig(), np.ones(16, dtype=bool))
        optim.cosf(0.5)

    def gated(fwd, bwd) -> Callable[[], None]:
        return lambda: (bwd(g, g, g), fwd(g, g))

    def lora() -> None:  # an adapted linear's terms, forward and backward
        K.lora_forward(x, a(C, R), a(C, R), 0.5, a(N, C))
        K.lora_backward(x, x, a(N, R), a(C, R), a(C, R), 0.5, a(N, C), a(C, R), a(C, R))

    def lora_add() -> None:
        for par, strided in sorted(plan.lora_add_variants()):
            y = a(N, 2 * C)[:, :C] if strided else a(N, C)
            (K._lora_add_par if par else K._lora_add)(y, a(N, R), np.ascontiguousarray(a(C, R).T))

    if plan.flash:
        out = [Job("flash_fwd", (K._flash_fwd,), lambda: K.flash_attention_forward(q, k, v, 0.5)),
               Job("flash_bwd", (K._flash_bwd,),
                   lambda: K.flash_attention_backward(dout, q, k, v, q, a(B, Hq, T), 0.5))]
    else:
        out = [Job("attention", (K._causal_softmax, K._causal_softmax_bwd), attention)]
    out += [Job("xent", (K._xent_fwd_bwd,),
                lambda: K.xent_forward_backward(a(N, V), np.zeros(N, np.int32), a(N), 0.5)),
            Job("lora", (K._lora_fwd, K._lora_bwd, K._sum_parts), lora),
            Job("rope", (K._rope_tables, K._powf, K._rope_fwd, K._rope_bwd), rope),
            Job("rmsnorm_bwd", (K._rmsnorm_bwd_dx,), lambda: K.rmsnorm_backward(x, x, w, a(N), False)),
            Job("rmsnorm", (K._rmsnorm_fwd,), lambda: K.rmsnorm_forward(x, w, 1e-5)),
            Job("adamw", (optim._adamw, optim._powf, optim._cosf), adamw)]
    # -- what the model adds
    if plan.act == "gelu_tanh":
        out.append(Job("geglu", (K._geglu_fwd, K._geglu_bwd), gated(K.geglu_forward, K.geglu_backward)))
    elif plan.act:
        out.append(Job("swiglu", (K._swiglu_fwd, K._swiglu_bwd), gated(K.swiglu_forward, K.swiglu_backward)))
    if plan.lora_u:
        out.append(Job("lora_u", (K._lora_u,), lambda: K.lora_u(x, a(C, R))))
    if plan.norm_adapters:
        out.append(Job("rmsnorm_dw", (K._rmsnorm_bwd_dw,), lambda: K.rmsnorm_backward(x, x, w, a(N), True)))
    if plan.embd_adapter or plan.out_adapter:
        variants = plan.lora_add_variants()
        out.append(Job("lora_add", tuple(K._lora_add_par if p else K._lora_add for p in sorted({p for p, _ in variants})),
                       lora_add))
    if plan.out_adapter:
        out.append(Job("lora_wide", (K._lora_wide_bwd, K._sum_parts),
                       lambda: K.lora_wide_backward(a(N, V), a(N, R), a(V, R), 0.5, np.zeros((V, R), dt))))
    if plan.embd_adapter:
        out.append(Job("scatter", (K._scatter_add,),
                       lambda: K.embedding_scatter_add(np.zeros((V, R), dt), np.arange(N), a(N, R))))
    if plan.head_streamed:  # engine.backward._head_loss_streamed
        def xent_streamed() -> None:
            m, tot, lt = np.full(N, -np.inf, dt), np.zeros(N), np.zeros(N)
            K.xent_stats(a(N, V), 0, np.zeros(N, np.int32), m, tot, lt)
            K.xent_grad(a(N, V), 0, np.zeros(N, np.int32), m, tot, a(N, dtype=np.float64), 0.5)

        out.append(Job("xent_streamed", (K._xent_stats, K._xent_grad), xent_streamed))
    if plan.evaluate:
        out.append(Job("xent_eval", (K._xent_fwd,), lambda: K.xent_forward(a(N, V), np.zeros(N, np.int32))))
    return out


def step_plan(plan: Plan) -> Plan:
    """The part of ``plan`` known before the model is read (the child's list)."""
    return Plan(flash=plan.flash, checkpointing=plan.checkpointing, dtype=plan.dtype)


def compile_dequantizers(tensors) -> None:
    """Compile (or load) the dequantization kernel of each tensor type among ``tensors`` (gguf
    ReaderTensors) on one row of its data: what a step dequantizes (the head's chunks, the
    embedding's rows, and every layer with --low-memory) is then ready."""
    seen = set()
    supported = {int(t) for t in quants.SUPPORTED}
    for t in tensors:
        qt = int(t.tensor_type)
        if qt not in seen and qt in supported and t.data.size:
            seen.add(qt)
            quants.dequantize_rows(t.data, qt, 0, 1)


# -- the cache --------------------------------------------------------------------------------------

def _in_cache(dispatcher) -> bool:
    """numba's cache index for this kernel's current source exists and lists compiled code (the
    index is missing or stale on a fresh install, after an edit, or under another numba).
    Private numba attributes: the caller treats an exception as "cannot tell"."""
    return bool(dispatcher._cache._cache_file._load_index())


def cold(job_list: Sequence[Job]) -> list[str]:
    """Names of the jobs with a kernel not in the cache (raises when numba's cache cannot be read)."""
    return [j.name for j in job_list if not all(_in_cache(k) for k in j.kernels)]


def run_unclaimed(job_list: Sequence[Job], names: Sequence[str], claims: str) -> list[str]:
    """Run the jobs ``names`` (in that order) that no other process has claimed in the folder
    ``claims``; returns the names run here."""
    by_name = {j.name: j for j in job_list}
    done = []
    for name in names:
        try:
            os.close(os.open(os.path.join(claims, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        by_name[name].run()
        done.append(name)
    return done


# -- the notice -------------------------------------------------------------------------------------

class Notice:
    """Says :data:`NOTICE` once (through ``say``): when :func:`start` finds a cold cache, or when
    numba is about to compile anything in this process (a kernel no job covers, a new tensor type).
    Listens to numba's compile events until :meth:`close`."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.said = say, False
        notice = self

        class Listener(event.Listener):
            def on_start(self, ev) -> None:
                notice.announce()

            def on_end(self, ev) -> None:
                pass

        self._listener = Listener()
        event.register("numba:compile", self._listener)

    def announce(self) -> None:
        if not self.said:
            self.said = True
            self.say(NOTICE)

    def close(self) -> None:
        if self._listener is not None:
            event.unregister("numba:compile", self._listener)
            self._listener = None


# -- the child --------------------------------------------------------------------------------------

SRC = str(Path(__file__).resolve().parent.parent)  # the folder holding this package

# the child imports this very package: its folder goes first on sys.path unless it is there already
# (an installed package's site-packages, which must not go before the standard library)
_CHILD = ("import os, sys; p = sys.argv[1]; r = os.path.realpath\n"
          "if r(p) not in [r(x or '.') for x in sys.path]: sys.path.insert(0, p)\n"
          "import gguf_finetune\n"
          "if r(os.path.dirname(os.path.dirname(gguf_finetune.__file__))) != r(p):\n"
          "    sys.exit(f'the child imports another gguf_finetune ({gguf_finetune.__file__})')\n"
          "from gguf_finetune.warmup import _child; _child(sys.argv[2:])")


def _child_command(plan: Plan, claims: str, names: Sequence[str]) -> list[str]:
    return [sys.executable, "-c", _CHILD, SRC, json.dumps(asdict(plan)), claims, *names]


def _child(argv: list[str]) -> None:
    """Entry point of the compiling child: ``PLAN_JSON CLAIMS_DIR JOB...``."""
    numba.set_num_threads(1)
    plan = Plan(**json.loads(argv[0]))
    run_unclaimed(jobs(plan), argv[2:], argv[1])


class Warmup:
    """Kernel jobs being compiled in a child process (see :func:`start`)."""

    def __init__(self, names: list[str], claims: str, proc: subprocess.Popen | None, err):
        self.names, self.claims = names, claims  # the child's jobs, in its order
        self.proc, self.err = proc, err

    def finish(self, plan: Plan, tensors=()) -> list[str]:
        """Compile here the dequantizers of ``tensors`` (gguf ReaderTensors), the cold jobs of
        ``plan`` the child does not have, and the child's jobs it has not started (from the end of
        its list), then wait for it.  Returns the child's error (its last stderr line) if it
        failed: its kernels then compile here on first use."""
        try:
            compile_dequantizers(tensors)
            job_list = jobs(plan)
            extra = [n for n in cold(job_list) if n not in self.names]
            run_unclaimed(job_list, extra + self.names[::-1], self.claims)
            return self._wait()
        finally:
            self.stop()

    def _wait(self) -> list[str]:
        if self.proc is None:
            return ["the child process did not start"]
        if self.proc.wait() == 0:
            return []
        self.err.seek(0)
        lines = self.err.read().decode(errors="replace").strip().splitlines()
        return [lines[-1].strip() if lines else f"exit status {self.proc.returncode}"]

    def stop(self) -> None:
        """End the child if it still runs (an error or Ctrl-C before training) and clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.err is not None:
            self.err.close()
            self.err = None
        shutil.rmtree(self.claims, ignore_errors=True)


def start(plan: Plan, workers: int = 1, notice: Notice | None = None, force: bool = False) -> Warmup | None:
    """With a cold numba cache: announce it through ``notice`` and start compiling the jobs every
    step of ``plan`` runs (:func:`step_plan`) in a child process; returns the handle to call
    :meth:`Warmup.finish` on before the first step.  None when the cache is warm (``force``: as
    if cold), when ``workers`` < 1, or when the cache cannot be read."""
    if workers < 1:
        return None
    job_list = jobs(step_plan(plan))
    try:
        names = [j.name for j in job_list] if force else cold(job_list)
    except Exception:  # numba's cache internals changed: compile on first use, as before
        return None
    if not names:
        return None
    if notice is not None:
        notice.announce()
    claims = tempfile.mkdtemp(prefix="gguf-finetune-warmup-")
    err = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(_child_command(step_plan(plan), claims, names), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    except (OSError, ValueError):
        proc = None
    return Warmup(names, claims, proc, err)
