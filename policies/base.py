"""The base of every policy-file section model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors: a typo in a hand-edited policy file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
