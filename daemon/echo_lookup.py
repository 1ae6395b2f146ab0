"""Which incoming documents echo a completion of the served model, against the echo index in Redis.

The decision is policies/echo_containment.py's (a shared LSH band, or containment
either way); this module only fetches what it needs from the store, in as few
round trips as a batch allows, so that ingest (daemon/ingest.py) and the tests
ask Redis the same way.
"""

from __future__ import annotations

from connectors.redis_store import BatchItem, RedisStore
from policies.collapse import CollapsePolicy
from policies.echo_containment import containment_candidates, document_bands, document_shingles, echo_verdict


class EchoHashingError(RuntimeError):
    """Hashing a batch for the echo check raised (the batch goes on unchecked)."""


def find_echoes(store: RedisStore, texts: list[str], indexed: list[BatchItem], collapse: CollapsePolicy) -> list[str | None]:
    """Per text, the indexed completion it echoes (in Redis, or `indexed`: this batch's completions, written after the
    lookup), or None: by a shared LSH band, or by containment (policies/echo_containment.py). One HMGET for the
    batch's keys, and one more for the entries of the completions its sample keys name most (the candidates)."""
    try:
        bands = document_bands(texts, collapse)
        shingles = document_shingles(texts, collapse)
    except Exception as e:  # noqa: BLE001 - reported to the caller as one kind of failure
        raise EchoHashingError(f"{type(e).__name__}: {e}") from e
    found = store.echo_lookup([b + s for b, s in zip(bands, shingles, strict=True)])
    local = {k: it.key for it in indexed for k in it.bands}
    if local:
        found = [[local.get(k) or f for k, f in zip(b + s, fs, strict=True)] for b, s, fs in zip(bands, shingles, found, strict=True)]
    split = [(fs[: len(b)], fs[len(b) :]) for b, fs in zip(bands, found, strict=True)]
    wanted = {c for s, (bf, sf) in zip(shingles, split, strict=True) if not any(bf) for c in containment_candidates(s, sf, collapse)}
    entries = {it.key: frozenset(it.bands) for it in indexed if it.key in wanted}
    entries.update({k: frozenset(v) for k, v in store.echo_entries(sorted(wanted - entries.keys())).items()})
    return [echo_verdict(bf, s, sf, entries, collapse) for s, (bf, sf) in zip(shingles, split, strict=True)]
