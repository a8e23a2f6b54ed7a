"""``gguf-finetune COMMAND [options]``: one program for every tool of the package.

Commands are looked up in :data:`SUBCOMMANDS` (name -> ``"module:function"`` and a one-line
summary) and imported only when run, so each command pays only for what it uses.  The function is
called as ``function(argv, prog)`` with the arguments after the command name and
``prog = "gguf-finetune NAME"``; it returns an exit status (None = 0) or raises UserError.
To add a command, write its module and add one entry here.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Sequence

from .. import __version__
from ..errors import UsageError
from .common import run_main
from .parser import HelpRequested

PROG = "gguf-finetune"


@dataclass(frozen=True)
class Subcommand:
    target: str  # "package.module:function"; function(argv: list[str], prog: str) -> int | None
    summary: str

    def load(self) -> Callable[[list[str], str], int | None]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


SUBCOMMANDS: dict[str, Subcommand] = {
    "finetune": Subcommand("gguf_finetune.cli.finetune:run",
                           "train a LoRA adapter (llama.cpp finetune's flags and files)"),
    "export-lora": Subcommand("gguf_finetune.cli.export_lora:run",
                              "merge LoRA adapters into a GGUF model (llama.cpp export-lora's flags)"),
    "inspect": Subcommand("gguf_finetune.cli.inspect:run",
                          "describe a GGUF model, LoRA adapter or training checkpoint"),
    "tokenize": Subcommand("gguf_finetune.cli.tokenize:run", "print the token ids of a text"),
    "preview-data": Subcommand("gguf_finetune.cli.preview_data:run",
                               "show training data as finetune sees it: chat template, tokens, trained spans"),
    "generate": Subcommand("gguf_finetune.cli.generate:run", "generate text from a prompt (with LoRA adapters)"),
    "perplexity": Subcommand("gguf_finetune.cli.perplexity:run", "perplexity of a text file, as llama-perplexity"),
    "plot": Subcommand("gguf_finetune.cli.plot:run", "plot the training (and validation) loss of a metrics file"),
    "convert": Subcommand("gguf_finetune.cli.convert:run",
                          "convert an adapter between checkpoint, .bin, GGUF adapter and PEFT formats"),
    "demo-model": Subcommand("gguf_finetune.demo:run",
                             "print the path of the embedded default model (SmolLM2-135M-Instruct Q4_1)"),
}


def help_text(prog: str = PROG) -> str:
    width = max(len(n) for n in SUBCOMMANDS) + 4
    lines = [f"usage: {prog} COMMAND [options]", "",
             "Train LoRA adapters for GGUF language models on the CPU.", "", "commands:"]
    lines += [f"  {name:<{width}}{sub.summary}" for name, sub in SUBCOMMANDS.items()]
    lines += ["", f"Run '{prog} COMMAND --help' for the options of a command.",
              *textwrap.wrap("The finetune and export-lora commands are also installed as programs of "
                             "their own, taking llama.cpp's command lines unchanged.", 100)]
    return "\n".join(lines) + "\n"


def dispatch(argv: list[str], prog: str = PROG) -> int | None:
    if not argv:
        raise UsageError(f"missing command (one of: {', '.join(SUBCOMMANDS)}); see {prog} --help")
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        raise HelpRequested(help_text(prog))
    if name == "--version":
        print(f"{prog} {__version__}")
        return 0
    sub = SUBCOMMANDS.get(name)
    if sub is None:
        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (commands: {', '.join(SUBCOMMANDS)})"
        what = "option" if name.startswith("-") else "command"
        raise UsageError(f"unknown {what} {name!r}{hint}")
    return sub.load()(rest, f"{prog} {name}")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    prog = f"{PROG} {args[0]}" if args and args[0] in SUBCOMMANDS else PROG
    run_main(dispatch, args, prog)
