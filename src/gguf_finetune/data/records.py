"""JSONL training records: parse, check and normalise one record per line.

Accepted shapes (a file may mix them):

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}   ShareGPT
    {"prompt": "...", "completion": "..."}                                        plain text pair
    {"prompt": [messages...], "completion": [messages...]}                        conversational pair
    {"text": "..."}

Keys are tried in that order; other keys are ignored.  Blank lines are skipped.  Every problem is
a :class:`UserError` naming the file and line (and for invalid UTF-8 the byte).

Chat records become ``Record(kind="chat", messages=..., train_from=i)``: assistant messages at
index >= ``train_from`` are the trained turns (0 for ``messages``/``conversations``; the length of
the prompt for a conversational prompt/completion pair).  Nothing here knows about tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..gguf_io import read_file_bytes

KINDS = ("chat", "prompt_completion", "text")

# ShareGPT "from" -> chat role
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "function_response": "tool",
}


@dataclass(frozen=True)
class Record:
    """One training example.

    kind        "chat" | "prompt_completion" | "text"
    line        1-based line number in the file
    messages    chat: list of message dicts (role and content strings, other keys kept)
    train_from  chat: assistant messages at index >= train_from are trained
    prompt, completion   prompt_completion (plain strings)
    text        text
    """

    kind: str
    line: int
    messages: tuple = ()
    train_from: int = 0
    prompt: str = ""
    completion: str = ""
    text: str = ""


def _where(path: str, line: int, what: str = "train data") -> str:
    return f"{what} '{path}': line {line}"


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _messages(raw: Any, where: str, key: str) -> list[dict]:
    """A list of {"role", "content"} objects, checked; other keys kept."""
    if not isinstance(raw, list):
        raise UserError(f"{where}: '{key}' must be a list of messages, got {_type_name(raw)}")
    out = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise UserError(f"{where}: {key}[{j}] must be an object with 'role' and 'content', got {_type_name(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise UserError(f"{where}: {key}[{j}] has no 'role' string")
        if not isinstance(content, str):
            raise UserError(f"{where}: {key}[{j}] ('{role}'): 'content' must be a string, got {_type_name(content)}")
        out.append(dict(m))
    return out


def _sharegpt(raw: Any, where: str) -> list[dict]:
    if not isinstance(raw, list):
        raise UserError(f"{where}: 'conversations' must be a list of turns, got {_type_name(raw)}")
    out = []
    for j, t in enumerate(raw):
        if not isinstance(t, dict):
            raise UserError(f"{where}: conversations[{j}] must be an object with 'from' and 'value', "
                            f"got {_type_name(t)}")
        src, value = t.get("from"), t.get("value")
        if not isinstance(src, str):
            raise UserError(f"{where}: conversations[{j}] has no 'from' string")
        role = SHAREGPT_ROLES.get(src.lower())
        if role is None:
            raise UserError(f"{where}: conversations[{j}]: unknown 'from' value {src!r} (known: system, human, "
                            f"gpt, and also user, assistant, tool)")
        if not isinstance(value, str):
            raise UserError(f"{where}: conversations[{j}] ('{src}'): 'value' must be a string, got {_type_name(value)}")
        out.append({"role": role, "content": value})
    return out


def _need_assistant(msgs: list[dict], start: int, where: str, what: str) -> None:
    if not any(m["role"] == "assistant" for m in msgs[start:]):
        raise UserError(f"{where}: {what} has no assistant turn (nothing to train on)")


def parse_record(obj: Any, path: str, line: int, what: str = "train data") -> Record:
    """One decoded JSON value -> :class:`Record` (raises UserError naming file and line)."""
    where = _where(path, line, what)
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    if "messages" in obj:
        msgs = _messages(obj["messages"], where, "messages")
        _need_assistant(msgs, 0, where, "the conversation")
        return Record("chat", line, tuple(msgs))
    if "conversations" in obj:
        msgs = _sharegpt(obj["conversations"], where)
        _need_assistant(msgs, 0, where, "the conversation")
        return Record("chat", line, tuple(msgs))
    if "prompt" in obj or "completion" in obj:
        p, c = obj.get("prompt"), obj.get("completion")
        if p is None or c is None:
            missing = "completion" if p is not None else "prompt"
            raise UserError(f"{where}: has 'prompt' or 'completion' but no '{missing}'")
        if isinstance(p, str) and isinstance(c, str):
            return Record("prompt_completion", line, prompt=p, completion=c)
        if isinstance(p, list) and isinstance(c, list):
            pm = _messages(p, where, "prompt")
            cm = _messages(c, where, "completion")
            _need_assistant(cm, 0, where, "the completion")
            return Record("chat", line, tuple(pm + cm), train_from=len(pm))
        raise UserError(f"{where}: 'prompt' and 'completion' must both be strings or both be lists of messages "
                        f"(got {_type_name(p)} and {_type_name(c)})")
    if "text" in obj:
        t = obj["text"]
        if not isinstance(t, str):
            raise UserError(f"{where}: 'text' must be a string, got {_type_name(t)}")
        return Record("text", line, text=t)
    keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
    raise UserError(f"{where}: no 'messages', 'conversations', 'prompt'/'completion' or 'text' field "
                    f"(keys: {keys})")


def parse_jsonl(data: bytes, path: str, what: str = "train data") -> list[Record]:
    """The records of a JSONL file's bytes, in file order (UserError on the first bad line)."""
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:]
    records: list[Record] = []
    offset = 0
    for i, raw in enumerate(data.split(b"\n"), start=1):
        start = offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{_where(path, i, what)}: invalid UTF-8 at byte {e.start + 1} of the line "
                            f"(byte offset {start + e.start} in the file)") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{_where(path, i, what)}, column {e.colno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise UserError(f"{_where(path, i, what)}: JSON nested too deeply") from None
        records.append(parse_record(obj, path, i, what))
    return records


def read_jsonl(path: str | os.PathLike, what: str = "train data") -> list[Record]:
    """Read and parse a JSONL file; a missing, unreadable or record-less file is a UserError."""
    p = os.fspath(path)
    records = parse_jsonl(read_file_bytes(p, what), p, what)
    if not records:
        raise UserError(f"{what} '{p}': no records (the file is empty or has only blank lines)")
    if all(is_blank(r) for r in records):
        # (plain text of only whitespace is refused too: there is nothing to learn but an EOS)
        raise UserError(f"{what} '{p}': all {len(records)} records are empty (no text in any 'text', 'prompt', "
                        f"'completion' or message content): nothing to train on")
    return records


def is_blank(rec: Record) -> bool:
    """Whether a record holds no text at all (only whitespace)."""
    if rec.kind == "text":
        return not rec.text.strip()
    if rec.kind == "prompt_completion":
        return not (rec.prompt + rec.completion).strip()
    return not any(str(m.get("content", "")).strip() for m in rec.messages)


def count_kinds(records: list[Record]) -> dict[str, int]:
    out = {k: 0 for k in KINDS}
    for r in records:
        out[r.kind] += 1
    return out


__all__ = ["KINDS", "Record", "SHAREGPT_ROLES", "count_kinds", "is_blank", "parse_jsonl", "parse_record",
           "read_jsonl"]
