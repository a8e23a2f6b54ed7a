"""Marked sections of docs/PERFORMANCE.md, shared by the bench scripts' ``--write-docs``.

A section is the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; everything outside
the markers (prose written by hand) is kept as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"
NEW_DOC = "# Performance\n\nMeasured numbers; each section says how to reproduce it.\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def read_section(name: str) -> str:
    """The text between the markers, or '' when the section does not exist yet."""
    begin, end = _markers(name)
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if begin not in text or end not in text:
        return ""
    return text.split(begin, 1)[1].split(end, 1)[0]


def table_rows(body: str, header_start: str) -> list[str]:
    """The markdown table rows of a section's body, without its header row (``header_start``)."""
    return [ln for ln in body.strip().splitlines() if ln.startswith("| ") and not ln.startswith(header_start)]


def write_section(name: str, body: str, heading: str | None = None) -> None:
    """Replace the section's body; a new section goes at the end, under ``heading`` if given."""
    begin, end = _markers(name)
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else NEW_DOC
    section = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + section + rest.split(end, 1)[1]
    else:
        title = f"## {heading}\n\n" if heading else ""
        text = text.rstrip("\n") + "\n\n" + title + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, DOC)
