"""Training engine: llama forward/backward with LoRA on numpy + numba kernels."""
