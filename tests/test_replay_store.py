"""The replay reservoir in a real Redis: capped, uniform (Algorithm R), deduplicated, seen by near-dedup."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

from connectors.redis_store import BatchItem, RedisStore, StoredDoc
from daemon.dev.sample_corpus import english_docs
from policies.config import Policy
from policies.dedup import document_keys
from policies.replay import reservoir_slot
from tests.conftest import REPO


def rec(key: str, bands=()) -> StoredDoc:
    return StoredDoc(key=key, text=key, bytes=len(key), bands=list(bands))


def test_reservoir_is_capped_and_counts_what_it_saw(redis_client):
    s = RedisStore(redis_client, "r1")
    rng = random.Random(0)
    placed = sum(s.replay_offer([rec(f"k{i}") for i in range(b, b + 100)], 50, rng.random, reservoir_slot) for b in range(0, 1000, 100))
    stats = s.replay_stats()
    assert stats == {"replay_docs": 50, "replay_seen": 1000}
    assert placed >= 50
    # Only reservoir members keep a record in the store: evicted documents are gone.
    assert len(s.get_docs([f"k{i}" for i in range(1000)])) == 50
    assert set(s.replay_keys()) == {d.key for d in s.get_docs([f"k{i}" for i in range(1000)])}


def test_reservoir_keeps_every_item_with_equal_probability(redis_client):
    """Algorithm R: after 40 items into 10 slots, each item is kept with probability 1/4."""
    hits: Counter = Counter()
    trials = 300
    rng = random.Random(1)
    for t in range(trials):
        s = RedisStore(redis_client, f"u{t}")
        for b in range(0, 40, 8):  # several offers, as rounds would make them
            s.replay_offer([rec(f"k{i}") for i in range(b, b + 8)], 10, rng.random, reservoir_slot)
        hits.update(s.replay_keys())
    assert sum(hits.values()) == 10 * trials
    expected = trials * 10 / 40
    for i in range(40):
        assert abs(hits[f"k{i}"] - expected) < 5 * (expected * 0.75) ** 0.5, (i, hits[f"k{i}"], expected)


def test_same_document_is_not_offered_twice(redis_client):
    s = RedisStore(redis_client, "r2")
    rng = random.Random(2)
    s.replay_offer([rec("a"), rec("a"), rec("b")], 10, rng.random, reservoir_slot)
    s.replay_offer([rec("a")], 10, rng.random, reservoir_slot)
    assert sorted(s.replay_keys()) == ["a", "b"] and s.replay_stats()["replay_seen"] == 2


def test_buffer_documents_moving_to_replay_keep_their_record_and_bands(redis_client):
    s = RedisStore(redis_client, "r3")
    doc = {"text": "t", "bytes": 1, "bands": ["b1"]}
    s.write_batch([BatchItem("t", 0, 0, "candidate", "", "k1", 1, ("b1",), doc)], max_exact_keys=1000)
    s.replay_offer([StoredDoc.model_validate({**doc, "key": "k1"})], 10, random.Random(3).random, reservoir_slot)
    s.remove_docs(["k1"])  # the round took it from the buffer
    assert s.buffer_stats()["buffer_docs"] == 0 and s.get_docs(["k1"])
    # A near copy arriving later is still caught against the replay store.
    r = s.write_batch([BatchItem("t", 0, 1, "candidate", "", "k2", 1, ("b1",), doc)], max_exact_keys=1000)
    assert r.outcomes == ["near_duplicate"]


def test_cli_seed_replay_seeds_valid_lines_and_names_bad_ones(tmp_path, redis_url, redis_client):
    docs = english_docs(30, seed=5)
    lines = [json.dumps({"text": d, "source": "pretrain"}) for d in docs[:20]] + ['{"text": "broken'] + docs[20:]
    f = tmp_path / "seed.jsonl"
    f.write_text("\n".join(x.replace("\n", " ") for x in lines) + "\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: seedtest\nreplay: {reservoir_docs: 25}\n")
    env = dict(os.environ, CPTD_POLICY=str(policy), CPTD_REDIS_URL=redis_url)
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--json", "seed-replay", str(f), "--seed", "7"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr  # one invalid line, named; the others seeded
    rep = json.loads(out.stdout)
    assert rep["invalid_lines"] == [{"line": 21, "reason": "invalid_json", "detail": rep["invalid_lines"][0]["detail"]}]
    assert rep["offered"] == 30 and rep["reservoir_docs"] == 25 and rep["seen"] == 30
    s = RedisStore(redis_client, "seedtest")
    stored = s.get_docs(s.replay_keys())
    assert len(stored) == 25 and all(d.text for d in stored)
    # Seeded documents carry the same dedup keys ingest computes, so ingest sees them as duplicates.
    keys = document_keys([d.text for d in stored], Policy().dedup)
    assert {k.content_key for k in keys} == set(s.replay_keys())
