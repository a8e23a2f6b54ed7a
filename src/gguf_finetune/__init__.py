"""gguf-finetune: LoRA training for GGUF models on the CPU.

    import gguf_finetune as gf
    model = gf.load_model("model.gguf")          # hparams, mmapped tensors, tokenizer
    tok = gf.load_tokenizer("any.gguf")          # works on vocab-only GGUF files too
"""

__version__ = "0.1.0"

import os as _os

# numba's OpenMP workers and OpenBLAS's pthreads take turns on the same cores, many times per
# layer.  By default both spin after finishing (libgomp for a while, OpenBLAS for ~2^28 cycles),
# each stealing the core the other needs: on 2 cores a layer step ran 5x slower than with
# sleeping waiters (docs/PERFORMANCE.md).  Only effective before numpy/numba start their threads;
# an explicit setting in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .errors import UsageError, UserError  # noqa: F401


def load_model(*args, **kwargs):
    """See :func:`gguf_finetune.api.load_model`."""
    from .api import load_model as _load  # lazy: `import gguf_finetune` stays light (no numba)

    return _load(*args, **kwargs)


def load_tokenizer(src):
    """Tokenizer from a GGUF file's metadata (a path or an open GGUFFile)."""
    from .tokenizer import load_tokenizer as _load  # lazy: as load_model

    return _load(src)
