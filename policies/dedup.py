"""Exact and near-duplicate keys: pure functions of the text, no storage.

Two kinds of key come out of here and the Redis store only has to remember them:

* ``content_key`` -- 128-bit hash of the normalized text. It is the document's id
  everywhere (Redis document key, exact dedup), so a redelivered or trivially
  re-formatted copy lands on the same id and is dropped.
* ``band_keys`` -- MinHash/LSH keys (FineWeb's recipe: word 5-grams, 14 bands of 8
  rows). Two documents whose word-5-gram Jaccard similarity is ``s`` share at least
  one band key with probability ``1 - (1 - s**r)**b``; the S-curve is steepest
  near ``(1/b)**(1/r)`` (about 0.72 for 14x8), which is the effective threshold.

The hot path (normalization, word hashing, n-gram hashing, 112 permutations) runs
in numba-compiled kernels over one UTF-8 buffer per batch, because ingest has to
keep up with Kafka: per-document Python work is limited to NFKC, lower() and one
blake2b call.

Normalization has no options on purpose: ``content_key`` is the document id, and a
policy edit must never silently re-key every stored document.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit
from pydantic import Field

from policies.base import Section

# Bumped whenever normalization, word/n-gram hashing or the permutation family
# changes, so an index built by an older version is not compared with new keys.
_ALGORITHM_VERSION = 1

# Character classes of the normalizer (one byte per code point of planes 0-1).
_WORD, _SEPARATOR, _DROP = 0, 1, 2
_TABLE_SIZE = 0x20000


class DedupPolicy(Section):
    """Duplicate detection. Defaults follow FineWeb: word 5-grams, 14 bands x 8 rows.

    With ``b`` bands of ``r`` rows, two documents become near-duplicate candidates
    with probability ``1 - (1 - s**r)**b`` at n-gram Jaccard similarity ``s``; the
    threshold where that curve is steepest is ``(1/b)**(1/r)``:
    14x8 -> 0.72, 20x10 -> 0.74, 9x13 -> 0.84, 20x5 -> 0.55.
    More rows raise the threshold, more bands lower it (and cost Redis memory).
    """

    near: bool = Field(default=True, description="drop documents that share a MinHash/LSH band key with one seen before")
    ngram_size: int = Field(default=5, ge=1, le=32, description="words per shingle (FineWeb: 5)")
    bands: int = Field(default=14, ge=1, le=64, description="LSH bands = Redis keys per document; threshold ~ (1/bands)**(1/rows_per_band)")
    rows_per_band: int = Field(default=8, ge=1, le=32, description="MinHash values per band; permutations = bands * rows_per_band")
    seed: int = Field(default=1, ge=0, le=2**32 - 1, description="seed of the permutation family; changing it invalidates the LSH index")
    max_exact_keys: int = Field(
        default=5_000_000,
        ge=1000,
        description="cap on the content hashes remembered for exact dedup after their documents left the store "
        "(exact dedup itself is always on: the content key is the document's id). The LSH index needs no cap of "
        "its own: it holds `bands` keys per document in the buffer or replay store, both capped.",
    )

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows_per_band


def near_duplicate_threshold(policy: DedupPolicy) -> float:
    """Jaccard similarity above which pairs are mostly caught and below which mostly missed.

    ``(1/b)**(1/r)`` approximates where ``1 - (1 - s**r)**b`` is steepest; an operator
    tuning bands/rows thinks in this number, not in the two integers.
    """
    return (1.0 / policy.bands) ** (1.0 / policy.rows_per_band)


def candidate_probability(similarity: float, policy: DedupPolicy) -> float:
    """Chance that two documents of this n-gram Jaccard similarity share at least one band key."""
    return 1.0 - (1.0 - similarity**policy.rows_per_band) ** policy.bands


def index_fingerprint(policy: DedupPolicy) -> str:
    """Short tag of everything that gives band keys their meaning, to namespace the LSH index.

    ``bands`` is left out: band ``i`` means the same whatever the band count, so
    adding or removing bands keeps the existing keys usable.
    """
    blob = f"v{_ALGORITHM_VERSION}:n{policy.ngram_size}:r{policy.rows_per_band}:s{policy.seed}".encode()
    return hashlib.blake2b(blob, digest_size=4).hexdigest()


# --------------------------------------------------------------------------- normalization


@lru_cache(maxsize=1)
def _char_classes() -> np.ndarray:
    """Punctuation, symbols, separators and controls split words; invisible format characters vanish.

    Built from the running Python's Unicode database. Code points above plane 1 are
    classified by a fixed rule in the kernel (ideographs are words, tags vanish,
    private use separates) so the table stays small and quick to build.
    """
    table = np.zeros(_TABLE_SIZE, dtype=np.uint8)
    category = unicodedata.category
    for cp in range(_TABLE_SIZE):
        cat = category(chr(cp))
        if cat == "Cf":
            table[cp] = _DROP
        elif cat[0] in "PSZC":
            table[cp] = _SEPARATOR
    table.setflags(write=False)
    return table


@njit(cache=True, nogil=True)
def _char_class(cp: int, table: np.ndarray) -> int:
    if cp < _TABLE_SIZE:
        return table[cp]
    if 0xE0000 <= cp < 0xE0080:  # language tags: invisible
        return _DROP
    if cp >= 0xF0000:  # supplementary private use
        return _SEPARATOR
    return _WORD


@njit(cache=True, nogil=True)
def _normalize_kernel(buf, starts, ends, table, out, out_starts, out_ends, non_ascii):
    """Copy every word's UTF-8 bytes, separated by exactly one space, trimmed at both ends."""
    pos = 0
    for d in range(starts.shape[0]):
        out_starts[d] = pos
        pending_space = False
        i = starts[d]
        end = ends[d]
        while i < end:
            lead = buf[i]
            if lead < 0x80:  # fast path: most text is ASCII
                if table[lead] == _WORD:
                    if pending_space and pos > out_starts[d]:
                        out[pos] = 0x20
                        pos += 1
                    pending_space = False
                    out[pos] = lead
                    pos += 1
                else:
                    pending_space = True
                i += 1
                continue
            if lead < 0xE0:
                n = 2
                cp = ((np.int64(lead) & 0x1F) << 6) | (np.int64(buf[i + 1]) & 0x3F)
            elif lead < 0xF0:
                n = 3
                cp = ((np.int64(lead) & 0x0F) << 12) | ((np.int64(buf[i + 1]) & 0x3F) << 6) | (np.int64(buf[i + 2]) & 0x3F)
            else:
                n = 4
                cp = (
                    ((np.int64(lead) & 0x07) << 18)
                    | ((np.int64(buf[i + 1]) & 0x3F) << 12)
                    | ((np.int64(buf[i + 2]) & 0x3F) << 6)
                    | (np.int64(buf[i + 3]) & 0x3F)
                )
            cls = _char_class(cp, table)
            if cls == _WORD:
                if pending_space and pos > out_starts[d]:
                    out[pos] = 0x20
                    pos += 1
                pending_space = False
                non_ascii[d] = True
                for k in range(n):
                    out[pos] = buf[i + k]
                    pos += 1
            elif cls == _SEPARATOR:
                pending_space = True
            i += n
        out_ends[d] = pos


def _fold(text: str) -> bytes:
    # surrogatepass: a lone surrogate from JSON must not crash ingest; it is a separator.
    return unicodedata.normalize("NFKC", text).lower().encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class _Normalized:
    """A batch of normalized texts as one UTF-8 buffer, ready for hashing without more copies."""

    buf: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @staticmethod
    def pack(parts: Sequence[bytes]) -> _Normalized:
        lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        ends = np.cumsum(lengths)
        return _Normalized(np.frombuffer(b"".join(parts), dtype=np.uint8), ends - lengths, ends)

    def raw(self, i: int) -> bytes:
        return self.buf[self.starts[i] : self.ends[i]].tobytes()


def _strip(folded: Sequence[bytes]) -> tuple[_Normalized, np.ndarray]:
    """Run the word-splitting kernel; also say which outputs kept non-ASCII characters."""
    src = _Normalized.pack(folded)
    out = np.empty(max(src.buf.shape[0], 1), dtype=np.uint8)
    out_starts = np.empty_like(src.starts)
    out_ends = np.empty_like(src.ends)
    non_ascii = np.zeros(len(folded), dtype=np.bool_)
    _normalize_kernel(src.buf, src.starts, src.ends, _char_classes(), out, out_starts, out_ends, non_ascii)
    return _Normalized(out, out_starts, out_ends), non_ascii


def _fixed_point(normalized: bytes) -> bytes:
    """Re-fold until stable: dropping a separator can join a letter to a combining mark
    that NFKC then composes, and normalize() must be idempotent (a stored document's
    normalized text has to map to the same key again)."""
    for _ in range(8):
        again = _strip([_fold(normalized.decode("utf-8"))])[0].raw(0)
        if again == normalized:
            break
        normalized = again
    return normalized


def _normalize_batch(texts: Sequence[str]) -> _Normalized:
    norm, non_ascii = _strip([_fold(t) for t in texts])
    changed = {}
    for i in np.flatnonzero(non_ascii).tolist():  # ASCII output is always stable
        raw = norm.raw(i)
        fixed = _fixed_point(raw)
        if fixed != raw:
            changed[i] = fixed
    if not changed:
        return norm
    return _Normalized.pack([changed[i] if i in changed else norm.raw(i) for i in range(len(texts))])


def normalize(text: str) -> str:
    """NFKC, lowercase, punctuation and symbols to spaces, whitespace collapsed.

    So that copies differing only in case, punctuation, layout or compatibility
    characters (full-width letters, ligatures) get the same key. Soft hyphens and
    zero-width characters vanish instead of splitting a word.
    """
    return _normalize_batch([text]).raw(0).decode("utf-8")


def _key_of(normalized_utf8: bytes) -> str:
    return hashlib.blake2b(normalized_utf8, digest_size=16).hexdigest()


def content_key(text: str) -> str:
    """32 hex digits identifying the normalized text: the document id and the exact-dedup key."""
    return _key_of(_normalize_batch([text]).raw(0))


# --------------------------------------------------------------------------- MinHash

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_EMPTY = np.uint32(0xFFFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def _mix64(z):
    """splitmix64's finalizer: every input bit affects every output bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def _shingle_hashes(buf, start, end, ngram, words, shingles):
    """Hash each word, then each run of `ngram` consecutive words, into 64 bits (MinHash uses the top 32).

    A text shorter than `ngram` words is one shingle of all its words (as FineWeb
    does), so short documents still get a signature. Returns the shingle count.
    """
    nw = 0
    h = _FNV_OFFSET
    in_word = False
    for i in range(start, end):
        c = buf[i]
        if c == 0x20:
            if in_word:
                words[nw] = _mix64(h)
                nw += 1
                h = _FNV_OFFSET
                in_word = False
        else:
            h = (h ^ np.uint64(c)) * _FNV_PRIME
            in_word = True
    if in_word:
        words[nw] = _mix64(h)
        nw += 1
    if nw == 0:
        return 0
    span = min(ngram, nw)
    count = nw - span + 1
    # Position weights make the hash order-sensitive; the products are independent
    # (no serial chain of mixes), and one mix at the end spreads them.
    weights = np.empty(span, dtype=np.uint64)
    for j in range(span):
        weights[j] = _mix64(_GOLDEN * np.uint64(j + 1)) | np.uint64(1)
    for i in range(count):
        s = np.uint64(span)
        for j in range(span):
            s += words[i + j] * weights[j]
        shingles[i] = _mix64(s)
    return count


@njit(cache=True, nogil=True)
def _signature_kernel(buf, starts, ends, ngram, mul, add, out):
    """MinHash with the multiply-shift family h_p(x) = (a_p * x + b_p) mod 2^64 >> 32.

    Multiply-shift is strongly universal for 32-bit x and costs one multiply per
    permutation; the shingle hashes it sees are already well mixed, so min-wise
    bias is negligible (the tests compare with exact Jaccard and datasketch).
    """
    n_perm = mul.shape[0]
    longest = 1
    for d in range(starts.shape[0]):
        longest = max(longest, ends[d] - starts[d])
    words = np.empty(longest // 2 + 1, dtype=np.uint64)
    shingles = np.empty(longest // 2 + 1, dtype=np.uint64)
    for d in range(starts.shape[0]):
        count = _shingle_hashes(buf, starts[d], ends[d], ngram, words, shingles)
        for p in range(n_perm):
            a = mul[p]
            b = add[p]
            lo = np.uint64(0xFFFFFFFF)
            for i in range(count):
                v = (a * (shingles[i] >> np.uint64(32)) + b) >> np.uint64(32)
                if v < lo:
                    lo = v
            out[d, p] = lo


@lru_cache(maxsize=8)
def _permutations(seed: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Permutation p depends only on (seed, p), so band i means the same for any band count."""
    rng = np.random.Generator(np.random.PCG64(seed))
    params = rng.integers(0, 2**64, size=(_MAX_PERM, 2), dtype=np.uint64, endpoint=False)
    mul = np.ascontiguousarray(params[:num_perm, 0] | np.uint64(1))
    add = np.ascontiguousarray(params[:num_perm, 1])
    mul.setflags(write=False)
    add.setflags(write=False)
    return mul, add


_MAX_PERM = 64 * 32  # bands.le * rows_per_band.le


def _signatures_of(norm: _Normalized, policy: DedupPolicy) -> np.ndarray:
    mul, add = _permutations(policy.seed, policy.num_perm)
    out = np.empty((norm.starts.shape[0], policy.num_perm), dtype=np.uint32)
    _signature_kernel(norm.buf, norm.starts, norm.ends, policy.ngram_size, mul, add, out)
    return out


def minhash_signatures(texts: Sequence[str], policy: DedupPolicy) -> np.ndarray:
    """(n, num_perm) uint32 MinHash signatures of the normalized texts' word n-grams.

    A text with no words gets all 0xFFFFFFFF (so all empty texts look alike).
    """
    return _signatures_of(_normalize_batch(texts), policy)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of agreeing permutations: an unbiased estimate of n-gram Jaccard similarity."""
    if a.shape != b.shape:
        raise ValueError(f"signatures differ in length: {a.shape} vs {b.shape}")
    return float(np.mean(a == b))


@njit(cache=True, nogil=True)
def _all_shingles_kernel(buf, starts, ends, ngram, out, out_ends):
    """Every text's 64-bit shingle hashes, in text order, one after another in `out`."""
    longest = 1
    for d in range(starts.shape[0]):
        longest = max(longest, ends[d] - starts[d])
    words = np.empty(longest // 2 + 1, dtype=np.uint64)
    shingles = np.empty(longest // 2 + 1, dtype=np.uint64)
    pos = 0
    for d in range(starts.shape[0]):
        count = _shingle_hashes(buf, starts[d], ends[d], ngram, words, shingles)
        out[pos : pos + count] = shingles[:count]
        pos += count
        out_ends[d] = pos


def shingle_hashes(texts: Sequence[str], ngram_size: int) -> list[np.ndarray]:
    """Per normalized text, the 64-bit hashes of its word `ngram_size`-grams in order (the shingles MinHash sees).

    For containment, which MinHash cannot estimate: echo detection samples them
    (policies/echo_containment.py) to ask how much of one text is in another.
    """
    norm = _normalize_batch(texts)
    out = np.empty(int(np.sum((norm.ends - norm.starts) // 2 + 1)) if texts else 0, dtype=np.uint64)
    out_ends = np.empty(len(texts), dtype=np.int64)
    _all_shingles_kernel(norm.buf, norm.starts, norm.ends, ngram_size, out, out_ends)
    return np.split(out[: int(out_ends[-1])], out_ends[:-1]) if texts else []


# --------------------------------------------------------------------------- LSH bands


@njit(cache=True, nogil=True)
def _band_hash_kernel(sigs, bands, rows, out):
    for d in range(sigs.shape[0]):
        for j in range(bands):
            h = _mix64(_GOLDEN * np.uint64(j + 1))
            for r in range(rows):
                h = _mix64(h ^ np.uint64(sigs[d, j * rows + r]))
            out[d, j] = h


def band_keys(signatures: np.ndarray, policy: DedupPolicy) -> list[list[str]]:
    """Per document, one 18-character key per band: 2 hex digits of band index + 16 of its rows' hash.

    64 bits per band make accidental collisions negligible at millions of documents
    (about n**2 / 2**65 per band) while keeping each Redis key short.
    """
    sigs = np.ascontiguousarray(signatures, dtype=np.uint32)
    if sigs.ndim != 2 or sigs.shape[1] != policy.num_perm:
        raise ValueError(f"signatures must have shape (n, {policy.num_perm}), got {signatures.shape}")
    hashes = np.empty((sigs.shape[0], policy.bands), dtype=np.uint64)
    _band_hash_kernel(sigs, policy.bands, policy.rows_per_band, hashes)
    prefixes = [f"{j:02x}" for j in range(policy.bands)]
    return [[p + format(h, "016x") for p, h in zip(prefixes, row, strict=True)] for row in hashes.tolist()]


# --------------------------------------------------------------------------- one call for ingest


@dataclass(frozen=True)
class DocumentKeys:
    """Everything the store needs to dedup and file one document."""

    content_key: str
    band_keys: tuple[str, ...]


def document_keys(texts: Sequence[str], policy: DedupPolicy) -> list[DocumentKeys]:
    """Content key and (when ``policy.near``) band keys, normalizing each text once.

    The content key is computed even with ``exact`` off: it is still the document id.
    """
    norm = _normalize_batch(texts)
    keys = [_key_of(norm.raw(i)) for i in range(len(texts))]
    if not policy.near or not texts:
        return [DocumentKeys(k, ()) for k in keys]
    bands = band_keys(_signatures_of(norm, policy), policy)
    return [DocumentKeys(k, tuple(b)) for k, b in zip(keys, bands, strict=True)]


__all__ = [
    "DedupPolicy",
    "DocumentKeys",
    "band_keys",
    "candidate_probability",
    "content_key",
    "document_keys",
    "estimated_jaccard",
    "index_fingerprint",
    "minhash_signatures",
    "near_duplicate_threshold",
    "normalize",
    "shingle_hashes",
]
