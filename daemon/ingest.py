"""The ingest loop: Kafka -> parse -> quality filters -> dedup -> Redis, then commit.

Promises (docs/architecture.md §2; mechanisms in docs/ingest.md):
* Every consumed offset ends as exactly one of accepted / duplicate /
  near_duplicate / rejected(reason) / dead_lettered(reason), counted once in
  Redis, in the same Lua call that stores the documents and the partition's
  next offset. Redelivered offsets are recognised there and not counted again.
* Offsets are committed to Kafka only after Redis acknowledged the batch and
  the dead-letter producer acknowledged its records.
* No hole: a batch that starts above its partition's stored next offset (Redis
  lost accounted batches whose Kafka offsets were committed) is refused before
  anything is sent, and the partition is re-read from the stored offset; a hole
  met again right after that re-read is Kafka's own (compaction, transaction
  markers, retention): accepted and counted.
* Back-pressure: at the buffer cap, or while Redis is unreachable, all
  assigned partitions are paused; at most one batch is held in memory.
* SIGTERM (the `stop` event) lets the current batch finish and commit.
* No message stops ingest (docs/ingest.md "No message stops ingest"): an
  exception while parsing, filtering or hashing one message dead-letters that
  message (`internal_error`); a record batch that cannot be decoded is skipped
  offset by offset and dead-lettered by reference (`corrupt_batch`); a message
  the process died on twice is dead-lettered unprocessed (`crash_loop`). Only
  Redis and the broker failing pause ingest.
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import redis
from kafka.errors import CorruptRecordError, KafkaError, MessageSizeTooLargeError, UnsupportedCodecError
from kafka.structs import OffsetAndMetadata

from connectors.kafka import (
    ConsumerRebalanceListener,
    KafkaConnection,
    KafkaConsumer,
    KafkaProducer,
    TopicPartition,
    consumer_lag,
    dead_letter_headers,
    dead_letter_value,
    make_consumer,
    make_dead_letter_producer,
    stuck_partition,
)
from connectors.redis_store import BatchItem, BatchResult, OffsetGap, RedisStore
from daemon import failpoints
from daemon import metrics as M
from daemon.echo_lookup import EchoHashingError, find_echoes
from policies.collapse import ECHO
from policies.config import Policy
from policies.dedup import DocumentKeys, content_key, document_keys
from policies.document import Document, Malformed, parse_message
from policies.echo_containment import completion_keys
from policies.provenance import Provenance, classify, source_rejection
from policies.quality import build_filters, judge
from policies.round_policy import estimate_tokens

log = logging.getLogger("cptd.ingest")

# A dead letter the broker refuses as too large even after truncation to ingest.max_message_bytes (the
# dead-letter topic accepts less than documented) is sent once more with only this much of the original.
_DEAD_LETTER_FALLBACK_BYTES = 1000

T = TypeVar("T")
Key = tuple[str, int, int]  # (topic, partition, offset)
Dead = tuple[Any, str, str, str, list[tuple[str, bytes]]]  # message, outcome, reason, detail, extra headers


@dataclass(frozen=True)
class OffsetRef:
    """An offset whose record could not be decoded: dead-lettered by reference (headers only, no value)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    value: bytes | None = None


def _key(m: Any) -> Key:
    return (m.topic, m.partition, m.offset)


def guard_plan(
    first: dict[tuple[str, int], int], stored: dict[tuple[str, int], int], markers: dict[tuple[str, int], dict[str, Any]], owner: str
) -> dict[tuple[str, int], tuple[str, dict[str, Any]]]:
    """The crash-loop guard's decision for each partition of a batch: ("batch" | "single" | "poison", marker to write).

    `first` is each partition's first unaccounted offset in the batch; `markers` what earlier batches wrote
    before processing. A marker whose range is still unaccounted and whose owner is another process means
    that process died with those offsets in flight. From then on the partition goes one message at a time
    up to the end of that range (`suspect_end`), counting deaths per offset (`prior`); an offset that was in
    flight at two deaths is "poison": dead-lettered without being processed, so the next death cannot come.
    """
    plan: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}
    for topic_partition, f in first.items():
        m = markers.get(topic_partition)
        suspect_end = m.get("suspect_end", -1) if m else -1
        died = bool(m and m["owner"] != owner and stored.get(topic_partition, -1) <= m["end"] and m["start"] <= f <= m["end"])
        if m and died:
            suspect_end = max(suspect_end, m["end"])
            deaths = m["prior"] + 1 if f == m["start"] else 1
        elif m and m["start"] == f == m["end"]:
            deaths = m["prior"]  # this process retrying its own single message (Redis was down)
        else:
            deaths = 0
        if f <= suspect_end:
            deaths = max(deaths, 1)  # it was in flight in the batch that died
            mode = "poison" if deaths >= 2 else "single"
            plan[topic_partition] = (mode, {"owner": owner, "start": f, "end": f, "prior": deaths, "suspect_end": suspect_end})
        else:
            plan[topic_partition] = ("batch", {"owner": owner, "start": f, "end": f, "prior": 0, "suspect_end": -1})
    return plan


def first_offsets(msgs: list[Any]) -> dict[tuple[str, int], int]:
    """The lowest offset of `msgs` in each partition."""
    first: dict[tuple[str, int], int] = {}
    for m in msgs:
        topic_partition = (m.topic, m.partition)
        first[topic_partition] = min(first.get(topic_partition, m.offset), m.offset)
    return first


def offset_gaps(msgs: list[Any], stored: dict[tuple[str, int], int]) -> dict[tuple[str, int], tuple[int, int]]:
    """Partitions whose first message (of those not yet accounted) lies above the stored next offset: (stored, first).

    A partition with no stored offset has nothing to compare with (its first batch, or a Redis that lost every
    offset: daemon/redis_loss.py's case)."""
    return {tp: (stored[tp], f) for tp, f in first_offsets(msgs).items() if tp in stored and f > stored[tp]}


_LIBC: ctypes.CDLL | None = None


def release_freed_memory() -> bool:
    """Give freed heap pages back to the OS (glibc malloc_trim), after a batch that held large messages.

    glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed, after which
    multi-megabyte messages are carved from the heap and the heap stays at its high-water mark: 100 oversize
    5 MB messages grew RSS by 140 MB (tests/test_ingest.py, 16 MiB fetches). Trimming after such a batch
    keeps RSS flat and costs nothing on ordinary batches; fixing the mmap threshold once instead (mallopt)
    did too, but made every fetch buffer an mmap/munmap pair and cost ~15% of end-to-end throughput.
    Returns False where there is no glibc (musl, macOS): nothing to do there.
    """
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        return bool(_LIBC.malloc_trim(0))
    except (OSError, AttributeError):
        return False


LARGE_MESSAGE_BYTES = 1 << 20  # a batch holding a message this large is followed by release_freed_memory()


@dataclass
class IngestState:
    """What /status shows about this process's ingest loop."""

    paused_cause: str | None = None  # buffer_full | redis_down | operator
    assigned: list[str] = field(default_factory=list)
    batches: int = 0
    last_commit: float | None = None
    last_error: str | None = None
    broker_error: str | None = None  # set while the broker fails with retriable errors; cleared by the next good poll


class _Rebalance(ConsumerRebalanceListener):
    """On assignment, start each partition where Redis says accounting stopped (never before Kafka's commit)."""

    def __init__(self, ingestor: Ingestor):
        self.ing = ingestor

    def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        self.ing.state.assigned = []
        for topic_partition in revoked:  # its next owner seeks it to the stored offset, and so do we if it comes back
            self.ing._sought.pop((topic_partition.topic, topic_partition.partition), None)
        log.info(
            "partitions revoked",
            extra={"partitions": [f"{topic_partition.topic}/{topic_partition.partition}" for topic_partition in revoked]},
        )

    def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        self.ing.on_assigned(assigned)


class Ingestor:
    def __init__(
        self,
        policy: Policy,
        bootstrap: KafkaConnection | str,
        store: RedisStore,
        client_id: str = "cptd-ingest",
        broker_retry_max_s: float = 30.0,
    ):
        self.store = store
        self.broker_retry_max_s = broker_retry_max_s
        self._broker_delay = 0.0
        self._use_policy(policy)
        self.consumer: KafkaConsumer = make_consumer(bootstrap, policy.ingest, client_id)
        try:
            self.producer: KafkaProducer = make_dead_letter_producer(bootstrap, policy.ingest.max_message_bytes, client_id + "-dlq")
        except BaseException:
            self.consumer.close()  # the caller retries: leave no client (and IO thread) behind
            raise
        self.state = IngestState()
        self.operator_paused = False  # the operator's pause as last read from Redis (any daemon may set it)
        self.owner = uuid.uuid4().hex  # names this process in the crash-loop guard's in-flight markers
        self._next_policy: Policy | None = None
        self._last_lag = 0.0
        self._echo_index_seen: bool | None = None  # whether an echo index exists (re-read every 5 s)
        # partition -> the stored offset it was last sought to and not yet written from: a hole met there is Kafka's
        self._sought: dict[tuple[str, int], int] = {}

    # --- control -------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """Takes effect at the next batch boundary (topics and group changes need a restart)."""
        self._next_policy = policy

    def _use_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.filters = build_filters(policy.quality)
        self.echo_topics = frozenset(policy.collapse.echo_topics)
        M.BUFFER_CAP_DOCS.set(policy.buffer.max_docs)
        M.BUFFER_CAP_BYTES.set(policy.buffer.max_bytes)

    def _apply_policy(self) -> None:
        if self._next_policy is not None:
            policy, self._next_policy = self._next_policy, None
            self._use_policy(policy)

    def on_assigned(self, assigned: Collection[TopicPartition]) -> None:
        stored = self._try(self.store.stored_offsets, "stored_offsets") or {}
        for topic_partition in assigned:
            off = stored.get((topic_partition.topic, topic_partition.partition))
            if off is not None:
                self.consumer.seek(topic_partition, off)
                self._sought[(topic_partition.topic, topic_partition.partition)] = off
        if self.state.paused_cause:
            self.consumer.pause(*assigned)
        self.state.assigned = sorted(
            f"{topic_partition.topic}/{topic_partition.partition}" for topic_partition in self.consumer.assignment()
        )
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

    def _try(self, fn: Callable[..., T], op: str, *a: object) -> T | None:
        try:
            return fn(*a)
        except redis.RedisError as e:
            M.REDIS_ERRORS.labels(op).inc()
            self.state.last_error = f"redis {op}: {e}"
            return None

    # --- the loop -------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.consumer.subscribe([*self.policy.ingest.topics, *self.policy.collapse.echo_topics], listener=_Rebalance(self))
        try:
            while not stop.is_set():
                self._apply_policy()
                if self._should_pause():
                    self._hold(self._poll_alive(stop, timeout_ms=500))
                    self._report_gauges()  # lag keeps growing while paused: that is what operators watch
                    continue
                polled = self._poll(stop)
                msgs = [m for recs in polled.values() for m in recs]
                if msgs:
                    self._process_all(msgs, stop)
                    large = any(len(m.value or b"") >= LARGE_MESSAGE_BYTES for m in msgs)
                    del polled, msgs
                    if large:
                        release_freed_memory()
                self._report_gauges()
        finally:
            self.close()

    def _should_pause(self) -> bool:
        """Decide the pause state from the operator flag and the buffer; returns True while paused."""
        if self._operator_pause():
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

    def _operator_pause(self) -> bool:
        """POST /ingest/pause to any daemon sets a Redis key that every daemon reads here, at its batch boundary, so the
        pause holds for every replica and across restarts. While Redis cannot be read, the last answer stands."""
        paused = self._try(self.store.ingest_paused, "ingest_paused")
        if paused is not None:
            self.operator_paused = paused
        return self.operator_paused

    def _hold(self, polled: dict[TopicPartition, list[Any]]) -> None:
        """Records can still arrive while paused (a rebalance hands us a fresh partition): rewind, don't drop."""
        for topic_partition, recs in polled.items():
            if recs:
                self.consumer.seek(topic_partition, recs[0].offset)
        if polled:
            self.consumer.pause(*self.consumer.assignment())

    def _poll(self, stop: threading.Event) -> dict[TopicPartition, list[Any]]:
        """poll(), except that a record batch that cannot be decoded is skipped instead of raised forever.

        kafka-python raises the decode error from every poll while the position stays on the batch. The
        offset at the position is dead-lettered by reference (`corrupt_batch`), counted like any message,
        and the position moves one past it; a batch of N records is so skipped in N polls, each offset
        accounted exactly once. Retriable Kafka errors (the broker down) are waited out (`_poll_alive`);
        other Kafka errors (authorization, a misconfigured group) propagate and stop the daemon.
        """
        try:
            return self._poll_alive(stop, timeout_ms=self.policy.ingest.batch_max_wait_ms, max_records=self.policy.ingest.batch_max_docs)
        except Exception as e:
            if isinstance(e, KafkaError) and not isinstance(e, (CorruptRecordError, UnsupportedCodecError)):
                raise
            topic_partition = stuck_partition(self.consumer)
            if topic_partition is None:
                raise
            offset = self.consumer.position(topic_partition)
            detail = f"{type(e).__name__}: {e}"
            log.error(
                "undecodable record batch; dead-lettering offset by reference",
                extra={"topic_partition": f"{topic_partition.topic}/{topic_partition.partition}", "offset": offset, "error": detail},
            )
            M.INGEST_CORRUPT_RECORDS.labels(topic_partition.topic, str(topic_partition.partition)).inc()
            ref = OffsetRef(topic_partition.topic, topic_partition.partition, offset)
            try:
                if self._process_until_done([ref], stop, {_key(ref): ("corrupt_batch", detail)}, {}):
                    self.consumer.seek(topic_partition, offset + 1)
            except OffsetGap as gap:
                self._reread(gap, [])
            return {}

    def _poll_alive(self, stop: threading.Event, **kw: Any) -> dict[TopicPartition, list[Any]]:
        """consumer.poll(), with a broker restart waited out instead of raised.

        kafka-python raises KafkaConnectionError (from the coordinator lookup) while the broker is restarting; that
        error used to end Ingestor.run and with it the whole daemon, a running round's job included, on every broker
        restart. A retriable error now returns no records after a back-off (0.5 s doubling to broker_retry_max_s):
        the position has not moved, the batch held by the caller stays held, and the next good poll clears the error.
        """
        try:
            polled = self.consumer.poll(**kw)
        except KafkaError as e:
            if not e.retriable:
                raise
            self._broker_delay = min(max(self._broker_delay * 2, 0.5), self.broker_retry_max_s)
            self.state.broker_error = self.state.last_error = f"kafka: {type(e).__name__}: {e}"
            M.KAFKA_ERRORS.labels("poll").inc()
            log.warning("kafka broker unavailable; retrying", extra={"error": self.state.broker_error, "retry_in_s": self._broker_delay})
            stop.wait(self._broker_delay)
            return {}
        if self.state.broker_error is not None:
            log.info("kafka broker back", extra={"after": self.state.broker_error})
            self.state.broker_error = None
        self._broker_delay = 0.0
        return polled

    def _process_all(self, msgs: list[Any], stop: threading.Event) -> None:
        """Process a polled batch in chunks the crash-loop guard allows (normally the whole batch at once)."""
        pending = msgs
        while pending:
            chunk, forced, markers = self._next_chunk(pending)
            try:
                if not self._process_until_done(chunk, stop, forced, markers):
                    return
            except OffsetGap as gap:
                self._reread(gap, pending)
                return
            done = {_key(m) for m in chunk}
            pending = [m for m in pending if _key(m) not in done]

    def _next_chunk(self, msgs: list[Any]) -> tuple[list[Any], dict[Key, tuple[str, str]], dict[tuple[str, int], dict[str, Any]]]:
        """Which messages to process now, which to dead-letter unprocessed, and the in-flight markers to write."""
        state = self._try(self.store.guard_state, "guard_state")
        if state is None:
            return msgs, {}, {}  # Redis is down: process() fails and is retried; the guard decides next batch
        stored, markers = state
        by_partition: dict[tuple[str, int], list[Any]] = {}
        for m in sorted(msgs, key=_key):
            if m.offset >= stored.get((m.topic, m.partition), -1):
                by_partition.setdefault((m.topic, m.partition), []).append(m)
        if not by_partition:
            return msgs, {}, {}
        plan = guard_plan({topic_partition: ms[0].offset for topic_partition, ms in by_partition.items()}, stored, markers, self.owner)
        chunk: list[Any] = []
        forced: dict[Key, tuple[str, str]] = {}
        out_markers: dict[tuple[str, int], dict[str, Any]] = {}
        for topic_partition, ms in by_partition.items():
            mode, marker = plan[topic_partition]
            if mode == "batch":
                marker["end"] = ms[-1].offset
                chunk += ms
            else:
                chunk.append(ms[0])
                if mode == "poison":
                    forced[_key(ms[0])] = ("crash_loop", f"the process died {marker['prior']} times with this offset in flight")
                    log.error(
                        "dead-lettering a message the process died on twice",
                        extra={"topic_partition": f"{topic_partition[0]}/{topic_partition[1]}", "offset": ms[0].offset},
                    )
                else:
                    log.warning(
                        "crash-loop guard: one message at a time",
                        extra={"topic_partition": f"{topic_partition[0]}/{topic_partition[1]}", "offset": ms[0].offset},
                    )
            out_markers[topic_partition] = marker
        return chunk, forced, out_markers

    def _process_until_done(
        self, msgs: list[Any], stop: threading.Event, forced: dict[Key, tuple[str, str]], markers: dict[tuple[str, int], dict[str, Any]]
    ) -> bool:
        """Write the batch; while Redis or the dead-letter topic fail, hold it, keep the group alive, retry with back-off.

        Returns False when stopped with the batch unwritten (it will be redelivered).
        """
        delay = 0.2
        while True:
            try:
                result = self.process(msgs, forced, markers)
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
                    return False
                self._hold(self._poll_alive(stop, timeout_ms=0))
                delay = min(delay * 2, self.policy.ingest.redis_retry_max_s)
        if self.state.paused_cause == "redis_down":
            self._set_paused(None)
        self._commit(msgs)
        self._export_buffer(result.buffer_docs, result.buffer_bytes)
        b = self.policy.buffer
        if result.buffer_docs >= b.max_docs or result.buffer_bytes >= b.max_bytes:
            self._set_paused("buffer_full")
        return True

    def _reread(self, gap: OffsetGap, pending: list[Any]) -> None:
        """A batch refused for a hole before it: seek each such partition back to its stored offset (Kafka still has the
        messages Redis lost) and the other partitions of the polled batch to their first unwritten message."""
        starts = first_offsets(pending)
        for topic_partition, (stored, first) in gap.gaps.items():
            starts[topic_partition] = stored
            self._sought[topic_partition] = stored
            log.error(
                "offset gap: Redis lost accounted batches; re-reading the partition from its stored offset",
                extra={"topic_partition": f"{topic_partition[0]}/{topic_partition[1]}", "stored": stored, "batch_first": first},
            )
        M.INGEST_OFFSET_GAPS.labels("refused").inc(len(gap.gaps))
        for (topic, partition), off in starts.items():
            self.consumer.seek(TopicPartition(topic, partition), off)

    def _commit(self, msgs: list[Any]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for m in msgs:
            topic_partition = TopicPartition(m.topic, m.partition)
            offsets[topic_partition] = max(offsets.get(topic_partition, -1), m.offset + 1)
        try:
            self.consumer.commit({topic_partition: OffsetAndMetadata(o, "", -1) for topic_partition, o in offsets.items()})
        except Exception as e:  # noqa: BLE001 - Redis holds the truth; a failed commit only means redelivery
            log.warning("offset commit failed; redelivered messages will be skipped by the stored offsets", extra={"error": str(e)})
            return
        self.state.batches += 1
        self.state.last_commit = time.time()
        M.INGEST_BATCHES.inc()
        M.INGEST_LAST_COMMIT.set(self.state.last_commit)

    def process(
        self,
        msgs: list[Any],
        forced: dict[Key, tuple[str, str]] | None = None,
        markers: dict[tuple[str, int], dict[str, Any]] | None = None,
    ) -> BatchResult:
        """Classify one batch, send dead letters, write it to Redis; returns Redis's verdicts.

        `forced` maps offsets to a (reason, detail) they are dead-lettered with unprocessed (crash_loop,
        corrupt_batch); `markers` are written to Redis before anything is processed (crash-loop guard).
        Only Redis and dead-letter delivery errors propagate (the caller retries); an exception from one
        message's own processing dead-letters that message as internal_error.
        """
        t0 = time.perf_counter()
        forced = forced or {}
        if markers:
            self.store.set_inflight(markers)
        stored = self.store.stored_offsets()
        msgs = [m for m in msgs if m.offset >= stored.get((m.topic, m.partition), -1)]
        gaps = offset_gaps(msgs, stored)
        kafka_holes = {tp: at for tp, (at, _) in gaps.items() if self._sought.get(tp) == at}
        if len(kafka_holes) < len(gaps):  # refused before any dead letter is sent: the re-read sends them once
            raise OffsetGap({tp: g for tp, g in gaps.items() if tp not in kafka_holes})
        policy = self.policy
        items: list[BatchItem] = []
        dead: list[Dead] = []
        parsed_ok: list[tuple[Any, Document]] = []  # well-formed documents from the document topics
        completions: list[tuple[Any, str]] = []  # served-model outputs from collapse.echo_topics: message, text
        for m in msgs:
            if _key(m) in forced:
                reason, detail = forced[_key(m)]
                dead.append((m, "dead_lettered", reason, detail, []))
                continue
            try:
                failpoints.hit("ingest.message", m.value)
                parsed = parse_message(m.value, policy.ingest.max_message_bytes)
            except Exception as e:  # noqa: BLE001 - one message's failure must not stop ingest
                dead.append(self._internal_error(m, "parse", e))
                continue
            if isinstance(parsed, Malformed):
                dead.append((m, "dead_lettered", parsed.reason, parsed.detail, []))
            elif m.topic in self.echo_topics:
                completions.append((m, parsed.text))
            else:
                parsed_ok.append((m, parsed))
        indexed = self._index_completions(completions, dead)
        items += indexed
        # Echoes are found before the quality rules: whether a text repeats the model is the more specific verdict.
        echoes = self._echo_hits([d.text for _, d in parsed_ok], indexed)
        candidates: list[tuple[Any, Document, str, str | None, Provenance, str | None]] = []  # ..., language, provenance, echo_of
        for (m, parsed), echo_of in zip(parsed_ok, echoes, strict=True):
            try:
                refused = source_rejection(parsed.source, policy.provenance)
                if refused is None and echo_of is not None:
                    M.INGEST_ECHOES.labels(policy.collapse.echo_action).inc()
                    if policy.collapse.echo_action == "dead_letter":
                        refused = ECHO
                if refused is not None:
                    if policy.ingest.dead_letter_filtered:
                        detail = f"near-duplicates completion {echo_of}" if refused == ECHO else f"source {parsed.source!r}"
                        dead.append((m, "rejected", refused, detail, []))
                    items.append(BatchItem(m.topic, m.partition, m.offset, "rejected", refused, echo=echo_of is not None))
                    continue
                verdict = judge(parsed.text, self.filters, lang=parsed.lang)  # used when the policy trusts `lang`
                if not verdict.accepted:
                    if policy.ingest.dead_letter_filtered:
                        dead.append((m, "rejected", verdict.reason or "rejected", "", []))
                    reason = verdict.reason or "rejected"
                    items.append(BatchItem(m.topic, m.partition, m.offset, "rejected", reason, echo=echo_of is not None))
                    continue
                text = verdict.text or parsed.text  # the C4-cleaned text when the C4 rules ran
                prov = classify(text, parsed.source, parsed.meta, policy.provenance)
                if echo_of is not None:
                    prov = replace(prov, cls="synthetic", rule=ECHO)
            except Exception as e:  # noqa: BLE001 - one message's failure must not stop ingest
                dead.append(self._internal_error(m, "filter", e))
                continue
            candidates.append((m, parsed, text, verdict.language, prov, echo_of))
        now = time.time()
        keys = self._dedup_keys([c[2] for c in candidates])
        for (m, d, text, language, prov, echo_of), dk in zip(candidates, keys, strict=True):
            try:
                if isinstance(dk, Exception):
                    raise dk
                key, bk = dk.content_key, dk.band_keys
                blob = text.encode("utf-8")
                nbytes = len(blob)
                doc = {
                    "text": text,
                    "id": d.id,
                    "source": d.source,
                    "lang": d.lang,
                    "language": language,  # as the language rule saw it (detected, or the trusted `lang`)
                    "ts": d.ts,
                    "meta": d.meta,
                    **prov.to_record(),
                    "echo_of": echo_of,
                    "bytes": nbytes,
                    "bands": list(bk),
                    "topic": m.topic,
                    "partition": m.partition,
                    "offset": m.offset,
                    "ingested_at": now,
                }
                record = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            except Exception as e:  # noqa: BLE001 - one message's failure must not stop ingest
                dead.append(self._internal_error(m, "dedup/record", e))
                continue
            item = BatchItem(m.topic, m.partition, m.offset, "candidate", "", key, nbytes, tuple(bk), record, prov.cls, echo_of is not None)
            items.append(item)
        self._send_dead_letters(dead)
        for m, outcome, reason, _, _ in dead:
            if outcome == "dead_lettered":
                items.append(BatchItem(m.topic, m.partition, m.offset, "dead_lettered", reason))
        items.sort(key=lambda i: (i.topic, i.partition, i.offset))
        result = self.store.write_batch(items, policy.dedup.max_exact_keys, policy.collapse.echo_max_docs, kafka_holes)
        for topic_partition in {(i.topic, i.partition) for i in items}:
            self._sought.pop(topic_partition, None)
        for topic_partition, (at, first) in gaps.items():
            M.INGEST_OFFSET_GAPS.labels("accepted").inc()
            log.warning(
                "offset gap accepted: Kafka has no records there (compaction, transaction markers or retention)",
                extra={"topic_partition": f"{topic_partition[0]}/{topic_partition[1]}", "stored": at, "first": first},
            )
        for item, outcome, reason in zip(items, result.outcomes, result.reasons, strict=False):
            if outcome != "skipped":
                M.INGEST_DOCS.labels(outcome, reason).inc()
            if outcome == "accepted" and item.provenance:
                M.INGEST_PROVENANCE.labels(item.provenance).inc()
        M.INGEST_BATCH_SECONDS.observe(time.perf_counter() - t0)
        return result

    def _index_completions(self, completions: list[tuple[Any, str]], dead: list[Dead]) -> list[BatchItem]:
        """Served-model outputs become echo-index entries (outcome `indexed`: band keys and sampled shingle keys);
        one whose hashing raises is dead-lettered."""
        items = []
        for m, text in completions:
            try:
                keys = completion_keys([text], self.policy.collapse)[0]
                items.append(BatchItem(m.topic, m.partition, m.offset, "indexed", ECHO, content_key(text), 0, tuple(keys)))
            except Exception as e:  # noqa: BLE001 - one message's failure must not stop ingest
                dead.append(self._internal_error(m, "echo index", e))
        return items

    def _echo_hits(self, texts: list[str], indexed: list[BatchItem]) -> list[str | None]:
        """Per candidate text, the indexed completion it echoes (find_echoes), or None."""
        if self._echo_index_seen is None:
            counts = self._try(self.store.provenance_counts, "provenance_counts")
            self._echo_index_seen = bool(counts and counts["echo_index"])
        if not texts or (not self.echo_topics and not self._echo_index_seen):
            return [None] * len(texts)
        try:
            return find_echoes(self.store, texts, indexed, self.policy.collapse)
        except EchoHashingError as e:  # the echo check is advisory; the documents are not lost
            log.error("echo hashing failed; batch not checked for echoes", extra={"error": str(e)})
            return [None] * len(texts)

    def _dedup_keys(self, texts: list[str]) -> list[DocumentKeys | Exception]:
        """Dedup keys for the batch in one call; if that raises, one call per text, so only the failing text is lost."""
        if not texts:
            return []
        try:
            return list(document_keys(texts, self.policy.dedup))
        except Exception:  # noqa: BLE001 - find the one text that fails
            out: list[DocumentKeys | Exception] = []
            for t in texts:
                try:
                    out.append(document_keys([t], self.policy.dedup)[0])
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out

    @staticmethod
    def _internal_error(m: Any, stage: str, e: Exception) -> Dead:
        """A message whose own processing raised: dead-lettered with the exception's class, so it can be reproduced."""
        log.error(
            "message processing failed; dead-lettering it as internal_error",
            extra={"topic_partition": f"{m.topic}/{m.partition}", "offset": m.offset, "stage": stage, "error": f"{type(e).__name__}: {e}"},
            exc_info=True,
        )
        name = f"{type(e).__module__}.{type(e).__qualname__}"
        return (m, "dead_lettered", "internal_error", f"{stage}: {type(e).__name__}: {e}"[:1000], [("cptd-exception", name.encode())])

    def _send_dead_letters(self, dead: list[Dead]) -> None:
        """Produce and flush; an original larger than the topic accepts goes as a truncated copy (never a size error).

        Any other delivery failure raises KafkaDeliveryError: the batch is held and retried, nothing committed.
        """
        if not dead:
            return
        topic = self.policy.ingest.dead_letter_topic
        limit = self.policy.ingest.max_message_bytes
        sent = []
        for m, outcome, reason, detail, extra in dead:
            value, cut = dead_letter_value(m.value, limit)
            if value is None and m.key is None:
                value = b""  # kafka-python refuses a record with neither (a null message, an offset by reference)
            headers = dead_letter_headers(outcome, reason, detail, m.topic, m.partition, m.offset, [*extra, *cut])
            sent.append((m, headers, self.producer.send(topic, value=value, key=m.key, headers=headers)))
        self.producer.flush(timeout=30)
        retry = []
        for m, headers, f in sent:
            try:
                f.get(timeout=0)
            except MessageSizeTooLargeError:
                # The topic accepts less than ingest.max_message_bytes: keep a short prefix and say so.
                value, cut = dead_letter_value(m.value, _DEAD_LETTER_FALLBACK_BYTES)
                headers = [h for h in headers if h[0] not in ("cptd-truncated", "cptd-original-bytes", "cptd-original-sha256")] + cut
                retry.append(self.producer.send(topic, value=value, key=m.key, headers=headers))
            except Exception as e:  # noqa: BLE001 - any delivery failure means: do not commit this batch
                raise KafkaDeliveryError(f"dead-letter send to {topic} failed: {type(e).__name__}: {e}") from e
        if retry:
            self.producer.flush(timeout=30)
            for f in retry:
                try:
                    f.get(timeout=0)
                except Exception as e:  # noqa: BLE001
                    raise KafkaDeliveryError(f"dead-letter send to {topic} failed after truncation: {type(e).__name__}: {e}") from e

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
        counts = self._try(self.store.provenance_counts, "provenance_counts")
        if counts is not None:
            self._echo_index_seen = counts["echo_index"] > 0
            M.ECHO_INDEX_DOCS.set(counts["echo_index"])
        try:
            for topic_partition, lag in consumer_lag(self.consumer, self.consumer.assignment()).items():
                M.INGEST_LAG.labels(topic_partition.topic, str(topic_partition.partition)).set(lag)
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
