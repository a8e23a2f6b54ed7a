"""``export-lora``: llama.cpp's export-lora command line, merging with formats/merge.py.

Without ``--outtype`` the merged tensors follow llama.cpp's export-lora: F32 base tensors stay
F32, every other type is written as F16.  Output lines follow llama.cpp's (stdout); warnings go to
stderr; a progress bar over the tensors is shown on stderr when it is a terminal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from ..config import setting
from ..errors import UsageError
from .common import run_main, set_threads
from .parser import Group, Parser, choice_value, float_value, int_value, opt, str_value

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


@dataclass(frozen=True)
class ExportLoraArgs:
    model: str = setting("", "model path from which to load base model")  # -m/--model (older: --model-base)
    adapters: tuple[tuple[str, float], ...] = ()  # (path, scale) in command-line order
    n_threads: int = setting(2, "number of threads to use during computation")
    output: str = setting("ggml-lora-merged-f16.gguf", "output file")  # -o/--output (older: --model-out)
    outtype: str = setting("f16", "tensor type of the weights the adapters change (1-D tensors stay f32; all other "
                                  "tensors are copied unchanged)")
    given: frozenset[str] = frozenset()


EXPORT_LORA_GROUPS: tuple[Group, ...] = (
    Group("options (llama.cpp export-lora)", (
        opt("-m --model", "model", None, "FNAME", aliases=("--model-base",), default="(required)"),
        opt("--lora", "adapters", "path to LoRA adapter (can be repeated to use multiple adapters)", "FNAME",
            make=lambda path: (path, 1.0), append=True, aliases=("-l",)),
        opt("--lora-scaled", "adapters",
            "path to LoRA adapter with user defined scaling S (can be repeated to use multiple adapters)",
            "FNAME S", (str_value, float_value()), make=lambda path, s: (path, s), append=True, aliases=("-s",)),
        opt("-t --threads", "n_threads", None, "N", int_value(1), default="(default: 2)"),
        opt("-o --output", "output", None, "FNAME", default="(default: 'ggml-lora-merged-f16.gguf')",
            aliases=("--model-out", "--output-file")),
    )),
    Group("gguf-finetune additions", (
        opt("--outtype", "outtype", None, "|".join(OUTTYPES), choice_value(*OUTTYPES),
            default="(default as llama.cpp: f16, but f32 base tensors stay f32)"),
    )),
)

EXPORT_LORA_DESCRIPTION = ("Merge LoRA adapters (GGUF adapters, finetune checkpoints or legacy .bin) into a "
                           "GGUF model. Adapters are applied in the order given, each with its scale.")


def export_lora_parser(prog: str = "export-lora") -> Parser:
    return Parser(prog, EXPORT_LORA_DESCRIPTION, EXPORT_LORA_GROUPS, ExportLoraArgs(),
                  epilog="example usage:  " + prog + " -m base-model.gguf --lora lora-file.gguf "
                         "-o merged-model-f16.gguf")


def parse_export_lora_args(argv: Sequence[str], prog: str = "export-lora") -> ExportLoraArgs:
    """llama.cpp export-lora's command line (new and older spellings) -> :class:`ExportLoraArgs`."""
    args = export_lora_parser(prog).parse(argv)
    if not args.model:
        raise UsageError("--model: no base model given (-m FNAME)")
    if not args.adapters:
        raise UsageError("--lora: no adapter given (--lora FNAME or --lora-scaled FNAME S)")
    return args


def run(argv: list[str], prog: str = "export-lora") -> int | None:
    args = parse_export_lora_args(argv, prog)
    set_threads(args.n_threads)
    from ..formats.merge import run_export_lora  # lazy: --help and usage errors stay fast
    from .preflight import Input, Output, check_output_dir, check_outputs

    check_output_dir(args.output, "--output")  # before the merge work, not after it
    check_outputs([Output("--output", args.output, words=("",))],
                  [Input("-m", args.model, "the base model")]
                  + [Input("--lora", path, "the adapter") for path, _scale in args.adapters])

    outtype = args.outtype if "--outtype" in args.given else None
    res = run_export_lora(args.model, list(args.adapters), args.output, outtype, args.n_threads, None)
    for w in res.warnings:
        print(w, file=sys.stderr)
    if res.untied:
        print("run_merge : the model ties its output head to token_embd.weight; the merged model has its own "
              "output.weight", file=sys.stderr)
    print(f"run_merge : merged {res.n_merged} tensors with lora adapters")
    print(f"run_merge : wrote {res.n_tensors} tensors to output file")
    print(f"done, output file is {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    run_main(run, argv, "export-lora")
