"""Mixed Kafka message streams with the outcome each message must end as.

The expected outcome of a message follows from how it was built: a malformed
payload from its defect, a copy from its original, a junk page from the filter
verdict, so a test can compare the daemon's counts with these exactly.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

from daemon.dev.sample_corpus import english_docs, mixed_corpus
from policies.config import Policy
from policies.dedup import content_key, document_keys
from policies.echo_containment import match_echoes
from policies.quality import FilterChain, build_filters, judge


@dataclass(frozen=True)
class Msg:
    value: bytes
    outcome: str
    reason: str = ""
    key: str = ""  # content key of an accepted original


def good_docs(n: int, policy: Policy, seed: int = 0) -> list[str]:
    """Documents our filters accept and that are not near-duplicates of each other."""
    filters = build_filters(policy.quality)
    out = distinct([d for d in english_docs(n * 3, seed=seed) if judge(d, filters).accepted], [], policy)
    if len(out) < n:
        raise AssertionError(f"only {len(out)} distinct good documents available, wanted {n}")
    return out[:n]


def stored_text(text: str, filters: FilterChain) -> str:
    """What ingest keeps and hashes of an accepted message's text: the C4-cleaned text when the C4 rules ran."""
    return judge(text, filters).text or text


def distinct(texts: list[str], others: list[str], policy: Policy) -> list[str]:
    """`texts` (messages) that share no ingest dedup key (content key or LSH band) with `others` (texts as stored:
    buffered or replay documents) or with an earlier one of them, in order: the documents ingest would accept as they
    are, whatever order they arrive in. Keys are computed as ingest computes them, on the stored text."""
    filters = build_filters(policy.quality)
    keys = document_keys([*others, *(stored_text(t, filters) for t in texts)], policy.dedup)
    seen = {x for k in keys[: len(others)] for x in (k.content_key, *k.band_keys)}
    out = []
    for t, k in zip(texts, keys[len(others) :], strict=True):
        mine = {k.content_key, *k.band_keys}
        if not mine & seen:
            out.append(t)
            seen |= mine
    return out


def echoes(texts: list[str], completions: list[str], policy: Policy) -> list[bool]:
    """Whether each message text echoes one of `completions` (a shared echo band, or containment either way), as
    ingest decides it: on the message's own text, with the echo index's parameters (policies.collapse)."""
    return [m is not None for m in match_echoes(texts, completions, policy.collapse)]


def _near_copy(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    i = rng.randrange(len(words) // 2, len(words))
    words[i] = "modified"
    return " ".join(words)


def mixed_stream(policy: Policy, n_good: int = 300, seed: int = 0) -> tuple[list[Msg], list[Msg]]:
    """Two waves: originals, junk and malformed first; exact and near copies of the originals second.

    Copies go in a second wave because partitions interleave in any order, and
    which of a near-duplicate pair is kept depends on which arrives first.
    """
    rng = random.Random(seed)
    filters = build_filters(policy.quality)
    goods = good_docs(n_good, policy, seed)
    msgs: list[Msg] = []
    copies: list[Msg] = []
    for i, t in enumerate(goods):
        payload = json.dumps({"text": t, "id": f"g{i}", "source": "test"}) if i % 2 else t
        msgs.append(Msg(payload.encode(), "accepted", key=content_key(stored_text(t, filters))))
    for t in goods[: n_good // 5]:  # exact copies, some re-spaced (same normalized text, same filter verdict)
        variant = t if rng.random() < 0.5 else t.replace(". ", ".  ") + "  "
        copies.append(Msg(json.dumps({"text": variant, "id": "dup"}).encode(), "duplicate", "exact_match"))
    for t in goods[n_good // 5 : n_good // 5 + n_good // 10]:
        copies.append(Msg(_near_copy(t, rng).encode(), "near_duplicate", "minhash_lsh"))
    junk = [d for d in mixed_corpus(n_good * 2, seed=seed + 1) if not judge(d, filters).accepted][: n_good // 2]
    for t in junk:
        msgs.append(Msg(t.encode(), "rejected", judge(t, filters).reason or ""))
    big = json.dumps({"text": "word " * (policy.ingest.max_message_bytes // 5 + 10)}).encode()
    malformed = [
        (b"\xff\xfe not utf-8 \xc3\x28", "invalid_utf8"),
        (b'{"text": "unterminated', "invalid_json"),
        (b'{"title": "no text here"}', "missing_text"),
        (b'{"text": 42}', "invalid_field"),
        (big, "oversize"),
        (b"   \n ", "empty_text"),
    ]
    for i in range(n_good // 10):
        v, r = malformed[i % len(malformed)]
        msgs.append(Msg(v, "dead_lettered", r))
    rng.shuffle(msgs)
    rng.shuffle(copies)
    return msgs, copies


def expected_counts(msgs: list[Msg]) -> Counter:
    return Counter((m.outcome, m.reason) for m in msgs)


def produce(bootstrap: str, topic: str, values: list[bytes], partitions: int | None = None) -> None:
    """Send and wait for acks; with `partitions`, spread round-robin so every partition gets its share."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 * 1024 * 1024, linger_ms=5)
    for i, v in enumerate(values):
        p.send(topic, v, partition=None if partitions is None else i % partitions)
    p.flush(timeout=60)
    p.close()
