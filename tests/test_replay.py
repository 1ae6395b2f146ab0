"""Replay ratio by drift and Algorithm R decisions (policies/replay.py)."""

import random

import pytest
from pydantic import ValidationError

from policies.replay import ReplayPolicy, replay_ratio, replay_tokens_for, reservoir_slot


def test_drift_mode_hits_the_published_anchors_and_is_monotone():
    p = ReplayPolicy()
    assert replay_ratio(p, 0.0) == pytest.approx(0.01)
    assert replay_ratio(p, 0.5) == pytest.approx(0.05)
    assert replay_ratio(p, 1.0) == pytest.approx(0.25)
    assert replay_ratio(p, 7.0) == pytest.approx(0.25)
    xs = [replay_ratio(p, s / 20) for s in range(21)]
    assert all(b >= a for a, b in zip(xs, xs[1:]))
    assert replay_ratio(p, None) == pytest.approx(0.05)


def test_cap_and_fixed_mode():
    assert replay_ratio(ReplayPolicy(ratio_strong=0.8, cap=0.5), 1.0) == pytest.approx(0.5)
    fixed = ReplayPolicy(mode="fixed", fixed_ratio=0.3)
    assert replay_ratio(fixed, 0.0) == replay_ratio(fixed, 1.0) == pytest.approx(0.3)


def test_policy_rejects_unordered_anchors_and_out_of_range():
    with pytest.raises(ValidationError):
        ReplayPolicy(ratio_weak=0.3, ratio_strong=0.2)
    with pytest.raises(ValidationError):
        ReplayPolicy(cap=1.5)


def test_replay_tokens_make_up_the_ratio_of_the_mix():
    assert replay_tokens_for(300, 0.25) == 100
    assert replay_tokens_for(300, 0.0) == 0
    r = replay_tokens_for(12345, 0.05)
    assert r / (r + 12345) == pytest.approx(0.05, abs=1e-4)
    with pytest.raises(ValueError):
        replay_tokens_for(10, 1.0)


def test_reservoir_fills_then_replaces_or_drops():
    assert [reservoir_slot(i, 3, 0.99) for i in range(3)] == [0, 1, 2]
    assert reservoir_slot(3, 3, 0.0) == 0
    assert reservoir_slot(3, 3, 0.99) is None  # j = 3 >= cap
    assert reservoir_slot(9, 3, 0.25) == 2
    assert reservoir_slot(0, 0, 0.5) is None


def test_reservoir_keeps_every_item_with_equal_probability():
    n, cap, trials = 400, 40, 300
    rng = random.Random(7)
    kept = [0] * n
    for _ in range(trials):
        res = [None] * cap
        for i in range(n):
            j = reservoir_slot(i, cap, rng.random())
            if j is not None:
                res[j] = i
        for i in res:
            kept[i] += 1
    expect = trials * cap / n  # 30 per item
    quarter = n // 4
    means = [sum(kept[q * quarter : (q + 1) * quarter]) / quarter for q in range(4)]
    # early items must not be favoured over late ones (nor the reverse)
    assert all(m == pytest.approx(expect, rel=0.1) for m in means), means
