"""The batch write against a real Redis: atomic accounting, idempotent redelivery, dedup, caps."""

from __future__ import annotations

import pytest

from connectors.redis_store import BatchItem, OffsetGap, RedisStore


def cand(off: int, key: str, bands=(), part: int = 0, nbytes: int = 10) -> BatchItem:
    return BatchItem("t", part, off, "candidate", "", key, nbytes, tuple(bands), {"text": key, "bytes": nbytes, "bands": list(bands)})


def test_outcomes_offsets_and_redelivery(redis_client):
    s = RedisStore(redis_client, "unit")
    batch = [
        cand(0, "k1", ["b1", "b2"]),
        cand(1, "k1"),  # exact duplicate within the batch
        cand(2, "k2", ["b2", "b3"]),  # shares a band with k1 -> near duplicate
        BatchItem("t", 0, 3, "rejected", "gopher_below_min_words"),
        BatchItem("t", 0, 4, "dead_lettered", "invalid_json"),
        cand(5, "k3", ["b4"]),
    ]
    r = s.write_batch(batch, max_exact_keys=1000)
    assert r.outcomes == ["accepted", "duplicate", "near_duplicate", "rejected", "dead_lettered", "accepted"]
    assert r.reasons == ["", "exact_match", "minhash_lsh", "gopher_below_min_words", "invalid_json", ""]
    assert (r.buffer_docs, r.buffer_bytes) == (2, 20)
    assert s.stored_offsets() == {("t", 0): 6}
    # Redelivery of the same offsets (crash before the Kafka commit) changes nothing.
    again = s.write_batch(batch, max_exact_keys=1000)
    assert again.outcomes == ["skipped"] * 6
    assert sum(s.counters().values()) == 6
    assert s.buffer_stats()["redelivered"] == 6
    # A partly redelivered batch: old offsets skipped, new ones counted.
    r3 = s.write_batch([cand(5, "k3"), cand(6, "k4")], max_exact_keys=1000)
    assert r3.outcomes == ["skipped", "accepted"]
    assert s.buffer_keys() == ["k1", "k3", "k4"]


def test_removed_documents_free_their_bands_but_stay_exact_duplicates(redis_client):
    s = RedisStore(redis_client, "unit2")
    s.write_batch([cand(0, "k1", ["b1"])], max_exact_keys=1000)
    assert s.remove_docs(["k1"]) == 1
    stats = s.buffer_stats()
    assert (stats["buffer_docs"], stats["buffer_bytes"], stats["lsh_keys"]) == (0, 0, 0)
    r = s.write_batch([cand(1, "k2", ["b1"]), cand(2, "k1", ["b9"])], max_exact_keys=1000)
    assert r.outcomes == ["accepted", "duplicate"]  # band free again; the exact key is remembered


def test_exact_memory_is_capped(redis_client):
    s = RedisStore(redis_client, "unit3")
    s.write_batch([cand(i, f"k{i}") for i in range(50)], max_exact_keys=20)
    assert s.buffer_stats()["exact_keys"] == 20
    s.remove_docs([f"k{i}" for i in range(50)])
    # The oldest keys were forgotten, the newest are still duplicates.
    r = s.write_batch([cand(50, "k0"), cand(51, "k49")], max_exact_keys=20)
    assert r.outcomes == ["accepted", "duplicate"]


def test_deployments_do_not_share_keys(redis_client):
    a, b = RedisStore(redis_client, "a"), RedisStore(redis_client, "b")
    a.write_batch([cand(0, "k1")], max_exact_keys=100)
    assert b.write_batch([cand(0, "k1")], max_exact_keys=100).outcomes == ["accepted"]
    assert all(k.startswith((b"cptd:{a}:", b"cptd:{b}:")) for k in redis_client.keys("*"))


def test_a_snapshot_that_takes_no_document_is_an_empty_list(redis_client):
    """Lua's -0 is the string "-0", which HINCRBY refuses: a round whose curation chose nothing must not fail on it."""
    store = RedisStore(redis_client, "empty")
    fence = store.lease_acquire("me", 60)
    assert fence is not None
    assert store.snapshot_take(fence, "r00001", 1000) == []
    assert store.snapshot_take(fence, "r00002", 1000, chosen=["gone"]) == []


def test_a_batch_starting_above_the_stored_offset_is_refused_whole_unless_the_hole_is_kafkas(redis_client):
    s = RedisStore(redis_client, "gaps")
    s.write_batch([cand(0, "k0"), cand(1, "k1"), cand(0, "p1", part=1)], max_exact_keys=100)
    before = (s.counters(), s.stored_offsets(), s.buffer_keys())
    # Redis lost offsets 2..4 of partition 0 (Kafka had them committed): the batch would leave a hole.
    batch = [cand(5, "k5"), cand(6, "k6"), cand(1, "p2", part=1)]
    with pytest.raises(OffsetGap) as refused:
        s.write_batch(batch, max_exact_keys=100)
    assert refused.value.gaps == {("t", 0): (2, 5)}
    assert (s.counters(), s.stored_offsets(), s.buffer_keys()) == before  # nothing of the batch was written
    # Re-read from the stored offset 2 and still starting at 5: Kafka has nothing there; accepted and counted.
    r = s.write_batch(batch, max_exact_keys=100, accept_gaps={("t", 0): 2})
    assert r.outcomes == ["accepted"] * 3
    assert s.stored_offsets() == {("t", 0): 7, ("t", 1): 2}
    stats = redis_client.hgetall("cptd:{gaps}:stats")
    assert (int(stats[b"offset_gaps"]), int(stats[b"gap_offsets"])) == (1, 3)
    # An acceptance for another stored offset is no acceptance.
    with pytest.raises(OffsetGap):
        s.write_batch([cand(9, "k9")], max_exact_keys=100, accept_gaps={("t", 0): 2})


def test_round_numbers_stay_above_the_floor_the_caller_read_from_disk(redis_client):
    s = RedisStore(redis_client, "seq")
    assert s.next_round_number() == 1
    assert s.next_round_number(above=7) == 8  # round directories up to r00007 on the volume, Redis said 1
    assert s.next_round_number(above=3) == 9
    assert s.round_seq() == 9
