"""``gguf-finetune convert IN OUT [--to gguf|ggla|peft] [--base MODEL]``: adapters between formats.

IN may be a training checkpoint (ours or llama.cpp's), a llama.cpp finetune ``.bin``, a GGUF
adapter or a PEFT folder; OUT's format comes from ``--to`` or its name (.gguf, .bin, else a PEFT
folder).  The logic lives in formats/convert.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .parser import Group, Parser, Positional, choice_value, int_value, opt


@dataclass(frozen=True)
class ConvertArgs:
    src: str = ""
    dst: str = ""
    to: str | None = None
    base: str | None = None
    lora_type: str = "f32"
    lora_r: int | None = None
    lora_alpha: int | None = None


def convert_parser(prog: str) -> Parser:
    return Parser(prog, "Convert a LoRA adapter between our checkpoints, llama.cpp finetune checkpoints and "
                        ".bin files, GGUF adapters (today's llama.cpp) and PEFT folders.", (
        Group("options", (
            opt("--to", "to", "output format (default: from OUT's name: .gguf, .bin, else a PEFT folder)", "FMT",
                convert=choice_value("gguf", "ggla", "peft")),
            opt("--base", "base", "the base model GGUF (shapes, tied embeddings, head counts, PEFT's "
                                  "base_model_name_or_path)", "MODEL"),
            opt("--lora-type", "lora_type", "tensor type of a GGUF adapter", "TYPE",
                convert=choice_value("f32", "f16", "bf16"), default="f32"),
            opt("--lora-r", "lora_r", "r written in a .bin header (default: the adapter's largest rank)", "N",
                convert=int_value(1)),
            opt("--lora-alpha", "lora_alpha", "alpha written in a .bin header (default: as the adapter)", "N",
                convert=int_value(1)),
        )),), ConvertArgs(),
        positionals=(Positional("IN", "src", "the adapter to read"), Positional("OUT", "dst", "the file or folder to write")))


def run(argv: list[str], prog: str = "gguf-finetune convert") -> int:
    a = convert_parser(prog).parse(argv)
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..formats.convert import run_convert

    res = run_convert(a.src, a.dst, to=a.to, base=a.base, lora_type=a.lora_type, lora_r=a.lora_r,
                      lora_alpha=a.lora_alpha)
    for w in res.warnings:
        print(f"{prog}: {w}", file=sys.stderr)
    print(f"{a.dst}: {res.kind_out} adapter, {res.n_tensors} tensors, {res.n_params} parameters (from {res.kind_in})")
    return 0
