"""The ingest loop: Kafka -> parse -> quality filters -> dedup -> Redis, then commit.

Promises (docs/architecture.md §2; mechanisms in docs/ingest.md):
* Every consumed offset ends as exactly one of accepted / duplicate /
  near_duplicate / rejected(reason) / dead_lettered(reason), counted once in
  Redis, in the same Lua call that stores the documents and the partition's
  next offset. Redelivered offsets are recognised there and not counted again.
* Offsets are committed to Kafka only after Redis acknowledged the batch and
  the dead-letter producer acknowledged its records.
* Back-pressure: at the buffer cap, or while Redis is unreachable, all
  assigned partitions are paused; at most one batch is held in memory.
* SIGTERM (the `stop` event) lets the current batch finish and commit.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from kafka.structs import OffsetAndMetadata

from connectors.kafka import (
    ConsumerRebalanceListener,
    KafkaConsumer,
    KafkaProducer,
    TopicPartition,
    consumer_lag,
    dead_letter_headers,
    make_consumer,
    make_dead_letter_producer,
)
from connectors.redis_store import BatchItem, BatchResult, RedisStore
from daemon import metrics as M
from policies.config import Policy
from policies.dedup import document_keys
from policies.document import Document, Malformed, parse_message
from policies.quality import build_filters, judge
from policies.round_policy import estimate_tokens

log = logging.getLogger("cptd.ingest")


@dataclass
class IngestState:
    """What /status shows about this process's ingest loop."""

    paused_cause: str | None = None  # buffer_full | redis_down | operator
    assigned: list[str] = field(default_factory=list)
    batches: int = 0
    last_commit: float | None = None
    last_error: str | None = None


class _Rebalance(ConsumerRebalanceListener):
    """On assignment, start each partition where Redis says accounting stopped (never before Kafka's commit)."""

    def __init__(self, ingestor: Ingestor):
        self.ing = ingestor

    def on_partitions_revoked(self, revoked):
        self.ing.state.assigned = []
        log.info("partitions revoked", extra={"partitions": [f"{tp.topic}/{tp.partition}" for tp in revoked]})

    def on_partitions_assigned(self, assigned):
        self.ing.on_assigned(assigned)


class Ingestor:
    def __init__(self, policy: Policy, bootstrap: str, store: RedisStore, client_id: str = "cptd-ingest"):
        self.store = store
        self._use_policy(policy)
        self.consumer: KafkaConsumer = make_consumer(bootstrap, policy.ingest, client_id)
        self.producer: KafkaProducer = make_dead_letter_producer(bootstrap, policy.ingest.max_message_bytes, client_id + "-dlq")
        self.state = IngestState()
        self.operator_paused = threading.Event()
        self._next_policy: Policy | None = None
        self._last_lag = 0.0

    # --- control -------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """Takes effect at the next batch boundary (topics and group changes need a restart)."""
        self._next_policy = policy

    def _use_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.filters = build_filters(policy.quality)
        M.BUFFER_CAP_DOCS.set(policy.buffer.max_docs)
        M.BUFFER_CAP_BYTES.set(policy.buffer.max_bytes)

    def _apply_policy(self) -> None:
        if self._next_policy is not None:
            policy, self._next_policy = self._next_policy, None
            self._use_policy(policy)

    def on_assigned(self, assigned) -> None:
        stored = self._try(self.store.stored_offsets, "stored_offsets") or {}
        for tp in assigned:
            off = stored.get((tp.topic, tp.partition))
            if off is not None:
                self.consumer.seek(tp, off)
        if self.state.paused_cause:
            self.consumer.pause(*assigned)
        self.state.assigned = sorted(f"{tp.topic}/{tp.partition}" for tp in self.consumer.assignment())
        log.info("partitions assigned", extra={"partitions": self.state.assigned})

    def _set_paused(self, cause: str | None) -> None:
        if cause == self.state.paused_cause:
            return
        if self.state.paused_cause:
            M.INGEST_PAUSED.labels(self.state.paused_cause).set(0)
        if cause:
            M.INGEST_PAUSED.labels(cause).set(1)
            self.consumer.pause(*self.consumer.assignment())
            log.warning("ingest paused", extra={"cause": cause})
        else:
            self.consumer.resume(*self.consumer.paused())
            log.info("ingest resumed", extra={"after": self.state.paused_cause})
        self.state.paused_cause = cause

    def _try(self, fn, op: str, *a):
        try:
            return fn(*a)
        except redis.RedisError as e:
            M.REDIS_ERRORS.labels(op).inc()
            self.state.last_error = f"redis {op}: {e}"
            return None

    # --- the loop -------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.consumer.subscribe(self.policy.ingest.topics, listener=_Rebalance(self))
        try:
            while not stop.is_set():
                self._apply_policy()
                if self._should_pause():
                    self._hold(self.consumer.poll(timeout_ms=500))
                    self._report_gauges()  # lag keeps growing while paused: that is what operators watch
                    continue
                polled = self.consumer.poll(timeout_ms=self.policy.ingest.batch_max_wait_ms, max_records=self.policy.ingest.batch_max_docs)
                msgs = [m for recs in polled.values() for m in recs]
                if msgs:
                    self._process_until_done(msgs, stop)
                self._report_gauges()
        finally:
            self.close()

    def _should_pause(self) -> bool:
        """Decide the pause state from the operator flag and the buffer; returns True while paused."""
        if self.operator_paused.is_set():
            self._set_paused("operator")
            return True
        if self.state.paused_cause is None:
            return False
        if self.state.paused_cause == "operator":
            self._set_paused(None)
            return False
        stats = self._try(self.store.buffer_stats, "buffer_stats")
        if stats is None:
            self._set_paused("redis_down")
            return True
        self._export_buffer(stats["buffer_docs"], stats["buffer_bytes"])
        b = self.policy.buffer
        if stats["buffer_docs"] < b.max_docs * b.resume_fraction and stats["buffer_bytes"] < b.max_bytes * b.resume_fraction:
            self._set_paused(None)
            return False
        self._set_paused("buffer_full")
        return True

    def _hold(self, polled: dict[TopicPartition, list[Any]]) -> None:
        """Records can still arrive while paused (a rebalance hands us a fresh partition): rewind, don't drop."""
        for tp, recs in polled.items():
            if recs:
                self.consumer.seek(tp, recs[0].offset)
        if polled:
            self.consumer.pause(*self.consumer.assignment())

    def _process_until_done(self, msgs: list[Any], stop: threading.Event) -> None:
        """Write the batch; while Redis or the dead-letter topic fail, hold it, keep the group alive, retry with back-off."""
        delay = 0.2
        while True:
            try:
                result = self.process(msgs)
                break
            except (redis.RedisError, KafkaDeliveryError) as e:
                self.state.last_error = str(e)
                if isinstance(e, redis.RedisError):
                    M.REDIS_ERRORS.labels("write_batch").inc()
                else:
                    M.DEAD_LETTER_PRODUCE_ERRORS.inc()
                log.warning("batch write failed, holding batch and retrying", extra={"error": str(e), "retry_in_s": delay})
                self._set_paused("redis_down")
                if stop.wait(delay):
                    log.warning("stopping with an unwritten batch; it will be redelivered", extra={"docs": len(msgs)})
                    return
                self._hold(self.consumer.poll(timeout_ms=0))
                delay = min(delay * 2, self.policy.ingest.redis_retry_max_s)
        if self.state.paused_cause == "redis_down":
            self._set_paused(None)
        self._commit(msgs)
        self._export_buffer(result.buffer_docs, result.buffer_bytes)
        b = self.policy.buffer
        if result.buffer_docs >= b.max_docs or result.buffer_bytes >= b.max_bytes:
            self._set_paused("buffer_full")

    def _commit(self, msgs: list[Any]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for m in msgs:
            tp = TopicPartition(m.topic, m.partition)
            offsets[tp] = max(offsets.get(tp, -1), m.offset + 1)
        try:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except Exception as e:  # noqa: BLE001 - Redis holds the truth; a failed commit only means redelivery
            log.warning("offset commit failed; redelivered messages will be skipped by the stored offsets", extra={"error": str(e)})
            return
        self.state.batches += 1
        self.state.last_commit = time.time()
        M.INGEST_BATCHES.inc()
        M.INGEST_LAST_COMMIT.set(self.state.last_commit)

    def process(self, msgs: list[Any]) -> BatchResult:
        """Classify one batch, send dead letters, write it to Redis; returns Redis's verdicts."""
        t0 = time.perf_counter()
        stored = self.store.stored_offsets()
        msgs = [m for m in msgs if m.offset >= stored.get((m.topic, m.partition), -1)]
        pol = self.policy
        items: list[BatchItem] = []
        dead: list[tuple[Any, str, str, str]] = []
        candidates: list[tuple[Any, Document, str]] = []
        for m in msgs:
            parsed = parse_message(m.value, pol.ingest.max_message_bytes)
            if isinstance(parsed, Malformed):
                dead.append((m, "dead_lettered", parsed.reason, parsed.detail))
                continue
            verdict = judge(parsed.text, self.filters)
            if not verdict.accepted:
                if pol.ingest.dead_letter_filtered:
                    dead.append((m, "rejected", verdict.reason or "rejected", ""))
                items.append(BatchItem(m.topic, m.partition, m.offset, "rejected", verdict.reason or "rejected"))
                continue
            text = verdict.text or parsed.text  # the C4-cleaned text when the C4 rules ran
            candidates.append((m, parsed, text))
        self._send_dead_letters(dead)
        for m, outcome, reason, _ in dead:
            if outcome == "dead_lettered":
                items.append(BatchItem(m.topic, m.partition, m.offset, "dead_lettered", reason))
        if candidates:
            keys = document_keys([t for _, _, t in candidates], pol.dedup)
            now = time.time()
            for (m, d, text), dk in zip(candidates, keys, strict=False):
                key, bk = dk.content_key, dk.band_keys
                nbytes = len(text.encode("utf-8"))
                doc = {
                    "text": text,
                    "id": d.id,
                    "source": d.source,
                    "lang": d.lang,
                    "ts": d.ts,
                    "meta": d.meta,
                    "bytes": nbytes,
                    "bands": list(bk),
                    "topic": m.topic,
                    "partition": m.partition,
                    "offset": m.offset,
                    "ingested_at": now,
                }
                items.append(BatchItem(m.topic, m.partition, m.offset, "candidate", "", key, nbytes, tuple(bk), doc))
        items.sort(key=lambda i: (i.topic, i.partition, i.offset))
        result = self.store.write_batch(items, pol.dedup.max_exact_keys)
        for outcome, reason in zip(result.outcomes, result.reasons, strict=False):
            if outcome != "skipped":
                M.INGEST_DOCS.labels(outcome, reason).inc()
        M.INGEST_BATCH_SECONDS.observe(time.perf_counter() - t0)
        return result

    def _send_dead_letters(self, dead: list[tuple[Any, str, str, str]]) -> None:
        if not dead:
            return
        topic = self.policy.ingest.dead_letter_topic
        futures = [
            self.producer.send(
                topic, value=m.value, key=m.key, headers=dead_letter_headers(outcome, reason, detail, m.topic, m.partition, m.offset)
            )
            for m, outcome, reason, detail in dead
        ]
        self.producer.flush(timeout=30)
        for f in futures:
            try:
                f.get(timeout=0)
            except Exception as e:  # noqa: BLE001 - any delivery failure means: do not commit this batch
                raise KafkaDeliveryError(f"dead-letter send to {topic} failed: {e}") from e

    def _export_buffer(self, docs: int, nbytes: int) -> None:
        M.BUFFER_DOCS.set(docs)
        M.BUFFER_BYTES.set(nbytes)
        M.BUFFER_TOKENS.set(estimate_tokens(nbytes, self.policy.rounds))

    def _report_gauges(self) -> None:
        """Every 5 s: consumer lag per partition and the dedup index sizes (reads that cost more than per-batch figures)."""
        now = time.monotonic()
        if now - self._last_lag < 5:
            return
        self._last_lag = now
        stats = self._try(self.store.buffer_stats, "buffer_stats")
        if stats is not None:
            M.DEDUP_KEYS.labels(kind="exact").set(stats["exact_keys"])
            M.DEDUP_KEYS.labels(kind="lsh").set(stats["lsh_keys"])
        try:
            for tp, lag in consumer_lag(self.consumer, self.consumer.assignment()).items():
                M.INGEST_LAG.labels(tp.topic, str(tp.partition)).set(lag)
        except Exception as e:  # noqa: BLE001 - lag is informational
            log.debug("lag unavailable", extra={"error": str(e)})

    def close(self) -> None:
        for c in (self.consumer, self.producer):
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass


class KafkaDeliveryError(RuntimeError):
    """The dead-letter topic did not acknowledge a record."""
