"""The echo index against a real Redis: completions indexed by ingest or by `cptd index-echoes`, looked up, evicted."""

from __future__ import annotations

import json

from connectors.redis_store import BatchItem, RedisStore
from daemon.dev.sample_corpus import english_docs
from daemon.index_echoes import index_echoes
from policies.collapse import echo_dedup_policy
from policies.config import Policy
from policies.dedup import band_keys, content_key, minhash_signatures


def _bands(texts: list[str], policy: Policy) -> list[list[str]]:
    p = echo_dedup_policy(policy.collapse)
    return band_keys(minhash_signatures(texts, p), p)


def test_indexed_completions_are_counted_found_and_evicted(redis_client):
    pol = Policy()
    s = RedisStore(redis_client, "echo")
    gens = english_docs(5, 800, seed=3)
    bands = _bands(gens, pol)
    items = [BatchItem("c", 0, i, "indexed", "echo", content_key(g), 0, tuple(b)) for i, (g, b) in enumerate(zip(gens, bands))]
    res = s.write_batch(items, 1000, max_echo=3)
    assert res.outcomes == ["indexed"] * 5 and s.counters() == {("indexed", "echo"): 5}
    assert s.provenance_counts()["echo_index"] == 3 and s.buffer_stats()["buffer_docs"] == 0  # the two oldest evicted
    hits = s.echo_hits(_bands(gens, pol))
    assert hits[:2] == [None, None] and hits[2:] == [content_key(g) for g in gens[2:]]
    assert redis_client.hlen(s.k_echo_lsh) == 3 * pol.collapse.echo_bands  # evicted completions took their bands along
    # redelivered completions are skipped like any message; a human text finds nothing
    assert s.write_batch(items, 1000, max_echo=3).outcomes == ["skipped"] * 5
    assert s.echo_hits(_bands(english_docs(3, 800, seed=9), pol)) == [None, None, None]


def test_cptd_index_echoes_reads_a_file_and_names_bad_lines(redis_client, tmp_path):
    pol = Policy()
    s = RedisStore(redis_client, "echofile")
    gens = english_docs(4, 800, seed=4)
    f = tmp_path / "completions.jsonl"
    f.write_bytes(b"".join(json.dumps({"text": g}).encode() + b"\n" for g in gens) + b'{"text": 3}\n' + b"\xff\xfe\n")
    rep = index_echoes(f, s, pol)
    assert rep.indexed == 4 and [(n, r) for n, r, _ in rep.invalid] == [(5, "invalid_field"), (6, "invalid_utf8")]
    assert index_echoes(f, s, pol).indexed == 0  # indexing twice adds nothing
    assert s.echo_hits(_bands(gens, pol)) == [content_key(g) for g in gens]
