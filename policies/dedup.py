"""Exact and near-duplicate keys (STUB: being implemented)."""
from __future__ import annotations

from policies.base import Section


class DedupPolicy(Section):
    pass
