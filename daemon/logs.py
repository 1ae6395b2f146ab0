"""Structured JSON logs, one object per line, with the round id when there is one.

Operators grep and ship these logs; every line must parse as JSON and carry
what it is about (round, partition, replica) as fields, not inside prose.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys

round_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("round_id", default=None)

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, rec: logging.LogRecord) -> str:
        out = {
            "ts": round(rec.created, 3),
            "level": rec.levelname.lower(),
            "logger": rec.name,
            "msg": rec.getMessage(),
        }
        rid = round_id.get()
        if rid is not None:
            out["round_id"] = rid
        for k, v in rec.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if rec.exc_info:
            out["exc"] = self.formatException(rec.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str = "INFO") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level.upper())
    logging.getLogger("kafka").setLevel(logging.WARNING)
