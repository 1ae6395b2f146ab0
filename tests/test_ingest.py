"""Ingest acceptance against a real broker and a real Redis: nothing lost, nothing counted twice."""

from __future__ import annotations

import signal
from collections import Counter

import httpx
import pytest
from kafka import KafkaConsumer

from connectors.redis_store import RedisStore
from daemon.dev.services import create_topics, redis_service, wait_for
from policies.config import load_policy
from tests.conftest import make_policy
from tests.streams import expected_counts, mixed_stream, produce


def counts(store: RedisStore) -> Counter:
    return Counter({k: v for k, v in store.counters().items()})


def wait_total(store: RedisStore, n: int, proc=None, timeout: float = 120) -> None:
    wait_for(
        lambda: sum(store.counters().values()) >= n, timeout, f"{n} messages accounted (have {sum(store.counters().values())})", 0.1, proc
    )
    assert sum(store.counters().values()) == n


def read_topic(bootstrap: str, topic: str, n: int, timeout: float = 60) -> list:
    c = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None, consumer_timeout_ms=1000
    )
    got: list = []
    wait_for(lambda: got.extend(m for recs in c.poll(500).values() for m in recs) or len(got) >= n, timeout, f"{n} records on {topic}")
    c.close()
    return got


@pytest.fixture
def setup(tmp_path, topics, bootstrap, redis_url):
    def make(partitions: int = 2, **overrides):
        create_topics(bootstrap, {topics["docs"]: partitions, topics["dlq"]: 1})
        overrides["ingest"] = {"max_message_bytes": 65536, **overrides.get("ingest", {})}
        policy_path = make_policy(tmp_path, topics, **overrides)
        policy = load_policy(policy_path)
        store = RedisStore.from_url(redis_url, policy.name)
        return policy_path, policy, store

    return make


def test_mixed_stream_exact_counts_dead_letters_and_buffer(setup, ingest_procs, redis_url, bootstrap, topics):
    policy_path, policy, store = setup()
    first, copies = mixed_stream(policy, n_good=200)
    proc = ingest_procs(policy_path, redis_url, bootstrap)
    produce(bootstrap, topics["docs"], [m.value for m in first])
    wait_total(store, len(first), proc.proc)
    produce(bootstrap, topics["docs"], [m.value for m in copies])
    wait_total(store, len(first) + len(copies), proc.proc)

    msgs = first + copies
    assert counts(store) == expected_counts(msgs)
    # The buffer holds exactly the accepted documents.
    assert set(store.buffer_keys()) == {m.key for m in msgs if m.outcome == "accepted"}
    assert store.buffer_stats()["buffer_docs"] == sum(m.outcome == "accepted" for m in msgs)
    # The dead-letter topic holds the originals of malformed and filtered messages, with reasons.
    dead = [m for m in msgs if m.outcome in ("dead_lettered", "rejected")]
    records = read_topic(bootstrap, topics["dlq"], len(dead))
    assert len(records) == len(dead)
    got = Counter((dict(r.headers)["cptd-outcome"].decode(), dict(r.headers)["cptd-reason"].decode(), r.value) for r in records)
    assert got == Counter((m.outcome, m.reason, m.value) for m in dead)
    for r in records:
        h = dict(r.headers)
        assert h["cptd-source-topic"].decode() == topics["docs"]
        assert int(h["cptd-source-offset"]) >= 0
    # `cptd status` shows the same totals.
    st = proc.status()
    assert st["counts"]["total"] == len(msgs)
    assert st["counts"]["by_outcome"]["accepted"] == sum(m.outcome == "accepted" for m in msgs)


def test_sigkill_midstream_loses_nothing_and_counts_nothing_twice(setup, ingest_procs, redis_url, bootstrap, topics):
    policy_path, policy, store = setup(partitions=3, ingest={"batch_max_docs": 20})
    first, _ = mixed_stream(policy, n_good=300, seed=3)
    produce(bootstrap, topics["docs"], [m.value for m in first])
    proc = ingest_procs(policy_path, redis_url, bootstrap)
    wait_for(lambda: sum(store.counters().values()) >= len(first) // 4, 120, "a quarter of the stream accounted", 0.02, proc.proc)
    proc.kill(signal.SIGKILL)
    done_at_kill = sum(store.counters().values())
    assert done_at_kill < len(first), "the kill must land mid-stream"
    proc2 = ingest_procs(policy_path, redis_url, bootstrap)
    wait_total(store, len(first), proc2.proc)
    assert counts(store) == expected_counts(first)
    assert set(store.buffer_keys()) == {m.key for m in first if m.outcome == "accepted"}


def test_redis_restart_midstream_pauses_and_resumes(setup, ingest_procs, redis_server, redis_url, bootstrap, topics, tmp_path):
    policy_path, policy, store = setup(ingest={"batch_max_docs": 20})
    first, _ = mixed_stream(policy, n_good=300, seed=5)
    produce(bootstrap, topics["docs"], [m.value for m in first])
    proc = ingest_procs(policy_path, redis_url, bootstrap)
    wait_for(lambda: sum(store.counters().values()) >= len(first) // 4, 120, "a quarter of the stream accounted", 0.02, proc.proc)
    redis_server.kill(signal.SIGKILL)  # AOF with fsync always: nothing acknowledged is lost
    wait_for(lambda: proc.status()["ingest"]["paused"] == "redis_down", 60, "ingest to pause on Redis loss", 0.1, proc.proc)
    restarted = redis_service(tmp_path / "redis", port=redis_server.port).start()
    try:
        wait_total(store, len(first), proc.proc)
        assert counts(store) == expected_counts(first)
        assert set(store.buffer_keys()) == {m.key for m in first if m.outcome == "accepted"}
        wait_for(lambda: proc.status()["ingest"]["paused"] is None, 30, "ingest to resume", 0.1, proc.proc)
    finally:
        restarted.kill()


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _lag(proc) -> int:
    text = httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=5).text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith("cptd_ingest_consumer_lag{"))


def test_buffer_cap_pauses_consumption_and_resumes_when_drained(setup, ingest_procs, redis_url, bootstrap, topics):
    cap = 60
    policy_path, policy, store = setup(ingest={"batch_max_docs": 10}, buffer={"max_docs": cap, "resume_fraction": 0.5})
    first, _ = mixed_stream(policy, n_good=300, seed=7)
    goods = [m for m in first if m.outcome == "accepted"]
    proc = ingest_procs(policy_path, redis_url, bootstrap)
    produce(bootstrap, topics["docs"], [m.value for m in goods[:150]])
    wait_for(lambda: proc.status()["ingest"]["paused"] == "buffer_full", 120, "pause at the buffer cap", 0.1, proc.proc)
    held = sum(store.counters().values())
    assert cap <= store.buffer_stats()["buffer_docs"] < cap + 10  # overshoot at most one batch
    rss_paused = _rss_kb(proc.proc.pid)
    produce(bootstrap, topics["docs"], [m.value for m in goods[150:]])
    # Everything produced after the pause waits in Kafka (tansu's end offsets can trail by a few records,
    # so the bound is the second wave alone, not the exact remainder).
    wait_for(lambda: _lag(proc) >= len(goods) - 150, 60, "consumer lag to show the waiting messages", 0.5, proc.proc)
    assert sum(store.counters().values()) == held  # nothing consumed while paused
    assert _rss_kb(proc.proc.pid) < rss_paused + 20_000  # memory flat (< 20 MB growth) while lag grows

    # Drain the buffer the way a round snapshot would; ingest resumes on its own.
    drained = 0
    while drained < len(goods):
        keys = store.buffer_keys()
        drained += store.remove_docs(keys)
        if sum(store.counters().values()) >= len(goods):
            break
        wait_for(
            lambda: store.buffer_stats()["buffer_docs"] > 0 or sum(store.counters().values()) >= len(goods),
            60,
            "more documents",
            0.1,
            proc.proc,
        )
    wait_total(store, len(goods), proc.proc)
    assert counts(store)[("accepted", "")] == len(goods)


def test_two_processes_split_partitions_and_totals_add_up(setup, ingest_procs, redis_url, bootstrap, topics):
    policy_path, policy, store = setup(partitions=4, ingest={"batch_max_docs": 20})
    first, _ = mixed_stream(policy, n_good=300, seed=9)
    a = ingest_procs(policy_path, redis_url, bootstrap)
    b = ingest_procs(policy_path, redis_url, bootstrap)
    wait_for(
        lambda: (
            a.status()["ingest"]["assigned"]
            and b.status()["ingest"]["assigned"]
            and len(a.status()["ingest"]["assigned"]) + len(b.status()["ingest"]["assigned"]) == 4
        ),
        90,
        "both members to own partitions",
        0.2,
    )
    pa, pb = set(a.status()["ingest"]["assigned"]), set(b.status()["ingest"]["assigned"])
    assert pa and pb and not (pa & pb)
    produce(bootstrap, topics["docs"], [m.value for m in first], partitions=4)
    wait_total(store, len(first))
    assert counts(store) == expected_counts(first)
    assert a.status()["ingest"]["batches"] > 0 and b.status()["ingest"]["batches"] > 0
    assert a.kill(signal.SIGTERM) == 0 and b.kill(signal.SIGTERM) == 0  # graceful stop exits 0
