"""``gguf-finetune tokenize [-m FILE] (-p TEXT | -f FILE) [--special] [--add-bos]``: token ids of a text."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..errors import UsageError, UserError
from ..gguf_io import check_readable_file
from .parser import Group, Parser, flag, opt


@dataclass(frozen=True)
class TokenizeArgs:
    model: str = ""  # "": the embedded SmolLM2 model
    prompt: str | None = None
    file: str | None = None
    special: bool = False
    add_bos: bool = False


def tokenize_parser(prog: str) -> Parser:
    return Parser(prog, "Print the token ids of a text, separated by spaces, as the model's tokenizer "
                        "splits it (add_special=false unless --add-bos, as llama.cpp's llama-tokenize).", (
        Group("options", (
            opt("-m --model", "model", "GGUF file whose tokenizer to use (a vocab-only file works too)", "FNAME",
                default="(default: the embedded SmolLM2-135M-Instruct)"),
            opt("-p --prompt", "prompt", "the text to tokenize", "TEXT"),
            opt("-f --file", "file", "read the text from FNAME (UTF-8; '-' = stdin)", "FNAME"),
            flag("--special", "special", "parse special tokens written in the text (like <|im_start|>)"),
            flag("--add-bos", "add_bos", "put the beginning-of-sequence token first"),
        )),), TokenizeArgs())


def run(argv: list[str], prog: str = "gguf-finetune tokenize") -> int:
    args = tokenize_parser(prog).parse(argv)
    if (args.prompt is None) == (args.file is None):
        raise UsageError("--prompt: give the text with -p TEXT or -f FNAME (one of them)")
    text = args.prompt if args.prompt is not None else _read_text(args.file)
    model = args.model
    if not model:
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..demo import default_model_path

        model = str(default_model_path())
    check_readable_file(model, "model")
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..tokenizer import load_tokenizer

    ids = load_tokenizer(model).tokenize(text, add_bos=args.add_bos, add_eos=False, special=args.special)
    sys.stdout.write(" ".join(str(int(i)) for i in ids) + "\n")
    return 0


def _read_text(path: str) -> str:
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        data = check_readable_file(path, "text file").read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"text file '{path}': not valid UTF-8 (byte {e.start})") from None

