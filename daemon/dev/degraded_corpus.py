"""A labelled buffer of good and degraded English documents that all pass the heuristic filters.

For measuring model-based data quality (perplexity under the served model): the
FineWeb/Gopher/C4 heuristics of policies/quality.py cannot see these
degradations, so whatever separates them has to come from the model.

Good documents are real English prose paragraphs (the standard library's
docstrings, `daemon.dev.sample_corpus._prose_pool`), composed as
`sample_corpus.english_docs` composes them. Degraded kinds, each built from the
same pool:

    shuffled   sentences of several good documents, shuffled across them and regrouped into paragraphs
    stuffed    a good document with a few of its own content words inserted again and again
               (single words, scattered: it still passes the n-gram repetition rules)
    mt_noise   machine-translation-looking text: words swapped within sentences, articles and some
               function words dropped, some words replaced by random words of the pool's vocabulary

Every document in the buffer passed `judge` at policy defaults; the buffer keeps
the C4-cleaned text, as ingest stores it. `exclude` keeps paragraphs out of the
pool (e.g. those a model was trained on, so that scores measure held-out text).
Deterministic per seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from daemon.dev.sample_corpus import _compose as compose
from daemon.dev.sample_corpus import _prose_pool

KINDS = ("shuffled", "stuffed", "mt_noise")
LABELS = ("good", *KINDS)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ARTICLES = {"a", "an", "the", "A", "An", "The"}
_FUNCTION = {"of", "to", "is", "are", "in", "for", "on", "by", "be", "that", "this", "it", "as", "at", "was", "which"}
_WORD = re.compile(r"^[A-Za-z]+$")


def _pool(exclude: Iterable[str]) -> tuple[str, ...]:
    banned = {p for text in exclude for p in text.split("\n")}
    pool = tuple(p for p in _prose_pool() if p not in banned)
    if len(pool) < 200:
        raise RuntimeError(f"only {len(pool)} prose paragraphs left after `exclude`")
    return pool


def _compose(rng: random.Random, pool: tuple[str, ...], target_bytes: int) -> str:
    """One document composed the way sample_corpus.english_docs composes them."""
    return compose(rng, pool, 1, target_bytes)[0]


def sentences(text: str) -> list[str]:
    return [s.strip() for par in text.split("\n") for s in _SENTENCE_END.split(par) if s.strip()]


def _shuffled(rng: random.Random, pool: tuple[str, ...], target_bytes: int) -> str:
    sents = [s for _ in range(3) for s in sentences(_compose(rng, pool, target_bytes))]
    rng.shuffle(sents)
    out: list[str] = []
    size = 0
    par: list[str] = []
    for s in sents:
        if size >= target_bytes:
            break
        par.append(s)
        size += len(s) + 1
        if len(par) >= rng.randint(2, 4):
            out.append(" ".join(par))
            par = []
    if par:
        out.append(" ".join(par))
    return "\n".join(out)


def _stuffed(rng: random.Random, pool: tuple[str, ...], target_bytes: int, density: float) -> str:
    doc = _compose(rng, pool, target_bytes)
    content = sorted({w.strip(".,;:!?()").lower() for w in doc.split() if len(w.strip(".,;:!?()")) >= 6 and w.strip(".,;:!?()").isalpha()})
    if len(content) < 3:
        return doc
    keywords = rng.sample(content, 3)
    lines = []
    for line in doc.split("\n"):
        words = line.split()
        out = []
        for w in words:
            out.append(w)
            if rng.random() < density:
                out.append(rng.choice(keywords))
        lines.append(" ".join(out))
    return "\n".join(lines)


def _mt_noise(rng: random.Random, pool: tuple[str, ...], target_bytes: int, vocab: list[str]) -> str:
    doc = _compose(rng, pool, target_bytes)
    out_pars = []
    for par in doc.split("\n"):
        out_sents = []
        for s in _SENTENCE_END.split(par):
            words = s.split()
            if len(words) < 3:
                out_sents.append(s)
                continue
            end = words[-1][-1] if words[-1][-1] in ".!?" else ""
            words[-1] = words[-1].rstrip(".!?")
            kept = []
            for w in words:
                if w in _ARTICLES and rng.random() < 0.7:
                    continue
                if w in _FUNCTION and rng.random() < 0.3:
                    continue
                if _WORD.match(w) and rng.random() < 0.12:
                    w = rng.choice(vocab)
                kept.append(w)
            for i in range(len(kept) - 1):  # local reordering, as word-by-word translation does
                if rng.random() < 0.3:
                    kept[i], kept[i + 1] = kept[i + 1], kept[i]
            if not kept:
                continue
            kept[0] = kept[0][:1].upper() + kept[0][1:]
            out_sents.append(" ".join(kept) + end)
        out_pars.append(" ".join(out_sents))
    return "\n".join(out_pars)


def degraded_buffer(
    n_good: int,
    n_bad: int,
    seed: int = 0,
    target_bytes: int = 1200,
    kinds: tuple[str, ...] = KINDS,
    exclude: Iterable[str] = (),
    stuff_density: float = 0.12,
) -> list[tuple[str, str]]:
    """`n_good` good and `n_bad` degraded documents (bad kinds round-robin), shuffled: [(text, label)].

    Only documents that pass the quality filters at `Policy()` defaults are kept (their C4-cleaned text).
    """
    from policies.config import Policy
    from policies.quality import build_filters, judge

    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; known: {KINDS}")
    rng = random.Random(seed)
    pool = _pool(exclude)
    vocab = sorted({w for p in pool for w in p.split() if _WORD.match(w) and w.islower()})
    filters = build_filters(Policy(name="degraded").quality)
    makers = {
        "good": lambda: _compose(rng, pool, target_bytes),
        "shuffled": lambda: _shuffled(rng, pool, target_bytes),
        "stuffed": lambda: _stuffed(rng, pool, target_bytes, stuff_density),
        "mt_noise": lambda: _mt_noise(rng, pool, target_bytes, vocab),
    }
    wanted = ["good"] * n_good + [kinds[i % len(kinds)] for i in range(n_bad)]
    out: list[tuple[str, str]] = []
    for label in wanted:
        for _ in range(200):
            text = makers[label]()
            verdict = judge(text, filters)
            if verdict.accepted:
                out.append((verdict.text or text, label))
                break
        else:
            raise RuntimeError(f"could not make a {label!r} document that passes the quality filters in 200 tries")
    rng.shuffle(out)
    return out


# Pointwise ratings (1..5) a careful annotator would give each kind: high for good prose, low on the criteria each
# degradation breaks. They stand in for an LLM's ratings when a rater is trained from the buffer's labels.
DERIVED_RATINGS: dict[str, dict[str, int]] = {
    "good": {"overall": 5, "coherence": 5, "semantic_density": 4, "professionalism": 4, "language_consistency": 5, "accuracy": 4},
    "shuffled": {"overall": 2, "coherence": 1, "semantic_density": 4, "professionalism": 3, "language_consistency": 5, "accuracy": 3},
    "stuffed": {"overall": 2, "coherence": 3, "semantic_density": 1, "professionalism": 1, "language_consistency": 4, "accuracy": 3},
    "mt_noise": {"overall": 1, "coherence": 2, "semantic_density": 3, "professionalism": 2, "language_consistency": 1, "accuracy": 2},
}


def annotation_lines(buffer: list[tuple[str, str]], domain: str = "technology") -> list[dict]:
    """Annotation lines for `cptd rater-train` ({"text", "ratings", "domain"}) from a labelled buffer."""
    return [{"text": text, "ratings": DERIVED_RATINGS[label], "domain": domain} for text, label in buffer]
