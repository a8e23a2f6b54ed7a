#!/usr/bin/env python3
"""The newest measured row of each kind and key in docs/results.jsonl, as markdown tables.

    python scripts/bench_summary.py                 # a table per kind
    python scripts/bench_summary.py --write-docs    # also into each kind's section of docs/PERFORMANCE.md
                                                    # or docs/BENCHMARKS.md
    python scripts/bench_summary.py --series step   # every recorded "step" row in time order, median per key

The benchmark scripts append one row per measurement (``--record``, scripts/benchlib.py); a row's
key is the fields that say what was measured (for "step": model and mode), and a table shows the
newest row of every key, under one line saying when, on what and by which command it was measured.
``--write-docs`` replaces the text between ``<!-- KIND:begin -->`` and ``<!-- KIND:end -->`` with
the kind's table; a kind whose section the document does not have is skipped (said on stderr).

Kinds the script does not know are shown with all their fields, keyed on their text fields.
GGUF_FINETUNE_RESULTS=PATH (or ``--results``) reads another results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import benchlib

META = ("kind", "time", "commit", "host", "command")  # what benchlib.record adds to every row


def percent(v) -> str:
    return f"{v * 100:.0f}%"


@dataclass
class Kind:
    key: tuple[str, ...]  # the fields that say what was measured: the newest row per key is shown
    columns: tuple[tuple, ...]  # (field, header) or (field, header, format); a column no row has is left out
    measures: tuple[str, ...]  # the numbers --series takes the median of
    quiet: tuple[str, ...] = field(default=())  # recorded, not shown (other unknown fields get a column)
    shown: dict = field(default_factory=dict)  # field -> the values whose rows the summary shows (default: all)


KINDS: dict[str, Kind] = {
    "step": Kind(
        key=("model", "workload", "mode", "ctx", "batch", "ranks"),
        columns=(("model", "model"), ("workload", "workload"), ("mode", "mode"), ("ctx", "ctx"), ("batch", "batch"),
                 ("threads", "threads"),
                 ("tokens_per_s", "tokens/s"), ("trained_tokens_per_s", "trained tokens/s"),
                 ("peak_rss_mb", "peak RSS MB"), ("matmul_gflops", "matmul GFLOP/s"),
                 ("sgemm_gflops", "sgemm GFLOP/s"), ("bound", "of bound", percent)),
        measures=("tokens_per_s", "trained_tokens_per_s", "peak_rss_mb", "matmul_gflops", "sgemm_gflops", "bound"),
        quiet=("arch", "ranks", "steps", "step_ms", "allreduce_ms_per_step", "loss")),
    "peers": Kind(
        key=("model", "workload"),
        columns=(("model", "model"), ("workload", "workload"), ("unit", "unit"), ("ours", "ours"), ("peers", "transformers + PEFT"),
                 ("ratio", "ratio"), ("ours_bound", "ours, of bound", percent),
                 ("ours_one_record_per_row", "ours, a record per row of ctx"), ("packing_gain", "packing gain"),
                 ("ours_no_pack", "ours, --no-pack"), ("ours_peak_rss_mb", "ours peak RSS MB"),
                 ("peers_peak_rss_mb", "peers peak RSS MB")),
        measures=("ours", "peers", "ratio", "packing_gain"),
        quiet=("ours_runs", "peers_runs", "threads")),
    "mpi": Kind(
        key=("model", "layout"),
        columns=(("model", "model"), ("layout", "layout"), ("ctx", "ctx"), ("batch", "global batch"),
                 ("tokens_per_s", "tokens/s"), ("allreduce_ms_per_step", "Allreduce ms/step"),
                 ("grad_mb", "gradients MB")),
        measures=("tokens_per_s", "allreduce_ms_per_step"),
        quiet=("runs",)),
    "mpi-prediction": Kind(
        key=("model", "lora_r", "gbit_s", "machines"),
        columns=(("model", "model"), ("lora_r", "rank"), ("grad_mb", "gradients MB"), ("step_s", "step s"),
                 ("gbit_s", "Gbit/s"), ("machines", "machines"), ("allreduce_ms", "Allreduce ms"),
                 ("tokens_per_s", "tokens/s"), ("efficiency", "of linear", percent)),
        measures=("step_s", "allreduce_ms", "tokens_per_s", "efficiency"),
        shown={"machines": (1, 4, 16)}),  # (--series: every count recorded)
    "startup": Kind(
        key=("cache",),
        columns=(("cache", "cache"), ("seconds_to_first_iteration", "s to first iteration"),
                 ("begin_training_s", "s to begin training"), ("cpu_s", "CPU s"), ("runs", "runs"),
                 ("load", "load")),
        measures=("seconds_to_first_iteration", "begin_training_s", "cpu_s"),
        quiet=("notice_s", "total_s", "peak_rss_mb", "threads", "ctx", "batch", "model")),
    "dequant": Kind(
        key=("type", "rows", "cols"),
        columns=(("type", "type"), ("rows", "rows"), ("cols", "cols"), ("gguf_ms", "gguf.quants ms"),
                 ("ours_ms", "ours ms"), ("speedup", "speed-up", "{:.1f}x".format),
                 ("ours_out_ms", "ours, out= ms"), ("speedup_out", "speed-up, out=", "{:.1f}x".format),
                 ("fill_ms", "fill ms"), ("bound", "bound", "{:.1f}x".format)),
        measures=("gguf_ms", "ours_ms", "speedup", "ours_out_ms", "speedup_out", "fill_ms", "bound"),
        quiet=("repeat", "threads")),
    "tokenizer": Kind(
        key=("vocab",),
        columns=(("vocab", "vocabulary"), ("tokenizer", "tokenizer"), ("pre", "pre"), ("n_vocab", "n_vocab"),
                 ("chars", "chars"), ("tokens", "tokens"), ("load_s", "load s"),
                 ("encode_cold_s", "encode, cold s"), ("encode_warm_s", "encode, warm s"),
                 ("encode_nocache_s", "encode, no cache s"), ("decode_s", "decode s"),
                 ("cold_mb_per_s", "cold MB/s")),
        measures=("load_s", "encode_cold_s", "encode_warm_s", "encode_nocache_s", "decode_s", "cold_mb_per_s"),
        quiet=("text", "repeat", "pinned")),
    "generate": Kind(
        key=("model", "threads"),
        columns=(("model", "model"), ("threads", "threads"), ("ctx", "ctx"), ("load_s", "load s"),
                 ("prompt_tokens", "prompt tokens"), ("prompt_ms", "prompt ms"), ("tokens", "tokens"),
                 ("best_tokens_per_s", "best tokens/s"), ("median_tokens_per_s", "median tokens/s")),
        measures=("load_s", "prompt_ms", "best_tokens_per_s", "median_tokens_per_s"),
        quiet=("repeat", "cache_mib")),
    "kernels": Kind(
        key=("kernel", "dtype", "batch", "ctx", "threads", "clock"),
        columns=(("kernel", "kernel"), ("shape", "shape"), ("dtype", "dtype"), ("batch", "batch"), ("ctx", "ctx"),
                 ("threads", "threads"), ("layer", "layer"), ("clock", "clock"), ("ms", "ms")),
        measures=("ms",),
        quiet=("repeat",)),
}


def generic(rows: list[dict]) -> Kind:
    """A kind this script does not know: every field a column, keyed on the text fields."""
    fields: dict[str, None] = {}
    for r in rows:
        fields.update(dict.fromkeys(f for f in r if f not in META))
    key = tuple(f for f in fields if any(isinstance(r.get(f), str) for r in rows))
    measures = tuple(f for f in fields if f not in key and any(is_number(r.get(f)) for r in rows))
    return Kind(key=key, columns=tuple((f, f) for f in fields), measures=measures)


def kind_of(name: str, rows: list[dict]) -> Kind:
    return KINDS.get(name) or generic(rows)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def cell(v, fmt: Callable | None = None) -> str:
    if v is None:
        return "–"
    if fmt is not None and is_number(v):
        return fmt(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return "0" if v == 0 else f"{v:.3g}"
    if isinstance(v, list):
        return ", ".join(cell(x) for x in v)
    if isinstance(v, dict):
        v = json.dumps(v, ensure_ascii=False)
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], body: list[list[str]], numeric: list[bool]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def columns_of(kind: Kind, rows: list[dict]) -> list[tuple]:
    """The kind's columns that some row has, then any other recorded field (not quiet, not META)."""
    cols = [c for c in kind.columns if any(c[0] in r for r in rows)]
    known = {c[0] for c in kind.columns} | set(kind.quiet) | set(META)
    extra: dict[str, None] = {}
    for r in rows:
        extra.update(dict.fromkeys(f for f in r if f not in known))
    return cols + [(f, f) for f in extra]


def key_of(kind: Kind, row: dict) -> tuple:
    return tuple(json.dumps(row.get(f), sort_keys=True) for f in kind.key)


def newest(kind: Kind, rows: list[dict]) -> list[dict]:
    """The newest row of every key (the later one in the file when two have the same time), the keys in
    the order they first appear in the file."""
    best: dict[tuple, tuple[tuple[str, int], dict]] = {}
    for i, r in enumerate(rows):
        k, rank = key_of(kind, r), (r.get("time") or "", i)
        if k not in best or rank >= best[k][0]:
            best[k] = (rank, r)
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(key_of(kind, r), i)
    return [best[k][1] for k in sorted(best, key=first.__getitem__)]


def when(t: str | None) -> str:
    """2026-12-07T20:01:02Z -> 2026-12-07 20:01."""
    return t[:16].replace("T", " ") if t else "?"


def time_range(rows: list[dict]) -> str:
    times = sorted(r.get("time") or "" for r in rows)
    lo, hi = when(times[0]), when(times[-1])
    if lo == hi:
        return f"{lo} UTC"
    return f"{lo}–{hi[11:]} UTC" if lo[:10] == hi[:10] else f"{lo} – {hi} UTC"


def host_text(h: dict | None) -> str:
    h = h or {}
    simd = " ".join(h.get("simd") or []) or "no AVX"
    return f"{h.get('cpu', '?')} ({h.get('cores', '?')} cores, {simd})"


def unique(values) -> list:
    return list(dict.fromkeys(values))


def command_cell(r: dict) -> str:
    return "`" + (r.get("command") or "?").replace("|", "\\|") + "`"


# what a row says about its run, as a column: (header, value of the row)
RUN_COLUMNS = {
    "host": ("host", lambda r: cell(host_text(r.get("host")))),
    "commit": ("commit", lambda r: cell(r.get("commit"))),
    "measured": ("measured", lambda r: when(r.get("time"))),
    "command": ("command", command_cell),
}


def stamp(rows: list[dict]) -> tuple[str, list[str]]:
    """The line above a table, and the run columns (RUN_COLUMNS) its rows need because they differ:
    host, commit (with the time: several commits are several runs) and command."""
    hosts = unique(host_text(r.get("host")) for r in rows)
    commits = unique(r.get("commit") or "?" for r in rows)
    commands = unique(r.get("command") or "?" for r in rows)
    per_row = (["host"] if len(hosts) > 1 else []) + (["commit", "measured"] if len(commits) > 1 else []) \
        + (["command"] if len(commands) > 1 else [])
    line = f"Measured {time_range(rows)} on {hosts[0] if len(hosts) == 1 else 'the host of each row'}"
    line += f", commit {commits[0]}" if len(commits) == 1 else ""
    line += f"; command: `{commands[0]}`" if len(commands) == 1 else ""
    if per_row:
        line += "; " + ", ".join(c for c in ("host", "commit", "command") if c in per_row) + " per row"
    return line + ".", per_row


def render(kind: Kind, rows: list[dict], per_row: list[str]) -> str:
    """The rows as a markdown table, with the run columns ``per_row`` (RUN_COLUMNS) at the end."""
    cols = columns_of(kind, rows)
    header = [c[1] for c in cols] + [RUN_COLUMNS[c][0] for c in per_row]
    numeric = [all(is_number(r.get(c[0])) or r.get(c[0]) is None for r in rows) for c in cols] + [False] * len(per_row)
    body = [[cell(r.get(c[0]), c[2] if len(c) > 2 else None) for c in cols] + [RUN_COLUMNS[c][1](r) for c in per_row]
            for r in rows]
    return md_table(header, body, numeric)


def summary(name: str, rows: list[dict]) -> str:
    """A kind's section: the stamp line and the table of the newest row per key."""
    kind = kind_of(name, rows)
    top = [r for r in newest(kind, rows) if all(r.get(f) in vals for f, vals in kind.shown.items())]
    line, per_row = stamp(top)
    return f"{line}\n\n{render(kind, top, per_row)}\n"


def series(name: str, rows: list[dict]) -> str:
    """Every row of a kind in time order, then the median of each measure per key."""
    kind = kind_of(name, rows)
    ordered = [r for _, _, r in sorted((r.get("time") or "", i, r) for i, r in enumerate(rows))]
    line, per_row = stamp(ordered)
    per_row = unique(["measured", *per_row, "commit", "command"])
    out = [f"{len(ordered)} {name} rows. {line}", "", render(kind, ordered, per_row), ""]
    groups: dict[tuple, list[dict]] = {}
    for r in ordered:
        groups.setdefault(key_of(kind, r), []).append(r)
    measures = [m for m in kind.measures if any(is_number(r.get(m)) for r in ordered)]
    fmts = {c[0]: c[2] for c in kind.columns if len(c) > 2}
    headers = {c[0]: c[1] for c in kind.columns}
    body = []
    for group in groups.values():
        line = [cell(group[0].get(f)) for f in kind.key] + [str(len(group))]
        for m in measures:
            vals = [r[m] for r in group if is_number(r.get(m))]
            line.append(cell(statistics.median(vals), fmts.get(m)) if vals else "–")
        body.append(line)
    out += ["Median per key:", "",
            md_table([headers.get(f, f) for f in kind.key] + ["runs"] + [f"median {headers.get(m, m)}" for m in measures],
                     body, [False] * len(kind.key) + [True] * (1 + len(measures)))]
    return "\n".join(out) + "\n"


def by_kind(results: list[dict]) -> dict[str, list[dict]]:
    """The rows grouped by kind: the known kinds in this script's order, then the others by name."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r.get("kind") or "?", []).append(r)
    order = [k for k in KINDS if k in groups] + sorted(k for k in groups if k not in KINDS)
    return {k: groups[k] for k in order}


def has_section(doc: Path, name: str) -> bool:
    begin, end = benchlib._markers(name)
    text = doc.read_text(encoding="utf-8")
    return begin in text and end in text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=None,
                    help=f"the results file (default: ${benchlib.RESULTS_ENV} or docs/results.jsonl)")
    ap.add_argument("--write-docs", action="store_true", help="write each kind's table into its section of --doc")
    ap.add_argument("--doc", type=Path, action="append", default=None,
                    help="a document with sections (repeatable; default: docs/PERFORMANCE.md and docs/BENCHMARKS.md)")
    ap.add_argument("--series", metavar="KIND", help="print every row of KIND in time order and the median per key")
    args = ap.parse_args(argv)

    path = benchlib.results_path(args.results)
    kinds = by_kind(benchlib.read_results(path))
    if not kinds:
        print(f"bench_summary: no results in {path}", file=sys.stderr)
        return 1
    if args.series:
        if args.series not in kinds:
            print(f"bench_summary: no {args.series!r} rows in {path} (kinds: {', '.join(kinds)})", file=sys.stderr)
            return 1
        print(series(args.series, kinds[args.series]), end="")
        return 0
    docs = args.doc or [benchlib.DOC, benchlib.DOC.with_name("BENCHMARKS.md")]
    missing = [d for d in docs if not d.exists()]
    if args.write_docs and missing:
        print(f"bench_summary: {missing[0]} does not exist", file=sys.stderr)
        return 1
    for i, (name, rows) in enumerate(kinds.items()):
        body = summary(name, rows)
        print(("\n" if i else "") + f"## {name}\n\n{body}", end="")
        if args.write_docs:
            targets = [d for d in docs if has_section(d, name)]
            for doc in targets:
                benchlib.write_section(name, body, doc)
            if not targets:
                begin, end = benchlib._markers(name)
                print(f"bench_summary: {' '.join(map(str, docs))}: no section {name!r} (markers {begin} and "
                      f"{end}); skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
