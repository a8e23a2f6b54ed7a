"""gguf_finetune.optim: llama.cpp's schedule against the fixture logs, ggml's AdamW against transcriptions."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gguf_finetune.optim import (
    AdamWConfig,
    ConvergenceState,
    adamw_step,
    adamw_step_ref,
    clip_scale,
    cosine_decay,
    decay_mask_from_segments,
    llamacpp_file_order,
    llamacpp_param_order,
    schedule,
)

FIXTURE = "fixtures/llamacpp-tiny"
ITER_LINE = re.compile(r"^train_opt_callback: iter=\s*(\d+) sample=(\d+)/(\d+) sched=([0-9.]+) loss=([0-9.]+)")
# the fixture's flags: --adam-alpha 0.02 --warmup 2 (everything else default)
FIXTURE_CFG = AdamWConfig(alpha=0.02, warmup=2)


def _iter_lines(path):
    return [m.groups() for m in map(ITER_LINE.match, path.read_text().splitlines()) if m]


# -- schedule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("log", ["run1.log", "run2.log"])
def test_schedule_matches_fixture_logs(testdata, log):
    rows = _iter_lines(testdata / FIXTURE / log)
    assert len(rows) >= 5
    for it, _, _, sched, _ in rows:
        assert "%f" % schedule(int(it), FIXTURE_CFG) == sched


def test_schedule_warmup_and_cosine_without_restart():
    cfg = AdamWConfig(alpha=1e-3, warmup=10, cos_decay_steps=100, cos_decay_min=0.1)
    assert schedule(0, cfg) == 0.0
    assert schedule(5, cfg) == pytest.approx(0.5)
    # without restarts the cosine runs on the absolute iteration: warmup is NOT subtracted
    assert schedule(10, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 10 / 100)), rel=1e-6)
    assert schedule(100, cfg) == pytest.approx(0.1, rel=1e-6)
    assert schedule(5000, cfg) == schedule(100, cfg)  # capped


def test_schedule_restarts_and_min_alpha():
    cfg = AdamWConfig(alpha=1e-3, warmup=0, cos_decay_steps=10, cos_decay_restart=2.0, cos_decay_min=0.0,
                      enable_restart=True)
    assert schedule(10, cfg) == pytest.approx(0.0, abs=1e-7)
    assert schedule(11, cfg) == pytest.approx(float(cosine_decay(1, 20, 0.0)))  # second period is 20 long
    assert schedule(30, cfg) == pytest.approx(0.0, abs=1e-7)
    assert schedule(31, cfg) == pytest.approx(float(cosine_decay(1, 40, 0.0)))
    floor = AdamWConfig(alpha=1e-3, min_alpha=2.5e-4, warmup=4)
    assert schedule(0, floor) == pytest.approx(0.25)  # min_alpha applies during warmup too
    assert schedule(2, floor) == pytest.approx(0.25 + 0.5 * 0.75)


# -- AdamW ----------------------------------------------------------------------------------------


def _rand_state(n, seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal(n).astype(np.float32)
    g = (r.standard_normal(n) * 0.3).astype(np.float32)
    m = (r.standard_normal(n) * 0.01).astype(np.float32)
    v = np.abs(r.standard_normal(n) * 1e-3).astype(np.float32)
    return x, g, m, v


def _step_f64(x, g, m, v, t, sched, cfg, mask):
    """Direct float64 transcription of ggml_opt_adam's update."""
    x, g, m, v = (a.astype(np.float64) for a in (x, g, m, v))
    norm = np.sqrt((g * g).sum())
    gn = cfg.gclip / norm if (cfg.gclip > 0 and norm > cfg.gclip) else 1.0
    g = g * gn
    m = m * cfg.beta1 + g * (1 - cfg.beta1)
    v = v * cfg.beta2 + g * g * (1 - cfg.beta2)
    mh = m * cfg.alpha * sched / (1 - cfg.beta1**t)
    vh = np.sqrt(v / (1 - cfg.beta2**t)) + cfg.eps
    x = x * (1 - np.where(mask, cfg.decay * cfg.alpha * sched, 0.0)) - mh / vh
    return x, m, v


@pytest.mark.parametrize("gclip", [0.0, 1.0, 1e6])
def test_adamw_step_matches_float64_transcription(gclip):
    cfg = AdamWConfig(alpha=0.02, decay=0.1, gclip=gclip)
    x, g, m, v = _rand_state(3000)
    mask = np.arange(3000) % 3 != 0
    want = _step_f64(x, g, m, v, 7, 0.75, cfg, mask)
    adamw_step(x, g, m, v, 7, 0.75, cfg, mask)
    for got, w in zip((x, m, v), want):
        np.testing.assert_allclose(got, w, rtol=2e-5, atol=1e-7)


def test_adamw_step_bitwise_equals_float32_reference():
    cfg = AdamWConfig(alpha=0.02, decay=0.1, gclip=1.0)
    x, g, m, v = _rand_state(500, seed=3)
    mask = np.arange(500) < 200
    want = adamw_step_ref(x, g, m, v, 3, 0.999991, cfg, mask)
    adamw_step(x, g, m, v, 3, 0.999991, cfg, mask)
    for got, w in zip((x, m, v), want):
        assert np.array_equal(got, w)


def test_adamw_nondefault_betas_and_eps_match_transcriptions():
    """beta1, beta2 and eps other than the defaults, over three steps (bias correction beta**t with
    t = 1, 2, 3): the float32 step equals the per-element float32 transcription bit for bit and the
    float64 transcription to rounding; eps is large enough here to change the result."""
    cfg = AdamWConfig(alpha=0.01, beta1=0.8, beta2=0.95, eps=1e-3, decay=0.05, gclip=1.0)
    x, g, m, v = _rand_state(2000, seed=7)
    m[:] = 0
    v[:] = 0
    mask = np.arange(2000) % 4 != 0
    x64, m64, v64 = x.copy(), m.copy(), v.copy()
    for t in (1, 2, 3):
        grad = (g * np.float32(1.0 + 0.5 * t)).astype(np.float32)
        want = adamw_step_ref(x, grad, m, v, t, 0.9, cfg, mask)
        x64, m64, v64 = _step_f64(x64, grad, m64, v64, t, 0.9, cfg, mask)
        adamw_step(x, grad, m, v, t, 0.9, cfg, mask)
        for got, w in zip((x, m, v), want):
            assert np.array_equal(got, w)
        for got, w in zip((x, m, v), (x64, m64, v64)):
            np.testing.assert_allclose(got, w, rtol=2e-5, atol=1e-7)
    default_eps = AdamWConfig(alpha=0.01, beta1=0.8, beta2=0.95, decay=0.05, gclip=1.0)
    x2, _, _, _ = _rand_state(2000, seed=7)
    m2, v2 = np.zeros(2000, np.float32), np.zeros(2000, np.float32)
    adamw_step(x2, g, m2, v2, 1, 0.9, default_eps, mask)
    x1, _, _, _ = _rand_state(2000, seed=7)
    m1, v1 = np.zeros(2000, np.float32), np.zeros(2000, np.float32)
    adamw_step(x1, g, m1, v1, 1, 0.9, cfg, mask)
    assert np.abs(x1 - x2).max() > 1e-4  # eps is used


def test_adam_flags_reach_the_optimizer_config():
    from gguf_finetune.cli.finetune_args import parse_finetune_args

    a = parse_finetune_args(["--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-alpha", "0.01",
                             "--adam-decay", "0.05", "--adam-gclip", "0.5", "--opt-past", "3", "--opt-delta", "0.01",
                             "--opt-max-no-improvement", "4", "--adam-epsf", "1e-4"])
    c = a.train.adam
    assert (c.beta1, c.beta2, c.alpha, c.decay, c.gclip) == (0.8, 0.95, 0.01, 0.05, 0.5)
    assert (c.past, c.delta, c.max_no_improvement, c.eps_f) == (3, 0.01, 4, 1e-4)
    assert c.eps == 1e-8  # not a flag, as in llama.cpp


def test_clip_scale():
    g = np.full(100, 0.5, dtype=np.float32)  # norm 5
    assert clip_scale(g, 1.0) == np.float32(1.0 / 5.0)
    assert clip_scale(g, 10.0) == 1.0
    assert clip_scale(g, 0.0) == 1.0


def test_first_update_of_fresh_run_with_sched_zero_moves_only_moments():
    # llama.cpp's first update uses sched(0) = 0 when warmup > 0: parameters stay, m and v move
    cfg = AdamWConfig(alpha=0.02, warmup=2)
    x, g, _, _ = _rand_state(100)
    m = np.zeros(100, np.float32)
    v = np.zeros(100, np.float32)
    x0 = x.copy()
    adamw_step(x, g, m, v, 1, schedule(0, cfg), cfg, np.ones(100, bool))
    assert np.array_equal(x, x0)
    assert np.all(m != 0) and np.all(v > 0)


def test_decay_only_where_masked():
    cfg = AdamWConfig(alpha=0.02, decay=0.1)
    x = np.ones(6, np.float32)
    zeros = np.zeros(6, np.float32)
    mask = decay_mask_from_segments([2, 1, 3], [2, 1, 2], 2)
    assert mask.tolist() == [True, True, False, True, True, True]
    adamw_step(x, zeros, zeros.copy(), zeros.copy(), 1, 0.5, cfg, mask)
    keep = np.float32(1) - np.float32(0.1) * np.float32(0.02) * np.float32(0.5)
    assert x.tolist() == [keep, keep, 1.0, keep, keep, keep]


def test_adamw_rejects_wrong_dtype():
    x = np.zeros(3, np.float64)
    with pytest.raises(TypeError):
        adamw_step(x, x, x, x, 1, 1.0, AdamWConfig(), None)


# -- convergence tests ----------------------------------------------------------------------------


def test_max_no_improvement():
    cfg = AdamWConfig(max_no_improvement=2)
    st = ConvergenceState()
    st.start(5.0, 0, cfg)
    assert not st.after_update(4.0, 1, 0, cfg)  # improved
    assert not st.after_update(4.5, 2, 0, cfg)
    assert st.after_update(4.2, 3, 0, cfg) == (  # second iteration without beating 4.0
        "no improvement on the best loss for 2 iterations (--opt-max-no-improvement 2)")
    assert st.fx_best == 4.0


def test_eps_f_and_delta():
    st = ConvergenceState()
    cfg = AdamWConfig(eps_f=1e-3)
    st.start(2.0, 0, cfg)
    assert not st.after_update(1.9, 1, 0, cfg)
    assert st.after_update(1.9001, 2, 0, cfg)
    cfg = AdamWConfig(past=2, delta=1e-2)
    st = ConvergenceState()
    st.start(3.0, 0, cfg)  # pf[0] = 3.0
    assert not st.after_update(2.0, 1, 0, cfg)  # iter0+t = 0 < past: no test; pf[0] = 2.0
    assert not st.after_update(1.5, 2, 0, cfg)  # 1 < past; pf[1] = 1.5
    assert not st.after_update(1.0, 3, 0, cfg)  # rate (pf[0]=2.0 - 1.0)/1.0 = 1; pf[0] = 1.0
    assert st.after_update(1.5, 4, 0, cfg)  # rate (pf[1]=1.5 - 1.5)/1.5 = 0 < delta
    assert st.past_losses.dtype == np.float32


# -- the fixture checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["chk-tiny-4.gguf", "chk-tiny-10.gguf"])
def chk(request, testdata):
    from gguf_finetune.gguf_io import open_gguf

    return open_gguf(testdata / FIXTURE / request.param, "checkpoint")


def test_param_order_explains_moment_layout(chk):
    """In the moments, token_embd.lora_b's grad is sparse (only tokens seen), output.lora_b's dense."""
    m = np.asarray(chk.tensor("optimizer.adam.first_moments").data)
    sizes = {n: int(np.prod(chk.tensor(n).shape)) for n in llamacpp_file_order(2)}
    assert sum(sizes.values()) == m.shape[0] == chk.get_int("optimizer.parameter_count")

    def segment(order, name):
        off = 0
        for n in order:
            if n == name:
                return m[off:off + sizes[n]]
            off += sizes[n]
        raise KeyError(name)

    order = llamacpp_param_order(2)
    assert sorted(order) == sorted(sizes)
    assert (segment(order, "token_embd.weight.lora_b") != 0).mean() < 0.1  # measured 0.043 at iter 4
    assert (segment(order, "output.weight.lora_b") != 0).mean() == 1.0
    assert (segment(order, "blk.0.attn_q.weight.lora_a") != 0).mean() == 1.0
    # the file order would put the sparse block right after token_embd.lora_a
    assert (segment(llamacpp_file_order(2), "token_embd.weight.lora_b") != 0).mean() == 1.0


def test_checkpoint_losses_match_log(chk, testdata):
    """best_loss = first loss a run computed; previous_loss = the loss printed on the saving iteration."""
    it = chk.get_int("training.iteration_count")
    assert chk.get_int("optimizer.iteration_count") == it
    rows = _iter_lines(testdata / FIXTURE / ("run1.log" if it == 4 else "run2.log"))
    by_iter = {int(r[0]): float(r[4]) for r in rows}
    first = min(by_iter)
    assert chk.get_float("optimizer.adam.best_loss") == pytest.approx(by_iter[first + 1], abs=1e-6)
    assert chk.get_float("optimizer.adam.previous_loss") == pytest.approx(by_iter[it], abs=1e-6)
