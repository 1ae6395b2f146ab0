"""Drift statistics -> score -> replay ratio and peak LR (policies/drift.py). The probe on a real model is in test_train.py."""

import pytest
from pydantic import ValidationError

from policies.drift import DriftPolicy, DriftStats, adjust_for_drift, apply_to_schedule, drift_score, js_distance
from policies.lr_schedule import SchedulePolicy
from policies.replay import ReplayPolicy


def stats(gap, js):
    return DriftStats(loss_new=2.0 * (1 + gap), loss_ref=2.0, js_distance=js, tokens_new=1000, tokens_ref=1000)


def test_js_distance_bounds_and_symmetry():
    a, b = {1: 5, 2: 5}, {3: 4, 4: 1}
    assert js_distance(a, a) == 0.0
    assert js_distance(a, b) == pytest.approx(1.0)
    c = {1: 3, 2: 1, 5: 2}
    assert js_distance(a, c) == pytest.approx(js_distance(c, a))
    assert 0 < js_distance(a, c) < 1
    with pytest.raises(ValueError):
        js_distance({}, a)


def test_score_anchors_and_either_statistic_counts():
    p = DriftPolicy()
    assert drift_score(stats(0.0, 0.0), p) == 0.0
    assert drift_score(stats(p.ppl_gap_weak, 0.0), p) == pytest.approx(0.5)
    assert drift_score(stats(p.ppl_gap_strong, 0.0), p) == pytest.approx(1.0)
    assert drift_score(stats(0.0, p.js_weak), p) == pytest.approx(0.5)
    assert drift_score(stats(5.0, 0.9), p) == 1.0
    assert drift_score(stats(-0.3, 0.0), p) == 0.0  # new data easier than reference: nothing to adapt to


def test_more_drift_means_more_replay_and_higher_peak():
    p, r = DriftPolicy(), ReplayPolicy()
    levels = [stats(g, j) for g, j in ((0.0, 0.01), (0.06, 0.1), (0.3, 0.3), (2.0, 0.6))]
    ds = [adjust_for_drift(s, p, r) for s in levels]
    assert [d.level for d in ds] == ["none", "weak", "strong", "strong"]
    assert all(b.replay_ratio > a.replay_ratio for a, b in zip(ds, ds[1:3]))
    assert all(b.peak_lr > a.peak_lr for a, b in zip(ds, ds[1:3]))
    assert ds[0].replay_ratio == pytest.approx(r.ratio_no_drift) and ds[0].peak_lr == pytest.approx(p.peak_lr_min)
    assert ds[-1].replay_ratio == pytest.approx(r.ratio_strong) and ds[-1].peak_lr == pytest.approx(p.peak_lr_max)
    rec = ds[1].to_record()
    assert rec["stats"]["ppl_gap"] == pytest.approx(0.06) and rec["replay_ratio"] == ds[1].replay_ratio


def test_unmeasured_is_treated_as_weak():
    d = adjust_for_drift(None, DriftPolicy(), ReplayPolicy())
    assert d.level == "unmeasured" and d.replay_ratio == pytest.approx(0.05)


def test_apply_to_schedule_moves_rewarm_but_not_the_infinite_main_line():
    d = adjust_for_drift(stats(2.0, 0.6), DriftPolicy(peak_lr_max=4e-4, warmup_frac_max=0.05), ReplayPolicy())
    s = apply_to_schedule(SchedulePolicy(kind="rewarm_cosine", peak_lr=1e-4), d)
    assert s.peak_lr == pytest.approx(4e-4) and s.warmup_frac == pytest.approx(0.05)
    inf = SchedulePolicy(kind="infinite")
    assert apply_to_schedule(inf, d) == inf


def test_policy_validates_threshold_order():
    with pytest.raises(ValidationError):
        DriftPolicy(ppl_gap_weak=0.6, ppl_gap_strong=0.5)
    with pytest.raises(ValidationError):
        DriftPolicy(peak_lr_min=1e-3, peak_lr_max=1e-4)
