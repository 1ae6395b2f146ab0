"""Kafka consumer and dead-letter producer, configured from the policy file.

kafka-python is used directly; this module only builds the clients with the
settings at-least-once delivery needs (no auto-commit, bounded fetches) and
writes dead-letter records in one documented shape.
"""

from __future__ import annotations

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
    "consumer_lag",
]


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
    """acks=all and retries: a dead letter must be durable before its offset is committed."""
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        retries=5,
        max_request_size=max(max_message_bytes * 2, 1_048_576),
        linger_ms=5,
    )


def dead_letter_headers(outcome: str, reason: str, detail: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """The original bytes travel as the record value untouched; why and where from travel in headers."""
    return [
        ("cptd-outcome", outcome.encode()),
        ("cptd-reason", reason.encode()),
        ("cptd-detail", detail.encode("utf-8", "replace")[:1000]),
        ("cptd-source-topic", topic.encode()),
        ("cptd-source-partition", str(partition).encode()),
        ("cptd-source-offset", str(offset).encode()),
    ]


def consumer_lag(consumer: KafkaConsumer, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    parts = list(partitions)
    if not parts:
        return {}
    ends = consumer.end_offsets(parts)
    return {tp: max(0, ends[tp] - consumer.position(tp)) for tp in parts}
