"""Document quality filters (STUB: being implemented)."""
from __future__ import annotations

from dataclasses import dataclass

from policies.base import Section


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str | None = None


class QualityPolicy(Section):
    pass
