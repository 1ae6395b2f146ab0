"""Kafka consumer and dead-letter producer, configured from the policy file.

kafka-python is used directly; this module only builds the clients with the
settings at-least-once delivery needs (no auto-commit, bounded fetches) and
writes dead-letter records in one documented shape.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from policies.config import IngestPolicy

__all__ = [
    "KafkaConsumer",
    "KafkaProducer",
    "TopicPartition",
    "ConsumerRebalanceListener",
    "make_consumer",
    "make_dead_letter_producer",
    "dead_letter_headers",
    "dead_letter_value",
    "stuck_partition",
    "consumer_lag",
    "DEAD_LETTER_HEADROOM",
]

# Bytes a dead-letter record may take beyond its value: the cptd-* headers (the detail is cut at 1000 bytes) and
# the record batch framing. The dead-letter topic must accept ingest.max_message_bytes plus this (docs/ingest.md).
DEAD_LETTER_HEADROOM = 16 * 1024


def make_consumer(bootstrap: str, ingest: IngestPolicy, client_id: str = "cptd-ingest") -> KafkaConsumer:
    """A group consumer that never commits on its own: offsets move only after Redis has the batch."""
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=ingest.group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=ingest.batch_max_docs,
        # Bounded memory: at most this much fetched but not yet processed.
        fetch_max_bytes=ingest.fetch_max_bytes,
        max_partition_fetch_bytes=max(ingest.max_message_bytes + 1024, 1_048_576),
        session_timeout_ms=ingest.session_timeout_ms,
        heartbeat_interval_ms=ingest.heartbeat_interval_ms,
        max_poll_interval_ms=ingest.max_poll_interval_ms,
    )


def make_dead_letter_producer(bootstrap: str, max_message_bytes: int, client_id: str = "cptd-dead-letter") -> KafkaProducer:
    """acks=all and retries: a dead letter must be durable before its offset is committed.

    Sized for what ingest admits: a dead-letter value is at most `max_message_bytes` (larger originals are
    cut by `dead_letter_value`), so one record plus headers always fits `max_request_size`, and the
    producer holds a few of them.
    """
    record_max = max_message_bytes + DEAD_LETTER_HEADROOM
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        retries=5,
        max_request_size=record_max,
        batch_size=min(record_max, 1_048_576),
        linger_ms=5,
    )


def dead_letter_value(value: bytes | None, limit: int) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The record value to dead-letter for an original of any size, and the headers that say if it was cut.

    An original over `limit` (ingest.max_message_bytes: what the dead-letter producer and topic are sized
    for) travels as its first `limit` bytes, with `cptd-truncated: 1`, `cptd-original-bytes` and
    `cptd-original-sha256`, so the operator can still identify the producer's message.
    """
    if value is None or len(value) <= limit:
        return value, []
    return value[:limit], [
        ("cptd-truncated", b"1"),
        ("cptd-original-bytes", str(len(value)).encode()),
        ("cptd-original-sha256", hashlib.sha256(value).hexdigest().encode()),
    ]


def dead_letter_headers(
    outcome: str, reason: str, detail: str, topic: str, partition: int, offset: int, extra: Iterable[tuple[str, bytes]] = ()
) -> list[tuple[str, bytes]]:
    """The original bytes travel as the record value (cut only when too large); why and where from travel in headers."""
    return [
        ("cptd-outcome", outcome.encode()),
        ("cptd-reason", reason.encode()),
        ("cptd-detail", detail.encode("utf-8", "replace")[:1000]),
        ("cptd-source-topic", topic.encode()),
        ("cptd-source-partition", str(partition).encode()),
        ("cptd-source-offset", str(offset).encode()),
        *extra,
    ]


def stuck_partition(consumer: KafkaConsumer) -> TopicPartition | None:
    """The partition whose fetched records the last `poll()` failed to decode, or None if that is not known.

    kafka-python raises a batch's decode error (corrupt compressed data, CRC mismatch) from poll() without
    saying which partition it came from, and leaves the position at the batch, so every later poll raises
    again. The fetcher keeps the failed partition's records as the next in line; this reads that private
    attribute (kafka-python 2.x/3.x), and returns None when it is absent so the caller re-raises.
    """
    part = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
    tp = getattr(part, "topic_partition", None)
    return tp if isinstance(tp, TopicPartition) else None


def consumer_lag(consumer: KafkaConsumer, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    parts = list(partitions)
    if not parts:
        return {}
    ends = consumer.end_offsets(parts)
    return {tp: max(0, ends[tp] - consumer.position(tp)) for tp in parts}
