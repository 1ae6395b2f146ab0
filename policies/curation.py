"""Which buffered documents a round trains on: model-scored quality, domain shares and the synthetic cap.

Heuristic filters (policies/quality.py) catch junk; they do not rank what is
useful. The field picks continual-pretraining data with model ratings and
domain-aware mixing (DataMan: a small LM rates documents; training on the top
rated beat uniform sampling of more data). Here, before a round trains, the
serving model scores a pool of the oldest buffered documents (several times the
round's budget) by per-document perplexity, one `/v1/completions` request with
`echo` and `logprobs` per batch, and this module decides:

1. **Outliers** are dropped: a mean token NLL far *below* the pool's (robust
   z-score against the median and MAD) is templated text, boilerplate or an
   echo of the model; far *above* is noise. They leave the buffer and are listed
   in the round manifest with their reason, so nothing disappears unseen.
2. **Selection** fills the round's budget oldest first (`select: oldest`),
   best score first (`select: score`, lowest NLL among the non-outliers), or by
   the rater's overall score (policies/rating.py), as DataMan selects:
   `top_k` highest first; `overall_threshold` every document at or above the
   threshold, oldest first (the rest wait, `below_threshold`); `sample` draws
   without replacement with weights exp(overall / temperature) (Gumbel-top-k,
   seeded by the round, so a resumed round draws the same). Documents the rater
   could not rate join after the rated ones or wait (`rater.on_error`,
   `unrated`); they never count a pass, so a broken rater loses nothing.
3. **Domain shares**: with `domain_targets`, each domain gets at most its share
   of the budget; a domain with too few documents leaves its quota to the
   others in proportion. Documents of over-represented domains wait in the
   buffer for a later round; they are not dropped.
4. **Synthetic cap**: synthetic and suspected documents join in their turn
   while they stay within `collapse.effective_cap` of the budget; when the
   buffer does not fill the budget, the latest of them are given back until
   their share of what was chosen is within the cap. They wait too.

A document passed over in `max_passes` rounds in a row is dropped
(`passed_over`) so the pool, which is the oldest part of the buffer, cannot
silt up with documents no round wants.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from policies.base import Section, check_shares
from policies.collapse import CollapsePolicy
from policies.rating import RaterPolicy

PPL_LOW, PPL_HIGH, PASSED_OVER = "ppl_low", "ppl_high", "passed_over"
BELOW_THRESHOLD, UNRATED = "below_threshold", "unrated"
OTHER_DOMAINS = "*"
UNKNOWN = "unknown"
RATED_SELECT = ("overall_threshold", "top_k", "sample")  # the modes that need curation.rater


class CurationPolicy(Section):
    score: Literal["off", "perplexity"] = Field(
        default="off", description="perplexity: the served model scores the candidate pool before a round trains (a vLLM request per batch)"
    )
    pool_factor: float = Field(
        default=3.0, ge=1, le=100, description="the candidate pool is the oldest buffered documents up to this many times the round budget"
    )
    drop_low_z: float | None = Field(
        default=-3.0, le=0, description="drop documents whose robust z-score of NLL is below this (templated text, echoes); null: keep"
    )
    drop_high_z: float | None = Field(default=3.0, ge=0, description="drop documents whose robust z-score of NLL is above this (noise)")
    select: Literal["oldest", "score", "overall_threshold", "top_k", "sample"] = Field(
        default="oldest",
        description="fill the budget oldest first, lowest NLL first (score: needs score: perplexity), or by the rater's overall "
        "score: at or above overall_threshold oldest first, highest first (top_k), or sampled with temperature (sample)",
    )
    overall_threshold: float | None = Field(
        default=None, description="select: overall_threshold: the least overall rating (on the rater's 1..scale) a document needs"
    )
    temperature: float = Field(default=1.0, gt=0, le=1000, description="select: sample: weights exp(overall / temperature)")
    rater: RaterPolicy = Field(default_factory=RaterPolicy, description="who rates the candidate pool (policies/rating.py)")
    domain_targets: dict[str, float] = Field(
        default_factory=dict,
        description="share of a round's new tokens per domain ('*' = all others); over-represented domains wait for a later round",
    )
    max_passes: int = Field(default=5, ge=1, le=1000, description="a document passed over in this many rounds is dropped (passed_over)")
    max_doc_tokens: int = Field(default=2048, ge=16, le=131_072, description="tokens of a document scored (the rest is not read)")
    batch_docs: int = Field(default=32, ge=1, le=1024, description="documents per scoring request")

    @field_validator("domain_targets")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        return check_shares(v)

    def select_refusal(self) -> str | None:
        """Why this select mode cannot run (policies/config.py refuses the policy with it), or None."""
        if self.select == "score" and self.score == "off":
            return "curation.select: score needs curation.score: perplexity (there is no score to select by)"
        if self.select in RATED_SELECT and self.rater.backend == "off":
            return (
                f"curation.select: {self.select} needs curation.rater.backend (llm_judge, classifier or head): "
                "there is no rating to select by"
            )
        if self.select == "overall_threshold" and self.overall_threshold is None:
            return "curation.select: overall_threshold needs curation.overall_threshold"
        if self.overall_threshold is not None and not 1 <= self.overall_threshold <= self.rater.scale:
            return f"curation.overall_threshold must be within the rater's scale, 1..{self.rater.scale} (curation.rater.scale)"
        return None


@dataclass(frozen=True)
class Candidate:
    key: str
    bytes: int
    domain: str = "unknown"
    provenance: str = "unknown"  # human | unknown | synthetic
    nll: float | None = None  # mean token NLL under the served model
    detector: float | None = None  # served / reference NLL ratio
    suspected: bool = False  # the detector flagged it
    passes: int = 0  # rounds that passed it over already
    overall: float | None = None  # the rater's overall score (1..scale); None: not rated

    @property
    def synthetic(self) -> bool:
        return self.provenance == "synthetic" or self.suspected


def candidate_domain(ingest_domain: str | None, rater_domain: str | None) -> str:
    """The domain a document is mixed under: what ingest decided, or, when ingest did not know, the rater's."""
    if ingest_domain and ingest_domain != UNKNOWN:
        return ingest_domain
    return rater_domain or UNKNOWN


def gumbel_key(seed: str, key: str, overall: float, temperature: float) -> float:
    """overall / T + Gumbel noise from a hash of (seed, key): sorting by it descending draws documents without
    replacement with probabilities proportional to exp(overall / T) (Gumbel-top-k), the same draw for the same seed."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}|{key}".encode(), digest_size=8).digest(), "big")
    u = (h + 0.5) / 2**64  # in (0, 1)
    return overall / temperature - math.log(-math.log(u))


def rated_order(live: Sequence[Candidate], cur: CurationPolicy, seed: str, waiting: dict[str, str]) -> list[Candidate]:
    """The order a rated select mode fills the budget in; documents it refuses go to `waiting` with their reason."""
    rated = [c for c in live if c.overall is not None]
    if cur.select == "top_k":
        rated.sort(key=lambda c: -(c.overall or 0.0))  # stable: ties stay oldest first
    elif cur.select == "sample":
        rated.sort(key=lambda c: -gumbel_key(seed, c.key, c.overall or 0.0, cur.temperature))
    elif cur.select == "overall_threshold":
        threshold = cur.overall_threshold if cur.overall_threshold is not None else 1.0
        for c in rated:
            if (c.overall or 0.0) < threshold:
                waiting[c.key] = BELOW_THRESHOLD
        rated = [c for c in rated if c.key not in waiting]
    unrated = [c for c in live if c.overall is None]
    if cur.rater.on_error == "wait":
        waiting.update((c.key, UNRATED) for c in unrated)
        return rated
    return rated + unrated


class Selection(BaseModel):
    """A round's choice, as decided and as written to the round's data/curation.json (read back on resume)."""

    chosen: list[str] = Field(default_factory=list)  # in buffer order
    waiting: dict[str, str] = Field(default_factory=dict)  # key -> why: budget, domain_share, synthetic_cap, below_threshold, unrated
    dropped: dict[str, str] = Field(default_factory=dict)  # key -> reason (ppl_low, ppl_high, passed_over)
    passed: list[str] = Field(default_factory=list)  # waiting keys this round passed over (counted towards max_passes)
    z: dict[str, float] = Field(default_factory=dict)  # robust z-score of each scored candidate
    median_nll: float | None = None
    mad_nll: float | None = None
    domain_quota: dict[str, float] = Field(default_factory=dict)
    cap_binding: bool = False  # a synthetic document waited because of the cap


def robust_z(values: Mapping[str, float]) -> tuple[dict[str, float], float | None, float | None]:
    """(z per key, median, MAD): z = (x - median) / (1.4826 MAD), the normal-consistent robust score."""
    if len(values) < 3:
        return {}, None, None
    xs = list(values.values())
    med = statistics.median(xs)
    mad = statistics.median(abs(x - med) for x in xs)
    scale = 1.4826 * mad or 1e-9
    return {k: (x - med) / scale for k, x in values.items()}, med, mad


def domain_quotas(have: Mapping[str, float], targets: Mapping[str, float], budget: float) -> dict[str, float]:
    """Bytes each domain group may take: target x budget, and what a short group cannot use goes to the others
    in proportion to their targets (repeated until no group is short). Groups absent from `targets` share '*'."""
    if not targets:
        return {}
    quota = {g: t * budget for g, t in targets.items() if t > 0}
    if OTHER_DOMAINS not in targets:
        quota[OTHER_DOMAINS] = max(0.0, 1.0 - sum(targets.values())) * budget
    fixed: dict[str, float] = {}
    while True:
        short = {g: have.get(g, 0.0) for g, q in quota.items() if g not in fixed and have.get(g, 0.0) < q}
        if not short:
            break
        fixed.update(short)
        spare = budget - sum(fixed.values())
        open_ = [g for g in quota if g not in fixed]
        weight = sum(targets.get(g, 1.0 - sum(targets.values())) for g in open_)
        for g in open_:
            quota[g] = spare * targets.get(g, 1.0 - sum(targets.values())) / weight if weight > 0 else spare / len(open_)
        if not open_:
            break
    quota.update(fixed)
    return quota


def select_round(cands: Sequence[Candidate], budget_bytes: int, cur: CurationPolicy, col: CollapsePolicy, seed: str = "") -> Selection:
    """The round's documents from the candidate pool (given oldest first). Pure: same input (and `seed`, the round's
    id for `select: sample`), same selection."""
    sel = Selection()
    scored = {c.key: c.nll for c in cands if c.nll is not None}
    sel.z, sel.median_nll, sel.mad_nll = robust_z(scored)
    live: list[Candidate] = []
    for c in cands:
        z = sel.z.get(c.key)
        if z is not None and cur.drop_low_z is not None and z < cur.drop_low_z:
            sel.dropped[c.key] = PPL_LOW
        elif z is not None and cur.drop_high_z is not None and z > cur.drop_high_z:
            sel.dropped[c.key] = PPL_HIGH
        else:
            live.append(c)
    if cur.select in RATED_SELECT:
        order = rated_order(live, cur, seed, sel.waiting)
    elif cur.select == "score":
        order = sorted(live, key=lambda c: (c.nll is None, c.nll or 0.0))
    else:
        order = live
    targets = cur.domain_targets

    def group(c: Candidate) -> str:
        return c.domain if c.domain in targets else OTHER_DOMAINS

    have: dict[str, float] = {}
    for c in order:  # what may be taken: a document already waiting (below the threshold, unrated) gives no domain its bytes
        have[group(c)] = have.get(group(c), 0.0) + c.bytes
    sel.domain_quota = domain_quotas(have, targets, budget_bytes)
    used: dict[str, float] = {}
    total = synth = 0.0
    cap = col.effective_cap
    picked: list[Candidate] = []
    for c in order:
        if total + c.bytes > budget_bytes and picked:
            sel.waiting[c.key] = "budget"
            continue
        g = group(c)
        if targets and used.get(g, 0.0) + c.bytes > sel.domain_quota.get(g, 0.0) + 0.5 * c.bytes:
            sel.waiting[c.key] = "domain_share"
            continue
        if c.synthetic and synth + c.bytes > cap * budget_bytes:
            sel.waiting[c.key] = "synthetic_cap"
            sel.cap_binding = True
            continue
        picked.append(c)
        used[g] = used.get(g, 0.0) + c.bytes
        total += c.bytes
        synth += c.bytes if c.synthetic else 0.0
    while synth > cap * total:  # the buffer did not fill the budget: give back the latest synthetic documents
        c = next(c for c in reversed(picked) if c.synthetic)
        picked.remove(c)
        sel.waiting[c.key] = "synthetic_cap"
        sel.cap_binding = True
        total -= c.bytes
        synth -= c.bytes
    for c in cands:  # oldest-first waits for the budget are only a queue; any other wait is a judgement on the document
        if cur.select in RATED_SELECT and c.overall is None:
            continue  # not rated: no judgement was made (a rater that fails must not wear the buffer down)
        if c.key in sel.waiting and (sel.waiting[c.key] != "budget" or cur.select != "oldest"):
            if c.passes + 1 >= cur.max_passes:
                sel.dropped[c.key] = PASSED_OVER
                del sel.waiting[c.key]
            else:
                sel.passed.append(c.key)
    chosen = {c.key for c in picked}
    sel.chosen = [c.key for c in cands if c.key in chosen]
    return sel


def shares_by(cands: Sequence[Candidate], keys: Sequence[str], attr: str) -> dict[str, float]:
    """Byte shares of `keys` grouped by a Candidate attribute (domain, provenance)."""
    by_key = {c.key: c for c in cands}
    sizes: dict[str, float] = {}
    for k in keys:
        c = by_key[k]
        v = "synthetic" if attr == "provenance" and c.synthetic else str(getattr(c, attr))
        sizes[v] = sizes.get(v, 0.0) + c.bytes
    total = sum(sizes.values())
    return {k: v / total for k, v in sorted(sizes.items())} if total else {}
