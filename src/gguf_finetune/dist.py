"""Data parallelism over MPI (``mpiexec -n N finetune …``): which rank this process is, and the few
collectives training needs.

A process started by mpiexec (the launcher's variables are set) with more than one rank imports
mpi4py and uses ``COMM_WORLD``; any other process is a single-rank world and never imports mpi4py.
Every rank draws the same batches (the same shuffle) and computes the rows ``rank::size`` of each;
the LoRA gradients and loss sums are summed over the ranks with one in-place ``Allreduce``, so every
rank takes the same optimizer step.  Rank 0 alone prints and writes files.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from .errors import UserError

# what MPICH (Hydra), Open MPI and PMIx launchers set in every rank's environment: the job's size
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
ABORT_GRACE_S = 1.0  # a failing rank other than 0 waits this long for rank 0's own line before it speaks


def launcher_size(environ=None) -> int:
    """The number of ranks mpiexec started (1 when this process was not started by mpiexec)."""
    env = os.environ if environ is None else environ
    for var in LAUNCHER_SIZE_VARS:
        v = env.get(var, "")
        if v.isdigit():
            return int(v)
    return 1


@dataclass
class World:
    """This process's place in the job: ``rank`` of ``size``; ``comm`` is mpi4py's COMM_WORLD (None
    for a single process, where every collective is the identity)."""

    rank: int = 0
    size: int = 1
    comm: Any = None
    allreduce_seconds: float = field(default=0.0)  # time spent in gradient Allreduce so far

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def rows(self, a: np.ndarray) -> np.ndarray:
        """This rank's rows of a batch array [B, ...]: rows rank, rank + size, ..."""
        return a if self.size == 1 else np.ascontiguousarray(a[self.rank::self.size])

    def allreduce(self, buf: np.ndarray) -> None:
        """buf := the sum of every rank's buf, in place (the same result on every rank)."""
        if self.comm is None:
            return
        from mpi4py import MPI  # optional: the [mpi] extra; only a job of several ranks gets here

        t0 = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.allreduce_seconds += time.perf_counter() - t0

    def sum(self, *values: float) -> tuple[float, ...]:
        """Scalars summed over the ranks (float64)."""
        buf = np.array(values, dtype=np.float64)
        self.allreduce(buf)
        return tuple(float(v) for v in buf)

    def any(self, flag: bool) -> bool:
        """True on every rank when the flag is true on some rank."""
        return self.sum(1.0 if flag else 0.0)[0] > 0

    def broadcast(self, value: int) -> int:
        """Rank 0's integer, on every rank."""
        return value if self.comm is None else int(self.comm.bcast(int(value), root=0))

    def abort(self, code: int) -> NoReturn:
        """End the whole job now (no rank may be left waiting in a collective), quietly: the line saying
        why is already written, and the MPI library's own report of the abort would only repeat it."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            self.comm.Abort(code)
        os._exit(code)  # MPICH's Abort may return before the process is killed


_WORLD: World | None = None


def world() -> World:
    """The job this process belongs to (created once)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _connect()
    return _WORLD


def _connect() -> World:
    size = launcher_size()
    if size <= 1:
        return World()
    try:
        from mpi4py import MPI  # optional: the [mpi] extra
    except ImportError:
        raise UserError(f"started by mpiexec with {size} ranks, but mpi4py is not installed: pip install "
                        f"'gguf-finetune[mpi]'") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:  # e.g. one MPI's mpiexec starting a program built on another MPI
        raise UserError(f"mpiexec started {size} ranks, but MPI sees {comm.Get_size()}: the mpiexec on PATH "
                        f"belongs to another MPI than mpi4py's (use the one installed with gguf-finetune[mpi])")
    return World(comm.Get_rank(), size, comm)


def fail(world_: World, prog: str, message: str, code: int) -> NoReturn:
    """A rank failed: one line on stderr — rank 0's, or another rank's own when rank 0 did not fail
    too (every rank reads the same files, so usually all fail alike) — and the whole job ends."""
    if not world_.is_root:
        time.sleep(ABORT_GRACE_S)  # rank 0, failing alike, aborts the job before this rank speaks
        message = f"rank {world_.rank}: {message}"
    print(" ".join(f"{prog}: {message}".split()), file=sys.stderr, flush=True)
    world_.abort(code)
