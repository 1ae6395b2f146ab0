"""Round triggering and shaping decisions (policies/round_policy.py)."""

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from policies.round_policy import (
    RoundsPolicy,
    TriggerCheck,
    TriggerPolicy,
    blackout_match,
    cron_trigger,
    estimate_tokens,
    next_swap_allowed,
    prune_rounds,
    should_start,
    split_heldout,
)

UTC = timezone.utc


def test_estimate_tokens_matches_the_buffer_metric():
    p = RoundsPolicy()
    assert [estimate_tokens(n, p) for n in (0, 3, 4, 7, 4000)] == [0, 0, 1, 1, 1000]
    assert estimate_tokens(10, RoundsPolicy(bytes_per_token=2.5)) == 4


def test_blackout_is_read_in_the_policy_time_zone():
    p = TriggerPolicy(blackout=["* 9-17 * * *"], timezone="Europe/Berlin")
    # 2024-01-15 (CET, UTC+1): 08:30 UTC is 09:30 in Berlin.
    assert blackout_match(datetime(2024, 1, 15, 8, 30, 59, tzinfo=UTC), p) == "* 9-17 * * *"
    assert blackout_match(datetime(2024, 1, 15, 7, 59, tzinfo=UTC), p) is None
    # 2024-07-15 (CEST, UTC+2): 07:00 UTC is already 09:00 in Berlin.
    assert blackout_match(datetime(2024, 7, 15, 7, 0, tzinfo=UTC), p) == "* 9-17 * * *"
    # The same instant given in another zone is the same minute.
    ny = datetime(2024, 1, 15, 3, 30, tzinfo=ZoneInfo("America/New_York"))  # 08:30 UTC
    assert blackout_match(ny, p) == "* 9-17 * * *"
    assert blackout_match(datetime(2024, 1, 15, 8, 30, tzinfo=UTC), TriggerPolicy(blackout=["* 9-17 * * *"])) is None


def test_blackout_returns_the_first_matching_expression():
    p = TriggerPolicy(blackout=["0 0 1 1 *", "*/15 * * * *", "* 12 * * *"])
    assert blackout_match(datetime(2024, 3, 1, 12, 30, tzinfo=UTC), p) == "*/15 * * * *"
    assert blackout_match(datetime(2024, 3, 1, 12, 31, tzinfo=UTC), p) == "* 12 * * *"
    assert blackout_match(datetime(2024, 3, 1, 13, 31, tzinfo=UTC), p) is None
    assert blackout_match(datetime(2024, 3, 1, 13, 31, tzinfo=UTC), TriggerPolicy()) is None


def test_weekday_numbers_mean_what_crontab_means():
    # crontab(5): 1-5 is Monday to Friday, 0 and 7 are Sunday (APScheduler 3 alone would read 0 as Monday).
    p = TriggerPolicy(blackout=["* * * * 1-5"])
    monday, saturday, sunday = (datetime(2024, 1, d, 12, tzinfo=UTC) for d in (15, 20, 21))
    assert blackout_match(monday, p) and not blackout_match(saturday, p) and not blackout_match(sunday, p)
    for expr in ("* * * * 0", "* * * * 7", "* * * * sun", "* * * * */6"):
        q = TriggerPolicy(blackout=[expr])
        assert blackout_match(sunday, q) == expr, expr
        assert not blackout_match(monday, q), expr
    assert cron_trigger("0 3 * * 1").get_next_fire_time(None, saturday) == datetime(2024, 1, 22, 3, tzinfo=UTC)


def test_naive_now_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        blackout_match(datetime(2024, 1, 1), TriggerPolicy())


def test_next_swap_allowed_skips_the_window():
    p = TriggerPolicy(blackout=["* 9-10 * * *", "0-14 11 * * *"], timezone="Europe/Berlin")
    free = datetime(2024, 1, 15, 7, 0, 30, tzinfo=UTC)  # 08:00:30 Berlin
    assert next_swap_allowed(free, p) is free
    inside = datetime(2024, 1, 15, 8, 20, 30, tzinfo=UTC)  # 09:20:30 Berlin
    # 09:00-10:59 and 11:00-11:14 Berlin are black: first free minute is 11:15 Berlin = 10:15 UTC.
    got = next_swap_allowed(inside, p)
    assert got == datetime(2024, 1, 15, 10, 15, tzinfo=UTC)
    assert got.tzinfo is UTC
    berlin = inside.astimezone(ZoneInfo("Europe/Berlin"))
    assert next_swap_allowed(berlin, p).tzinfo is berlin.tzinfo


def test_next_swap_allowed_gives_up_past_the_horizon():
    always = TriggerPolicy(blackout=["* * * * *"])
    assert next_swap_allowed(datetime(2024, 1, 1, tzinfo=UTC), always) is None
    weekend = TriggerPolicy(blackout=["* * * * 6,0"])
    sat = datetime(2024, 1, 20, 0, 0, tzinfo=UTC)
    assert next_swap_allowed(sat, weekend, horizon_minutes=60) is None
    assert next_swap_allowed(sat, weekend) == datetime(2024, 1, 22, 0, 0, tzinfo=UTC)


def test_next_swap_allowed_over_a_dst_change():
    # 2024-03-31 02:00 Berlin does not exist (clocks jump to 03:00); blackout 01:00-03:59 local.
    p = TriggerPolicy(blackout=["* 1-3 * * *"], timezone="Europe/Berlin")
    start = datetime(2024, 3, 31, 0, 30, tzinfo=UTC)  # 01:30 CET
    assert next_swap_allowed(start, p) == datetime(2024, 3, 31, 2, 0, tzinfo=UTC)  # 04:00 CEST


R = RoundsPolicy(min_tokens=100)
T = TriggerPolicy(min_gap_s=3600, buffer_tokens=500, cron="0 3 * * *", interval_s=60, drift_score=0.5)


def check(kind, *, now=10_000.0, last=None, active=False, tokens=1000, r=R, t=T) -> TriggerCheck:
    return should_start(kind, now, last, active, tokens, r, t)


def test_should_start_refuses_while_a_round_runs_and_on_an_empty_buffer():
    for kind in ("manual", "cron", "interval", "buffer", "drift"):
        assert check(kind, active=True) == TriggerCheck(False, "a round is already running")
        assert check(kind, tokens=0) == TriggerCheck(False, "buffer is empty")


def test_manual_ignores_gap_and_min_tokens():
    c = check("manual", now=10_000.0, last=9_999.0, tokens=1)
    assert c.start and "manual" in c.reason


def test_automatic_triggers_need_min_tokens():
    for kind in ("cron", "interval", "drift"):
        c = check(kind, tokens=99)
        assert not c.start and "99" in c.reason and "100" in c.reason
        assert check(kind, tokens=100).start


def test_buffer_trigger_rechecks_its_threshold():
    c = check("buffer", tokens=499)
    assert not c.start and "499" in c.reason and "500" in c.reason
    c = check("buffer", tokens=500)
    assert c == TriggerCheck(True, "buffer holds 500 tokens >= 500")


def test_automatic_triggers_keep_the_minimum_gap():
    for kind in ("cron", "interval", "buffer", "drift"):
        c = check(kind, now=10_000.0, last=10_000.0 - 3000.5)
        assert not c.start and "600 s" in c.reason, c.reason
        assert check(kind, now=10_000.0, last=10_000.0 - 3600).start
    assert check("cron", last=None).start


def test_should_start_reasons_name_the_trigger():
    assert "cron trigger" in check("cron").reason
    assert "interval trigger" in check("interval").reason
    assert "drift" in check("drift").reason
    with pytest.raises(ValueError, match="unknown trigger kind"):
        check("nightly")


def test_split_heldout_is_deterministic_and_keeps_order():
    keys = [f"doc{i:03d}" for i in range(200)]
    train, held = split_heldout(keys, 0.1, 256, "round-7")
    assert len(held) == 20 and len(train) == 180
    assert sorted(train + held) == keys
    assert train == [k for k in keys if k in set(train)]
    assert held == [k for k in keys if k in set(held)]
    # Same seed, any input order: the same documents are held out.
    train2, held2 = split_heldout(list(reversed(keys)), 0.1, 256, "round-7")
    assert set(held2) == set(held) and held2 == list(reversed(held))
    assert set(split_heldout(keys, 0.1, 256, "round-8")[1]) != set(held)
    # A smaller sample is a subset of a larger one (smallest digests first).
    assert set(split_heldout(keys, 0.05, 256, "round-7")[1]) <= set(held)


def test_split_heldout_bounds():
    keys = [f"k{i}" for i in range(100)]
    assert len(split_heldout(keys, 0.4, 7, "s")[1]) == 7
    assert split_heldout(keys, 0.0, 10, "s") == (keys, [])
    assert split_heldout(keys, 0.3, 0, "s") == (keys, [])
    assert split_heldout([], 0.3, 10, "s") == ([], [])
    assert split_heldout(["only"], 0.3, 10, "s") == (["only"], [])
    # floor(0.05 * 3) == 0, but a non-trivial request holds out one and trains on the rest.
    train, held = split_heldout(["a", "b", "c"], 0.05, 10, "s")
    assert len(held) == 1 and len(train) == 2
    train, held = split_heldout(["a", "b"], 0.49, 10, "s")
    assert len(held) == 1 and len(train) == 1
    with pytest.raises(ValueError):
        split_heldout(keys, 1.0, 10, "s")


def test_prune_rounds_keeps_newest_and_protected():
    finished = ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert prune_rounds(finished, set(), 3) == ["r1", "r2", "r3"]
    assert prune_rounds(finished, {"r2", "r5"}, 3) == ["r1", "r3"]
    assert prune_rounds(finished, {"r1", "r2", "r3"}, 3) == []
    assert prune_rounds(finished, set(), 10) == []
    assert prune_rounds([], {"r1"}, 1) == []
    assert prune_rounds(finished, {"r6"}, 1) == ["r1", "r2", "r3", "r4", "r5"]


@pytest.mark.parametrize("field", ["cron", "blackout"])
@pytest.mark.parametrize("expr", ["0 3 * *", "61 * * * *", "0 3 * * funday", "0 3 1 * 1", "0 3 * * 5-1"])
def test_invalid_cron_is_refused_with_the_expression_named(field, expr):
    value = expr if field == "cron" else ["* 9 * * *", expr]
    with pytest.raises(ValidationError) as e:
        TriggerPolicy(**{field: value})
    assert repr(expr) in str(e.value)
    assert field in str(e.value)


def test_policy_field_bounds_and_defaults():
    t = TriggerPolicy()
    assert (t.cron, t.interval_s, t.buffer_tokens, t.drift_score, t.blackout, t.timezone) == (None, None, None, None, [], "UTC")
    for bad in (
        {"interval_s": 0},
        {"buffer_tokens": 0},
        {"drift_score": 0},
        {"drift_score": 1.5},
        {"drift_probe_interval_s": 5},
        {"buffer_check_interval_s": 0.1},
        {"min_gap_s": -1},
        {"timezone": "Mars/Olympus"},
        {"crons": "0 3 * * *"},
    ):
        with pytest.raises(ValidationError):
            TriggerPolicy(**bad)
    with pytest.raises(ValidationError, match="Mars/Olympus"):
        TriggerPolicy(timezone="Mars/Olympus")
    r = RoundsPolicy()
    assert (r.budget_tokens, r.keep_rounds, r.suites, r.canaries) == (2_000_000, 3, {}, None)
    for bad in ({"heldout_frac": 0.5}, {"keep_rounds": 0}, {"watch_s": 3601}, {"lease_ttl_s": 2}, {"bytes_per_token": 0}):
        with pytest.raises(ValidationError):
            RoundsPolicy(**bad)
    assert TriggerPolicy(cron="0 3 * * *", blackout=["*/5 9-17 * * mon-fri"], timezone="Asia/Tokyo").cron == "0 3 * * *"


def test_min_gap_reason_counts_down():
    c = check("interval", now=1000.0, last=1000.0 - 100, t=T.model_copy(update={"min_gap_s": 120}))
    assert c == TriggerCheck(False, "last round started 100 s ago; 20 s of the 120 s minimum gap remain")


def test_next_swap_allowed_is_quick_over_a_week():
    import time

    p = TriggerPolicy(blackout=["* * * * *"])
    t0 = time.perf_counter()
    assert next_swap_allowed(datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=5), p) is None
    assert time.perf_counter() - t0 < 5
