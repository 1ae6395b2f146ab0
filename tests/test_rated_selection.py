"""Selection by the rater's overall score (DataMan): top_k, overall_threshold, sample; with domain targets, the synthetic
cap, passes and unrated documents; the answer schema and its parser; the policy's refusals."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from policies.collapse import CollapsePolicy
from policies.config import PolicyError, parse_policy
from policies.curation import BELOW_THRESHOLD, PASSED_OVER, UNRATED, Candidate, CurationPolicy, candidate_domain, select_round, shares_by
from policies.rating import UNRATED_INVALID, UNRATED_RANGE, RaterPolicy, Rating, answer_pattern, judge_prompt, parse_answer

JUDGE = {"backend": "llm_judge", "url": "http://judge:8000", "model": "m"}


def cur(select: str, **kw) -> CurationPolicy:
    return CurationPolicy(select=select, rater=RaterPolicy(**{**JUDGE, **kw.pop("rater", {})}), **kw)


def rated(n: int, seed: int = 0, **kw) -> list[Candidate]:
    rng = random.Random(seed)
    return [Candidate(f"k{i}", 100, overall=float(rng.randint(1, 5)), **kw) for i in range(n)]


def test_top_k_takes_the_highest_overall_first_and_counts_passes():
    cands = rated(40)
    sel = select_round(cands, 1000, cur("top_k"), CollapsePolicy())
    want = sorted(cands, key=lambda c: -(c.overall or 0))[:10]  # stable: ties oldest first
    assert set(sel.chosen) == {c.key for c in want}
    assert sel.chosen == [c.key for c in cands if c.key in sel.chosen]  # buffer order kept
    assert min(c.overall or 0 for c in cands if c.key in sel.chosen) >= max(c.overall or 0 for c in cands if c.key in sel.waiting)
    assert set(sel.passed) == set(sel.waiting)  # a rated wait is a judgement: it counts towards max_passes


def test_overall_threshold_takes_what_is_good_enough_oldest_first():
    cands = rated(40)
    sel = select_round(cands, 1500, cur("overall_threshold", overall_threshold=3.0), CollapsePolicy())
    good = [c.key for c in cands if (c.overall or 0) >= 3.0]
    assert sel.chosen == good[:15]
    assert {k for k, why in sel.waiting.items() if why == BELOW_THRESHOLD} == {c.key for c in cands if (c.overall or 0) < 3.0}
    last = [Candidate("old", 100, overall=1.0, passes=4), Candidate("new", 100, overall=5.0)]
    sel = select_round(last, 1000, cur("overall_threshold", overall_threshold=2.0, max_passes=5), CollapsePolicy())
    assert sel.chosen == ["new"] and sel.dropped == {"old": PASSED_OVER}


def test_sample_follows_exp_overall_over_temperature_and_repeats_per_seed():
    cands = [Candidate(f"k{i}", 100, overall=1.0 + (i % 5)) for i in range(200)]  # 40 of each rating 1..5
    policy = cur("sample", temperature=1.0)
    a = select_round(cands, 2000, policy, CollapsePolicy(), seed="r00007")
    assert a == select_round(cands, 2000, policy, CollapsePolicy(), seed="r00007")  # a resumed round draws the same
    assert a.chosen != select_round(cands, 2000, policy, CollapsePolicy(), seed="r00008").chosen
    # Over many seeds, the first draw's rating follows softmax(overall / T).
    firsts: Counter[float] = Counter()
    for s in range(400):
        first = select_round(cands, 100, policy, CollapsePolicy(), seed=str(s)).chosen[0]
        firsts[next(c.overall for c in cands if c.key == first)] += 1
    z = sum(math.exp(r) for r in range(1, 6))
    assert firsts[5.0] / 400 == pytest.approx(math.exp(5) / z, abs=0.08)  # 0.64
    assert firsts[1.0] / 400 < 0.04
    hot = select_round(cands, 2000, cur("sample", temperature=100.0), CollapsePolicy(), seed="r00007")
    cold = select_round(cands, 2000, cur("sample", temperature=0.05), CollapsePolicy(), seed="r00007")
    mean = lambda sel: sum(next(c.overall or 0 for c in cands if c.key == k) for k in sel.chosen) / len(sel.chosen)  # noqa: E731
    assert mean(cold) == 5.0 and mean(hot) < 4.0


def test_unrated_documents_join_after_the_rated_or_wait_and_never_count_a_pass():
    cands = [Candidate(f"u{i}", 100, passes=4) for i in range(5)] + rated(5, seed=1)
    joined = select_round(cands, 800, cur("top_k", max_passes=5), CollapsePolicy())
    assert {f"k{i}" for i in range(5)} <= set(joined.chosen) and len(joined.chosen) == 8
    assert joined.dropped == {} and not [k for k in joined.passed if k.startswith("u")]  # unrated: no judgement made
    waited = select_round(cands, 800, cur("top_k", rater={"on_error": "wait"}, max_passes=5), CollapsePolicy())
    assert set(waited.chosen) == {f"k{i}" for i in range(5)}
    assert {k: v for k, v in waited.waiting.items() if k.startswith("u")} == {f"u{i}": UNRATED for i in range(5)}
    assert waited.dropped == {} and waited.passed == []


def test_rated_selection_keeps_domain_targets_and_the_synthetic_cap():
    rng = random.Random(3)
    cands = [
        Candidate(
            f"k{i}",
            100,
            domain=["law", "coding", "culture"][i % 3],
            provenance="synthetic" if i % 4 == 0 else "human",
            overall=float(rng.randint(1, 5)),
        )
        for i in range(300)
    ]
    for mode in ("top_k", "sample", "overall_threshold"):
        policy = cur(mode, overall_threshold=2.0, domain_targets={"law": 0.5, "coding": 0.3})
        sel = select_round(cands, 6000, policy, CollapsePolicy(synthetic_cap=0.1), seed="r1")
        assert shares_by(cands, sel.chosen, "domain") == pytest.approx({"law": 0.5, "coding": 0.3, "culture": 0.2}, abs=0.02), mode
        assert shares_by(cands, sel.chosen, "provenance").get("synthetic", 0) <= 0.1 + 1e-9 and sel.cap_binding, mode
        reasons = set(sel.waiting.values())
        assert {"domain_share", "synthetic_cap"} <= reasons, (mode, reasons)
    top = select_round(cands, 6000, cur("top_k", domain_targets={"law": 0.5}), CollapsePolicy(synthetic_cap=0.1))
    law = [c for c in cands if c.domain == "law" and not c.synthetic]
    assert sum(c.overall or 0 for c in law if c.key in top.chosen) / 30 > sum(c.overall or 0 for c in law) / len(law) + 1


def test_outliers_still_drop_under_a_rated_mode():
    cands = [Candidate(f"k{i}", 100, nll=3.0 + 0.01 * (i % 7), overall=5.0) for i in range(30)]
    cands[4] = Candidate("k4", 100, nll=9.0, overall=5.0)  # noise the judge liked
    sel = select_round(cands, 10**6, cur("top_k", score="perplexity"), CollapsePolicy())
    assert sel.dropped == {"k4": "ppl_high"} and len(sel.chosen) == 29


def test_an_unknown_ingest_domain_takes_the_raters():
    assert candidate_domain("law", "coding") == "law"
    assert candidate_domain("unknown", "coding") == "coding" and candidate_domain(None, "coding") == "coding"
    assert candidate_domain(None, None) == "unknown"


def test_answers_are_parsed_against_the_schema():
    r = RaterPolicy(**JUDGE, criteria=["coherence", "overall"], domains=["law", "coding"], scale=5)
    pattern = re.compile(answer_pattern(r))  # the compact object, nothing else: no whitespace for a judge to pad with
    assert pattern.fullmatch('{"coherence":4,"overall":3,"domain":"law"}')
    for bad in ('{"coherence": 4,"overall":3,"domain":"law"}', '{"coherence":6,"overall":3,"domain":"law"}',
                '{"overall":3,"coherence":4,"domain":"law"}', '{"coherence":4,"overall":3,"domain":"news"}'):  # fmt: skip
        assert not pattern.fullmatch(bad), bad
    odd = RaterPolicy(**JUDGE, criteria=["overall"], domains=["Law & Order (US)", "café"], scale=10)
    assert re.fullmatch(answer_pattern(odd), '{"overall":10,"domain":"Law & Order (US)"}')
    assert re.fullmatch(answer_pattern(odd), '{"overall":1,"domain":"café"}')
    assert parse_answer('{"coherence": 4, "overall": 3, "domain": "law"}', r) == Rating(
        overall=3.0, criteria={"coherence": 4.0, "overall": 3.0}, domain="law"
    )
    assert parse_answer('Sure! {"coherence": 4, "overall": 3, "domain": "law"} hope this helps', r).overall == 3.0  # type: ignore[union-attr]
    assert parse_answer('{"coherence": 4, "overall": 9, "domain": "law"}', r) == UNRATED_RANGE
    assert parse_answer('{"coherence": 4, "domain": "law"}', r) == UNRATED_INVALID
    assert parse_answer('{"coherence": 4, "overall": 3, "domain": "cooking"}', r) == UNRATED_INVALID
    assert parse_answer('{"coherence": true, "overall": 3}', r) == UNRATED_INVALID
    assert parse_answer("@ new 427, jum 86", r) == UNRATED_INVALID
    prompt = judge_prompt(r.model_copy(update={"max_doc_chars": 100}), "x" * 500)
    assert "x" * 100 in prompt and "x" * 101 not in prompt and "coherence, overall" in prompt and "law, coding" in prompt


def test_policy_refuses_a_rated_select_without_a_rater():
    for mode in ("top_k", "sample", "overall_threshold"):
        with pytest.raises(PolicyError, match=f"curation.select: {mode} needs curation.rater.backend"):
            parse_policy({"curation": {"select": mode, "overall_threshold": 3}})
    with pytest.raises(PolicyError, match="needs curation.overall_threshold"):
        parse_policy({"curation": {"select": "overall_threshold", "rater": JUDGE}})
    with pytest.raises(PolicyError, match="within the rater's scale"):
        parse_policy({"curation": {"select": "overall_threshold", "overall_threshold": 7, "rater": JUDGE}})
    with pytest.raises(PolicyError, match="temperature"):
        parse_policy({"curation": {"select": "sample", "temperature": 0, "rater": JUDGE}})
    with pytest.raises(PolicyError, match="must contain {text}"):
        parse_policy({"curation": {"rater": {**JUDGE, "prompt": "rate it"}}})
    p = parse_policy({"curation": {"select": "sample", "temperature": 0.5, "rater": JUDGE}})
    assert p.curation.rater.backend == "llm_judge" and p.curation.temperature == 0.5
