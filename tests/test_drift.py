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


VI = [
    "Hà Nội là thủ đô của nước Cộng hòa xã hội chủ nghĩa Việt Nam, nằm ở đồng bằng sông Hồng.",
    "Mùa thu ở miền Bắc thường mát mẻ, trời trong xanh và có gió nhẹ thổi qua những con phố cũ.",
    "Người dân thường uống trà vào buổi sáng trước khi bắt đầu một ngày làm việc mới.",
    "Thư viện của trường đại học mở cửa từ bảy giờ sáng đến chín giờ tối mỗi ngày trong tuần.",
]
ZH = [
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "秋天的天气很凉爽，人们喜欢在公园里散步和聊天。",
    "图书馆每天早上七点开门，晚上九点关门，学生可以在里面安静地学习。",
    "这个城市有很多历史悠久的建筑，吸引了来自世界各地的游客。",
]


def test_a_new_language_under_the_served_tokenizer_shows_in_fertility_at_once(tmp_path):
    """An English BPE spends several times more tokens per character on Vietnamese or Chinese: drift is strong
    from fertility alone, while English against English stays at noise level."""
    from daemon.dev.sample_corpus import english_docs
    from daemon.dev.tiny_model import build_tiny_llama
    from daemon.jobs.drift_probe import drift_stats
    from daemon.jobs.model_loader import load_causal_lm, load_tokenizer

    english = english_docs(120, 1024, seed=3)
    path = build_tiny_llama(tmp_path / "en", english, seed=0)
    model, tok = load_causal_lm(path), load_tokenizer(path)
    p = DriftPolicy()
    same = drift_stats(model, tok, english[:40], english[40:80], max_len=64)
    assert same.fertility_ratio is not None and same.fertility_ratio < p.fertility_none
    for lang, texts in (("vi", VI), ("zh", ZH)):
        s = drift_stats(model, tok, texts, english[40:80], max_len=64)
        assert s.fertility_ratio is not None and s.fertility_ratio > p.fertility_strong, (lang, s.derived())
        assert drift_score(s, p) == 1.0
        assert adjust_for_drift(s, p, ReplayPolicy()).to_record()["stats"]["fertility_ratio"] == s.fertility_ratio
