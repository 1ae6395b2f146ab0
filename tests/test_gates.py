"""Gate decisions: pure, from scores and the policy file's `gates` section."""

from __future__ import annotations

import math

import pytest

from policies.config import PolicyError, parse_policy
from policies.gates import GatePolicy, ModelScores, gate_round

SERVING = ModelScores("serving", new_nll=3.0, replay_nll=2.0, suites={"mc": 0.60}, canaries=2)


def cand(name: str, new: float, replay: float, mc: float = 0.60, canary_failures: tuple[str, ...] = ()) -> ModelScores:
    return ModelScores(name, new_nll=new, replay_nll=replay, suites={"mc": mc}, canaries=2, canary_failures=canary_failures)


def test_forgetting_over_threshold_is_rejected_with_reason():
    # 2.0 -> 2.1: +0.1 nats (+5%), over both 0.05 nats and 3% of 2.0 = 0.06 nats.
    d = gate_round(GatePolicy(), SERVING, [cand("last", new=2.5, replay=2.1)])
    assert not d.accepted and d.chosen is None
    assert len(d.reasons) == 1 and str(d.reasons[0]).startswith("last: forgetting +0.1000 nats")
    assert d.reasons[0].code == "forgetting_exceeded" and d.reasons[0].checkpoint == "last"


def test_forgetting_within_relative_bound_passes():
    # +0.055 nats is over 0.05 absolute but within 3% of 2.0 (0.06): either bound suffices.
    d = gate_round(GatePolicy(), SERVING, [cand("c", new=2.5, replay=2.055)])
    assert d.accepted and d.chosen == "c"
    strict = gate_round(GatePolicy(max_forgetting_relative=None), SERVING, [cand("c", new=2.5, replay=2.055)])
    assert not strict.accepted


def test_passing_mid_round_checkpoint_is_chosen_over_failing_last():
    ckpts = [
        cand("step-100", new=2.9, replay=2.02),  # passes, small gain
        cand("step-200", new=2.6, replay=2.03),  # passes, best net gain
        cand("step-300", new=2.4, replay=2.20),  # last: best adaptation but forgets
    ]
    d = gate_round(GatePolicy(), SERVING, ckpts)
    assert d.accepted and d.chosen == "step-200"
    assert str(d.reasons[0]).startswith("chose step-200") and d.reasons[0].code == "chosen"
    assert any(str(r).startswith("step-300: forgetting") and r.code == "forgetting_exceeded" for r in d.reasons)
    assert [v.passed for v in d.verdicts] == [True, True, False]


def test_every_reason_is_reported():
    bad = cand("c", new=3.1, replay=2.5, mc=0.40, canary_failures=("capital-of-france",))
    d = gate_round(GatePolicy(min_adaptation_nats=0.01), SERVING, [bad])
    text = " | ".join(map(str, d.reasons))
    assert not d.accepted and len(d.reasons) == 4
    for part in ("forgetting", "adaptation -0.1000", "suite mc", "1/2 canaries failed: capital-of-france"):
        assert part in text
    assert [r.code for r in d.reasons] == ["forgetting_exceeded", "adaptation_below_min", "suite_accuracy_dropped", "canaries_failed"]


def test_suite_override_and_missing_suite():
    p = GatePolicy(suite_max_drop={"mc": 0.25})
    assert gate_round(p, SERVING, [cand("c", new=2.9, replay=2.0, mc=0.40)]).accepted
    missing = ModelScores("c", new_nll=2.9, replay_nll=2.0, suites={})
    d = gate_round(p, SERVING, [missing])
    assert not d.accepted and "not scored" in str(d.reasons[0]) and d.reasons[0].code == "suite_not_scored"


def test_nan_loss_rejects_and_canaries_can_be_waived():
    nan = gate_round(GatePolicy(), SERVING, [cand("c", new=math.nan, replay=2.0)])
    assert not nan.accepted and nan.reasons[0].code == "non_finite_loss"
    waived = GatePolicy(canaries_must_pass=False)
    assert gate_round(waived, SERVING, [cand("c", new=2.9, replay=2.0, canary_failures=("x",))]).accepted
    empty = gate_round(GatePolicy(), SERVING, [])
    assert not empty.accepted and [r.code for r in empty.reasons] == ["no_candidate"]


def test_an_empty_replay_held_out_set_rejects_naming_the_empty_reservoir_not_a_nan():
    """A Redis that lost its data loses the replay reservoir: the replay held-out set is empty and its loss nan.
    The soak met this as "non-finite loss (nan/inf)", which sends the operator to look for a diverged model."""
    serving = ModelScores("serving", new_nll=3.0, replay_nll=math.nan, new_tokens=500, replay_tokens=0)
    d = gate_round(GatePolicy(), serving, [ModelScores("c", new_nll=2.9, replay_nll=math.nan, new_tokens=500, replay_tokens=0)])
    assert not d.accepted and [r.code for r in d.reasons] == ["heldout_empty"]
    assert "replay reservoir has no documents" in d.reasons[0].message and "cptd seed-replay" in d.reasons[0].message
    nan = ModelScores("c", new_nll=math.nan, replay_nll=2.0, new_tokens=500, replay_tokens=500)  # tokens scored: the model's nan
    assert gate_round(GatePolicy(), SERVING, [nan]).reasons[0].code == "non_finite_loss"


def test_selection_rule_is_configurable():
    ckpts = [cand("a", new=2.5, replay=2.04), cand("b", new=2.8, replay=1.99)]
    assert gate_round(GatePolicy(select_by="adaptation"), SERVING, ckpts).chosen == "a"
    assert gate_round(GatePolicy(select_by="forgetting"), SERVING, ckpts).chosen == "b"


def test_policy_file_gates_section_is_validated():
    p = parse_policy({"gates": {"max_forgetting_nats": 0.1, "suite_max_drop": {"mc": 0.05}}})
    assert p.gates.max_forgetting_nats == 0.1 and p.gates.suite_max_drop == {"mc": 0.05}
    with pytest.raises(PolicyError, match="gates.max_forgeting"):
        parse_policy({"gates": {"max_forgeting": 0.1}})
    with pytest.raises(PolicyError, match="gates.max_suite_drop"):
        parse_policy({"gates": {"max_suite_drop": 2}})


def test_every_reason_code_is_documented():
    from policies.gates import REASONS

    bad = cand("c", new=3.1, replay=2.5, mc=0.40, canary_failures=("x",))
    d = gate_round(GatePolicy(min_adaptation_nats=0.01), SERVING, [bad, cand("ok", new=2.5, replay=2.0)])
    assert d.accepted and {r.code for r in d.reasons} <= set(REASONS)
