"""Echoes that come back rewritten, cut or embedded are caught by containment; human documents of the domain are not.

Issue 26's acceptance, on daemon/dev/echo_corpus.py's offline sets (two domains,
completions and human documents from disjoint sources): at least 90% caught when
a quarter of the words are rewritten and the sentences reordered, when only the
first half comes back, and when the completion is a third of a human document;
at most 1% of human documents flagged. Resemblance alone (the echo index as it
was, `echo_containment: false`) misses most of these; bench/echo_recall.py prints
the full table.
"""

from __future__ import annotations

import pytest

from daemon.dev.echo_corpus import echo_cases, repeating_cases
from policies.collapse import CollapsePolicy
from policies.dedup import content_key
from policies.echo_containment import (
    SampleSize,
    _best_window,
    completion_keys,
    document_shingles,
    echo_verdict,
    match_echoes,
    shingle_count,
)


def _caught(docs: list[str], completions: list[str], policy: CollapsePolicy) -> float:
    return sum(m is not None for m in match_echoes(docs, completions, policy)) / len(docs)


@pytest.mark.parametrize("domain", ["stdlib", "handbook"])
def test_rewritten_cut_and_embedded_echoes_are_caught_and_people_are_not(domain: str) -> None:
    cases = echo_cases(domain, 200, 500, seed=2)
    policy = CollapsePolicy()
    caught = {e: _caught(docs, cases.completions, policy) for e, docs in cases.edited.items()}
    flagged = _caught(cases.human, cases.completions, policy)
    before = {e: _caught(cases.edited[e], cases.completions, policy.model_copy(update={"echo_containment": False})) for e in caught}
    print(f"\n{domain}: caught {caught}, human flagged {flagged:.1%}; resemblance alone {before}")
    assert caught["exact"] == 1.0 and caught["replace10"] >= 0.95
    assert caught["rewrite25"] >= 0.9 and caught["first_half"] >= 0.9 and caught["embedded"] >= 0.9
    assert flagged <= 0.01
    assert before["embedded"] < 0.7 and before["rewrite25"] < 0.5  # what containment adds


@pytest.mark.parametrize("domain", ["stdlib", "handbook"])
def test_short_completions_rewritten_by_a_quarter_are_caught_by_the_dense_sample(domain: str) -> None:
    """Completions as short as the demo model's (50 to 150 words) keep too few of their 1-in-4 sampled shingles
    under a quarter-rewrite; the dense sample of short texts catches them, and flags no more people."""
    cases = echo_cases(domain, 150, 400, seed=4, words=(50, 150))
    policy = CollapsePolicy()
    sparse_only = policy.model_copy(update={"echo_dense_words": 0})
    rewrites = cases.edited["rewrite25"]
    caught, before = _caught(rewrites, cases.completions, policy), _caught(rewrites, cases.completions, sparse_only)
    flagged = _caught(cases.human, cases.completions, policy)
    print(f"\n{domain}: rewrite25 of short completions caught {caught:.1%} (1-in-4 sample only: {before:.1%}), human {flagged:.1%}")
    assert caught >= 0.9 and before < 0.87
    assert flagged <= 0.01 and flagged <= _caught(cases.human, cases.completions, sparse_only) + 0.0025
    for edit in ("first_half", "embedded"):
        assert _caught(cases.edited[edit], cases.completions, policy) >= 0.95


@pytest.mark.parametrize("domain", ["stdlib", "handbook"])
def test_a_rewrite_is_caught_when_the_model_repeats_itself(domain: str) -> None:
    """Most shingles of a completion a model wrote again name the later copy; the candidates' entries still count
    what the document shares with each (the shingle pointers alone: 60% caught on these sets)."""
    cases = repeating_cases(domain, 60, 400, seed=6)
    policy = CollapsePolicy()
    caught, flagged = _caught(cases.edited["rewrite25"], cases.completions, policy), _caught(cases.human, cases.completions, policy)
    print(f"\n{domain}: rewrite25 among near-copies caught {caught:.1%}, human {flagged:.1%}")
    assert caught >= 0.9 and flagged <= 0.01


def test_only_short_texts_carry_dense_keys() -> None:
    policy = CollapsePolicy()
    short, long = " ".join(f"s{i}" for i in range(120)), " ".join(f"w{i}" for i in range(400))
    s_entry, l_entry = completion_keys([short, long], policy)
    assert shingle_count(s_entry).dense > 2 * shingle_count(s_entry).sparse > 0  # all 118 shingles, ~1 in 4 of them `c`
    assert shingle_count(s_entry).sparse + shingle_count(s_entry).dense == 118
    assert shingle_count(l_entry).dense == 0 and shingle_count(l_entry).sparse > 0
    s_doc, l_doc = document_shingles([short, long], policy)
    assert len(s_doc) == 118 and set(s_doc) == {k for k in s_entry if k[0] in "cd"}  # in text order, both samples
    assert all(k.startswith("c") for k in l_doc)
    off = policy.model_copy(update={"echo_dense_words": 0})
    assert shingle_count(completion_keys([short], off)[0]).dense == 0 and all(k.startswith("c") for k in document_shingles([short], off)[0])


def test_the_match_names_the_completion_and_each_direction_decides_alone() -> None:
    cases = echo_cases("handbook", 30, 0, seed=3)
    gens = cases.completions
    policy = CollapsePolicy()
    hits = match_echoes([cases.edited["first_half"][4], cases.edited["embedded"][7]], gens, policy)
    assert hits == [content_key(gens[4]), content_key(gens[7])]
    # the first half: most of a window of the document is in the completion, half of the completion is in the document
    only_window = policy.model_copy(update={"echo_completion_share": 1.0})
    assert match_echoes([cases.edited["first_half"][4]], gens, only_window) == [content_key(gens[4])]
    # embedded: the whole completion is in the document; a window-share threshold no window reaches does not matter
    only_completion = policy.model_copy(update={"echo_window_share": 1.0, "echo_window": 1024})
    assert match_echoes([cases.edited["embedded"][7]], gens, only_completion) == [content_key(gens[7])]


def _entry(keys: list[str], sparse: int, dense: int = 0) -> frozenset[str]:
    """An index entry holding `keys`, padded to `sparse` `c` keys and `dense` `d` keys."""
    pad = [f"cpad{i}" for i in range(sparse - sum(k[0] == "c" for k in keys))]
    return frozenset([*keys, *pad, *(f"dpad{i}" for i in range(dense - sum(k[0] == "d" for k in keys)))])


def test_verdict_needs_enough_shared_shingles_and_bands_decide_first() -> None:
    policy = CollapsePolicy(echo_min_shared=3, echo_window=4)
    doc = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"]
    two = ["A", "A", None, None, None, None, None, None]
    assert echo_verdict([None], doc, two, {"A": _entry(["c1", "c2"], 2)}, policy) is None  # all of A, but only 2 shared: chance
    three = ["A", None, "A", "A", None, None, None, None]
    assert echo_verdict([None], doc, three, {"A": _entry(["c1", "c3", "c4"], 100)}, policy) == "A"  # 3 of the first window of 4
    spread = ["A", None, None, None, "A", None, None, "A"]
    a3 = ["c1", "c5", "c8"]
    assert echo_verdict([None], doc, spread, {"A": _entry(a3, 100)}, policy) is None  # 3 shared, but 3% of A and 1 in any window
    assert echo_verdict([None], doc, spread, {"A": _entry(a3, 10)}, policy) == "A"  # 30% of a small A
    assert echo_verdict(["B", None], doc, three, {"A": _entry(a3, 100)}, policy) == "B"
    off = policy.model_copy(update={"echo_containment": False})
    assert echo_verdict([None], doc, three, {"A": _entry(["c1", "c3", "c4"], 100)}, off) is None
    # A key two completions share names the later one (B): A is named by 3 keys, but its entry holds 5 of the document's
    split = CollapsePolicy(echo_min_shared=5, echo_window=8, echo_candidate_hits=3)
    named = ["A", "B", "A", "B", "A", None, None, None]
    entries = {"A": _entry(["c1", "c2", "c3", "c4", "c5"], 100), "B": _entry(["c2", "c4"], 100)}
    assert echo_verdict([None], doc, named, entries, split) == "A"
    assert echo_verdict([None], doc, named, {"B": entries["B"]}, split) is None  # A evicted: only the keys naming it count
    assert echo_verdict([None], doc, named, entries, split.model_copy(update={"echo_candidate_hits": 4})) is None  # not a candidate
    # a short document and a short completion: `d` keys count too, against the dense bar and a window as many words long
    dense = CollapsePolicy(echo_min_shared=3, echo_window=4, echo_dense_sample_every=2, echo_dense_min_shared=4)  # window 8
    mixed = ["c1", "d1", "d2", "c2", "d3", "d4", "d5", "d6"]
    four = ["A", "A", "A", None, "A", None, None, None]  # one `c` key shared: the sparse rule cannot decide
    short_a = _entry(["c1", "d1", "d2", "d3"], 50, 150)
    assert echo_verdict([None], mixed, four, {"A": short_a}, dense) == "A"  # 4 of a window of 8
    assert echo_verdict([None], mixed, ["A", *[None] * 7], {"A": _entry(["c1"], 50)}, dense) is None  # a long A has no `d` keys
    assert echo_verdict([None], mixed, four, {"A": short_a}, dense.model_copy(update={"echo_dense_min_shared": 5})) is None
    assert _best_window([0, 2, 3, 9, 10, 11, 12], 20, 4) == 4 and _best_window([1, 5], 3, 10) == 2


def test_a_completion_keeps_a_bounded_sample_of_its_shingles() -> None:
    text = " ".join(f"w{i}" for i in range(5000))
    policy = CollapsePolicy()
    full, bands_only = completion_keys([text], policy)[0], completion_keys([text], policy.model_copy(update={"echo_containment": False}))[0]
    assert full[: policy.echo_bands] == bands_only and len(bands_only) == policy.echo_bands
    assert shingle_count(full) == SampleSize(policy.echo_max_shingles)  # ~1250 sampled of 4998 shingles, capped
    assert len(set(full)) == len(full)
