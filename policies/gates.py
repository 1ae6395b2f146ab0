"""Eval results + thresholds -> accept or reject a round, and which checkpoint to ship.

Pure: the scores come in as values (daemon/jobs/evaluator.py measures them), the
thresholds from the policy file's `gates` section. A round is rejected with
*every* reason, not the first, so an operator fixes the data or the policy
once. Several checkpoints of one round may be scored because loss on old data
often spikes early in a round and recovers (the "stability gap"): the best
checkpoint that passes is chosen, not simply the last one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from policies.base import Section


class GatePolicy(Section):
    max_forgetting_nats: float | None = Field(
        default=0.05,
        ge=0,
        description="largest allowed rise of held-out replay loss (candidate - serving), nats/token; null disables",
    )
    max_forgetting_relative: float | None = Field(
        default=0.03,
        ge=0,
        le=1,
        description="largest allowed rise of replay loss relative to the serving loss; null disables. "
        "A candidate passes if it is within EITHER bound (the absolute one keeps noise on low-loss models from "
        "rejecting, the relative one scales to models whose loss is large)",
    )
    min_adaptation_nats: float = Field(
        default=0.0,
        ge=-10,
        le=10,
        description="smallest required drop of held-out new-data loss (serving - candidate), nats/token",
    )
    max_suite_drop: float = Field(default=0.02, ge=0, le=1, description="largest allowed accuracy drop on any regression suite (absolute)")
    suite_max_drop: dict[str, float] = Field(default_factory=dict, description="per-suite overrides of max_suite_drop, by suite name")
    canaries_must_pass: bool = Field(default=True, description="every canary prompt keeps its exact greedy continuation")
    select_by: Literal["net_gain", "adaptation", "forgetting"] = Field(
        default="net_gain",
        description="how to rank passing checkpoints: net_gain = adaptation - forgetting, adaptation = largest "
        "new-data gain, forgetting = least replay-loss rise",
    )


@dataclass(frozen=True)
class ModelScores:
    """What evaluation measured for one model; the serving model is scored the same way."""

    name: str
    new_nll: float  # held-out new documents, nats/token
    replay_nll: float  # held-out replay documents, nats/token
    new_tokens: int | None = None  # tokens scored in each set (None: not reported); 0 makes its loss nan
    replay_tokens: int | None = None
    suites: dict[str, float] = field(default_factory=dict)  # suite name -> accuracy in [0, 1]
    canaries: int = 0
    canary_failures: tuple[str, ...] = ()


# One code per rule, like the quality filters' reason codes: metrics and alerts key on the code, people read the message.
REASONS = {
    "heldout_empty": "a held-out set had no token to score (no replay documents, or no new ones held out)",
    "non_finite_loss": "a held-out loss is nan/inf: forgetting or adaptation cannot be measured",
    "forgetting_exceeded": "held-out replay loss rose more than max_forgetting_nats / max_forgetting_relative allow",
    "adaptation_below_min": "held-out new-data loss fell less than min_adaptation_nats",
    "suite_not_scored": "a regression suite scored for the serving model was not scored for the candidate",
    "suite_accuracy_dropped": "a regression suite's accuracy dropped more than max_suite_drop (or its override)",
    "canaries_failed": "a canary prompt lost its exact greedy continuation",
    "no_candidate": "the round produced no scored checkpoint",
    "chosen": "accepted: the best passing checkpoint by select_by",
}


EMPTY_HELDOUT = {
    "replay": "the replay held-out set is empty, so forgetting cannot be measured: the replay reservoir has no documents "
    "(a new deployment, or a Redis that lost its data); seed it with `cptd seed-replay`",
    "new": "the new-data held-out set is empty, so adaptation cannot be measured: raise rounds.heldout_frac or rounds.heldout_max_docs",
}


@dataclass(frozen=True)
class GateReason:
    code: str  # a key of REASONS
    message: str
    checkpoint: str | None = None

    def __str__(self) -> str:
        return f"{self.checkpoint}: {self.message}" if self.checkpoint else self.message


@dataclass(frozen=True)
class CheckpointVerdict:
    name: str
    passed: bool
    reasons: tuple[GateReason, ...]
    adaptation: float
    forgetting: float


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reasons: tuple[GateReason, ...]  # accepted: ("chosen", then every failing checkpoint's reasons); rejected: all reasons
    chosen: str | None
    verdicts: tuple[CheckpointVerdict, ...] = ()


def _fmt(x: float) -> str:
    return f"{x:+.4f}"


def check_checkpoint(policy: GatePolicy, serving: ModelScores, cand: ModelScores) -> CheckpointVerdict:
    """Every rule of the gate against one checkpoint; all failing rules are reported, not the first."""
    reasons: list[GateReason] = []

    def fail(code: str, message: str) -> None:
        reasons.append(GateReason(code, message, cand.name))

    adaptation = serving.new_nll - cand.new_nll
    forgetting = cand.replay_nll - serving.replay_nll
    empty = [kind for kind in ("new", "replay") if 0 in (getattr(serving, f"{kind}_tokens"), getattr(cand, f"{kind}_tokens"))]
    if empty:  # not a nan of the model's making: say which set was empty and what fills it
        fail("heldout_empty", "; ".join(EMPTY_HELDOUT[kind] for kind in empty))
    elif not all(math.isfinite(x) for x in (serving.new_nll, serving.replay_nll, cand.new_nll, cand.replay_nll)):
        fail("non_finite_loss", "non-finite loss (nan/inf) in held-out evaluation")
    else:
        bounds = []
        if policy.max_forgetting_nats is not None:
            bounds.append(policy.max_forgetting_nats)
        if policy.max_forgetting_relative is not None:
            bounds.append(policy.max_forgetting_relative * abs(serving.replay_nll))
        if bounds and forgetting > max(bounds):
            fail(
                "forgetting_exceeded",
                f"forgetting {_fmt(forgetting)} nats on replay ({forgetting / serving.replay_nll:+.2%}) exceeds "
                f"the allowed {max(bounds):.4f} nats (max of {policy.max_forgetting_nats} nats, "
                f"{policy.max_forgetting_relative} relative)",
            )
        if adaptation < policy.min_adaptation_nats:
            fail(
                "adaptation_below_min", f"adaptation {_fmt(adaptation)} nats on new data is below the required {policy.min_adaptation_nats}"
            )
    for suite, base_acc in sorted(serving.suites.items()):
        limit = policy.suite_max_drop.get(suite, policy.max_suite_drop)
        acc = cand.suites.get(suite)
        if acc is None:
            fail("suite_not_scored", f"suite {suite}: not scored for the candidate")
        elif base_acc - acc > limit:
            fail(
                "suite_accuracy_dropped",
                f"suite {suite}: accuracy {acc:.4f} dropped {base_acc - acc:.4f} from {base_acc:.4f} (max {limit})",
            )
    if policy.canaries_must_pass and cand.canary_failures:
        fail("canaries_failed", f"{len(cand.canary_failures)}/{cand.canaries} canaries failed: " + ", ".join(cand.canary_failures))
    return CheckpointVerdict(cand.name, not reasons, tuple(reasons), adaptation, forgetting)


def _rank(policy: GatePolicy, v: CheckpointVerdict) -> float:
    if policy.select_by == "adaptation":
        return v.adaptation
    if policy.select_by == "forgetting":
        return -v.forgetting
    return v.adaptation - v.forgetting


def gate_round(policy: GatePolicy, serving: ModelScores, candidates: Sequence[ModelScores]) -> GateDecision:
    """Check every checkpoint; accept the best that passes, else reject with every checkpoint's reasons."""
    if not candidates:
        return GateDecision(False, (GateReason("no_candidate", "no candidate checkpoint was scored"),), None)
    verdicts = tuple(check_checkpoint(policy, serving, c) for c in candidates)
    passing = [v for v in verdicts if v.passed]
    failing = tuple(r for v in verdicts for r in v.reasons)
    if not passing:
        return GateDecision(False, failing, None, verdicts)
    # Later checkpoints win ties: they saw more data.
    best = max(reversed(passing), key=lambda v: _rank(policy, v))
    why = GateReason(
        "chosen",
        f"chose {best.name}: adaptation {_fmt(best.adaptation)} nats, forgetting {_fmt(best.forgetting)} nats "
        f"(best {policy.select_by} of {len(passing)} passing / {len(verdicts)} scored)",
    )
    return GateDecision(True, (why,) + failing, best.name, verdicts)
