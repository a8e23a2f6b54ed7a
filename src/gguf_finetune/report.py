"""Reporting callbacks for the trainer: llama.cpp's log lines, a tqdm bar, a metrics JSONL file.

The trainer calls ``on_iteration`` at every callback point, ``on_eval`` after a validation pass,
``on_save`` after writing files, ``on_message`` for one-off lines and ``on_end`` when the loop stops.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from tqdm import tqdm


def format_duration(ms: float) -> str:
    """llama.cpp's print_duration: '%.1fms' below a second, else [Nd ]HH:MM:SS."""
    if ms < 1000:
        return f"{ms:.1f}ms"
    total = int(ms / 1000)
    days, rem = divmod(total, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{days}d " if days else "") + f"{h:02d}:{m:02d}:{s:02d}"


class LlamaLog:
    """The lines llama.cpp's finetune prints to stdout (train_opt_callback, saving, total time)."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.ms_per_iter = 0.0
        self.last_time: float | None = None
        self.last_iter: int | None = None

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def on_iteration(self, info) -> None:
        now = time.perf_counter()
        if self.last_time is not None and info.iteration > info.first_iteration:
            dt = (now - self.last_time) * 1000.0
            self.ms_per_iter = dt if self.ms_per_iter == 0.0 else self.ms_per_iter * 0.3 + dt * 0.7
        line = (f"train_opt_callback: iter={info.iteration:6d} sample={info.sample[0]}/{info.sample[1]} "
                f"sched={info.sched:f} loss={0.0 if info.loss is None else info.loss:f}")
        if self.ms_per_iter > 0:
            remaining = info.n_iter - (info.iteration - info.first_iteration)
            line += f" dt={format_duration(self.ms_per_iter)} eta={format_duration(remaining * self.ms_per_iter)}"
        improvement = 0.0 if info.loss is None else info.loss_before - info.loss
        bar = int(1 + improvement * 10.0 + 0.5)
        line += " |" + "-" * max(bar, 0) + ">"
        self._print(line)
        self.last_time = time.perf_counter()

    def on_eval(self, iteration: int, val_loss: float, best: bool) -> None:
        self._print(f"main: iter={iteration} val_loss={val_loss:f}")
        if self.last_time is not None:  # validation is excluded from the iteration timing
            self.last_time = time.perf_counter()

    def on_save(self, iteration: int, paths: list[str]) -> None:
        # saving is excluded from the iteration timing, as in llama.cpp
        if self.last_time is not None:
            self.last_time = time.perf_counter()

    def on_message(self, line: str) -> None:
        self._print(line)

    def on_end(self, iteration: int, seconds: float, reason: str) -> None:
        self._print(f"main: total training time: {format_duration(seconds * 1000.0)}")


class ProgressBar:
    """A tqdm bar on stderr: iterations, loss, tokens/s, ETA."""

    def __init__(self, total: int, initial: int = 0, file: TextIO | None = None):
        self.bar = tqdm(total=total, initial=0, file=file or sys.stderr, unit="it", dynamic_ncols=True,
                        leave=False, desc="finetune")
        self.first: int | None = None
        self.val_loss: float | None = None

    def on_iteration(self, info) -> None:
        if self.first is None:
            self.first = info.iteration
        done = info.iteration - self.first
        self.bar.n = done
        post = {}
        if info.loss is not None:
            post["loss"] = f"{info.loss:.4f}"
        if info.elapsed > 0 and info.tokens:
            post["tok/s"] = f"{info.tokens / info.elapsed:.1f}"
        if self.val_loss is not None:
            post["val"] = f"{self.val_loss:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def on_eval(self, iteration: int, val_loss: float, best: bool) -> None:
        self.val_loss = val_loss

    def on_end(self, iteration: int, seconds: float, reason: str) -> None:
        self.bar.close()


class MetricsFile:
    """Appends one JSON object per iteration (iter, loss, lr, tokens_per_s, trained_tokens: this run's so far,
    elapsed) and one per validation pass (iter, val_loss)."""

    def __init__(self, path: str):
        self.path = path
        self.fh = open(path, "a", encoding="utf-8")

    def on_iteration(self, info) -> None:
        if info.loss is None:
            return
        rec = {"iter": info.iteration, "loss": round(float(info.loss), 6), "lr": float(info.lr),
               "tokens_per_s": round(info.tokens / info.elapsed, 2) if info.elapsed > 0 else None,
               "trained_tokens": info.trained, "elapsed": round(info.elapsed, 6)}
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()

    def on_eval(self, iteration: int, val_loss: float, best: bool) -> None:
        self.write({"iter": iteration, "val_loss": round(float(val_loss), 6)})

    def write(self, rec: dict) -> None:
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()

    def on_end(self, iteration: int, seconds: float, reason: str) -> None:
        self.fh.close()
