"""What a Kafka message must be to become a document, and the reason when it isn't.

A message is UTF-8 JSON `{"text": str, "id"?: str, "source"?: str, "lang"?: str,
"ts"?: number, "meta"?: object}` or plain UTF-8 text. A payload whose first
non-blank character is `{` is taken as JSON and must parse; anything else is
plain text (so prose that starts with "[citation needed]" is not misread as a
broken JSON array). Every way a message can fail has its own reason code, so
the dead-letter topic tells an operator exactly what their producer got wrong.

Parsing is safe on hostile input: JSON nested deeper than `MAX_JSON_DEPTH`,
integers longer than Python will convert, and strings holding lone UTF-16
surrogates (`"\\ud800"`, valid JSON escapes that are not Unicode text and
cannot be stored) are refused as `invalid_json` with the reason in the detail
instead of raising (docs/ingest.md "Hostile input").
"""

from __future__ import annotations

import json
import re
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

# Outcomes decided by the ingest loop rather than by the message's shape (docs/ingest.md "No message stops ingest"):
# `internal_error`: parsing, filtering or hashing this one message raised; `crash_loop`: the process died twice
# with this offset in flight; `corrupt_batch`: the Kafka record batch holding this offset cannot be decoded.
ISOLATION_REASONS = ("internal_error", "crash_loop", "corrupt_batch")

# json.loads recurses once per nesting level; 100,000 levels raise RecursionError. No document needs more than this.
MAX_JSON_DEPTH = 64

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

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
    depth = json_depth(s)
    if depth > MAX_JSON_DEPTH:
        return Malformed("invalid_json", f"nested {depth} levels deep > {MAX_JSON_DEPTH}")
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return Malformed("invalid_json", f"line {e.lineno} column {e.colno}: {e.msg}")
    except (ValueError, RecursionError) as e:  # e.g. an integer longer than sys.get_int_max_str_digits()
        return Malformed("invalid_json", f"{type(e).__name__}: {str(e)[:200]}")
    if _SURROGATE_ESCAPE.search(s) and _has_lone_surrogate(obj):
        return Malformed("invalid_json", "a string holds a lone UTF-16 surrogate escape (not Unicode text)")
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


def json_depth(s: str) -> int:
    """Deepest `[`/`{` nesting of JSON text `s`, brackets inside strings not counted.

    Cheap on ordinary messages: with fewer brackets than the limit the depth cannot exceed it, so the
    exact scan only runs on bracket-heavy text. Unterminated strings make the count an over-estimate,
    which only refuses text json.loads would refuse too.
    """
    if s.count("[") + s.count("{") <= MAX_JSON_DEPTH:
        return min(s.count("[") + s.count("{"), MAX_JSON_DEPTH)
    depth = deepest = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub("", s)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _has_lone_surrogate(obj: Any) -> bool:
    """Whether any key or string in the decoded JSON holds a surrogate code point (it cannot be UTF-8 encoded)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
