"""The base of every policy-file section model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors: a typo in a hand-edited policy file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_shares(v: dict[str, float]) -> dict[str, float]:
    """Target shares of a mixture (per language, per domain): each in [0, 1], together at most 1."""
    bad = {k: x for k, x in v.items() if not 0 <= x <= 1}
    if bad:
        raise ValueError(f"shares must be in [0, 1]: {bad}")
    if sum(v.values()) > 1 + 1e-9:
        raise ValueError(f"shares add up to {sum(v.values()):.3f} > 1")
    return v
