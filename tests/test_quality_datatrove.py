"""Our filter chain agrees with datatrove's own FineWeb heuristic chain on a mixed corpus.

datatrove runs GopherRepetition -> GopherQuality -> C4Quality(filter_no_terminal_punct=False)
-> FineWebQuality with default thresholds (FineWeb's order, minus its fastText language
filter, which downloads a model); ours runs the same families with the language check off.
datatrove tokenizes with spaCy, most of this test's time, so the corpus is the smallest that still reaches
every rule the 5,000-document one reached (1,500 documents: the same 26 rules reject something).
"""

from __future__ import annotations

from collections import Counter

import pytest

from daemon.dev.sample_corpus import mixed_corpus
from policies.quality import QualityPolicy, build_filters, judge

pytestmark = pytest.mark.slow  # runs datatrove's reference chain (spaCy) over 1,500 documents

N_DOCS = 1500
# Rules no document of `mixed_corpus` reaches first (an earlier rule rejects it, or no junk kind breaks them);
# every other rule of our chain must reject some document, so the comparison covers it.
NOT_REACHED = {
    "empty_document",
    "gopher_above_max_words",
    "gopher_below_min_mean_word_length",
    "gopher_ellipsis_ratio",
    "fineweb_list_ratio",
}
MIN_AGREEMENT = 0.97


def _datatrove_verdicts(docs: list[str]) -> list[tuple[bool, str | None, str]]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    chain = [
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
    ]
    out = []
    for i, text in enumerate(docs):
        doc = Document(text=text, id=str(i))
        verdict: tuple[bool, str | None, str] = (True, None, "")
        for f in chain:
            r = f.filter(doc)
            if r is not True:
                reason = r[1] if isinstance(r, tuple) else "rejected"
                verdict = (False, f"{type(f).__name__}:{reason}", "")
                break
        else:
            verdict = (True, None, doc.text)
        out.append(verdict)
    return out


def test_verdicts_agree_with_datatrove() -> None:
    docs = mixed_corpus(N_DOCS, seed=0)
    theirs = _datatrove_verdicts(docs)
    filters = build_filters(QualityPolicy.model_validate({"language": {"enabled": False}}))
    ours = [judge(d, filters) for d in docs]

    agree = sum(o.accepted == t[0] for o, t in zip(ours, theirs))
    agreement = agree / len(docs)
    disagreements = Counter(f"datatrove={t[1] or 'accept'} ours={o.reason or 'accept'}" for o, t in zip(ours, theirs) if o.accepted != t[0])
    both_accepted = [(o, t) for o, t in zip(ours, theirs) if o.accepted and t[0]]
    same_text = sum(o.text == t[2] for o, t in both_accepted)
    print(
        f"\nagreement {agreement:.4f} on {len(docs)} docs "
        f"(datatrove accepts {sum(t[0] for t in theirs)}, we accept {sum(o.accepted for o in ours)})"
    )
    print(f"cleaned text identical on {same_text}/{len(both_accepted)} documents both accepted")
    for k, v in disagreements.most_common():
        print(f"  {v:5d}  {k}")

    assert sum(t[0] for t in theirs) > 0.1 * len(docs), "the corpus must hold documents datatrove accepts"
    assert sum(not t[0] for t in theirs) > 0.3 * len(docs), "and documents it rejects"
    fired = Counter(o.reason for o in ours if not o.accepted)
    assert {f.reason for f in filters} - NOT_REACHED <= set(fired), "a smaller corpus no longer reaches every rule"
    assert agreement >= MIN_AGREEMENT
    assert same_text >= 0.97 * len(both_accepted)
