"""``gguf-finetune preview-data``: show training data exactly as finetune will see it.

Each record is rendered (chat template for chat records), tokenized with the model's tokenizer and
masked as in training; the trained tokens are highlighted (ANSI colour on a terminal, ``[[...]]``
otherwise).  ``--json`` prints one object per record instead:
``{"line": N, "text": ..., "tokens": [...], "trained": [1/0 per token], "cut": K}`` where ``tokens``
is what one training row holds (at most ctx+1 tokens) and ``cut`` how many tokens were cut off.
Then the first batch's rows as finetune packs them (which records share a row, at which offsets;
``{"row": k, "records": [{"record": i, "line": N, "offset": o, "positions": p}, ...]}`` with --json)
and the packing efficiency: real tokens and trained tokens per computed position, over an epoch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..gguf_io import check_readable_file
from .parser import MAX_CTX, Group, Parser, choice_value, flag, int_value, opt

GREEN, RESET = "\x1b[32;1m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


@dataclass(frozen=True)
class PreviewArgs:
    model: str = ""  # "": the embedded SmolLM2 model
    train_data: str = ""
    n_records: int = 3
    json: bool = False
    n_ctx: int = 128
    chat_template: str | None = None
    train_on_prompt: bool = False
    data_format: str = "auto"
    sample_start: str = ""
    color: bool | None = None  # None: when stdout is a terminal
    n_batch: int = 8
    pack: bool | None = None  # None: JSONL yes, text no (as finetune)


def preview_parser(prog: str) -> Parser:
    return Parser(prog, "Show what training sees: each record of the training data rendered with the chat "
                        "template and tokenized, the trained tokens highlighted ([[...]] without a terminal), "
                        "with token counts and how many records the context cuts off.", (
        Group("options", (
            opt("-m --model", "model", "GGUF model whose tokenizer and chat template to use", "FNAME",
                aliases=("--model-base",), default="(default: the embedded SmolLM2-135M-Instruct)"),
            opt("--train-data", "train_data", "the data file (JSONL records, or plain text)", "FNAME",
                default="(required)"),
            opt("-n --records", "n_records", "how many records to show (0 = all)", "N", int_value(0)),
            flag("--json", "json", "one JSON object per record: text, tokens, trained (1/0 per token), line, cut"),
            opt("-c --ctx", "n_ctx", "training context: a row holds ctx+1 tokens, longer records are cut off", "N",
                int_value(1, MAX_CTX)),
            opt("--chat-template", "chat_template", "a built-in template name (chatml, llama2, llama3, mistral, "
                "zephyr, gemma, phi3) or a Jinja file", "NAME|FILE", default="(default: the model's own)"),
            flag("--train-on-prompt", "train_on_prompt", "train on every token, not only assistant turns"),
            opt("--data-format", "data_format", "text or jsonl", "auto|text|jsonl",
                choice_value("auto", "text", "jsonl"), default="(default: jsonl for .jsonl/.ndjson files)"),
            opt("--sample-start", "sample_start", "plain text only: the sample start pattern (as finetune)", "STR"),
            opt("-b --batch", "n_batch", "rows per batch (as finetune's --batch), for the packed rows shown", "N",
                int_value(1, MAX_CTX)),
            flag("--pack", "pack", "pack records into rows (as finetune --pack)", default="(default: on for JSONL)"),
            flag("--no-pack", "pack", "one record per row (as finetune --no-pack)", const=False),
            flag("--color", "color", "highlight with ANSI colours even when stdout is not a terminal"),
            flag("--no-color", "color", "mark trained tokens with [[...]] even on a terminal", const=False),
        )),), PreviewArgs())


def _pieces(tok, ids) -> list[bytes]:
    return [tok.token_to_piece(int(t), special=True) for t in ids]


def highlight(tok, ids: np.ndarray, trained: np.ndarray, color: bool) -> str:
    """The tokens' text with the runs of trained tokens marked (ANSI or [[...]])."""
    pieces = _pieces(tok, ids)
    out = bytearray()
    on, off = (GREEN, RESET) if color else (OPEN, CLOSE)
    inside = False
    for p, t in zip(pieces, trained):
        if bool(t) != inside:
            out += (on if t else off).encode()
            inside = bool(t)
        out += p
    if inside:
        out += off.encode()
    return out.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Shown:
    """One record as training sees it: source line (None for text samples), kind, rendered text,
    ids int32 [n], trained uint8 [n]."""

    line: int | None
    kind: str
    text: str
    ids: np.ndarray
    trained: np.ndarray


@dataclass(frozen=True)
class Stats:
    n_records: int
    n_tokens: int
    n_trained: int  # within the first ctx+1 tokens of each record
    n_cut: int  # records longer than ctx+1 tokens
    what: str


def _load_jsonl(args: PreviewArgs, path: str, n_show: int):
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..data.chat_template import GGUF_KEY, file_time, load_chat_template
    from ..data.jsonl import build_dataset, encode_records, needs_template
    from ..data.records import count_kinds, read_jsonl
    from ..tokenizer import load_tokenizer

    records = read_jsonl(path)
    tok = load_tokenizer(args.model)
    template = None
    if needs_template(records):
        gguf_template, family = None, None
        if not args.chat_template:
            # lazy: loaded once the flags are parsed (fast --help and usage errors)
            from ..arch import get_arch
            from ..gguf_io import open_gguf

            f = open_gguf(args.model)
            gguf_template = f.get(GGUF_KEY, None)
            arch = f.get_str("general.architecture", "")
            family = (arch, get_arch(arch).chat_template) if get_arch(arch) else None
        template = load_chat_template(args.chat_template, gguf_template, tok, file_time(path), family=family)
    encoded = encode_records(records, tok, template, args.train_on_prompt, path)
    kinds = count_kinds(records)
    row = args.n_ctx + 1
    what = (f"chat {kinds['chat']}, prompt/completion {kinds['prompt_completion']}, text {kinds['text']}"
            + (f"; chat template: {template.name}" if template else ""))
    stats = Stats(len(encoded), sum(len(e.ids) for e in encoded), sum(int(e.trained[:row].sum()) for e in encoded),
                  sum(1 for e in encoded if len(e.ids) > row), what)
    return tok, [Shown(e.line, e.kind, e.text, e.ids, e.trained) for e in encoded[:n_show]], stats, build_dataset(encoded)


def _load_text(args: PreviewArgs, path: str, n_show: int):
    """llama.cpp's samples of a plain-text file: BOS + the sample's tokens, all trained."""
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..data.text import tokenize_file
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    ds = tokenize_file(path, tok, args.sample_start, False, False, args.n_ctx)
    shown = []
    for i in range(min(n_show, ds.n_samples)):
        b, s = int(ds.begins[i]), int(ds.sizes[i])
        ids = np.concatenate([[tok.bos_id], ds.tokens[b:b + s]]).astype(np.int32)
        trained = np.ones(ids.shape[0], dtype=np.uint8)
        trained[0] = 0
        shown.append(Shown(None, "text sample", tok.detokenize(ds.tokens[b:b + s]), ids, trained))
    sizes = ds.sizes + 1  # with the BOS
    row = args.n_ctx + 1
    stats = Stats(ds.n_samples, int(sizes.sum()), int((np.minimum(sizes, row) - 1).sum()), int((sizes > row).sum()),
                  f"plain text, sample start {args.sample_start!r}")
    return tok, shown, stats, ds.as_records(tok.bos_id)


def run(argv: list[str], prog: str = "gguf-finetune preview-data") -> int:
    args = preview_parser(prog).parse(argv)
    if not args.train_data:
        raise UserError("--train-data: no data file given")
    check_readable_file(args.train_data, "train data")
    if not args.model:
        # lazy: loaded once the flags are parsed (fast --help and usage errors)
        from ..demo import default_model_path

        args = PreviewArgs(**{**vars(args), "model": str(default_model_path())})
    check_readable_file(args.model, "model")
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..data.jsonl import detect_format

    fmt = detect_format(args.train_data, args.data_format)
    n_show = args.n_records if args.n_records > 0 else 1 << 62
    tok, shown, st, records = (_load_jsonl if fmt == "jsonl" else _load_text)(args, args.train_data, n_show)
    color = sys.stdout.isatty() if args.color is None else args.color
    row = args.n_ctx + 1
    out = sys.stdout
    for k, r in enumerate(shown):
        keep = min(len(r.ids), row)
        cut = len(r.ids) - keep
        if args.json:
            rec = {"line": r.line, "text": r.text, "tokens": [int(t) for t in r.ids[:keep]],
                   "trained": [int(t) for t in r.trained[:keep]], "cut": cut}
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            continue
        where = f"line {r.line}, " if r.line is not None else ""
        head = (f"--- record {k + 1} ({where}{r.kind}): {len(r.ids)} tokens, {int(r.trained[:keep].sum())} trained"
                + (f", {cut} cut off by --ctx {args.n_ctx}" if cut else ""))
        out.write(head + "\n" + highlight(tok, r.ids[:keep], r.trained[:keep], color) + "\n")
        if cut:
            out.write(f"... [{cut} more tokens not trained on: the row holds ctx+1 = {row} tokens]\n")
    summary = (f"{st.n_records} records ({st.what}): {st.n_tokens} tokens, {st.n_trained} trained within --ctx "
               f"{args.n_ctx}; {st.n_cut} records longer than {row} tokens (cut off)")
    pack = args.pack if args.pack is not None else fmt == "jsonl"
    rows, eff = _packing(records, args, pack)
    if args.json:
        for k, row_records in enumerate(rows):
            out.write(json.dumps({"row": k, "records": row_records}) + "\n")
        print(summary, file=sys.stderr)
        print(f"{'packed rows' if pack else 'one record per row'}: {eff.text()}", file=sys.stderr)
    else:
        if not color:
            out.write(f"(trained tokens are marked {OPEN}...{CLOSE})\n")
        out.write(summary + "\n")
        out.write(f"first batch ({args.n_batch} rows of --ctx {args.n_ctx}, {'packed' if pack else 'one record per row'}):\n")
        for k, row_records in enumerate(rows):
            parts = [f"record {r['record'] + 1}" + (f" (line {r['line']})" if r["line"] is not None else "")
                     + f" at {r['offset']}, {r['positions']} positions" for r in row_records]
            out.write(f"  row {k + 1}: " + ("; ".join(parts) or "(empty)") + "\n")
        out.write(f"{'packed rows' if pack else 'one record per row'}: {eff.text()}\n")
    return 0


def _packing(records, args: PreviewArgs, pack: bool):
    """The first batch's rows (records in file order, as a fresh epoch would take them if unshuffled)
    and the efficiency over all records."""
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..data.batches import pack_records, packing_efficiency

    eff = packing_efficiency(records, args.n_batch, args.n_ctx, pack)
    lines = records.lines
    if pack:
        p = pack_records(0, records.begins, records.sizes, records.tokens, records.trained, args.n_batch, args.n_ctx, 0)
        rows = [[{"record": int(i), "line": int(lines[i]) if args.data_format != "text" else None, "offset": o,
                  "positions": q} for i, o, q in row] for row in p.rows]
    else:
        n = min(args.n_batch, records.n_samples)
        rows = [[{"record": i, "line": int(lines[i]), "offset": 0,
                  "positions": max(0, min(int(records.sizes[i]), args.n_ctx + 1) - 1)}] for i in range(n)]
    return rows, eff


__all__ = ["PreviewArgs", "Shown", "Stats", "highlight", "preview_parser", "run"]
