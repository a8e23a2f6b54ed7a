"""Loss curves from a training metrics file (``--metrics-out``, one JSON object per line).

Records with ``loss`` are training iterations, records with ``val_loss`` validation passes; both
carry ``iter``.  A file that several runs appended to (a resumed run repeats the iterations after
its checkpoint) keeps the last record of each iteration.  matplotlib is an optional dependency,
imported only to draw.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from .errors import UserError
from .gguf_io import atomic_path


@dataclass
class Curves:
    train_iter: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_iter: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


def read_metrics(path: str | os.PathLike) -> Curves:
    """The training and validation loss points of a metrics JSONL file, by iteration."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        raise UserError(f"metrics file '{path}': cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"metrics file '{path}': not valid UTF-8 (byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"metrics file '{path}': line {n} is not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "iter" not in rec:
            continue  # other records (e.g. run headers) are not points
        it = rec["iter"]
        if not isinstance(it, int) or isinstance(it, bool):
            raise UserError(f"metrics file '{path}': line {n}: 'iter' should be an integer, got {it!r}")
        for key, into in (("loss", train), ("val_loss", val)):
            v = rec.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f"metrics file '{path}': line {n}: '{key}' should be a number, got {v!r}")
            if math.isfinite(v):
                into[it] = float(v)
    c = Curves()
    for it in sorted(train):
        c.train_iter.append(it)
        c.train_loss.append(train[it])
    for it in sorted(val):
        c.val_iter.append(it)
        c.val_loss.append(val[it])
    if not c.train_iter and not c.val_iter:
        raise UserError(f"metrics file '{path}': no 'loss' or 'val_loss' records")
    return c


def _pyplot():
    try:
        # optional: matplotlib (the [plot] extra)
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt  # (after choosing the backend)

    return plt


def plot_curves(c: Curves, out: str | os.PathLike, title: str = "") -> None:
    """Draw loss (and val_loss) against iteration into ``out`` (format from its extension)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if c.train_iter:
            ax.plot(c.train_iter, c.train_loss, lw=1.0, color="tab:blue", label="training loss")
        if c.val_iter:
            ax.plot(c.val_iter, c.val_loss, lw=1.5, color="tab:orange", marker="o", ms=3, label="validation loss")
        # optional: matplotlib
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title)
        fig.tight_layout()
        ext = os.path.splitext(str(out))[1].lstrip(".").lower() or "png"
        supported = fig.canvas.get_supported_filetypes()
        if ext not in supported:
            raise UserError(f"output '{out}': unknown image format '.{ext}' (one of: {', '.join(sorted(supported))})")
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=ext)
    finally:
        plt.close(fig)
