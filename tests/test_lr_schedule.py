"""Shape checks of the learning-rate schedules (policies/lr_schedule.py)."""

import math

import pytest
from pydantic import ValidationError

from policies.lr_schedule import (
    SchedulePolicy,
    anneal,
    anneal_steps_for,
    constant,
    infinite,
    infinite_main,
    rewarm_cosine,
    round_lr,
    wsd,
)


def trace(fn, n):
    return [fn(s) for s in range(n)]


def nonincreasing(xs):
    return all(b <= a + 1e-15 for a, b in zip(xs, xs[1:]))


def increasing(xs):
    return all(b > a for a, b in zip(xs, xs[1:]))


def test_rewarm_cosine_defaults_warm_1pct_then_cosine_to_tenth_of_peak():
    lrs = trace(lambda s: rewarm_cosine(s, 1000, 3e-4), 1000)
    assert increasing(lrs[:10]) and lrs[9] == pytest.approx(3e-4)
    assert lrs[0] > 0
    assert nonincreasing(lrs[9:])
    assert lrs[-1] == pytest.approx(3e-5)
    # cosine: half way through the decay the LR is half way between peak and floor
    mid = 9 + (999 - 9) // 2
    assert lrs[mid] == pytest.approx(0.5 * (3e-4 + 3e-5), rel=1e-2)


def test_rewarm_cosine_longer_warmup_and_custom_floor():
    lrs = trace(lambda s: rewarm_cosine(s, 200, 1.0, floor=0.0, warmup_frac=0.1), 200)
    assert increasing(lrs[:20]) and lrs[19] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_wsd_phases_and_decay_shapes():
    n = 100
    curves = {k: trace(lambda s, k=k: wsd(s, n, 1.0, warmup_frac=0.05, decay_frac=0.2, decay=k), n) for k in ("linear", "cosine", "1-sqrt")}
    for lrs in curves.values():
        assert increasing(lrs[:5])
        assert all(x == 1.0 for x in lrs[4:80])
        assert nonincreasing(lrs[80:]) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    # 1-sqrt drops fastest early, cosine slowest, linear in between
    i = 84
    assert curves["1-sqrt"][i] < curves["linear"][i] < curves["cosine"][i]
    assert curves["linear"][89] == pytest.approx(0.5)


def test_constant_with_and_without_warmup():
    assert trace(lambda s: constant(s, 0.1), 5) == [0.1] * 5
    w = trace(lambda s: constant(s, 0.1, warmup_steps=4), 8)
    assert increasing(w[:4]) and w[3:] == [0.1] * 5


@pytest.mark.parametrize("cooldown", ["cosine", "inv_sqrt"])
def test_infinite_warmup_cooldown_constant_anneal(cooldown):
    kw = dict(
        warmup_steps=10, cooldown_steps=40, eta_max=1.0, eta_const=0.5, eta_min=0.05, anneal_start=150, anneal_steps=30, cooldown=cooldown
    )
    lrs = trace(lambda s: infinite(s, **kw), 180)
    assert increasing(lrs[:10]) and lrs[9] == pytest.approx(1.0)
    assert nonincreasing(lrs[10:50]) and lrs[10] == pytest.approx(1.0)
    assert all(x == 0.5 for x in lrs[50:150])
    assert nonincreasing(lrs[150:]) and lrs[-1] == pytest.approx(0.05)
    assert lrs[150] < 0.5


def test_infinite_inv_sqrt_cooldown_front_loads_the_drop():
    kw = dict(warmup_steps=1, cooldown_steps=100, eta_max=1.0, eta_const=0.2)
    at = 1 + 10  # 10% into the cooldown
    inv = infinite_main(at, cooldown="inv_sqrt", timescale=10, **kw)
    cos = infinite_main(at, cooldown="cosine", **kw)
    assert inv < cos
    # Ibrahim et al.'s form: eta_max + (eta_const - eta_max) * h(x)/h(1), h(x) = 1/sqrt(1+10x) - 1
    h = lambda x: 1 / math.sqrt(1 + 10 * x) - 1  # noqa: E731
    assert inv == pytest.approx(1.0 + (0.2 - 1.0) * h(0.1) / h(1.0))


def test_anneal_exponential_is_geometric_and_one_minus_sqrt_ends_at_min():
    exp = trace(lambda s: anneal(s, 10, 1.0, 0.01, "exp"), 10)
    ratios = [b / a for a, b in zip(exp, exp[1:])]
    assert all(r == pytest.approx(ratios[0]) for r in ratios) and ratios[0] < 1
    assert exp[-1] == pytest.approx(0.01)
    sq = trace(lambda s: anneal(s, 10, 1.0, 0.01, "1-sqrt"), 10)
    assert nonincreasing(sq) and sq[-1] == pytest.approx(0.01)


def test_round_lr_infinite_continues_the_main_line_across_rounds():
    p = SchedulePolicy(kind="infinite", warmup_steps=5, cooldown_steps=20, eta_max=1e-3, eta_const=5e-4, eta_min=5e-5, anneal_frac=0.2)
    main = 40
    a = anneal_steps_for(p, main)
    assert a == 8
    r1 = [round_lr(p, s, main, global_step0=0) for s in range(main + a)]
    r2 = [round_lr(p, s, main, global_step0=main) for s in range(main + a)]
    assert [ph for _, ph in r1] == ["main"] * main + ["anneal"] * a
    # round 2 does not re-warm: its main line sits at eta_const from its first step
    assert all(lr == 5e-4 for lr, _ in r2[:main])
    assert r1[0][0] < r1[4][0] == pytest.approx(1e-3)
    for r, g0 in ((r1, 0), (r2, main)):
        assert [lr for lr, _ in r[:main]] == [infinite_main(g0 + s, 5, 20, 1e-3, 5e-4) for s in range(main)]
        tail = [lr for lr, _ in r[main:]]
        assert nonincreasing(tail) and tail[-1] == pytest.approx(5e-5) and tail[0] < 5e-4


def test_round_lr_dispatches_other_kinds():
    for kind, fn in (
        ("rewarm_cosine", lambda s: rewarm_cosine(s, 50, 2e-4, 2e-5, 0.02)),
        ("wsd", lambda s: wsd(s, 50, 2e-4, 0.02, 0.2, "1-sqrt", 2e-5)),
        ("constant", lambda s: constant(s, 2e-4, 1)),
    ):
        p = SchedulePolicy(kind=kind, peak_lr=2e-4, warmup_frac=0.02)
        assert [round_lr(p, s, 50)[0] for s in range(50)] == trace(fn, 50)
        assert anneal_steps_for(p, 50) == 0


def test_schedule_policy_bounds():
    with pytest.raises(ValidationError):
        SchedulePolicy(eta_min=1e-3, eta_const=5e-4)
    with pytest.raises(ValidationError):
        SchedulePolicy(peak_lr=0.5)
    with pytest.raises(ValidationError):
        SchedulePolicy(anneal_frac=0.9)
