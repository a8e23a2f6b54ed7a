"""Command-line entry points.

- ``args.py``     llama.cpp's flags (finetune, export-lora) -> typed dataclasses; the small parser
                  every command uses; one-line UsageError for bad flags
- ``common.py``   ``run_main`` (errors -> one line + exit status) and ``set_threads``
- ``main.py``     ``gguf-finetune COMMAND ...``: the subcommand table (``SUBCOMMANDS``)
- one module per command, each with ``run(argv, prog) -> int | None`` (raises UserError) and,
  for console scripts, ``main(argv=None)`` = ``run_main(run, argv, prog)``
"""
