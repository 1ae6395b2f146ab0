"""Provenance rules, the domain classifier, and the round selection: outliers, score order, domain shares, synthetic cap."""

from __future__ import annotations

import random

import pytest

from policies.collapse import CollapsePolicy, suspected
from policies.config import PolicyError, parse_policy
from policies.curation import PASSED_OVER, PPL_HIGH, PPL_LOW, Candidate, CurationPolicy, domain_quotas, select_round, shares_by
from policies.provenance import SOURCE_DENIED, SOURCE_NOT_ALLOWED, ProvenancePolicy, classify, source_rejection

CODE = [
    "def parse(path): import json; return json.load(open(path)) # returns the parsed object",
    "class Cache: def get(self, key): return self.store[key] if key in self.store else None",
    "for i in range(10): print(i) # loop over the integers with a for statement",
]
NEWS = [
    "The minister said on Tuesday that the election would be held in the spring after weeks of talks.",
    "Shares fell sharply in early trading as investors weighed the central bank's decision on rates.",
    "The mayor announced a new plan for the city's buses and trams, to be voted on next month.",
]


def test_provenance_classes_follow_trust_order():
    policy = ProvenancePolicy(human_sources=["newsroom/*"], synthetic_sources=["bot/*"])
    assert classify("x", "newsroom/a", {}, policy).cls == "human"
    assert classify("x", "bot/a", {}, policy).cls == "synthetic"
    assert classify("x", "newsroom/a", {"generator": "llama-3"}, policy).rule == "meta_generator"
    assert classify("x", "web", {"synthetic": True}, policy).cls == "synthetic"
    # a message cannot make itself human; an untrusted generator field is ignored
    assert classify("x", "web", {"synthetic": False}, policy).cls == "unknown"
    assert classify("x", "web", {"generator": "gpt"}, ProvenancePolicy(trust_generator_field=False)).cls == "unknown"
    assert classify("x", "bot/a", {"synthetic": False}, policy).cls == "synthetic"  # the operator's rule wins


def test_source_rules_reject_with_their_reason():
    policy = ProvenancePolicy(allowed_sources=["feeds/*"], denied_sources=["feeds/spam*"])
    assert source_rejection("feeds/news", policy) is None
    assert source_rejection("feeds/spam-1", policy) == SOURCE_DENIED
    assert source_rejection("other", policy) == SOURCE_NOT_ALLOWED
    assert source_rejection(None, policy) == SOURCE_NOT_ALLOWED
    assert source_rejection(None, ProvenancePolicy()) is None


def test_domain_from_meta_source_then_classifier():
    policy = ProvenancePolicy(domain_sources={"law": ["courts/*"]}, classifier={"examples": {"code": CODE, "news": NEWS}})
    assert classify("anything", None, {"domain": "Medicine"}, policy).domain == "medicine"
    assert classify("anything", "courts/x", {}, policy).domain_rule == "source"
    code = classify("import os; def main(): return os.getcwd() # print the path", None, {}, policy)
    news = classify("The minister told investors the election and the bank's rates would wait until spring.", None, {}, policy)
    assert (code.domain, code.domain_rule) == ("code", "classifier")
    assert news.domain == "news"
    assert classify("zzz qqq", None, {}, policy).domain == "unknown"  # nothing known: below min_confidence


def test_policy_refuses_bad_curation_and_collapse_sections():
    with pytest.raises(PolicyError, match="curation.domain_targets"):
        parse_policy({"curation": {"domain_targets": {"a": 0.7, "b": 0.6}}})
    with pytest.raises(PolicyError, match="select: score needs"):
        parse_policy({"curation": {"select": "score"}})
    with pytest.raises(PolicyError, match="echo_topics"):
        parse_policy({"ingest": {"topics": ["docs"]}, "collapse": {"echo_topics": ["docs"]}})
    with pytest.raises(PolicyError, match="replay_admits"):
        parse_policy({"collapse": {"replay_admits": ["people"]}})
    with pytest.raises(PolicyError, match="both human and synthetic"):
        parse_policy({"provenance": {"human_sources": ["a"], "synthetic_sources": ["a"]}})
    with pytest.raises(PolicyError, match="provenance.classifier.examples"):
        parse_policy({"provenance": {"classifier": {"examples": {"only": ["one"]}}}})


def _cands(n: int, seed: int = 0, **kw) -> list[Candidate]:
    rng = random.Random(seed)
    return [Candidate(key=f"k{i}", bytes=1000, nll=rng.gauss(3.0, 0.1), **kw) for i in range(n)]


def test_outliers_are_dropped_by_robust_z_both_ways():
    cands = _cands(50)
    cands[3] = Candidate("k3", 1000, nll=1.0)  # templated / echo: far too easy
    cands[7] = Candidate("k7", 1000, nll=7.0)  # noise
    sel = select_round(cands, 10**9, CurationPolicy(score="perplexity"), CollapsePolicy())
    assert sel.dropped == {"k3": PPL_LOW, "k7": PPL_HIGH}
    assert len(sel.chosen) == 48 and "k3" not in sel.chosen
    off = select_round(cands, 10**9, CurationPolicy(drop_low_z=None, drop_high_z=None), CollapsePolicy())
    assert off.dropped == {} and len(off.chosen) == 50


def test_score_order_fills_the_budget_with_the_lowest_nll():
    cands = _cands(40)
    sel = select_round(cands, 10_000, CurationPolicy(score="perplexity", select="score"), CollapsePolicy())
    best = sorted((c for c in cands if c.key not in sel.dropped), key=lambda c: c.nll or 0)[:10]
    assert set(sel.chosen) == {c.key for c in best}
    assert sel.chosen == [c.key for c in cands if c.key in sel.chosen]  # buffer order kept
    oldest = select_round(cands, 10_000, CurationPolicy(), CollapsePolicy())
    assert oldest.chosen == [f"k{i}" for i in range(10)] and oldest.passed == []  # a FIFO wait is not a judgement


def test_domain_quotas_and_short_domains():
    assert domain_quotas({"a": 10e3, "b": 10e3, "*": 10e3}, {"a": 0.5, "b": 0.3}, 1000) == pytest.approx({"a": 500, "b": 300, "*": 200})
    q = domain_quotas({"a": 100, "b": 10e3, "*": 10e3}, {"a": 0.5, "b": 0.3}, 1000)  # a is short: its quota goes to b and *
    assert q["a"] == 100 and q["b"] == pytest.approx(900 * 0.3 / 0.5) and q["*"] == pytest.approx(900 * 0.2 / 0.5)
    cands = [Candidate(f"k{i}", 100, domain=["news", "code", "law"][i % 3]) for i in range(300)]
    sel = select_round(cands, 10_000, CurationPolicy(domain_targets={"news": 0.6, "code": 0.3}), CollapsePolicy())
    got = shares_by(cands, sel.chosen, "domain")
    assert got == pytest.approx({"news": 0.6, "code": 0.3, "law": 0.1}, abs=0.011)
    assert set(sel.waiting.values()) == {"domain_share", "budget"}


def test_synthetic_cap_holds_and_binds():
    real = [Candidate(f"h{i}", 100, provenance="human") for i in range(50)]
    synth = [Candidate(f"s{i}", 100, provenance="synthetic") for i in range(50)]
    flagged = [Candidate(f"d{i}", 100, detector=0.5, suspected=suspected(0.5, CollapsePolicy(detector_threshold=0.8))) for i in range(10)]
    cands = synth + flagged + real  # synthetic first in the buffer: the cap, not the order, must decide
    col = CollapsePolicy(synthetic_cap=0.2)
    sel = select_round(cands, 10**6, CurationPolicy(), col)
    share = shares_by(cands, sel.chosen, "provenance").get("synthetic", 0.0)
    assert 0.15 <= share <= 0.2 and sel.cap_binding
    assert all(k in sel.chosen for k in (c.key for c in real))
    assert {sel.waiting[k] for k in sel.waiting} == {"synthetic_cap"} and set(sel.passed) == set(sel.waiting)
    floor = select_round(cands, 10**6, CurationPolicy(), CollapsePolicy(synthetic_cap=0.9, real_floor=0.75))
    assert shares_by(cands, floor.chosen, "provenance")["synthetic"] <= 0.25 + 1e-9  # the floor lowers the cap


def test_a_document_passed_over_too_often_is_dropped():
    cands = [Candidate(f"s{i}", 100, provenance="synthetic", passes=4) for i in range(5)] + [Candidate("h", 100, provenance="human")]
    sel = select_round(cands, 10**6, CurationPolicy(max_passes=5), CollapsePolicy(synthetic_cap=0.0))
    assert sel.chosen == ["h"] and set(sel.dropped.values()) == {PASSED_OVER} and len(sel.dropped) == 5


def test_calibration_flags_at_most_the_allowed_share_of_people():
    from policies.collapse import calibrate

    human = [0.9 + i / 1000 for i in range(200)]  # 0.900 .. 1.099
    generated = [0.6 + i / 1000 for i in range(100)] + [0.95]  # one generation looks human
    cal = calibrate(human, generated, max_false_positive=0.02)
    assert cal.human_flagged <= 0.02 and cal.threshold == pytest.approx(0.904)
    assert cal.generated_caught == pytest.approx(100 / 101)
    with pytest.raises(ValueError):
        calibrate([], generated)


def test_nothing_selectable_selects_nothing():
    """With a zero cap and only synthetic documents, nothing is chosen (the round runner then fails SNAPSHOT, never falls
    back to the oldest documents)."""
    cands = [Candidate(f"s{i}", 100, provenance="synthetic") for i in range(3)]
    sel = select_round(cands, 10**6, CurationPolicy(), CollapsePolicy(synthetic_cap=0.0))
    assert sel.chosen == [] and set(sel.waiting.values()) == {"synthetic_cap"}


def test_the_domain_metric_label_takes_only_the_policys_domains_and_other():
    """Producers write any meta.domain; the round-share gauge names only the policy's domains, 'unknown' and 'other'."""
    from daemon import metrics as M
    from daemon.round_record import CurationRecord
    from daemon.rounds.pool_choice import export_shares

    policy = parse_policy(
        {
            "curation": {"domain_targets": {"news": 0.5, "*": 0.5}},
            "provenance": {"domain_sources": {"law": ["courts/*"]}, "classifier": {"examples": {"code": CODE, "news": NEWS}}},
        }
    )
    assert policy.named_domains() == {"news", "law", "code", "unknown"}
    docs = [("n1", "feeds/a", {"domain": "news"}), ("c1", "courts/x", {}), ("z1", "web", {"domain": "Producer-Invented-7f3a"})]
    docs += [(f"z{i}", "web", {"domain": f"spam-{i}"}) for i in range(2, 6)]
    cands = [Candidate(k, 100, domain=classify("text", src, meta, policy.provenance).domain) for k, src, meta in docs]

    def share(value: str) -> float | None:
        return M.REGISTRY.get_sample_value("cptd_round_share", {"kind": "domain", "value": value})

    export_shares(CurationRecord(domains=shares_by(cands, [c.key for c in cands], "domain")), policy)
    assert share("other") == pytest.approx(5 / 7) and share("news") == pytest.approx(1 / 7) and share("law") == pytest.approx(1 / 7)
    assert share("code") == 0.0 and share("unknown") == 0.0
    samples = [s for m in M.REGISTRY.collect() if m.name == "cptd_round_share" for s in m.samples]
    labels = {s.labels["value"] for s in samples if s.labels["kind"] == "domain"}
    assert not [v for v in labels if "spam" in v or "producer" in v], labels
    export_shares(CurationRecord(domains={"code": 1.0}), policy)  # the next round: no value of the last one lingers
    assert share("code") == 1.0 and share("other") == 0.0 and share("news") == 0.0
