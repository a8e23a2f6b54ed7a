"""llama.cpp finetune's optimizer: the learning-rate schedule and ggml's AdamW, in float32 as ggml does.

Ported from ``common/train.cpp`` (``learning_schedule``) and ggml.c ``ggml_opt_adam`` (July 2024).
All parameters live in ONE flat float32 array with flat gradient / first / second moment arrays of
the same layout; weight decay is selected by a per-element mask (tensors with n_dims >=
``decay_min_ndim``).  See docs/LLAMACPP_FINETUNE.md for when each piece is called and with which
iteration number.

Float32 details follow the C source: every scalar is a float, ``cosf``/``powf`` come from the C
library (through numba, which calls libm), the gradient norm is summed in double.  ggml builds that
fuse multiply-adds (``-march=native`` with FMA and GNU C mode) can differ from this in the last bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from .arch import (
    ARCHS,
    ATTN_K,
    ATTN_NORM,
    ATTN_OUT,
    ATTN_Q,
    ATTN_QKV,
    ATTN_V,
    FFN_DOWN,
    FFN_GATE,
    FFN_NORM,
    FFN_UP,
    OUTPUT,
    OUTPUT_NORM,
    TOKEN_EMBD,
    Arch,
    weight,
)
from .config import AdamWConfig

F32 = np.float32


@njit(cache=True)
def _cosf(x):  # pragma: no cover - compiled; float32 in, libm cosf
    return np.cos(np.float32(x))


@njit(cache=True)
def _powf(a, b):  # pragma: no cover - compiled; float32 in, libm powf
    return np.power(np.float32(a), np.float32(b))


def cosf(x: float) -> np.float32:
    return F32(_cosf(F32(x)))


def powf(a: float, b: float) -> np.float32:
    return F32(_powf(F32(a), F32(b)))


@dataclass
class OptimizerState:
    """AdamW state as llama.cpp's ggml_opt_context keeps it."""

    m: np.ndarray  # first moments, flat, same layout as the LoRA buffer
    v: np.ndarray  # second moments
    iteration: int = 0  # optimizer.iteration_count (Adam's t)
    just_initialized: bool = True
    best_loss: float = 0.0
    previous_loss: float = 0.0
    no_improvement_count: int = 0
    past_loss_values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @classmethod
    def zeros(cls, n: int, past: int = 0) -> "OptimizerState":
        return cls(np.zeros(n, np.float32), np.zeros(n, np.float32),
                   past_loss_values=np.zeros(past, dtype=np.float32))


# -- schedule -------------------------------------------------------------------------------------
def cosine_decay(step: int, decay_steps: int, minimum: float) -> np.float32:
    """llama.cpp ``cosine_decay``: 0.5·(1+cos(π·step/decay_steps)) scaled into [minimum, 1]; step capped."""
    if step > decay_steps:
        step = decay_steps
    with np.errstate(divide="ignore", invalid="ignore"):
        arg = (F32(3.14159265359) * F32(step)) / F32(decay_steps)
        cosine = F32(0.5) * (F32(1.0) + cosf(arg))
        return (F32(1.0) - F32(minimum)) * cosine + F32(minimum)


def cosine_decay_restart(step: int, decay_steps: int, minimum: float, restart_step_mult: float) -> np.float32:
    """llama.cpp ``cosine_decay_restart``: each period is int(mult · previous) steps long."""
    while step > decay_steps:
        step -= decay_steps
        decay_steps = int(F32(restart_step_mult) * F32(decay_steps))
        if decay_steps <= 0:  # llama.cpp would loop forever / divide by zero here
            break
    return cosine_decay(step, decay_steps, minimum)


def schedule(iteration: int, cfg: AdamWConfig) -> float:
    """llama.cpp ``learning_schedule`` at optimizer iteration ``iteration`` (the value printed as ``sched=``).

    Warmup: iteration/warmup while iteration < warmup.  Then, without restarts, cosine_decay of the
    *absolute* iteration (the warmup steps are not subtracted); with restarts, cosine_decay_restart
    of iteration - warmup.  Finally mapped to [min_alpha/alpha, 1].
    """
    it = int(iteration)
    with np.errstate(divide="ignore", invalid="ignore"):
        if it < cfg.warmup:
            r = F32(it) / F32(cfg.warmup)
        elif cfg.enable_restart:
            r = cosine_decay_restart(it - cfg.warmup, cfg.cos_decay_steps, cfg.cos_decay_min, cfg.cos_decay_restart)
        else:
            r = cosine_decay(it, cfg.cos_decay_steps, cfg.cos_decay_min)
        mn = F32(cfg.min_alpha) / F32(cfg.alpha)
        return float(mn + F32(r) * (F32(1.0) - mn))


# -- AdamW ----------------------------------------------------------------------------------------
def clip_scale(grads: np.ndarray, gclip: float) -> np.float32:
    """ggml's gradient clipping factor: gclip/‖g‖ if ‖g‖ > gclip (norm summed in double), else 1."""
    if not F32(gclip) > 0:
        return F32(1.0)
    g = np.asarray(grads, dtype=np.float32)
    sq = (g * g).astype(np.float64)  # g*g is a float product, accumulated as ggml_float
    norm = float(np.sqrt(sq.sum()))
    if norm > float(F32(gclip)):
        return F32(float(F32(gclip)) / norm)
    return F32(1.0)


def adamw_step(
    params: np.ndarray,
    grads: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    lr_sched: float,
    cfg: AdamWConfig,
    decay_mask: np.ndarray | None,
) -> np.float32:
    """One ggml AdamW update, in place on ``params``, ``m``, ``v`` (all float32 [nx]).

    grads       float32 [nx]  (already averaged over gradient-accumulation steps)
    t           the optimizer iteration this update produces (bias correction uses beta**t)
    lr_sched    the schedule multiplier ``sched`` (see :func:`schedule` and the doc for which one)
    decay_mask  bool [nx]: True where weight decay applies (None = nowhere)

    Per element, with gn the clip factor:
        g = grad·gn;  m = m·β1 + g·(1-β1);  v = v·β2 + g·g·(1-β2)
        x = x·(1 - decay·α·sched·[mask]) - (m·α·sched/(1-β1^t)) / (sqrt(v/(1-β2^t)) + eps)
    Returns gn.
    """
    for a, nm in ((params, "params"), (m, "m"), (v, "v")):
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise TypeError(f"adamw_step: {nm} must be a contiguous float32 array")
    g32 = np.asarray(grads, dtype=np.float32)
    sched = F32(lr_sched)
    alpha = F32(cfg.alpha)
    beta1, beta2, eps = F32(cfg.beta1), F32(cfg.beta2), F32(cfg.eps)
    if g32.shape != params.shape or m.shape != params.shape or v.shape != params.shape:
        raise ValueError(f"adamw_step: params {params.shape}, grads {g32.shape}, m {m.shape}, v {v.shape} differ")
    gnorm = clip_scale(g32, cfg.gclip)
    one = F32(1.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        beta1h = (alpha * sched) / (one - powf(beta1, t))
        beta2h = one / (one - powf(beta2, t))
        p_decay = (F32(cfg.decay) * alpha) * sched
        decay = decay_mask is not None and p_decay != 0
        mask = np.ascontiguousarray(decay_mask, dtype=bool) if decay else np.zeros(1, dtype=bool)
        if mask.shape != params.shape and decay:
            raise ValueError(f"adamw_step: decay_mask {mask.shape} differs from params {params.shape}")
        _adamw(params, np.ascontiguousarray(g32), m, v, F32(gnorm), beta1, one - beta1, beta2, one - beta2,
               F32(beta1h), F32(beta2h), eps, F32(one - p_decay), decay, mask)
    return gnorm


@njit(cache=True, parallel=True)
def _adamw(x, g32, m, v, gnorm, beta1, c1, beta2, c2, beta1h, beta2h, eps, keep, decay, mask):  # pragma: no cover
    # the float32 operations of the numpy formulation (adamw_step_ref), element by element in one
    # pass, in the same order and without contraction into FMAs: bit-identical results
    for i in prange(x.shape[0]):
        g = g32[i] * gnorm
        mi = m[i] * beta1
        mi = mi + g * c1
        vi = v[i] * beta2
        vi = vi + (g * g) * c2
        m[i] = mi
        v[i] = vi
        xi = x[i]
        if decay and mask[i]:
            xi = xi * keep
        x[i] = xi - (mi * beta1h) / (np.sqrt(vi * beta2h) + eps)


def adamw_step_ref(x, g, m, v, t, sched, cfg: AdamWConfig, decay_mask):
    """Slow float32 per-element transcription of ggml_opt_adam's update (for tests).  Returns new arrays."""
    x, m, v = x.copy(), m.copy(), v.copy()
    gnorm = clip_scale(g, cfg.gclip)
    alpha, sched = F32(cfg.alpha), F32(sched)
    beta1h = alpha * sched / (F32(1.0) - powf(cfg.beta1, t))
    beta2h = F32(1.0) / (F32(1.0) - powf(cfg.beta2, t))
    decay = F32(cfg.decay) * alpha
    for i in range(x.shape[0]):
        p_decay = (decay if (decay_mask is not None and decay_mask[i]) else F32(0.0)) * sched
        g_ = F32(g[i]) * gnorm
        m[i] = m[i] * F32(cfg.beta1) + g_ * (F32(1.0) - F32(cfg.beta1))
        v[i] = v[i] * F32(cfg.beta2) + g_ * g_ * (F32(1.0) - F32(cfg.beta2))
        mh = m[i] * beta1h
        vh = np.sqrt(F32(v[i] * beta2h)) + F32(cfg.eps)
        x[i] = x[i] * (F32(1.0) - p_decay) - mh / vh
    return x, m, v


def decay_mask_from_segments(sizes, ndims, decay_min_ndim: int) -> np.ndarray:
    """bool [sum(sizes)]: True for the elements of tensors with n_dims >= decay_min_ndim.

    ``ndims`` is ggml's n_dims (trailing size-1 dims do not count: ggml [1, 1] is 1-D, [1, 64] is 2-D)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    flags = np.asarray(ndims, dtype=np.int64) >= int(decay_min_ndim)
    return np.repeat(flags, sizes)


# -- convergence tests ----------------------------------------------------------------------------
@dataclass
class ConvergenceState:
    """ggml_opt_adam's bookkeeping (checkpoint keys in brackets).

    fx_best           [optimizer.adam.best_loss]       reset to the first loss of every run
    fx_prev           [optimizer.adam.previous_loss]
    n_no_improvement  [optimizer.adam.no_improvement_count]
    past_losses       [optimizer.adam.past_loss_values] float32 [past] (absent when past == 0)
    just_initialized  [optimizer.just_initialized]     True after (re)initialisation; loading a
                      checkpoint re-initialises, so a resumed run also starts with it True
    """

    fx_best: float = 0.0
    fx_prev: float = 0.0
    n_no_improvement: int = 0
    past_losses: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    just_initialized: bool = True

    def start(self, fx0: float, iteration: int, cfg: AdamWConfig) -> None:
        """Before the first update of a run: ``fx0`` = loss of the run's first batch, at ``iteration``."""
        self.fx_prev = float(F32(fx0))
        self.fx_best = self.fx_prev
        if cfg.past > 0:
            if self.past_losses.shape[0] != cfg.past:
                self.past_losses = np.zeros(cfg.past, dtype=np.float32)
            self.past_losses[iteration % cfg.past] = F32(fx0)
        if self.just_initialized:
            self.n_no_improvement = 0
            self.just_initialized = False

    def after_update(self, fx: float, iteration: int, iter0: int, cfg: AdamWConfig) -> str | None:
        """After update number ``iteration`` (= iter0 + t + 1) and the next batch's loss ``fx``.
        Returns why ggml would stop with GGML_OPT_RESULT_OK (converged) as a short sentence naming the
        flag, or None to go on."""
        fx32 = F32(fx)
        with np.errstate(divide="ignore", invalid="ignore"):
            if np.abs(fx32 - F32(self.fx_prev)) / fx32 < F32(cfg.eps_f):
                return f"the loss changed by less than --adam-epsf {cfg.eps_f:g} (relative) in one iteration"
            if cfg.past > 0:
                k = (iteration - 1) % cfg.past  # ggml indexes with iter0 + t
                if cfg.past <= iteration - 1:
                    rate = (self.past_losses[k] - fx32) / fx32
                    if np.abs(rate) < F32(cfg.delta):
                        return (f"the loss changed by less than --opt-delta {cfg.delta:g} (relative) over "
                                f"--opt-past {cfg.past} iterations")
                self.past_losses[k] = fx32
        if cfg.max_no_improvement > 0:
            if F32(self.fx_best) > fx32:
                self.fx_best = float(fx32)
                self.n_no_improvement = 0
            else:
                self.n_no_improvement += 1
                if self.n_no_improvement >= cfg.max_no_improvement:
                    n = self.n_no_improvement
                    return (f"no improvement on the best loss for {n} iteration{'s' if n != 1 else ''} "
                            f"(--opt-max-no-improvement {cfg.max_no_improvement})")
        self.fx_prev = float(fx32)
        return None


# -- parameter order ------------------------------------------------------------------------------
_LAYER_HEAD = (FFN_DOWN, FFN_GATE, FFN_NORM, ATTN_OUT, ATTN_NORM)
_LAYER_TAIL = (ATTN_QKV, ATTN_V, ATTN_K, ATTN_Q, FFN_UP)  # (llama.cpp never trained attn_qkv)


def llamacpp_param_order(n_layer: int, arch: Arch | None = ARCHS["llama"]) -> list[str]:
    """LoRA tensor names (``<base>.weight.lora_a`` / ``lora_b``) in the order ggml's optimizer flattens
    them — the layout of ``optimizer.adam.first_moments`` / ``second_moments`` in finetune's checkpoint.

    It is the order parameters are first reached by a depth-first, left-to-right walk of the forward
    graph from the loss (evaluation order LEFT_TO_RIGHT): output, output_norm, then the last layer's
    ffn_down, ffn_gate, ffn_norm, attn_output, attn_norm, then (recursively) everything of the layers
    below and token_embd, then that layer's attn_v, attn_k, attn_q, ffn_up.  Families llama.cpp's
    finetune did not train use the same walk over the tensors they have (``arch``; None: every
    tensor a block of any family may have).
    """

    def ab(base: str, il: int | None = None) -> list[str]:
        name = weight(base, il)
        return [f"{name}.lora_a", f"{name}.lora_b"] if il is None or arch is None or base in arch.block else []

    # = output, output_norm, block(n_layer-1) with block(il) = head(il) + block(il-1) + tail(il)
    # and block(-1) = token_embd, unrolled (deep models would hit the recursion limit)
    names = ab(OUTPUT) + ab(OUTPUT_NORM)
    heads, tails = [], []
    for il in range(n_layer - 1, -1, -1):
        heads += [n for t in _LAYER_HEAD for n in ab(t, il)]
    for il in range(n_layer):
        tails += [n for t in _LAYER_TAIL for n in ab(t, il)]
    return names + heads + ab(TOKEN_EMBD) + tails


def llamacpp_file_order(n_layer: int, arch: Arch = ARCHS["llama"]) -> list[str]:
    """The order finetune writes the LoRA tensors in its checkpoint and .bin (set_param order)."""
    targets = arch.targets()
    names: list[str] = []
    for il in [None] + list(range(n_layer)):
        for t in targets:
            if t.per_layer == (il is not None):
                names += [weight(t.tensor, il) + ".lora_a", weight(t.tensor, il) + ".lora_b"]
    return names


__all__ = [
    "AdamWConfig",
    "ConvergenceState",
    "adamw_step",
    "adamw_step_ref",
    "clip_scale",
    "cosine_decay",
    "cosine_decay_restart",
    "decay_mask_from_segments",
    "llamacpp_file_order",
    "llamacpp_param_order",
    "schedule",
]
