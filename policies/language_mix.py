"""Language shares of a round's training mixture: keep the original language while adapting to a new one.

Language-adaptation CPT keeps a share of the model's original language in every
round so that it is not forgotten (e.g. a fifth to a quarter of the tokens; the
Llama/Mistral language-adaptation reports and Ibrahim et al.'s replay results
agree that a modest share suffices). The new data is what arrived, so a round
reaches its targets through the replay it draws: the policy names a share of
the whole mixture (new + replay tokens) per language, and the replay draw is
weighted towards the languages the new data lacks. What each round achieved is
stored with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

from pydantic import Field, field_validator

from policies.base import Section, check_shares


class LanguageMixPolicy(Section):
    targets: dict[str, float] = Field(
        default_factory=dict,
        description="share of a round's training tokens (new + replay) per language, e.g. {en: 0.25} keeps a quarter English; "
        "met through the replay draw; empty: replay drawn without regard to language",
    )

    @field_validator("targets")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        return check_shares(v)


def shares(sizes: Mapping[str, float]) -> dict[str, float]:
    """Sizes per language -> shares of the total."""
    total = sum(sizes.values())
    return {k: v / total for k, v in sorted(sizes.items())} if total else {}


def replay_shares(new_sizes: Mapping[str, float], replay_ratio: float, targets: Mapping[str, float]) -> dict[str, float]:
    """Shares of the replay tokens per language that bring the whole mixture closest to `targets`.

    With N new tokens and replay ratio r, the mixture has T = N / (1 - r) tokens and R = r T of them replay.
    A targeted language needs max(0, target * T - new tokens in it) replay tokens; what the targets leave of R
    goes to languages without a target ("*"). If the needs exceed R they are scaled down together.
    """
    if not targets or replay_ratio <= 0:
        return {}
    n = sum(new_sizes.values())
    total = n / (1 - replay_ratio)
    r = total - n
    need = {lang: max(0.0, t * total - new_sizes.get(lang, 0.0)) for lang, t in targets.items()}
    want = sum(need.values())
    if want >= r:
        return {lang: x / want for lang, x in need.items()} if want else {}
    out = {lang: x / r for lang, x in need.items()}
    out["*"] = 1.0 - sum(out.values())
    return out


class SizedDoc(Protocol):
    """What the draw reads of a document: its detected language and its size."""

    @property
    def language(self) -> str | None: ...

    @property
    def bytes(self) -> int: ...


D = TypeVar("D", bound=SizedDoc)


def draw_by_language(docs: Sequence[D], wanted: Mapping[str, float]) -> list[D]:
    """A subset of `docs` whose byte shares match `wanted` as closely as the available documents allow: the
    language that runs out first sets the scale; docs keep their order.
    "*" stands for every language without its own share."""
    if not wanted:
        return list(docs)

    def group(d: SizedDoc) -> str:
        lang = d.language
        return lang if lang is not None and lang in wanted else "*"

    have: dict[str, float] = {}
    for d in docs:
        have[group(d)] = have.get(group(d), 0.0) + d.bytes
    live = {g: s for g, s in wanted.items() if s > 0 and have.get(g, 0) > 0}
    if not live:
        return list(docs)
    scale = min(have[g] / s for g, s in live.items())  # bytes of the whole selection
    budget = {g: s * scale for g, s in live.items()}
    out, used = [], dict.fromkeys(budget, 0.0)
    for d in docs:
        g = group(d)
        if g in budget and used[g] < budget[g]:
            out.append(d)
            used[g] += d.bytes
    return out
