"""The round state machine (docs/architecture.md §3): which phase runs next, and how a round ends.

    PENDING -> SNAPSHOT -> TRAINING -> EVALUATING -> DEPLOYING -> DEPLOYED
    deploy.mode approve: EVALUATING -> AWAITING_APPROVAL -> DEPLOYING (approved) | REJECTED (rejected, timed out)
    deploy.mode shadow:  EVALUATING -> SHADOWED (what it would have deployed is in the record; no replica touched)
    exits: REJECTED (the gate or an operator said no), FAILED (error or cancel, with cause), ROLLED_BACK

A round's record is written before each phase starts and each phase is
idempotent, so a daemon killed anywhere resumes the round from its persisted
phase. Every write checks the lease's fencing token in the same Redis call,
so a daemon that lost the lease cannot overwrite the new holder's state. Redis
being unreachable is waited out: the phase is run again from the record in
Redis, with back-off, for up to `rounds.redis_outage_s` (a restart of Redis
does not fail a round). Any other error in a phase ends the round FAILED with
its cause, never the daemon; an error in DEPLOYING after the replicas were
touched first reconciles them, so a failed round never leaves them on
different versions. Whatever the end, retention then runs
(daemon/rounds/retention.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import tenacity

from connectors.redis_store import Fenced
from connectors.vllm import ServingError
from daemon.round_record import TERMINAL, RoundRecord, RoundState
from daemon.rounds.approval import awaiting_approval
from daemon.rounds.context import Cancelled, Outage, RoundContext, RoundFailed, Stop, redis_outage
from daemon.rounds.deploying import deploying, reconcile_serving
from daemon.rounds.document_fate import release, requeue
from daemon.rounds.evaluating import evaluating
from daemon.rounds.pending import pending
from daemon.rounds.retention import tidy
from daemon.rounds.snapshot import snapshot
from daemon.rounds.training import training

log = logging.getLogger("cptd.rounds")

PHASE: dict[RoundState, Callable[[RoundContext, RoundRecord], None]] = {
    RoundState.PENDING: pending,
    RoundState.SNAPSHOT: snapshot,
    RoundState.TRAINING: training,
    RoundState.EVALUATING: evaluating,
    RoundState.AWAITING_APPROVAL: awaiting_approval,
    RoundState.DEPLOYING: deploying,
}


def drive(ctx: RoundContext, rid: str) -> RoundRecord:
    """Run round `rid` from its persisted phase to a terminal state (Stop leaves it where it is, resumable)."""
    rec = ctx.get_round(rid)
    if rec is None:
        raise KeyError(rid)
    try:
        while rec.state not in TERMINAL:
            try:
                run_phase(ctx, rec)
            except (Stop, Fenced):
                ctx.reconcile_due = False  # the replicas are the next lease holder's: it reconciles at take-over
                raise
            except RoundFailed:
                raise
            except ServingError as e:
                raise RoundFailed(f"{rec.state.value}: {e}") from e
            except Exception as e:  # noqa: BLE001 - any error (an outage past its bound too) ends the round, never the daemon
                log.exception("round phase failed", extra={"round_id": rid, "state": rec.state.value})
                raise RoundFailed(f"{rec.state.value}: {type(e).__name__}: {e}") from e
    except RoundFailed as e:
        if ctx.reconcile_due:  # DEPLOYING failed after touching replicas: put them on one version before saying FAILED
            try:
                reconcile_serving(ctx)
            except Exception:  # noqa: BLE001 - the flag stays set; the runner reconciles before its next round
                log.exception("reconcile after a failed deploy failed", extra={"round_id": rid})
        rec.error = e.cause
        rec.docs = requeue(ctx, rec) if e.requeue else release(ctx, rec)
        ctx.enter(rec, RoundState.FAILED)
    finally:
        ctx.stop_job()
    if rec.state in TERMINAL:
        tidy(ctx)  # every end state, not only a deploy: failed and rejected rounds leave files too
    return rec


def run_phase(ctx: RoundContext, rec: RoundRecord) -> None:
    """Run the phase `rec` is in (the phase moves `rec` on).

    A Redis outage inside the phase runs it again from the record in Redis, as a restarted daemon would (phases
    are idempotent; `rec` is first reset to what was last written), with back-off, until Redis has failed for
    `rounds.redis_outage_s`; then the outage error ends the round. The lease loop gives the lease up sooner when
    Redis stays away (0.8 `lease_ttl_s`): the next attempt then raises Stop and the round waits, resumable, for
    the lease to come back."""
    outage = Outage(lambda: ctx.get_policy().rounds.redis_outage_s)
    tries = 0

    def attempt() -> None:
        nonlocal tries
        tries += 1
        if ctx.stop.is_set():
            raise Stop("stopping")
        if ctx.fence is None:
            raise Stop("lease lost")
        if tries > 1:  # the record as last written: the failed attempt may have changed it in memory only
            fresh = ctx.get_round(rec.id)
            outage.over()
            if fresh is None:
                raise KeyError(rec.id)
            for name in type(rec).model_fields:  # the serving controller's state stays: this holder knows it
                setattr(rec, name, getattr(fresh, name))
        if rec.state in TERMINAL:
            return
        if rec.state != RoundState.DEPLOYING and ctx.store.cancel_requested(rec.id):
            raise Cancelled()
        PHASE[rec.state](ctx, rec)

    def give_up(state: tenacity.RetryCallState) -> bool:
        e = state.outcome.exception() if state.outcome else None
        return e is None or outage.failed(e, rec.id)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(redis_outage),
        stop=give_up,
        wait=tenacity.wait_exponential(multiplier=0.5, min=0.5, max=10),
        sleep=lambda s: None if ctx.stop.wait(s) else None,  # SIGTERM cuts the wait short; the next attempt raises Stop
        reraise=True,
    )
    retrying(attempt)
