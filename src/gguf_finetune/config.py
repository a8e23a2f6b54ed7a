"""Training settings with their defaults and help texts, written once.

Each field holds its default and, in ``metadata["help"]``, the text ``finetune --help`` shows for
the flag that sets it (as mlx-lm's ``field(default=…, metadata={"help": …})``); the command line
(cli/finetune_args.py) maps flags onto these fields.  Defaults and texts are llama.cpp finetune's.
Nothing here imports numpy or numba, so ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def setting(default, help: str, **kw):
    """A dataclass field with its help text."""
    return field(default=default, metadata={"help": help}, **kw)


def help_of(obj, name: str) -> str | None:
    """The help text of field ``name`` of a settings dataclass (None when it has none)."""
    f = obj.__dataclass_fields__.get(name)
    return None if f is None else f.metadata.get("help")


DEFAULT_RANK = 4  # --lora-r: the rank of every adapted matrix not given its own --rank-*

_ADAM = "Only for Adam optimizer. "


@dataclass(frozen=True)
class AdamWConfig:
    """ggml's AdamW and llama.cpp's learning-rate schedule (floats are used as float32)."""

    alpha: float = setting(1e-3, "Adam learning rate alpha")
    min_alpha: float = setting(0.0, "Adam minimum learning rate alpha - including warmup phase")
    decay: float = setting(0.1, "AdamW weight decay. Values greater zero enable AdamW instead of regular Adam.")
    decay_min_ndim: int = setting(2, "Minimum number of tensor dimensions to apply AdamW weight decay. Weight "
                                     "decay is not applied to tensors with less n_dims.")
    beta1: float = setting(0.9, "AdamW beta1 in interval [0,1). How much to smooth the first moment of gradients.")
    beta2: float = setting(0.999, "AdamW beta2 in interval [0,1). How much to smooth the second moment of gradients.")
    eps: float = setting(1e-8, "added to sqrt(v̂) (not a flag)")
    gclip: float = setting(1.0, "AdamW gradient clipping. Disabled when zero.")
    eps_f: float = setting(0.0, "AdamW epsilon for convergence test. Disabled when <= zero.")
    n_iter: int = setting(256, "Maximum number of Adam optimization iterations for each batch")
    past: int = setting(0, "Number of optimization iterations to track for delta convergence test. Disabled "
                           "when zero.")
    delta: float = setting(1e-5, "Maximum delta for delta convergence test. Disabled when <= zero.")
    max_no_improvement: int = setting(0, "Maximum number of optimization iterations with no improvement. "
                                         "Disabled when <= zero.")
    warmup: int = setting(100, _ADAM + "Number of warmup steps")
    cos_decay_steps: int = setting(1000, _ADAM + "Number of cosine decay steps")
    cos_decay_restart: float = setting(1.1, _ADAM + "Increase of cosine decay steps after restart")
    cos_decay_min: float = setting(0.1, _ADAM + "Cosine decay minimum")
    enable_restart: bool = setting(False, _ADAM + "Enable restarts of cos-decay. Takes no value (llama.cpp's help "
                                              "showed an N its parser never read).")


@dataclass(frozen=True)
class TrainConfig:
    """The loop's settings."""

    n_ctx: int = setting(128, "Context size used during training")
    n_batch: int = setting(8, "Parallel batch size")
    grad_acc: int = setting(1, "Number of gradient accumulation steps (simulates larger batch size of "
                               "batch*gradacc)")
    save_every: int = setting(10, "save checkpoint and lora every N iterations. Disabled when N = 0 (llama.cpp: "
                                  "<= 0; a negative N is refused here as a likely typo).")
    epochs: int = setting(-1, "Maximum number epochs to process. Disabled when <= zero.")
    checkpointing: bool = setting(True, "Use gradient checkpointing")
    flash: bool = setting(True, "Use flash attention (same results, less memory).")
    adam: AdamWConfig = field(default_factory=AdamWConfig)
