"""SNAPSHOT's curation: score the candidate pool, choose the round's documents, write the decision down first.

The decision (policies/curation.py decides) is written to the round's
data/curation.json before any document moves, so a resumed SNAPSHOT keeps its
selection, and once the round holds its documents the outliers leave the
buffer and the passed-over counts move (`apply_after_take`, done once).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from connectors.redis_store import StoredDoc
from connectors.vllm import ServingError
from daemon import metrics as M
from daemon.jobs.specs import DetectorSpec
from daemon.round_record import TERMINAL, CurationRecord, RaterRecord, RoundRecord
from daemon.rounds.context import RoundContext, RoundFailed, write_atomic, write_jsonl
from daemon.rounds.doc_rating import optional_job, pool_file, rate_pool, rated_set
from policies.collapse import cap_binding_streak, real_share, suspected
from policies.config import Policy
from policies.curation import Candidate, Selection, candidate_domain, select_round, shares_by
from policies.rating import Rating

log = logging.getLogger("cptd.rounds")

MANIFEST_FIELDS = ("key", "topic", "partition", "offset", "id", "source", "domain", "provenance")


class CandidateScore(BaseModel):
    nll: float | None = None  # mean token NLL under the served model
    scored_tokens: int | None = None
    detector: float | None = None  # Binoculars score (daemon/jobs/generated_text_detector.py)
    z: float | None = None  # robust z-score of nll in the pool
    suspected: bool | None = None  # the detector flagged it
    overall: float | None = None  # the rater's overall score (curation.rater)
    criteria: dict[str, float] | None = None  # the rater's ratings per criterion
    rater_domain: str | None = None  # the domain the rater gave
    unrated: str | None = None  # the rater was asked and gave no rating: why


class Scoring(BaseModel):
    scored_docs: int = 0
    scoring_seconds: float | None = None
    scoring_docs_per_s: float | None = None
    scoring_tokens_per_s: float | None = None
    scoring_error: str | None = None  # scoring failed or was skipped: the round went on unscored


class CurationDecision(BaseModel):
    """data/curation.json: the pool, its scores and the selection, as decided before any document moved."""

    pool_docs: int
    scoring: Scoring = Field(default_factory=Scoring)
    selection: Selection
    scores: dict[str, CandidateScore] = Field(default_factory=dict)
    domains: dict[str, float] = Field(default_factory=dict)
    provenance: dict[str, float] = Field(default_factory=dict)
    rater: RaterRecord | None = None  # how the pool was rated (curation.rater.backend not off)
    applied: bool = False  # the buffer-side effects (drops, pass counts) are done


def decision_path(ctx: RoundContext, rid: str) -> Path:
    return ctx.round_dir(rid) / "data" / "curation.json"


def read_decision(ctx: RoundContext, rid: str) -> CurationDecision | None:
    path = decision_path(ctx, rid)
    return CurationDecision.model_validate_json(path.read_text()) if path.exists() else None


def write_decision(ctx: RoundContext, rid: str, decision: CurationDecision) -> None:
    write_atomic(decision_path(ctx, rid), decision.model_dump_json().encode())


def choose(ctx: RoundContext, policy: Policy, rec: RoundRecord, budget: int) -> tuple[list[str], dict[str, StoredDoc]]:
    """Score the pool with the served model, select, write the decision. Returns the chosen keys and the pool."""
    pool = ctx.store.oldest_buffered(int(budget * policy.curation.pool_factor))
    if not pool:
        return [], {}
    data = ctx.round_dir(rec.id) / "data"
    scores: dict[str, CandidateScore] = {}
    scoring = Scoring()
    if policy.curation.score == "perplexity":
        scores, scoring = score_pool(ctx, policy, pool)
    if policy.collapse.detector:
        for key, value in detector_scores(ctx, policy, rec, pool).items():
            scores.setdefault(key, CandidateScore()).detector = value
    rater: RaterRecord | None = None
    if policy.curation.rater.backend != "off":
        rated = rate_pool(ctx, policy, rec, pool)
        rater = rated.record()
        for key, r in rated.ratings.items():
            s = scores.setdefault(key, CandidateScore())
            s.overall, s.criteria, s.rater_domain = r.overall, r.criteria, r.domain
        for key, reason in rated.unrated.items():
            scores.setdefault(key, CandidateScore()).unrated = reason
    passes = ctx.store.passes([d.key for d in pool])
    candidates = []
    for d, p in zip(pool, passes, strict=True):
        s = scores.get(d.key, CandidateScore())
        candidates.append(
            Candidate(
                key=d.key,
                bytes=d.bytes,
                domain=candidate_domain(d.domain, s.rater_domain),
                provenance=d.provenance or "unknown",
                nll=s.nll,
                detector=s.detector,
                suspected=suspected(s.detector, policy.collapse),
                passes=p,
                overall=s.overall,
            )
        )
    selection = select_round(candidates, budget, policy.curation, policy.collapse, seed=rec.id)
    if not selection.chosen:  # never fall back to taking the oldest documents the policy just refused
        why = dict(Counter(selection.waiting.values()))
        raise RoundFailed(
            f"SNAPSHOT: curation chose none of {len(pool)} candidates (waiting {why}, dropped {len(selection.dropped)})", False
        )
    for key, z in selection.z.items():
        scores.setdefault(key, CandidateScore()).z = round(z, 4)
    for c in candidates:
        if c.suspected:
            scores.setdefault(c.key, CandidateScore()).suspected = True
    dropped = [
        {
            **{f: getattr(d, f) for f in MANIFEST_FIELDS},
            "reason": selection.dropped[d.key],
            **scores.get(d.key, CandidateScore()).model_dump(exclude_none=True),
            "text": d.text,
        }
        for d in pool
        if d.key in selection.dropped
    ]
    write_jsonl(data / "dropped.jsonl", dropped)
    decision = CurationDecision(
        pool_docs=len(pool),
        scoring=scoring,
        selection=selection,
        scores=scores,
        domains=shares_by(candidates, selection.chosen, "domain"),
        provenance=shares_by(candidates, selection.chosen, "provenance"),
        rater=rater,
    )
    if rater is not None:
        rater.chosen = rated_set(ratings_of(scores, selection.chosen), policy.curation.rater.criteria)
        rater.waiting = rated_set(ratings_of(scores, selection.waiting), policy.curation.rater.criteria)
    write_decision(ctx, rec.id, decision)
    log.info(
        "curated the round's documents",
        extra={"round_id": rec.id, "pool": len(pool), "chosen": len(selection.chosen), "dropped": len(selection.dropped)},
    )
    return selection.chosen, {d.key: d for d in pool}


def score_pool(ctx: RoundContext, policy: Policy, pool: list[StoredDoc]) -> tuple[dict[str, CandidateScore], Scoring]:
    """Per-document mean NLL under the served model (route model: the active adapter, else the base), batched."""
    assert ctx.serving is not None
    client = ctx.serving.replicas[0]
    model = ctx.serving.route_model()
    try:
        refusal = client.prompt_logprobs_refusal()
        if refusal:  # scoring would take the replica down: skip it, say why
            why = f"{refusal}: scoring skipped"
            log.warning(why)
            return {}, Scoring(scoring_error=why)
    except ServingError as e:
        return {}, Scoring(scoring_error=str(e)[:500])
    t0 = time.monotonic()
    try:
        results = client.prompt_logprobs(
            [d.text for d in pool], model=model, max_tokens_per_doc=policy.curation.max_doc_tokens, batch_size=policy.curation.batch_docs
        )
    except ServingError as e:
        log.warning("scoring the candidate pool failed; the round goes on unscored", extra={"error": str(e)})
        return {}, Scoring(scoring_error=str(e)[:500])
    out: dict[str, CandidateScore] = {}
    tokens = 0
    for d, r in zip(pool, results, strict=True):
        if r.tokens > 0:
            out[d.key] = CandidateScore(nll=round(r.nll, 5), scored_tokens=r.tokens)
            tokens += r.tokens
    took = max(time.monotonic() - t0, 1e-9)
    M.SCORING_DOCS_PER_SECOND.set(len(out) / took)
    return out, Scoring(
        scored_docs=len(out),
        scoring_seconds=round(took, 3),
        scoring_docs_per_s=round(len(out) / took, 2),
        scoring_tokens_per_s=round(tokens / took, 1),
    )


def detector_scores(ctx: RoundContext, policy: Policy, rec: RoundRecord, pool: list[StoredDoc]) -> dict[str, float]:
    """Binoculars scores of the pool (daemon/jobs/generated_text_detector.py), as a job on the trainer's device."""
    served = rec.parent.checkpoint
    if not served:
        return {}
    directory = ctx.round_dir(rec.id)
    spec = DetectorSpec(
        served=served,
        reference=str(ctx.settings.base_checkpoint_path()),
        adapter=rec.parent.adapter_path,
        docs_path=str(pool_file(ctx, rec.id, pool)),
        out=str(directory / "data" / "detector.json"),
        max_len=policy.curation.max_doc_tokens,
        device=policy.train.device,
        dtype=ctx.served_dtype(),
    )
    result, cause = optional_job(ctx, rec, spec, "detector")
    if result is None:
        log.warning("the generated-text detector failed; the round goes on without it", extra={"round_id": rec.id, "error": cause})
        return {}
    return {r["key"]: r["score"] for r in result["rows"] if r.get("score") is not None}


def ratings_of(scores: dict[str, CandidateScore], keys: Iterable[str]) -> list[Rating]:
    """The ratings of `keys` that have one."""
    out = []
    for k in keys:
        s = scores.get(k)
        if s is not None and s.overall is not None:
            out.append(Rating(overall=s.overall, criteria=s.criteria or {}, domain=s.rater_domain))
    return out


def apply_after_take(ctx: RoundContext, rid: str, keys: list[str]) -> CurationDecision | None:
    """Once the round holds its documents: drop the outliers from the buffer, count passes, export the counts."""
    decision = read_decision(ctx, rid)
    if decision is None or decision.applied:
        return decision
    selection = decision.selection
    dropped = list(selection.dropped)
    if dropped:
        ctx.store.remove_docs(dropped)
    ctx.store.mark_passed_over(selection.passed, [*dropped, *keys])
    for reason in selection.waiting.values():
        M.CURATION_DOCS.labels("waiting", reason).inc()
    for reason in selection.dropped.values():
        M.CURATION_DOCS.labels("dropped", reason).inc()
    M.CURATION_DOCS.labels("chosen", "").inc(len(keys))
    decision.applied = True
    write_decision(ctx, rid, decision)
    return decision


def curation_record(
    ctx: RoundContext, decision: CurationDecision | None, policy: Policy, replay_ratio: float | None
) -> CurationRecord | None:
    """The round record's summary of the decision: counts by reason, shares, the cap and the real-data floor."""
    if decision is None:
        return None
    selection = decision.selection
    synthetic = decision.provenance.get("synthetic", 0.0)
    previous = next((r for r in ctx.newest_rounds() if r.curation is not None and r.state in TERMINAL), None)
    before = previous.curation.cap_binding_rounds if previous and previous.curation else 0
    streak = cap_binding_streak(before, selection.cap_binding)
    rec = CurationRecord(
        pool_docs=decision.pool_docs,
        **decision.scoring.model_dump(),
        median_nll=selection.median_nll,
        mad_nll=selection.mad_nll,
        chosen_docs=len(selection.chosen),
        waiting=dict(sorted(Counter(selection.waiting.values()).items())),
        dropped=dict(sorted(Counter(selection.dropped.values()).items())),
        domain_targets=dict(policy.curation.domain_targets),
        domains=decision.domains,
        provenance=decision.provenance,
        synthetic_share=synthetic,
        synthetic_cap=policy.collapse.effective_cap,
        cap_binding=selection.cap_binding,
        cap_binding_rounds=streak,
        real_share=real_share(replay_ratio, synthetic),
        real_floor=policy.collapse.real_floor,
        rater=decision.rater,
    )
    export_shares(rec, policy)
    return rec


OTHER_DOMAIN_LABEL = "other"


def domain_label_shares(domains: dict[str, float], named: frozenset[str]) -> dict[str, float]:
    """A round's domain shares under bounded label values: every named domain (0 when absent, so a past round's value
    does not linger) and 'other' for the sum of domains the policy does not name (a producer's free-form meta.domain)."""
    out = dict.fromkeys(sorted(named | {OTHER_DOMAIN_LABEL}), 0.0)
    for dom, x in domains.items():
        label = dom if dom in named else OTHER_DOMAIN_LABEL
        out[label] += x
    return out


def export_shares(rec: CurationRecord, policy: Policy) -> None:
    """The round's shares as gauges; the domain label takes values from the policy only (domain_label_shares)."""
    for cls, x in rec.provenance.items():
        M.ROUND_SHARE.labels("provenance", cls).set(x)
    for dom, x in domain_label_shares(rec.domains, policy.named_domains()).items():
        M.ROUND_SHARE.labels("domain", dom).set(x)
    M.ROUND_SHARE.labels("real", "real").set(rec.real_share or 0.0)
    M.SYNTHETIC_CAP_BINDING_ROUNDS.set(rec.cap_binding_rounds)
