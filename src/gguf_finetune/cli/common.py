"""What every entry point shares: error handling at the top (``run_main``), thread and malloc settings.

Exit status: 0 ok (also after ``--help``); 1 a :class:`UserError` (bad file, bad data); 2 a
:class:`UsageError` (bad flags); 130 interrupted (Ctrl-C); 141 stdout closed early (``| head``),
quietly.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, NoReturn, Sequence

from ..errors import UserError
from .parser import HelpRequested

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a C tool killed by SIGPIPE reports


def run_main(fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None,
             prog: str | None = None) -> NoReturn:
    """Call ``fn(argv)`` and exit with its status, turning user errors into one line on stderr.

    ``argv`` defaults to ``sys.argv[1:]``, ``prog`` to the program's file name.  ``fn`` returns an
    exit status (None = 0) or raises; ``HelpRequested`` prints its text on stdout.
    """
    prog = prog or os.path.basename(sys.argv[0]) or "gguf-finetune"
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            status = fn(args) or 0
        except HelpRequested as h:
            sys.stdout.write(h.text)
            status = 0
        sys.stdout.flush()
    except UserError as e:
        _flush_quietly()
        _error_line(prog, str(e))
        status = e.exit_code
    except KeyboardInterrupt:
        _flush_quietly()
        _error_line(prog, "interrupted")
        status = EXIT_INTERRUPTED
    except MemoryError:
        _flush_quietly()
        _error_line(prog, "out of memory")
        status = 1
    except BrokenPipeError:
        if not _stdout_is_broken():
            raise  # some other pipe: a bug
        _silence_stdout()
        status = EXIT_BROKEN_PIPE
    sys.exit(status)


def _error_line(prog: str, message: str) -> None:
    line = " ".join(f"{prog}: {message}".split())
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        _silence_stdout()


def _stdout_is_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        # lazy: only on a broken pipe
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows) or no real stdout: assume it was stdout
        return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's flush at exit does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


OPENBLAS_SET_THREADS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                        "openblas_set_num_threads64_", "openblas_set_num_threads")


def loaded_openblas() -> list:
    """The OpenBLAS libraries loaded in this process (numpy's wheels bundle one), as ctypes CDLLs
    (found in /proc/self/maps: Linux only; elsewhere an empty list)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return []
    libs = []
    for path in paths:
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            pass
    return libs


def limit_openblas(n: int) -> bool:
    """Set the thread count of every loaded OpenBLAS to ``n`` through its own setter; False when
    none was found.  (threadpoolctl does this on every platform when it is installed.)"""
    done = False
    for lib in loaded_openblas():
        fn = next((getattr(lib, s) for s in OPENBLAS_SET_THREADS if hasattr(lib, s)), None)
        if fn is not None:
            fn(ctypes.c_int(int(n)))
            done = True
    return done


def set_threads(n: int) -> int:
    """Use ``n`` threads for numba kernels and BLAS; returns the count numba actually uses.

    numba cannot exceed ``numba.config.NUMBA_NUM_THREADS`` (the CPU count unless the environment
    says otherwise), so ``n`` is clamped to it; BLAS is clamped to the CPUs this process may use.
    BLAS is limited with threadpoolctl when that is installed (works at any time); otherwise through
    the OPENBLAS/MKL/BLIS/OMP_NUM_THREADS variables when numpy (and with it its BLAS) has not been
    imported yet in this process (they also reach child processes), and once it has, through the
    loaded OpenBLAS's own setter (:func:`limit_openblas`; other BLAS libraries keep their count).
    """
    if n < 1:
        raise ValueError(f"thread count must be positive, got {n}")
    blas = min(int(n), cpu_count())
    if "numpy" not in sys.modules:
        for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = str(blas)
    try:
        # optional: threadpoolctl, when installed
        from threadpoolctl import threadpool_limits
    except ImportError:
        if "numpy" in sys.modules:  # numpy's BLAS has read the variables already: tell it directly
            limit_openblas(blas)
    else:
        threadpool_limits(limits=blas, user_api="blas")
    # lazy: after the thread variables above are set (numba reads them at import)
    import numba

    used = min(int(n), int(numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(used)
    return used


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    Without checkpointing a training step allocates every layer's activations (~260 MB for
    SmolLM2 at ctx 256) and frees them when it ends.  By default glibc then trims the top of the
    heap and serves blocks above its (adaptive) mmap threshold with fresh mappings, so the next
    step page-faults ~32,000 pages back in (~3% of that step).  A fixed trim threshold (1 GiB) and
    mmap threshold (32 MiB) keep those pages mapped and reused: peak RSS is unchanged, and a step
    takes ~900 minor page faults instead (scripts/bench.py prints them).  Process-wide; returns
    False, changing nothing, where the C library is not glibc.
    """
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    import ctypes
    import ctypes.util
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))
    except (OSError, AttributeError):
        return False


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
