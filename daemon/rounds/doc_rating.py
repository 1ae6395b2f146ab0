"""SNAPSHOT's rater: criteria ratings, an overall score and a domain for each document of the candidate pool.

`llm_judge` asks an OpenAI-compatible server from the daemon itself (a thread
pool of `curation.rater.concurrency` requests, each bounded by `timeout_s`);
`head` and `classifier` run `daemon.jobs.document_rater` as a job on the
trainer's device. Whatever goes wrong (a timeout, an answer that is not the
schema, a job that fails, a pool rated only in part) the round goes on: each
document is either rated or carries the reason it is not, the record counts
them, and `rater.on_error` decides where the unrated go (policies/curation.py).
Only an operator's cancel stops the round.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.llm_judge import JudgeClient, JudgeError, base_url
from connectors.redis_store import StoredDoc
from daemon import metrics as M
from daemon.job_launchers import Job
from daemon.jobs.specs import JobSpec, RaterSpec
from daemon.round_record import RatedSet, RaterRecord, RatingSpread, RoundRecord
from daemon.rounds.context import Cancelled, RoundContext, RoundFailed, write_jsonl
from policies.config import Policy
from policies.rating import (
    OVERALL,
    UNRATED_ABANDONED,
    UNRATED_FAILED,
    UNRATED_JOB,
    UNRATED_MISSING,
    UNRATED_ROW,
    UNRATED_SKIPPED,
    UNRATED_TIMEOUT,
    RaterPolicy,
    Rating,
    answer_pattern,
    judge_prompt,
    parse_answer,
)

log = logging.getLogger("cptd.rounds")

CANCELLED = "cancelled"  # internal: the operator cancelled while the judge was working


@dataclass
class PoolRatings:
    """Per document of the pool: its Rating, or the reason it has none (policies/rating.py UNRATED_*)."""

    backend: str
    ratings: dict[str, Rating] = field(default_factory=dict)
    unrated: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None

    def record(self) -> RaterRecord:
        took = self.seconds
        return RaterRecord(
            backend=self.backend,
            rated_docs=len(self.ratings),
            unrated=dict(sorted(Counter(self.unrated.values()).items())),
            seconds=None if took is None else round(took, 3),
            docs_per_s=round(len(self.ratings) / took, 3) if took else None,
            error=self.error,
        )


def pool_file(ctx: RoundContext, rid: str, pool: Sequence[StoredDoc]) -> Path:
    """data/pool.jsonl: the candidates' keys and texts, the input of the rating and detector jobs."""
    path = ctx.round_dir(rid) / "data" / "pool.jsonl"
    write_jsonl(path, [{"key": d.key, "text": d.text} for d in pool])
    return path


def rate_pool(ctx: RoundContext, policy: Policy, rec: RoundRecord, pool: Sequence[StoredDoc]) -> PoolRatings:
    """Rate every candidate with the policy's rater; never raises for a bad rater, only for a cancel."""
    rater = policy.curation.rater
    t0 = time.monotonic()
    if rater.backend == "llm_judge":
        out = judge_pool(ctx, rater, rec.id, pool)
    else:
        out = job_ratings(ctx, policy, rec, pool)
    if out.seconds is None:
        out.seconds = max(time.monotonic() - t0, 1e-9)
    for d in pool:  # a backend that skipped documents without a word: say so
        if d.key not in out.ratings and d.key not in out.unrated:
            out.unrated[d.key] = UNRATED_MISSING
    M.RATER_DOCS.labels(rater.backend, "rated").inc(len(out.ratings))
    for reason, n in Counter(out.unrated.values()).items():
        M.RATER_DOCS.labels(rater.backend, reason).inc(n)
    if out.unrated:
        log.warning(
            "the rater left documents unrated; the round goes on",
            extra={"round_id": rec.id, "rated": len(out.ratings), "unrated": dict(Counter(out.unrated.values())), "error": out.error},
        )
    return out


def served_replica_refusal(ctx: RoundContext, rater: RaterPolicy) -> str | None:
    """The judge must not be a replica clients are served from (its load would be theirs), unless the policy allows it."""
    if rater.allow_served_replicas or ctx.serving is None or rater.url is None:
        return None
    served = {base_url(r.url) for r in ctx.serving.replicas}
    if base_url(rater.url) in served:
        return f"curation.rater.url {rater.url} is a served replica (set curation.rater.allow_served_replicas to allow it)"
    return None


def skipped(backend: str, pool: Iterable[StoredDoc], reason: str, error: str) -> PoolRatings:
    return PoolRatings(backend, unrated={d.key: reason for d in pool}, error=error[:500])


def judge_pool(ctx: RoundContext, rater: RaterPolicy, rid: str, pool: Sequence[StoredDoc]) -> PoolRatings:
    """One request per document, `concurrency` at a time. After 2 x concurrency failed requests in a row (none
    answered), the judge is taken to be down and the documents not yet asked are given up (`abandoned`)."""
    refusal = served_replica_refusal(ctx, rater)
    if refusal:
        log.warning(refusal)
        return skipped("llm_judge", pool, UNRATED_SKIPPED, refusal)
    assert rater.url is not None and rater.model is not None  # RaterPolicy refuses llm_judge without them
    client = JudgeClient(rater.url, rater.timeout_s)
    pattern = answer_pattern(rater) if rater.guided else None
    lock = threading.Lock()
    failures_in_a_row = 0
    last_error: list[str] = []

    def one(d: StoredDoc) -> Rating | str:
        nonlocal failures_in_a_row
        with lock:
            if failures_in_a_row >= 2 * rater.concurrency:
                return UNRATED_ABANDONED
        if ctx.store.cancel_requested(rid):
            return CANCELLED
        try:
            answer = client.complete(rater.model or "", judge_prompt(rater, d.text), rater.max_tokens, pattern)
        except JudgeError as e:
            with lock:
                failures_in_a_row += 1
                last_error[:] = [str(e)]
            return UNRATED_TIMEOUT if e.kind == "timeout" else UNRATED_FAILED
        with lock:
            failures_in_a_row = 0
        return parse_answer(answer, rater)

    try:
        with ThreadPoolExecutor(rater.concurrency, thread_name_prefix="rater") as ex:
            results = list(ex.map(one, pool))
    finally:
        client.close()
    if CANCELLED in results:
        raise Cancelled()
    out = PoolRatings("llm_judge", error=last_error[0][:500] if last_error else None)
    for d, r in zip(pool, results, strict=True):
        if isinstance(r, Rating):
            out.ratings[d.key] = r
        else:
            out.unrated[d.key] = r
    return out


def job_ratings(ctx: RoundContext, policy: Policy, rec: RoundRecord, pool: Sequence[StoredDoc]) -> PoolRatings:
    """`head` / `classifier`: daemon.jobs.document_rater on the trainer's device; a failed job rates nothing."""
    rater = policy.curation.rater
    backend = rater.backend
    if backend not in ("head", "classifier"):
        return skipped(backend, pool, UNRATED_SKIPPED, f"unknown rater backend {backend}")
    if backend == "head" and not rec.parent.checkpoint:
        return skipped(backend, pool, UNRATED_SKIPPED, "head: the served version has no checkpoint to read hidden states from")
    directory = ctx.round_dir(rec.id)
    spec = RaterSpec(
        backend=backend,
        docs_path=str(pool_file(ctx, rec.id, pool)),
        out=str(directory / "data" / "rater.json"),
        criteria=list(rater.criteria),
        domains=list(rater.domains),
        scale=rater.scale,
        served=rec.parent.checkpoint,
        adapter=rec.parent.adapter_path,
        path=rater.path,
        max_len=rater.max_doc_tokens,
        device=policy.train.device,
        dtype=ctx.served_dtype(),
    )
    result, cause = optional_job(ctx, rec, spec, "rater")
    if result is None:
        log.warning("the rating job failed; the round goes on unrated", extra={"round_id": rec.id, "error": cause})
        return skipped(backend, pool, UNRATED_JOB, cause or "")
    return from_rows(backend, result.get("rows") or [], rater, result.get("seconds"))


def optional_job(ctx: RoundContext, rec: RoundRecord, spec: JobSpec, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """A job whose failure the round survives: (its result, None) or (None, why it failed). A cancel still propagates."""
    directory = ctx.round_dir(rec.id)
    try:
        return ctx.run_job(Job(spec, directory / f"{name}-spec.json", directory / f"{name}.log", round_id=rec.id), rec, timeout=3600), None
    except Cancelled:
        raise
    except RoundFailed as e:
        return None, e.cause


def from_rows(backend: str, rows: list[dict], rater: RaterPolicy, seconds: float | None) -> PoolRatings:
    """The job's rows, each checked against the schema like a judge's answer."""
    out = PoolRatings(backend, seconds=float(seconds) if isinstance(seconds, (int, float)) and seconds > 0 else None)
    for row in rows:
        key = row.get("key") if isinstance(row, dict) else None
        if not isinstance(key, str):
            continue
        if row.get("error") is not None:
            out.unrated[key] = UNRATED_ROW
            continue
        given = row.get("criteria")
        criteria: dict = given if isinstance(given, dict) else {}
        r = parse_answer({**criteria, OVERALL: row.get(OVERALL), "domain": row.get("domain")}, rater)
        if isinstance(r, Rating):
            out.ratings[key] = r
        else:
            out.unrated[key] = r
    return out


def rated_set(ratings: Iterable[Rating], criteria: Sequence[str]) -> RatedSet:
    """Mean and quartiles per criterion, documents per rater domain, of a set of ratings."""
    rs = list(ratings)
    spreads: dict[str, RatingSpread] = {}
    for c in criteria:
        xs = sorted(r.criteria[c] for r in rs if c in r.criteria)
        if not xs:
            continue
        q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0], xs[0], xs[0])
        spreads[c] = RatingSpread(mean=round(statistics.fmean(xs), 4), q1=round(q1, 4), median=round(med, 4), q3=round(q3, 4))
    domains = Counter(r.domain for r in rs if r.domain is not None)
    return RatedSet(docs=len(rs), criteria=spreads, domains=dict(sorted(domains.items())))
