"""``gguf-finetune plot METRICS.jsonl -o loss.png``: training (and validation) loss by iteration."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .parser import Group, Parser, Positional, opt


@dataclass(frozen=True)
class PlotArgs:
    metrics: str = ""
    output: str = "loss.png"
    title: str = ""


def plot_parser(prog: str) -> Parser:
    return Parser(prog, "Plot the training loss (and the validation loss, when the file has val_loss records) of "
                        "a metrics file written by finetune (--metrics-out) against the iteration. Needs "
                        "matplotlib (pip install matplotlib).", (
        Group("options", (
            opt("-o --output", "output", "image to write; the format follows the extension (png, svg, pdf, ...)",
                "FNAME"),
            opt("--title", "title", "title above the plot", "TEXT", default=""),
        )),), PlotArgs(), positionals=(Positional("METRICS", "metrics", "the metrics JSONL file"),))


def run(argv: list[str], prog: str = "gguf-finetune plot") -> int:
    args = plot_parser(prog).parse(argv)
    # lazy: loaded once the flags are parsed (fast --help and usage errors)
    from ..plot import plot_curves, read_metrics

    curves = read_metrics(args.metrics)
    plot_curves(curves, args.output, args.title)
    what = f"{len(curves.train_iter)} training points"
    if curves.val_iter:
        what += f", {len(curves.val_iter)} validation points"
    print(f"plot: wrote {args.output} ({what})", file=sys.stderr)
    return 0
