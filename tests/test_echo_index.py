"""The echo index against a real Redis: completions indexed by ingest or by `cptd index-echoes`, looked up, evicted."""

from __future__ import annotations

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.redis_store import BatchItem, RedisStore
from daemon.dev.sample_corpus import english_docs, light_paraphrase
from daemon.index_echoes import index_echoes
from policies.collapse import echo_dedup_policy
from policies.config import Policy
from policies.dedup import band_keys, content_key, minhash_signatures


def _bands(texts: list[str], policy: Policy) -> list[list[str]]:
    p = echo_dedup_policy(policy.collapse)
    return band_keys(minhash_signatures(texts, p), p)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b.", "?", "word", ""]), max_size=4), max_size=5), st.integers(0, 2**32))
def test_light_paraphrase_edits_any_generation_line_by_line(lines: list[list[str]], seed: int) -> None:
    """What the echo tests repost: one-word and empty lines included (a one-word line once crashed `cptd demo`)."""
    text = "\n".join(" ".join(words) for words in lines)
    out = light_paraphrase(text, random.Random(seed), ["x", "y"], frac=0.5)
    assert out.count("\n") == text.count("\n")
    assert all(len(o.split()) <= len(t.split()) for o, t in zip(out.split("\n"), text.split("\n")))


def test_indexed_completions_are_counted_found_and_evicted(redis_client):
    policy = Policy()
    s = RedisStore(redis_client, "echo")
    gens = english_docs(5, 800, seed=3)
    bands = _bands(gens, policy)
    items = [BatchItem("c", 0, i, "indexed", "echo", content_key(g), 0, tuple(b)) for i, (g, b) in enumerate(zip(gens, bands))]
    res = s.write_batch(items, 1000, max_echo=3)
    assert res.outcomes == ["indexed"] * 5 and s.counters() == {("indexed", "echo"): 5}
    assert s.provenance_counts()["echo_index"] == 3 and s.buffer_stats()["buffer_docs"] == 0  # the two oldest evicted
    hits = s.echo_hits(_bands(gens, policy))
    assert hits[:2] == [None, None] and hits[2:] == [content_key(g) for g in gens[2:]]
    assert redis_client.hlen(s.k_echo_lsh) == 3 * policy.collapse.echo_bands  # evicted completions took their bands along
    # redelivered completions are skipped like any message; a human text finds nothing
    assert s.write_batch(items, 1000, max_echo=3).outcomes == ["skipped"] * 5
    assert s.echo_hits(_bands(english_docs(3, 800, seed=9), policy)) == [None, None, None]
    # an echo is counted whatever its outcome: dead-lettered, rejected by a quality rule, or accepted as synthetic
    echoes = [BatchItem("d", 0, 0, "rejected", "echo", echo=True), BatchItem("d", 0, 1, "rejected", "gopher_stop_words", echo=True)]
    s.write_batch([*echoes, BatchItem("d", 0, 2, "candidate", "", "k", 5, (), {"text": "x", "bytes": 5}, "synthetic", True)], 1000)
    assert {k: v for k, v in s.provenance_counts().items() if k != "echo_index"} == {"echoes": 3, "synthetic": 1}


def test_cptd_index_echoes_reads_a_file_and_names_bad_lines(redis_client, tmp_path):
    policy = Policy()
    s = RedisStore(redis_client, "echofile")
    gens = english_docs(4, 800, seed=4)
    f = tmp_path / "completions.jsonl"
    f.write_bytes(b"".join(json.dumps({"text": g}).encode() + b"\n" for g in gens) + b'{"text": 3}\n' + b"\xff\xfe\n")
    rep = index_echoes(f, s, policy)
    assert rep.indexed == 4 and [(n, r) for n, r, _ in rep.invalid] == [(5, "invalid_field"), (6, "invalid_utf8")]
    assert index_echoes(f, s, policy).indexed == 0  # indexing twice adds nothing
    assert s.echo_hits(_bands(gens, policy)) == [content_key(g) for g in gens]


def test_ingest_indexes_the_echo_topic_and_marks_copies(ingest_procs, redis_url, bootstrap, topics, tmp_path):
    """Through a real broker: completions on the echo topic are indexed, copies on the document topic become synthetic
    (or are dead-lettered), denied sources are rejected, and every offset is counted once."""
    import random

    from daemon.dev.sample_corpus import light_paraphrase
    from daemon.dev.services import create_topics, wait_for
    from policies.config import load_policy
    from policies.quality import build_filters, judge
    from tests.conftest import make_policy
    from tests.streams import echoes, good_docs, produce

    echo_topic = topics["docs"] + "-completions"
    create_topics(bootstrap, {topics["docs"]: 2, topics["dlq"]: 1, echo_topic: 1})
    path = make_policy(
        tmp_path,
        topics,
        collapse={"echo_topics": [echo_topic]},
        provenance={"human_sources": ["newsroom"], "denied_sources": ["spam*"], "classifier": {"examples": CLASSIFIER}},
    )
    policy = load_policy(path)
    store = RedisStore.from_url(redis_url, policy.name)
    d = ingest_procs(path, redis_url, bootstrap)
    d.wait_assigned()
    docs = good_docs(260, policy, seed=12)
    # english_docs draws paragraphs from one pool, so most documents share one with some completion: an embedded copy
    # that containment rightly flags. The people here write their own (tests.streams.echoes decides as ingest does).
    gens = docs[:20]
    human = [t for t, e in zip(docs[20:], echoes(docs[20:], gens, policy), strict=True) if not e][:40]
    assert len(human) == 40, f"only {len(human)} documents share nothing with the completions"
    produce(bootstrap, echo_topic, [json.dumps({"text": g}).encode() for g in gens])
    wait_for(lambda: store.provenance_counts()["echo_index"] == len(gens), 60, "the echo index", 0.2, d.proc)
    rng = random.Random(0)
    vocab = [w for t in human for w in t.split()]
    msgs = [{"text": g, "id": f"copy-{i}"} for i, g in enumerate(gens[:10])]
    filters = build_filters(policy.quality)
    paras = [p for p in (light_paraphrase(g, rng, vocab) for g in gens[10:]) if judge(p, filters).accepted]
    msgs += [{"text": p, "id": f"para-{i}"} for i, p in enumerate(paras)]
    msgs += [{"text": t, "id": f"human-{i}", "source": "newsroom"} for i, t in enumerate(human[:30])]
    msgs += [{"text": t, "id": f"spam-{i}", "source": "spam-farm"} for i, t in enumerate(human[30:])]
    produce(bootstrap, topics["docs"], [json.dumps(m).encode() for m in msgs], partitions=2)
    wait_for(lambda: sum(store.counters().values()) == len(msgs) + len(gens), 60, "every offset accounted", 0.2, d.proc)
    assert store.counters() == {("indexed", "echo"): 20, ("accepted", ""): 40 + len(paras), ("rejected", "source_denied"): 10}
    by_id = {r.id: r.model_dump() for r in store.get_docs(store.buffer_keys())}  # every field ingest stored
    assert {by_id[f"copy-{i}"]["provenance_rule"] for i in range(10)} == {"echo"}
    assert len(paras) >= 7 and sum(by_id[f"para-{i}"]["provenance_rule"] == "echo" for i in range(len(paras))) >= len(paras) - 1
    assert {by_id[f"human-{i}"]["provenance"] for i in range(30)} == {"human"}
    assert all(by_id[f"copy-{i}"]["echo_of"] for i in range(10))
    counts = store.provenance_counts()
    assert counts["human"] == 30 and counts["synthetic"] == counts["echoes"] >= 9 + len(paras)
    assert d.status()["provenance"] == counts


CLASSIFIER = {
    "code": ["def main(): import os; return os.path.join(a, b) # the function returns the joined path"],
    "prose": ["The river runs past the old town and the fields, where people walk in the evening."],
}


def test_ingest_finds_cut_and_embedded_echoes_in_redis_as_the_reference_does(redis_client, tmp_path):
    """daemon/echo_lookup.find_echoes (what ingest runs) against `cptd index-echoes`' Redis entries, and against
    completions of the same batch not yet written, decides as policies.echo_containment.match_echoes in memory."""
    from daemon.dev.echo_corpus import echo_cases
    from daemon.echo_lookup import find_echoes
    from policies.echo_containment import completion_keys, match_echoes

    policy = Policy()
    cases = echo_cases("handbook", 40, 40, seed=5)
    docs = [*cases.edited["rewrite25"], *cases.edited["first_half"], *cases.edited["embedded"], *cases.human]
    expected = match_echoes(docs, cases.completions, policy.collapse)
    assert sum(e is not None for e in expected[:120]) >= 108 and not any(expected[120:])  # the reference catches them
    f = tmp_path / "completions.jsonl"
    f.write_text("".join(json.dumps({"text": g}) + "\n" for g in cases.completions))
    s = RedisStore(redis_client, "contain")
    assert index_echoes(f, s, policy).indexed == 40
    assert find_echoes(s, docs, [], policy.collapse) == expected
    batch = [
        BatchItem("c", 0, i, "indexed", "echo", content_key(g), 0, tuple(k))
        for i, (g, k) in enumerate(zip(cases.completions, completion_keys(cases.completions, policy.collapse), strict=True))
    ]
    assert find_echoes(RedisStore(redis_client, "empty"), docs, batch, policy.collapse) == expected
    # evicted completions take their containment keys along: what is left decides as an index of the newest alone
    s.echo_add([], 1)
    assert redis_client.hlen(s.k_echo_lsh) == len(completion_keys(cases.completions[-1:], policy.collapse)[0])
    assert find_echoes(s, docs, [], policy.collapse) == match_echoes(docs, cases.completions[-1:], policy.collapse)
