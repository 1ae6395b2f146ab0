"""What a Kafka message must be to become a document, and the reason when it isn't.

A message is UTF-8 JSON `{"text": str, "id"?: str, "source"?: str, "lang"?: str,
"ts"?: number, "meta"?: object}` or plain UTF-8 text. A payload whose first
non-blank character is `{` is taken as JSON and must parse; anything else is
plain text (so prose that starts with "[citation needed]" is not misread as a
broken JSON array). Every way a message can fail has its own reason code, so
the dead-letter topic tells an operator exactly what their producer got wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MALFORMED_REASONS = (
    "empty_message",
    "oversize",
    "invalid_utf8",
    "invalid_json",
    "missing_text",
    "invalid_field",
    "empty_text",
)

_OPTIONAL_STR = ("id", "source", "lang")


@dataclass(frozen=True)
class Document:
    text: str
    id: str | None = None
    source: str | None = None
    lang: str | None = None
    ts: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Malformed:
    reason: str  # one of MALFORMED_REASONS
    detail: str


def parse_message(value: bytes | None, max_bytes: int) -> Document | Malformed:
    if not value:
        return Malformed("empty_message", "message value is empty or null")
    if len(value) > max_bytes:
        return Malformed("oversize", f"{len(value)} bytes > ingest.max_message_bytes={max_bytes}")
    try:
        s = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return Malformed("invalid_utf8", f"byte {e.start}: {e.reason}")
    if not s.lstrip().startswith("{"):
        return Document(text=s) if s.strip() else Malformed("empty_text", "text is blank")
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return Malformed("invalid_json", f"line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(obj, dict):
        return Malformed("invalid_json", f"top-level JSON value is {type(obj).__name__}, expected an object")
    if "text" not in obj:
        return Malformed("missing_text", "JSON object has no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        return Malformed("invalid_field", f"'text' is {type(text).__name__}, expected a string")
    if not text.strip():
        return Malformed("empty_text", "text is blank")
    for k in _OPTIONAL_STR:
        if obj.get(k) is not None and not isinstance(obj[k], str):
            return Malformed("invalid_field", f"'{k}' is {type(obj[k]).__name__}, expected a string")
    ts = obj.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
        return Malformed("invalid_field", f"'ts' is {type(ts).__name__}, expected a number")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return Malformed("invalid_field", f"'meta' is {type(meta).__name__}, expected an object")
    return Document(
        text=text,
        id=obj.get("id"),
        source=obj.get("source"),
        lang=obj.get("lang"),
        ts=float(ts) if ts is not None else None,
        meta=meta or {},
    )
