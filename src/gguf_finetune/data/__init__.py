"""Training data: llama.cpp's plain-text sample pipeline (:mod:`.text`), JSONL chat and instruction
records (:mod:`.records`, :mod:`.chat_template`, :mod:`.jsonl`), shuffled resumable batches
(:mod:`.batches`) and validation batches (:mod:`.validation`)."""
