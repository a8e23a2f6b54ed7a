"""Training data: llama.cpp's plain-text sample pipeline (:mod:`.text`)."""

from .text import (  # noqa: F401
    Batch,
    BatchConfig,
    BatchIterator,
    ShuffleState,
    TextDataset,
    compute_samples_hash,
    load_train_text,
    process_escapes,
    resume_shuffle,
    shuffle_samples,
    tokenize_file,
    tokenize_text,
)
