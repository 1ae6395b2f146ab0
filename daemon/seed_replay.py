"""`cptd seed-replay FILE.jsonl`: fill the replay reservoir with a corpus that stands for the original pre-training mix.

Replay only protects what the reservoir holds; on day one it holds nothing, so
the operator seeds it with a sample of what the served model was trained on.
Lines are validated exactly like Kafka messages (policies/document.py), but not
quality-filtered: the seed is the operator's own reference. A bad line is
reported with its number and reason and skipped; the rest is seeded.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from connectors.redis_store import RedisStore, StoredDoc
from policies.config import Policy
from policies.dedup import document_keys
from policies.document import Document, Malformed, parse_message
from policies.replay import reservoir_slot


@dataclass
class SeedReport:
    lines: int = 0
    offered: int = 0
    placed: int = 0
    invalid: list[tuple[int, str, str]] = field(default_factory=list)  # (line number, reason, detail)


def read_messages(path: Path, max_bytes: int) -> Iterator[tuple[int, Document | Malformed | None]]:
    """(line number, the line parsed like a Kafka message) for every line of a JSONL file; None for a blank line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            yield n, (parse_message(raw, max_bytes) if raw.strip() else None)


def seed_replay(path: Path, store: RedisStore, policy: Policy, rng: random.Random, batch: int = 1000) -> SeedReport:
    report = SeedReport()
    pending: list[tuple[int, str, dict]] = []

    def flush() -> None:
        if not pending:
            return
        keys = document_keys([t for _, t, _ in pending], policy.dedup)
        now = time.time()
        records = [
            StoredDoc.model_validate(
                {
                    **meta,
                    "key": k.content_key,
                    "bands": list(k.band_keys),
                    "bytes": len(t.encode("utf-8")),
                    "text": t,
                    "ingested_at": now,
                    "source": meta.get("source") or f"seed:{path.name}:{n}",
                    # the operator vouches for the seed: a sample of what the model was trained on, real data
                    "provenance": "human",
                    "provenance_rule": "seed",
                    "domain": (meta.get("meta") or {}).get("domain") or "unknown",
                }
            )
            for (n, t, meta), k in zip(pending, keys, strict=False)
        ]
        report.offered += len(records)
        report.placed += store.replay_offer(records, policy.replay.reservoir_docs, rng.random, reservoir_slot)
        pending.clear()

    for n, doc in read_messages(path, policy.ingest.max_message_bytes):
        report.lines = n
        if isinstance(doc, Malformed):
            report.invalid.append((n, doc.reason, doc.detail))
            continue
        if doc is not None:
            pending.append((n, doc.text, {"id": doc.id, "source": doc.source, "lang": doc.lang, "ts": doc.ts, "meta": doc.meta}))
        if len(pending) >= batch:
            flush()
    flush()
    return report
