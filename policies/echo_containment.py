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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from policies.collapse import CollapsePolicy, echo_dedup_policy
from policies.dedup import band_keys, content_key, minhash_signatures, shingle_hashes

SHINGLE_PREFIX = "c"  # sample keys; a band key starts with two hex digits of its band index (< 0x40)


def _sampled(hashes: np.ndarray, every: int) -> np.ndarray:
    return hashes[hashes % np.uint64(every) == 0]


def _keys(hashes: np.ndarray) -> list[str]:
    digits = hashes.astype(">u8").tobytes().hex()  # one hex() for all: formatting each number costs more than hashing
    return [SHINGLE_PREFIX + digits[i : i + 16] for i in range(0, len(digits), 16)]


def document_shingles(texts: Sequence[str], policy: CollapsePolicy) -> list[list[str]]:
    """Per text, its sampled shingle keys in text order (repeats kept: windows count positions)."""
    if not policy.echo_containment:
        return [[] for _ in texts]
    return [_keys(_sampled(h, policy.echo_sample_every)) for h in shingle_hashes(texts, policy.echo_ngram_size)]


def completion_keys(texts: Sequence[str], policy: CollapsePolicy) -> list[list[str]]:
    """Per completion, what the echo index keeps of it: its LSH band keys, then its distinct sampled shingle keys
    (at most `echo_max_shingles`, the smallest hashes)."""
    if not texts:
        return []
    params = echo_dedup_policy(policy)
    bands = band_keys(minhash_signatures(texts, params), params)
    if not policy.echo_containment:
        return bands
    hashes = shingle_hashes(texts, policy.echo_ngram_size)
    return [
        b + _keys(np.unique(_sampled(h, policy.echo_sample_every))[: policy.echo_max_shingles]) for b, h in zip(bands, hashes, strict=True)
    ]


def document_bands(texts: Sequence[str], policy: CollapsePolicy) -> list[list[str]]:
    """Per text, its echo LSH band keys (resemblance: a shared one decides before containment is asked)."""
    params = echo_dedup_policy(policy)
    return band_keys(minhash_signatures(texts, params), params) if texts else []


def shingle_count(entry: Sequence[str]) -> int:
    """How many sample keys a completion's index entry holds (the denominator of its share found in a document)."""
    return sum(k.startswith(SHINGLE_PREFIX) for k in entry)


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
    """Completions sharing at least `echo_min_shared` distinct sampled shingles with the document, most shared first:
    the only ones whose size the verdict needs."""
    distinct: dict[str, set[str]] = {}
    for s, c in zip(shingles, found, strict=True):
        if c is not None:
            distinct.setdefault(c, set()).add(s)
    ranked = sorted(distinct.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [c for c, ss in ranked if len(ss) >= policy.echo_min_shared]


def echo_verdict(
    band_found: Sequence[str | None],
    shingles: Sequence[str],
    found: Sequence[str | None],
    sizes: Mapping[str, int],
    policy: CollapsePolicy,
) -> str | None:
    """The completion a document echoes, or None.

    `band_found`: per band key of the document, the completion indexed under it; `shingles`/`found`: the document's
    sampled shingle keys and the completion indexed under each; `sizes`: sample keys per candidate completion
    (`shingle_count` of its entry). A shared band (resemblance) decides first; then, per candidate, the share of the
    completion found in the document, and the share of the best window of `echo_window` sampled shingles of the
    document found in the completion.
    """
    for c in band_found:
        if c is not None:
            return c
    if not policy.echo_containment:
        return None
    for c in containment_candidates(shingles, found, policy):
        positions = [i for i, x in enumerate(found) if x == c]
        shared = len({shingles[i] for i in positions})
        size = sizes.get(c, 0)
        if size and shared / size >= policy.echo_completion_share:
            return c
        in_window = _best_window(positions, len(shingles), policy.echo_window)
        if in_window >= policy.echo_min_shared and in_window / min(policy.echo_window, len(shingles)) >= policy.echo_window_share:
            return c
    return None


def match_echoes(texts: Sequence[str], completions: Sequence[str], policy: CollapsePolicy) -> list[str | None]:
    """Per text, the content key of the completion it echoes, with the index held in memory as Redis holds it
    (a key shared by two completions points at the later one): what ingest decides, for tests and benches."""
    index: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for text, entry in zip(completions, completion_keys(completions, policy), strict=True):
        key = content_key(text)
        if key in sizes:
            continue
        sizes[key] = shingle_count(entry)
        index.update(dict.fromkeys(entry, key))
    out = []
    for bands, shingles in zip(document_bands(texts, policy), document_shingles(texts, policy), strict=True):
        out.append(echo_verdict([index.get(b) for b in bands], shingles, [index.get(s) for s in shingles], sizes, policy))
    return out
