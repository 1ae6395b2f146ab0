"""The round state machine (docs/architecture.md §3): which phase runs next, and how a round ends.

    PENDING -> SNAPSHOT -> TRAINING -> EVALUATING -> DEPLOYING -> DEPLOYED
    exits: REJECTED (the gate said no), FAILED (error or cancel, with cause), ROLLED_BACK

A round's record is written before each phase starts and each phase is
idempotent, so a daemon killed anywhere resumes the round from its persisted
phase. Every write checks the lease's fencing token in the same Redis call,
so a daemon that lost the lease cannot overwrite the new holder's state. Any
error in a phase ends the round FAILED with its cause, never the daemon; an
error in DEPLOYING after the replicas were touched first reconciles them, so a
failed round never leaves them on different versions. Whatever the end, retention
then runs (daemon/rounds/retention.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from connectors.redis_store import Fenced
from connectors.vllm import ServingError
from daemon.round_record import TERMINAL, RoundRecord, RoundState
from daemon.rounds.context import Cancelled, RoundContext, RoundFailed, Stop
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
    RoundState.DEPLOYING: deploying,
}


def drive(ctx: RoundContext, rid: str) -> RoundRecord:
    """Run round `rid` from its persisted phase to a terminal state (Stop leaves it where it is, resumable)."""
    rec = ctx.get_round(rid)
    if rec is None:
        raise KeyError(rid)
    try:
        while rec.state not in TERMINAL:
            if ctx.stop.is_set():
                raise Stop("stopping")
            if ctx.store.cancel_requested(rid) and rec.state != RoundState.DEPLOYING:
                raise Cancelled()
            try:
                PHASE[rec.state](ctx, rec)
            except (Stop, Fenced):
                ctx.reconcile_due = False  # the replicas are the next lease holder's: it reconciles at take-over
                raise
            except RoundFailed:
                raise
            except ServingError as e:
                raise RoundFailed(f"{rec.state.value}: {e}") from e
            except Exception as e:  # noqa: BLE001 - any error ends the round with its cause, never the daemon
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
