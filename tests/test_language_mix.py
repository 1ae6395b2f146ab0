"""Language shares of a round: targets met through the replay draw (policies/language_mix.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from policies.config import Policy, PolicyError, parse_policy
from policies.language_mix import draw_by_language, replay_shares, shares
from policies.quality import build_filters, judge


def test_replay_is_drawn_towards_the_language_the_new_data_lacks():
    # 900 bytes of Vietnamese, replay 25% of the mixture: 1200 in all, 300 replay; a fifth English = 240 English bytes.
    wanted = replay_shares({"vi": 900.0}, 0.25, {"en": 0.2})
    assert wanted == pytest.approx({"en": 0.8, "*": 0.2})
    # Targets the new data already meets ask nothing of replay; needs beyond the replay budget are scaled together.
    assert replay_shares({"vi": 700.0, "en": 300.0}, 0.2, {"en": 0.2}) == pytest.approx({"en": 0.0, "*": 1.0})
    assert replay_shares({"vi": 1000.0}, 0.1, {"en": 0.3, "de": 0.3}) == pytest.approx({"en": 0.5, "de": 0.5})
    assert replay_shares({"vi": 1.0}, 0.0, {"en": 0.5}) == {} and replay_shares({"vi": 1.0}, 0.3, {}) == {}


@dataclass(frozen=True)
class Doc:
    language: str | None
    bytes: int
    i: int


def test_draw_matches_the_wanted_shares_as_far_as_documents_allow():
    pool = [Doc(lang, 10, i) for i, lang in enumerate(["en", "vi", "de", "en", "vi", "en", "fr", "en"] * 25)]
    drawn = draw_by_language(pool, {"en": 0.8, "*": 0.2})
    got = shares({g: sum(d.bytes for d in drawn if (d.language == "en") == (g == "en")) for g in ("en", "*")})
    assert got["en"] == pytest.approx(0.8, abs=0.02)
    assert [d.i for d in drawn] == sorted(d.i for d in drawn)  # order kept: the draw is reproducible
    # A language the reservoir lacks cannot be drawn: the rest keeps its proportions among what exists.
    assert draw_by_language(pool, {"ja": 1.0}) == pool
    assert draw_by_language(pool, {}) == pool


def test_policy_refuses_shares_that_cannot_be_met():
    assert parse_policy({"language_mix": {"targets": {"en": 0.25}}}).language_mix.targets == {"en": 0.25}
    with pytest.raises(PolicyError, match="language_mix.targets"):
        parse_policy({"language_mix": {"targets": {"en": 0.7, "de": 0.6}}})
    with pytest.raises(PolicyError, match="language_mix.targets"):
        parse_policy({"language_mix": {"targets": {"en": 1.5}}})
    assert Policy().language_mix.targets == {}


def test_the_verdict_carries_the_language_a_round_mixes_by():
    filters = build_filters(parse_policy({"quality": {"language": {"languages": ["vi", "en"]}}}).quality)
    vi = (
        "Hà Nội là thủ đô của nước Cộng hòa xã hội chủ nghĩa Việt Nam và là thành phố lớn thứ hai của cả nước. "
        "Thành phố nằm ở đồng bằng sông Hồng, có lịch sử hơn một nghìn năm và nhiều di tích văn hóa quan trọng. "
        "Người dân ở đây thường uống trà vào buổi sáng và đi dạo quanh hồ vào buổi tối khi trời mát mẻ hơn."
    )
    assert judge(vi, filters).language == "vi"
