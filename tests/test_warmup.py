"""First-run compilation (src/gguf_finetune/warmup.py): the jobs cover every kernel a step of each
family compiles, the claims run each job once across two processes, a failing child costs one
note line, and finetune prints the notice once on a cold cache and never on a warm one.

The coverage checks run in fresh processes (``python tests/test_warmup.py probe CONFIG``): a
process that already holds a kernel (from another test) would hide a job that misses it.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gguf_finetune import warmup

HERE = Path(__file__).resolve().parent

# every family's options (tests/test_engine_grad.py's FAMILY_SPECS) and the step's switches
PROBES = {
    "llama": dict(spec=dict(arch="llama", rope_factors=True)),  # untied: token_embd and output adapters
    "qwen2-materialized": dict(spec=dict(arch="qwen2", tied=True), flash=False, checkpointing=False),
    "qwen3-packed-eval": dict(spec=dict(arch="qwen3", head_dim=6, tied=True), packed=True, evaluate=True),
    "gemma3-packed": dict(spec=dict(arch="gemma3", n_layer=3, head_dim=8, tied=True, sliding_window=3,
                                    swa_pattern=2, softcap=2.0), packed=True),
    # a vocabulary of two head chunks (strided logits views), norm adapters, layers dequantized on use
    "phi3-wide-lowmem": dict(spec=dict(arch="phi3", n_rot=2, rope_factors=True, n_vocab=4200, n_embd=32, n_ff=64,
                                    qtype="Q8_0"),
                             norm_rank=1, budget=0),
    # a vocabulary whose logits take several row chunks when streaming: the head streamed twice
    "llama-streamed-head": dict(spec=dict(arch="llama", n_vocab=140000), budget=0, streamed=True),
    # a step of as many rows as kernels.LORA_PARALLEL_ROWS: the LoRA forward's rows split among threads
    "qwen2-split-lora": dict(spec=dict(arch="qwen2"), lora_parallel_rows=24),
}


def signatures() -> set[str]:
    """Every (numba dispatcher, compiled or loaded signature) this process holds."""
    from numba.core.dispatcher import Dispatcher

    return {f"{d.py_func.__module__}.{d.py_func.__qualname__}{tuple(s)}"
            for d in gc.get_objects() if isinstance(d, Dispatcher) for s in d.signatures}


def probe(cfg: dict, folder: Path) -> list[str]:
    """Run the warm-up jobs of a tiny model's step, then the step (loss and gradients, AdamW, and
    validation when asked): the signatures the step added (none when the jobs cover it)."""
    from gguf_finetune.config import AdamWConfig
    from gguf_finetune.engine.backward import eval_loss, loss_and_grad
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.lora import LoraLayout, LoraParams, LoraRanks, make_specs
    from gguf_finetune.model import Weights, read_hparams
    from gguf_finetune.optim import adamw_step, schedule
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

    base = dict(n_vocab=300, n_embd=16, n_ff=24, n_layer=2, n_head=4, n_head_kv=2, seed=5, std=0.3)
    path = write_synthetic_model(folder / "m.gguf", SyntheticSpec(**(base | cfg["spec"])))
    f = open_gguf(path)
    hp = read_hparams(f)
    weights = Weights(f, hp, budget=cfg.get("budget"), dtype=np.float32)
    layout = LoraLayout(make_specs(hp, LoraRanks.uniform(2, norm_rank=cfg.get("norm_rank", 0))))
    rng = np.random.default_rng(0)
    lora = LoraParams(layout, alpha=2.0, flat=(rng.standard_normal(layout.size) * 0.1).astype(np.float32))
    flash, ckpt, evaluate = cfg.get("flash", True), cfg.get("checkpointing", True), cfg.get("evaluate", False)
    B, T = 2, 12
    if "lora_parallel_rows" in cfg:
        from gguf_finetune.engine import kernels as K

        K.LORA_PARALLEL_ROWS = cfg["lora_parallel_rows"]
    plan = warmup.plan_for(weights, hp, lora, flash, ckpt, B * T, evaluate)
    warmup.compile_dequantizers(f.tensors.values())
    for job in warmup.jobs(plan):
        job.run()
    before = signatures()

    tokens = rng.integers(0, hp.n_vocab, (B, T))
    targets = rng.integers(0, hp.n_vocab, (B, T))
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)  # some positions without loss: the head's subset
    pos = seg = None
    if cfg.get("packed"):
        seg = np.repeat([[0] * 5 + [5] * 7], B, axis=0)
        pos = np.arange(T)[None, :] - seg
    from gguf_finetune.engine.backward import head_streamed

    streamed = bool(cfg.get("streamed"))
    assert plan.head_streamed == streamed == head_streamed(weights, int(np.count_nonzero(mask)), 4)
    grads = lora.like()
    loss_and_grad(weights, hp, lora, grads, tokens, targets, mask, 0.1, checkpointing=ckpt, flash=flash, pos=pos,
                  seg_start=seg)
    adam = AdamWConfig()
    m, v = np.zeros_like(lora.flat), np.zeros_like(lora.flat)
    adamw_step(lora.flat, grads.flat, m, v, 1, schedule(0, adam), adam, layout.decay_mask(adam.decay_min_ndim))
    schedule(adam.warmup + 5, adam)
    if evaluate:
        eval_loss(weights, hp, lora, tokens, targets, mask, 0.1, flash, pos, seg)
    return sorted(signatures() - before)


@pytest.mark.parametrize("name", list(PROBES))
def test_a_step_compiles_nothing_beyond_the_jobs(name, tmp_path):
    r = subprocess.run([sys.executable, __file__, "probe", name, str(tmp_path)], check=False, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [], "kernels a step compiles that no job does"


def test_plan_follows_the_model():
    from gguf_finetune.engine.kernels import LORA_ADD_PARALLEL

    p = warmup.Plan(act="gelu_tanh", out_adapter=True, rows=256, head_rows=256, n_embd=576, n_vocab=49152)
    names = [j.name for j in warmup.jobs(p)]
    assert names[:2] == ["flash_fwd", "flash_bwd"] and "geglu" in names and "swiglu" not in names
    assert {"lora_add", "lora_wide"} <= set(names) and "scatter" not in names and "lora_u" not in names
    # chunks of the logits [256, 4096] are strided views of 2^20 elements: parallel; the head's
    # gradient [n, 576] and small chunks: serial
    assert 256 * 4096 >= LORA_ADD_PARALLEL
    assert p.lora_add_variants() == {(False, False), (False, True), (True, True)}
    step = [j.name for j in warmup.jobs(warmup.step_plan(p))]
    assert step == ["flash_fwd", "flash_bwd", "xent", "lora", "rope", "rmsnorm_bwd", "rmsnorm", "adamw"]
    assert "attention" in [j.name for j in warmup.jobs(warmup.Plan(flash=False))]


CLAIMER = """
import sys, time
from gguf_finetune.warmup import Job, run_unclaimed
log, claims, order = sys.argv[1], sys.argv[2], sys.argv[3]
def job(name):
    def run():
        with open(log, "a") as fh:
            fh.write(f"{name} {order}\\n")
        time.sleep(0.25)  # 12 jobs outlast the other process's start-up (numba import)
    return Job(name, (), run)
names = [f"j{i}" for i in range(12)]
run_unclaimed([job(n) for n in names], names if order == "front" else names[::-1], claims)
"""


def test_claims_run_each_job_once_across_two_processes(tmp_path):
    claims = tmp_path / "claims"
    claims.mkdir()
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(log), str(claims), order])
             for order in ("front", "back")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ran = [line.split() for line in log.read_text().splitlines()]
    assert sorted(n for n, _ in ran) == sorted(f"j{i}" for i in range(12))  # each once
    assert {o for _, o in ran} == {"front", "back"}  # both took some


def test_start_is_none_when_warm_or_without_workers(monkeypatch):
    monkeypatch.setattr(warmup, "cold", lambda job_list: [])
    assert warmup.start(warmup.Plan()) is None
    assert warmup.start(warmup.Plan(), workers=0, force=True) is None

    def broken(job_list):  # numba's private cache attributes changed
        raise AttributeError("_cache_file")

    monkeypatch.setattr(warmup, "cold", broken)
    assert warmup.start(warmup.Plan()) is None


# -- finetune: the notice, a failing child -------------------------------------------------------

def finetune(work: Path, capsys) -> tuple[int, str, str]:
    from gguf_finetune.cli.finetune import run

    code = run(["--model-base", str(work / "m.gguf"), "--train-data", str(work / "train.txt"),
                "--sample-start", "<s>", "--ctx", "16", "--batch", "2", "--adam-iter", "1", "--threads", "2",
                "--seed", "1", "--save-every", "0", "--no-progress",
                "--checkpoint-out", str(work / "chk-ITERATION.gguf"), "--lora-out", str(work / "lora-ITERATION.gguf"),
                "--metrics-out", str(work / "metrics.jsonl")])
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_notice_once_on_a_cold_cache_none_when_warm(work, capsys, monkeypatch):
    code, out, err = finetune(work, capsys)  # whatever the cache held: now it holds this run's kernels
    assert code == 0, err
    code, out, err = finetune(work, capsys)
    assert code == 0 and warmup.NOTICE not in out and err == "", (out, err)
    started = []
    real_start = warmup.start
    monkeypatch.setattr(warmup, "start", lambda *a, **kw: started.append(1) or real_start(*a, **kw, force=True))
    code, out, err = finetune(work, capsys)  # as if cold: a real child runs the jobs (loading them)
    assert code == 0 and started and err == "", err
    assert out.splitlines().count(warmup.NOTICE) == 1 and out.splitlines()[0] == warmup.NOTICE


def test_finetune_with_a_failing_child_notes_it_in_one_line_and_trains(work, capsys, monkeypatch):
    monkeypatch.setattr(warmup, "cold", lambda job_list: [j.name for j in job_list])
    monkeypatch.setattr(warmup, "_child_command",
                        lambda plan, claims, names: [sys.executable, "-c", "import sys; sys.exit('kaboom: no compiler')"])
    code, out, err = finetune(work, capsys)
    assert code == 0, err
    assert err.splitlines() == ["finetune: note: compiling kernels in the background failed (kaboom: no compiler); "
                                "compiling them here"]
    assert out.splitlines().count(warmup.NOTICE) == 1
    assert "iter=     1" in out


@pytest.mark.slow
def test_a_cold_cache_run_trains_as_a_warm_one(work, tmp_path):
    """A fresh NUMBA_CACHE_DIR: the notice, the child compiling, the same loss as the warm run after it."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), PYTHONPATH=os.pathsep.join(
        [str(Path(warmup.SRC))] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    argv = [sys.executable, "-m", "gguf_finetune", "finetune", "--model-base", "m.gguf", "--train-data", "train.txt",
            "--sample-start", "<s>", "--ctx", "16", "--batch", "2", "--adam-iter", "2", "--threads", "2", "--seed", "1",
            "--save-every", "0", "--no-progress"]
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        r = subprocess.run(argv, check=False, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        runs.append((r.stdout, time.perf_counter() - t0))
    (cold, t_cold), (warm, t_warm) = runs
    assert cold.splitlines().count(warmup.NOTICE) == 1 and warmup.NOTICE not in warm
    assert re.findall(r"loss=(\S+)", cold) == re.findall(r"loss=(\S+)", warm)
    print(f"\ncold {t_cold:.1f} s, warm {t_warm:.1f} s")


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    print(json.dumps(probe(PROBES[sys.argv[2]], Path(sys.argv[3]))))
