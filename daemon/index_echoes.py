"""`cptd index-echoes FILE.jsonl`: put completions of the served model into the echo index without a Kafka topic.

Where the serving stack cannot publish its completions to a topic
(`collapse.echo_topics`), an operator exports them (request logs, a sample
generated for the purpose) and indexes them here; incoming documents that
near-duplicate or contain one (or are contained in one) are then echoes (docs/ingest.md, Provenance and echoes).
Lines are validated like Kafka messages; a bad line is named and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from connectors.redis_store import RedisStore
from daemon.seed_replay import read_messages
from policies.config import Policy
from policies.dedup import content_key
from policies.document import Malformed
from policies.echo_containment import completion_keys


@dataclass
class EchoReport:
    lines: int = 0
    indexed: int = 0  # new completions (a completion already indexed is not counted again)
    invalid: list[tuple[int, str, str]] = field(default_factory=list)  # (line number, reason, detail)


def index_echoes(path: Path, store: RedisStore, policy: Policy, batch: int = 1000) -> EchoReport:
    report = EchoReport()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            keys = completion_keys(pending, policy.collapse)  # band keys and sampled shingle keys, as ingest indexes them
            pairs = [(content_key(t), k) for t, k in zip(pending, keys, strict=True)]
            report.indexed += store.echo_add(pairs, policy.collapse.echo_max_docs)
            pending.clear()

    for n, doc in read_messages(path, policy.ingest.max_message_bytes):
        report.lines = n
        if isinstance(doc, Malformed):
            report.invalid.append((n, doc.reason, doc.detail))
        elif doc is not None:
            pending.append(doc.text)
        if len(pending) >= batch:
            flush()
    flush()
    return report
