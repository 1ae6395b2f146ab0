"""Whether a document echoes a completion of the served model: resemblance (MinHash/LSH) or containment.

Resemblance (Jaccard) is what LSH band keys find, and it falls with everything
that makes the two texts differ in length: a completion cut in half has Jaccard
0.5 with the whole, one embedded as a third of a human page 0.33, one with a
quarter of its words rewritten about 0.27, all below the echo index's ~0.37.
Containment does not fall with length: the share of a completion's shingles
found in the document, and the share of a stretch of the document (a window)
found in one completion, stay near 1 for cut and embedded copies and near
0.75**3 = 0.42 when a quarter of the words are rewritten, while a human text
of the same domain shares a few stock trigrams with any one completion.

Both shares are estimated from a sample of shingles chosen by hash value (1 in
`echo_sample_every`: Broder's mod-m sampling), so a shingle sampled in the
completion is sampled in the document too and the estimates are unbiased. The
sample keys go into the same Redis hash as the band keys (`echo_lsh`, key ->
completion, evicted with it), prefixed `c` (band keys start with their band
index, 00-3f). A completion keeps at most `echo_max_shingles` of them (the
smallest hashes: a uniform sample of a long one). Checking a document costs one
lookup per sampled shingle of it, in the batch's one HMGET.

A sample key names one completion, the latest that indexed it, and a served
model repeats itself (most sample keys of the demo model's completions belong to
several), so the keys only pick the candidates; what a document shares with each
is counted from the candidate's entry (its indexed keys, read in a second HMGET).

Short texts are sampled densely as well. A completion of 100 words has about 25
sampled shingles; a quarter-rewrite keeps about 10 of them, near the bar of
`echo_min_shared` that keeps human documents out (bench/echo_recall.py: 59% of
such rewrites of the demo model's own completions caught before either change,
96% after). So a completion of
at most `echo_dense_words` words also indexes 1 in `echo_dense_sample_every` of
its other shingles (prefixed `d`), and a document that short looks them up too.
When both are short, the pair is compared on both samples together, with its
own bar (`echo_dense_min_shared`) and a window of as many words; any other pair,
on the `c` sample alone, as before. A long document (the embedded case) and a
long completion cost what they did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from policies.collapse import CollapsePolicy, echo_dedup_policy
from policies.dedup import band_keys, content_key, minhash_signatures, shingle_hashes

SHINGLE_PREFIX = "c"  # sample keys; a band key starts with two hex digits of its band index (< 0x40)
DENSE_PREFIX = "d"  # the short texts' further sample keys (1 in echo_dense_sample_every, not already a `c` key)


def _sampled(hashes: np.ndarray, every: int) -> np.ndarray:
    return hashes[hashes % np.uint64(every) == 0]


def _keys(hashes: np.ndarray, prefix: str = SHINGLE_PREFIX) -> list[str]:
    digits = hashes.astype(">u8").tobytes().hex()  # one hex() for all: formatting each number costs more than hashing
    return [prefix + digits[i : i + 16] for i in range(0, len(digits), 16)]


def _dense(hashes: np.ndarray, policy: CollapsePolicy) -> bool:
    """Whether a text is short enough to be sampled densely too (its word count, from its shingle count)."""
    return 0 < len(hashes) + policy.echo_ngram_size - 1 <= policy.echo_dense_words


def _ordered_keys(hashes: np.ndarray, policy: CollapsePolicy) -> list[str]:
    """A document's sample keys in text order: `c` keys, and for a short one `d` keys between them."""
    if not _dense(hashes, policy):
        return _keys(_sampled(hashes, policy.echo_sample_every))
    hashes = _sampled(hashes, policy.echo_dense_sample_every)
    sparse = (hashes % np.uint64(policy.echo_sample_every) == 0).tolist()
    return [k if c else DENSE_PREFIX + k[1:] for k, c in zip(_keys(hashes), sparse, strict=True)]


def document_shingles(texts: Sequence[str], policy: CollapsePolicy) -> list[list[str]]:
    """Per text, its sampled shingle keys in text order (repeats kept: windows count positions); a short text's
    `d` keys among them."""
    if not policy.echo_containment:
        return [[] for _ in texts]
    return [_ordered_keys(h, policy) for h in shingle_hashes(texts, policy.echo_ngram_size)]


def completion_keys(texts: Sequence[str], policy: CollapsePolicy) -> list[list[str]]:
    """Per completion, what the echo index keeps of it: its LSH band keys, then its distinct sampled shingle keys
    (at most `echo_max_shingles`, the smallest hashes), then for a short one its distinct `d` keys."""
    if not texts:
        return []
    params = echo_dedup_policy(policy)
    bands = band_keys(minhash_signatures(texts, params), params)
    if not policy.echo_containment:
        return bands
    out = []
    for b, h in zip(bands, shingle_hashes(texts, policy.echo_ngram_size), strict=True):
        keys = b + _keys(np.unique(_sampled(h, policy.echo_sample_every))[: policy.echo_max_shingles])
        if _dense(h, policy):
            dense = np.unique(_sampled(h, policy.echo_dense_sample_every))
            keys += _keys(dense[dense % np.uint64(policy.echo_sample_every) != 0], DENSE_PREFIX)
        out.append(keys)
    return out


def document_bands(texts: Sequence[str], policy: CollapsePolicy) -> list[list[str]]:
    """Per text, its echo LSH band keys (resemblance: a shared one decides before containment is asked)."""
    params = echo_dedup_policy(policy)
    return band_keys(minhash_signatures(texts, params), params) if texts else []


@dataclass(frozen=True)
class SampleSize:
    """How many sample keys a completion's index entry holds (the denominators of its share found in a document)."""

    sparse: int  # `c` keys
    dense: int = 0  # `d` keys: a short completion's further sample


def shingle_count(entry: Iterable[str]) -> SampleSize:
    heads = Counter(k[:1] for k in entry)
    return SampleSize(heads[SHINGLE_PREFIX], heads[DENSE_PREFIX])


def _best_window(positions: list[int], length: int, window: int) -> int:
    """Most of `positions` (sorted) inside any `window` consecutive positions of a sequence of `length`."""
    if length <= window:
        return len(positions)
    best, lo = 0, 0
    for hi, p in enumerate(positions):
        while p - positions[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def containment_candidates(shingles: Sequence[str], found: Sequence[str | None], policy: CollapsePolicy) -> list[str]:
    """The `echo_candidates` completions named by the most distinct sample keys of the document, at least
    `echo_candidate_hits` of them: the only ones whose entries the verdict reads. A key several completions share
    (a served model repeats itself) names only the latest, so the true source of a rewritten completion may be named
    by few of its keys, a near-copy of it by more; the verdict counts what each candidate shares from its entry."""
    distinct: dict[str, set[str]] = {}
    for s, c in zip(shingles, found, strict=True):
        if c is not None:
            distinct.setdefault(c, set()).add(s)
    ranked = sorted(distinct.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [c for c, ss in ranked[: policy.echo_candidates] if len(ss) >= policy.echo_candidate_hits]


def _contains(keys: Sequence[str], hits: list[bool], size: int, min_shared: int, window: int, policy: CollapsePolicy) -> bool:
    """On one sample of the document (`keys`; `hits`: which are in the completion) and the completion's `size` in
    that sample: whether enough of the completion is in the document, or of a window of the document in it."""
    positions = [i for i, h in enumerate(hits) if h]
    shared = len({keys[i] for i in positions})
    if shared < min_shared:
        return False
    if size and shared / size >= policy.echo_completion_share:
        return True
    in_window = _best_window(positions, len(keys), window)
    return in_window >= min_shared and in_window / min(window, len(keys)) >= policy.echo_window_share


def echo_verdict(
    band_found: Sequence[str | None],
    shingles: Sequence[str],
    found: Sequence[str | None],
    entries: Mapping[str, Collection[str]],
    policy: CollapsePolicy,
) -> str | None:
    """The completion a document echoes, or None.

    `band_found`: per band key of the document, the completion indexed under it; `shingles`/`found`: the document's
    sample keys and the completion indexed under each; `entries`: the keys each candidate completion indexed (its
    entry; one evicted since the lookup is left out and judged by the keys that named it). A shared band
    (resemblance) decides first; then, per candidate, the share of the completion found in the document, and the
    share of the best window of `echo_window` sampled shingles of the document found in the completion: on the `c`
    sample, and when both are short on both samples together (a window of as many words).
    """
    for c in band_found:
        if c is not None:
            return c
    if not policy.echo_containment:
        return None
    sparse = [i for i, s in enumerate(shingles) if s.startswith(SHINGLE_PREFIX)]
    dense_doc = len(sparse) < len(shingles)
    dense_window = policy.echo_window * policy.echo_sample_every // policy.echo_dense_sample_every
    for c in containment_candidates(shingles, found, policy):
        entry = entries.get(c)
        hits = [s in entry for s in shingles] if entry is not None else [x == c for x in found]
        size = shingle_count(entry) if entry is not None else SampleSize(0)
        if (
            dense_doc
            and size.dense
            and _contains(shingles, hits, size.sparse + size.dense, policy.echo_dense_min_shared, dense_window, policy)
        ):
            return c
        if _contains(
            [shingles[i] for i in sparse], [hits[i] for i in sparse], size.sparse, policy.echo_min_shared, policy.echo_window, policy
        ):
            return c
    return None


def match_echoes(texts: Sequence[str], completions: Sequence[str], policy: CollapsePolicy) -> list[str | None]:
    """Per text, the content key of the completion it echoes, with the index held in memory as Redis holds it
    (a key shared by two completions points at the later one): what ingest decides, for tests and benches."""
    index: dict[str, str] = {}
    entries: dict[str, frozenset[str]] = {}
    for text, entry in zip(completions, completion_keys(completions, policy), strict=True):
        key = content_key(text)
        if key in entries:
            continue
        entries[key] = frozenset(entry)
        index.update(dict.fromkeys(entry, key))
    out = []
    for bands, shingles in zip(document_bands(texts, policy), document_shingles(texts, policy), strict=True):
        out.append(echo_verdict([index.get(b) for b in bands], shingles, [index.get(s) for s in shingles], entries, policy))
    return out
