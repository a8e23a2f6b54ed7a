"""``finetune``: llama.cpp's finetune, flag for flag — load, resume or start, train, save.

The pieces live below the CLI (model, data, trainer, formats); this module wires them together
from the parsed flags and prints llama.cpp's start-up lines.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import dist
from ..arch import PRINT_ORDER, TARGET_BY_KEY
from ..errors import UsageError, UserError
from .common import EXIT_INTERRUPTED, keep_freed_memory, run_main, set_threads
from .finetune_args import FinetuneArgs, parse_finetune_args
from .parser import HelpRequested
from .preflight import (
    best_name,
    check_memory,
    check_output_dir,
    check_outputs,
    check_ranks_fit,
    finetune_inputs,
    finetune_outputs,
    gib,
    output_name,
)


def _say(line: str) -> None:
    print(line, flush=True)


def lora_format(a: FinetuneArgs) -> str:
    if "--lora-format" in a.given:
        return a.out.lora_format
    return "ggla" if a.out.lora_out.endswith(".bin") else "gguf"


def resolve_ranks(a: FinetuneArgs, hp, ckpt):
    """Ranks from the flags; a resumed checkpoint's ranks win over flags that were not given."""
    from ..lora import LoraRanks  # lazy: the engine's modules load after the flags are parsed (fast --help)

    ranks = a.lora.resolved_ranks()
    given = a.lora.given_ranks()
    spec = hp.spec
    for k in given:
        t = TARGET_BY_KEY[k]
        if not spec.has_target(t):
            have = ", ".join(x.flag for x in spec.targets() if not x.is_norm)
            raise UsageError(f"{t.flag}: a {hp.arch} model has no '{t.tensor}' tensor (its matrices take {have})")
    if ckpt is not None:
        for k, v in vars(ckpt.ranks).items():
            if k in given and ranks[k] != v:
                raise UserError(f"{TARGET_BY_KEY[k].flag} {ranks[k]} does not match the checkpoint's rank {v} "
                                f"('{a.out.checkpoint_in}')")
            ranks[k] = v
        return LoraRanks(**ranks)
    if hp.tied_embeddings:
        # today's llama.cpp applies a token_embd adapter to the tied output head as well, where its
        # flipped layout does not fit: leave both untrained unless asked for
        for k in ("tok_embd", "out"):
            if k not in given and ranks[k]:
                ranks[k] = 0
                print(f"finetune: note: tied embeddings: {TARGET_BY_KEY[k].flag} set to 0 (give it explicitly to "
                      f"train it; today's llama.cpp cannot apply such an adapter to a tied head)", file=sys.stderr)
    return LoraRanks(**ranks)


def print_params(hp, a: FinetuneArgs, ranks) -> None:
    _say("main: init model")
    for name, val in (("n_vocab", hp.n_vocab), ("n_ctx", a.train.n_ctx), ("n_embd", hp.n_embd), ("n_ff", hp.n_ff),
                      ("n_head", hp.n_head), ("n_head_kv", hp.n_head_kv), ("n_layer", hp.n_layer)):
        _say(f"print_params: {name:<21} : {val}")
    _say(f"print_params: {'norm_rms_eps':<21} : {hp.rms_eps:f}")
    _say(f"print_params: {'rope_freq_base':<21} : {hp.rope_freq_base:f}")
    _say(f"print_params: {'rope_freq_scale':<21} : {hp.rope_freq_scale:f}")
    for key in PRINT_ORDER:
        t = TARGET_BY_KEY[key]
        if hp.spec.has_target(t):
            _say(f"print_lora_params: n_rank_{t.label:<14} : {getattr(ranks, key)}")


class Saver:
    """Writes checkpoint and adapter for an iteration: ITERATION and LATEST names, atomically."""

    def __init__(self, a: FinetuneArgs, model, ranks, fmt: str):
        self.a, self.model, self.hp, self.ranks, self.fmt = a, model, model.hparams, ranks, fmt
        self.notice_done = False

    def norm_delta_ratio(self, lora, names) -> float:
        """Largest ‖Δg‖/‖g‖ over the norm adapters: how much a GGUF adapter leaves out."""
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..quants import dequantize_tensor

        worst = 0.0
        for name in names:
            a, b, s = lora.get(name)
            g = dequantize_tensor(self.model.gguf.tensor(name))
            worst = max(worst, float(np.linalg.norm(s * (a @ b[0])) / max(np.linalg.norm(g), 1e-30)))
        return worst

    def write_lora(self, path: str, lora) -> None:
        if self.fmt == "ggla":
            # lazy: loaded once the flags are parsed (fast --help and usage errors)
            from ..formats.ggla import write_ggla

            write_ggla(path, lora, self.a.lora.lora_r, self.a.lora.alpha)
            return
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..formats.adapter_gguf import dropped_message, write_adapter_gguf

        dropped = write_adapter_gguf(path, lora, self.hp, self.a.out.lora_type)
        msg = dropped_message(dropped, self.hp.tied_embeddings)
        if msg and not self.notice_done:
            self.notice_done = True
            norms = [sp.name for sp in dropped if sp.kind == "norm"]
            if norms:
                msg += (f"; the norm adapters change their weights by up to "
                        f"{100 * self.norm_delta_ratio(lora, norms):.2f}% (relative L2); checkpoints and "
                        f"export-lora keep them")
            print(f"finetune: {msg}", file=sys.stderr)

    def __call__(self, iteration: int, trainer) -> list[str]:
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..formats.checkpoint import write_checkpoint

        o = self.a.out
        paths = []
        for value in (str(iteration), o.fn_latest):
            p = output_name(o.checkpoint_out, o.pattern_fn_it, value)
            _say(f"save_checkpoint_lora_file: saving to {p}")
            write_checkpoint(p, self.hp, self.a.train.n_ctx, self.ranks, trainer.lora, trainer.opt, trainer.train)
            paths.append(p)
        for value in (str(iteration), o.fn_latest):
            p = output_name(o.lora_out, o.pattern_fn_it, value)
            _say(f"save_as_llama_lora: saving to {p}")
            self.write_lora(p, trainer.lora)
            paths.append(p)
        return paths

    def save_best(self, iteration: int, trainer) -> list[str]:
        """--save-best: the checkpoint and adapter under the 'best' names (see best_name)."""
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..formats.checkpoint import write_checkpoint

        o = self.a.out
        ck, lo = best_name(o.checkpoint_out, o.pattern_fn_it), best_name(o.lora_out, o.pattern_fn_it)
        _say(f"save_checkpoint_lora_file: saving to {ck}")
        write_checkpoint(ck, self.hp, self.a.train.n_ctx, self.ranks, trainer.lora, trainer.opt, trainer.train)
        _say(f"save_as_llama_lora: saving to {lo}")
        self.write_lora(lo, trainer.lora)
        return [ck, lo]


# --------------------------------------------------------------------------------------------------
# training and validation data
# --------------------------------------------------------------------------------------------------
_TEXT_ONLY_FLAGS = ("--sample-start", "--include-sample-start", "--escape", "--overlapping-samples",
                    "--sample-random-offsets", "--separate-with-eos", "--separate-with-bos",
                    "--no-separate-with-eos", "--no-separate-with-bos")


def _template_loader(a: FinetuneArgs, model, path: str):
    def make():
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..data.chat_template import GGUF_KEY, file_time, load_chat_template

        hp = model.hparams
        return load_chat_template(a.data.chat_template, model.gguf.get(GGUF_KEY, None), model.tokenizer,
                                  file_time(path), family=(hp.arch, hp.spec.chat_template))
    return make


def load_dataset(a: FinetuneArgs, model, path: str, what: str, prog: str):
    """(format, dataset) of a training or validation file; reports as llama.cpp's finetune does."""
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..data.jsonl import detect_format, load_jsonl_dataset
    from ..data.text import load_train_text, tokenize_file

    fmt = detect_format(path, a.data.data_format)
    tok = model.tokenizer
    if fmt == "jsonl":
        _say(f"main: tokenize {what} from {path} (jsonl)")
        ds = load_jsonl_dataset(path, tok, a.train.n_ctx, template_for=_template_loader(a, model, path),
                                train_on_prompt=a.data.train_on_prompt, what=what, report=_say)
        _say(f"main: number of {'training' if what == 'train data' else 'validation'} tokens: {ds.n_tokens}")
        _say(f"main: number of trained tokens: {ds.n_trained()}"
             + (" (--train-on-prompt)" if a.data.train_on_prompt else " (assistant turns and completions)"))
    elif what == "train data":
        ds = load_train_text(path, tok, a.data.sample_start_bytes, a.data.include_sample_start,
                             a.data.overlapping_samples, a.train.n_ctx, report=_say)
        if any("sample start pattern" in m and "not found" in m for m in ds.messages):
            # llama.cpp's behaviour (the whole file is one sample) is kept, but said where it is seen
            hint = "; with --escape, \\n in it means a newline" if "\\" in a.data.sample_start and \
                not a.data.escape else ""
            print(f"{prog}: warning: --sample-start {a.data.sample_start!r} does not occur in '{path}': "
                  f"training on the whole file as one sample{hint}", file=sys.stderr)
    else:
        _say(f"main: tokenize {what} from {path}")
        ds = tokenize_file(path, tok, a.data.sample_start_bytes, a.data.include_sample_start,
                           a.data.overlapping_samples, a.train.n_ctx, report=_say)
        if not a.data.sample_start_bytes:
            # lazy: loaded once the flags are parsed (fast --help and usage errors)
            from ..data.validation import text_windows

            ds = text_windows(ds, a.train.n_ctx)
            _say(f"main: {what}: {ds.n_samples} windows of {a.train.n_ctx} tokens")
    if ds.n_samples and int(ds.tokens.max(initial=0)) >= model.hparams.n_vocab:
        raise UserError(f"{what} '{path}': token id {int(ds.tokens.max())} is outside the model's vocabulary "
                        f"({model.hparams.n_vocab} tokens)")
    return fmt, ds


def setup_data(a: FinetuneArgs, model, seed: int, saved, prog: str):
    """Training batches (resumed shuffle) and, when asked for, the validation batches."""
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..data.batches import PackedBatches, packing_efficiency, resume_shuffle
    from ..data.jsonl import RecordBatchConfig, RecordBatchIterator, detect_format, record_eval_batches
    from ..data.text import BatchConfig, BatchIterator
    from ..data.validation import split_indices, subset_text, text_eval_batches

    v = a.val
    if v.val_data and v.val_split > 0:
        raise UserError("--val-data and --val-split: give one of them")
    if (v.eval_every > 0 or v.save_best) and not (v.val_data or v.val_split > 0):
        flag = "--save-best" if v.save_best else "--eval-every"
        raise UserError(f"{flag} needs validation data: give --val-data FNAME or --val-split F")
    tok, hp = model.tokenizer, model.hparams
    fmt, ds = load_dataset(a, model, a.data.train_data, "train data", prog)
    if fmt == "jsonl":
        ignored = [f for f in _TEXT_ONLY_FLAGS if f in a.given]
        if ignored:
            print(f"{prog}: note: {', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} only to "
                  f"plain-text data; ignored for JSONL", file=sys.stderr)
    else:
        ignored = [f for f in ("--chat-template", "--train-on-prompt") if f in a.given]
        if ignored and not (v.val_data and detect_format(v.val_data, a.data.data_format) == "jsonl"):
            print(f"{prog}: note: {', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} only to "
                  f"JSONL data; ignored", file=sys.stderr)

    val_fmt, val_ds = None, None
    if v.val_split > 0:
        if fmt == "text" and (not a.data.sample_start_bytes or a.data.overlapping_samples):
            raise UserError("--val-split on plain text needs samples that do not overlap: give --sample-start "
                            "(without --overlapping-samples), or give --val-data")
        split_seed = a.run.seed if a.run.seed >= 0 else 0
        train_idx, val_idx = split_indices(ds.n_samples, v.val_split, split_seed)
        n_all = ds.n_samples
        if fmt == "jsonl":
            ds, val_ds = ds.subset(train_idx), ds.subset(val_idx)
        else:
            ds, val_ds = subset_text(ds, train_idx), subset_text(ds, val_idx)
        val_fmt = fmt
        _say(f"main: validation: holding out {val_ds.n_samples} of {n_all} samples (--val-split {v.val_split:g}, "
             f"seed {split_seed})")
    elif v.val_data:
        val_fmt, val_ds = load_dataset(a, model, v.val_data, "validation data", prog)

    pack = a.data.pack if a.data.pack is not None else fmt == "jsonl" and not a.data.fill_with_next_samples
    if pack and fmt == "text":
        if not a.data.sample_start_bytes:
            raise UsageError("--pack on plain text needs --sample-start: the samples to pack (without it every token "
                             "position starts a sample)")
        ds = ds.as_records(tok.bos_id)
    B, T = a.train.n_batch, a.train.n_ctx
    if fmt == "jsonl" or pack:
        eff = packing_efficiency(ds, B, T, pack, compact=a.train.flash)
        _say(f"main: {'packed rows' if pack else 'one record per row'}: {eff.text()}")
    state = resume_shuffle(saved, ds, a.data.train_data, seed, a.data.force_reshuffle, report=_say)
    if pack:
        batches = PackedBatches(ds, state, B, T, tok.eos_id, report=_say)
    elif fmt == "jsonl":
        bcfg = RecordBatchConfig(B, T, a.data.fill_with_next_samples)
        batches = RecordBatchIterator(ds, state, bcfg, tok.eos_id, hp.n_vocab, report=_say)
    else:
        bcfg = BatchConfig(a.train.n_batch, a.train.n_ctx, a.data.fill_with_next_samples, a.data.separate_with_eos,
                           a.data.separate_with_bos, a.data.sample_random_offsets)
        batches = BatchIterator(ds, state, bcfg, tok.bos_id, tok.eos_id, hp.n_vocab, report=_say)
    eval_batches = None
    if val_ds is not None:
        if val_fmt == "jsonl":
            eval_batches = record_eval_batches(val_ds, a.train.n_batch, a.train.n_ctx, tok.eos_id)
        else:
            eval_batches = text_eval_batches(val_ds, a.train.n_batch, a.train.n_ctx, tok.bos_id, tok.eos_id, hp.n_vocab)
        n_w = int(sum(float(w.sum()) for _, _, w in eval_batches))
        _say(f"main: validation: {val_ds.n_samples} samples, {n_w} trained positions, {len(eval_batches)} batches")
    return batches, eval_batches


def previous_best(a: FinetuneArgs, hp, evaluator, prog: str) -> float | None:
    """--save-best on a resumed run: the validation loss of the best checkpoint an earlier run kept."""
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..formats.checkpoint import read_checkpoint

    p = best_name(a.out.checkpoint_out, a.out.pattern_fn_it)
    if not os.path.isfile(p):
        return None
    try:
        ck = read_checkpoint(p, hp)
    except UserError as e:
        print(f"{prog}: note: cannot read the earlier best checkpoint ({e}); it will be replaced", file=sys.stderr)
        return None
    loss = float(evaluator(ck.lora))
    _say(f"main: best so far: {p} (iteration {ck.train.iteration}) val_loss={loss:f}")
    return loss


def divergence_message(d, a: FinetuneArgs, model, trainer, first_iteration: int, resumed: bool) -> str:
    """One line for a non-finite loss: where it happened, what may be at fault, what was kept."""
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..model import first_nonfinite_tensor

    o = a.out
    data = f"the training data '{a.data.train_data}'"
    loss = "nan" if math.isnan(d.loss) else ("inf" if d.loss > 0 else "-inf")
    latest = output_name(o.checkpoint_out, o.pattern_fn_it, o.fn_latest)
    if d.last_save > first_iteration:
        kept = f"last good checkpoint kept: iteration {d.last_save} ('{latest}')"
    elif resumed:
        kept = f"nothing new was saved; the checkpoint '{o.checkpoint_in}' (iteration {first_iteration}) is kept"
    else:
        kept = "no checkpoint was saved"
    if d.iteration == first_iteration:
        # no update has happened in this run: the learning rate cannot be the cause
        bad = first_nonfinite_tensor(model.gguf, model.hparams)
        if bad is not None:
            return (f"model '{a.model.model_base}': tensor '{bad}' holds non-finite values (NaN or inf), so the loss "
                    f"is {loss} from the first iteration; {kept}")
        if not np.all(np.isfinite(trainer.lora.flat)):
            return (f"checkpoint '{o.checkpoint_in}': its LoRA weights hold non-finite values (NaN or inf), so the "
                    f"loss is {loss}; resume from an earlier checkpoint, with a lower --adam-alpha; {kept}")
        if resumed:
            return (f"training diverged: loss is {loss} at iteration {d.iteration + 1}, the first of this run: the "
                    f"checkpoint '{o.checkpoint_in}', the model '{a.model.model_base}' or {data} may be at fault "
                    f"(if the earlier run diverged, resume from an earlier checkpoint with a lower --adam-alpha); "
                    f"{kept}")
        return (f"training diverged: loss is {loss} at the first iteration, before any update: the model "
                f"'{a.model.model_base}' or {data} may be at fault (--adam-alpha is not: nothing was learned yet); "
                f"{kept}")
    return (f"training diverged: loss is {loss} at iteration {d.iteration + 1}; lower --adam-alpha or check {data} "
            f"({kept})")


def run(argv: list[str], prog: str = "finetune") -> int | None:
    """finetune with these arguments; in an MPI job as one of its ranks (see :func:`_run_rank`)."""
    if dist.launcher_size() > 1:
        return _run_rank(argv, prog)
    return _train(argv, prog)


def start_warmup(a: FinetuneArgs, threads: int, cleanup: contextlib.ExitStack):
    """Before a training run: any kernel numba compiles says so once (warmup.Notice), and with a cold
    cache a child process starts compiling the step's kernels while this one loads the model and
    the data (warmup.start); None when there is no child."""
    if a.train.adam.n_iter <= 0 or a.out.only_write_lora:
        return None
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from .. import warmup

    notice = warmup.Notice(_say)
    cleanup.callback(notice.close)
    warm = warmup.start(warmup.Plan(flash=a.train.flash, checkpointing=a.train.checkpointing),
                        workers=1 if threads > 1 else 0, notice=notice)
    if warm is not None:
        cleanup.callback(warm.stop)  # an error or Ctrl-C before training: no child left running
    return warm


def finish_warmup(warm, a: FinetuneArgs, model, lora, world, evaluate: bool, prog: str) -> None:
    """Compile what the child has not (this model's kernels among them) and wait for it."""
    from .. import warmup  # lazy: as in start_warmup

    plan = warmup.plan_for(model.weights, model.hparams, lora, a.train.flash, a.train.checkpointing,
                           a.train.n_batch // world.size * a.train.n_ctx, evaluate)
    for err in warm.finish(plan, model.gguf.tensors.values()):
        if world.is_root:
            print(f"{prog}: note: compiling kernels in the background failed ({err}); compiling them here",
                  file=sys.stderr)


def _train(argv: list[str], prog: str) -> int | None:
    with contextlib.ExitStack() as cleanup:
        return _train_in(argv, prog, cleanup)


def _train_in(argv: list[str], prog: str, cleanup: contextlib.ExitStack) -> int | None:
    a = parse_finetune_args(argv, prog)
    world = dist.world()
    if a.train.n_batch % world.size:
        raise UsageError(f"--batch {a.train.n_batch}: not divisible by the {world.size} ranks mpiexec started (each "
                         f"rank computes --batch / ranks rows of every batch)")
    if not world.is_root:  # rank 0 alone prints, shows progress and writes files; the others fail aloud only
        sys.stdout = open(os.devnull, "w")
    threads = set_threads(a.run.n_threads)
    keep_freed_memory()
    if "--n-gpu-layers" in a.given:
        print(f"{prog}: note: -ngl/--n-gpu-layers has no effect: this engine runs on the CPU", file=sys.stderr)
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..api import load_model
    from ..data.batches import ShuffleState
    from ..formats.checkpoint import read_checkpoint
    from ..formats.ggla import ARCHS as GGLA_ARCHS
    from ..gguf_io import check_regular_file
    from ..lora import LoraLayout, init_lora, make_specs
    from ..model import HParamOverrides
    from ..optim import OptimizerState
    from ..report import LlamaLog, MetricsFile, ProgressBar
    from ..trainer import Diverged, Trainer, TrainState

    o = a.out
    fmt = lora_format(a)
    check_output_dir(o.lora_out, "--lora-out")
    if not o.only_write_lora:
        check_output_dir(o.checkpoint_out, "--checkpoint-out")
        check_output_dir(o.metrics_path, "--metrics-out")
        check_regular_file(a.data.train_data, "--train-data")
        if a.val.val_data:
            check_regular_file(a.val.val_data, "--val-data")
    if not a.model.model_base:
        raise UserError("--model-base: no model given")
    warm = start_warmup(a, threads, cleanup)  # (after the checks that fail at once)
    budget = 0 if a.run.low_memory else a.run.memory_budget
    overrides = HParamOverrides(a.model.rope_freq_base, a.model.rope_freq_scale, a.model.norm_rms_eps)
    # training reads the head twice per step. With checkpointing (the memory-lean default) it is
    # dequantized in chunks each time (~3% of a SmolLM2 step) to save n_vocab x n_embd floats (113 MB
    # there); without checkpointing, which already trades memory for speed, it is kept as float32
    # when the memory budget allows (identical results either way)
    model = load_model(a.model.model_base, overrides=overrides, memory_budget=budget,
                       cache_head=not a.train.checkpointing)
    hp = model.hparams
    if fmt == "ggla" and hp.arch not in GGLA_ARCHS:
        raise UsageError(f"--lora-format ggla: llama.cpp's legacy .bin adapters are for llama models, this one is "
                         f"'{hp.arch}'; write a GGUF adapter (--lora-format gguf, a .gguf --lora-out)")
    seed = world.broadcast(a.run.seed if a.run.seed >= 0 else int(time.time()) & 0xFFFFFFFF)
    _say(f"main: seed: {seed}")
    _say(f"main: model base = '{a.model.model_base}'")

    ckpt = None
    if Path(o.checkpoint_in).exists():
        ckpt = read_checkpoint(o.checkpoint_in, hp)
    elif o.only_write_lora or "--checkpoint-in" in a.given:
        _say(f"main: checkpoint '{o.checkpoint_in}' not found: starting a new adapter")
        if o.only_write_lora:
            raise UserError(f"--checkpoint-in '{o.checkpoint_in}': file not found (needed by --only-write-lora)")
    ranks = resolve_ranks(a, hp, ckpt)
    if ckpt is None:
        check_ranks_fit(a, hp, ranks, a.model.model_base)
    # nothing this run writes may replace an input or another output (before anything is written)
    check_outputs(finetune_outputs(a, ckpt.train.iteration if ckpt is not None else 0), finetune_inputs(a))
    estimate = None
    if a.train.adam.n_iter > 0 and not o.only_write_lora:  # before the adapter and optimizer state are allocated
        estimate = check_memory(a, hp, ckpt.lora.layout.size if ckpt is not None
                                else LoraLayout(make_specs(hp, ranks)).size)
    print_params(hp, a, ranks)
    if ckpt is not None:
        lora, opt, train = ckpt.lora, ckpt.opt, ckpt.train
    else:
        lora = init_lora(hp, ranks, a.lora.alpha, seed)
        opt = OptimizerState.zeros(lora.layout.size, a.train.adam.past)
        train = TrainState()
    _say(f"main: total train_iterations {train.iteration}")
    _say(f"main: seen train_samples     {train.sample_count}")
    _say(f"main: seen train_tokens      {train.token_count}")
    _say(f"main: completed train_epochs {train.epoch_count}")
    _say(f"main: lora_size = {lora.flat.nbytes} bytes ({lora.flat.nbytes / 2**20:.1f} MB)")
    _say(f"main: opt_size  = {opt.m.nbytes + opt.v.nbytes} bytes ({(opt.m.nbytes + opt.v.nbytes) / 2**20:.1f} MB)")
    _say(f"main: opt iter {opt.iteration}")
    saver = Saver(a, model, ranks, fmt) if world.is_root else None
    if o.only_write_lora:
        if saver is not None:
            p = output_name(o.lora_out, o.pattern_fn_it, str(train.iteration))
            _say(f"save_as_llama_lora: saving to {p}")
            saver.write_lora(p, lora)
        return 0

    if a.train.n_ctx > hp.n_ctx_train:  # (after the checks above: a refused run prints only its error)
        print(f"{prog}: warning: --ctx {a.train.n_ctx} is above the model's training context {hp.n_ctx_train}",
              file=sys.stderr)

    saved = None
    if ckpt is not None:
        t = ckpt.train
        saved = ShuffleState(t.shuffle_samples_hash, t.shuffle_rng_state, t.shuffle_sample_count,
                             t.shuffle_next_sample, t.epoch_count, t.sample_count)
    batches, eval_batches = setup_data(a, model, seed, saved, prog)
    if warm is not None:  # the first step (or evaluation) loads what was compiled meanwhile
        finish_warmup(warm, a, model, lora, world, eval_batches is not None, prog)
    evaluator, best_loss = None, None
    if eval_batches is not None:
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..evaluate import Evaluator

        evaluator = Evaluator(model.weights, hp, eval_batches, flash=a.train.flash, world=world)
        if a.val.save_best and ckpt is not None:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                best_loss = previous_best(a, hp, evaluator, prog)
    callbacks: list = [LlamaLog()]
    show_bar = a.run.progress if a.run.progress is not None else sys.stderr.isatty()
    if show_bar and world.is_root:
        callbacks.append(ProgressBar(a.train.adam.n_iter))
    if world.is_root:
        callbacks.append(MetricsFile(o.metrics_path))
    if world.size > 1:
        _say(f"main: MPI: {world.size} ranks, each computes {a.train.n_batch // world.size} rows of every batch "
             f"with {a.run.n_threads} threads")
    _say("main: begin training")
    trainer = Trainer(model.weights, hp, lora, opt, train, batches, a.train, callbacks, save=saver,
                      evaluator=evaluator, eval_every=a.val.eval_every,
                      save_best=saver.save_best if a.val.save_best and saver is not None else None,
                      best_loss=best_loss, world=world)
    first_iteration = train.iteration
    try:
        # a non-finite loss is detected and reported below: numpy's overflow/invalid warnings on the
        # way there would only be noise in front of that one line
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            result = trainer.run()
    except Diverged as d:
        raise UserError(divergence_message(d, a, model, trainer, first_iteration, ckpt is not None)) from None
    except MemoryError:
        # the estimate checked above is on the low side: say which flags set the size of a step
        guess = f" (estimated at least {gib(estimate.total)})" if estimate is not None else ""
        raise UserError(f"out of memory during training with --ctx {a.train.n_ctx} x --batch {a.train.n_batch}{guess}; "
                        f"lower --ctx or --batch") from None
    if result.reason == "interrupted":
        print(f"{prog}: interrupted: saved iteration {result.iteration} "
              f"({output_name(o.checkpoint_out, o.pattern_fn_it, o.fn_latest)})", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    run_main(run, argv, "finetune")


def _run_rank(argv: list[str], prog: str = "finetune") -> int | None:
    """``run`` as one rank of an MPI job: any failure ends the whole job at once (a rank left waiting
    in a collective would hang), with one line from rank 0 (or from the failing rank)."""
    try:
        w = dist.world()
    except UserError as e:  # mpi4py missing or mismatched: no job to abort; rank 0 alone says why
        if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) != "0":
            os._exit(e.exit_code)
        raise
    try:
        return _train(argv, prog)
    except HelpRequested:
        if not w.is_root:
            return 0
        raise
    except UserError as e:
        dist.fail(w, prog, str(e), e.exit_code)
    except KeyboardInterrupt:
        dist.fail(w, prog, "interrupted", EXIT_INTERRUPTED)
    except BaseException:
        traceback.print_exc()
        dist.fail(w, prog, "a bug (traceback above)", 1)
