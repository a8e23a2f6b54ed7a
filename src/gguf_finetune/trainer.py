"""The training loop: batches -> loss and gradients -> accumulate -> AdamW -> checkpoints.

It follows ggml_opt_adam as llama.cpp's finetune drives it (docs/LLAMACPP_FINETUNE.md §4): a
"callback point" comes before every gradient evaluation; there the trainer saves when due, computes
the schedule, reports the previous loss, and draws the next batch.  The update that produces
iteration k uses the gradient of the batch drawn at callback k-1 and schedule(k-1).  Files are
saved at a callback point, before its batch is drawn, so resuming from any saved checkpoint
continues exactly as the uninterrupted run would have.

Nothing here prints: progress, log lines and metrics go through :class:`Callback` objects
(report.py), saving through the ``save`` function the caller passes in.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .config import TrainConfig
from .dist import World
from .engine.backward import loss_and_grad
from .errors import UserError
from .lora import LoraParams
from .optim import ConvergenceState, OptimizerState, adamw_step, schedule


@dataclass
class TrainState:
    """Counters and data-pipeline state (llama.cpp's train_state + shuffle keys)."""

    iteration: int = 0  # training.iteration_count
    sample_count: int = 0  # training.sample_count
    token_count: int = 0  # training.token_count
    epoch_count: int = 0  # training.epoch_count
    shuffle_samples_hash: int = 0  # training.shuffle.samples_hash (u64)
    shuffle_rng_state: str = ""  # training.shuffle.rng_state (std::mt19937 text form)
    shuffle_sample_count: int = 0  # training.shuffle.sample_count
    shuffle_next_sample: int = 0  # training.shuffle.next_sample


@dataclass
class IterationInfo:
    """What a callback point knows (the line llama.cpp prints at ``iter=``)."""

    iteration: int  # updates done so far
    first_iteration: int  # iteration at the start of this run
    n_iter: int  # updates this run will do (--adam-iter)
    sample: tuple[int, int]  # llama.cpp's sample=A/B before drawing the next batch
    sched: float  # schedule multiplier for the next update
    lr: float  # adam alpha · sched
    loss: float | None  # loss of the batch drawn at the previous callback (None on the first line)
    loss_before: float  # the run's first loss (llama.cpp's loss_before), 0 before it exists
    tokens: int  # tokens processed by this run so far (positions computed, padding included)
    trained: int  # tokens of this run so far that carry loss
    elapsed: float  # seconds since the run started


class Callback(Protocol):
    def on_iteration(self, info: IterationInfo) -> None: ...
    def on_eval(self, iteration: int, val_loss: float, best: bool) -> None: ...
    def on_save(self, iteration: int, paths: list[str]) -> None: ...
    def on_message(self, line: str) -> None: ...
    def on_end(self, iteration: int, seconds: float, reason: str) -> None: ...


class Callbacks:
    """Fan-out to several callbacks; missing methods are skipped."""

    def __init__(self, cbs: list):
        self.cbs = list(cbs)

    def __getattr__(self, name: str):
        def call(*args, **kw):
            for cb in self.cbs:
                fn = getattr(cb, name, None)
                if fn is not None:
                    fn(*args, **kw)
        return call


class Batches(Protocol):
    """A stream of batches with resumable state (data/text.BatchIterator has this shape)."""

    def next_batch(self): ...  # -> data.batches.Batch: tokens, targets, weights [B, T] (+ pos, seg_start)
    def sample_position(self) -> tuple[int, int]: ...
    @property
    def state(self): ...


@dataclass
class TrainResult:
    iteration: int
    last_loss: float | None
    reason: str  # "done" | "converged" | "epochs" | "interrupted"
    seconds: float


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves LATEST and stops."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False



class Diverged(UserError):
    """A non-finite loss: the batch of iteration ``iteration + 1`` gave ``loss``; ``last_save`` is the
    iteration of the last checkpoint written (the CLI words the message knowing its files)."""

    def __init__(self, loss: float, iteration: int, last_save: int):
        super().__init__(f"training diverged: loss is {loss} at iteration {iteration + 1}; lower --adam-alpha "
                         f"or check the training data (last good checkpoint kept: iteration {last_save})")
        self.loss, self.iteration, self.last_save = loss, iteration, last_save


class Trainer:
    """Owns the loop state: LoRA parameters, gradients, optimizer moments, counters.

    Validation (optional): ``evaluator(lora) -> loss`` is called at the callback points of iterations
    that are multiples of ``eval_every`` (> 0; including a fresh run's iteration 0) and once at the end;
    it only runs forward passes, so the batch stream and the updates are the same with or without it.
    ``save_best(iteration, trainer) -> paths`` writes the files of a new lowest validation loss
    (below ``best_loss``, the best known from earlier runs).
    """

    def __init__(self, weights, hp, lora: LoraParams, opt: OptimizerState, train: TrainState, batches: Batches,
                 cfg: TrainConfig, callbacks: list, save: Callable[[int, "Trainer"], list[str]] | None = None,
                 *, evaluator: Callable[[LoraParams], float] | None = None, eval_every: int = 0,
                 save_best: Callable[[int, "Trainer"], list[str]] | None = None, best_loss: float | None = None,
                 world: World | None = None):
        self.world = world or World()
        self.weights, self.hp, self.lora = weights, hp, lora
        self.opt, self.train, self.batches, self.cfg = opt, train, batches, cfg
        self.cb = Callbacks(callbacks)
        self.save_fn = save
        self.grads = lora.like()
        self.decay_mask = lora.layout.decay_mask(cfg.adam.decay_min_ndim)
        self.conv = ConvergenceState(past_losses=opt.past_loss_values.copy())
        self.last_save = train.iteration
        self.synced_at = train.iteration  # iteration the counters in self.train/self.opt describe
        self.epochs_at_start = batches.state.epochs
        self.evaluator, self.eval_every = evaluator, int(eval_every)
        self.save_best_fn, self.best_loss = save_best, best_loss
        self.last_eval: int | None = None
        self.val_loss: float | None = None

    # -- one gradient evaluation (grad_acc batches) ------------------------------------------------
    def evaluate(self) -> tuple[float, int, int, bool]:
        """Draw grad_acc batches, accumulate the mean gradient; -> (loss, tokens, trained tokens, epoch limit
        reached)."""
        self.grads.flat[:] = 0
        loss = 0.0
        tokens = trained = 0
        epoch_limit = False
        n_acc = self.cfg.grad_acc
        rows = self.world.rows  # this rank's rows of every batch (all of them in a single process)
        for _ in range(n_acc):
            b = self.batches.next_batch()
            w = np.asarray(b.weights, dtype=np.float32)
            total = float(w.sum())  # over the whole batch: every rank normalizes alike
            inv = 1.0 / (max(total, 1.0) * n_acc)
            loss += loss_and_grad(self.weights, self.hp, self.lora, self.grads, rows(b.tokens), rows(b.targets),
                                  rows(w), inv, checkpointing=self.cfg.checkpointing, flash=self.cfg.flash,
                                  pos=None if b.pos is None else rows(b.pos),
                                  seg_start=None if b.seg_start is None else rows(b.seg_start))
            tokens += int(np.asarray(b.tokens).size)
            trained += int(np.count_nonzero(w))
            if self.cfg.epochs > 0 and self.batches.state.epochs - self.epochs_at_start >= self.cfg.epochs:
                epoch_limit = True
        if self.world.size > 1:  # one Allreduce of the flat gradient buffer, and the loss
            self.world.allreduce(self.grads.flat)
            loss = self.world.sum(loss)[0]
        return loss, tokens, trained, epoch_limit

    # -- saving -----------------------------------------------------------------------------------
    def sync_state(self, iteration: int) -> None:
        """Counters as llama.cpp updates them when it saves."""
        new = iteration - self.synced_at
        st = self.batches.state
        self.train.iteration += new
        self.train.token_count += new * self.cfg.grad_acc * self.cfg.n_batch * self.cfg.n_ctx
        self.train.sample_count = st.samples_seen
        self.train.epoch_count = st.epochs
        self.train.shuffle_samples_hash = st.samples_hash
        self.train.shuffle_rng_state = st.rng_state
        self.train.shuffle_sample_count = st.sample_count
        self.train.shuffle_next_sample = st.next_sample
        self.opt.iteration = iteration
        self.opt.best_loss = self.conv.fx_best
        self.opt.previous_loss = self.conv.fx_prev
        self.opt.no_improvement_count = self.conv.n_no_improvement
        self.opt.past_loss_values = self.conv.past_losses.copy()
        self.opt.just_initialized = False
        self.synced_at = iteration

    def save(self, iteration: int) -> None:
        self.sync_state(iteration)
        self.last_save = iteration
        if self.save_fn is not None:
            paths = self.save_fn(iteration, self)
            self.cb.on_save(iteration, paths)

    # -- validation -------------------------------------------------------------------------------
    def eval_due(self, it: int, i0: int) -> bool:
        """At multiples of eval_every; a resumed run does not repeat the evaluation of its first point."""
        return (self.evaluator is not None and self.eval_every > 0 and it % self.eval_every == 0
                and (it > i0 or i0 == 0))

    def validate(self, iteration: int) -> float:
        """Validation loss of the current parameters; reports it and saves a new best."""
        loss = float(self.evaluator(self.lora))
        self.last_eval, self.val_loss = iteration, loss
        best = math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss)
        if best:
            self.best_loss = loss
        self.cb.on_eval(iteration, loss, best)
        if best and self.save_best_fn is not None:
            self.sync_state(iteration)
            self.cb.on_save(iteration, self.save_best_fn(iteration, self))
        return loss

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        n_iter = cfg.adam.n_iter
        i0 = self.train.iteration
        t_start = time.perf_counter()
        tokens_done = trained_done = 0
        with StopRequested() as stop:

            def point(it: int, loss: float | None, loss_before: float) -> float:
                """Callback point before a gradient evaluation (or at the very end)."""
                if cfg.save_every > 0 and it - self.last_save >= cfg.save_every:
                    self.save(it)
                sched = schedule(it, cfg.adam)
                self.cb.on_iteration(IterationInfo(
                    iteration=it, first_iteration=i0, n_iter=n_iter, sample=self.batches.sample_position(),
                    sched=float(sched), lr=float(cfg.adam.alpha * sched), loss=loss, loss_before=loss_before,
                    tokens=tokens_done, trained=trained_done, elapsed=time.perf_counter() - t_start))
                if self.eval_due(it, i0):
                    self.validate(it)
                return float(sched)

            it = i0
            sched = point(it, None, 0.0)
            if n_iter <= 0:
                return self._finish(it, None, "done", t_start)
            f, ntok, ntrained, epoch_limit = self.evaluate()
            tokens_done += ntok
            trained_done += ntrained
            self._check_finite(f, it)
            self.conv.start(f, it, cfg.adam)
            loss_before = f
            reason = "done"
            for t in range(n_iter):
                it = i0 + t + 1
                adamw_step(self.lora.flat, self.grads.flat, self.opt.m, self.opt.v, it, sched, cfg.adam,
                           self.decay_mask)
                self.opt.iteration = it
                last = t == n_iter - 1
                if self.world.any(stop.signal is not None):  # every rank stops at the same iteration
                    reason = "interrupted"
                    name = signal.Signals(stop.signal).name if stop.signal is not None else "a signal (on another rank)"
                    self.cb.on_message(f"main: {name} received: saving and stopping after iteration {it}")
                    break
                sched = point(it, f, loss_before)
                if last or epoch_limit:
                    if epoch_limit and not last:
                        reason = "epochs"
                        n = cfg.epochs
                        self.cb.on_message(f"main: completed {n} epoch{'s' if n != 1 else ''} (--epochs {n}): "
                                           f"stopping after iteration {it}")
                    break
                f, ntok, ntrained, epoch_limit = self.evaluate()
                tokens_done += ntok
                trained_done += ntrained
                self._check_finite(f, it)
                why = self.conv.after_update(f, it, i0, cfg.adam)
                if why:
                    reason = "converged"
                    self.cb.on_message(f"main: converged at iteration {it}: {why}")
                    break
            return self._finish(it, f, reason, t_start)

    def _check_finite(self, f: float, it: int) -> None:
        if not math.isfinite(f):
            raise Diverged(f, it, self.last_save)

    def _finish(self, it: int, f: float | None, reason: str, t_start: float) -> TrainResult:
        if self.evaluator is not None and reason != "interrupted" and self.last_eval != it:
            self.validate(it)
        seconds = time.perf_counter() - t_start
        self.cb.on_end(it, seconds, reason)
        if it != self.last_save:
            self.save(it)
        return TrainResult(it, f, reason, seconds)
