"""After the gate accepts: deploy (auto), stop short of serving (shadow), or wait for an operator (approve).

`deploy.mode` of the round's own policy copy decides, so a reload changes the next round, never a waiting one.

* auto: EVALUATING -> DEPLOYING, as always.
* shadow: the candidate goes through the checks a deploy makes before it touches a replica
  (`ServingController.validate`: files only), and the round ends SHADOWED with a `shadow` record saying which
  version would have gone to which replicas. No replica is called. A candidate a deploy would refuse ends the
  round FAILED, as the deploy would have. The documents are released (replay, then out of the buffer), as
  after a gate rejection: they were trained on; requeueing them would have every shadow round retrain the
  same oldest documents while the buffer fills until ingest pauses.
* approve: the round waits in AWAITING_APPROVAL (a phase like any other: its record, with the deadline, is in
  Redis, so a restarted daemon or a new lease holder resumes the same wait). An operator's decision is kept in
  Redis by whichever daemon took it (`decide`, like a cancel mark); the lease holder's wait reads it within
  POLL_S. Approved: DEPLOYING (blackouts, the parent check and the swap as in auto). Rejected, or no decision
  by `approval_timeout_s`: REJECTED, documents released as after a gate rejection. A cancel ends it FAILED with
  its documents requeued, as in any phase before DEPLOYING. While a round waits no other round starts: the
  runner drives one round at a time, and triggers wait (queued) as they do while a round trains.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from connectors.redis_store import RedisStore
from connectors.vllm import CheckpointError
from daemon import metrics as M
from daemon.round_record import TERMINAL, ApprovalRecord, ApprovalResult, RoundRecord, RoundState, ShadowRecord
from daemon.rounds.context import Cancelled, RoundContext, RoundFailed, Stop
from daemon.rounds.document_fate import release

log = logging.getLogger("cptd.rounds")

POLL_S = 1.0  # how often a waiting round reads the operator's decision
DECISIONS = ("approved", "rejected")  # what an operator may say; a wait can also end timed_out


def after_gate(ctx: RoundContext, rec: RoundRecord) -> None:
    """The gate accepted `rec.candidate`: move the round on as its deploy mode says."""
    deploy = ctx.policy_of(rec).deploy
    if deploy.mode == "shadow":
        shadow_end(ctx, rec)
    elif deploy.mode == "approve":
        now = time.time()
        rec.approval = ApprovalRecord(since=now, deadline=now + deploy.approval_timeout_s)
        log.info("round waits for approval", extra={"round_id": rec.id, "deadline": rec.approval.deadline})
        ctx.enter(rec, RoundState.AWAITING_APPROVAL)
    else:
        ctx.enter(rec, RoundState.DEPLOYING)


def shadow_end(ctx: RoundContext, rec: RoundRecord) -> None:
    """Record what a deploy would have done, after the checks it would have made; touch no replica."""
    assert ctx.serving is not None and rec.candidate is not None
    policy = ctx.policy_of(rec)
    adapter = policy.train.mode != "full"
    state = ctx.serving.state
    try:
        ctx.serving.validate(rec.candidate, rec.id, adapter=adapter, max_rank=policy.train.lora_r if adapter else None)
    except CheckpointError as e:
        raise RoundFailed(f"SHADOW: a deploy would refuse the candidate at validate: {e}") from e
    rec.shadow = ShadowRecord(
        version=rec.id,
        kind="lora" if adapter else "deploy",
        candidate=rec.candidate,
        route_model=ctx.serving.lora_name(rec.id) if adapter else None,
        replicas=sorted(state.replicas) or [r.url for r in ctx.serving.replicas],
        serving_version=(state.lora_active or state.desired_version) if adapter else state.desired_version,
    )
    rec.docs = release(ctx, rec)
    log.info(
        "shadow round: not deployed",
        extra={"round_id": rec.id, "would_deploy": rec.id, "replicas": len(rec.shadow.replicas), "serving": rec.shadow.serving_version},
    )
    ctx.enter(rec, RoundState.SHADOWED)


def awaiting_approval(ctx: RoundContext, rec: RoundRecord) -> None:
    """AWAITING_APPROVAL: wait for the operator's decision, a cancel, or the deadline (all read from Redis)."""
    assert rec.approval is not None
    M.ROUND_AWAITING_APPROVAL.set(rec.approval.since)
    try:
        decision = wait_decision(ctx, rec, rec.approval.deadline)
    finally:
        M.ROUND_AWAITING_APPROVAL.set(0)
    rec.approval = rec.approval.model_copy(
        update={"decision": decision["decision"], "by": decision.get("by"), "note": decision.get("note"), "at": decision.get("at")}
    )
    M.ROUND_APPROVALS.labels(decision=decision["decision"]).inc()
    log.info("approval wait ended", extra={"round_id": rec.id, "decision": decision["decision"], "by": decision.get("by")})
    if decision["decision"] == "approved":
        ctx.enter(rec, RoundState.DEPLOYING)
        return
    rec.docs = release(ctx, rec)
    ctx.enter(rec, RoundState.REJECTED)


def wait_decision(ctx: RoundContext, rec: RoundRecord, deadline: float) -> dict[str, Any]:
    """The operator's decision, or a timed_out one at `deadline`; Cancelled on a cancel mark, Stop on SIGTERM or a
    lost lease (the round stays AWAITING_APPROVAL, and whoever holds the lease next waits on to the same deadline)."""
    while True:
        decision = ctx.store.approval_decision(rec.id)
        if decision is not None:
            return decision
        if ctx.store.cancel_requested(rec.id):
            raise Cancelled()
        now = time.time()
        if now >= deadline:
            return {"decision": "timed_out", "at": now, "note": f"no decision within {ctx.policy_of(rec).deploy.approval_timeout_s:g} s"}
        if ctx.stop.wait(min(POLL_S, deadline - now)):
            raise Stop("stopping")
        if ctx.fence is None:
            raise Stop("lease lost")


def decide(store: RedisStore, rec: RoundRecord | None, round_id: str, decision: str, by: str | None, note: str | None) -> ApprovalResult:
    """An operator's approve or reject, taken by any daemon: kept in Redis for the lease holder's waiting round.

    Refused (ValueError, naming the round's state) when the round is not waiting for approval, or when another
    decision on it was kept first; the same decision again is answered as the first (a retried call is harmless)."""
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r}: expected one of {', '.join(DECISIONS)}")
    if rec is None:
        raise KeyError(round_id)
    if rec.state != RoundState.AWAITING_APPROVAL:
        how = "ended" if rec.state in TERMINAL else "is"
        raise ValueError(f"round {round_id} is not waiting for approval: it {how} {rec.state.value}")
    kept = store.decide_approval(round_id, {"decision": decision, "by": by, "note": note, "at": time.time()})
    if kept is not None and kept.get("decision") != decision:
        raise ValueError(f"round {round_id} was already {kept.get('decision')} by {kept.get('by') or 'an operator'}")
    return ApprovalResult(round=round_id, decision=decision, state=rec.state)
