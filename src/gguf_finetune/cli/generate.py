"""``gguf-finetune generate``: continue a prompt with a model (and adapters), streaming the text.

    gguf-finetune generate -p "Once upon a time" -n 64
    gguf-finetune generate -m model.gguf --lora lora.gguf --chat -p "What is a LoRA?" --temp 0

Text goes to stdout as it is produced (complete UTF-8 characters only); a line of timings goes
to stderr at the end.  ``--chat`` renders the prompt as one user message with the model's
``tokenizer.chat_template`` (or ``--chat-template``); generation stops at an end-of-generation
token (EOS, EOT such as ``<|im_end|>``), after ``-n`` tokens, or when the context is full.

The model/adapter/thread flags are shared with ``perplexity`` (see :func:`model_options`).
"""

from __future__ import annotations

import codecs
import sys
import time
from dataclasses import dataclass

from ..errors import UsageError, UserError
from .common import cpu_count, set_threads
from .parser import MAX_CTX, Group, Opt, Parser, flag, float_value, int_value, opt, str_value

# -- flags shared by the inference commands ------------------------------------------------------------


def model_options() -> tuple[Opt, ...]:
    """-m, --lora, --lora-scaled, -t: fields model, adapters, n_threads of the args dataclass."""
    return (
        opt("-m --model", "model", "GGUF model to run", "FNAME",
            default="(default: the embedded SmolLM2-135M-Instruct)"),
        opt("--lora", "adapters", "apply a LoRA adapter (GGUF adapter, finetune checkpoint, legacy .bin or PEFT); "
            "can be repeated", "FNAME", make=lambda path: (path, 1.0), append=True),
        opt("--lora-scaled", "adapters", "apply a LoRA adapter with scale S; can be repeated", "FNAME S",
            (str_value, float_value()), make=lambda path, s: (path, s), append=True),
        opt("-t --threads", "n_threads", "number of threads", "N", int_value(1),
            default="(default: the number of CPUs)"),
    )


def model_path(path: str) -> str:
    if path:
        return path
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..demo import default_model_path

    return str(default_model_path())


def load(args):
    """set_threads, then load the model with its adapters (float32 weight cache when it fits)."""
    set_threads(args.n_threads or cpu_count())
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..api import load_model
    from ..gguf_io import check_readable_file

    path = model_path(args.model)
    check_readable_file(path, "model")
    return load_model(path, adapters=list(args.adapters))


# -- generate ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateArgs:
    model: str = ""
    adapters: tuple[tuple[str, float], ...] = ()
    n_threads: int = 0  # 0: number of CPUs
    prompt: str | None = None
    file: str | None = None
    chat: bool = False
    chat_template: str | None = None
    n_predict: int = 128
    n_ctx: int = 4096
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = -1


def generate_parser(prog: str) -> Parser:
    return Parser(prog, "Generate text from a prompt with a GGUF model and optional LoRA adapters. Sampling "
                        "follows llama.cpp (top-k, top-p, min-p, temperature, then a seeded draw; --temp 0 is "
                        "greedy).", (
        Group("options", (
            *model_options(),
            opt("-p --prompt", "prompt", "the prompt", "TEXT"),
            opt("-f --file", "file", "read the prompt from FNAME (UTF-8)", "FNAME"),
            flag("--chat", "chat", "wrap the prompt as a user message in the model's chat template and stop at the "
                 "end of the assistant's turn"),
            opt("--chat-template", "chat_template", "with --chat: a built-in template (chatml, llama2, llama3, "
                "mistral, zephyr, gemma, phi3) or a file instead of the model's own", "NAME|FNAME"),
            opt("-n --n-predict", "n_predict", "number of tokens to generate (-1 = until end of generation or a "
                "full context)", "N", int_value(-1)),
            opt("-c --ctx", "n_ctx", "context size: prompt plus generated tokens (0 = the model's training "
                "context)", "N", int_value(0, MAX_CTX)),
            opt("--temp", "temp", "temperature (0 = greedy)", "T", float_value(0)),
            opt("--top-k", "top_k", "top-k sampling (0 = off)", "K", int_value(0)),
            opt("--top-p", "top_p", "top-p sampling (1.0 = off)", "P", float_value(0, 1)),
            opt("--min-p", "min_p", "min-p sampling (0.0 = off)", "P", float_value(0, 1)),
            opt("-s --seed", "seed", "random seed (-1 = random)", "SEED", int_value(-1, 2**32 - 1)),
        )),), GenerateArgs())


def prompt_ids(model, text: str, chat: bool, chat_template: str | None) -> list[int]:
    """Token ids of the prompt: as llama.cpp's main (BOS as the vocabulary says, special tokens parsed);
    with ``chat`` rendered first as one user turn with add_generation_prompt."""
    tok = model.tokenizer
    if chat:
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..data.chat_template import GGUF_KEY, load_chat_template

        hp = model.hparams
        tpl = load_chat_template(chat_template, model.gguf.get_str(GGUF_KEY, "") or None, tok,
                                 family=(hp.arch, hp.spec.chat_template))
        text = tpl.render([{"role": "user", "content": text}], add_generation_prompt=True)
        add_bos = tok.add_bos and not (tpl.bos_token and text.startswith(tpl.bos_token))
        return tok.tokenize(text, add_bos=add_bos, special=True)
    return tok.encode(text, add_special=True, parse_special=True)


def run(argv: list[str], prog: str = "gguf-finetune generate") -> int:
    args = generate_parser(prog).parse(argv)
    if (args.prompt is None) == (args.file is None):
        raise UsageError("--prompt: give the prompt with -p TEXT or -f FNAME (one of them)")
    if args.chat_template and not args.chat:
        raise UsageError("--chat-template: only used with --chat")
    text = args.prompt if args.prompt is not None else _read_prompt(args.file)
    model = load(args)
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..engine.generate import Decoder, Generation
    from ..sampling import Sampler, SamplerParams

    ids = prompt_ids(model, text, args.chat, args.chat_template)
    if not ids:
        raise UserError("the prompt is empty (no tokens to start from)")
    n_ctx = args.n_ctx or model.hparams.n_ctx_train
    if len(ids) > n_ctx:
        raise UserError(f"the prompt has {len(ids)} tokens, more than the context of {n_ctx} (give a larger --ctx)")
    sampler = Sampler(SamplerParams(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                    seed=args.seed))
    gen = Generation(Decoder.for_model(model, n_ctx=n_ctx), ids, sampler, args.n_predict,
                     model.tokenizer.eog_ids)
    stream = TextStream(model.tokenizer, sys.stdout)
    t0 = time.perf_counter()
    for tok in gen:
        stream.add(tok)
    stream.close()
    total = time.perf_counter() - t0
    n = gen.n_generated
    gen_s = max(total - gen.prompt_seconds, 1e-9)
    print(f"generate: prompt {len(ids)} tokens in {gen.prompt_seconds:.2f} s "
          f"({len(ids) / max(gen.prompt_seconds, 1e-9):.1f} tok/s); generated {n} tokens in {gen_s:.2f} s "
          f"({max(n - 1, 0) / gen_s if n > 1 else 0.0:.1f} tok/s); stop: {gen.stop_reason}; seed {sampler.seed}",
          file=sys.stderr)
    return 0


class TextStream:
    """Writes the text of token pieces as they come, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, out):
        self.tok, self.out = tokenizer, out
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> None:
        text = self.dec.decode(self.tok.token_to_piece(token_id, special=False))
        if text:
            self.out.write(text)
            self.out.flush()

    def close(self) -> None:
        self.out.write(self.dec.decode(b"", final=True) + "\n")
        self.out.flush()


def _read_prompt(path: str) -> str:
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..gguf_io import check_readable_file

    data = check_readable_file(path, "prompt file").read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file '{path}': not valid UTF-8 (byte {e.start})") from None
