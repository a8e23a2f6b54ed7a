"""``finetune``'s flags: every flag of llama.cpp's finetune (July 2024) with the same names, defaults
and meaning, plus ours (grouped under their own headings in ``--help``).

Each flag fills a field of :class:`FinetuneArgs`; the field holds the default and the help text
(``config.setting``), the table below only says which flag sets which field and how its value is
read.  Deliberate differences from llama.cpp are stated in the help text of the flag concerned.
(llama.cpp's own ``--rank-ffn_gate/_down/_up`` never matched after its ``_`` -> ``-`` rewrite; here
they work, spelled either way.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass, replace
from typing import Sequence

from ..arch import TARGETS
from ..config import DEFAULT_RANK, TrainConfig, setting
from ..errors import UsageError
from .parser import (
    MAX_BATCH,
    MAX_CTX,
    MAX_GRAD_ACC,
    MAX_OPT_PAST,
    MAX_RANK,
    Group,
    Parser,
    choice_value,
    flag,
    float_value,
    int_value,
    norm_flag,
    opt,
    size_value,
)

SEED_RANDOM = -1
_MODEL_VALUE = "(default: the model's value)"
_NORM_RANK_NOTE = ("Default here 0 = not adapted (llama.cpp: 1), because today's llama.cpp ignores norm adapters "
                   "in GGUF adapters; give 1 to adapt it as llama.cpp's finetune did.")


def process_escapes(text: str | bytes) -> bytes:
    """llama.cpp's ``string_process_escapes`` (``--escape``): :func:`gguf_finetune.data.text.process_escapes`."""
    from ..data.text import process_escapes as _process  # lazy: data.text imports numba; --help stays fast

    return _process(text)


@dataclass(frozen=True)
class ModelArgs:
    model_base: str = setting("", "model path from which to load base model")
    norm_rms_eps: float | None = setting(None, "RMS-Norm epsilon value")  # None: the model's value
    rope_freq_base: float | None = setting(None, "Frequency base for ROPE")
    rope_freq_scale: float | None = setting(None, "Frequency scale for ROPE")


def _rank_help(t) -> str:
    text = f"LORA rank for {t.what} tensor, overrides default rank."
    return text + " " + _NORM_RANK_NOTE if t.is_norm else text


# What to adapt: --lora-r, --lora-alpha and one rank_<key> per LoRA target (None: not given).
LoraArgs = make_dataclass("LoraArgs", [
    ("lora_r", int, setting(DEFAULT_RANK, "LORA r: default rank. Also specifies resulting scaling together with "
                                          "lora-alpha.")),
    ("lora_alpha", "float | None", setting(None, "LORA alpha : resulting LORA scaling is alpha/r. Unlike llama.cpp's "
                                                 "finetune, the alpha/r scaling is also applied in training, so the "
                                                 "adapter behaves at inference as it did during training.")),
] + [("rank_" + t.key, "int | None", setting(None, _rank_help(t))) for t in TARGETS], frozen=True, namespace={
    "__module__": __name__,
    "__doc__": "What to adapt.  ``None`` ranks mean \"not given\": --lora-r for matrices, 0 for norms.",
    "alpha": property(lambda self: float(self.lora_r if self.lora_alpha is None else self.lora_alpha)),
    "given_ranks": lambda self: {t.key: getattr(self, "rank_" + t.key) for t in TARGETS
                                 if getattr(self, "rank_" + t.key) is not None},
    "resolved_ranks": lambda self: {t.key: getattr(self, "rank_" + t.key) if getattr(self, "rank_" + t.key)
                                    is not None else (0 if t.is_norm else self.lora_r) for t in TARGETS},
})


@dataclass(frozen=True)
class DataArgs:
    train_data: str = setting("shakespeare.txt", "path from which to load training data")
    sample_start: str = setting("", "Sets the starting point for samples after the specified pattern. If empty use "
                                    "every token position as sample start.")  # as given; see sample_start_bytes
    escape: bool = setting(False, "process sample start escapes sequences (\\n, \\r, \\t, \\', \\\", \\\\, also \\xNN)")
    include_sample_start: bool = setting(False, "Include the sample start in the samples.")
    overlapping_samples: bool = setting(False, "Samples may overlap, will include sample-start of second and "
                                               "following samples. When off, samples will end at begin of next "
                                               "sample.")
    fill_with_next_samples: bool = setting(False, "Samples shorter than context length will be followed by the "
                                                  "next (shuffled) samples.")
    separate_with_eos: bool = setting(False, "When fill-with-next-samples, insert end-of-sequence token between "
                                             "samples.")
    separate_with_bos: bool = setting(True, "When fill-with-next-samples, insert begin-of-sequence token between "
                                            "samples.")
    sample_random_offsets: bool = setting(False, "Use samples beginning at random offsets. Together with "
                                                 "fill-with-next-samples this may help for training endless text "
                                                 "generation.")
    force_reshuffle: bool = setting(False, "Force a reshuffling of data at program start, otherwise the shuffling "
                                           "of loaded checkpoint is resumed.")
    data_format: str = setting("auto", "format of --train-data and --val-data: text (llama.cpp's samples) or jsonl "
                                       "(one record per line: {\"messages\": [{\"role\", \"content\"}, ...]}, "
                                       "ShareGPT {\"conversations\": [{\"from\", \"value\"}]}, {\"prompt\", "
                                       "\"completion\"} or {\"text\"}; mixed files are fine)")
    chat_template: str | None = setting(None, "render chat records with this template instead of the model's "
                                              "tokenizer.chat_template: a built-in name (chatml, llama2, llama3, "
                                              "mistral, zephyr, gemma, phi3) or a Jinja file (or a "
                                              "tokenizer_config.json)")
    train_on_prompt: bool = setting(False, "JSONL data: train on every token, not only the assistant turns / "
                                           "completions")
    pack: bool | None = setting(None, "pack whole records into the rows of --ctx tokens, each record attending "
                                      "only to itself (its positions restart at 0): JSONL records, or with --pack "
                                      "plain-text samples (each with its BOS)")  # None: JSONL yes, text no

    @property
    def sample_start_bytes(self) -> bytes:
        """The pattern the data pipeline looks for: UTF-8, escapes processed if --escape."""
        if self.escape:
            return process_escapes(self.sample_start)
        return self.sample_start.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class OutputArgs:
    lora_out: str = setting("ggml-lora-ITERATION-f32.gguf", "path to save llama lora (format: see --lora-format)")
    only_write_lora: bool = setting(False, "only save llama lora, don't do any training.  use this if you only want "
                                           "to convert a checkpoint to a lora adapter.")
    checkpoint_in: str = setting("checkpoint.gguf", "path from which to load training checkpoint")
    checkpoint_out: str = setting("checkpoint-ITERATION.gguf", "path to save training checkpoint")
    pattern_fn_it: str = setting("ITERATION", "pattern in output filenames to be replaced by iteration number")
    fn_latest: str = setting("LATEST", "string to use instead of iteration number for saving latest output")
    lora_format: str = setting("gguf", "adapter format written to --lora-out: gguf (what today's llama.cpp loads) or "
                                       "ggla (the legacy .bin format llama.cpp's finetune wrote, whatever the file "
                                       "name)")
    lora_type: str = setting("f32", "tensor type of the adapter written to --lora-out")
    metrics_out: str | None = setting(None, "write one JSON line of training metrics per iteration to FNAME")

    @property
    def metrics_path(self) -> str:
        if self.metrics_out is not None:
            return self.metrics_out
        return os.path.join(os.path.dirname(self.checkpoint_out), "metrics.jsonl")


@dataclass(frozen=True)
class ValArgs:
    """Validation during training."""

    val_data: str | None = setting(None, "validation data (same formats as --train-data)")
    val_split: float = setting(0.0, "hold out this fraction of the training samples for validation (chosen by "
                                    "--seed; with --seed -1 by seed 0, so that a resumed run holds out the same "
                                    "samples)")
    eval_every: int = setting(0, "compute the validation loss every N iterations (and at the end); 0 = only at the "
                                 "end")
    save_best: bool = setting(False, "also keep the checkpoint and adapter of the lowest validation loss, named with "
                                     "'best' in place of ITERATION")


@dataclass(frozen=True)
class RunArgs:
    seed: int = setting(SEED_RANDOM, "RNG seed")  # -1: random (llama.cpp uses time(NULL))
    n_threads: int = setting(6, "Number of threads")
    n_gpu_layers: int = setting(0, "Number of model layers to offload to GPU. Accepted and ignored: this engine "
                                   "runs on the CPU only.")
    memory_budget: int | None = setting(None, "memory for float32 copies of the base weights, like 2G or 512M; "
                                              "beyond it weights are dequantized layer by layer")  # None: automatic
    low_memory: bool = setting(False, "use as little memory as possible: never cache dequantized weights (slower)")
    progress: bool | None = setting(None, "show a progress bar on stderr (default: on when stderr is a terminal)")


@dataclass(frozen=True)
class FinetuneArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: OutputArgs = field(default_factory=OutputArgs)
    run: RunArgs = field(default_factory=RunArgs)
    val: ValArgs = field(default_factory=ValArgs)
    given: frozenset[str] = frozenset()  # canonical names of the flags on the command line

    def is_given(self, flag: str) -> bool:
        """Whether the flag (any spelling) was on the command line: llama.cpp's ``custom_*`` (e.g. --ctx
        overrides a resumed checkpoint's context only when given)."""
        return _FINETUNE_LOOKUP[norm_flag(flag)].flag in self.given


def _rank_opt(t) -> object:
    return opt(t.flag, "lora.rank_" + t.key, None, "N", int_value(0, MAX_RANK))


# llama.cpp's finetune lists the norm ranks first (attention, feed-forward, output), then the others
_NORMS = ("att_norm", "ffn_norm", "out_norm")
_RANK_OPTS = tuple(_rank_opt(t) for t in sorted((t for t in TARGETS if t.is_norm), key=lambda t: _NORMS.index(t.key))) \
    + tuple(_rank_opt(t) for t in TARGETS if not t.is_norm)
_ADAM = "train.adam."

FINETUNE_GROUPS: tuple[Group, ...] = (
    Group("options (llama.cpp finetune)", (
        opt("--model-base", "model.model_base", None, "FNAME"),
        opt("--lora-out", "out.lora_out", None, "FNAME"),
        flag("--only-write-lora", "out.only_write_lora", None),
        opt("--norm-rms-eps", "model.norm_rms_eps", None, "F", float_value(0, lo_open=True), default=_MODEL_VALUE),
        opt("--rope-freq-base", "model.rope_freq_base", None, "F", float_value(0, lo_open=True),
            default=_MODEL_VALUE),
        opt("--rope-freq-scale", "model.rope_freq_scale", None, "F", float_value(0, lo_open=True),
            default=_MODEL_VALUE),
        opt("--lora-alpha", "lora.lora_alpha", None, "N", float_value(0, lo_open=True),
            default=f"(default: equal to --lora-r, {DEFAULT_RANK})"),
        opt("--lora-r", "lora.lora_r", None, "N", int_value(1, MAX_RANK)),
        *_RANK_OPTS,
        opt("--train-data", "data.train_data", None, "FNAME"),
        opt("--checkpoint-in", "out.checkpoint_in", None, "FNAME"),
        opt("--checkpoint-out", "out.checkpoint_out", None, "FNAME"),
        opt("--pattern-fn-it", "out.pattern_fn_it", None, "STR"),
        opt("--fn-latest", "out.fn_latest", None, "STR"),
        opt("--save-every", "train.save_every", None, "N", int_value(0)),
        opt("-s --seed", "run.seed", None, "SEED", int_value(-1, 2**32 - 1),
            default="(default: -1, use random seed for -1)"),
        opt("-c --ctx", "train.n_ctx", None, "N", int_value(1, MAX_CTX)),
        opt("-t --threads", "run.n_threads", None, "N", int_value(1)),
        opt("-b --batch", "train.n_batch", None, "N", int_value(1, MAX_BATCH)),
        opt("--grad-acc", "train.grad_acc", None, "N", int_value(1, MAX_GRAD_ACC)),
        opt("--sample-start", "data.sample_start", None, "STR"),
        flag("--include-sample-start", "data.include_sample_start", None, default="(default off)"),
        flag("--escape", "data.escape", None),
        flag("--overlapping-samples", "data.overlapping_samples", None, default="(default off)"),
        flag("--fill-with-next-samples", "data.fill_with_next_samples", None, default="(default off)"),
        flag("--separate-with-eos", "data.separate_with_eos", None),
        flag("--separate-with-bos", "data.separate_with_bos", None),
        flag("--no-separate-with-eos", "data.separate_with_eos",
             "When fill-with-next-samples, don't insert end-of-sequence token between samples.", const=False),
        flag("--no-separate-with-bos", "data.separate_with_bos",
             "When fill-with-next-samples, don't insert begin-of-sequence token between samples.", const=False),
        flag("--sample-random-offsets", "data.sample_random_offsets", None),
        flag("--force-reshuffle", "data.force_reshuffle", None),
        flag("--no-flash", "train.flash", "Don't use flash attention", const=False),
        flag("--use-flash", "train.flash", None),
        flag("--no-checkpointing", "train.checkpointing", "Don't use gradient checkpointing", const=False),
        flag("--use-checkpointing", "train.checkpointing", None),
        opt("--warmup", _ADAM + "warmup", None, "N", int_value(0)),
        opt("--cos-decay-steps", _ADAM + "cos_decay_steps", None, "N", int_value(1)),
        opt("--cos-decay-restart", _ADAM + "cos_decay_restart", None, "N", float_value(0, lo_open=True)),
        opt("--cos-decay-min", _ADAM + "cos_decay_min", None, "N", float_value(0, 1)),
        flag("--enable-restart", _ADAM + "enable_restart", None),
        flag("--disable-restart", _ADAM + "enable_restart",
             "Only for Adam optimizer. Disable restarts of cos-decay. Takes no value.", const=False),
        opt("--opt-past", _ADAM + "past", None, "N", int_value(0, MAX_OPT_PAST)),
        opt("--opt-delta", _ADAM + "delta", None, "N", float_value()),
        opt("--opt-max-no-improvement", _ADAM + "max_no_improvement", None, "N", int_value()),
        opt("--epochs", "train.epochs", None, "N", int_value()),
        opt("--adam-iter", _ADAM + "n_iter", None, "N", int_value(0)),
        opt("--adam-alpha", _ADAM + "alpha", None, "N", float_value(0, lo_open=True)),
        opt("--adam-min-alpha", _ADAM + "min_alpha", None, "N", float_value(0)),
        opt("--adam-decay", _ADAM + "decay", None, "N", float_value(0)),
        opt("--adam-decay-min-ndim", _ADAM + "decay_min_ndim", None, "N", int_value(0)),
        opt("--adam-beta1", _ADAM + "beta1", None, "N", float_value(0, 1, hi_open=True)),
        opt("--adam-beta2", _ADAM + "beta2", None, "N", float_value(0, 1, hi_open=True)),
        opt("--adam-gclip", _ADAM + "gclip", None, "N", float_value(0)),
        opt("--adam-epsf", _ADAM + "eps_f", None, "N", float_value()),
        opt("-ngl --n-gpu-layers", "run.n_gpu_layers", None, "N", int_value()),
    )),
    Group("gguf-finetune additions", (
        opt("--lora-format", "out.lora_format", None, "gguf|ggla", choice_value("gguf", "ggla"),
            default="(default: ggla when --lora-out ends in .bin, else gguf)"),
        opt("--lora-type", "out.lora_type", None, "f32|f16|bf16", choice_value("f32", "f16", "bf16")),
        opt("--metrics-out", "out.metrics_out", None, "FNAME",
            default="(default: metrics.jsonl next to --checkpoint-out)"),
        opt("--memory-budget", "run.memory_budget", None, "SIZE", size_value, default="(default: auto)"),
        flag("--low-memory", "run.low_memory", None),
        flag("--progress", "run.progress", None),
        flag("--no-progress", "run.progress", "no progress bar", const=False),
    )),
    Group("instruction and chat data, validation (gguf-finetune additions)", (
        opt("--data-format", "data.data_format", None, "auto|text|jsonl",
            default="(default: jsonl for .jsonl/.ndjson files, else text)"),
        opt("--chat-template", "data.chat_template", None, "NAME|FILE", default="(default: the model's own template)"),
        flag("--train-on-prompt", "data.train_on_prompt", None),
        flag("--pack", "data.pack", None, default="(default: on for JSONL, off for text)"),
        flag("--no-pack", "data.pack", "one record per row (as llama.cpp's text pipeline; JSONL rows are cut to the "
             "batch's longest record)", const=False),
        opt("--val-data", "val.val_data", None, "FNAME"),
        opt("--val-split", "val.val_split", None, "F", float_value(0, 1, hi_open=True), default="(default 0: none)"),
        opt("--eval-every", "val.eval_every", None, "N", int_value(0)),
        flag("--save-best", "val.save_best", None),
    )),
)

FINETUNE_DESCRIPTION = ("Train a LoRA adapter for a GGUF model on the CPU. Flags, defaults and files as in "
                        "llama.cpp's finetune (checkpoints resume in either tool).")


def finetune_parser(prog: str = "finetune") -> Parser:
    return Parser(prog, FINETUNE_DESCRIPTION, FINETUNE_GROUPS, FinetuneArgs())


_FINETUNE_LOOKUP = finetune_parser().lookup


DATA_FORMATS = ("auto", "text", "jsonl")


def parse_finetune_args(argv: Sequence[str], prog: str = "finetune") -> FinetuneArgs:
    """llama.cpp finetune's command line -> :class:`FinetuneArgs` (raises UsageError / HelpRequested)."""
    args = finetune_parser(prog).parse(argv)
    fmt = args.data.data_format.strip().lower()
    if fmt not in DATA_FORMATS:
        raise UsageError(f"--data-format: expected one of {', '.join(DATA_FORMATS)}, got {args.data.data_format!r}")
    if fmt != args.data.data_format:
        args = replace(args, data=replace(args.data, data_format=fmt))
    if args.data.pack:
        for other in ("--fill-with-next-samples", "--sample-random-offsets"):
            if args.is_given(other):
                raise UsageError(f"--pack and {other}: give one of them (packed rows hold whole records, each on "
                                 f"its own)")
    return args
