"""``python -m gguf_finetune ...`` is ``gguf-finetune ...``."""

from .cli.main import main

if __name__ == "__main__":
    main()
