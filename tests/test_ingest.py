"""Ingest acceptance against a real broker and a real Redis: nothing lost, nothing counted twice."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis as redis_lib
from kafka import KafkaConsumer, KafkaProducer

from connectors.redis_store import RedisStore
from daemon import metrics as M
from daemon.dev.process_control import TcpProxy
from daemon.dev.services import create_topics, free_port, kafka_service, redis_service, wait_for
from daemon.ingest import Ingestor
from policies.config import Policy, load_policy
from tests.conftest import make_policy
from tests.streams import expected_counts, good_docs, mixed_stream, produce


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
    limit = policy.ingest.max_message_bytes  # an oversize original travels as its first `limit` bytes (issue 13)
    assert got == Counter((m.outcome, m.reason, m.value[:limit]) for m in dead)
    for r in records:
        h = dict(r.headers)
        assert h["cptd-source-topic"].decode() == topics["docs"]
        assert int(h["cptd-source-offset"]) >= 0
    # `cptd status` shows the same totals.
    status = proc.status()
    assert status["counts"]["total"] == len(msgs)
    assert status["counts"]["by_outcome"]["accepted"] == sum(m.outcome == "accepted" for m in msgs)


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


# --- issue 13: no message can stop ingest ---------------------------------------------------------------------------


def produce_compressed(bootstrap: str, topic: str, values: list[bytes], codec: str) -> None:
    """One kafka-python producer with compression_type=codec; linger lets the values share compressed batches."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, linger_ms=50, batch_size=1_048_576)
    for v in values:
        p.send(topic, v)
    p.flush(timeout=60)
    p.close()


def produce_corrupt_lz4(bootstrap: str, topic: str, values: list[bytes], monkeypatch) -> None:
    """An lz4 batch whose compressed bytes are garbage under a valid CRC: what a buggy producer sends.

    kafka-python computes the CRC over whatever the codec returned, so replacing its lz4 encoder for one
    producer yields a batch the broker stores (tansu does not decompress) and every consumer fails to decode.
    """
    import kafka.record.default_records as records

    with monkeypatch.context() as m:
        m.setattr(records, "lz4_encode", lambda data: b"\x04\x22\x4d\x18 not an lz4 frame " + data[:16])
        produce_compressed(bootstrap, topic, values, "lz4")


def _metric(proc, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


def test_poison_messages_and_compressed_batches_never_stop_ingest(setup, ingest_procs, redis_url, bootstrap, topics, monkeypatch):
    limit = 262_144  # admits the 200 kB deep document, so the depth bound (not the size bound) refuses it
    policy_path, policy, store = setup(partitions=1, ingest={"batch_max_docs": 50, "max_message_bytes": limit})
    env = {"CPTD_FAILPOINTS": "ingest.message=error-if:CPTD-RAISE-HERE"}
    proc = ingest_procs(policy_path, redis_url, bootstrap, extra_env=env)
    goods = good_docs(130, policy, seed=13)
    deep = b'{"text": "a", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    oversize = b"word " * (6 * limit // 5)  # six times ingest.max_message_bytes
    raises = b"CPTD-RAISE-HERE: filtering this message raises"
    expected: Counter = Counter()

    produce(bootstrap, topics["docs"], [deep, oversize, raises])
    expected.update({("dead_lettered", "invalid_json"): 1, ("dead_lettered", "oversize"): 1, ("dead_lettered", "internal_error"): 1})
    for i, codec in enumerate(("snappy", "lz4", "zstd")):
        produce_compressed(bootstrap, topics["docs"], [t.encode() for t in goods[i * 30 : (i + 1) * 30]], codec)
    expected[("accepted", "")] += 90
    produce_corrupt_lz4(bootstrap, topics["docs"], [b"lost %d" % i for i in range(3)], monkeypatch)
    expected[("dead_lettered", "corrupt_batch")] += 3
    produce(bootstrap, topics["docs"], [t.encode() for t in goods[90:]])
    expected[("accepted", "")] += 40
    n = sum(expected.values())

    wait_total(store, n, proc.proc)
    assert proc.proc.poll() is None, "the daemon exited"
    assert counts(store) == expected
    assert store.stored_offsets() == {(topics["docs"], 0): n}  # every offset 0..n-1 accounted, none twice
    assert _metric(proc, "cptd_ingest_corrupt_records_total") == 3

    records = read_topic(bootstrap, topics["dlq"], 6)
    by_reason = {dict(r.headers)["cptd-reason"].decode(): r for r in records}
    assert len(records) == 6 and set(by_reason) == {"invalid_json", "oversize", "internal_error", "corrupt_batch"}
    assert "100001 levels deep" in dict(by_reason["invalid_json"].headers)["cptd-detail"].decode()
    big = by_reason["oversize"]
    h = dict(big.headers)
    assert big.value == oversize[:limit] and h["cptd-truncated"] == b"1"
    assert int(h["cptd-original-bytes"]) == len(oversize) and h["cptd-original-sha256"].decode() == hashlib.sha256(oversize).hexdigest()
    h = dict(by_reason["internal_error"].headers)
    assert h["cptd-exception"] == b"builtins.RuntimeError" and "failpoint ingest.message" in h["cptd-detail"].decode()
    refs = sorted(int(dict(r.headers)["cptd-source-offset"]) for r in records if dict(r.headers)["cptd-reason"] == b"corrupt_batch")
    assert refs == [93, 94, 95]  # after 3 poison + 90 compressed; by reference: no value
    assert all(not r.value for r in records if dict(r.headers)["cptd-reason"] == b"corrupt_batch")
    print(f"\npoison+codecs: {n} offsets accounted exactly, 0 daemon exits, {dict(sorted(counts(store).items()))}")


def test_a_message_that_kills_the_process_is_dead_lettered_after_two_deaths(setup, ingest_procs, redis_url, bootstrap, topics):
    policy_path, policy, store = setup(partitions=1, ingest={"batch_max_docs": 20})
    goods = [t.encode() for t in good_docs(40, policy, seed=17)]
    killer = b"CPTD-KILL-HERE: the process dies processing this message"
    produce(bootstrap, topics["docs"], goods[:12] + [killer] + goods[12:])
    env = {"CPTD_FAILPOINTS": "ingest.message=kill-if:CPTD-KILL-HERE"}
    exits = 0
    for _ in range(5):
        proc = ingest_procs(policy_path, redis_url, bootstrap, extra_env=env)
        try:
            wait_total(store, 41, proc.proc)
            break
        except RuntimeError:  # the watched process exited
            assert proc.proc.wait(timeout=10) == -signal.SIGKILL
            exits += 1
    assert exits == 2, f"expected exactly two deaths on the poison message, got {exits}"
    assert counts(store) == Counter({("accepted", ""): 40, ("dead_lettered", "crash_loop"): 1})
    assert store.stored_offsets() == {(topics["docs"], 0): 41}
    (rec,) = read_topic(bootstrap, topics["dlq"], 1)
    assert rec.value == killer and dict(rec.headers)["cptd-source-offset"] == b"12"


def _hwm_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_100_oversize_messages_of_5mb_keep_ingest_rss_flat(setup, ingest_procs, redis_url, bootstrap, topics):
    # The default ingest.fetch_max_bytes (4 MiB): what ingest holds is a few fetches' worth, and the heap pages of a
    # batch of large messages go back to the OS after it (daemon.ingest.release_freed_memory).
    policy_path, policy, store = setup(partitions=1, ingest={"batch_max_docs": 20})
    assert policy.ingest.fetch_max_bytes == 4 * 1_048_576
    proc = ingest_procs(policy_path, redis_url, bootstrap)
    warm = [t.encode() for t in good_docs(20, policy, seed=19)]
    produce(bootstrap, topics["docs"], warm)
    wait_total(store, 20, proc.proc)
    rss0 = _rss_kb(proc.proc.pid)
    with open(f"/proc/{proc.proc.pid}/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak below is this phase's
    t0 = time.monotonic()
    for i in range(10):  # 100 messages of 5 MB, distinct, sent 10 at a time to bound the test process too
        produce(bootstrap, topics["docs"], [(b"%03d " % (i * 10 + j)) * 1_250_000 for j in range(10)])
    wait_total(store, 120, proc.proc, timeout=300)
    peak = _hwm_kb(proc.proc.pid)
    growth_mb = (peak - rss0) / 1024
    print(
        f"\n100 x 5 MB oversize: RSS {rss0 / 1024:.0f} MB before, peak {peak / 1024:.0f} MB, growth {growth_mb:.0f} MB, "
        f"{time.monotonic() - t0:.0f} s"
    )
    assert counts(store)[("dead_lettered", "oversize")] == 100
    assert growth_mb < 100


def _namespace(r: redis_lib.Redis, name: str) -> dict[bytes, bytes]:
    """Every key of a deployment, DUMPed: what Redis had persisted at this moment."""
    return {k: r.dump(k) for k in r.scan_iter(match=f"cptd:{{{name}}}:*")}


def _lose_everything_after(r: redis_lib.Redis, name: str, persisted: dict[bytes, bytes]) -> None:
    """Put the deployment's keys back as they were: a Redis restart that lost what came after (appendfsync everysec)."""
    for k in r.scan_iter(match=f"cptd:{{{name}}}:*"):
        if k not in persisted:
            r.delete(k)
    for k, v in persisted.items():
        r.restore(k, 0, v, replace=True)


@contextmanager
def ingesting(policy: Policy, bootstrap: str, store: RedisStore) -> Iterator[None]:
    """The ingest loop in a thread of the test process (cheaper than `cptd run`), stopped and closed at the end."""
    ing = Ingestor(policy, bootstrap, store)
    stop = threading.Event()
    loop = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    loop.start()
    try:
        yield
    finally:
        stop.set()
        loop.join(timeout=30)


def _gaps(action: str) -> float:
    return M.REGISTRY.get_sample_value("cptd_ingest_offset_gaps_total", {"action": action}) or 0


def test_a_redis_that_lost_committed_batches_is_refilled_from_kafka_with_exact_counts(setup, bootstrap, topics):
    """Redis loses its last batches after Kafka committed their offsets, and the consumer goes on from its position:
    the next batch starts above the stored offset, is refused, and the partition is re-read from the stored offset."""
    _, policy, store = setup(partitions=1, ingest={"batch_max_docs": 10})
    docs = good_docs(30, policy, seed=11)
    refused_before = _gaps("refused")
    with ingesting(policy, bootstrap, store):
        produce(bootstrap, topics["docs"], [d.encode() for d in docs[:10]])
        wait_total(store, 10)
        persisted = _namespace(store.r, policy.name)
        produce(bootstrap, topics["docs"], [d.encode() for d in docs[10:20]])
        wait_total(store, 20)
        _lose_everything_after(store.r, policy.name, persisted)
        assert store.stored_offsets() == {(topics["docs"], 0): 10}
        produce(bootstrap, topics["docs"], [d.encode() for d in docs[20:]])
        wait_total(store, 30)
    assert counts(store) == Counter({("accepted", ""): 30})
    assert store.stored_offsets() == {(topics["docs"], 0): 30}
    assert len(store.buffer_keys()) == 30  # the lost batch's documents are back
    assert _gaps("refused") > refused_before
    assert b"offset_gaps" not in store.r.hgetall(store.k_stats)  # no hole was accepted: Kafka had every offset


def test_a_hole_kafka_itself_has_is_accepted_after_one_re_read_and_counted(setup, bootstrap, topics):
    """A transaction's commit marker takes an offset no consumer is given: the batch after it starts one above the stored
    offset. It is refused once, re-read from the stored offset, met again, and then accepted as Kafka's own hole."""
    _, policy, store = setup(partitions=1)
    docs = good_docs(8, policy, seed=12)
    refused_before, accepted_before = _gaps("refused"), _gaps("accepted")
    with ingesting(policy, bootstrap, store):
        tx = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topics['name']}", enable_idempotence=True)
        tx.init_transactions()
        tx.begin_transaction()
        for d in docs[:3]:
            tx.send(topics["docs"], d.encode())
        tx.commit_transaction()  # offsets 0-2, the commit marker at 3
        tx.close()
        wait_total(store, 3)
        produce(bootstrap, topics["docs"], [d.encode() for d in docs[3:]])  # offsets 4-8
        wait_total(store, 8)
    assert store.stored_offsets() == {(topics["docs"], 0): 9}
    stats = store.r.hgetall(store.k_stats)
    assert (int(stats[b"offset_gaps"]), int(stats[b"gap_offsets"])) == (1, 1)  # 8 counted + 1 offset in a hole = 0..8
    assert (_gaps("refused") - refused_before, _gaps("accepted") - accepted_before) == (1, 1)


def test_a_broker_restart_is_waited_out_without_ending_ingest_and_nothing_is_lost(tmp_path, redis_url):
    """Clients see a broker restart as every connection reset and the port refusing (the proxy in front of tansu
    stopped), then the same broker and log. kafka-python raises KafkaConnectionError from poll meanwhile; that used
    to end Ingestor.run, and with it `cptd run` and any running round. Now ingest waits and goes on, counting exactly."""
    kafka_port = free_port()
    proxy = TcpProxy(kafka_port).start()
    kafka = kafka_service(tmp_path / "kafka", port=kafka_port, advertised_port=proxy.port).start()
    try:
        boot = f"127.0.0.1:{proxy.port}"
        tag = uuid.uuid4().hex[:8]
        topics = {"docs": f"docs-{tag}", "dlq": f"dlq-{tag}", "group": f"group-{tag}", "name": f"t{tag}"}
        create_topics(boot, {topics["docs"]: 1, topics["dlq"]: 1})
        policy = load_policy(make_policy(tmp_path, topics, ingest={"max_message_bytes": 65536, "batch_max_docs": 10}))
        store = RedisStore.from_url(redis_url, policy.name)
        docs = good_docs(30, policy, seed=13)
        errors_before = M.REGISTRY.get_sample_value("cptd_kafka_errors_total", {"op": "poll"}) or 0
        ing = Ingestor(policy, boot, store, broker_retry_max_s=2)
        stop = threading.Event()
        loop = threading.Thread(target=ing.run, args=(stop,), daemon=True)
        loop.start()
        try:
            produce(boot, topics["docs"], [d.encode() for d in docs[:15]])
            wait_total(store, 15)
            proxy.stop()
            # kafka-python surfaces the reset either from poll (KafkaConnectionError: what used to end the loop; then
            # broker_error is set) or only inside its own threads, marking the group coordinator dead (seen under
            # load): either way ingest has met the broker down before it comes back.
            met = wait_for(
                lambda: ing.state.broker_error or ing.consumer._coordinator.coordinator_unknown() or not loop.is_alive(),
                120,
                "ingest to meet the broker down",
            )
            assert loop.is_alive(), "the ingest loop ended on a broker restart"
            raised = isinstance(met, str)
            if raised:
                assert "KafkaConnectionError" in met or "Timeout" in met, met
            proxy.start()
            produce(boot, topics["docs"], [d.encode() for d in docs[15:]])
            wait_total(store, 30)
            wait_for(lambda: ing.state.broker_error is None, 60, "the broker error cleared by a good poll")
            assert loop.is_alive()
        finally:
            stop.set()
            loop.join(timeout=30)
        assert counts(store) == Counter({("accepted", ""): 30})
        assert store.stored_offsets() == {(topics["docs"], 0): 30}
        if raised:  # poll raised: it was counted, and waited out rather than ending the loop
            assert (M.REGISTRY.get_sample_value("cptd_kafka_errors_total", {"op": "poll"}) or 0) > errors_before
    finally:
        proxy.stop()
        kafka.kill()
