"""``export-lora``: llama.cpp's export-lora command line, merging with formats/merge.py.

Without ``--outtype`` the merged tensors follow llama.cpp's export-lora: F32 base tensors stay
F32, every other type is written as F16.  Output lines follow llama.cpp's (stdout); warnings go to
stderr; a progress bar over the tensors is shown on stderr when it is a terminal.
"""

from __future__ import annotations

import sys
from typing import Sequence

from .args import parse_export_lora_args
from .common import run_main, set_threads


def run(argv: list[str], prog: str = "export-lora") -> int | None:
    args = parse_export_lora_args(argv, prog)
    set_threads(args.n_threads)
    from ..formats.merge import run_export_lora
    from .finetune import check_output_dir
    from .preflight import Input, Output, check_outputs

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
