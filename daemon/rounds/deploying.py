"""DEPLOYING: wait out blackout windows, swap the candidate in (or load the adapter), watch it; roll back.

The swap sequence, the watch and the adapter bookkeeping are the serving
controller's (daemon/serving.py); this phase decides when and records what
happened. A deploy first checks what the replicas serve, so a resumed round
that already swapped goes straight to the watch; otherwise it checks that its
parent is still what is served, so it never undoes an operator rollback.
Operator rollbacks come here too: they take the same lock as a deploy, held
until the deploy's end state is written, so the two never interleave. After a
DEPLOYING error the replicas are reconciled (`reconcile_serving`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from daemon import metrics as M
from daemon import redis_loss
from daemon.round_record import (
    CANCEL_CAUSE,
    DeploySummary,
    DeployWait,
    RollbackRecord,
    RollbackResult,
    RoundRecord,
    RoundState,
    WatchRecord,
)
from daemon.rounds.context import RoundContext, RoundFailed, Stop
from daemon.rounds.document_fate import release
from daemon.rounds.retention import tidy
from daemon.serving import DeployRecord
from policies.round_policy import blackout_match, next_swap_allowed

log = logging.getLogger("cptd.rounds")


def deploying(ctx: RoundContext, rec: RoundRecord) -> None:
    policy = ctx.policy_of(rec)
    wait_for_blackouts(ctx, rec)
    assert ctx.serving is not None and rec.candidate is not None
    serving = ctx.serving
    adapter = policy.train.mode != "full"  # lora/qlora: the adapter goes out under its own name; the base weights stay
    # Held until the round's end state is written: an operator rollback is refused until then, so it never lands
    # between the swap and the record of it (nor between the parent check and the swap).
    with ctx.serving_lock:
        state = serving.state
        if adapter:
            done = state.lora_active == serving.lora_name(rec.id)
        else:
            done = state.desired_version == rec.id and all(r.version == rec.id for r in state.replicas.values())
        if not done:
            refusal = parent_refusal(ctx, rec, adapter)
            if refusal is not None:
                raise RoundFailed(refusal, requeue=True)
        # From here an error may leave replicas on different versions: the state machine reconciles after it.
        ctx.reconcile_due = True
        if not done:
            d = (
                serving.deploy_lora(rec.candidate, rec.id, max_rank=policy.train.lora_r)
                if adapter
                else serving.deploy(rec.candidate, rec.id)
            )
            rec.deploy = deploy_summary(d)
            if not d.ok:
                e = d.error or {}
                stays = f"clients stay on {serving.route_model()}" if adapter else f"serving stays on {state.desired_version}"
                raise RoundFailed(f"DEPLOYING: replica {e.get('replica') or '-'} step {e.get('step')}: {e.get('message')}; {stays}")
        if policy.rounds.watch_s > 0 and rec.watch is None:
            w = serving.watch(policy.rounds.watch_s, rollback=not adapter)  # an adapter round's undo is rollback_lora
            rec.watch = WatchRecord(window_s=w.window_s, probes=len(w.probes), regression=w.regression)
            if w.regression:
                back = serving.rollback_lora(trigger="watch") if adapter else w.rollback
                to = (back.route_model if adapter else back.version) if back else None
                rec.rollback = RollbackRecord(at=time.time(), trigger="watch", reason=w.regression, to=to, ok=bool(back and back.ok))
                rec.docs = release(ctx, rec)
                ctx.enter(rec, RoundState.ROLLED_BACK)
                ctx.reconcile_due = False  # a rollback that failed is in the record; desired_version is still this round
                return
        rec.deployed_at = time.time()
        rec.docs = release(ctx, rec)
        M.ROUND_LAST_SUCCESS.set(rec.deployed_at)
        log.info("round deployed", extra={"round_id": rec.id, "route_model": rec.deploy.route_model if rec.deploy else None})
        ctx.enter(rec, RoundState.DEPLOYED)
        ctx.reconcile_due = False


def parent_refusal(ctx: RoundContext, rec: RoundRecord, adapter: bool) -> str | None:
    """Why the round may not deploy: what it was trained from is no longer what is served; None when it still is.

    An operator rollback while the round trained means the parent was judged bad: deploying a descendant of it
    would silently undo the rollback. An adapter round continues both the served base and the active adapter.
    """
    assert ctx.serving is not None
    state = ctx.serving.state
    if state.desired_version != rec.parent.version:
        return (
            f"DEPLOYING: round {rec.id} was trained from version {rec.parent.version!r}, but version "
            f"{state.desired_version!r} is served now (rolled back since?); not deploying it, so the rollback stands"
        )
    if adapter and state.lora_active != rec.parent.adapter:
        return (
            f"DEPLOYING: round {rec.id} continues adapter {rec.parent.adapter!r}, but clients are routed to "
            f"{state.lora_active or 'the base model'!r} now (rolled back since?); not deploying it, so the rollback stands"
        )
    return None


def reconcile_serving(ctx: RoundContext, roll_back_diverged: bool = True) -> None:
    """Read what each replica serves and bring the ones that differ back to the desired version.

    Runs when a lease holder takes over and after any DEPLOYING error that may have left the replicas on
    different versions (`RoundContext.reconcile_due`). The state is first written under the fence, so a daemon
    that lost the lease touches no replica: the new holder reconciles at its take-over.
    """
    with ctx.serving_lock:
        reconcile_locked(ctx, roll_back_diverged)


def reconcile_locked(ctx: RoundContext, roll_back_diverged: bool = True) -> None:
    """`reconcile_serving` for a caller that holds the serving lock already (the periodic upkeep).

    Only the diverged replicas that answered are swapped back: one that is unreachable cannot be, and one
    already on the desired version need not be (a restarted replica is brought back without touching the rest).
    """
    serving = ctx.serving
    assert serving is not None
    redis_loss.put_serving(ctx.store, ctx.fenced(), ctx.settings.checkpoint_dir, serving.state.to_json())
    rec = serving.reconcile()
    log.info("reconciled serving state", extra={"live": rec.live, "diverged": rec.diverged, "errors": rec.errors})
    desired = serving.state.desired_version
    fixable = [u for u in rec.diverged if u not in rec.errors]
    if fixable and roll_back_diverged and desired is not None:
        out = serving.rollback("reconcile", to_version=desired, only=fixable)
        log.info("brought diverged replicas back to the deployed version", extra={"version": desired, "replicas": fixable, "ok": out.ok})
    ctx.reconcile_due = False


def wait_for_blackouts(ctx: RoundContext, rec: RoundRecord) -> None:
    """Read from the policy in force, not the round's copy, so an operator can hold a swap by editing the file."""
    while (expr := blackout_match(datetime.now(timezone.utc), ctx.get_policy().triggers)) is not None:
        until = next_swap_allowed(datetime.now(timezone.utc), ctx.get_policy().triggers)
        if rec.deploy_wait is None or rec.deploy_wait.blackout != expr:
            rec.deploy_wait = DeployWait(blackout=expr, until=until.isoformat() if until else None)
            ctx.put(rec)
            log.info("deploy waits for a blackout window to end", extra={"round_id": rec.id, "blackout": expr})
        if ctx.store.cancel_requested(rec.id):
            raise RoundFailed(f"{CANCEL_CAUSE} while waiting for a blackout window", requeue=True)
        if ctx.stop.wait(5.0):
            raise Stop("stopping")


def deploy_summary(d: DeployRecord) -> DeploySummary:
    out = d.to_dict()
    pauses = [r["pause_seconds"] for r in out.get("replicas", []) if r.get("pause_seconds") is not None]
    return DeploySummary.model_validate({**out, "pause_seconds_max": max(pauses) if pauses else None})


def rollback(ctx: RoundContext, to: str | None = None) -> RollbackResult:
    """The operator's rollback: serve the previous (or the named) version again; the live round becomes ROLLED_BACK."""
    serving = ctx.serving
    if ctx.fence is None or serving is None:
        holder, _ = ctx.store.lease_holder()
        raise PermissionError(f"this daemon does not run rounds; the lease holder is {holder!r}")
    if not ctx.serving_lock.acquire(blocking=False):
        raise RuntimeError("a deploy or rollback is in progress")
    try:
        state = serving.state
        if state.lora_active and (to is None or serving.lora_name(to) in state.lora_versions or to == serving.base_model_name()):
            return rollback_adapter(ctx, to)
        live = state.desired_version
        target = to or state.previous_version
        if target is None or target not in state.versions:
            raise ValueError(f"cannot roll back to {target!r}: known versions are {sorted(state.versions)}")
        d = serving.rollback("operator", to_version=target)
        if d.ok and live and live != target:
            mark_rolled_back(ctx, live, target)
        return RollbackResult(ok=d.ok, from_version=live, to=target, error=d.error, record=deploy_summary(d))
    finally:
        ctx.serving_lock.release()


def rollback_adapter(ctx: RoundContext, to: str | None) -> RollbackResult:
    """Clients go back to the adapter before the active one (or `to`), or to the base model when none is kept."""
    assert ctx.serving is not None
    prefix = ctx.serving.lora_name("")
    live = ctx.serving.state.lora_active
    d = ctx.serving.rollback_lora(to=to)  # a round id, an adapter name or the base model name
    live_round = live.removeprefix(prefix) if live else None
    target_round = (d.route_model or "").removeprefix(prefix) if d.route_model and d.route_model.startswith(prefix) else "base"
    if d.ok and live_round:
        mark_rolled_back(ctx, live_round, d.route_model)
    return RollbackResult(ok=d.ok, from_version=live_round, to=target_round, error=d.error, record=deploy_summary(d))


def mark_rolled_back(ctx: RoundContext, rid: str, to: str | None) -> None:
    rec = ctx.get_round(rid)
    if rec is not None and rec.state == RoundState.DEPLOYED:
        rec.rollback = RollbackRecord(at=time.time(), trigger="operator", to=to, ok=True)
        ctx.enter(rec, RoundState.ROLLED_BACK)
        tidy(ctx)
