"""Replay: how much old data a round mixes in, and which documents the replay store keeps.

Replay is the cheapest defence against forgetting in continual pre-training
(Ibrahim et al. 2024, arXiv 2403.08763): 5% replay was enough under a weak
distribution shift and 25% under a strong one. Replay costs compute that could
go to new data, so the ratio follows the measured drift between those anchors
(policies/drift.py gives the drift score) unless the operator fixes it.

The ratio is the *fraction of the round's training tokens* that are replay:
ratio 0.25 means one replay token for every three new ones.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from policies.base import Section


class ReplayPolicy(Section):
    mode: Literal["fixed", "drift"] = Field(
        default="drift", description="fixed: always fixed_ratio; drift: interpolate between the anchors by drift score"
    )
    fixed_ratio: float = Field(default=0.05, ge=0, le=0.9)
    ratio_no_drift: float = Field(default=0.01, ge=0, le=0.9, description="ratio at drift score 0")
    ratio_weak: float = Field(default=0.05, ge=0, le=0.9, description="ratio at drift score 0.5 (weak shift; Ibrahim et al. 2024: 5%)")
    ratio_strong: float = Field(default=0.25, ge=0, le=0.9, description="ratio at drift score 1 (strong shift; Ibrahim et al. 2024: 25%)")
    cap: float = Field(default=0.5, ge=0, le=0.9, description="never more replay than this, whatever the drift")
    reservoir_docs: int = Field(default=100_000, ge=1, le=100_000_000, description="size cap of the replay reservoir, in documents")

    @model_validator(mode="after")
    def _monotone(self) -> ReplayPolicy:
        if not self.ratio_no_drift <= self.ratio_weak <= self.ratio_strong:
            raise ValueError("replay: need ratio_no_drift <= ratio_weak <= ratio_strong")
        return self


def interpolate_anchors(score: float, at0: float, at_half: float, at1: float) -> float:
    """Piecewise-linear through (0, at0), (0.5, at_half), (1, at1); score is clamped to [0, 1]."""
    s = min(max(score, 0.0), 1.0)
    if s <= 0.5:
        return at0 + (at_half - at0) * (s / 0.5)
    return at_half + (at1 - at_half) * ((s - 0.5) / 0.5)


def replay_ratio(policy: ReplayPolicy, drift_score: float | None) -> float:
    """Replay fraction of a round's tokens. No measurement (None) is treated as a weak shift, the cautious middle."""
    if policy.mode == "fixed":
        ratio = policy.fixed_ratio
    else:
        ratio = interpolate_anchors(
            0.5 if drift_score is None else drift_score, policy.ratio_no_drift, policy.ratio_weak, policy.ratio_strong
        )
    return min(ratio, policy.cap)


def replay_tokens_for(new_tokens: int, ratio: float) -> int:
    """Replay tokens to mix with `new_tokens` so that replay is `ratio` of the total."""
    if not 0 <= ratio < 1:
        raise ValueError(f"replay ratio must be in [0, 1), got {ratio}")
    return round(new_tokens * ratio / (1.0 - ratio))


def reservoir_slot(seen: int, cap: int, u: float) -> int | None:
    """Algorithm R (Vitter 1985): where the item that arrives after `seen` earlier items goes, or None to drop it.

    `u` is a uniform draw in [0, 1) supplied by the caller, so the decision is
    pure and replayable. While the reservoir has room the item takes the next
    slot; afterwards it replaces slot j = floor(u * (seen + 1)) when j < cap,
    which keeps every item seen so far in the reservoir with probability cap/(seen+1).
    """
    if cap <= 0:
        return None
    if seen < cap:
        return seen
    j = int(u * (seen + 1))
    return j if j < cap else None
